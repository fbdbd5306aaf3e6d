"""Training weight-sparse transformers from scratch (Gao et al. 2025), data-parallel with accelerate.

The recipe of the embedded default model, as a library and as `csp train`:

- data: a tokenized corpus folder (`corpus.build_corpus`: uint16 `train.npy`, `val.npy`, optional
  `val_extra.npy`); every step samples random (block_size + 1)-token windows of the training tokens;
- weight sparsity: after every AdamW step each weight matrix (c_attn, c_proj, c_fc, mlp c_proj, wte, wpe,
  lm_head) keeps only its top-k entries by magnitude (gradients stay dense so pruned weights can come
  back). The kept fraction is annealed from 1.0 to `density` over the first `anneal_frac` of training,
  `geometric` (the same factor every step; gentler at low densities than the paper's `linear`), then held.
  The bigram table gets the same treatment at its own density;
- AdamW (0.9, 0.95), weight decay on matrices, linear warmup then cosine decay to 10%, clipping at 1.0.

Run under `accelerate launch` the same command is data-parallel: every process draws the same global batch
from the same generator and trains on its slice, DDP averages the gradients, and the top-k projection is
applied to identical weights on every process. The run checkpoints to `OUT/checkpoint.pt` every
`checkpoint_every` steps and at the end (or at `max_minutes`), and resumes from it bit for bit.

    accelerate launch --num_processes 8 -m modeling_csp.cli train --data work_dirs/corpus --run-dir work_dirs/run1 ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m modeling_csp.cli train ...  # CPU, gloo
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..circuits.tasks import DEFAULT_DATA_SEED, DEFAULT_N_EXAMPLES
from ..model.configuration_csp import CSPConfig
from ..utils.jsonio import atomic_open, atomic_path, dumps_strict, write_json_atomic, write_text_atomic
from ..utils.tempfiles import remove_orphan_temps
from ..model.modeling_csp import CSPForCausalLM

# The architecture of the embedded default model; TrainConfig's n_layer, d_model, ... override it.
BASE_MODEL_CONFIG = dict(
    block_size=128,
    vocab_size=2048,
    n_layer=2,
    n_head=8,
    d_head=16,
    d_model=128,
    d_mlp=512,
    bias=False,
    ln_bias=False,
    rms_norm=True,
    residual_activation_type="identity",
    activation_type="gelu",
    afrac=0.25,
    afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out",
    tied_unembed=False,
    enable_bigram_table=True,
    learnable_bigram_table=True,
    sink=True,
    tokenizer_name="stdlib_py_2k",
)
CHECKPOINT = "checkpoint.pt"
CURVE = "training_curve.json"


@dataclass
class TrainConfig:
    """Everything a run depends on (recorded in the checkpoint and in training_curve.json)."""

    n_layer: int = 2
    d_model: int = 128
    n_head: int = 8
    d_head: int = 16
    d_mlp: int = 512
    steps: int = 3600
    batch_size: int = 32  # global: split over the processes
    lr: float = 5e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.02
    grad_clip: float = 1.0
    density: float = 0.1  # target fraction of nonzero entries per weight matrix
    bigram_density: float = 0.05
    anneal_frac: float = 0.6
    anneal_shape: str = "geometric"
    eval_every: int = 200
    eval_windows: int = 256  # val windows of the periodic evaluation (the final one uses all)
    checkpoint_every: int = 500
    max_minutes: float | None = None  # stop (with a checkpoint) after this long; resume later
    seed: int = 0
    # a finished run's folder: start from its weights (new optimizer and schedule; anneal_frac 0 keeps the density),
    # a second stage that trains longer at the final density
    init_from: str | None = None

    def __post_init__(self):
        if self.anneal_shape not in ("linear", "geometric"):
            raise ValueError(f"anneal_shape must be 'linear' or 'geometric', not {self.anneal_shape!r}")
        if not (0 < self.density <= 1 and 0 < self.bigram_density <= 1):
            raise ValueError(f"densities must be in (0, 1], got {self.density} and {self.bigram_density}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size, eval_every and checkpoint_every must be at least 1")
        if not 0 <= self.anneal_frac <= 1 or not 0 <= self.warmup_frac <= 1:
            raise ValueError("anneal_frac and warmup_frac must be in [0, 1]")

    def model_config(self, vocab_size: int | None = None) -> CSPConfig:
        arch = {f: getattr(self, f) for f in ("n_layer", "d_model", "n_head", "d_head", "d_mlp")}
        return CSPConfig(**{**BASE_MODEL_CONFIG, **arch, **({"vocab_size": vocab_size} if vocab_size else {})})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- data ----------------------------------------------------------------------------------


class TokenData:
    """A corpus folder's token arrays: train (sampled), val (stdlib held-out) and val_extra (optional)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "train.npy").is_file() or not (folder / "val.npy").is_file():
            raise ValueError(f"{folder} has no train.npy / val.npy: build the corpus first (python scripts/build_corpus.py "
                             "or `csp corpus --out DIR`)")
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
        self.train = np.load(folder / "train.npy")
        self.val = np.load(folder / "val.npy")
        extra = folder / "val_extra.npy"
        self.val_extra = np.load(extra) if extra.is_file() else None

    def batch(self, gen: torch.Generator, batch_size: int, block_size: int) -> torch.Tensor:
        """(batch_size, block_size + 1) random windows of the training tokens."""
        if len(self.train) <= block_size + 1:
            raise ValueError(f"the training split has {len(self.train)} tokens, fewer than one window of {block_size + 1}")
        starts = torch.randint(0, len(self.train) - block_size - 1, (batch_size,), generator=gen).numpy()
        return torch.from_numpy(self.train[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))


