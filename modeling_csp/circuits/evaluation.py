"""Everything that measures a model or a circuit on a task, in one place: the task metrics, running a task with
nodes ablated, a circuit against random same-size circuits and its complement, each node's and sublayer's effect,
the options a circuit is evaluated with, and the one judgement of its numbers (the verdict). The app
(`modeling_csp.explorer`), `csp prune`/`sweep`/`evaluate`/`tasks --check` and the default-model report all use it.

    data = make_task_dataset("single_double_quote", tokenizer, n=256)
    loss = task_loss(task_logits(model, data.train), data.train)  # or: loss, accuracy = evaluate(model, data.train)

A circuit's numbers depend on the task examples, the random circuits drawn for the baseline and whether norm
scales are frozen. A circuit file records how it was pruned (`meta.options`); both front ends evaluate it
with those options, through `circuit_losses`, so they report the same numbers for the same circuit.

Sizes read from a file are user input and are capped (a file asking for 10^7 examples would take gigabytes):
at most MAX_EXAMPLES task examples and MAX_RANDOM random circuits; a capped value is named in `notices`.

    options = EvalOptions.of(circuit)
    batch = task_split("single_double_quote", tokenizer, model.config.block_size, options)
    losses = circuit_losses(model, batch, circuit.masks(model.config), means, options)
    verdict = circuit_verdict(losses, circuit.target_loss, train_loss=circuit.meta.get("train_circuit_loss"))

A verdict is judged on held-out examples (the test split): pruning chooses k on the training split, where a
circuit can fit its examples without doing the task (`verdict_of(circuit)` judges a circuit's stored losses).

Ablating nodes (the contexts, mean activations) is `ablation`, below this module; finding circuits is `pruning`,
above it: pruning builds its `EvalOptions` from its `PruneConfig` (`EvalOptions.from_config`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..utils.devices import input_device
from .ablation import Masks, ablate, all_kept, frozen_norm_scales, task_logits, unchanged_weights
from .graph import node_id
from .tasks import DEFAULT_CHUNK_TOKENS, DEFAULT_DATA_SEED, DEFAULT_N_EXAMPLES, Task, TaskBatch, example_class, get_task, make_task_dataset

DEFAULT_N_RANDOM = 5  # random same-size circuits averaged for the baseline
DEFAULT_RANDOM_MARGIN = 0.02  # random circuits within this of the circuit's loss (nats) are "as good" as it


# ---- task metrics --------------------------------------------------------------------------


def last_token_logits(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """Select the logits at each row's decision position: `(n, T, V) -> (n, V)`."""
    positions = batch.positions.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), positions]


