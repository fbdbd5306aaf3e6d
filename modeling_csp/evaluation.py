"""One way to compute a circuit's task losses, shared by the app (`modeling_csp.explorer`) and `csp evaluate`.

A circuit's numbers depend on the task examples, the random circuits drawn for the baseline and whether norm
scales are frozen. A circuit file records how it was pruned (`meta.options`); both front ends evaluate it
with those options, through `circuit_losses`, so they report the same numbers for the same circuit.

Sizes read from a file are user input and are capped (a file asking for 10^7 examples would take gigabytes):
at most MAX_EXAMPLES task examples and MAX_RANDOM random circuits; a capped value is named in `notices`.

    options = EvalOptions.of(circuit)
    batch = task_split("single_double_quote", tokenizer, model.config.block_size, options)
    losses = circuit_losses(model, batch, circuit.masks(model.config), means, options)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .pruning import faithfulness
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
    return faithfulness(model, batch, masks, means, n_random=options.n_random, seed=options.seed,
                        margin=options.margin, freeze_norm_scales=options.freeze_norm_scales)


__all__ = ["EvalOptions", "task_split", "circuit_losses", "MAX_EXAMPLES", "MAX_RANDOM"]