def val_windows(tokens: np.ndarray, block_size: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping (block_size + 1)-token windows of held-out tokens, evenly spread if `limit`."""
    n = (len(tokens) - 1) // block_size
    if n < 1:
        raise ValueError(f"{len(tokens)} held-out tokens are fewer than one window of {block_size + 1}")
    starts = np.arange(n) * block_size
    if limit is not None and limit < n:
        starts = starts[np.linspace(0, n - 1, limit).round().astype(np.int64)]
    return torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))


@torch.no_grad()
def lm_loss(model, windows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss (nats/token) on (n, T + 1) windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for w in windows.split(batch_size):
        w = w.to(model.device)
        out = model(w[:, :-1], targets=w[:, 1:], use_cache=False)
        total += float(out.loss) * w[:, 1:].numel()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


# ---- weight sparsity -----------------------------------------------------------------------


def sparse_targets(model: CSPForCausalLM, density: float, bigram_density: float) -> dict[str, tuple[torch.nn.Parameter, float]]:
    """name -> (parameter, target density) for every tensor the top-k projection applies to."""
    out = {}
    for name, p in model.named_parameters():
        if name == "bigram_table":
            out[name] = (p, bigram_density)
        elif p.ndim == 2:  # wte, wpe, lm_head, c_attn, attn c_proj, c_fc, mlp c_proj
            out[name] = (p, density)
    return out


def annealed(target: float, step: int, anneal_steps: int, shape: str = "linear") -> float:
    """Kept fraction after `step` optimizer steps, from 1.0 to `target` over `anneal_steps`.

    `linear` (the paper's schedule) lowers the fraction by the same amount every step;
    `geometric` by the same factor, so the last steps prune as gently as the first."""
    if anneal_steps <= 0:
        return target
    t = min(1.0, step / anneal_steps)
    if shape == "geometric":
        return target**t
    return 1.0 - (1.0 - target) * t


EXACT_TOPK_MAX_NUMEL = 1 << 20  # larger tensors (the bigram table) use a sampled threshold while training
SAMPLE_STRIDE = 61  # coprime with the power-of-two row lengths, so the sample covers every column


@torch.no_grad()
def project_topk(p: torch.Tensor, density: float, exact: bool = True) -> None:
    """Keep the k = ceil(density * numel) largest-magnitude entries of `p`, zero the rest.

    Exact (ties broken by index) for tensors up to EXACT_TOPK_MAX_NUMEL entries or when `exact`; otherwise the
    threshold is the matching quantile of every 61st entry (k kept up to a few percent, a few ms instead of
    ~0.2 s for a 4M-entry bigram table). The final projection after training is always exact."""
    n = p.numel()
    k = max(1, math.ceil(density * n - 1e-9))
    if k >= n:
        return
    flat = p.view(-1)
    mag = flat.abs()
    if not exact and n > EXACT_TOPK_MAX_NUMEL:
        sample = mag[::SAMPLE_STRIDE]
        rank = min(len(sample), max(1, round(k / n * len(sample))))
        threshold = sample.kthvalue(len(sample) - rank + 1).values
        flat.mul_(mag >= threshold)
        return
    threshold = mag.kthvalue(n - k + 1).values  # the k-th largest magnitude
    keep = mag > threshold
    missing = k - int(keep.sum())
    if missing > 0:  # ties at the threshold: keep the first ones in index order
        ties = (mag == threshold).nonzero().flatten()[:missing]
        keep[ties] = True
    flat.mul_(keep)


def weight_densities(targets: dict) -> tuple[float, dict[str, float]]:
    """(density over all weight matrices but the bigram table, {name: density})."""
    per = {name: int(p.count_nonzero()) / p.numel() for name, (p, _) in targets.items()}
    mats = [n for n in targets if n != "bigram_table"]
    total = sum(per[n] * targets[n][0].numel() for n in mats) / sum(targets[n][0].numel() for n in mats)
    return total, per


def lr_at(step: int, total: int, lr: float, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `final_frac * lr` at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ---- the loop ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: CSPForCausalLM
    record: dict  # training_curve.json: config, data, final numbers, curve
    finished: bool  # False when stopped at max_minutes (resume to finish)


def _optimizer(model: CSPForCausalLM, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and n != "bigram_table"]
    no_decay = [p for n, p in model.named_parameters() if p.ndim != 2 or n == "bigram_table"]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
    )


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint (weights-only pickle: tensors, numbers, strings, lists and dicts)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable training checkpoint ({type(exc).__name__}: {exc})") from None


def _init_weights(model: CSPForCausalLM, init: Path) -> dict:
    """Loads a finished run's weights (its folder's checkpoint.pt) or a trained model folder's (model.safetensors,
    e.g. the shipped default model) into `model`; returns that run's record, without which the card could not
    tell the stages apart."""
    if not (init / CURVE).is_file():
        raise ValueError(f"--init-from {init}: no {CURVE}; give a training run folder or a model folder saved by csp train")
    previous = json.loads((init / CURVE).read_text())
    if not previous.get("final"):
        raise ValueError(f"--init-from {init}: that run has not finished")
    if (init / CHECKPOINT).is_file():
        state = load_checkpoint(init / CHECKPOINT)["model"]
    elif (init / "config.json").is_file():
        trained = CSPForCausalLM.from_pretrained(init, dtype=torch.float32)
        arch = ("n_layer", "d_model", "n_head", "d_head", "d_mlp", "vocab_size", "block_size")
        other = {a: (getattr(trained.config, a), getattr(model.config, a)) for a in arch
                 if getattr(trained.config, a) != getattr(model.config, a)}
        if other:
            raise ValueError(f"--init-from {init}: its architecture differs {other} (there, here); pass the same "
                             "--n-layer/--d-model/... as that model")
        state = trained.state_dict()
    else:
        raise ValueError(f"--init-from {init}: neither a training run ({CHECKPOINT}) nor a model folder (config.json)")
    model.load_state_dict(state)
    return previous


def task_probe(tokenizer, tasks, n: int = DEFAULT_N_EXAMPLES, seed: int = DEFAULT_DATA_SEED,
               max_len: int | None = None):
    """A function model -> {task: accuracy} on the tasks' *train* splits (`make_task_dataset(n, seed)`), for
    watching (and choosing) checkpoints by the tasks without looking at the test splits circuits report on."""
    from ..circuits.evaluation import evaluate
    from ..circuits.tasks import make_task_dataset

    splits = {name: make_task_dataset(name, tokenizer, n=n, seed=seed, max_len=max_len).train for name in tasks}

    @torch.no_grad()
    def probe(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        accuracy = {name: round(evaluate(model, batch.to(device))[1], 4) for name, batch in splits.items()}
        model.train(was_training)
        return accuracy

    return probe


def _save_checkpoint(path: Path, model, optimizer, gen, step: int, curve: list, window: list, elapsed: float,
                     config: TrainConfig, environment: dict) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
             "step": step, "curve": curve, "window_losses": window, "elapsed_s": elapsed, "config": asdict(config),
             "environment": environment}
    with atomic_open(path) as f:
        torch.save(state, f)


def train(config: TrainConfig, data: TokenData | str | Path, out: str | Path, resume: bool = True,
          progress: bool = True, accelerator=None, probe=None, snapshots: bool = False) -> TrainResult:
    """Trains (or resumes) a run in `out`; returns the unwrapped model, its record and whether it finished.

    `out` gets checkpoint.pt (the resume point, kept after the end: a rerun then only re-saves), training_curve.json
    and loss_curve.svg. A checkpoint of another config is an error rather than a silent restart. `probe`
    (e.g. `task_probe`) is called on the model at every evaluation and its result goes into the curve row as
    `tasks`; `snapshots` keeps the weights of every checkpoint as `snapshots/step_N.safetensors`."""
    from accelerate import Accelerator

    data = data if isinstance(data, TokenData) else TokenData(data)
    out = Path(out)
    acc = accelerator or Accelerator()
    main = acc.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        remove_orphan_temps(out)  # checkpoint.tmp<pid> of a killed run
    torch.manual_seed(config.seed)
    model = CSPForCausalLM(config.model_config())
    if int(data.train.max(initial=0)) >= model.config.vocab_size:
        raise ValueError(f"corpus token ids go up to {int(data.train.max())}, beyond the model's vocabulary {model.config.vocab_size}")
    optimizer = _optimizer(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    step, curve, window, elapsed0 = 0, [], [], 0.0
    ckpt_path = out / CHECKPOINT
    environment = {"torch": str(torch.__version__), "threads": torch.get_num_threads(), "processes": acc.num_processes,
                   "device": str(acc.device)}
    previous = None
    if config.init_from:
        previous = _init_weights(model, Path(config.init_from))
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(ckpt["config"])
        changed = {k: (v, getattr(config, k)) for k, v in asdict(saved).items()
                   if v != getattr(config, k) and k != "max_minutes"}
        if changed:
            raise ValueError(f"{ckpt_path} was trained with other settings {changed} (saved, asked); "
                             "use another --out or --no-resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        step, curve, window, elapsed0 = ckpt["step"], ckpt["curve"], ckpt["window_losses"], ckpt["elapsed_s"]
        environment = ckpt.get("environment") or environment  # where it trained, not where a rerun re-saves
    model.train()
    targets = sparse_targets(model, config.density, config.bigram_density)
    wrapped, optimizer = acc.prepare(model, optimizer)
    unwrapped = acc.unwrap_model(wrapped)

    B, T = config.batch_size, model.config.block_size
    n_proc, rank = acc.num_processes, acc.process_index
    if B % n_proc:
        raise ValueError(f"batch_size {B} is not divisible by the {n_proc} processes")
    per = B // n_proc
    eval_windows = val_windows(data.val, T, config.eval_windows)
    anneal_steps = round(config.anneal_frac * config.steps)
    warmup = max(1, round(config.warmup_frac * config.steps))
    t0 = time.time()
    finished = step >= config.steps
    bar = tqdm(total=config.steps, initial=step, desc="train", mininterval=2.0, disable=not (progress and main),
               dynamic_ncols=True)
    while step < config.steps:
        batch = data.batch(gen, B, T)[rank * per : (rank + 1) * per].to(acc.device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.steps, config.lr, warmup)
        loss = wrapped(batch[:, :-1], targets=batch[:, 1:], use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        for p, target in targets.values():
            project_topk(p, annealed(target, step, anneal_steps, config.anneal_shape), exact=False)
        window.append(float(acc.reduce(loss.detach(), "mean")))
        bar.update()

        elapsed = elapsed0 + time.time() - t0
        out_of_time = False
        if config.max_minutes is not None:  # every process stops at the same step (their clocks differ)
            late = torch.tensor([float(time.time() - t0 > 60 * config.max_minutes)], device=acc.device)
            out_of_time = bool(acc.reduce(late, "sum").item() > 0)
        finished = step >= config.steps
        if step % config.eval_every == 0 or finished or out_of_time:
            density, per_matrix = weight_densities(targets)
            row = {
                "step": step, "tokens": step * B * T, "train_loss": sum(window) / len(window),
                "val_loss": lm_loss(unwrapped, eval_windows) if main else None, "density": density,
                "bigram_density": per_matrix.get("bigram_table"),
                "target_density": annealed(config.density, step, anneal_steps, config.anneal_shape),
                "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1),
            }
            if probe is not None and main:
                row["tasks"] = probe(unwrapped)
            curve.append(row)
            window = []
            bar.set_postfix(train=f"{row['train_loss']:.3f}", val=f"{row['val_loss'] or 0:.3f}", dens=f"{density:.3f}")
            if main and not (progress and sys.stderr.isatty()):
                print(dumps_strict(row), flush=True)
        if main and (step % config.checkpoint_every == 0 or finished or out_of_time):
            _save_checkpoint(ckpt_path, unwrapped, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                             gen, step, curve, window, elapsed, config, environment)
            write_curve_svg(curve, out / "loss_curve.svg")
            if snapshots:
                from safetensors.torch import save_file

                weights = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
                for name, (_, target) in targets.items():  # exact, as the final model would be
                    project_topk(weights[name], annealed(target, step, anneal_steps, config.anneal_shape))
                (out / "snapshots").mkdir(exist_ok=True)
                with atomic_path(out / "snapshots" / f"step_{step}.safetensors") as tmp:
                    save_file(weights, tmp)
        if out_of_time and not finished:
            break
    bar.close()
    acc.wait_for_everyone()
    unwrapped.eval()
    record = {
        "description": "Training curve of a weight-sparse model (modeling_csp.training).",
        "config": asdict(config),
        "model_config": {**BASE_MODEL_CONFIG, **{f: getattr(config, f) for f in ("n_layer", "d_model", "n_head", "d_head", "d_mlp")}},
        "data": {"folder": str(data.folder), "train_tokens": int(len(data.train)), "val_tokens": int(len(data.val)),
                 "val_extra_tokens": int(len(data.val_extra)) if data.val_extra is not None else 0,
                 "corpus_key": data.meta.get("key")},
        "environment": environment,
        "curve": curve,
        "final": None,
    }
    if previous is not None:  # the stage(s) before, with their curves: the plots show the whole training
        record["previous"] = previous
    if finished and main:
        for p, target in targets.values():
            project_topk(p, target)  # exact, at the target density (a no-op when the anneal finished)
        record["final"] = _final_numbers(unwrapped, targets, data, curve[-1], previous)
    if main:
        write_json_atomic(out / CURVE, record, indent=1)
        remove_orphan_temps(out)  # what killed runs before this one left
    return TrainResult(unwrapped, record, finished)


def _final_numbers(model: CSPForCausalLM, targets: dict, data: TokenData, row: dict, previous: dict | None) -> dict:
    """record["final"]: held-out losses on all the val windows, density, and the totals over the stages."""
    T = model.config.block_size
    density, per_matrix = weight_densities(targets)
    final = {
        "val_loss": lm_loss(model, val_windows(data.val, T)),
        "val_extra_loss": lm_loss(model, val_windows(data.val_extra, T)) if data.val_extra is not None else None,
        "train_loss": row["train_loss"], "density": density, "density_per_matrix": per_matrix,
        "steps": row["step"], "tokens": row["tokens"], "train_seconds": round(row["elapsed_s"], 1),
    }
    before = (previous or {}).get("final") or {}
    final["total_tokens"] = final["tokens"] + before.get("total_tokens", before.get("tokens", 0))
    final["total_train_seconds"] = round(
        final["train_seconds"] + before.get("total_train_seconds", before.get("train_seconds", 0)), 1)
    return final


def best_probed_step(record: dict, threshold: float = 0.9) -> int | None:
    """The evaluated step whose probed tasks (`task_probe`, train splits) reach `threshold` most often; ties go
    to the lower held-out loss. None when the run had no probe."""
    rows = [r for r in record.get("curve", []) if r.get("tasks")]
    if not rows:
        return None
    best = max(rows, key=lambda r: (sum(a >= threshold for a in r["tasks"].values()), -(r.get("val_loss") or math.inf)))
    return best["step"]


def result_at_snapshot(run_dir: str | Path, step: int, data: TokenData | str | Path) -> TrainResult:
    """A finished run's model with the weights of its snapshot at `step` (`train(snapshots=True)`), e.g. the one
    `best_probed_step` chose: the record's curve stops there and its final numbers are recomputed."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    data = data if isinstance(data, TokenData) else TokenData(data)
    record = json.loads((run_dir / CURVE).read_text())
    if not record.get("final"):
        raise ValueError(f"{run_dir}: the run has not finished; resume it first")
    path = run_dir / "snapshots" / f"step_{step}.safetensors"
    rows = [r for r in record["curve"] if r["step"] == step]
    if not path.is_file() or not rows:
        have = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "snapshots").glob("step_*.safetensors"))
        raise ValueError(f"{run_dir}: no snapshot of step {step} (snapshots: {have or 'none, train with snapshots=True'})")
    config = TrainConfig.from_dict(record["config"])
    model = CSPForCausalLM(config.model_config())
    model.load_state_dict(load_file(path))  # saved exactly projected, as a finished model is
    targets = sparse_targets(model, config.density, config.bigram_density)
    model.eval()
    record = {**record, "curve": [r for r in record["curve"] if r["step"] <= step], "selected_step": step}
    record["final"] = _final_numbers(model, targets, data, rows[0], record.get("previous"))
    return TrainResult(model, record, True)


