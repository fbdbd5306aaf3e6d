"""Configuration of OpenAI's weight-sparse GPT (Gao et al. 2025, `circuit_sparsity`).

This file is shipped next to converted checkpoints as remote code: it imports only
transformers and the standard library.
"""

import os

from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Every place the reference can apply AbsTopK activation sparsity (`maybe_activation_sparsity`).
AFRAC_LOCTYPES = (
    "attn_in", "attn_out", "mlp_in", "mlp_out", "attn_q", "attn_k", "attn_v",
    "mlp_neuron", "resid_post_attn", "resid_post_mlp",
)

# Keys of released `beeg_config.json` files that only matter for training or for the
# reference's kernels: kept in the config as they are, ignored by the forward pass.
TRAINING_ONLY_KEYS = frozenset({
    "pfrac", "bigram_table_rank", "expansion_factor", "expansion_factor_mlp", "sparse_matmul_impl",
    "afrac_approx", "ignore_dw_grad", "debug_exact_topk", "rtopk", "dropout", "debug_nans",
    "grad_checkpointing", "flash", "enable_sparse_kernels", "dropout_cat_pos_emb",
    "sinusoidal_cat_pos_emb", "dtype_str", "lr", "total_tokens", "seed", "minimum_alive_per_neuron",
})

# The reference `GPTConfig` fields that change the math, with the reference's defaults.
ORIGINAL_DEFAULTS = {
    "block_size": 1024, "vocab_size": 50304, "n_layer": 12, "n_head": 12, "d_head": None,
    "d_model": 768, "d_mlp": None, "bias": True, "ln_bias": True, "rms_norm": False,
    "residual_activation_type": "identity", "activation_type": "gelu", "afrac": None,
    "afrac_loctypes": "attn_in,attn_out,mlp_in,mlp_out", "tied_unembed": True,
    "enable_bigram_table": False, "learnable_bigram_table": False, "d_pos_emb": None,
    "sink": False, "tokenizer_name": "tinypython_2k",
}
LEGACY_KEYS = {"n_mlp": "d_mlp"}

# The largest sizes a config may declare, checked before anything is built (a config.json is user input: 10^6
# layers would hang every loader, a vocabulary of 60,000 with a bigram table asks for 14.4 GB).
MAX_SIZES = {"n_layer": 1024, "n_head": 4096, "d_model": 65536, "d_head": 65536, "d_mlp": 262144, "d_pos_emb": 65536,
             "vocab_size": 1 << 20, "block_size": 1 << 20}
MAX_BIGRAM_ENTRIES = 1 << 28  # vocab_size**2 of the bigram table: 1 GiB in float32 (vocab_size up to 16,384)
MAX_MODEL_BYTES_ENV = "CSP_MAX_MODEL_BYTES"  # caps what one model may allocate below the free memory (a shared host)


def _standard_config_keys() -> set[str]:
    """Keys every transformers config may carry (ids, generation defaults, auto_map, ...)."""
    return set(PreTrainedConfig().to_dict()) | {"auto_map", "architectures", "dtype", "torch_dtype", "transformers_version", "model_type", "tie_word_embeddings", "name_or_path", "attn_implementation", "experts_implementation"}


