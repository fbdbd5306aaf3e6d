"""Walking the circuit in the app: what the node panel's "What it does" tab shows for a node of a ModelEntry's
circuit (`circuits.logit_effects.describe_node`, with the model's held-out means and final-norm scale)."""

from __future__ import annotations

from typing import Any

from ..circuits.graph import CircuitGraph
from ..circuits.logit_effects import describe_node, mean_final_norm_scale
from .errors import UserError
from .models import ModelEntry

READING_TOP = 10  # tokens and inputs listed, as the issue asks


def final_norm_scale(entry: ModelEntry) -> float:
    """The final norm's mean 1/rms over the held-out windows the live examples use (cached per model)."""
    return entry.memo.get("stats", ("final_norm_scale",),
                          lambda: mean_final_norm_scale(entry.model, entry.example_windows()))


def node_reading(entry: ModelEntry, circuit: CircuitGraph, node: str, top: int = READING_TOP) -> dict[str, Any]:
    """`describe_node` for a node of `circuit` (a UserError when it is not one), cached per node and circuit (a
    circuit's edges follow from its nodes and the model)."""
    if node not in circuit.nodes:
        raise UserError(f"node {node!r} is not in this circuit")
    return entry.memo.get("examples", ("reading", node, top, frozenset(circuit.nodes)), lambda: describe_node(
        entry.model, entry.tokenizer, circuit, node, entry.means(), final_norm_scale(entry), top))
