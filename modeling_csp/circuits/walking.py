"""Walking a circuit: the paths into and out of a node, and why a node takes the value it does.

    from modeling_csp.circuits.walking import upstream, downstream, why_node
    up = upstream(circuit, "1.mlp.post_act:37")      # Walk: the nodes and edges on paths into it
    down = downstream(circuit, "1.mlp.post_act:37")  # ... and out of it, to the last write channels
    why = why_node(model, circuit, "1.mlp.post_act:37", means)  # its inputs ranked by weight x mean activation

Paths follow the circuit's own edges (`graph.compute_edges`: weights between kept nodes and residual edges), so
a walk never leaves the circuit. q and k nodes have no outgoing edges (they act through their head's pattern),
so their downstream walk is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .graph import LOCATION_KINDS, CircuitGraph, Edge, parse_location, parse_node_id


@dataclass
class Walk:
    """The nodes (forward order, without `node` itself) and edges on every circuit path into ("upstream") or out
    of ("downstream") `node`."""

    node: str
    direction: str
    nodes: list[str] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)


def forward_order(node: str) -> tuple[int, int, int]:
    """Sort key: nodes in the order the forward pass computes them (layer, location kind, channel)."""
    location, index = parse_node_id(node)
    layer, kind = parse_location(location)
    return layer, LOCATION_KINDS.index(kind), index


def _check_node(circuit: CircuitGraph, node: str) -> None:
    parse_node_id(node)  # a malformed id names the accepted form
    if node not in circuit.nodes:
        some = ", ".join(sorted(circuit.nodes, key=forward_order)[:3])
        raise ValueError(f"node {node!r} is not in the circuit ({circuit.n_nodes} nodes); pick one of its nodes, "
                         f"such as {some}")


def _walk(circuit: CircuitGraph, node: str, direction: str) -> Walk:
    _check_node(circuit, node)
    forward = direction == "downstream"
    neighbours: dict[str, list[Edge]] = {}
    for e in circuit.edges:
        neighbours.setdefault(e.source if forward else e.target, []).append(e)
    reached, frontier = {node}, [node]
    while frontier:
        for e in neighbours.get(frontier.pop(), ()):
            nxt = e.target if forward else e.source
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    # an edge lies on a path through `node` exactly when both its ends were reached (the graph runs forward only)
    edges = [e for e in circuit.edges if e.source in reached and e.target in reached]
    return Walk(node, direction, sorted(reached - {node}, key=forward_order), edges)


def upstream(circuit: CircuitGraph, node: str) -> Walk:
    """The circuit's nodes and edges on paths into `node` (everything it can be computed from, inside the circuit)."""
    return _walk(circuit, node, "upstream")


def downstream(circuit: CircuitGraph, node: str) -> Walk:
    """The circuit's nodes and edges on paths out of `node` (everything it feeds, inside the circuit)."""
    return _walk(circuit, node, "downstream")


@dataclass
class Contribution:
    """One input of a node: `weight` (the edge's), `mean` (the source's mean activation) and their product."""

    source: str
    weight: float
    mean: float
    contribution: float
    kind: str = "weight"


def why_node(model, circuit: CircuitGraph, node: str, means: dict[str, torch.Tensor], top: int | None = None
             ) -> list[Contribution]:
    """The node's inputs in the circuit ranked by |weight x mean activation|, largest first (at most `top`).

    The mean is the signed mean activation over held-out text, the one the circuit's mean ablation puts in place of
    an ablated node (`ablation.compute_mean_activations`; pass its result as `means`). Signed, because then
    weight x mean is the input's expected contribution to the node's pre-activation: summed over every input of
    the node in the whole model (plus the layer's bias, if any) it is the mean of that pre-activation, exactly for
    a linear read (q, k, v from act_in; an MLP neuron's pre-activation; a write channel from its neurons) before
    any AbsTopK. An input that fires often but both ways gets a small mean: the node's activating examples show it.
    Residual edges have weight 1 (the write channel adds to the later read channel; the read norm's scale is
    left out). `model` checks that the circuit belongs to it."""
    _check_node(circuit, node)
    circuit.check_model(model)
    rows = []
    for e in circuit.edges:
        if e.target != node:
            continue
        location, index = parse_node_id(e.source)
        if location not in means:
            raise ValueError(f"no mean activations for {location}: compute them with compute_mean_activations(model, ...)")
        mean = float(means[location][index])
        rows.append(Contribution(e.source, float(e.weight), mean, float(e.weight) * mean, e.kind))
    rows.sort(key=lambda r: (-abs(r.contribution), r.source))
    return rows[:top] if top is not None else rows


__all__ = ["forward_order", "Walk", "Contribution", "upstream", "downstream", "why_node"]
