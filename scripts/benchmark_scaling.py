"""How load, forward, generation, pruning and the app scale from the default model to csp_yolo2's size.

    python scripts/benchmark_scaling.py [--rows default,x4,x16,csp_yolo1,csp_yolo2] [--out BENCHMARKS.md]
        [--skip prune,app] [--prune-rows default,x4] [--cache DIR] [--threads 1]

Rows: the shipped default model and random sparse models of released shapes made by scripts/make_synthetic.py into
--cache when absent (x4 and x16: the default model scaled in parameters). Every measurement runs in a fresh
subprocess, so its peak RSS (the child's own VmHWM, see `run_child`) is that measurement's alone:
- load: `from_pretrained` time, RSS after it, peak RSS;
- forward: one no-grad pass over 1 x min(256, context) tokens with the sparse kernels and dense
  (`model.set_sparse_kernels(False)`), median of --runs;
- generation: greedy, 16-token prompt, 64 new tokens, sparse and dense, median of --runs;
- prune: `csp prune --model F --task-file T --out C.json` with its default steps (whatever pruning path this checkout
  has), the stage timings of the circuit file's `meta.timings`, and its peak RSS. A random-weights model solves no
  task, so T is SELF-LABELLED: prompts of a real task (--self-task) whose correct candidate is the one the full
  model prefers, the most confident --task-examples of them, both classes in equal numbers;
- app: page-ready time and median selection latency (the slowest of layer, node, k and task) from
  scripts/benchmark_app.py --model FOLDER --import C.json (the circuit the prune wrote; the shipped circuits for the
  default model).
Results are kept per row in --cache/scaling_results.json, so rows measured in separate runs share one table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _report import write_section  # noqa: E402

from modeling_csp.utils.jsonio import write_json_atomic, write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "modeling_csp" / "default_model"
ROW_SHAPES = {"default": None, "x4": "default_x4", "x16": "default_x16", "csp_sweep1": "csp_sweep1",
              "csp_yolo1": "csp_yolo1", "csp_yolo2": "csp_yolo2"}  # None: the shipped folder, not a synthetic one
COLUMNS = ("prune", "app")
COLUMN_KEYS = {**dict.fromkeys(("task_lines", "task_min_margin", "prune_s", "prune_note", "prune_peak_mb",
                                "prune_timings", "prune_k"), "prune"),
               **dict.fromkeys(("page_ready_s", "prepared_s", "selection_ms", "selection_kind", "selections_ms",
                                "app_peak_mb", "app_note"), "app")}
FORWARD_TOKENS, PROMPT_TOKENS, NEW_TOKENS = 256, 16, 64
SECTION = "scaling-benchmark"


class BenchmarkError(ValueError):
    """Bad input to the benchmark, as one line naming the problem and the fix."""


# ---- in the child: one measurement per process ------------------------------------------------------------------

def vm_status(field: str, pid: int | str = "self") -> float:
    """A process's /proc/PID/status field (VmRSS, VmHWM) in MB (this process's by default)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def load_model(folder: str):
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return model, time.perf_counter() - start


def measure(kind: str, folder: str, runs: int) -> dict:
    """One measurement on a freshly loaded model: load, forward_sparse|dense or generate_sparse|dense."""
    import torch

    model, load_s = load_model(folder)
    result = {"load_s": round(load_s, 2), "rss_after_load_mb": round(vm_status("VmRSS"))}
    if kind == "load":
        matrices = [p for p in model.parameters() if p.ndim == 2]
        result["params"] = sum(p.numel() for p in model.parameters())
        result["nnz"] = sum(int(p.count_nonzero()) for p in matrices)
        result["context"] = model.config.block_size
        return result
    model.set_sparse_kernels(kind.endswith("sparse"))
    generator = torch.Generator().manual_seed(0)
    times = []
    with torch.no_grad():
        if kind.startswith("forward"):
            tokens = min(FORWARD_TOKENS, model.config.block_size)
            ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
            model(ids)  # first call: allocations and the sparse kernels' weight layout
            for _ in range(runs):
                start = time.perf_counter()
                model(ids)
                times.append(time.perf_counter() - start)
            result.update(tokens=tokens, forward_s=round(statistics.median(times), 4))
        else:
            ids = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=generator)
            settings = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            model.generate(ids, **{**settings, "max_new_tokens": 4, "min_new_tokens": 4})
            for _ in range(runs):
                start = time.perf_counter()
                out = model.generate(ids, **settings)
                times.append(time.perf_counter() - start)
            assert out.shape[1] == PROMPT_TOKENS + NEW_TOKENS, out.shape
            result["tok_per_s"] = round(NEW_TOKENS / statistics.median(times), 1)
    return result


