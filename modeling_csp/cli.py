"""`csp`: find, evaluate, list and import circuits from the command line. Output is JSON on stdout
(`csp check`: one line of text).

    csp tasks                                              one {"name", "description"} per line
    csp tasks --check FILE.jsonl [--model M]               validate your own task, and the model's accuracy on it
    csp prune --model M --task T --out FILE [--target-loss NATS] [--ablation mean|zero] [--seed S] [--steps N]
    csp prune --model M --task-file FILE.jsonl --out FILE  your own task: one {"prompt", "correct", "incorrect"} per line
    csp prune ... --control shuffled                       also prune the task with answers swapped at random, and
                                                           record that control in the circuit file
    csp evaluate --model M --circuit FILE [--task T]       one object with the circuit's losses (default: on the
                                                           task it was pruned on, a task file's examples included)
                                                           M may be another model of the circuit's shape (a
                                                           snapshot, a fine-tuned copy): "transfer" then says
                                                           pruned on A, evaluated on B, and which nodes changed
    csp check --model M --circuit FILE [--max-loss NATS]   for CI: one line "ok: ..." (status 0) or "fail: ..."
                                                           (status 1) when the circuit no longer holds on M
    csp circuits --model M                                 circuits shipped with a model, one per line
    csp sweep --model M --out-dir DIR [--tasks T1,T2|all] [--ks 8,16,32]
                                                           circuits for many tasks, one summary per line;
                                                           `accelerate launch --num_processes N -m modeling_csp.cli sweep ...`
                                                           splits the tasks over N GPUs (N CPU processes:
                                                           ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...)
    csp patch --model M --circuit FILE_OR_RUN --clean TEXT --corrupt TEXT --candidates A B [--top N]
                                                           one object: each circuit node's activation-patching
                                                           effect (clean into corrupted) on logit(A) - logit(B),
                                                           largest first
    csp import-viz VIZ_DATA.pt OUT.json                    convert the original visualizer's file
    csp space build OUT [--models default,HUB_ID,...]      a complete Hugging Face Space folder
    csp space push OUT REPO_ID                             upload it (token: HF_TOKEN or `hf auth login`)
    csp publish MODEL_DIR REPO_ID                          upload a converted model folder
    csp corpus --out DIR [--tokenizer FILE]                the training corpus (stdlib + pinned PyPI wheels)
    csp train --data DIR --run-dir DIR [--out MODEL_DIR] [--steps N] [--n-layer L] [--density D] ...
                                                           train a weight-sparse model; resumes from RUN_DIR;
                                                           `accelerate launch -m modeling_csp.cli train ...` is
                                                           data-parallel over the launched processes
    csp export CIRCUIT --format html|csv|json --out PATH  the circuit as an offline HTML page (graph + node table),
                                                           CSV tables (PATH.nodes.csv, PATH.edges.csv) or JSON
    csp export CIRCUIT --format html|png|svg --figure overview|0.attn --out PATH
                                                           one figure (PNG/SVG: kaleido + Chrome/Chromium, offline)
    csp label CIRCUIT NODE TEXT [--out FILE]               label a node (an empty TEXT removes it); labels show in
                                                           the graph's hover and travel with the file
    csp next-tokens --model M --prompt TEXT [--circuit FILE] [--top 10]
                                                           one object: the prompt's tokens, the top next tokens
                                                           of the full model and of the circuit alone
    csp node --model M --circuit FILE_OR_NAME NODE [--top 10]
                                                           one object: what a circuit node does (its upstream and
                                                           downstream paths, its inputs by weight x mean
                                                           activation, direct logit effects, driving tokens);
                                                           NAME: a circuit shipped with the model (`csp circuits`)

M is a converted model folder, a Hugging Face hub id, or `default` (the model embedded in this package).
Errors print one line `error: ...` on stderr and exit with status 2 (CSP_DEBUG=1 shows the traceback). Numeric
options are checked as they are parsed (finite, in range: a target loss > 0, --k and each of --ks from 1 to the
model's node count, read from its config before anything runs), so nonsense never starts a run or writes a file;
a target at or above chance (ln 2) is such an error too. Every count has a cap, named in its error; outputs (--out,
--out-dir, --run-dir, OUT) are checked for writability before any work; a model larger than CSPConfig's size
limits or than the free memory (CSP_MAX_MODEL_BYTES lowers that) is refused before it is built. Everything written,
stdout included, is strict JSON: a number that was not computed is null, never NaN. Circuits are judged on
held-out examples (`verdict` in the JSON, `warning: ...` lines on stderr); `csp evaluate` exits with status 1 when
the circuit misses its own target there (or its held-out loss is at or above chance).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .app import missing_app_extra
from .utils.jsonio import dumps_strict, write_json_atomic
from .model.loading import shipped_circuits


SMALL_MODEL_D = 256  # models up to this width run single-threaded unless --threads is given
EXIT_MISSED_TARGET = 1  # `csp evaluate`: the circuit misses its own target on held-out examples (or is at chance)
EXIT_CIRCUIT_BROKEN = 1  # `csp check`: the circuit no longer holds on the model (--max-loss, or its verdict)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _emit(obj) -> None:
    print(dumps_strict(obj), flush=True)


# ---- option values: checked while parsing, so nonsense never starts a run ---------------------

MAX_SEED = 2**63 - 1
MAX_STEPS = 1_000_000
MAX_THREADS = 1024
MAX_TOP = 50  # next tokens listed: the app's cap too (explorer.analysis.MAX_TOP)
MAX_BATCH = 65536
MAX_LISTED = 1_000_000  # `csp patch --top`
TRAIN_BYTES_PER_VALUE = 16  # float32 weight, gradient and AdamW's two moments, per model value


def _number(low: float | None = None, high: float | None = None, *, integer: bool = False, above: bool = False):
    """An argparse `type=`: a finite number (an integer when `integer`) >= low (> low when `above`) and <= high."""
    kind = "an integer" if integer else "a finite number"
    bounds = [f"{'>' if above else '>='} {low:g}" if low is not None else "", f"<= {high:,}" if high is not None else ""]
    wanted = f"{kind} {' and '.join(b for b in bounds if b)}".strip()

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if (not math.isfinite(value) or (low is not None and (value < low or (above and value == low)))
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


def _sizes(text: str) -> list[int]:
    """--ks: comma-separated circuit sizes (each at least 1; at most the model's node count, checked later)."""
    sizes = []
    for part in text.split(","):
        if part.strip():
            try:
                sizes.append(_number(1, integer=True)(part.strip()))
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    return sorted(set(sizes))


def _check_sizes_against_model(args) -> None:
    """--k / --ks name at most the model's node count: read from its config alone, before any model is loaded.
    A k past it is not a whole-model "circuit" but a mistake."""
    asked = [("--k", k) for k in ([args.k] if getattr(args, "k", None) is not None else [])]
    asked += [("--ks", k) for k in getattr(args, "ks", None) or []]
    if not asked:
        return
    from .circuits.graph import n_total_nodes
    from .model.configuration_csp import CSPConfig
    from .model.loading import read_config_json, resolve_model

    config = CSPConfig.from_dict(read_config_json(resolve_model(args.model)))
    total = n_total_nodes(config)
    for flag, k in asked:
        if k > total:
            raise ValueError(f"{flag} {k} is more than the {total:,} nodes of model {args.model!r}: give a size from 1 "
                             f"to {total}")


def _check_writable(path, flag: str, folder: bool) -> None:
    """Refuses, before any work, an output that cannot be written (not after minutes of pruning): the nearest
    existing folder on the way must take a new file. Nothing is created."""
    import tempfile

    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder; choose a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    ancestor = (path if folder else path.parent).absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is not a folder; choose a writable path")
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".csp-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write in {ancestor} ({exc.strerror or exc}); choose a writable "
                         "path") from None


