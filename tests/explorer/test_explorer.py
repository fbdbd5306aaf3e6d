"""`modeling_csp.explorer.explorer`: an `Explorer` holds what one host has (settings, models, saved runs, user
tasks, hub lookups), so that two of them in one process share nothing; the app reads its `Settings` from its
environment."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from modeling_csp.explorer.explorer import Explorer, Settings
from modeling_csp.explorer.models import default_roots

QUOTES = [["x = 'a", "'", '"'], ['y = "b', '"', "'"]]


def test_the_apps_settings_come_from_its_environment(tmp_path):
    env = {"CSP_MODELS": "default, org/model", "CSP_APP_MODEL": "org/model",
           "CSP_APP_IMPORT": os.pathsep.join(["a.json", "", "b.pt"]),
           "CSP_MODEL_ROOTS": os.pathsep.join([str(tmp_path / "one"), str(tmp_path / "two")]),
           "CSP_APP_STORE": str(tmp_path / "store"), "CSP_APP_PRETRAIN_TOKENS": "1024"}
    s = Settings.from_env(tmp_path, env)
    assert s == Settings(default_model="org/model", models=["default", "org/model"], run_files=["a.json", "b.pt"],
                         pretrain_tokens=1024, model_roots=[tmp_path / "one", tmp_path / "two"],
                         store_dir=tmp_path / "store")
    # nothing set: the model list of the csp_space.json beside the app, the default roots, a temp store
    (tmp_path / "csp_space.json").write_text(json.dumps({"models": ["default", "org/other"]}))
    bare = Settings.from_env(tmp_path, {})
    assert bare.models == ["default", "org/other"] and bare.default_model == "default" and bare.run_files == []
    assert bare.model_roots == default_roots() and bare.pretrain_tokens == Settings().pretrain_tokens
    assert bare.store_dir == Path(tempfile.gettempdir()) / "csp_app_runs"


def test_two_explorers_share_nothing(converted, tmp_path):
    """Models, user tasks, saved runs and hub answers belong to the explorer that has them."""
    one, two = Explorer(Settings(store_dir=tmp_path / "one")), Explorer()
    entry = one.get_model(str(converted["rms_sink_bigram"]))
    assert one.loaded_models() == [str(converted["rms_sink_bigram"])] and two.loaded_models() == []
    task = one.tasks.register("quotes", QUOTES)
    assert one.tasks.known(task.name) and not two.tasks.known(task.name)
    assert entry.tasks is one.tasks and entry.store is one.store and one.store.folder == tmp_path / "one"
    assert two.store.folder is None  # the library's default: saved runs in memory only
    assert one.hub is not two.hub
    assert one.get_model(str(converted["rms_sink_bigram"])) is entry  # loaded once
    assert two.get_model(str(converted["rms_sink_bigram"])) is not entry
