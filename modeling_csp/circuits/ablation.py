"""Ablating circuit nodes: mean activations, mean/zero ablation, and the loss effects of ablations.

A circuit keeps some nodes (channels at the locations of `circuits.LOCATION_KINDS`); every other node is
*ablated*: its activation is replaced by its mean over pretraining text (mean ablation, the paper's default)
or by zero. With a keep mask m (1 = kept) the activation at a location becomes

    x -> m * x + (1 - m) * mean

which is built on `model.intervene`, so gradients flow to m (pruning learns m this way).

A task runs on the left-padded prompts of a `TaskBatch` with its attention mask, and `task_logits` reads the
logits at the last position only (`logits_to_keep=1`), which is all a binary task needs. Measuring what an
ablation does (task loss, `evaluate`, node importances) is `evaluation`, above this module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..utils.devices import input_device
from ..utils.jsonio import atomic_open
from .graph import location_width, node_locations, weights_hash
from .tasks import TaskBatch

Masks = dict[str, torch.Tensor]
MEAN_BATCH_TOKENS = 8192  # tokens per forward pass of `compute_mean_activations`


# ---- running a task ------------------------------------------------------------------------


def unchanged_weights(fn: Callable) -> Callable:
    """For a function of `model, ...` that runs many forward passes and changes no weight: the sparse kernels
    check each weight once per call (`CSPForCausalLM.frozen_weights`) instead of once per pass. A model without
    it (older remote code) runs as is."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        frozen = getattr(model, "frozen_weights", None)
        with frozen() if callable(frozen) else contextlib.nullcontext():
            return fn(model, *args, **kwargs)

    return wrapper


def task_logits(model, batch: TaskBatch) -> torch.Tensor:
    """(n, vocab) logits at the decision position (prompts are left-padded: always the last one)."""
    if int(batch.input_ids.max()) >= model.config.vocab_size:
        raise ValueError(
            f"the tokenizer gives token ids up to {int(batch.input_ids.max())} but the model's vocabulary has "
            f"{model.config.vocab_size} tokens: this tokenizer does not belong to this model"
        )
    if batch.input_ids.shape[1] > model.config.block_size:
        raise ValueError(f"task prompts of {batch.input_ids.shape[1]} tokens exceed the model's block_size {model.config.block_size}")
    device = input_device(model)  # a batch built on the CPU runs where the model is
    out = model(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), logits_to_keep=1, use_cache=False)
    return out.logits[:, -1]


# ---- ablation contexts ---------------------------------------------------------------------


