"""The sparse kernels never serve stale weights: whatever changes a weight, the no-grad CPU path (CSR SpMM)
gives the dense path's logits at the next forward pass."""

import copy

import pytest
import torch

from modeling_csp import CSPConfig, CSPForCausalLM

FC = "transformer.h.0.mlp.c_fc.weight"


def make_sparse_model(density: float = 0.06, seed: int = 0) -> CSPForCausalLM:
    """A small untied model whose weight matrices are `density` dense, like the released models (at most 10%)."""
    torch.manual_seed(seed)
    config = CSPConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, d_head=16, d_model=64, d_mlp=256, bias=False,
                       rms_norm=True, sink=True, afrac=0.25, tied_unembed=False, enable_bigram_table=True)
    model = CSPForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name not in ("transformer.wte.weight", "transformer.wpe.weight"):
                p.mul_(torch.rand_like(p) < density).mul_(4.0)
    return model


@pytest.fixture(scope="module")
def sparse_model(one_thread):
    return make_sparse_model()


IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


def sparse_and_dense_logits(model, ids=IDS):
    with torch.no_grad():
        sparse = model(ids, use_cache=False).logits
    with torch.enable_grad():  # autograd on: dense matmuls
        dense = model(ids, use_cache=False).logits.detach()
    return sparse, dense


def assert_sparse_path_is_exact(model, changed=FC):
    """The changed weight is multiplied by the sparse kernel, and the logits are the dense path's."""
    module = model.get_submodule(changed.rsplit(".", 1)[0])
    with torch.no_grad():
        assert module._csr_weight(torch.zeros(1, dtype=module.weight.dtype)) is not None, "dense kernel used"
    sparse, dense = sparse_and_dense_logits(model)
    assert (sparse - dense).abs().max() <= 1e-5


def data_mul(model):
    model.get_parameter(FC).data.mul_(2)
    return model


def data_assign(model):
    weight = model.get_parameter(FC)
    weight.data = weight.data.clone() * 3
    return model


def copy_under_no_grad(model):
    weight = model.get_parameter(FC)
    with torch.no_grad():
        weight.copy_(weight * 0.5)
    return model


def load_state_dict(model):
    state = model.state_dict()
    state[FC] = state[FC] * -1.5
    model.load_state_dict(state)
    return model


def to_float64_and_back(model):
    model.to(torch.float64)
    assert_sparse_path_is_exact(model)  # float64 has its own sparse kernel
    model.get_parameter(FC).data.mul_(2)
    model.to(torch.float32)
    return model


