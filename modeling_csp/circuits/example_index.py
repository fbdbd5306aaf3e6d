"""An example index: every node's density, activation histogram, quantiles and activating examples, computed once
per model over held-out text (today's live examples see 8,192 tokens, so their "0.1%" quantile is 8 tokens).

Text: the held-out 10% of CPython's standard library (`ablation.stdlib_heldout_texts`, 427,772 tokens with the
default tokenizer), then, given a built corpus folder (`scripts/build_corpus.py`), the projects' held-out files
(`val_extra.npy`, 692,505 tokens), cut into contiguous windows of min(block_size, 128) tokens.

Two streaming passes over the windows (memory does not grow with the token count; what is kept is bounded by
nodes x bins and nodes x examples):

1. every node's min, max and a fine histogram on fixed
   symmetric-log bins (32 bins per octave of |x| from 2**-14 to 2**10, and one bin for |x| < 2**-14, zeros);
   quantiles are read off it (within one fine bin, 2.2% of the value), and the stored histogram merges it to
   two bins per octave (`HIST_BINS` fixed bins: the same for every node and model, so histograms compare);
   a node's density is the fraction of tokens outside the zero bin (active: |x| >= 2**-14);
2. the examples: for a
   fraction f the examples are the windows whose activation ranks at the top (bottom) f of all tokens, as
   `graph.quantile_examples` picks them. Pass 1 says which fine bin holds that rank; pass 2 keeps that bin's
   entries (all of them when at most `BIN_CAPACITY`, so the rank is exact; else the first of each window, all
   within one fine bin of the exact value; exact zeros are ties, so any of them is exact).

Examples are stored as (window, peak position, peak activation float16) with the windows as int16/int32 token
ids; an example's context activations are recomputed from its window when shown (`quantile_examples`), a forward
pass of at most a few dozen windows. An index is tied to its model by `graph.weights_hash`: loading it for other
weights is an error, never other weights' examples.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.jsonio import atomic_path, loads_strict, write_json_atomic
from .ablation import default_cache_dir, stdlib_heldout_texts, unchanged_weights
from .graph import (
    QUANTILES,
    location_width,
    model_info,
    node_locations,
    parse_node_id,
    weights_hash,
)

FORMAT, VERSION = "csp-example-index", 1
META_FILE, TENSOR_FILE = "index.json", "index.safetensors"
DEFAULT_TOKENS = 1_000_000
MAX_TOKENS = 20_000_000  # 5 passes' worth of the model's forward time at most a few hours on one CPU core
MIN_TOKENS = 1024
WINDOW = 128
PER_SIDE = 5
QUANTILE_LEVELS = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999)
FINE_SHIFT = 18  # float32 bits kept: 8 exponent + 5 mantissa bits, 32 bins per octave (2.2% wide)
FINE_LOW_CODE, FINE_HIGH_CODE = (127 - 14) << 5, (127 + 10) << 5  # |x| from 2**-14 to 2**10, clamped beyond
FINE_HALF = FINE_HIGH_CODE - FINE_LOW_CODE  # fine bins on each side of the zero bin
FINE_BINS = 2 * FINE_HALF + 1
ZERO_BIN = FINE_HALF
HIST_MERGE = 16  # fine bins per stored histogram bin: two per octave
HIST_BINS = 2 * FINE_HALF // HIST_MERGE + 1
BIN_CAPACITY = 128
SIDES = ("top", "bottom")


# ---- held-out text ---------------------------------------------------------------------------


def heldout_token_ids(tokenizer, corpus: str | Path | None = None) -> tuple[torch.Tensor, str]:
    """(1-D token ids, description) of all held-out text: the stdlib's held-out files (each followed by
    end-of-text), then a built corpus's projects' held-out files (`val_extra.npy`) when `corpus` is given."""
    texts = stdlib_heldout_texts()
    eot = getattr(tokenizer, "eos_token_id", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    docs = ([e.ids for e in backend.encode_batch(texts, add_special_tokens=False)] if backend is not None
            else [tokenizer.encode(t, add_special_tokens=False) for t in texts])
    ids = [i for doc in docs for i in (doc + ([eot] if eot is not None else []))]
    parts = [torch.tensor(ids, dtype=torch.long)]
    what = [f"{len(texts)} held-out CPython stdlib files ({len(ids):,} tokens, Python {platform.python_version()})"]
    if corpus is not None:
        import numpy as np

        path = check_corpus(corpus)
        extra = torch.from_numpy(np.load(path).astype("int64"))
        parts.append(extra)
        what.append(f"the corpus's projects' held-out files, val_extra.npy ({len(extra):,} tokens)")
    return torch.cat(parts), " + ".join(what)


def check_corpus(corpus: str | Path) -> Path:
    """The projects' held-out token file of a built corpus folder, or a ValueError saying how to build one."""
    path = Path(corpus) / "val_extra.npy"
    if not path.is_file():
        raise ValueError(f"{corpus}: has no val_extra.npy; build the corpus with `csp corpus --out {corpus}`")
    return path


