"""torch.compile vs eager on the default model, forward and generation; writes a section of BENCHMARKS.md.

    PYTHONPATH=. python scripts/benchmark_compile.py [--runs 7] [--generate-runs 5] [--new-tokens 64]

Each thread setting (1 thread, then torch's default) runs in a fresh process, so that compiled code and caches of one
do not serve the other. Variants, at the same logits (max difference reported) and the same greedy tokens:
  - forward, batch 4 x 128 tokens (the model's whole context), no autograd: eager with the sparse kernels (as loaded),
    eager with dense matmuls, and `torch.compile(model, fullgraph=True)` (inductor; a compiled graph multiplies densely);
  - greedy generation of `--new-tokens` after a 16-token prompt (batch 1): eager `generate()` (dynamic cache, sparse
    kernels) and a compiled forward with `cache_implementation="static"` (prefill and decoding step, two graphs).
The first compiled call (tracing and code generation) is reported separately; medians are over the later runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from _report import write_section  # noqa: E402

DEFAULT_MODEL = ROOT / "modeling_csp" / "default_model"


def timed(fn, runs: int) -> tuple[float, object]:
    """Median seconds of `runs` calls and the last result."""
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure(threads: int | None, runs: int, generate_runs: int, new_tokens: int) -> dict:
    """One thread setting, in this process: {name: seconds, ...} plus compile times and agreement checks."""
    import torch
    from torch._dynamo.utils import counters

    from modeling_csp import CSPForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = CSPForCausalLM.from_pretrained(DEFAULT_MODEL).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, model.config.block_size), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :16]
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "load": os.getloadavg()[0]}
    with torch.no_grad():
        result["forward eager, sparse kernels"], eager = timed(lambda: model(ids, use_cache=False).logits, runs)
        model.set_sparse_kernels(False)
        result["forward eager, dense matmuls"], _ = timed(lambda: model(ids, use_cache=False).logits, runs)
        model.set_sparse_kernels(True)
        compiled = torch.compile(model, fullgraph=True)
        start = time.perf_counter()
        compiled(ids, use_cache=False)
        result["forward compile (first call)"] = time.perf_counter() - start
        result["forward compiled"], logits = timed(lambda: compiled(ids, use_cache=False).logits, runs)
        result["forward max abs logit diff"] = (logits - eager).abs().max().item()

        def generate(m, **kwargs):
            return m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)

        result["generate eager"], tokens = timed(lambda: generate(model), generate_runs)
        result["generate eager, static cache"], static_tokens = timed(
            lambda: generate(model, cache_implementation="static"), generate_runs)
        counters.clear()
        model.forward = torch.compile(model.forward, fullgraph=True)
        start = time.perf_counter()
        generate(model, cache_implementation="static")
        result["generate compile (first call)"] = time.perf_counter() - start
        graphs = counters["stats"]["unique_graphs"]
        result["generate compiled, static cache"], compiled_tokens = timed(
            lambda: generate(model, cache_implementation="static"), generate_runs)
        result["generate graphs"] = graphs
        result["generate recompiles after the first call"] = counters["stats"]["unique_graphs"] - graphs
        result["same tokens"] = bool(torch.equal(tokens, static_tokens) and torch.equal(tokens, compiled_tokens))
    return result


def table(results: list[dict], args) -> str:
    rows = [
        ("forward, eager, sparse kernels (as loaded)", "forward eager, sparse kernels", 4 * 128),
        ("forward, eager, dense matmuls", "forward eager, dense matmuls", 4 * 128),
        ("forward, `torch.compile(fullgraph=True)`", "forward compiled", 4 * 128),
        ("generate, eager (dynamic cache)", "generate eager", args.new_tokens),
        ("generate, eager, static cache", "generate eager, static cache", args.new_tokens),
        ("generate, compiled forward, static cache", "generate compiled, static cache", args.new_tokens),
    ]
    head = "| variant | " + " | ".join(f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}: median s | tokens/s | vs eager"
                                        for r in results) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(results)]
    for label, key, tokens in rows:
        base = "forward eager, sparse kernels" if key.startswith("forward") else "generate eager"
        cells = [f"{r[key]:.4f} | {tokens / r[key]:,.0f} | {r[key] / r[base]:.2f}x" for r in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = []
    for r in results:
        notes.append(
            f"{r['threads']} thread(s): first compiled forward {r['forward compile (first call)']:.1f} s, first compiled "
            f"generate {r['generate compile (first call)']:.1f} s ({r['generate graphs']} graphs: prefill and decoding "
            f"step; {r['generate recompiles after the first call']} recompiles in {args.generate_runs} later calls); "
            f"max abs logit difference compiled vs eager {r['forward max abs logit diff']:.1e}; same greedy tokens: "
            f"{'yes' if r['same tokens'] else 'NO'}; machine load average {r['load']:.1f} at the start."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--generate-runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # one setting, in this process
    parser.add_argument("--no-write", action="store_true", help="print the table without touching BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads is not None:
        print(json.dumps(measure(args.threads or None, args.runs, args.generate_runs, args.new_tokens)))
        return
    results = []
    for threads in (1, 0):  # 0: torch's default
        out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--runs", str(args.runs),
                              "--generate-runs", str(args.generate_runs), "--new-tokens", str(args.new_tokens)],
                             check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    text = (
        "## torch.compile vs eager\n\n"
        f"`python scripts/benchmark_compile.py --runs {args.runs} --generate-runs {args.generate_runs} --new-tokens "
        f"{args.new_tokens}` on {time.strftime('%Y-%m-%d')}, torch {results[0]['torch']} CPU, the default model (4 layers, "
        "d_model 128, block_size 128; sink, AbsTopK, bigram table). Forward: batch 4 x 128 tokens, no autograd, median of "
        f"{args.runs} runs; generation: greedy, {args.new_tokens} new tokens after a 16-token prompt, batch 1, median of "
        f"{args.generate_runs} runs. Each thread setting in a fresh process; compile time is not in the medians (a first "
        "call is faster when inductor's on-disk cache already holds its kernels from an earlier run). The load average "
        "is the machine's 1-minute load: above its core count, other processes share the cores and the multi-thread "
        "column suffers most.\n\n"
        + table(results, args)
    )
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "compile-benchmark", text)


if __name__ == "__main__":
    main()
