"""The browser's view model: one function from (explorer, session, request) to a `View` that says what the page
shows.

`resolve_view(explorer, session, Request(event, model=…, task=…, run=…, k=…, layer=…, node=…))` decides every selection
(model, task, run, k, layer, node) from what the user asked for, falling back to defaults, clamping numbers and
naming every change in `View.status`; it never raises for bad input. The figures and texts of the view are
properties computed on first use, so a front end pays only for what it sends; `View.changed` names the parts of
the page that a transition changes. The app (`modeling_csp.app.ui`) maps these onto its components in a few lines, and the
tests drive every transition here, without a browser. Every answer is computed for one `Selection` (model, task,
run, k, layer, node) and labelled from it; `Shown` remembers which selection each page shows and which selection
event is the newest, so that an answer arriving late (a slow model load, the node panel of a node left behind,
the numbers of an old k) is never painted under another selection's labels. Parts still waiting for their
numbers are named in `View.updating` and marked "updating…" on the page.

Events: "load" (the page opens: URL parameters in `query`, the browser's saved runs in `saved`), "model",
"task", "run", "k", "layer", "node", "click" (a node clicked in the graph), "search" (node search), "edges"
(edge threshold), "stats" (the slow numbers of the current view: random baseline, layer deltas), "tab"
(a tab opened: its figures).
"""

from __future__ import annotations

import math
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Mapping

from .. import plotting
from ..circuits import walking
from ..circuits.graph import CircuitGraph
from . import analysis as A
from .errors import UserError, markdown_literal
from .explorer import Explorer
from .models import MAX_SPEC_CHARS, ModelEntry
from .runs import Run
from .sessions import Session, find_run, runs_for_task, session_runs

SELECTORS = ("model", "task", "run", "k", "layer", "node")
PARTS = ("model", "task", "run", "k", "summary", "status", "empty", "layer", "node", "graph", "layer_bars",
         "overview", "share", "node_header")
_VIEW_PARTS = frozenset(PARTS) - {"overview"}
CHANGES = {  # what each event changes on the page (the overview only when its tab is open, see resolve_view)
    "load": _VIEW_PARTS, "model": _VIEW_PARTS, "task": _VIEW_PARTS, "run": _VIEW_PARTS,
    "k": _VIEW_PARTS - {"model", "task", "run", "empty"},  # bars: "updating…" until the "stats" step's deltas
    # (the layer bars do not depend on the selection: the layer list shows which layer is chosen)
    "layer": frozenset({"layer", "node", "graph", "share", "status", "node_header"}),
    "node": frozenset({"layer", "node", "graph", "share", "status", "node_header"}),  # layer only when it changes;
    "click": frozenset({"layer", "node", "graph", "share", "status", "node_header"}),  # the graph always (it
    "search": frozenset({"layer", "node", "graph", "share", "status", "node_header"}),  # draws the node's paths)
    "edges": frozenset({"graph", "status"}),
    "stats": frozenset({"summary", "layer", "layer_bars"}),
    "tab": frozenset(),
}
RESETS = {  # selections that go back to their defaults when an earlier one changes
    "model": {"task", "run", "k", "layer", "node"}, "task": {"run", "k", "layer", "node"},
    "run": {"k", "layer", "node"}, "layer": {"node"},
}
MAX_QUERY_CHARS = 300
MAX_SEARCH_CHARS = 100


@dataclass(frozen=True)
class Request:
    """What the page asks for: the event and the selectors' current values (as the page has them: strings,
    floats, anything), plus the edge threshold, a node search, the open tab, and on "load" the URL's
    parameters and the browser's saved runs."""

    event: str
    model: Any = None
    task: Any = None
    run: Any = None
    k: Any = None
    layer: Any = None
    node: Any = None
    edges: Any = 0.0  # edge threshold, % of the largest |weight|
    search: Any = None
    tab: str = "browser"
    query: Mapping[str, Any] | None = None
    saved: Any = None
    fresh: bool = False  # a new pick of the page (`Shown.begin`): its parts are painted even if the session has it

    @property
    def asked(self) -> "Selection":
        return Selection.of(*(getattr(self, name) for name in SELECTORS))


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x + 0.0:.{digits}g}"


