"""The view model, `resolve_view(explorer, session, Request) -> View`, through every transition the page makes, without a
browser: first load, every task (with and without a circuit), run, k, layer, node, click, search, edge threshold,
bad values, share links and saved runs. Runs on the embedded default model and the circuits it ships."""

from __future__ import annotations

import urllib.parse
from dataclasses import replace
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import markdown_text

from modeling_csp import plotting
from modeling_csp.explorer.analysis import best_node, task_names
from modeling_csp.explorer.explorer import Explorer, Settings
from modeling_csp.explorer.models import default_roots, import_run_file
from modeling_csp.explorer.sessions import Session
from modeling_csp.explorer.view import PARTS, SELECTORS, Request, Selection, Shown, View, resolve_view
from modeling_csp.model.loading import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no default model installed")


def app_explorer(**settings) -> Explorer:
    """An explorer that opens models as the app allows them: `default`, hub ids and folders under the default roots."""
    return Explorer(Settings(model_roots=default_roots(), **settings))


def ask(view: View, event: str, **changes) -> View:
    """The page's next request: the current selection with some values changed (as the page would send them)."""
    return resolve_view(view.explorer, view.session, Request(event, **{**view.selection, **changes}))


@pytest.fixture(scope="module")
def first() -> View:
    return resolve_view(app_explorer(), None, Request("load"))


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
    assert (message in markdown_text(v.status)) if message else v.status == ""
    assert "model" not in v.changed and {"summary", "graph", "status", "layer_bars"} <= v.changed
    # the box is sent back only when the view shows another k than typed (sent back, it would overwrite digits
    # typed meanwhile)
    assert ("k" in v.changed) == (str(v.k) != str(typed))


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
    assert "not in this circuit" in markdown_text(v.status) and v.node in first.circuit.nodes
    v = ask(first, "layer", layer="7.attn")
    assert "not in this model" in markdown_text(v.status) and v.layer == first.layer and "layer" in v.changed  # put back


def test_a_click_in_the_same_layer_redraws_the_graph_with_the_nodes_paths(first):
    same = next(n for n in plotting.layer_node_ids(first.circuit, first.layer) if n != first.node)
    v = ask(first, "click", node=same)
    assert v.node == same and v.changed == {"node", "graph", "share", "status", "node_header"}  # not the layer list
    assert [w.direction for w in v.paths] == ["upstream", "downstream"] and all(w.node == same for w in v.paths)
    assert ask(first, "node", node=same).changed == {"node", "graph", "share", "status", "node_header"}
    other = next((n for n in first.circuit.nodes if not n.startswith(first.layer + ".")), None)
    if other is not None:
        assert {"graph", "layer"} <= ask(first, "click", node=other).changed


def test_node_search(first):
    v = resolve_view(first.explorer, first.session, Request("search", **first.selection, search="ch1"))
    assert v.matches and all("ch1" in f"{n} {plotting.node_label(n, 16)}" for n in v.matches)
    assert v.node == v.matches[0] and "match 'ch1'" in markdown_text(v.status)
    ring = [t for t in v.graph.data if t.name == "matches"]
    assert ring and {c[0] for c in ring[0].customdata} == {n for n in v.matches if n.startswith(v.layer + ".")}
    none = resolve_view(first.explorer, first.session, Request("search", **first.selection, search="zzz"))
    assert "no node of this circuit matches 'zzz'" in markdown_text(none.status) and none.node == first.node


def test_edge_threshold(first):
    v = resolve_view(first.explorer, first.session, Request("edges", **first.selection, edges=50))
    assert v.edges == 0.5 and "≥ 50% of the largest" in v.graph.layout.title.text and v.changed == {"graph", "status"}
    v = resolve_view(first.explorer, first.session, Request("edges", **first.selection, edges=500))
    assert v.edges == 1.0 and "outside [0, 100]" in markdown_text(v.status)


def test_a_bad_model_or_task_keeps_the_previous_view(first):
    v = ask(first, "model", model="/no/such/folder")
    assert v.changed == {"status", "model"} and "model '/no/such/folder' is not available" in markdown_text(v.status)
    assert v.model == first.model and v.selection == first.selection
    v = ask(first, "task", task="no_such_task")
    assert v.changed == {"status", "task"} and "unknown task 'no_such_task'" in markdown_text(v.status) and v.task == first.task


def test_share_link_restores_the_view(first):
    chosen = ask(ask(first, "k", k=first.k - 5), "layer", layer=first.layer)
    query = dict(urllib.parse.parse_qsl(chosen.share_query))
    assert set(query) == {"model", "task", "run", "k", "layer", "node"}
    again = resolve_view(first.explorer, None, Request("load", query=query))
    assert again.selection == chosen.selection and again.status == ""


