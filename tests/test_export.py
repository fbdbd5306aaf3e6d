"""Exports: a circuit as an offline HTML page and CSV tables, a figure as HTML/PNG/SVG, and `csp export` /
`csp label` (labels travel with the file and show in the page)."""

import csv
import io
import json
import re
import shutil

import pytest

from conftest import PROJECT_ROOT
from modeling_csp import export, plotting
from modeling_csp.circuits.graph import CircuitGraph
from modeling_csp.cli import main

SHIPPED = PROJECT_ROOT / "modeling_csp" / "default_model" / "circuits" / "bracket_brace_k8.json"
TRICKY = 'opens "(", then, a\nnewline <b>bold?</b> & more'  # commas, quotes, a newline, markup


@pytest.fixture()
def circuit():
    c = CircuitGraph.load(SHIPPED)
    return c.with_labels({next(iter(c.nodes)): TRICKY})


def external_scripts(page: str) -> list[str]:
    return re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^>]*>", page, flags=re.I)


def test_nodes_csv_round_trips_labels_and_names_its_columns(circuit):
    text = export.nodes_csv(circuit)
    assert text.split("\r\n", 1)[0] == ",".join(export.NODE_COLUMNS)  # RFC 4180: CRLF line ends
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["node"] for r in rows] == list(circuit.nodes)
    labelled = next(iter(circuit.nodes))
    assert rows[0]["label"] == TRICKY and all(r["label"] == "" for r in rows[1:])
    assert rows[0]["location"] + ":" + rows[0]["index"] == labelled
    for row, (node, importance) in zip(rows, circuit.nodes.items()):
        assert (row["importance"] == "") == (importance is None)
        if importance is not None:
            assert float(row["importance"]) == importance


def test_edges_csv_lists_every_edge(circuit):
    rows = list(csv.DictReader(io.StringIO(export.edges_csv(circuit), newline="")))
    assert len(rows) == circuit.n_edges > 0
    assert [(r["source"], r["target"], float(r["weight"]), r["kind"]) for r in rows] == [
        (e.source, e.target, e.weight, e.kind) for e in circuit.edges]


def test_write_circuit_csv_names_two_tables(circuit, tmp_path):
    nodes_path, edges_path = export.write_circuit_csv(circuit, tmp_path / "run.csv")
    assert (nodes_path.name, edges_path.name) == ("run.nodes.csv", "run.edges.csv")
    assert nodes_path.read_bytes() == export.nodes_csv(circuit).encode()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_circuit_page_is_offline_and_escapes_labels(circuit):
    page = export.circuit_html(circuit)
    assert external_scripts(page) == []
    assert page.count("<script") >= 3 and "Plotly.newPlot" in page and len(page) > 3_000_000  # plotly.js inlined
    assert page.count("<tr><td>") == circuit.n_nodes
    assert "<b>bold?</b>" not in page  # neither in the table nor in the hover text: a label is text
    assert "newline &lt;b&gt;bold?&lt;/b&gt; &amp; more" in page
    for layer in {n.split(".")[0] + "." + n.split(".")[1] for n in circuit.nodes}:
        assert f"<summary>{layer}:" in page


def test_label_shows_in_graph_hover_escaped(circuit):
    node = next(iter(circuit.nodes))
    layer = ".".join(node.split(".")[:2])
    for fig in (plotting.layer_graph_figure(circuit, layer), plotting.circuit_overview_figure(circuit, 2)):
        trace = next(t for t in fig.data if t.name == "nodes")
        hover = dict(zip((c[0] for c in trace.customdata), trace.hovertext))
        assert hover[node].endswith("<br>label: opens \"(\", then, a<br>newline &lt;b&gt;bold?&lt;/b&gt; &amp; more")
        assert all("label:" not in h for n, h in hover.items() if n != node)


def test_figure_html_is_standalone():
    page = export.figure_html(plotting.message_figure("hello"), title="a <figure>")
    assert external_scripts(page) == [] and "<title>a &lt;figure&gt;</title>" in page and "hello" in page


@pytest.mark.skipif(export.image_export_problem() is not None, reason="kaleido or Chromium not installed")
def test_png_and_svg_through_kaleido(tmp_path):
    fig = plotting.message_figure("exported")
    svg = export.write_figure(fig, tmp_path / "figure.svg").read_text()
    assert svg.startswith("<svg") and "exported" in svg
    png = export.figure_bytes(fig, "png", width=300, height=200)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 300 and int.from_bytes(png[20:24], "big") == 200  # IHDR size


