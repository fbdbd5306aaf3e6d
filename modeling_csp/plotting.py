"""Plotly figures and token-heatmap HTML for circuits of weight-sparse transformers.

Every function here is a pure function of library data (a `CircuitGraph` or anything with the same
`nodes` / `edges` / `model` / `layer_deltas` attributes, plain lists, dicts and arrays): no model runs, no
I/O, so the app (`modeling_csp.app`) stays a thin layer and every figure is unit-testable.

Node ids are the circuits module's `"{location}:{index}"`, e.g. `"0.attn.q:37"`. Every node marker carries
its id in `customdata[0]`, so a front end can map a Plotly click back to a node.

    from .circuits.graph import CircuitGraph
    from . import plotting
    c = CircuitGraph.load("circuit.json")
    plotting.layer_graph_figure(c, "0.attn").show()
    plotting.circuit_overview_figure(c).show()
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = [
    "IMPORTANCE_COLORSCALE", "DIVERGING", "POSITIVE_HEX", "NEGATIVE_HEX", "node_label", "split_node", "sublayer_of", "layer_names", "layer_summary",
    "most_important_layer", "layer_node_ids", "layer_graph_figure", "circuit_overview_figure",
    "layer_bars_figure", "faithfulness_figure", "pruning_curve_figure", "training_curve_figure",
    "importance_bar_figure", "ablation_effect_figure", "next_tokens_figure", "token_heatmap_html",
    "tokens_html", "examples_html", "connections_html", "quantile_examples_html", "task_activations_figure",
    "attention_pattern_figure", "embedding_tokens_figure", "weights_histogram_figure",
    "position_embedding_figure", "circuit_diff_figure", "connections_table", "message_figure",
    "display_token", "task_examples_html", "attention_rows_html", "attention_grid_figure", "attention_tokens_html",
    "ATTENTION_TOKENS_JS", "patching_effects_html", "node_link", "node_reading_html", "label_hover",
    "activation_histogram_html",
]

# One colour convention everywhere: blue is positive, red is negative (edges, activations, importances, bars,
# heatmaps), white-ish is zero. Plotly's named "RdBu_r" puts red at the top (positive), and named scales are
# resolved differently by plotly.py and plotly.js, so the diverging scale is spelled out.
POSITIVE, NEGATIVE = (33, 102, 172), (178, 24, 43)
POSITIVE_HEX, NEGATIVE_HEX = "#2166ac", "#b2182b"
DIVERGING = [[0.0, "rgb(178,24,43)"], [0.25, "rgb(239,138,98)"], [0.5, "rgb(247,247,247)"],
             [0.75, "rgb(103,169,207)"], [1.0, "rgb(33,102,172)"]]
IMPORTANCE_COLORSCALE = DIVERGING  # importance > 0: ablating the node hurts (blue); < 0: it helps (red)
RESIDUAL_COLOR = "rgba(120,120,120,0.35)"
KIND_SYMBOL = {"q": "circle", "k": "diamond", "v": "square"}
SUBLAYER_COLORS = {"attn": "#3f7fbf", "mlp": "#e08a2c"}
_FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=12, color="#2a3f5f")
_COLORWAY = ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880"]


# ---- node ids and labels --------------------------------------------------------------------


def split_node(node: str) -> tuple[int, str, str, int]:
    """'1.attn.q:37' -> (1, 'attn', 'q', 37)."""
    location, _, index = node.rpartition(":")
    layer, sub, kind = location.split(".", 2)
    return int(layer), sub, kind, int(index)


def sublayer_of(node_or_location: str) -> str:
    """'1.attn.q:37' or '1.attn.q' -> '1.attn'."""
    layer, sub = node_or_location.split(".", 2)[:2]
    return f"{layer}.{sub}"


def node_label(node: str, d_head: int | None = None) -> str:
    """Short label: q/k/v channels as `h{head}.ch{channel}`, MLP neurons `n{i}`, residual channels `r{i}`."""
    _, sub, kind, index = split_node(node)
    if kind in ("q", "k", "v"):
        if d_head:
            return f"h{index // d_head}.ch{index % d_head}"
        return f"ch{index}"
    if kind == "post_act":
        return f"n{index}"
    return f"r{index}"


def node_detail(node: str, d_head: int | None) -> str:
    layer, sub, kind, index = split_node(node)
    if kind in ("q", "k", "v") and d_head:
        return f"{kind} of head {index // d_head}, channel {index % d_head} (index {index})"
    return {"act_in": "residual channel read", "resid_delta": "residual channel written",
            "post_act": "MLP neuron"}.get(kind, kind) + f" {index}"


def _d_head(circuit) -> int | None:
    model = getattr(circuit, "model", None) or {}
    return model.get("d_head") if isinstance(model, Mapping) else None


def _n_layer(circuit) -> int:
    model = getattr(circuit, "model", None) or {}
    n = model.get("n_layer") if isinstance(model, Mapping) else None
    if n:
        return int(n)
    layers = [split_node(n)[0] for n in circuit.nodes]
    return max(layers) + 1 if layers else 0


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x + 0.0:.{digits}g}"  # + 0.0: no "-0"


# ---- layer summaries ------------------------------------------------------------------------


def layer_names(n_layer: int) -> list[str]:
    return [f"{l}.{s}" for l in range(n_layer) for s in ("attn", "mlp")]


def layer_node_ids(circuit, layer: str) -> list[str]:
    """The circuit's nodes in one sublayer ('0.attn'), in display order (location, then index)."""
    order = {k: i for i, k in enumerate(("act_in", "q", "k", "v", "resid_delta", "post_act"))}
    nodes = [n for n in circuit.nodes if sublayer_of(n) == layer]
    return sorted(nodes, key=lambda n: (order.get(split_node(n)[2], 9), split_node(n)[3]))


def layer_summary(circuit, n_layer: int | None = None) -> list[dict[str, Any]]:
    """[{"layer": "0.attn", "delta": loss increase when ablated (or None), "n_nodes": int}] in forward order."""
    n_layer = n_layer if n_layer is not None else _n_layer(circuit)
    counts: dict[str, int] = defaultdict(int)
    for n in circuit.nodes:
        counts[sublayer_of(n)] += 1
    deltas = getattr(circuit, "layer_deltas", None) or {}
    return [{"layer": name, "delta": deltas.get(name), "n_nodes": counts.get(name, 0)} for name in layer_names(n_layer)]


def most_important_layer(circuit, n_layer: int | None = None) -> str | None:
    """The sublayer with the largest ablation delta (ties and missing deltas: most nodes)."""
    rows = [r for r in layer_summary(circuit, n_layer) if r["n_nodes"] > 0]
    if not rows:
        return None
    return max(rows, key=lambda r: (r["delta"] if r["delta"] is not None else -math.inf, r["n_nodes"]))["layer"]


# ---- figure helpers -------------------------------------------------------------------------


def _base_layout(fig: go.Figure, title: str | None = None, height: int | None = None, **kwargs) -> go.Figure:
    # The look of plotly_white, without its template (copying a full template costs ~30 ms per figure)
    fig.update_xaxes(gridcolor="#EBF0F8", linecolor="#EBF0F8", zerolinecolor="#EBF0F8", ticks="", automargin=True)
    fig.update_yaxes(gridcolor="#EBF0F8", linecolor="#EBF0F8", zerolinecolor="#EBF0F8", ticks="", automargin=True)
    fig.update_layout(
        template="none", paper_bgcolor="white", plot_bgcolor="white", colorway=_COLORWAY,
        font=_FONT, margin=dict(l=50, r=20, t=50 if title else 20, b=40),
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=14)) if title else None,
        hoverlabel=dict(font_size=12), **({"height": height} if height else {}), **kwargs,
    )
    return fig