def test_a_bad_link_falls_back_with_messages(first):
    v = resolve_view(first.explorer, None, Request("load", query={"task": "no_such_task", "run": "saved:0123456789abcdef", "k": "abc",
                                                  "node": "9.mlp.post_act:1", "layer": "x" * 5000}))
    assert v.task == first.task and v.run.id == first.run.id and v.k == first.k
    for part in ("unknown task 'no_such_task'", "run 'saved:0123456789abcdef' is not available", "k='abc' is not a number",
                 "node '9.mlp.post_act:1' is not in this circuit", "is not in this model"):
        assert part in markdown_text(v.status), part
    v = resolve_view(first.explorer, None, Request("load", query={"model": "../../etc"}))
    assert v.model == "default" and "is not available" in markdown_text(v.status) and "showing default instead" in markdown_text(v.status)


def test_linked_values_are_shown_as_text(first):
    """A link's values come back in the status line as the characters linked, never as a heading or an image."""
    from conftest import markdown_html

    markup = '<img src="http://127.0.0.1:9/x.png"><h1>Your session expired</h1>[sign in](x) *now*'
    for query in ({"task": markup, "node": markup}, {"model": markup}):
        v = resolve_view(first.explorer, None, Request("load", query=query))
        rendered = markdown_html(v.status)
        assert "<img" not in rendered and "<h1" not in rendered and "<a " not in rendered and "<em>" not in rendered
        assert f"{markup!r}"[:60] in markdown_text(v.status), v.status  # quoted as linked (a model name cut at 80)
        assert v.model == "default" and v.task == first.task


def test_saved_runs_survive_a_reload_and_travel_by_link(test_circuit, tmp_path):
    explorer = app_explorer(store_dir=tmp_path / "store")
    spec, path = test_circuit
    entry = explorer.get_model(spec)
    saved, _ = explorer.store.save(import_run_file(entry, str(path)))
    session = Session().with_run(saved.id, spec)
    # a reload: the browser hands back its saved runs
    reloaded = resolve_view(explorer, None, Request("load", query={"task": saved.task}, saved=session.saved()))
    assert saved.id in [rid for _, rid in reloaded.run_choices] and reloaded.session.runs == {saved.id: spec}
    # a link opened in another browser (nothing saved there): the server has the run
    linked = resolve_view(explorer, None, Request("load", query={"task": saved.task, "run": saved.id, "k": 5}))
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
    assert "overview" in resolve_view(first.explorer, first.session, Request("tab", **first.selection, tab="overview")).changed


def test_a_view_overtaken_by_a_later_pick_is_not_painted(first):
    """Two picks in quick succession, the first slow: its view arrives last and is dropped; the numbers are painted
    whenever the page shows their selection; a dropdown re-sending what the page shows is not a new pick."""
    shown, page, other_page = Shown(), SimpleNamespace(session_hash="a"), SimpleNamespace(session_hash="b")
    ticket, new = shown.begin(page, Request("load"))
    assert new and shown.accept(page, first, ticket) and shown.current(page) == first.selected
    smaller = ask(first, "k", k=first.k - 2)
    other_node = next(n for n in first.circuit.nodes if n != first.node)
    slow, _ = shown.begin(page, Request("node", **{**first.selection, "node": other_node}))
    k_change, new = shown.begin(page, Request("k", **smaller.selection))
    assert new and shown.accept(page, smaller, k_change) and shown.current(page) == smaller.selected
    assert not shown.accept(page, ask(first, "node", node=other_node), slow)  # overtaken: not painted
    assert not shown.newest(page, slow) and shown.newest(other_page, 1) and shown.newest(page, None)
    assert not shown.accept(page, ask(first, "stats"), None)  # the old k's numbers: not under the new k
    assert shown.accept(page, ask(smaller, "stats"), None) and shown.current(page) == smaller.selected
    blur = Request("task", **smaller.selection)  # a dropdown's blur: what is shown, nothing on its way
    assert shown.begin(page, blur) == (k_change, False) and resolve_view(smaller.explorer, smaller.session, blur).changed == frozenset()
    # back to the shown layer while a pick of another layer is on its way: a new pick (it must win)
    shown.begin(page, Request("layer", **{**smaller.selection, "layer": "1.mlp"}))
    back, new = shown.begin(page, Request("layer", **smaller.selection))
    assert new and back == k_change + 2
    assert resolve_view(smaller.explorer, smaller.session, Request("layer", **smaller.selection, fresh=True)).changed


