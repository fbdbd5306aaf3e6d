"""A circuit pruned on one model, evaluated on another of the same shape: a training snapshot, a fine-tuned copy,
a resparsified LoRA merge. This is the "audit after fine-tuning / detect drift" use of circuits.

    circuit = CircuitGraph.load("circuits/bracket_brace.json")  # pruned on model A
    result = evaluate_transfer(circuit, model_b, tokenizer)       # B's own mean activations, held-out examples
    result.losses["circuit"], result.verdict.passed, result.changed_nodes[:5]

The losses are `evaluation.circuit_losses` on the held-out split with the options the circuit was pruned with,
so on A itself they are `csp evaluate`'s numbers. A node "changed" by how much the task loss depends on it:
its importance (loss increase when it alone is ablated, as pruning measured it, same method and examples) on B
minus the importance the file recorded on A. That is what an auditor needs: a node the circuit no longer uses,
or one it now leans on. Beside it each node gets the relative change of its circuit edges' weights (in and out,
the file's weights against B's), which shows drift in the wiring even where the loss has not moved yet.

`circuit_through_snapshots` does this for several circuits over a list of snapshots (model folders, or the
`snapshots/step_N.safetensors` a training run keeps) and returns a curve for `plotting.circuit_through_training`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..utils.devices import input_device
from .ablation import compute_mean_activations
from .evaluation import CircuitVerdict, EvalOptions, circuit_losses, circuit_verdict, evaluate, node_importances, task_split
from .graph import ARCH_FIELDS, CircuitGraph, _describe, model_info, parse_node_id, weight_pairs
from .tasks import Task, circuit_examples, get_task, list_tasks, task_from_pairs

TOP_CHANGED = 10  # nodes listed as "changed most" by default


def check_same_shape(circuit: CircuitGraph, model, name: str | None = None) -> None:
    """ValueError naming both shapes unless `model` has the shape of the model the circuit was pruned on (its
    weights may differ)."""
    mine, theirs = circuit.model, model_info(model, name, with_weights_hash=False)
    if any(f in mine and mine[f] != theirs[f] for f in ARCH_FIELDS):
        raise ValueError(f"circuit was made for model {_describe(mine)}, not {_describe(theirs)}: a circuit can only be "
                         "evaluated on a model of the same shape (a snapshot, a fine-tuned copy or a merge of it)")
    circuit.masks(model.config)  # node indices in range


def own_task(circuit: CircuitGraph, source: str = "circuit") -> Task:
    """The task a circuit was pruned on: a built-in task, or the examples a task-file circuit keeps."""
    if circuit.task in {t.name for t in list_tasks()}:
        return get_task(circuit.task)
    triples = circuit_examples(circuit.meta)
    if triples:
        return task_from_pairs(circuit.task, triples)
    raise ValueError(f"{source} names no built-in task ({circuit.task!r}) and keeps no task examples: "
                     "give --task NAME or --task-file FILE.jsonl")


@dataclass(frozen=True)
class NodeChange:
    """One circuit node on model B against the model A the circuit was pruned on (see the module docstring)."""

    node: str
    importance_pruned: float | None  # the file's, on A; None when the file records none
    importance: float  # on B, same examples and method
    weight_change: float | None  # sum |w_B - w_A| / sum |w_A| over the node's edges in the file; None: no edges

    @property
    def importance_change(self) -> float | None:
        return None if self.importance_pruned is None else self.importance - self.importance_pruned

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "importance_pruned": self.importance_pruned, "importance": self.importance,
                "importance_change": self.importance_change, "weight_change": self.weight_change}


@dataclass
class TransferResult:
    """A circuit's numbers on another model: losses (`circuit_losses`), the verdict against the circuit's own
    target, and its nodes ranked by how much they changed (largest |importance change| first)."""

    pruned_on: dict[str, Any]  # the circuit file's `model` record
    evaluated_on: dict[str, Any]  # `graph.model_info` of the model evaluated on
    task: str
    losses: dict[str, Any]
    verdict: CircuitVerdict
    n_examples: int
    options: EvalOptions
    changed_nodes: list[NodeChange] = field(default_factory=list)

    @property
    def same_weights(self) -> bool:
        return self.pruned_on.get("weights_hash") == self.evaluated_on.get("weights_hash")

    @property
    def summary(self) -> str:
        """"pruned on A, evaluated on B" in words."""
        def name(info):
            return f"{info.get('name', 'unnamed')!r} (weights {info.get('weights_hash', 'unknown')})"
        return f"pruned on {name(self.pruned_on)}, evaluated on {name(self.evaluated_on)}"

    def as_dict(self, top: int = TOP_CHANGED) -> dict[str, Any]:
        return {"pruned_on": self.pruned_on, "evaluated_on": self.evaluated_on, "same_weights": self.same_weights,
                "summary": self.summary, "changed_nodes": [c.as_dict() for c in self.changed_nodes[:top]]}


def _edge_weight_changes(circuit: CircuitGraph, model) -> dict[str, float]:
    """{node: sum |w_B - w_A| / sum |w_A|} over the file's weight edges at each node (either end)."""
    matrices = {(src, tgt): w for layer in range(model.config.n_layer) for src, tgt, w in weight_pairs(model, layer)}
    moved: dict[str, float] = {}
    size: dict[str, float] = {}
    for e in circuit.edges:
        if e.kind != "weight":
            continue
        (s_loc, s_idx), (t_loc, t_idx) = parse_node_id(e.source), parse_node_id(e.target)
        w = matrices.get((s_loc, t_loc))
        now = float(w[t_idx, s_idx]) if w is not None else 0.0
        for node in (e.source, e.target):
            moved[node] = moved.get(node, 0.0) + abs(now - e.weight)
            size[node] = size.get(node, 0.0) + abs(e.weight)
    return {n: moved[n] / size[n] for n in moved if size[n] > 0}  # a file's edges are nonzero weights