def message_figure(text: str, height: int = 300) -> go.Figure:
    """An empty figure that shows a message (no data, an error) in its middle."""
    fig = go.Figure()
    fig.add_annotation(text=html.escape(text), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _base_layout(fig, height=height)


def _importance_range(values: Iterable[float | None]) -> tuple[float, float]:
    """A colour range symmetric around zero (zero is white), set by the largest |importance|."""
    vals = [abs(v) for v in values if v is not None and not math.isnan(v)]
    m = max(vals, default=0.0) or 1.0
    return -m, m


def _sign_colors(values: Iterable[float | None]) -> list[str]:
    return [NEGATIVE_HEX if (v is not None and v < 0) else POSITIVE_HEX for v in values]


def _log_ticks(values: Iterable[float | None]) -> dict[str, Any]:
    """Tick values and labels for a log axis over these values: 1, 2, 5 x 10^n written out in full (Plotly's
    own minor ticks are bare digits such as "2" and "5" that read as 2 and 5 at every decade)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    if not vals:
        return {}
    lo, hi = min(vals), max(vals)
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    steps = (1, 2, 5) if e1 - e0 <= 3 else (1,)
    ticks = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in steps]
    inside = [t for t in ticks if lo / 1.0001 <= t <= hi * 1.0001]
    if len(inside) < 2:  # a narrow range: the neighbouring ticks too
        below = [t for t in ticks if t < lo][-1:]
        above = [t for t in ticks if t > hi][:1]
        inside = below + inside + above
    return dict(tickvals=inside, ticktext=[f"{t:.4g}" for t in inside])


def _rgba(rgb: tuple[int, int, int], alpha: float) -> str:
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})"


def _edge_traces(segments: list[tuple[float, float, float, float, float, str]], max_abs: float,
                 n_bins: int = 4, hover: bool = True, name_prefix: str = "") -> list[go.BaseTraceType]:
    """Line traces for weighted edges, binned by |weight| (width and opacity) and sign (colour).

    segments: (x0, y0, x1, y1, weight, hover text). One extra invisible marker trace at the midpoints
    carries the hover text."""
    traces = []
    max_abs = max_abs or 1.0
    bins: dict[tuple[bool, int], list] = defaultdict(list)
    for seg in segments:
        w = seg[4]
        b = min(n_bins - 1, int(n_bins * abs(w) / max_abs)) if max_abs > 0 else 0
        bins[(w >= 0, b)].append(seg)
    for (positive, b), segs in sorted(bins.items()):
        xs, ys = [], []
        for x0, y0, x1, y1, _, _ in segs:
            xs += [x0, x1, None]
            ys += [y0, y1, None]
        frac = (b + 1) / n_bins
        traces.append(go.Scatter(
            x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
            line=dict(width=0.8 + 4.5 * frac, color=_rgba(POSITIVE if positive else NEGATIVE, 0.25 + 0.65 * frac)),
            name=f"{name_prefix}{'+' if positive else '-'} |w| bin {b}",
        ))
    if hover and segments:
        traces.append(go.Scatter(
            x=[(s[0] + s[2]) / 2 for s in segments], y=[(s[1] + s[3]) / 2 for s in segments], mode="markers",
            marker=dict(size=9, color="rgba(0,0,0,0)"), hovertext=[s[5] for s in segments], hoverinfo="text",
            showlegend=False, name="edges",
        ))
    return traces


def _node_trace(xs, ys, nodes: list[str], importances: list[float | None], d_head, symbols, labels=None,
                imp_range=(0.0, 1.0), size: int = 16, showscale: bool = True, text_position="top center",
                extra_hover: Mapping[str, str] | None = None, value_name: str | None = None) -> go.Scatter:
    """Node markers coloured by `importances` (or by other values, named `value_name` in hover and colour bar)."""
    lo, hi = imp_range
    colors = [v if v is not None else 0.0 for v in importances]
    hover = []
    for n, v in zip(nodes, importances):
        extra = (extra_hover or {}).get(n, "")
        hover.append(f"<b>{n}</b><br>{node_detail(n, d_head)}<br>{html.escape(value_name or 'importance')}: {_fmt(v)}{extra}")
    return go.Scatter(
        x=xs, y=ys, mode="markers+text" if labels else "markers", text=labels, textposition=text_position,
        textfont=dict(size=10, color="#333"), customdata=[[n] for n in nodes], hovertext=hover, hoverinfo="text",
        marker=dict(size=size, color=colors, colorscale=IMPORTANCE_COLORSCALE, cmin=lo, cmax=hi, symbol=symbols,
                    line=dict(width=1, color="#444"), showscale=showscale,
                    colorbar=dict(title=dict(text=html.escape(value_name or "importance (Δ loss)"), side="right"),
                                  thickness=12, len=0.8)),
        showlegend=False, name="nodes",
    )


def label_hover(circuit) -> dict[str, str]:
    """{node: hover line} for the circuit's node labels (a researcher's notes), escaped: a label is text, never
    markup."""
    return {n: "<br>label: " + html.escape(text, quote=False).replace("\n", "<br>")
            for n, text in (getattr(circuit, "labels", None) or {}).items()}


def _selected_trace(x: float, y: float, node: str) -> go.Scatter:
    return go.Scatter(x=[x], y=[y], mode="markers", customdata=[[node]], hoverinfo="skip", showlegend=False,
                      marker=dict(size=28, color="rgba(0,0,0,0)", line=dict(width=3, color="#111")), name="selected")


def _spread(n: int, width: float = 1.0) -> list[float]:
    """n x-positions centred on 0 with unit spacing (scaled by width)."""
    return [(i - (n - 1) / 2) * width for i in range(n)]


# ---- per-layer graph ------------------------------------------------------------------------


def _wrap_row(keys: list, gap_before: list[float], max_width: float) -> tuple[list[tuple[float, int]], int]:
    """Lays out a row of items left to right (`gap_before[i]`: the space before item i), wrapping onto a new
    line past `max_width`; returns [(x, line)] centred per line, and the number of lines."""
    lines: list[list[tuple[int, float]]] = [[]]
    x = 0.0
    for i, gap in enumerate(gap_before):
        if lines[-1]:
            x += gap
            if x > max_width:
                lines.append([])
                x = 0.0
        lines[-1].append((i, x))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(keys)
    for li, line in enumerate(lines):
        if not line:
            continue
        offset = line[-1][1] / 2
        for i, x in line:
            out[i] = (x - offset, li)
    return out, len([l for l in lines if l])


def _graph_label(node: str, d_head: int | None) -> str:
    """The label drawn next to a node in the layer graph: q/k/v channels as `ch{c}` (their head's band names
    the head), MLP neurons `n{i}`, residual channels `r{i}`."""
    _, _, kind, index = split_node(node)
    if kind in ("q", "k", "v") and d_head:
        return f"ch{index % d_head}"
    return node_label(node, d_head)


def _weight_segments(circuit, pos: Mapping[str, tuple[float, float]], min_weight: float, max_edges: int):
    """(segments to draw, the largest |weight|, a title phrase): weight edges between placed nodes with
    |weight| >= min_weight x the largest, strongest first, at most max_edges."""
    segs, max_abs = [], 0.0
    for e in circuit.edges:
        if e.source in pos and e.target in pos and getattr(e, "kind", "weight") == "weight":
            (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
            segs.append((x0, y0, x1, y1, float(e.weight), f"{e.source} → {e.target}<br>weight {e.weight:+.4g}"))
            max_abs = max(max_abs, abs(float(e.weight)))
    n_all = len(segs)
    if min_weight > 0:
        segs = [s for s in segs if abs(s[4]) >= min_weight * max_abs]
    n_above = len(segs)
    segs = sorted(segs, key=lambda sg: -abs(sg[4]))[:max_edges]
    phrase = (f"{n_above} of {n_all} weight edges with |w| ≥ {min_weight:.0%} of the largest" if n_above < n_all
              else f"{n_all} weight edges")
    if len(segs) < n_above:
        phrase += f", the {len(segs)} strongest drawn"
    return segs, max_abs, phrase


def _ring_trace(points: list[tuple[float, float, str]], name: str, color: str, size: int = 28) -> go.Scatter:
    return go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], customdata=[[p[2]] for p in points],
                      mode="markers", hoverinfo="skip", showlegend=False, name=name,
                      marker=dict(size=size, color="rgba(0,0,0,0)", line=dict(width=3, color=color)))


PATH_COLORS = {"upstream": "#7b3294", "downstream": "#1b7837"}  # purple into the node, green out of it


def _path_traces(paths: Iterable[Any], pos: Mapping[str, tuple[float, float]]) -> list[go.Scatter]:
    """For each walk (anything with `direction`, `nodes` and `edges`, as `circuits.walking.Walk`): its edges between
    placed nodes as one wide translucent line trace named "<direction> path", under the edges, and its nodes as
    rings named "<direction> nodes"."""
    traces = []
    for walk in paths:
        color = PATH_COLORS.get(walk.direction, "#555")
        xs, ys = [], []
        for e in walk.edges:
            if e.source in pos and e.target in pos:
                (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
        if xs:
            traces.append(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                     name=f"{walk.direction} path", line=dict(width=9, color=color), opacity=0.3))
        ring = [(*pos[n], n) for n in walk.nodes if n in pos]
        if ring:
            traces.append(_ring_trace(ring, f"{walk.direction} nodes", color, 22))
    return traces


def _text_positions(nodes: list[str], pos: Mapping[str, tuple[float, float]], below: set[str]) -> list[str]:
    """Label above each node; in lines of more than 20 nodes every other label goes below (no overlaps)."""
    by_line: dict[float, list[str]] = defaultdict(list)
    for n in nodes:
        by_line[pos[n][1]].append(n)
    out = {}
    for line in by_line.values():
        line.sort(key=lambda n: pos[n][0])
        for i, n in enumerate(line):
            flip = len(line) > 20 and i % 2 == 1
            out[n] = "bottom center" if (n in below) != flip else "top center"
    return [out[n] for n in nodes]


def layer_graph_figure(circuit, layer: str, selected: str | None = None, height: int | None = None,
                       max_per_line: int = 40, max_edges: int = 200, min_weight: float = 0.0,
                       highlight: Iterable[str] = (), max_labels: int = 150, paths: Iterable[Any] = ()) -> go.Figure:
    """The circuit's nodes and weight edges in one sublayer ('0.attn' or '0.mlp') as a layered graph.

    Rows, top to bottom: MLP `act_in -> post_act -> resid_delta`; attention `act_in -> q -> k -> v ->
    resid_delta`, q, k and v on rows of their own with each head in a shaded band spanning the three (the band
    names the head, the labels the channel). A row of more than `max_per_line` nodes wraps onto several lines.
    Node colour is the node's ablation importance and edge colour the weight's sign (blue +, red −); width and
    opacity the magnitude. Only edges with |w| >= `min_weight` x the largest are drawn, at most `max_edges`
    (the title says so). A layer of more than `max_labels` nodes labels only its 60 most important ones (the rest
    on hover). `highlight` nodes (search matches) get an orange ring, `selected` a black one. `paths` (the selected
    node's `walking.upstream` / `downstream` walks) are drawn as wide purple (into the node) and green (out of it)
    bands under the edges, with rings on their nodes. Every node marker carries its id in customdata[0] (for click
    handling)."""
    d_head = _d_head(circuit)
    nodes = layer_node_ids(circuit, layer)
    if not nodes:
        return message_figure(f"The circuit has no nodes in {layer}.")
    is_attn = layer.endswith(".attn")
    by_kind: dict[str, list[str]] = defaultdict(list)
    for n in nodes:
        by_kind[split_node(n)[2]].append(n)
    head_of = lambda n: split_node(n)[3] // d_head if d_head else 0  # noqa: E731

    line_gap, row_gap, qkv_gap = 0.5, 1.0, 0.55
    pos: dict[str, tuple[float, float]] = {}
    ticks: list[tuple[float, str]] = []
    shapes, annotations = [], []
    y = 0.0

    def place_row(name: str, row: list[str]) -> None:
        nonlocal y
        if row:
            placed, n_lines = _wrap_row(row, [0.0] + [1.0] * (len(row) - 1), max_per_line)
            for n, (x, li) in zip(row, placed):
                pos[n] = (x, y - li * line_gap)
            ticks.append((y - (n_lines - 1) * line_gap / 2, name))
            y -= (n_lines - 1) * line_gap
        else:
            ticks.append((y, f"{name} (none)"))
        y -= row_gap

    place_row("act_in", by_kind["act_in"])
    if is_attn:
        heads = sorted({head_of(n) for kind in "qkv" for n in by_kind[kind]})
        width = {h: max(sum(1 for n in by_kind[kind] if head_of(n) == h) for kind in "qkv") for h in heads}
        band_lines: list[list[int]] = [[]]
        used = 0.0
        for h in heads:  # pack head bands into lines of at most max_per_line slots
            need = width[h] + (1.5 if band_lines[-1] else 0)
            if band_lines[-1] and used + need > max_per_line:
                band_lines.append([])
                used, need = 0.0, width[h]
            band_lines[-1].append(h)
            used += need
        for line in [l for l in band_lines if l]:
            starts, x = {}, 0.0
            for h in line:
                starts[h] = x
                x += width[h] + 1.5
            offset = (x - 1.5 - 1) / 2
            for ki, kind in enumerate("qkv"):
                ky = y - ki * qkv_gap
                ticks.append((ky, kind))
                for h in line:
                    members = sorted((n for n in by_kind[kind] if head_of(n) == h), key=lambda n: split_node(n)[3])
                    for i, n in enumerate(members):
                        pos[n] = (starts[h] + i - offset, ky)
            for h in line:
                x0, x1 = starts[h] - offset - 0.45, starts[h] + width[h] - 1 - offset + 0.45
                shapes.append(dict(type="rect", x0=x0, x1=x1, y0=y - 2 * qkv_gap - 0.2, y1=y + 0.4,
                                   fillcolor="rgba(63,127,191,0.07)", line=dict(width=1, color="rgba(63,127,191,0.35)"),
                                   layer="below"))
                annotations.append(dict(x=x0, y=y + 0.4, text=f"head {h}" if d_head else "heads", showarrow=False,
                                        xanchor="left", yanchor="bottom", bgcolor="rgba(255,255,255,0.9)",
                                        font=dict(size=10, color="#3f7fbf")))
            y -= 2 * qkv_gap + row_gap + 0.25
        if not heads:
            ticks.append((y, "q · k · v (none)"))
            y -= row_gap
    else:
        place_row("post_act", by_kind["post_act"])
    place_row("resid_delta", by_kind["resid_delta"])

    segs, max_abs, edges_phrase = _weight_segments(circuit, pos, min_weight, max_edges)
    fig = go.Figure()
    path_traces = _path_traces(paths, pos)
    for t in [t for t in path_traces if t.mode == "lines"] + _edge_traces(segs, max_abs):
        fig.add_trace(t)
    imp_range = _importance_range(circuit.nodes[n] for n in nodes)
    xs, ys = [pos[n][0] for n in nodes], [pos[n][1] for n in nodes]
    labelled = set(nodes) if len(nodes) <= max_labels else set(
        sorted(nodes, key=lambda n: -abs(circuit.nodes[n] or 0.0))[:60]) | {selected}
    labels = [_graph_label(n, d_head) if n in labelled else "" for n in nodes]
    text_pos = _text_positions(nodes, pos, set(by_kind["resid_delta"]))
    symbols = [KIND_SYMBOL.get(split_node(n)[2], "circle") for n in nodes]
    fig.add_trace(_node_trace(xs, ys, nodes, [circuit.nodes[n] for n in nodes], d_head, symbols, labels, imp_range,
                              size=15 if len(nodes) <= 120 else 11, text_position=text_pos,
                              extra_hover=label_hover(circuit)))
    for t in path_traces:
        if t.mode == "markers":
            fig.add_trace(t)
    matches = [(*pos[n], n) for n in highlight if n in pos]
    if matches:
        fig.add_trace(_ring_trace(matches, "matches", "#e08a2c", 24))
    if selected in pos:
        fig.add_trace(_selected_trace(*pos[selected], selected))

    span = max(4.0, max(abs(p[0]) for p in pos.values()) + 1.0)
    fig.update_xaxes(visible=False, range=[-span, span])
    fig.update_yaxes(tickvals=[t[0] for t in ticks], ticktext=[t[1] for t in ticks], range=[y + row_gap - 0.55, 0.7],
                     showgrid=False, zeroline=False, fixedrange=True)
    fig.update_layout(shapes=shapes, annotations=annotations, dragmode="pan", clickmode="event")
    title = f"{layer}: {len(nodes)} nodes, {edges_phrase} (blue +, red −; click a node)"
    if len(labelled) < len(nodes):
        title += "<br><sup>labels on the 60 most important nodes; hover for the others</sup>"
    return _base_layout(fig, title, height or max(380, int(120 * (0.7 - y))))


# ---- whole circuit --------------------------------------------------------------------------


_STAGES = [("attn", "act_in"), ("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "resid_delta"),
           ("mlp", "act_in"), ("mlp", "post_act"), ("mlp", "resid_delta")]


def circuit_overview_figure(circuit, n_layer: int | None = None, selected: str | None = None,
                            height: int | None = None, max_edges: int = 500, min_weight: float = 0.0,
                            highlight: Iterable[str] = (), paths: Iterable[Any] = (),
                            values: Mapping[str, float] | None = None, value_name: str = "value",
                            title: str | None = None) -> go.Figure:
    """Every node of the circuit, from the token embedding (left) to the logits (right).

    Nodes are coloured by their importance, or by `values` {node: value} when given (a patching effect, say;
    named `value_name`, zero white, blue positive, red negative; a node without a value is white); `title`
    replaces the default title.

    One column per location (q, k and v each their own), weight edges coloured by sign (only |w| >=
    `min_weight` x the largest, at most `max_edges`), residual edges (same channel written by one sublayer and
    read by a later one) in grey. The embedding feeds every read channel that no earlier circuit node writes;
    every write channel feeds the logits (through the rest of the residual stream). `highlight` nodes get an
    orange ring; `paths` are drawn as in `layer_graph_figure`."""
    n_layer = n_layer if n_layer is not None else _n_layer(circuit)
    d_head = _d_head(circuit)
    if not circuit.nodes:
        return message_figure("The circuit is empty.")
    columns: list[tuple[str, list[str]]] = []
    for l in range(n_layer):
        for sub, kind in _STAGES:
            loc_nodes = sorted((n for n in circuit.nodes if split_node(n)[:3] == (l, sub, kind)),
                               key=lambda n: split_node(n)[3])
            columns.append((f"{l}.{sub}.{kind}", loc_nodes))
    tallest = max(len(c[1]) for c in columns) or 1
    pos: dict[str, tuple[float, float]] = {}
    for ci, (_, col) in enumerate(columns):
        x = ci + 1
        for n, y in zip(col, _spread(len(col), tallest / max(len(col), 1))):
            pos[n] = (x, y)
    x_embed, x_logits = 0, len(columns) + 1

    resid_x, resid_y, has_writer = [], [], set()
    for e in circuit.edges:
        if e.source in pos and e.target in pos and getattr(e, "kind", "weight") == "residual":
            (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
            resid_x += [x0, x1, None]
            resid_y += [y0, y1, None]
            has_writer.add(e.target)
    segs, max_abs, edges_phrase = _weight_segments(circuit, pos, min_weight, max_edges)
    fig = go.Figure()
    # embedding -> read channels with no earlier writer; write channels -> logits
    io_x, io_y = [], []
    for n, (x, y) in pos.items():
        kind = split_node(n)[2]
        if kind == "act_in" and n not in has_writer:
            io_x += [x_embed, x, None]
            io_y += [0, y, None]
        elif kind == "resid_delta":
            io_x += [x, x_logits, None]
            io_y += [y, 0, None]
    fig.add_trace(go.Scatter(x=io_x, y=io_y, mode="lines", hoverinfo="skip", showlegend=False,
                             line=dict(width=0.7, color="rgba(150,150,150,0.25)", dash="dot"), name="embedding/logits"))
    fig.add_trace(go.Scatter(x=resid_x, y=resid_y, mode="lines", hoverinfo="skip", showlegend=False,
                             line=dict(width=1.2, color=RESIDUAL_COLOR), name="residual"))
    path_traces = _path_traces(paths, pos)
    for t in [t for t in path_traces if t.mode == "lines"] + _edge_traces(segs, max_abs):
        fig.add_trace(t)
    nodes = list(pos)
    colour_by = [values.get(n) for n in nodes] if values is not None else [circuit.nodes[n] for n in nodes]
    fig.add_trace(_node_trace([pos[n][0] for n in nodes], [pos[n][1] for n in nodes], nodes, colour_by, d_head,
                              [KIND_SYMBOL.get(split_node(n)[2], "circle") for n in nodes], None,
                              _importance_range(colour_by), size=11, value_name=value_name if values is not None else None,
                              extra_hover=label_hover(circuit)))
    fig.add_trace(go.Scatter(x=[x_embed, x_logits], y=[0, 0], mode="markers+text", text=["tokens", "logits"],
                             textposition=["middle left", "middle right"], hoverinfo="skip", showlegend=False,
                             marker=dict(size=22, symbol="square", color="#888"), name="io"))
    for t in path_traces:
        if t.mode == "markers":
            fig.add_trace(t)
    matches = [(*pos[n], n) for n in highlight if n in pos]
    if matches:
        fig.add_trace(_ring_trace(matches, "matches", "#e08a2c", 20))
    if selected in pos:
        fig.add_trace(_selected_trace(*pos[selected], selected))
    # sublayer bands and column labels
    shapes, annotations = [], []
    for l in range(n_layer):
        for sub, start, width in (("attn", 1 + l * len(_STAGES), 5), ("mlp", 6 + l * len(_STAGES), 3)):
            shapes.append(dict(type="rect", x0=start - 0.45, x1=start + width - 0.55, yref="paper", y0=0, y1=1,
                               fillcolor=SUBLAYER_COLORS[sub], opacity=0.07, line=dict(width=0), layer="below"))
            annotations.append(dict(x=start + (width - 1) / 2, y=1.0, yref="paper", text=f"<b>{l}.{sub}</b>",
                                    showarrow=False, yanchor="bottom", font=dict(color=SUBLAYER_COLORS[sub])))
    tick_text = ["embed"] + [c[0].split(".", 2)[2] for c in columns] + ["logits"]
    fig.update_xaxes(tickvals=list(range(len(columns) + 2)), ticktext=tick_text, showgrid=False, zeroline=False,
                     tickangle=-45)
    fig.update_yaxes(visible=False)
    fig.update_layout(shapes=shapes, annotations=annotations, dragmode="pan", clickmode="event")
    title = title or f"Whole circuit: {len(nodes)} nodes, {edges_phrase}, residual edges in grey"
    return _base_layout(fig, title, height or max(420, min(900, 22 * tallest + 160)))


# ---- layer list ------------------------------------------------------------------------------


def layer_bars_figure(rows: Sequence[Mapping[str, Any]], selected: str | None = None) -> go.Figure:
    """Horizontal bars of each sublayer's ablation delta (rows from `layer_summary`), node counts as text."""
    if not rows:
        return message_figure("No layers.")
    names = [r["layer"] for r in rows][::-1]
    deltas = [r["delta"] if r["delta"] is not None else 0.0 for r in rows][::-1]
    colors = _sign_colors(deltas)
    line_w = [3 if n == selected else 0 for n in names]
    counts = [r["n_nodes"] for r in rows][::-1]
    fig = go.Figure(go.Bar(
        x=deltas, y=[f"{n} ({c})" for n, c in zip(names, counts)], orientation="h",
        marker=dict(color=colors, line=dict(width=line_w, color="#111")), customdata=[[n, c] for n, c in zip(names, counts)],
        hovertemplate="%{customdata[0]}: Δ loss %{x:.4g}<br>%{customdata[1]} nodes<extra></extra>",
    ))
    fig.update_xaxes(title="Δ task loss when ablated (blue +, red −)", zeroline=True, zerolinecolor="#999")
    return _base_layout(fig, "Layer ablation deltas (nodes)", height=max(200, 40 * len(rows) + 90))


# ---- curves ---------------------------------------------------------------------------------


def faithfulness_figure(points: Sequence[Sequence[float]], full_loss: float | None = None,
                        target: float | None = None, random_loss: float | None = None,
                        current_k: int | None = None, random_points: Sequence[Sequence[float]] | None = None,
                        title: str = "Faithfulness: task loss vs circuit size") -> go.Figure:
    """Task loss vs k (log-log), with the full model's loss, the target and the random same-size baseline.

    points: [(k, loss), ...]; random_points: the same for random circuits (a curve) where known. Reference
    lines are drawn as traces (shapes and annotations on log axes need log coordinates)."""
    pts = sorted((float(p[0]), float(p[1])) for p in points if p[0] is not None and p[0] > 0 and p[1] is not None)
    if not pts:
        return message_figure("No faithfulness data yet.")
    eps = 1e-4
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[max(p[1], eps) for p in pts], mode="lines+markers",
                             name="circuit (top-k)", line=dict(color="#1f4e79"),
                             hovertemplate="k=%{x}<br>loss %{y:.4g}<extra></extra>"))
    rp = []
    if random_points:
        rp = sorted((float(p[0]), float(p[1])) for p in random_points if p[0] and p[0] > 0 and p[1] is not None)
        fig.add_trace(go.Scatter(x=[p[0] for p in rp], y=[max(p[1], eps) for p in rp], mode="lines+markers",
                                 name="random, same size", line=dict(color="#999", dash="dot"),
                                 hovertemplate="k=%{x}<br>random loss %{y:.4g}<extra></extra>"))
    ks = [p[0] for p in pts + rp] + ([float(current_k)] if current_k else [])
    x0, x1 = min(ks), max(ks)
    refs = ((full_loss, "full model", "#2ca02c", "dash"), (target, "target", "#111", "dot"),
            (random_loss if not random_points else None, "random, same size (at k)", "#999", "dashdot"))
    for value, name, color, dash in refs:
        if value is not None:
            fig.add_trace(go.Scatter(x=[x0, x1], y=[max(value, eps)] * 2, mode="lines", name=f"{name} ({value:.3g})",
                                     line=dict(color=color, dash=dash, width=1.5), hoverinfo="name"))
    if current_k:
        ys = [max(p[1], eps) for p in pts + rp] + [max(v, eps) for v, *_ in refs if v is not None]
        fig.add_trace(go.Scatter(x=[current_k, current_k], y=[min(ys), max(ys)], mode="lines", name=f"k = {current_k}",
                                 line=dict(color="#444", width=1), hoverinfo="name"))
    fig.update_xaxes(type="log", title="k (nodes kept)", **_log_ticks(ks))
    fig.update_yaxes(type="log", title="task loss (nats)",
                     **_log_ticks([max(p[1], eps) for p in pts + rp] + [max(v, eps) for v, *_ in refs if v is not None]))
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return _base_layout(fig, title, 400)


