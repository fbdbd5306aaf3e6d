"""Runs: circuits to explore (shipped, imported, pruned in the app), and `RunStore`, which keeps the runs pruned or
imported in the app under a content id (`saved:…`), on disk within a size cap, so that they survive a reload and
travel in a share link."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..circuits.graph import CircuitGraph
from ..utils.jsonio import dumps_strict, write_text_atomic
from ..utils.sizes import approx_bytes, release_freed_memory
from ..utils.tempfiles import remove_orphan_temps
from .errors import first_line, log
from .tasks import UserTasks

MAX_SAVED_RUN_BYTES = 8_000_000  # one saved run on disk (circuit + pruning scores; without its edges when larger)
MAX_STORE_BYTES = 500_000_000  # the whole store on disk, every file in its folder counted; the oldest go first
MAX_CACHED_RUN_BYTES = 200_000_000  # runs kept in memory (estimated: circuits, their examples, scores)
SAVED_ID = re.compile(r"^saved:[0-9a-f]{16}$")
EDGES_DROPPED = "edges_dropped"  # a saved run's meta: its file left out the edges (rebuilt from the weights)


@dataclass
class Run:
    """A circuit to explore: shipped with the model, imported, or pruned in the app (then with its pruning
    scores, which rank every node, so any k is possible). A circuit of a user task registers the task with
    `tasks` (the explorer's user tasks) and is browsed under its content name."""

    id: str
    name: str
    source: str  # "shipped" | "imported" | "pruned"
    path: str | None = None
    circuit: CircuitGraph | None = None
    scores: dict[str, torch.Tensor] | None = None
    task: str | None = None
    k: int | None = None
    tasks: UserTasks | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.circuit is not None:
            self.task = self._task_of(self.circuit) or self.task

    def _task_of(self, circuit: CircuitGraph) -> str | None:
        return self.tasks.task_of_circuit(circuit) if self.tasks is not None else circuit.task

    def load(self) -> CircuitGraph:
        if self.circuit is None:
            self.circuit = CircuitGraph.load(self.path)
            self.task = self._task_of(self.circuit) or self.task
        return self.circuit


class RunStore:
    """Runs pruned or imported in the app, kept under a content id `saved:<16 hex>`: in memory (LRU, at most
    `max_cached_bytes` estimated) and, with a folder, on disk as one JSON file each (circuit, pruning scores), at
    most `max_file_bytes` each and `max_total_bytes` together, every file in the folder counted (oldest removed
    first). Temporary files that killed writes left there go when the store opens and after each save. A file too large goes without what the app can recompute:
    first the circuit's node data, then its edges (rebuilt from the model's weights, see `sessions.find_run`). A
    run too large even so lives in memory only. Runs read back register their user tasks with `tasks`."""

    def __init__(self, folder: Path | None = None, tasks: UserTasks | None = None,
                 max_file_bytes: int = MAX_SAVED_RUN_BYTES, max_total_bytes: int = MAX_STORE_BYTES,
                 max_cached_bytes: int = MAX_CACHED_RUN_BYTES):
        self.folder = Path(folder) if folder else None
        self.tasks = tasks if tasks is not None else UserTasks()
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self.max_cached_bytes = max_cached_bytes
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._sizes: dict[str, int] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_orphan_temps(self.folder)
            self._trim()

    def cached_bytes(self) -> int:
        """Estimated bytes of the runs held in memory."""
        with self._lock:
            return sum(self._sizes.values())

    def _remember(self, run: Run) -> None:
        """Keeps `run` in memory, dropping the least recently used runs beyond `max_cached_bytes` (the newest
        stays even when it alone is larger)."""
        size = approx_bytes([run.circuit, run.scores])
        with self._lock:
            self._runs.pop(run.id, None)
            self._sizes.pop(run.id, None)
            self._runs[run.id] = run
            self._sizes[run.id] = size
            evicted = False
            while len(self._runs) > 1 and sum(self._sizes.values()) > self.max_cached_bytes:
                oldest, _ = self._runs.popitem(last=False)
                self._sizes.pop(oldest, None)
                evicted = True
        if evicted:
            release_freed_memory()

    def _path(self, run_id: str) -> Path | None:
        if self.folder is None or not SAVED_ID.match(run_id or ""):
            return None
        return self.folder / f"{run_id.split(':', 1)[1]}.json"

    def save(self, run: Run) -> tuple[Run, str | None]:
        """(the run under its saved id, a notice when it could not be written to disk)."""
        circuit = run.load()
        data = {"name": run.name, "source": run.source, "task": run.task, "circuit": circuit.to_dict(),
                "scores": {loc: [round(float(v), 5) for v in s.flatten().tolist()] for loc, s in run.scores.items()}
                if run.scores is not None else None}
        text = dumps_strict(data, separators=(",", ":"))
        if len(text) > self.max_file_bytes:  # node data (examples, task activations): the app recomputes it
            data["circuit"] = {k: v for k, v in data["circuit"].items() if k not in ("node_data", "task_docs")}
            text = dumps_strict(data, separators=(",", ":"))
        if len(text) > self.max_file_bytes:  # edges: the nonzero weights between the nodes (a dense-ish model has many)
            data["circuit"] = {**data["circuit"], "edges": [], "meta": {**(data["circuit"]["meta"] or {}), EDGES_DROPPED: True}}
            text = dumps_strict(data, separators=(",", ":"))
        saved = replace(run, id=f"saved:{hashlib.sha256(text.encode()).hexdigest()[:16]}")
        notice = None
        path = self._path(saved.id)
        if path is not None:
            if len(text) > self.max_file_bytes:
                notice = (f"this run is {len(text) / 1e6:.1f} MB, more than the {self.max_file_bytes / 1e6:.0f} MB a "
                          "shared run may take: it is not saved for links and reloads")
            else:
                write_text_atomic(path, text)
                remove_orphan_temps(self.folder)
                self._trim()
        self._remember(saved)
        return saved, notice

    def load(self, run_id: str | None) -> Run | None:
        """The saved run with this id, or None (unknown, removed, or not a saved id)."""
        if not run_id or not SAVED_ID.match(run_id):
            return None
        with self._lock:
            if run_id in self._runs:
                self._runs.move_to_end(run_id)
                return self._runs[run_id]
        path = self._path(run_id)
        if path is None or not path.is_file() or path.stat().st_size > self.max_file_bytes:
            return None
        try:
            data = json.loads(path.read_text())
            circuit = CircuitGraph.from_dict(data["circuit"], source=run_id)
            scores = ({loc: torch.tensor(v, dtype=torch.float32) for loc, v in data["scores"].items()}
                      if data.get("scores") else None)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log(f"saved run {run_id} unreadable: {first_line(exc)}")
            return None
        run = Run(id=run_id, name=str(data.get("name") or run_id)[:200], source=str(data.get("source") or "saved"),
                  circuit=circuit, scores=scores, task=circuit.task, k=circuit.k or circuit.n_nodes, tasks=self.tasks)
        self._remember(run)
        return run

    def disk_bytes(self) -> int:
        """Bytes of every file in the store's folder (what its cap counts)."""
        return sum(size for _, _, size in self._files())

    def _files(self) -> list[tuple[float, Path, int]]:
        out = []
        for f in self.folder.iterdir() if self.folder is not None and self.folder.is_dir() else ():
            try:
                st = f.lstat()
            except OSError:
                continue
            if f.is_file() or f.is_symlink():
                out.append((st.st_mtime, f, st.st_size))
        return sorted(out)

    def _trim(self) -> None:
        """Removes the oldest files until every file in the folder together is within `max_total_bytes`."""
        files = self._files()
        total = sum(size for _, _, size in files)
        while files and total > self.max_total_bytes:
            _, oldest, size = files.pop(0)
            total -= size
            oldest.unlink(missing_ok=True)


__all__ = ["Run", "RunStore", "SAVED_ID", "EDGES_DROPPED", "MAX_SAVED_RUN_BYTES", "MAX_STORE_BYTES",
           "MAX_CACHED_RUN_BYTES"]