def _whole(value: Any) -> int | None:
    """A k as the page may send it (36, 36.0, "36") as an int; None for nothing or not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if number.is_integer() else None


@dataclass(frozen=True)
class Selection:
    """One choice of model, task, run, k, layer and node, spelled one way whatever the page sends (36, 36.0 and
    "36" alike, "" and [] as None). Without a run there is no k, layer or node. Every
    panel is computed for one selection and painted only while the page shows that selection."""

    model: str | None = None
    task: str | None = None
    run: str | None = None
    k: int | None = None
    layer: str | None = None
    node: str | None = None

    @classmethod
    def of(cls, model: Any = None, task: Any = None, run: Any = None, k: Any = None, layer: Any = None,
           node: Any = None) -> "Selection":
        text = lambda v, limit=MAX_QUERY_CHARS: None if isinstance(v, (list, tuple)) and not v else _text(v, limit)  # noqa: E731
        run = text(run)
        if run is None:
            return cls(text(model, MAX_SPEC_CHARS), text(task))
        return cls(text(model, MAX_SPEC_CHARS), text(task), run, _whole(k), text(layer), text(node))

    @property
    def numbers(self) -> tuple:
        """What the losses and layer deltas depend on: model, task, run and k (not the layer or node)."""
        return (self.model, self.task, self.run, self.k)

    @property
    def caption(self) -> str:
        """The selection in a few words, for panel titles: "bracket_brace · k=135"."""
        return f"{self.task}" + (f" · k={self.k}" if self.k is not None else "")


@dataclass
class View:
    """Everything the circuit browser shows for one selection. Selections and choices are plain values; the
    summary, node header, share query and figures are computed on first use."""

    explorer: Explorer
    session: Session
    entry: ModelEntry
    model: str
    task: str
    run: Run | None
    runs: list[Run]
    k: int | None
    k_max: int
    layer: str | None
    node: str | None
    circuit: CircuitGraph | None
    stats: A.CircuitStats | None
    notices: list[str] = field(default_factory=list)
    changed: frozenset[str] = _VIEW_PARTS
    edges: float = 0.0
    matches: tuple[str, ...] = ()
    tab: str = "browser"
    event: str = "load"  # the request's event ("stats": only the slow numbers of this selection)

    @property
    def numbers_only(self) -> bool:
        """A "stats" view: it brings the slow numbers of its selection and changes no selector."""
        return self.event == "stats"

    # -- selectors ------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """The notices as the status line's Markdown: plain text (they quote what links and boxes asked for)."""
        return "⚠️ " + " · ".join(markdown_literal(n) for n in self.notices) if self.notices else ""

    @property
    def model_choices(self) -> list[str]:
        return list(dict.fromkeys([self.model, self.explorer.default_model] + self.explorer.loaded_models()))

    @property
    def task_choices(self) -> list[str]:
        """The built-in tasks, then the user tasks of this session and of its runs (while the server knows them)."""
        own = [*self.session.tasks, *(r.task for r in session_runs(self.entry, self.session)), self.task]
        return A.task_names() + [t for t in dict.fromkeys(own) if t and t.startswith("custom:") and self.entry.tasks.known(t)]

    @property
    def run_choices(self) -> list[tuple[str, str]]:
        return [(r.name, r.id) for r in self.runs]

    @property
    def empty(self) -> str | None:
        """The message for a task without a circuit (the page shows it with a button to prune one)."""
        if self.run is not None:
            return None
        return (f"**No circuit yet** for `{self.task}`. Prune one here (about a minute on a laptop CPU; target and "
                "steps as set in *Ablations & pruning*), import a circuit file in *Share & files*, or pick another "
                "task.")

    @property
    def layer_choices(self) -> list[tuple[str, str]]:
        if self.circuit is None:
            return []
        pending = "layer" in self.updating
        return [(f"{r['layer']} · Δ {'…' if pending else _fmt(r['delta'], 3)} · {r['n_nodes']} nodes", r["layer"])
                for r in self._layer_rows]

    @property
    def node_choices(self) -> list[tuple[str, str]]:
        if self.circuit is None or not self.layer:
            return []
        return [(f"{plotting.node_label(n, self.entry.d_head)} · {n} · {_fmt(self.circuit.nodes[n], 3)}", n)
                for n in plotting.layer_node_ids(self.circuit, self.layer)]

    @property
    def selection(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "run": self.run.id if self.run else None, "k": self.k,
                "layer": self.layer, "node": self.node}

    @property
    def selected(self) -> Selection:
        """This view's selection, the one every panel it paints is labelled with."""
        return Selection.of(**self.selection)

    def parts_to_paint(self, shown: Selection | None) -> frozenset[str]:
        """The parts to send to a page that shows `shown`: what the event changes, and whatever else differs from
        what the page shows (the answer of a pick this one overtook was never painted)."""
        if self.numbers_only or not self.changed:
            return self.changed
        parts = set(self.changed)
        if shown is None or shown.numbers != self.selected.numbers:
            parts |= _VIEW_PARTS
        elif (shown.layer, shown.node) != (self.layer, self.node):
            parts |= {"layer", "node", "graph", "share", "node_header"}  # (the graph: the new node's paths)
        if self.event in ("k", "layer") and self.event not in self.changed:
            # the selector the user just set holds this value: sent back, it would overwrite a later click or
            # digits typed meanwhile (the last pick must win)
            parts.discard(self.event)
        return frozenset(parts)

    @property
    def updating(self) -> tuple[str, ...]:
        """The parts of the page whose numbers this view does not have yet (the "stats" step brings them): the
        page marks them "updating…" rather than leave an older selection's numbers under this one's labels."""
        if self.circuit is None or self.stats is None or self.stats.complete:
            return ()
        return ("summary",) + (() if self.stats.layer_deltas else ("layer", "layer_bars"))

    @property
    def share_query(self) -> str:
        """The URL query that restores this view (saved runs travel by id: the server keeps them)."""
        return urllib.parse.urlencode({k: v for k, v in self.selection.items() if v not in (None, "")})

    # -- texts ------------------------------------------------------------------------------------

    @cached_property
    def summary(self) -> str:
        """Markdown: the model and task as code (both are checked against what the server knows), run
        names and messages as literal text (a run's name is an upload's file name)."""
        e = self.entry
        c = e.config
        lines = [f"**Model** `{self.model}` · {e.n_layer} layers · d_model {c.d_model} · {c.n_head}×{e.d_head} heads · "
                 f"d_mlp {c.d_mlp} · vocab {c.vocab_size}"]
        try:
            lines.append(f"**Task** `{self.task}`: {self.entry.tasks.resolve(self.task).description}")
        except ValueError:
            lines.append(f"**Task** `{self.task}`")
        if self.run is None or self.circuit is None:  # the "no circuit yet" box says the rest
            return "\n\n".join(lines)
        s = self.stats or A.CircuitStats()
        pending = "…" if not s.complete else "n/a"
        val = lambda v: _fmt(v) if v is not None else pending  # noqa: E731
        lines.append(f"**Run** {markdown_literal(self.run.name)} · ablation: {self.circuit.ablation}" + (" · losses computed live" if s.live else ""))
        lines.append("| full model loss | circuit loss | random same-size | complement | nodes | edges | target |\n"
                     "|---|---|---|---|---|---|---|\n"
                     f"| {val(s.full)} | {val(s.circuit)} | {val(s.random)} | {val(s.complement)} | "
                     f"{self.circuit.n_nodes} of {e.n_total_nodes} | {self.circuit.n_edges} | {_fmt(self.circuit.target_loss)} |")
        if "summary" in self.updating:
            missing = [name for name, v in (("random same-size", s.random), ("complement", s.complement),
                                            ("circuit", s.circuit)) if v is None]
            missing += [] if s.layer_deltas else ["layer deltas"]
            lines.append(f'<span class="csp-updating">⏳ updating… {", ".join(missing)} for {self.selected.caption}</span>')
        if s.error:
            lines.append(f"⚠️ {markdown_literal(s.error)}")
        if s.notices:
            lines.append("⚠️ " + "; ".join(markdown_literal(n) for n in s.notices))
        if s.verdict is not None:  # judged on held-out examples (evaluation.circuit_verdict)
            lines += s.verdict.messages(without=("control",))
        if s.random_as_good:
            lines.append("⚠️ random circuits of the same size do as well: this circuit says little about which nodes matter.")
        control = self.circuit.control
        if isinstance(control, dict) and control.get("k") == self.circuit.n_nodes and "loss_at_k" in control:
            lines.append(A.control_text(control, s.random, s.verdict))
        return "\n\n".join(lines)

    @cached_property
    def node_header(self) -> str:
        if self.circuit is None or not self.node:
            return "*Select a node in the graph or the list above.*" if self.circuit is not None else ""
        d = self.entry.d_head
        return (f"### `{self.node}` · {plotting.node_label(self.node, d)}\n{plotting.node_detail(self.node, d)} · "
                f"ablation importance **{_fmt(self.circuit.nodes[self.node])}** (task-loss increase when it alone is "
                f"ablated) · circuit of {self.selected.caption}")

    # -- figures ----------------------------------------------------------------------------------

    @cached_property
    def _layer_rows(self) -> list[dict]:
        deltas = (self.stats.layer_deltas if self.stats else None) or self.circuit.layer_deltas or {}
        rows = plotting.layer_summary(self.circuit, self.entry.n_layer)
        return [{**r, "delta": deltas.get(r["layer"], r["delta"])} for r in rows]

    @cached_property
    def paths(self) -> tuple:
        """The selected node's upstream and downstream walks, which the graphs highlight."""
        if self.circuit is None or self.node not in self.circuit.nodes:
            return ()
        return walking.upstream(self.circuit, self.node), walking.downstream(self.circuit, self.node)

    @cached_property
    def graph(self):
        if self.circuit is None:
            return plotting.message_figure(f"No circuit for {self.task} yet.")
        return plotting.layer_graph_figure(self.circuit, self.layer, self.node, min_weight=self.edges,
                                           highlight=self.matches, paths=self.paths)

    @cached_property
    def layer_bars(self):
        if self.circuit is None:
            return plotting.message_figure("No circuit.", 200)
        if "layer_bars" in self.updating:
            return plotting.message_figure(f"Layer ablation deltas for {self.selected.caption}: updating…", 200)
        figure = plotting.layer_bars_figure(self._layer_rows)
        figure.update_layout(title_text=f"Layer ablation deltas (nodes) · {self.selected.caption}")
        return figure

    @cached_property
    def overview(self):
        if self.circuit is None:
            return plotting.message_figure(f"No circuit for {self.task} yet.")
        return plotting.circuit_overview_figure(self.circuit, self.entry.n_layer, self.node, min_weight=self.edges,
                                                highlight=self.matches, paths=self.paths)


