"""Circuit browser, prompt lab and ablation plots for weight-sparse transformers (a Gradio 6 app).

    python app.py                      # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT respected)

Runs unchanged as a Hugging Face Space (see hub_cards/space_card.md). The app is a thin layer: models load
through `modeling_csp.loading`, circuits are `modeling_csp.circuits.CircuitGraph`s (shipped in a model's
`circuits/` folder, imported from the original visualizer's `viz_data.pt`, or found here by
`modeling_csp.pruning.prune`), ablations use `modeling_csp.ablation`, and every figure comes from
`modeling_csp.plotting`. What lives here is the glue: caches shared by all sessions (models, mean
activations, task datasets, pretraining activations for live top/bottom examples), per-session runs, and the
event wiring.

k: a run's circuit has k nodes; a smaller k shows its k most important nodes (by ablation importance; for runs
pruned here, the top-k by pruning score, so any k up to the model's size), with losses computed live. A view
change answers in steps: the graph and the node panel's text first, then the node's figures, then the random
baseline and the layer deltas (which need ablations).

Environment:
    CSP_APP_MODEL      model shown first (default: "default", the embedded model)
    CSP_APP_IMPORT     os.pathsep-separated circuit files (.json) or viz_data.pt files to offer as runs
    CSP_APP_THREADS    torch CPU threads (default 2)
    CSP_APP_PRETRAIN_TOKENS  tokens of held-out text used for live activating examples (default 8192)

API: `/next_tokens` (gradio_client): prompt -> JSON with the top tokens and probabilities of the full model and
of the circuit alone (everything outside it mean-ablated).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import threading
import time
import traceback
import unicodedata
import urllib.parse
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(int(os.environ.get("CSP_APP_THREADS", "2")))

import gradio as gr  # noqa: E402

from modeling_csp import plotting  # noqa: E402
from modeling_csp.circuits import CircuitGraph, location_width, node_locations, parse_node_id  # noqa: E402
from modeling_csp.tasks import get_task, list_tasks, make_task_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parent
QUANTILES = (0.001, 0.01, 0.1, 0.5)
DEFAULT_PROMPT = 'def greet(name):\n    message = "Hello, world'
N_PRETRAIN_TOKENS = int(os.environ.get("CSP_APP_PRETRAIN_TOKENS", "8192"))
TOP_N = 10


class UserError(ValueError):
    """A problem with what the user asked for; shown as a message, never as a traceback."""


# =====================================================================================================
# Backend: models, runs and the computations behind every panel (no Gradio here)
# =====================================================================================================


@dataclass
class Run:
    """A circuit the app can show: shipped with the model, imported from a file, or pruned in the app."""

    id: str
    name: str
    source: str  # "shipped" | "imported" | "app"
    path: str | None = None
    circuit: CircuitGraph | None = None
    scores: dict[str, torch.Tensor] | None = None  # pruning scores (runs made in the app): any k possible
    task: str | None = None
    k: int | None = None

    def load(self, entry: "ModelEntry") -> CircuitGraph:
        if self.circuit is None:
            self.circuit = CircuitGraph.load(self.path)
        return self.circuit


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0] if text else type(exc).__name__


class ModelEntry:
    """A loaded model with everything computed from it that sessions share (all lazily, all cached)."""

    def __init__(self, spec: str):
        from modeling_csp.loading import load_model_and_tokenizer, resolve_model

        self.spec = spec
        try:
            self.folder = resolve_model(spec)
            self.model, self.tokenizer = load_model_and_tokenizer(spec)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        except Exception as exc:  # anything else while loading: still a message, not a traceback
            raise UserError(f"could not load model {spec!r}: {_first_line(exc)}") from None
        self.model.eval()
        self.config = self.model.config
        self.lock = threading.RLock()  # the model's hook list is shared: one forward pass at a time
        self._means = None
        self._means_lock = threading.Lock()
        self._pretrain = None
        self._pretrain_lock = threading.Lock()
        self._tasks: dict[str, Any] = {}
        self._task_acts: dict[tuple, dict[str, torch.Tensor]] = {}
        self._task_lock = threading.Lock()
        self.vocab = self._vocab_strings()
        self.training_curve = self._read_training_curve()
        self.runs: dict[str, Run] = OrderedDict()
        self._add_shipped_runs()
        for path in filter(None, os.environ.get("CSP_APP_IMPORT", "").split(os.pathsep)):
            try:
                run = import_run_file(self, path)
                self.runs[run.id] = run
            except UserError as exc:
                print(f"[app] could not import {path}: {exc}")

    # -- static data ---------------------------------------------------------------------------

    def _vocab_strings(self) -> list[str]:
        out = []
        for i in range(self.config.vocab_size):
            try:
                out.append(self.tokenizer.decode([i]))
            except Exception:
                out.append(f"<{i}>")
        return out

    def _read_training_curve(self):
        path = Path(self.folder) / "training_curve.json" if Path(self.folder).is_dir() else None
        if path is not None and path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                return None
        return None

    def _add_shipped_runs(self):
        from modeling_csp.cli import shipped_circuits

        try:
            entries = shipped_circuits(self.spec)
        except Exception as exc:
            print(f"[app] no shipped circuits for {self.spec}: {_first_line(exc)}")
            return
        for e in entries:
            stem = Path(e["path"]).stem
            run = Run(id=f"shipped:{stem}", name=f"shipped · {e.get('task')} · k={e.get('k')}", source="shipped",
                      path=e["path"], task=e.get("task"), k=e.get("k"))
            self.runs[run.id] = run

    def token_strs(self, ids) -> list[str]:
        return [self.vocab[i] if 0 <= i < len(self.vocab) else f"<{i}>" for i in (int(x) for x in ids)]

    @property
    def n_layer(self) -> int:
        return int(self.config.n_layer)

    @property
    def d_head(self) -> int:
        return int(self.config.d_head)

    # -- shared computations ---------------------------------------------------------------------

    def means(self) -> dict[str, torch.Tensor]:
        """Mean activations over held-out pretraining-like text (as pruning uses), cached on disk too."""
        with self._means_lock:
            if self._means is None:
                from modeling_csp.ablation import compute_mean_activations

                try:
                    with self.lock:
                        self._means = compute_mean_activations(self.model, self.tokenizer)
                except Exception as exc:
                    raise UserError(f"could not compute mean activations for mean ablation: {_first_line(exc)}") from None
            return self._means

    def task_data(self, task: str, n_examples: int = 512, seed: int = 0):
        key = (task, n_examples, seed)
        with self._task_lock:
            if key not in self._tasks:
                try:
                    self._tasks[key] = make_task_dataset(task, self.tokenizer, n=n_examples, seed=seed,
                                                         max_len=self.config.block_size)
                except ValueError as exc:
                    raise UserError(str(exc)) from None
                batch = self._tasks[key].test
                if int(batch.input_ids.max()) >= self.config.vocab_size:
                    raise UserError(f"task {task!r}: the tokenizer gives ids past the model's vocabulary "
                                    f"({self.config.vocab_size}); this tokenizer does not belong to this model")
            return self._tasks[key]

    def task_batch(self, task: str, circuit: CircuitGraph | None = None):
        """The held-out split the circuit's pruning evaluated on (same n_examples and data seed)."""
        options = (circuit.meta.get("options") if circuit is not None else None) or {}
        data = self.task_data(task, int(options.get("n_examples", 512)), int(options.get("data_seed", 0)))
        return data.test if len(data.test) else data.train

    def pretrain(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(windows (n, T) token ids, {location: float16 (n, T, width)}) on held-out text, for live examples."""
        with self._pretrain_lock:
            if self._pretrain is None:
                from modeling_csp.ablation import stdlib_heldout_texts, text_windows

                try:
                    block = min(self.config.block_size, 128)
                    texts = stdlib_heldout_texts()
                    texts = texts[:: max(1, len(texts) // 24)]  # ~24 files spread over the held-out split suffice
                    windows = text_windows(self.tokenizer, texts, N_PRETRAIN_TOKENS, block)
                    windows = windows.clamp(max=self.config.vocab_size - 1)
                except Exception as exc:
                    raise UserError(f"no pretraining text for live activating examples: {_first_line(exc)}") from None
                locs = node_locations(self.config)
                pattern = "|".join(re.escape(l) for l in locs)
                store: dict[str, list[torch.Tensor]] = {l: [] for l in locs}
                with self.lock, torch.no_grad():
                    for b in windows.split(32):
                        with self.model.record_activations(pattern) as acts:
                            self.model(b, use_cache=False, logits_to_keep=1)
                        for l in locs:
                            store[l].append(acts[l].to(torch.float16))
                self._pretrain = (windows, {l: torch.cat(v) for l, v in store.items()})
            return self._pretrain

    def task_activations(self, task: str, circuit: CircuitGraph | None = None):
        """(batch, {location: float16 (n, T, width)}): every node location recorded once per task (cached)."""
        batch = self.task_batch(task, circuit)
        key = (task, id(batch))
        with self._task_lock:
            cached = self._task_acts.get(key)
        if cached is not None:
            return batch, cached
        locs = node_locations(self.config)
        _, acts = self.run_forward(batch.input_ids, record="|".join(re.escape(l) for l in locs),
                                   attention_mask=batch.attention_mask)
        store = {l: acts[l].to(torch.float16) for l in locs}
        with self._task_lock:
            self._task_acts[key] = store
            while len(self._task_acts) > 2:
                self._task_acts.pop(next(iter(self._task_acts)))
        return batch, store

    def run_forward(self, ids: torch.Tensor, masks=None, means=None, record: str | None = None, attention_mask=None):
        """Logits (B, T, V) of the model (circuit-ablated with `masks`), and recorded activations."""
        from modeling_csp.ablation import ablate

        import contextlib

        with self.lock, torch.no_grad(), contextlib.ExitStack() as stack:
            if masks is not None:
                stack.enter_context(ablate(self.model, masks, means))
            acts = stack.enter_context(self.model.record_activations(record)) if record else {}
            logits = self.model(ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, acts


_MODELS: "OrderedDict[str, ModelEntry]" = OrderedDict()
_MODELS_LOCK = threading.Lock()
MAX_MODELS = 3


def default_model_spec() -> str:
    return os.environ.get("CSP_APP_MODEL", "default")


_LOADING: dict[str, threading.Lock] = {}


def get_model(spec: str | None) -> ModelEntry:
    """The loaded model for a spec ('default', a folder, a hub id), loading it once (concurrent callers wait)."""
    spec = (spec or "").strip() or default_model_spec()
    if any(unicodedata.category(ch)[0] == "C" for ch in spec):
        raise UserError("the model name contains control characters")
    with _MODELS_LOCK:
        if spec in _MODELS:
            _MODELS.move_to_end(spec)
            return _MODELS[spec]
        loading = _LOADING.setdefault(spec, threading.Lock())
    with loading:
        with _MODELS_LOCK:
            if spec in _MODELS:
                return _MODELS[spec]
        entry = ModelEntry(spec)
        with _MODELS_LOCK:
            _MODELS[spec] = entry
            while len(_MODELS) > MAX_MODELS:
                _MODELS.popitem(last=False)
        return entry


def import_run_file(entry: ModelEntry, path: str, name: str | None = None, unique: bool = False) -> Run:
    """A circuit file (.json) or a visualizer viz_data.pt as a run, checked against the model."""
    p = Path(path)
    label = name or p.name
    if p.suffix.lower() == ".json":
        try:
            circuit = CircuitGraph.load(p)
        except ValueError as exc:
            raise UserError(f"{label}: {exc}".replace(str(p), label)) from None
    else:
        from modeling_csp.viz_import import import_viz_data

        try:
            circuit = import_viz_data(p)
        except ValueError as exc:
            raise UserError(str(exc).replace(str(p), label)) from None
        except Exception as exc:
            raise UserError(f"{label} is not a viz_data.pt file ({_first_line(exc)})") from None
    try:
        circuit.check_model(entry.model, entry.spec)
    except ValueError as exc:
        raise UserError(f"{label}: {exc}") from None
    rid = f"imported:{re.sub(r'[^A-Za-z0-9_.-]+', '_', p.stem)}" + (f"-{uuid.uuid4().hex[:4]}" if unique else "")
    return Run(id=rid, name=f"imported · {label}", source="imported", circuit=circuit, task=circuit.task,
               k=circuit.k or circuit.n_nodes)


# ---- circuits at k ------------------------------------------------------------------------------


def _rank(circuit: CircuitGraph) -> list[str]:
    """Nodes, most important first (unknown importance last, then forward order)."""
    nodes = list(circuit.nodes)
    return sorted(nodes, key=lambda n: -(circuit.nodes[n] if circuit.nodes[n] is not None else -math.inf))


def circuit_at_k(entry: ModelEntry, run: Run, k: int | None) -> CircuitGraph:
    """The run's circuit with k nodes: the circuit itself at its own size; otherwise the top-k nodes by the
    run's pruning scores (runs made here) or by the nodes' ablation importance (edges kept between them)."""
    full = run.load(entry)
    n = full.n_nodes
    if k is None or (k >= n and run.scores is None) or k == n:
        return full
    k = max(1, int(k))
    if run.scores is not None:
        from modeling_csp.pruning import top_k_masks

        masks = top_k_masks(run.scores, k)
        sub = CircuitGraph.from_masks(entry.model, masks, {nn: v for nn, v in full.nodes.items()},
                                      model_name=entry.spec, task=full.task, ablation=full.ablation,
                                      target_loss=full.target_loss, k=k, meta=dict(full.meta))
        sub.node_data = full.node_data
        return sub
    keep = set(_rank(full)[:k])
    return CircuitGraph(
        model=full.model, nodes={nn: v for nn, v in full.nodes.items() if nn in keep},
        edges=[e for e in full.edges if e.source in keep and e.target in keep], task=full.task,
        ablation=full.ablation, target_loss=full.target_loss, k=k, node_data=full.node_data,
        task_docs=full.task_docs, meta={**full.meta, "sub_circuit_of": run.id},
    )


def _means_for(entry: ModelEntry, circuit: CircuitGraph):
    return entry.means() if circuit.ablation == "mean" else None


_STATS: "OrderedDict[tuple, dict]" = OrderedDict()


def _cache(store: OrderedDict, key, fn, limit: int = 256):
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = fn()
    store[key] = value
    while len(store) > limit:
        store.popitem(last=False)
    return value


_FULL_LOSS: "OrderedDict[tuple, float]" = OrderedDict()


def circuit_stats(entry: ModelEntry, run: Run, k: int, task: str | None, quick: bool = False) -> dict[str, Any]:
    """Full-model, circuit and random same-size task losses and layer deltas: the run's stored numbers at its
    own k, computed live otherwise. `quick` computes nothing new except the full model's loss (cached per
    task), so that changing k answers fast; the rest follows in a second event."""
    circuit = circuit_at_k(entry, run, k)
    own = circuit is run.circuit
    stored = circuit.losses if own else {}
    task = task or circuit.task
    key = (entry.spec, run.id, k, task)
    if key in _STATS:
        return _cache(_STATS, key, lambda: None)

    out = {"full": stored.get("full"), "circuit": stored.get("circuit"), "random": stored.get("random"),
           "layer_deltas": dict(circuit.layer_deltas) if own else {}, "live": False, "error": None,
           "n_nodes": circuit.n_nodes, "n_edges": circuit.n_edges, "complete": False}
    if task is None:
        out["complete"] = True
        return out
    try:
        from modeling_csp.ablation import evaluate
        from modeling_csp.pruning import random_masks_like

        batch = entry.task_batch(task, run.circuit)
        if out["full"] is None:  # cached per task: the lock (busy with another view's ablations) only when new
            full_key = (entry.spec, task, id(batch))
            if full_key not in _FULL_LOSS:
                with entry.lock:
                    _cache(_FULL_LOSS, full_key, lambda: evaluate(entry.model, batch)[0])
            out["full"], out["live"] = _FULL_LOSS[full_key], True
        if quick:
            out["pending"] = out["circuit"] is None or out["random"] is None
            return out
        means = _means_for(entry, circuit)
        masks = circuit.masks(entry.config)
        with entry.lock:
            if out["circuit"] is None:
                out["circuit"] = evaluate(entry.model, batch, masks, means)[0]
                out["live"] = True
            if out["random"] is None:
                gen = torch.Generator().manual_seed(0)
                out["random"] = sum(evaluate(entry.model, batch, random_masks_like(masks, gen), means)[0]
                                    for _ in range(3)) / 3
                out["live"] = True
            if not out["layer_deltas"]:
                for layer in range(entry.n_layer):
                    for part in ("attn", "mlp"):
                        name = f"{layer}.{part}"
                        m = {loc: (torch.zeros_like(v) if plotting.sublayer_of(loc) == name else v) for loc, v in masks.items()}
                        out["layer_deltas"][name] = evaluate(entry.model, batch, m, means)[0] - out["circuit"]
                out["live"] = True
    except UserError as exc:
        out["error"] = str(exc)
    except Exception as exc:
        out["error"] = f"could not evaluate the circuit on {task}: {_first_line(exc)}"
    out["complete"] = True
    return _cache(_STATS, key, lambda: out)


_CURVES: "OrderedDict[tuple, dict]" = OrderedDict()


def faithfulness_curve(entry: ModelEntry, run: Run, task: str | None) -> dict[str, Any]:
    """Task loss of the run's top-k circuits for log-spaced k, and of random circuits of the same sizes."""
    full = run.load(entry)
    task = task or full.task

    def compute():
        from modeling_csp.ablation import evaluate
        from modeling_csp.pruning import random_masks_like

        if task is None:
            raise UserError("this run names no task: choose a task to compute its faithfulness curve")
        n_max = sum(location_width(entry.config, l) for l in node_locations(entry.config)) if run.scores is not None else full.n_nodes
        ks = sorted({max(1, int(round(v))) for v in torch.logspace(0, math.log10(max(n_max, 1)), 10).tolist()} | {full.n_nodes})
        batch = entry.task_batch(task, full)
        pts, rnd = [], []
        gen = torch.Generator().manual_seed(0)
        for k in ks:
            c = circuit_at_k(entry, run, k)
            masks = c.masks(entry.config)
            means = _means_for(entry, c)
            with entry.lock:
                pts.append([k, evaluate(entry.model, batch, masks, means)[0]])
                rnd.append([k, evaluate(entry.model, batch, random_masks_like(masks, gen), means)[0]])
        return {"points": pts, "random": rnd}

    return _cache(_CURVES, (entry.spec, run.id, task), compute, limit=32)


