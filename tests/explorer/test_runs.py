"""`modeling_csp.explorer.runs`: the server-side store of saved runs (content ids, size caps, strict JSON)."""

from __future__ import annotations

import json
import time

import pytest

from conftest import FIXTURES
from modeling_csp.circuits.graph import CircuitGraph
from modeling_csp.explorer.explorer import Explorer
from modeling_csp.explorer.models import import_run_file
from modeling_csp.explorer.runs import SAVED_ID, Run, RunStore


@pytest.fixture(scope="module")
def viz_run(converted):
    entry = Explorer().get_model(str(converted["rms_sink_bigram"]))
    return entry, import_run_file(entry, str(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"))


def test_run_store_keeps_runs_under_a_content_id(tmp_path, viz_run):
    import torch

    entry, run = viz_run
    scores = {loc: torch.rand(m.numel()) for loc, m in run.circuit.masks(entry.config).items()}
    run = Run(id="pruned:x", name="pruned here", source="pruned", circuit=run.circuit, scores=scores,
                       task=run.task)
    store = RunStore(tmp_path / "store")
    saved, notice = store.save(run)
    assert notice is None and SAVED_ID.match(saved.id)
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
        r = Run(id=f"imported:{i}", name=f"copy {i}", source="imported", circuit=run.circuit, task=run.task)
        ids.append(capped.save(r)[0].id)
        time.sleep(0.01)
    on_disk = {f.stem for f in (tmp_path / "capped").glob("*.json")}
    assert len(on_disk) == 2 and on_disk == {i.split(":")[1] for i in ids[-2:]}  # the oldest went first


def test_the_run_store_writes_strict_json(tmp_path, viz_run):
    from modeling_csp.utils.jsonio import loads_strict

    entry, run = viz_run
    circuit = CircuitGraph.from_dict(run.circuit.to_dict())
    circuit.losses["random"] = float("nan")  # not computed
    RunStore(tmp_path / "store").save(Run(id="imported:x", name="x", source="imported", circuit=circuit))
    (saved,) = (tmp_path / "store").glob("*.json")
    assert loads_strict(saved.read_text())["circuit"]["losses"]["random"] is None


def test_the_store_cap_counts_every_file_and_orphans_go(tmp_path, viz_run):
    """Files that are not runs count against the cap (oldest removed first), and temporary files of killed
    writes go when the store opens and after each save; a write in progress stays."""
    import os

    from conftest import dead_pid

    entry, run = viz_run
    folder = tmp_path / "store"
    folder.mkdir()
    size = len(json.dumps({"c": run.circuit.to_dict()}))
    (folder / "stray.bin").write_bytes(b"x" * (2 * size))
    old = time.time() - 100
    os.utime(folder / "stray.bin", (old, old))
    orphan = folder / f".0123456789abcdef.json.tmp{dead_pid()}-77"
    orphan.write_bytes(b"x" * size)
    writing = folder / f".fedcba9876543210.json.tmp{os.getpid()}-88"
    writing.write_bytes(b"x")
    store = RunStore(folder, max_total_bytes=int(2.5 * size))
    assert not orphan.exists() and writing.exists()
    store.save(Run(id="imported:a", name="a", source="imported", circuit=run.circuit, task=run.task))
    assert not (folder / "stray.bin").exists()  # the oldest file, though no run
    assert store.disk_bytes() <= store.max_total_bytes
    orphan.write_bytes(b"x")  # a write killed while this server runs
    store.save(Run(id="imported:b", name="b", source="imported", circuit=run.circuit, task=run.task))
    assert not orphan.exists() and writing.exists()
    assert store.disk_bytes() == sum(f.stat().st_size for f in folder.iterdir()) <= store.max_total_bytes


def test_runs_in_memory_are_bounded_in_bytes(tmp_path, viz_run):
    """The store keeps runs in memory up to a byte budget, not a count; runs it dropped come back from disk."""
    from modeling_csp.utils.sizes import approx_bytes

    entry, run = viz_run
    one = approx_bytes([run.circuit, None])
    store = RunStore(tmp_path / "store", max_cached_bytes=int(2.5 * one))
    ids = [store.save(Run(id=f"imported:{i}", name=f"copy {i}", source="imported", circuit=run.circuit,
                          task=run.task))[0].id for i in range(5)]
    assert store.cached_bytes() <= 2.5 * one
    assert store.load(ids[0]) is not None and store.load(ids[0]).name == "copy 0"  # read back from disk
    memory_only = RunStore(max_cached_bytes=1)  # the newest run stays even when it alone is larger
    saved, _ = memory_only.save(run)
    assert memory_only.load(saved.id) is saved
