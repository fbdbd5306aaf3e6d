"""The view model, `resolve_view(session, Request) -> View`, through every transition the page makes, without a
browser: first load, every task (with and without a circuit), run, k, layer, node, click, search, edge threshold,
bad values, share links and saved runs. Runs on the embedded default model and the circuits it ships."""

from __future__ import annotations

import urllib.parse
from types import SimpleNamespace

import pytest

from modeling_csp import plotting
from modeling_csp.explorer import registry
from modeling_csp.explorer.analysis import best_node, task_names
from modeling_csp.explorer.registry import Session
from modeling_csp.explorer.view import PARTS, Request, Shown, View, resolve_view
from modeling_csp.loading import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no default model installed")


@pytest.fixture(autouse=True)
def app_policy(monkeypatch):
    """Models as the app allows them: `default`, hub ids and folders under the default roots."""
    monkeypatch.setattr(registry.settings, "model_roots", registry.default_roots())


def ask(view: View, event: str, **changes) -> View:
    """The page's next request: the current selection with some values changed (as the page would send them)."""
    return resolve_view(view.session, Request(event, **{**view.selection, **changes}))


@pytest.fixture(scope="module")
def first() -> View:
    return resolve_view(None, Request("load"))


def message_of(figure) -> str:
    return figure.layout.annotations[0].text if figure.layout.annotations else ""


def test_first_view(first):
    assert first.model == "default" and first.task in task_names() and first.status == ""
    assert first.run is not None and first.run.task == first.task and "(target loss)" in first.run.name
    assert first.k == first.run.load().n_nodes == first.circuit.n_nodes and first.k_max == first.k
    assert first.layer == plotting.most_important_layer(first.circuit) and first.node in first.circuit.nodes
    assert first.node.startswith(first.layer + ".")
    assert first.changed == frozenset(PARTS) - {"overview"} and first.empty is None
    assert "| full model loss |" in first.summary and f"{first.k} of {first.entry.n_total_nodes}" in first.summary
    assert first.node in first.node_header and [v for _, v in first.node_choices].count(first.node) == 1
    assert first.session.view == first.selection


def test_every_task(first):
    """All 20 tasks: a circuit when the model ships one, else "no circuit yet" (and nothing left selected)."""
    with_circuits = {r.task for r in first.entry.runs.values()}
    assert len(task_names()) == 20
    for task in task_names():
        v = ask(first, "task", task=task)
        assert v.task == task and v.status == "", (task, v.status)
        if task in with_circuits:
            assert v.run.task == task and v.node in v.circuit.nodes and v.empty is None
        else:
            assert v.run is None and v.k is None and v.layer is None and v.node is None and v.circuit is None
            assert v.run_choices == [] and v.layer_choices == [] and v.node_choices == []
            assert f"**No circuit yet** for `{task}`" in v.empty and "Prune" in v.empty
            assert "No circuit for" in message_of(v.graph) and f"**Task** `{task}`" in v.summary
            # back to a task with a circuit, the page still holding the old node: a clean view, no message
            back = ask(v, "task", task=first.task, node="0.attn.v:59", layer="0.attn", run=None, k=None)
            assert back.run is not None and back.node in back.circuit.nodes and back.status == ""


def test_run_change_resets_k_layer_and_node(first):
    other = next(r for r in first.runs if r.id != first.run.id)
    v = ask(first, "run", run=other.id, k=3, layer="1.mlp", node="junk")
    assert v.run.id == other.id and v.k == other.load().n_nodes and v.status == ""
    assert v.layer == plotting.most_important_layer(v.circuit) and v.node in v.circuit.nodes


def test_picking_what_is_shown_changes_nothing(first):
    """Gradio 6 dropdowns send their value again when they lose focus: that must not reset k, layer or node, nor
    redraw anything."""
    v = ask(first, "k", k=first.k - 1)
    v = ask(v, "node", node=next(n for n in v.circuit.nodes if n != v.node))
    for event in ("model", "task", "run", "node"):
        again = ask(v, event)
        assert again.selection == v.selection and again.changed == frozenset() and again.status == "", event
    assert ask(v, "task", task=v.task).changed == ask(v, "run", run=v.run.id).changed == frozenset()
    other = next(r for r in first.runs if r.id != v.run.id)
    assert ask(v, "run", run=other.id).k == other.load().n_nodes  # another run still starts at its own size