def write_curve_svg(curve: list[dict], path: Path, width: int = 640, height: int = 360) -> None:
    """The loss curve (train and val loss against tokens) as a small dependency-free SVG."""
    rows = [r for r in curve if r.get("train_loss") is not None]
    if not rows:
        return
    xs = [r["tokens"] for r in rows]
    series = {"train": [r["train_loss"] for r in rows], "val": [r.get("val_loss") for r in rows]}
    ys = [y for s in series.values() for y in s if y is not None]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1
    pad = 48

    def px(x, y):
        fx = pad + (width - 2 * pad) * (x - xs[0]) / max(1, xs[-1] - xs[0])
        fy = height - pad - (height - 2 * pad) * (y - lo) / (hi - lo)
        return f"{fx:.1f},{fy:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{pad}" y="20">loss (nats/token) against training tokens: {xs[-1]:,} tokens, '
             f'train {series["train"][-1]:.3f}, val {(series["val"][-1] or float("nan")):.3f}</text>',
             f'<text x="4" y="{pad}">{hi:.2f}</text><text x="4" y="{height - pad}">{lo:.2f}</text>']
    for name, color in (("train", "#1f77b4"), ("val", "#d62728")):
        pts = " ".join(px(x, y) for x, y in zip(xs, series[name]) if y is not None)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"><title>{name}</title></polyline>')
    parts.append("</svg>")
    write_text_atomic(path, "\n".join(parts) + "\n")