def peft_lora_merge_and_unload(model):
    """A LoRA update on 2 rows x 4 columns of each c_fc, so the merged weight stays sparse."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.mul_((torch.arange(p.shape[1]) < 4).float())
            elif "lora_B" in name:
                p.mul_((torch.arange(p.shape[0]) < 2).float()[:, None]).add_(torch.sign(p) * 2)
        adapted = peft_model(IDS, use_cache=False).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        gap = float((merged(IDS, use_cache=False).logits - adapted).abs().max())
    assert gap <= 1e-4, f"the merged model's logits differ from the adapter's by {gap:.3g}"
    return merged


def resize_token_embeddings(model):
    model.resize_token_embeddings(model.config.vocab_size + 8, mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[-8:] = 0.0
        model.lm_head.weight[-8:, :3] = 1.0  # the new tokens' logits: sparse rows
    return model


def sparse_kernels_off_and_on(model):
    model.set_sparse_kernels(False)
    model.get_parameter(FC).data.mul_(-1)
    model.set_sparse_kernels(True)
    return model


ROUTES = {
    "w.data.mul_": (data_mul, FC),
    "w.data = ...": (data_assign, FC),
    "copy_ under no_grad": (copy_under_no_grad, FC),
    "load_state_dict": (load_state_dict, FC),
    "to(float64) and back": (to_float64_and_back, FC),
    "peft LoRA merge_and_unload": (peft_lora_merge_and_unload, FC),
    "resize_token_embeddings": (resize_token_embeddings, "lm_head.weight"),
    "set_sparse_kernels(False/True)": (sparse_kernels_off_and_on, FC),
}


@pytest.mark.parametrize("route", ROUTES)
def test_every_weight_change_reaches_the_sparse_kernels(route, sparse_model):
    change, changed = ROUTES[route]
    model = copy.deepcopy(sparse_model)
    before, _ = sparse_and_dense_logits(model)  # the sparse kernels have seen the old weights
    model = change(model)
    assert_sparse_path_is_exact(model, changed)
    after, _ = sparse_and_dense_logits(model)
    assert after.shape != before.shape or (after - before).abs().max() > 1e-3  # the route did change the model


def test_generate_reads_the_weights_of_each_call(sparse_model):
    """generate() checks each weight once per call (not per token); a change between calls is seen."""
    model = copy.deepcopy(sparse_model)
    prompt = IDS[:1, :8]

    def greedy(sparse: bool):
        model.set_sparse_kernels(sparse)
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=12, do_sample=False)

    assert torch.equal(greedy(True), greedy(False))
    first = greedy(True)
    model.get_parameter(FC).data.mul_(-3)
    model.get_parameter("lm_head.weight").data.mul_(-1)
    changed = greedy(True)
    assert not torch.equal(changed, first)
    assert torch.equal(changed, greedy(False))


def test_a_frozen_weights_block_checks_each_weight_once(sparse_model):
    """Inside `model.frozen_weights()` the kernels reuse what they read first; after the block they read again."""
    model = copy.deepcopy(sparse_model)
    module = model.get_submodule(FC.rsplit(".", 1)[0])
    x = torch.zeros(1)
    with torch.no_grad():
        with model.frozen_weights():
            first = module._csr_weight(x)
            with model.frozen_weights():  # nested: the same block
                assert module._csr_weight(x) is first
            model.get_parameter(FC).data.mul_(2)  # breaks the promise: not seen inside the block
            assert module._csr_weight(x) is first
        fresh = module._csr_weight(x)
    assert fresh is not first and torch.equal(fresh.values, first.values * 2)
    assert_sparse_path_is_exact(model)


def test_a_frozen_weights_block_belongs_to_its_thread(sparse_model):
    """Another thread, outside any block, reads the weights as they are (a context variable, like the hooks)."""
    from concurrent.futures import ThreadPoolExecutor

    model = copy.deepcopy(sparse_model)
    module = model.get_submodule(FC.rsplit(".", 1)[0])
    x = torch.zeros(1)

    def csr_in_another_thread():
        with torch.no_grad():
            return module._csr_weight(x)

    with torch.no_grad(), model.frozen_weights():
        first = module._csr_weight(x)
        model.get_parameter(FC).data.mul_(2)
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(csr_in_another_thread).result()
        assert module._csr_weight(x) is first
    assert torch.equal(other.values, first.values * 2)


def test_loops_of_the_circuit_library_check_each_weight_once(sparse_model, monkeypatch):
    """Node importances run one forward pass per node on unchanged weights: the kernels read each weight once per
    call (`ablation.unchanged_weights`), not once per pass, and still give the dense path's numbers."""
    from conftest import synthetic_batch

    from modeling_csp.circuits.ablation import all_kept
    from modeling_csp.circuits.evaluation import node_importances
    from modeling_csp.model.modeling_csp import SparseKernelLinear

    batch = synthetic_batch(sparse_model, n=4, T=8)
    masks = {loc: m & (torch.arange(len(m)) < 2) for loc, m in all_kept(sparse_model.config).items()}  # 2 per location
    reads, read = [], SparseKernelLinear._current_csr
    monkeypatch.setattr(SparseKernelLinear, "_current_csr", lambda self, w: reads.append(self) or read(self, w))
    sparse = node_importances(sparse_model, batch, masks, None)
    kernels = [m for m in sparse_model.modules() if isinstance(m, SparseKernelLinear)]
    assert len(sparse) == sum(int(m.sum()) for m in masks.values()) > 1
    assert sorted(map(id, reads)) == sorted(map(id, kernels))  # each weight read once for all those passes
    sparse_model.set_sparse_kernels(False)  # the dense matmuls
    try:
        dense = node_importances(sparse_model, batch, masks, None)
    finally:
        sparse_model.set_sparse_kernels(True)
    assert max(abs(sparse[n] - dense[n]) for n in sparse) < 1e-5