def _replace(mask: torch.Tensor, fill: torch.Tensor | None):
    def fn(x: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:  # one pass, and kept activations bit for bit
            return torch.where(mask.to(x.device), x, 0.0 if fill is None else fill.to(device=x.device, dtype=x.dtype))
        m = mask.to(device=x.device, dtype=x.dtype)  # no-ops when the masks already live with the model
        if fill is None:
            return x * m
        # m*x + (1-m)*fill in one op (exact where m is 0 or 1; its gradient reaches m)
        return torch.lerp(fill.to(device=x.device, dtype=x.dtype), x, m)

    return fn


@contextlib.contextmanager
def ablate(model, keep_masks: Masks, means: Masks | None = None) -> Iterator[None]:
    """Mean-ablates (or zero-ablates when `means` is None) every node whose keep mask is 0.

    `keep_masks` maps a location to a (width,) tensor, bool or float (float masks pass gradients), or to a
    (rows, 1, width) tensor with one mask per row of the batch (several circuits in one forward pass);
    locations not in it are left alone."""
    fns = {}
    for loc, mask in keep_masks.items():
        width = location_width(model.config, loc)
        if mask.shape[-1:] != (width,) or mask.dim() not in (1, 3) or mask.dim() == 3 and mask.shape[1] != 1:
            raise ValueError(f"keep mask for {loc} has shape {tuple(mask.shape)}, expected ({width},) or (rows, 1, {width})")
        fill = None if means is None else means[loc]
        fns[loc] = _replace(mask, fill)
    with model.intervene(fns):
        yield


def mean_ablate(model, keep_masks: Masks, means: Masks):
    """Nodes outside the circuit are replaced by their mean activation: x -> m*x + (1-m)*mean."""
    return ablate(model, keep_masks, means)


def zero_ablate(model, keep_masks: Masks):
    """Nodes outside the circuit are set to zero: x -> m*x."""
    return ablate(model, keep_masks, None)


@contextlib.contextmanager
def frozen_norm_scales(model, batch: TaskBatch) -> Iterator[None]:
    """Freezes every norm's per-position scale (1/rms, or 1/std for LayerNorm) at its clean-run value.

    Ablating residual channels changes the rms of the residual stream and, through the norm, every other
    channel read from it; the paper's pruning can freeze the normalization statistics to the unablated model's
    so that an ablation only changes what it removes. Enter this *before* any ablation: it runs a clean
    forward pass on `batch` first, then intervenes on the `*.scale` hook points. Position-embedding norms
    (`ln_p1`, `ln_p2`) are left as they are."""
    names = [f"{l}.ln_{i}.scale" for l in range(model.config.n_layer) for i in (1, 2)] + ["ln_f.scale"]
    with torch.no_grad(), model.record_activations(names) as clean:
        task_logits(model, batch)

    def frozen(scale: torch.Tensor, hook) -> torch.Tensor:
        value = clean[hook.name]
        return value[:, value.shape[1] - scale.shape[1]:]  # ln_f may see only the last positions

    with model.intervene(dict.fromkeys(names, frozen)):
        yield


# ---- mean activations ----------------------------------------------------------------------


def stdlib_heldout_texts() -> list[str]:
    """The held-out 10% of CPython's standard library (by file): the default model's validation split.

    The rule is `corpus.is_stdlib_heldout`, the one the training corpus holds these files out by, so mean
    activations and node examples are computed on text the default model never trained on."""
    from ..data.corpus import is_stdlib_heldout, stdlib_documents, stdlib_root

    texts = [text for path, text in stdlib_documents() if is_stdlib_heldout(path)]
    if not texts:
        raise ValueError(f"no Python standard library sources found under {stdlib_root()} to compute mean activations on")
    return texts


def text_windows(tokenizer, texts: Sequence[str], n_tokens: int, block_size: int) -> torch.Tensor:
    """Tokenizes documents (joined by end-of-text) into (n, block_size) windows spread evenly over them."""
    eot = getattr(tokenizer, "eos_token_id", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast path, and no max-length warnings
    if backend is not None:
        docs = [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    else:
        docs = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    ids: list[int] = []
    for doc in docs:
        ids += doc
        if eot is not None:
            ids.append(eot)
    n_windows = max(1, min(n_tokens // block_size, len(ids) // block_size))
    if len(ids) < block_size:
        raise ValueError(f"only {len(ids)} tokens of text; need at least one window of {block_size}")
    starts = torch.linspace(0, len(ids) - block_size, n_windows).long().tolist()
    return torch.tensor([ids[s : s + block_size] for s in starts], dtype=torch.long)


def example_windows(model, tokenizer, n_tokens: int = 8192) -> torch.Tensor:
    """(n, T) token windows of held-out stdlib text for nodes' activating examples: about 24 files spread
    over the held-out split, windows of min(block_size, 128) tokens, ids within the model's vocabulary."""
    texts = stdlib_heldout_texts()
    windows = text_windows(tokenizer, texts[:: max(1, len(texts) // 24)], n_tokens, min(model.config.block_size, 128))
    return windows.clamp(max=model.config.vocab_size - 1)


def default_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("CSP_CACHE_DIR") or Path(constants.HF_HOME) / "csp" / "mean_activations")


@torch.no_grad()
@unchanged_weights
def compute_mean_activations(
    model,
    data,
    n_tokens: int = 32768,
    batch_size: int = 32,
    cache_dir: str | Path | None | bool = None,
) -> Masks:
    """{location: (width,) mean activation} at every node location, over pretraining-like text.

    `data` is a tokenizer (then the text is the held-out CPython stdlib, see `stdlib_heldout_texts`, in
    windows of the model's block size), or token ids: a (n, T) tensor or a list of 1-D/2-D tensors.
    Means are over all positions of all windows, accumulated and returned on the model's device (float64
    sums, float32 on MPS which has no float64). Results are cached in `cache_dir` (default
    $CSP_CACHE_DIR or HF_HOME/csp/mean_activations; False disables) keyed by a hash of the model's
    weights and of the tokens (for a tokenizer: of the tokenizer, Python version, n_tokens and block
    size, so that a cache hit needs no tokenizing), so a changed model or text is recomputed."""
    if hasattr(data, "encode"):  # a tokenizer: the key names the text instead of hashing its tokens
        vocab = getattr(getattr(data, "backend_tokenizer", None), "to_str", lambda: str(sorted(data.get_vocab().items())))()
        key = f"stdlib-heldout|{sysconfig.get_python_version()}|{n_tokens}|{model.config.block_size}|{vocab}"
        batches = None
    else:
        tensors = [data] if isinstance(data, torch.Tensor) else list(data)
        if not tensors:
            raise ValueError("no token batches given to compute mean activations on")
        batches = [chunk for t in tensors for chunk in (t if t.dim() == 2 else t.unsqueeze(0)).split(batch_size)]
        key = "|".join(f"{tuple(b.shape)}:{hashlib.sha256(b.long().numpy().tobytes()).hexdigest()}" for b in batches)

    path = None
    if cache_dir is not False:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        path = Path(cache_dir or default_cache_dir()) / f"means-{weights_hash(model)}-{digest}.pt"
        if path.exists():
            try:
                return {loc: m.to(input_device(model)) for loc, m in torch.load(path, weights_only=True).items()}
            except Exception:
                pass  # unreadable cache: recompute
    if batches is None:
        batches = text_windows(data, stdlib_heldout_texts(), n_tokens, model.config.block_size).split(batch_size)

    locations = node_locations(model.config)
    device = input_device(model)
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    sums = {loc: torch.zeros(location_width(model.config, loc), dtype=acc_dtype, device=device) for loc in locations}

    def summing(loc):  # adds each activation to its sum as it passes: memory of one location, not of every one
        def fn(x):
            sums[loc] += x.detach().to(acc_dtype).sum(dim=(0, 1))
            return x
        return fn

    count = 0
    with model.intervene({loc: summing(loc) for loc in locations}):
        for b in batches:
            if int(b.max()) >= model.config.vocab_size:
                raise ValueError(f"token id {int(b.max())} is outside the model's vocabulary ({model.config.vocab_size})")
            for rows in b.split(max(1, MEAN_BATCH_TOKENS // b.shape[1])):  # a bounded pass at any model size
                model(rows.to(device), use_cache=False, logits_to_keep=1)
            count += b.shape[0] * b.shape[1]
    means = {loc: (s / count).float() for loc, s in sums.items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            torch.save({loc: m.cpu() for loc, m in means.items()}, f)
    return means


# ---- masks ---------------------------------------------------------------------------------


def all_kept(config, device=None) -> Masks:
    """Masks keeping every node: the whole model as a circuit (nothing ablated)."""
    return {loc: torch.ones(location_width(config, loc), dtype=torch.bool, device=device) for loc in node_locations(config)}


__all__ = [
    "Masks", "task_logits", "ablate", "mean_ablate", "zero_ablate", "frozen_norm_scales", "compute_mean_activations",
    "stdlib_heldout_texts", "text_windows", "example_windows", "all_kept", "unchanged_weights",
]
