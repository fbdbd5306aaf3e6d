"""`modeling_csp.evaluation`: how a circuit is evaluated, from its own pruning options, with file sizes capped.

That the app and `csp evaluate` give the same numbers through it is tested in test_explorer_analysis.py."""

import pytest

from modeling_csp.circuits.graph import CircuitGraph
from modeling_csp.circuits.evaluation import MAX_EXAMPLES, MAX_RANDOM, EvalOptions


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


def test_options_are_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        EvalOptions().n_examples = 3


# ---- verdicts: judged on held-out losses ----------------------------------------------------------


def test_a_circuit_that_reaches_its_target_only_on_training_examples_says_so():
    """The issue's else_elif prune: k chosen on the training split (0.477 <= 0.490), held out it is worse than a
    coin flip."""
    import json
    import math

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
    import math

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