def test_a_pick_made_under_an_older_model_does_not_bring_it_back(first):
    """The run box's blur, sent while the page still showed the previous model, reaches the server after the
    model pick the user made next (another queue): it is dropped, and the model pick is painted."""
    shown, page = Shown(), SimpleNamespace(session_hash="a")
    ticket, _ = shown.begin(page, Request("load"))
    assert shown.accept(page, first, ticket)
    old_page = {**first.selection, "model": "/models/hostile"}
    shown.begin(page, Request("model", **old_page))
    assert shown.accept(page, replace(first, model="/models/hostile", event="model"), shown.begin(page)[0])
    model_pick, new = shown.begin(page, Request("model", **first.selection))
    assert new
    assert shown.begin(page, Request("run", **old_page)) == (model_pick, False)  # made on the old page: dropped
    assert shown.begin(page, Request("k", **{**old_page, "k": 3})) == (model_pick, False)
    assert shown.accept(page, first, model_pick) and shown.current(page) == first.selected
    # made on the page that is shown now: a pick as before
    assert shown.begin(page, Request("k", **{**first.selection, "k": 3})) == (model_pick + 1, True)


def test_a_selection_is_spelled_one_way(first):
    page = Selection.of("default", first.task, first.run.id, f"{first.k}.0", first.layer, first.node)
    assert page == first.selected and page.numbers == ("default", first.task, first.run.id, first.k)
    assert Selection.of("default", "with_as", [], 1, first.layer, first.node) == Selection("default", "with_as")
    assert first.selected.caption == f"{first.task} · k={first.k}" and first.selected.caption in first.node_header


def test_numbers_still_to_come_are_marked_updating(first):
    """After a k change the losses and layer deltas of the new k are not known yet: the view names those parts,
    the summary and the bars say "updating…" (never the old k's bars), and the "stats" step clears the marks."""
    k = first.k - 4
    v = ask(first, "k", k=k)
    assert v.updating == ("summary", "layer", "layer_bars") and "layer_bars" in v.changed
    assert "⏳ updating…" in v.summary and f"k={k}" in v.summary and "updating…" in message_of(v.layer_bars)
    assert all(" · Δ … · " in label for label, _ in v.layer_choices)
    done = ask(v, "stats")
    assert done.updating == () and "updating" not in done.summary and not message_of(done.layer_bars)
    assert done.layer_bars.layout.title.text.endswith(f"{first.task} · k={k}")
    assert "layer_bars" not in first.updating  # the run's own k: its file has the layer deltas


def test_a_typed_k_equal_to_the_shown_one_changes_nothing(first):
    """A slider's number box sends its value when clicked into: that must not send the box back (it would
    overwrite digits typed meanwhile) nor reset anything."""
    v = ask(first, "node", node=next(n for n in first.circuit.nodes if n != first.node))
    for same in (v.k, float(v.k), str(v.k)):
        again = ask(v, "k", k=same)
        assert again.changed == frozenset() and again.selection == v.selection


def test_a_layer_answer_does_not_send_the_layer_back(first):
    """Layers clicked in quick succession: the answer for one layer arrives when the page already shows the
    next one the user clicked; it repaints the graph and node, never the layer list (that would undo the later
    click, and the later pick would then be lost)."""
    layers = [value for _, value in first.layer_choices]
    clicked = ask(first, "layer", layer=next(name for name in layers if name != first.layer))
    later_click = replace(first.selected, layer=next(name for name in layers if name not in (first.layer, clicked.layer)))
    parts = clicked.parts_to_paint(later_click)
    assert "layer" not in parts and {"graph", "node", "node_header"} <= parts


# ---- the page, simulated: random events, answers in a random order -----------------------------------------

PANELS = ("graph", "node_header", "layer", "summary", "layer_bars", "node_panel")


