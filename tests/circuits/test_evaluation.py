"""`modeling_csp.circuits.evaluation`: the task metrics, a circuit against random circuits and its complement, each
node's and sublayer's effect, how a circuit is evaluated (from its own pruning options, with file sizes capped) and
the verdict on its numbers.

That the app and `csp evaluate` give the same numbers through it is tested in test_explorer_analysis.py."""

import dataclasses
import math

import pytest
import torch

from modeling_csp.circuits.ablation import all_kept, compute_mean_activations
from modeling_csp.circuits.evaluation import (
    MAX_EXAMPLES, MAX_RANDOM, EvalOptions, evaluate, faithfulness, last_token_logits, layer_ablation_deltas,
    node_importances, random_masks_like, task_accuracy, task_loss,
)
from modeling_csp.circuits.graph import CircuitGraph
from modeling_csp.circuits.pruning import PruneConfig, top_k_masks
from modeling_csp.circuits.tasks import make_task_dataset
from conftest import synthetic_batch


@pytest.fixture(scope="module")
def means(rms_model):
    tokens = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    return compute_mean_activations(rms_model, [tokens], cache_dir=False)


# ---- task metrics ------------------------------------------------------------------------------


def test_loss_and_accuracy(fixture_tiktoken):
    batch = make_task_dataset("single_double_quote", fixture_tiktoken, n=128).test
    n, V = len(batch), 2048
    rows = torch.arange(n)
    equal = torch.zeros(n, V)
    assert task_loss(equal, batch).item() == pytest.approx(math.log(2))
    assert task_accuracy(equal, batch) == 0.0  # ties are not correct

    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(0))
    logits[rows, batch.correct_ids] = logits[rows, batch.alternative_ids] + 1.0
    assert task_loss(logits, batch).item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-5)
    assert task_loss(logits, batch).item() < math.log(2)
    assert task_accuracy(logits, batch) == 1.0

    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(1), requires_grad=True)
    lc, la = logits[rows, batch.correct_ids], logits[rows, batch.alternative_ids]
    manual = torch.stack([-torch.log(torch.exp(c) / (torch.exp(c) + torch.exp(a))) for c, a in zip(lc, la)]).mean()
    loss = task_loss(logits, batch)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    loss.backward()
    assert logits.grad is not None
    assert task_accuracy(logits, batch) == pytest.approx((lc > la).float().mean().item())


def test_last_token_logits(fixture_tiktoken):
    batch = make_task_dataset("bracket_counting", fixture_tiktoken, n=128).test
    n, T = batch.input_ids.shape
    full = torch.randn(n, T, 2048)
    last = last_token_logits(full, batch)
    assert torch.equal(last, full[:, -1])
    assert task_loss(full, batch).item() == pytest.approx(task_loss(last, batch).item())


# ---- a circuit against random circuits, and each node's effect ----------------------------------


@pytest.mark.usefixtures("one_thread")
def test_faithfulness_edge_cases(rms_model, means):
    batch = synthetic_batch(rms_model, n=48, T=12)
    keep_all = all_kept(rms_model.config)
    f = faithfulness(rms_model, batch, keep_all, means, n_random=2)
    assert f["circuit"] == pytest.approx(f["full"], abs=1e-6) and f["random"] == pytest.approx(f["full"], abs=1e-6)
    none = {k: torch.zeros_like(v) for k, v in keep_all.items()}
    f = faithfulness(rms_model, batch, none, means, n_random=5)
    assert f["complement"] == pytest.approx(f["full"], abs=1e-6)
    assert len(f["random_losses"]) == 5 and f["random_baseline_as_good"]  # empty circuits are all alike

    gen = torch.Generator().manual_seed(0)
    some = top_k_masks({k: torch.rand(v.numel(), generator=gen) for k, v in keep_all.items()}, 100)
    rand = random_masks_like(some, torch.Generator().manual_seed(1))
    assert all(int(rand[k].sum()) == int(some[k].sum()) for k in some)


@pytest.mark.usefixtures("one_thread")
def test_importances_and_layer_deltas(rms_model, means):
    batch = synthetic_batch(rms_model, n=16)
    keep = all_kept(rms_model.config)
    keep = {loc: m & (torch.arange(m.numel()) == 2) for loc, m in keep.items()}  # node 2 at every location
    base = evaluate(rms_model, batch, keep, means)[0]
    exact = node_importances(rms_model, batch, keep, means)
    assert len(exact) == len(keep)
    dropped = {**keep, "1.mlp.post_act": keep["1.mlp.post_act"].clone()}
    dropped["1.mlp.post_act"][2] = False
    assert exact["1.mlp.post_act:2"] == pytest.approx(evaluate(rms_model, batch, dropped, means)[0] - base, abs=1e-6)
    approx = node_importances(rms_model, batch, keep, means, method="attribution")
    assert approx.keys() == exact.keys() and all(map(lambda v: v == v, approx.values()))

    deltas = layer_ablation_deltas(rms_model, batch, keep, means)
    assert list(deltas) == ["0.attn", "0.mlp", "1.attn", "1.mlp", "2.attn", "2.mlp"]
    no_mlp2 = {loc: (torch.zeros_like(m) if loc.startswith("2.mlp") else m) for loc, m in keep.items()}
    assert deltas["2.mlp"] == pytest.approx(evaluate(rms_model, batch, no_mlp2, means)[0] - base, abs=1e-6)