@pytest.mark.parametrize("typed, shown, message", [
    (99999, None, "k=99999 is outside [1, "), (-5, 1, "k=-5 is outside"), ("abc", None, "k='abc' is not a number"),
    (3.6, 4, "not a whole number"), ("7", 7, ""),
])
def test_typed_k_is_clamped_with_a_message(first, typed, shown, message):
    v = ask(first, "k", k=typed)
    assert v.k == (shown if shown is not None else first.k) and v.circuit.n_nodes == v.k
    assert (message in v.status) if message else v.status == ""
    assert "model" not in v.changed and {"k", "summary", "graph", "status"} <= v.changed
    assert "layer_bars" not in v.changed  # drawn once, by the "stats" step that knows the new deltas


def test_k_change_keeps_layer_and_node_where_it_can(first):
    v = ask(first, "k", k=first.k - 1)
    assert v.layer == first.layer
    assert v.node == (first.node if first.node in v.circuit.nodes else best_node(v.circuit, v.layer))
    tiny = ask(first, "k", k=1)
    assert tiny.circuit.n_nodes == 1 and tiny.node == next(iter(tiny.circuit.nodes))
    assert tiny.layer == plotting.sublayer_of(tiny.node)  # the old layer may be empty now


def test_layer_and_node_changes(first):
    v = ask(first, "layer", layer="1.mlp")
    assert v.layer == "1.mlp" and v.changed >= {"node", "graph"} and not v.changed & {"summary", "layer"}
    assert v.node is None if not plotting.layer_node_ids(v.circuit, "1.mlp") else v.node.startswith("1.mlp")
    other = next(n for n in first.circuit.nodes if n != first.node)
    v = ask(first, "node", node=other)
    assert v.node == other and v.layer == plotting.sublayer_of(other)
    v = ask(first, "node", node="1.mlp.post_act:99999")
    assert "not in this circuit" in v.status and v.node in first.circuit.nodes
    v = ask(first, "layer", layer="7.attn")
    assert "not in this model" in v.status and v.layer == first.layer and "layer" in v.changed  # put back


def test_a_click_in_the_same_layer_does_not_redraw_the_graph(first):
    same = next(n for n in plotting.layer_node_ids(first.circuit, first.layer) if n != first.node)
    v = ask(first, "click", node=same)
    assert v.node == same and v.changed == {"node", "share", "status", "node_header"}  # nor the layer list and bars
    assert ask(first, "node", node=same).changed == {"node", "graph", "share", "status", "node_header"}
    other = next((n for n in first.circuit.nodes if not n.startswith(first.layer + ".")), None)
    if other is not None:
        assert {"graph", "layer"} <= ask(first, "click", node=other).changed


def test_node_search(first):
    v = resolve_view(first.session, Request("search", **first.selection, search="ch1"))
    assert v.matches and all("ch1" in f"{n} {plotting.node_label(n, 16)}" for n in v.matches)
    assert v.node == v.matches[0] and "match 'ch1'" in v.status
    ring = [t for t in v.graph.data if t.name == "matches"]
    assert ring and {c[0] for c in ring[0].customdata} == {n for n in v.matches if n.startswith(v.layer + ".")}
    none = resolve_view(first.session, Request("search", **first.selection, search="zzz"))
    assert "no node of this circuit matches 'zzz'" in none.status and none.node == first.node


def test_edge_threshold(first):
    v = resolve_view(first.session, Request("edges", **first.selection, edges=50))
    assert v.edges == 0.5 and "≥ 50% of the largest" in v.graph.layout.title.text and v.changed == {"graph", "status"}
    v = resolve_view(first.session, Request("edges", **first.selection, edges=500))
    assert v.edges == 1.0 and "outside [0, 100]" in v.status


