"""Models, runs and sessions of the explorer: what is loaded, what may be loaded, and where runs live.

- `get_model(spec)` gives a `ModelEntry` (model, tokenizer, its runs, and caches that belong to that model),
  loading it once. Which specs may be opened is `settings.model_roots`' business: None (the library, the CLI)
  allows any folder; the app sets it from CSP_MODEL_ROOTS, so that its model box opens only `default`, hub
  ids and folders under those roots, and says the same for a folder that is absent and one not allowed.
- Hub lookups run on a small pool with a timeout and their answers, failures too, are cached: a flood of
  unknown names cannot hold the server's workers.
- `RunStore` keeps the runs pruned or imported in the app under a content id (`saved:…`), on disk within a
  size cap, so that they survive a reload and travel in a share link.
- `Session` is one browser session: the ids of its runs and its last good selection.

Nothing here knows about Gradio. A problem with what was asked for raises `UserError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import threading
import time
import unicodedata
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..circuits.graph import CircuitGraph, compute_edges, n_total_nodes, node_locations, record_node_activations
from ..circuits.evaluation import EvalOptions, task_split
from ..utils.jsonio import dumps_strict, write_text_atomic

MAX_MODELS = 3  # models kept loaded at once (least recently used dropped first)
MAX_SPEC_CHARS = 300
MAX_MODEL_PARAMS = 2_000_000_000  # dense parameter count a model's config may describe
MAX_UPLOAD_BYTES = 50_000_000  # a circuit file or viz_data.pt given to the app
MAX_SAVED_RUN_BYTES = 8_000_000  # one saved run on disk (circuit + pruning scores; without its edges when larger)
MAX_STORE_BYTES = 500_000_000  # the whole store; the oldest runs go first
MAX_SESSION_RUNS = 50  # runs a session (and a browser) remembers
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
SAVED_ID = re.compile(r"^saved:[0-9a-f]{16}$")
EDGES_DROPPED = "edges_dropped"  # a saved run's meta: its file left out the edges (rebuilt from the weights)
MAX_TASK_TEXT_BYTES = 1_000_000  # a user task pasted or uploaded in the app
MAX_TASK_EXAMPLES = 5_000
MAX_CUSTOM_TASKS = 200  # user tasks the server keeps (least recently used dropped first)
CUSTOM_TASK = re.compile(r"^custom:[A-Za-z0-9_.-]{1,40}:[0-9a-f]{12}$")


class UserError(ValueError):
    """A problem with what the user asked for; shown as a message, never as a traceback."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name when it has none), for one-line messages."""
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0] if text else type(exc).__name__


def log(message: str) -> None:
    print(f"[explorer] {message}", file=sys.stderr, flush=True)  # stdout stays clean for the CLI's JSON


def default_roots() -> list[Path]:
    """The package's own models and the Hugging Face cache: the folders the app opens unless told otherwise."""
    from huggingface_hub import constants

    from ..model.loading import DEFAULT_MODEL_DIR

    return [DEFAULT_MODEL_DIR, Path(constants.HF_HUB_CACHE)]


@dataclass
class Settings:
    """What the host configures. The app sets these from its environment (see app.py); the library's
    defaults allow any folder and keep saved runs in memory only."""

    default_model: str = "default"
    models: list[str] = field(default_factory=lambda: ["default"])  # what the model box lists
    run_files: list[str] = field(default_factory=list)  # circuit files offered as runs of every model
    pretrain_tokens: int = 8192  # held-out text for live activating examples
    model_roots: list[Path] | None = None  # folders models may be opened from (None: anywhere)
    hub_timeout_s: float = 10.0
    store_dir: Path | None = None  # where saved runs live (None: memory only)


settings = Settings()


# =====================================================================================================
# User tasks: named by their content, so that a name always means the same examples
# =====================================================================================================

_CUSTOM_TASKS: OrderedDict[str, Any] = OrderedDict()
_CUSTOM_LOCK = threading.Lock()