def _pair_logits(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    if logits.dim() == 3:
        logits = last_token_logits(logits, batch)
    c = logits.gather(-1, batch.correct_ids.to(logits.device)[:, None])
    a = logits.gather(-1, batch.alternative_ids.to(logits.device)[:, None])
    return torch.cat([c, a], dim=-1).float()


def task_loss(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """
    Binary cross-entropy of the model restricted to the two candidates, averaged over the batch.

    `mean(-log softmax([l_correct, l_alternative])[0])`, in nats: `log 2` when the model cannot tell the
    candidates apart, 0 when it is certain and right. (The reference `circuit_sparsity` code stores twice this
    number; its visualizer halves it for display.)

    Args:
        logits (`torch.Tensor`): `(n, V)` logits at the decision position, or `(n, T, V)` full logits (the last
            position is then taken with [`last_token_logits`]).
        batch (`TaskBatch`): the batch the logits were computed on.

    Returns:
        `torch.Tensor`: scalar loss (float32), differentiable.
    """
    return example_losses(logits, batch).mean()


def example_losses(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """(n,) task loss of each example (see `task_loss`, their mean)."""
    return _pair_losses(_pair_logits(logits, batch))


def _pair_losses(pair: torch.Tensor) -> torch.Tensor:
    return -F.log_softmax(pair, dim=-1)[:, 0]


def task_accuracy(logits: torch.Tensor, batch: TaskBatch) -> float:
    """Fraction of examples whose correct candidate gets a strictly higher logit than the alternative."""
    pair = _pair_logits(logits, batch)
    return (pair[:, 0] > pair[:, 1]).float().mean().item()


# ---- running a task ------------------------------------------------------------------------


@torch.no_grad()
@unchanged_weights
def evaluate(model, batch: TaskBatch, keep_masks: Masks | None = None, means: Masks | None = None,
             freeze_norm_scales: bool = False, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> tuple[float, float]:
    """(task loss, accuracy) with the nodes outside `keep_masks` ablated (nothing ablated if None).

    `means=None` means zero ablation. The batch runs in chunks of similar length (`TaskBatch.by_length`); the
    numbers are those of one pass over the whole batch up to float rounding."""
    losses, right = [], []
    for chunk in batch.by_length(chunk_tokens):
        with contextlib.ExitStack() as stack:
            if freeze_norm_scales:
                stack.enter_context(frozen_norm_scales(model, chunk))
            if keep_masks is not None:
                stack.enter_context(ablate(model, keep_masks, means))
            pair = _pair_logits(task_logits(model, chunk), chunk)
        losses.append(_pair_losses(pair))
        right.append(pair[:, 0] > pair[:, 1])
    return torch.cat(losses).mean().item(), torch.cat(right).float().mean().item()


def check_task(model, tokenizer, task: Task | str, n: int = DEFAULT_N_EXAMPLES, seed: int = DEFAULT_DATA_SEED
               ) -> dict[str, Any]:
    """The full model on a task before pruning: accuracy and loss on all its examples and on the test split that
    pruning reports on, plus the class counts (`example_class`)."""
    task = get_task(task)
    data = make_task_dataset(task, tokenizer, n=n, seed=seed, max_len=model.config.block_size)
    train_loss, train_acc = evaluate(model, data.train)
    test_loss, test_acc = evaluate(model, data.test) if len(data.test) else (float("nan"), float("nan"))
    n_train, n_test = len(data.train), len(data.test)
    examples = data.train.examples + data.test.examples
    classes = [example_class(ex) for ex in examples]
    total = n_train + n_test
    return {
        "task": task.name, "n": total, "n_train": n_train, "n_test": n_test, "n_dropped": data.n_dropped,
        "classes": [classes.count(0), classes.count(1)],
        "accuracy": (train_acc * n_train + (test_acc * n_test if n_test else 0)) / total,
        "loss": (train_loss * n_train + (test_loss * n_test if n_test else 0)) / total,
        "test_accuracy": test_acc, "test_loss": test_loss,
    }


# ---- a circuit against random circuits and its complement ----------------------------------


def random_masks_like(masks: Masks, generator: torch.Generator) -> Masks:
    """Random circuit with the same number of kept nodes at every location."""
    out = {}
    for loc, m in masks.items():
        r = torch.zeros(m.numel(), dtype=torch.bool)  # drawn on the CPU generator, then moved to the masks' device
        r[torch.randperm(m.numel(), generator=generator)[: int(m.sum())]] = True
        out[loc] = r.to(m.device)
    return out


@torch.no_grad()
@unchanged_weights
def faithfulness(model, batch: TaskBatch, keep_masks: Masks, means: Masks | None, n_random: int = DEFAULT_N_RANDOM,
                 seed: int = 0, margin: float = DEFAULT_RANDOM_MARGIN,
                 freeze_norm_scales: bool = False) -> dict[str, Any]:
    """Task losses/accuracies of the full model, the circuit, random same-size circuits and the complement.

    `random_baseline_as_good` flags circuits that random node sets of the same size match (within `margin`):
    then the circuit says little about which nodes matter."""
    full, full_acc = evaluate(model, batch)
    circuit, circuit_acc = evaluate(model, batch, keep_masks, means, freeze_norm_scales)
    gen = torch.Generator().manual_seed(seed)
    randoms = [evaluate(model, batch, random_masks_like(keep_masks, gen), means, freeze_norm_scales)[0]
               for _ in range(n_random)]
    complement = {loc: ~m.bool() for loc, m in keep_masks.items()}
    comp, _ = evaluate(model, batch, complement, means, freeze_norm_scales)
    random = sum(randoms) / max(len(randoms), 1)
    return {
        "full": full, "circuit": circuit, "random": random, "complement": comp,
        "full_accuracy": full_acc, "circuit_accuracy": circuit_acc, "random_losses": randoms,
        "random_baseline_as_good": bool(random <= circuit + margin),
    }


# ---- effects of ablations ------------------------------------------------------------------


def _sublayer(location: str) -> str:
    layer, kind = location.split(".", 2)[:2]
    return f"{layer}.{kind}"


@torch.no_grad()
@unchanged_weights
def layer_ablation_deltas(model, batch: TaskBatch, keep_masks: Masks, means: Masks | None,
                          freeze_norm_scales: bool = False) -> dict[str, float]:
    """{"0.attn": d, "0.mlp": d, ...}: loss increase when a sublayer's circuit nodes are ablated too."""
    base, _ = evaluate(model, batch, keep_masks, means, freeze_norm_scales)
    out = {}
    for layer in range(model.config.n_layer):
        for part in ("attn", "mlp"):
            name = f"{layer}.{part}"
            masks = {loc: (torch.zeros_like(m) if _sublayer(loc) == name else m) for loc, m in keep_masks.items()}
            out[name] = evaluate(model, batch, masks, means, freeze_norm_scales)[0] - base
    return out


@unchanged_weights
def node_importances(model, batch: TaskBatch, keep_masks: Masks, means: Masks | None,
                     freeze_norm_scales: bool = False, method: str = "exact",
                     progress: Callable[[int, int], None] | None = None, nodes_per_pass: int = 16,
                     chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> dict[str, float]:
    """{"loc:idx": d}: task-loss increase when that kept node alone is ablated (others as in the circuit).

    method "exact" ablates each node in turn, `nodes_per_pass` nodes in one forward pass (the batch repeated,
    one node ablated per copy; 1: a pass per node); "attribution" estimates all of them from one backward pass,
    d ~ -dL/dm at m = 1 (first order in the mask; cheap for large circuits, less accurate).
    `progress(done, total)` is called after each pass (exact) so that a front end can show a bar."""
    if method == "attribution":
        return _attribution_importances(model, batch, keep_masks, means, freeze_norm_scales, chunk_tokens)
    if method != "exact":
        raise ValueError(f"method must be 'exact' or 'attribution', not {method!r}")
    if nodes_per_pass < 1:
        raise ValueError(f"nodes_per_pass must be at least 1, got {nodes_per_pass}")
    base, _ = evaluate(model, batch, keep_masks, means, freeze_norm_scales, chunk_tokens)
    keep = {loc: m.bool() for loc, m in keep_masks.items()}
    nodes = [(loc, i) for loc, m in keep.items() for i in m.nonzero().flatten().tolist()]
    chunks = batch.by_length(chunk_tokens and max(1, chunk_tokens // nodes_per_pass))
    out = {}
    for start in range(0, len(nodes), nodes_per_pass):
        group = nodes[start:start + nodes_per_pass]
        per_copy = {loc: m.expand(len(group), -1).clone() for loc, m in keep.items()}  # (copies, width)
        for copy, (loc, i) in enumerate(group):
            per_copy[loc][copy, i] = False
        total = torch.zeros(len(group), dtype=torch.float64)
        for chunk in chunks:
            total += _copies_loss(model, chunk, per_copy, means, freeze_norm_scales).double().cpu() * len(chunk)
        for (loc, i), loss in zip(group, (total / len(batch)).tolist()):
            out[node_id(loc, i)] = loss - base
        if progress is not None:
            progress(len(out), len(nodes))
    return out


@torch.no_grad()
def _copies_loss(model, batch: TaskBatch, per_copy: Masks, means: Masks | None, freeze_norm_scales: bool) -> torch.Tensor:
    """(copies,) task loss of `batch` under each copy's masks ({loc: (copies, width)}), in one forward pass."""
    copies = next(iter(per_copy.values())).shape[0]
    repeated = TaskBatch(*(t.repeat(copies, *[1] * (t.dim() - 1)) for t in (
        batch.input_ids, batch.attention_mask, batch.positions, batch.correct_ids, batch.alternative_ids)))
    rows = {loc: m.repeat_interleave(len(batch), dim=0)[:, None, :] for loc, m in per_copy.items()}  # copy-major
    with contextlib.ExitStack() as stack:
        if freeze_norm_scales:
            stack.enter_context(frozen_norm_scales(model, repeated))
        stack.enter_context(ablate(model, rows, means))
        losses = example_losses(task_logits(model, repeated), repeated)
    return losses.view(copies, len(batch)).mean(dim=1)


def _attribution_importances(model, batch, keep_masks, means, freeze_norm_scales, chunk_tokens) -> dict[str, float]:
    scores = node_attributions(model, batch, means, keep_masks, freeze_norm_scales, chunk_tokens)
    return {node_id(loc, i): float(scores[loc][i]) for loc, m in keep_masks.items() for i in m.bool().nonzero().flatten().tolist()}


@unchanged_weights
def node_attributions(model, batch: TaskBatch, means: Masks | None, keep_masks: Masks | None = None,
                      freeze_norm_scales: bool = False, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> Masks:
    """{location: (width,) first-order task-loss increase when each node alone is mean-ablated} (attribution
    patching): gradient x (mean - activation), summed over the batch's positions, from one backward pass
    (per chunk of similar-length rows, `TaskBatch.by_length`).

    With `keep_masks` the nodes outside it are ablated first (their attribution is then 0). Rank nodes with
    `pruning.top_k_masks(node_attributions(...), k)`. `means=None` means zero ablation."""
    keep_masks = keep_masks or all_kept(model.config, input_device(model))
    locations = list(keep_masks)
    out = {}
    for chunk in batch.by_length(chunk_tokens):
        leaf = torch.zeros((), requires_grad=True, device=input_device(model))  # makes the graph reach every activation, even with frozen weights
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            if freeze_norm_scales:
                stack.enter_context(frozen_norm_scales(model, chunk))
            stack.enter_context(ablate(model, keep_masks, means))
            stack.enter_context(model.intervene({"tok_emb": lambda x: x + leaf}))
            acts = stack.enter_context(model.record_activations(locations, detach=False))
            grads = stack.enter_context(model.record_gradients(locations))
            loss = task_loss(task_logits(model, chunk), chunk) * (len(chunk) / len(batch))  # the whole batch's mean
            torch.autograd.grad(loss, [acts[loc] for loc in locations])  # fills `grads`; no parameter gradients
        for loc in locations:
            baseline = means[loc].to(acts[loc]) if means is not None else torch.zeros((), dtype=acts[loc].dtype)
            part = (grads[loc] * (baseline - acts[loc].detach())).sum(dim=(0, 1))  # on the model's device
            out[loc] = part if loc not in out else out[loc] + part
    return out


# ---- evaluation options ----------------------------------------------------------------------

MAX_EXAMPLES = 2048  # task examples (75% train / 25% test) a circuit's evaluation may ask for
MAX_RANDOM = 10  # random same-size circuits averaged for the baseline


def _bounded_int(options: dict, key: str, lo: int, hi: int, notices: list[str]) -> int:
    default = getattr(EvalOptions, key)  # the field's default
    raw = options.get(key, default)
    try:
        value = int(raw)
        if isinstance(raw, float) and not math.isfinite(raw):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        notices.append(f"{key}={raw!r} in the circuit's options is not a number: using {default}")
        return default
    if not lo <= value <= hi:
        clamped = min(max(value, lo), hi)
        notices.append(f"{key}={value} is outside [{lo}, {hi}]: using {clamped}")
        return clamped
    return value


@dataclass(frozen=True)
class EvalOptions:
    """How a circuit is evaluated: its examples (n_examples, data_seed), random baseline (n_random, seed),
    frozen norm scales, and what was capped on the way (notices)."""

    n_examples: int = DEFAULT_N_EXAMPLES
    data_seed: int = DEFAULT_DATA_SEED
    n_random: int = DEFAULT_N_RANDOM
    seed: int = 0
    freeze_norm_scales: bool = False
    margin: float = DEFAULT_RANDOM_MARGIN
    notices: tuple[str, ...] = ()

    @classmethod
    def of(cls, circuit=None, n_random: int | None = None, seed: int | None = None) -> "EvalOptions":
        """The options a circuit was pruned with (`meta.options`, defaults where absent), capped; `n_random`
        and `seed` override the file's (`csp evaluate --n-random/--seed`)."""
        meta = getattr(circuit, "meta", None) or {}
        options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
        options = dict(options or {})
        if n_random is not None:
            options["n_random"] = n_random
        if seed is not None:
            options["seed"] = seed
        notices: list[str] = []
        margin = options.get("random_margin", cls.margin)
        return cls(
            n_examples=_bounded_int(options, "n_examples", 8, MAX_EXAMPLES, notices),
            data_seed=_bounded_int(options, "data_seed", 0, 2**31 - 1, notices),
            n_random=_bounded_int(options, "n_random", 1, MAX_RANDOM, notices),
            seed=_bounded_int(options, "seed", 0, 2**63 - 1, notices),
            freeze_norm_scales=bool(options.get("freeze_norm_scales", False)),
            margin=float(margin) if isinstance(margin, (int, float)) and math.isfinite(margin) else cls.margin,
            notices=tuple(notices),
        )

    @classmethod
    def from_config(cls, config) -> "EvalOptions":
        """The options a prune with `config` (a `pruning.PruneConfig`) evaluates its circuits with: what
        `EvalOptions.of` later reads back from the circuit's `meta.options`."""
        return cls(n_examples=config.n_examples, data_seed=config.data_seed, n_random=config.n_random,
                   seed=config.seed, freeze_norm_scales=config.freeze_norm_scales, margin=config.random_margin)

    @property
    def data_key(self) -> tuple[int, int]:
        """What the examples depend on (for caching a task's split)."""
        return self.n_examples, self.data_seed


def task_split(task, tokenizer, block_size: int, options: EvalOptions) -> TaskBatch:
    """The held-out split a circuit is evaluated on (the training split when the test split is empty)."""
    data = make_task_dataset(task, tokenizer, n=options.n_examples, seed=options.data_seed, max_len=block_size)
    return data.test if len(data.test) else data.train


def circuit_losses(model, batch: TaskBatch, masks, means, options: EvalOptions) -> dict[str, Any]:
    """Task losses of the full model, the circuit, random same-size circuits and the complement, drawn and
    normalised as `options` say (see `faithfulness`)."""
    return faithfulness(model, batch, masks, means, n_random=options.n_random, seed=options.seed,
                        margin=options.margin, freeze_norm_scales=options.freeze_norm_scales)


# ---- verdicts -------------------------------------------------------------------------------

CHANCE_LOSS = math.log(2)  # the task loss of a coin flip between the two candidates
BETTER_THAN_FULL = 0.05  # a circuit this much better than the full model is suspect (it may fit its examples)
CONTROL_MARGIN = 0.05  # the circuit must beat the shuffled-answer control's held-out loss at its size by this


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class TargetAtChance(ValueError):
    """A pruning target at or above chance: refused, since a circuit reaching it would not do the task."""


def check_target(target: float, what: str = "the target") -> float:
    """`target` (nats), or ValueError when it is no number or negative, TargetAtChance when it is at or above
    chance."""
    value = _finite(target)
    if value is None or value < 0:
        raise ValueError(f"{what} must be a number of nats >= 0, got {target!r}")
    if value >= CHANCE_LOSS:
        raise TargetAtChance(f"{what} {value:.3f} nats is at or above chance (ln 2 = {CHANCE_LOSS:.3f}, a coin flip "
                         f"between the two candidates): a circuit reaching it would not do the task; choose a "
                         f"target below {CHANCE_LOSS:.3f}")
    return value


class Note(NamedTuple):
    """One remark of a verdict: `kind` ("target", "target_chance", "chance", "better_than_full", "control"),
    whether it is good news, and its text."""

    kind: str
    good: bool
    text: str


@dataclass(frozen=True)
class CircuitVerdict:
    """What a circuit's held-out losses say: whether it reaches its target there (not only on the training
    examples pruning chose it on), whether it does the task at all (below chance), whether it is suspiciously
    better than the full model, and whether its shuffled-answer control says it means something.

    Flags are None where the numbers to judge are missing. `notes` say it in words; `messages()` prefixes them
    with ✅/⚠️ for the app, `warnings` are the texts of the bad ones (the CLI's stderr)."""

    split: str  # "test" (held-out), or "train" when a task has no held-out examples
    target: float | None
    circuit_loss: float | None  # on `split`
    full_loss: float | None  # on `split`
    train_loss: float | None  # the circuit's loss on the training examples, where pruning chose its size
    target_reached_heldout: bool | None
    target_reached_train: bool | None
    reached_only_on_train: bool
    at_or_above_chance: bool | None
    target_at_or_above_chance: bool | None
    better_than_full: bool | None
    means_something: bool | None  # None: no control (or no numbers) to judge by
    notes: tuple[Note, ...] = ()

    @property
    def passed(self) -> bool | None:
        """Reached its target on held-out examples, below chance; None without a target or losses."""
        if self.target_reached_heldout is None:
            return None
        return bool(self.target_reached_heldout and not self.at_or_above_chance)

    def messages(self, without: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The notes as the app shows them, except those of the kinds in `without`."""
        return tuple(("✅ " if n.good else "⚠️ ") + n.text for n in self.notes if n.kind not in without)

    def note(self, kind: str) -> Note | None:
        return next((n for n in self.notes if n.kind == kind), None)

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(n.text for n in self.notes if not n.good)

    def as_dict(self) -> dict[str, Any]:
        """The circuit file's `meta.verdict` (docs/circuit_format.md): strict JSON, nulls where unknown."""
        return {
            "split": self.split, "chance": CHANCE_LOSS, "target": self.target, "circuit_loss": self.circuit_loss,
            "full_loss": self.full_loss, "train_loss": self.train_loss, "passed": self.passed,
            "target_reached_heldout": self.target_reached_heldout, "target_reached_train": self.target_reached_train,
            "reached_only_on_train": self.reached_only_on_train, "at_or_above_chance": self.at_or_above_chance,
            "target_at_or_above_chance": self.target_at_or_above_chance, "better_than_full": self.better_than_full,
            "means_something": self.means_something, "messages": list(self.messages()),
        }


def circuit_verdict(losses: dict | None, target: float | None, train_loss: float | None = None,
                    control: dict | None = None, k: int | None = None, split: str = "test") -> CircuitVerdict:
    """The one judgement of a circuit, from its held-out losses (`losses["circuit"]`, `losses["full"]`, as
    `circuit_losses` and pruning record them), its target, its training-split loss and its control record.

    - target reached: held-out circuit loss <= target; reached on training examples only is said so;
    - a held-out loss at or above chance (ln 2) means the circuit does not do the task, and a target at or above
      chance means reaching it says nothing;
    - a circuit more than BETTER_THAN_FULL nats better than the full model may fit its examples: the
      shuffled-answer control tells (suggested when absent);
    - it means something when, at the same size, the control's held-out loss stays CONTROL_MARGIN above the
      circuit's, and the control does not reach the target with as few nodes on its training examples."""
    losses = losses or {}
    held = "held-out" if split == "test" else "training (no held-out examples)"
    circuit, full = _finite(losses.get("circuit")), _finite(losses.get("full"))
    target, train_loss = _finite(target), _finite(train_loss)
    chance_text = f"chance (ln 2 = {CHANCE_LOSS:.3f})"
    notes: list[Note] = []

    target_high = None if target is None else target >= CHANCE_LOSS
    if target_high:
        notes.append(Note("target_chance", False, f"the target {target:.3f} nats is at or above {chance_text}: "
                                                  "reaching it says nothing"))
    reached = None if target is None or circuit is None else circuit <= target
    reached_train = None if target is None or train_loss is None else train_loss <= target
    only_train = bool(reached is False and reached_train)
    on_train = f" (training {train_loss:.3f})" if train_loss is not None else ""
    if reached:
        notes.append(Note("target", True, f"target reached on {held} examples: circuit loss {circuit:.3f} ≤ "
                                          f"{target:.3f} nats{on_train}"))
    elif only_train:
        notes.append(Note("target", False, f"target reached only on training examples ({train_loss:.3f} ≤ "
                                           f"{target:.3f}): the {held} circuit loss is {circuit:.3f} > {target:.3f} nats"))
    elif reached is False:
        notes.append(Note("target", False, f"target not reached: {held} circuit loss {circuit:.3f} > {target:.3f} "
                                           f"nats{on_train}"))

    chance = None if circuit is None else circuit >= CHANCE_LOSS
    if chance:
        notes.append(Note("chance", False, f"the {held} circuit loss {circuit:.3f} is at or above {chance_text}: "
                                           "the circuit does not do the task"))

    if not isinstance(control, dict) or (k is not None and control.get("k") not in (None, k)):
        control = None  # a control recorded at another size says nothing about this one
    better = None if circuit is None or full is None else circuit < full - BETTER_THAN_FULL
    if better:
        advice = ("compare it with its shuffled-answer control" if control else
                  "run the shuffled-answer control (`--control shuffled`; in the app, the control checkbox)")
        notes.append(Note("better_than_full", False, f"the circuit is {full - circuit:.3f} nats better than the full "
                                                     f"model ({circuit:.3f} vs {full:.3f} on {held} examples): it may "
                                                     f"fit its examples rather than show how the model does the task; "
                                                     f"{advice}"))

    means = None
    if control is not None and circuit is not None:
        ctrl_loss = _finite(control.get("test_loss_at_k"))
        ctrl_k, size = control.get("k_to_target"), control.get("k", k)
        if chance:
            means, why = False, "its held-out loss is at or above chance"
        elif ctrl_k is not None and size is not None and ctrl_k <= size:
            means, why = False, (f"the control reaches the target with {ctrl_k} nodes on its training examples: "
                                 "this circuit may fit noise")
        elif ctrl_loss is None:
            why = "the control records no held-out loss (a training-split reading only)"
        elif ctrl_loss < circuit + CONTROL_MARGIN:
            means, why = False, (f"the control does as well on held-out examples ({ctrl_loss:.3f} vs the circuit's "
                                 f"{circuit:.3f}): this circuit may fit noise")
        else:
            means, why = True, (f"on held-out examples the control's loss at the same size is {ctrl_loss:.3f}, the "
                                f"circuit's {circuit:.3f}")
        head = {None: "the control cannot judge it", True: "the circuit means something",
                False: "the circuit may not mean anything"}[means]
        notes.append(Note("control", bool(means), f"{head}: {why}"))
    return CircuitVerdict(split, target, circuit, full, train_loss, reached, reached_train, only_train, chance,
                          target_high, better, means, tuple(notes))


def verdict_of(circuit, losses: dict | None = None, own_task: bool = True, split: str | None = None) -> CircuitVerdict:
    """`circuit_verdict` of a circuit (a `CircuitGraph`): its stored held-out losses unless `losses` (and the
    `split` they are on) are given; its target, training loss and control when judged on its own task (on
    another task it has no target to meet)."""
    meta = circuit.meta if isinstance(getattr(circuit, "meta", None), dict) else {}
    split = split or (meta.get("eval_split") if losses is None else None) or "test"
    return circuit_verdict(
        losses if losses is not None else circuit.losses, circuit.target_loss if own_task else None,
        train_loss=meta.get("train_circuit_loss") if own_task else None,
        control=circuit.control if own_task else None, k=circuit.n_nodes, split="train" if split == "train" else "test")


__all__ = [
    "DEFAULT_N_RANDOM", "DEFAULT_RANDOM_MARGIN", "last_token_logits", "task_loss", "example_losses", "task_accuracy",
    "evaluate",
    "check_task", "random_masks_like", "faithfulness", "layer_ablation_deltas", "node_importances",
    "node_attributions", "EvalOptions", "task_split", "circuit_losses", "MAX_EXAMPLES", "MAX_RANDOM", "CHANCE_LOSS",
    "BETTER_THAN_FULL", "CircuitVerdict", "Note", "circuit_verdict", "verdict_of", "check_target", "TargetAtChance",
]
