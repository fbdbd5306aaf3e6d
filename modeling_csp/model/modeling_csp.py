"""OpenAI's weight-sparse GPT (Gao et al. 2025, `circuit_sparsity`) as a transformers model.

A port of `circuit_sparsity.inference.gpt.GPT` that gives the same numbers (float32, 1e-5),
with the reference's hook names for recording and intervening on activations, a KV cache
for `generate()`, and weights that are stored sparse on disk.

This file is shipped next to converted checkpoints as remote code: it imports only torch,
transformers, safetensors and `configuration_csp`.
"""

import contextlib
import contextvars
import dataclasses
import inspect
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn

# The oldest release this code is tested with (CI runs the oldest and the newest): older ones load these
# checkpoints wrong (5.0-5.8 skip or re-initialise weights) or cannot offload them, so refuse them in words.
MIN_TRANSFORMERS = (5, 13)
if tuple(int(n) for n in re.findall(r"\d+", transformers.__version__)[:2]) < MIN_TRANSFORMERS:
    raise ImportError(
        f"this model's code needs transformers>={MIN_TRANSFORMERS[0]}.{MIN_TRANSFORMERS[1]},<6 (installed: "
        f"{transformers.__version__}); run: pip install -U 'transformers>={MIN_TRANSFORMERS[0]}.{MIN_TRANSFORMERS[1]},<6'"
    )

from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel  # noqa: E402
from transformers import initialization as init  # noqa: E402
from transformers.cache_utils import Cache, DynamicCache  # noqa: E402
from transformers.conversion_mapping import register_checkpoint_conversion_mapping  # noqa: E402
from transformers.core_model_loading import ConversionOps, WeightConverter  # noqa: E402
from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402

from transformers.utils import logging  # noqa: E402
from transformers.utils.deprecation import deprecate_kwarg  # noqa: E402

from .configuration_csp import CSPConfig  # noqa: E402


logger = logging.get_logger(__name__)
# The output field of the KV cache: `cache` from transformers 5.24, `past_key_values` before.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# --------------------------------------------------------------------------------------
# Sparse storage
#
# On disk every tensor named `*.weight` (and `bigram_table`) is stored as three tensors:
#   `<name>.sparse_values`  (nnz,)      the nonzero values in row-major order, original dtype
#   `<name>.sparse_indices` (nnz, 4)    uint8: each flat row-major index as 4 little-endian base-256 digits
#   `<name>.sparse_shape`   (ndim, 4)   uint8: the dense shape, in the same digits
# A tensor more than half nonzero keeps all its values, with (0, 4) indices.
# Integers are stored as base-256 digits because transformers casts every checkpoint tensor to
# the parameter's dtype before a conversion sees it: a digit (0..255) survives bfloat16, float16
# and float32 exactly, where an int32 index above 256 (bf16) or 2**24 (float32) would not.
# Loading goes through transformers' own weight-conversion machinery, so `device_map`, disk
# offload and `dtype` work unchanged; in memory the weights are ordinary dense tensors.
# `from_pretrained` first checks the files (`check_weight_files`): a corrupted or mismatched
# checkpoint is a one-line error naming the file and the tensor, never a silently wrong model.
# --------------------------------------------------------------------------------------

SPARSE_VALUES, SPARSE_INDICES, SPARSE_SHAPE = "sparse_values", "sparse_indices", "sparse_shape"
SPARSE_PARTS = (SPARSE_VALUES, SPARSE_INDICES, SPARSE_SHAPE)
SPARSE_STORED = ("weight", "bigram_table")
_DIGITS = 4  # base-256 digits per stored integer: up to 2**32 - 1
_SHIFTS = torch.arange(0, 8 * _DIGITS, 8)


def is_sparse_stored(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in SPARSE_STORED


def encode_uint(x: torch.Tensor) -> torch.Tensor:
    """Non-negative integers (n,) -> (n, 4) uint8 little-endian base-256 digits."""
    x = x.to(torch.int64)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 256**_DIGITS):
        raise ValueError(f"cannot store integers outside [0, 2**{8 * _DIGITS})")
    return ((x[:, None] >> _SHIFTS.to(x.device)) & 255).to(torch.uint8)


def decode_uint(digits: torch.Tensor, what: str) -> torch.Tensor:
    """(n, 4) digits in any dtype (transformers may have cast them) -> (n,) int64; refuses anything else."""
    if digits.ndim != 2 or digits.shape[1] != _DIGITS:
        raise ValueError(f"{what} must have shape (n, {_DIGITS}) (base-256 digits), got {tuple(digits.shape)}")
    if digits.dtype == torch.bool or digits.is_complex():
        raise ValueError(f"{what} has dtype {digits.dtype}, expected uint8 digits")
    wide = digits.to(torch.float64)
    if digits.numel() and not bool(((wide >= 0) & (wide <= 255) & (wide == wide.round())).all()):
        raise ValueError(f"{what} holds values that are not base-256 digits (integers 0..255)")
    return (wide.to(torch.int64) << _SHIFTS.to(digits.device)).sum(dim=1)


def sparsify(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense tensor -> {part: tensor} in the layout above."""
    flat = tensor.detach().reshape(-1)
    shape = encode_uint(torch.tensor(tuple(tensor.shape), dtype=torch.int64))
    nonzero = flat.nonzero().flatten()
    if 2 * nonzero.numel() > flat.numel():
        values, indices = flat.contiguous(), torch.empty(0, _DIGITS, dtype=torch.uint8)
    else:
        values, indices = flat[nonzero].contiguous(), encode_uint(nonzero)
    return {SPARSE_VALUES: values, SPARSE_INDICES: indices.to(values.device), SPARSE_SHAPE: shape.to(values.device)}


def densify(values: torch.Tensor, indices: torch.Tensor, shape: torch.Tensor, expected: tuple[int, ...] | None = None,
            name: str = "tensor") -> torch.Tensor:
    """The inverse of `sparsify`, refusing anything that is not a valid sparse tensor of the `expected` shape."""
    if not values.is_floating_point() or values.ndim != 1:
        raise ValueError(f"{name}.{SPARSE_VALUES} must be a 1-D floating-point tensor, got {values.dtype} {tuple(values.shape)}")
    dims = tuple(decode_uint(shape, f"{name}.{SPARSE_SHAPE}").tolist())
    if expected is not None and dims != tuple(expected):
        raise ValueError(f"{name} is stored with shape {dims} but the config gives {tuple(expected)}: "
                         "config.json does not match the weights")
    numel = math.prod(dims)
    if indices.shape[0] == 0 and values.numel() == numel:
        dense = values.reshape(dims).clone()
    else:
        flat = decode_uint(indices, f"{name}.{SPARSE_INDICES}")
        if flat.numel() != values.numel():
            raise ValueError(f"{name} has {values.numel()} values but {flat.numel()} indices")
        if flat.numel() and (int(flat[0]) < 0 or int(flat[-1]) >= numel or not bool((flat[1:] > flat[:-1]).all())):
            raise ValueError(f"{name}.{SPARSE_INDICES} must be strictly increasing and within [0, {numel}) "
                             "(duplicate, unsorted or out-of-range indices)")
        dense = torch.zeros(numel, dtype=values.dtype, device=values.device)
        dense[flat.to(values.device)] = values
        dense = dense.reshape(dims)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return dense


def _first(tensors):
    return tensors[0] if isinstance(tensors, list) else tensors


class _Densify(ConversionOps):
    """Checkpoint (`.sparse_values`, `.sparse_indices`, `.sparse_shape`) -> the model's dense tensor."""

    @torch.no_grad
    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name, model, **kwargs):
        values, indices, shape = (_first(input_dict[pattern]) for pattern in source_patterns)
        expected = tuple(model.get_parameter_or_buffer(full_layer_name).shape)
        # keyed by the whole name: the target pattern is a back-reference (`\1`), not a name
        return {full_layer_name: densify(values, indices, shape, expected, full_layer_name)}

    @property
    def reverse_op(self) -> ConversionOps:
        return _Sparsify()


class _Sparsify(ConversionOps):
    """The model's dense tensor -> (`.sparse_values`, `.sparse_indices`, `.sparse_shape`), used by `save_pretrained`."""

    @torch.no_grad
    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name, **kwargs):
        parts = sparsify(_first(next(iter(input_dict.values()))))
        name = full_layer_name.rsplit(".", 1)[0] if full_layer_name.endswith(SPARSE_PARTS) else full_layer_name
        return {f"{name}.{part}": parts[part] for part in SPARSE_PARTS}

    @property
    def reverse_op(self) -> ConversionOps:
        return _Densify()


# Registered under the model type, which every transformers 5 release looks up (5.9+ also by class name).
# One converter for every sparse-stored tensor (transformers' common tests require each registered pattern to
# match a key, and a model without a bigram table has none).
_SPARSE_STORED_PATTERN = "(" + "|".join(SPARSE_STORED) + ")"
register_checkpoint_conversion_mapping(
    "csp",
    [WeightConverter([f"{_SPARSE_STORED_PATTERN}.{part}" for part in SPARSE_PARTS], r"\1", operations=[_Densify()])],
    overwrite=True,
)


