"""`modeling_csp.explorer.registry`: which models the app may open, hub lookups that cannot hold the server, the
server-side store of saved runs, sessions, and size caps on what users hand in."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

from conftest import FIXTURES
from modeling_csp.explorer import registry
from modeling_csp.explorer.registry import HubLookup, RunStore, Session, UserError


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """The app's policy: models only from `allowed/` (besides `default` and hub ids)."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setattr(registry.settings, "model_roots", [allowed])
    return allowed


def test_model_box_opens_default_hub_ids_and_folders_under_the_roots(roots, converted, tmp_path):
    inside = roots / "m"
    inside.symlink_to(converted["rms_sink_bigram"], target_is_directory=True)  # a link inside, to outside
    real = roots / "real"
    real.mkdir()
    (real / "config.json").write_text("{}")
    assert registry.resolve_spec("default") == ("default", "default")
    assert registry.resolve_spec(str(real)) == ("folder", str(real.resolve()))
    assert registry.resolve_spec(str(roots / "x" / ".." / "real")) == ("folder", str(real.resolve()))
    assert registry.resolve_spec("nobody/nothing") == ("hub", "nobody/nothing")
    outside = str(converted["rms_sink_bigram"])  # a real model folder, not under a root
    messages = {}
    for spec in [outside, str(inside), "/no/such/folder", "/etc", str(roots / ".." / "allowed" / ".." / ".."),
                 "../../etc", "~", "a/b/c", "nobody/../etc"]:
        with pytest.raises(UserError) as info:
            registry.get_model(spec)
        messages[spec] = re.sub(r"^model '.*' is not", "model SPEC is not", str(info.value))
    # absent and not allowed read the same: the box tells nothing about the server's files
    assert len(set(messages.values())) == 1, messages
    assert "is not available" in next(iter(messages.values()))


def test_library_defaults_allow_any_folder(converted):
    assert registry.settings.model_roots is None
    assert registry.resolve_spec(str(converted["rms_sink_bigram"]))[0] == "folder"
    assert registry.get_model(str(converted["rms_sink_bigram"])).config.n_layer > 0


def test_spec_checks():
    with pytest.raises(UserError, match="control"):
        registry.get_model("default\x00")
    with pytest.raises(UserError, match="longer than"):
        registry.get_model("a" * 1000)


