"""An exploration session over a loaded weight-sparse model: what the app (`app.py`) shows, computed here.

A `ModelEntry` is a loaded model with everything its sessions share, computed lazily and cached: mean
activations, task datasets, activations on the tasks and on held-out text. A `Run` is a circuit to explore
(shipped with the model, imported from a file, or pruned in a session); `circuit_at_k` gives its circuit with
k nodes, `circuit_stats` and `faithfulness_curve` its task losses, the node functions what the app's node
panel shows, `ablation_effects` / `live_importances` what ablating nodes does, and `next_tokens` the prompt
lab: the top next tokens of the full model and of the circuit alone (the app's `/next_tokens` endpoint and
`csp next-tokens`).

Nothing here knows about Gradio. A problem with what was asked for raises `UserError` (a ValueError whose
message is meant for the user); the app shows it in its status line, the CLI as its one-line error.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import sys
import threading
import unicodedata
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .circuits import QUANTILES, CircuitGraph, location_width, node_locations, parse_node_id, record_node_activations
from .tasks import list_tasks, make_task_dataset

TOP_N = 10  # next tokens shown by default
MAX_MODELS = 3  # models kept loaded at once (least recently used dropped first)
MAX_EXACT_IMPORTANCES = 128  # larger circuits get attribution importances (one backward pass)


class UserError(ValueError):
    """A problem with what the user asked for; shown as a message, never as a traceback."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name when it has none), for one-line messages."""
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0] if text else type(exc).__name__


def _log(message: str) -> None:
    print(f"[explorer] {message}", file=sys.stderr, flush=True)  # stdout stays clean for the CLI's JSON


@dataclass
class Settings:
    """What the host (the app, from its environment) configures: the model shown when none is named, circuit
    files offered as runs of every model loaded, and the held-out text used for live activating examples."""

    default_model: str = "default"
    run_files: list[str] = field(default_factory=list)
    pretrain_tokens: int = 8192


settings = Settings()


# =====================================================================================================
# Models and runs
# =====================================================================================================


@dataclass
class Run:
    """A circuit to explore: shipped with the model, imported from a file, or pruned in a session."""

    id: str
    name: str
    source: str  # "shipped" | "imported" | "app"
    path: str | None = None
    circuit: CircuitGraph | None = None
    scores: dict[str, torch.Tensor] | None = None  # pruning scores (runs pruned in a session): any k possible
    task: str | None = None
    k: int | None = None

    def load(self, entry: "ModelEntry") -> CircuitGraph:
        if self.circuit is None:
            self.circuit = CircuitGraph.load(self.path)
        return self.circuit


