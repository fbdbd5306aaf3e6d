"""Circuits of weight-sparse transformers: nodes, edges and the `csp-circuit` JSON file format.

A *node* is one channel at one of eight locations per layer (the model's hook names):

    {l}.attn.act_in       residual read channels of attention (after the norm), width d_model_in
    {l}.attn.q|k|v        query / key / value channels, width n_head * d_head (head = index // d_head)
    {l}.attn.resid_delta  residual write channels of attention, width d_model
    {l}.mlp.act_in        residual read channels of the MLP, width d_model_in
    {l}.mlp.post_act      MLP neurons, width d_mlp
    {l}.mlp.resid_delta   residual write channels of the MLP, width d_model

Ablating a node replaces its activation by its mean (or zero); a circuit is the set of kept nodes.

*Edges* are the model's nonzero weights between kept nodes, so they are read off the weights, not learned:

    act_in -> q, k, v           rows of attn.c_attn (q|k|v stacked)           kind "weight"
    v -> attn.resid_delta       attn.c_proj columns: the attention output y has the same channels as v
                                (y is a per-head mix of v over positions), so c_proj[:, j] links v_j
    act_in -> post_act          mlp.c_fc                                       kind "weight"
    post_act -> mlp.resid_delta mlp.c_proj                                     kind "weight"
    resid_delta -> act_in       same residual channel, any later sublayer      kind "residual", weight 1

q and k nodes have no outgoing weight edges: they act through the attention pattern of their head (q_i
pairs with k_i in the dot product), which no single weight describes. Residual edges have weight 1: the
residual stream adds the write channel to the later read channel unchanged; the norm in between rescales
every channel of a position by the same factor (times a fixed per-channel gain), which is not a weight
between two nodes. Channels of act_in past d_model (a concatenated position embedding) get no residual edges.

The file format is documented in docs/circuit_format.md and in `CircuitGraph.to_dict`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..utils.jsonio import dumps_strict, write_text_atomic

FORMAT, VERSION = "csp-circuit", 1
LOCATION_KINDS = (
    "attn.act_in", "attn.q", "attn.k", "attn.v", "attn.resid_delta",
    "mlp.act_in", "mlp.post_act", "mlp.resid_delta",
)
ARCH_FIELDS = ("n_layer", "d_model", "d_model_in", "d_mlp", "n_head", "d_head", "vocab_size")
REQUIRED_KEYS = ("format", "version", "model", "nodes", "edges")
EDGE_RTOL, EDGE_ATOL = 1e-2, 1e-6  # an edge matches its weight within this (bfloat16 rounding is 2**-8 relative)
MAX_LABEL_CHARS = 200  # one node label: a note, not a document
MAX_LABELS = 2000  # labels in one circuit
_LOCATION_RE = re.compile(r"^(\d+)\.(attn\.(?:act_in|q|k|v|resid_delta)|mlp\.(?:act_in|post_act|resid_delta))$")


# ---- locations and node ids ----------------------------------------------------------------


def node_locations(config) -> list[str]:
    """Every node location of a model, in forward order."""
    return [f"{l}.{kind}" for l in range(config.n_layer) for kind in LOCATION_KINDS]


def location_width(config, location: str) -> int:
    """Number of channels (nodes) at a location."""
    kind = parse_location(location)[1]
    if kind.endswith("act_in"):
        return config.d_model_in
    if kind.endswith("resid_delta"):
        return config.d_model
    if kind == "mlp.post_act":
        return config.d_mlp
    return config.n_head * config.d_head


def n_total_nodes(config) -> int:
    """Nodes of the whole model: every channel at every node location (the largest possible circuit)."""
    return sum(location_width(config, loc) for loc in node_locations(config))


def parse_location(location: str) -> tuple[int, str]:
    """'1.attn.q' -> (1, 'attn.q'); a ValueError names the accepted forms."""
    m = _LOCATION_RE.match(location)
    if not m:
        raise ValueError(f"unknown node location {location!r}; expected '{{layer}}.' + one of {', '.join(LOCATION_KINDS)}")
    return int(m.group(1)), m.group(2)


def node_id(location: str, index: int) -> str:
    return f"{location}:{int(index)}"


def parse_node_id(node: str) -> tuple[str, int]:
    """'1.attn.q:5' -> ('1.attn.q', 5)."""
    location, sep, index = node.rpartition(":")
    if not sep or not index.isdigit():
        raise ValueError(f"bad node id {node!r}; expected 'location:index' such as '0.mlp.post_act:12'")
    parse_location(location)
    return location, int(index)


def sublayer_order(location: str) -> int:
    """Position of a location's sublayer in the forward pass (0.attn=0, 0.mlp=1, 1.attn=2, ...)."""
    layer, kind = parse_location(location)
    return 2 * layer + (kind.startswith("mlp"))