# =====================================================================================================
# Resolving a request
# =====================================================================================================


def _text(value: Any, limit: int = MAX_QUERY_CHARS) -> str | None:
    """A selector value as a short string (None for nothing); longer strings are cut."""
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] if text else None


def search_nodes(circuit: CircuitGraph, text: str, d_head: int) -> list[str]:
    """Nodes whose id or label contains `text` (case-insensitive), most important first."""
    needle = text.strip().lower()
    if not needle:
        return []
    found = [n for n in circuit.nodes if needle in f"{n} {plotting.node_label(n, d_head)}".lower()]
    return sorted(found, key=lambda n: -(circuit.nodes[n] if circuit.nodes[n] is not None else -math.inf))


def _first_task_with_run(entry: ModelEntry, session: Session) -> str:
    tasked = [r.task for r in session_runs(entry, session) if r.task and entry.tasks.known(r.task)]
    return tasked[0] if tasked else A.task_names()[0]


def picks_again(session: Session | None, request: Request) -> bool:
    """Whether a model, task, run, k, layer or node event asks for the selection the session already shows:
    Gradio 6 dropdowns send their value again whenever they lose focus, and a slider's number box sends its value
    when clicked into; neither is a new pick."""
    event = request.event
    if event not in SELECTORS or not isinstance(session, Session) or not session.view:
        return False
    if event == "k":
        return _whole(request.k) is not None and _whole(request.k) == _whole(session.view.get("k"))
    return _text(getattr(request, event)) == _text(session.view.get(event))


