"""Unit tests of modeling_csp.plotting: every figure builder on real circuit data (the visualizer fixture
imported as a CircuitGraph, and a hand-made circuit), checked for structure, not pixels."""

import json
import math
import re

import plotly.graph_objects as go
import pytest

from conftest import FIXTURES
from modeling_csp import plotting as P
from modeling_csp.circuits.graph import CircuitDiff, CircuitGraph, Edge
from modeling_csp.training.train import stages_curve


@pytest.fixture(scope="module")
def viz_circuit():
    from modeling_csp.circuits.viz_import import import_viz_data

    return import_viz_data(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt")


@pytest.fixture
def small():
    """Two layers, a head with q/k/v channels, an MLP path, a residual edge, one importance unknown."""
    nodes = {
        "0.attn.act_in:3": 0.1, "0.attn.q:17": 0.5, "0.attn.k:18": 0.2, "0.attn.v:40": 0.05,
        "0.attn.resid_delta:3": 0.3, "0.mlp.act_in:3": None, "0.mlp.post_act:7": 0.9, "0.mlp.resid_delta:5": 0.0,
        "1.attn.act_in:5": 0.01,
    }
    edges = [
        Edge("0.attn.act_in:3", "0.attn.q:17", 0.7), Edge("0.attn.act_in:3", "0.attn.k:18", -0.4),
        Edge("0.attn.act_in:3", "0.attn.v:40", 0.1), Edge("0.attn.v:40", "0.attn.resid_delta:3", -1.2),
        Edge("0.attn.resid_delta:3", "0.mlp.act_in:3", 1.0, "residual"),
        Edge("0.mlp.act_in:3", "0.mlp.post_act:7", 0.3), Edge("0.mlp.post_act:7", "0.mlp.resid_delta:5", -0.2),
        Edge("0.mlp.resid_delta:5", "1.attn.act_in:5", 1.0, "residual"),
    ]
    model = {"name": "t", "n_layer": 2, "d_model": 8, "d_model_in": 8, "d_mlp": 32, "n_head": 4, "d_head": 16,
             "vocab_size": 50}
    return CircuitGraph(model=model, nodes=nodes, edges=edges, task="single_double_quote",
                        layer_deltas={"0.attn": 0.4, "0.mlp": 0.8, "1.attn": 0.0, "1.mlp": 0.0},
                        pruning_curve=[[0, 1.0, 100], [1, 0.5, 50], [2, 0.2, 9]])


def _node_trace(fig):
    traces = [t for t in fig.data if t.name == "nodes"]
    assert len(traces) == 1
    return traces[0]


def test_labels_and_ids():
    assert P.split_node("1.attn.q:37") == (1, "attn", "q", 37)
    assert P.sublayer_of("1.attn.q:37") == "1.attn" and P.sublayer_of("0.mlp.post_act") == "0.mlp"
    assert P.node_label("0.attn.q:37", d_head=16) == "h2.ch5"
    assert P.node_label("0.attn.v:3", d_head=16) == "h0.ch3"
    assert P.node_label("0.mlp.post_act:12") == "n12"
    assert P.node_label("0.mlp.resid_delta:4") == "r4"
    assert P.display_token(" x\n") == "·x↵"


def test_layer_summary_and_most_important(small):
    rows = P.layer_summary(small)
    assert [r["layer"] for r in rows] == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    assert {r["layer"]: r["n_nodes"] for r in rows} == {"0.attn": 5, "0.mlp": 3, "1.attn": 1, "1.mlp": 0}
    assert P.most_important_layer(small) == "0.mlp"
    small.layer_deltas = {}
    assert P.most_important_layer(small) == "0.attn"  # no deltas: most nodes


def test_attention_layer_graph(small):
    fig = P.layer_graph_figure(small, "0.attn", selected="0.attn.q:17")
    nodes = _node_trace(fig)
    ids = [c[0] for c in nodes.customdata]
    assert sorted(ids) == sorted(n for n in small.nodes if n.startswith("0.attn"))
    pos = {i: (x, y) for i, x, y in zip(ids, nodes.x, nodes.y)}
    # rows top to bottom: act_in, q, k, v, resid_delta, each on a row of its own
    ys = [pos[n][1] for n in ("0.attn.act_in:3", "0.attn.q:17", "0.attn.k:18", "0.attn.v:40", "0.attn.resid_delta:3")]
    assert ys == sorted(ys, reverse=True) and len(set(ys)) == 5
    assert dict(zip(fig.layout.yaxis.tickvals, fig.layout.yaxis.ticktext))[pos["0.attn.k:18"][1]] == "k"
    # q:17 and k:18 are head 1 (one band, same column), v:40 is head 2 (a band to the right)
    assert pos["0.attn.q:17"][0] == pos["0.attn.k:18"][0] < pos["0.attn.v:40"][0]
    labels = dict(zip(ids, nodes.text))  # the band names the head, the label the channel
    assert labels["0.attn.q:17"] == "ch1" and labels["0.attn.v:40"] == "ch8" and labels["0.attn.act_in:3"] == "r3"
    heads = [a.text for a in fig.layout.annotations]
    assert heads == ["head 1", "head 2"] and len(fig.layout.shapes) == 2
    # importance is the marker colour; hover has id, head/channel and importance
    assert list(nodes.marker.color)[ids.index("0.attn.q:17")] == 0.5
    assert nodes.marker.cmin == -nodes.marker.cmax  # zero is the middle (white) of the blue/red scale
    hover = nodes.hovertext[ids.index("0.attn.q:17")]
    assert "0.attn.q:17" in hover and "head 1" in hover and "0.5" in hover
    # edges: weight edges only (no residual ones), sign in the colour
    lines = [t for t in fig.data if t.mode == "lines"]
    n_segments = sum(sum(1 for v in t.x if v is None) for t in lines)
    assert n_segments == 4
    assert any("172" in t.line.color for t in lines) and any("178" in t.line.color for t in lines)  # blue +, red -
    assert any(t.name == "selected" for t in fig.data)
    json.loads(fig.to_json())


def test_big_layer_wraps_and_caps_edges():
    nodes = {f"0.mlp.post_act:{i}": float(i) for i in range(100)} | {f"0.mlp.act_in:{i}": 0.0 for i in range(5)}
    edges = [Edge(f"0.mlp.act_in:{i % 5}", f"0.mlp.post_act:{i}", (i + 1) * (-1) ** i) for i in range(100)]
    model = {"name": "t", "n_layer": 1, "d_model": 8, "d_model_in": 8, "d_mlp": 128, "n_head": 1, "d_head": 8,
             "vocab_size": 50}
    c = CircuitGraph(model=model, nodes=nodes, edges=edges)
    fig = P.layer_graph_figure(c, "0.mlp", max_per_line=40, max_edges=30)
    trace = _node_trace(fig)
    mids = [y for cd, y in zip(trace.customdata, trace.y) if "post_act" in cd[0]]
    assert len(set(mids)) == 3  # 100 neurons on 3 lines of at most 40
    assert all(y < min(yy for cd, yy in zip(trace.customdata, trace.y) if "act_in" in cd[0]) for y in mids)
    drawn = sum(sum(1 for v in t.x if v is None) for t in fig.data if t.mode == "lines")
    assert drawn == 30 and "100 weight edges, the 30 strongest drawn" in fig.layout.title.text
    assert fig.layout.height > 460  # taller for the extra lines
    assert sum(1 for t in trace.text if t) == 105  # every node labelled up to max_labels
    few = _node_trace(P.layer_graph_figure(c, "0.mlp", max_labels=50, selected="0.mlp.post_act:3"))
    labelled = {cd[0] for cd, t in zip(few.customdata, few.text) if t}
    assert len(labelled) == 61 and "0.mlp.post_act:99" in labelled and "0.mlp.post_act:3" in labelled
    text_pos = {cd[0]: tp for cd, tp in zip(trace.customdata, trace.textposition)}
    line = sorted((n for n in text_pos if "post_act" in n), key=lambda n: int(n.split(":")[1]))[:40]
    assert {text_pos[n] for n in line[0::2]} == {"top center"} and {text_pos[n] for n in line[1::2]} == {"bottom center"}


def test_edge_threshold_and_highlight(small):
    """Large circuits: edges under a share of the largest |weight| are hidden, search matches get a ring."""
    fig = P.layer_graph_figure(small, "0.attn", min_weight=0.5, highlight=["0.attn.k:18", "0.attn.v:40"])
    drawn = sum(sum(1 for v in t.x if v is None) for t in fig.data if t.mode == "lines")
    assert drawn == 2  # |0.7| and |-1.2| of the largest 1.2; 0.1 and -0.4 hidden
    assert "2 of 4 weight edges with |w| ≥ 50% of the largest" in fig.layout.title.text
    ring = [t for t in fig.data if t.name == "matches"][0]
    assert [c[0] for c in ring.customdata] == ["0.attn.k:18", "0.attn.v:40"]
    over = P.circuit_overview_figure(small, min_weight=0.9, highlight=["0.mlp.post_act:7"])
    assert "1 of 6 weight edges" in over.layout.title.text
    assert [t for t in over.data if t.name == "matches"][0].customdata[0][0] == "0.mlp.post_act:7"


def test_mlp_layer_graph_and_empty_layer(small):
    fig = P.layer_graph_figure(small, "0.mlp")
    nodes = _node_trace(fig)
    assert len(nodes.x) == 3
    empty = P.layer_graph_figure(small, "1.mlp")
    assert "no nodes" in empty.layout.annotations[0].text


def test_viz_fixture_layer_graphs(viz_circuit):
    for layer in P.layer_names(3):
        fig = P.layer_graph_figure(viz_circuit, layer)
        ids = [c[0] for c in _node_trace(fig).customdata]
        assert set(ids) == {n for n in viz_circuit.nodes if P.sublayer_of(n) == layer}
    assert P.most_important_layer(viz_circuit) == max(viz_circuit.layer_deltas, key=viz_circuit.layer_deltas.get)


def test_overview(small, viz_circuit):
    fig = P.circuit_overview_figure(small)
    ids = [c[0] for c in _node_trace(fig).customdata]
    assert sorted(ids) == sorted(small.nodes)
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks[0] == "embed" and ticks[-1] == "logits"
    resid = [t for t in fig.data if t.name == "residual"][0]
    assert sum(1 for v in resid.x if v is None) == 2
    fig2 = P.circuit_overview_figure(viz_circuit, selected=next(iter(viz_circuit.nodes)))
    assert len(_node_trace(fig2).x) == viz_circuit.n_nodes
    # nodes sit in forward order from left to right
    xs = dict(zip([c[0] for c in _node_trace(fig2).customdata], _node_trace(fig2).x))
    assert xs["0.attn.act_in:5"] < xs["0.attn.q:19"] < xs["0.attn.resid_delta:3"] < xs["0.mlp.post_act:27"] < xs["1.attn.q:0"]


def test_layer_bars(small):
    fig = P.layer_bars_figure(P.layer_summary(small), selected="0.mlp")
    bar = fig.data[0]
    assert list(bar.y) == ["1.mlp (0)", "1.attn (1)", "0.mlp (3)", "0.attn (5)"]
    assert list(bar.x) == [0.0, 0.0, 0.8, 0.4]
    small.layer_deltas["0.attn"] = -0.2
    colors = list(P.layer_bars_figure(P.layer_summary(small)).data[0].marker.color)
    assert colors[-1] == P.NEGATIVE_HEX and colors[-2] == P.POSITIVE_HEX  # red for a negative delta


def test_one_colour_convention():
    """Blue is positive and red negative in every diverging scale and signed bar."""
    assert P.DIVERGING[0][1] == "rgb(178,24,43)" and P.DIVERGING[-1][1] == "rgb(33,102,172)"
    heat = P.task_activations_figure([[1.0, -1.0]], [[0.5, 0.5]]).data[0]
    assert [c[1] for c in heat.colorscale][-1] == "rgb(33,102,172)"  # the largest value is blue
    qk = P.attention_pattern_figure([[1.0, -1.0], [0.0, 2.0]], ["a", "b"], "qk", zero_centered=True).data[0]
    assert [c[1] for c in qk.colorscale][0] == "rgb(178,24,43)"
    pos = P.position_embedding_figure([[1.0, -1.0]]).data[0]
    assert [c[1] for c in pos.colorscale][-1] == "rgb(33,102,172)"
    abl = P.ablation_effect_figure([{"label": "a", "d_loss": 0.5, "d_logit_diff": -0.5}])
    assert list(abl.data[0].marker.color) == [P.POSITIVE_HEX] and list(abl.data[1].marker.color) == [P.NEGATIVE_HEX]
    imp = P.importance_bar_figure({"0.mlp.post_act:1": 0.3, "0.mlp.post_act:2": -0.1})
    assert list(imp.data[0].marker.color) == [P.POSITIVE_HEX, P.NEGATIVE_HEX]
    emb = P.embedding_tokens_figure(["a", "b", "c", "d"], [-2.0, -1.0, 1.0, 2.0], channel=0, n=2)
    assert set(emb.data[0].marker.color) == {P.POSITIVE_HEX} and set(emb.data[1].marker.color) == {P.NEGATIVE_HEX}


def test_log_axis_ticks_are_written_out():
    """Log axes carry their own ticks (1, 2, 5 x 10^n in full) instead of Plotly's bare minor digits."""
    fig = P.faithfulness_figure([[1, 2.0], [10, 0.5], [100, 0.05]], full_loss=0.1)
    assert list(fig.layout.xaxis.tickvals) == [1, 2, 5, 10, 20, 50, 100]
    assert list(fig.layout.xaxis.ticktext) == ["1", "2", "5", "10", "20", "50", "100"]
    assert list(fig.layout.yaxis.ticktext) == ["0.05", "0.1", "0.2", "0.5", "1", "2"]
    wide = P.faithfulness_figure([[1, 1.0], [2816, 0.1]])
    assert list(wide.layout.xaxis.ticktext) == ["1", "10", "100", "1000"]  # many decades: powers of ten only
    narrow = P.faithfulness_figure([[30, 0.31], [36, 0.3]])
    assert len(narrow.layout.yaxis.tickvals) >= 2  # a range inside one decade still gets two ticks
    density = P.training_curve_figure(stages_curve({"curve": [{"step": 1, "density": 0.5}, {"step": 2, "density": 0.1}]}))
    assert list(density.layout.yaxis2.ticktext) == ["0.1", "0.2", "0.5"]


def test_curves(small):
    fig = P.faithfulness_figure([[1, 2.0], [10, 0.5], [100, 0.0]], full_loss=0.1, target=0.15, random_loss=0.9,
                                current_k=10, random_points=[[1, 2.0], [10, 1.5]])
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert min(fig.data[0].y) > 0  # a zero loss is clipped for the log axis
    names = [t.name for t in fig.data]
    assert names[:2] == ["circuit (top-k)", "random, same size"]
    assert "full model (0.1)" in names and "target (0.15)" in names and "k = 10" in names
    assert not fig.layout.shapes and not fig.layout.annotations  # no log-coordinate pitfalls
    k_line = fig.data[names.index("k = 10")]
    assert list(k_line.x) == [10, 10] and min(k_line.y) == pytest.approx(1e-4) and max(k_line.y) == 2.0
    assert "No faithfulness" in P.faithfulness_figure([]).layout.annotations[0].text
    fig = P.pruning_curve_figure(small.pruning_curve)
    assert [t.name for t in fig.data] == ["task loss", "nodes kept"]
    fig = P.training_curve_figure(stages_curve({"curve": [{"step": 1, "train_loss": 5, "val_loss": 5.5, "density": 0.5},
                                             {"step": 2, "train_loss": 4, "val_loss": 4.5, "density": 0.1}]}))
    assert {t.name for t in fig.data} == {"train loss", "val loss", "weight density"}
    assert P.training_curve_figure(None).layout.annotations
    # a model trained in two stages (--init-from): both curves, against the tokens seen since the first stage
    first = {"curve": [{"step": 1, "tokens": 100, "train_loss": 5}, {"step": 2, "tokens": 200, "train_loss": 4}],
             "final": {"tokens": 200}}
    fig = P.training_curve_figure(stages_curve({"curve": [{"step": 1, "tokens": 50, "train_loss": 3.5}], "previous": first}))
    assert list(fig.data[0].x) == [100, 200, 250] and list(fig.data[0].y) == [5, 4, 3.5]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == 250  # the new stage's first point


def test_ablation_figures(small):
    fig = P.importance_bar_figure(small.nodes, selected="0.mlp.post_act:7", d_head=16)
    assert list(fig.data[0].x)[0] == "0.mlp.post_act:7"  # largest first, unknown importances dropped
    assert len(fig.data[0].x) == len(small.nodes) - 1
    fig = P.ablation_effect_figure([{"label": "0.attn", "d_loss": 0.3, "d_logit_diff": -1.0},
                                    {"label": "0.mlp.post_act:7", "d_loss": -0.1, "d_logit_diff": 0.2}])
    assert len(fig.data) == 2 and list(fig.data[0].y) == [0.3, -0.1]
    other = CircuitGraph(model=small.model, nodes={"0.attn.q:17": 0.1, "1.mlp.post_act:1": 0.2}, edges=[])
    diff = small.diff(other)
    assert isinstance(diff, CircuitDiff)
    fig = P.circuit_diff_figure(diff, "A", "B")
    totals = {t.name: sum(t.y) for t in fig.data if t.xaxis == "x"}
    assert totals == {"only A": len(small.nodes) - 1, "both": 1, "only B": 1}


def test_next_tokens_figure():
    fig = P.next_tokens_figure([(" x", 0.5), ("\n", 0.2)], [(" y", 0.9)])
    assert len(fig.data) == 2
    assert list(fig.data[0].y) == ["↵ ", "·x "]  # largest at the top
    assert len(P.next_tokens_figure([("a", 1.0)]).data) == 1


def test_token_heatmap_html():
    out = P.token_heatmap_html(["<a>", " b", "\n", "c"], [1.0, -2.0, 0.0, 0.5], peak=1)
    assert "&lt;a&gt;" in out and "<a>" not in out  # escaped
    assert out.count('class="csp-tok"') == 4
    spans = out.split('class="csp-tok"')[1:]
    assert "outline:2px solid" in spans[1] and not any("outline" in s for i, s in enumerate(spans) if i != 1)
    assert "rgba(178,24,43,0.850)" in out  # the most negative value is full red
    assert "↵" in out and "<br>" in out
    plain = P.token_heatmap_html(["a", "b"], [0.0, 1.0], zero_centered=False)
    assert "rgba(241,105,19,0.850)" in plain and "rgba(241,105,19,0.000)" in plain
    assert "csp-tok" in P.tokens_html(["a", "\n"], [1, 2])


def _span_texts(out):
    import html
    import re

    return [html.unescape(t) for t in re.findall(r'<span class="csp-tok"[^>]*>(.*?)</span>', out)]


def test_token_views_show_characters_split_over_tokens_as_text():
    """A character whose bytes span several tokens shows whole on the token completing it, a token alone shows its
    partial bytes as ⟨e9⟩ escapes: no view shows U+FFFD, and token text stays text, not HTML."""
    from transformers import AutoTokenizer

    from modeling_csp.model.loading import DEFAULT_MODEL_DIR
    from modeling_csp.model.tokenization import token_text, token_texts

    if not (DEFAULT_MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip("no default model installed (modeling_csp/default_model)")
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    prompt = 's = "héllo wörld 日本語 🙂 <b>&amp;'
    ids = tok.encode(prompt, add_special_tokens=False)
    texts = token_texts(tok, ids)
    values = [math.sin(i) for i in range(len(ids))]
    strip, heat = P.tokens_html(texts, ids), P.token_heatmap_html(texts, values, peak=3)
    for out in (strip, heat):
        assert "\ufffd" not in out and "<b>" not in out and "".join(_span_texts(out)).replace("↵", "\n") == prompt
        assert "a later token completes" in out  # the hover note of a token that only starts a character
    assert "\ufffd" not in P.examples_html([(texts, values, 5)], context=2, after=2)
    pattern = [[1.0 if j <= i else 0.0 for j in range(len(ids))] for i in range(len(ids))]
    att = P.attention_pattern_figure(pattern, texts, "pattern")
    assert "\ufffd" not in att.to_json() and any("🙂" in y for y in att.data[0].y)
    alone = [token_text(tok, i) for i in ids]
    top = P.next_tokens_figure([(t, 1 / len(alone)) for t in alone])
    assert "\ufffd" not in top.to_json() and any("⟨" in y for y in top.data[0].y)


def test_quantile_examples_html():
    ex = {"tokens": ["x", " =", " 1"], "activations": [0.0, 3.0, -1.0], "position": 1}
    samples = {0.001: {"top": [ex], "bottom": [("a", "b")]}, 0.5: {"top": [(["q"], [1.0], 0)], "bottom": []}}
    samples[0.001]["bottom"] = [(["a", "b"], [-1.0, -0.5], 0)]
    out = P.quantile_examples_html(samples, title="t")
    assert out.index("0.1%") < out.index("50%")
    assert "peak 3" in out and "no examples" in out
    assert "No activating examples" in P.quantile_examples_html({})


def test_task_examples_and_attention_html():
    """The task view: token text per class (named), per-pair differences; attention of the decision token."""
    classes = ([(["a", " b"], [1.0, -2.0])], [(["c", " d", " e"], [0.5, 0.5, 4.0])])
    out = P.task_examples_html(classes, ("class 1: correct «\"»", "class 2: correct «'»"), [(["a", " b"], [0.5, -6.0])])
    assert "class 1: correct «&quot;»" in out and "pair difference (class 1 − class 2)" in out
    assert out.count('class="csp-tok"') == 2 + 3 + 2 and "outline:2px solid" in out  # largest |value| boxed
    assert "rgba(178,24,43,0.850)" in out  # the difference -6 is the most negative of its own scale: full red
    assert "No task examples" in P.task_examples_html(([], []), ("1", "2"))

    from types import SimpleNamespace as Row  # the fields of explorer.analysis.AttentionRow

    rows = [Row(tokens=["x", " =", ' "'], weights=[0.1, 0.2, 0.6], sink=0.1, class_index=0),
            Row(tokens=["y"], weights=[0.3], sink=0.7, class_index=1)]
    out = P.attention_rows_html(rows, ("class 1", "class 2"), "head 3")
    assert out.index("class 1") < out.index("class 2") and "sink 0.10" in out and "sink 0.70" in out
    assert "rgba(33,102,172,0.850)" in out  # the largest weight is full blue


def test_node_panel_figures(small):
    fig = P.task_activations_figure([[1, 2, 3], [4, 5]], [[0, 1], [2, 2, 2]], ("A", "B"))
    assert len(fig.data[0].z) == 2 and len(fig.data[0].z[0]) == 3
    diff = list(fig.data[2].y)
    assert diff[-1] == pytest.approx(4.0 - 1.5)  # right-aligned: last positions are (3, 5) vs (1, 2)
    assert diff[0] == pytest.approx(1.0 - 2.0)  # only one example of each class reaches position -2
    assert fig.data[0].zmid == 0
    fig = P.task_activations_figure([[1, -2]], [[0, 1]], zero_centered=False)
    assert fig.data[0].zmid is None and fig.data[0].zmin == -2
    fig = P.attention_pattern_figure([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], ["a", "b"], "head 0", sink=True)
    assert list(fig.data[0].x)[0] == "sink"
    fig = P.attention_pattern_figure([[1.0, math.nan], [0.5, -0.5]], ["a", "b"], "qk", zero_centered=True)
    assert fig.data[0].zmid == 0
    rows = P.connections_table(small, "0.attn.act_in:3")
    assert [r[0] for r in rows] == ["out"] * 3 and abs(rows[0][3]) == 0.7
    rows = P.connections_table(small, "0.mlp.act_in:3")
    assert rows[0][:2] == ["in", "0.attn.resid_delta:3"] and rows[0][4] == "residual"


def test_embedding_figures():
    toks = [f"t{i}" for i in range(50)]
    w = [float(i - 25) for i in range(50)]
    fig = P.embedding_tokens_figure(toks, w, channel=3, n=5)
    assert list(fig.data[0].y)[-1].strip() == "t49" and list(fig.data[1].y)[-1].strip() == "t0"
    fig = P.weights_histogram_figure([0.0, 0.0, 1.0, -1.0], "w")
    assert "2 nonzero of 4" in fig.layout.title.text
    fig = P.position_embedding_figure([[0.0, 1.0], [2.0, -1.0]], channel=1)
    assert fig.layout.shapes


def test_message_figure_escapes():
    fig = P.message_figure("<b>x</b>")
    assert "&lt;b&gt;" in fig.layout.annotations[0].text
    assert isinstance(fig, go.Figure)


# ---- issue 22: prompt lab (attention grid, patching effects)


def test_overview_coloured_by_values(small):
    effects = {"0.attn.q:17": -2.0, "0.mlp.post_act:7": 0.5}  # the other nodes have no value: white
    fig = P.circuit_overview_figure(small, values=effects, value_name="patching effect", title="Patching")
    trace = _node_trace(fig)
    colours = dict(zip([c[0] for c in trace.customdata], trace.marker.color))
    assert colours["0.attn.q:17"] == -2.0 and colours["0.mlp.post_act:7"] == 0.5 and colours["0.attn.k:18"] == 0.0
    assert (trace.marker.cmin, trace.marker.cmax) == (-2.0, 2.0)
    assert trace.marker.colorbar.title.text == "patching effect" and fig.layout.title.text == "Patching"
    assert "patching effect: -2" in trace.hovertext[[c[0] for c in trace.customdata].index("0.attn.q:17")]
    plain = _node_trace(P.circuit_overview_figure(small))
    assert plain.marker.colorbar.title.text == "importance (Δ loss)"


def test_attention_grid_is_one_causal_pattern_per_head():
    tokens = ["x", " <b>", ' "', "\n"]
    patterns = [[[1.0 if k == q - h % (q + 1) else 0.0 for k in range(4)] for q in range(4)] for h in range(6)]
    fig = P.attention_grid_figure(tokens, patterns, layer=2, columns=4)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 6 and [t.name for t in heat] == [f"head {h}" for h in range(6)]
    assert all(len(t.z) == 4 and all(len(r) == 4 for r in t.z) for t in heat)
    assert heat[0].z[1][2] is None and heat[0].z[3][3] == 1.0  # nothing above the diagonal (causal)
    assert heat[0].customdata[1][0] == "1:·&lt;b&gt; → 0:x"  # tokens escaped for Plotly's pseudo-HTML
    assert "Layer 2" in fig.layout.title.text and sum(t.showscale is True for t in heat) == 1


def test_attention_tokens_html_carries_each_tokens_row_as_escaped_json():
    import html as html_module

    tokens = ["a", "<i>", '"q"']
    patterns = [[[1, 0, 0], [0.25, 0.75, 0], [0.5, 0.1, 0.4]], [[1, 0, 0], [1, 0, 0], [0, 0, 1]]]
    out = P.attention_tokens_html(tokens, patterns, sink=[[0.0, 0.1, 0.2], [0.5, 0.5, 0.5]], top=2)
    assert "<i>" not in out and "&lt;i&gt;" in out  # a token is text
    data = json.loads(html_module.unescape(re.search(r'data-attn="([^"]*)"', out).group(1)))
    assert data["tokens"] == ["a", "<i>", '"q"']
    assert data["rows"][1]["heads"][0] == {"top": [[1, 0.75], [0, 0.25]], "sink": 0.1}
    assert data["rows"][2]["mean"] == [0.25, 0.05, 0.7]
    assert out.count('class="csp-tok csp-att-tok"') == 3


def test_patching_effects_html_lists_effects_and_shares():
    rows = [{"node": "0.attn.q:17", "effect": -1.5, "recovered": -0.25}, {"node": "0.mlp.post_act:7", "effect": 0.5,
                                                                            "recovered": None}]
    out = P.patching_effects_html(rows, 2.0, -4.0, "logit(<a>) − logit(b)", d_head=16, limit=1)
    assert "-1.5000" in out and "-25.0%" in out and "h1.ch1" in out and "&lt;a&gt;" in out
    assert "0.mlp.post_act:7" not in out and "1 more not listed" in out
# ---- issue 22: a circuit through training


def test_circuit_through_training_figure():
    curve = {"snapshots": ["step 100", "step 200"], "circuits": {
        "quotes": {"task": "quotes", "k": 12, "at_target": True, "circuit": [0.9, 0.1], "full": [0.2, 0.0]},
        "quotes (k=4)": {"task": "quotes", "k": 4, "at_target": False, "circuit": [2.0, 1.5], "full": [0.2, 0.0]}}}
    fig = P.circuit_through_training_figure(curve)
    names = [t.name for t in fig.data]
    assert names == ["quotes (12 nodes)", "quotes: full model", "chance (ln 2)"]  # the k=4 circuit: not at target
    assert list(fig.data[0].x) == ["step 100", "step 200"] and list(fig.data[0].y) == [0.9, 0.1]
    assert fig.data[1].line.dash == "dot" and fig.data[1].line.color == fig.data[0].line.color
    assert fig.layout.yaxis.type == "log" and min(fig.data[1].y) > 0  # a zero loss is clipped for the log axis
    assert not fig.layout.shapes and not fig.layout.annotations
    assert len(P.circuit_through_training_figure(curve, at_target_only=False).data) == 5
    assert "ships no circuit-through-training" in P.circuit_through_training_figure(None).layout.annotations[0].text
def test_graphs_highlight_the_selected_nodes_paths(small):
    """`paths` (the walks of `circuits.walking`) are drawn as a band per direction and rings on their nodes, in the
    layer graph (edges inside the layer) and the overview (residual edges too)."""
    from modeling_csp.circuits.walking import downstream, upstream

    node = "0.attn.v:40"
    paths = (upstream(small, node), downstream(small, node))
    fig = P.layer_graph_figure(small, "0.attn", node, paths=paths)
    by_name = {t.name: t for t in fig.data}
    assert [c[0] for c in by_name["upstream nodes"].customdata] == ["0.attn.act_in:3"]
    assert [c[0] for c in by_name["downstream nodes"].customdata] == ["0.attn.resid_delta:3"]  # (later layers: other graphs)
    assert list(by_name["upstream path"].x).count(None) == 1 and "downstream path" in by_name
    names = [t.name for t in fig.data]
    assert names.index("upstream path") < names.index("nodes") < names.index("upstream nodes")  # bands under the nodes
    assert "upstream path" not in {t.name for t in P.layer_graph_figure(small, "0.attn", node).data}
    overview = {t.name: t for t in P.circuit_overview_figure(small, 2, node, paths=paths).data}
    assert {c[0] for c in overview["downstream nodes"].customdata} == {
        "0.attn.resid_delta:3", "0.mlp.act_in:3", "0.mlp.post_act:7", "0.mlp.resid_delta:5", "1.attn.act_in:5"}
    assert list(overview["downstream path"].x).count(None) == 5  # two residual edges among them


def test_connections_and_reading_link_to_nodes(small):
    html_out = P.connections_html(P.connections_table(small, "0.attn.v:40"))
    assert html_out.count('class="csp-node-link"') == 2 and 'data-node="0.attn.resid_delta:3"' in html_out
    report = {"node": "0.attn.v:40", "upstream": {"nodes": ["0.attn.act_in:3"], "n_edges": 1},
              "downstream": {"nodes": [], "n_edges": 0},
              "why": [{"source": "0.attn.act_in:3", "weight": 0.1, "mean": -2.0, "contribution": -0.2, "kind": "weight"}],
              "logit_effects": {"path": "OV path", "norm_scale": 2.5, "up": [{"id": 5, "token": " <a>", "logit": 0.5}],
                                "down": [{"id": 6, "token": "x\n", "logit": -0.25}]},
              "drivers": None}
    out = P.node_reading_html(report, 16)
    assert 'data-node="0.attn.v:40"' in out and out.count('class="csp-node-link"') == 2  # upstream list, why table
    assert "Why 0.attn.v:40" in out and "-0.2" in out and "none in the circuit" in out
    assert "·&lt;a&gt;" in out and "x↵" in out and "Tokens that drive" not in out  # tokens shown as visible text