def test_image_export_names_the_problem(monkeypatch, tmp_path):
    monkeypatch.setenv("CSP_BROWSER", str(tmp_path / "no-chromium"))
    with pytest.raises(export.ExportError, match="not an executable file"):
        export.figure_bytes(plotting.message_figure("x"), "png")
    with pytest.raises(export.ExportError, match="unknown figure format 'pdf'; choose one of html, png, svg"):
        export.figure_bytes(plotting.message_figure("x"), "pdf")


# ---- csp export / csp label -----------------------------------------------------------------


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_csp_label_then_export_carries_the_label(capsys, tmp_path):
    path = shutil.copy(SHIPPED, tmp_path / "circuit.json")
    node = next(iter(CircuitGraph.load(path).nodes))
    code, out, _ = run(capsys, "label", path, node, TRICKY)
    assert code == 0 and json.loads(out) == {"circuit": str(path), "node": node, "label": TRICKY, "n_labels": 1}
    assert CircuitGraph.load(path).labels == {node: TRICKY}
    code, out, _ = run(capsys, "export", path, "--format", "csv", "--out", tmp_path / "t")
    assert code == 0 and [f["path"] for f in json.loads(out)["files"]] == [str(tmp_path / "t.nodes.csv"),
                                                                           str(tmp_path / "t.edges.csv")]
    rows = list(csv.DictReader(open(tmp_path / "t.nodes.csv", newline="")))
    assert {r["node"]: r["label"] for r in rows}[node] == TRICKY
    code, out, _ = run(capsys, "export", path, "--format", "html", "--out", tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    assert code == 0 and external_scripts(page) == [] and "&lt;b&gt;bold?&lt;/b&gt;" in page
    code, out, _ = run(capsys, "export", path, "--format", "json", "--out", tmp_path / "copy.json")
    assert code == 0 and CircuitGraph.load(tmp_path / "copy.json").labels == {node: TRICKY}
    code, _, _ = run(capsys, "label", path, node, "")  # an empty text removes it
    assert code == 0 and CircuitGraph.load(path).labels == {}


def test_csp_export_figure(capsys, tmp_path):
    code, out, _ = run(capsys, "export", SHIPPED, "--format", "html", "--figure", "1.attn", "--out", tmp_path / "g.html")
    page = (tmp_path / "g.html").read_text()
    assert code == 0 and "1.attn:" in page and external_scripts(page) == []


@pytest.mark.parametrize("argv, fragment", [
    (["label", SHIPPED, "9.mlp.post_act:1", "x"], "'9.mlp.post_act:1': it is not a node of this circuit"),
    (["label", SHIPPED, "bogus", "x"], "'bogus': it is not a node of this circuit"),
    (["export", SHIPPED, "--format", "csv", "--figure", "overview", "--out", "x"], "--figure exports a figure"),
    (["export", SHIPPED, "--format", "html", "--figure", "7.attn", "--out", "x.html"], "choose 'overview' or a sublayer"),
    (["export", SHIPPED, "--format", "pdf", "--out", "x"], "invalid choice: 'pdf'"),
    (["export", "/nonexistent.json", "--format", "csv", "--out", "x"], "does not exist"),
])
def test_csp_export_and_label_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_csp_label_caps_length(capsys, tmp_path):
    path = shutil.copy(SHIPPED, tmp_path / "circuit.json")
    before = path.read_bytes() if hasattr(path, "read_bytes") else open(path, "rb").read()
    code, _, err = run(capsys, "label", path, next(iter(CircuitGraph.load(path).nodes)), "x" * 201)
    assert code == 2 and "has 201 characters; shorten it to at most 200" in err
    assert open(path, "rb").read() == before


def test_csv_export_needs_no_plotly_and_html_says_what_to_install(tmp_path):
    import os
    import subprocess
    import sys

    def csp_without_plotly(*argv):
        code = ("import sys\nsys.modules['plotly'] = None\nfrom modeling_csp.cli import main\n"
                f"sys.exit(main({[str(a) for a in argv]!r}))\n")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})

    tables = csp_without_plotly("export", SHIPPED, "--format", "csv", "--out", "t")
    assert tables.returncode == 0 and (tmp_path / "t.nodes.csv").is_file(), tables.stderr[-2000:]
    page = csp_without_plotly("export", SHIPPED, "--format", "html", "--out", "p.html")
    assert page.returncode == 2 and "needs the app extra: pip install 'csp-circuits[app]'" in page.stderr
    assert page.stderr.count("\n") == 1 and not (tmp_path / "p.html").exists()