# ---- subcommands ---------------------------------------------------------------------------


def cmd_tasks(args) -> int:
    from .circuits.evaluation import check_task
    from .circuits.tasks import list_tasks

    if args.check:
        if not Path(args.check).is_file():  # before loading a model
            raise ValueError(f"task file {args.check!r} does not exist")
        model, tokenizer = _load(args)
        task = _task_file(args.check, tokenizer, model)
        _emit({"file": str(args.check), **check_task(model, tokenizer, task, n=args.n_examples)})
        return 0
    for task in list_tasks():
        _emit({"name": task.name, "description": task.description})
    return 0


def _load(args):
    from .model.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    _set_threads(args, model.config)
    return model, tokenizer


def _task_file(path, tokenizer, model):
    from .circuits.tasks import load_task_file

    return load_task_file(path, tokenizer, max_len=model.config.block_size)


def _setup(args):
    """(model, tokenizer, task) for --task NAME or --task-file FILE (a bad name fails before the model loads)."""
    from .circuits.tasks import get_task

    if bool(args.task) == bool(args.task_file):
        raise ValueError("give exactly one of --task NAME and --task-file FILE.jsonl")
    if args.task:
        get_task(args.task)
    elif not Path(args.task_file).is_file():
        raise ValueError(f"task file {args.task_file!r} does not exist")
    model, tokenizer = _load(args)
    task = get_task(args.task) if args.task else _task_file(args.task_file, tokenizer, model)
    return model, tokenizer, task


def _task_file_meta(path) -> dict:
    import hashlib

    return {"path": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def _set_threads(args, config) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif config.d_model <= SMALL_MODEL_D and not getattr(args, "batched_passes", False):
        # small ops: threads add overhead, and stall badly on a busy machine; a prune's batched passes gain from
        # every core (the default model's prune: 33.7 s on 2 threads, 49.0 s on 1; BENCHMARKS.md)
        torch.set_num_threads(1)


def cmd_prune(args) -> int:
    from .circuits.pruning import PruneConfig, prune

    config = PruneConfig(
        ablation=args.ablation, target_loss=args.target_loss, k=args.k, steps=args.steps, lr=args.lr,
        lam=args.lam, batch_size=args.batch_size, seed=args.seed, freeze_norm_scales=args.freeze_norm_scales,
        n_examples=args.n_examples, target_above_full=args.target_above_full, control=args.control,
        progress=not args.quiet,
    )
    model, tokenizer, task = _setup(args)
    result = prune(model, tokenizer, task, config, model_name=args.model)
    c = result.circuit
    if args.task_file:
        c.meta["task_file"] = _task_file_meta(args.task_file)
    path = c.save(args.out)
    _warn(result.verdict)
    if not args.quiet:  # where the time went, stage by stage (also in the file's meta.timings)
        stages = ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in c.meta["timings"].items())
        print(f"stages: {stages}; {result.seconds:.1f} s in all", file=sys.stderr)
    _emit({
        "out": str(path), "task": c.task, "k": c.k, "n_nodes": c.n_nodes, "n_edges": c.n_edges, "losses": c.losses,
        "train_circuit_loss": result.train_loss, "target_loss": c.target_loss, "target_reached": result.target_reached,
        "target_reached_train": result.target_reached_train, "verdict": c.meta["verdict"],
        "random_baseline_as_good": c.meta["random_baseline_as_good"], "control": c.control,
        "attribution_baseline": c.meta["attribution_baseline"], "seconds": round(result.seconds, 1),
        "timings": c.meta["timings"], "importance_method": c.meta["importance_method"],
    })
    return 0