# ---- how a circuit is evaluated ------------------------------------------------------------------


def circuit_with(options):
    return CircuitGraph(model={}, nodes={}, edges=[], meta={"options": options})


def test_options_come_from_the_circuit():
    o = EvalOptions.of(circuit_with({"n_examples": 256, "data_seed": 3, "n_random": 7, "seed": 11,
                                     "freeze_norm_scales": True, "random_margin": 0.05}))
    assert (o.n_examples, o.data_seed, o.n_random, o.seed, o.freeze_norm_scales, o.margin) == (256, 3, 7, 11, True, 0.05)
    assert o.notices == () and o.data_key == (256, 3)
    plain = EvalOptions.of(None)  # no circuit, or no options: pruning's defaults
    assert (plain.n_examples, plain.n_random, plain.seed, plain.freeze_norm_scales) == (512, 5, 0, False)
    assert EvalOptions.of(circuit_with({"seed": 2}), n_random=3, seed=9).n_random == 3  # csp evaluate's flags win
    assert EvalOptions.of(circuit_with({"seed": 2}), seed=9).seed == 9


def test_sizes_from_a_file_are_capped_with_a_notice():
    o = EvalOptions.of(circuit_with({"n_examples": 10**7, "n_random": 10**6}))
    assert o.n_examples == MAX_EXAMPLES and o.n_random == MAX_RANDOM
    assert any("n_examples=10000000" in n for n in o.notices) and any("n_random" in n for n in o.notices)
    bad = EvalOptions.of(circuit_with({"n_examples": "lots", "seed": float("nan"), "n_random": -3,
                                       "random_margin": "x"}))
    assert (bad.n_examples, bad.seed, bad.n_random, bad.margin) == (512, 0, 1, 0.02)
    assert len(bad.notices) == 3
    assert EvalOptions.of(CircuitGraph(model={}, meta={"options": "not a dict"})).notices == ()


def test_a_prune_and_a_later_evaluation_of_its_file_use_the_same_options():
    """Pruning evaluates its circuits with `EvalOptions.from_config(config)`; `csp evaluate` and the app read the
    options back from the file's `meta.options` (all of `PruneConfig`): both must give the same options, and the
    defaults of both are pruning's."""
    assert EvalOptions.from_config(PruneConfig()) == EvalOptions() == EvalOptions.of(None)
    config = PruneConfig(n_examples=300, data_seed=4, n_random=3, seed=8, random_margin=0.1, freeze_norm_scales=True)
    stored = circuit_with(dataclasses.asdict(config))
    assert EvalOptions.from_config(config) == EvalOptions.of(stored)
    assert EvalOptions.from_config(config) != EvalOptions()


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EvalOptions().n_examples = 3


# ---- verdicts: judged on held-out losses ----------------------------------------------------------


def test_a_circuit_that_reaches_its_target_only_on_training_examples_says_so():
    """The issue's else_elif prune: k chosen on the training split (0.477 <= 0.490), held out it is worse than a
    coin flip."""
    import json

    from modeling_csp.circuits.evaluation import CHANCE_LOSS, circuit_verdict

    v = circuit_verdict({"full": 0.408, "circuit": 1.026}, target=0.490, train_loss=0.477)
    assert CHANCE_LOSS == pytest.approx(math.log(2))
    assert v.target_reached_train and not v.target_reached_heldout and v.reached_only_on_train
    assert v.at_or_above_chance and v.passed is False and not v.better_than_full and v.means_something is None
    text = " ".join(v.messages())
    assert "reached only on training examples" in text and "1.026 is at or above chance" in text
    assert not any(m.startswith("✅") for m in v.messages())
    assert json.loads(json.dumps(v.as_dict(), allow_nan=False))["reached_only_on_train"] is True

    good = circuit_verdict({"full": 0.009, "circuit": 0.131}, target=0.15, train_loss=0.148)
    assert good.passed and good.target_reached_heldout and not good.reached_only_on_train and not good.warnings
    assert good.messages() == ("✅ target reached on held-out examples: circuit loss 0.131 ≤ 0.150 nats (training 0.148)",)
    missed = circuit_verdict({"full": 0.5, "circuit": 0.3}, target=0.15, train_loss=0.2)
    assert missed.passed is False and not missed.reached_only_on_train and "target not reached" in missed.warnings[0]


