"""Importing the original visualizer's viz_data.pt (fixture made for the rms_sink_bigram checkpoint)."""

import pickle

import pytest
import torch

from conftest import FIXTURES
from modeling_csp import CSPForCausalLM
from modeling_csp.circuits.graph import CircuitGraph, node_id
from modeling_csp.circuits.viz_import import import_viz_data

VIZ = FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"


@pytest.fixture(scope="module")
def raw():
    return torch.load(VIZ, weights_only=True)


@pytest.fixture(scope="module")
def graph():
    return import_viz_data(VIZ)


def test_nodes_edges_and_halved_losses(graph, raw):
    imp = raw["importances"]
    assert graph.n_nodes == 93 and graph.n_edges == 76
    assert all(e.kind == "weight" and e.weight != 0 for e in graph.edges)
    assert graph.losses["full"] == pytest.approx(imp["loss"] / 2)
    assert graph.losses["circuit"] == pytest.approx(imp["interv_loss"] / 2)
    loc = "1.mlp.post_act"
    ch = raw["circuit_data"][loc][2].item()
    expected = imp["ch_interv_losses"][loc][2] / 2 - imp["interv_loss"] / 2
    assert graph.nodes[node_id(loc, ch)] == pytest.approx(expected)
    assert graph.layer_deltas["1.attn"] == pytest.approx((imp["layer_interv_losses"]["1.attn"] - imp["interv_loss"]) / 2)
    assert graph.pruning_curve[1] == [1, pytest.approx(raw["all_loss"][1][1] / 2), None]
    assert graph.k == 93 and graph.target_loss == 0.15 and graph.ablation == "mean"
    assert graph.model["n_layer"] == 3 and graph.model["d_model"] == 64 and graph.model["vocab_size"] == 512


def test_node_data_kept(graph, raw):
    node = node_id("0.attn.act_in", 5)
    data = graph.node_data[node]
    assert set(data) == {"top", "bottom", "task_activations"}
    assert set(data["top"]) == {"0.001", "0.01", "0.1", "0.5"}
    bottom, top = raw["samples"]["0.attn.act_in"][5][0.01]
    first = data["top"]["0.01"][0]
    assert first["tokens"] == top[0][0].tolist() and first["position"] == top[0][2]
    assert first["activations"] == pytest.approx(top[0][1].tolist(), rel=1e-5, abs=1e-6)
    docs = raw["importances"]["task_samples"][0]
    assert graph.task_docs == docs.tolist()
    assert len(data["task_activations"]) == docs.shape[0]


def test_roundtrip_and_model_check(graph, converted, tmp_path):
    loaded = CircuitGraph.load(graph.save(tmp_path / "viz.json"))
    assert loaded.nodes == graph.nodes and loaded.edges == graph.edges and loaded.node_data == graph.node_data
    rms = CSPForCausalLM.from_pretrained(converted["rms_sink_bigram"])
    CircuitGraph.load(tmp_path / "viz.json", model=rms)  # same architecture: accepted
    with pytest.raises(ValueError, match="circuit was made for model"):
        CircuitGraph.load(tmp_path / "viz.json", model=CSPForCausalLM.from_pretrained(converted["ln_gpt2"]))
    # the fixture's edges are the checkpoint's real weights: recomputing them gives the same numbers
    recomputed = CircuitGraph.from_masks(rms, graph.masks(rms.config))
    weights = {(e.source, e.target): e.weight for e in recomputed.edges if e.kind == "weight"}
    assert weights == {(e.source, e.target): pytest.approx(e.weight, abs=1e-6) for e in graph.edges}


def test_refuses_pickles_and_other_files(tmp_path):
    pkl = tmp_path / "viz_data.pkl"
    pkl.write_bytes(pickle.dumps({"circuit_data": {}}))
    with pytest.raises(ValueError, match="pickle files can run arbitrary code.*re-export|Re-export"):
        import_viz_data(pkl)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"missing keys \['circuit_data', 'importances'"):
        import_viz_data(other)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a viz_data.pt file"):
        import_viz_data(text)
    with pytest.raises(ValueError, match="does not exist"):
        import_viz_data(tmp_path / "missing.pt")


def _tampered(raw, tmp_path, change, name="viz_data.pt"):
    """The fixture with one value changed (deep copies of what changes), saved like the original."""
    import copy

    data = copy.deepcopy(raw)
    change(data)
    torch.save(data, tmp_path / name)
    return tmp_path / name


def test_non_finite_losses_are_refused_naming_the_field(raw, tmp_path):
    nan, inf = float("nan"), float("inf")
    loc = next(iter(raw["importances"]["ch_interv_losses"]))
    for change, field in [
        (lambda d: d["importances"].__setitem__("interv_loss", torch.tensor(nan)), r"importances\.interv_loss is nan"),
        (lambda d: d["importances"].__setitem__("loss", inf), r"importances\.loss is inf"),
        (lambda d: d["importances"]["ch_interv_losses"][loc].__setitem__(1, nan),
         rf"importances\.ch_interv_losses\['{loc}'\]\[1\] is nan"),
        (lambda d: d["importances"]["layer_interv_losses"].__setitem__("0.mlp", -inf),
         r"importances\.layer_interv_losses\['0\.mlp'\] is -inf"),
        (lambda d: d.__setitem__("all_loss", [(0, 1.0), (1, nan)]), r"all_loss\[1\] is nan"),
    ]:
        with pytest.raises(ValueError, match=rf"^viz_data\.pt: {field}, not a finite loss"):
            import_viz_data(_tampered(raw, tmp_path, change))


def test_a_non_finite_edge_weight_is_refused(raw, tmp_path):
    def poison(d):
        d["importances"]["pair_data"][0][0][d["importances"]["pair_data"][0][0] != 0] = float("nan")

    with pytest.raises(ValueError, match=r"^viz_data\.pt: edges\[0\]\.weight is nan"):
        import_viz_data(_tampered(raw, tmp_path, poison))


def test_a_tampered_pair_data_weight_is_recomputed_from_the_model(raw, converted, tmp_path):
    def double(d):
        d["importances"]["pair_data"][0][0] *= 2

    rms = CSPForCausalLM.from_pretrained(converted["rms_sink_bigram"])
    honest = import_viz_data(VIZ)
    assert honest.match_weights(rms) is None and honest.notices == []  # the fixture's edges are the real weights
    forged = import_viz_data(_tampered(raw, tmp_path, double))
    n_doubled = int((raw["importances"]["pair_data"][0][0] != 0).sum())
    notice = forged.match_weights(rms)
    assert notice.startswith(f"{n_doubled} of 76 edges do not match the model's weights") and "recomputed" in notice
    # the real weights, and no residual edges added (the file had none)
    assert {(e.source, e.target, e.kind): e.weight for e in forged.edges} == {
        (e.source, e.target, e.kind): pytest.approx(e.weight, abs=1e-6) for e in honest.edges}