PICKS = ("load", "model", "task", "run", "k", "layer", "node", "click", "search")


def _resolve(explorer: Explorer, session: Session, request: Request) -> View:
    event = request.event
    if event not in CHANGES:
        raise UserError(f"unknown event {event!r}")
    notices: list[str] = []
    asked = {name: getattr(request, name) for name in SELECTORS}
    if event == "load":
        session = Session.restore(request.saved)
        query = request.query or {}
        asked = {name: _text(query.get(name)) for name in SELECTORS}
    repeated = picks_again(session, request)  # then nothing changes
    fresh = set() if repeated else RESETS.get(event, set())
    explicit = set(SELECTORS) if event == "load" else {event}  # values the user typed or linked: say if they fail

    def wanted(name):
        return None if name in fresh else asked.get(name)

    # model
    spec = _text(asked["model"], MAX_SPEC_CHARS) or explorer.default_model
    try:
        entry = explorer.get_model(spec)
    except UserError as exc:
        if event != "load":
            raise
        notices.append(f"{exc}; showing {explorer.default_model} instead")
        entry = explorer.get_model(explorer.default_model)
        fresh = RESETS["model"]

    # task
    task = _text(wanted("task"))
    if task is not None and not entry.tasks.known(task) and _text(wanted("run")):
        find_run(entry, session, _text(wanted("run")))  # a linked run of a user task brings the task back
    if task is not None and not entry.tasks.known(task):
        if "task" in explicit:
            if event == "task":
                raise UserError(f"unknown task {task!r}")
            notices.append(f"unknown task {task!r}")
        task = None
    task = task or _first_task_with_run(entry, session)

    # run: the model's runs and the session's for this task; a saved run linked by id joins the session
    run_id = _text(wanted("run"))
    run = find_run(entry, session, run_id) if run_id else None
    if run is not None and run.id.startswith("saved:") and run.id not in session.runs and run.task in (task, None):
        session = session.with_run(run.id, entry.spec)
    runs = runs_for_task(entry, session, task)
    if run is not None and run.id not in {r.id for r in runs}:
        run = None
    if run is None:
        if run_id and "run" in explicit:
            notices.append(f"run {run_id!r} is not available for {task} here (runs pruned or imported elsewhere "
                           "travel by link only while the server keeps them)")
        run = runs[0] if runs else None

    # k
    k, k_max, circuit, stats = None, 1, None, None
    if run is not None:
        whole = run.load()
        k_max = max(A.max_k(entry, run), 1)
        raw_k = wanted("k")
        k = whole.n_nodes
        if raw_k not in (None, ""):
            try:
                k, note = A.clamp(raw_k, 1, k_max, "k")
                if note:
                    notices.append(note)
            except UserError as exc:
                notices.append(f"{exc}: showing k={k}")
        circuit = A.circuit_at_k(entry, run, k)
        stats = A.circuit_stats(entry, run, k, task, quick=event != "stats")

    # layer and node
    layer = node = None
    matches: tuple[str, ...] = ()
    if circuit is not None:
        deltas = (stats.layer_deltas if stats else None) or circuit.layer_deltas
        layer_names = plotting.layer_names(entry.n_layer)
        asked_layer, asked_node = _text(wanted("layer")), _text(wanted("node"))
        if event == "search":
            text = (_text(request.search, MAX_SEARCH_CHARS) or "")
            found = search_nodes(circuit, text, entry.d_head)
            if found:
                matches, asked_node = tuple(found), found[0]
                notices.append(f"{len(found)} node(s) match {text!r}" + (f"; showing {found[0]}" if len(found) > 1 else ""))
            else:
                notices.append(f"no node of this circuit matches {text!r}")
        if asked_node is not None and asked_node not in circuit.nodes:
            if "node" in explicit or event == "click":
                notices.append(f"node {asked_node!r} is not in this circuit")
            asked_node = None
        if event in ("node", "click", "search") and asked_node is not None:
            asked_layer = plotting.sublayer_of(asked_node)
        if asked_layer is not None and asked_layer not in layer_names:
            if "layer" in explicit:
                notices.append(f"layer {asked_layer!r} is not in this model")
            asked_layer = None
        if event == "k" and asked_layer is not None and not plotting.layer_node_ids(circuit, asked_layer):
            asked_layer = None  # the smaller circuit has nothing left there
        if asked_layer is None and asked_node is not None:
            asked_layer = plotting.sublayer_of(asked_node)
        layer = asked_layer or A.best_layer(entry, circuit, deltas)
        node = asked_node if asked_node is not None and plotting.sublayer_of(asked_node) == layer else A.best_node(circuit, layer)

    # edge threshold: a percentage of the largest |weight|
    edges = 0.0
    if request.edges not in (None, ""):
        try:
            pct, note = A.clamp(request.edges, 0, 100, "edge threshold (%)")
            edges = pct / 100
            if note and event == "edges":
                notices.append(note)
        except UserError as exc:
            if event == "edges":
                notices.append(str(exc))

    changed = frozenset() if repeated and not request.fresh else CHANGES[event]
    if event not in ("load", "stats", "tab", "edges"):
        # a selector whose value the view does not take as asked is sent back (clamped, fallen back, or asked
        # while an earlier pick's answer was on its way)
        shown = Selection.of(entry.spec, task, run.id if run else None, k, layer, node)
        changed = changed | {name for name in ("model", "task", "run", "k", "layer", "node")
                             if getattr(shown, name) != getattr(request.asked, name)}
    if event == "k" and k is not None and _whole(request.k) == k:
        changed = changed - {"k"}  # the box holds it already: sent back, it would overwrite digits typed meanwhile
    if event in ("layer", "node", "click", "search") and layer == _text(request.layer):
        changed = changed - {"layer"}  # the layer list already shows this layer
    if request.tab == "overview" and event != "stats" and not repeated:
        changed = changed | {"overview"}
    view = View(explorer=explorer, session=session, entry=entry, model=entry.spec, task=task, run=run,
                runs=runs, k=k, k_max=k_max, layer=layer, node=node, circuit=circuit, stats=stats,
                notices=notices, changed=changed, edges=edges, matches=matches, tab=request.tab, event=event)
    view.session = session.with_view(view.selection)
    return view