def pruning_curve_figure(curve: Sequence[Sequence[float]], title: str = "Pruning: mask training") -> go.Figure:
    """[[step, task loss, n_kept], ...] as loss (left axis) and kept nodes (right axis) vs step."""
    if not curve:
        return message_figure("No pruning curve in this run.")
    steps = [c[0] for c in curve]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=steps, y=[c[1] for c in curve], name="task loss", line=dict(color="#1f4e79")),
                  secondary_y=False)
    if len(curve[0]) > 2:
        fig.add_trace(go.Scatter(x=steps, y=[c[2] for c in curve], name="nodes kept", line=dict(color="#e08a2c")),
                      secondary_y=True)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="task loss", secondary_y=False)
    fig.update_yaxes(title="nodes kept", secondary_y=True, type="log", **_log_ticks(c[2] for c in curve if len(c) > 2))
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return _base_layout(fig, title, 340)


def training_curve_figure(curve: Sequence[Mapping[str, Any]] | None, title: str = "Model training") -> go.Figure:
    """The model's training metrics ({step, train_loss, val_loss, ...} rows, over all its stages as
    `training.stages_curve` joins them) against tokens seen."""
    if not curve:
        return message_figure("This model ships no training curve.")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    by_tokens = all(c.get("tokens") is not None for c in curve)
    steps = [c.get("tokens") if by_tokens else c.get("step") for c in curve]
    for key, color in (("train_loss", "#1f4e79"), ("val_loss", "#2ca02c")):
        if any(key in c for c in curve):
            fig.add_trace(go.Scatter(x=steps, y=[c.get(key) for c in curve], name=key.replace("_", " "),
                                     line=dict(color=color)), secondary_y=False)
    if any("density" in c for c in curve):
        fig.add_trace(go.Scatter(x=steps, y=[c.get("density") for c in curve], name="weight density",
                                 line=dict(color="#e08a2c", dash="dot")), secondary_y=True)
    for a, b in zip(curve, curve[1:]):  # after the traces: plotly skips shapes on empty subplots
        if a.get("stage") != b.get("stage"):
            fig.add_vline(x=b.get("tokens") if by_tokens else b.get("step"), line=dict(color="#999", dash="dot"))
    fig.update_xaxes(title="tokens seen (dotted: a new stage)" if by_tokens else "step")
    fig.update_yaxes(title="loss (nats/token)", secondary_y=False)
    fig.update_yaxes(title="density", secondary_y=True, type="log", **_log_ticks(c.get("density") for c in curve))
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return _base_layout(fig, title, 340)


