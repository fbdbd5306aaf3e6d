"""CPU benchmark of the port on a csp_sweep-sized model; writes a table to BENCHMARKS.md.

    python scripts/benchmark.py [--runs 5] [--density 0.015] [--out BENCHMARKS.md]

Compares, at identical outputs:
  - reference-style ops: dense matmuls, AbsTopK as zeros + topk + scatter(gather) and the
    attention-sink mask rebuilt per layer at (B, H, T, T+1), as OpenAI's `circuit_sparsity` does;
  - this port as loaded (sparse kernels on: `embedding_bag` SpMM, integer top-k, flash
    attention with the sink as a rescale);
  - this port with dense matmuls (`model.set_sparse_kernels(False)`).
Also: load time of the converted folder and file sizes against the dense `final_model.pt`.
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_csp import CSPConfig, CSPForCausalLM  # noqa: E402
from modeling_csp.model import modeling_csp as M  # noqa: E402
from _report import write_section  # noqa: E402


def sweep_sized_config() -> CSPConfig:
    return CSPConfig(
        block_size=256, vocab_size=2048, n_layer=8, n_head=16, d_head=16, d_model=256, d_mlp=1024,
        bias=False, ln_bias=False, rms_norm=True, sink=True, afrac=0.25, tied_unembed=False,
        enable_bigram_table=True, learnable_bigram_table=True,
    )


def make_sparse_model(config: CSPConfig, density: float, seed: int = 0) -> CSPForCausalLM:
    torch.manual_seed(seed)
    model = CSPForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:  # keep the top `density` fraction by magnitude, as the training projection does
                k = max(1, int(density * p.numel()))
                threshold = p.abs().flatten().kthvalue(p.numel() - k + 1).values
                p.mul_(p.abs() >= threshold)
            elif p.ndim == 1 and p is not model.final_logits_bias:
                p.add_(0.1 * torch.randn_like(p))
    return model


def reference_abs_topk(x, k):
    if k >= x.shape[-1]:
        return x
    out = torch.zeros_like(x)
    _, idx = torch.topk(x.abs(), k, dim=-1, sorted=False)
    return out.scatter_(-1, idx, x.gather(-1, idx))


def reference_sink_attention(self, q, k, v, scale):
    """The reference's sink attention: zero KV slot prepended, (B, H, Tq, Tk+1) mask rebuilt per layer."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    k_aug = torch.cat([torch.zeros((B, H, 1, D), dtype=q.dtype), k], dim=2)
    v_aug = torch.cat([torch.zeros((B, H, 1, v.shape[-1]), dtype=v.dtype), v], dim=2)
    allow = torch.zeros((Lq, Lk + 1), dtype=torch.bool)
    allow[:, 0] = True
    allow[:, 1:] = torch.ones((Lq, Lk), dtype=torch.bool).tril()
    allow = allow.view(1, 1, Lq, Lk + 1).expand(B, H, Lq, Lk + 1)
    neg_inf = torch.finfo(q.dtype).min
    base = torch.where(allow, torch.zeros((), dtype=q.dtype), torch.full((), neg_inf, dtype=q.dtype))
    sink_bias_mask = torch.zeros((1, 1, 1, Lk + 1), dtype=q.dtype)
    sink_bias_mask[..., 0] = 1.0
    attn_mask = base + sink_bias_mask * self.sink_logit.to(q.dtype).view(1, H, 1, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k_aug, v_aug, attn_mask=attn_mask, scale=scale)


@contextlib.contextmanager
def reference_style_ops():
    """Patches the reference's AbsTopK and sink attention in; pair it with a model whose sparse kernels are off."""
    saved = (M.abs_topk, M.SinkLogits.causal_attention_with_sink)
    M.abs_topk, M.SinkLogits.causal_attention_with_sink = reference_abs_topk, reference_sink_attention
    try:
        yield
    finally:
        M.abs_topk, M.SinkLogits.causal_attention_with_sink = saved


def dense_copy(model: CSPForCausalLM) -> CSPForCausalLM:
    """The same weights with the sparse kernels off."""
    copy = CSPForCausalLM(model.config.__class__(**model.config.to_dict())).eval()
    copy.load_state_dict(model.state_dict())
    copy.set_sparse_kernels(False)
    return copy