def expected_shapes(config: CSPConfig, base_only: bool = False) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a checkpoint of `config` stores (the tied `lm_head.weight` is not stored);
    with `base_only`, of a `CSPModel` checkpoint (no head, no `transformer.` prefix).

    Computed from the config alone, so a config with absurd sizes is refused before anything is allocated.
    """
    d_in, width, V = config.d_model_in, config.n_head * config.d_head, config.vocab_size

    def norm(name: str, n: int) -> dict:
        has_bias = not config.rms_norm and config.ln_bias
        return {f"{name}.weight": (n,), **({f"{name}.bias": (n,)} if has_bias else {})}

    def linear(name: str, n_out: int, n_in: int) -> dict:
        return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if config.bias else {})}

    prefix = "" if base_only else "transformer."
    shapes = {f"{prefix}wte.weight": (V, config.d_model), f"{prefix}wpe.weight": (config.block_size, config.d_pos_emb or config.d_model)}
    for i in range(config.n_layer):
        p = f"{prefix}h.{i}."
        shapes |= norm(p + "ln_1", config.d_model) | linear(p + "attn.c_attn", 3 * width, d_in) | linear(p + "attn.c_proj", config.d_model, width)
        if config.sink:
            shapes[p + "attn.attn_imp.sink_logit"] = (config.n_head,)
        shapes |= norm(p + "ln_2", config.d_model) | linear(p + "mlp.c_fc", config.d_mlp, d_in) | linear(p + "mlp.c_proj", config.d_model, config.d_mlp)
        if config.d_pos_emb is not None:
            shapes |= norm(p + "ln_p1", config.d_pos_emb) | norm(p + "ln_p2", config.d_pos_emb)
    shapes |= norm(f"{prefix}ln_f", config.d_model)
    if base_only:
        return shapes
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, config.d_model)
    shapes["final_logits_bias"] = (V,)
    if config.enable_bigram_table:
        shapes["bigram_table"] = (V, V)
    return shapes


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# torch dtypes under safetensors' names, so that both formats go through the same checks
_DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
                torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def _safetensors_contents(file: str) -> dict[str, tuple[str, Callable[[], torch.Tensor]]]:
    """key -> (dtype code, reader) of a safetensors file; tensors are read only when asked for."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as f:
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    except Exception as exc:  # a truncated or non-safetensors file
        raise ValueError(f"{file}: not a readable safetensors file ({_first_line(exc)})") from None

    def reader(key):
        def read():
            with safe_open(file, "pt") as f:
                return f.get_tensor(key)
        return read

    return {key: (dtype, reader(key)) for key, dtype in dtypes.items()}