# ---- node panel data ----------------------------------------------------------------------------


def live_quantile_examples(entry: ModelEntry, node: str, per_side: int = 2, before: int = 24, after: int = 6):
    """{frac: {"top": [...], "bottom": [...]}}: examples of held-out text whose activation of the node sits at
    the top (bottom) 0.1%, 1%, 10%, 50% quantile of all its activations, peak token marked."""
    loc, ch = parse_node_id(node)
    windows, store = entry.pretrain()
    acts = store[loc][:, :, ch].float()  # (n, T)
    n, T = acts.shape
    flat = acts.flatten()
    order = flat.argsort(descending=True)
    out = {}
    for frac in QUANTILES:
        entry_q = {}
        for side, ordered in (("top", order), ("bottom", order.flip(0))):
            start = min(int(frac * flat.numel()), flat.numel() - 1)
            picked, seen = [], set()
            for idx in ordered[start: start + 400].tolist():
                w, p = divmod(idx, T)
                if w in seen:
                    continue
                seen.add(w)
                lo, hi = max(0, p - before), min(T, p + after + 1)
                picked.append({"tokens": entry.token_strs(windows[w, lo:hi].tolist()),
                               "activations": acts[w, lo:hi].tolist(), "position": p - lo})
                if len(picked) >= per_side:
                    break
            entry_q[side] = picked
        out[frac] = entry_q
    return out


