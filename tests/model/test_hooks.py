"""Hook points, interventions and the transformers conventions of CSPForCausalLM."""

import pytest
import torch
import torch.nn.functional as F

from conversion.convert_checkpoint import load_original
from conftest import FIXTURES
from modeling_csp import CSPConfig
from modeling_csp.model.modeling_csp import Activation, SinkLogits, SparseKernelLinear, abs_topk


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_abs_topk_ranks_magnitudes_exactly_in_every_dtype(dtype):
    x = torch.randn(32, 128, dtype=torch.float64).to(dtype)
    _, idx = x.abs().topk(32, dim=-1)
    reference = torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))
    got = abs_topk(x, 32)
    assert got.dtype == dtype
    # bfloat16 has exact ties; all tied values at the threshold are kept, so compare on untied rows
    untied = (x.abs().sort(dim=-1, descending=True).values[:, 31] != x.abs().sort(dim=-1, descending=True).values[:, 32])
    assert torch.equal(got[untied], reference[untied])


def test_sparse_kernels_give_the_same_logits_and_hooks_as_dense(model, ids):
    assert model.config.use_sparse_kernels  # on by default
    with torch.no_grad(), model.record_activations() as sparse_acts:
        sparse = model(ids).logits
    model.set_sparse_kernels(False)
    try:
        with torch.no_grad(), model.record_activations() as dense_acts:
            dense = model(ids).logits
    finally:
        model.set_sparse_kernels(True)
    assert (dense - sparse).abs().max() <= 1e-5
    for name in dense_acts:
        assert (dense_acts[name] - sparse_acts[name]).abs().max() <= 1e-5, name


def test_sparse_linear_accepts_any_layout_and_falls_back_to_dense():
    torch.manual_seed(0)
    linear = SparseKernelLinear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.05)
    linear.use_sparse_kernel = True
    x = torch.randn(3, 7, 64)
    expected = F.linear(x, linear.weight, linear.bias)
    with torch.no_grad():
        assert linear._csr_weight(x) is not None
        assert torch.allclose(linear(x), expected, atol=1e-6)
        assert torch.allclose(linear(x.mT.contiguous().mT), expected, atol=1e-6)  # feature-major input
        hidden = linear(x, contiguous_output=False)  # feature-major in memory, (3, 7, 48) as its shape says
        assert hidden.shape == (3, 7, 48) and hidden.stride(-1) == 21
        gelu = Activation("gelu")  # computes a feature-major view in memory order: the dense path's exact values
        assert torch.equal(hidden, linear(x)) and torch.equal(gelu(hidden), gelu(linear(x)))
        linear.weight.fill_(1.0)  # denser than max_density: the cache notices the change, dense kernel
        assert linear._csr_weight(x) is None
        assert torch.allclose(linear(x), F.linear(x, linear.weight, linear.bias), atol=1e-4)
    assert linear._csr_weight(x) is None  # autograd on: dense kernel, gradients flow


def test_sink_attention_fast_path_equals_the_masked_formulation():
    torch.manual_seed(0)
    sink = SinkLogits(4)
    with torch.no_grad():
        sink.sink_logit.normal_()
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    causal = torch.full((9, 9), float("-inf")).triu(1).view(1, 1, 9, 9)
    with torch.no_grad():
        fast = sink(q, k, v, 0.3, None)  # no mask tensor given: the causal mask is built with the sink's column
        masked = sink(q, k, v, 0.3, causal)
        strided = sink(*(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)), 0.3, None)
    assert torch.allclose(fast, masked, atol=1e-6)
    assert torch.allclose(strided, masked, atol=1e-6)
    q.requires_grad_(True)
    sink(q, k, v, 0.3, None).sum().backward()  # autograd: the masked path
    assert q.grad is not None and sink.sink_logit.grad is not None


@pytest.mark.parametrize("bad", [dict(activation_type="swish"), dict(d_model=30, n_head=4), dict(afrac_loctypes="attn_in,nowhere")])
def test_malformed_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="Invalid CSPConfig"):
        CSPConfig(**bad)
