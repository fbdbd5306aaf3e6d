"""What is computed once per model and kept on disk: its mean activations (what mean ablation replaces a node
by) and an example index (node statistics and activating examples), each keyed by the model's weights hash.

At a released model's size (csp_yolo1: 82k nodes, context 1024) both take minutes on a CPU and the activations of
one window of every node take hundreds of MB, so both are computed in batches bounded in bytes, with a progress
callback (a tqdm bar when none is given), and cached under `ablation.default_cache_dir()` ($CSP_CACHE_DIR or
HF_HOME/csp/mean_activations): the means where `compute_mean_activations` keeps them (so `csp prune` finds the
app's), the index where `csp index-examples` keeps it. Another model's weights are another key, so a changed
model is recomputed; files are written atomically, and an unreadable one is recomputed.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .ablation import Masks, compute_mean_activations, example_windows
from .example_index import ExampleIndex, build_example_index, cache_folder, find_example_index
from .graph import n_total_nodes

Progress = Callable[[float, str], None]  # (fraction done of this step, what is being done)

MEANS_TOKENS = 32768  # the text `compute_mean_activations` averages over by default (pruning's means)
MEANS_BATCH_BYTES = 256_000_000  # float32 activations of every node recorded at once while averaging
INDEX_TOKENS = 8192  # the app's example index when the model ships none (`Settings.pretrain_tokens`)
MAX_INDEX_TOKENS = 1_000_000  # what one request may ask the app's server to index


def means_batch_size(config, budget_bytes: int = MEANS_BATCH_BYTES) -> int:
    """Windows of `block_size` tokens averaged per forward pass: as many as fit the budget (at most 32, the
    library's default), at least one."""
    per_window = n_total_nodes(config) * int(config.block_size) * 4
    return max(1, min(32, budget_bytes // max(per_window, 1)))


def tqdm_progress(desc: str) -> tuple[Progress, Callable[[], None]]:
    """(progress callback, close) drawing a tqdm bar on stderr, for the library and the CLI."""
    import sys

    from tqdm.auto import tqdm

    bar = tqdm(total=1000, desc=desc, unit="‰", file=sys.stderr, leave=False)

    def progress(fraction: float, text: str) -> None:
        bar.set_postfix_str(text, refresh=False)
        bar.update(max(0, round(1000 * min(fraction, 1.0)) - bar.n))

    return progress, bar.close


def mean_activations(model, tokenizer, n_tokens: int = MEANS_TOKENS, cache_dir: str | Path | None = None,
                     progress: Progress | None = None) -> tuple[Masks, bool]:
    """(means, computed now): `ablation.compute_mean_activations` over the held-out stdlib (its cache file, so
    pruning reads the same), in batches of `means_batch_size` windows; `progress` hears of each forward pass
    (none on a cache hit)."""
    batch = means_batch_size(model.config)
    total = math.ceil(max(1, n_tokens // int(model.config.block_size)) / batch)
    me, done = threading.get_ident(), [0]

    def tick(*_):
        if threading.get_ident() == me:  # other threads' forward passes on the shared model are theirs
            done[0] += 1
            if progress is not None:
                progress(min(done[0] / total, 1.0), f"mean activations: batch {min(done[0], total)} of {total}")

    handle = model.register_forward_hook(tick)
    try:
        means = compute_mean_activations(model, tokenizer, n_tokens=n_tokens, batch_size=batch, cache_dir=cache_dir)
    finally:
        handle.remove()
    return means, done[0] > 0


def index_batch_size(config, window: int) -> int:
    """Windows per batch for the example index: the builder's 64 where all nodes' activations of them stay
    within about 48M values (200 MB as float32), fewer for larger models."""
    return max(1, min(64, 48_000_000 // max(n_total_nodes(config) * window, 1)))


def example_index(model, tokenizer, n_tokens: int = INDEX_TOKENS, model_folder: str | Path | None = None,
                  cache_dir: str | Path | None = None, progress: Progress | None = None) -> tuple[ExampleIndex, bool, bool]:
    """(index, from disk, computed now): the index shipped in `model_folder` or cached (by `csp index-examples`
    or an earlier call) when it covers `n_tokens`, else one built now over `n_tokens` held-out tokens
    (`ablation.example_windows`) and cached, reused by every later call and process."""
    if not 1024 <= int(n_tokens) <= MAX_INDEX_TOKENS:
        raise ValueError(f"example index of {n_tokens:,} tokens: pick 1,024 to {MAX_INDEX_TOKENS:,}")
    found = find_example_index(model, model_folder, cache_dir)
    if found is not None and (found.n_tokens >= n_tokens or found.meta.get("requested_tokens") == n_tokens
                              or found.meta.get("source") != "model_cache"):
        return found, True, False
    windows = example_windows(model, tokenizer, n_tokens)

    def tick(done: int, total: int) -> None:
        if progress is not None:
            progress(done / max(total, 1), f"node examples: batch {done} of {total} (2 passes)")

    index = build_example_index(model, windows=windows, progress=tick,
                                batch_size=index_batch_size(model.config, windows.shape[1]))
    index.meta.update(source="model_cache", requested_tokens=int(n_tokens))
    index.save(cache_folder(model, cache_dir))
    return index, False, True


@dataclass
class Prepared:
    """What `prepare` found or computed: the means, the index, and which of the two were computed now (empty
    when both came from disk), with the seconds each took."""

    means: Masks
    index: ExampleIndex
    index_on_disk: bool
    computed: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def prepare(model, tokenizer, model_folder: str | Path | None = None, index_tokens: int = INDEX_TOKENS,
            cache_dir: str | Path | None = None, progress: Progress | None = None) -> Prepared:
    """The mean activations, then the example index, each from disk or computed and cached: one progress over
    both (means the first half), a tqdm bar when `progress` is None."""
    close = None
    if progress is None:
        progress, close = tqdm_progress("preparing the model")
    try:
        t = time.perf_counter()
        means, computed_means = mean_activations(model, tokenizer, cache_dir=cache_dir,
                                                 progress=lambda f, text: progress(0.5 * f, text))
        t_means = time.perf_counter() - t
        progress(0.5, "node examples")
        t = time.perf_counter()
        index, on_disk, computed_index = example_index(model, tokenizer, index_tokens, model_folder, cache_dir,
                                                       progress=lambda f, text: progress(0.5 + 0.5 * f, text))
        t_index = time.perf_counter() - t
        progress(1.0, "ready")
    finally:
        if close is not None:
            close()
    computed = [name for name, done in (("means", computed_means), ("index", computed_index)) if done]
    return Prepared(means, index, on_disk, computed, {"means": round(t_means, 2), "index": round(t_index, 2)})


__all__ = ["INDEX_TOKENS", "MAX_INDEX_TOKENS", "MEANS_TOKENS", "Prepared", "example_index", "index_batch_size",
           "mean_activations", "means_batch_size", "prepare", "tqdm_progress"]
