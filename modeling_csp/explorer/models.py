"""Models of the explorer: which spec names which model (and may be opened), hub lookups that cannot hold the
server, and `ModelEntry`, a loaded model with its runs and the caches that belong to that model.

- Which specs may be opened is the business of `model_roots`: None (the library, the CLI) allows any folder; the
  app sets it from CSP_MODEL_ROOTS, so that its model box opens only `default`, hub ids (looked up on the hub only,
  never as a local folder of the same relative name) and folders whose real path lies under those roots, and says
  the same for a folder that is absent and one not allowed.
- Hub lookups run on a small pool with a timeout and their answers, failures too, are cached: a flood of
  unknown names cannot hold the server's workers.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..circuits.evaluation import EvalOptions, task_split
from ..circuits.graph import CircuitGraph, n_total_nodes, node_locations, record_node_activations
from ..utils.sizes import approx_bytes, release_freed_memory
from .errors import UserError, first_line, log
from .runs import Run, RunStore
from .tasks import UserTasks

DEFAULT_PRETRAIN_TOKENS = 8192  # held-out text tokens for the example index built when a model ships none
MIN_PRETRAIN_TOKENS, MAX_PRETRAIN_TOKENS = 1024, 1_000_000
MAX_MODELS = 3  # models kept loaded at once (least recently used dropped first)
MAX_MODEL_BYTES = 3_000_000_000  # loaded models with their caches, estimated (least recently used dropped first)
MAX_PRUNE_WORKERS = 1  # pruning worker processes at once (each loads its own copy of the model)
MAX_SPEC_CHARS = 300
MAX_MODEL_PARAMS = 2_000_000_000  # dense parameter count a model's config may describe
MAX_UPLOAD_BYTES = 50_000_000  # a circuit file or viz_data.pt given to the app
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def default_roots() -> list[Path]:
    """The package's own models and the Hugging Face cache: the folders the app opens unless told otherwise."""
    from huggingface_hub import constants

    from ..model.loading import DEFAULT_MODEL_DIR

    return [DEFAULT_MODEL_DIR, Path(constants.HF_HUB_CACHE)]


# =====================================================================================================
# Which model a spec names
# =====================================================================================================


def not_available(spec: str) -> UserError:
    """The one message for a model that is absent or not allowed where folders are restricted (so the box reveals
    nothing about paths)."""
    shown = spec if len(spec) <= 80 else spec[:77] + "..."
    return UserError(f"model {shown!r} is not available: use 'default', a Hugging Face hub id (org/name) "
                     "or a converted model folder under the allowed model folders")


def check_spec(spec: str, default_model: str) -> str:
    """The spec stripped (`default_model` when empty), or UserError for one too long or with control characters."""
    spec = spec.strip()
    if not spec:
        return default_model
    if len(spec) > MAX_SPEC_CHARS:
        raise UserError(f"the model name is longer than {MAX_SPEC_CHARS} characters")
    if any(unicodedata.category(ch)[0] == "C" for ch in spec):
        raise UserError("the model name contains control characters")
    return spec


def _allowed_folder(spec: str, model_roots: list[Path]) -> str | None:
    """The folder a spec names when folders are restricted: its real path (links and `..` resolved) inside a
    root's, holding a config.json; None otherwise."""
    try:
        path = Path(spec).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    for root in model_roots:
        try:
            root = Path(root).expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if path.is_relative_to(root) and (path / "config.json").is_file():
            return str(path)
    return None


def resolve_spec(spec: str | None, model_roots: list[Path] | None, default_model: str = "default") -> tuple[str, str]:
    """(kind, name): ("default"|"folder"|"hub", what to load) for a spec, or UserError. Folders may lie anywhere
    when `model_roots` is None, else only under one of them; there a spec shaped like a hub id (org/name) is a hub
    id, whatever the working folder holds (a folder of that shape is named `./org/name` or by its full path)."""
    spec = check_spec(spec or "", default_model)
    if spec == "default":
        return "default", spec
    if model_roots is None:  # the library and the CLI: any folder, else a hub id
        return ("folder" if Path(spec).expanduser().exists() else "hub"), spec
    if HUB_ID.match(spec) and ".." not in spec:
        return "hub", spec
    folder = _allowed_folder(spec, model_roots)
    if folder is not None:
        return "folder", folder
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