def _torch_contents(file: str) -> dict[str, tuple[str, Callable[[], torch.Tensor]]]:
    """key -> (dtype code, reader) of a PyTorch state-dict file (`pytorch_model.bin`), read with weights_only=True."""
    import pickle

    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # not a pickle of objects, just not a pickle
            raise ValueError(f"{file}: not a readable PyTorch weights file (torch.load failed: unpickling error)") from None
        raise ValueError(f"{file}: holds objects other than tensors, and weights are only read with weights_only=True; "
                         "save just the state dict (torch.save(model.state_dict(), path)) or convert the folder to "
                         "model.safetensors (model.save_pretrained(folder))") from None
    except Exception as exc:
        raise ValueError(f"{file}: not a readable PyTorch weights file ({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{file}: not a state dict of named tensors (got {type(state).__name__}); save "
                         "model.state_dict() or convert the folder to model.safetensors (model.save_pretrained(folder))")
    return {key: (_DTYPE_CODES.get(t.dtype, str(t.dtype)), lambda t=t: t) for key, t in state.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_weight_files(files: list, config: CSPConfig, base_only: bool = False) -> None:
    """Refuses a checkpoint that would load as a wrong model, with one line naming the file and the tensor.

    Checks every stored tensor against `config` before transformers reads anything: nothing missing or
    unexpected, shapes (a sparse tensor's recorded shape too) as the config says, floating-point values
    without NaN or infinities, sparse indices stored as digits, strictly increasing and in range. Files are
    safetensors (`model.safetensors` or its shards) or PyTorch state dicts (`pytorch_model.bin` or its shards,
    read with weights_only=True); either may hold weights dense instead of as sparse parts; a tied model's `lm_head.weight` may be
    stored when it equals `transformer.wte.weight`. With `base_only` (loading a `CSPModel`) the files may hold a
    `CSPModel` or a whole `CSPForCausalLM`.
    """
    parts: dict[str, dict[str, tuple]] = {}  # tensor -> {part or "": (file, key, dtype code, reader)}
    dense_allowed: set[str] = set()  # files where a sparse-stored name may hold its dense tensor (all of them:
    # `save_pretrained(..., save_original_format=False)` and `.bin` state dicts store weights dense)
    for file in map(str, files):
        contents = _safetensors_contents(file) if file.endswith(".safetensors") else _torch_contents(file)
        dense_allowed.add(file)
        for key, (dtype, read) in contents.items():
            base, _, part = key.rpartition(".")
            if part not in SPARSE_PARTS:
                base, part = key, ""
            parts.setdefault(base, {})[part] = (file, key, dtype, read)
    expected = expected_shapes(config, base_only=base_only and not any(name.startswith("transformer.") for name in parts))
    tied_copy = parts.pop("lm_head.weight", None) if "lm_head.weight" not in expected else None
    missing = sorted(set(expected) - set(parts), key=_natural)
    unexpected = sorted(set(parts) - set(expected), key=_natural)
    where = str(files[0]) if len(files) == 1 else f"{len(files)} weight files of {Path(str(files[0])).parent}"
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {few_names(missing)} that config.json (n_layer={config.n_layer}) needs")
    if unexpected:
        raise ValueError(f"{where}: unexpected tensor(s) {few_names(unexpected)} that config.json does not use")
    wte = None
    for name, stored in parts.items():
        tensor = _checked_tensor(name, stored, expected[name], dense_allowed)
        if name == "transformer.wte.weight":
            wte = tensor
    if tied_copy is not None:
        file = next(iter(tied_copy.values()))[0]
        head = _checked_tensor("lm_head.weight", tied_copy, expected["transformer.wte.weight"], dense_allowed)
        if not torch.equal(head.to(wte.dtype), wte):
            raise ValueError(f"{file}: lm_head.weight differs from transformer.wte.weight, but config.json ties "
                             "them (tie_word_embeddings=true); drop lm_head.weight or set tie_word_embeddings=false")


def _checked_tensor(name: str, stored: dict[str, tuple], shape: tuple[int, ...], dense_allowed: set[str]) -> torch.Tensor:
    """The dense tensor `name` from its stored parts, or a one-line ValueError naming the file and the tensor."""
    sparse = is_sparse_stored(name) and not (set(stored) == {""} and stored[""][0] in dense_allowed)
    if sparse and set(stored) != set(SPARSE_PARTS):
        file = next(iter(stored.values()))[0]
        if set(stored) == {""}:
            raise ValueError(f"{file}: {stored[''][1]}: {name} is stored dense, not as sparse parts")
        absent = [f"{name}.{p}" for p in SPARSE_PARTS if p not in stored]
        raise ValueError(f"{file}: {name} must be stored as .sparse_values, .sparse_indices and .sparse_shape; "
                         f"missing {', '.join(absent)}")
    if not sparse and set(stored) != {""}:
        file, key = next(iter(stored.values()))[:2]
        raise ValueError(f"{file}: {key}: {name} is stored dense, not as sparse parts")
    tensors = {}
    for part, (file, key, dtype, read) in stored.items():
        want_float = part in ("", SPARSE_VALUES)
        if want_float and dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{file}: {key} has dtype {dtype}, expected floating-point values")
        if not want_float and dtype != "U8":
            raise ValueError(f"{file}: {key} has dtype {dtype}, expected uint8 base-256 digits")
        tensors[part] = read()
    file = stored[SPARSE_VALUES if sparse else ""][0]
    try:
        if sparse:
            return densify(tensors[SPARSE_VALUES], tensors[SPARSE_INDICES], tensors[SPARSE_SHAPE], shape, name)
        if tuple(tensors[""].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[''].shape)} but the config gives {shape}: "
                             "config.json does not match the weights")
        if not bool(torch.isfinite(tensors[""]).all()):
            raise ValueError(f"{name} holds NaN or infinite values")
        return tensors[""]
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from None


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def few_names(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def tracing() -> bool:
    """True inside torch.compile, torch.export or torch.jit.trace: checks that read tensor values (data-dependent
    Python branches) and the sparse kernels' weight checks run only outside, in eager forward passes."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


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
    # torch.jit.trace cannot record a view as another dtype; the float magnitudes rank the same.
    key = magnitude.view(_SAME_SIZE_INT[x.dtype]) if x.dtype in _SAME_SIZE_INT and not torch.jit.is_tracing() else magnitude
    threshold = key.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    return x * (key >= threshold)


_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias and eps 1e-5, as in the reference.

    With `scale_hook`, while a hook wants that name, the per-position scale 1/std (B, T, 1) goes through it
    (record it, or replace it: `ablation.frozen_norm_scales` freezes it at a clean run's value).
    """

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor, scale_hook: str | None = None) -> torch.Tensor:
        if scale_hook is None or not hook_wanted(scale_hook):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)
        scale = hook_point(scale_hook, torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5))
        y = (x - x.mean(-1, keepdim=True)) * scale * self.weight
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm (default eps, as the reference); `scale_hook` as for `LayerNorm`, with scale 1/rms."""

    def forward(self, x: torch.Tensor, scale_hook: str | None = None) -> torch.Tensor:
        if scale_hook is None or not hook_wanted(scale_hook):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        scale = hook_point(scale_hook, torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        return x * scale * self.weight


def make_norm(config: CSPConfig, ndim: int) -> nn.Module:
    return RMSNorm(ndim) if config.rms_norm else LayerNorm(ndim, bias=config.ln_bias)


class _CSR(NamedTuple):
    """A weight's nonzeros in row-major order: `rows`/`cols` index the weight, `offsets` start each row's run."""

    shape: torch.Size
    rows: torch.Tensor
    cols: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor


# The sparse kernels' promise that weights do not change (a context variable, like the hooks below): inside,
# each module checks its weight once and then reuses that CSR. Outside, every forward pass reads the weights.
_FROZEN_WEIGHTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("csp_frozen_weights", default=None)


@contextlib.contextmanager
def frozen_weights() -> Iterator[None]:
    """Lets the sparse kernels check each weight once for the whole block instead of at every forward pass.

    For loops of forward passes on weights that stay as they are (`generate()` opens one itself); a weight
    changed inside the block may be served stale until the block ends. Nested blocks share the outer one.
    Inside, autograd passes run on the sparse kernels too, and the weights they multiply with get no gradient
    (gradients reach activations and interventions, as pruning's masks need): train weights outside a block.
    """
    if _FROZEN_WEIGHTS.get() is not None:
        yield
        return
    token = _FROZEN_WEIGHTS.set({})
    try:
        yield
    finally:
        _FROZEN_WEIGHTS.reset(token)


def _csr_product(csr: _CSR, x_t: torch.Tensor) -> torch.Tensor:
    """W @ x_t for a CSR weight W (out, in) and a contiguous (in, N) input: (out, N)."""
    return F.embedding_bag(csr.cols, x_t, csr.offsets, mode="sum", per_sample_weights=csr.values, include_last_offset=True)


class _SparseProduct(torch.autograd.Function):
    """W @ x_t with the gradient of x_t as another CSR product, W.T @ grad (embedding_bag's own backward into its
    table is several times slower); the weight gets no gradient."""

    @staticmethod
    def forward(ctx, x_t, csr, transposed):
        ctx.transposed = transposed
        return _csr_product(csr, x_t)

    @staticmethod
    def backward(ctx, grad):
        return _csr_product(ctx.transposed, grad.contiguous()), None, None


class SparseKernelLinear(nn.Linear):
    """nn.Linear that, on CPU without autograd (or inside `frozen_weights()`), multiplies with only the nonzero weights.

    The product is a CSR SpMM written as one `embedding_bag` over the transposed input: output
    feature r is the sum, over the nonzeros (r, c) of the weight, of value * input feature c for
    all tokens at once. At the released models' densities (0.1-5%) this is several times faster
    than the dense matmul (BENCHMARKS.md); weights denser than `max_density` stay dense.

    The input may be token-major or feature-major (a transposed view, as the output is with
    `contiguous_output=False`); a feature-major input needs no copy. Either way the result has the
    layout its shape promises, (..., out_features), for module hooks and elementwise functions alike.

    The CSR is checked against the weight at every forward pass (one read of the weight: its nonzero count
    and the values at the kept positions), because no cheap key sees every write: `w.data` has a version
    counter of its own and a new tensor may reuse a freed address. Inside `frozen_weights()` (and
    `generate()`) the check runs once per module.
    """

    use_sparse_kernel = False
    max_density = 0.1
    configured_nonzeros: int | None = None  # the nonzero count `resparsify_` restores (set when built or loaded)
    _csr_cache: _CSR | None = None

    def forward(self, x: torch.Tensor, contiguous_output: bool = True) -> torch.Tensor:
        csr = self._csr_weight(x)
        if csr is None:
            return super().forward(x)
        x_t = x.reshape(-1, self.in_features).T  # (in, N): no copy when x is feature-major
        x_t = x_t if x_t.is_contiguous() else x_t.contiguous()
        if torch.is_grad_enabled() and x.requires_grad:  # inside frozen_weights(): the gradient of x, sparse too
            out_t = _SparseProduct.apply(x_t, csr, self._transposed(csr))
        else:
            out_t = _csr_product(csr, x_t)  # (out, N)
        if self.bias is not None:
            out_t = out_t + self.bias[:, None]
        out = out_t.T.contiguous() if contiguous_output else out_t.T  # a 2-D transpose copies in cache blocks
        return out.reshape(*x.shape[:-1], self.out_features)

    def _transposed(self, csr: _CSR) -> _CSR:
        """The CSR of the weight's transpose (for gradients: grad x = grad out @ W), cached with its CSR."""
        cached = getattr(self, "_transposed_cache", None)
        if cached is not None and cached[0] is csr:
            return cached[1]
        order = torch.sort(csr.cols, stable=True).indices  # column-major order of the nonzeros
        offsets = F.pad(torch.bincount(csr.cols, minlength=csr.shape[1]).cumsum(0), (1, 0))
        transposed = _CSR(torch.Size((csr.shape[1], csr.shape[0])), csr.cols[order], csr.rows[order], offsets,
                          csr.values[order])
        self._transposed_cache = (csr, transposed)
        return transposed

    def _csr_weight(self, x: torch.Tensor) -> _CSR | None:
        """The weight's nonzeros as they are now, or None where the dense kernel is used."""
        if (tracing() or not self.use_sparse_kernel or x.device.type != "cpu" or x.dtype != self.weight.dtype):
            return None  # a compiled graph multiplies densely: the CSR's shape depends on the weights' values
        frozen = _FROZEN_WEIGHTS.get()
        if torch.is_grad_enabled() and frozen is None:  # weights may need their gradient: the dense product
            return None  # (inside `frozen_weights()` autograd passes use the kernel; gradients reach the input only)
        weight = self.weight.detach()
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.shape)
        if frozen is not None and self in frozen and frozen[self][0] == key:
            return frozen[self][1]
        csr = self._current_csr(weight)
        if frozen is not None:
            frozen[self] = (key, csr)
        return csr

    def _current_csr(self, weight: torch.Tensor) -> _CSR | None:
        """The cached CSR if the weight still holds exactly its nonzeros, else a new one (None: too dense)."""
        if weight.dtype not in (torch.float32, torch.float64):
            return None
        nnz = int(weight.count_nonzero())
        if nnz > self.max_density * weight.numel():
            self._csr_cache = None
            return None
        cached = self._csr_cache
        # Same count, and every kept position holds its (nonzero) value: then nothing else is nonzero.
        if (cached is not None and cached.shape == weight.shape and cached.values.dtype == weight.dtype
                and cached.values.numel() == nnz and bool((weight[cached.rows, cached.cols] == cached.values).all())):
            return cached
        rows, cols = weight.nonzero(as_tuple=True)  # row-major order
        offsets = F.pad(torch.bincount(rows, minlength=weight.shape[0]).cumsum(0), (1, 0))
        self._csr_cache = _CSR(weight.shape, rows, cols, offsets, weight[rows, cols])
        return self._csr_cache


# --------------------------------------------------------------------------------------
# Hooks
#
# A hook point is a named place in the forward pass where a tensor can be recorded or replaced.
# The active recordings and interventions live in a context variable, not on the model: each
# thread (and asyncio task) sees only the ones it entered itself, so concurrent forward passes on
# one model never see each other's hooks and need no lock; with none active a hook point costs one
# context-variable read. Some hook points need extra work (the attention pattern is computed
# explicitly, a norm's scale separately): the model does it only while a hook wants that name.
# --------------------------------------------------------------------------------------

# The reference's hook points, per layer, in forward order.
REFERENCE_LAYER_HOOKS = ("resid_in", "attn.act_in", "attn.k", "attn.q", "attn.v", "attn.y", "attn.resid_delta",
                         "resid_mid", "mlp.act_in", "mlp.post_act", "mlp.resid_delta")


class HookName(str):
    """A hook point's name, passed to two-argument hook functions; `.name` too, as TransformerLens's hook object."""

    @property
    def name(self) -> str:
        return str(self)


