"""`modeling_csp.explorer.sessions`: a browser session's saved runs, and which saved runs a model is offered
(only those made for it, with their edges back when the store left them out)."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES
from modeling_csp.explorer.errors import UserError
from modeling_csp.explorer.explorer import Explorer, Settings
from modeling_csp.explorer.models import import_run_file
from modeling_csp.explorer.runs import Run
from modeling_csp.explorer.sessions import MAX_SESSION_RUNS, Session, choose_run, find_run


def viz_run_of(explorer, converted):
    """(the converted fixture model of `explorer`, the fixture's viz_data.pt imported as its run)"""
    entry = explorer.get_model(str(converted["rms_sink_bigram"]))
    return entry, import_run_file(entry, str(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"))


def test_a_run_saved_without_its_edges_gets_them_back_from_the_weights(tmp_path, converted):
    """Edges are most of a large run's file (a dense-ish model has many nonzero weights between the nodes): the
    store leaves them out when it must, and the run read back for its model has the same edges again."""
    from modeling_csp.circuits.graph import CircuitGraph

    explorer = Explorer(Settings(store_dir=tmp_path / "store"))
    entry, imported = viz_run_of(explorer, converted)
    circuit = CircuitGraph.from_masks(entry.model, imported.circuit.masks(entry.config), task=imported.task)
    run = Run(id="pruned:y", name="pruned here", source="pruned", circuit=circuit, task=circuit.task)
    edges = lambda c: sorted((e.source, e.target, e.weight, e.kind) for e in c.edges)  # noqa: E731
    assert len(edges(circuit)) > 20
    without_edges = len(json.dumps({**circuit.to_dict(), "edges": []}, separators=(",", ":")))
    store = explorer.store
    store.max_file_bytes = without_edges + 1000
    saved, notice = store.save(run)
    on_disk = json.loads((tmp_path / "store" / f"{saved.id.split(':')[1]}.json").read_text())
    assert notice is None and on_disk["circuit"]["edges"] == [] and on_disk["circuit"]["meta"]["edges_dropped"]
    store._runs.clear()  # a restarted server: only the file is left
    again = find_run(entry, None, saved.id)
    assert edges(again.circuit) == edges(circuit) and "edges_dropped" not in again.circuit.meta
    assert set(again.circuit.nodes) == set(circuit.nodes) and again.circuit.task == circuit.task
    store._runs.clear()  # read from disk again, for a model that has seen this run before
    assert edges(find_run(entry, None, saved.id).circuit) == edges(circuit)


def test_sessions_restore_only_well_formed_saved_runs():
    good = ["saved:" + "ab" * 8, "default"]
    s = Session.restore([good, ["saved:zz", "default"], "junk", ["saved:" + "cd" * 8], [1, 2], None])
    assert s.saved() == [good]
    assert Session.restore("not a list").runs == {} and Session.restore(None).runs == {}
    many = Session()
    for i in range(MAX_SESSION_RUNS + 5):
        many = many.with_run(f"saved:{i:016x}", "default")
    assert len(many.runs) == MAX_SESSION_RUNS and f"saved:{4:016x}" not in many.runs


def test_a_saved_run_is_found_only_for_its_model(tmp_path, converted, test_circuit):
    explorer = Explorer(Settings(store_dir=tmp_path / "store"))
    entry, run = viz_run_of(explorer, converted)
    saved, _ = explorer.store.save(run)
    assert find_run(entry, Session(), saved.id) is not None
    other = explorer.get_model(test_circuit[0])
    assert find_run(other, Session(), saved.id) is None  # made for another model
    with pytest.raises(UserError, match="unknown run"):
        choose_run(other, saved.id)
