"""OpenAI's weight-sparse GPT (Gao et al. 2025, `circuit_sparsity`) as a transformers model.

A port of `circuit_sparsity.inference.gpt.GPT` that gives the same numbers (float32, 1e-5),
with the reference's hook names for recording and intervening on activations, a KV cache
for `generate()`, and weights that are stored sparse on disk.

This file is shipped next to converted checkpoints as remote code: it imports only torch,
transformers, safetensors and `configuration_csp`.
"""

import contextlib
import math
import re
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_csp import CSPConfig


# --------------------------------------------------------------------------------------
# Sparse storage
#
# On disk every tensor named `*.weight` (and `bigram_table`) is stored as two tensors:
#   `<name>.sparse_values`  (nnz,)  the nonzero values in row-major order, original dtype
#   `<name>.sparse_indices` (nnz,)  int32 (int64 past 2**31 elements) flat row-major indices
# A tensor that is more than half nonzero is stored with all its values and empty indices.
# Loading goes through transformers' own weight-conversion machinery, so `device_map`,
# disk offload and `dtype` work unchanged; in memory the weights are ordinary dense tensors.
# --------------------------------------------------------------------------------------

SPARSE_VALUES, SPARSE_INDICES = "sparse_values", "sparse_indices"
SPARSE_STORED = ("weight", "bigram_table")


def sparsify(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense tensor -> (values, flat indices) in the layout above."""
    flat = tensor.detach().reshape(-1)
    index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    nonzero = flat.nonzero().flatten()
    if 2 * nonzero.numel() > flat.numel():
        return flat.contiguous(), torch.empty(0, dtype=index_dtype)
    return flat[nonzero].contiguous(), nonzero.to(index_dtype)


def densify(values: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(values, flat indices) -> dense tensor of `shape`; the inverse of `sparsify`."""
    numel = math.prod(shape)
    if indices.numel() == 0 and values.numel() == numel:
        return values.reshape(shape).clone()
    if values.shape != indices.shape:
        raise ValueError(f"sparse tensor has {values.numel()} values but {indices.numel()} indices")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise ValueError(f"sparse indices out of range for a tensor of shape {tuple(shape)}")
    dense = torch.zeros(numel, dtype=values.dtype, device=values.device)
    dense[indices.long()] = values
    return dense.reshape(shape)


def _first(tensors):
    return tensors[0] if isinstance(tensors, list) else tensors


class _Densify(ConversionOps):
    """Checkpoint (`.sparse_values`, `.sparse_indices`) -> the model's dense tensor."""

    @torch.no_grad
    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name, model, **kwargs):
        values, indices = _first(input_dict[source_patterns[0]]), _first(input_dict[source_patterns[1]])
        shape = model.get_parameter_or_buffer(full_layer_name).shape
        return {target_patterns[0]: densify(values, indices, shape)}

    @property
    def reverse_op(self) -> ConversionOps:
        return _Sparsify()


class _Sparsify(ConversionOps):
    """The model's dense tensor -> (`.sparse_values`, `.sparse_indices`), used by `save_pretrained`."""

    @torch.no_grad
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        values, indices = sparsify(_first(input_dict[source_patterns[0]]))
        return {target_patterns[0]: values, target_patterns[1]: indices}

    @property
    def reverse_op(self) -> ConversionOps:
        return _Densify()


