"""Node locations, edges from weights, and the csp-circuit file format (load checks, diff)."""

import json
import re

import pytest
import torch

from conftest import FIXTURES, PROJECT_ROOT
from modeling_csp import CSPForCausalLM
from modeling_csp.circuits.ablation import all_kept
from modeling_csp.circuits.graph import (
    CircuitGraph, Edge, location_width, n_total_nodes, node_id, node_locations, parse_node_id, weights_hash,
)
from modeling_csp.utils.jsonio import loads_strict

VIZ = FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"


@pytest.fixture(scope="module")
def viz_masks(rms_model):
    data = torch.load(VIZ, weights_only=True)
    masks = {loc: torch.zeros(location_width(rms_model.config, loc), dtype=torch.bool) for loc in node_locations(rms_model.config)}
    for loc, idx in data["circuit_data"].items():
        masks[loc][idx] = True
    return masks, data


def test_locations_and_widths(rms_model):
    c = rms_model.config
    locs = node_locations(c)
    assert len(locs) == 8 * c.n_layer and locs[0] == "0.attn.act_in" and locs[-1] == f"{c.n_layer - 1}.mlp.resid_delta"
    assert set(locs) <= set(rms_model.hook_names())
    # the fixture's num_total_nodes
    assert sum(location_width(c, loc) for loc in locs) == n_total_nodes(c) == 2112
    assert parse_node_id("2.mlp.post_act:17") == ("2.mlp.post_act", 17)
    for bad in ("2.mlp.post_act", "2.mlp.nope:1", "x:1", "0.attn.q:-1"):
        with pytest.raises(ValueError):
            parse_node_id(bad)


def test_edges_are_the_models_weights(rms_model, viz_masks):
    """The fixture's pair_data are the checkpoint's real weights between its nodes: from_masks must agree."""
    masks, data = viz_masks
    graph = CircuitGraph.from_masks(rms_model, masks)
    assert graph.n_nodes == 93
    weight_edges = {(e.source, e.target): e.weight for e in graph.edges if e.kind == "weight"}
    expected = {}
    for w, src_ch, tgt_ch, (src, tgt) in data["importances"]["pair_data"]:
        for si, ti in w.nonzero().tolist():
            expected[(node_id(src, src_ch[si]), node_id(tgt, tgt_ch[ti]))] = float(w[si, ti])
    assert len(expected) == 76
    assert weight_edges.keys() == expected.keys()
    for key, value in expected.items():
        assert weight_edges[key] == pytest.approx(value, abs=1e-6)


def test_residual_edges(rms_model, viz_masks):
    masks, _ = viz_masks
    graph = CircuitGraph.from_masks(rms_model, masks)
    residual = [(e.source, e.target) for e in graph.edges if e.kind == "residual"]
    kept = graph.node_indices()
    order = lambda loc: 2 * int(loc.split(".")[0]) + loc.split(".")[1].startswith("mlp")  # noqa: E731
    expected = {
        (node_id(w, c), node_id(r, c))
        for w in kept if w.endswith("resid_delta")
        for r in kept if r.endswith("act_in") and order(r) > order(w)
        for c in set(kept[w]) & set(kept[r])
    }
    assert set(residual) == expected and len(residual) == len(expected)
    assert all(e.weight == 1.0 for e in graph.edges if e.kind == "residual")


def test_save_load_roundtrip_and_diff(rms_model, viz_masks, tmp_path):
    masks, _ = viz_masks
    graph = CircuitGraph.from_masks(rms_model, masks, importances={"0.attn.q:19": 0.5}, task="t", target_loss=0.15,
                                    losses={"full": 0.1, "circuit": 0.2, "random": 0.6, "complement": 0.7})
    path = graph.save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    assert data["format"] == "csp-circuit" and data["version"] == 1
    assert {"location": "0.attn.q", "index": 19, "importance": 0.5} in data["nodes"]
    loaded = CircuitGraph.load(path, model=rms_model)
    assert loaded.nodes == graph.nodes and loaded.edges == graph.edges and loaded.losses == graph.losses
    assert all(torch.equal(loaded.masks(rms_model.config)[k], masks[k]) for k in masks)

    smaller = {k: v.clone() for k, v in masks.items()}
    smaller["0.attn.q"][:] = False
    d = graph.diff(CircuitGraph.from_masks(rms_model, smaller))
    assert set(d.nodes_only_self) == {f"0.attn.q:{i}" for i in (19, 28, 31, 49)}
    assert not d.nodes_only_other and len(d.nodes_both) == 89
    assert d.edges_only_self and all("0.attn.q:" in t for _, t in d.edges_only_self) and not d.edges_only_other


