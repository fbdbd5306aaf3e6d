"""What it costs the sparse kernels to never serve stale weights; writes a section of BENCHMARKS.md.

    PYTHONPATH=. python scripts/benchmark_weight_checks.py [--runs 5] [--generate-runs 3] [--threads 1]

The sparse kernels multiply with a CSR copy of each weight. Variants, at identical logits and tokens:
  - cached by key (the old code): CSR kept while (data_ptr, _version, dtype) stay the same; stale after
    writes through `.data`, peft merges and a reused address;
  - rebuilt at every forward pass (count, nonzero, bincount, gather);
  - checked at every forward pass (the code now): the cached CSR is reused when the weight's nonzero count
    and the values at the kept positions are unchanged, which proves it is the weight's CSR;
  - `generate()` as shipped: checked once per call (a `frozen_weights()` block), not per token;
  - dense matmuls (sparse kernels off).
On a csp_sweep-sized model and on a csp_yolo1-sized one (d_model 1024, d_mlp 4096, 0.5% dense).
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_csp import modeling_csp as M  # noqa: E402
from benchmark import make_sparse_model, sweep_sized_config  # noqa: E402
from _report import write_section  # noqa: E402

_CHECKED = M.SparseKernelLinear._csr_weight


def _key_cached(self, x):
    """The old `_csr_weight`: a CSR per (data_ptr, _version, dtype)."""
    if not self.use_sparse_kernel or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != self.weight.dtype:
        return None
    key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype)
    cache = self.__dict__.get("_key_cache")
    if cache is None or cache[0] != key:
        self.__dict__["_key_cache"] = cache = (key, _build(self.weight.detach(), self.max_density))
    return cache[1]


def _rebuilt(self, x):
    if not self.use_sparse_kernel or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != self.weight.dtype:
        return None
    return _build(self.weight.detach(), self.max_density)


def _build(weight, max_density):
    if weight.dtype not in (torch.float32, torch.float64) or weight.count_nonzero() > max_density * weight.numel():
        return None
    rows, cols = weight.nonzero(as_tuple=True)
    offsets = F.pad(torch.bincount(rows, minlength=weight.shape[0]).cumsum(0), (1, 0))
    return M._CSR(weight.shape, rows, cols, offsets, weight[rows, cols])


def _dense(self, x):
    return None


@contextlib.contextmanager
def kernel(csr_weight, frozen_in_generate=True):
    """Runs the model with another `_csr_weight`; without `frozen_in_generate`, generate() checks at every step."""
    saved = M.SparseKernelLinear._csr_weight, M.frozen_weights
    M.SparseKernelLinear._csr_weight = csr_weight
    if not frozen_in_generate:
        M.frozen_weights = contextlib.nullcontext
    try:
        yield
    finally:
        M.SparseKernelLinear._csr_weight, M.frozen_weights = saved


OLD = "cached by key (old code; can be stale)"
FORWARD = {
    OLD: (_key_cached, True),
    "rebuilt at every forward pass": (_rebuilt, True),
    "checked at every forward pass (now, outside generate())": (_CHECKED, True),
    "dense matmuls": (_dense, True),
}
GENERATE = {  # each generated token is one forward pass
    OLD: (_key_cached, True),
    "rebuilt at every forward pass": (_rebuilt, False),
    "checked at every forward pass (now, outside generate())": (_CHECKED, False),
    "checked once per generate() call (now)": (_CHECKED, True),
    "dense matmuls": (_dense, True),
}
ROWS = [OLD, "rebuilt at every forward pass", "checked at every forward pass (now, outside generate())",
        "checked once per generate() call (now)", "dense matmuls"]
BASELINE = OLD


def time_interleaved(variants: dict, fn, runs: int) -> tuple[dict, dict, bool]:
    """Median CPU seconds per variant and median per-run ratio to the baseline; variants interleaved run by run.

    CPU time of this process, not wall time: on one thread it hardly moves with the load other processes put on
    a shared machine, where wall times here swung by 3x between runs."""
    times = {name: [] for name in variants}
    outputs = {}
    with torch.no_grad():
        for name, (csr_weight, frozen) in variants.items():  # warm-up; the cached variants fill their caches
            with kernel(csr_weight, frozen):
                outputs[name] = fn()
        for _ in range(runs):
            for name, (csr_weight, frozen) in variants.items():
                with kernel(csr_weight, frozen):
                    start = time.process_time()
                    fn()
                    times[name].append(time.process_time() - start)
    reference = outputs[BASELINE]
    same = all(torch.equal(o, reference) if o.dtype == torch.long else bool((o - reference).abs().max() <= 1e-5)
               for o in outputs.values())
    ratios = {name: statistics.median(t / b for t, b in zip(times[name], times[BASELINE])) for name in variants}
    return {name: statistics.median(t) for name, t in times.items()}, ratios, same


def measure(label: str, config, density: float, args) -> str:
    model = make_sparse_model(config, density)
    n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, M.SparseKernelLinear))
    ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(1))
    prompt = ids[:, : args.prompt]
    fwd, fwd_ratio, fwd_same = time_interleaved(FORWARD, lambda: model(ids, use_cache=False).logits, args.runs)
    gen, gen_ratio, gen_same = time_interleaved(
        GENERATE, lambda: model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False), args.generate_runs)
    lines = [f"**{label}** ({n_weights / 1e6:.1f} M weights in the sparse-kernel matrices, {density:.1%} dense). "
             f"Forward pass of 1 x {args.seq} tokens, {args.runs} runs (same logits: {'yes' if fwd_same else 'NO'}); "
             f"greedy generation of {args.new_tokens} tokens after a {args.prompt}-token prompt, {args.generate_runs} runs "
             f"(same tokens: {'yes' if gen_same else 'NO'}).", "",
             "| variant | forward CPU s | forward vs old | generate CPU s | generate vs old |", "|---|---|---|---|---|"]
    for name in ROWS:
        f = (f"{fwd[name]:.3f}", f"{fwd_ratio[name]:.2f}x") if name in fwd else ("-", "-")
        g = (f"{gen[name]:.3f}", f"{gen_ratio[name]:.2f}x") if name in gen else ("-", "-")
        lines.append(f"| {name} | {f[0]} | {f[1]} | {g[0]} | {g[1]} |")
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--generate-runs", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sweep = sweep_sized_config()
    yolo = sweep_sized_config()
    yolo.d_model, yolo.d_mlp, yolo.d_head = 1024, 4096, 64
    tables = [measure("csp_sweep-sized: 8 layers, d_model 256, d_mlp 1024", sweep, 0.015, args),
              measure("csp_yolo1-sized: 8 layers, d_model 1024, d_mlp 4096", yolo, 0.005, args)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = f"""## Sparse kernels that never serve stale weights

CPU time of the process (`time.process_time`, not wall time: this is a shared 2-core machine, load average
{load:.1f} when the run ended), {args.threads} thread(s), torch {torch.__version__}; medians over runs, the
ratios medians of per-run ratios, variants interleaved run by run.
`python scripts/benchmark_weight_checks.py --runs {args.runs} --generate-runs {args.generate_runs} --threads {args.threads}`.
No cheap key sees every weight change (`w.data` has a version counter of its own, a new tensor may reuse a freed
address), so the sparse kernels now check the weight at every forward pass: the nonzero count and the values at
the cached positions, one read of the weight, which proves the cached CSR is still the weight's. `generate()`
checks once per call (`frozen_weights()`), so generation costs about what the old cache did.

{tables[0]}

{tables[1]}
"""
    write_section(Path(args.out), "weight-check-benchmark", text)


if __name__ == "__main__":
    main()
