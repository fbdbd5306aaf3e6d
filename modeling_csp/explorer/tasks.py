"""User tasks: named by their content (`custom:<label>:<digest>`), so that a name always means the same examples."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from typing import Any

from ..circuits.graph import CircuitGraph
from .errors import UserError

MAX_TASK_TEXT_BYTES = 1_000_000  # a user task pasted or uploaded in the app
MAX_TASK_EXAMPLES = 5_000
MAX_CUSTOM_TASKS = 200  # user tasks one explorer keeps (least recently used dropped first)
CUSTOM_TASK = re.compile(r"^custom:[A-Za-z0-9_.-]{1,40}:[0-9a-f]{12}$")


def _task_digest(triples: list[list[str]]) -> str:
    return hashlib.sha256(json.dumps(triples, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


class UserTasks:
    """The user tasks one explorer knows (least recently used dropped first), beside the built-in tasks: a task
    name resolves here whoever registered it, as long as it is kept."""

    def __init__(self, limit: int = MAX_CUSTOM_TASKS):
        self._limit = limit
        self._tasks: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def register(self, label: str, triples: list[list[str]]):
        """Registers a user task as `custom:<label>:<digest of its examples>` and returns the `Task` (the same name
        for the same examples, whoever registers them)."""
        from ..circuits.tasks import task_from_pairs

        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(label or "task")).strip("_")[:40] or "task"
        name = f"custom:{label}:{_task_digest(triples)}"
        with self._lock:
            if name in self._tasks:
                self._tasks.move_to_end(name)
                return self._tasks[name]
            task = task_from_pairs(name, triples, description=f"your task ({len(triples)} examples)")
            self._tasks[name] = task
            while len(self._tasks) > self._limit:
                self._tasks.popitem(last=False)
        return task

    def from_text(self, text: Any, tokenizer, max_len: int, label: Any = "task"):
        """A user task from JSON lines (`{"prompt", "correct", "incorrect"}` per line), validated against a model's
        tokenizer and context (`modeling_csp.circuits.tasks.task_from_jsonl`) and registered; size-capped."""
        from ..circuits.tasks import task_from_jsonl

        text = text if isinstance(text, str) else ""
        if not text.strip():
            raise UserError('paste or upload task lines first: one {"prompt", "correct", "incorrect"} object per line')
        if len(text.encode("utf-8")) > MAX_TASK_TEXT_BYTES:
            raise UserError(f"the task is {len(text.encode('utf-8')) / 1e6:.1f} MB; up to {MAX_TASK_TEXT_BYTES / 1e6:.0f} MB "
                            "of task lines are read")
        try:
            task = task_from_jsonl(text, tokenizer, max_len=max_len, name="task", source="line")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if len(task.examples) > MAX_TASK_EXAMPLES:
            raise UserError(f"the task has {len(task.examples)} examples; up to {MAX_TASK_EXAMPLES} are used")
        return self.register(str(label or "task"), [[e.prompt, e.correct, e.alternative] for e in task.examples])

    def task_of_circuit(self, circuit: CircuitGraph) -> str | None:
        """The task name a circuit is browsed under: a built-in name as it is, a user task (examples in
        `meta.task_examples`) registered under its content name, None when there is no usable task."""
        from ..circuits.tasks import circuit_examples, list_tasks

        task = circuit.task
        if task is None or task in {t.name for t in list_tasks()}:
            return task
        triples = circuit_examples(circuit.meta, limit=MAX_TASK_EXAMPLES)
        if triples is None:
            with self._lock:
                return task if task in self._tasks else None
        label = task.split(":")[1] if CUSTOM_TASK.match(task) else task
        return self.register(label, [list(t) for t in triples]).name

    def resolve(self, name: Any):
        """The `Task` a name means: a built-in task or a registered user task."""
        from ..circuits.tasks import get_task

        name = str(name or "")
        with self._lock:
            if name in self._tasks:
                self._tasks.move_to_end(name)
                return self._tasks[name]
        try:
            return get_task(name)
        except ValueError:
            if CUSTOM_TASK.match(name):
                raise UserError(f"task {name!r} is not known here any more: open a run made for it, or add the task "
                                "lines again") from None
            raise UserError(f"unknown task {name!r} (`csp tasks` lists them)") from None

    def known(self, name: Any) -> bool:
        """Whether a name is a built-in task or a user task kept here."""
        try:
            self.resolve(name)
            return True
        except UserError:
            return False


__all__ = ["UserTasks", "CUSTOM_TASK", "MAX_TASK_TEXT_BYTES", "MAX_TASK_EXAMPLES", "MAX_CUSTOM_TASKS"]
