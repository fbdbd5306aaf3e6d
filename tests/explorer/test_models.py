"""`modeling_csp.explorer.models`: which models the app may open, hub lookups that cannot hold the server, and
size caps and checks on the circuit files users hand in (`import_run_file`)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, put_in_hub_cache
from modeling_csp.explorer.errors import UserError
from modeling_csp.explorer.explorer import Explorer, Settings
from modeling_csp.explorer.models import MAX_UPLOAD_BYTES, HubLookup, import_run_file


@pytest.fixture(scope="module")
def explorer():
    """The library's explorer: any folder, saved runs in memory only."""
    return Explorer()


@pytest.fixture
def roots(tmp_path):
    """The app's policy: models only from `allowed/` (besides `default` and hub ids)."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    return allowed


def test_model_box_opens_default_hub_ids_and_folders_under_the_roots(roots, converted, tmp_path):
    app = Explorer(Settings(model_roots=[roots]))
    inside = roots / "m"
    inside.symlink_to(converted["rms_sink_bigram"], target_is_directory=True)  # a link inside, to outside
    real = roots / "real"
    real.mkdir()
    (real / "config.json").write_text("{}")
    assert app.resolve_spec("default") == ("default", "default")
    assert app.resolve_spec(str(real)) == ("folder", str(real.resolve()))
    assert app.resolve_spec(str(roots / "x" / ".." / "real")) == ("folder", str(real.resolve()))
    assert app.resolve_spec("nobody/nothing") == ("hub", "nobody/nothing")
    outside = str(converted["rms_sink_bigram"])  # a real model folder, not under a root
    messages = {}
    for spec in [outside, str(inside), "/no/such/folder", "/etc", str(roots / ".." / "allowed" / ".." / ".."),
                 "../../etc", "~", "a/b/c", "nobody/../etc"]:
        with pytest.raises(UserError) as info:
            app.get_model(spec)
        messages[spec] = re.sub(r"^model '.*' is not", "model SPEC is not", str(info.value))
    # absent and not allowed read the same: the box tells nothing about the server's files
    assert len(set(messages.values())) == 1, messages
    assert "is not available" in next(iter(messages.values()))


def link_model(source: Path, folder: Path) -> Path:
    """A model folder made of links to another's files (a real model, no copy)."""
    folder.mkdir(parents=True)
    for f in Path(source).iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f)
    return folder


def test_relative_paths_are_judged_by_their_real_path_and_hub_shaped_ones_are_hub_ids(roots, converted, tmp_path,
                                                                                         monkeypatch):
    """Run from a folder holding models outside the roots: `work_dirs/outside_model` (shaped like a hub id) is
    looked up on the hub, never opened; `./...`, `..` and links are judged by their real path; an existing folder
    and an absent one (`modeling_csp/explorer` vs `modeling_csp/nothere`) read the same."""
    monkeypatch.chdir(tmp_path)
    link_model(converted["rms_sink_bigram"], tmp_path / "work_dirs" / "outside_model")
    (tmp_path / "modeling_csp" / "explorer").mkdir(parents=True)
    link_model(converted["rms_sink_bigram"], roots / "inside_model")
    (roots / "link_out").symlink_to(tmp_path / "work_dirs", target_is_directory=True)
    app = Explorer(Settings(model_roots=[roots]))
    assert app.resolve_spec("work_dirs/outside_model") == ("hub", "work_dirs/outside_model")
    assert app.resolve_spec("./allowed/inside_model") == ("folder", str((roots / "inside_model").resolve()))
    assert app.resolve_spec("allowed/../allowed/inside_model")[0] == "folder"

    def refusal(spec):
        with pytest.raises(UserError) as info:
            app.get_model(spec)
        return re.sub(r"^(could not load )?model '.*?'", r"\1model SPEC", str(info.value))

    hub_shaped = {spec: refusal(spec) for spec in ("work_dirs/outside_model", "modeling_csp/explorer",
                                                   "modeling_csp/nothere")}
    assert len(set(hub_shaped.values())) == 1, hub_shaped
    assert "hub" in hub_shaped["modeling_csp/nothere"] and "local folder" not in hub_shaped["modeling_csp/nothere"]
    folders = {spec: refusal(spec) for spec in (
        "./work_dirs/outside_model", "work_dirs/outside_model/.", f"../{tmp_path.name}/work_dirs/outside_model",
        str(tmp_path / "work_dirs" / "outside_model"), "allowed/link_out/outside_model", "./modeling_csp/explorer",
        "./modeling_csp/nothere", "allowed/../work_dirs/outside_model", str(roots / "nothere"))}
    assert len(set(folders.values())) == 1, folders
    assert "is not available" in next(iter(folders.values()))
    assert app.loaded_models() == []  # nothing outside the roots was loaded, so no dropdown can offer it
    assert app.get_model("./allowed/inside_model").config.n_layer > 0


