"""What the app's "Export" controls and the node panel's label box do, as plain functions (no Gradio): a figure of
the page's selection as a file, the shown circuit as an offline HTML page and CSV tables, and a node label.

A label changes a run's content, and runs are kept under content ids (`RunStore`), so labelling makes a new saved
run: a shipped (read-only) circuit gets a saved copy with the label, a saved run a new saved id. The page switches to
it, so the share link and the downloads carry the labels; an older link still shows the run as it was.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import export, plotting
from . import analysis as A
from .errors import UserError, first_line, log
from .explorer import Explorer
from .models import ModelEntry
from .panels import DOWNLOAD_KEEP_S, DOWNLOADS_DIR, NewRun, remove_old_downloads, warning_markdown
from .runs import Run
from .sessions import Session, find_run
from .view import Request, resolve_view

FIGURES = {  # the figures the Export control offers: {key: what the page calls it}
    "graph": "Circuit graph (selected layer)",
    "overview": "Whole circuit",
    "faithfulness": "Faithfulness curve",
    "pruning": "Pruning curve",
    "training": "Model training curve",
}
LABELLED_SUFFIX = " · labelled"


def _shown(explorer: Explorer, model: Any, run_id: Any, k: Any) -> tuple[ModelEntry, Run, Any]:
    """(model, run, circuit at k) the page shows; UserError when there is no circuit."""
    entry = explorer.get_model(str(model or "") or None)
    run = find_run(entry, None, str(run_id)) if run_id else None
    if run is None:
        raise UserError("no circuit is shown: pick a pruning run first")
    try:
        k = A.clamp(k, 1, A.max_k(entry, run), "k")[0] if k not in (None, "") else None
    except UserError:
        k = None
    return entry, run, A.circuit_at_k(entry, run, k)


def _download_folder() -> Path:
    DOWNLOADS_DIR.mkdir(parents=True, exist_ok=True)
    remove_old_downloads(DOWNLOADS_DIR, DOWNLOAD_KEEP_S)
    return Path(tempfile.mkdtemp(dir=DOWNLOADS_DIR, prefix="download-"))


def _explain(exc: BaseException) -> str:
    """A UserError's own message; anything else named, with its traceback in the server log."""
    if isinstance(exc, UserError):
        return str(exc)
    import traceback

    traceback.print_exc()
    return f"unexpected error: {type(exc).__name__}: {first_line(exc)}"


def _file_stem(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(str(p) for p in parts if p not in (None, "")))[:120]


# ---- figures -------------------------------------------------------------------------------


def selection_figure(explorer: Explorer, which: str, model: Any, task: Any, run_id: Any, k: Any, layer: Any = None,
                     node: Any = None, edges: Any = 0) -> Any:
    """The figure `which` (a FIGURES key) for the page's selection, drawn as the page draws it."""
    if which not in FIGURES:
        raise UserError(f"unknown figure {which!r}; choose one of {', '.join(FIGURES)}")
    if which in ("faithfulness", "pruning", "training"):
        from .panels import curves_panel

        return getattr(curves_panel(explorer, model, task, run_id, k), which)
    entry, _, circuit = _shown(explorer, model, run_id, k)
    node = node if isinstance(node, str) and node in circuit.nodes else None
    try:
        min_weight = min(max(float(edges or 0), 0.0), 100.0) / 100
    except (TypeError, ValueError):
        min_weight = 0.0
    if which == "overview":
        return plotting.circuit_overview_figure(circuit, entry.n_layer, node, min_weight=min_weight)
    layers = plotting.layer_names(entry.n_layer)
    if layer not in layers:
        raise UserError(f"no layer is selected: pick one of {', '.join(layers)}")
    return plotting.layer_graph_figure(circuit, layer, node, min_weight=min_weight)


