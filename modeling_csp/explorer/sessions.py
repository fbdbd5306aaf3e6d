"""Sessions: one browser session's saved runs and last good selection, and which runs it is offered (the model's
own, then its saved runs made for that model; saved runs are found by id whoever saved them: links share them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..circuits.graph import compute_edges
from .errors import UserError
from .models import MAX_SPEC_CHARS, ModelEntry
from .runs import EDGES_DROPPED, SAVED_ID, Run

MAX_SESSION_RUNS = 50  # runs a session (and a browser) remembers


@dataclass
class Session:
    """One browser session: its saved runs (id -> model spec, oldest first) and its last good selection."""

    runs: dict[str, str] = field(default_factory=dict)
    view: dict[str, Any] = field(default_factory=dict)
    tasks: tuple[str, ...] = ()  # user tasks added in this session (names of `register_task`)

    def with_run(self, run_id: str, spec: str) -> "Session":
        runs = {k: v for k, v in self.runs.items() if k != run_id}
        runs[run_id] = spec
        return Session(runs=dict(list(runs.items())[-MAX_SESSION_RUNS:]), view=dict(self.view), tasks=self.tasks)

    def with_view(self, view: dict[str, Any]) -> "Session":
        return Session(runs=dict(self.runs), view=dict(view), tasks=self.tasks)

    def with_task(self, name: str) -> "Session":
        tasks = tuple(t for t in self.tasks if t != name) + (name,)
        return Session(runs=dict(self.runs), view=dict(self.view), tasks=tasks[-MAX_SESSION_RUNS:])

    def saved(self) -> list[list[str]]:
        """What the browser keeps (its localStorage): [[run id, model spec]]."""
        return [[rid, spec] for rid, spec in self.runs.items()]

    @classmethod
    def restore(cls, saved: Any) -> "Session":
        """A session from what the browser kept; anything malformed is dropped."""
        runs = {}
        for item in (saved if isinstance(saved, list) else [])[-MAX_SESSION_RUNS:]:
            if (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)
                    and SAVED_ID.match(item[0]) and len(item[1]) <= MAX_SPEC_CHARS):
                runs[item[0]] = item[1]
        return cls(runs=runs)


def session_runs(entry: ModelEntry, session: Session) -> list[Run]:
    """The model's runs, then the session's runs made for this model that the store still has."""
    saved = [_for_model(entry, entry.store.load(rid)) for rid, spec in session.runs.items() if spec == entry.spec]
    return list(entry.runs.values()) + [r for r in saved if r is not None]


def _for_model(entry: ModelEntry, run: Run | None) -> Run | None:
    """A saved run if it was made with this model (a link may come from another one), with its edges rebuilt from
    the weights when the store left them out."""
    if run is None:
        return None
    circuit = run.load()
    if run.id not in entry.checked_runs:
        try:
            circuit.check_model(entry.model, entry.spec)
        except ValueError:
            return None
        entry.checked_runs.add(run.id)
    if circuit.meta.get(EDGES_DROPPED) and not circuit.edges:  # (also a run the store read again from disk)
        circuit.edges = compute_edges(entry.model, circuit.node_indices())
        circuit.meta.pop(EDGES_DROPPED, None)
    return run


def runs_for_task(entry: ModelEntry, session: Session, task: str | None) -> list[Run]:
    """Runs to offer for a task: those made for it first, then those that name no task."""
    runs = session_runs(entry, session)
    return [r for r in runs if r.task == task] + [r for r in runs if r.task is None]


def find_run(entry: ModelEntry, session: Session | None, run_id: str | None) -> Run | None:
    """The model's run or a saved run with this id (saved runs need not be the session's: links share them)."""
    if not run_id:
        return None
    if run_id in entry.runs:
        return entry.runs[run_id]
    return _for_model(entry, entry.store.load(run_id))


def choose_run(entry: ModelEntry, run_id: str | None = None, task: str | None = None) -> Run | None:
    """The run with this id (the model's or a saved one), checked against the task; without an id the model's
    first run for the task (any task if none), else None."""
    if run_id:
        chosen = find_run(entry, None, run_id)
        if chosen is None:
            raise UserError(f"unknown run {run_id!r} for model {entry.spec} (its runs: {', '.join(entry.runs) or 'none'})")
        if task and chosen.task not in (task, None):
            raise UserError(f"run {run_id!r} is a circuit for {chosen.task}, not {task}")
        return chosen
    candidates = [r for r in entry.runs.values() if not task or r.task == task]
    return candidates[0] if candidates else None


__all__ = ["Session", "session_runs", "runs_for_task", "find_run", "choose_run", "MAX_SESSION_RUNS"]