class Hook:
    """One active recording or intervention: the hook names it touches and `fn(name, tensor) -> tensor`."""

    __slots__ = ("names", "fn")

    def __init__(self, names: frozenset[str], fn: Callable[[str, torch.Tensor], torch.Tensor]):
        self.names, self.fn = names, fn


_ACTIVE_HOOKS: contextvars.ContextVar[tuple[Hook, ...]] = contextvars.ContextVar("csp_active_hooks", default=())


def hook_point(name: str, x: torch.Tensor) -> torch.Tensor:
    """`x` after every active hook that touches `name`, in the order they were entered.

    Hooks are for eager forward passes: a compiled, exported or traced graph has no hook points (dynamo cannot read a
    context variable), so recordings and interventions do not reach it.
    """
    if tracing():
        return x
    hooks = _ACTIVE_HOOKS.get()
    if hooks:
        for hook in hooks:
            if name in hook.names:
                x = hook.fn(name, x)
    return x


def hook_wanted(name: str) -> bool:
    if tracing():
        return False
    return any(name in hook.names for hook in _ACTIVE_HOOKS.get())


@contextlib.contextmanager
def active_hook(hook: Hook) -> Iterator[None]:
    token = _ACTIVE_HOOKS.set(_ACTIVE_HOOKS.get() + (hook,))
    try:
        yield
    finally:
        _ACTIVE_HOOKS.reset(token)


class ActivationCache(dict):
    """{hook name: tensor}, filled by `record_activations` / `run_with_cache`, with TransformerLens-style views.

    With `steps=True` every name holds a list: one tensor per forward pass (each step of `generate`).
    """

    def __init__(self, n_head: int, d_head: int):
        super().__init__()
        self.n_head, self.d_head = n_head, d_head

    def heads(self, name: str) -> torch.Tensor:
        """`{l}.attn.q|k|v|y` as (B, T, n_head, d_head)."""
        if not re.fullmatch(r"\d+\.attn\.(q|k|v|y)", name):
            raise KeyError(f"{name!r} has no heads: only {{layer}}.attn.q|k|v|y do")
        x = self[name]
        return x.view(*x.shape[:-1], self.n_head, self.d_head)

    def stack(self, pattern: str) -> torch.Tensor:
        """The recorded tensors whose names fully match `pattern`, stacked along a new first dim, in forward order."""
        names = [n for n in self if re.fullmatch(pattern, n)]
        if not names:
            raise KeyError(f"no recorded hook matches {pattern!r}; recorded: {few_names(list(self))}")
        return torch.stack([self[n] for n in names])

    def concat(self, name: str, dim: int = 1) -> torch.Tensor:
        """A name recorded with `steps=True`, its steps concatenated along `dim` (the sequence, for (B, T, ...))."""
        return torch.cat(self[name], dim=dim)

    def to(self, device) -> "ActivationCache":
        moved = ActivationCache(self.n_head, self.d_head)
        moved.update({k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in self.items()})
        return moved


def _call_intervention(fn: Callable) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """Accepts `fn(act)` and `fn(act, hook)` (hook: the name, with `.name` as in TransformerLens)."""
    try:
        params = inspect.signature(fn).parameters.values()
        two = any(p.kind == p.VAR_POSITIONAL for p in params) or sum(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params) >= 2
    except (TypeError, ValueError):  # builtins without a signature
        two = False
    return (lambda name, x: fn(x, HookName(name))) if two else (lambda name, x: fn(x))


# --------------------------------------------------------------------------------------
# Attention, MLP, block
# --------------------------------------------------------------------------------------