def test_a_bad_model_or_task_keeps_the_previous_view(first):
    v = ask(first, "model", model="/no/such/folder")
    assert v.changed == {"status", "model"} and "model '/no/such/folder' is not available" in v.status
    assert v.model == first.model and v.selection == first.selection
    v = ask(first, "task", task="no_such_task")
    assert v.changed == {"status", "task"} and "unknown task 'no_such_task'" in v.status and v.task == first.task


def test_share_link_restores_the_view(first):
    chosen = ask(ask(first, "k", k=first.k - 5), "layer", layer=first.layer)
    query = dict(urllib.parse.parse_qsl(chosen.share_query))
    assert set(query) == {"model", "task", "run", "k", "layer", "node"}
    again = resolve_view(None, Request("load", query=query))
    assert again.selection == chosen.selection and again.status == ""


def test_a_bad_link_falls_back_with_messages(first):
    v = resolve_view(None, Request("load", query={"task": "no_such_task", "run": "saved:0123456789abcdef", "k": "abc",
                                                  "node": "9.mlp.post_act:1", "layer": "x" * 5000}))
    assert v.task == first.task and v.run.id == first.run.id and v.k == first.k
    for part in ("unknown task 'no_such_task'", "run 'saved:0123456789abcdef' is not available", "k='abc' is not a number",
                 "node '9.mlp.post_act:1' is not in this circuit", "is not in this model"):
        assert part in v.status, part
    v = resolve_view(None, Request("load", query={"model": "../../etc"}))
    assert v.model == "default" and "is not available" in v.status and "showing default instead" in v.status


def test_saved_runs_survive_a_reload_and_travel_by_link(first, test_circuit, tmp_path, monkeypatch):
    monkeypatch.setattr(registry.settings, "store_dir", tmp_path / "store")
    spec, path = test_circuit
    entry = registry.get_model(spec)
    saved, _ = registry.run_store().save(registry.import_run_file(entry, str(path)))
    session = Session().with_run(saved.id, spec)
    # a reload: the browser hands back its saved runs
    reloaded = resolve_view(None, Request("load", query={"task": saved.task}, saved=session.saved()))
    assert saved.id in [rid for _, rid in reloaded.run_choices] and reloaded.session.runs == {saved.id: spec}
    # a link opened in another browser (nothing saved there): the server has the run
    linked = resolve_view(None, Request("load", query={"task": saved.task, "run": saved.id, "k": 5}))
    assert linked.run.id == saved.id and linked.k == 5 and linked.status == "" and saved.id in linked.session.runs


def test_the_slow_numbers_follow_in_a_stats_step(first):
    v = ask(first, "k", k=first.k - 3)
    assert not v.stats.complete and "…" in v.summary
    done = ask(v, "stats")
    assert done.stats.complete and "…" not in done.summary and done.changed == {"summary", "layer", "layer_bars"}
    assert done.event == "stats" and v.event == "k"  # the app paints "stats" only if the page still shows them
    assert done.stats.circuit is not None and done.stats.random is not None


def test_figures_are_computed_when_used(first):
    v = ask(first, "layer", layer=first.layer)
    assert "graph" not in vars(v) and "overview" not in vars(v)
    assert v.graph.layout.title.text.startswith(first.layer) and "graph" in vars(v)
    assert "overview" not in v.changed
    assert "overview" in resolve_view(first.session, Request("tab", **first.selection, tab="overview")).changed


def test_a_view_overtaken_by_a_later_pick_is_not_painted():
    """Two models picked quickly, the first slow to load: its view arrives last and must be dropped (a k, layer or
    node change made meanwhile too)."""
    shown, page, other_page = Shown(), SimpleNamespace(session_hash="a"), SimpleNamespace(session_hash="b")
    shown.remember(page, {"model": "default", "task": "bracket_brace"})
    slow = shown.begin(page, picks=True)
    k_change = shown.begin(page, picks=False)
    fast = shown.begin(page, picks=True)
    assert not shown.newest(page, slow) and not shown.newest(page, k_change) and shown.newest(page, fast)
    assert shown.newest(other_page, 1) and shown.newest(page, None)