def test_load_rejects_bad_files(rms_model, viz_masks, tmp_path):
    masks, _ = viz_masks
    good = CircuitGraph.from_masks(rms_model, masks).to_dict()

    def write(obj, name="bad.json"):
        p = tmp_path / name
        p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return p

    with pytest.raises(ValueError, match="not valid JSON"):
        CircuitGraph.load(write("{nope"))
    with pytest.raises(ValueError, match="not a csp-circuit file"):
        CircuitGraph.load(write({"hello": 1}))
    with pytest.raises(ValueError, match="version"):
        CircuitGraph.load(write({**good, "version": 99}))
    with pytest.raises(ValueError, match="missing keys"):
        CircuitGraph.load(write({k: v for k, v in good.items() if k != "edges"}))
    with pytest.raises(ValueError, match="not a node"):
        CircuitGraph.load(write({**good, "edges": [{"source": "0.attn.q:1", "target": "0.attn.q:2", "weight": 1}]}))
    with pytest.raises(ValueError, match="malformed"):
        CircuitGraph.load(write({**good, "nodes": [{"index": 3}]}))
    with pytest.raises(ValueError, match="does not exist"):
        CircuitGraph.load(tmp_path / "missing.json")
    out_of_range = {**good, "nodes": [{"location": "0.attn.q", "index": 999, "importance": None}], "edges": []}
    with pytest.raises(ValueError, match="out of range"):
        CircuitGraph.load(write(out_of_range), model=rms_model)


def test_load_checks_the_model(rms_model, converted, viz_masks, tmp_path):
    masks, _ = viz_masks
    path = CircuitGraph.from_masks(rms_model, masks, model_name="rms_sink_bigram").save(tmp_path / "c.json")
    other = CSPForCausalLM.from_pretrained(converted["ln_gpt2"])
    with pytest.raises(ValueError, match=r"circuit was made for model 'rms_sink_bigram' \(n_layer=3, d_model=64"):
        CircuitGraph.load(path, model=other)

    changed = CSPForCausalLM.from_pretrained(converted["rms_sink_bigram"])
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    assert weights_hash(changed) != weights_hash(rms_model)
    with pytest.raises(ValueError, match="different weights"):
        CircuitGraph.load(path, model=changed)


def test_node_data_quantile_examples_and_task_activations(rms_model, viz_masks, tmp_path):
    from modeling_csp.circuits.graph import attach_node_data, record_node_activations
    from conftest import synthetic_batch

    masks, _ = viz_masks
    circuit = CircuitGraph.from_masks(rms_model, masks, {}, task="synthetic")
    windows = torch.randint(0, 512, (6, 40), generator=torch.Generator().manual_seed(0))
    batch = synthetic_batch(rms_model, n=12, T=10)
    attach_node_data(rms_model, circuit, windows, batch, per_side=2, max_task_docs=8)

    node = "1.mlp.post_act:" + str(int(masks["1.mlp.post_act"].nonzero()[0]))
    loc, ch = parse_node_id(node)
    acts = record_node_activations(rms_model, windows, [loc])[loc][:, :, ch].float()
    only = record_node_activations(rms_model, windows, [loc], channels={loc: [0, ch]})[loc]  # the circuit's channels only
    assert only.shape == (*windows.shape, 2) and torch.equal(only[:, :, 1].float(), acts)
    data = circuit.node_data[node]
    assert set(data["top"]) == set(data["bottom"]) == {"0.001", "0.01", "0.1", "0.5"}
    peak = data["top"]["0.001"][0]  # the single highest activation, marked at `position`
    assert abs(peak["activations"][peak["position"]] - acts.max().item()) < 1e-2
    assert abs(data["bottom"]["0.001"][0]["activations"][data["bottom"]["0.001"][0]["position"]] - acts.min().item()) < 1e-2
    assert all(len(ex["tokens"]) == len(ex["activations"]) for side in ("top", "bottom") for exs in data[side].values() for ex in exs)
    assert len(circuit.task_docs) == len(data["task_activations"]) == 8
    assert [len(d) for d in circuit.task_docs] == [len(a) for a in data["task_activations"]]

    loaded = CircuitGraph.load(circuit.save(tmp_path / "c.json"), model=rms_model)
    assert loaded.node_data == json.loads(json.dumps(circuit.node_data)) and loaded.task_docs == circuit.task_docs