def self_labelled_task(folder: str, task_name: str, n_lines: int, out: str) -> dict:
    """Writes a task file of `task_name`'s prompts labelled with the full model's own preference (see the module
    docstring): the most confident n_lines / 2 of each class, so the full model's loss is low on it."""
    import torch
    from transformers import AutoTokenizer

    from modeling_csp.circuits.tasks import TaskExample, example_class, get_task, task_from_jsonl

    model, _ = load_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = get_task(task_name)
    rng = random.Random(0)

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    def single_tokens(prompt, prompt_ids, pair):
        ids = [encode(prompt + c) for c in pair]
        ok = all(len(i) == len(prompt_ids) + 1 and i[:-1] == prompt_ids for i in ids) and ids[0][-1] != ids[1][-1]
        return (ids[0][-1], ids[1][-1]) if ok else None

    scored, seen = [], set()
    with torch.no_grad(), model.frozen_weights():
        for _ in range(4 * n_lines):
            ex = task.generate(rng)
            if ex.prompt in seen:
                continue
            seen.add(ex.prompt)
            prompt_ids = encode(ex.prompt)
            if len(prompt_ids) > model.config.block_size:
                continue
            for pair in ex.spellings():
                ids = single_tokens(ex.prompt, prompt_ids, pair)
                if ids is not None:
                    logits = model(torch.tensor([prompt_ids])).logits[0, -1]
                    margin = float(logits[ids[0]] - logits[ids[1]])
                    preferred, other = pair if margin > 0 else pair[::-1]
                    scored.append((abs(margin), TaskExample(ex.prompt, preferred, other)))
                    break
            if len(scored) >= 2 * n_lines:
                break
    by_class = {0: [], 1: []}
    for margin, ex in sorted(scored, key=lambda s: -s[0]):
        by_class[example_class(ex)].append((margin, ex))
    if not by_class[0] or not by_class[1]:
        raise BenchmarkError(f"{folder}: the model prefers the same candidate on every prompt of {task_name}; "
                             "pass another --self-task")
    half = n_lines // 2
    kept = by_class[0][:half] + by_class[1][:half]
    text = "".join(json.dumps({"prompt": ex.prompt, "correct": ex.correct, "incorrect": ex.alternative}) + "\n"
                   for _, ex in kept)
    task_from_jsonl(text, tokenizer, max_len=model.config.block_size)  # what `csp prune --task-file` checks
    write_text_atomic(out, text)
    return {"task_lines": len(kept), "task_min_margin": round(min(m for m, _ in kept), 3)}


# ---- in the parent ----------------------------------------------------------------------------------------------

def high_water_mb(pid: int) -> float | None:
    """A live process's own peak RSS (VmHWM) in MB, or None once it is gone (an exited child has no memory left)."""
    try:
        return vm_status("VmHWM", pid)
    except (OSError, RuntimeError):
        return None