# ---- model identity ------------------------------------------------------------------------


def model_info(model, name: str | None = None, with_weights_hash: bool = True) -> dict[str, Any]:
    """What a circuit file records about its model: name, architecture and hashes."""
    c = model.config
    info = {"name": name or getattr(c, "_name_or_path", "") or "unnamed"}
    info.update({f: int(getattr(c, f)) for f in ARCH_FIELDS})
    info["config_hash"] = config_hash(info)
    if with_weights_hash:
        info["weights_hash"] = weights_hash(model)
    return info


def config_hash(info: dict) -> str:
    arch = {f: info.get(f) for f in ARCH_FIELDS}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def weights_hash(model) -> str:
    """sha256 over every parameter and buffer (name, shape, bytes): same weights, same hash.

    Cached on the model until any tensor's version counter changes (in-place edits)."""
    tensors = sorted(model.state_dict().items())
    key = tuple((n, t._version, t.data_ptr()) for n, t in tensors)
    cached = getattr(model, "_csp_weights_hash", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()[:16]
    model._csp_weights_hash = (key, digest)
    return digest


def _describe(info: dict) -> str:
    arch = ", ".join(f"{f}={info[f]}" for f in ("n_layer", "d_model", "d_mlp", "n_head", "vocab_size") if f in info)
    return f"{info.get('name', 'unnamed')!r} ({arch})"


# ---- the graph -----------------------------------------------------------------------------


@dataclass
class Edge:
    source: str  # node id
    target: str
    weight: float
    kind: str = "weight"  # "weight" (a model weight) or "residual" (same residual channel, weight 1)


@dataclass
class CircuitDiff:
    """Nodes and edges (as (source, target) pairs) in one circuit, the other, or both."""

    nodes_only_self: list[str]
    nodes_only_other: list[str]
    nodes_both: list[str]
    edges_only_self: list[tuple[str, str]]
    edges_only_other: list[tuple[str, str]]
    edges_both: list[tuple[str, str]]


@dataclass
class CircuitGraph:
    """A circuit: kept nodes (node id -> importance), the edges between them, and how it was found.

    `importance` is the task-loss increase when that node alone is ablated from the circuit (None when
    unknown). `losses` holds task losses (nats, binary cross-entropy over the two candidates):
    full model, circuit, random circuits of the same size per location, complement (only the circuit ablated).
    """

    model: dict[str, Any]
    nodes: dict[str, float | None] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    task: str | None = None
    ablation: str = "mean"
    target_loss: float | None = None
    k: int | None = None
    layer_deltas: dict[str, float] = field(default_factory=dict)
    losses: dict[str, float | None] = field(default_factory=dict)
    pruning_curve: list[list] = field(default_factory=list)
    node_data: dict[str, Any] | None = None
    task_docs: list[list[int]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    control: dict[str, Any] | None = None  # the same task with shuffled answers, pruned alike (pruning.run_control)
    labels: dict[str, str] = field(default_factory=dict)  # a researcher's notes on nodes {node id: text}
    # what loading changed and the user should hear (edges recomputed from the model's weights); not saved
    notices: list[str] = field(default_factory=list, repr=False, compare=False)

    # -- building --------------------------------------------------------------------------

    @classmethod
    def from_masks(
        cls,
        model,
        masks: dict[str, torch.Tensor],
        importances: dict[str, float] | None = None,
        model_name: str | None = None,
        **fields,
    ) -> "CircuitGraph":
        """Builds a circuit from keep masks {location: bool (width,)}, with edges from the model's weights.

        Locations missing from `masks` count as fully ablated (no nodes kept there)."""
        config = model.config
        kept = {}
        for loc in node_locations(config):
            m = masks.get(loc)
            if m is None:
                continue
            m = torch.as_tensor(m).bool().flatten()
            if m.numel() != location_width(config, loc):
                raise ValueError(f"mask for {loc} has {m.numel()} entries, the location has {location_width(config, loc)}")
            idx = m.nonzero().flatten().tolist()
            if idx:
                kept[loc] = idx
        unknown = sorted(set(masks) - set(node_locations(config)))
        if unknown:
            raise ValueError(f"masks for unknown locations {unknown}")
        importances = importances or {}
        nodes = {node_id(loc, i): importances.get(node_id(loc, i)) for loc, idx in kept.items() for i in idx}
        graph = cls(model=model_info(model, model_name), nodes=nodes, edges=compute_edges(model, kept), **fields)
        graph.k = graph.k if graph.k is not None else len(nodes)
        return graph

    # -- views -----------------------------------------------------------------------------

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def node_indices(self) -> dict[str, list[int]]:
        """{location: sorted kept channel indices}."""
        out: dict[str, list[int]] = {}
        for n in self.nodes:
            loc, i = parse_node_id(n)
            out.setdefault(loc, []).append(i)
        return {loc: sorted(v) for loc, v in out.items()}

    def masks(self, config, device=None) -> dict[str, torch.Tensor]:
        """Bool keep masks for every node location of a model (all False where nothing is kept), on `device`."""
        out = {loc: torch.zeros(location_width(config, loc), dtype=torch.bool) for loc in node_locations(config)}
        for loc, idx in self.node_indices().items():
            if loc not in out:
                raise ValueError(f"circuit has nodes at {loc}, which this model does not have")
            if max(idx) >= out[loc].numel():
                raise ValueError(f"circuit node {loc}:{max(idx)} is out of range (width {out[loc].numel()})")
            out[loc][idx] = True
        return {loc: m.to(device) for loc, m in out.items()} if device is not None else out

    def with_labels(self, labels: dict[str, str]) -> "CircuitGraph":
        """A copy with `labels` ({node id: text}) merged into this circuit's labels; an empty text removes that
        node's label. ValueError (naming the node and the cap) for a node not in the circuit, a text longer than
        MAX_LABEL_CHARS or more than MAX_LABELS labels in all."""
        merged = dict(self.labels)
        for node, text in labels.items():
            text = clean_label(text, node)
            if node not in self.nodes:
                raise ValueError(f"cannot label {node!r}: it is not a node of this circuit (pick one of its "
                                 f"{self.n_nodes} nodes, e.g. {next(iter(self.nodes), 'none')!r})")
            if text:
                merged[node] = text
            else:
                merged.pop(node, None)
        check_labels(merged, self.nodes)
        return replace(self, labels=merged, notices=list(self.notices))

    def diff(self, other: "CircuitGraph") -> CircuitDiff:
        a, b = set(self.nodes), set(other.nodes)
        ea, eb = {(e.source, e.target) for e in self.edges}, {(e.source, e.target) for e in other.edges}
        return CircuitDiff(
            nodes_only_self=sorted(a - b), nodes_only_other=sorted(b - a), nodes_both=sorted(a & b),
            edges_only_self=sorted(ea - eb), edges_only_other=sorted(eb - ea), edges_both=sorted(ea & eb),
        )

    # -- model check -----------------------------------------------------------------------

    def check_model(self, model, name: str | None = None) -> None:
        """Raises ValueError unless this circuit was made for `model` (architecture, and weights if known)."""
        mine, theirs = self.model, model_info(model, name, with_weights_hash="weights_hash" in self.model)
        arch_differs = any(f in mine and mine[f] != theirs[f] for f in ARCH_FIELDS)
        weights_differ = "weights_hash" in mine and mine["weights_hash"] != theirs.get("weights_hash")
        if arch_differs or weights_differ:
            why = "" if arch_differs else " (same architecture, different weights)"
            raise ValueError(f"circuit was made for model {_describe(mine)}, not {_describe(theirs)}{why}")
        self.masks(model.config)  # node indices in range

    def match_weights(self, model, rtol: float = EDGE_RTOL, atol: float = EDGE_ATOL) -> str | None:
        """Checks every edge against the model's weights; when any is wrong, replaces all edges by the ones
        recomputed from the weights (`compute_edges`) and returns a notice saying so (also kept in `notices`).

        An edge is wrong when its weight is zero or absent in the model (a pair of locations no weight joins,
        a zero entry), differs from the model's by more than `atol + rtol * |model's|` (rtol covers bfloat16
        rounding), is listed twice, or is a residual edge the residual stream does not carry (see the module
        docstring). A file may list fewer edges than the model has (the original visualizer's files do): that
        is not wrong. Recomputed edges of a circuit that had no residual edges get none either."""
        if not self.edges:
            return None
        config = model.config
        kept = self.node_indices()
        where = {n: parse_node_id(n) for n in self.nodes}
        matrices = {(src, tgt): w for layer in range(config.n_layer) for src, tgt, w in weight_pairs(model, layer)}
        groups: dict[tuple[str, str], list[int]] = {}
        bad: list[int] = []
        seen: set[tuple[str, str, str]] = set()
        for i, e in enumerate(self.edges):
            key = (e.source, e.target, e.kind)
            (s_loc, s_idx), (t_loc, t_idx) = where[e.source], where[e.target]
            if key in seen:
                bad.append(i)
            elif e.kind == "weight" and (s_loc, t_loc) in matrices:
                groups.setdefault((s_loc, t_loc), []).append(i)
            elif not (e.kind == "residual" and e.weight == 1.0 and s_idx == t_idx and s_idx < config.d_model
                      and s_loc.endswith("resid_delta") and t_loc.endswith("act_in")
                      and sublayer_order(t_loc) > sublayer_order(s_loc)):
                bad.append(i)
            seen.add(key)
        for pair, members in groups.items():
            w = matrices[pair]
            rows = torch.tensor([where[self.edges[i].target][1] for i in members])
            cols = torch.tensor([where[self.edges[i].source][1] for i in members])
            expected = w[rows, cols].float()
            given = torch.tensor([self.edges[i].weight for i in members], dtype=torch.float32)
            wrong = (expected == 0) | ((given - expected).abs() > atol + rtol * expected.abs())
            bad.extend(members[j] for j in wrong.nonzero().flatten().tolist())
        if not bad:
            return None
        first = self.edges[min(bad)]
        model_weight = _model_weight(matrices, where[first.source], where[first.target]) if first.kind == "weight" else None
        has_residual = any(e.kind == "residual" for e in self.edges)
        recomputed = [e for e in compute_edges(model, kept) if has_residual or e.kind != "residual"]
        notice = (f"{len(bad):,} of {len(self.edges):,} edges do not match the model's weights (first: "
                  f"{first.source} -> {first.target}, {first.kind} {first.weight:.6g}"
                  + ("" if first.kind != "weight" else
                     ", no such weight in the model" if model_weight is None else f", the model's weight {model_weight:.6g}")
                  + f"); the edges were recomputed from the model's weights: {len(recomputed):,} edges")
        self.edges = recomputed
        self.notices.append(notice)
        return notice

    # -- file format -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written by `save` (see docs/circuit_format.md):

            {"format": "csp-circuit", "version": 1,
             "model": {"name", "n_layer", "d_model", "d_model_in", "d_mlp", "n_head", "d_head",
                       "vocab_size", "config_hash", "weights_hash" (optional)},
             "task", "ablation": "mean"|"zero", "target_loss", "k",
             "nodes": [{"location", "index", "importance"}],
             "edges": [{"source": "loc:idx", "target": "loc:idx", "weight", "kind"}],
             "layer_deltas": {"0.attn": delta, ...}, "losses": {"full", "circuit", "random", "complement"},
             "pruning_curve": [[step, loss, n_kept]],
             "node_data" (optional): {"loc:idx": {"top": {frac: [...]}, "bottom": {...}, "task_activations": [...]}},
             "task_docs" (optional): [[token ids]], "meta": {...},
             "control" (optional): {"kind": "shuffled", "k", "loss_at_k", "k_to_target", "reached", ...},
             "labels" (optional): {"loc:idx": "a researcher's note on the node"}}
        """
        out = {
            "format": FORMAT, "version": VERSION, "model": self.model, "task": self.task, "ablation": self.ablation,
            "target_loss": self.target_loss, "k": self.k,
            "nodes": [{"location": parse_node_id(n)[0], "index": parse_node_id(n)[1], "importance": imp}
                      for n, imp in self.nodes.items()],
            "edges": [{"source": e.source, "target": e.target, "weight": e.weight, "kind": e.kind} for e in self.edges],
            "layer_deltas": self.layer_deltas, "losses": self.losses, "pruning_curve": self.pruning_curve,
            "meta": self.meta,
        }
        if self.node_data is not None:
            out["node_data"] = self.node_data
        if self.task_docs is not None:
            out["task_docs"] = self.task_docs
        if self.control is not None:
            out["control"] = self.control
        if self.labels:
            out["labels"] = dict(self.labels)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "circuit") -> "CircuitGraph":
        """Parses and checks a `to_dict` object; ValueError says what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} is not a csp-circuit file: expected a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a csp-circuit file (format={data.get('format')!r}, missing keys {missing})")
        if data.get("version") != VERSION:
            raise ValueError(f"{source} has csp-circuit version {data.get('version')!r}; this code reads version {VERSION}")
        if missing:
            raise ValueError(f"{source} is missing keys {missing}")
        check_finite(data, source)
        for key in ("losses", "layer_deltas"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise ValueError(f"{source}: '{key}' must be an object")
            for name, value in (data.get(key) or {}).items():
                _check_number(value, f"{source}: {key}.{name}")
        _check_number(data.get("target_loss"), f"{source}: target_loss")
        if not isinstance(data["model"], dict):
            raise ValueError(f"{source}: 'model' must be an object")
        try:
            nodes = {}
            for n in data["nodes"]:
                parse_location(n["location"])
                nodes[node_id(n["location"], int(n["index"]))] = _opt_float(n.get("importance"))
            edges = []
            for e in data["edges"]:
                for end in (e["source"], e["target"]):
                    if end not in nodes:
                        parse_node_id(end)  # a malformed id says so
                        raise ValueError(f"edge endpoint {end} is not a node of the circuit")
                edges.append(Edge(e["source"], e["target"], float(e["weight"]), e.get("kind", "weight")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{source}: malformed node or edge entry ({type(exc).__name__}: {exc})") from None
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        if data.get("control") is not None and not isinstance(data["control"], dict):
            raise ValueError(f"{source}: 'control' must be an object or null")
        if data.get("ablation", "mean") not in ("mean", "zero"):
            raise ValueError(f"{source}: ablation must be 'mean' or 'zero', not {data.get('ablation')!r}")
        labels = {} if data.get("labels") is None else data["labels"]
        if not isinstance(labels, dict):
            raise ValueError(f"{source}: 'labels' must be an object {{node id: text}}")
        try:
            labels = {node: clean_label(text, node) for node, text in labels.items()}
            check_labels(labels, nodes)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        return cls(
            model=data["model"], nodes=nodes, edges=edges, task=data.get("task"), ablation=data.get("ablation", "mean"),
            target_loss=_opt_float(data.get("target_loss")), k=data.get("k"),
            layer_deltas=dict(data.get("layer_deltas") or {}), losses=dict(data.get("losses") or {}),
            pruning_curve=list(data.get("pruning_curve") or []), node_data=data.get("node_data"),
            task_docs=data.get("task_docs"), meta=dict(data.get("meta") or {}), control=data.get("control"),
            labels={node: text for node, text in labels.items() if text},
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        bulky = {key: data.pop(key) for key in ("pruning_curve", "node_data", "task_docs") if key in data}
        text = dumps_strict(data, indent=1)
        if bulky:  # one compact line each: readable headers, small files
            text = text[:-2] + ",\n" + ",\n".join(f" {json.dumps(k)}: {dumps_strict(v, separators=(',', ':'))}"
                                                   for k, v in bulky.items()) + "\n}"
        return write_text_atomic(path, text + "\n")

    @classmethod
    def load(cls, path: str | Path, model=None, model_name: str | None = None) -> "CircuitGraph":
        """Reads a circuit file; with `model`, also checks that the circuit was made for it and that its edges are
        the model's weights (else they are recomputed, with a notice in `notices`: see `match_weights`)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"circuit file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a csp-circuit file: not valid JSON ({exc})") from None
        graph = cls.from_dict(data, source=str(path))
        if model is not None:
            graph.check_model(model, model_name)
            graph.match_weights(model)
        return graph


def clean_label(text: Any, node: str = "node") -> str:
    """A label as stored: a string, stripped, at most MAX_LABEL_CHARS characters (ValueError otherwise)."""
    if not isinstance(text, str):
        raise ValueError(f"the label of {node!r} must be text, not {type(text).__name__}")
    text = text.strip()
    if len(text) > MAX_LABEL_CHARS:
        raise ValueError(f"the label of {node!r} has {len(text)} characters; shorten it to at most {MAX_LABEL_CHARS}")
    return text


def check_labels(labels: dict[str, str], nodes) -> None:
    """ValueError when a label names a node outside `nodes` or there are more than MAX_LABELS."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} node labels; a circuit holds at most {MAX_LABELS}: remove some first")
    for node in labels:
        if node not in nodes:
            raise ValueError(f"label for {node!r}, which is not a node of the circuit; remove it or label a node "
                             "the circuit has")


def _opt_float(x) -> float | None:
    return None if x is None else float(x)


def _check_number(value, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{what} is {value!r}: expected a number, or null when unknown")


def _first_non_finite(obj, where: str) -> tuple[str, float] | None:
    """(field path, value) of the first NaN or infinite float in a parsed JSON value, else None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where, obj)
    if isinstance(obj, dict):
        items = ((f"{where}.{key}" if where else str(key), value) for key, value in obj.items())
    elif isinstance(obj, list):
        items = ((f"{where}[{i}]", value) for i, value in enumerate(obj))
    else:
        return None
    for path, value in items:  # floats inline: node data holds millions of them
        if isinstance(value, float):
            if not math.isfinite(value):
                return path, value
        elif isinstance(value, (dict, list)):
            found = _first_non_finite(value, path)
            if found:
                return found
    return None


def check_finite(data: Any, source: str = "circuit") -> None:
    """ValueError naming the file and field when a circuit holds NaN or an infinity (a loss, a weight, an
    activation): such a number is no reading at all, and a strict JSON file cannot even hold it."""
    try:
        json.dumps(data, allow_nan=False)  # at C speed; the walk below only runs to name the field
        return
    except (ValueError, TypeError):
        pass
    found = _first_non_finite(data, "")
    if found:
        raise ValueError(f"{source}: {found[0]} is {found[1]}, not a finite number (a value that was not computed "
                         "is null); the file is refused")


# ---- edges from weights --------------------------------------------------------------------

def _model_weight(matrices, source: tuple[str, int], target: tuple[str, int]) -> float | None:
    w = matrices.get((source[0], target[0]))
    if w is None or target[1] >= w.shape[0] or source[1] >= w.shape[1] or w[target[1], source[1]] == 0:
        return None
    return float(w[target[1], source[1]])



def weight_pairs(model, layer: int) -> list[tuple[str, str, torch.Tensor]]:
    """(source location, target location, weight (target width x source width)) of one layer."""
    block = model.transformer.h[layer]
    width = model.config.n_head * model.config.d_head
    c_attn = block.attn.c_attn.weight.detach()
    p = f"{layer}."
    return [
        (p + "attn.act_in", p + "attn.q", c_attn[:width]),
        (p + "attn.act_in", p + "attn.k", c_attn[width : 2 * width]),
        (p + "attn.act_in", p + "attn.v", c_attn[2 * width :]),
        (p + "attn.v", p + "attn.resid_delta", block.attn.c_proj.weight.detach()),
        (p + "mlp.act_in", p + "mlp.post_act", block.mlp.c_fc.weight.detach()),
        (p + "mlp.post_act", p + "mlp.resid_delta", block.mlp.c_proj.weight.detach()),
    ]


def compute_edges(model, kept: dict[str, list[int]]) -> list[Edge]:
    """Nonzero weights between kept nodes, plus residual edges (see the module docstring)."""
    edges = []
    for layer in range(model.config.n_layer):
        for src, tgt, w in weight_pairs(model, layer):
            s_idx, t_idx = kept.get(src, []), kept.get(tgt, [])
            if not s_idx or not t_idx:
                continue
            sub = w[t_idx][:, s_idx].float()  # (n_tgt, n_src)
            nonzero = sub.nonzero()
            values = sub[nonzero[:, 0], nonzero[:, 1]].tolist()
            s_ids, t_ids = [node_id(src, i) for i in s_idx], [node_id(tgt, i) for i in t_idx]
            edges.extend(Edge(s_ids[si], t_ids[ti], v) for (ti, si), v in zip(nonzero.tolist(), values))
    writes = [loc for loc in kept if loc.endswith("resid_delta")]
    reads = [loc for loc in kept if loc.endswith("act_in")]
    for w in sorted(writes, key=sublayer_order):
        for r in sorted(reads, key=sublayer_order):
            if sublayer_order(r) > sublayer_order(w):
                for c in sorted(set(kept[w]) & set(kept[r])):
                    edges.append(Edge(node_id(w, c), node_id(r, c), 1.0, "residual"))
    return edges


# ---- per-node activation data -------------------------------------------------------------

QUANTILES = (0.001, 0.01, 0.1, 0.5)


def quantile_examples(acts: torch.Tensor, windows: torch.Tensor, per_side: int = 2, before: int = 16, after: int = 4,
                      quantiles=QUANTILES) -> dict[str, dict[str, list]]:
    """{"top"|"bottom": {fraction: [{"tokens", "activations", "position"}]}} for one node.

    `acts` (n, T) are the node's activations on the token windows `windows` (n, T). The examples at fraction
    f are the windows (one per window) whose activation ranks at the top (bottom) f of all positions, cut to
    `before` tokens before and `after` tokens after the peak; `position` is the peak's index in the cut."""
    n, T = acts.shape
    flat = acts.float().flatten()
    order = flat.argsort(descending=True)
    out: dict[str, dict[str, list]] = {"top": {}, "bottom": {}}
    for frac in quantiles:
        for side, ranked in (("top", order), ("bottom", order.flip(0))):
            start = min(int(frac * flat.numel()), flat.numel() - 1)
            picked, seen = [], set()
            for idx in ranked[start: start + 400].tolist():
                w, pos = divmod(idx, T)
                if w in seen:
                    continue
                seen.add(w)
                lo, hi = max(0, pos - before), min(T, pos + after + 1)
                picked.append({"tokens": windows[w, lo:hi].tolist(),
                               "activations": [round(a, 4) for a in acts[w, lo:hi].float().tolist()], "position": pos - lo})
                if len(picked) >= per_side:
                    break
            out[side][str(frac)] = picked
    return out


@torch.no_grad()
def record_node_activations(model, input_ids: torch.Tensor, locations, attention_mask=None, batch_size: int = 32,
                            channels: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """{location: (n, T, width) float16} activations of the model on `input_ids`, batch by batch; with
    `channels`, only those channels of each location ((n, T, len(channels[loc])), in that order): a circuit's
    nodes of a released-size model, without every channel of their locations."""
    from ..utils.devices import input_device

    device = input_device(model)
    store: dict[str, list[torch.Tensor]] = {loc: [] for loc in locations}
    for start in range(0, input_ids.shape[0], batch_size):
        mask = None if attention_mask is None else attention_mask[start: start + batch_size]
        ids = input_ids[start: start + batch_size].to(device)
        with model.record_activations(list(locations)) as acts:
            model(ids, attention_mask=None if mask is None else mask.to(device), use_cache=False, logits_to_keep=1)
        for loc in locations:
            kept = acts[loc] if channels is None else acts[loc][..., channels[loc]]
            store[loc].append(kept.to(torch.float16))
    return {loc: torch.cat(v) for loc, v in store.items()}


def attach_node_data(model, circuit: "CircuitGraph", windows: torch.Tensor, batch=None, per_side: int = 2,
                     max_task_docs: int = 16) -> "CircuitGraph":
    """Stores in `circuit` every node's quantile examples on `windows` (pretraining-like text, (n, T) ids)
    and, with a task `batch`, its activations on up to `max_task_docs` of the task's prompts (`task_docs`:
    class 1, the examples whose correct candidate sorts first, then class 2, half each), as the file format
    describes. Returns the circuit."""
    channels: dict[str, list[int]] = {}
    for n in circuit.nodes:
        loc, ch = parse_node_id(n)
        channels.setdefault(loc, []).append(ch)
    locations = sorted(channels, key=sublayer_order)
    column = {n: channels[loc].index(ch) for n in circuit.nodes for loc, ch in [parse_node_id(n)]}
    acts = record_node_activations(model, windows, locations, channels=channels)
    node_data = {n: quantile_examples(acts[parse_node_id(n)[0]][:, :, column[n]], windows, per_side) for n in circuit.nodes}
    if batch is not None:
        first = ([ex.correct == min(ex.correct, ex.alternative) for ex in batch.examples] if batch.examples
                 else (batch.correct_ids <= batch.alternative_ids).tolist())  # no spellings: order by token id
        classes = ([i for i, f in enumerate(first) if f], [i for i, f in enumerate(first) if not f])
        order = classes[0][: max_task_docs // 2] + classes[1][: max_task_docs - min(len(classes[0]), max_task_docs // 2)]
        ids, mask = batch.input_ids[order], batch.attention_mask[order]  # only the prompts that are stored
        task_acts = record_node_activations(model, ids, locations, mask, channels=channels)
        starts = [ids.shape[1] - int(n) for n in mask.sum(1).tolist()]  # left padding
        circuit.task_docs = [ids[j, start:].tolist() for j, start in enumerate(starts)]
        for n in circuit.nodes:
            loc = parse_node_id(n)[0]
            node_data[n]["task_activations"] = [
                [round(a, 4) for a in task_acts[loc][j, start:, column[n]].float().tolist()] for j, start in enumerate(starts)
            ]
    circuit.node_data = node_data
    return circuit


__all__ = [
    "CircuitGraph", "CircuitDiff", "Edge", "LOCATION_KINDS", "node_locations", "location_width", "n_total_nodes", "node_id",
    "parse_node_id", "parse_location", "model_info", "weights_hash", "compute_edges", "weight_pairs", "check_finite",
    "QUANTILES", "quantile_examples", "MAX_LABEL_CHARS", "MAX_LABELS", "clean_label", "check_labels", "record_node_activations", "attach_node_data",
]