def _task_digest(triples: list[list[str]]) -> str:
    return hashlib.sha256(json.dumps(triples, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def register_task(label: str, triples: list[list[str]]):
    """Registers a user task as `custom:<label>:<digest of its examples>` and returns the `Task` (the same name
    for the same examples, whoever registers them)."""
    from ..circuits.tasks import task_from_pairs

    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(label or "task")).strip("_")[:40] or "task"
    name = f"custom:{label}:{_task_digest(triples)}"
    with _CUSTOM_LOCK:
        if name in _CUSTOM_TASKS:
            _CUSTOM_TASKS.move_to_end(name)
            return _CUSTOM_TASKS[name]
        task = task_from_pairs(name, triples, description=f"your task ({len(triples)} examples)")
        _CUSTOM_TASKS[name] = task
        while len(_CUSTOM_TASKS) > MAX_CUSTOM_TASKS:
            _CUSTOM_TASKS.popitem(last=False)
    return task


def custom_task_from_text(entry: "ModelEntry", text: Any, label: Any = "task"):
    """A user task from JSON lines (`{"prompt", "correct", "incorrect"}` per line), validated against the model's
    tokenizer and context (`modeling_csp.tasks.task_from_jsonl`) and registered; size-capped."""
    from ..circuits.tasks import task_from_jsonl

    text = text if isinstance(text, str) else ""
    if not text.strip():
        raise UserError('paste or upload task lines first: one {"prompt", "correct", "incorrect"} object per line')
    if len(text.encode("utf-8")) > MAX_TASK_TEXT_BYTES:
        raise UserError(f"the task is {len(text.encode('utf-8')) / 1e6:.1f} MB; up to {MAX_TASK_TEXT_BYTES / 1e6:.0f} MB "
                        "of task lines are read")
    try:
        task = task_from_jsonl(text, entry.tokenizer, max_len=entry.config.block_size, name="task", source="line")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if len(task.examples) > MAX_TASK_EXAMPLES:
        raise UserError(f"the task has {len(task.examples)} examples; up to {MAX_TASK_EXAMPLES} are used")
    return register_task(str(label or "task"), [[e.prompt, e.correct, e.alternative] for e in task.examples])


def task_of_circuit(circuit: CircuitGraph) -> str | None:
    """The task name a circuit is browsed under: a built-in name as it is, a user task (examples in
    `meta.task_examples`) registered under its content name, None when there is no usable task."""
    from ..circuits.tasks import circuit_examples, list_tasks

    task = circuit.task
    if task is None or task in {t.name for t in list_tasks()}:
        return task
    triples = circuit_examples(circuit.meta, limit=MAX_TASK_EXAMPLES)
    if triples is None:
        return task if task in _CUSTOM_TASKS else None
    label = task.split(":")[1] if CUSTOM_TASK.match(task) else task
    return register_task(label, [list(t) for t in triples]).name


def resolve_task(name: Any):
    """The `Task` a name means: a built-in task or a registered user task."""
    from ..circuits.tasks import get_task

    name = str(name or "")
    with _CUSTOM_LOCK:
        if name in _CUSTOM_TASKS:
            _CUSTOM_TASKS.move_to_end(name)
            return _CUSTOM_TASKS[name]
    try:
        return get_task(name)
    except ValueError:
        if CUSTOM_TASK.match(name):
            raise UserError(f"task {name!r} is not known here any more: open a run made for it, or add the task "
                            "lines again") from None
        raise UserError(f"unknown task {name!r} (`csp tasks` lists them)") from None


def is_task(name: Any) -> bool:
    try:
        resolve_task(name)
        return True
    except UserError:
        return False


# =====================================================================================================
# Which model a spec names
# =====================================================================================================


def not_available(spec: str) -> UserError:
    """The one message for a model that is absent or not allowed (so the box reveals nothing about paths)."""
    shown = spec if len(spec) <= 80 else spec[:77] + "..."
    where = "" if settings.model_roots is None else " under the allowed model folders"
    return UserError(f"model {shown!r} is not available: use 'default', a Hugging Face hub id (org/name) "
                     f"or a converted model folder{where}")


def _check_spec(spec: str) -> str:
    spec = spec.strip()
    if not spec:
        return settings.default_model
    if len(spec) > MAX_SPEC_CHARS:
        raise UserError(f"the model name is longer than {MAX_SPEC_CHARS} characters")
    if any(unicodedata.category(ch)[0] == "C" for ch in spec):
        raise UserError("the model name contains control characters")
    return spec


def _allowed_folder(spec: str) -> str | None:
    """The folder a spec names when folders are restricted: inside a root (after resolving links and `..`)
    and holding a config.json; None otherwise."""
    try:
        path = Path(spec).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    for root in settings.model_roots or []:
        try:
            root = Path(root).expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if path.is_relative_to(root) and (path / "config.json").is_file():
            return str(path)
    return None


def resolve_spec(spec: str | None) -> tuple[str, str]:
    """(kind, name): ("default"|"folder"|"hub", what to load) for a spec, or UserError."""
    spec = _check_spec(spec or "")
    if spec == "default":
        return "default", spec
    if settings.model_roots is None:  # the library and the CLI: any folder, else a hub id
        return ("folder" if Path(spec).expanduser().exists() else "hub"), spec
    folder = _allowed_folder(spec)
    if folder is not None:
        return "folder", folder
    if HUB_ID.match(spec) and ".." not in spec:
        return "hub", spec
    raise not_available(spec)


# =====================================================================================================
# Hub lookups: timed out and cached
# =====================================================================================================


class HubLookup:
    """Fetches a hub model's config.json on a small pool, with a timeout; caches every answer (failures for
    `failure_ttl_s`) and refuses new names while `max_pending` lookups are under way, so that unknown names,
    however many, occupy at most `workers` threads and never the request queue."""

    def __init__(self, fetch: Callable[[str], dict], workers: int = 2, max_pending: int = 2,
                 failure_ttl_s: float = 300.0):
        self._fetch = fetch
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hub-lookup")
        self._max_pending = max_pending
        self._failure_ttl = failure_ttl_s
        self._lock = threading.Lock()
        self._answers: OrderedDict[str, tuple[float, dict | None, str | None]] = OrderedDict()
        self._pending: dict[str, Any] = {}

    def cached(self, name: str) -> tuple[dict | None, str | None] | None:
        """(config, error) if an answer for `name` is cached and fresh, else None."""
        with self._lock:
            hit = self._answers.get(name)
            if hit is None or (hit[2] is not None and time.monotonic() - hit[0] > self._failure_ttl):
                return None
            return hit[1], hit[2]

    def config(self, name: str, timeout_s: float) -> dict:
        """The hub model's config.json as a dict, or UserError (cached, timed out, or refused when busy)."""
        hit = self.cached(name)
        if hit is None:
            with self._lock:
                future = self._pending.get(name)
                if future is None:
                    if len(self._pending) >= self._max_pending:
                        raise UserError("other model lookups on the Hugging Face hub are under way; try again in a moment")
                    future = self._pool.submit(self._run, name)
                    self._pending[name] = future
            try:
                hit = future.result(timeout=timeout_s)
            except FutureTimeout:
                raise UserError(f"the Hugging Face hub did not answer about {name!r} within {timeout_s:.0f} s") from None
        config, error = hit
        if error is not None:
            raise UserError(error)
        return config

    def _run(self, name: str) -> tuple[dict | None, str | None]:
        try:
            answer: tuple[dict | None, str | None] = (self._fetch(name), None)
        except Exception as exc:
            answer = (None, str(exc) if isinstance(exc, ValueError) else f"could not look up {name!r}: {first_line(exc)}")
        with self._lock:
            self._answers[name] = (time.monotonic(), *answer)
            while len(self._answers) > 1024:
                self._answers.popitem(last=False)
            self._pending.pop(name, None)
        return answer


def _fetch_config(name: str) -> dict:
    from ..model.loading import read_config_json

    return read_config_json(name)


hub = HubLookup(_fetch_config)


def _dense_params(config: dict) -> int:
    """Parameters a CSP config describes if its weights were dense (what loading costs at most)."""
    g = lambda key: int(config.get(key) or 0)  # noqa: E731
    width = g("n_head") * g("d_head")
    per_layer = 3 * width * g("d_model") + width * g("d_model") + 2 * g("d_model") * g("d_mlp")
    return 2 * g("vocab_size") * g("d_model") + g("n_layer") * per_layer + g("vocab_size") ** 2 * bool(config.get("enable_bigram_table"))


# =====================================================================================================
# Runs, loaded models and their caches
# =====================================================================================================


@dataclass
class Run:
    """A circuit to explore: shipped with the model, imported, or pruned in the app (then with its pruning
    scores, which rank every node, so any k is possible)."""

    id: str
    name: str
    source: str  # "shipped" | "imported" | "pruned"
    path: str | None = None
    circuit: CircuitGraph | None = None
    scores: dict[str, torch.Tensor] | None = None
    task: str | None = None
    k: int | None = None

    def __post_init__(self):
        if self.circuit is not None:
            self.task = task_of_circuit(self.circuit) or self.task

    def load(self) -> CircuitGraph:
        if self.circuit is None:
            self.circuit = CircuitGraph.load(self.path)
            self.task = task_of_circuit(self.circuit) or self.task
        return self.circuit


class Memo:
    """Small thread-safe LRU caches of computed values, one per kind, owned by one model (so that one model's
    values never evict another's and go when the model goes). A value is computed outside the lock: two
    threads may compute the same value once each, never block each other on it."""

    LIMITS = {"circuit": 64, "stats": 256, "full_loss": 64, "curve": 16, "task": 8, "task_acts": 2,
              "examples": 256}

    def __init__(self):
        self._lock = threading.Lock()
        self._stores: dict[str, OrderedDict] = {kind: OrderedDict() for kind in self.LIMITS}

    def get(self, kind: str, key, compute: Callable[[], Any]):
        store = self._stores[kind]
        with self._lock:
            if key in store:
                store.move_to_end(key)
                return store[key]
        value = compute()
        with self._lock:
            store[key] = value
            while len(store) > self.LIMITS[kind]:
                store.popitem(last=False)
        return value

    def peek(self, kind: str, key, default=None):
        with self._lock:
            return self._stores[kind].get(key, default)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {kind: len(store) for kind, store in self._stores.items()}


class ModelEntry:
    """A loaded model with its runs and everything computed from it that sessions share (lazily, cached)."""

    def __init__(self, spec: str, kind: str, name: str):
        from ..model.loading import load_model_and_tokenizer, resolve_model

        self.spec = spec
        try:
            self.folder = resolve_model(name)
            self.model, self.tokenizer = load_model_and_tokenizer(name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        except Exception as exc:  # anything else while loading: still a message, not a traceback
            raise UserError(f"could not load model {spec!r}: {first_line(exc)}") from None
        self.model.eval()
        self.config = self.model.config
        self.memo = Memo()
        self._once_lock = threading.Lock()
        self._means = None
        self._pretrain = None
        self.vocab = self._vocab_strings()
        self.training_curve = self._read_training_curve()
        self.runs: dict[str, Run] = OrderedDict()
        self.checked_runs: set[str] = set()  # saved runs found to belong to this model
        self._add_shipped_runs()
        for path in settings.run_files:
            try:
                run = import_run_file(self, path)
                self.runs[run.id] = run
                for notice in run.circuit.notices:
                    log(f"{path}: {notice}")
            except UserError as exc:
                log(f"could not import {path}: {exc}")

    # -- static data ---------------------------------------------------------------------------

    def _vocab_strings(self) -> list[str]:
        """Each token alone as text, a partial character's bytes as `⟨e9⟩` escapes (never U+FFFD)."""
        from ..model.tokenization import texts_of_pieces, token_pieces

        return [texts_of_pieces([piece])[0] for piece in token_pieces(self.tokenizer, range(self.config.vocab_size))]

    def _read_training_curve(self):
        path = Path(self.folder) / "training_curve.json" if Path(self.folder).is_dir() else None
        if path is not None and path.is_file() and path.stat().st_size < 20_000_000:
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                return None
        return None

    def _add_shipped_runs(self):
        from ..model.loading import shipped_circuits

        try:
            entries = shipped_circuits(self.folder)
        except Exception as exc:
            log(f"no shipped circuits for {self.spec}: {first_line(exc)}")
            return
        for e in sorted(entries, key=lambda e: not e.get("at_target")):  # the target-loss circuit first
            stem = Path(e["path"]).stem
            target = " (target loss)" if e.get("at_target") else ""
            run = Run(id=f"shipped:{stem}", name=f"shipped · {e.get('task')} · k={e.get('k')}{target}", source="shipped",
                      path=e["path"], task=e.get("task"), k=e.get("k"))
            self.runs[run.id] = run

    def token_strs(self, ids) -> list[str]:
        """A sequence's tokens as text that joins back to the sequence: a character split over tokens is shown
        on the token that completes it (`tokenization.token_texts`)."""
        from ..model.tokenization import texts_of_pieces, token_pieces

        ids = [int(x) for x in ids]
        pieces = token_pieces(self.tokenizer, ids)
        return texts_of_pieces([p if 0 <= i < len(self.vocab) else f"<{i}>" for i, p in zip(ids, pieces)])

    @property
    def n_layer(self) -> int:
        return int(self.config.n_layer)

    @property
    def d_head(self) -> int:
        return int(self.config.d_head)

    @property
    def n_total_nodes(self) -> int:
        """Nodes of the whole model (every channel at every node location)."""
        return n_total_nodes(self.config)

    # -- shared computations ---------------------------------------------------------------------

    def means(self) -> dict[str, torch.Tensor]:
        """Mean activations over held-out pretraining-like text (as pruning uses), cached on disk too."""
        with self._once_lock:
            if self._means is None:
                from ..circuits.ablation import compute_mean_activations

                try:
                    self._means = compute_mean_activations(self.model, self.tokenizer)
                except Exception as exc:
                    raise UserError(f"could not compute mean activations for mean ablation: {first_line(exc)}") from None
            return self._means

    def means_for(self, circuit: CircuitGraph):
        """What ablated nodes are replaced by: means for mean ablation, None (zero) otherwise."""
        return self.means() if circuit.ablation == "mean" else None

    def task_batch(self, task: str, options: EvalOptions):
        """The held-out split of a task that circuits evaluated with `options` use (cached)."""
        def make():
            try:
                batch = task_split(resolve_task(task), self.tokenizer, self.config.block_size, options)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            if int(batch.input_ids.max()) >= self.config.vocab_size:
                raise UserError(f"task {task!r}: the tokenizer gives ids past the model's vocabulary "
                                f"({self.config.vocab_size}); this tokenizer does not belong to this model")
            return batch

        return self.memo.get("task", (task, options.data_key), make)

    def record(self, ids: torch.Tensor, attention_mask=None, chunk: int = 32) -> dict[str, torch.Tensor]:
        """{location: float16 (n, T, width)} at every node location, a chunk of rows at a time (bounded memory)."""
        parts = []
        for start in range(0, ids.shape[0], chunk):
            mask = None if attention_mask is None else attention_mask[start: start + chunk]
            parts.append(record_node_activations(self.model, ids[start: start + chunk], node_locations(self.config),
                                                 mask, batch_size=chunk))
        return {loc: torch.cat([p[loc] for p in parts]) for loc in parts[0]}

    def task_activations(self, task: str, options: EvalOptions):
        """(batch, {location: float16 (n, T, width)}): every node location recorded once per task (cached)."""
        batch = self.task_batch(task, options)
        return batch, self.memo.get("task_acts", (task, options.data_key),
                                    lambda: self.record(batch.input_ids, batch.attention_mask))

    def pretrain(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(windows (n, T) token ids, {location: float16 (n, T, width)}) on held-out text, for live examples."""
        with self._once_lock:
            if self._pretrain is None:
                from ..circuits.ablation import example_windows

                try:
                    windows = example_windows(self.model, self.tokenizer, settings.pretrain_tokens)
                except Exception as exc:
                    raise UserError(f"no pretraining text for live activating examples: {first_line(exc)}") from None
                self._pretrain = (windows, self.record(windows))
            return self._pretrain

    def run_forward(self, ids: torch.Tensor, masks=None, means=None, record: str | None = None, attention_mask=None):
        """Logits (B, T, V) of the model (circuit-ablated with `masks`), and recorded activations."""
        from ..circuits.ablation import ablate

        with torch.no_grad(), contextlib.ExitStack() as stack:
            if masks is not None:
                stack.enter_context(ablate(self.model, masks, means))
            acts = stack.enter_context(self.model.record_activations(record)) if record else {}
            logits = self.model(ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, acts


_MODELS: "OrderedDict[str, ModelEntry]" = OrderedDict()
_MODELS_LOCK = threading.Lock()
_LOADING: dict[str, threading.Lock] = {}


def default_model_spec() -> str:
    return settings.default_model


def loaded_models() -> list[str]:
    """Specs of the models loaded now, least recently used first."""
    with _MODELS_LOCK:
        return list(_MODELS)


def get_model(spec: str | None) -> ModelEntry:
    """The loaded model for a spec ('default', a folder, a hub id), loading it once (concurrent callers wait).

    Hub ids are looked up first (timed out, cached); a folder must lie under `settings.model_roots` when set."""
    spec = _check_spec(spec or "")
    kind, name = resolve_spec(spec)  # the policy holds for models loaded before it was set, too
    with _MODELS_LOCK:
        if spec in _MODELS:
            _MODELS.move_to_end(spec)
            return _MODELS[spec]
    if kind == "hub":
        config = hub.config(name, settings.hub_timeout_s)
        if config.get("model_type") != "csp":
            raise UserError(f"{spec} is not a weight-sparse CSP model (model_type={config.get('model_type')!r})")
        if _dense_params(config) > MAX_MODEL_PARAMS:
            raise UserError(f"{spec} is larger than this server loads ({MAX_MODEL_PARAMS:,} parameters)")
    with _MODELS_LOCK:
        loading = _LOADING.setdefault(spec, threading.Lock())
    with loading:
        with _MODELS_LOCK:
            if spec in _MODELS:
                return _MODELS[spec]
        entry = ModelEntry(spec, kind, name)
        with _MODELS_LOCK:
            _MODELS[spec] = entry
            while len(_MODELS) > MAX_MODELS:
                _MODELS.popitem(last=False)
            _LOADING.pop(spec, None)
        return entry


def import_run_file(entry: ModelEntry, path: str, name: str | None = None) -> Run:
    """A circuit file (.json) or a visualizer viz_data.pt as a run, checked against the model (size-capped): a
    non-finite loss is refused, and edges that are not the model's weights are replaced by the recomputed ones,
    said in `run.circuit.notices` (the app's import message and `csp next-tokens` show it)."""
    p = Path(path)
    label = name or p.name
    try:
        size = p.stat().st_size
    except OSError:
        raise UserError(f"{label}: no such file") from None
    if size > MAX_UPLOAD_BYTES:
        raise UserError(f"{label} is {size / 1e6:.0f} MB; circuit files up to {MAX_UPLOAD_BYTES / 1e6:.0f} MB are read")
    if p.suffix.lower() == ".json":
        try:
            circuit = CircuitGraph.load(p)
        except ValueError as exc:
            message = str(exc).replace(str(p), label)
            raise UserError(message if message.startswith(label) else f"{label}: {message}") from None
    else:
        from ..circuits.viz_import import import_viz_data

        try:
            circuit = import_viz_data(p)
        except ValueError as exc:
            raise UserError(str(exc).replace(str(p), label)) from None
        except Exception as exc:
            raise UserError(f"{label} is not a viz_data.pt file ({first_line(exc)})") from None
    try:
        circuit.check_model(entry.model, entry.spec)
    except ValueError as exc:
        raise UserError(f"{label}: {exc}") from None
    circuit.match_weights(entry.model)  # edges that are not the model's weights are recomputed (circuit.notices)
    rid = f"imported:{re.sub(r'[^A-Za-z0-9_.-]+', '_', p.stem)[:80]}"
    return Run(id=rid, name=f"imported · {label}", source="imported", circuit=circuit, task=circuit.task,
               k=circuit.k or circuit.n_nodes)


# =====================================================================================================
# Saved runs (server side) and sessions
# =====================================================================================================


class RunStore:
    """Runs pruned or imported in the app, kept under a content id `saved:<16 hex>`: in memory (LRU) and, with
    a folder, on disk as one JSON file each (circuit, pruning scores), at most `max_file_bytes` each and
    `max_total_bytes` together (oldest removed first). A file too large goes without what the app can recompute:
    first the circuit's node data, then its edges (rebuilt from the model's weights, see `find_run`). A run too
    large even so lives in memory only."""

    def __init__(self, folder: Path | None = None, max_file_bytes: int = MAX_SAVED_RUN_BYTES,
                 max_total_bytes: int = MAX_STORE_BYTES, cached: int = 64):
        self.folder = Path(folder) if folder else None
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self._cached = cached
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, Run] = OrderedDict()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

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
                self._trim()
        with self._lock:
            self._runs[saved.id] = saved
            self._runs.move_to_end(saved.id)
            while len(self._runs) > self._cached:
                self._runs.popitem(last=False)
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
                  circuit=circuit, scores=scores, task=circuit.task, k=circuit.k or circuit.n_nodes)
        with self._lock:
            self._runs[run_id] = run
            while len(self._runs) > self._cached:
                self._runs.popitem(last=False)
        return run

    def _trim(self) -> None:
        files = sorted(self.folder.glob("*.json"), key=lambda f: f.stat().st_mtime)
        total = sum(f.stat().st_size for f in files)
        while files and total > self.max_total_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)


_STORE: RunStore | None = None


def run_store() -> RunStore:
    """The store for saved runs, made on first use from `settings.store_dir`."""
    global _STORE
    if _STORE is None or (_STORE.folder != (Path(settings.store_dir) if settings.store_dir else None)):
        _STORE = RunStore(settings.store_dir)
    return _STORE


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
    store = run_store()
    saved = [_for_model(entry, store.load(rid)) for rid, spec in session.runs.items() if spec == entry.spec]
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
    return _for_model(entry, run_store().load(run_id))


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


__all__ = [
    "choose_run", "UserError", "first_line", "Settings", "settings", "default_roots", "resolve_spec", "not_available",
    "HubLookup", "hub", "Run", "Memo", "ModelEntry", "get_model", "default_model_spec", "loaded_models",
    "import_run_file", "RunStore", "run_store", "Session", "session_runs", "runs_for_task", "find_run",
    "MAX_UPLOAD_BYTES", "MAX_SESSION_RUNS", "register_task", "custom_task_from_text", "task_of_circuit", "resolve_task",
    "is_task",
]