def node_changes(circuit: CircuitGraph, model, batch, masks, means, options: EvalOptions,
                 progress: Callable[[int, int], None] | None = None) -> list[NodeChange]:
    """Each circuit node's importance on `model` against the file's and its edges' weight change, largest
    |importance change| first, changes equal to 1e-6 (float rounding) by weight change (nodes without a recorded
    importance last, by weight change)."""
    method = circuit.meta.get("importance_method")
    method = method if method in ("exact", "attribution") else "exact"
    now = node_importances(model, batch, masks, means, options.freeze_norm_scales, method=method, progress=progress)
    weights = _edge_weight_changes(circuit, model)
    out = [NodeChange(n, None if not isinstance(imp, (int, float)) or not math.isfinite(imp) else float(imp),
                      float(now.get(n, 0.0)), weights.get(n)) for n, imp in circuit.nodes.items()]
    def order(c: NodeChange):
        change = c.importance_change
        return (change is None, -round(abs(change), 6) if change is not None else 0.0, -(c.weight_change or 0.0))
    return sorted(out, key=order)


def evaluate_transfer(circuit: CircuitGraph, model, tokenizer, task: Task | str | None = None, means=None,
                      options: EvalOptions | None = None, model_name: str | None = None, changes: bool = True,
                      progress: Callable[[int, int], None] | None = None) -> TransferResult:
    """The circuit (pruned on the model its file names) on `model`: held-out losses with `model`'s own mean
    activations (`means`, computed when None and the circuit is mean-ablated), the verdict against the circuit's
    target, and (`changes`) its nodes ranked by drift. ValueError when `model` has another shape."""
    check_same_shape(circuit, model, model_name)
    task = own_task(circuit) if task is None else get_task(task)
    options = options or EvalOptions.of(circuit)
    if means is None and circuit.ablation == "mean":
        means = compute_mean_activations(model, tokenizer)
    batch = task_split(task, tokenizer, model.config.block_size, options)
    masks = circuit.masks(model.config, input_device(model))
    losses = circuit_losses(model, batch, masks, means, options)
    own = task.name == circuit.task
    verdict = circuit_verdict(losses, circuit.target_loss if own else None)  # A's control and training loss say nothing of B
    info = model_info(model, model_name)
    result = TransferResult(dict(circuit.model), info, task.name, losses, verdict, len(batch), options)
    if changes and own:
        result.changed_nodes = node_changes(circuit, model, batch, masks, means, options, progress)
    return result


# ---- a circuit through training ----------------------------------------------------------------