def time_variants(variants: dict, ids, runs: int) -> dict[str, list[float]]:
    """Times each (model, context factory) variant, interleaved run by run, so that load from
    other processes on a shared machine falls on all variants alike."""
    times = {name: [] for name in variants}
    with torch.no_grad():
        for model, context in variants.values():
            with context():
                model(ids, use_cache=False)  # warm-up
        for _ in range(runs):
            for name, (model, context) in variants.items():
                with context():
                    start = time.perf_counter()
                    model(ids, use_cache=False)
                    times[name].append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def hook_points_removed():
    """The forward pass as if it had no hook points at all: the baseline for what unused hooks cost."""
    saved = (M.hook_point, M.hook_wanted)
    M.hook_point, M.hook_wanted = (lambda name, x: x), (lambda name: False)
    try:
        yield
    finally:
        M.hook_point, M.hook_wanted = saved


def hook_variants(model) -> dict:
    """Forward-pass variants for the hooks table: none, one recording, all reference hooks, mean ablation."""
    from modeling_csp.circuits.ablation import mean_ablate
    from modeling_csp.circuits.graph import location_width, node_locations

    generator = torch.Generator().manual_seed(3)
    masks = {loc: torch.rand(location_width(model.config, loc), generator=generator) < 0.5 for loc in node_locations(model.config)}
    means = {loc: torch.randn(location_width(model.config, loc), generator=generator) for loc in masks}
    return {
        "hook points removed (identity functions)": (model, hook_points_removed),
        "no active hooks (as loaded)": (model, contextlib.nullcontext),
        "recording one hook point (`0.mlp.post_act`)": (model, lambda: model.record_activations("0.mlp.post_act")),
        "recording every reference hook point": (model, model.record_activations),
        "mean-ablating half the nodes at every node location": (model, lambda: mean_ablate(model, masks, means)),
    }


