"""Max |logit difference| between the sparse kernels and dense matmuls after each way of changing a weight.

    PYTHONPATH=CHECKOUT python scripts/weight_change_routes.py [--density 0.06]

Each route starts from a fresh copy of one random weight-sparse model, runs one sparse forward pass (so a
kernel that keeps state has it), changes the weights, and compares the logits of a no-grad forward pass
(sparse kernels) with those of a forward pass under autograd (dense matmuls). A difference above 1e-5
means the sparse kernels served weights the model no longer has. `modeling_csp` comes from PYTHONPATH, so the
same script measures any checkout's code (`PYTHONPATH=.` this one; BENCHMARKS.md has the figures before the fix).
"""

import argparse
import copy

import torch

from modeling_csp import CSPConfig, CSPForCausalLM

FC = "transformer.h.0.mlp.c_fc.weight"


def sparse_model(density: float, seed: int = 0) -> CSPForCausalLM:
    """A small untied, bigram-table model whose weight matrices are `density` dense (random positions)."""
    torch.manual_seed(seed)
    config = CSPConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, d_head=16, d_model=64, d_mlp=256, bias=False,
                       rms_norm=True, sink=True, afrac=0.25, tied_unembed=False, enable_bigram_table=True)
    model = CSPForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name != "transformer.wte.weight" and name != "transformer.wpe.weight":
                p.mul_(torch.rand_like(p) < density).mul_(4.0)
    return model


def logit_gap(model, ids) -> float:
    """max |sparse-kernel logits - dense logits| of the model as it is now."""
    with torch.no_grad():
        sparse = model(ids, use_cache=False).logits
    with torch.enable_grad():  # autograd on: the dense path
        dense = model(ids, use_cache=False).logits.detach()
    return float((sparse - dense).abs().max())


def data_mul(model, ids):
    model.get_parameter(FC).data.mul_(2)
    return model


def data_assign(model, ids):
    weight = model.get_parameter(FC)
    weight.data = weight.data.clone() * 3
    return model


def copy_no_grad(model, ids):
    weight = model.get_parameter(FC)
    with torch.no_grad():
        weight.copy_(weight * 0.5)
    return model


def load_state_dict(model, ids):
    state = model.state_dict()
    state[FC] = state[FC] * -1.5
    model.load_state_dict(state)
    return model


def to_float64_and_back(model, ids):
    """Changes a weight while the model is float64; the float32 copy may land where the old weight lived."""
    model.to(torch.float64)
    with torch.no_grad():
        model.get_parameter(FC).mul_(2)
    model.to(torch.float32)
    return model


def peft_merge(model, ids):
    """A LoRA adapter with a sparse update (2 output rows x 4 input columns), merged into c_fc."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.mul_((torch.arange(p.shape[1]) < 4).float())
            elif "lora_B" in name:
                p.mul_((torch.arange(p.shape[0]) < 2).float()[:, None]).add_(torch.sign(p) * 2)
        peft_model(ids, use_cache=False)
    return peft_model.merge_and_unload()


def resize_token_embeddings(model, ids):
    model.resize_token_embeddings(model.config.vocab_size + 8, mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[-8:].zero_()
        model.lm_head.weight[-8:, :3] = 1.0
    return model


def sparse_kernels_off_and_on(model, ids):
    """A change made while the sparse kernels are off must be seen when they are back on."""
    model.set_sparse_kernels(False)
    with torch.no_grad():
        model(ids, use_cache=False)
    model.get_parameter(FC).data.mul_(-1)
    model.set_sparse_kernels(True)
    return model


ROUTES = {
    "w.data.mul_(2)": data_mul,
    "w.data = w.data.clone() * 3": data_assign,
    "w.copy_(...) under no_grad": copy_no_grad,
    "load_state_dict": load_state_dict,
    "to(float64), change, to(float32)": to_float64_and_back,
    "peft LoRA merge_and_unload": peft_merge,
    "resize_token_embeddings": resize_token_embeddings,
    "set_sparse_kernels(False), w.data change, set_sparse_kernels(True)": sparse_kernels_off_and_on,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.06)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = sparse_model(args.density)
    ids = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    print(f"{'route':<70} max |sparse - dense| logit")
    for name, route in ROUTES.items():
        model = copy.deepcopy(base)
        with torch.no_grad():
            model(ids, use_cache=False)  # the sparse kernels see the weights once before the change
        model = route(model, ids)
        print(f"{name:<70} {logit_gap(model, ids):.3g}")


if __name__ == "__main__":
    main()