def fetch_config(name: str) -> dict:
    """A hub model's config.json from the hub cache or the Hub, never a local folder (what `HubLookup` runs on its
    pool)."""
    from ..model.loading import read_hub_config

    return read_hub_config(name)


def dense_params(config: dict) -> int:
    """Parameters a CSP config describes if its weights were dense (what loading costs at most)."""
    g = lambda key: int(config.get(key) or 0)  # noqa: E731
    width = g("n_head") * g("d_head")
    per_layer = 3 * width * g("d_model") + width * g("d_model") + 2 * g("d_model") * g("d_mlp")
    return 2 * g("vocab_size") * g("d_model") + g("n_layer") * per_layer + g("vocab_size") ** 2 * bool(config.get("enable_bigram_table"))


# =====================================================================================================
# Loaded models, their runs and their caches
# =====================================================================================================


class Memo:
    """Thread-safe LRU caches of computed values, one per kind, each bounded in bytes (`approx_bytes` of each
    value), owned by one model (so that one model's values never evict another's and go when the model goes).
    The newest value of a kind stays even when it alone is over its budget. A value is computed outside the
    lock: two threads may compute the same value once each, never block each other on it."""

    BUDGETS = {"circuit": 64_000_000, "stats": 8_000_000, "full_loss": 1_000_000, "curve": 8_000_000,
               "task": 64_000_000, "task_acts": 256_000_000, "examples": 32_000_000,
               "example_index": 64_000_000}

    RELEASE_BYTES = 16_000_000  # evictions larger than this hand the memory back to the system

    def __init__(self, budgets: dict[str, int] | None = None):
        self.budgets = {**self.BUDGETS, **(budgets or {})}
        self._lock = threading.Lock()
        self._stores: dict[str, OrderedDict] = {kind: OrderedDict() for kind in self.budgets}
        self._bytes = {kind: 0 for kind in self.budgets}

    def get(self, kind: str, key, compute: Callable[[], Any]):
        store = self._stores[kind]
        with self._lock:
            if key in store:
                store.move_to_end(key)
                return store[key][0]
        value = compute()
        size = approx_bytes(value)
        freed = 0
        with self._lock:
            if key in store:
                self._bytes[kind] -= store.pop(key)[1]
            store[key] = (value, size)
            self._bytes[kind] += size
            while len(store) > 1 and self._bytes[kind] > self.budgets[kind]:
                dropped = store.popitem(last=False)[1][1]
                self._bytes[kind] -= dropped
                freed += dropped
        if freed > self.RELEASE_BYTES:
            release_freed_memory()
        return value

    def peek(self, kind: str, key, default=None):
        with self._lock:
            hit = self._stores[kind].get(key)
            return default if hit is None else hit[0]

    def sizes(self) -> dict[str, int]:
        """Entries held, per kind."""
        with self._lock:
            return {kind: len(store) for kind, store in self._stores.items()}

    def nbytes(self) -> int:
        """Estimated bytes held, all kinds together."""
        with self._lock:
            return sum(self._bytes.values())


class Preparation:
    """How far a model's one-time computation (`ModelEntry.prepare`) is: its progress callback writes (fraction,
    text) from the computing thread, and any page waiting on it reads them."""

    def __init__(self):
        self._lock = threading.Lock()
        self.fraction, self.text = 0.0, "waiting"
        self.started = threading.Event()
        self.done = threading.Event()
        self.error: str | None = None

    def start(self) -> None:
        self.started.set()

    def __call__(self, fraction: float, text: str) -> None:
        with self._lock:
            self.fraction, self.text = min(max(float(fraction), 0.0), 1.0), str(text)

    def finish(self, error: str | None = None) -> None:
        with self._lock:
            self.fraction, self.text, self.error = 1.0, ("failed" if error else "ready"), error
        self.done.set()

    def state(self) -> tuple[float, str]:
        with self._lock:
            return self.fraction, self.text