def figure_download(explorer: Explorer, which: str, fmt: str, model: Any, task: Any, run_id: Any, k: Any,
                    layer: Any = None, node: Any = None, edges: Any = 0) -> str:
    """The figure written as an HTML, PNG or SVG file in a fresh download folder; UserError (one line) when it
    cannot be made (no circuit, no image exporter on this server)."""
    try:
        figure = selection_figure(explorer, which, model, task, run_id, k, layer, node, edges)
        folder = _download_folder()
        name = _file_stem(which, layer if which == "graph" else None, f"k{k}" if k else None) or "figure"
        return str(export.write_figure(figure, folder / f"{name}.{fmt}", fmt))
    except export.ExportError as exc:
        raise UserError(str(exc)) from None


# ---- the circuit ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CircuitFiles:
    """The shown circuit as files for download (None where there is no circuit)."""

    page: str | None = None  # standalone interactive HTML
    nodes: str | None = None  # nodes CSV
    edges: str | None = None  # edges CSV


def circuit_downloads(explorer: Explorer, model: Any, run_id: Any, k: Any) -> CircuitFiles:
    """The shown circuit written as an offline HTML page and two CSV tables, in a fresh folder per request."""
    try:
        _, run, circuit = _shown(explorer, model, run_id, k)
    except Exception as exc:
        log(f"no circuit export: {first_line(exc)}")
        return CircuitFiles()
    folder = _download_folder()
    stem = _file_stem(circuit.task or "circuit", f"k{circuit.n_nodes}", run.id)
    page = export.write_circuit_html(circuit, folder / f"{stem}.html", title=f"{run.name} · {circuit.n_nodes} nodes")
    nodes, edges = export.write_circuit_csv(circuit, folder / stem)
    return CircuitFiles(str(page), str(nodes), str(edges))


# ---- labels --------------------------------------------------------------------------------


def node_label(explorer: Explorer, model: Any, run_id: Any, k: Any, node: Any) -> str:
    """The label of the selected node ("" when none, or nothing is shown)."""
    try:
        _, _, circuit = _shown(explorer, model, run_id, k)
    except Exception:
        return ""
    return circuit.labels.get(str(node), "") if node else ""


def label_node(explorer: Explorer, session: Session, model: Any, task: Any, run_id: Any, k: Any, layer: Any,
               node: Any, text: Any, edges: Any = 0, tab: str = "browser") -> NewRun:
    """Labels a node of the shown run (an empty text removes the label): saved as a new run, which the returned
    view shows at the same k, layer and node (see the module docstring)."""
    try:
        entry, run, shown = _shown(explorer, model, run_id, k)
        if not node:
            raise UserError("no node is selected: click one in the graph first")
        if node not in shown.nodes:
            raise UserError(f"{node} is not a node of the shown circuit: pick one in the graph")
        full = run.load()
        if node not in full.nodes:
            raise UserError(f"{node} is in the circuit at this k but not in the run's own circuit of "
                            f"{full.n_nodes} nodes: labels belong to the run's nodes; pick k <= {full.n_nodes}")
        labelled = full.with_labels({str(node): text if isinstance(text, str) else ""})
        if labelled.labels == full.labels:
            raise UserError(f"{node} already has this label" if text else f"{node} has no label to remove")
        name = run.name if run.name.endswith(LABELLED_SUFFIX) else run.name + LABELLED_SUFFIX
        copy = replace(run, id=f"labelled:{run.id}", name=name, circuit=labelled, path=None,
                       source="imported" if run.source == "shipped" else run.source)
        saved, notice = explorer.store.save(copy)
        session = (session if isinstance(session, Session) else Session()).with_run(saved.id, entry.spec)
        view = resolve_view(explorer, session, Request("run", model=entry.spec, task=saved.task or task, run=saved.id,
                                                       k=k, layer=layer, node=node, edges=edges, tab=tab))
    except Exception as exc:
        return NewRun(None, warning_markdown(f"could not label the node: {_explain(exc)}"))
    said = (f"✅ labelled {node}" if labelled.labels.get(node) else f"✅ removed the label of {node}")
    message = (f"{said}: saved as run {saved.id} (shared by this page's link; the run without it is unchanged)"
               + (f" {warning_markdown(notice)}" if notice else ""))
    return NewRun(view, message, [notice] if notice else [])


__all__ = ["FIGURES", "CircuitFiles", "selection_figure", "figure_download", "circuit_downloads", "node_label",
           "label_node"]