def test_hub_failures_are_cached(monkeypatch):
    """Offline, an unknown hub id fails at once; the answer is cached, so asking again costs nothing."""
    name = f"nobody/nothing-{os.getpid()}"
    t = time.perf_counter()
    with pytest.raises(UserError, match="could not load model"):
        registry.get_model(name)
    first = time.perf_counter() - t
    cached = registry.hub.cached(name)
    assert cached is not None and cached[0] is None and "could not load model" in cached[1]
    t = time.perf_counter()
    with pytest.raises(UserError, match="could not load model"):
        registry.get_model(name)
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
def viz_run(converted):
    entry = registry.get_model(str(converted["rms_sink_bigram"]))
    return entry, registry.import_run_file(entry, str(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"))


def test_run_store_keeps_runs_under_a_content_id(tmp_path, viz_run):
    import torch

    entry, run = viz_run
    scores = {loc: torch.rand(m.numel()) for loc, m in run.circuit.masks(entry.config).items()}
    run = registry.Run(id="pruned:x", name="pruned here", source="pruned", circuit=run.circuit, scores=scores,
                       task=run.task)
    store = RunStore(tmp_path / "store")
    saved, notice = store.save(run)
    assert notice is None and registry.SAVED_ID.match(saved.id)
    assert store.save(run)[0].id == saved.id  # same content, same id
    again = RunStore(tmp_path / "store").load(saved.id)  # a restarted server reads it from disk
    assert again.name == "pruned here" and set(again.circuit.nodes) == set(run.circuit.nodes)
    assert all(torch.allclose(again.scores[loc], scores[loc], atol=1e-5) for loc in scores)
    for bad in ["saved:../../etc/passwd", "saved:" + "0" * 16, "shipped:x", "", None, "saved:" + "a" * 17]:
        assert store.load(bad) is None


def test_run_store_caps(tmp_path, viz_run):
    entry, run = viz_run
    small = RunStore(tmp_path / "small", max_file_bytes=1000)
    saved, notice = small.save(run)
    assert "not saved for links" in notice and not list((tmp_path / "small").iterdir())
    assert small.load(saved.id) is saved  # still there for this server's memory
    full = len(json.dumps(run.circuit.to_dict(), separators=(",", ":")))
    slim = RunStore(tmp_path / "slim", max_file_bytes=full // 2)  # node data is most of this file
    saved, notice = slim.save(run)
    again = RunStore(tmp_path / "slim").load(saved.id)
    assert notice is None and again.circuit.node_data is None and set(again.circuit.nodes) == set(run.circuit.nodes)
    size = len(json.dumps({"c": run.circuit.to_dict()}))
    capped = RunStore(tmp_path / "capped", max_total_bytes=int(2.5 * size))
    ids = []
    for i in range(4):  # different names: different content
        r = registry.Run(id=f"imported:{i}", name=f"copy {i}", source="imported", circuit=run.circuit, task=run.task)
        ids.append(capped.save(r)[0].id)
        time.sleep(0.01)
    on_disk = {f.stem for f in (tmp_path / "capped").glob("*.json")}
    assert len(on_disk) == 2 and on_disk == {i.split(":")[1] for i in ids[-2:]}  # the oldest went first


def test_a_run_saved_without_its_edges_gets_them_back_from_the_weights(tmp_path, viz_run, monkeypatch):
    """Edges are most of a large run's file (a dense-ish model has many nonzero weights between the nodes): the
    store leaves them out when it must, and the run read back for its model has the same edges again."""
    from modeling_csp.circuits.graph import CircuitGraph

    entry, imported = viz_run
    circuit = CircuitGraph.from_masks(entry.model, imported.circuit.masks(entry.config), task=imported.task)
    run = registry.Run(id="pruned:y", name="pruned here", source="pruned", circuit=circuit, task=circuit.task)
    edges = lambda c: sorted((e.source, e.target, e.weight, e.kind) for e in c.edges)  # noqa: E731
    assert len(edges(circuit)) > 20
    without_edges = len(json.dumps({**circuit.to_dict(), "edges": []}, separators=(",", ":")))
    monkeypatch.setattr(registry.settings, "store_dir", tmp_path / "store")
    store = registry.run_store()
    store.max_file_bytes = without_edges + 1000
    saved, notice = store.save(run)
    on_disk = json.loads((tmp_path / "store" / f"{saved.id.split(':')[1]}.json").read_text())
    assert notice is None and on_disk["circuit"]["edges"] == [] and on_disk["circuit"]["meta"]["edges_dropped"]
    store._runs.clear()  # a restarted server: only the file is left
    again = registry.find_run(entry, None, saved.id)
    assert edges(again.circuit) == edges(circuit) and "edges_dropped" not in again.circuit.meta
    assert set(again.circuit.nodes) == set(circuit.nodes) and again.circuit.task == circuit.task
    store._runs.clear()  # read from disk again, for a model that has seen this run before
    assert edges(registry.find_run(entry, None, saved.id).circuit) == edges(circuit)


def test_sessions_restore_only_well_formed_saved_runs():
    good = ["saved:" + "ab" * 8, "default"]
    s = Session.restore([good, ["saved:zz", "default"], "junk", ["saved:" + "cd" * 8], [1, 2], None])
    assert s.saved() == [good]
    assert Session.restore("not a list").runs == {} and Session.restore(None).runs == {}
    many = Session()
    for i in range(registry.MAX_SESSION_RUNS + 5):
        many = many.with_run(f"saved:{i:016x}", "default")
    assert len(many.runs) == registry.MAX_SESSION_RUNS and f"saved:{4:016x}" not in many.runs


def test_a_saved_run_is_found_only_for_its_model(tmp_path, viz_run, monkeypatch, test_circuit):
    entry, run = viz_run
    monkeypatch.setattr(registry.settings, "store_dir", tmp_path / "store")
    saved, _ = registry.run_store().save(run)
    assert registry.find_run(entry, Session(), saved.id) is not None
    other = registry.get_model(test_circuit[0])
    assert registry.find_run(other, Session(), saved.id) is None  # made for another model
    with pytest.raises(UserError, match="unknown run"):
        registry.choose_run(other, saved.id)


def test_uploads_are_size_capped(tmp_path, viz_run):
    entry, _ = viz_run
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(registry.MAX_UPLOAD_BYTES + 1)  # sparse: no disk used
    with pytest.raises(UserError, match="MB"):
        registry.import_run_file(entry, str(huge))
    with pytest.raises(UserError, match="no such file"):
        registry.import_run_file(entry, str(tmp_path / "missing.json"))


def test_bad_files(tmp_path, viz_run):
    import torch

    from modeling_csp.circuits.graph import CircuitGraph

    entry, _ = viz_run
    not_viz = tmp_path / "not_viz.pt"
    torch.save({"hello": torch.zeros(2)}, not_viz)
    with pytest.raises(UserError, match="not a viz_data.pt"):
        registry.import_run_file(entry, str(not_viz))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    with pytest.raises(UserError, match="viz_data.pt"):
        registry.import_run_file(entry, str(garbage))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        registry.import_run_file(entry, str(bad_json))
    other = CircuitGraph(model={"name": "other", "n_layer": 9, "d_model": 8, "d_model_in": 8, "d_mlp": 8, "n_head": 1,
                                "d_head": 8, "vocab_size": 10}, nodes={"0.mlp.post_act:1": None}, edges=[])
    with pytest.raises(UserError, match="made for model"):
        registry.import_run_file(entry, str(other.save(tmp_path / "other.json")))


def test_a_model_folder_with_a_hostile_index_loads_without_reading_outside(converted, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(converted["rms_sink_bigram"], folder)
    (tmp_path / "secret.json").write_text('{"SECRET": "do not show"}')
    (folder / "circuits").mkdir()
    (folder / "circuits" / "index.json").write_text(json.dumps(
        [{"task": "x", "k": 1, "path": "../../secret.json"}, {"task": "y", "k": 1, "path": "/etc/passwd"}]))
    entry = registry.get_model(str(folder))
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
        registry.import_run_file(entry, str(path), "upload.json")


def test_imported_edges_that_are_not_the_models_weights_are_recomputed(tmp_path, viz_run):
    entry, run = viz_run
    data = run.circuit.to_dict()
    data["edges"][0]["weight"] += 1.0
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(data))
    imported = registry.import_run_file(entry, str(path), "tampered.json")
    assert imported.circuit.notices and imported.circuit.notices[0].startswith(
        f"1 of {run.circuit.n_edges} edges do not match the model's weights")
    assert {(e.source, e.target): e.weight for e in imported.circuit.edges} == {
        (e.source, e.target): pytest.approx(e.weight, abs=1e-6) for e in run.circuit.edges}
    assert run.circuit.notices == []  # the fixture's own edges are the weights


def test_the_run_store_writes_strict_json(tmp_path, viz_run):
    from modeling_csp.utils.jsonio import loads_strict

    entry, run = viz_run
    circuit = registry.CircuitGraph.from_dict(run.circuit.to_dict())
    circuit.losses["random"] = float("nan")  # not computed
    RunStore(tmp_path / "store").save(registry.Run(id="imported:x", name="x", source="imported", circuit=circuit))
    (saved,) = (tmp_path / "store").glob("*.json")
    assert loads_strict(saved.read_text())["circuit"]["losses"]["random"] is None
