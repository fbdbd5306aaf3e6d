"""Hook points, interventions and the transformers conventions of CSPForCausalLM."""

import pytest
import torch
import torch.nn.functional as F

from conversion.convert_checkpoint import load_original
from conftest import FIXTURES
from modeling_csp import CSPConfig, CSPForCausalLM
from modeling_csp.modeling_csp import abs_topk


@pytest.fixture(scope="module")
def model():
    return load_original(FIXTURES / "rms_sink_bigram").float()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))


def test_record_activations_filters_by_pattern(model, ids):
    with model.record_activations(r"1\.attn\.(q|k)") as acts:
        model(ids)
    assert sorted(acts) == ["1.attn.k", "1.attn.q"]
    assert acts["1.attn.q"].shape == (2, 20, model.config.n_head * model.config.d_head)
    with model.record_activations() as acts:
        model(ids)
    assert list(acts) == model.hook_names()


def test_zero_ablation_through_intervene_equals_manual_computation(model, ids):
    with torch.no_grad(), model.record_activations(r"0\.mlp\.(post_act|resid_delta)") as acts:
        model(ids)
    keep = torch.zeros(model.config.d_mlp)
    keep[:10] = 1
    with torch.no_grad(), model.intervene({"0.mlp.post_act": lambda x: x * keep}), \
            model.record_activations(r"0\.mlp\.resid_delta") as ablated:
        model(ids)
    # resid_delta = c_proj(post_act), then AbsTopK at mlp_out
    manual = model.transformer.h[0].mlp.c_proj(acts["0.mlp.post_act"] * keep)
    manual = abs_topk(manual, int(model.config.afrac * manual.shape[-1]))
    assert torch.allclose(ablated["0.mlp.resid_delta"], manual, atol=1e-6)


def test_gradients_flow_through_interventions(model, ids):
    scale = torch.ones(model.config.d_model, requires_grad=True)
    with model.intervene({"1.resid_mid": lambda x: x * scale}):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


def test_unknown_hook_name_is_an_error(model):
    with pytest.raises(KeyError, match="unknown hook name"):
        with model.intervene({"0.attn.qq": lambda x: x}):
            pass


def test_labels_give_the_shifted_next_token_loss(model, ids):
    out = model(ids, labels=ids)
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_hidden_states_are_block_inputs_and_final_residual(model, ids):
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layer + 1
    with model.record_activations(r"final_resid|0\.resid_in") as acts:
        model(ids)
    assert torch.equal(out.hidden_states[0], acts["0.resid_in"])
    assert torch.equal(out.hidden_states[-1], acts["final_resid"])


def test_kv_cache_matches_full_forward(model, ids):
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :12], use_cache=True)
    rest = model(ids[:, 12:], past_key_values=first.past_key_values, use_cache=True)
    assert torch.allclose(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5)


def test_sequence_longer_than_context_is_a_clear_error(model):
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


def test_abs_topk_keeps_k_largest_magnitudes():
    x = torch.tensor([[0.5, -3.0, 2.0, -0.1, 1.0]])
    assert torch.equal(abs_topk(x, 2), torch.tensor([[0.0, -3.0, 2.0, 0.0, 0.0]]))
    x = torch.randn(64, 256)
    _, idx = x.abs().topk(64, dim=-1)
    reference = torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))
    assert torch.equal(abs_topk(x, 64), reference)


def test_sparse_kernels_give_the_same_logits(model, ids):
    with torch.no_grad():
        dense = model(ids).logits
        model.set_sparse_kernels(True)
        try:
            sparse = model(ids).logits
        finally:
            model.set_sparse_kernels(False)
    assert torch.allclose(dense, sparse, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(activation_type="swish"), dict(d_model=30, n_head=4), dict(afrac_loctypes="attn_in,nowhere")])
def test_malformed_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="Invalid CSPConfig"):
        CSPConfig(**bad)