def run_child(argv: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[int, str, float, float]:
    """(exit status, output, wall seconds, peak RSS in MB) of a child process. The peak is its VmHWM as last seen
    alive (polled): `wait4`'s ru_maxrss of a child started by vfork carries this process's own peak over exec."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = None if timeout is None else start + timeout
        seen = 0.0
        while True:
            seen = max(seen, high_water_mb(proc.pid) or 0.0)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                status = -9
                break
            time.sleep(0.05 if time.perf_counter() - start < 2 else 0.2)
        proc.returncode = 0  # reaped here: keep Popen from waiting on it again
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read().decode(errors="replace")
    code = status if status == -9 else os.waitstatus_to_exitcode(status)
    return code, output, wall, seen or usage.ru_maxrss / 1024


def child_json(kind: str, folder: Path, args, extra: list[str] = ()) -> dict:
    argv = [sys.executable, __file__, "--measure", kind, "--model", str(folder), "--runs", str(args.runs), *extra]
    code, output, _, peak = run_child(argv, env={"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"})
    if code != 0:
        raise RuntimeError(f"{kind} on {folder} failed (exit {code}): {output.strip().splitlines()[-1:]}")
    return {**json.loads(output.strip().splitlines()[-1]), "peak_mb": round(peak)}


def model_folder(row: str, cache: Path) -> Path:
    shape = ROW_SHAPES[row]
    if shape is None:
        return DEFAULT_MODEL
    folder = cache / shape
    if not (folder / "config.json").exists():
        code, output, _, _ = run_child([sys.executable, str(ROOT / "scripts" / "make_synthetic.py"), shape, str(folder)])
        if code != 0:
            raise RuntimeError(f"make_synthetic {shape} failed: {output.strip()}")
    return folder


def measure_row(row: str, args) -> dict:
    folder = model_folder(row, args.cache)
    result: dict = {"folder": str(folder), "measured": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
                    "load_average": round(os.getloadavg()[0], 2), "runs": args.runs, "threads": args.threads}
    load = child_json("load", folder, args)
    result.update(load, load_peak_mb=load.pop("peak_mb"))
    result.pop("peak_mb", None)
    for kind in ("forward_sparse", "forward_dense", "generate_sparse", "generate_dense"):
        m = child_json(kind, folder, args)
        result[kind] = m.get("forward_s", m.get("tok_per_s"))
        result[kind + "_peak_mb"] = m["peak_mb"]
        result["tokens"] = m.get("tokens", result.get("tokens"))
        print(f"  {row} {kind}: {result[kind]} (peak {m['peak_mb']} MB)", flush=True)
    circuit = None
    if "prune" not in args.skip and row in args.prune_rows:
        circuit = args.cache / f"{row}-self-labelled.circuit.json"
        result.update(prune_row(row, folder, circuit, args))
    if "app" not in args.skip:
        if row == "default" or (circuit is not None and not circuit.exists()):
            circuit = None  # the shipped circuits; or the prune did not finish
        result.update(app_row(folder, circuit, args))
    return result


def prune_row(row: str, folder: Path, circuit: Path, args) -> dict:
    task_file = args.cache / f"{row}-self-labelled-{args.self_task}.jsonl"
    result = child_json("selftask", folder, args, ["--self-task", args.self_task, "--task-examples",
                                                   str(args.task_examples), "--task-out", str(task_file)])
    result.pop("peak_mb")
    argv = [sys.executable, "-m", "modeling_csp.cli", "prune", "--model", str(folder), "--task-file", str(task_file),
            "--out", str(circuit)]
    code, output, wall, peak = run_child(argv, env={"HF_HUB_OFFLINE": "1"}, timeout=args.prune_timeout)
    if code != 0:
        last = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()][-1:] or [""]
        note = (f"stopped after {args.prune_timeout:.0f} s at `{last[0][:120]}`" if code == -9
                else f"failed: {last[0][:200]}")
        return {**result, "prune_s": None, "prune_note": note, "prune_peak_mb": round(peak)}
    meta = json.loads(circuit.read_text()).get("meta", {})
    print(f"  {row} prune: {wall:.1f} s (peak {peak:.0f} MB)", flush=True)
    return {**result, "prune_s": round(wall, 1), "prune_peak_mb": round(peak), "prune_timings": meta.get("timings"),
            "prune_k": len(json.loads(circuit.read_text()).get("nodes", []))}


def app_row(folder: Path, circuit: Path | None, args) -> dict:
    if circuit is None and folder != DEFAULT_MODEL:
        return {"app_note": "no circuit (prune skipped): the app shows no graph"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "app.json"
        model = "default" if folder == DEFAULT_MODEL else str(folder)
        argv = [sys.executable, str(ROOT / "scripts" / "benchmark_app.py"), "--model", model, "--out", str(out),
                "--benchmarks", "", "--runs", str(args.runs), "--api-calls", "2"]
        if circuit is not None:
            argv += ["--import", str(circuit)]
        code, output, _, _ = run_child(argv, env={"CSP_MODEL_ROOTS": str(folder.parent)}, timeout=1800)
        if code != 0 or not out.exists():
            last = output.strip().splitlines()[-1:] or ["no output"]
            return {"app_note": f"benchmark_app.py --model FOLDER failed (exit {code}): {last[0][:160]}"}
        app = json.loads(out.read_text())
    kinds = ("select_layer", "select_node", "select_k", "select_task")
    selections = {k: app[k]["median_ms"] for k in kinds if app.get(k)}
    slowest = max(selections, key=selections.get) if selections else None
    return {"page_ready_s": app.get("page_ready_s"), "selection_ms": selections.get(slowest),
            "selection_kind": slowest and slowest.removeprefix("select_"), "selections_ms": selections,
            "prepared_s": app.get("prepared_s"), "app_peak_mb": app.get("rss_peak_mb")}


def machine() -> str:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def fmt(value, digits=2, suffix="") -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


def table(results: dict, rows: list[str]) -> list[str]:
    lines = [
        "| row | params | nonzero weights | load s | RSS after load / peak MB | forward tokens | forward sparse / dense s "
        "| forward peak MB | generation sparse / dense tok/s | prune s (stages) | prune peak MB | page ready s "
        "| selection ms (median, slowest kind) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = results.get(row)
        if r is None:
            continue
        stages = r.get("prune_timings") or {}
        prune = (f"{r['prune_s']:.1f}, {r.get('prune_k')} nodes" + (
            " (" + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + ")" if stages else "")
                 ) if r.get("prune_s") is not None else r.get("prune_note", "skipped")
        lines.append(
            f"| {row} | {r['params'] / 1e6:.1f}M | {r['nnz'] / 1e6:.3f}M | {fmt(r['load_s'])} "
            f"| {r['rss_after_load_mb']} / {r['load_peak_mb']} | {r['tokens']} "
            f"| {fmt(r['forward_sparse'], 3)} / {fmt(r['forward_dense'], 3)} "
            f"| {max(r['forward_sparse_peak_mb'], r['forward_dense_peak_mb'])} "
            f"| {fmt(r['generate_sparse'], 1)} / {fmt(r['generate_dense'], 1)} | {prune} | {fmt(r.get('prune_peak_mb'))} "
            f"| {fmt(r.get('page_ready_s'), 1) if r.get('page_ready_s') is not None else r.get('app_note', 'skipped')} "
            f"| {fmt(r.get('selection_ms'), 0)}{' (' + r['selection_kind'] + ')' if r.get('selection_kind') else ''} |")
    return lines


def section(results: dict, rows: list[str], args) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "### Scaling: from the default model to csp_yolo2's size",
        "",
        f"`python scripts/benchmark_scaling.py` on {machine()}; written {now}. The machine is shared: timings are "
        "noisy, and each row's load average is in the last line. Load, forward and generation "
        f"run with {args.threads} torch thread(s), median of --runs runs, each kind in a fresh process whose peak "
        "RSS (its VmHWM, polled) is that measurement's. Rows other than `default` are random sparse models made by "
        "`scripts/make_synthetic.py` at 0.5% density (x4, x16: the default model scaled in total parameters). "
        f"Forward: 1 x min({FORWARD_TOKENS}, context) tokens, no grad. Generation: greedy, {PROMPT_TOKENS}-token "
        f"prompt, {NEW_TOKENS} new tokens. Prune: `csp prune --task-file` with default steps on a self-labelled "
        f"task ({args.self_task} prompts labelled with the full model's own preference), wall time with the circuit "
        "file's stage timings in s. App: scripts/benchmark_app.py with the pruned circuit imported. Each row "
        "keeps the date it was measured in the results file.",
        "",
        *table(results, rows),
        "",
        "Rows measured (UTC, load average at the start, runs): " + "; ".join(
            f"{row} {r['measured']}, {r.get('load_average', '?')}, {r.get('runs', '?')}"
            for row, r in results.items() if row in rows) + ".",
    ])


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in allowed]
    if unknown:
        raise BenchmarkError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="default,x4,x16,csp_yolo1,csp_yolo2",
                        help="rows to measure ('' rewrites the section from the results file)")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file whose section is rewritten")
    parser.add_argument("--skip", default="", help="columns to skip: prune, app")
    parser.add_argument("--prune-rows", default=None, help="rows that prune (default: every row)")
    parser.add_argument("--prune-timeout", type=float, default=3600, help="seconds before a prune is stopped")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "csp" / "synthetic"),
                        help="folder of the synthetic models, task files, circuits and scaling_results.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of load, forward and generation")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each forward and generation")
    parser.add_argument("--self-task", default="while_return_true", help="task whose prompts the prune task uses")
    parser.add_argument("--task-examples", type=int, default=128, help="lines of the self-labelled task file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--task-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:  # a child: one measurement, one JSON line
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        if args.measure == "selftask":
            result = self_labelled_task(args.model, args.self_task, args.task_examples, args.task_out)
        else:
            result = measure(args.measure, args.model, args.runs)
        print(json.dumps(result, allow_nan=False))
        return 0

    try:
        rows = parse_list(args.rows, ROW_SHAPES, "row")
        args.skip = parse_list(args.skip, COLUMNS, "column to skip")
        args.prune_rows = rows if args.prune_rows is None else parse_list(args.prune_rows, ROW_SHAPES, "prune row")
        if args.runs < 1 or args.threads < 1 or args.task_examples < 2:
            raise BenchmarkError("--runs and --threads must be at least 1 and --task-examples at least 2")
    except BenchmarkError as e:
        print(f"benchmark_scaling: {e}", file=sys.stderr)
        return 2
    args.cache = Path(args.cache)
    args.cache.mkdir(parents=True, exist_ok=True)
    results_file = args.cache / "scaling_results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for row in rows:
        print(f"{row}:", flush=True)
        earlier = results.get(row, {})
        skipped = [c for c in COLUMNS if c in args.skip or (c == "prune" and row not in args.prune_rows)]
        # a column skipped now keeps the row's earlier figures of it (a rerun of load/forward/generation only)
        results[row] = {**{k: v for k, v in earlier.items() if k in COLUMN_KEYS and COLUMN_KEYS[k] in skipped},
                        **measure_row(row, args)}
        write_json_atomic(results_file, results, indent=1)
    shown = [r for r in ROW_SHAPES if r in results]
    text = section(results, shown, args)
    write_section(Path(args.out), SECTION, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