class CSPConfig(PreTrainedConfig):
    r"""Holds every field of the reference `GPTConfig` that changes the forward pass.

    Field names are the reference's (`d_model`, `n_layer`, ...) so that released
    `beeg_config.json` files map one to one; `hidden_size` and friends are aliases.
    `use_sparse_kernels` (not in the reference) multiplies with only the nonzero weights in CPU
    forward passes without autograd; it changes speed, not results.
    """

    model_type = "csp"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
        "intermediate_size": "d_mlp",
        "head_dim": "d_head",
        "tied_unembed": "tie_word_embeddings",  # the reference's name for the same knob
    }

    def __init__(
        self,
        block_size: int = 1024,
        vocab_size: int = 50304,
        n_layer: int = 12,
        n_head: int = 12,
        d_head: int | None = None,
        d_model: int = 768,
        d_mlp: int | None = None,
        bias: bool = True,
        ln_bias: bool = True,
        rms_norm: bool = False,
        residual_activation_type: str = "identity",
        activation_type: str = "gelu",
        afrac: float | None = None,
        afrac_loctypes: str = "attn_in,attn_out,mlp_in,mlp_out",
        tied_unembed: bool | None = None,
        enable_bigram_table: bool = False,
        learnable_bigram_table: bool = False,
        d_pos_emb: int | None = None,
        sink: bool = False,
        tokenizer_name: str = "tinypython_2k",
        use_sparse_kernels: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        if "n_mlp" in kwargs:  # legacy spelling of d_mlp in older configs
            n_mlp = kwargs.pop("n_mlp")
            d_mlp = n_mlp if d_mlp is None else d_mlp
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.d_head = d_head if d_head is not None else (d_model // n_head if isinstance(n_head, int) and n_head > 0 else None)
        self.d_mlp = d_mlp if d_mlp is not None else 4 * d_model
        self.bias = bias
        self.ln_bias = ln_bias
        self.rms_norm = rms_norm
        self.residual_activation_type = residual_activation_type
        self.activation_type = activation_type
        self.afrac = afrac
        self.afrac_loctypes = afrac_loctypes
        self.enable_bigram_table = enable_bigram_table
        self.learnable_bigram_table = learnable_bigram_table
        self.d_pos_emb = d_pos_emb
        self.sink = sink
        self.tokenizer_name = tokenizer_name
        self.use_sparse_kernels = use_sparse_kernels
        self.use_cache = use_cache
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        # `tie_word_embeddings` is the one knob; `tied_unembed` (released configs) is its legacy spelling.
        tie = kwargs.pop("tie_word_embeddings", None)
        if tie is None:
            tie = True if tied_unembed is None else tied_unembed
        elif tied_unembed is not None and bool(tied_unembed) != bool(tie):
            logger.warning(f"CSPConfig: tie_word_embeddings={tie} and its legacy spelling tied_unembed={tied_unembed} "
                           f"disagree; using tie_word_embeddings={tie}")
        kwargs["tie_word_embeddings"] = tie
        self._validate()
        super().__init__(**kwargs)
        unknown = sorted(k for k in set(kwargs) - TRAINING_ONLY_KEYS - _standard_config_keys() if not k.startswith("_"))
        if unknown:
            logger.warning(f"CSPConfig: ignoring unknown key(s) {unknown}; they do not change the model.")

    def _validate(self):
        def bad(msg):
            raise ValueError(f"Invalid CSPConfig: {msg}")

        for name in ("block_size", "vocab_size", "n_layer", "n_head", "d_head", "d_model", "d_mlp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(f"{name}={value!r} must be a positive integer")
        if self.d_pos_emb is not None and (not isinstance(self.d_pos_emb, int) or isinstance(self.d_pos_emb, bool) or self.d_pos_emb <= 0):
            bad(f"d_pos_emb={self.d_pos_emb!r} must be null or a positive integer")
        if self.residual_activation_type not in ("identity", "relu"):
            bad(f"residual_activation_type={self.residual_activation_type!r}, expected 'identity' or 'relu'")
        if self.activation_type not in ("gelu", "relu"):
            bad(f"activation_type={self.activation_type!r}, expected 'gelu' or 'relu'")
        if self.d_model % self.n_head != 0:
            bad(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.afrac is not None and (isinstance(self.afrac, bool) or not isinstance(self.afrac, (int, float)) or not 0 < self.afrac <= 1):
            bad(f"afrac={self.afrac!r} must be null or a number in (0, 1]")
        if not isinstance(self.afrac_loctypes, str):
            bad(f"afrac_loctypes={self.afrac_loctypes!r} must be a comma-separated string")
        unknown = set(self.afrac_locations) - set(AFRAC_LOCTYPES)
        if unknown:
            bad(f"afrac_loctypes has unknown locations {sorted(unknown)}; known: {', '.join(AFRAC_LOCTYPES)}")
        self._check_size_limits()

    def _check_size_limits(self):
        for name, limit in MAX_SIZES.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ValueError(f"Invalid CSPConfig: {name}={value:,} is more than the limit of {limit:,}")
        if self.enable_bigram_table and self.vocab_size ** 2 > MAX_BIGRAM_ENTRIES:
            raise ValueError(f"Invalid CSPConfig: the bigram table of vocab_size={self.vocab_size:,} has "
                             f"{self.vocab_size ** 2:,} entries, more than the limit of {MAX_BIGRAM_ENTRIES:,} "
                             f"(vocab_size up to {int(MAX_BIGRAM_ENTRIES ** 0.5):,} with enable_bigram_table)")

    def n_values(self) -> int:
        """How many numbers the model holds (parameters and buffers): its size, computed from the config alone."""
        d, d_in, width, mlp, vocab = self.d_model, self.d_model_in, self.n_head * self.d_head, self.d_mlp, self.vocab_size
        bias = 1 if self.bias else 0
        norm = 2  # weight and bias, an upper bound for RMSNorm too
        layer = (d_in * 3 * width + 3 * width * bias + width * d + d * bias + d_in * mlp + mlp * bias + mlp * d
                 + d * bias + 2 * norm * d + 2 * norm * (self.d_pos_emb or 0) + self.n_head)
        return (vocab * d + self.block_size * (self.d_pos_emb or d) + self.n_layer * layer + norm * d + d * vocab
                + vocab + (vocab * vocab if self.enable_bigram_table else 0))

    def check_fits_in_memory(self, bytes_per_value: int = 4, what: str = "the model") -> None:
        """Refuses, before anything is allocated, a model whose values (float32 by default; training passes more
        bytes per value for gradients and optimizer state) need more memory than is available."""
        need = self.n_values() * bytes_per_value
        free, source = available_memory()
        if need > free:
            raise ValueError(f"{what} needs about {_gib(need)} ({self.n_layer} layers, d_model {self.d_model:,}, "
                             f"vocab_size {self.vocab_size:,}) but only {_gib(max(free, 0))} is available ({source})")

    @property
    def afrac_locations(self) -> tuple[str, ...]:
        return tuple(loc for loc in self.afrac_loctypes.split(",") if loc)

    @property
    def d_model_in(self) -> int:
        """Width of what attention and MLP read: the residual, plus the position embedding if concatenated."""
        return self.d_model + (self.d_pos_emb or 0)

    @classmethod
    def from_original_config(cls, original: dict, **kwargs) -> "CSPConfig":
        """Builds a config from a released `beeg_config.json` dict, refusing keys it does not know.

        Unknown keys would otherwise be silently ignored and could hide a field that changes
        the math, so they are an error naming the key.
        """
        known = set(ORIGINAL_DEFAULTS) | TRAINING_ONLY_KEYS | set(LEGACY_KEYS)
        unknown = sorted(set(original) - known)
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in the original config: neither a GPTConfig field nor a known "
                "training-only key; add them to TRAINING_ONLY_KEYS in configuration_csp.py if they do not "
                "change the forward pass"
            )
        return cls(**original, **kwargs)


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB" if n_bytes >= 2**28 else f"{n_bytes / 2**20:,.1f} MiB"


def available_memory() -> tuple[int, str]:
    """(bytes a new allocation may take, what limits it): the kernel's MemAvailable, the cgroup's (a container's)
    limit less its usage, and CSP_MAX_MODEL_BYTES, whichever is smallest."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        try:
            found.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f_max, open("/sys/fs/cgroup/memory.current") as f_cur:
            limit = f_max.read().strip()
            if limit != "max":
                found.append((int(limit) - int(f_cur.read()), "the cgroup's memory.max less its usage"))
    except (OSError, ValueError):
        pass
    if os.environ.get(MAX_MODEL_BYTES_ENV):
        try:
            found.append((int(float(os.environ[MAX_MODEL_BYTES_ENV])), MAX_MODEL_BYTES_ENV))
        except ValueError:
            raise ValueError(f"{MAX_MODEL_BYTES_ENV}={os.environ[MAX_MODEL_BYTES_ENV]!r} is not a number of bytes") from None
    return min(found) if found else (1 << 62, "unknown")


__all__ = ["CSPConfig", "available_memory", "MAX_SIZES", "MAX_BIGRAM_ENTRIES"]