def stored_quantile_examples(entry: ModelEntry, data: dict) -> dict:
    """A circuit file's node_data top/bottom examples (token ids) with tokens decoded."""
    out: dict = {}
    for side in ("top", "bottom"):
        for frac, examples in (data.get(side) or {}).items():
            conv = []
            for ex in examples:
                toks = ex.get("tokens", []) if isinstance(ex, dict) else ex[0]
                acts = ex.get("activations", ex.get("acts", [])) if isinstance(ex, dict) else ex[1]
                pos = ex.get("position", ex.get("pos")) if isinstance(ex, dict) else ex[2]
                conv.append({"tokens": entry.token_strs(toks), "activations": acts, "position": pos})
            out.setdefault(float(frac), {})[side] = conv
    return out


def _task_classes(batch) -> tuple[list[int], list[int], tuple[str, str]]:
    """Split task examples into two classes: the correct candidate is the first (class 1) or the second of
    the sorted candidate pair; labels name the most common correct candidate of each class."""
    c1, c2, lab1, lab2 = [], [], Counter(), Counter()
    for i, ex in enumerate(batch.examples):
        first = min(ex.correct, ex.alternative)
        (c1 if ex.correct == first else c2).append(i)
        (lab1 if ex.correct == first else lab2)[ex.correct] += 1

    def label(counter, default):
        if not counter:
            return default
        tok, cnt = counter.most_common(1)[0]
        share = cnt / sum(counter.values())
        return f"correct «{plotting.display_token(tok)}»" + ("" if share > 0.99 else f" ({share:.0%})")

    return c1, c2, (label(lab1, "class 1"), label(lab2, "class 2"))


def task_activations(entry: ModelEntry, circuit: CircuitGraph, node: str, task: str | None):
    """(class-1 rows, class-2 rows, labels, example tokens) of a node's activations on the task's examples.

    A circuit file's stored task activations (first half of its task documents one class, second half the
    other) are used when present; otherwise the model runs on the task's held-out examples."""
    loc, ch = parse_node_id(node)
    stored = (circuit.node_data or {}).get(node, {}).get("task_activations") if circuit.node_data else None
    if stored is not None and circuit.task_docs:
        docs = circuit.task_docs
        rows = []
        for doc, acts in zip(docs, stored):
            n = len(doc)
            while n > 0 and doc[n - 1] == 0:  # zero-padded at the end
                n -= 1
            rows.append((list(acts[: max(n, 1)]), entry.token_strs(doc[: max(n, 1)])))
        half = len(rows) // 2
        return [r[0] for r in rows[:half]], [r[0] for r in rows[half:]], ("first half", "second half"), \
            (rows[0][1] if rows else [], rows[half][1] if half < len(rows) else [])
    if task is None:
        raise UserError("no task chosen and the circuit stores no task activations")
    batch, acts = entry.task_activations(task, circuit)
    x = acts[loc][:, :, ch].float()
    lengths = batch.attention_mask.sum(1).tolist()
    rows = [x[i, x.shape[1] - int(L):].tolist() for i, L in enumerate(lengths)]
    c1, c2, labels = _task_classes(batch)
    tok = lambda i: entry.token_strs(batch.input_ids[i, batch.input_ids.shape[1] - int(lengths[i]):].tolist())  # noqa: E731
    return [rows[i] for i in c1], [rows[i] for i in c2], labels, (tok(c1[0]) if c1 else [], tok(c2[0]) if c2 else [])