class SimulatedPage:
    """A browser page as app.py drives it, without the browser: selectors the user changes at once, a server
    that answers each event with a view (then, as the app chains them, the node panel and the numbers), and
    answers delivered in whatever order the test draws. Every answer goes through `Shown` as in app.py; `painted`
    records, per panel, the selection of what it shows (or ("updating", selection))."""

    def __init__(self, first_view: View):
        self.shown, self.request = Shown(), SimpleNamespace(session_hash="page")
        self.explorer = first_view.explorer
        self.selectors = dict(first_view.selection)
        self.server_session = first_view.session
        self.painted: dict[str, object] = {}
        self.in_flight: list[tuple] = []
        self.last_pick: Selection | None = None
        self._answer("view", first_view, self.shown.begin(self.request, Request("load"))[0], "stats")
        self.last_pick = first_view.selected

    def send(self, event: str, **changes) -> None:
        """The user changes a selector (the page shows it at once) and the page sends the event."""
        self.selectors.update(changes)
        asked = Request(event, **self.selectors)
        ticket, fresh = self.shown.begin(self.request, asked)
        follow = "stats"
        if not fresh:  # (app.py answers a re-send of the newest pick, or of what is shown, with nothing)
            self._answer("view", None, ticket, follow)
            return
        view = resolve_view(self.explorer, self.server_session, replace(asked, fresh=fresh))
        self.server_session = view.session
        self.last_pick = view.selected
        self._answer("view", view, ticket, follow)

    def _answer(self, kind, payload, ticket=None, follow=None):
        self.in_flight.append((kind, payload, ticket, follow))

    def deliver(self, index: int) -> None:
        kind, payload, ticket, follow = self.in_flight.pop(index % len(self.in_flight))
        if kind == "view":
            before = self.shown.current(self.request)
            if payload is not None and self.shown.accept(self.request, payload, ticket):  # app.show
                view = payload
                if not view.numbers_only:  # (the layer list of a "stats" view gets new labels, not a new value)
                    for part in view.parts_to_paint(before) & {"model", "task", "run", "k", "layer", "node"}:
                        self.selectors[part] = view.selection[part]
                for part in set(PANELS) & view.parts_to_paint(before):
                    self.painted[part] = (("updating", view.selected) if part in view.updating else view.selected)
                if not view.numbers_only and view.selected != before:
                    self.painted["node_panel"] = ("updating", view.selected)
            if follow:  # the chain goes on whether the view was painted or dropped, for what the page shows now
                here = self.shown.current(self.request) or Selection.of(*(self.selectors.get(n) for n in SELECTORS))
                self._answer("node_panel", here)  # app.on_node_panel
                asked = Request(follow, **{name: getattr(here, name) for name in SELECTORS})  # app.on_view("stats")
                self._answer("view", resolve_view(self.explorer, self.server_session, asked), self.shown.begin(self.request)[0])
        elif self.shown.shows(self.request, payload):  # app.on_node_panel, after computing
            self.painted["node_panel"] = payload

    def settle(self, order) -> None:
        while self.in_flight:
            self.deliver(order.draw(st.integers(0, 10**6)))


@pytest.fixture(scope="module")
def page_start(first):
    """The first view, and a task without a circuit and its k values to draw from (views of these are cached)."""
    other = next(t for t in ("if_ternary", "lambda_func", "indent_for") if t != first.task)
    return first, [first.task, other, "with_as"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_random_events_answered_in_any_order_paint_one_selection(page_start, data):
    """Random task, run, k, layer, node and click events; their answers (views, node panels, numbers) arrive in
    a random order, some while later events are sent. When all have arrived, every painted panel belongs to the
    page's selection, which is the last pick's, and nothing is left "updating…"."""
    first, tasks = page_start
    page = SimulatedPage(first)
    for _ in range(data.draw(st.integers(1, 6), label="events")):
        view_now = resolve_view(page.explorer, page.server_session, Request("k", **page.selectors))
        event = data.draw(st.sampled_from(["task", "run", "k", "layer", "node", "click"]), label="event")
        if event == "task":
            page.send("task", task=data.draw(st.sampled_from(tasks), label="task"))
        elif view_now.circuit is None:
            page.send("task", task=first.task)
        elif event == "run":
            page.send("run", run=data.draw(st.sampled_from([r.id for r in view_now.runs]), label="run"))
        elif event == "k":
            page.send("k", k=data.draw(st.sampled_from([view_now.k_max, view_now.k_max - 3]), label="k"))
        elif event == "layer":
            page.send("layer", layer=data.draw(st.sampled_from(plotting.layer_names(view_now.entry.n_layer)), label="layer"))
        else:
            nodes = sorted(view_now.circuit.nodes)[:: max(1, len(view_now.circuit.nodes) // 6)]
            page.send(event, node=data.draw(st.sampled_from(nodes), label="node"))
        for _ in range(data.draw(st.integers(0, 3), label="answers before the next event")):
            if page.in_flight:
                page.deliver(data.draw(st.integers(0, 10**6)))
    page.settle(data)
    final = page.shown.current(page.request)
    assert final == page.last_pick
    assert Selection.of(*(page.selectors.get(n) for n in ("model", "task", "run", "k", "layer", "node"))) == final
    for panel, what in page.painted.items():
        assert isinstance(what, Selection), f"{panel} is still {what}"
        if panel in ("summary", "layer_bars", "layer"):  # these show the numbers of (model, task, run, k)
            assert what.numbers == final.numbers, (panel, what, final)
        else:
            assert what == final, (panel, what, final)