register_checkpoint_conversion_mapping(
    "CSPForCausalLM",
    [
        WeightConverter([f"{name}.{SPARSE_VALUES}", f"{name}.{SPARSE_INDICES}"], name, operations=[_Densify()])
        for name in SPARSE_STORED
    ],
    overwrite=True,
)


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def abs_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps the `k` entries of largest magnitude along the last dimension, zeroes the rest.

    The reference scatters the top-k into zeros; masking at the k-th largest magnitude gives
    the same tensor (entries tied with the k-th magnitude are all kept, where the reference
    keeps an arbitrary subset of them). The magnitudes are ranked as integers: the bits of a
    non-negative float order like the float, and integer top-k is about 1.4x faster on CPU.
    """
    if k >= x.shape[-1]:
        return x
    magnitude = x.detach().abs()
    key = magnitude.view(_SAME_SIZE_INT[x.dtype]) if x.dtype in _SAME_SIZE_INT else magnitude
    threshold = key.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    return x * (key >= threshold)


_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias and eps 1e-5, as in the reference."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def make_norm(config: CSPConfig, ndim: int) -> nn.Module:
    return nn.RMSNorm(ndim) if config.rms_norm else LayerNorm(ndim, bias=config.ln_bias)


class SparseKernelLinear(nn.Linear):
    """nn.Linear that, on CPU without autograd, multiplies with only the nonzero weights.

    The product is a CSR SpMM written as one `embedding_bag` over the transposed input: output
    feature r is the sum, over the nonzeros (r, c) of the weight, of value * input feature c for
    all tokens at once. At the released models' densities (0.1-5%) this is several times faster
    than the dense matmul (BENCHMARKS.md); weights denser than `max_density` stay dense.

    The input may be token-major or feature-major (a transposed view, as the output is with
    `contiguous_output=False`); a feature-major input needs no copy. `activation` is applied to
    the output in memory order, which keeps it bit-identical to the dense path.
    """

    use_sparse_kernel = False
    max_density = 0.1
    _csr_cache: tuple | None = None

    def forward(self, x: torch.Tensor, activation: Callable | None = None, contiguous_output: bool = True) -> torch.Tensor:
        csr = self._csr_weight(x)
        if csr is None:
            out = super().forward(x)
            return activation(out) if activation is not None else out
        cols, offsets, values = csr
        x_t = x.reshape(-1, self.in_features).T  # (in, N): no copy when x is feature-major
        out_t = F.embedding_bag(cols, x_t if x_t.is_contiguous() else x_t.contiguous(), offsets, mode="sum",
                                per_sample_weights=values, include_last_offset=True)  # (out, N)
        if self.bias is not None:
            out_t = out_t + self.bias[:, None]
        if activation is not None:
            out_t = activation(out_t)
        out = out_t.T.contiguous() if contiguous_output else out_t.T  # a 2-D transpose copies in cache blocks
        return out.reshape(*x.shape[:-1], self.out_features)

    def _csr_weight(self, x: torch.Tensor) -> tuple | None:
        """(column indices, row offsets, values) of the weight, or None where the dense kernel is used."""
        if not self.use_sparse_kernel or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != self.weight.dtype:
            return None
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype)
        if self._csr_cache is None or self._csr_cache[0] != key:
            weight, csr = self.weight.detach(), None
            if weight.dtype in (torch.float32, torch.float64) and weight.count_nonzero() <= self.max_density * weight.numel():
                rows, cols = weight.nonzero(as_tuple=True)  # row-major order
                offsets = F.pad(torch.bincount(rows, minlength=self.out_features).cumsum(0), (1, 0))
                csr = (cols, offsets, weight[rows, cols])
            self._csr_cache = (key, csr)
        return self._csr_cache[1]


HookFn = Callable[[str, torch.Tensor], torch.Tensor]


class CSPAttention(nn.Module):
    """Causal self-attention with the reference's optional sink logit and AbsTopK on q, k, v."""

    def __init__(self, config: CSPConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head, self.d_head = config.n_head, config.d_head
        width = config.n_head * config.d_head
        self.c_attn = SparseKernelLinear(config.d_model_in, 3 * width, bias=config.bias)
        self.c_proj = SparseKernelLinear(width, config.d_model, bias=config.bias)
        if config.sink:
            self.attn_imp = SinkLogits(config.n_head)

    def forward(self, x, hook: HookFn, attn_mask: torch.Tensor, past_key_values: Cache | None):
        B, T, _ = x.shape
        x = hook("act_in", sparsify_at(self.config, x, "attn_in"))  # (B, T, d_model_in)
        width = self.n_head * self.d_head
        q, k, v = self.c_attn(x).split(width, dim=2)
        k = hook("k", sparsify_at(self.config, k, "attn_k"))  # (B, T, n_head * d_head)
        q = hook("q", sparsify_at(self.config, q, "attn_q"))
        v = hook("v", sparsify_at(self.config, v, "attn_v"))
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        scale = 1.0 / math.sqrt(self.d_head)
        if self.config.sink:
            y = self.attn_imp(q, k, v, scale, attn_mask)
        elif attn_mask is None:  # square and purely causal: SDPA's causal fast path, no mask tensor
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        y = y.transpose(1, 2).reshape(B, T, width)
        y = hook("y", y)  # (B, T, n_head * d_head)
        return sparsify_at(self.config, self.c_proj(y), "attn_out")


class SinkLogits(nn.Module):
    """Per-head learnable logit of the attention sink (the reference's `attn.attn_imp.sink_logit`).

    The sink is an extra, always visible key with logit `sink_logit` and value zero, so it only
    adds exp(sink_logit) to each softmax denominator.
    """

    def __init__(self, n_head: int):
        super().__init__()
        self.sink_logit = nn.Parameter(torch.zeros(n_head))

    def forward(self, q, k, v, scale: float, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over (B, H, T, D) q, k, v plus the sink; `attn_mask` None means square and causal."""
        B, H, Tq, D = q.shape
        if attn_mask is None and q.device.type == "cpu" and not torch.is_grad_enabled():
            return self.causal_attention_with_sink(q, k, v, scale)
        if attn_mask is None:
            attn_mask = torch.full((Tq, Tq), float("-inf"), dtype=q.dtype, device=q.device).triu(1).view(1, 1, Tq, Tq)
        k = torch.cat([k.new_zeros(B, H, 1, D), k], dim=2)
        v = torch.cat([v.new_zeros(B, H, 1, v.shape[-1]), v], dim=2)
        sink = self.sink_logit.to(attn_mask.dtype).view(1, H, 1, 1).expand(attn_mask.shape[0], H, Tq, 1)
        attn_mask = torch.cat([sink, attn_mask.expand(-1, H, -1, -1)], dim=-1)  # (B|1, H, Tq, 1 + Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)

    def causal_attention_with_sink(self, q, k, v, scale: float) -> torch.Tensor:
        """Square causal attention with the sink, without a mask tensor (CPU, no autograd).

        Flash attention without the sink returns its output and the log of each softmax
        denominator, lse; adding the sink's exp(b) to the denominator scales the output by
        exp(lse) / (exp(lse) + exp(b)) = sigmoid(lse - b).
        """
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the CPU kernel needs unit stride
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)[:2]
        return out * torch.sigmoid(lse - self.sink_logit.to(lse.dtype).view(1, -1, 1)).unsqueeze(-1).to(out.dtype)


class CSPMLP(nn.Module):
    def __init__(self, config: CSPConfig):
        super().__init__()
        self.config = config
        self.c_fc = SparseKernelLinear(config.d_model_in, config.d_mlp, bias=config.bias)
        self.act_fn = nn.GELU() if config.activation_type == "gelu" else nn.ReLU()
        self.c_proj = SparseKernelLinear(config.d_mlp, config.d_model, bias=config.bias)

    def forward(self, x, hook: HookFn):
        x = hook("act_in", sparsify_at(self.config, x, "mlp_in"))  # (B, T, d_model_in)
        # The hidden layer stays feature-major between the two sparse kernels (no transposes).
        x = hook("post_act", sparsify_at(self.config, self.c_fc(x, self.act_fn, contiguous_output=False), "mlp_neuron"))  # (B, T, d_mlp)
        return sparsify_at(self.config, self.c_proj(x), "mlp_out")


def sparsify_at(config: CSPConfig, x: torch.Tensor, location: str) -> torch.Tensor:
    """The reference's `maybe_activation_sparsity`: AbsTopK with k = int(afrac * width) where configured."""
    if config.afrac is None or location not in config.afrac_locations:
        return x
    return abs_topk(x, int(config.afrac * x.shape[-1]))


class CSPBlock(nn.Module):
    def __init__(self, config: CSPConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.ln_1 = make_norm(config, config.d_model)
        self.attn = CSPAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.d_model)
        self.mlp = CSPMLP(config)
        if config.d_pos_emb is not None:  # concatenated position embedding, normed per sublayer
            self.ln_p1 = make_norm(config, config.d_pos_emb)
            self.ln_p2 = make_norm(config, config.d_pos_emb)

    def _read(self, x: torch.Tensor, norm: nn.Module, pos_norm: str, pos_emb: torch.Tensor | None):
        x = norm(x)
        if pos_emb is None:
            return x
        p = getattr(self, pos_norm)(pos_emb).expand(x.shape[0], -1, -1)
        return torch.cat([x, p], dim=-1)

    def _write(self, x: torch.Tensor, location: str) -> torch.Tensor:
        if self.config.residual_activation_type == "relu":
            x = torch.relu(x)
        return sparsify_at(self.config, x, location)

    def forward(self, x, hook: HookFn, pos_emb, attn_mask, past_key_values):
        x = hook("resid_in", x)
        delta = self.attn(self._read(x, self.ln_1, "ln_p1", pos_emb), _prefixed(hook, "attn."), attn_mask, past_key_values)
        x = self._write(x + hook("attn.resid_delta", delta), "resid_post_attn")
        x = hook("resid_mid", x)
        delta = self.mlp(self._read(x, self.ln_2, "ln_p2", pos_emb), _prefixed(hook, "mlp."))
        return self._write(x + hook("mlp.resid_delta", delta), "resid_post_mlp")


def _prefixed(hook: HookFn, prefix: str) -> HookFn:
    return lambda name, x: hook(prefix + name, x)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class CSPPreTrainedModel(PreTrainedModel):
    config_class = CSPConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CSPBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, (LayerNorm, nn.RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, SinkLogits):
            module.sink_logit.zero_()
        elif isinstance(module, CSPForCausalLM):
            module.final_logits_bias.zero_()
            if module.bigram_table is not None:
                module.bigram_table.zero_()


class CSPForCausalLM(CSPPreTrainedModel, GenerationMixin):
    """The weight-sparse GPT with its LM head, hook points and sparse on-disk storage.

    Hook names are the reference's: `{l}.resid_in`, `{l}.attn.act_in|q|k|v|y|resid_delta`,
    `{l}.resid_mid`, `{l}.mlp.act_in|post_act|resid_delta` and `final_resid`.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: CSPConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.block_size, config.d_pos_emb or config.d_model),
                h=nn.ModuleList([CSPBlock(config, i) for i in range(config.n_layer)]),
                ln_f=make_norm(config, config.d_model),
            )
        )
        self.lm_head = SparseKernelLinear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(config.vocab_size))
        if config.enable_bigram_table:
            table = torch.zeros(config.vocab_size, config.vocab_size)
            if config.learnable_bigram_table:
                self.bigram_table = nn.Parameter(table)
            else:
                self.register_buffer("bigram_table", table)
        else:
            self.bigram_table = None
        self._hooks: list[HookFn] = []
        self.post_init()
        self.set_sparse_kernels(config.use_sparse_kernels)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_sparse_kernels(self, enabled: bool = True):
        """Multiply with only the nonzero weights in CPU forward passes without autograd (on by default)."""
        self.config.use_sparse_kernels = enabled
        for module in self.modules():
            if isinstance(module, SparseKernelLinear):
                module.use_sparse_kernel = enabled

    # ---- hooks ---------------------------------------------------------------------

    def hook_names(self) -> list[str]:
        """Every hook point, in forward order."""
        per_layer = ["resid_in", "attn.act_in", "attn.k", "attn.q", "attn.v", "attn.y", "attn.resid_delta",
                     "resid_mid", "mlp.act_in", "mlp.post_act", "mlp.resid_delta"]
        return [f"{l}.{n}" for l in range(self.config.n_layer) for n in per_layer] + ["final_resid"]

    def _run_hooks(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for fn in self._hooks:
            x = fn(name, x)
        return x

    @contextlib.contextmanager
    def _hooked(self, fn: HookFn) -> Iterator[None]:
        self._hooks.append(fn)
        try:
            yield
        finally:
            self._hooks.remove(fn)

    @contextlib.contextmanager
    def record_activations(self, pattern: str = ".*", detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Records the tensor at every hook whose name fully matches `pattern`.

            with model.record_activations(r"0\\.attn\\..*") as acts:
                model(input_ids)
            acts["0.attn.q"]  # (B, T, n_head * d_head)

        Interventions entered before this context are visible in what it records.
        """
        regex = re.compile(pattern)
        acts: dict[str, torch.Tensor] = {}

        def record(name, x):
            if regex.fullmatch(name):
                acts[name] = x.detach() if detach else x
            return x

        with self._hooked(record):
            yield acts

    @contextlib.contextmanager
    def intervene(self, interventions: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Replaces the tensor at each named hook with `fn(tensor)` (ablation, patching, steering).

            with model.intervene({"1.mlp.post_act": lambda x: x * mask}):
                logits = model(input_ids).logits

        Gradients flow through `fn`. Unknown hook names are an error, not a silent no-op.
        """
        unknown = sorted(set(interventions) - set(self.hook_names()))
        if unknown:
            raise KeyError(f"unknown hook name(s) {unknown}; see model.hook_names()")

        def apply(name, x):
            fn = interventions.get(name)
            if fn is None:
                return x
            out = fn(x)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                raise ValueError(f"intervention at {name!r} must return a tensor of shape {tuple(x.shape)}")
            return out

        with self._hooked(apply):
            yield

    # ---- forward -------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        targets: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels: next-token labels in the transformers convention (shifted inside, -100 ignored).
        targets: already-shifted targets in the reference's convention (`ignore_index=-1`).
        attention_mask: (B, past + T), 0 for padding keys.
        position_ids: (B, T) or (1, T); defaults to past + arange(T) like the reference.
        """
        if input_ids is None:
            raise ValueError("CSPForCausalLM needs input_ids (inputs_embeds are not supported)")
        B, T = input_ids.shape
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the model's context (block_size="
                f"{self.config.block_size}); truncate the input to at most {self.config.block_size} tokens"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
        elif int(position_ids.max()) >= self.config.block_size or int(position_ids.min()) < 0:
            raise ValueError(f"position_ids must lie in [0, {self.config.block_size})")
        pos_emb = self.transformer.wpe(position_ids)  # (B|1, T, d_pos_emb or d_model)
        x = self.transformer.wte(input_ids)  # (B, T, d_model)
        if self.config.d_pos_emb is None:
            x, pos_emb = x + pos_emb, None
        attn_mask = None
        if past > 0 or (attention_mask is not None and not bool(attention_mask.all())):
            attn_mask = self._attention_mask(T, past, attention_mask, x.dtype, x.device)

        hidden_states = []
        for i, block in enumerate(self.transformer.h):
            hidden_states.append(x)
            x = block(x, _prefixed(self._run_hooks, f"{i}."), pos_emb, attn_mask, past_key_values if use_cache else None)
        x = self._run_hooks("final_resid", x)
        hidden_states.append(x)

        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(self.transformer.ln_f(x[:, keep])) + self.final_logits_bias.to(x.dtype)
        if self.bigram_table is not None:
            logits = logits + F.embedding(input_ids[:, keep], self.bigram_table).to(x.dtype)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        elif labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )

    @staticmethod
    def _attention_mask(T: int, past: int, attention_mask, dtype, device) -> torch.Tensor:
        """Additive (B|1, 1, T, past + T) mask: causal, plus padding keys from `attention_mask`."""
        query = torch.arange(past, past + T, device=device).view(T, 1)
        key = torch.arange(past + T, device=device).view(1, past + T)
        allowed = (key <= query).view(1, 1, T, past + T)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, : past + T].bool()
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


__all__ = ["CSPForCausalLM", "CSPPreTrainedModel", "abs_topk", "sparsify", "densify"]