def _warn(verdict) -> None:
    """A verdict's bad news, one `warning:` line each on stderr (stdout stays JSON)."""
    for text in verdict.warnings:
        print(f"warning: {text}", file=sys.stderr)


def _model_and_circuit(args):
    """(model, tokenizer, task, circuit, same_weights) for evaluate/check: the circuit must have the model's shape;
    with other weights (a snapshot, a fine-tuned copy) it is a transfer, pruned on one model, evaluated on this one."""
    from .circuits.graph import CircuitGraph, weights_hash
    from .circuits.transfer import check_same_shape, own_task

    if args.task or args.task_file:
        model, tokenizer, task = _setup(args)
    else:  # the circuit's own task: a built-in name, or the examples a --task-file circuit keeps
        model, tokenizer = _load(args)
        task = None
    circuit = CircuitGraph.load(args.circuit)
    check_same_shape(circuit, model, args.model)
    task = task or own_task(circuit, source=str(args.circuit))
    same_weights = circuit.model.get("weights_hash") in (None, weights_hash(model))
    if same_weights:
        circuit.match_weights(model)  # a transfer keeps the file's edges: their weights are the other model's
    return model, tokenizer, task, circuit, same_weights


def cmd_evaluate(args) -> int:
    from .circuits.ablation import compute_mean_activations
    from .utils.devices import input_device
    from .circuits.evaluation import EvalOptions, circuit_losses, task_split, verdict_of
    from .circuits.transfer import TOP_CHANGED, evaluate_transfer

    model, tokenizer, task, circuit, same_weights = _model_and_circuit(args)
    options = EvalOptions.of(circuit, n_random=args.n_random, seed=args.seed)  # the app evaluates the same way
    for notice in [*circuit.notices, *options.notices]:  # circuit.notices: edges recomputed from the weights
        print(f"note: {notice}", file=sys.stderr)
    means = compute_mean_activations(model, tokenizer) if circuit.ablation == "mean" else None  # this model's own
    transfer = None
    if same_weights:
        batch = task_split(task, tokenizer, model.config.block_size, options)
        faith = circuit_losses(model, batch, circuit.masks(model.config, input_device(model)), means, options)
        verdict = verdict_of(circuit, faith, own_task=task.name == circuit.task)  # another task: no target to meet
        n_examples = len(batch)
    else:
        result = evaluate_transfer(circuit, model, tokenizer, task, means, options, model_name=args.model)
        print(f"note: {result.summary}", file=sys.stderr)
        faith, verdict, n_examples, transfer = result.losses, result.verdict, result.n_examples, result.as_dict(TOP_CHANGED)
    _warn(verdict)
    _emit({
        "task": task.name, "circuit_task": circuit.task, "ablation": circuit.ablation,
        "full_loss": faith["full"], "circuit_loss": faith["circuit"], "random_loss": faith["random"],
        "complement_loss": faith["complement"], "full_accuracy": faith["full_accuracy"],
        "circuit_accuracy": faith["circuit_accuracy"], "random_baseline_as_good": faith["random_baseline_as_good"],
        "n_nodes": circuit.n_nodes, "n_edges": circuit.n_edges, "n_examples": n_examples,
        "n_random": options.n_random, "seed": options.seed, "freeze_norm_scales": options.freeze_norm_scales,
        "target_loss": verdict.target, "target_reached": verdict.target_reached_heldout, "verdict": verdict.as_dict(),
        "transfer": transfer,
    })
    return EXIT_MISSED_TARGET if verdict.passed is False else 0


def cmd_check(args) -> int:
    from .circuits.evaluation import EvalOptions
    from .circuits.transfer import evaluate_transfer

    model, tokenizer, task, circuit, _ = _model_and_circuit(args)
    if args.max_loss is None and (circuit.target_loss is None or task.name != circuit.task):
        raise ValueError(f"{args.circuit} has no target loss on task {task.name!r} to check: give --max-loss NATS")
    options = EvalOptions.of(circuit, n_random=1, seed=args.seed)  # the random baseline judges nothing here
    result = evaluate_transfer(circuit, model, tokenizer, task, options=options, model_name=args.model, changes=False)
    loss = result.losses["circuit"]
    problems = []
    if args.max_loss is not None and not loss <= args.max_loss:
        problems.append(f"held-out loss {loss:.4f} > --max-loss {args.max_loss:g}")
    if result.verdict.passed is False:
        problems.append("; ".join(result.verdict.warnings))
    limit = f" (max {args.max_loss:g})" if args.max_loss is not None else ""
    what = f"{task.name} circuit ({circuit.n_nodes} nodes) {result.summary}: held-out loss {loss:.4f}{limit}"
    print(f"fail: {what}: {'; '.join(problems)}" if problems else f"ok: {what}", flush=True)
    return EXIT_CIRCUIT_BROKEN if problems else 0