def time_generation(model, dense_model, prompt, new_tokens: int, runs: int) -> tuple[list[float], list[float], bool]:
    """Greedy decoding side by side: the reference's loop (the whole prefix through the model at every step,
    reference-style ops) against `generate()` with the KV cache; interleaved run by run."""

    def reference():
        ids = prompt
        with reference_style_ops():
            for _ in range(new_tokens):
                ids = torch.cat([ids, dense_model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        return ids

    def port():
        return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)

    with torch.no_grad():
        same = torch.equal(reference(), port())
        ref_times, port_times = [], []
        for _ in range(runs):
            for fn, times in ((reference, ref_times), (port, port_times)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return ref_times, port_times, same


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--density", type=float, default=0.015)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--generate-runs", type=int, default=3, help="runs of the (slow) generation comparison")
    parser.add_argument("--new-tokens", type=int, default=240)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = sweep_sized_config()
    model = make_sparse_model(config, args.density)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    n_tokens = args.batch * args.seq

    dense_model = dense_copy(model)
    with torch.no_grad():
        with reference_style_ops():
            reference_logits = dense_model(ids, use_cache=False).logits
        port_logits = model(ids).logits
        dense_logits = dense_model(ids).logits
    times = time_variants(
        {"reference": (dense_model, reference_style_ops), "port": (model, contextlib.nullcontext),
         "dense": (dense_model, contextlib.nullcontext)}, ids, args.runs,
    )
    rows = [
        ("reference-style ops (dense matmuls, topk+scatter, per-layer sink mask)", times["reference"], reference_logits),
        ("port as loaded (sparse kernels)", times["port"], port_logits),
        ("port with dense matmuls", times["dense"], dense_logits),
    ]

    hook_times = time_variants(hook_variants(model), ids, args.runs)
    prompt = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    gen_ref, gen_port, gen_same = time_generation(model, dense_model, prompt, args.new_tokens, args.generate_runs)

    density_rows = []
    max_density = M.SparseKernelLinear.max_density
    M.SparseKernelLinear.max_density = 1.0  # measure past the switch-over point too
    try:
        for density in (0.001, 0.01, 0.05, 0.1, 0.2):
            sparse_model = make_sparse_model(config, density)
            t = time_variants({"dense": (dense_copy(sparse_model), contextlib.nullcontext),
                               "sparse": (sparse_model, contextlib.nullcontext)}, ids, args.runs)
            density_rows.append((density, statistics.median(t["dense"]), statistics.median(t["sparse"])))
    finally:
        M.SparseKernelLinear.max_density = max_density

    with tempfile.TemporaryDirectory() as tmp:
        from modeling_csp.model.saving import save_model_folder
        from transformers import AutoModelForCausalLM

        torch.save(model.state_dict(), Path(tmp) / "final_model.pt")
        save_model_folder(model, Path(tmp) / "converted", name="benchmark")
        dense_size = (Path(tmp) / "final_model.pt").stat().st_size
        sparse_size = (Path(tmp) / "converted" / "model.safetensors").stat().st_size
        load_times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            AutoModelForCausalLM.from_pretrained(Path(tmp) / "converted", trust_remote_code=True)
            load_times.append(time.perf_counter() - start)

    lines = [
        "## The model's forward pass",
        "",
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. csp_sweep-sized model: 8 layers, d_model 256,",
        f"16 heads x d_head 16, d_mlp 1024, RMSNorm, sink, afrac 0.25, bigram table, {100 * args.density:.1f}% dense",
        f"weights; forward of batch {args.batch} x {args.seq} tokens, no autograd; {args.runs} runs, the variants",
        "interleaved run by run. The ratio is the median over runs of (variant / reference-style) within a",
        "run, which cancels most of the load that other processes put on a shared machine.",
        "",
        "| forward pass | median s | tokens/s | vs reference-style | max abs logit diff vs reference-style |",
        "|---|---|---|---|---|",
    ]
    for name, times, logits in rows:
        median = statistics.median(times)
        ratio = statistics.median(t / r for t, r in zip(times, rows[0][1]))
        diff = (logits - reference_logits).abs().max().item()
        lines.append(f"| {name} | {median:.3f} | {n_tokens / median:,.0f} | {ratio:.2f}x | {diff:.1e} |")
    gen_ratio = statistics.median(r / p for r, p in zip(gen_ref, gen_port))
    lines += [
        "",
        f"Greedy generation of {args.new_tokens} tokens after a {prompt.shape[1]}-token prompt (batch 1), {args.generate_runs} "
        "runs interleaved: the reference's loop runs the whole prefix through the model at every step (reference-style "
        "ops); the port's `generate()` keeps a KV cache. Same tokens: " + ("yes" if gen_same else "**NO**") + ".",
        "",
        "| generation | median s | tokens/s | speed vs reference |",
        "|---|---|---|---|",
        f"| reference loop (prefix recomputed) | {statistics.median(gen_ref):.2f} | {args.new_tokens / statistics.median(gen_ref):,.0f} | 1.0x |",
        f"| port `generate()` (KV cache) | {statistics.median(gen_port):.2f} | {args.new_tokens / statistics.median(gen_port):,.0f} | {gen_ratio:.1f}x |",
    ]
    base = hook_times["no active hooks (as loaded)"]
    lines += [
        "",
        "Hooks (same forward pass, sparse kernels; hooks live in a context variable, so a hook point with no",
        "active hook is one lookup):",
        "",
        "| forward pass | median s | vs no active hooks |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {statistics.median(t):.3f} | {statistics.median(a / b for a, b in zip(t, base)):.2f}x |"
              for name, t in hook_times.items()]
    lines += [
        "",
        "Sparse (`embedding_bag`) vs dense matmuls by weight density, whole forward pass; the model",
        f"uses the sparse kernel for weights at most {100 * max_density:.0f}% dense:",
        "",
        "| weight density | dense matmuls s | sparse kernels s | sparse / dense |",
        "|---|---|---|---|",
    ]
    lines += [f"| {100 * d:.1f}% | {a:.3f} | {b:.3f} | {b / a:.2f}x |" for d, a, b in density_rows]
    lines += [
        "",
        "| storage | bytes | ratio |",
        "|---|---|---|",
        f"| dense `final_model.pt` (float32) | {dense_size:,} | 1.00 |",
        f"| sparse `model.safetensors` | {sparse_size:,} | {sparse_size / dense_size:.3f} |",
        "",
        f"Load time of the converted folder (`AutoModelForCausalLM.from_pretrained`, trust_remote_code): "
        f"median {statistics.median(load_times):.2f} s.",
        "",
    ]
    write_section(Path(args.out), "model-benchmark", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