def training_stages(record: dict) -> list[dict]:
    """The records of a run and of the runs it continued (`--init-from`), first stage first."""
    stages = []
    while record:
        stages.insert(0, record)
        record = record.get("previous")
    return stages


def stages_curve(record: dict) -> list[dict]:
    """The curve rows of every stage that kept its curve, in order, each with `stage` (1-based) and `tokens`
    counted from the start of the first stage."""
    rows, offset = [], 0
    for i, s in enumerate(training_stages(record), 1):
        for row in s.get("curve") or []:
            rows.append({**row, "stage": i, **({"tokens": offset + row["tokens"]} if "tokens" in row else {})})
        offset += ((s.get("final") or {}).get("tokens") or (s.get("curve") or [{}])[-1].get("tokens", 0))
    return rows


def training_card(record: dict, corpus_meta: dict | None = None) -> str:
    """The model card's training section: recipe, data (sources and licences), held-out losses."""
    from ..data.corpus import sources_table

    f, env = record["final"], record["environment"]
    stages = training_stages(record)

    def stage(s: dict) -> str:
        c, sf = s["config"], s["final"]
        anneal = (f"the kept fraction annealed ({c['anneal_shape']}) from 1.0 to {c['density']} over the first "
                  f"{c['anneal_frac']:.0%} of the stage" if c["anneal_frac"] > 0 else f"the density held at {c['density']}")
        chosen = (f" (the snapshot after {s['selected_step']:,} of {c['steps']:,} steps, chosen by the task probe on "
                  "the tasks' train splits)" if s.get("selected_step") else "")
        return (f"{sf['tokens']:,} tokens in {sf['steps']:,} steps of {c['batch_size']}x{s['model_config']['block_size']} "
                f"tokens ({sf['train_seconds'] / 60:.0f} minutes){chosen}, {anneal} (bigram table {c['bigram_density']}), "
                f"lr {c['lr']} with warmup and cosine decay, weight decay {c['weight_decay']}")

    text = (
        "\n## Training\n\n"
        "Trained from scratch by `modeling_csp.training` (`csp train`, `scripts/train_default_model.py`) on "
        f"{env['processes']} process(es) x {env['threads']} thread(s) ({env['device']}): "
        + "; then, continued from those weights with a new optimizer, ".join(stage(s) for s in stages)
        + f". {f.get('total_tokens', f['tokens']):,} tokens in {f.get('total_train_seconds', f['train_seconds']) / 60:.0f} "
        "minutes in all. After every AdamW step each weight matrix keeps only its top-k entries by magnitude.\n\n"
        f"Held-out loss: **{f['val_loss']:.3f}** nats/token on the standard library's held-out 10% of files"
        + (f", {f['val_extra_loss']:.3f} on the projects' held-out files" if f.get("val_extra_loss") is not None else "")
        + f" (train {f['train_loss']:.3f}). The curve is in `training_curve.json` and `loss_curve.svg`.\n"
    )
    if corpus_meta:
        t = corpus_meta["tokens"]
        text += (
            f"\n### Data\n\nThe `*.py` files of CPython {corpus_meta['python']}'s standard library (test directories "
            "excluded) and of pinned releases of permissively licensed pure-Python projects (wheels from PyPI, "
            "checked by sha256; vendored copies skipped), deduplicated, split by file "
            f"(`modeling_csp/data/corpus.py`): {t['train']:,} training tokens, {t['val']:,} + {t.get('val_extra', 0):,} "
            "held out. Every source keeps its own licence; the model's weights are derived from them.\n\n"
            + sources_table(corpus_meta) + "\n"
        )
    return text