def cmd_sweep(args) -> int:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .model.loading import load_model_and_tokenizer
    from .circuits.pruning import PruneConfig, prune_sweep
    from .circuits.tasks import get_task, list_tasks

    tasks = [t.name for t in list_tasks()] if args.tasks == "all" else [get_task(t).name for t in args.tasks.split(",")]
    ks = args.ks  # parsed and checked against the model's size before this runs (_sizes, _check_sizes_against_model)
    # one process, or this process's rank under `accelerate launch` (on CPUs: ACCELERATE_USE_CPU=1, gloo)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.to(state.device)
    _set_threads(args, model.config)
    config = PruneConfig(ablation=args.ablation, target_loss=args.target_loss, steps=args.steps, seed=args.seed,
                         n_examples=args.n_examples, target_above_full=args.target_above_full, control=args.control,
                         progress=not args.quiet and state.is_main_process)
    out_dir = Path(args.out_dir)
    summaries = prune_sweep(model, tokenizer, tasks, out_dir, config, ks=ks, model_name=args.model,
                            process_index=state.process_index, num_processes=state.num_processes)
    circuits = [s for s in summaries if s.get("path")]  # the others: tasks whose target was refused
    write_json_atomic(out_dir / f".sweep-{state.process_index}.json", circuits, trailing_newline=False)
    for summary in summaries:
        if summary.get("refused"):
            print(f"warning: {summary['task']}: {summary['refused']}", file=sys.stderr)
        _emit(summary)
    state.wait_for_everyone()
    if state.is_main_process:  # merge every process's share into the folder's index.json
        index = out_dir / "index.json"
        entries = json.loads(index.read_text()) if index.is_file() else []
        for part in sorted(out_dir.glob(".sweep-*.json")):
            new = json.loads(part.read_text())
            paths = {e["path"] for e in new}
            entries = [e for e in entries if e.get("path") not in paths] + new
            part.unlink()
        write_json_atomic(index, sorted(entries, key=lambda e: (e["task"], e["k"])), indent=1)
    return 0


def cmd_corpus(args) -> int:
    from .data.corpus import PYPI_INDEX, build_corpus

    meta = build_corpus(args.out, args.tokenizer, args.wheels, index_url=args.index_url or PYPI_INDEX,
                        progress=not args.quiet)
    _emit({"out": str(args.out), "tokens": meta["tokens"], "sources": len(meta["sources"])})
    return 0


