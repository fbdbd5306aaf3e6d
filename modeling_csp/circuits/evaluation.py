"""One way to compute a circuit's task losses, and one way to judge them, shared by the app
(`modeling_csp.explorer`), `csp prune`/`sweep`/`evaluate` and the default-model report.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .tasks import TaskBatch, make_task_dataset

MAX_EXAMPLES = 2048  # task examples (75% train / 25% test) a circuit's evaluation may ask for (pruning: 512)
MAX_RANDOM = 10  # random same-size circuits averaged for the baseline (pruning: 5)
DEFAULTS = {"n_examples": 512, "data_seed": 0, "n_random": 5, "seed": 0}


def _bounded_int(options: dict, key: str, lo: int, hi: int, notices: list[str]) -> int:
    raw = options.get(key, DEFAULTS[key])
    try:
        value = int(raw)
        if isinstance(raw, float) and not math.isfinite(raw):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        notices.append(f"{key}={raw!r} in the circuit's options is not a number: using {DEFAULTS[key]}")
        return DEFAULTS[key]
    if not lo <= value <= hi:
        clamped = min(max(value, lo), hi)
        notices.append(f"{key}={value} is outside [{lo}, {hi}]: using {clamped}")
        return clamped
    return value


@dataclass(frozen=True)
class EvalOptions:
    """How a circuit is evaluated: its examples (n_examples, data_seed), random baseline (n_random, seed),
    frozen norm scales, and what was capped on the way (notices)."""

    n_examples: int = 512
    data_seed: int = 0
    n_random: int = 5
    seed: int = 0
    freeze_norm_scales: bool = False
    margin: float = 0.02
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
        margin = options.get("random_margin", 0.02)
        return cls(
            n_examples=_bounded_int(options, "n_examples", 8, MAX_EXAMPLES, notices),
            data_seed=_bounded_int(options, "data_seed", 0, 2**31 - 1, notices),
            n_random=_bounded_int(options, "n_random", 1, MAX_RANDOM, notices),
            seed=_bounded_int(options, "seed", 0, 2**63 - 1, notices),
            freeze_norm_scales=bool(options.get("freeze_norm_scales", False)),
            margin=float(margin) if isinstance(margin, (int, float)) and math.isfinite(margin) else 0.02,
            notices=tuple(notices),
        )

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
    normalised as `options` say (see `pruning.faithfulness`)."""
    from .pruning import faithfulness  # pruning judges its circuits with circuit_verdict, from this module

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
    "EvalOptions", "task_split", "circuit_losses", "MAX_EXAMPLES", "MAX_RANDOM", "CHANCE_LOSS", "BETTER_THAN_FULL",
    "CircuitVerdict", "Note", "circuit_verdict", "verdict_of", "check_target", "TargetAtChance",
]
