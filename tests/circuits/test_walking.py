"""Walking a circuit: paths into and out of a node, and its inputs ranked by weight x mean activation."""

import pytest
import torch

from conftest import random_ids, tiny_model
from modeling_csp.circuits.ablation import all_kept, compute_mean_activations
from modeling_csp.circuits.graph import CircuitGraph, Edge, model_info
from modeling_csp.circuits.walking import downstream, upstream, why_node


def small_circuit() -> CircuitGraph:
    """0.attn.act_in:1 -> 0.attn.v:2 -> 0.attn.resid_delta:1 -> 1.mlp.act_in:1 -> 1.mlp.post_act:3, and a side branch
    0.attn.act_in:1 -> 0.attn.q:0 (a dead end) and 0.mlp.post_act:0 -> 0.mlp.resid_delta:4 (not connected)."""
    nodes = dict.fromkeys(["0.attn.act_in:1", "0.attn.q:0", "0.attn.v:2", "0.attn.resid_delta:1", "0.mlp.post_act:0",
                           "0.mlp.resid_delta:4", "1.mlp.act_in:1", "1.mlp.post_act:3"], 0.1)
    edges = [Edge("0.attn.act_in:1", "0.attn.q:0", 0.5), Edge("0.attn.act_in:1", "0.attn.v:2", -0.25),
             Edge("0.attn.v:2", "0.attn.resid_delta:1", 2.0),
             Edge("0.attn.resid_delta:1", "1.mlp.act_in:1", 1.0, "residual"),
             Edge("1.mlp.act_in:1", "1.mlp.post_act:3", 0.75), Edge("0.mlp.post_act:0", "0.mlp.resid_delta:4", 1.5)]
    return CircuitGraph(model={"name": "hand-made"}, nodes=nodes, edges=edges)


def pairs(walk):
    return {(e.source, e.target) for e in walk.edges}


def test_upstream_is_every_path_into_the_node():
    walk = upstream(small_circuit(), "1.mlp.act_in:1")
    assert walk.nodes == ["0.attn.act_in:1", "0.attn.v:2", "0.attn.resid_delta:1"]  # forward order
    assert pairs(walk) == {("0.attn.act_in:1", "0.attn.v:2"), ("0.attn.v:2", "0.attn.resid_delta:1"),
                           ("0.attn.resid_delta:1", "1.mlp.act_in:1")}  # the dead-end q edge is on no path into it


def test_downstream_is_every_path_out_of_the_node():
    c = small_circuit()
    walk = downstream(c, "0.attn.act_in:1")
    assert walk.nodes == ["0.attn.q:0", "0.attn.v:2", "0.attn.resid_delta:1", "1.mlp.act_in:1", "1.mlp.post_act:3"]
    assert len(walk.edges) == 5 and ("0.mlp.post_act:0", "0.mlp.resid_delta:4") not in pairs(walk)
    assert downstream(c, "0.attn.q:0").nodes == []  # q acts through the pattern: no edge leaves it
    assert upstream(c, "0.attn.act_in:1").nodes == []  # read straight from the embedding


def test_unknown_node_is_a_clear_error():
    with pytest.raises(ValueError, match=r"not in the circuit .* such as 0.attn.act_in:1"):
        upstream(small_circuit(), "0.attn.q:7")
    with pytest.raises(ValueError, match="expected 'location:index'"):
        downstream(small_circuit(), "0.attn.q")


@pytest.fixture(scope="module")
def whole_model_circuit(one_thread):
    """A tiny model with biases, every node kept (so every input of every node is an edge), and its means."""
    model = tiny_model(density=0.2, bias=True)
    ids = random_ids(model, n=4, T=32)
    circuit = CircuitGraph.from_masks(model, all_kept(model.config))
    return model, circuit, compute_mean_activations(model, ids, cache_dir=False), ids


def test_why_node_ranks_inputs_by_weight_times_mean(whole_model_circuit):
    model, circuit, means, _ = whole_model_circuit
    node = next(n for n in circuit.nodes if n.startswith("1.mlp.post_act") and
                sum(e.target == n for e in circuit.edges) >= 3)
    rows = why_node(model, circuit, node, means)
    assert [abs(r.contribution) for r in rows] == sorted((abs(r.contribution) for r in rows), reverse=True)
    w = model.transformer.h[1].mlp.c_fc.weight.detach()
    j = int(node.rsplit(":", 1)[1])
    for r in rows:
        c = int(r.source.rsplit(":", 1)[1])
        assert r.weight == pytest.approx(float(w[j, c]), abs=1e-6)
        assert r.mean == pytest.approx(float(means["1.mlp.act_in"][c]), abs=1e-6)
        assert r.contribution == pytest.approx(r.weight * r.mean, abs=1e-7)
    assert len(why_node(model, circuit, node, means, top=2)) == 2


def test_why_node_contributions_sum_to_the_mean_pre_activation(whole_model_circuit):
    """The documented choice of mean (signed, the ablation's): with every input kept, the contributions plus the
    bias are the node's mean pre-activation over the same tokens, as the model computes it."""
    model, circuit, means, ids = whole_model_circuit
    with torch.no_grad(), model.record_activations(["1.mlp.pre_act"]) as acts:
        model(ids, use_cache=False)
    for j in range(8):
        rows = why_node(model, circuit, f"1.mlp.post_act:{j}", means)
        total = sum(r.contribution for r in rows) + float(model.transformer.h[1].mlp.c_fc.bias.detach()[j])
        assert total == pytest.approx(float(acts["1.mlp.pre_act"][..., j].double().mean()), abs=1e-4)


def test_why_node_checks_the_model(whole_model_circuit):
    model, circuit, means, _ = whole_model_circuit
    other = CircuitGraph(model={**model_info(tiny_model(seed=1)), "name": "other"}, nodes=circuit.nodes, edges=[])
    with pytest.raises(ValueError, match="different weights"):
        why_node(model, other, "1.mlp.post_act:5", means)