def cmd_index_examples(args) -> int:
    from tqdm.auto import tqdm

    from .circuits.example_index import build_example_index, cache_folder, check_corpus, folder_size

    if args.corpus is not None:
        check_corpus(args.corpus)
    model, tokenizer = _load(args)
    out = Path(args.out) if args.out else cache_folder(model)
    bars = []

    def progress(done: int, total: int) -> None:
        if not bars:  # created at the first batch, so that an error before it prints alone
            bars.append(tqdm(total=total, desc="indexing examples (2 passes)", unit="batch", disable=args.quiet,
                             file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        index = build_example_index(model, tokenizer, args.tokens, corpus=args.corpus, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    index.save(out)
    _emit({"out": str(out), "n_tokens": index.n_tokens, "text": index.meta["text"], "nodes": int(index.density.numel()),
           "seconds": index.meta["build_seconds"], "bytes": folder_size(out), "weights_hash": index.meta["weights_hash"]})
    return 0


TRAIN_OPTIONS = ("n_layer", "d_model", "n_head", "d_head", "d_mlp", "steps", "batch_size", "lr", "weight_decay",
                 "warmup_frac", "grad_clip", "density", "bigram_density", "anneal_frac", "anneal_shape", "eval_every",
                 "eval_windows", "checkpoint_every", "max_minutes", "seed", "init_from")


def cmd_train(args) -> int:
    import hashlib

    from accelerate import Accelerator

    from .training.train import TokenData, TrainConfig, save_trained_model, train

    config = TrainConfig(**{name: getattr(args, name) for name in TRAIN_OPTIONS})
    config.model_config().check_fits_in_memory(  # before the corpus is read or anything is allocated
        TRAIN_BYTES_PER_VALUE, what="training this model (weights, gradients and optimizer state)")
    tokenizer_json = Path(args.tokenizer_dir) / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ValueError(f"{args.tokenizer_dir} has no tokenizer.json")
    data = TokenData(args.data)
    expected = data.meta.get("tokenizer_sha256")
    if expected and hashlib.sha256(tokenizer_json.read_bytes()).hexdigest() != expected:
        raise ValueError(f"{args.data} was tokenized with another tokenizer than {tokenizer_json}")
    if args.select_snapshot == "best" and not (args.task_probe and args.snapshots):
        raise ValueError("--select-snapshot best needs --task-probe (what to choose by) and --snapshots (what to choose from)")
    _set_threads(args, config.model_config())
    probe = None
    if args.task_probe:
        from .model.loading import load_tokenizer
        from .circuits.tasks import get_task, list_tasks
        from .training.train import task_probe

        tasks = list_tasks() if args.task_probe == "all" else [get_task(n) for n in args.task_probe.split(",")]
        probe = task_probe(load_tokenizer(str(args.tokenizer_dir)), [t.name for t in tasks],
                           max_len=config.model_config().block_size)
    acc = Accelerator()
    result = train(config, data, args.run_dir, resume=not args.no_resume, progress=not args.quiet, accelerator=acc,
                   probe=probe, snapshots=args.snapshots)
    if result.finished and args.select_snapshot == "best" and acc.is_main_process:
        from .training.train import best_probed_step, result_at_snapshot

        step = best_probed_step(result.record)
        if step is None:
            raise ValueError(f"{args.run_dir}: its curve has no task-probe results (trained without --task-probe)")
        result = result_at_snapshot(args.run_dir, step, data)
    summary = {"run_dir": str(args.run_dir), "finished": result.finished, "step": result.record["curve"][-1]["step"]
               if result.record["curve"] else 0, "final": result.record["final"]}
    if result.finished and args.out and acc.is_main_process:
        summary["out"] = str(save_trained_model(result, args.out, args.tokenizer_dir, data.meta or None))
    if acc.is_main_process:
        _emit(summary)
    return 0


def cmd_circuits(args) -> int:
    for entry in shipped_circuits(args.model):
        _emit(entry)
    return 0


def cmd_next_tokens(args) -> int:
    if missing := missing_app_extra("csp next-tokens"):
        return _fail(missing)
    from .explorer import Explorer, clean_prompt, import_run_file, next_tokens

    clean_prompt(args.prompt)  # an empty prompt fails before the model loads
    entry = Explorer().get_model(args.model)  # the library's settings: any folder, saved runs in memory only
    _set_threads(args, entry.config)
    run = import_run_file(entry, args.circuit) if args.circuit else None
    for notice in run.circuit.notices if run else ():
        print(f"note: {args.circuit}: {notice}", file=sys.stderr)
    _emit(next_tokens(entry, args.prompt, run, top=args.top))
    return 0


def _circuit_file_or_shipped(model_spec: str, name: str) -> str:
    """--circuit: a circuit file, else a circuit shipped with the model, named by its file name (without .json)
    or its task (then the one found for the target loss)."""
    if Path(name).is_file():
        return name
    shipped = shipped_circuits(model_spec)
    by_stem = [e for e in shipped if Path(e["path"]).stem == name]
    by_task = sorted((e for e in shipped if e["task"] == name), key=lambda e: not e["at_target"])
    if by_stem or by_task:
        return (by_stem or by_task)[0]["path"]
    names = sorted(Path(e["path"]).stem for e in shipped)
    listed = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") if names else "none"
    raise ValueError(f"--circuit {name!r} is neither a file nor a circuit shipped with model {model_spec!r} "
                     f"(shipped: {listed}; `csp circuits --model {model_spec}` lists them)")


def cmd_patch(args) -> int:
    from .circuits.graph import CircuitGraph
    from .circuits.patching import patch_prompts, rank_nodes

    if not args.clean or not args.corrupt:  # before the model loads
        raise ValueError(f"the {'clean' if not args.clean else 'corrupted'} prompt is empty: type some code")
    path = _circuit_file_or_shipped(args.model, args.circuit)
    model, tokenizer = _load(args)
    circuit = CircuitGraph.load(path, model=model)
    for notice in circuit.notices:
        print(f"note: {args.circuit}: {notice}", file=sys.stderr)
    p = patch_prompts(model, tokenizer, args.clean, args.corrupt, args.candidates, circuit.nodes,
                      batch_size=args.batch_size)
    r = p.result
    _emit({
        "circuit": str(path), "task": circuit.task, "n_nodes": circuit.n_nodes, "direction": r.direction,
        "metric": f"logit({tokenizer.decode([p.token_a])!r}) - logit({tokenizer.decode([p.token_b])!r}) at the last token",
        "clean_tokens": [tokenizer.decode([i]) for i in p.clean_ids],
        "corrupt_tokens": [tokenizer.decode([i]) for i in p.corrupt_ids],
        "clean": r.clean, "corrupt": r.corrupt, "nodes_per_second": round(r.nodes_per_second, 1),
        "ranked": rank_nodes(r, args.top),
    })
    return 0


def cmd_node(args) -> int:
    from .circuits.ablation import compute_mean_activations, example_windows
    from .circuits.graph import CircuitGraph, parse_node_id
    from .circuits.logit_effects import describe_node, mean_final_norm_scale

    parse_node_id(args.node)  # a malformed id fails before the model loads
    path = _circuit_file_or_shipped(args.model, args.circuit)
    model, tokenizer = _load(args)
    circuit = CircuitGraph.load(path, model=model)
    for notice in circuit.notices:
        print(f"note: {path}: {notice}", file=sys.stderr)
    if args.node not in circuit.nodes:
        describe_node(model, tokenizer, circuit, args.node, {}, top=args.top)  # raises, naming nodes it has
    means = compute_mean_activations(model, tokenizer)
    scale = mean_final_norm_scale(model, example_windows(model, tokenizer))
    _emit({"circuit": str(path), **describe_node(model, tokenizer, circuit, args.node, means, scale, args.top)})
    return 0


def cmd_import_viz(args) -> int:
    from .circuits.viz_import import import_viz_data

    circuit = import_viz_data(args.viz_data)
    path = circuit.save(args.out)
    _emit({"out": str(path), "n_nodes": circuit.n_nodes, "n_edges": circuit.n_edges, "losses": circuit.losses})
    return 0


def cmd_export(args) -> int:
    from .circuits.graph import CircuitGraph
    from . import export

    fmt = args.format
    if fmt in ("png", "svg") and args.figure is None:
        args.figure = "overview"
    if args.figure is not None and fmt not in export.FIGURE_FORMATS:
        return _fail(f"--figure exports a figure as {', '.join(export.FIGURE_FORMATS)}, not {fmt}; drop --figure "
                     "for the circuit's csv or json")
    if fmt in export.FIGURE_FORMATS and (missing := missing_app_extra(f"csp export --format {fmt}")):
        return _fail(missing)
    if fmt in ("png", "svg") and (problem := export.image_export_problem()):
        return _fail(problem)
    circuit = CircuitGraph.load(args.circuit)
    if args.figure is None:
        paths = export.export_circuit(circuit, fmt, args.out)
    else:
        paths = [export.write_figure(_circuit_figure(circuit, args.figure), args.out, fmt)]
    _emit(export.describe(paths))
    return 0


def _circuit_figure(circuit, which: str):
    """--figure: "overview" (the whole circuit) or a sublayer such as "0.attn" (its graph)."""
    from . import plotting

    n_layer = int(circuit.model.get("n_layer") or 0)
    layers = plotting.layer_names(n_layer)
    if which == "overview":
        return plotting.circuit_overview_figure(circuit, n_layer or None)
    if which in layers:
        return plotting.layer_graph_figure(circuit, which)
    raise ValueError(f"--figure {which!r}: choose 'overview' or a sublayer of this circuit's model "
                     f"({', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''})")


def cmd_label(args) -> int:
    from .circuits.graph import CircuitGraph

    circuit = CircuitGraph.load(args.circuit).with_labels({args.node: args.text})
    path = circuit.save(args.out or args.circuit)
    _emit({"circuit": str(path), "node": args.node, "label": circuit.labels.get(args.node),
           "n_labels": len(circuit.labels)})
    return 0


def cmd_space_build(args) -> int:
    if missing := missing_app_extra("csp space build"):
        return _fail(missing)
    from .deploy import build_space

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    out = build_space(args.out, models, default_repo=args.default_repo, title=args.title)
    _emit({"out": str(out), "models": models, "files": sorted(p.name for p in out.iterdir())})
    return 0


def cmd_space_push(args) -> int:
    from .deploy import push_space

    _emit({"space": args.repo_id, "commit": push_space(args.folder, args.repo_id, hardware=args.hardware)})
    return 0


def cmd_publish(args) -> int:
    from .deploy import publish_model

    _emit({"model": args.repo_id, "commit": publish_model(args.folder, args.repo_id, private=args.private)})
    return 0


# ---- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .circuits.evaluation import MAX_EXAMPLES, MAX_RANDOM
    from .circuits.pruning import PruneConfig

    d = PruneConfig()
    target_loss = _number(0, above=True)  # the verdict code refuses a target at or above chance (ln 2) too
    n_examples = _number(8, MAX_EXAMPLES, integer=True)  # what `csp evaluate` can reproduce
    steps = _number(1, MAX_STEPS, integer=True)
    seed = _number(0, MAX_SEED, integer=True)
    threads = _number(1, MAX_THREADS, integer=True)
    parser = _Parser(prog="csp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tasks", help="list the built-in tasks, or check your own task file")
    p.add_argument("--check", metavar="FILE.jsonl", help="validate a task file ({\"prompt\", \"correct\", \"incorrect\"} "
                   "per line) and report the model's accuracy and loss on it")
    p.add_argument("--model", default="default", help="model for --check (default: the embedded one)")
    p.add_argument("--n-examples", type=n_examples, default=d.n_examples, help="examples used by --check (as csp prune)")
    p.add_argument("--threads", type=threads, help="torch CPU threads")
    p.set_defaults(fn=cmd_tasks)

    def model_task(p, seed_help="random seed"):
        p.add_argument("--model", required=True, help="converted folder, hub id, or 'default'")
        p.add_argument("--task", help="task name (see `csp tasks`)")
        p.add_argument("--task-file", metavar="FILE.jsonl",
                       help="your own task instead: one {\"prompt\", \"correct\", \"incorrect\"} object per line")
        p.add_argument("--seed", type=seed, default=d.seed, help=seed_help)
        p.add_argument("--threads", type=threads, help=f"torch CPU threads (default: all for prune; for the others 1 "
                                                       f"where d_model <= {SMALL_MODEL_D}, else all)")

    def control_options(p):
        p.add_argument("--control", choices=("shuffled",), help="also prune the task with correct/incorrect swapped at "
                       "random per example and record that control (its loss at the circuit's size, the size it needs)")
        p.add_argument("--target-above-full", type=_number(0), metavar="MARGIN",
                       help="target = max(--target-loss, the full model's loss + MARGIN)")

    p = sub.add_parser("prune", help="find a circuit for a task by learning node masks")
    model_task(p)
    p.add_argument("--out", required=True, help="circuit JSON file to write")
    p.add_argument("--target-loss", type=target_loss, default=d.target_loss,
                   help="task loss to reach (nats, > 0; default %(default)s)")
    p.add_argument("--ablation", choices=("mean", "zero"), default="mean")
    p.add_argument("--k", type=_number(1, integer=True), help="keep exactly the top-k nodes instead of searching for "
                   "the target loss (1 to the model's node count)")
    p.add_argument("--steps", type=steps, default=d.steps)
    p.add_argument("--lr", type=_number(0, above=True), default=d.lr)
    p.add_argument("--lambda", dest="lam", type=_number(0), default=d.lam, help="loss cost per kept node")
    p.add_argument("--batch-size", type=_number(1, MAX_BATCH, integer=True), default=d.batch_size)
    p.add_argument("--n-examples", type=n_examples, default=d.n_examples,
                   help="task examples, 75%% train / 25%% test (default %(default)s)")
    p.add_argument("--freeze-norm-scales", action="store_true", help="norms use the unablated model's 1/rms")
    control_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_prune, outputs=[("out", "--out", False)], batched_passes=True)

    p = sub.add_parser("evaluate", help="task losses of a circuit: full, circuit, random, complement")
    model_task(p, "seed of the random baseline (default: the circuit's pruning seed)")
    p.set_defaults(seed=None)
    p.add_argument("--circuit", required=True, help="circuit JSON file")
    p.add_argument("--n-random", type=_number(1, MAX_RANDOM, integer=True), default=None,
                   help=f"random circuits averaged for the baseline (default: the circuit's, else {d.n_random}; at most "
                        f"{MAX_RANDOM})")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("check", help="exit 1 when a circuit no longer holds on a model (for CI): one line of output")
    model_task(p, "seed of the random draws (default: the circuit's pruning seed)")
    p.set_defaults(seed=None)
    p.add_argument("--circuit", required=True, help="circuit JSON file (pruned on this model or one of its shape)")
    p.add_argument("--max-loss", type=_number(0), metavar="NATS",
                   help="fail when the circuit's held-out task loss is above this (the verdict is checked too)")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("circuits", help="circuits shipped with a model (its circuits/ folder)")
    p.add_argument("--model", required=True)
    p.set_defaults(fn=cmd_circuits)

    p = sub.add_parser("sweep", help="circuits for many tasks at the target loss and at several k (accelerate-aware)")
    p.add_argument("--model", required=True, help="converted folder, hub id, or 'default'")
    p.add_argument("--out-dir", required=True, help="folder for the circuit files and index.json")
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    p.add_argument("--ks", type=_sizes, default=[], help="comma-separated circuit sizes besides the target-loss one "
                   "(each 1 to the model's node count)")
    p.add_argument("--target-loss", type=target_loss, default=d.target_loss,
                   help="task loss to reach (nats, > 0; default %(default)s)")
    p.add_argument("--ablation", choices=("mean", "zero"), default="mean")
    p.add_argument("--steps", type=steps, default=d.steps)
    p.add_argument("--n-examples", type=n_examples, default=d.n_examples,
                   help="task examples, 75%% train / 25%% test (default %(default)s)")
    p.add_argument("--seed", type=seed, default=d.seed)
    control_options(p)
    p.add_argument("--threads", type=threads, help="torch CPU threads per process")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_sweep, outputs=[("out_dir", "--out-dir", True)])

    from .circuits.example_index import DEFAULT_TOKENS, MAX_TOKENS, MIN_TOKENS

    p = sub.add_parser("index-examples", help="every node's density, histogram and activating examples over held-out text")
    p.add_argument("model", metavar="MODEL", help="converted folder, hub id, or 'default'")
    p.add_argument("--tokens", type=_number(MIN_TOKENS, MAX_TOKENS, integer=True), default=DEFAULT_TOKENS,
                   help="held-out tokens to index (%(type)s; default %(default)s; all the held-out text if less)")
    p.add_argument("--corpus", type=Path, help="a built corpus folder (`csp corpus`): adds its projects' held-out "
                   "files (val_extra.npy) to the stdlib's held-out files")
    p.add_argument("--out", type=Path, help="folder for index.json + index.safetensors (default: the cache the app "
                   "reads, next to the mean activations)")
    p.add_argument("--threads", type=threads, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_index_examples, outputs=[("out", "--out", True)])

    p = sub.add_parser("corpus", help="build the training corpus: stdlib + pinned PyPI wheels, deduplicated, tokenized")
    p.add_argument("--out", required=True, type=Path, help="folder for train.npy, val.npy, val_extra.npy, meta.json")
    p.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parent / "default_model" / "tokenizer.json")
    p.add_argument("--wheels", type=Path, help="where the downloaded wheels are kept (default OUT/wheels)")
    p.add_argument("--index-url", help="package index for pip (default PyPI)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_corpus, outputs=[("out", "--out", True)])

    from .model.configuration_csp import MAX_SIZES
    from .training.train import TrainConfig

    t = TrainConfig()
    fraction = _number(0, 1)
    TRAIN_TYPES = {
        **{name: _number(1, MAX_SIZES[name], integer=True) for name in ("n_layer", "d_model", "n_head", "d_head", "d_mlp")},
        **dict.fromkeys(("batch_size", "eval_windows"), _number(1, MAX_BATCH, integer=True)),
        **dict.fromkeys(("eval_every", "checkpoint_every"), steps),
        "steps": steps, "seed": seed, "lr": _number(0, above=True), "weight_decay": _number(0),
        "warmup_frac": fraction, "anneal_frac": fraction, "grad_clip": _number(0, above=True),
        "density": _number(0, 1, above=True), "bigram_density": _number(0, 1, above=True),
        "max_minutes": _number(0, above=True), "anneal_shape": str, "init_from": str,
    }
    p = sub.add_parser("train", help="train a weight-sparse model from a corpus folder (accelerate-aware, resumable)")
    p.add_argument("--data", required=True, help="corpus folder (csp corpus / scripts/build_corpus.py)")
    p.add_argument("--run-dir", required=True, type=Path, help="checkpoint.pt, training_curve.json, loss_curve.svg")
    p.add_argument("--out", type=Path, help="model folder to write when the run has finished")
    p.add_argument("--tokenizer-dir", type=Path, default=Path(__file__).resolve().parent / "default_model",
                   help="folder with the tokenizer.json the corpus was built with (copied into --out)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if RUN_DIR has a checkpoint")
    for name in TRAIN_OPTIONS:
        default = getattr(t, name)
        kind = TRAIN_TYPES.get(name, str)
        extra = {"choices": ("linear", "geometric")} if name == "anneal_shape" else {}
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=f"(default {default})", **extra)
    p.add_argument("--threads", type=threads, help=f"torch CPU threads per process (default: 1 for d_model <= {SMALL_MODEL_D})")
    p.add_argument("--task-probe", metavar="TASKS", help="'all' or comma-separated task names: their accuracy on the "
                   "train splits at every evaluation, in the curve (the test splits stay unseen)")
    p.add_argument("--snapshots", action="store_true", help="keep every checkpoint's weights in RUN_DIR/snapshots/")
    p.add_argument("--select-snapshot", choices=("last", "best"), default="last",
                   help="what --out gets: the last weights, or the snapshot whose probed tasks reach 0.9 most often")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train, outputs=[("run_dir", "--run-dir", True), ("out", "--out", True)])

    p = sub.add_parser("next-tokens", help="top next tokens of the full model and of a circuit alone (the app's /next_tokens)")
    p.add_argument("--model", required=True, help="converted folder, hub id, or 'default'")
    p.add_argument("--prompt", required=True, help="the text to continue (Python code)")
    p.add_argument("--circuit", help="circuit JSON file (or viz_data.pt): also predict with everything outside it ablated")
    p.add_argument("--top", type=_number(1, MAX_TOP, integer=True), default=10, help="how many next tokens to list")
    p.add_argument("--threads", type=threads, help=f"torch CPU threads (default: 1 for d_model <= {SMALL_MODEL_D}, else all)")
    p.set_defaults(fn=cmd_next_tokens)

    p = sub.add_parser("patch", help="activation patching: each circuit node's effect on two candidates' logit difference")
    p.add_argument("--model", required=True, help="converted folder, hub id, or 'default'")
    p.add_argument("--circuit", required=True, metavar="FILE_OR_RUN",
                   help="circuit JSON file, or a circuit shipped with the model (file name or task, see `csp circuits`)")
    p.add_argument("--clean", required=True, help="the clean prompt")
    p.add_argument("--corrupt", required=True, help="the corrupted prompt, of the same token length")
    p.add_argument("--candidates", required=True, nargs=2, metavar=("A", "B"),
                   help="two next tokens: the metric is logit(A) - logit(B) at the last token")
    p.add_argument("--top", type=_number(1, MAX_LISTED, integer=True), help="list only the N largest effects")
    p.add_argument("--batch-size", type=_number(1, MAX_BATCH, integer=True), default=64, help="nodes per forward pass")
    p.add_argument("--threads", type=threads, help=f"torch CPU threads (default: 1 for d_model <= {SMALL_MODEL_D}, else all)")
    p.set_defaults(fn=cmd_patch)

    p = sub.add_parser("node", help="what a circuit node does: paths, inputs, direct logit effects, driving tokens")
    p.add_argument("--model", required=True, help="converted folder, hub id, or 'default'")
    p.add_argument("--circuit", required=True, help="circuit JSON file, or the name of a circuit shipped with the model")
    p.add_argument("node", help="node id 'location:index', such as 3.mlp.post_act:12")
    p.add_argument("--top", type=_number(1, MAX_TOP, integer=True), default=10, help="tokens and inputs listed")
    p.add_argument("--threads", type=threads, help=f"torch CPU threads (default: 1 for d_model <= {SMALL_MODEL_D}, else all)")
    p.set_defaults(fn=cmd_node)

    p = sub.add_parser("import-viz", help="convert the original visualizer's viz_data.pt to a circuit JSON")
    p.add_argument("viz_data")
    p.add_argument("out")
    p.set_defaults(fn=cmd_import_viz, outputs=[("out", "OUT", False)])

    p = sub.add_parser("export", help="a circuit as an offline HTML page, CSV tables or JSON; or one of its figures")
    p.add_argument("circuit", help="csp-circuit JSON file")
    p.add_argument("--format", required=True, choices=["html", "csv", "json", "png", "svg"],
                   help="html: interactive page (graph + node table); csv: OUT.nodes.csv and OUT.edges.csv; json: "
                        "csp-circuit file; png/svg: a figure (kaleido + Chrome/Chromium)")
    p.add_argument("--out", required=True, help="file to write (csv: the prefix of the two tables)")
    p.add_argument("--figure", help="export a figure instead: 'overview' (whole circuit) or a sublayer such as 0.attn")
    p.set_defaults(fn=cmd_export, outputs=[("out", "--out", False)])

    p = sub.add_parser("label", help="label a node of a circuit file (an empty TEXT removes the label)")
    p.add_argument("circuit", help="csp-circuit JSON file (rewritten atomically, unless --out)")
    p.add_argument("node", help="node id, e.g. 0.mlp.post_act:12")
    p.add_argument("text", help="the label (at most 200 characters)")
    p.add_argument("--out", help="write the labelled circuit here instead")
    p.set_defaults(fn=cmd_label, outputs=[("circuit", "CIRCUIT", False), ("out", "--out", False)])

    from .deploy import DEFAULT_MODEL_REPO

    space = sub.add_parser("space", help="build or push the app as a Hugging Face Space")
    space_sub = space.add_subparsers(dest="space_command", required=True, metavar="ACTION")
    p = space_sub.add_parser("build", help="write a complete Space folder")
    p.add_argument("out", help="folder to create (must be new or empty)")
    p.add_argument("--models", default="default", help="comma-separated: 'default' and hub ids of converted models")
    p.add_argument("--default-repo", default=DEFAULT_MODEL_REPO, help="hub id the embedded model is published as")
    p.add_argument("--title", help="the Space's title")
    p.set_defaults(fn=cmd_space_build, outputs=[("out", "OUT", True)])
    p = space_sub.add_parser("push", help="upload a built Space folder (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("folder")
    p.add_argument("repo_id", help="OWNER/NAME of the Space (created if missing)")
    p.add_argument("--hardware", help="e.g. cpu-basic, cpu-upgrade, t4-small")
    p.set_defaults(fn=cmd_space_push)

    p = sub.add_parser("publish", help="upload a converted model folder as a model repo")
    p.add_argument("folder", help="converted model folder (e.g. modeling_csp/default_model)")
    p.add_argument("repo_id", help="OWNER/NAME of the model repo (created if missing)")
    p.add_argument("--private", action="store_true")
    p.set_defaults(fn=cmd_publish)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed as one line)
        return exc.code if isinstance(exc.code, int) else 2
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stderr is for our own progress bar and errors
    try:
        for attr, flag, folder in getattr(args, "outputs", ()):
            if getattr(args, attr) is not None:
                _check_writable(getattr(args, attr), flag, folder)
        _check_sizes_against_model(args)
        return args.fn(args)
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as exc:  # every failure is one line for the user
        if os.environ.get("CSP_DEBUG"):
            raise
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, (ValueError, OSError, KeyError)) and type(exc).__name__ != "DeployError":
            message = f"{type(exc).__name__}: {message}"
        return _fail(message)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