class CSPAttention(nn.Module):
    """Causal self-attention with the reference's optional sink logit and AbsTopK on q, k, v.

    The attention itself is dispatched through transformers' registry on `config._attn_implementation`: "eager"
    (probabilities written out), "sdpa" (on a sink model, the registered `SINK_ATTENTION` function) or any other
    registered function for models without a sink.
    """

    is_causal = True

    def __init__(self, config: CSPConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head, self.d_head, self.sink = config.n_head, config.d_head, config.sink
        self.scaling = 1.0 / math.sqrt(config.d_head)
        self.afrac = afrac_by_location(config)
        self.hook = {n: f"{layer_idx}.attn.{n}" for n in ("act_in", "q", "k", "v", "pattern", "sink", "y")}
        width = config.n_head * config.d_head
        self.c_attn = SparseKernelLinear(config.d_model_in, 3 * width, bias=config.bias)
        self.c_proj = SparseKernelLinear(width, config.d_model, bias=config.bias)
        if config.sink:
            self.attn_imp = SinkLogits(config.n_head)

    def forward(self, x, attn_mask: torch.Tensor | None, cache: Cache | None, output_attentions: bool = False):
        """(B, T, d_model_in) -> ((B, T, d_model) write to the residual, (B, H, T, past + T) probabilities or None)."""
        B, T, _ = x.shape
        hook = self.hook
        x = hook_point(hook["act_in"], sparsify_at(self.afrac, x, "attn_in"))  # (B, T, d_model_in)
        width = self.n_head * self.d_head
        q, k, v = self.c_attn(x).split(width, dim=2)
        k = hook_point(hook["k"], sparsify_at(self.afrac, k, "attn_k"))  # (B, T, n_head * d_head)
        q = hook_point(hook["q"], sparsify_at(self.afrac, q, "attn_q"))
        v = hook_point(hook["v"], sparsify_at(self.afrac, v, "attn_v"))
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        wants_probs = output_attentions or hook_wanted(hook["pattern"]) or hook_wanted(hook["sink"])
        attention = eager_attention_forward if wants_probs else self.attention_function()
        y, probs = attention(self, q, k, v, attn_mask, scaling=self.scaling, dropout=0.0)  # y: (B, T, nh, hs)
        y = y.reshape(B, T, width)
        y = hook_point(hook["y"], y)  # (B, T, n_head * d_head)
        return sparsify_at(self.afrac, self.c_proj(y), "attn_out"), (probs if output_attentions else None)

    def attention_function(self) -> Callable:
        """The registered attention function `config._attn_implementation` names (a sink model's "sdpa" is ours)."""
        implementation = self.config._attn_implementation or "sdpa"
        if implementation == "eager":
            return eager_attention_forward
        if self.sink and implementation == "sdpa":
            implementation = SINK_ATTENTION
        if self.sink and implementation != SINK_ATTENTION:
            raise ValueError(f"attn_implementation={implementation!r} cannot add this model's attention sink; load it "
                             f"with attn_implementation='sdpa', 'eager' or {SINK_ATTENTION!r}")
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


def _additive(attn_mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """A boolean mask (True: may attend) as the additive mask the functions here take; others as they are."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, torch.finfo(dtype).min)


def eager_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                            **kwargs):
    """transformers' attention-function interface, written out: ((B, T, H, D) output, (B, H, T, Tk) probabilities).

    With a sink (`module.attn_imp`) the probabilities over the real keys sum to 1 minus the sink's share; the
    share goes through the `{layer}.attn.sink` hook and the probabilities through `{layer}.attn.pattern`.
    """
    sink_logit = module.attn_imp.sink_logit if getattr(module, "sink", False) else None
    probs, sink_share = attention_probabilities(query, key, scaling, _additive(attention_mask, query.dtype), sink_logit)
    hook = getattr(module, "hook", None)
    if hook is not None:
        if sink_share is not None and hook_point(hook["sink"], sink_share) is not sink_share:
            raise ValueError(f"{hook['sink']} can be recorded, not replaced: intervene on {hook['pattern']} instead")
        probs = hook_point(hook["pattern"], probs)  # (B, nh, T, past + T)
    if dropout and module.training:
        probs = F.dropout(probs, p=dropout)
    return (probs @ value).transpose(1, 2), probs


def sdpa_with_sink_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling: float,
                                     dropout: float = 0.0, **kwargs):
    """transformers' attention-function interface for the sink: torch's scaled_dot_product_attention with the sink
    as one more key (`SinkLogits`); a module without a sink gets plain sdpa. Returns ((B, T, H, D), None)."""
    attention_mask = _additive(attention_mask, query.dtype)
    if getattr(module, "sink", False):
        out = module.attn_imp(query, key, value, scaling, attention_mask)
    elif attention_mask is None:
        causal = True if query.shape[2] > 1 else False  # a branch: sdpa takes no symbolic bool when dynamo traces T
        out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask[..., : key.shape[2]], scale=scaling)
    return out.transpose(1, 2), None


# Our attention function in transformers' registry: `attn_implementation=SINK_ATTENTION` names it.
SINK_ATTENTION = "csp_sdpa_sink"
AttentionInterface.register(SINK_ATTENTION, sdpa_with_sink_attention_forward)


def attention_probabilities(q, k, scale: float, attn_mask: torch.Tensor | None, sink_logit: torch.Tensor | None = None):
    """Attention written out: (probabilities (B, H, Tq, Tk), the sink's share (B, H, Tq) or None).

    With a sink the probabilities over the real keys sum to 1 minus the sink's share (the sink's value
    is zero, so the output is probabilities @ v either way). `attn_mask` None means causal without padding.
    """
    B, H, Tq, _ = q.shape
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if attn_mask is not None:
        scores = scores + attn_mask[..., : k.shape[2]]
    else:
        scores = scores + causal_mask(Tq, k.shape[2], q.dtype, q.device)
    if sink_logit is None:
        return scores.softmax(dim=-1), None
    sink = sink_logit.to(scores.dtype).view(1, H, 1, 1).expand(B, H, Tq, 1)
    probs = torch.cat([sink, scores], dim=-1).softmax(dim=-1)
    return probs[..., 1:], probs[..., 0]


class SinkLogits(nn.Module):
    """Per-head learnable logit of the attention sink (the reference's `attn.attn_imp.sink_logit`).

    The sink is an extra, always visible key with logit `sink_logit` and value zero, so it only
    adds exp(sink_logit) to each softmax denominator.
    """

    def __init__(self, n_head: int):
        super().__init__()
        self.sink_logit = nn.Parameter(torch.zeros(n_head))

    def forward(self, q, k, v, scale: float, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over (B, H, T, D) q, k, v plus the sink; `attn_mask` (additive) None means causal without padding."""
        B, H, Tq, D = q.shape
        if attn_mask is None:
            return self.causal_attention_with_sink(q, k, v, scale)
        k = torch.cat([k.new_zeros(B, H, 1, D), k], dim=2)
        v = torch.cat([v.new_zeros(B, H, 1, v.shape[-1]), v], dim=2)
        attn_mask = attn_mask[..., : k.shape[2] - 1]
        sink = self.sink_logit.to(attn_mask.dtype).view(1, H, 1, 1).expand(attn_mask.shape[0], H, Tq, 1)
        attn_mask = torch.cat([sink, attn_mask.expand(-1, H, Tq, -1)], dim=-1)  # (B|1, H, Tq, 1 + Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)

    def causal_attention_with_sink(self, q, k, v, scale: float) -> torch.Tensor:
        """Causal attention with the sink, for q of the last Tq of the Tk keys: sdpa over the keys plus the sink as one
        more key of value zero, whose logit comes in an extra mask column (public ops; as fast as plain causal
        sdpa, where an extra feature dimension for the sink's score would be 6x slower on CPU)."""
        if q.shape[2] > 1:
            return self(q, k, v, scale, causal_mask(q.shape[2], k.shape[2], q.dtype, q.device))
        B, H, _, D = q.shape  # a decoding step sees every key: the mask is the sink's column and zeros
        k = torch.cat([k.new_zeros(B, H, 1, D), k], dim=2)
        v = torch.cat([v.new_zeros(B, H, 1, v.shape[-1]), v], dim=2)
        sink = F.pad(self.sink_logit.to(q.dtype).view(1, H, 1, 1), (0, k.shape[2] - 1))  # (1, H, 1, 1 + Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sink, scale=scale)


def causal_mask(Tq: int, Tk: int, dtype, device) -> torch.Tensor:
    """Additive (1, 1, Tq, Tk) causal mask for the last Tq of Tk positions."""
    return torch.full((Tq, Tk), torch.finfo(dtype).min, dtype=dtype, device=device).triu(Tk - Tq + 1).view(1, 1, Tq, Tk)


class CSPMLP(nn.Module):
    def __init__(self, config: CSPConfig, layer_idx: int):
        super().__init__()
        self.afrac = afrac_by_location(config)
        self.hook = {n: f"{layer_idx}.mlp.{n}" for n in ("act_in", "pre_act", "post_act")}
        self.c_fc = SparseKernelLinear(config.d_model_in, config.d_mlp, bias=config.bias)
        self.act_fn = Activation(config.activation_type)
        self.c_proj = SparseKernelLinear(config.d_mlp, config.d_model, bias=config.bias)

    def forward(self, x):
        x = hook_point(self.hook["act_in"], sparsify_at(self.afrac, x, "mlp_in"))  # (B, T, d_model_in)
        # On the sparse kernels the hidden layer stays feature-major in memory between c_fc and c_proj (no
        # transposes); its tensors are (B, T, d_mlp) views, so hooks and act_fn see the usual layout.
        x = hook_point(self.hook["pre_act"], self.c_fc(x, contiguous_output=False))  # (B, T, d_mlp)
        x = hook_point(self.hook["post_act"], sparsify_at(self.afrac, self.act_fn(x), "mlp_neuron"))  # (B, T, d_mlp)
        return sparsify_at(self.afrac, self.c_proj(x), "mlp_out")


class Activation(nn.Module):
    """GELU or ReLU of a (..., features) tensor, computed in memory order.

    PyTorch's vectorised GELU and the one it uses on strided views differ in the last bit, which can flip
    AbsTopK at near-ties: a feature-major view (the sparse kernels' hidden layer) is therefore computed on
    its contiguous memory, so every kernel path gives the dense path's values.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fn = F.gelu if kind == "gelu" else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if not flat.is_contiguous() and flat.T.is_contiguous():
            return self.fn(flat.T).T.reshape(x.shape)
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.kind


def afrac_by_location(config: CSPConfig) -> dict[str, float]:
    """{location: afrac} where the config applies AbsTopK; read once, since config attributes are slow to read."""
    return {} if config.afrac is None else dict.fromkeys(config.afrac_locations, config.afrac)


def sparsify_at(afrac: dict[str, float], x: torch.Tensor, location: str) -> torch.Tensor:
    """The reference's `maybe_activation_sparsity`: AbsTopK with k = int(afrac * width) where configured."""
    frac = afrac.get(location)
    return x if frac is None else abs_topk(x, int(frac * x.shape[-1]))


class CSPBlock(GradientCheckpointingLayer):
    """One transformer block; under gradient checkpointing it is recomputed in the backward pass."""

    def __init__(self, config: CSPConfig, layer_idx: int):
        super().__init__()
        self.afrac = afrac_by_location(config)
        self.relu_residual = config.residual_activation_type == "relu"
        self.hook = {n: f"{layer_idx}.{n}" for n in ("resid_in", "ln_1.scale", "attn.resid_delta", "resid_mid",
                                                      "ln_2.scale", "mlp.resid_delta")}
        self.ln_1 = make_norm(config, config.d_model)
        self.attn = CSPAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.d_model)
        self.mlp = CSPMLP(config, layer_idx)
        if config.d_pos_emb is not None:  # concatenated position embedding, normed per sublayer
            self.ln_p1 = make_norm(config, config.d_pos_emb)
            self.ln_p2 = make_norm(config, config.d_pos_emb)

    def _read(self, x: torch.Tensor, norm: nn.Module, scale_hook: str, pos_norm: str, pos_emb: torch.Tensor | None):
        x = norm(x, scale_hook)
        if pos_emb is None:
            return x
        p = getattr(self, pos_norm)(pos_emb).expand(x.shape[0], -1, -1)
        return torch.cat([x, p], dim=-1)

    def _write(self, x: torch.Tensor, location: str) -> torch.Tensor:
        if self.relu_residual:
            x = torch.relu(x)
        return sparsify_at(self.afrac, x, location)

    def forward(self, x, pos_emb, attn_mask, cache, output_attentions: bool = False):
        hook = self.hook
        x = hook_point(hook["resid_in"], x)
        delta, probs = self.attn(self._read(x, self.ln_1, hook["ln_1.scale"], "ln_p1", pos_emb), attn_mask, cache, output_attentions)
        x = self._write(x + hook_point(hook["attn.resid_delta"], delta), "resid_post_attn")
        x = hook_point(hook["resid_mid"], x)
        delta = self.mlp(self._read(x, self.ln_2, hook["ln_2.scale"], "ln_p2", pos_emb))
        return self._write(x + hook_point(hook["mlp.resid_delta"], delta), "resid_post_mlp"), probs


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class CSPPreTrainedModel(PreTrainedModel):
    """What the base model and the LM share: weight init, the strict loader, the sparse kernels and the hooks."""

    config_class = CSPConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CSPBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    supports_gradient_checkpointing = True
    _can_compile_fullgraph = True  # forward and static-cache decoding compile without graph breaks (test_compile.py)

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers' `init` functions skip tensors already loaded from a checkpoint.
        std = 0.02
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (LayerNorm, nn.RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, SinkLogits):
            init.zeros_(module.sink_logit)
        elif isinstance(module, CSPForCausalLM):
            init.zeros_(module.final_logits_bias)
            if module.bigram_table is not None:
                init.zeros_(module.bigram_table)

    def set_sparse_kernels(self, enabled: bool = True):
        """Multiply with only the nonzero weights in CPU forward passes without autograd (on by default)."""
        self.config.use_sparse_kernels = enabled
        for module in self.modules():
            if isinstance(module, SparseKernelLinear):
                module.use_sparse_kernel = enabled
                if not enabled:
                    module._csr_cache = None

    def frozen_weights(self):
        """A block of forward passes in which the sparse kernels read each weight once, not at every pass.

        Outside one, every no-grad CPU forward pass checks the weights it multiplies with (one read of each: 14-50%
        of a 256-token forward pass, BENCHMARKS.md), so any change to them is seen. `generate()` opens one itself;
        open one around a loop of forward passes that does not change the weights. Per thread, like the hooks.
        Inside, passes with autograd run on the sparse kernels too and the weights get no gradient (pruning's masks
        and attributions need only the activations'); train weights outside.
        """
        return frozen_weights()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, with config.json's auto_map naming the base model and the LM, so that
        `AutoModel` and `AutoModelForCausalLM` both load the folder (`trust_remote_code=True`)."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def resparsify_(self) -> dict[str, float]:
        """Puts every weight matrix of a linear layer back to the density it had when the model was loaded (or
        built): its top-k entries by magnitude, the rest zero. For after a LoRA `merge_and_unload()`, which makes
        the merged matrices dense. Returns {parameter name: density now}."""
        densities = {}
        for module_name, module in self.named_modules():
            if not isinstance(module, SparseKernelLinear):
                continue
            name = f"{module_name}.weight"
            weight, k = module.weight, module.configured_nonzeros
            if k is not None and int(weight.count_nonzero()) > k:
                keep = weight.abs().flatten().topk(k, sorted=False).indices
                sparse = torch.zeros_like(weight).flatten()
                sparse[keep] = weight.flatten()[keep]
                weight.copy_(sparse.view_as(weight))
            densities[name] = int(weight.count_nonzero()) / weight.numel()
        return densities

    def _record_densities(self):
        """Remembers each sparse weight's nonzero count, the density `resparsify_` restores."""
        for module in self.modules():
            if isinstance(module, SparseKernelLinear) and module.weight.device.type != "meta":
                module.configured_nonzeros = int(module.weight.count_nonzero())

    # ---- hooks ---------------------------------------------------------------------

    def hook_names(self, extra: bool = False) -> list[str]:
        """Every hook point in forward order: the reference's, or with `extra=True` also this port's own:
        `tok_emb`, `pos_emb`, `{l}.ln_1.scale`, `{l}.attn.pattern` (B, H, T, T), `{l}.attn.sink` (B, H, T; sink
        models), `{l}.ln_2.scale`, `{l}.mlp.pre_act` and `ln_f.scale`."""
        if not extra:
            return [f"{l}.{n}" for l in range(self.config.n_layer) for n in REFERENCE_LAYER_HOOKS] + ["final_resid"]
        per_layer = ["resid_in", "ln_1.scale", "attn.act_in", "attn.k", "attn.q", "attn.v", "attn.pattern",
                     *(["attn.sink"] if self.config.sink else []), "attn.y", "attn.resid_delta", "resid_mid",
                     "ln_2.scale", "mlp.act_in", "mlp.pre_act", "mlp.post_act", "mlp.resid_delta"]
        return ["tok_emb", "pos_emb"] + [f"{l}.{n}" for l in range(self.config.n_layer) for n in per_layer] + [
            "final_resid", "ln_f.scale"]

    def resolve_hook_names(self, names=None) -> list[str]:
        """Hook names, in forward order, for a spec: None (the reference's), a regex (full match), a list of names
        or regexes, or a callable `name -> bool`. A spec that selects nothing is an error, not a silent no-op."""
        every = self.hook_names(extra=True)
        if names is None:
            return self.hook_names()
        if callable(names) and not isinstance(names, str):
            chosen = {n for n in every if names(n)}
        else:
            chosen = set()
            for spec in [names] if isinstance(names, str) else list(names):
                matched = {spec} if spec in every else {n for n in every if re.fullmatch(spec, n)}
                if not matched:
                    raise KeyError(f"unknown hook name {spec!r}: no hook point matches it; see model.hook_names(extra=True)")
                chosen |= matched
        if not chosen and (callable(names) or isinstance(names, str)):  # an empty list asks for nothing
            raise KeyError("the hook-name filter selects no hook point; see model.hook_names(extra=True)")
        return [n for n in every if n in chosen]

    def new_cache(self) -> ActivationCache:
        return ActivationCache(self.config.n_head, self.config.d_head)

    @contextlib.contextmanager
    def record_activations(self, names=None, detach: bool = True, steps: bool = False) -> Iterator[ActivationCache]:
        r"""Records the tensor at the hook points `names` selects (see `resolve_hook_names`; default: the reference's).

            with model.record_activations(r"0\.attn\..*") as acts:
                model(input_ids)
            acts["0.attn.q"]            # (B, T, n_head * d_head)
            acts.heads("0.attn.q")      # (B, T, n_head, d_head)

        Each forward pass overwrites the last one's tensors; `steps=True` keeps a list per name instead, one
        tensor per forward pass (each step of `generate`; `acts.concat(name)` joins them along the sequence).
        Interventions entered before this context are visible in what it records.
        """
        acts = self.new_cache()

        def record(name, x):
            value = x.detach() if detach else x
            if steps:
                acts.setdefault(name, []).append(value)
            else:
                acts[name] = value
            return x

        with active_hook(Hook(frozenset(self.resolve_hook_names(names)), record)):
            yield acts

    def run_with_cache(self, input_ids: torch.Tensor, names=None, detach: bool = True, **kwargs):
        """(model output, ActivationCache) for one forward pass, as TransformerLens's `run_with_cache`."""
        with self.record_activations(names, detach=detach) as cache:
            output = self(input_ids, **kwargs)
        return output, cache

    @contextlib.contextmanager
    def intervene(self, interventions: dict) -> Iterator[None]:
        r"""Replaces the tensor at each hook point with `fn(tensor)` or `fn(tensor, hook)` (ablation, patching,
        steering); keys are hook names or regexes over them (full match).

            with model.intervene({"1.mlp.post_act": lambda x: x * mask}):
                logits = model(input_ids).logits
            with model.intervene({r"\d+\.attn\.pattern": lambda p, hook: p * keep[hook.name]}):
                ...

        Gradients flow through `fn`. A key that matches no hook point is an error, not a silent no-op.
        """
        plan: dict[str, list[Callable]] = {}
        for key, fn in interventions.items():
            for name in self.resolve_hook_names([key]):
                plan.setdefault(name, []).append(_call_intervention(fn))

        def apply(name, x):
            for fn in plan[name]:
                out = fn(name, x)
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    raise ValueError(f"intervention at {name!r} must return a tensor of shape {tuple(x.shape)}")
                x = out
            return x

        with active_hook(Hook(frozenset(plan), apply)):
            yield

    @contextlib.contextmanager
    def record_gradients(self, names=None) -> Iterator[ActivationCache]:
        """Records d(whatever you backpropagate)/d(activation) at the hook points `names` selects, when
        `.backward()` (or `torch.autograd.grad`) runs inside the context. Needs a graph: autograd on, and
        parameters or an intervention that require grad (see `circuits.evaluation.node_attributions`)."""
        grads = self.new_cache()

        def record(name, x):
            if x.requires_grad:
                x.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach()))
            return x

        with active_hook(Hook(frozenset(self.resolve_hook_names(names)), record)):
            yield grads


    # ---- loading -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`, made strict: the weight files are checked against the config first
        (`check_weight_files`), and any tensor transformers reports missing, unexpected or mismatched is an error
        instead of a randomly initialised weight."""
        config = kwargs.get("config")
        if kwargs.get("state_dict") is None and kwargs.get("gguf_file") is None and (config is None or isinstance(config, PreTrainedConfig)):
            if config is None:
                try:
                    config = CSPConfig.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
                except OSError:
                    config = None  # no config.json: transformers says so in its own words
            if config is not None:
                files = _weight_files(pretrained_model_name_or_path, kwargs, getattr(config, "transformers_weights", None))
                if files:
                    check_weight_files(files, config, base_only=issubclass(cls, CSPModel))
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        info = info if isinstance(info, dict) else dataclasses.asdict(info)
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            if info.get(kind):
                names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info[kind])
                raise ValueError(f"{pretrained_model_name_or_path}: {kind.replace('_', ' ')} while loading: {few_names(names)}")
        model._record_densities()
        return (model, info) if want_info else model



def _cache_kwarg_renamed(forward):
    """`past_key_values` -> `cache` with transformers' own FutureWarning, where transformers calls it `cache` (5.24+);
    older releases still pass `past_key_values` themselves, so there it is taken silently."""
    if _OUTPUT_CACHE_FIELD != "cache":
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


def refuse_what_does_not_fit(config: CSPConfig) -> None:
    """A model too large for the memory available is refused before its tensors are allocated (on the meta device,
    as from_pretrained builds it, nothing is allocated and nothing is checked)."""
    if torch.empty(0).device.type != "meta" and hasattr(config, "check_fits_in_memory"):
        config.check_fits_in_memory()


class CSPModel(CSPPreTrainedModel):
    """The transformer without its head (AutoModel): token ids or embeddings -> hidden states.

    `last_hidden_state` is the final residual after `ln_f`; `hidden_states` (with `output_hidden_states`) are
    each block's input and the final residual before `ln_f` (the `final_resid` hook).
    """

    # A CSPForCausalLM checkpoint loads into the base model: its head tensors are not the base model's.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^final_logits_bias$", r"^bigram_table$"]

    def __init__(self, config: CSPConfig):
        refuse_what_does_not_fit(config)  # the LM builds this first, before its own tables
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_pos_emb or config.d_model)
        self.h = nn.ModuleList([CSPBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = make_norm(config, config.d_model)
        self.gradient_checkpointing = False
        self.post_init()
        self.set_sparse_kernels(config.use_sparse_kernels)
        self._record_densities()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    # Keyword arguments that transformers' generate() or Trainer pass and that change nothing here.
    _ACCEPTED_EXTRA_KWARGS = frozenset({"cache_position", "num_items_in_batch"})

    @_cache_kwarg_renamed
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids: (B, T) token ids, or instead inputs_embeds: (B, T, d_model) token embeddings.
        attention_mask: (B, past + T), 0 for padding keys; positions then count only the real tokens, so a
            left-padded row gives the same numbers as the row alone.
        position_ids: (B, T) or (1, T); default: from `attention_mask`, else past + arange(T) like the reference.
        cache: the KV cache (`past_key_values` is its name before transformers 5.24).
        output_attentions: also return each layer's attention probabilities (B, H, T, past + T); with a sink
            they sum to 1 minus the sink's share.
        """
        unknown = sorted(set(kwargs) - self._ACCEPTED_EXTRA_KWARGS)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword argument(s) {unknown}")
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise ValueError("pass the KV cache once, as `cache` (or the older name `past_key_values`), not both")
            cache = past_key_values
        if inputs_embeds is None:
            B, T = self._check_input_ids(input_ids)
        else:
            B, T = self._check_inputs_embeds(inputs_embeds)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and use_cache:
            logger.warning_once("gradient checkpointing recomputes each block: the KV cache is off (use_cache=False)")
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0  # a 0-d tensor for a static cache
        if not tracing() and past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the model's context (block_size="
                f"{self.config.block_size}); truncate the input to at most {self.config.block_size} tokens"
            )
        padded, mask_4d = False, None
        # A static cache returns all its slots, filled or not: without a mask from the caller, one masks the empty ones.
        static_keys = cache.get_mask_sizes(T, 0)[0] if cache is not None and getattr(cache, "is_compileable", False) else None
        if attention_mask is not None and attention_mask.ndim == 4:  # generate()'s mask for a static cache
            mask_4d = self._check_4d_mask(attention_mask, B, T, static_keys if static_keys is not None else past + T)
        elif attention_mask is not None:
            if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(f"attention_mask must have shape (batch, past + T) = ({B}, {past + T}) or "
                                 f"(batch, 1, T, keys), got {tuple(attention_mask.shape)}")
            padded = tracing() or not bool(attention_mask.all())  # a traced graph takes the mask as it comes
        device = inputs_embeds.device if inputs_embeds is not None else input_ids.device
        if position_ids is None:
            if mask_4d is not None:  # a query's position counts the real tokens it sees, itself included
                position_ids = (mask_4d.sum(-1)[:, 0] - 1).clamp(min=0)
            elif padded:  # count only real tokens: a left-padded row is the row alone
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = (past + torch.arange(T, device=device)).unsqueeze(0)
        elif position_ids.shape[-1] != T or (not tracing() and (
                int(position_ids.max()) >= self.config.block_size or int(position_ids.min()) < 0)):
            raise ValueError(f"position_ids must have T={T} columns with values in [0, {self.config.block_size})")
        pos_emb = hook_point("pos_emb", self.wpe(position_ids))  # (B|1, T, d_pos_emb or d_model)
        x = hook_point("tok_emb", self.wte(input_ids) if inputs_embeds is None else inputs_embeds)  # (B, T, d_model)
        if self.config.d_pos_emb is None:
            x, pos_emb = x + pos_emb, None
        attn_mask = None  # None: causal without padding, which the kernels do without a mask tensor
        if mask_4d is not None:
            attn_mask = torch.zeros(mask_4d.shape, dtype=x.dtype, device=x.device).masked_fill(~mask_4d, torch.finfo(x.dtype).min)
        elif static_keys is not None or padded or (past > 0 and T > 1):
            attn_mask = self._attention_mask(T, past, attention_mask if padded else None, x.dtype, x.device, static_keys)

        hidden_states, attentions = [], []
        for block in self.h:
            hidden_states.append(x)
            x, probs = block(x, pos_emb, attn_mask, cache if use_cache else None, output_attentions)
            attentions.append(probs)
        x = hook_point("final_resid", x)
        hidden_states.append(x)
        output = BaseModelOutputWithPast(
            last_hidden_state=self.ln_f(x, "ln_f.scale"),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            **{_OUTPUT_CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()

    def _check_input_ids(self, input_ids) -> tuple[int, int]:
        """(B, T) of valid input ids, or a ValueError that says what is wrong (never a crash in a kernel)."""
        if input_ids is None:
            raise ValueError(f"{type(self).__name__} needs input_ids or inputs_embeds")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, sequence) tensor, got {shape}; add a batch dimension "
                             "with input_ids[None] for a single sequence")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids is empty (shape {(B, T)}); give at least one token")
        if input_ids.device.type != "meta" and not tracing():  # a traced graph cannot branch on the ids' values
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (the model's vocab_size), "
                                 f"got values from {low} to {high}")
        return B, T

    def _check_inputs_embeds(self, inputs_embeds) -> tuple[int, int]:
        """(B, T) of valid token embeddings (B, T, d_model), or a ValueError that says what is wrong."""
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.d_model:
            shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
            raise ValueError(f"inputs_embeds must be a (batch, sequence, d_model={self.config.d_model}) tensor, got {shape}")
        if not inputs_embeds.is_floating_point():
            raise ValueError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}")
        B, T = inputs_embeds.shape[:2]
        if B == 0 or T == 0:
            raise ValueError(f"inputs_embeds is empty (shape {tuple(inputs_embeds.shape)}); give at least one token")
        return B, T

    @staticmethod
    def _check_4d_mask(attention_mask: torch.Tensor, B: int, T: int, keys) -> torch.Tensor:
        """A (batch, 1, T, keys) mask as booleans (True: may attend); a float mask is additive (0: may attend)."""
        if tracing():  # keys may be a tensor (a static cache's fill): the shapes are the caller's
            return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        if attention_mask.shape[0] not in (1, B) or attention_mask.shape[1] != 1 or attention_mask.shape[2] != T or (
                attention_mask.shape[3] != int(keys)):
            raise ValueError(f"a 4-D attention_mask must have shape (batch, 1, T, keys) = ({B}, 1, {T}, {int(keys)}), "
                             f"got {tuple(attention_mask.shape)}")
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0

    @staticmethod
    def _attention_mask(T: int, past, attention_mask, dtype, device, keys: int | None = None) -> torch.Tensor:
        """Additive (B|1, 1, T, keys) mask, keys = past + T unless a static cache has more slots: causal, plus
        padding keys from `attention_mask` (B, past + T)."""
        keys = past + T if keys is None else keys
        query = (past + torch.arange(T, device=device)).view(T, 1)
        key = torch.arange(keys, device=device).view(1, keys)
        allowed = (key <= query).view(1, 1, T, keys)
        if attention_mask is not None:
            padding = attention_mask[:, None, None, :].bool()
            padding = F.pad(padding, (0, keys - padding.shape[-1])) if padding.shape[-1] < keys else padding[..., :keys]
            allowed = allowed & padding
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)



