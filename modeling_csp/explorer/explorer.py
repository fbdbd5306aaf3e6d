"""`Explorer`: what one host of the explorer holds (its settings, loaded models, saved runs, user tasks, hub
lookups), so that an app, a CLI call and each test have their own and share nothing through the process.

`explorer.get_model(spec)` gives a `ModelEntry` (model, tokenizer, its runs, and caches that belong to that
model), loading it once. Which specs may be opened is `settings.model_roots`' business (see `models`).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .errors import UserError
from .models import (
    DEFAULT_PRETRAIN_TOKENS, MAX_MODEL_BYTES, MAX_MODEL_PARAMS, MAX_MODELS, MAX_PRUNE_WORKERS, HubLookup, ModelEntry, check_spec, default_roots,
    dense_params, fetch_config, resolve_spec,
)
from .runs import RunStore
from .tasks import UserTasks


@dataclass(frozen=True)
class Settings:
    """What the host configures. The app reads these from its environment (`from_env`); the library's defaults
    allow any folder and keep saved runs in memory only."""

    default_model: str = "default"
    models: list[str] = field(default_factory=lambda: ["default"])  # what the model box lists
    run_files: list[str] = field(default_factory=list)  # circuit files offered as runs of every model
    pretrain_tokens: int = DEFAULT_PRETRAIN_TOKENS  # held-out text of the example index built for a model without one
    model_roots: list[Path] | None = None  # folders models may be opened from (None: anywhere)
    hub_timeout_s: float = 10.0
    store_dir: Path | None = None  # where saved runs live (None: memory only)
    prune_workers: int = MAX_PRUNE_WORKERS  # pruning worker processes at once
    model_bytes: int = MAX_MODEL_BYTES  # loaded models with their caches, estimated
    cache_dir: Path | None = None  # mean activations and example indexes on disk (None: $CSP_CACHE_DIR or HF_HOME)

    @classmethod
    def from_env(cls, app_dir: str | Path, environ: Mapping[str, str] | None = None) -> "Settings":
        """The app's settings from its environment (see `modeling_csp.app.ui`), the model list from `app_dir`'s
        csp_space.json when CSP_MODELS is unset."""
        from ..deploy import listed_models

        env = os.environ if environ is None else environ
        models = listed_models(Path(app_dir), env.get("CSP_MODELS"))
        return cls(
            default_model=env.get("CSP_APP_MODEL") or models[0],
            models=models,
            run_files=[p for p in env.get("CSP_APP_IMPORT", "").split(os.pathsep) if p],
            pretrain_tokens=int(env.get("CSP_APP_PRETRAIN_TOKENS", DEFAULT_PRETRAIN_TOKENS)),
            model_roots=[Path(p) for p in env.get("CSP_MODEL_ROOTS", "").split(os.pathsep) if p] or default_roots(),
            store_dir=Path(env.get("CSP_APP_STORE") or Path(tempfile.gettempdir()) / "csp_app_runs"),
        )


class Explorer:
    """One explorer: its settings, the models it has loaded (the most recently used, at most `MAX_MODELS` and
    `settings.model_bytes` with their caches), its saved runs
    (`store`), the user tasks it knows (`tasks`) and its hub lookups (`hub`)."""

    def __init__(self, settings: Settings | None = None, hub: HubLookup | None = None):
        self.settings = settings if settings is not None else Settings()
        self.tasks = UserTasks()
        self.store = RunStore(self.settings.store_dir, tasks=self.tasks)
        self.hub = hub if hub is not None else HubLookup(fetch_config)
        self._models: OrderedDict[str, ModelEntry] = OrderedDict()
        self._models_lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.prune_slots = threading.BoundedSemaphore(max(1, self.settings.prune_workers))

    @property
    def default_model(self) -> str:
        return self.settings.default_model

    def resolve_spec(self, spec: str | None) -> tuple[str, str]:
        """(kind, name): ("default"|"folder"|"hub", what to load) for a spec under this explorer's model roots."""
        return resolve_spec(spec, self.settings.model_roots, self.settings.default_model)

    def loaded_models(self) -> list[str]:
        """Specs of the models loaded now, least recently used first."""
        with self._models_lock:
            return list(self._models)

    def _trim_models(self) -> None:
        """Drops the least recently used models beyond `MAX_MODELS` or `settings.model_bytes` (the newest stays);
        called with the lock held."""
        sizes = {spec: entry.nbytes() for spec, entry in self._models.items()}
        while len(self._models) > 1 and (len(self._models) > MAX_MODELS
                                         or sum(sizes.values()) > self.settings.model_bytes):
            sizes.pop(self._models.popitem(last=False)[0], None)

    def get_model(self, spec: str | None) -> ModelEntry:
        """The loaded model for a spec ('default', a folder, a hub id), loading it once (concurrent callers wait).

        Hub ids are looked up first (timed out, cached); a folder must lie under `settings.model_roots` when set."""
        spec = check_spec(spec or "", self.settings.default_model)
        kind, name = self.resolve_spec(spec)  # the policy holds for models loaded before it was set, too
        with self._models_lock:
            if spec in self._models:
                self._models.move_to_end(spec)
                if len(self._models) > 1:  # its caches may have grown since
                    self._trim_models()
                return self._models[spec]
        if kind == "hub":
            config = self.hub.config(name, self.settings.hub_timeout_s)
            if config.get("model_type") != "csp":
                raise UserError(f"{spec} is not a weight-sparse CSP model (model_type={config.get('model_type')!r})")
            if dense_params(config) > MAX_MODEL_PARAMS:
                raise UserError(f"{spec} is larger than this server loads ({MAX_MODEL_PARAMS:,} parameters)")
        with self._models_lock:
            loading = self._loading.setdefault(spec, threading.Lock())
        with loading:
            with self._models_lock:
                if spec in self._models:
                    return self._models[spec]
            entry = ModelEntry(spec, kind, name, tasks=self.tasks, store=self.store,
                               pretrain_tokens=self.settings.pretrain_tokens, run_files=self.settings.run_files,
                               prune_slots=self.prune_slots, cache_dir=self.settings.cache_dir)
            with self._models_lock:
                self._models[spec] = entry
                self._trim_models()
                self._loading.pop(spec, None)
            return entry


__all__ = ["Settings", "Explorer"]