class ModelEntry:
    """A loaded model with everything computed from it that sessions share (all lazily, all cached)."""

    def __init__(self, spec: str):
        from .loading import load_model_and_tokenizer, resolve_model

        self.spec = spec
        try:
            self.folder = resolve_model(spec)
            self.model, self.tokenizer = load_model_and_tokenizer(spec)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        except Exception as exc:  # anything else while loading: still a message, not a traceback
            raise UserError(f"could not load model {spec!r}: {first_line(exc)}") from None
        self.model.eval()
        self.config = self.model.config
        self.lock = threading.RLock()  # the model's hook list is shared: one forward pass at a time
        self._means = None
        self._means_lock = threading.Lock()
        self._pretrain = None
        self._pretrain_lock = threading.Lock()
        self._tasks: dict[tuple, Any] = {}
        self._task_acts: dict[tuple, dict[str, torch.Tensor]] = {}
        self._task_lock = threading.Lock()
        self.vocab = self._vocab_strings()
        self.training_curve = self._read_training_curve()
        self.runs: dict[str, Run] = OrderedDict()
        self._add_shipped_runs()
        for path in settings.run_files:
            try:
                run = import_run_file(self, path)
                self.runs[run.id] = run
            except UserError as exc:
                _log(f"could not import {path}: {exc}")

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
        import json

        path = Path(self.folder) / "training_curve.json" if Path(self.folder).is_dir() else None
        if path is not None and path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                return None
        return None

    def _add_shipped_runs(self):
        from .cli import shipped_circuits

        try:
            entries = shipped_circuits(self.spec)
        except Exception as exc:
            _log(f"no shipped circuits for {self.spec}: {first_line(exc)}")
            return
        for e in sorted(entries, key=lambda e: not e.get("at_target")):  # the target-loss circuit first
            stem = Path(e["path"]).stem
            target = " (target loss)" if e.get("at_target") else ""
            run = Run(id=f"shipped:{stem}", name=f"shipped · {e.get('task')} · k={e.get('k')}{target}", source="shipped",
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

    @property
    def n_total_nodes(self) -> int:
        """Nodes of the whole model (every channel at every node location)."""
        return sum(location_width(self.config, l) for l in node_locations(self.config))

    # -- shared computations ---------------------------------------------------------------------

    def means(self) -> dict[str, torch.Tensor]:
        """Mean activations over held-out pretraining-like text (as pruning uses), cached on disk too."""
        with self._means_lock:
            if self._means is None:
                from .ablation import compute_mean_activations

                try:
                    with self.lock:
                        self._means = compute_mean_activations(self.model, self.tokenizer)
                except Exception as exc:
                    raise UserError(f"could not compute mean activations for mean ablation: {first_line(exc)}") from None
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
                from .ablation import example_windows

                try:
                    windows = example_windows(self.model, self.tokenizer, settings.pretrain_tokens)
                except Exception as exc:
                    raise UserError(f"no pretraining text for live activating examples: {first_line(exc)}") from None
                with self.lock:
                    self._pretrain = (windows, record_node_activations(self.model, windows, node_locations(self.config)))
            return self._pretrain

    def task_activations(self, task: str, circuit: CircuitGraph | None = None):
        """(batch, {location: float16 (n, T, width)}): every node location recorded once per task (cached)."""
        batch = self.task_batch(task, circuit)
        key = (task, id(batch))
        with self._task_lock:
            cached = self._task_acts.get(key)
        if cached is not None:
            return batch, cached
        with self.lock:
            store = record_node_activations(self.model, batch.input_ids, node_locations(self.config),
                                            batch.attention_mask)
        with self._task_lock:
            self._task_acts[key] = store
            while len(self._task_acts) > 2:
                self._task_acts.pop(next(iter(self._task_acts)))
        return batch, store

    def run_forward(self, ids: torch.Tensor, masks=None, means=None, record: str | None = None, attention_mask=None):
        """Logits (B, T, V) of the model (circuit-ablated with `masks`), and recorded activations."""
        from .ablation import ablate

        with self.lock, torch.no_grad(), contextlib.ExitStack() as stack:
            if masks is not None:
                stack.enter_context(ablate(self.model, masks, means))
            acts = stack.enter_context(self.model.record_activations(record)) if record else {}
            logits = self.model(ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, acts


_MODELS: "OrderedDict[str, ModelEntry]" = OrderedDict()
_MODELS_LOCK = threading.Lock()
_LOADING: dict[str, threading.Lock] = {}


def default_model_spec() -> str:
    return settings.default_model


def loaded_models() -> list[str]:
    """Specs of the models loaded now, least recently used first."""
    with _MODELS_LOCK:
        return list(_MODELS)


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
        from .viz_import import import_viz_data

        try:
            circuit = import_viz_data(p)
        except ValueError as exc:
            raise UserError(str(exc).replace(str(p), label)) from None
        except Exception as exc:
            raise UserError(f"{label} is not a viz_data.pt file ({first_line(exc)})") from None
    try:
        circuit.check_model(entry.model, entry.spec)
    except ValueError as exc:
        raise UserError(f"{label}: {exc}") from None
    rid = f"imported:{re.sub(r'[^A-Za-z0-9_.-]+', '_', p.stem)}" + (f"-{uuid.uuid4().hex[:4]}" if unique else "")
    return Run(id=rid, name=f"imported · {label}", source="imported", circuit=circuit, task=circuit.task,
               k=circuit.k or circuit.n_nodes)


# ---- a session's runs: the model's runs plus those made or imported in the session ---------------
# A session is a plain dict: {"runs": {id: Run}, "model_of": {id: model spec}, ...}.


def add_session_run(session: dict, entry: ModelEntry, run: Run) -> None:
    """Makes a run (pruned or imported in a session) one of the session's runs for this model."""
    session.setdefault("runs", {})[run.id] = run
    session.setdefault("model_of", {})[run.id] = entry.spec


def session_runs(entry: ModelEntry, session: dict) -> list[Run]:
    """The model's runs and the session's runs made for this model."""
    return list(entry.runs.values()) + [r for r in session.get("runs", {}).values()
                                        if session.get("model_of", {}).get(r.id) == entry.spec]


def runs_for_task(entry: ModelEntry, session: dict, task: str | None) -> list[Run]:
    """Runs to offer for a task: those made for it first, then those that name no task."""
    runs = list(entry.runs.values()) + [r for r in session.get("runs", {}).values() if r.id.startswith("app:") or r.id.startswith("imported:")]
    runs = [r for r in runs if session.get("model_of", {}).get(r.id, entry.spec) == entry.spec]
    matching = [r for r in runs if r.task == task]
    untasked = [r for r in runs if r.task is None]
    return matching + untasked


def find_run(entry: ModelEntry, session: dict, run_id: str | None) -> Run | None:
    if not run_id:
        return None
    return entry.runs.get(run_id) or session.get("runs", {}).get(run_id)


def choose_run(entry: ModelEntry, run_id: str | None = None, task: str | None = None) -> Run | None:
    """The model's run with this id, else its first run for the task (any task if none), else None."""
    if run_id:
        chosen = entry.runs.get(run_id)
        if chosen is None:
            raise UserError(f"unknown run {run_id!r} for model {entry.spec} (runs: {', '.join(entry.runs)})")
        return chosen
    candidates = [r for r in entry.runs.values() if not task or r.task == task]
    return candidates[0] if candidates else None


def prune_circuit(entry: ModelEntry, task: str | None, target_loss: float | None = 0.15, steps: int = 200,
                  progress: Callable[[float, str], None] | None = None):
    """Prunes a copy of the model for a task (mean ablation, 3 random baselines): a `pruning.PruneResult`.

    The copy keeps pruning's hooks away from other sessions' forward passes on the shared model."""
    from .pruning import PruneConfig, prune

    if task not in {t.name for t in list_tasks()}:
        raise UserError("choose a task to prune for")
    target = float(target_loss if target_loss is not None else 0.15)
    if not 0 < target < 10:
        raise UserError("the target loss must be between 0 and 10 nats")
    report = progress or (lambda fraction, desc: None)
    report(0, "mean activations")
    means = entry.means()
    entry.task_data(task)  # fail early if the tokenizer cannot express the task
    worker = copy.deepcopy(entry.model)
    config = PruneConfig(target_loss=target, steps=int(steps), progress=True, n_random=3)
    report(0.05, "pruning")
    return prune(worker, entry.tokenizer, task, config, means=means, model_name=entry.spec)


def add_pruned_run(session: dict, entry: ModelEntry, task: str, result) -> Run:
    """A pruning result as a run of the session (its scores allow any k)."""
    n = sum(1 for r in session.get("runs", {}).values() if r.source == "app") + 1
    c = result.circuit
    run = Run(id=f"app:{task}-{n}-{uuid.uuid4().hex[:4]}", name=f"this session #{n} · {task} · k={c.k}",
              source="app", circuit=c, scores=result.scores, task=task, k=c.k)
    add_session_run(session, entry, run)
    return run


# =====================================================================================================
# Circuits at k and their losses
# =====================================================================================================


def max_k(entry: ModelEntry, run: Run) -> int:
    """The largest k a run can show: any size for runs with pruning scores, else its own size."""
    return entry.n_total_nodes if run.scores is not None else run.load(entry).n_nodes


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
        from .pruning import top_k_masks

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


def _cache(store: OrderedDict, key, fn, limit: int = 256):
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = fn()
    store[key] = value
    while len(store) > limit:
        store.popitem(last=False)
    return value


_STATS: "OrderedDict[tuple, dict]" = OrderedDict()
_FULL_LOSS: "OrderedDict[tuple, float]" = OrderedDict()
_CURVES: "OrderedDict[tuple, dict]" = OrderedDict()


def circuit_stats(entry: ModelEntry, run: Run, k: int, task: str | None, quick: bool = False) -> dict[str, Any]:
    """Full-model, circuit and random same-size task losses and layer deltas: the run's stored numbers at its
    own k, computed live otherwise. `quick` computes nothing new except the full model's loss (cached per
    task), so that changing k answers fast; the rest can follow in a second call."""
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
        from .ablation import evaluate, layer_ablation_deltas
        from .pruning import random_masks_like

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
                out["layer_deltas"] = layer_ablation_deltas(entry.model, batch, masks, means)
                out["live"] = True
    except UserError as exc:
        out["error"] = str(exc)
    except Exception as exc:
        out["error"] = f"could not evaluate the circuit on {task}: {first_line(exc)}"
    out["complete"] = True
    return _cache(_STATS, key, lambda: out)


def faithfulness_curve(entry: ModelEntry, run: Run, task: str | None) -> dict[str, Any]:
    """Task loss of the run's top-k circuits for log-spaced k, and of random circuits of the same sizes."""
    full = run.load(entry)
    task = task or full.task

    def compute():
        from .ablation import evaluate
        from .pruning import random_masks_like

        if task is None:
            raise UserError("this run names no task: choose a task to compute its faithfulness curve")
        n_max = max_k(entry, run)
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


def best_layer(entry: ModelEntry, circuit: CircuitGraph, deltas: dict | None) -> str | None:
    """The sublayer to show first: largest ablation delta (these deltas, else the circuit's), then most nodes."""
    from . import plotting

    tmp = CircuitGraph(model=circuit.model, nodes=circuit.nodes, edges=[], layer_deltas=deltas or circuit.layer_deltas)
    return plotting.most_important_layer(tmp, entry.n_layer)


def best_node(circuit: CircuitGraph, layer: str | None) -> str | None:
    """The layer's most important node (by ablation importance), or None when it has none."""
    from . import plotting

    nodes = plotting.layer_node_ids(circuit, layer) if layer else []
    if not nodes:
        return None
    return max(nodes, key=lambda n: circuit.nodes[n] if circuit.nodes[n] is not None else -math.inf)


# =====================================================================================================
# Nodes: activating examples, activations on the task, attention
# =====================================================================================================


def live_quantile_examples(entry: ModelEntry, node: str, per_side: int = 2, before: int = 24, after: int = 6):
    """{frac: {"top": [...], "bottom": [...]}}: examples of held-out text whose activation of the node sits at
    the top (bottom) 0.1%, 1%, 10%, 50% quantile of all its activations, peak token marked, tokens decoded
    (the same examples a circuit file stores, see `circuits.quantile_examples`)."""
    from .circuits import quantile_examples

    loc, ch = parse_node_id(node)
    windows, store = entry.pretrain()
    data = quantile_examples(store[loc][:, :, ch], windows, per_side, before, after, QUANTILES)
    return stored_quantile_examples(entry, data)


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


def node_examples(entry: ModelEntry, circuit: CircuitGraph, node: str) -> tuple[dict, str]:
    """(quantile examples, where they come from): those stored with the circuit, else live ones."""
    data = (circuit.node_data or {}).get(node)
    if data and (data.get("top") or data.get("bottom")):
        return stored_quantile_examples(entry, data), "stored with the circuit"
    return live_quantile_examples(entry, node), f"live, on {settings.pretrain_tokens} tokens of held-out text"


def _task_classes(batch) -> tuple[list[int], list[int], tuple[str, str]]:
    """Split task examples into two classes: the correct candidate is the first (class 1) or the second of
    the sorted candidate pair; labels name the most common correct candidate of each class."""
    from .plotting import display_token

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
        return f"correct «{display_token(tok)}»" + ("" if share > 0.99 else f" ({share:.0%})")

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


def attention_example_ids(entry: ModelEntry, circuit: CircuitGraph | None, task: str | None,
                          prompt: str | None) -> list[int] | None:
    """Token ids to show a head's attention on: the prompt if it encodes, else the task's first example."""
    if prompt and prompt.strip():
        try:
            return encode_prompt(entry, prompt)[0]
        except UserError:
            pass
    if task:
        batch = entry.task_batch(task, circuit)
        L = int(batch.attention_mask[0].sum())
        return batch.input_ids[0, batch.input_ids.shape[1] - L:].tolist()
    return None


def attention_for_node(entry: ModelEntry, node: str, ids: list[int]):
    """(head's attention pattern with the sink column first, the channel's own q·k/sqrt(d) contribution,
    tokens, whether the head has a sink, head) for a q or k node on a prompt."""
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


def embedding_channel(entry: ModelEntry, channel: int) -> tuple[list[float], list[list[float]]]:
    """(every token's embedding weight in one residual channel, the position embedding matrix)."""
    c = int(channel or 0)
    if not 0 <= c < entry.config.d_model:
        raise UserError(f"channel must be in [0, {entry.config.d_model})")
    wte = entry.model.transformer.wte.weight.detach()[:, c].tolist()
    return wte, entry.model.transformer.wpe.weight.detach().tolist()


# =====================================================================================================
# Prompt lab: next tokens of the full model and of the circuit alone
# =====================================================================================================


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
    """(token ids, notices): the cleaned prompt, its last block_size tokens if longer than the context."""
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
    """[{"token", "id", "prob"}] of the n most likely next tokens, most likely first."""
    probs = torch.softmax(logits.float(), dim=-1)
    p, idx = probs.topk(max(1, min(int(n), probs.shape[-1])))
    return [{"token": entry.vocab[i], "id": int(i), "prob": round(float(v), 6)} for v, i in zip(p.tolist(), idx.tolist())]


def next_tokens_data(entry: ModelEntry, prompt: str, circuit: CircuitGraph | None, record_node: str | None = None,
                     candidates: tuple[str | None, str | None] = (None, None), top: int = TOP_N) -> dict[str, Any]:
    """Everything the prompt lab shows: tokens, top next tokens of the full model and of the circuit alone,
    logit differences between two candidates, the selected node's per-token activations."""
    ids, notices = encode_prompt(entry, prompt)
    x = torch.tensor([ids])
    record = re.escape(parse_node_id(record_node)[0]) if record_node else None
    logits, acts = entry.run_forward(x, record=record)
    out: dict[str, Any] = {"tokens": entry.token_strs(ids), "ids": ids, "notices": notices,
                           "full": top_tokens(entry, logits[0, -1], top), "circuit": None, "circuit_k": None}
    circuit_logits = None
    if circuit is not None and circuit.n_nodes:
        try:
            masks = circuit.masks(entry.config)
            circuit_logits, _ = entry.run_forward(x, masks, _means_for(entry, circuit))
            out["circuit"] = top_tokens(entry, circuit_logits[0, -1], top)
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


def next_tokens(entry: ModelEntry, prompt: str, run: Run | None = None, k: int | None = None,
                top: int = TOP_N) -> dict[str, Any]:
    """The prompt's tokens and the top next tokens with probabilities of the full model and of the run's
    circuit alone at k nodes (everything outside it ablated): the app's `/next_tokens` answer and the output
    of `csp next-tokens`."""
    circuit = circuit_at_k(entry, run, k) if run is not None else None
    data = next_tokens_data(entry, prompt, circuit, top=top)
    return {"model": entry.spec, "run": run.id if run else None,
            "circuit_nodes": circuit.n_nodes if circuit is not None else None,
            "tokens": data["tokens"], "notices": data["notices"], "full": data["full"], "circuit": data["circuit"]}


# =====================================================================================================
# Ablations
# =====================================================================================================


def _logit_diff(logits: torch.Tensor, batch) -> float:
    idx = torch.arange(len(batch))
    return float((logits[idx, batch.correct_ids] - logits[idx, batch.alternative_ids]).mean())


def ablation_effects(entry: ModelEntry, circuit: CircuitGraph | None, task: str, layers: list[str],
                     nodes: list[str], mode: str, base: str) -> list[dict[str, Any]]:
    """Change in task loss and logit difference when each chosen layer / node (and all of them together) is
    ablated, relative to the full model (base "full") or to the circuit (base "circuit")."""
    from .ablation import ablate, all_kept, task_logits
    from .plotting import sublayer_of
    from .tasks import task_loss

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
            if sublayer_of(loc) in remove_layers:
                m[loc][:] = False
        for n in remove_nodes:
            loc, i = parse_node_id(n)
            if loc not in m or i >= m[loc].numel():
                raise UserError(f"node {n} does not exist in this model")
            m[loc][i] = False
        return m

    def measure(masks):
        """(task loss, mean logit difference) with the nodes outside masks ablated (None: the full model)."""
        with entry.lock, torch.no_grad(), contextlib.ExitStack() as stack:
            if masks is not None:
                stack.enter_context(ablate(entry.model, masks, means))
            logits = task_logits(entry.model, batch)
        return float(task_loss(logits, batch)), _logit_diff(logits, batch)

    base_loss, base_ld = measure(start if base == "circuit" else None)
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


def live_importances(entry: ModelEntry, circuit: CircuitGraph, task: str) -> tuple[dict[str, float], str]:
    """Every circuit node's importance on the task, now: exact (one forward pass per node) for circuits of up
    to MAX_EXACT_IMPORTANCES nodes, first-order attribution (one backward pass) beyond. (importances, method)."""
    from .ablation import node_importances

    batch = entry.task_batch(task, circuit)
    method = "exact" if circuit.n_nodes <= MAX_EXACT_IMPORTANCES else "attribution"
    with entry.lock:
        imps = node_importances(entry.model, batch, circuit.masks(entry.config), _means_for(entry, circuit),
                                method=method)
    return imps, method


def warm_up(spec: str | None = None) -> None:
    """Loads a model and precomputes what a first view and a first ablation need; never raises."""
    try:
        entry = get_model(spec)
        first = next((r for r in entry.runs.values() if r.task), None)
        if first is not None:
            entry.task_activations(first.task, first.load(entry))
        entry.pretrain()
        entry.means()
    except Exception as exc:
        _log(f"warm-up skipped: {first_line(exc)}")


__all__ = [
    "UserError", "Settings", "settings", "Run", "ModelEntry", "get_model", "default_model_spec", "loaded_models",
    "import_run_file", "add_session_run", "session_runs", "runs_for_task", "find_run", "choose_run",
    "prune_circuit", "add_pruned_run", "max_k", "circuit_at_k", "circuit_stats", "faithfulness_curve",
    "best_layer", "best_node", "live_quantile_examples", "stored_quantile_examples", "node_examples",
    "task_activations", "attention_example_ids", "attention_for_node", "embedding_channel", "clean_prompt",
    "encode_prompt", "candidate_id", "top_tokens", "next_tokens_data", "next_tokens", "ablation_effects",
    "live_importances", "warm_up", "first_line", "QUANTILES", "TOP_N",
]
