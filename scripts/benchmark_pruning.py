"""Times a whole prune, the scaled path against the exact per-node path, each run in a fresh process.

    python scripts/benchmark_pruning.py [--model default] [--task single_double_quote | --task-file F.jsonl]
                                        [--runs 3] [--threads N] [--steps 200] [--paths scaled,exact] [--out BENCHMARKS.md]

"scaled" is `PruneConfig()` as shipped (rows in chunks of similar length, sparse kernels under autograd, batched
exact importances within the budget); "exact" is the per-node path it replaced (`chunk_tokens=0,
nodes_per_pass=1`). Runs alternate between the paths; each reports wall and CPU seconds, peak RSS, the stage
timings of `meta.timings`, k and the held-out losses. Mean activations are computed once before the runs (they
are cached on disk per model, as in use), so the figures are those of a prune on a model already opened once.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from _report import write_section  # noqa: E402

PATHS = {"scaled": {}, "exact": {"chunk_tokens": 0, "nodes_per_pass": 1}}

CHILD = """
import json, sys, time, resource, torch
from modeling_csp.circuits.pruning import PruneConfig, prune
from modeling_csp.circuits.tasks import task_from_jsonl
from modeling_csp.model.loading import load_model_and_tokenizer
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
start = time.perf_counter()
model, tokenizer = load_model_and_tokenizer(args["model"])
task = task_from_jsonl(open(args["task_file"]).read(), tokenizer, max_len=model.config.block_size, name="self") \\
    if args["task_file"] else args["task"]
result = prune(model, tokenizer, task, PruneConfig(steps=args["steps"], progress=False, **args["options"]))
c = result.circuit
print(json.dumps({"wall": time.perf_counter() - start, "prune": result.seconds, "k": c.k, "losses": c.losses,
                  "timings": c.meta["timings"], "importance_method": c.meta["importance_method"],
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(args: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"error: the prune failed:\n{out.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f} at the start")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--task", default="single_double_quote")
    p.add_argument("--task-file", help="a task JSONL instead of --task (e.g. a self-labelled task of a random model)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--paths", default="scaled,exact")
    p.add_argument("--target-above-full", type=float, help="target = max(0.15, the full model's loss + this), as "
                   "`csp prune --target-above-full`: for a random model whose full loss misses 0.15")
    p.add_argument("--section", default="pruning-benchmark")
    p.add_argument("--out", type=Path, help="markdown file to write the table into (default: print it)")
    args = p.parse_args(argv)
    paths = args.paths.split(",")
    if not set(paths) <= PATHS.keys() or args.runs < 1 or args.threads < 1 or args.steps < 1:
        p.error(f"--paths takes {', '.join(PATHS)}; --runs, --threads and --steps must be >= 1")
    if args.task_file and not Path(args.task_file).is_file():
        p.error(f"no task file at {args.task_file}")

    from modeling_csp.circuits.ablation import compute_mean_activations
    from modeling_csp.model.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)  # the means, once, into the disk cache every run reads
    compute_mean_activations(model, tokenizer)
    del model
    header = machine()
    results = {path: [] for path in paths}
    for _ in range(args.runs):
        for path in paths:
            results[path].append(run_child({"model": args.model, "task": args.task, "task_file": args.task_file,
                                            "threads": args.threads, "steps": args.steps,
                                            "options": {**PATHS[path], "target_above_full": args.target_above_full}}))
            r = results[path][-1]
            print(f"{path}: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, k={r['k']}, {r['timings']}", file=sys.stderr)

    def med(path, key):
        return statistics.median(r[key] for r in results[path])

    task = f"task file {Path(args.task_file).name}" if args.task_file else args.task
    lines = [
        f"`python scripts/benchmark_pruning.py --model {args.model} {'--task-file ' + args.task_file if args.task_file else '--task ' + args.task} "
        f"--runs {args.runs} --threads {args.threads} --steps {args.steps}"
        f"{f' --target-above-full {args.target_above_full:g}' if args.target_above_full is not None else ''}`: a whole prune of {task} on {args.model} "
        f"({args.steps} mask-training steps), each run a fresh process from start-up to the circuit file's contents, "
        f"mean activations already cached; median of {args.runs} runs, the paths alternating. Machine: {header}.",
        "",
        "| path | wall s | CPU s | peak RSS MB | data+means s | training s | bisection s | circuit s | k | held-out circuit loss | importances |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        t = {key: statistics.median(r["timings"].get(key, 0) for r in results[path])
             for key in ("data_and_means", "training", "bisection", "circuit")}
        last = results[path][-1]
        lines.append(f"| {path} | {med(path, 'wall'):.1f} | {med(path, 'cpu'):.1f} | {med(path, 'peak_mb'):.0f} | "
                     f"{t['data_and_means']:.1f} | {t['training']:.1f} | {t['bisection']:.1f} | {t['circuit']:.1f} | "
                     f"{last['k']} | {last['losses']['circuit']:.4f} | {last['importance_method']} |")
    if len(paths) == 2:
        lines += ["", f"Scaled / exact wall time: {med(paths[0], 'wall') / med(paths[1], 'wall'):.2f}x."]
    text = "\n".join(lines)
    if args.out:
        write_section(args.out, args.section, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
