"""Import circuits saved for OpenAI's original visualizer (`circuit_sparsity/viz.py`, `viz_data.pt`).

The file is read with `torch.load(..., weights_only=True)` only: plain containers and tensors, no code runs.
Every node and every nonzero edge of `importances.pair_data` is kept (no residual edges are added: the
visualizer's file has none). Task-loss numbers in these files are twice the true value (the visualizer halves
them for display), so they are halved here: `losses`, node importances (ablated loss - circuit loss), layer
deltas and the pruning curve. Activation samples become `node_data`, task documents `task_docs`. A loss that is
NaN or infinite (or any other non-finite number in the file) is refused with the file and field named.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .graph import ARCH_FIELDS, CircuitGraph, Edge, check_finite, config_hash, node_id, parse_location

REQUIRED = ("circuit_data", "importances")
REQUIRED_IMPORTANCES = ("pair_data", "interv_loss", "loss")


def _load(path: Path) -> dict:
    if path.suffix.lower() in (".pkl", ".pickle"):
        raise ValueError(
            f"refusing to read {path.name}: pickle files can run arbitrary code when loaded. Re-export the "
            "visualizer data as a .pt file holding only tensors and plain containers "
            "(torch.save(viz_data, 'viz_data.pt')) and import that"
        )
    if not path.is_file():
        raise ValueError(f"viz data file {str(path)!r} does not exist")
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # UnpicklingError for non-tensor content, RuntimeError for non-torch files
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:200]
        raise ValueError(f"{path.name} is not a viz_data.pt file of tensors and plain containers ({why})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a viz_data.pt file: expected a dict, got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    missing += [f"importances.{k}" for k in REQUIRED_IMPORTANCES if k not in data.get("importances", {})]
    if missing:
        raise ValueError(f"{path.name} is not a viz_data.pt file: missing keys {missing}")
    return data


def _check_losses(path: Path, data: dict) -> None:
    """Every loss the file records must be a finite number: NaN or an infinity is no reading, and is refused."""
    imp = data["importances"]
    found = [("importances.loss", imp["loss"]), ("importances.interv_loss", imp["interv_loss"])]
    found += [(f"importances.ch_interv_losses[{loc!r}][{i}]", v)
              for loc, values in (imp.get("ch_interv_losses") or {}).items() for i, v in enumerate(values)]
    found += [(f"importances.layer_interv_losses[{k!r}]", v) for k, v in (imp.get("layer_interv_losses") or {}).items()]
    found += [(f"all_loss[{i}]", row[1]) for i, row in enumerate(data.get("all_loss") or [])]
    for where, value in found:
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{path.name}: {where} is not a number ({type(value).__name__})") from None
        if not math.isfinite(number):
            raise ValueError(f"{path.name}: {where} is {number}, not a finite loss; the file is refused")


def _floats(t) -> list:
    """Tensor/list -> nested lists of floats rounded to 6 significant digits (smaller JSON)."""
    t = torch.as_tensor(t)
    if t.dim() == 0:
        return float(f"{float(t):.6g}")
    return [_floats(row) for row in t] if t.dim() > 1 else [float(f"{v:.6g}") for v in t.tolist()]


def _example(ex) -> dict[str, Any]:
    tokens, acts, position = ex
    return {"tokens": torch.as_tensor(tokens).tolist(), "activations": _floats(acts), "position": int(position)}


def _node_data(data: dict, nodes: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for loc, channels in (data.get("samples") or {}).items():
        for ch, by_frac in channels.items():
            entry = out.setdefault(node_id(loc, int(ch)), {"top": {}, "bottom": {}})
            for frac, (bottom, top) in by_frac.items():
                entry["bottom"][str(frac)] = [_example(e) for e in bottom]
                entry["top"][str(frac)] = [_example(e) for e in top]
    task_samples = data["importances"].get("task_samples")
    if task_samples is not None:
        for loc, channels in task_samples[1].items():
            for ch, acts in channels.items():
                out.setdefault(node_id(loc, int(ch)), {})["task_activations"] = _floats(acts)
    return {n: v for n, v in out.items() if n in nodes}


def import_viz_data(path: str | Path, model_name: str | None = None) -> CircuitGraph:
    """Reads a visualizer `viz_data.pt` into a CircuitGraph (see the module docstring)."""
    path = Path(path)
    data = _load(path)
    _check_losses(path, data)
    imp = data["importances"]
    half = lambda x: None if x is None else float(x) / 2  # noqa: E731
    circuit_loss = half(imp["interv_loss"])

    nodes: dict[str, float | None] = {}
    ch_losses = imp.get("ch_interv_losses") or {}
    for loc, channels in data["circuit_data"].items():
        parse_location(loc)
        channels = torch.as_tensor(channels).tolist()
        losses = list(ch_losses.get(loc) or [])
        if losses and len(losses) != len(channels):
            raise ValueError(f"{path.name}: {loc} has {len(channels)} nodes but {len(losses)} ch_interv_losses")
        for i, ch in enumerate(channels):
            nodes[node_id(loc, ch)] = half(losses[i]) - circuit_loss if losses else None

    edges = []
    for weights, src_channels, tgt_channels, (src, tgt) in imp["pair_data"]:
        weights = torch.as_tensor(weights)  # (n_src, n_tgt)
        for si, ti in weights.nonzero().tolist():
            s, t = node_id(src, src_channels[si]), node_id(tgt, tgt_channels[ti])
            if s not in nodes or t not in nodes:
                raise ValueError(f"{path.name}: pair_data edge {s} -> {t} joins nodes missing from circuit_data")
            edges.append(Edge(s, t, float(weights[si, ti])))

    config = dict(imp.get("beeg_model_config") or {})
    model = {"name": model_name or config.get("name") or "unknown (imported from viz_data.pt)"}
    if config:
        config.setdefault("d_head", config.get("d_model", 0) // max(config.get("n_head", 1), 1))
        config.setdefault("d_mlp", 4 * config.get("d_model", 0))
        config["d_model_in"] = config.get("d_model", 0) + (config.get("d_pos_emb") or 0)
        model.update({f: int(config[f]) for f in ARCH_FIELDS if f in config})
        model["config_hash"] = config_hash(model)

    prune_config = dict(data.get("prune_config") or {})
    docs = imp["task_samples"][0] if imp.get("task_samples") is not None else None
    circuit = CircuitGraph(
        model=model, nodes=nodes, edges=edges, task=prune_config.get("task"),
        ablation=prune_config.get("ablation", "mean"), target_loss=prune_config.get("target_loss"),
        k=prune_config.get("k", len(nodes)),
        layer_deltas={k: half(v) - circuit_loss for k, v in (imp.get("layer_interv_losses") or {}).items()},
        losses={"full": half(imp["loss"]), "circuit": circuit_loss, "random": None, "complement": None},
        pruning_curve=[[int(step), half(loss), None] for step, loss in data.get("all_loss") or []],
        node_data=_node_data(data, nodes),
        task_docs=torch.as_tensor(docs).tolist() if docs is not None else None,
        meta={"source": "viz_data.pt", "source_file": path.name, "prune_config": prune_config,
              "num_total_nodes": data.get("num_total_nodes"), "beeg_model_config": imp.get("beeg_model_config"),
              "losses_halved": True},
    )
    check_finite(circuit.to_dict(), path.name)  # edge weights, activations: a NaN there is no reading either
    return circuit


__all__ = ["import_viz_data"]