# ---- issue 22: a circuit through training ---------------------------------------------------

_SERIES_COLORS = ("#1f4e79", "#e08a2c", "#2ca02c", "#c0392b", "#8e44ad", "#17becf", "#7f7f7f", "#bcbd22")


def circuit_through_training_figure(curve: Mapping[str, Any] | None, at_target_only: bool = True,
                                    title: str = "Circuits through training") -> go.Figure:
    """Each circuit's held-out task loss at each snapshot (solid) and the full model's on the same examples
    (dotted, same colour), from `circuits.transfer.circuit_through_snapshots` (the file
    `circuit_through_training.json`); with `at_target_only`, the circuits found for the target loss."""
    if not curve or not curve.get("snapshots") or not curve.get("circuits"):
        return message_figure("This model ships no circuit-through-training curve "
                              "(scripts/circuit_through_training.py writes one).")
    labels = list(curve["snapshots"])
    rows = {name: row for name, row in curve["circuits"].items()
            if not at_target_only or row.get("at_target") in (True, None)}
    fig = go.Figure()
    eps = 1e-4
    values = []
    for i, (name, row) in enumerate(sorted(rows.items())):
        color = _SERIES_COLORS[i % len(_SERIES_COLORS)]
        task = row.get("task", name)
        circuit = [max(v, eps) if isinstance(v, (int, float)) else None for v in row.get("circuit", [])]
        full = [max(v, eps) if isinstance(v, (int, float)) else None for v in row.get("full", [])]
        values += [v for v in circuit + full if v is not None]
        fig.add_trace(go.Scatter(x=labels, y=circuit, name=f"{task} ({row.get('k')} nodes)", mode="lines+markers",
                                 line=dict(color=color), legendgroup=name,
                                 hovertemplate=f"{name}: circuit %{{y:.3f}} nats at %{{x}}<extra></extra>"))
        fig.add_trace(go.Scatter(x=labels, y=full, name=f"{task}: full model", mode="lines", legendgroup=name,
                                 line=dict(color=color, dash="dot"), showlegend=False,
                                 hovertemplate=f"{task}: full model %{{y:.3f}} nats at %{{x}}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[labels[0], labels[-1]], y=[math.log(2)] * 2, name="chance (ln 2)", mode="lines",
                             line=dict(color="#999", dash="dash"), hoverinfo="skip"))  # a trace: no log-axis shapes
    fig.update_xaxes(title="snapshot (the circuits were pruned on the last)")
    fig.update_yaxes(type="log", title="held-out task loss (nats; dotted: full model)",
                     **_log_ticks(values + [math.log(2)]))
    fig.update_layout(legend=dict(orientation="h", y=-0.3))
    return _base_layout(fig, title, 400)


