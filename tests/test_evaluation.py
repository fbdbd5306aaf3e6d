"""`modeling_csp.evaluation`: how a circuit is evaluated, from its own pruning options, with file sizes capped.

That the app and `csp evaluate` give the same numbers through it is tested in test_explorer_analysis.py."""

import pytest

from modeling_csp.circuits import CircuitGraph
from modeling_csp.evaluation import MAX_EXAMPLES, MAX_RANDOM, EvalOptions


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