def test_a_circuit_much_better_than_the_full_model_is_flagged_with_the_control_suggested():
    from modeling_csp.circuits.evaluation import circuit_verdict

    v = circuit_verdict({"full": 0.553, "circuit": 0.099}, target=0.15)  # the custom task
    assert v.passed and v.better_than_full and "--control shuffled" in v.note("better_than_full").text
    near = circuit_verdict({"full": 0.14, "circuit": 0.10}, target=0.15)  # within 0.05 of the full model
    assert near.better_than_full is False and not near.warnings
    control = {"k": 40, "test_loss_at_k": 0.95, "k_to_target": None}
    with_control = circuit_verdict({"full": 0.553, "circuit": 0.099}, 0.15, control=control, k=40)
    assert "compare it with its shuffled-answer control" in with_control.note("better_than_full").text
    assert with_control.means_something is True


def test_the_control_is_read_on_held_out_examples():
    from modeling_csp.circuits.evaluation import circuit_verdict

    losses = {"full": 0.2, "circuit": 0.18}
    far = circuit_verdict(losses, 0.25, control={"k": 30, "test_loss_at_k": 0.9, "k_to_target": None}, k=30)
    assert far.means_something is True and "0.900" in far.note("control").text
    close = circuit_verdict(losses, 0.25, control={"k": 30, "test_loss_at_k": 0.2, "k_to_target": None}, k=30)
    assert close.means_something is False and "does as well on held-out examples" in close.note("control").text
    fits = circuit_verdict(losses, 0.25, control={"k": 30, "test_loss_at_k": 0.9, "k_to_target": 12}, k=30)
    assert fits.means_something is False and "with 12 nodes" in fits.note("control").text
    old = circuit_verdict(losses, 0.25, control={"k": 30, "loss_at_k": 0.9, "k_to_target": None}, k=30)
    assert old.means_something is None and "training-split reading" in old.note("control").text
    other_size = circuit_verdict(losses, 0.25, control={"k": 8, "test_loss_at_k": 0.9}, k=30)
    assert other_size.means_something is None and other_size.note("control") is None
    at_chance = circuit_verdict({"full": 0.4, "circuit": 0.8}, 0.25, control={"k": 5, "test_loss_at_k": 3.0}, k=5)
    assert at_chance.means_something is False  # a big gap to the control does not rescue a circuit at chance


def test_targets_at_or_above_chance():
    from modeling_csp.circuits.evaluation import TargetAtChance, check_target, circuit_verdict

    assert check_target(0.69) == 0.69 and check_target(0) == 0
    for target in (math.log(2), 0.7, 5.519):
        with pytest.raises(TargetAtChance, match="at or above chance"):
            check_target(target)
    for bad in (-1, float("nan"), "x", None):
        with pytest.raises(ValueError, match="number of nats"):
            check_target(bad)
    v = circuit_verdict({"full": 0.7, "circuit": 0.71}, target=0.75)  # an old file's target
    assert v.target_at_or_above_chance and v.target_reached_heldout and v.at_or_above_chance and v.passed is False


def test_missing_numbers_leave_flags_unknown():
    from modeling_csp.circuits.evaluation import circuit_verdict

    v = circuit_verdict({"full": None, "circuit": float("nan")}, target=None)
    assert v.passed is None and v.at_or_above_chance is None and v.better_than_full is None and v.notes == ()
    other_task = circuit_verdict({"full": 0.3, "circuit": 0.28}, target=None)  # judged on another task: no target
    assert other_task.passed is None and other_task.target_reached_heldout is None and not other_task.warnings
    split = circuit_verdict({"full": 0.3, "circuit": 0.2}, 0.25, split="train")
    assert "training (no held-out examples)" in split.messages()[0]


def test_a_circuit_file_is_judged_on_its_stored_held_out_losses():
    from modeling_csp.circuits.evaluation import verdict_of

    circuit = CircuitGraph(model={}, nodes={}, edges=[], target_loss=0.42, k=0,
                           losses={"full": 0.457, "circuit": 0.461}, meta={"train_circuit_loss": 0.416},
                           control={"k": 0, "test_loss_at_k": 0.896, "k_to_target": None})
    v = verdict_of(circuit)
    assert v.reached_only_on_train and v.means_something and (v.target, v.train_loss) == (0.42, 0.416)
    on_other_task = verdict_of(circuit, {"full": 0.3, "circuit": 0.9}, own_task=False)
    assert on_other_task.target is None and on_other_task.at_or_above_chance and on_other_task.passed is None