def test_non_finite_numbers_are_refused_naming_the_file_and_field(rms_model, viz_masks, tmp_path):
    masks, _ = viz_masks
    good = CircuitGraph.from_masks(rms_model, masks, losses={"full": 0.1, "circuit": 0.2}, target_loss=0.15).to_dict()
    path = tmp_path / "bad.json"
    for field, change, message in [
        ("losses.circuit", {"losses": {"full": 0.1, "circuit": float("nan")}}, r"bad\.json: losses\.circuit is nan"),
        ("target_loss", {"target_loss": float("inf")}, r"bad\.json: target_loss is inf"),
        ("edges", {"edges": [{**good["edges"][0], "weight": float("-inf")}, *good["edges"][1:]]},
         r"bad\.json: edges\[0\]\.weight is -inf"),
        ("layer_deltas", {"layer_deltas": {"0.attn": float("nan")}}, r"layer_deltas\.0\.attn is nan"),
        ("losses as text", {"losses": {"circuit": "0.2"}}, r"losses\.circuit is '0\.2': expected a number"),
    ]:
        path.write_text(json.dumps({**good, **change}))  # json.dumps writes the bare NaN / Infinity a strict writer never does
        with pytest.raises(ValueError, match=message):
            CircuitGraph.load(path)


def test_a_loss_that_was_not_computed_is_saved_as_null(rms_model, viz_masks, tmp_path):
    masks, _ = viz_masks
    circuit = CircuitGraph.from_masks(rms_model, masks, losses={"full": 0.1, "circuit": float("nan")},
                                      pruning_curve=[[0, float("inf"), 93]])
    text = circuit.save(tmp_path / "c.json").read_text()
    data = loads_strict(text)  # a strict parser reads every file `save` writes
    assert data["losses"] == {"full": 0.1, "circuit": None} and data["pruning_curve"] == [[0, None, 93]]
    assert CircuitGraph.load(tmp_path / "c.json").losses["circuit"] is None


def test_edges_that_match_the_weights_are_kept_as_they_are(rms_model, viz_masks, tmp_path):
    masks, _ = viz_masks
    real = CircuitGraph.from_masks(rms_model, masks)
    loaded = CircuitGraph.load(real.save(tmp_path / "real.json"), model=rms_model)
    assert loaded.edges == real.edges and loaded.notices == []
    fewer = CircuitGraph(model=real.model, nodes=real.nodes, edges=real.edges[::2])  # a file may list fewer
    assert fewer.match_weights(rms_model) is None and fewer.edges == real.edges[::2]


def test_a_tampered_weight_is_recomputed_with_a_notice(rms_model, viz_masks, tmp_path):
    masks, _ = viz_masks
    real = CircuitGraph.from_masks(rms_model, masks)
    data = real.to_dict()
    i = next(i for i, e in enumerate(data["edges"]) if e["kind"] == "weight")
    true_weight = data["edges"][i]["weight"]
    data["edges"][i]["weight"] = 2 * true_weight
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(data))
    loaded = CircuitGraph.load(path, model=rms_model)
    assert loaded.edges == real.edges  # the model's weights, every edge
    notice = loaded.notices[0]
    assert notice.startswith(f"1 of {real.n_edges} edges do not match the model's weights")
    assert f"{data['edges'][i]['source']} -> {data['edges'][i]['target']}" in notice
    assert f"the model's weight {true_weight:.6g}" in notice and f"{real.n_edges} edges" in notice

    q = next(n for n in real.nodes if n.startswith("0.attn.q:"))
    k = next(n for n in real.nodes if n.startswith("0.attn.k:"))
    write = next(n for n in real.nodes if n.startswith("0.attn.resid_delta:"))
    read = next(n for n in real.nodes if n.startswith("1.attn.act_in:"))
    for wrong in (Edge(q, k, 0.5),  # q and k are joined by no weight
                  Edge(write, read, 2.0, "residual")):  # the residual stream carries a channel with weight 1
        forged = CircuitGraph(model=real.model, nodes=real.nodes, edges=[*real.edges, wrong])
        notice = forged.match_weights(rms_model)
        assert notice.startswith(f"1 of {real.n_edges + 1} edges") and f"{wrong.source} -> {wrong.target}" in notice
        assert forged.edges == real.edges and forged.notices == [notice]