def heldout_windows(model, tokenizer, n_tokens: int = DEFAULT_TOKENS, corpus: str | Path | None = None
                    ) -> tuple[torch.Tensor, str]:
    """((n, T) contiguous windows of held-out text, T = min(block_size, 128), `n_tokens` rounded up to whole
    windows; what text it is). Uses all the held-out text when there is less (the description says how much)."""
    check_token_count(n_tokens)
    ids, what = heldout_token_ids(tokenizer, corpus)
    if int(ids.max()) >= model.config.vocab_size:
        raise ValueError(f"the tokenizer gives token ids up to {int(ids.max())} but the model's vocabulary has "
                         f"{model.config.vocab_size}: this tokenizer (or corpus) does not belong to this model")
    T = min(model.config.block_size, WINDOW)
    n = min(-(-n_tokens // T), len(ids) // T)  # whole windows, at least n_tokens when there is that much text
    if n == 0:
        raise ValueError(f"only {len(ids)} held-out tokens; need at least one window of {T}")
    return ids[: n * T].view(n, T), what


def check_token_count(n_tokens: int) -> None:
    if not MIN_TOKENS <= int(n_tokens) <= MAX_TOKENS:
        raise ValueError(f"token count {n_tokens:,} is outside {MIN_TOKENS:,}..{MAX_TOKENS:,}; pick a count in that range")


# ---- binning -------------------------------------------------------------------------------


def fine_bins(x: torch.Tensor) -> torch.Tensor:
    """Fine bin of each float32 value, monotonic in the value; |x| < 2**-14 (zeros) is ZERO_BIN. Read off the
    float's bits (exponent and top mantissa bits) in place: several times faster than a logarithm."""
    bits = x.contiguous().view(torch.int32)
    sign = bits >> 31  # 0, or -1 for negative values
    mag = (bits & 0x7FFFFFFF).bitwise_right_shift_(FINE_SHIFT).sub_(FINE_LOW_CODE - 1).clamp_(0, FINE_HALF)
    return mag.bitwise_xor_(sign).sub_(sign).add_(ZERO_BIN)  # sign * mag, as two's complement


def fine_bin_edges() -> torch.Tensor:
    """(FINE_BINS + 1) value edges of the fine bins (the outermost bins also hold everything beyond). Positive
    bins hold [lower, upper), negative ones (lower, upper], the zero bin (-2**-14, 2**-14)."""
    codes = (FINE_LOW_CODE + torch.arange(FINE_HALF + 1, dtype=torch.int32)) << FINE_SHIFT
    pos = codes.view(torch.float32).clone()
    return torch.cat([-pos.flip(0), pos])


def hist_bin_edges() -> torch.Tensor:
    """(HIST_BINS + 1) edges of the stored histogram: fine bins merged HIST_MERGE at a time (two per octave)."""
    edges = fine_bin_edges()
    return torch.cat([edges[: FINE_HALF + 1: HIST_MERGE], edges[FINE_HALF + 1:: HIST_MERGE]])


def merge_to_hist(fine: torch.Tensor) -> torch.Tensor:
    """(nodes, HIST_BINS) counts from (nodes, FINE_BINS) fine counts."""
    n = fine.shape[0]
    negative = fine[:, :FINE_HALF].reshape(n, -1, HIST_MERGE).sum(-1)
    positive = fine[:, FINE_HALF + 1:].reshape(n, -1, HIST_MERGE).sum(-1)
    return torch.cat([negative, fine[:, FINE_HALF: FINE_HALF + 1], positive], 1)


def _rank_bins(counts: torch.Tensor, ranks: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `counts` (nodes, bins) and rank (nodes, k) counted from the `side`: (bin holding that rank,
    entries of that row in bins before it on that side)."""
    ordered = counts.flip(1) if side == "top" else counts
    cum = ordered.cumsum(1)
    pos = torch.searchsorted(cum, ranks, right=True).clamp(max=counts.shape[1] - 1)
    before = torch.where(pos > 0, cum.gather(1, (pos - 1).clamp(min=0)), torch.zeros_like(pos))
    return (counts.shape[1] - 1 - pos if side == "top" else pos), before


# ---- the index -----------------------------------------------------------------------------


@dataclass
class ExampleIndex:
    """Per-node statistics and example pointers over `windows` (see the module docstring); `meta` says which
    model (weights hash) and text it was built on."""

    meta: dict[str, Any]
    windows: torch.Tensor  # (n, T) token ids
    density: torch.Tensor  # (nodes,) fraction of tokens where the node is active: |activation| >= 2**-14
    minimum: torch.Tensor
    maximum: torch.Tensor
    hist: torch.Tensor  # (nodes, HIST_BINS) token counts on equal-width bins from minimum to maximum
    quantiles: torch.Tensor  # (nodes, len(QUANTILE_LEVELS)) values at meta["quantile_levels"]
    example_window: torch.Tensor  # (nodes, len(QUANTILES), 2 sides, per_side) window index, -1: none
    example_position: torch.Tensor  # same shape: the peak's position in its window
    example_activation: torch.Tensor  # same shape: the peak activation (float16)
    _offsets: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        start = 0
        for loc, width in zip(self.meta["locations"], self.meta["widths"]):
            self._offsets[loc] = start
            start += width

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def row(self, node: str) -> int:
        loc, ch = parse_node_id(node)
        if loc not in self._offsets or ch >= self.meta["widths"][self.meta["locations"].index(loc)]:
            raise ValueError(f"node {node!r} is not a node of the indexed model")
        return self._offsets[loc] + ch

    def node_stats(self, node: str) -> dict[str, Any]:
        """{"density", "min", "max", "edges", "counts" (the histogram cut to the bins from the node's min to
        its max, outer edges set to them), "quantiles" {level: value}, "n_tokens"}."""
        r = self.row(node)
        lo, hi = float(self.minimum[r]), float(self.maximum[r])
        used = self.hist[r].nonzero().flatten().tolist() or [HIST_BINS // 2]
        first, last = used[0], used[-1]
        edges = hist_bin_edges()[first: last + 2].tolist()
        edges[0], edges[-1] = lo, hi
        return {"density": float(self.density[r]), "min": lo, "max": hi,
                "edges": edges, "counts": self.hist[r, first: last + 1].tolist(),
                "quantiles": dict(zip(self.meta["quantile_levels"], self.quantiles[r].tolist())), "n_tokens": self.n_tokens}

    def check_model(self, model) -> None:
        """ValueError unless `model` has the weights this index was built on."""
        have = weights_hash(model)
        if have != self.meta["weights_hash"]:
            raise ValueError(f"this example index was built for other weights (hash {self.meta['weights_hash']}, the model's "
                             f"is {have}); rebuild it with `csp index-examples MODEL`")

    @torch.no_grad()
    def quantile_examples(self, model, node: str, per_side: int = PER_SIDE, before: int = 16, after: int = 4
                          ) -> dict[str, dict[str, list]]:
        """The node's examples in `graph.quantile_examples`' form: {"top"|"bottom": {fraction: [{"tokens",
        "activations", "position"}]}}, the context activations recomputed on the stored windows by `model`."""
        self.check_model(model)
        from ..utils.devices import input_device

        r = self.row(node)
        loc, ch = parse_node_id(node)
        wins = self.example_window[r, :, :, :per_side]
        used = sorted({int(w) for w in wins.flatten().tolist() if w >= 0})
        acts: dict[int, torch.Tensor] = {}
        if used:
            ids = self.windows[used].long().to(input_device(model))
            with model.record_activations([loc]) as rec:
                model(ids, use_cache=False, logits_to_keep=1)
            acts = dict(zip(used, rec[loc][:, :, ch].float().cpu()))
        T = self.windows.shape[1]
        out: dict[str, dict[str, list]] = {"top": {}, "bottom": {}}
        for qi, frac in enumerate(self.meta["example_quantiles"]):
            for si, side in enumerate(SIDES):
                picked = []
                for w, pos in zip(wins[qi, si].tolist(), self.example_position[r, qi, si, :per_side].tolist()):
                    if w < 0:
                        continue
                    lo, hi = max(0, pos - before), min(T, pos + after + 1)
                    picked.append({"tokens": self.windows[w, lo:hi].long().tolist(),
                                   "activations": [round(a, 4) for a in acts[w][lo:hi].tolist()], "position": pos - lo})
                out[side][str(frac)] = picked
        return out

    # ---- files ----

    def save(self, folder: str | Path) -> Path:
        """Writes `folder`/index.safetensors then index.json, each atomically; returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        with atomic_path(folder / TENSOR_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "weights_hash": self.meta["weights_hash"]})
        write_json_atomic(folder / META_FILE, self.meta, indent=1)
        return folder

    @classmethod
    def load(cls, folder: str | Path, model=None) -> ExampleIndex:
        """The index in `folder`; with `model`, a ValueError unless it was built on that model's weights.
        A missing, truncated or mismatched file is a one-line ValueError saying to rebuild."""
        from safetensors import safe_open

        folder = Path(folder)
        fix = "; rebuild it with `csp index-examples MODEL`"
        try:
            meta = loads_strict((folder / META_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{folder}: no example index here ({META_FILE} missing){fix}") from None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{folder / META_FILE}: unreadable example index ({str(exc).splitlines()[0] if str(exc) else exc}){fix}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{folder / META_FILE}: not a {FORMAT} v{VERSION} file{fix}")
        try:
            with safe_open(str(folder / TENSOR_FILE), framework="pt") as f:
                stored_hash = (f.metadata() or {}).get("weights_hash")
                tensors = {name: f.get_tensor(name) for name in _TENSORS}
        except Exception as exc:
            raise ValueError(f"{folder / TENSOR_FILE}: unreadable example index ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}){fix}") from None
        if stored_hash != meta.get("weights_hash"):
            raise ValueError(f"{folder}: {TENSOR_FILE} and {META_FILE} belong to different builds{fix}")
        n_nodes = sum(meta["widths"])
        if any(tensors[name].shape[0] != n_nodes for name in _TENSORS if name != "windows"):
            raise ValueError(f"{folder}: tensors do not match the {n_nodes} nodes {META_FILE} lists{fix}")
        index = cls(meta=meta, **tensors)
        if model is not None:
            index.check_model(model)
        return index


_TENSORS = ("windows", "density", "minimum", "maximum", "hist", "quantiles",
            "example_window", "example_position", "example_activation")


# ---- building ------------------------------------------------------------------------------


def _batches(model, windows: torch.Tensor, locations: Sequence[str], batch_size: int):
    """(first window index, (nodes, tokens) float32 activations of every node), batch by batch (node-major: the
    per-node reductions and histograms then read memory in order)."""
    from ..utils.devices import input_device

    device = input_device(model)
    for start in range(0, windows.shape[0], batch_size):
        with model.record_activations(list(locations)) as acts:
            model(windows[start: start + batch_size].long().to(device), use_cache=False, logits_to_keep=1)
        yield start, torch.cat([acts[loc].reshape(-1, acts[loc].shape[-1]).T.float().cpu() for loc in locations]).contiguous()


@torch.no_grad()
@unchanged_weights
def build_example_index(model, tokenizer=None, n_tokens: int = DEFAULT_TOKENS, *, windows: torch.Tensor | None = None,
                        corpus: str | Path | None = None, batch_size: int = 64, per_side: int = PER_SIDE,
                        progress: Callable[[int, int], None] | None = None) -> ExampleIndex:
    """Builds the example index of `model` over `n_tokens` held-out tokens (`heldout_windows`; or over the
    given (n, T) `windows`). `progress(done, total)` is called after each batch of each of the two passes."""
    t0 = time.perf_counter()
    if windows is None:
        windows, text = heldout_windows(model, tokenizer, n_tokens, corpus)
    else:
        text = f"{windows.numel():,} given tokens"
    locations = node_locations(model.config)
    widths = [location_width(model.config, loc) for loc in locations]
    n_nodes, (n_win, T) = sum(widths), windows.shape
    N = n_win * T
    n_batches = math.ceil(n_win / batch_size)
    step = [0]

    def tick():
        step[0] += 1
        if progress is not None:
            progress(step[0], 2 * n_batches)

    # pass 1: density, range, mean, fine histogram
    lo = torch.full((n_nodes,), math.inf)
    hi = torch.full((n_nodes,), -math.inf)
    fine = torch.zeros(n_nodes, FINE_BINS, dtype=torch.long)
    node_base = torch.arange(n_nodes) * FINE_BINS
    for _, x in _batches(model, windows, locations, batch_size):
        low, high = torch.aminmax(x, dim=1)
        lo, hi = torch.minimum(lo, low), torch.maximum(hi, high)
        bins = fine_bins(x).long()
        fine.scatter_add_(1, bins, torch.ones(1, dtype=torch.long).expand(bins.shape))  # in place: no per-batch copy
        tick()

    # quantile values, interpolated within their fine bin
    edges = fine_bin_edges()
    levels = torch.tensor(QUANTILE_LEVELS)
    qranks = (levels * (N - 1)).long().expand(n_nodes, -1).contiguous()
    qbin, qbefore = _rank_bins(fine, qranks, "bottom")
    inside = (qranks - qbefore).double() + 0.5
    width = fine.gather(1, qbin).double().clamp(min=1)
    left, right = edges[qbin], edges[qbin + 1]
    left = torch.maximum(left, lo[:, None])
    right = torch.minimum(right, hi[:, None])
    quantiles = torch.where(qbin == ZERO_BIN, torch.zeros_like(left), left + (right - left) * (inside / width).float())

    # which fine bins to keep for each example rank: from the rank's bin on, along the side, as long as they hold
    # at most BIN_CAPACITY entries, then one more bin if it alone holds more (a heavy bin: near-ties)
    counts = fine
    examples_at = torch.tensor([min(int(f * N), N - 1) for f in QUANTILES]).expand(n_nodes, -1).contiguous()
    plan = {}
    # (per node and fine bin, 126M entries at 82k nodes: the narrowest dtypes that hold them)
    cover = torch.zeros(n_nodes * FINE_BINS + 1, dtype=torch.int32)
    for side in SIDES:
        ordered = counts.flip(1) if side == "top" else counts
        cum = ordered.cumsum(1)
        first = torch.searchsorted(cum, examples_at, right=True).clamp(max=FINE_BINS - 1)  # positions in side order
        before = torch.where(first > 0, cum.gather(1, (first - 1).clamp(min=0)), torch.zeros_like(first))
        # a heavy first bin gives at most its entries past the rank (near-ties), then the bins after it count
        first_heavy = ordered.gather(1, first) > BIN_CAPACITY
        budget = torch.where(first_heavy, cum.gather(1, first), before) + BIN_CAPACITY
        last = (torch.searchsorted(cum, budget, right=True) - 1).clamp(max=FINE_BINS - 1)
        last = torch.maximum(last, first)
        following = torch.searchsorted(cum, cum.gather(1, last), right=True).clamp(max=FINE_BINS - 1)
        heavy_next = ordered.gather(1, following) > BIN_CAPACITY
        last = torch.where(heavy_next & (ordered.gather(1, last) <= BIN_CAPACITY), following, last)
        to_bin = (lambda pos: FINE_BINS - 1 - pos) if side == "top" else (lambda pos: pos)
        low, high = (to_bin(last), to_bin(first)) if side == "top" else (to_bin(first), to_bin(last))
        plan[side] = (to_bin(first), examples_at - before, low, high, ordered.gather(1, first) - (examples_at - before))
        starts, ends = (low + node_base[:, None]).flatten(), (high + 1 + node_base[:, None]).flatten()
        cover.index_add_(0, starts, torch.ones_like(starts, dtype=torch.int32))
        cover.index_add_(0, ends, -torch.ones_like(ends, dtype=torch.int32))
    covered = cover.cumsum(0, dtype=torch.int32)[:-1] > 0
    del cover
    heavy_bin = counts.flatten() > BIN_CAPACITY
    flag = covered.to(torch.int8) + (covered & heavy_bin).to(torch.int8)  # 1: keep every entry, 2: one per window
    del covered
    heavy_fill = torch.zeros(n_nodes * FINE_BINS, dtype=torch.int32)
    heavy_cap = 2 * per_side  # enough distinct windows even after the previous bins' windows
    kept_key, kept_value, kept_token = [], [], []

    # pass 2: the entries of the planned bins
    for first_window, x in _batches(model, windows, locations, batch_size):
        key = fine_bins(x) + node_base[:, None]
        f = flag[key]
        node, tok = (f > 0).nonzero(as_tuple=True)
        if len(tok):
            k, value, token = key[node, tok], x[node, tok], first_window * T + tok
            light = f[node, tok] == 1
            kept_key.append(k[light]), kept_value.append(value[light]), kept_token.append(token[light])
            k, value, token = k[~light], value[~light], token[~light]
            if len(k):
                unit = k * (n_win + 1) + token // T
                order = torch.argsort(unit, stable=True)
                unit, k, value, token = unit[order], k[order], value[order], token[order]
                fresh = torch.ones_like(unit, dtype=torch.bool)
                fresh[1:] = unit[1:] != unit[:-1]
                k, value, token = k[fresh], value[fresh], token[fresh]
                place = heavy_fill[k] + torch.arange(len(k)) - torch.searchsorted(k, k)
                keep = place < heavy_cap
                k, value, token = k[keep], value[keep], token[keep]
                kept_key.append(k), kept_value.append(value), kept_token.append(token)
                heavy_fill.index_add_(0, k, torch.ones_like(k, dtype=torch.int32))
                flag[k[heavy_fill[k] >= heavy_cap]] = 0  # (only these bins' counts changed)
        tick()

    # pick the examples: the kept entries in rank order past the ranks before, distinct windows
    keys, values, tokens = torch.cat(kept_key), torch.cat(kept_value), torch.cat(kept_token)
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(keys[order], stable=True)]
    # (numpy arrays, not lists or tensors, for the per-node loop below: at a released model's 82k nodes, Python
    # lists of the kept entries take gigabytes, and element writes into tensors take minutes)
    keys, values, tokens = keys[order], values[order].numpy(), tokens[order].numpy()
    n_q = len(QUANTILES)
    ex_window = np.full((n_nodes, n_q, 2, per_side), -1, dtype=np.int32)
    ex_pos = np.zeros((n_nodes, n_q, 2, per_side), dtype=np.int16)
    ex_act = np.zeros((n_nodes, n_q, 2, per_side), dtype=np.float16)
    for si, side in enumerate(SIDES):
        b, skip, low, high, left = plan[side]
        begin = torch.searchsorted(keys, low + node_base[:, None]).tolist()
        end = torch.searchsorted(keys, high + node_base[:, None], right=True).tolist()
        in_b = (torch.searchsorted(keys, b + node_base[:, None], right=True)
                - torch.searchsorted(keys, b + node_base[:, None])).tolist()
        heavy = heavy_bin[b + node_base[:, None]].tolist()
        skip, left = skip.tolist(), left.tolist()
        for r in range(n_nodes):
            for qi in range(n_q):
                span_ = range(begin[r][qi], end[r][qi])
                ranked = span_[::-1] if side == "top" else span_
                if heavy[r][qi]:  # kept: a few windows of bin b; the ranks past it: `left` entries of b, then on
                    ranked = itertools.chain(ranked[: min(left[r][qi], in_b[r][qi])], ranked[in_b[r][qi]:])
                else:
                    ranked = ranked[skip[r][qi]:]
                seen: set[int] = set()
                j = 0
                for e in ranked:
                    token = int(tokens[e])
                    w = token // T
                    if w in seen:
                        continue
                    seen.add(w)
                    ex_window[r, qi, si, j], ex_pos[r, qi, si, j], ex_act[r, qi, si, j] = w, token % T, values[e]
                    j += 1
                    if j == per_side:
                        break

    id_dtype = torch.int16 if model.config.vocab_size <= 32767 else torch.int32
    meta = {
        "format": FORMAT, "version": VERSION, "weights_hash": weights_hash(model),
        "config_hash": model_info(model, with_weights_hash=False)["config_hash"],
        "text": text, "n_tokens": N, "window": T, "locations": locations, "widths": widths,
        "quantile_levels": list(QUANTILE_LEVELS), "example_quantiles": list(QUANTILES), "per_side": per_side,
        "hist_bins": HIST_BINS, "fine_bins": {"per_octave": 32, "abs_range": [2.0 ** -14, 2.0 ** 10],
                                              "capacity": BIN_CAPACITY},
        "build_seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
    }
    return ExampleIndex(meta=meta, windows=windows.to(id_dtype), density=1 - fine[:, ZERO_BIN].double().div(N).float(),
                        minimum=lo, maximum=hi, hist=merge_to_hist(fine).int(),
                        quantiles=quantiles.float(), example_window=torch.from_numpy(ex_window),
                        example_position=torch.from_numpy(ex_pos), example_activation=torch.from_numpy(ex_act))


# ---- where an index lives ------------------------------------------------------------------


def cache_folder(model, cache_dir: str | Path | None = None) -> Path:
    """Where `model`'s index is cached: CACHE/example_index/<weights hash> (CACHE: `ablation.default_cache_dir`,
    where mean activations are cached)."""
    return Path(cache_dir or default_cache_dir()) / "example_index" / weights_hash(model)


def shipped_folder(model_folder: str | Path) -> Path:
    """Where a model folder ships its index (the embedded default model does)."""
    return Path(model_folder) / "example_index"


def find_example_index(model, model_folder: str | Path | None = None, cache_dir: str | Path | None = None
                       ) -> ExampleIndex | None:
    """The index of `model`'s weights shipped in `model_folder` or cached, or None. A shipped or cached
    index for other weights is skipped (never used); an unreadable cached one is removed so it is rebuilt."""
    for folder in ([shipped_folder(model_folder)] if model_folder else []) + [cache_folder(model, cache_dir)]:
        if not (folder / META_FILE).is_file():
            continue
        try:
            return ExampleIndex.load(folder, model)
        except ValueError:
            if folder == cache_folder(model, cache_dir):
                for name in (META_FILE, TENSOR_FILE):
                    (folder / name).unlink(missing_ok=True)
    return None


def cached_example_index(model, tokenizer, n_tokens: int = DEFAULT_TOKENS, model_folder: str | Path | None = None,
                         cache_dir: str | Path | None = None, **build_kwargs) -> ExampleIndex:
    """The shipped or cached index of `model`, else one built now and cached (reused across restarts)."""
    found = find_example_index(model, model_folder, cache_dir)
    if found is not None:
        return found
    index = build_example_index(model, tokenizer, n_tokens, **build_kwargs)
    index.save(cache_folder(model, cache_dir))
    return index


def folder_size(folder: str | Path) -> int:
    return sum(os.path.getsize(Path(folder) / name) for name in (META_FILE, TENSOR_FILE))


__all__ = [
    "DEFAULT_TOKENS",
    "HIST_BINS",
    "MAX_TOKENS",
    "MIN_TOKENS",
    "QUANTILE_LEVELS",
    "ExampleIndex",
    "build_example_index",
    "cache_folder",
    "cached_example_index",
    "check_token_count",
    "find_example_index",
    "folder_size",
    "heldout_token_ids",
    "heldout_windows",
    "shipped_folder",
]