def load_snapshot(path: str | Path, like=None):
    """(model, tokenizer or None) for a model folder, or a `.safetensors` file of weights (a training run's
    `snapshots/step_N.safetensors`) loaded into a model shaped like `like`."""
    from ..model.loading import load_model_and_tokenizer

    path = Path(path)
    if path.suffix == ".safetensors":
        if like is None:
            raise ValueError(f"{path} holds weights only: give the model it is a snapshot of (like=...)")
        from safetensors.torch import load_file

        model = type(like)(like.config)
        try:
            model.load_state_dict(load_file(path))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"{path} does not fit the model's shape ({_describe(model_info(like, None, False))}): "
                             f"{first}") from None
        return model.eval(), None
    return load_model_and_tokenizer(str(path))


@torch.no_grad()
def circuit_through_snapshots(circuits: Sequence[CircuitGraph], snapshots: Sequence[tuple[str, Any]], tokenizer,
                              loader: Callable[[Any], Any] | None = None,
                              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Each circuit's held-out loss at each snapshot, with that snapshot's own mean activations, and the full
    model's loss on the same examples for reference:

        {"snapshots": [label, ...], "circuits": {task: {"k": k, "circuit": [loss, ...], "full": [loss, ...],
         "accuracy": [...], "target": t}}}

    `snapshots` are (label, model or path) pairs in training order; a path is loaded with `loader` (default:
    `load_snapshot`, a .safetensors file shaped like the first model given). The random baseline is not drawn."""
    labels = []
    names = [c.task if [d.task for d in circuits].count(c.task) == 1 else f"{c.task} (k={c.n_nodes})" for c in circuits]
    rows = {name: {"task": c.task, "k": c.n_nodes, "target": c.target_loss, "circuit": [], "full": [], "accuracy": []}
            for name, c in zip(names, circuits)}
    first_model = next((m for _, m in snapshots if not isinstance(m, (str, Path))), None)
    for label, snapshot in snapshots:
        if isinstance(snapshot, (str, Path)):
            snapshot = loader(snapshot) if loader else load_snapshot(snapshot, like=first_model)[0]
        first_model = first_model or snapshot
        if progress:
            progress(label)
        labels.append(label)
        means = None
        for name, circuit in zip(names, circuits):
            check_same_shape(circuit, snapshot)
            if circuit.ablation == "mean" and means is None:
                means = compute_mean_activations(snapshot, tokenizer)
            options = EvalOptions.of(circuit)
            batch = task_split(own_task(circuit), tokenizer, snapshot.config.block_size, options)
            masks = circuit.masks(snapshot.config, input_device(snapshot))
            full, _ = evaluate(snapshot, batch)
            loss, acc = evaluate(snapshot, batch, masks, means if circuit.ablation == "mean" else None,
                                 options.freeze_norm_scales)
            row = rows[name]
            row["circuit"].append(loss)
            row["full"].append(full)
            row["accuracy"].append(acc)
    return {"snapshots": labels, "circuits": rows}


CURVE_FILE = "circuit_through_training.json"  # in a model folder: scripts/circuit_through_training.py writes it
MAX_CURVE_BYTES = 1_000_000


def read_circuit_through_training(folder: str | Path) -> dict[str, Any] | None:
    """A model folder's circuit-through-training curve (`CURVE_FILE`), None when it ships none; ValueError when
    the file is too large or not such a curve (it comes with the model, and the model may come from anyone)."""
    from ..utils.jsonio import loads_strict

    path = Path(folder) / CURVE_FILE
    if not Path(folder).is_dir() or not path.is_file():
        return None
    if path.stat().st_size > MAX_CURVE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CURVE_BYTES:,} bytes")
    try:
        curve = loads_strict(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not strict JSON ({first_line(exc)})") from None
    labels = curve.get("snapshots") if isinstance(curve, dict) else None
    rows = curve.get("circuits") if isinstance(curve, dict) else None
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels) and isinstance(rows, dict)
            and all(isinstance(r, dict) and all(isinstance(r.get(key), list) and len(r[key]) == len(labels)
                                                 and all(v is None or isinstance(v, (int, float)) for v in r[key])
                                                 for key in ("circuit", "full")) for r in rows.values())):
        raise ValueError(f"{path} is not a circuit-through-training curve: expected 'snapshots' (labels) and "
                         "'circuits' whose 'circuit' and 'full' lists have a number per snapshot")
    return curve


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


__all__ = ["check_same_shape", "own_task", "NodeChange", "TransferResult", "node_changes", "evaluate_transfer",
           "load_snapshot", "circuit_through_snapshots", "TOP_CHANGED", "CURVE_FILE", "read_circuit_through_training"]
