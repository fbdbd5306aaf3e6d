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
