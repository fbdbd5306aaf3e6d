"""Files to take away: any figure as standalone HTML, PNG or SVG, and a circuit as a standalone interactive HTML page
and as CSV tables of its nodes and edges.

A module of its own above `plotting` (not in `circuits`): the HTML page and the images are drawn by plotting's
figures, and the circuit library must install and import without plotly (pyproject.toml's import-linter contract).
The CSV tables need no plotly; this module imports plotting only inside the functions that draw.

Everything works offline: HTML files inline plotly.js (about 4.8 MB) and load nothing from the network; PNG and
SVG are drawn by plotly's `kaleido` (v1) in a local Chrome or Chromium (Debian's /usr/bin/chromium is found; CSP_BROWSER or
BROWSER_PATH names another) with MathJax switched off, so no page it renders asks the network for anything.

    from modeling_csp import export
    export.write_circuit_html(circuit, "circuit.html")          # graph + node table, one file
    export.write_circuit_csv(circuit, "circuit")                 # circuit.nodes.csv, circuit.edges.csv
    export.write_figure(plotting.circuit_overview_figure(circuit), "overview.svg")
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .circuits.graph import CircuitGraph, parse_node_id
from .utils.jsonio import write_bytes_atomic, write_text_atomic

FIGURE_FORMATS = ("html", "png", "svg")
CIRCUIT_FORMATS = ("html", "csv", "json")
NODE_COLUMNS = ("node", "location", "layer", "index", "importance", "label")
EDGE_COLUMNS = ("source", "target", "weight", "kind")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
IMAGE_TIMEOUT_S = 90.0
KALEIDO_PIN = "kaleido>=1.5,<1.6"  # the range tested (pyproject.toml's [app] extra)


class ExportError(ValueError):
    """An export that cannot be made here (a format unknown, no image exporter); the message says what to do."""


# ---- figures -------------------------------------------------------------------------------


def figure_html(fig, title: str | None = None) -> str:
    """A figure as one standalone HTML page: plotly.js inlined, nothing fetched from the network."""
    text = fig.to_html(include_plotlyjs=True, full_html=True, include_mathjax=False,
                       config={"displaylogo": False, "responsive": True})
    if title:
        text = text.replace("<head>", f"<head><title>{html.escape(title)}</title>", 1)
    return text


def find_browser() -> str | None:
    """The Chrome/Chromium kaleido drives: CSP_BROWSER or BROWSER_PATH when set, else the first on PATH."""
    for var in ("CSP_BROWSER", "BROWSER_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def image_export_problem() -> str | None:
    """Why PNG/SVG cannot be made here (None when they can): kaleido or a browser missing."""
    if importlib.util.find_spec("kaleido") is None:
        return (f"PNG and SVG need plotly's kaleido: pip install '{KALEIDO_PIN}' (and Chrome or Chromium); "
                "HTML export works without")
    browser = find_browser()
    if browser is None:
        return ("PNG and SVG need Chrome or Chromium (Debian: apt-get install chromium; or set CSP_BROWSER to its "
                "path); HTML export works without")
    if not (os.path.isfile(browser) and os.access(browser, os.X_OK)):
        return f"PNG and SVG: the browser {browser!r} (CSP_BROWSER/BROWSER_PATH) is not an executable file; fix the path"
    return None


def _check_format(fmt: str, allowed: tuple[str, ...], what: str) -> str:
    fmt = str(fmt or "").lower().lstrip(".")
    if fmt not in allowed:
        raise ExportError(f"unknown {what} format {fmt!r}; choose one of {', '.join(allowed)}")
    return fmt


def figure_bytes(fig, fmt: str, width: int | None = None, height: int | None = None) -> bytes:
    """A figure as the bytes of an HTML, PNG or SVG file (PNG/SVG: `image_export_problem` says when they cannot
    be made; the image is the figure's own size, or 1000 x its height)."""
    fmt = _check_format(fmt, FIGURE_FORMATS, "figure")
    if fmt == "html":
        return figure_html(fig).encode("utf-8")
    problem = image_export_problem()
    if problem:
        raise ExportError(problem)
    import kaleido

    # choreographer logs a traceback for each pipe message it cannot parse and skips (large images split across
    # reads); the image still arrives, and a render that fails raises below
    logging.getLogger("choreographer.channels.pipe").setLevel(logging.CRITICAL)
    layout = fig.layout
    opts = {"format": fmt, "width": width or layout.width or 1000, "height": height or layout.height or 500}
    try:
        data = kaleido.calc_fig_sync(fig.to_dict(), opts=opts,
                                     kopts={"path": find_browser(), "mathjax": False, "timeout": IMAGE_TIMEOUT_S})
    except Exception as exc:  # a browser that fails to start, a render that times out
        raise ExportError(f"the {fmt.upper()} export failed in the browser ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no message'}); HTML export works without "
                          "a browser") from None
    return data if isinstance(data, bytes) else str(data).encode("utf-8")


def write_figure(fig, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Writes a figure to `path` (format from `fmt`, else the file's suffix), atomically."""
    path = Path(path)
    fmt = _check_format(fmt or path.suffix, FIGURE_FORMATS, "figure")
    return write_bytes_atomic(path, figure_bytes(fig, fmt))


# ---- circuit tables ------------------------------------------------------------------------


def _csv_text(header: tuple[str, ...], rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)  # RFC 4180: CRLF, quotes doubled
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def nodes_csv(circuit: CircuitGraph) -> str:
    """The circuit's nodes as CSV (RFC 4180): node, location, layer, index, importance (empty when unknown),
    label (the researcher's note, empty when none)."""
    rows = []
    for node, importance in circuit.nodes.items():
        location, index = parse_node_id(node)
        rows.append([node, location, location.split(".", 1)[0], index, _number(importance),
                     circuit.labels.get(node, "")])
    return _csv_text(NODE_COLUMNS, rows)


def edges_csv(circuit: CircuitGraph) -> str:
    """The circuit's edges as CSV (RFC 4180): source, target, weight, kind ("weight" or "residual")."""
    return _csv_text(EDGE_COLUMNS, ([e.source, e.target, _number(e.weight), e.kind] for e in circuit.edges))


def csv_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """Where `write_circuit_csv(circuit, out)` writes: OUT.nodes.csv and OUT.edges.csv (a .csv suffix of OUT
    dropped first)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() == ".csv" else out
    return stem.with_name(stem.name + ".nodes.csv"), stem.with_name(stem.name + ".edges.csv")


def write_circuit_csv(circuit: CircuitGraph, out: str | os.PathLike) -> tuple[Path, Path]:
    """The nodes and edges tables, each written atomically; returns their paths (see `csv_paths`)."""
    nodes_path, edges_path = csv_paths(out)
    return (write_text_atomic(nodes_path, nodes_csv(circuit)), write_text_atomic(edges_path, edges_csv(circuit)))


# ---- the circuit page ----------------------------------------------------------------------

_PAGE_CSS = """
body {font-family: Inter, Helvetica, Arial, sans-serif; margin: 24px; color: #2a3f5f;}
table {border-collapse: collapse; font-size: 13px;} td, th {border: 1px solid #ddd; padding: 3px 8px; text-align: left;}
th {background: #f3f5f9; cursor: pointer;} .num {text-align: right; font-variant-numeric: tabular-nums;}
details {margin: 8px 0;} summary {cursor: pointer; font-weight: 600;} #node-filter {margin: 8px 0; width: 20em;}
"""

# Filter and sort the node table (no network, no library).
_PAGE_JS = """
const table = document.getElementById('node-table');
document.getElementById('node-filter').addEventListener('input', (e) => {
  const q = e.target.value.toLowerCase();
  for (const row of table.tBodies[0].rows) row.style.display = row.textContent.toLowerCase().includes(q) ? '' : 'none';
});
table.tHead.addEventListener('click', (e) => {
  const col = e.target.cellIndex; if (col === undefined) return;
  const rows = Array.from(table.tBodies[0].rows);
  const key = (r) => { const t = r.cells[col].textContent; const x = parseFloat(t); return isNaN(x) ? t : x; };
  const dir = table.dataset.sort === String(col) ? -1 : 1;
  table.dataset.sort = dir === 1 ? String(col) : '';
  rows.sort((a, b) => { const p = key(a), q = key(b); return (p > q ? 1 : p < q ? -1 : 0) * dir; });
  rows.forEach((r) => table.tBodies[0].appendChild(r));
});
"""


def circuit_html(circuit: CircuitGraph, title: str | None = None) -> str:
    """A standalone interactive page for a circuit: the whole-circuit graph, each sublayer's graph (folded), and
    a node table (filter, sort by a column) with importances and labels. plotly.js is inlined once; the page
    fetches nothing. Labels and every other text are escaped."""
    from . import plotting

    title = title or f"Circuit: {circuit.task or 'unnamed task'} · {circuit.n_nodes} nodes"
    n_layer = int(circuit.model.get("n_layer") or 0) or 1 + max((int(n.split(".", 1)[0]) for n in circuit.nodes),
                                                                 default=0)
    parts = [plotting.circuit_overview_figure(circuit, n_layer).to_html(include_plotlyjs=True, full_html=False,
                                                                      config={"displaylogo": False})]
    layers = [layer for layer in plotting.layer_names(n_layer)
              if plotting.layer_node_ids(circuit, layer)]
    for layer in layers:
        figure = plotting.layer_graph_figure(circuit, layer).to_html(include_plotlyjs=False, full_html=False,
                                                                     config={"displaylogo": False})
        parts.append(f"<details><summary>{html.escape(layer)}: {len(plotting.layer_node_ids(circuit, layer))} nodes"
                     f"</summary>{figure}</details>")
    losses = ", ".join(f"{html.escape(str(k))} {v:.4g}" for k, v in circuit.losses.items() if isinstance(v, (int, float)))
    facts = [f"model {html.escape(str(circuit.model.get('name', 'unnamed')))}",
             f"task {html.escape(str(circuit.task))}", f"{circuit.n_nodes} nodes, {circuit.n_edges} edges",
             f"ablation {html.escape(circuit.ablation)}"] + ([f"task losses (nats): {losses}"] if losses else [])
    rows = []
    for node, importance in sorted(circuit.nodes.items(), key=lambda kv: -abs(kv[1] or 0.0)):
        location, index = parse_node_id(node)
        rows.append(f"<tr><td>{html.escape(node)}</td><td>{html.escape(location)}</td><td class=num>{index}</td>"
                    f"<td class=num>{'' if importance is None else f'{importance:.4g}'}</td>"
                    f"<td>{html.escape(circuit.labels.get(node, ''))}</td></tr>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_PAGE_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<p>{' · '.join(facts)}</p>\n"
            + "\n".join(parts)
            + "\n<h2>Nodes</h2>\n<input id=node-filter placeholder=\"filter: id, location or label\">\n"
            "<table id=node-table><thead><tr><th>node</th><th>location</th><th>index</th><th>importance (Δ loss)</th>"
            f"<th>label</th></tr></thead><tbody>\n{chr(10).join(rows)}\n</tbody></table>\n"
            f"<script>{_PAGE_JS}</script>\n</body></html>\n")


def write_circuit_html(circuit: CircuitGraph, path: str | os.PathLike, title: str | None = None) -> Path:
    """`circuit_html` written atomically to `path`."""
    return write_text_atomic(path, circuit_html(circuit, title))


def export_circuit(circuit: CircuitGraph, fmt: str, out: str | os.PathLike) -> list[Path]:
    """The circuit written as `fmt` ("html": the page; "csv": the two tables; "json": a csp-circuit file, labels
    included); returns the files written."""
    fmt = _check_format(fmt, CIRCUIT_FORMATS, "circuit export")
    if fmt == "html":
        return [write_circuit_html(circuit, out)]
    if fmt == "csv":
        return list(write_circuit_csv(circuit, out))
    return [circuit.save(out)]


def describe(paths: list[Path]) -> dict[str, Any]:
    """{"files": [{"path", "bytes"}]}: what an export wrote."""
    return {"files": [{"path": str(p), "bytes": p.stat().st_size} for p in paths]}


__all__ = [
    "FIGURE_FORMATS", "CIRCUIT_FORMATS", "NODE_COLUMNS", "EDGE_COLUMNS", "ExportError", "figure_html", "find_browser",
    "image_export_problem", "figure_bytes", "write_figure", "nodes_csv", "edges_csv", "csv_paths", "write_circuit_csv",
    "circuit_html", "write_circuit_html", "export_circuit", "describe",
]