# ---- ablations ------------------------------------------------------------------------------


def importance_bar_figure(importances: Mapping[str, float | None], selected: str | None = None,
                          d_head: int | None = None, top_n: int | None = None,
                          title: str = "Node ablation importance") -> go.Figure:
    """Bars of every node's importance (task-loss increase when it alone is ablated), largest first."""
    items = sorted(((n, v) for n, v in importances.items() if v is not None), key=lambda kv: -kv[1])
    if top_n:
        items = items[:top_n]
    if not items:
        return message_figure("No node importances yet.")
    names = [n for n, _ in items]
    colors = _sign_colors(v for _, v in items)
    fig = go.Figure(go.Bar(
        x=names, y=[v for _, v in items], marker=dict(color=colors, line=dict(width=[3 if n == selected else 0 for n in names], color="#111")),
        customdata=[[n, node_label(n, d_head)] for n in names],
        hovertemplate="<b>%{customdata[0]}</b> (%{customdata[1]})<br>Δ loss %{y:.4g}<extra></extra>",
    ))
    fig.update_xaxes(showticklabels=len(names) <= 60, tickangle=-60, title=None)
    fig.update_yaxes(title="task-loss increase (blue +, red −)")
    return _base_layout(fig, title, 380)


def ablation_effect_figure(rows: Sequence[Mapping[str, Any]], title: str = "Ablation effects") -> go.Figure:
    """rows: [{"label", "d_loss", "d_logit_diff"}]: the change in task loss and in the mean logit difference
    (correct - alternative) for each ablation, side by side."""
    if not rows:
        return message_figure("Choose nodes or layers to ablate.")
    labels = [r["label"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Δ task loss", "Δ logit difference (correct − alternative)"))
    d_loss = [r["d_loss"] for r in rows]
    d_ld = [r["d_logit_diff"] for r in rows]
    fig.add_trace(go.Bar(x=labels, y=d_loss, marker_color=_sign_colors(d_loss),
                         hovertemplate="%{x}<br>Δ loss %{y:+.4g}<extra></extra>", name="Δ loss"), 1, 1)
    fig.add_trace(go.Bar(x=labels, y=d_ld, marker_color=_sign_colors(d_ld),
                         hovertemplate="%{x}<br>Δ logit diff %{y:+.4g}<extra></extra>", name="Δ logit diff"), 1, 2)
    fig.update_layout(showlegend=False)
    fig.update_xaxes(tickangle=-30)
    return _base_layout(fig, title, 380)


def circuit_diff_figure(diff, name_a: str = "A", name_b: str = "B") -> go.Figure:
    """Counts of nodes and edges in one circuit only, the other only, or both (a `CircuitDiff`), per sublayer."""
    cats = ("only_self", "both", "only_other")
    names = {"only_self": f"only {name_a}", "both": "both", "only_other": f"only {name_b}"}
    colors = {"only_self": "#1f77b4", "both": "#7f7f7f", "only_other": "#ff7f0e"}
    fig = make_subplots(rows=1, cols=2, subplot_titles=("nodes per sublayer", "edges"))
    node_lists = {c: getattr(diff, f"nodes_{c}") for c in cats}
    layers = sorted({sublayer_of(n) for c in cats for n in node_lists[c]},
                    key=lambda s: (int(s.split(".")[0]), s.endswith("mlp")))
    for c in cats:
        counts = [sum(1 for n in node_lists[c] if sublayer_of(n) == l) for l in layers]
        fig.add_trace(go.Bar(x=layers, y=counts, name=names[c], marker_color=colors[c], legendgroup=c), 1, 1)
        fig.add_trace(go.Bar(x=["edges"], y=[len(getattr(diff, f"edges_{c}"))], name=names[c], marker_color=colors[c],
                             legendgroup=c, showlegend=False), 1, 2)
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.2))
    return _base_layout(fig, f"Circuit comparison: {name_a} vs {name_b}", 360)


# ---- prompt lab -----------------------------------------------------------------------------


def next_tokens_figure(full: Sequence[Sequence[Any]], circuit: Sequence[Sequence[Any]] | None = None,
                       title: str = "Top next tokens") -> go.Figure:
    """Two bar panels of (token, probability): the full model and the circuit alone."""
    panels = [("full model", full)] + ([("circuit (rest mean-ablated)", circuit)] if circuit is not None else [])
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], horizontal_spacing=0.18)
    for i, (_, rows) in enumerate(panels, start=1):
        toks = [display_token(str(r[0])) for r in rows][::-1]
        probs = [float(r[1]) for r in rows][::-1]
        fig.add_trace(go.Bar(x=probs, y=[f"{t} " for t in toks], orientation="h",
                             marker_color=POSITIVE_HEX if i == 1 else "#67a9cf",
                             text=[f"{p:.1%}" for p in probs], textposition="outside", cliponaxis=False,
                             hovertemplate="%{y}: %{x:.3%}<extra></extra>"), 1, i)
        fig.update_xaxes(range=[0, min(1.0, 1.2 * max(probs, default=1.0)) or 1.0], tickformat=".0%", row=1, col=i)
    fig.update_layout(showlegend=False)
    return _base_layout(fig, title, 380)


def display_token(tok: str) -> str:
    """A token as visible text: spaces as ·, newlines as ↵, tabs as →; ∅ for a token with no character of its
    own (its bytes belong to a character a later token completes, see `tokenization.token_texts`)."""
    return tok.replace(" ", "·").replace("\n", "↵").replace("\t", "→").replace("\r", "␍") or "∅"


# ---- token heatmaps (HTML) ------------------------------------------------------------------


def _act_color(v: float, vmax: float, vmin: float, zero_centered: bool) -> str:
    if zero_centered:
        if vmax <= 0:
            return "transparent"
        a = min(1.0, abs(v) / vmax)
        return _rgba(NEGATIVE if v < 0 else POSITIVE, 0.85 * a) if a > 0.005 else "transparent"
    span = vmax - vmin
    a = 0.0 if span <= 0 else min(1.0, max(0.0, (v - vmin) / span))
    return f"rgba(241,105,19,{0.85 * a:.3f})"


def _token_title(tok: str) -> str:
    """A token's hover text; an empty one holds the first bytes of a character that a later token completes."""
    return repr(tok) if tok else "'' (first bytes of a character that a later token completes)"


def _token_span(tok: str, v: float | None, color: str, boxed: bool) -> str:
    text = tok.replace("\t", "→   ")
    newline = text.endswith("\n")
    vis = html.escape(text.replace("\n", "↵").replace("\r", "␍"))
    style = f"background:{color};"
    if boxed:
        style += "outline:2px solid #111;outline-offset:-1px;border-radius:2px;"
    title = f' title="{html.escape(_token_title(tok))}' + (f': {_fmt(v)}"' if v is not None else '"')
    return f'<span class="csp-tok" style="{style}"{title}>{vis}</span>' + ("<br>" if newline else "")


def token_heatmap_html(tokens: Sequence[str], values: Sequence[float] | None = None, peak: int | None = None,
                       zero_centered: bool = True, vmax: float | None = None, vmin: float | None = None,
                       title: str | None = None) -> str:
    """Tokens as inline spans coloured by their activation, the `peak` token boxed.

    zero_centered: red/blue for negative/positive around zero (scale max |v|); otherwise one colour from the
    minimum to the maximum. Hovering a token shows its repr and value."""
    vals = [float(v) for v in values] if values is not None else [None] * len(tokens)
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    if zero_centered:
        vmax = vmax if vmax is not None else max((abs(v) for v in finite), default=0.0)
        vmin = -vmax
    else:
        vmax = vmax if vmax is not None else max(finite, default=0.0)
        vmin = vmin if vmin is not None else min(finite, default=0.0)
    spans = []
    for i, (tok, v) in enumerate(zip(tokens, vals)):
        color = _act_color(v, vmax, vmin, zero_centered) if v is not None and math.isfinite(v) else "transparent"
        spans.append(_token_span(str(tok), v, color, i == peak))
    head = f'<div class="csp-ex-title">{html.escape(title)}</div>' if title else ""
    return f'{head}<div class="csp-tokens">{"".join(spans)}</div>'


def tokens_html(tokens: Sequence[str], ids: Sequence[int] | None = None) -> str:
    """The tokens of a prompt as alternating chips (no activations), ids in the hover text."""
    spans = []
    for i, tok in enumerate(tokens):
        bg = "#e8eef7" if i % 2 == 0 else "#f7efe3"
        title = f"{i}: {_token_title(tok)}" + (f" (id {ids[i]})" if ids is not None else "")
        text = html.escape(tok.replace("\n", "↵").replace("\t", "→   ").replace("\r", "␍"))
        spans.append(f'<span class="csp-tok" style="background:{bg}" title="{html.escape(title)}">{text}</span>'
                     + ("<br>" if tok.endswith("\n") else ""))
    return f'<div class="csp-tokens">{"".join(spans)}</div>'


TABLE_CSS = """<style>
.csp-tokens{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px;line-height:1.9;
white-space:pre-wrap;word-break:break-all;padding:4px 6px;border:1px solid #e5e5e5;border-radius:4px;margin:2px 0;}
.csp-tok{padding:1px 0;}
.csp-tok:empty{display:inline-block;min-width:.4em;height:1.1em;vertical-align:text-bottom;border-bottom:1px dotted #999;}
.csp-ex-title{font-size:11px;color:#666;margin-top:4px;}
.csp-q{border-collapse:collapse;width:100%;} .csp-q td,.csp-q th{vertical-align:top;padding:4px;border-bottom:1px solid #eee;}
.csp-q th{text-align:left;font-size:12px;color:#444;}
</style>"""


