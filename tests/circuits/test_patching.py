"""Activation patching of circuit nodes, against patching done by hand one node at a time."""

import pytest
import torch

from modeling_csp.circuits import patching
from modeling_csp.circuits.graph import location_width, node_id, node_locations
from conftest import random_ids, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(density=0.3)


@pytest.fixture(scope="module")
def prompts(model):
    clean, corrupt = random_ids(model, n=2, T=12, seed=1)
    corrupt[:6] = clean[:6]  # a shared start, as a real pair of prompts has
    return clean, corrupt


def some_nodes(config, per_location=3):
    """A few channels at every node location."""
    return [node_id(loc, ch) for loc in node_locations(config)
            for ch in range(0, location_width(config, loc), location_width(config, loc) // per_location)][::2]


def by_hand(model, clean, corrupt, node, metric):
    """The corrupted run with one node set to its clean value at every position, through model.intervene."""
    loc, ch = node.rsplit(":", 1)
    ch = int(ch)
    with torch.no_grad():
        with model.record_activations([loc]) as acts:
            model(clean[None])

        def patch(x):
            x = x.clone()
            x[..., ch] = acts[loc][..., ch]
            return x

        with model.intervene({loc: patch}):
            patched = metric(model(corrupt[None]).logits)
        return float(patched[0] - metric(model(corrupt[None]).logits)[0])


def test_node_effects_match_patching_by_hand(model, prompts):
    clean, corrupt = prompts
    metric = patching.logit_difference(5, 7)
    nodes = some_nodes(model.config)
    result = patching.node_effects(model, clean, corrupt, nodes, metric, batch_size=7)  # chunks mix locations
    assert list(result.effects) == nodes
    for node in nodes:
        assert result.effects[node] == pytest.approx(by_hand(model, clean, corrupt, node, metric), abs=1e-4), node
    with torch.no_grad():
        assert result.clean == pytest.approx(float(metric(model(clean[None]).logits)[0]), abs=1e-5)
        assert result.corrupt == pytest.approx(float(metric(model(corrupt[None]).logits)[0]), abs=1e-5)
    assert any(abs(v) > 1e-3 for v in result.effects.values())  # the prompts differ: some node matters
    assert [n for n, _ in result.ranked()] == sorted(nodes, key=lambda n: -abs(result.effects[n]))


def test_batch_size_does_not_change_effects(model, prompts):
    clean, corrupt = prompts
    metric = patching.logit_difference(3, 9)
    nodes = some_nodes(model.config)
    one = patching.node_effects(model, clean, corrupt, nodes, metric, batch_size=1)
    many = patching.node_effects(model, clean, corrupt, nodes, metric)
    for node in nodes:
        assert many.effects[node] == pytest.approx(one.effects[node], abs=1e-4)


def test_identical_prompts_give_no_effect(model, prompts):
    """Identical prompts give no effect; patching a node from a prompt into itself changes nothing."""
    clean, _ = prompts
    result = patching.node_effects(model, clean, clean, some_nodes(model.config), patching.logit_difference(1, 2))
    assert result.clean == result.corrupt
    assert all(abs(v) < 1e-5 for v in result.effects.values())
    assert result.recovered(next(iter(result.effects))) is None  # no gap to recover
    assert patching.rank_nodes(result, top=2)[0]["recovered"] is None


def test_logit_difference_reads_one_position():
    logits = torch.arange(2 * 3 * 10, dtype=torch.float).reshape(2, 3, 10)
    assert patching.logit_difference(4, 1)(logits).tolist() == [3.0, 3.0]
    assert patching.logit_difference(1, 4, position=0)(logits).tolist() == [-3.0, -3.0]


def test_prompts_of_different_lengths_name_both_lengths(model, prompts):
    clean, corrupt = prompts
    with pytest.raises(ValueError, match="clean prompt has 12 tokens and the corrupted one 11"):
        patching.node_effects(model, clean, corrupt[:11], ["0.mlp.post_act:0"], patching.logit_difference(1, 2))


@pytest.mark.parametrize("nodes, message", [
    (["0.mlp.post_act:100000"], "not in this model"),
    (["9.mlp.post_act:0"], "not in this model"),
    (["nonsense"], "bad node id"),
])
def test_unknown_nodes_are_named(model, prompts, nodes, message):
    with pytest.raises(ValueError, match=message):
        patching.node_effects(model, *prompts, nodes, patching.logit_difference(1, 2))


def test_a_metric_must_give_one_value_per_row(model, prompts):
    with pytest.raises(ValueError, match="one value per batch row"):
        patching.node_effects(model, *prompts, ["0.mlp.post_act:0"], lambda logits: logits[:, -1, 0].sum())