class ModelEntry:
    """A loaded model with its runs and everything computed from it that sessions share (lazily, cached). `tasks`
    and `store` are its explorer's user tasks and saved runs; `run_files` are circuit files offered as its runs.
    `kind` and `name` are what `resolve_spec` gives: a "hub" name is loaded from its hub snapshot, never from a
    local folder of the same relative name."""

    def __init__(self, spec: str, kind: str, name: str, tasks: UserTasks | None = None, store: RunStore | None = None,
                 pretrain_tokens: int = DEFAULT_PRETRAIN_TOKENS, run_files: Sequence[str] = (),
                 prune_slots: threading.Semaphore | None = None, cache_dir: str | Path | None = None):
        from ..model.loading import hub_folder, load_model_and_tokenizer, resolve_model

        self.spec = spec
        self.prune_slots = prune_slots if prune_slots is not None else threading.BoundedSemaphore(MAX_PRUNE_WORKERS)
        self.tasks = tasks if tasks is not None else UserTasks()
        self.store = store if store is not None else RunStore(tasks=self.tasks)
        if not MIN_PRETRAIN_TOKENS <= int(pretrain_tokens) <= MAX_PRETRAIN_TOKENS:
            raise UserError(f"CSP_APP_PRETRAIN_TOKENS={pretrain_tokens:,}: pick {MIN_PRETRAIN_TOKENS:,} to "
                            f"{MAX_PRETRAIN_TOKENS:,} held-out tokens for node examples")
        self.pretrain_tokens = int(pretrain_tokens)
        self.cache_dir = cache_dir
        try:
            self.folder = hub_folder(name) if kind == "hub" else resolve_model(name)
            self.model, self.tokenizer = load_model_and_tokenizer(self.folder)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        except Exception as exc:  # anything else while loading: still a message, not a traceback
            raise UserError(f"could not load model {spec!r}: {first_line(exc)}") from None
        self.model.eval()
        self.config = self.model.config
        self.memo = Memo()
        self._once_lock = threading.Lock()
        self._locks = {"means": threading.Lock(), "index": threading.Lock()}
        self.preparation = Preparation()
        self._means = self._index = None
        self._index_on_disk = False
        self._computed: list[str] = []
        self._seconds: dict[str, float] = {}
        self._windows = None
        self.vocab = self._vocab_strings()
        self.training_curve = self._read_training_curve()
        self.runs: dict[str, Run] = OrderedDict()
        self.checked_runs: set[str] = set()  # saved runs found to belong to this model
        self._add_shipped_runs()
        for path in run_files:
            try:
                run = import_run_file(self, path)
                self.runs[run.id] = run
                for notice in run.circuit.notices:
                    log(f"{path}: {notice}")
            except UserError as exc:
                log(f"could not import {path}: {exc}")

    def nbytes(self) -> int:
        """Estimated bytes this loaded model holds: weights, caches, mean and held-out activations."""
        return approx_bytes([self.model, self._windows, self._means, self._index]) + self.memo.nbytes()

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
                      path=e["path"], task=e.get("task"), k=e.get("k"), tasks=self.tasks)
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

    def prepare(self):
        """The model's mean activations, then its example index (`circuits.model_cache.Prepared`), once per model:
        each read from the cache on disk, else computed (minutes at a released model's size) and cached there, so a
        restart reads them. `preparation` says how far it is; each part waits only for its own computation (the
        node panel's index never waits for the means)."""
        from ..circuits.model_cache import Prepared

        self.preparation.start()
        try:
            means, index = self.means(), self.example_index()
        except UserError as exc:
            self.preparation.finish(str(exc))
            raise
        self.preparation.finish()
        with self._once_lock:
            return Prepared(means, index, self._index_on_disk, list(self._computed), dict(self._seconds))

    def _once(self, name: str, compute):
        lock = self._locks[name]
        with lock:
            if getattr(self, f"_{name}") is None:
                t = time.perf_counter()
                try:
                    value, computed = compute()
                except UserError:
                    raise
                except Exception as exc:
                    raise UserError(f"could not compute the {name.replace('_', ' ')}: {first_line(exc)}") from None
                with self._once_lock:
                    self._seconds[name] = round(time.perf_counter() - t, 2)
                    if computed:
                        self._computed.append(name)
                setattr(self, f"_{name}", value)
            return getattr(self, f"_{name}")

    def means(self) -> dict[str, torch.Tensor]:
        """Mean activations over held-out pretraining-like text (as pruning uses), cached on disk too."""
        from ..circuits.model_cache import mean_activations

        return self._once("means", lambda: mean_activations(
            self.model, self.tokenizer, cache_dir=self.cache_dir,
            progress=lambda f, text: self.preparation(0.5 * f, text)))

    def example_index(self):
        """The shipped or cached example index, else the app's own over `pretrain_tokens`, built once and cached."""
        from ..circuits.model_cache import example_index

        def compute():
            index, on_disk, computed = example_index(self.model, self.tokenizer, self.pretrain_tokens, self.folder,
                                                     self.cache_dir,
                                                     progress=lambda f, text: self.preparation(0.5 + 0.5 * f, text))
            self._index_on_disk = on_disk
            return index, computed

        return self._once("index", compute)

    def means_for(self, circuit: CircuitGraph):
        """What ablated nodes are replaced by: means for mean ablation, None (zero) otherwise."""
        return self.means() if circuit.ablation == "mean" else None

    def task_batch(self, task: str, options: EvalOptions):
        """The held-out split of a task that circuits evaluated with `options` use (cached)."""
        def make():
            try:
                batch = task_split(self.tasks.resolve(task), self.tokenizer, self.config.block_size, options)
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

    def example_windows(self) -> torch.Tensor:
        """(n, T) token windows of held-out text (`ablation.example_windows`, `pretrain_tokens` of them)."""
        with self._once_lock:
            if self._windows is None:
                from ..circuits.ablation import example_windows

                try:
                    self._windows = example_windows(self.model, self.tokenizer, self.pretrain_tokens)
                except Exception as exc:
                    raise UserError(f"no held-out text for node examples: {first_line(exc)}") from None
            return self._windows

    def run_forward(self, ids: torch.Tensor, masks=None, means=None, record: str | None = None, attention_mask=None):
        """Logits (B, T, V) of the model (circuit-ablated with `masks`), and recorded activations."""
        from ..circuits.ablation import ablate

        with torch.no_grad(), contextlib.ExitStack() as stack:
            if masks is not None:
                stack.enter_context(ablate(self.model, masks, means))
            acts = stack.enter_context(self.model.record_activations(record)) if record else {}
            logits = self.model(ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, acts


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
    release_freed_memory()  # what parsing a large file took
    return Run(id=rid, name=f"imported · {label}", source="imported", circuit=circuit, task=circuit.task,
               k=circuit.k or circuit.n_nodes, tasks=entry.tasks)


__all__ = [
    "Preparation", "MAX_MODELS", "MAX_MODEL_BYTES", "MAX_PRUNE_WORKERS", "MAX_SPEC_CHARS", "MAX_MODEL_PARAMS", "MAX_UPLOAD_BYTES", "HUB_ID", "default_roots", "not_available",
    "check_spec", "resolve_spec", "HubLookup", "fetch_config", "dense_params", "Memo", "ModelEntry", "import_run_file",
]