def _example_parts(ex: Any) -> tuple[list[str], list[float], int | None]:
    """An example as (tokens, activations, peak): accepts dicts {tokens, acts|activations, peak|pos|position}
    or tuples (tokens, acts, peak)."""
    if isinstance(ex, Mapping):
        tokens = ex.get("tokens") or ex.get("token_strs") or []
        acts = ex.get("acts", ex.get("activations", []))
        peak = ex.get("peak", ex.get("pos", ex.get("position")))
    else:
        tokens, acts, peak = (list(ex) + [None, None, None])[:3]
    return [str(t) for t in tokens], [float(a) for a in acts], (int(peak) if peak is not None else None)


def examples_html(examples: Sequence[Any], zero_centered: bool = True, vmax: float | None = None,
                  context: int | None = 40, after: int = 10) -> str:
    """Several examples as token heatmaps (see `token_heatmap_html`), sharing one colour scale.

    Each example is (tokens, activations, peak position) or a dict with those keys; with `context`, only
    that many tokens before the peak and `after` after it are shown (about 50 tokens, as the original
    visualizer shows)."""
    parts = [_example_parts(ex) for ex in examples]
    if vmax is None:
        vals = [abs(a) if zero_centered else a for _, acts, _ in parts for a in acts]
        vmax = max(vals, default=0.0)
    out = []
    for tokens, acts, peak in parts:
        if context is not None and peak is not None and len(tokens) > context + after + 1:
            lo, hi = max(0, peak - context), min(len(tokens), peak + after + 1)
            tokens, acts, peak = tokens[lo:hi], acts[lo:hi], peak - lo
        title = f"peak {_fmt(acts[peak])}" if peak is not None and 0 <= peak < len(acts) else None
        out.append(token_heatmap_html(tokens, acts, peak, zero_centered, vmax=vmax, vmin=None if zero_centered else 0.0,
                                      title=title))
    return "".join(out) if out else '<div class="csp-ex-title">no examples</div>'


def quantile_examples_html(samples: Mapping[Any, Mapping[str, Sequence[Any]]], zero_centered: bool = True,
                           title: str | None = None) -> str:
    """Top and bottom activating examples per quantile: {frac: {"top": [...], "bottom": [...]}} as a table.

    Rows are the quantiles (0.1%, 1%, 10%, 50%), columns the top and bottom examples."""
    if not samples:
        return TABLE_CSS + '<div class="csp-ex-title">No activating examples for this node.</div>'
    all_vals = [abs(a) for q in samples.values() for side in ("top", "bottom") for ex in q.get(side, [])
                for a in _example_parts(ex)[1]]
    vmax = max(all_vals, default=0.0)
    rows = []
    for frac in sorted(samples, key=lambda f: float(f)):
        q = samples[frac]
        pct = f"{float(frac) * 100:g}%"
        top = examples_html(q.get("top", []), zero_centered, vmax if zero_centered else None)
        bottom = examples_html(q.get("bottom", []), zero_centered, vmax if zero_centered else None)
        rows.append(f"<tr><th>{pct}</th><td>{top}</td><td>{bottom}</td></tr>")
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    key = ("blue: positive, red: negative activation (shared scale)" if zero_centered
           else "orange: activation from its minimum to its maximum")
    head += f'<div class="csp-ex-title">{key}; the boxed token is the peak; hover a token for its value</div>'
    return (TABLE_CSS + head + '<table class="csp-q"><tr><th>quantile</th><th>top activating</th><th>bottom activating</th></tr>'
            + "".join(rows) + "</table>")


