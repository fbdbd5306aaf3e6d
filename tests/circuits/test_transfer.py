"""A circuit pruned on the default model, evaluated on that model, on an edited copy of it, on a model of another
shape, and through a list of snapshots."""

import copy
import json

import pytest
import torch

from conftest import PROJECT_ROOT
from modeling_csp import CSPConfig, CSPForCausalLM
from modeling_csp.circuits.evaluation import EvalOptions
from modeling_csp.circuits.graph import CircuitGraph
from modeling_csp.circuits.transfer import circuit_through_snapshots, evaluate_transfer, load_snapshot
from modeling_csp.cli import main

CIRCUITS = PROJECT_ROOT / "modeling_csp" / "default_model" / "circuits"
SMALL = CIRCUITS / "if_ternary_k8.json"  # 8 nodes, exact importances: 2.attn.v:52 -> 2.attn.resid_delta:25 carries it
EDITED_NODES = {"2.attn.v:52", "2.attn.resid_delta:25"}

pytestmark = pytest.mark.skipif(not (CIRCUITS / "index.json").is_file(), reason="the default model is not installed")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("csp_cache")


@pytest.fixture(autouse=True)
def isolated(cache_dir, monkeypatch, one_thread):
    monkeypatch.setenv("CSP_CACHE_DIR", str(cache_dir))


@pytest.fixture(scope="module")
def default(cache_dir):
    from modeling_csp.model.loading import load_model_and_tokenizer

    return load_model_and_tokenizer("default")


def edited_copy(model, factor=0.2):
    """The default model with one weight of the small circuit scaled: a stand-in for a fine-tuned copy."""
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.transformer.h[2].attn.c_proj.weight[25, 52] *= factor
    return edited


def test_on_the_model_it_was_pruned_on_the_numbers_are_csp_evaluates(default, capsys):
    model, tokenizer = default
    circuit = CircuitGraph.load(SMALL)
    result = evaluate_transfer(circuit, model, tokenizer, options=EvalOptions.of(circuit, n_random=1), model_name="default")

    assert main(["evaluate", "--model", "default", "--circuit", str(SMALL), "--n-random", "1"]) in (0, 1)
    evaluated = json.loads(capsys.readouterr().out)
    for key in ("full", "circuit", "random", "complement"):
        assert result.losses[key] == pytest.approx(evaluated[f"{key}_loss"], abs=1e-6)
    assert evaluated["transfer"] is None and result.same_weights
    assert result.verdict.passed == evaluated["verdict"]["passed"]
    assert len(result.changed_nodes) == circuit.n_nodes
    for change in result.changed_nodes:  # same model, same examples: nothing moved
        assert abs(change.importance_change) < 1e-4 and change.weight_change in (0.0, None)


def test_an_edited_copy_names_the_nodes_that_changed(default):
    model, tokenizer = default
    circuit = CircuitGraph.load(SMALL)
    edited = edited_copy(model)
    result = evaluate_transfer(circuit, edited, tokenizer, options=EvalOptions.of(circuit, n_random=1),
                               model_name="fine-tuned")

    assert not result.same_weights
    assert result.summary.startswith("pruned on 'default'") and "evaluated on 'fine-tuned'" in result.summary
    assert result.losses["circuit"] != pytest.approx(circuit.losses["circuit"], abs=1e-3)
    top = result.changed_nodes[:2]
    assert {c.node for c in top} == EDITED_NODES, result.changed_nodes
    assert all(abs(c.importance_change) > 0.01 and c.weight_change > 0.1 for c in top)
    assert all(c.weight_change in (0.0, None) for c in result.changed_nodes if c.node not in EDITED_NODES)
    assert result.as_dict(top=2)["changed_nodes"][0]["node"] in EDITED_NODES


def test_a_model_of_another_shape_is_refused_naming_both_shapes(default):
    _, tokenizer = default
    other = CSPForCausalLM(CSPConfig(block_size=128, vocab_size=2048, n_layer=1, n_head=2, d_head=16, d_model=32,
                                     d_mlp=64)).eval()
    with pytest.raises(ValueError, match=r"made for model 'default' \(n_layer=4, d_model=128.*not 'small' \(n_layer=1, "
                                         r"d_model=32.*same shape"):
        evaluate_transfer(CircuitGraph.load(SMALL), other, tokenizer, model_name="small")


def test_a_circuit_through_snapshots(default, tmp_path):
    """Snapshots as a model and as a training run's weights file: each gets its own means, and the first matches
    evaluate_transfer's numbers."""
    from safetensors.torch import save_file

    model, tokenizer = default
    circuit = CircuitGraph.load(SMALL)
    save_file(edited_copy(model, factor=0.0).state_dict(), tmp_path / "step_2.safetensors")
    curve = circuit_through_snapshots([circuit], [("step 1", model), ("step 2", tmp_path / "step_2.safetensors")],
                                      tokenizer)

    assert curve["snapshots"] == ["step 1", "step 2"]
    row = curve["circuits"]["if_ternary"]
    assert row["k"] == 8 and len(row["circuit"]) == len(row["full"]) == 2
    same = evaluate_transfer(circuit, model, tokenizer, options=EvalOptions.of(circuit, n_random=1), changes=False)
    assert row["circuit"][0] == pytest.approx(same.losses["circuit"], abs=1e-6)
    assert row["full"][0] == pytest.approx(same.losses["full"], abs=1e-6)
    assert row["circuit"][1] != pytest.approx(row["circuit"][0], abs=1e-3)  # the edit shows


def test_a_weights_file_of_another_shape_is_refused(default, tmp_path):
    from safetensors.torch import save_file

    model, _ = default
    save_file({"lm_head.weight": torch.zeros(3, 3)}, tmp_path / "step_1.safetensors")
    with pytest.raises(ValueError, match="does not fit the model's shape"):
        load_snapshot(tmp_path / "step_1.safetensors", like=model)
    with pytest.raises(ValueError, match="weights only: give the model"):
        load_snapshot(tmp_path / "step_1.safetensors")
