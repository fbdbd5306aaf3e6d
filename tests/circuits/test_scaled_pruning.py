"""Pruning that scales: chunks of similar length, sparse kernels under autograd, batched exact importances,
and the whole prune against the exact per-node path it replaces (issue 21)."""

from pathlib import Path

import pytest
import torch

from modeling_csp import CSPConfig
from modeling_csp.circuits.ablation import ablate, all_kept, compute_mean_activations, task_logits
from modeling_csp.circuits.evaluation import evaluate, example_losses, node_attributions, node_importances
from modeling_csp.circuits.pruning import PruneConfig, importance_method, prune, top_k_masks, train_masks
from modeling_csp.circuits.tasks import get_task, make_task_dataset
from modeling_csp.model.loading import load_model_and_tokenizer
from conftest import synthetic_batch, tiny_model

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "modeling_csp" / "default_model"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def default():
    model, tokenizer = load_model_and_tokenizer(str(DEFAULT_MODEL))
    data = make_task_dataset(get_task("single_double_quote"), tokenizer, n=512, seed=0, max_len=model.config.block_size)
    means = compute_mean_activations(model, tokenizer, n_tokens=4096, cache_dir=False)
    return model, tokenizer, data, means


def test_chunks_of_similar_length_hold_every_row_once_and_give_the_same_loss(default):
    model, _, data, means = default
    batch = data.train
    chunks = batch.by_length(1024)
    assert len(chunks) > 1
    assert sorted(e.prompt for c in chunks for e in c.examples) == sorted(e.prompt for e in batch.examples)
    assert all(c.input_ids.numel() <= 1024 or len(c) == 1 for c in chunks)
    assert all(bool(c.attention_mask[:, 0].any()) for c in chunks)  # no column of padding only
    assert sum(c.input_ids.numel() for c in chunks) < 0.7 * batch.input_ids.numel()  # the point: less padding
    keep = top_k_masks({loc: torch.randn(m.numel(), generator=torch.Generator().manual_seed(1))
                        for loc, m in all_kept(model.config).items()}, 300)
    whole = evaluate(model, batch, keep, means, chunk_tokens=0)
    chunked = evaluate(model, batch, keep, means, chunk_tokens=1024)
    assert chunked[0] == pytest.approx(whole[0], abs=1e-5) and chunked[1] == whole[1]
    assert batch.by_length(0) == [batch] and batch.by_length(None) == [batch]


def test_a_minibatch_in_chunks_trains_the_same_masks(default):
    model, _, data, means = default
    config = PruneConfig(steps=6, progress=False)
    a, curve_a = train_masks(model, data.train, means, config)
    b, curve_b = train_masks(model, data.train, means, PruneConfig(steps=6, progress=False, chunk_tokens=0))
    for loc in a:
        torch.testing.assert_close(a[loc], b[loc], atol=1e-5, rtol=0)
    assert [row[2] for row in curve_a] == [row[2] for row in curve_b]


def test_sparse_kernels_carry_gradients_to_activations_inside_frozen_weights():
    model = tiny_model(density=0.05)
    batch = synthetic_batch(model, n=16, T=12)
    means = compute_mean_activations(model, [batch.input_ids], cache_dir=False)
    linear = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, linear.in_features, requires_grad=True)
    with torch.enable_grad():
        assert linear._csr_weight(x) is None  # outside: the dense kernel, so that weights get their gradients
        with model.frozen_weights():
            assert linear._csr_weight(x) is not None
    with model.frozen_weights():
        sparse = node_attributions(model, batch, means)
    assert all(p.grad is None for p in model.parameters())  # inside, weights get no gradient
    model.set_sparse_kernels(False)
    dense = node_attributions(model, batch, means)
    model.set_sparse_kernels(True)
    for loc in dense:
        torch.testing.assert_close(sparse[loc], dense[loc], atol=1e-5, rtol=1e-4)
    assert any(bool((dense[loc] != 0).any()) for loc in dense)