def resolve_view(explorer: Explorer, session: Session | None, request: Request) -> View:
    """The view for a request. Bad values are clamped or replaced by defaults with a message in `status`; a
    model or task that cannot be shown keeps the previous view (its selector goes back) with the message."""
    session = session if isinstance(session, Session) else Session()
    try:
        return _resolve(explorer, session, request)
    except UserError as exc:
        previous = dict(session.view)
        if not previous:
            previous = {"model": explorer.default_model}
        try:  # the previous selection, as it was (a "k" request keeps every selection it is given)
            view = _resolve(explorer, session, Request("k", **{k: v for k, v in previous.items() if k in SELECTORS},
                                             edges=request.edges, tab=request.tab))
        except UserError:
            view = _resolve(explorer, Session(runs=dict(session.runs)),
                            Request("model", model=explorer.default_model, tab=request.tab))
        reverted = {request.event} & set(SELECTORS)
        return replace(view, notices=[str(exc)], changed=frozenset({"status"} | reverted))


# the selectors a pick of each kind was made under: the page it was made on showed these
_PICK_CONTEXT = {"task": ("model",), **{e: ("model", "task") for e in ("run", "k", "layer", "node", "click", "search")}}


def _made_on_another_page(event: str, wanted: Selection, newest: Selection | None) -> bool:
    """Whether a pick was made under another model or task than the newest pick (or, none on its way, the page):
    each box sends the whole selection, so a run picked before a model pick that the server saw first would
    otherwise bring the old model back."""
    return newest is not None and any(getattr(wanted, name) != getattr(newest, name)
                                      for name in _PICK_CONTEXT.get(event, ()))