def save_trained_model(result: TrainResult, out: str | Path, tokenizer_dir: str | Path, corpus_meta: dict | None = None,
                       name: str = "csp-python-default") -> Path:
    """Writes the model folder with the project's `save_model_folder` (sparse safetensors, remote code,
    tokenizer, card with the training section) plus training_curve.json and loss_curve.svg."""
    from ..model.saving import save_model_folder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as held:
        # The tokenizer may live in `out` itself (retraining the default model in place): keep a copy first.
        for f in Path(tokenizer_dir).glob("*.json"):
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, held)
        # Replace the model's own files (no stale shard survives); anything else (circuits/) stays.
        for pattern in ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                        "configuration_csp.py", "modeling_csp.py", "tokenizer*.json", "special_tokens_map.json",
                        "README.md", CURVE, "loss_curve.svg"):
            for f in out.glob(pattern):
                f.unlink()
        save_model_folder(result.model, out, tokenizer_json_dir=held, name=name,
                          source="trained by modeling_csp.training", card_extra=training_card(result.record, corpus_meta))
    record = dict(result.record)
    if corpus_meta:  # what the model was trained on, without the long list of held-out files
        record["corpus"] = {k: v for k, v in corpus_meta.items() if k != "val_files"}
    write_json_atomic(out / CURVE, record, indent=1)
    write_curve_svg(stages_curve(result.record), out / "loss_curve.svg")
    return out


__all__ = ["TrainConfig", "TokenData", "TrainResult", "train", "save_trained_model", "project_topk", "annealed",
           "sparse_targets", "training_stages", "stages_curve", "task_probe",
           "best_probed_step", "result_at_snapshot", "lr_at", "val_windows", "lm_loss", "write_curve_svg", "BASE_MODEL_CONFIG"]