def attention_for_node(entry: ModelEntry, node: str, ids: list[int]):
    """(head's attention pattern with the sink column first, the channel's own q·k/sqrt(d) contribution,
    tokens) for a q or k node on a prompt."""
    loc, ch = parse_node_id(node)
    layer = int(loc.split(".")[0])
    d = entry.d_head
    head = ch // d
    _, acts = entry.run_forward(torch.tensor([ids]), record=rf"{layer}\.attn\.(q|k)")
    q = acts[f"{layer}.attn.q"][0, :, head * d:(head + 1) * d]
    k = acts[f"{layer}.attn.k"][0, :, head * d:(head + 1) * d]
    T = q.shape[0]
    scores = q @ k.T / math.sqrt(d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    sink = getattr(entry.model.transformer.h[layer].attn, "attn_imp", None)
    if sink is not None:
        s = sink.sink_logit.detach()[head].expand(T, 1)
        pattern = torch.softmax(torch.cat([s, scores], dim=1), dim=1)
    else:
        pattern = torch.softmax(scores, dim=1)
    c = ch % d
    contrib = torch.outer(q[:, c], k[:, c]) / math.sqrt(d)
    contrib = contrib.masked_fill(~causal, float("nan"))
    return pattern.tolist(), contrib.tolist(), entry.token_strs(ids), sink is not None, head


# ---- prompt lab ---------------------------------------------------------------------------------


def clean_prompt(prompt: str | None) -> tuple[str, list[str]]:
    """Drops control characters other than newline and tab; (text, notices)."""
    notices = []
    text = prompt or ""
    cleaned = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    if cleaned != text:
        notices.append(f"removed {len(text) - len(cleaned)} control character(s) from the prompt")
    if not cleaned.strip():
        raise UserError("the prompt is empty: type some Python code")
    return cleaned, notices


def encode_prompt(entry: ModelEntry, prompt: str | None) -> tuple[list[int], list[str]]:
    text, notices = clean_prompt(prompt)
    ids = list(entry.tokenizer.encode(text, add_special_tokens=False))
    block = int(entry.config.block_size)
    if len(ids) > block:
        notices.append(f"the prompt has {len(ids)} tokens, more than the model's context of {block}: "
                       f"kept the last {block}")
        ids = ids[-block:]
    bad = [i for i in ids if i >= entry.config.vocab_size]
    if bad:
        raise UserError(f"the tokenizer gives token id {bad[0]}, past the model's vocabulary of "
                        f"{entry.config.vocab_size}: this tokenizer does not belong to this model")
    return ids, notices


def candidate_id(entry: ModelEntry, text: str | None, ids: list[int]) -> tuple[int | None, str | None]:
    """A candidate next token typed by the user: its id in context (first token if it splits)."""
    if not text:
        return None, None
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    ctx = entry.tokenizer.decode(ids)
    full = entry.tokenizer.encode(ctx + text, add_special_tokens=False)
    extra = full[len(ids):] if full[: len(ids)] == ids else entry.tokenizer.encode(text, add_special_tokens=False)
    if not extra:
        return None, f"{text!r} gives no token"
    note = None if len(extra) == 1 else f"{text!r} is {len(extra)} tokens here; using its first, {entry.vocab[extra[0]]!r}"
    if extra[0] >= entry.config.vocab_size:
        return None, f"{text!r} maps to a token id outside the model's vocabulary"
    return int(extra[0]), note


def top_tokens(entry: ModelEntry, logits: torch.Tensor, n: int = TOP_N) -> list[dict[str, Any]]:
    probs = torch.softmax(logits.float(), dim=-1)
    p, idx = probs.topk(n)
    return [{"token": entry.vocab[i], "id": int(i), "prob": round(float(v), 6)} for v, i in zip(p.tolist(), idx.tolist())]


def next_tokens_data(entry: ModelEntry, prompt: str, circuit: CircuitGraph | None, record_node: str | None = None,
                     candidates: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
    """Everything the prompt lab shows: tokens, top-10 of the full model and of the circuit alone, logit
    differences between two candidates, the selected node's per-token activations."""
    ids, notices = encode_prompt(entry, prompt)
    x = torch.tensor([ids])
    record = re.escape(parse_node_id(record_node)[0]) if record_node else None
    logits, acts = entry.run_forward(x, record=record)
    out: dict[str, Any] = {"tokens": entry.token_strs(ids), "ids": ids, "notices": notices,
                           "full": top_tokens(entry, logits[0, -1]), "circuit": None, "circuit_k": None}
    circuit_logits = None
    if circuit is not None and circuit.n_nodes:
        try:
            masks = circuit.masks(entry.config)
            circuit_logits, _ = entry.run_forward(x, masks, _means_for(entry, circuit))
            out["circuit"] = top_tokens(entry, circuit_logits[0, -1])
            out["circuit_k"] = circuit.n_nodes
        except UserError as exc:
            notices.append(str(exc))
        except ValueError as exc:
            notices.append(f"circuit not applied: {exc}")
    if record_node:
        loc, ch = parse_node_id(record_node)
        out["node"] = record_node
        out["node_acts"] = acts[loc][0, :, ch].tolist()
    a, b = candidates
    ia, na = candidate_id(entry, a, ids)
    ib, nb = candidate_id(entry, b, ids)
    notices += [n for n in (na, nb) if n]
    if ia is not None and ib is not None:
        out["logit_diff"] = {"a": entry.vocab[ia], "b": entry.vocab[ib],
                             "full": float(logits[0, -1, ia] - logits[0, -1, ib]),
                             "circuit": float(circuit_logits[0, -1, ia] - circuit_logits[0, -1, ib]) if circuit_logits is not None else None}
    return out


# ---- ablations ----------------------------------------------------------------------------------


def _logit_diff(logits: torch.Tensor, batch) -> float:
    idx = torch.arange(len(batch))
    return float((logits[idx, batch.correct_ids] - logits[idx, batch.alternative_ids]).mean())


def ablation_effects(entry: ModelEntry, circuit: CircuitGraph | None, task: str, layers: list[str],
                     nodes: list[str], mode: str, base: str) -> list[dict[str, Any]]:
    """Change in task loss and logit difference when each chosen layer / node (and all of them together) is
    ablated, relative to the full model or to the circuit."""
    from modeling_csp.ablation import ablate, all_kept, task_logits
    from modeling_csp.tasks import task_loss

    if not layers and not nodes:
        raise UserError("choose at least one layer or node to ablate")
    if base == "circuit" and circuit is None:
        raise UserError("no circuit selected: ablate from the full model, or choose a run")
    batch = entry.task_batch(task, circuit)
    means = entry.means() if mode == "mean" else None
    start = circuit.masks(entry.config) if base == "circuit" else all_kept(entry.config)

    def masked(remove_layers, remove_nodes):
        m = {loc: v.clone() for loc, v in start.items()}
        for loc in m:
            if plotting.sublayer_of(loc) in remove_layers:
                m[loc][:] = False
        for n in remove_nodes:
            loc, i = parse_node_id(n)
            if loc not in m or i >= m[loc].numel():
                raise UserError(f"node {n} does not exist in this model")
            m[loc][i] = False
        return m

    def measure(masks):
        with entry.lock, torch.no_grad():
            with ablate(entry.model, masks, means):
                logits = task_logits(entry.model, batch)
        return float(task_loss(logits, batch)), _logit_diff(logits, batch)

    base_loss, base_ld = measure(start) if base == "circuit" else _full_measure(entry, batch)
    conditions = [(f"{l}", [l], []) for l in layers] + [(n, [], [n]) for n in nodes]
    if len(conditions) > 1:
        conditions.append(("all chosen", list(layers), list(nodes)))
    rows = []
    for label, ls, ns in conditions:
        loss, ld = measure(masked(ls, ns))
        rows.append({"label": label, "d_loss": loss - base_loss, "d_logit_diff": ld - base_ld, "loss": loss,
                     "logit_diff": ld})
    return [{"label": f"baseline ({base})", "d_loss": 0.0, "d_logit_diff": 0.0, "loss": base_loss, "logit_diff": base_ld,
             "baseline": True}] + rows


def _full_measure(entry: ModelEntry, batch) -> tuple[float, float]:
    from modeling_csp.ablation import task_logits
    from modeling_csp.tasks import task_loss

    with entry.lock, torch.no_grad():
        logits = task_logits(entry.model, batch)
    return float(task_loss(logits, batch)), _logit_diff(logits, batch)


MAX_EXACT_IMPORTANCES = 128


def live_importances(entry: ModelEntry, circuit: CircuitGraph, task: str) -> tuple[dict[str, float], str]:
    """Every circuit node's importance on the task, now: exact (one forward pass per node) for circuits of up
    to 128 nodes, first-order attribution (one backward pass) beyond. Returns (importances, method)."""
    import inspect

    from modeling_csp.ablation import node_importances

    batch = entry.task_batch(task, circuit)
    method = "exact" if circuit.n_nodes <= MAX_EXACT_IMPORTANCES else "attribution"
    kwargs = {"method": method} if "method" in inspect.signature(node_importances).parameters else {}
    with entry.lock:
        imps = node_importances(entry.model, batch, circuit.masks(entry.config), _means_for(entry, circuit), **kwargs)
    return imps, kwargs.get("method", "exact")


# =====================================================================================================
# The Gradio layer
# =====================================================================================================


CSS = """
#status {min-height: 1.5em;}
#prune-md {min-height: 70px;}
#status p {margin: 0;}
.csp-summary table {font-size: 13px;}
#node-click {display: none !important;}
#share-query {display: none !important;}
footer {display: none !important;}
"""

# Plotly clicks on a node (any figure inside #circuit-graph or #circuit-overview) are written to the hidden
# #node-click textbox as "<node id>|<time>", whose input event selects the node.
CLICK_JS = """
() => {
  const hookAll = () => {
    document.querySelectorAll('#circuit-graph .js-plotly-plot, #circuit-overview .js-plotly-plot, #importance-plot .js-plotly-plot').forEach((div) => {
      if (div.__cspHooked || typeof div.on !== 'function') return;
      div.__cspHooked = true;
      const source = div.closest('#circuit-graph') ? 'graph' : 'other';
      div.on('plotly_click', (ev) => {
        const p = ev && ev.points && ev.points[0];
        if (!p || p.customdata === undefined) return;
        const id = Array.isArray(p.customdata) ? p.customdata[0] : p.customdata;
        if (typeof id !== 'string' || id.indexOf(':') < 0) return;
        const box = document.querySelector('#node-click textarea, #node-click input');
        if (!box) return;
        if (source === 'graph' && window.Plotly) {  // move the selection ring now; the server skips the graph
          const i = div.data.findIndex((t) => t.name === 'selected');
          const ring = {x: [[p.x]], y: [[p.y]], customdata: [[[id]]]};
          if (i >= 0) { window.Plotly.restyle(div, ring, [i]); }
          else { window.Plotly.addTraces(div, {x: [p.x], y: [p.y], customdata: [[id]], name: 'selected', mode: 'markers',
                 hoverinfo: 'skip', showlegend: false,
                 marker: {size: 28, color: 'rgba(0,0,0,0)', line: {width: 3, color: '#111'}}}); }
        }
        box.value = id + '|' + source + '|' + Date.now();
        box.dispatchEvent(new Event('input', {bubbles: true}));
      });
    });
  };
  // Gradio replaces a plot's div when its figure changes: hook new ones as soon as Plotly has drawn them.
  let queued = false;
  new MutationObserver(() => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; hookAll(); });
  }).observe(document.body, {childList: true, subtree: true});
  setInterval(hookAll, 1000);
  hookAll();
  window.__cspClickReady = true;
}
"""

# The link to the current view. (The address bar is left alone: Plotly draws colour bars with gradients that
# reference the page's URL, and rewriting it with history.replaceState blanks them.)
SHARE_JS = """
(q) => q ? (window.location.origin + window.location.pathname + '?' + q) : ''
"""


def _runs_for(entry: ModelEntry, session: dict, task: str | None) -> list[Run]:
    runs = list(entry.runs.values()) + [r for r in session.get("runs", {}).values() if r.id.startswith("app:") or r.id.startswith("imported:")]
    runs = [r for r in runs if session.get("model_of", {}).get(r.id, entry.spec) == entry.spec]
    matching = [r for r in runs if r.task == task]
    untasked = [r for r in runs if r.task is None]
    return matching + untasked


def _find_run(entry: ModelEntry, session: dict, run_id: str | None) -> Run | None:
    if not run_id:
        return None
    return entry.runs.get(run_id) or session.get("runs", {}).get(run_id)


def _fmt(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}g}"


def _summary_md(entry: ModelEntry, run: Run | None, circuit: CircuitGraph | None, stats: dict | None, task: str | None) -> str:
    lines = [f"**Model** `{entry.spec}` · {entry.n_layer} layers · d_model {entry.config.d_model} · "
             f"{entry.config.n_head}×{entry.d_head} heads · d_mlp {entry.config.d_mlp} · vocab {entry.config.vocab_size}"]
    if task:
        try:
            lines.append(f"**Task** `{task}`: {get_task(task).description}")
        except ValueError:
            lines.append(f"**Task** `{task}`")
    if run is None or circuit is None:
        lines.append("**No circuit** for this task yet: run pruning in the *Ablations & pruning* tab, or import a "
                     "circuit file in *Share & files*.")
        return "\n\n".join(lines)
    total = sum(location_width(entry.config, l) for l in node_locations(entry.config))
    s = stats or {}
    pending = "…" if s.get("pending") else "n/a"
    val = lambda key: _fmt(s.get(key)) if s.get(key) is not None else pending  # noqa: E731
    row = (f"| full model loss | circuit loss | random same-size | nodes | edges | target |\n|---|---|---|---|---|---|\n"
           f"| {val('full')} | {val('circuit')} | {val('random')} | "
           f"{circuit.n_nodes} of {total} | {circuit.n_edges} | {_fmt(circuit.target_loss)} |")
    lines.append(f"**Run** {run.name} · ablation: {circuit.ablation}" + (" · losses computed live" if s.get("live") else ""))
    lines.append(row)
    if s.get("error"):
        lines.append(f"⚠️ {s['error']}")
    if s.get("random") is not None and s.get("circuit") is not None and s["random"] <= s["circuit"] + 0.02:
        lines.append("⚠️ random circuits of the same size do as well: this circuit says little about which nodes matter.")
    return "\n\n".join(lines)


def _layer_choices(circuit: CircuitGraph | None, entry: ModelEntry, deltas: dict | None):
    if circuit is None:
        return []
    rows = plotting.layer_summary(circuit, entry.n_layer)
    out = []
    for r in rows:
        d = (deltas or {}).get(r["layer"], r["delta"])
        out.append((f"{r['layer']} · Δ {_fmt(d, 3)} · {r['n_nodes']} nodes", r["layer"]))
    return out


def _node_choices(circuit: CircuitGraph | None, layer: str | None, d_head: int):
    if circuit is None or not layer:
        return []
    return [(f"{plotting.node_label(n, d_head)} · {n} · {_fmt(circuit.nodes[n], 3)}", n)
            for n in plotting.layer_node_ids(circuit, layer)]


def _best_layer(circuit: CircuitGraph, entry: ModelEntry, deltas: dict | None) -> str | None:
    tmp = CircuitGraph(model=circuit.model, nodes=circuit.nodes, edges=[], layer_deltas=deltas or circuit.layer_deltas)
    return plotting.most_important_layer(tmp, entry.n_layer)


def _best_node(circuit: CircuitGraph, layer: str | None) -> str | None:
    nodes = plotting.layer_node_ids(circuit, layer) if layer else []
    if not nodes:
        return None
    return max(nodes, key=lambda n: circuit.nodes[n] if circuit.nodes[n] is not None else -math.inf)


def _query(model, task, run, k, layer, node) -> str:
    params = {"model": model, "task": task, "run": run, "k": k, "layer": layer, "node": node}
    return urllib.parse.urlencode({key: v for key, v in params.items() if v not in (None, "")})


def _write_download(circuit: CircuitGraph | None, run: Run | None) -> str | None:
    if circuit is None:
        return None
    folder = Path(tempfile.gettempdir()) / "csp_app_downloads"
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{circuit.task or 'circuit'}_k{circuit.n_nodes}_{(run.id if run else 'x')}")[:120]
    path = folder / f"{name}.json"
    circuit.save(path)
    return str(path)


def build_app() -> gr.Blocks:
    task_names = [t.name for t in list_tasks()]

    with gr.Blocks(title="Circuit browser · weight-sparse transformers") as demo:
        session = gr.State({})
        active_tab = gr.State("browser")
        gr.Markdown("## Circuits in weight-sparse transformers\nBrowse the circuits of OpenAI-style weight-sparse "
                    "models (Gao et al. 2025): pick a model, a task, a pruning run and its size k.")
        with gr.Row(equal_height=True):
            model_in = gr.Dropdown(choices=[default_model_spec()], value=None, label="Model", allow_custom_value=True,
                                   info="'default', a converted folder, or a hub id", elem_id="model-select", scale=2)
            task_in = gr.Dropdown(choices=task_names, value=None, label="Task", elem_id="task-select", scale=2)
            run_in = gr.Dropdown(choices=[], value=None, label="Pruning run", elem_id="run-select", scale=3)
            k_in = gr.Slider(1, 2, value=1, step=1, label="k (nodes kept)", elem_id="k-slider", scale=2)
        status = gr.Markdown("", elem_id="status")
        summary = gr.Markdown("Loading…", elem_id="summary", elem_classes=["csp-summary"])

        with gr.Tabs():
            with gr.Tab("Circuit browser", id="browser") as browser_tab:
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        layer_in = gr.Radio(choices=[], value=None, label="Layer (ablation Δ · nodes)", elem_id="layer-select")
                        layer_bars = gr.Plot(label="Layer ablation deltas", elem_id="layer-bars", show_label=False)
                    with gr.Column(scale=3):
                        graph = gr.Plot(label="Layer graph", elem_id="circuit-graph", show_label=False)
                        node_in = gr.Dropdown(choices=[], value=None, label="Selected node (or click one in the graph)",
                                              elem_id="node-select")
                with gr.Group(elem_id="node-panel"):
                    node_header = gr.Markdown("", elem_id="node-header")
                    zero_centered = gr.Checkbox(value=True, label="zero-centred colours", elem_id="zero-centered")
                    with gr.Row():
                        connections = gr.HTML("", label="Connections (in / out)", elem_id="connections")
                    examples = gr.HTML("", elem_id="node-examples", label="Activating examples")
                    task_acts = gr.Plot(label="Activations on the task's examples", elem_id="task-acts", show_label=False)
                    with gr.Row(visible=False) as attn_row:
                        attn_plot = gr.Plot(label="Head attention pattern", elem_id="attn-pattern", show_label=False)
                        qk_plot = gr.Plot(label="Channel q·k contribution", elem_id="qk-contrib", show_label=False)
            with gr.Tab("Whole circuit", id="overview") as overview_tab:
                overview = gr.Plot(elem_id="circuit-overview", show_label=False)
            with gr.Tab("Curves", id="curves") as curves_tab:
                faith_plot = gr.Plot(elem_id="faith-plot", show_label=False)
                prune_plot = gr.Plot(elem_id="prune-plot", show_label=False)
                train_plot = gr.Plot(elem_id="train-plot", show_label=False)
            with gr.Tab("Embeddings", id="embeddings") as emb_tab:
                channel_in = gr.Slider(0, 1, value=0, step=1, label="Residual channel", elem_id="channel-slider")
                emb_tokens = gr.Plot(show_label=False, elem_id="emb-tokens")
                with gr.Row():
                    emb_hist = gr.Plot(show_label=False, elem_id="emb-hist")
                    pos_plot = gr.Plot(show_label=False, elem_id="pos-emb")
            with gr.Tab("Prompt lab", id="prompt") as prompt_tab:
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt_in = gr.Code(value=DEFAULT_PROMPT, language="python", label="Prompt (Python code)",
                                            elem_id="prompt-input", interactive=True)
                        with gr.Row():
                            cand_a = gr.Textbox(value='"', label="candidate A", elem_id="cand-a")
                            cand_b = gr.Textbox(value="'", label="candidate B", elem_id="cand-b")
                        prompt_btn = gr.Button("Predict next token", variant="primary", elem_id="prompt-run")
                    with gr.Column(scale=3):
                        prompt_notice = gr.Markdown("", elem_id="prompt-notice")
                        prompt_tokens = gr.HTML("", elem_id="prompt-tokens", label="Tokens")
                        logit_diff = gr.Markdown("", elem_id="logit-diff")
                next_plot = gr.Plot(plotting.message_figure("Press Predict next token.", 160), elem_id="next-plot", show_label=False)
                prompt_node_acts = gr.HTML("", elem_id="prompt-node-acts")
                with gr.Accordion("/next_tokens output (JSON)", open=False):
                    prompt_json = gr.JSON(label="/next_tokens output", elem_id="prompt-json")
            with gr.Tab("Ablations & pruning", id="ablations") as ablations_tab:
                with gr.Row():
                    abl_layers = gr.CheckboxGroup(choices=[], label="Ablate layers", elem_id="abl-layers")
                    abl_nodes = gr.Dropdown(choices=[], value=[], multiselect=True, allow_custom_value=True,
                                            label="Ablate nodes (any 'location:index')", elem_id="abl-nodes")
                with gr.Row():
                    abl_mode = gr.Radio(["mean", "zero"], value="mean", label="Ablation", elem_id="abl-mode")
                    abl_base = gr.Radio(["full model", "circuit"], value="full model", label="Ablate from",
                                        elem_id="abl-base")
                    abl_btn = gr.Button("Ablate", variant="primary", elem_id="abl-run")
                abl_plot = gr.Plot(plotting.message_figure("Choose layers or nodes and press Ablate.", 160), elem_id="ablation-plot", show_label=False)
                abl_table = gr.Markdown("", elem_id="ablation-table")
                imp_btn = gr.Button("Compute every circuit node's importance (live)", elem_id="imp-run")
                imp_plot = gr.Plot(plotting.message_figure("Press the button to ablate every circuit node in turn.", 160), elem_id="importance-plot", show_label=False)
                with gr.Row():
                    cmp_in = gr.Dropdown(choices=[], value=None, label="Compare with run", elem_id="compare-select")
                    cmp_btn = gr.Button("Compare", elem_id="compare-run")
                cmp_plot = gr.Plot(plotting.message_figure("Choose a run to compare with.", 160), elem_id="compare-plot", show_label=False)
                cmp_md = gr.Markdown("", elem_id="compare-md")
                gr.Markdown("### Run pruning\nLearns node masks for the task, then bisects for the smallest circuit "
                            "reaching the target loss. The result becomes a run of this session.")
                with gr.Row():
                    pr_task = gr.Dropdown(choices=task_names, value=None, label="Task", elem_id="prune-task")
                    pr_target = gr.Number(value=0.15, label="Target loss (nats)", minimum=0.0, elem_id="prune-target")
                    pr_steps = gr.Slider(10, 1000, value=200, step=10, label="Mask training steps", elem_id="prune-steps")
                    pr_btn = gr.Button("Run pruning", variant="primary", elem_id="prune-run")
                pr_md = gr.Markdown("", elem_id="prune-md")
            with gr.Tab("Share & files", id="share") as share_tab:
                share_link = gr.Textbox(label="Link to this view", elem_id="share-link", buttons=["copy"], interactive=False)
                download = gr.DownloadButton("Download circuit (csp-circuit JSON)", value=None, elem_id="download")
                upload = gr.File(label="Import a circuit file (.json) or the original visualizer's viz_data.pt",
                                 file_types=[".json", ".pt"], elem_id="upload")

        # hidden plumbing: Plotly clicks arrive in node_click (see CLICK_JS); share_query holds the view's query
        node_click = gr.Textbox(visible="hidden", elem_id="node-click", label="clicked node")
        share_query = gr.Textbox(visible="hidden", elem_id="share-query", label="query")

        # ------------------------------------------------------------------------------------------
        # outputs of the view pipeline

        view_outputs = [model_in, task_in, run_in, k_in, summary, layer_in, layer_bars, overview, node_in, graph,
                        abl_layers, abl_nodes, cmp_in, pr_task, share_query, download, status, channel_in,
                        node_header, connections, examples, faith_plot, prune_plot, train_plot]
        node_outputs = [node_in, graph, node_header, connections, examples, share_query, status, overview, channel_in]

        def message(exc: BaseException) -> str:
            return f"⚠️ {exc}"

        def safe(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except UserError as exc:
                    gr.Warning(str(exc))
                    return {status: message(exc)}
                except Exception as exc:  # never a traceback in the UI
                    traceback.print_exc()
                    gr.Warning(f"{type(exc).__name__}: {_first_line(exc)}")
                    return {status: f"⚠️ unexpected error: {type(exc).__name__}: {_first_line(exc)}"}

            return wrapper

        def node_panel(entry: ModelEntry, circuit: CircuitGraph | None, node: str | None, task: str | None,
                       zc: bool, prompt: str | None) -> dict:
            """The node panel's header, connections and activating examples (the figures follow in
            `node_extras`, a second event, so that the graph and the panel's text show first)."""
            out = {node_header: "", connections: "", examples: ""}
            if circuit is None or not node or node not in circuit.nodes:
                out[node_header] = "*Select a node in the graph or the list above.*"
                return out
            loc, ch = parse_node_id(node)
            label = plotting.node_label(node, entry.d_head)
            imp = circuit.nodes[node]
            notes = []
            out[node_header] = (f"### `{node}` · {label}\n{plotting._node_detail(node, entry.d_head)} · "
                                f"ablation importance **{_fmt(imp)}** (task-loss increase when it alone is ablated)")
            out[connections] = plotting.connections_html(plotting.connections_table(circuit, node, entry.d_head))
            data = (circuit.node_data or {}).get(node)
            try:
                if data and (data.get("top") or data.get("bottom")):
                    samples, src = stored_quantile_examples(entry, data), "stored with the circuit"
                else:
                    samples, src = live_quantile_examples(entry, node), f"live, on {N_PRETRAIN_TOKENS} tokens of held-out text"
                out[examples] = plotting.quantile_examples_html(samples, zc, title=f"Top / bottom activating examples ({src})")
            except UserError as exc:
                out[examples] = f"<p>⚠️ {exc}</p>"
            return out

        def node_extras(entry: ModelEntry, circuit: CircuitGraph | None, node: str | None, task: str | None,
                        zc: bool, prompt: str | None) -> dict:
            """The node panel's figures: activations on the task's examples, and for q/k channels the head's
            attention pattern and the channel's q·k contribution."""
            out = {attn_row: gr.Row(visible=False)}
            if circuit is None or not node or node not in circuit.nodes:
                out[task_acts] = plotting.message_figure("No node selected.", 200)
                return out
            loc, ch = parse_node_id(node)
            label = plotting.node_label(node, entry.d_head)
            notes = []
            try:
                c1, c2, labels, _ = task_activations(entry, circuit, node, task)
                out[task_acts] = plotting.task_activations_figure(c1, c2, labels, zc,
                                                                  title=f"{node} on the task's examples")
            except UserError as exc:
                out[task_acts] = plotting.message_figure(str(exc))
            kind = loc.split(".")[-1]
            if kind in ("q", "k"):
                try:
                    ids = None
                    if prompt and prompt.strip():
                        try:
                            ids, _ = encode_prompt(entry, prompt)
                        except UserError:
                            ids = None
                    if ids is None and task:
                        batch = entry.task_batch(task, circuit)
                        L = int(batch.attention_mask[0].sum())
                        ids = batch.input_ids[0, batch.input_ids.shape[1] - L:].tolist()
                    if ids:
                        pattern, contrib, toks, has_sink, head = attention_for_node(entry, node, ids)
                        out[attn_row] = gr.Row(visible=True)
                        out[attn_plot] = plotting.attention_pattern_figure(pattern, toks, f"{loc.split('.')[0]}.attn head {head}: attention pattern", sink=has_sink)
                        out[qk_plot] = plotting.attention_pattern_figure(contrib, toks, f"{label}: its own q·k/√d contribution", zero_centered=True)
                except UserError as exc:
                    notes.append(str(exc))
            if notes:
                out[status] = "\n".join(f"⚠️ {n}" for n in notes)
            return out

        def resolve_view(session_state: dict, model, task, run_id, k, layer, node, zc, prompt, *, reset_from: str,
                         tab: str = "browser", send: str = "all"):
            """Computes the whole view; `reset_from` says which selector changed, so that the selections
            after it fall back to their defaults (most important layer, most important node)."""
            t0 = time.perf_counter()
            session_state = session_state if isinstance(session_state, dict) else {}
            session_state.setdefault("runs", {})
            entry = get_model(model)
            order = ["model", "task", "run", "k", "layer", "node"]
            reset = order[order.index(reset_from) + 1:] if reset_from in order else []
            all_runs = list(entry.runs.values()) + [r for r in session_state["runs"].values()
                                                     if session_state.get("model_of", {}).get(r.id) == entry.spec]
            if "task" in reset or not task:
                # first task that has a run, else the first task
                tasked = [r.task for r in all_runs if r.task in task_names]
                task = tasked[0] if tasked else (task if task in task_names else task_names[0])
            if task not in task_names:
                raise UserError(f"unknown task {task!r}")
            runs = _runs_for(entry, session_state, task)
            run = _find_run(entry, session_state, run_id) if "run" not in reset else None
            if run is None or run not in runs:
                run = runs[0] if runs else None
            circuit = stats = None
            k_update = gr.Slider(minimum=1, maximum=2, value=1, interactive=False)
            if run is not None:
                full = run.load(entry)
                n_max = full.n_nodes if run.scores is None else sum(location_width(entry.config, l) for l in node_locations(entry.config))
                if "k" in reset or k is None:
                    k = full.n_nodes
                k = int(min(max(1, int(k)), max(n_max, 1)))
                circuit = circuit_at_k(entry, run, k)
                stats = circuit_stats(entry, run, k, task, quick=True)
                k_update = gr.Slider(minimum=1, maximum=max(n_max, 2), value=k, step=1, interactive=True)
            deltas = (stats or {}).get("layer_deltas") or (circuit.layer_deltas if circuit else {})
            layer_names = plotting.layer_names(entry.n_layer)
            if circuit is not None and ("layer" in reset or layer not in layer_names):
                layer = _best_layer(circuit, entry, deltas)
            if circuit is not None and ("node" in reset or node not in circuit.nodes or plotting.sublayer_of(node) != layer):
                if node in (circuit.nodes if circuit else {}) and "node" not in reset:
                    layer = plotting.sublayer_of(node)
                else:
                    node = _best_node(circuit, layer)
            # Send only what changed, and figures of hidden tabs only when they are shown (the browser re-renders
            # every figure it receives); compute only what is sent.
            skip = set()
            if send in ("k", "layer"):
                skip |= {model_in, task_in, run_in, abl_layers, cmp_in, pr_task, prune_plot, train_plot, faith_plot}
            if send == "k":  # the layer list and bars follow in refresh_stats (with the new deltas)
                skip |= {layer_in, layer_bars}
            if send == "layer":
                skip |= {k_in, summary, layer_in, layer_bars}
            if tab != "ablations":
                skip.add(abl_nodes)
            if tab != "share":
                skip.add(download)
            if tab != "overview":
                skip.add(overview)
            parts = {
                session: lambda: session_state,
                model_in: lambda: gr.Dropdown(choices=list(dict.fromkeys([entry.spec, default_model_spec()] + list(_MODELS))),
                                              value=entry.spec),
                task_in: lambda: gr.Dropdown(value=task),
                run_in: lambda: gr.Dropdown(choices=[(r.name, r.id) for r in runs], value=run.id if run else None),
                k_in: lambda: k_update,
                summary: lambda: _summary_md(entry, run, circuit, stats, task),
                layer_in: lambda: gr.Radio(choices=_layer_choices(circuit, entry, deltas), value=layer if circuit else None),
                node_in: lambda: gr.Dropdown(choices=_node_choices(circuit, layer, entry.d_head), value=node),
                abl_layers: lambda: gr.CheckboxGroup(choices=layer_names, value=[]),
                abl_nodes: lambda: gr.Dropdown(choices=list(circuit.nodes) if circuit else [], value=[]),
                cmp_in: lambda: gr.Dropdown(choices=[(r.name, r.id) for r in all_runs if run is None or r.id != run.id],
                                            value=None),
                pr_task: lambda: gr.Dropdown(value=task),
                share_query: lambda: _query(entry.spec, task, run.id if run else None, k if run else None, layer, node),
                download: lambda: gr.DownloadButton(value=_write_download(circuit, run)),
                status: lambda: "",
                channel_in: lambda: gr.Slider(minimum=0, maximum=int(entry.config.d_model) - 1, step=1),
                prune_plot: lambda: plotting.pruning_curve_figure(circuit.pruning_curve if circuit else []),
                train_plot: lambda: plotting.training_curve_figure(entry.training_curve),
                faith_plot: lambda: plotting.message_figure(
                    "No run selected." if circuit is None else "Computing… (switch to this tab to refresh)"),
            }
            if circuit is None:
                empty = plotting.message_figure("No circuit for this task yet.")
                parts.update({layer_bars: lambda: empty, graph: lambda: empty, overview: lambda: empty})
            else:
                def bars():
                    rows = plotting.layer_summary(circuit, entry.n_layer)
                    for r in rows:
                        r["delta"] = deltas.get(r["layer"], r["delta"])
                    return plotting.layer_bars_figure(rows, layer)

                parts[layer_bars] = bars
                parts[graph] = lambda: plotting.layer_graph_figure(circuit, layer, node)
                parts[overview] = lambda: plotting.circuit_overview_figure(circuit, entry.n_layer, node)
                if node and plotting.split_node(node)[2] in ("act_in", "resid_delta") and plotting.split_node(node)[3] < entry.config.d_model:
                    parts[channel_in] = lambda: gr.Slider(minimum=0, maximum=int(entry.config.d_model) - 1, step=1,
                                                          value=plotting.split_node(node)[3])
            out = {c: make() for c, make in parts.items() if c not in skip}
            out.update(node_panel(entry, circuit, node, task, zc, prompt))
            session_state["view"] = {"model": entry.spec, "task": task, "run": run.id if run else None, "k": k,
                                     "layer": layer, "node": node}
            if tab == "curves" and run is not None:
                out.update(show_curves(session_state, entry.spec, task, run.id, k))
            print(f"[app] view ({reset_from}) {time.perf_counter() - t0:.3f}s")
            return out

        def current(session_state, model, run_id, task, k):
            entry = get_model(model)
            run = _find_run(entry, session_state or {}, run_id)
            circuit = circuit_at_k(entry, run, int(k)) if run is not None else None
            return entry, run, circuit

        # ------------------------------------------------------------------------------------------
        # events: selectors

        view_inputs = [session, model_in, task_in, run_in, k_in, layer_in, node_in, zero_centered, prompt_in, active_tab]

        def on_load(session_state, zc, prompt, request: gr.Request):
            """The first view: from the URL's query parameters (model, task, run, k, layer, node) where given
            and valid, else the defaults; whatever cannot be restored is named in the status line."""
            params = {key: v for key, v in (dict(request.query_params) if request is not None else {}).items() if v}
            model = params.get("model") or default_model_spec()
            try:
                get_model(model)
            except UserError as exc:
                gr.Warning(str(exc))
                out = resolve_view(session_state, default_model_spec(), None, None, None, None, None, zc, prompt,
                                   reset_from="model")
                out[status] = f"⚠️ {exc}; showing {default_model_spec()} instead"
                return out
            task, run_id, k = params.get("task"), params.get("run"), params.get("k")
            problems = []
            if task is not None and task not in task_names:
                problems.append(f"unknown task {task!r}")
                task = None
            try:
                k = int(k) if k is not None else None
            except ValueError:
                problems.append(f"k={k!r} is not a number")
                k = None
            entry = get_model(model)
            if run_id and _find_run(entry, session_state or {}, run_id) is None:
                problems.append(f"run {run_id!r} is not available here (runs made or imported in another session are "
                                "not shared; download the circuit file and import it)")
                run_id = None
            reset_from = "node"
            if not task:
                reset_from = "model"
            elif not run_id:
                reset_from = "task"
            elif k is None:
                reset_from = "run"
            elif not params.get("layer"):
                reset_from = "k"
            elif not params.get("node"):
                reset_from = "layer"
            out = resolve_view(session_state, model, task, run_id, k, params.get("layer"), params.get("node"), zc,
                               prompt, reset_from=reset_from)
            view = (session_state or {}).get("view") or {}
            if params.get("layer") and view.get("layer") != params["layer"] and reset_from in ("node", "layer"):
                problems.append(f"layer {params['layer']!r} is not in this circuit")
            if params.get("node") and view.get("node") != params["node"] and reset_from == "node":
                problems.append(f"node {params['node']!r} is not in this circuit")
            if problems:
                out[status] = "⚠️ could not restore all of the link: " + "; ".join(problems)
            return out

        @safe
        def extras_handler(session_state, model, task, run_id, k, node, zc, prompt):
            t0 = time.perf_counter()
            try:
                return _extras(session_state, model, task, run_id, k, node, zc, prompt)
            finally:
                print(f"[app] extras {node} {time.perf_counter() - t0:.3f}s")

        def _extras(session_state, model, task, run_id, k, node, zc, prompt):
            entry = get_model(model)
            run = _find_run(entry, session_state or {}, run_id)
            circuit = circuit_at_k(entry, run, int(k)) if run is not None and k is not None else None
            return node_extras(entry, circuit, node, task, zc, prompt)

        extras_inputs = [session, model_in, task_in, run_in, k_in, node_in, zero_centered, prompt_in]
        extras_outputs = [task_acts, attn_row, attn_plot, qk_plot, status]

        def make_view_handler(reset_from):
            def handler(session_state, model, task, run_id, k, layer, node, zc, prompt, tab):
                try:
                    return resolve_view(session_state, model, task, run_id, k, layer, node, zc, prompt,
                                        reset_from=reset_from, tab=tab,
                                        send=reset_from if reset_from in ("k", "layer") else "all")
                except UserError as exc:  # a bad model or task: say so and go back to the last good view
                    previous = (session_state or {}).get("view") or {}
                    gr.Warning(str(exc))
                    out = {status: message(exc)}
                    if reset_from == "model" and previous.get("model"):
                        out[model_in] = gr.Dropdown(value=previous["model"])
                    if reset_from == "task" and previous.get("task"):
                        out[task_in] = gr.Dropdown(value=previous["task"])
                    return out

            return safe(handler)

        @safe
        def refresh_stats(session_state, model, task, run_id, k, layer):
            """Second step after a view change: random baseline and layer deltas (slower), then the summary,
            the layer list and the layer bars again."""
            t0 = time.perf_counter()
            entry = get_model(model)
            run = _find_run(entry, session_state or {}, run_id)
            if run is None or k is None:
                return {status: gr.skip()}
            circuit = circuit_at_k(entry, run, int(k))
            stats = circuit_stats(entry, run, int(k), task)
            print(f"[app] stats k={k} {time.perf_counter() - t0:.3f}s")
            deltas = stats.get("layer_deltas") or {}
            rows = plotting.layer_summary(circuit, entry.n_layer)
            for r in rows:
                r["delta"] = deltas.get(r["layer"], r["delta"])
            return {summary: _summary_md(entry, run, circuit, stats, task),
                    layer_in: gr.Radio(choices=_layer_choices(circuit, entry, deltas), value=layer),
                    layer_bars: plotting.layer_bars_figure(rows, layer)}

        refresh_inputs = [session, model_in, task_in, run_in, k_in, layer_in]
        refresh_outputs = [summary, layer_in, layer_bars, status]

        def view_event(trigger, reset_from):
            trigger(make_view_handler(reset_from), view_inputs, view_outputs + [session],
                    show_progress="minimal" if reset_from == "k" else "full").then(
                extras_handler, extras_inputs, extras_outputs, show_progress="hidden").then(
                refresh_stats, refresh_inputs, refresh_outputs, show_progress="hidden")

        demo.load(safe(on_load), [session, zero_centered, prompt_in], view_outputs + [session]).then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden").then(
            refresh_stats, refresh_inputs, refresh_outputs, show_progress="hidden")
        view_event(model_in.input, "model")
        view_event(task_in.input, "task")
        view_event(run_in.input, "run")
        view_event(k_in.release, "k")
        layer_in.input(make_view_handler("layer"), view_inputs, view_outputs + [session], show_progress="minimal").then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden")

        @safe
        def select_node(session_state, model, task, run_id, k, node, zc, prompt, tab="browser"):
            t0 = time.perf_counter()
            entry, run, circuit = current(session_state, model, run_id, task, k)
            if circuit is None:
                raise UserError("no circuit selected")
            if node not in circuit.nodes:
                raise UserError(f"{node} is not a node of this circuit")
            layer = plotting.sublayer_of(node)
            out = {node_in: gr.Dropdown(choices=_node_choices(circuit, layer, entry.d_head), value=node),
                   graph: plotting.layer_graph_figure(circuit, layer, node),
                   share_query: _query(entry.spec, task, run.id, k, layer, node), status: ""}
            if tab == "overview":
                out[overview] = plotting.circuit_overview_figure(circuit, entry.n_layer, node)
            out.update(node_panel(entry, circuit, node, task, zc, prompt))
            if plotting.split_node(node)[2] in ("act_in", "resid_delta") and plotting.split_node(node)[3] < entry.config.d_model:
                out[channel_in] = gr.Slider(value=plotting.split_node(node)[3])
            print(f"[app] node {node} {time.perf_counter() - t0:.3f}s")
            return out

        node_sel_inputs = [session, model_in, task_in, run_in, k_in, node_in, zero_centered, prompt_in, active_tab]
        node_in.input(select_node, node_sel_inputs, node_outputs, show_progress="minimal").then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden")

        @safe
        def click_node(session_state, model, task, run_id, k, clicked, current_layer, zc, prompt, tab):
            node, _, rest = (clicked or "").partition("|")
            source = rest.split("|")[0]
            if not node:
                return {status: gr.skip()}
            entry, run, circuit = current(session_state, model, run_id, task, k)
            if circuit is None or node not in circuit.nodes:
                return {status: gr.skip()}
            out = select_node(session_state, model, task, run_id, k, node, zc, prompt, tab)
            layer = plotting.sublayer_of(node)
            if source == "graph" and layer == current_layer:
                out.pop(graph, None)  # the page moved the selection ring itself
            if layer != current_layer:
                stats = circuit_stats(entry, run, int(k), task)
                out[layer_in] = gr.Radio(choices=_layer_choices(circuit, entry, stats.get("layer_deltas")), value=layer)
                rows = plotting.layer_summary(circuit, entry.n_layer)
                for r in rows:
                    r["delta"] = (stats.get("layer_deltas") or {}).get(r["layer"], r["delta"])
                out[layer_bars] = plotting.layer_bars_figure(rows, layer)
            return out

        node_click.change(click_node, [session, model_in, task_in, run_in, k_in, node_click, layer_in, zero_centered, prompt_in,
                                       active_tab],
                         node_outputs + [layer_in, layer_bars], show_progress="minimal").then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden")
        zero_centered.input(select_node, node_sel_inputs, node_outputs, show_progress="minimal").then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden")

        share_query.change(None, [share_query], [share_link], js=SHARE_JS)

        # ------------------------------------------------------------------------------------------
        # curves and embeddings (computed when their tab opens)

        @safe
        def show_curves(session_state, model, task, run_id, k):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            if run is None:
                return {faith_plot: plotting.message_figure("No run selected.")}
            curve = faithfulness_curve(entry, run, task)
            stats = circuit_stats(entry, run, int(k), task)
            return {faith_plot: plotting.faithfulness_figure(curve["points"], stats.get("full"), circuit.target_loss,
                                                             stats.get("random"), int(k), curve["random"])}

        curves_tab.select(show_curves, [session, model_in, task_in, run_in, k_in], [faith_plot, status])

        @safe
        def show_overview(session_state, model, task, run_id, k, node):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            if circuit is None:
                return {overview: plotting.message_figure("No circuit for this task yet.")}
            return {overview: plotting.circuit_overview_figure(circuit, entry.n_layer, node)}

        overview_tab.select(show_overview, [session, model_in, task_in, run_in, k_in, node_in], [overview, status])

        @safe
        def show_ablations(session_state, model, task, run_id, k):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            return {abl_nodes: gr.Dropdown(choices=list(circuit.nodes) if circuit else [])}

        ablations_tab.select(show_ablations, [session, model_in, task_in, run_in, k_in], [abl_nodes, status])

        @safe
        def show_share(session_state, model, task, run_id, k):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            return {download: gr.DownloadButton(value=_write_download(circuit, run))}

        share_tab.select(show_share, [session, model_in, task_in, run_in, k_in], [download, status])
        for tab_name, tab in (("browser", browser_tab), ("overview", overview_tab), ("curves", curves_tab),
                              ("embeddings", emb_tab), ("prompt", prompt_tab), ("ablations", ablations_tab),
                              ("share", share_tab)):
            tab.select(lambda name=tab_name: name, None, active_tab, queue=False, show_progress="hidden")

        @safe
        def show_embeddings(model, channel):
            entry = get_model(model)
            c = int(channel or 0)
            if not 0 <= c < entry.config.d_model:
                raise UserError(f"channel must be in [0, {entry.config.d_model})")
            wte = entry.model.transformer.wte.weight.detach()[:, c].tolist()
            wpe = entry.model.transformer.wpe.weight.detach()
            return {emb_tokens: plotting.embedding_tokens_figure(entry.vocab, wte, c),
                    emb_hist: plotting.weights_histogram_figure(wte, f"Token embedding weights of channel {c}"),
                    pos_plot: plotting.position_embedding_figure(wpe.tolist(), c if c < wpe.shape[1] else None),
                    status: ""}

        emb_tab.select(show_embeddings, [model_in, channel_in], [emb_tokens, emb_hist, pos_plot, status])
        channel_in.release(show_embeddings, [model_in, channel_in], [emb_tokens, emb_hist, pos_plot, status])

        # ------------------------------------------------------------------------------------------
        # prompt lab

        @safe
        def run_prompt(session_state, model, task, run_id, k, node, prompt, a, b, zc):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            data = next_tokens_data(entry, prompt, circuit, node if node else None, (a, b))
            notices = data["notices"]
            ld = data.get("logit_diff")
            ld_md = ""
            if ld:
                ld_md = (f"**logit({plotting.display_token(ld['a'])}) − logit({plotting.display_token(ld['b'])})**: "
                         f"full model {ld['full']:+.3f}" + (f" · circuit {ld['circuit']:+.3f}" if ld["circuit"] is not None else ""))
            node_html = ""
            if data.get("node"):
                node_html = plotting.token_heatmap_html(data["tokens"], data["node_acts"], zero_centered=zc,
                                                        title=f"activations of {data['node']} on the prompt (full model)")
                node_html = plotting._CSS + node_html
            title = f"Top {TOP_N} next tokens" + (f" (circuit: {data['circuit_k']} nodes)" if data["circuit"] else "")
            return {
                prompt_tokens: plotting._CSS + plotting.tokens_html(data["tokens"], data["ids"]),
                prompt_notice: "\n".join(f"ℹ️ {n}" for n in notices) or f"{len(data['tokens'])} tokens",
                next_plot: plotting.next_tokens_figure([(r["token"], r["prob"]) for r in data["full"]],
                                                       [(r["token"], r["prob"]) for r in data["circuit"]] if data["circuit"] else None,
                                                       title),
                logit_diff: ld_md, prompt_node_acts: node_html, status: "",
                prompt_json: {"full": data["full"], "circuit": data["circuit"], "notices": notices},
            }

        prompt_outputs = [prompt_tokens, prompt_notice, next_plot, logit_diff, prompt_node_acts, status, prompt_json]
        prompt_inputs = [session, model_in, task_in, run_in, k_in, node_in, prompt_in, cand_a, cand_b, zero_centered]
        prompt_btn.click(run_prompt, prompt_inputs, prompt_outputs)

        def next_tokens(prompt: str, model: str = "", task: str = "", run: str = "", k: int = 0) -> dict:
            """Top-10 next tokens and probabilities of the full model and of the circuit alone (nodes outside it
            mean-ablated) for a prompt. model/task/run/k default to the default model and its first circuit."""
            try:
                entry = get_model(model or None)
                chosen = None
                if run:
                    chosen = entry.runs.get(run)
                    if chosen is None:
                        raise UserError(f"unknown run {run!r} for model {entry.spec} (runs: {', '.join(entry.runs)})")
                else:
                    candidates = [r for r in entry.runs.values() if not task or r.task == task]
                    chosen = candidates[0] if candidates else None
                circuit = circuit_at_k(entry, chosen, int(k) if k else None) if chosen is not None else None
                data = next_tokens_data(entry, prompt, circuit)
                return {"model": entry.spec, "run": chosen.id if chosen else None,
                        "circuit_nodes": circuit.n_nodes if circuit is not None else None,
                        "tokens": data["tokens"], "notices": data["notices"], "full": data["full"],
                        "circuit": data["circuit"]}
            except UserError as exc:
                return {"error": str(exc)}
            except Exception as exc:
                return {"error": f"{type(exc).__name__}: {_first_line(exc)}"}

        gr.api(next_tokens, api_name="next_tokens", concurrency_limit=4, concurrency_id="browse")

        # ------------------------------------------------------------------------------------------
        # ablations, importances, comparison, pruning

        @safe
        def run_ablation(session_state, model, task, run_id, k, layers, nodes, mode, base):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            rows = ablation_effects(entry, circuit, task, list(layers or []), list(nodes or []), mode,
                                    "circuit" if base == "circuit" else "full")
            table = "| ablation | task loss | Δ loss | logit diff | Δ logit diff |\n|---|---|---|---|---|\n" + "\n".join(
                f"| {r['label']} | {r['loss']:.4f} | {r['d_loss']:+.4f} | {r['logit_diff']:.3f} | {r['d_logit_diff']:+.3f} |"
                for r in rows)
            return {abl_plot: plotting.ablation_effect_figure([r for r in rows if not r.get("baseline")],
                                                              f"{mode}-ablation from the {base} on {task}"),
                    abl_table: table, status: ""}

        abl_btn.click(run_ablation, [session, model_in, task_in, run_in, k_in, abl_layers, abl_nodes, abl_mode, abl_base],
                      [abl_plot, abl_table, status], concurrency_limit=2, concurrency_id="ablate")

        @safe
        def run_importances(session_state, model, task, run_id, k, node):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            if circuit is None:
                raise UserError("no circuit selected")
            imps, method = live_importances(entry, circuit, task)
            return {imp_plot: plotting.importance_bar_figure(
                        imps, node, entry.d_head, title=f"Live node importances on {task} ({len(imps)} nodes, {method})"),
                    status: ""}

        imp_btn.click(run_importances, [session, model_in, task_in, run_in, k_in, node_in], [imp_plot, status],
                      concurrency_limit=2, concurrency_id="ablate")

        @safe
        def run_compare(session_state, model, task, run_id, k, other_id):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            other = _find_run(entry, session_state or {}, other_id)
            if circuit is None or other is None:
                raise UserError("choose a run to compare with")
            oc = other.load(entry)
            d = circuit.diff(oc)
            md = (f"nodes: {len(d.nodes_only_self)} only in {run.name}, {len(d.nodes_both)} in both, "
                  f"{len(d.nodes_only_other)} only in {other.name} · edges: {len(d.edges_only_self)} / "
                  f"{len(d.edges_both)} / {len(d.edges_only_other)}")
            return {cmp_plot: plotting.circuit_diff_figure(d, "this", "other"), cmp_md: md, status: ""}

        cmp_btn.click(run_compare, [session, model_in, task_in, run_in, k_in, cmp_in], [cmp_plot, cmp_md, status])

        def run_pruning(session_state, model, task, target, steps, zc, prompt, progress=gr.Progress(track_tqdm=True)):
            import copy

            from modeling_csp.pruning import PruneConfig, prune

            try:
                entry = get_model(model)
                if task not in task_names:
                    raise UserError("choose a task to prune for")
                target = float(target if target is not None else 0.15)
                if not 0 < target < 10:
                    raise UserError("the target loss must be between 0 and 10 nats")
                progress(0, desc="mean activations")
                means = entry.means()
                entry.task_data(task)  # fail early if the tokenizer cannot express the task
                worker = copy.deepcopy(entry.model)  # pruning hooks must not meet the browsing sessions' forward passes
                config = PruneConfig(target_loss=target, steps=int(steps), progress=True, n_random=3)
                progress(0.05, desc="pruning")
                result = prune(worker, entry.tokenizer, task, config, means=means, model_name=entry.spec)
            except UserError as exc:
                gr.Warning(str(exc))
                return {status: message(exc), pr_md: message(exc)}
            except Exception as exc:
                traceback.print_exc()
                return {status: f"⚠️ pruning failed: {_first_line(exc)}", pr_md: f"⚠️ pruning failed: {_first_line(exc)}"}
            session_state = session_state if isinstance(session_state, dict) else {}
            runs = session_state.setdefault("runs", {})
            n = sum(1 for r in runs.values() if r.source == "app") + 1
            c = result.circuit
            run = Run(id=f"app:{task}-{n}-{uuid.uuid4().hex[:4]}", name=f"this session #{n} · {task} · k={c.k}",
                      source="app", circuit=c, scores=result.scores, task=task, k=c.k)
            runs[run.id] = run
            session_state.setdefault("model_of", {})[run.id] = entry.spec
            out = resolve_view(session_state, entry.spec, task, run.id, c.k, None, None, zc, prompt, reset_from="run")
            out[pr_md] = (f"✅ k={c.k} nodes, {c.n_edges} edges · circuit loss {_fmt(c.losses.get('circuit'))} "
                          f"(target {target}, {'reached' if result.target_reached else 'not reached'}) · "
                          f"{result.seconds:.0f}s")
            return out

        pr_btn.click(run_pruning, [session, model_in, pr_task, pr_target, pr_steps, zero_centered, prompt_in],
                     view_outputs + [session, pr_md], concurrency_limit=1, concurrency_id="prune", show_progress_on=[pr_md]).then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden").then(
            refresh_stats, refresh_inputs, refresh_outputs, show_progress="hidden")

        # ------------------------------------------------------------------------------------------
        # files

        def on_upload(session_state, file, model, zc, prompt):
            try:
                if file is None:
                    return {status: gr.skip()}
                path = file if isinstance(file, str) else getattr(file, "name", None) or getattr(file, "path", None)
                entry = get_model(model)
                run = import_run_file(entry, path, Path(path).name, unique=True)
                session_state = session_state if isinstance(session_state, dict) else {}
                session_state.setdefault("runs", {})[run.id] = run
                session_state.setdefault("model_of", {})[run.id] = entry.spec
                task = run.task
                out = resolve_view(session_state, entry.spec, task, run.id, None, None, None, zc, prompt,
                                   reset_from="run")
                if task is None:  # untasked runs are listed under every task: keep the current one
                    pass
                out[status] = f"✅ imported {Path(path).name}: {run.circuit.n_nodes} nodes, {run.circuit.n_edges} edges"
                return out
            except UserError as exc:
                gr.Warning(str(exc))
                return {status: message(exc)}
            except Exception as exc:
                traceback.print_exc()
                return {status: f"⚠️ could not import the file: {_first_line(exc)}"}

        upload.upload(on_upload, [session, upload, model_in, zero_centered, prompt_in], view_outputs + [session]).then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden").then(
            refresh_stats, refresh_inputs, refresh_outputs, show_progress="hidden")

        demo.load(None, None, None, js=CLICK_JS)
    # The UI's own events stay out of the API page; /next_tokens is the documented endpoint.
    for block_fn in demo.fns.values():
        if block_fn.api_name != "next_tokens" and block_fn.api_visibility == "public":
            block_fn.api_visibility = "undocumented"
    demo.queue(default_concurrency_limit=4)
    return demo


def warm_up(spec: str | None = None) -> None:
    """Loads the default model and precomputes what the first view needs (in a background thread)."""
    try:
        entry = get_model(spec)
        first = next((r for r in entry.runs.values() if r.task), None)
        if first is not None:  # what the first page view needs, then what the first ablation needs
            entry.task_activations(first.task, first.load(entry))
        entry.pretrain()
        entry.means()
    except Exception as exc:
        print(f"[app] warm-up skipped: {_first_line(exc)}")


demo = build_app()

if __name__ == "__main__":
    threading.Thread(target=warm_up, daemon=True).start()
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME"),
                server_port=int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None,
                css=CSS, theme=gr.themes.Soft())