class Shown:
    """What each page shows (session hash -> its `Selection`), and a ticket per page that each new pick takes
    when it starts. The app paints an answer only through here: a view only if no pick started after its own
    event (`accept`), the slow numbers and the node panel only while the page shows the selection they were
    computed for (`shows`). So nothing is painted under another selection's labels, whatever order the answers
    arrive in. Pages not known here (no session hash: tests, the API) accept everything."""

    def __init__(self, limit: int = 10_000):
        self._lock = threading.Lock()
        self._pages: OrderedDict[str, Selection] = OrderedDict()
        self._tickets: OrderedDict[str, int] = OrderedDict()
        self._asked: OrderedDict[str, Selection] = OrderedDict()  # what the newest pick asked for
        self._painted: OrderedDict[str, int] = OrderedDict()  # the ticket of the view painted last
        self._limit = limit

    def _put(self, table: OrderedDict, key: str, value) -> None:
        """(under the lock) the newest entry of a table that keeps the `limit` most recent pages"""
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._limit:
            table.popitem(last=False)

    def begin(self, request, asked: Request | None = None) -> tuple[int | None, bool]:
        """The ticket of an event starting now, and whether it is a new pick. A pick (`PICKS`) takes a new ticket,
        so that the answers of earlier events still on their way are dropped (the last pick wins, whatever order
        answers arrive in), unless it asks for what the newest pick, still on its way, asked for, or (none on
        its way) for what the page shows: Gradio 6 dropdowns send their value again whenever they lose focus, and a slider's
        number box when clicked into. Anything else (a follow-up step) keeps the current ticket."""
        key = getattr(request, "session_hash", None)
        if not key:
            return None, bool(asked is not None and asked.event in PICKS)
        with self._lock:
            ticket, new = self._tickets.get(key, 0), False
            if asked is not None and asked.event in PICKS:
                wanted = asked.asked
                on_its_way = self._painted.get(key) != ticket
                newest = self._asked.get(key) if on_its_way else self._pages.get(key)
                again = asked.event not in ("load", "click", "search") and wanted == newest
                if _made_on_another_page(asked.event, wanted, newest):
                    again = True  # (dropped like a re-send)
                if not again:
                    ticket, new = ticket + 1, True
                    self._put(self._asked, key, wanted)
            self._put(self._tickets, key, ticket)
        return ticket, new

    def _newest(self, key: str, ticket: int | None) -> bool:
        return ticket is None or self._tickets.get(key) in (None, ticket)

    def newest(self, request, ticket: int | None) -> bool:
        """Whether no pick of this page started after the event holding `ticket`."""
        with self._lock:
            return self._newest(getattr(request, "session_hash", None) or "", ticket)

    def accept(self, request, view: "View", ticket: int | None) -> bool:
        """Whether to paint a view: not if a later pick started; the slow numbers of a "stats" view whenever the
        page shows the model, task, run and k they are for. A painted view's selection becomes the page's."""
        key = getattr(request, "session_hash", None) or ""
        with self._lock:
            if view.numbers_only:  # (no ticket: numbers are right whenever the page shows their selection)
                shown = self._pages.get(key)
                return shown is None or shown.numbers == view.selected.numbers
            if not self._newest(key, ticket):
                return False
            if key:
                self._put(self._pages, key, view.selected)
                self._put(self._painted, key, self._tickets.get(key, 0))
            return True

    def current(self, request) -> Selection | None:
        """The selection this page shows (None when not known)."""
        with self._lock:
            return self._pages.get(getattr(request, "session_hash", None) or "")

    def shows(self, request, selection: Selection, numbers_only: bool = False) -> bool:
        """Whether the page shows this selection (only its model, task, run and k when `numbers_only`); True when
        the page is not known."""
        shown = self.current(request)
        if shown is None:
            return True
        return shown.numbers == selection.numbers if numbers_only else shown == selection


class Progress:
    """What a long job (pruning) reported last, as the page's progress line: the job calls it from its own thread
    with (fraction done, stage text), the page reads `text` while it waits."""

    def __init__(self):
        self._lock = threading.Lock()
        self._latest: tuple[float | None, str] | None = None

    def __call__(self, fraction: Any, desc: Any = "") -> None:
        try:
            fraction = min(max(float(fraction), 0.0), 1.0)
        except (TypeError, ValueError):
            fraction = None
        with self._lock:
            self._latest = (fraction, str(desc or "").strip())

    @property
    def text(self) -> str:
        with self._lock:
            latest = self._latest
        if latest is None:
            return "⏳ starting…"
        fraction, desc = latest
        done = f"{fraction:.0%}" if fraction is not None else ""
        return "⏳ " + " · ".join(part for part in (desc, done) if part)


__all__ = ["Request", "Selection", "View", "resolve_view", "picks_again", "PICKS", "Shown", "Progress", "search_nodes", "SELECTORS", "PARTS", "CHANGES"]