def test_masks_per_row_ablate_each_copy_of_the_batch(default):
    model, _, data, means = default
    batch = data.test.rows(torch.arange(8))
    keep = all_kept(model.config)
    a = {loc: m.clone() for loc, m in keep.items()}
    a["1.mlp.post_act"][:100] = False
    b = {loc: m.clone() for loc, m in keep.items()}
    b["0.attn.v"][:] = False
    rows = {loc: torch.cat([a[loc].expand(len(batch), -1), b[loc].expand(len(batch), -1)])[:, None, :] for loc in keep}
    twice = batch.rows(torch.arange(8).repeat(2))
    with torch.no_grad():
        with ablate(model, rows, means):
            both = example_losses(task_logits(model, twice), twice)
        for half, masks in zip(both.split(len(batch)), (a, b)):
            with ablate(model, masks, means):
                torch.testing.assert_close(half, example_losses(task_logits(model, batch), batch), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"expected \(128,\) or \(rows, 1, 128\)"):
        with ablate(model, {"0.attn.q": torch.ones(2, 128, dtype=torch.bool)}, means):
            pass


def test_batched_exact_importances_equal_one_node_per_pass(default):
    model, _, data, means = default
    scores = {loc: torch.randn(m.numel(), generator=torch.Generator().manual_seed(2))
              for loc, m in all_kept(model.config).items()}
    keep = top_k_masks(scores, 40)
    seen = []
    batched = node_importances(model, data.test, keep, means, nodes_per_pass=16, progress=lambda d, t: seen.append((d, t)))
    one_by_one = node_importances(model, data.test, keep, means, nodes_per_pass=1, chunk_tokens=0)
    assert batched.keys() == one_by_one.keys() and len(batched) == 40
    for node, value in one_by_one.items():
        assert batched[node] == pytest.approx(value, abs=1e-5)
    assert seen == [(16, 40), (32, 40), (40, 40)]
    with pytest.raises(ValueError, match="nodes_per_pass"):
        node_importances(model, data.test, keep, means, nodes_per_pass=0)


def test_exact_importances_only_where_their_passes_fit_the_budget(default):
    model, _, data, _ = default
    assert importance_method(PruneConfig(), model.config, 128, data.test) == "exact"
    assert importance_method(PruneConfig(), model.config, 129, data.test) == "attribution"
    yolo1 = CSPConfig(n_layer=8, d_model=1024, n_head=16, d_head=64, d_mlp=4096, vocab_size=2048, block_size=1024)
    assert importance_method(PruneConfig(), yolo1, 64, data.test) == "attribution"
    assert importance_method(PruneConfig(), yolo1, 4, data.test) == "exact"


def test_the_scaled_prune_finds_the_circuit_of_the_exact_per_node_path(default):
    """The CI check of issue 21: the new path (chunks, batched exact importances, lazy bisection ends) against the
    exact per-node path (whole batches, one node per pass), same task, same options: same circuit within 0.01 nats."""
    model, tokenizer, _, means = default
    options = dict(steps=60, n_example_tokens=0, n_random=2, progress=False)
    probes = {}
    fast = prune(model, tokenizer, "single_double_quote", PruneConfig(**options), means=means,
                 progress=lambda f, desc: probes.setdefault("fast", []).append(desc))
    exact = prune(model, tokenizer, "single_double_quote", PruneConfig(**options, chunk_tokens=0, nodes_per_pass=1),
                  means=means, progress=lambda f, desc: probes.setdefault("exact", []).append(desc))
    assert fast.circuit.k == pytest.approx(exact.circuit.k, abs=2) or \
        fast.circuit.losses["circuit"] == pytest.approx(exact.circuit.losses["circuit"], abs=0.01)
    assert fast.train_loss == pytest.approx(exact.train_loss, abs=0.01)
    for key in ("full", "circuit", "random", "complement"):
        assert fast.circuit.losses[key] == pytest.approx(exact.circuit.losses[key], abs=0.01)
    assert fast.circuit.meta["importance_method"] == exact.circuit.meta["importance_method"]
    if fast.circuit.k == exact.circuit.k:
        assert fast.circuit.nodes.keys() == exact.circuit.nodes.keys()
        for node, importance in exact.circuit.nodes.items():
            assert fast.circuit.nodes[node] == pytest.approx(importance, abs=1e-4)
    timings = fast.circuit.meta["timings"]
    assert {"data_and_means", "training", "bisection", "circuit"} <= timings.keys()
    assert any(d.startswith("k bisection: probe") for d in probes["fast"])