def _argmax_abs(values: Sequence[float]) -> int | None:
    finite = [(abs(v), i) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    return max(finite)[1] if finite else None


def task_examples_html(classes: Sequence[Sequence[tuple[Sequence[str], Sequence[float]]]], names: Sequence[str],
                       differences: Sequence[tuple[Sequence[str], Sequence[float]]] | None = None,
                       zero_centered: bool = True, title: str | None = None) -> str:
    """A node's activations on a task's examples as token heatmaps: one column per class (named), and the
    per-pair differences (class 1 − class 2, aligned at the decision token) in a third column with a scale of
    its own. The largest |value| of each example is boxed; the last token is where the model decides."""
    rows_of = [list(c) for c in classes]
    vals = [abs(v) if zero_centered else v for c in rows_of for _, values in c for v in values if math.isfinite(v)]
    vmax = max(vals, default=0.0)
    vmin = min((v for c in rows_of for _, values in c for v in values if math.isfinite(v)), default=0.0)
    diffs = list(differences or [])
    dmax = max((abs(v) for _, values in diffs for v in values if math.isfinite(v)), default=0.0)
    n = max([len(c) for c in rows_of] + [len(diffs)], default=0)
    if n == 0:
        return TABLE_CSS + '<div class="csp-ex-title">No task examples for this node.</div>'

    def cell(rows, i, scale_max, zc, scale_min=None):
        if i >= len(rows):
            return "<td></td>"
        tokens, values = rows[i]
        return "<td>" + token_heatmap_html(tokens, values, _argmax_abs(values), zc, vmax=scale_max,
                                           vmin=scale_min) + "</td>"

    heads = "".join(f"<th>{html.escape(str(nm))}</th>" for nm in names)
    heads += "<th>pair difference (class 1 − class 2)</th>" if diffs else ""
    body = []
    for i in range(n):
        cells = [cell(rows, i, vmax, zero_centered, None if zero_centered else vmin) for rows in rows_of]
        cells += [cell(diffs, i, dmax, True)] if diffs else []
        body.append("<tr>" + "".join(cells) + "</tr>")
    key = ("blue positive, red negative (classes share a scale; differences have their own)" if zero_centered
           else "orange from the minimum to the maximum activation; differences blue +, red −")
    head = (f"<h4>{html.escape(title)}</h4>" if title else "") + (
        f'<div class="csp-ex-title">{key}; boxed: each example\'s largest |value|; the last token is the decision '
        "position; hover a token for its value</div>")
    return TABLE_CSS + head + f'<table class="csp-q csp-task"><tr>{heads}</tr>' + "".join(body) + "</table>"


def attention_rows_html(rows: Sequence[Any], names: Sequence[str], title: str | None = None) -> str:
    """Where each task example's decision token (its last) attends: tokens shaded by attention weight (blue,
    one scale for all examples), the sink's share in each example's caption. `rows` have `tokens`, `weights`,
    `sink` and `class_index` (analysis.AttentionRow)."""
    if not rows:
        return TABLE_CSS + '<div class="csp-ex-title">No task examples.</div>'
    vmax = max((w for r in rows for w in r.weights), default=0.0)
    columns: dict[int, list[str]] = defaultdict(list)
    for r in rows:
        caption = f"sink {r.sink:.2f}" if r.sink is not None else None
        columns[r.class_index].append(token_heatmap_html(r.tokens, r.weights, len(r.tokens) - 1, True, vmax=vmax,
                                                         title=caption))
    order = sorted(columns)
    heads = "".join(f"<th>{html.escape(names[i] if i < len(names) else f'class {i + 1}')}</th>" for i in order)
    body = "".join("<tr>" + "".join(f"<td>{columns[i][j] if j < len(columns[i]) else ''}</td>" for i in order) + "</tr>"
                   for j in range(max(len(c) for c in columns.values())))
    head = (f"<h4>{html.escape(title)}</h4>" if title else "") + (
        '<div class="csp-ex-title">shade: attention of the boxed decision token (the last) to each token, one scale for '
        "all examples; the rest goes to the attention sink</div>")
    return TABLE_CSS + head + f'<table class="csp-q"><tr>{heads}</tr>{body}</table>'


# ---- node panel figures ---------------------------------------------------------------------


def task_activations_figure(class1: Sequence[Sequence[float]], class2: Sequence[Sequence[float]],
                            labels: tuple[str, str] = ("class 1", "class 2"), zero_centered: bool = True,
                            title: str = "Activations on the task's examples") -> go.Figure:
    """Heatmaps of a node's activation on the task examples of each class (rows: examples, columns: positions
    counted from the decision token, right-aligned) and the difference of the class means per position."""
    import numpy as np

    def as_array(rows):
        rows = [list(map(float, r)) for r in rows]
        width = max((len(r) for r in rows), default=0)
        arr = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            if r:
                arr[i, width - len(r):] = r
        return arr

    a, b = as_array(class1), as_array(class2)
    width = max(a.shape[1] if a.size else 0, b.shape[1] if b.size else 0)
    if width == 0:
        return message_figure("No task activations for this node.")

    def pad(arr):
        out = np.full((arr.shape[0], width), np.nan)
        if arr.size:
            out[:, width - arr.shape[1]:] = arr
        return out

    a, b = pad(a), pad(b)
    xs = list(range(-width + 1, 1))
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            mean_a = np.nanmean(a, axis=0) if a.size else np.zeros(width)
            mean_b = np.nanmean(b, axis=0) if b.size else np.zeros(width)
    diff = mean_a - mean_b
    finite = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    heat = dict(colorscale=DIVERGING, zmid=0, zmin=-vmax, zmax=vmax) if zero_centered else dict(
        colorscale="Oranges", zmin=float(finite.min()) if finite.size else 0, zmax=float(finite.max()) if finite.size else 1)
    fig = make_subplots(rows=1, cols=3, subplot_titles=(labels[0], labels[1], "class mean difference (1 − 2)"),
                        horizontal_spacing=0.1)
    hover = "position %{x}<br>example %{y}<br>activation %{z:.4g}<extra></extra>"
    fig.add_trace(go.Heatmap(z=a, x=xs, hovertemplate=hover, colorbar=dict(x=0.64, xanchor="left", thickness=10, len=0.9),
                             **heat), 1, 1)
    fig.add_trace(go.Heatmap(z=b, x=xs, hovertemplate=hover, showscale=False, **heat), 1, 2)
    fig.add_trace(go.Bar(x=xs, y=[None if not math.isfinite(v) else float(v) for v in diff],
                         marker_color=_sign_colors(v if math.isfinite(v) else None for v in diff),
                         hovertemplate="position %{x}<br>Δ mean %{y:.4g}<extra></extra>"), 1, 3)
    fig.update_xaxes(title="position (0 = decision)")
    fig.update_yaxes(title="example", row=1, col=1)
    fig.update_layout(showlegend=False)
    return _base_layout(fig, title, 340)


def attention_pattern_figure(pattern: Sequence[Sequence[float]], tokens: Sequence[str], title: str,
                             zero_centered: bool = False, sink: bool = False) -> go.Figure:
    """A (query x key) matrix over one prompt's tokens: an attention pattern (optionally with the sink as the
    first key column) or a channel's q·k contribution (zero_centered)."""
    labels = [f"{i}:{display_token(t)}" for i, t in enumerate(tokens)]
    keys = (["sink"] if sink else []) + labels
    z = [list(map(float, row)) for row in pattern]
    if zero_centered:
        m = max((abs(v) for row in z for v in row if math.isfinite(v)), default=1.0) or 1.0
        heat = dict(colorscale=DIVERGING, zmid=0, zmin=-m, zmax=m)
    else:
        heat = dict(colorscale="Blues", zmin=0)
    fig = go.Figure(go.Heatmap(z=z, x=keys, y=labels, hovertemplate="query %{y}<br>key %{x}<br>%{z:.4g}<extra></extra>",
                               colorbar=dict(thickness=10), **heat))
    fig.update_yaxes(autorange="reversed", title="query token", tickfont=dict(size=9))
    fig.update_xaxes(title="key token", tickfont=dict(size=9), tickangle=-60)
    return _base_layout(fig, title, 420)


def connections_table(circuit, node: str, d_head: int | None = None) -> list[list[Any]]:
    """Rows [direction, other node, label, weight, kind] of a node's incoming and outgoing circuit edges,
    strongest first."""
    d_head = d_head or _d_head(circuit)
    rows = []
    for e in circuit.edges:
        if e.target == node:
            rows.append(["in", e.source, node_label(e.source, d_head), round(float(e.weight), 5), getattr(e, "kind", "weight")])
        elif e.source == node:
            rows.append(["out", e.target, node_label(e.target, d_head), round(float(e.weight), 5), getattr(e, "kind", "weight")])
    rows.sort(key=lambda r: (r[0] != "in", -abs(r[3])))
    return rows


def connections_html(rows: Sequence[Sequence[Any]], max_height: int = 280) -> str:
    """`connections_table` rows as a compact HTML table: incoming and outgoing edges, weights coloured by sign; each
    other node is a link that selects it (`node_link`)."""
    if not rows:
        return TABLE_CSS + '<div class="csp-ex-title">No connections to other circuit nodes.</div>'
    body = []
    for direction, other, label, weight, kind in rows:
        color = _rgba(POSITIVE if weight >= 0 else NEGATIVE, 1.0)
        arrow = "← from" if direction == "in" else "→ to"
        body.append(f"<tr><td>{arrow}</td><td>{node_link(other)}</td><td>{html.escape(str(label))}</td>"
                    f'<td style="color:{color};text-align:right">{weight:+.4g}</td><td>{html.escape(str(kind))}</td></tr>')
    n_in = sum(1 for r in rows if r[0] == "in")
    head = f'<div class="csp-ex-title">{n_in} incoming, {len(rows) - n_in} outgoing edges in the circuit</div>'
    return (TABLE_CSS + head + f'<div style="max-height:{max_height}px;overflow:auto"><table class="csp-q">'
            "<tr><th></th><th>node</th><th>label</th><th>weight</th><th>kind</th></tr>" + "".join(body) + "</table></div>")


# ---- walking a circuit (the node panel's "What it does") -------------------------------------

NODE_LINK_CLASS = "csp-node-link"


def node_link(node: str) -> str:
    """A node id as a link that selects the node: the app's page script turns a click on any element of class
    `NODE_LINK_CLASS` into a selection of its `data-node` (as a click on the graph does)."""
    n = html.escape(str(node), quote=True)
    return f'<a href="#" class="{NODE_LINK_CLASS}" data-node="{n}" title="select {n}"><code>{n}</code></a>'


def _number_cell(v: float, digits: int = 4) -> str:
    color = _rgba(POSITIVE if v >= 0 else NEGATIVE, 1.0)
    return f'<td style="color:{color};text-align:right">{v:+.{digits}g}</td>'


def _token_rows(title: str, rows: Sequence[Mapping[str, Any]], value: str) -> str:
    cells = "".join(f'<tr><td><code>{html.escape(display_token(str(r["token"])))}</code></td><td>{int(r["id"])}</td>'
                    f"{_number_cell(float(r[value]))}</tr>" for r in rows)
    return (f'<div class="csp-ex-title">{html.escape(title)}</div><table class="csp-q"><tr><th>token</th><th>id</th>'
            f"<th>{html.escape(value)}</th></tr>{cells}</table>")


def node_reading_html(report: Mapping[str, Any], d_head: int | None = None) -> str:
    """A `logit_effects.describe_node` report as the node panel's tables: the paths through the node (nodes as
    links), "why this node" (inputs by weight x mean activation), direct logit effects (write nodes) and driving
    tokens (read nodes). Each table is labelled with the node it reads, so no older reading passes for this one."""
    node = str(report["node"])
    parts = [TABLE_CSS, f'<div class="csp-reading" data-node="{html.escape(node, quote=True)}">']
    for direction, word in (("upstream", "into"), ("downstream", "out of")):
        walk = report[direction]
        links = " ".join(node_link(n) for n in walk["nodes"][:60]) or "<i>none in the circuit</i>"
        more = f" … and {len(walk['nodes']) - 60} more" if len(walk["nodes"]) > 60 else ""
        parts.append(f'<div class="csp-ex-title csp-walk-{direction}"><b>{direction.capitalize()}</b> (paths '
                     f"{word} {html.escape(node)}: {len(walk['nodes'])} nodes, {walk['n_edges']} edges, "
                     f"{'purple' if direction == 'upstream' else 'green'} in the graph): {links}{more}</div>")
    why = report["why"]
    rows = "".join(f"<tr><td>{node_link(r['source'])}</td><td>{html.escape(node_label(r['source'], d_head))}</td>"
                   f"{_number_cell(r['weight'])}{_number_cell(r['mean'])}{_number_cell(r['contribution'])}"
                   f"<td>{html.escape(str(r['kind']))}</td></tr>" for r in why)
    parts.append(f'<div class="csp-ex-title"><b>Why {html.escape(node)}</b>: its circuit inputs ranked by |weight × '
                 "mean activation| (signed mean over held-out text, the values mean ablation uses: the input's "
                 "expected contribution to this node)</div>")
    parts.append('<table class="csp-q csp-why"><tr><th>input</th><th>label</th><th>weight</th><th>mean act.</th>'
                 f"<th>weight × mean</th><th>kind</th></tr>{rows}</table>" if why else
                 '<div class="csp-ex-title csp-why"><i>No inputs inside the circuit: it reads the token embedding '
                 "(see the driving tokens).</i></div>")
    fx = report.get("logit_effects")
    if fx:
        parts.append(f'<div class="csp-ex-title"><b>Direct logit effects of {html.escape(node)}</b> per unit of '
                     f"activation ({html.escape(fx['path'])}, final norm's scale {fx['norm_scale']:.3g}, its mean "
                     "over held-out text; later sublayers skipped)</div>")
        parts.append('<div class="csp-logit-effects" style="display:flex;gap:16px"><div style="flex:1">'
                     + _token_rows("raises", fx["up"], "logit") + '</div><div style="flex:1">'
                     + _token_rows("lowers", fx["down"], "logit") + "</div></div>")
    drivers = report.get("drivers")
    if drivers:
        parts.append(f'<div class="csp-ex-title"><b>Tokens that drive {html.escape(node)}</b>: its activation when '
                     "the residual stream entering its sublayer is the token's embedding alone</div>")
        parts.append('<div class="csp-drivers" style="display:flex;gap:16px"><div style="flex:1">'
                     + _token_rows("most positive", drivers["tokens_up"], "activation") + '</div><div style="flex:1">'
                     + _token_rows("most negative", drivers["tokens_down"], "activation") + "</div></div>")
    return "".join(parts) + "</div>"


# ---- embeddings -----------------------------------------------------------------------------


def embedding_tokens_figure(tokens: Sequence[str], weights: Sequence[float], channel: int, n: int = 20) -> go.Figure:
    """The n tokens with the largest and the n with the smallest embedding weight in one residual channel."""
    order = sorted(range(len(weights)), key=lambda i: weights[i])
    bottom, top = order[:n], order[-n:][::-1]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"top {n}", f"bottom {n}"), horizontal_spacing=0.2)
    for col, idx in ((1, top), (2, bottom)):
        fig.add_trace(go.Bar(x=[float(weights[i]) for i in idx][::-1], y=[f"{display_token(tokens[i])} " for i in idx][::-1],
                             orientation="h", marker_color=_sign_colors(float(weights[i]) for i in idx[::-1]),
                             hovertemplate="%{y}: %{x:.4g}<extra></extra>"), 1, col)
    fig.update_layout(showlegend=False)
    return _base_layout(fig, f"Token embedding weights of residual channel {channel}", max(380, 18 * n + 120))


def weights_histogram_figure(values: Sequence[float], title: str, nbins: int = 60) -> go.Figure:
    """Distribution of a channel's weights, zeros counted separately (weight-sparse models are mostly zero)."""
    vals = [float(v) for v in values]
    nonzero = [v for v in vals if v != 0.0]
    fig = go.Figure(go.Histogram(x=nonzero, nbinsx=nbins, marker_color="#1f4e79",
                                 hovertemplate="%{x}: %{y}<extra></extra>"))
    fig.update_xaxes(title="weight (nonzero entries)")
    fig.update_yaxes(title="count")
    return _base_layout(fig, f"{title}: {len(nonzero)} nonzero of {len(vals)}", 320)