def test_a_hub_id_loads_from_the_hub_cache_even_where_a_folder_has_its_name(roots, converted, tmp_path, monkeypatch):
    """`org/model` is the hub cache's snapshot of org/model, not the folder `org/model` of the working folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hub_cache"
    snapshot = put_in_hub_cache(cache, "org/model", converted["rms_sink_bigram"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)  # a same-named local folder, with no model in it
    app = Explorer(Settings(model_roots=[roots]))
    entry = app.get_model("org/model")
    assert Path(entry.folder).resolve() == snapshot.resolve() and entry.config.n_layer > 0


def test_library_defaults_allow_any_folder(explorer, converted):
    assert explorer.settings.model_roots is None
    assert explorer.resolve_spec(str(converted["rms_sink_bigram"]))[0] == "folder"
    assert explorer.get_model(str(converted["rms_sink_bigram"])).config.n_layer > 0


def test_spec_checks(explorer):
    with pytest.raises(UserError, match="control"):
        explorer.get_model("default\x00")
    with pytest.raises(UserError, match="longer than"):
        explorer.get_model("a" * 1000)


def test_hub_failures_are_cached(explorer):
    """Offline, an unknown hub id fails at once; the answer is cached, so asking again costs nothing."""
    name = f"nobody/nothing-{os.getpid()}"
    t = time.perf_counter()
    with pytest.raises(UserError, match="could not load model"):
        explorer.get_model(name)
    first = time.perf_counter() - t
    cached = explorer.hub.cached(name)
    assert cached is not None and cached[0] is None and "could not load model" in cached[1]
    t = time.perf_counter()
    with pytest.raises(UserError, match="could not load model"):
        explorer.get_model(name)
    assert time.perf_counter() - t < max(first, 0.05)


def test_hub_lookups_cannot_fill_the_server():
    """A slow hub: a lookup times out, and while lookups are under way new names are refused at once, so
    unknown names hold at most the lookup pool, never the request workers; the late answer is still cached."""
    release = threading.Event()
    calls = []

    def slow_fetch(name):
        calls.append(name)
        release.wait(10)
        raise ValueError(f"could not load model {name!r}: no such model")

    lookup = HubLookup(slow_fetch, workers=1, max_pending=1)
    t = time.perf_counter()
    with pytest.raises(UserError, match="did not answer"):
        lookup.config("org/a", timeout_s=0.3)
    with pytest.raises(UserError, match="under way"):
        lookup.config("org/b", timeout_s=5)
    assert time.perf_counter() - t < 3 and calls == ["org/a"]
    with pytest.raises(UserError, match="did not answer"):  # the same name joins the lookup under way
        lookup.config("org/a", timeout_s=0.1)
    release.set()
    deadline = time.time() + 5
    while lookup.cached("org/a") is None and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(UserError, match="no such model"):
        lookup.config("org/a", timeout_s=1)
    assert calls == ["org/a"]  # answered from the cache
    ok = HubLookup(lambda name: {"model_type": "csp"})
    assert ok.config("org/c", 5) == {"model_type": "csp"} and ok.cached("org/c") == ({"model_type": "csp"}, None)


@pytest.fixture(scope="module")
def viz_run(explorer, converted):
    entry = explorer.get_model(str(converted["rms_sink_bigram"]))
    return entry, import_run_file(entry, str(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"))


def test_uploads_are_size_capped(tmp_path, viz_run):
    entry, _ = viz_run
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(MAX_UPLOAD_BYTES + 1)  # sparse: no disk used
    with pytest.raises(UserError, match="MB"):
        import_run_file(entry, str(huge))
    with pytest.raises(UserError, match="no such file"):
        import_run_file(entry, str(tmp_path / "missing.json"))


def test_bad_files(tmp_path, viz_run):
    import torch

    from modeling_csp.circuits.graph import CircuitGraph

    entry, _ = viz_run
    not_viz = tmp_path / "not_viz.pt"
    torch.save({"hello": torch.zeros(2)}, not_viz)
    with pytest.raises(UserError, match="not a viz_data.pt"):
        import_run_file(entry, str(not_viz))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    with pytest.raises(UserError, match="viz_data.pt"):
        import_run_file(entry, str(garbage))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        import_run_file(entry, str(bad_json))
    other = CircuitGraph(model={"name": "other", "n_layer": 9, "d_model": 8, "d_model_in": 8, "d_mlp": 8, "n_head": 1,
                                "d_head": 8, "vocab_size": 10}, nodes={"0.mlp.post_act:1": None}, edges=[])
    with pytest.raises(UserError, match="made for model"):
        import_run_file(entry, str(other.save(tmp_path / "other.json")))


def test_a_model_folder_with_a_hostile_index_loads_without_reading_outside(explorer, converted, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(converted["rms_sink_bigram"], folder)
    (tmp_path / "secret.json").write_text('{"SECRET": "do not show"}')
    (folder / "circuits").mkdir()
    (folder / "circuits" / "index.json").write_text(json.dumps(
        [{"task": "x", "k": 1, "path": "../../secret.json"}, {"task": "y", "k": 1, "path": "/etc/passwd"}]))
    entry = explorer.get_model(str(folder))
    assert [r for r in entry.runs.values() if r.source == "shipped"] == []
    captured = capsys.readouterr()
    assert "SECRET" not in captured.err + captured.out and "root:" not in captured.err + captured.out


def test_the_library_never_imports_the_cli():
    """The explorer (and so the app) stands on the library alone; the CLI is one of its front ends."""
    import subprocess
    import sys

    code = "import sys, modeling_csp.explorer, modeling_csp.explorer.panels; print('modeling_csp.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_imports_refuse_non_finite_losses_naming_the_file_and_field(tmp_path, viz_run):
    entry, run = viz_run
    data = run.circuit.to_dict()
    data["losses"] = {**data["losses"], "circuit": float("nan")}
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(data))  # a bare NaN, as the old writer left it
    with pytest.raises(UserError, match=r"^upload\.json: losses\.circuit is nan, not a finite number"):
        import_run_file(entry, str(path), "upload.json")


def test_imported_edges_that_are_not_the_models_weights_are_recomputed(tmp_path, viz_run):
    entry, run = viz_run
    data = run.circuit.to_dict()
    data["edges"][0]["weight"] += 1.0
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(data))
    imported = import_run_file(entry, str(path), "tampered.json")
    assert imported.circuit.notices and imported.circuit.notices[0].startswith(
        f"1 of {run.circuit.n_edges} edges do not match the model's weights")
    assert {(e.source, e.target): e.weight for e in imported.circuit.edges} == {
        (e.source, e.target): pytest.approx(e.weight, abs=1e-6) for e in run.circuit.edges}
    assert run.circuit.notices == []  # the fixture's own edges are the weights


def test_memo_caches_are_bounded_in_bytes():
    """A cache kind holds values up to its byte budget, least recently used dropped first; the newest value stays
    even when it alone is larger (so that it is computed once, not at every ask)."""
    import torch

    from modeling_csp.explorer.models import Memo

    memo = Memo({"circuit": 2_500_000})
    computed = []

    def mb(i):
        computed.append(i)
        return torch.full((250_000,), float(i))  # 1 MB

    for i in range(5):
        memo.get("circuit", i, lambda i=i: mb(i))
    assert memo.sizes()["circuit"] == 2 and memo.nbytes() == 2_000_000
    assert memo.peek("circuit", 0) is None and float(memo.get("circuit", 4, lambda: mb(99))[0]) == 4.0
    assert computed == [0, 1, 2, 3, 4]
    memo.get("circuit", "big", lambda: torch.zeros(1_000_000))  # 4 MB, over the budget alone
    assert memo.sizes()["circuit"] == 1 and memo.peek("circuit", "big") is not None


def test_loaded_models_are_bounded_in_bytes(converted):
    """Models stay loaded, with their caches, up to `Settings.model_bytes`; the least recently used goes."""
    one, two = str(converted["rms_sink_bigram"]), str(converted["ln_gpt2"])
    small = Explorer(Settings(model_bytes=1))  # every model is larger: only the newest stays
    first = small.get_model(one)
    assert first.nbytes() >= sum(p.numel() * p.element_size() for p in first.model.parameters())
    small.get_model(two)
    assert small.loaded_models() == [two]
    roomy = Explorer(Settings(model_bytes=10**10))
    roomy.get_model(one), roomy.get_model(two)
    assert roomy.loaded_models() == [one, two]
