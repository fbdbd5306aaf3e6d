"""`modeling_csp.explorer.exports`: what the app's Export controls and label box do, without a browser. On the
default model (or $CSP_APP_TEST_MODEL) with the small test circuit; labelled runs go to a temp run store."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from conftest import TEST_TASK, markdown_text
from modeling_csp.explorer import exports
from modeling_csp.explorer.errors import UserError
from modeling_csp.explorer.explorer import Explorer, Settings
from modeling_csp.explorer.runs import SAVED_ID, RunStore
from modeling_csp.explorer.sessions import Session


@pytest.fixture(scope="module")
def page(test_circuit, tmp_path_factory):
    """The page of the test circuit: explorer (saved runs in a temp store), model, run id, k, layer and a node."""
    spec, path = test_circuit
    store = tmp_path_factory.mktemp("store")
    explorer = Explorer(Settings(run_files=[str(path)], store_dir=store))
    run = explorer.get_model(spec).runs["imported:" + path.stem]
    node = max(run.circuit.nodes, key=lambda n: run.circuit.nodes[n] or 0)
    layer = ".".join(node.split(".")[:2])
    return {"explorer": explorer, "model": spec, "task": TEST_TASK, "run": run.id, "k": run.circuit.n_nodes,
            "layer": layer, "node": node, "store": store}


def test_label_makes_a_saved_run_that_a_link_and_a_restart_read_back(page):
    text = 'copies "(" , then <i>this</i>'
    result = exports.label_node(page["explorer"], Session(), page["model"], page["task"], page["run"], page["k"],
                                page["layer"], page["node"], text)
    view = result.view
    assert view is not None and SAVED_ID.match(view.run.id) and view.run.id != page["run"], result.message
    assert (view.k, view.layer, view.node) == (page["k"], page["layer"], page["node"])  # the page stays where it was
    assert f"run={view.run.id.replace(':', '%3A')}" in view.share_query and view.session.runs[view.run.id]
    assert view.circuit.labels == {page["node"]: text}
    assert exports.node_label(page["explorer"], page["model"], view.run.id, page["k"], page["node"]) == text
    assert exports.node_label(page["explorer"], page["model"], page["run"], page["k"], page["node"]) == ""  # unchanged
    hover = next(t for t in view.graph.data if t.name == "nodes").hovertext
    assert any(h.endswith("label: copies \"(\" , then &lt;i&gt;this&lt;/i&gt;") for h in hover)
    restarted = RunStore(page["store"]).load(view.run.id)  # a share link after a server restart
    assert restarted.load().labels == {page["node"]: text}
    removed = exports.label_node(page["explorer"], view.session, page["model"], page["task"], view.run.id, page["k"],
                                 page["layer"], page["node"], "")
    assert removed.view.circuit.labels == {} and "removed the label" in markdown_text(removed.message)


@pytest.mark.parametrize("node, text, message", [
    (None, "x", "no node is selected"),
    ("9.mlp.post_act:1", "x", "9.mlp.post_act:1 is not a node of the shown circuit"),
    ("NODE", "y" * 201, "has 201 characters; shorten it to at most 200"),
    ("NODE", "", "has no label to remove"),
])
def test_label_errors_are_messages(page, node, text, message):
    node = page["node"] if node == "NODE" else node
    result = exports.label_node(page["explorer"], Session(), page["model"], page["task"], page["run"], page["k"],
                                page["layer"], node, text)
    shown = markdown_text(result.message)
    assert result.view is None and message in shown and "could not label the node" in shown, shown


def test_circuit_downloads_are_the_shown_circuit(page):
    files = exports.circuit_downloads(page["explorer"], page["model"], page["run"], 3)
    rows = list(csv.DictReader(io.StringIO(Path(files.nodes).read_bytes().decode(), newline="")))
    assert len(rows) == 3  # the circuit at the shown k
    edges = list(csv.DictReader(io.StringIO(Path(files.edges).read_bytes().decode(), newline="")))
    assert {e["source"] for e in edges} | {e["target"] for e in edges} <= {r["node"] for r in rows}
    page_html = Path(files.page).read_text()
    assert all(r["node"] in page_html for r in rows) and "<script src=" not in page_html
    assert exports.circuit_downloads(page["explorer"], page["model"], None, 3) == exports.CircuitFiles()


def test_figure_download_draws_the_selection(page):
    path = exports.figure_download(page["explorer"], "graph", "html", page["model"], page["task"], page["run"],
                                   page["k"], page["layer"], page["node"], 0)
    assert Path(path).suffix == ".html" and f"{page['layer']}:" in Path(path).read_text()
    with pytest.raises(UserError, match="no layer is selected"):
        exports.figure_download(page["explorer"], "graph", "html", page["model"], page["task"], page["run"], page["k"])
    with pytest.raises(UserError, match="unknown figure 'pie'"):
        exports.figure_download(page["explorer"], "pie", "html", page["model"], page["task"], page["run"], page["k"])
    with pytest.raises(UserError, match="no circuit is shown"):
        exports.figure_download(page["explorer"], "overview", "svg", page["model"], page["task"], None, None)
