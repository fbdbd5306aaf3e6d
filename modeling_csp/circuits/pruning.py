"""Finding circuits by pruning nodes (Gao et al. 2025, appendix A.5).

Every node location gets one learnable mask logit per channel, tau. The forward pass keeps a node when
tau > 0 (a Heaviside step) and replaces an ablated node by its mean (or zero); the backward pass uses the
derivative of sigmoid(tau / temperature) as a surrogate gradient (straight-through). The model is frozen; Adam
trains only tau, on

    task loss (binary cross-entropy over the two candidates) + lambda * (number of kept nodes)

with tau clamped to [-1, 1] after every step (so any node can come back). Training only ranks the nodes:
afterwards nodes are ordered by tau and `prune_to_target_loss` bisects over k for the smallest top-k circuit
whose task loss reaches the target (`DEFAULT_TARGET_LOSS` unless set). Faithfulness is then measured on held-out
examples: full model, circuit, random circuits of the same size per location, and the complement; the verdict (target
reached, below chance, better than the full model, meaningful next to its control) is judged on those held-out
numbers by `evaluation.circuit_verdict` and stored in the file (`meta.verdict`).

    result = prune(model, tokenizer, "single_double_quote", PruneConfig(steps=300),
                   progress=lambda fraction, desc: print(f"{fraction:.0%} {desc}"))  # "mask training: step 40 of 300"
    result.circuit.save("circuit.json")

A control guards against circuits for tasks the model does not solve: `PruneConfig(control="shuffled")` also
prunes the same examples with correct and incorrect swapped at random per example (`shuffled_labels`), where no
model can do better than chance except by fitting noise, and records in each circuit (`circuit.control`) the
control's best loss at the circuit's size and the size the control needs to reach the same target (or None).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..utils.devices import input_device
from .ablation import (
    Masks, ablate, compute_mean_activations, example_windows, frozen_norm_scales, task_logits, unchanged_weights,
)
from .evaluation import (
    DEFAULT_N_RANDOM, DEFAULT_RANDOM_MARGIN, CircuitVerdict, EvalOptions, TargetAtChance, check_target,
    circuit_losses, circuit_verdict, evaluate, layer_ablation_deltas, node_attributions, node_importances, task_loss,
    verdict_of,
)
from .graph import CircuitGraph, attach_node_data, location_width, n_total_nodes, node_locations
from .tasks import DEFAULT_CHUNK_TOKENS, DEFAULT_DATA_SEED, DEFAULT_N_EXAMPLES, TaskBatch, TaskExample, get_task, make_task_dataset

Progress = Callable[[float, str], None]  # (fraction of the whole prune done, what runs now with its counts)


CONTROLS = (None, "shuffled")
# Exact importances cost (circuit nodes) x (held-out tokens) x (the model's nodes, the width its passes carry);
# above this budget (the default model's 128-node circuits, about 10 s on 2 CPU cores) attributions are used.
EXACT_IMPORTANCE_BUDGET = 4e9
DEFAULT_TARGET_LOSS = 0.15  # task loss (nats) a circuit must reach: well below chance (ln 2 = 0.693)


@dataclass
class PruneConfig:
    """Options of `prune` (all recorded in the circuit file's meta.options)."""

    ablation: str = "mean"  # "mean" or "zero"
    # task loss (nats) the circuit must reach (k: on training examples; verdict: held out)
    target_loss: float = DEFAULT_TARGET_LOSS
    # when set, the target is max(target_loss, the full model's loss on the training examples + this): a model
    # that is itself above the target still gets a circuit "as good as the model, up to this margin"
    target_above_full: float | None = None
    k: int | None = None  # keep exactly the top-k nodes instead of searching for the target
    steps: int = 200
    lr: float = 1e-2
    lam: float = 1e-3  # loss cost of one kept node
    batch_size: int = 32
    temperature: float = 1.0  # of the sigmoid surrogate gradient
    init: float = 0.1  # initial tau (all nodes kept), plus init_noise * N(0, 1)
    init_noise: float = 0.01
    seed: int = 0
    freeze_norm_scales: bool = False  # norms use the unablated model's 1/rms (see ablation.frozen_norm_scales)
    n_examples: int = DEFAULT_N_EXAMPLES  # task examples, 75% train / 25% test
    data_seed: int = DEFAULT_DATA_SEED
    n_random: int = DEFAULT_N_RANDOM  # random circuits averaged for the baseline
    random_margin: float = DEFAULT_RANDOM_MARGIN
    n_mean_tokens: int = 32768
    # node importances of the circuit: exact (each node ablated in turn, `nodes_per_pass` per forward pass) for
    # circuits of at most this many nodes whose passes fit EXACT_IMPORTANCE_BUDGET; else gradient attributions
    max_exact_importances: int = 128
    nodes_per_pass: int = 16
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # padded tokens per pass, rows grouped by length (0: whole batches)
    n_example_tokens: int = 8192  # held-out text for each node's quantile examples in the file (0: none)
    control: str | None = None  # "shuffled": also prune the task with answers swapped at random (see run_control)
    progress: bool = True

    def __post_init__(self):
        def number(name, low, low_ok=True, integer=False, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            kind = "an integer" if integer else "a finite number"
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
                raise ValueError(f"{name} must be {kind}, not {value!r}")
            if not math.isfinite(value) or value < low or (value == low and not low_ok):
                raise ValueError(f"{name} must be {kind} {'>=' if low_ok else '>'} {low}, got {value}")

        if self.ablation not in ("mean", "zero"):
            raise ValueError(f"ablation must be 'mean' or 'zero', not {self.ablation!r}")
        number("target_loss", 0, low_ok=False)  # a loss is positive: 0, negative or NaN can never be reached
        number("target_above_full", 0, optional=True)
        number("k", 1, integer=True, optional=True)  # at most the model's node count: checked by `prune`'s caller
        for name in ("steps", "seed", "data_seed", "n_example_tokens", "max_exact_importances", "chunk_tokens"):
            number(name, 0, integer=True)
        for name in ("batch_size", "n_examples", "n_random", "n_mean_tokens", "nodes_per_pass"):
            number(name, 1, integer=True)
        for name in ("lr", "temperature"):
            number(name, 0, low_ok=False)
        for name in ("lam", "random_margin", "init_noise"):
            number(name, 0)
        number("init", -1e9)  # any finite tau
        if self.control not in CONTROLS:
            raise ValueError(f"control must be one of {', '.join(map(str, CONTROLS))}, not {self.control!r}")
        check_target(self.target_loss, "the target loss")


# ---- masks ---------------------------------------------------------------------------------


class _HeavisideSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tau, temperature):
        ctx.save_for_backward(tau)
        ctx.temperature = temperature
        return (tau > 0).to(tau.dtype)

    @staticmethod
    def backward(ctx, grad):
        (tau,) = ctx.saved_tensors
        s = torch.sigmoid(tau / ctx.temperature)
        return grad * s * (1 - s) / ctx.temperature, None


def heaviside_ste(tau: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exactly 1 where tau > 0 else 0, with the gradient of sigmoid(tau / temperature) (straight-through)."""
    return _HeavisideSTE.apply(tau, temperature)


class NodeMasks(torch.nn.Module):
    """One mask logit tau per node at every node location of a model."""

    def __init__(self, config, init: float = 0.1, init_noise: float = 0.01, generator: torch.Generator | None = None):
        super().__init__()
        self.locations = node_locations(config)
        self.tau = torch.nn.ParameterList(
            torch.nn.Parameter(init + init_noise * torch.randn(location_width(config, loc), generator=generator))
            for loc in self.locations
        )

    def forward(self, temperature: float = 1.0) -> Masks:
        return {loc: heaviside_ste(t, temperature) for loc, t in zip(self.locations, self.tau)}

    def scores(self) -> Masks:
        return {loc: t.detach().clone() for loc, t in zip(self.locations, self.tau)}

    def n_kept(self) -> int:
        return sum(int((t > 0).sum()) for t in self.tau)

    @torch.no_grad()
    def clamp_(self):
        for t in self.tau:
            t.clamp_(-1.0, 1.0)


@unchanged_weights
def train_masks(model, batch: TaskBatch, means: Masks | None, config: PruneConfig,
                report: Callable[[int, int], None] | None = None) -> tuple[Masks, list[list]]:
    """Learns node scores (tau) for a task; returns them and the curve [[step, task loss, n_kept]].
    `report(steps done, steps)` after every step."""
    gen = torch.Generator().manual_seed(config.seed)  # CPU generator: the same masks and batches on any device
    device = input_device(model)
    masks = NodeMasks(model.config, config.init, config.init_noise, gen).to(device)
    batch = batch.to(device)
    opt = torch.optim.Adam(masks.parameters(), lr=config.lr)
    curve = []
    n = len(batch)
    bar = tqdm(range(config.steps), desc="pruning", disable=not config.progress, leave=False)
    for step in bar:
        idx = torch.randperm(n, generator=gen)[: config.batch_size] if config.batch_size < n else torch.arange(n)
        sub = batch.rows(idx)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for chunk in sub.by_length(config.chunk_tokens):  # the minibatch's loss and gradient, in less padding
            with frozen_norm_scales(model, chunk) if config.freeze_norm_scales else contextlib.nullcontext():
                keep = masks(config.temperature)
                with ablate(model, keep, means):
                    part = task_loss(task_logits(model, chunk), chunk) * (len(chunk) / len(sub))
            part.backward(inputs=list(masks.parameters()))  # the model's weights stay untouched
            loss += part.detach()
        keep = masks(config.temperature)
        n_kept = sum(m.sum() for m in keep.values())  # value: count of kept nodes; gradient: sigmoid'
        (config.lam * n_kept).backward(inputs=list(masks.parameters()))
        opt.step()
        masks.clamp_()
        curve.append([step, round(loss.item(), 6), int(n_kept.item())])
        if step % 10 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", kept=int(n_kept.item()), refresh=False)
        if report is not None:
            report(step + 1, config.steps)
    return masks.scores(), curve


# ---- from scores to circuits ---------------------------------------------------------------


def importance_method(config: PruneConfig, model_config, k: int, batch: TaskBatch) -> str:
    """"exact" where ablating each of the k nodes in turn over `batch` fits the budget, else "attribution"."""
    cost = k * int(batch.attention_mask.sum()) * n_total_nodes(model_config)
    return "exact" if k <= config.max_exact_importances and cost <= EXACT_IMPORTANCE_BUDGET else "attribution"


def top_k_masks(scores: Masks, k: int) -> Masks:
    """Bool masks keeping the k nodes with the highest scores over all locations (ties: forward order)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[: max(0, min(k, flat.numel()))]] = True
    return dict(zip(scores, keep.split([s.numel() for s in scores.values()])))


@unchanged_weights
def sweep_k(model, batch: TaskBatch, scores: Masks, means: Masks | None, ks, freeze_norm_scales: bool = False) -> list[list]:
    """The faithfulness curve [[k, task loss, accuracy]] of top-k circuits."""
    return [[int(k), *evaluate(model, batch, top_k_masks(scores, int(k)), means, freeze_norm_scales)] for k in ks]


@unchanged_weights
def prune_to_target_loss(model, batch: TaskBatch, scores: Masks, means: Masks | None,
                         target_loss: float = DEFAULT_TARGET_LOSS, freeze_norm_scales: bool = False,
                         report: Callable[[int, int, int], None] | None = None,
                         chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> tuple[int, float, bool]:
    """Smallest k >= 1 whose top-k circuit has task loss <= target, by bisection over k.

    The upper end is the trained circuit (nodes with score > 0) if it reaches the target, else all nodes:
    a pruned circuit is often *better* than the full model, so the full model missing the target does not
    mean no circuit reaches it. Bisection assumes the loss falls with k below that end. Returns
    (k, its loss, reached); when neither end reaches the target, the better end with reached=False.
    `report(probe, most probes, k)` before each evaluation."""
    trained = max(1, sum(int((s > 0).sum()) for s in scores.values()))
    total = sum(s.numel() for s in scores.values())
    probes = [0]
    most = len({trained, total}) + math.ceil(math.log2(max(total, 2)))

    def loss_at(k):
        probes[0] += 1
        if report is not None:
            report(probes[0], most, k)
        return evaluate(model, batch, top_k_masks(scores, k), means, freeze_norm_scales, chunk_tokens)[0]

    ends = []  # the trained circuit, and all nodes only when it misses
    for k in dict.fromkeys((trained, total)):
        ends.append((k, loss_at(k)))
        if ends[-1][1] <= target_loss:
            break
    hi, hi_loss = ends[-1]
    if hi_loss > target_loss:
        k, loss = min(ends, key=lambda e: e[1])
        return k, loss, False
    lo = 0  # invariant: loss_at(lo) > target (the empty circuit is no circuit), loss_at(hi) <= target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_loss = loss_at(mid)
        if mid_loss <= target_loss:
            hi, hi_loss = mid, mid_loss
        else:
            lo = mid
    return hi, hi_loss, True


# ---- controls ------------------------------------------------------------------------------


def shuffled_labels(batch: TaskBatch, seed: int = 0) -> TaskBatch:
    """The batch with correct and alternative swapped, independently for each example with probability 1/2
    (CPU generator, so the same swaps on any device): labels that say nothing about the prompts."""
    swap = torch.rand(len(batch), generator=torch.Generator().manual_seed(seed)) < 0.5
    on = swap.to(batch.correct_ids.device)
    examples = [TaskExample(ex.prompt, ex.alternative, ex.correct) if s else ex
                for ex, s in zip(batch.examples, swap.tolist())] if batch.examples else []
    return replace(batch, correct_ids=torch.where(on, batch.alternative_ids, batch.correct_ids),
                   alternative_ids=torch.where(on, batch.correct_ids, batch.alternative_ids), examples=examples)


@dataclass
class ControlRun:
    """A control's trained masks, with what `record` needs to describe it at any circuit size."""

    kind: str
    seed: int
    train: TaskBatch
    test: TaskBatch
    scores: Masks
    means: Masks | None
    target_loss: float
    k_to_target: int | None  # smallest top-k reaching the target on the control's training examples; None: none does
    loss_at_k_to_target: float  # at k_to_target, or the best of the trained circuit and all nodes when not reached
    full_loss: float  # the unablated model on the control's training labels (about log 2 or worse)
    swapped_fraction: float
    freeze_norm_scales: bool = False
    seconds: float = 0.0

    def record(self, model, k: int) -> dict[str, Any]:
        """The circuit file's `control` object for a circuit of k nodes (docs/circuit_format.md)."""
        keep = top_k_masks(self.scores, k)
        loss, acc = evaluate(model, self.train, keep, self.means, self.freeze_norm_scales)
        test_loss, test_acc = evaluate(model, self.test, keep, self.means, self.freeze_norm_scales)
        return {
            "kind": self.kind, "seed": self.seed, "k": int(k), "loss_at_k": loss, "accuracy_at_k": acc,
            "test_loss_at_k": test_loss, "test_accuracy_at_k": test_acc, "target_loss": self.target_loss,
            "k_to_target": self.k_to_target, "loss_at_k_to_target": self.loss_at_k_to_target,
            "reached": self.k_to_target is not None, "full_loss": self.full_loss,
            "swapped_fraction": self.swapped_fraction, "n_train": len(self.train), "n_test": len(self.test),
            "n_total_nodes": sum(s.numel() for s in self.scores.values()), "seconds": round(self.seconds, 2),
        }


def run_control(model, train: TaskBatch, test: TaskBatch, means: Masks | None, config: PruneConfig,
                target_loss: float, kind: str = "shuffled", stages: "_Stages | None" = None) -> ControlRun:
    """Prunes the control task (same prompts, shuffled answers) with the same options and target as the real one;
    `stages` hears of its mask training and bisection as the "control" stages."""
    if kind != "shuffled":
        raise ValueError(f"unknown control {kind!r}; known: shuffled")
    start = time.perf_counter()
    seed = config.seed + 1_000_003  # other swaps than any data seed, the same for every task
    ctrl_train, ctrl_test = shuffled_labels(train, seed), shuffled_labels(test, seed + 1)
    stages = stages or _Stages(None, config)
    scores, _ = train_masks(model, ctrl_train, means, config, stages.training("control mask training"))
    k, loss, reached = prune_to_target_loss(model, ctrl_train, scores, means, target_loss, config.freeze_norm_scales,
                                            stages.bisection("control k bisection"), config.chunk_tokens)
    full_loss, _ = evaluate(model, ctrl_train)
    n = len(ctrl_train) + len(ctrl_test)
    swapped = sum(int((a.correct_ids != b.correct_ids).sum()) for a, b in ((ctrl_train, train), (ctrl_test, test))) / n
    return ControlRun(kind, seed, ctrl_train, ctrl_test, scores, means, target_loss, k if reached else None, loss,
                      full_loss, swapped, config.freeze_norm_scales, time.perf_counter() - start)


# ---- everything together -------------------------------------------------------------------


class _Stages:
    """The prune's progress for a `Progress` callback: each stage gets a share of [0, 1] by its rough cost (a mask
    training step is one unit; a bisection about 60, evaluating a circuit about 80) and a description that names
    it and its counts, e.g. "mask training: step 40 of 200"."""

    NAMES = ("data", "mask training", "k bisection", "control mask training", "control k bisection", "evaluation")

    def __init__(self, progress: Progress | None, config: PruneConfig, n_circuits: int = 1):
        self.progress = progress
        cost = {"data": 2, "mask training": config.steps, "k bisection": 60 if config.k is None else 1,
                "control mask training": config.steps if config.control else 0,
                "control k bisection": 60 if config.control else 0, "evaluation": 80 * n_circuits}
        total, start, self.spans = sum(cost.values()), 0.0, {}
        for name in self.NAMES:
            self.spans[name] = (start / total, (start + cost[name]) / total)
            start += cost[name]

    def __call__(self, stage: str, done: float, total: float, desc: str) -> None:
        if self.progress is not None:
            lo, hi = self.spans[stage]
            self.progress(lo + (hi - lo) * min(max(done / max(total, 1), 0.0), 1.0), desc)

    def training(self, stage: str) -> Callable[[int, int], None]:
        label = "control: mask training" if stage.startswith("control") else "mask training"
        return lambda step, steps: self(stage, step, steps, f"{label}: step {step} of {steps}")

    def bisection(self, stage: str) -> Callable[[int, int, int], None]:
        label = "control: k bisection" if stage.startswith("control") else "k bisection"
        return lambda probe, most, k: self(stage, probe - 1, most,
                                           f"{label}: probe {probe} (at most {most}), k={k:,}")


@dataclass
class PruneResult:
    circuit: CircuitGraph
    scores: Masks
    keep_masks: Masks
    train_loss: float  # the circuit's loss on the training examples, where its size was chosen
    target_reached: bool  # judged on held-out examples (verdict.passed): not only on the training ones
    seconds: float
    at_k: dict[int, CircuitGraph] = field(default_factory=dict)  # circuits of the sizes asked for with `ks`
    verdict: CircuitVerdict | None = None  # evaluation.circuit_verdict of the circuit (also in meta.verdict)
    target_reached_train: bool = False


@unchanged_weights
def prune(model, tokenizer, task, config: PruneConfig | None = None, means: Masks | None = None,
          model_name: str | None = None, cache_dir=None, ks=(), windows: torch.Tensor | None = None,
          progress: Progress | None = None) -> PruneResult:
    """Finds a circuit for a task: dataset, means, mask training, bisection on k, faithfulness and the verdict on
    held-out examples.

    `ks` adds circuits of exactly those sizes, ranked by the same trained masks, in `result.at_k`. `means` and
    `windows` (held-out text for the nodes' activating examples) are computed when not given. With
    `config.control`, every circuit also gets the control's numbers at its size (`circuit.control`).
    `progress(fraction, description)` hears of every stage in order with its counts: "data", "mask training:
    step i of N", "k bisection: probe j (at most M), k=...", "control: ..." (its own mask training and
    bisection), "evaluation: circuit i of n (k=...): ...". A target at or above chance is a ValueError
    (`evaluation.TargetAtChance`)."""
    config = config or PruneConfig()
    n_nodes = n_total_nodes(model.config)
    too_big = [k for k in ([config.k] if config.k is not None else []) + list(ks) if not 1 <= int(k) <= n_nodes]
    if too_big:
        raise ValueError(f"circuit size k={too_big[0]} is outside 1..{n_nodes}, the model's node count: a circuit "
                         "of every node is the whole model, not a circuit")
    timings, t0 = {}, time.perf_counter()
    stages = _Stages(progress, config, 1 + len(set(ks)))

    def lap(name):
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 2)

    task = get_task(task)
    model.eval()
    stages("data", 0, 1, "data: task examples and mean activations")
    data = make_task_dataset(task, tokenizer, n=config.n_examples, seed=config.data_seed, max_len=model.config.block_size)
    device = input_device(model)
    data.train, data.test = data.train.to(device), data.test.to(device)
    if config.ablation == "mean" and means is None:
        means = compute_mean_activations(model, tokenizer, n_tokens=config.n_mean_tokens, cache_dir=cache_dir)
    fill = means if config.ablation == "mean" else None
    lap("data_and_means")

    target = config.target_loss
    if config.target_above_full is not None:
        full_train = evaluate(model, data.train)[0]
        target = max(target, full_train + config.target_above_full)
        check_target(target, f"the target max({config.target_loss:g}, the full model's training loss "
                             f"{full_train:.3f} + {config.target_above_full:g}) on {task.name} =")
    scores, curve = train_masks(model, data.train, fill, config, stages.training("mask training"))
    lap("training")
    total = sum(s.numel() for s in scores.values())
    if config.k is not None:
        k = min(config.k, total)
        stages("k bisection", 0, 1, f"k bisection: none, k fixed at {k:,}")
        train_loss = evaluate(model, data.train, top_k_masks(scores, k), fill, config.freeze_norm_scales,
                              config.chunk_tokens)[0]
        reached = train_loss <= target
    else:
        k, train_loss, reached = prune_to_target_loss(model, data.train, scores, fill, target, config.freeze_norm_scales,
                                                      stages.bisection("k bisection"), config.chunk_tokens)
    lap("bisection")
    test = data.test if len(data.test) else data.train  # held out; the training split only when none is
    control = None
    if config.control:
        control = run_control(model, data.train, test, fill, config, target, config.control, stages)
        lap("control")
    options = EvalOptions.from_config(config)  # as `csp evaluate` and the app evaluate the circuit file later
    n_circuits = 1 + len({min(int(x), total) for x in ks} - {k})
    evaluated = [0]

    def evaluating(k: int, what: str, part: int):  # part 0-4 of evaluating one circuit
        stages("evaluation", evaluated[0] + part / 5, n_circuits,
               f"evaluation: circuit {evaluated[0] + 1} of {n_circuits} (k={k:,}): {what}")

    evaluating(k, "attribution baseline and held-out text", 0)
    attributions = node_attributions(model, data.train, fill, None, config.freeze_norm_scales,  # the cheap ranking to beat
                                     config.chunk_tokens)
    if windows is None and config.n_example_tokens:
        windows = example_windows(model, tokenizer, config.n_example_tokens)

    def circuit_at(k: int, train_loss: float, reached: bool) -> CircuitGraph:
        start = time.perf_counter()
        keep = top_k_masks(scores, k)
        fns = config.freeze_norm_scales
        evaluating(k, "held-out losses", 1)
        faith = circuit_losses(model, test, keep, fill, options)
        method = importance_method(config, model.config, k, test)
        evaluating(k, f"node importances ({method})", 2)
        importances = node_importances(model, test, keep, fill, fns, method=method, nodes_per_pass=config.nodes_per_pass,
                                       chunk_tokens=config.chunk_tokens)
        evaluating(k, "layer deltas and attribution baseline", 3)
        deltas = layer_ablation_deltas(model, test, keep, fill, fns)
        by_attribution = top_k_masks(attributions, k)
        attribution_loss, attribution_acc = evaluate(model, test, by_attribution, fill, fns)
        losses = {key: faith[key] for key in ("full", "circuit", "random", "complement")}
        control_record = control.record(model, k) if control is not None else None
        split = "test" if len(data.test) else "train"
        verdict = circuit_verdict(losses, target, train_loss, control_record, k, split)
        circuit = CircuitGraph.from_masks(
            model, keep, importances, model_name=model_name, task=task.name, ablation=config.ablation,
            target_loss=target, k=k, layer_deltas=deltas, losses=losses,
            pruning_curve=curve,
            meta={
                "options": {key: v for key, v in asdict(config).items() if key != "progress"},
                "train_circuit_loss": train_loss, "target_reached": bool(verdict.passed),
                "target_reached_train": bool(reached), "verdict": verdict.as_dict(), "eval_split": split,
                "n_train": len(data.train), "n_test": len(test), "importance_method": method,
                "full_accuracy": faith["full_accuracy"], "circuit_accuracy": faith["circuit_accuracy"],
                "random_losses": faith["random_losses"], "random_baseline_as_good": faith["random_baseline_as_good"],
                "attribution_baseline": {  # the top-k nodes by gradient x (mean - activation), same k
                    "circuit_loss": attribution_loss, "circuit_accuracy": attribution_acc,
                    "overlap": sum(int((keep[loc] & by_attribution[loc]).sum()) for loc in keep) / max(k, 1),
                },
                "n_total_nodes": total, "seconds": round(time.perf_counter() - t0, 2),
                "timings": {**timings, "circuit": round(time.perf_counter() - start, 2)},
                **({"task_examples": [[e.prompt, e.correct, e.alternative] for e in task.examples]}
                   if task.examples is not None else {}),  # a user task travels with its circuit
            },
        )
        circuit.control = control_record
        if windows is not None:
            evaluating(k, "node examples", 4)
            circuit = attach_node_data(model, circuit, windows, test)
        evaluated[0] += 1
        return circuit

    circuit = circuit_at(k, train_loss, reached)
    lap("circuit")
    at_k = {}
    for extra in sorted({min(int(x), total) for x in ks} - {k}):
        loss = evaluate(model, data.train, top_k_masks(scores, extra), fill, config.freeze_norm_scales, config.chunk_tokens)[0]
        at_k[extra] = circuit_at(extra, loss, loss <= target)
    stages("evaluation", 1, 1, f"evaluation: done, k={k:,}")
    verdict = verdict_of(circuit)  # the judgement stored in its meta.verdict, from the same numbers
    return PruneResult(circuit, scores, top_k_masks(scores, k), train_loss, bool(verdict.passed),
                       time.perf_counter() - t0, at_k, verdict, bool(reached))


def prune_sweep(model, tokenizer, tasks, out_dir, config: PruneConfig | None = None, ks=(), model_name: str | None = None,
                process_index: int = 0, num_processes: int = 1) -> list[dict]:
    """Circuits for many tasks (at the target loss and at each of `ks`), this process's share of them.

    Tasks are dealt round-robin to `num_processes` processes (`csp sweep` under `accelerate launch`); each
    writes `{task}.json` and `{task}_k{k}.json` into `out_dir` and returns one summary per circuit (with its
    verdict), and one `{"task", "refused": why, "path": None}` per task whose target is at or above chance."""
    config = config or PruneConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    means = compute_mean_activations(model, tokenizer, n_tokens=config.n_mean_tokens) if config.ablation == "mean" else None
    windows = example_windows(model, tokenizer, config.n_example_tokens) if config.n_example_tokens else None
    summaries = []
    for task in list(tasks)[process_index::num_processes]:
        try:
            result = prune(model, tokenizer, task, config, means=means, model_name=model_name, ks=ks, windows=windows)
        except TargetAtChance as exc:  # this task's target (relative to its full model) means nothing; go on
            summaries.append({"task": get_task(task).name, "k": None, "path": None, "refused": str(exc)})
            continue
        for name, circuit in [(f"{get_task(task).name}.json", result.circuit)] + [
            (f"{get_task(task).name}_k{k}.json", c) for k, c in result.at_k.items()
        ]:
            circuit.save(out_dir / name)
            summaries.append({
                "task": circuit.task, "k": circuit.k, "path": name, "at_target": circuit is result.circuit,
                "n_nodes": circuit.n_nodes, "n_edges": circuit.n_edges, "losses": circuit.losses,
                "full_accuracy": circuit.meta["full_accuracy"], "circuit_accuracy": circuit.meta["circuit_accuracy"],
                "target_reached": circuit.meta["target_reached"],
                "target_reached_train": circuit.meta["target_reached_train"], "verdict": circuit.meta["verdict"],
                "random_baseline_as_good": circuit.meta["random_baseline_as_good"], "control": circuit.control,
            })
    return summaries


__all__ = [
    "DEFAULT_TARGET_LOSS", "PruneConfig", "NodeMasks", "heaviside_ste", "train_masks", "top_k_masks", "sweep_k",
    "prune_to_target_loss", "prune", "prune_sweep", "importance_method", "EXACT_IMPORTANCE_BUDGET", "PruneResult", "shuffled_labels", "run_control", "ControlRun",
    "CONTROLS",
]