def position_embedding_figure(wpe: Sequence[Sequence[float]], channel: int | None = None,
                              title: str = "Position embedding") -> go.Figure:
    """Heatmap of the position embedding (positions x channels), the chosen channel marked."""
    z = [list(map(float, row)) for row in wpe]
    m = max((abs(v) for row in z for v in row), default=1.0) or 1.0
    fig = go.Figure(go.Heatmap(z=z, colorscale=DIVERGING, zmid=0, zmin=-m, zmax=m, colorbar=dict(thickness=10),
                               hovertemplate="position %{y}<br>channel %{x}<br>%{z:.4g}<extra></extra>"))
    if channel is not None:
        fig.add_shape(type="rect", x0=channel - 0.5, x1=channel + 0.5, y0=-0.5, y1=len(z) - 0.5,
                      line=dict(color="#111", width=1.5))
        fig.add_annotation(x=channel, y=-0.5, text=f"ch {channel}", showarrow=False, yanchor="bottom",
                           font=dict(size=11))
    fig.update_xaxes(title="residual channel")
    fig.update_yaxes(title="position", autorange="reversed")
    return _base_layout(fig, title, 380)


# ---- prompt lab: every head of a layer on the user's prompt, and patching effects ----------------


def _plotly_text(tok: str) -> str:
    """A token for Plotly text (which reads a few HTML tags, and no named entity for quotes): escaped, visible."""
    return html.escape(display_token(tok), quote=False)


def attention_grid_figure(tokens: Sequence[str], patterns: Sequence[Sequence[Sequence[float]]], layer: int,
                          columns: int = 4) -> go.Figure:
    """One small (query x key) attention pattern per head of a layer, CircuitsVis style: `patterns` is
    (heads, T, T) over the prompt's tokens (no sink column; a row sums to 1 minus the sink's share). Hovering a
    cell names the head, the query token, the key token and the weight."""
    n_head, n_tok = len(patterns), len(tokens)
    columns = max(1, min(columns, n_head))
    rows = math.ceil(n_head / columns)
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=[f"head {h}" for h in range(n_head)],
                        horizontal_spacing=0.03, vertical_spacing=0.08 if rows > 1 else 0.0)
    shown = [f"{i}:{_plotly_text(t)}" for i, t in enumerate(tokens)]
    hover = [[f"{shown[q]} → {shown[k]}" for k in range(n_tok)] for q in range(n_tok)]
    for h, pattern in enumerate(patterns):
        z = [[float(pattern[q][k]) if k <= q else None for k in range(n_tok)] for q in range(n_tok)]
        fig.add_trace(go.Heatmap(z=z, customdata=hover, colorscale="Blues", zmin=0, zmax=1, showscale=h == 0,
                                 colorbar=dict(thickness=10, len=0.6, title=dict(text="weight", side="right")),
                                 name=f"head {h}", hovertemplate=f"head {h}<br>%{{customdata}}<br>%{{z:.3f}}<extra></extra>"),
                      row=h // columns + 1, col=h % columns + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False, showgrid=False, zeroline=False)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    title = f"Layer {layer}: attention of every head on the prompt (rows: query token, columns: key token)"
    return _base_layout(fig, title, max(260, 230 * rows + 60))


def attention_tokens_html(tokens: Sequence[str], patterns: Sequence[Sequence[Sequence[float]]],
                          sink: Sequence[Sequence[float]] | None = None, top: int = 3) -> str:
    """The prompt's tokens with, per token, where each head attends from it (its `top` keys and the sink's
    share), for ATTENTION_TOKENS_JS to show on hover: the readout names them and the tokens are shaded by the
    heads' mean weight. The data are JSON in an attribute (escaped), the tokens text."""
    import json

    n_head = len(patterns)
    rows = []
    for q in range(len(tokens)):
        heads = []
        for h in range(n_head):
            row = [float(x) for x in patterns[h][q][: q + 1]]
            best = sorted(range(len(row)), key=lambda k: -row[k])[:top]
            heads.append({"top": [[k, round(row[k], 3)] for k in best],
                          "sink": round(float(sink[h][q]), 3) if sink is not None else None})
        mean = [round(sum(float(patterns[h][q][k]) for h in range(n_head)) / max(n_head, 1), 4) for k in range(q + 1)]
        rows.append({"heads": heads, "mean": mean})
    data = json.dumps({"tokens": [display_token(t) for t in tokens], "rows": rows}, allow_nan=False)
    spans = "".join(
        f'<span class="csp-tok csp-att-tok" data-i="{i}" tabindex="0">{html.escape(t.replace(chr(10), "↵").replace(chr(9), "→   "))}</span>'
        + ("<br>" if t.endswith("\n") else "") for i, t in enumerate(tokens))
    return (TABLE_CSS + '<div class="csp-att" data-attn="' + html.escape(data) + '">'
            '<div class="csp-ex-title">Hover a token: where each head attends from it (shading: mean over heads)</div>'
            f'<div class="csp-tokens">{spans}</div><div class="csp-att-readout" style="white-space:pre-line;font-size:12px">(hover a token)</div></div>')


# For gr.HTML(js_on_load=...): one listener on the component (its content changes, the listener stays); the
# readout is written as text, never as HTML.
ATTENTION_TOKENS_JS = """
const show = (span) => {
  const box = span.closest('.csp-att');
  if (!box) return;
  const data = JSON.parse(box.dataset.attn);
  const i = Number(span.dataset.i), row = data.rows[i];
  box.querySelectorAll('.csp-att-tok').forEach((t) => {
    const k = Number(t.dataset.i), w = k < row.mean.length ? row.mean[k] : 0;
    t.style.background = k === i ? '#ffe08a' : `rgba(33,102,172,${Math.min(0.85, w * 0.85 / Math.max(...row.mean, 1e-6)).toFixed(3)})`;
  });
  const heads = row.heads.map((h, n) => `head ${n}: ` + h.top.map(([k, w]) => `«${data.tokens[k]}» ${(100 * w).toFixed(0)}%`).join(' ')
    + (h.sink === null ? '' : ` · sink ${(100 * h.sink).toFixed(0)}%`));
  box.querySelector('.csp-att-readout').textContent = `«${data.tokens[i]}» (token ${i}) attends to:\\n` + heads.join('\\n');
};
element.addEventListener('mouseover', (e) => { const s = e.target.closest('.csp-att-tok'); if (s) show(s); });
element.addEventListener('focusin', (e) => { const s = e.target.closest('.csp-att-tok'); if (s) show(s); });
"""


def patching_effects_html(rows: Sequence[Mapping[str, Any]], clean: float, corrupt: float, metric: str,
                          d_head: int | None = None, limit: int = 30, max_height: int = 520) -> str:
    """The ranked list of patching effects: node, what it is, effect and share of the clean − corrupted gap."""
    body = []
    for row in list(rows)[:limit]:
        v = float(row["effect"])
        share = row.get("recovered")
        body.append(f'<tr><td>{html.escape(row["node"])}</td><td>{html.escape(node_label(row["node"], d_head))}</td>'
                    f'<td style="color:{POSITIVE_HEX if v >= 0 else NEGATIVE_HEX}">{v:+.4f}</td>'
                    f'<td>{"–" if share is None else f"{100 * share:+.1f}%"}</td></tr>')
    more = f'<div class="csp-ex-title">{len(rows) - limit} more not listed</div>' if len(rows) > limit else ""
    head = (f'<div class="csp-ex-title">{html.escape(metric)}: clean {clean:+.4f}, corrupted {corrupt:+.4f}; '
            f'effect = corrupted run with the node patched from the clean run − corrupted run</div>')
    return (TABLE_CSS + head + f'<div style="max-height:{max_height}px;overflow-y:auto"><table class="csp-q csp-patch">'
            '<tr><th>node</th><th>what</th><th>effect</th>'
            f'<th>of the gap</th></tr>{"".join(body)}</table></div>{more}')


# ---- issue 22: activation histogram of a node (example index) ---------------------------------------------


def activation_histogram_html(node: str, edges: Sequence[float], counts: Sequence[int], density: float,
                              source: str, width: int = 520, height: int = 120) -> str:
    """A node's activation histogram as an inline SVG (log-scaled bar heights: the zero bin of a sparse node
    would flatten every other bar) with its density as text; each bar's hover gives its range and count."""
    total = sum(counts)
    if not counts or total == 0:
        return TABLE_CSS + f'<div class="csp-ex-title">No activations recorded for {html.escape(node)}.</div>'
    top = math.log1p(max(counts))
    bar_w = width / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = height * math.log1p(c) / top if top > 0 else 0.0
        lo, hi = edges[i], edges[i + 1]
        color = POSITIVE_HEX if (lo + hi) / 2 >= 0 else NEGATIVE_HEX
        bars.append(f'<rect x="{i * bar_w:.2f}" y="{height - h:.2f}" width="{max(bar_w - 1, 1):.2f}" height="{h:.2f}" '
                    f'fill="{color}"><title>{lo:.4g} to {hi:.4g}: {c:,} tokens</title></rect>')
    axis = (f'<text x="0" y="{height + 14}" font-size="11">{edges[0]:.3g}</text>'
            f'<text x="{width}" y="{height + 14}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text>')
    svg = (f'<svg class="csp-hist" width="{width}" height="{height + 18}" viewBox="0 0 {width} {height + 18}" '
           f'role="img" aria-label="activation histogram of {html.escape(node)}">{"".join(bars)}{axis}</svg>')
    text = (f'<div class="csp-density" data-node="{html.escape(node)}"><b>{html.escape(node)}</b>: active on '
            f'<b>{density:.2%}</b> of tokens ({round(density * total):,} of {total:,}; active: |activation| ≥ 2⁻¹⁴); '
            f'{html.escape(source)}</div>')
    return (TABLE_CSS + f'<div class="csp-hist-block" data-node="{html.escape(node)}"><h4>Activation histogram</h4>'
            + text + svg + '<div class="csp-ex-title">bar heights on a log scale; hover a bar for its range and count'
            "</div></div>")