class CSPForCausalLM(CSPPreTrainedModel, GenerationMixin):
    """The weight-sparse GPT with its LM head, hook points and sparse on-disk storage.

    `transformer` is the `CSPModel`; the head is `lm_head`, `final_logits_bias` and, where configured, the bigram
    table (logits from the previous token, so it needs the token ids and lives here, not in the base model).
    Hook names are the reference's: `{l}.resid_in`, `{l}.attn.act_in|q|k|v|y|resid_delta`,
    `{l}.resid_mid`, `{l}.mlp.act_in|post_act|resid_delta` and `final_resid`; `hook_names(extra=True)`
    adds the embeddings, attention patterns, MLP pre-activations and norm scales.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: CSPConfig):
        super().__init__(config)
        # The head is built before the base model initialises its weights, so that a seed gives the same random
        # weights as before the base model was split out.
        lm_head = SparseKernelLinear(config.d_model, config.vocab_size, bias=False)
        self.transformer = CSPModel(config)
        self.lm_head = lm_head
        self.register_buffer("final_logits_bias", torch.zeros(config.vocab_size))
        if config.enable_bigram_table:
            table = torch.zeros(config.vocab_size, config.vocab_size)
            if config.learnable_bigram_table:
                self.bigram_table = nn.Parameter(table)
            else:
                self.register_buffer("bigram_table", table)
        else:
            self.bigram_table = None
        self.post_init()
        self.set_sparse_kernels(config.use_sparse_kernels)
        self._record_densities()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.transformer

    @_cache_kwarg_renamed
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        targets: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.FloatTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        input_ids: (B, T) token ids.
        inputs_embeds: (B, T, d_model) token embeddings instead of `input_ids`. A bigram-table model also needs the
            ids: pass both (as generate does); without ids, each position whose embedding is a row of the
            embedding matrix reads that token's bigram row and any other (a soft prompt) none.
        attention_mask: (B, past + T), 0 for padding keys; positions then count only the real tokens, so a
            left-padded row gives the same numbers as the row alone.
        position_ids: (B, T) or (1, T); default: from `attention_mask`, else past + arange(T) like the reference.
        cache: the KV cache (`past_key_values` is its name before transformers 5.24).
        labels: next-token labels in the transformers convention (shifted inside, -100 ignored).
        targets: already-shifted targets in the reference's convention (`ignore_index=-1`).
        output_attentions: also return each layer's attention probabilities (B, H, T, past + T); with a sink
            they sum to 1 minus the sink's share.
        """
        # The loss's own arguments, as Trainer and context parallelism pass them (already-shifted `shift_labels`).
        loss_kwargs = {k: kwargs.pop(k, None) for k in ("num_items_in_batch", "shift_labels")}
        loss_kwargs = {k: v for k, v in loss_kwargs.items() if v is not None}
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise ValueError("pass the KV cache once, as `cache` (or the older name `past_key_values`), not both")
            cache = past_key_values
        bigram_ids = self._bigram_ids(input_ids, inputs_embeds) if self.bigram_table is not None else None
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        out = self.transformer(
            input_ids=input_ids if inputs_embeds is None else None, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True, **kwargs,
        )
        x = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        head = self.lm_head(x[:, keep], contiguous_output=False)  # (B, T', vocab), maybe strided
        if bigram_ids is None:
            logits = head + self.final_logits_bias.to(x.dtype)
        else:  # accumulate into the gathered bigram rows: one pass over the (B, T', vocab) logits fewer
            logits = self._bigram_logits(bigram_ids[:, keep]).to(x.dtype)
            logits = logits.add_(head).add_(self.final_logits_bias.to(x.dtype))

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        elif labels is not None or "shift_labels" in loss_kwargs:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            **{_OUTPUT_CACHE_FIELD: getattr(out, _OUTPUT_CACHE_FIELD)},
        )
        return output if return_dict else output.to_tuple()

    def _bigram_ids(self, input_ids, inputs_embeds) -> torch.Tensor:
        """The token id at each position, for the bigram table: -1 where there is none (a soft prompt)."""
        if inputs_embeds is None:
            return input_ids
        T = inputs_embeds.shape[1]
        if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[1] == T:
            return input_ids
        if input_ids is not None and input_ids.numel():
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} do not match inputs_embeds of shape "
                             f"{tuple(inputs_embeds.shape)}: the bigram table reads one token id per embedding")
        self.transformer._check_inputs_embeds(inputs_embeds)
        wte = self.transformer.wte.weight.detach()
        flat = inputs_embeds.detach().reshape(-1, wte.shape[1]).to(wte.dtype)
        nearest = (flat @ wte.T - 0.5 * wte.pow(2).sum(-1)).argmax(-1)  # argmin of the distance
        exact = (wte[nearest] == flat).all(-1)
        _, row_class, row_count = torch.unique(wte, dim=0, return_inverse=True, return_counts=True)
        if bool((row_count[row_class[nearest]] > 1)[exact].any()):
            raise ValueError("inputs_embeds hold an embedding that several tokens share, so the bigram table cannot "
                             "tell the token: pass input_ids alongside inputs_embeds")
        return torch.where(exact, nearest, -1).view(inputs_embeds.shape[:2])

    def _bigram_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab) rows of the bigram table; zero rows where the id is -1."""
        if not tracing() and bool((ids >= 0).all()):  # a traced graph takes the masked form for every input
            return F.embedding(ids, self.bigram_table)
        return F.embedding(ids.clamp(min=0), self.bigram_table) * (ids >= 0).unsqueeze(-1)

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, **kwargs):
        """transformers' inputs for one step, keeping the prompt's ids (generate(input_ids=..., inputs_embeds=...))
        beside its embeddings for the bigram table."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        embeds = inputs.get("inputs_embeds")
        if (self.bigram_table is not None and embeds is not None and inputs.get("input_ids") is None
                and input_ids is not None and input_ids.shape[1] == embeds.shape[1]):
            inputs["input_ids"] = input_ids  # else forward() reads the ids off the embeddings
        return inputs

    # ---- generation and vocabulary -----------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """transformers' `generate`, refusing up front a length the model's context cannot hold; the sparse kernels
        check the weights once per call (`frozen_weights`), not once per token."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.ndim == 2:
            config = generation_config if generation_config is not None else self.generation_config
            max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
            total = ids.shape[1] + max_new if max_new is not None else kwargs.get("max_length", getattr(config, "max_length", None))
            if total is not None and total > self.config.block_size:
                raise ValueError(
                    f"cannot generate up to {total} tokens: the model's context is block_size={self.config.block_size} "
                    f"tokens and the prompt has {ids.shape[1]}; ask for at most "
                    f"max_new_tokens={max(self.config.block_size - ids.shape[1], 0)}"
                )
        with frozen_weights():  # one check of the weights per call, not per generated token
            return super().generate(inputs, generation_config=generation_config, **kwargs)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resizes every vocabulary-sized tensor: embeddings, unembedding, `final_logits_bias` and the bigram
        table (new tokens get zero bias and zero bigram logits)."""
        old = self.config.vocab_size
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        new = embeddings.weight.shape[0]
        if not isinstance(self.lm_head, SparseKernelLinear):  # transformers rebuilds an untied head as nn.Linear
            head = SparseKernelLinear(self.lm_head.in_features, self.lm_head.out_features, bias=False,
                                      device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)
            head.weight = self.lm_head.weight
            self.lm_head = head
            self.set_sparse_kernels(self.config.use_sparse_kernels)
        for module in (self.lm_head, embeddings):  # resized, not new: a later post_init() must not re-initialise them
            module._is_hf_initialized = True
            for tensor in module.parameters(recurse=False):
                tensor._is_hf_initialized = True
        if new != old:
            n = min(old, new)
            bias = self.final_logits_bias.new_zeros(new)
            bias[:n] = self.final_logits_bias[:n]
            self.final_logits_bias = bias
            if self.bigram_table is not None:
                table = self.bigram_table.new_zeros(new, new)
                table[:n, :n] = self.bigram_table[:n, :n]
                if isinstance(self.bigram_table, nn.Parameter):
                    self.bigram_table = nn.Parameter(table, requires_grad=self.bigram_table.requires_grad)
                else:
                    self.bigram_table = table
        self.config.vocab_size = new
        return embeddings



def _hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision",
                                   "subfolder") if kwargs.get(k) is not None}


def _weight_files(name, kwargs: dict, explicit: str | None = None) -> list[str]:
    """The weight files `from_pretrained` will read, found as transformers finds them: the config's
    `transformers_weights`, else safetensors, else PyTorch `.bin` (with `variant` and `use_safetensors`), one file
    or the shards of an index; [] if none is found."""
    from transformers.utils import cached_file

    def with_variant(file: str) -> str:  # as transformers names variants: model.safetensors -> model.fp16.safetensors
        stem, suffix = file.rsplit(".", 1)
        return f"{stem}.{kwargs['variant']}.{suffix}" if kwargs.get("variant") else file

    use_safetensors = kwargs.get("use_safetensors")
    if explicit:
        candidates = [explicit]
    else:
        candidates = (["model.safetensors", "model.safetensors.index.json"] if use_safetensors is not False else []) + \
                     (["pytorch_model.bin", "pytorch_model.bin.index.json"] if not use_safetensors else [])
        candidates = [with_variant(c) for c in candidates]
    hub = _hub_kwargs(kwargs)
    try:
        for candidate in candidates:
            found = cached_file(name, candidate, _raise_exceptions_for_missing_entries=False, **hub)
            if not found:
                continue
            if not candidate.endswith(".index.json"):
                return [found]
            shards = sorted(set(json.loads(Path(found).read_text())["weight_map"].values()))
            return [cached_file(name, shard, **hub) for shard in shards]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # transformers reports the problem in its own words
    return []


# Every saved folder carries this file and names its classes for the Auto classes (remote code), the base model too.
AUTO_MAP = {"AutoConfig": "configuration_csp.CSPConfig", "AutoModel": "modeling_csp.CSPModel",
            "AutoModelForCausalLM": "modeling_csp.CSPForCausalLM"}
CSPConfig.register_for_auto_class("AutoConfig")
CSPModel.register_for_auto_class("AutoModel")
CSPForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = ["CSPForCausalLM", "CSPModel", "CSPPreTrainedModel", "SINK_ATTENTION", "ActivationCache", "HookName", "abs_topk", "sparsify", "densify",
           "check_weight_files", "expected_shapes", "few_names", "frozen_weights"]