def test_fabricated_edges_are_replaced_by_the_models_weights(rms_model, tmp_path):
    """400k random edges over every node of the model: the file loads, its edges are the model's."""
    real = CircuitGraph.from_masks(rms_model, all_kept(rms_model.config))
    nodes = list(real.nodes)
    gen = torch.Generator().manual_seed(0)
    ends = torch.randint(len(nodes), (400_000, 2), generator=gen).tolist()
    weights = (10 + torch.rand(400_000, generator=gen)).tolist()  # far from any weight of the model
    fake = CircuitGraph(model={k: v for k, v in real.model.items() if k != "weights_hash"}, nodes=real.nodes,
                        edges=[Edge(nodes[s], nodes[t], w) for (s, t), w in zip(ends, weights)])
    path = fake.save(tmp_path / "fake.json")
    assert CircuitGraph.load(path).n_edges == 400_000  # without a model there is nothing to check against
    loaded = CircuitGraph.load(path, model=rms_model)
    weight_edges = [e for e in real.edges if e.kind == "weight"]  # the file had no residual edges: none are added
    assert loaded.edges == weight_edges
    assert loaded.notices[0].startswith("400,000 of 400,000 edges do not match the model's weights")
    assert loaded.notices[0].endswith(f"recomputed from the model's weights: {len(weight_edges):,} edges")


# ---- node labels (issue 22) -------------------------------------------------------------------

SHIPPED = PROJECT_ROOT / "modeling_csp" / "default_model" / "circuits" / "bracket_brace_k8.json"


def test_labels_are_saved_read_back_and_removed(tmp_path):
    circuit = CircuitGraph.load(SHIPPED)
    first, second = list(circuit.nodes)[:2]
    labelled = circuit.with_labels({first: '  reads "(" , then\nmore  ', second: "second"})
    assert circuit.labels == {} and labelled.labels == {first: 'reads "(" , then\nmore', second: "second"}
    path = labelled.save(tmp_path / "labelled.json")
    assert loads_strict(path.read_text())["labels"] == labelled.labels
    assert CircuitGraph.load(path).labels == labelled.labels
    assert "labels" not in circuit.to_dict()  # unlabelled files are unchanged
    assert labelled.with_labels({first: ""}).labels == {second: "second"}


def test_labels_are_checked(tmp_path):
    circuit = CircuitGraph.load(SHIPPED)
    node = next(iter(circuit.nodes))
    with pytest.raises(ValueError, match=r"has 201 characters; shorten it to at most 200"):
        circuit.with_labels({node: "x" * 201})
    with pytest.raises(ValueError, match=r"cannot label '0.mlp.post_act:999': it is not a node of this circuit"):
        circuit.with_labels({"0.mlp.post_act:999": "x"})
    with pytest.raises(ValueError, match="must be text, not int"):
        circuit.with_labels({node: 3})
    data = circuit.to_dict()
    for labels, message in (([], "'labels' must be an object"), ({"0.mlp.post_act:999": "x"}, "not a node of the circuit"),
                            ({node: "y" * 300}, "has 300 characters")):
        (tmp_path / "bad.json").write_text(json.dumps({**data, "labels": labels}))
        with pytest.raises(ValueError, match=re.escape(message)):
            CircuitGraph.load(tmp_path / "bad.json")


def test_label_count_is_capped(monkeypatch):
    from modeling_csp.circuits import graph

    monkeypatch.setattr(graph, "MAX_LABELS", 2)
    circuit = CircuitGraph.load(SHIPPED)
    a, b, c = list(circuit.nodes)[:3]
    two = circuit.with_labels({a: "a", b: "b"})
    with pytest.raises(ValueError, match="3 node labels; a circuit holds at most 2"):
        two.with_labels({c: "c"})
    assert two.with_labels({a: "", c: "c"}).labels == {b: "b", c: "c"}  # removing one makes room
