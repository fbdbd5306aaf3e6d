"""The app in a real browser (Playwright + Debian's chromium), its `/next_tokens` API, and its backend.

The browser tests start `python app.py` on a free localhost port (HF_HUB_OFFLINE=1) with the embedded default
model (or the model in $CSP_APP_TEST_MODEL), plus a small circuit built here from the model's weights and
imported through CSP_APP_IMPORT, so they do not depend on which circuits the model ships. Each step saves a
screenshot under tests/artifacts/ (git-ignored; CI keeps it as an artifact).

Backend tests (bad input, imports) run in-process on the converted `rms_sink_bigram` fixture.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, PROJECT_ROOT

ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"
if str(PROJECT_ROOT) not in sys.path:  # app.py lives at the project root, outside the package
    sys.path.insert(0, str(PROJECT_ROOT))
TASK = "single_double_quote"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _test_model() -> str | None:
    if os.environ.get("CSP_APP_TEST_MODEL"):
        return os.environ["CSP_APP_TEST_MODEL"]
    from modeling_csp.loading import DEFAULT_MODEL_DIR

    return "default" if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_test_circuit(spec: str, out: Path) -> Path:
    """A small connected circuit for TASK: the endpoints of each weight matrix's largest entries, with live
    node importances and layer deltas (mean ablation), saved as a csp-circuit file."""
    from modeling_csp.ablation import compute_mean_activations, layer_ablation_deltas, node_importances
    from modeling_csp.circuits import CircuitGraph, location_width, node_locations, weight_pairs
    from modeling_csp.loading import load_model_and_tokenizer
    from modeling_csp.tasks import make_task_dataset

    model, tokenizer = load_model_and_tokenizer(spec)
    masks = {loc: torch.zeros(location_width(model.config, loc), dtype=torch.bool) for loc in node_locations(model.config)}
    for layer in range(model.config.n_layer):
        for src, tgt, w in weight_pairs(model, layer):
            top = w.abs().flatten().topk(3).indices
            for flat in top.tolist():
                t, s = divmod(flat, w.shape[1])
                masks[src][s] = True
                masks[tgt][t] = True
    data = make_task_dataset(TASK, tokenizer, n=64, seed=0, max_len=model.config.block_size)
    means = compute_mean_activations(model, tokenizer)
    with torch.no_grad():
        imps = node_importances(model, data.test, masks, means)
        deltas = layer_ablation_deltas(model, data.test, masks, means)
    circuit = CircuitGraph.from_masks(model, masks, imps, model_name=spec, task=TASK, layer_deltas=deltas,
                                      meta={"options": {"n_examples": 64, "data_seed": 0}, "note": "test circuit"})
    return circuit.save(out)


@pytest.fixture(scope="module")
def test_circuit(tmp_path_factory):
    spec = _test_model()
    if spec is None:
        pytest.skip("no default model installed (modeling_csp/default_model) and CSP_APP_TEST_MODEL unset")
    return spec, build_test_circuit(spec, tmp_path_factory.mktemp("circuit") / "test_circuit.json")


@pytest.fixture(scope="module")
def app_server(test_circuit):
    spec, circuit_path = test_circuit
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "CSP_APP_MODEL": spec, "CSP_APP_IMPORT": str(circuit_path)}
    log = open(ARTIFACTS / "app_server.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"app.py exited with {proc.returncode}:\n{(ARTIFACTS / 'app_server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("app.py did not answer within 240 s")
            time.sleep(0.5)
        yield {"url": url, "model": spec, "run": "imported:test_circuit", "started_s": time.perf_counter() - t0}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api as playwright  # in the dev extra

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`), as .ci/run does")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, app_server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()


def shot(page, name: str) -> None:
    page.wait_for_timeout(600)  # let Plotly finish drawing (colour bars are drawn last)
    page.screenshot(path=str(ARTIFACTS / f"app_{name}.png"), full_page=True)


def node_points(page, container: str = "#circuit-graph") -> list[dict]:
    """The node markers of a Plotly figure: id, and the screen centre of its point."""
    return page.evaluate(
        """(sel) => {
            const div = document.querySelector(sel + ' .js-plotly-plot');
            if (!div || !div._fullData) return [];
            const out = [];
            const traces = div.querySelectorAll('.scatterlayer .trace');
            div._fullData.forEach((t, i) => {
                if (t.name !== 'nodes') return;
                const pts = traces[t.index] ? traces[t.index].querySelectorAll('path.point') : [];
                t.customdata.forEach((c, j) => {
                    const r = pts[j] ? pts[j].getBoundingClientRect() : null;
                    if (r) out.push({id: c[0], x: r.x + r.width / 2, y: r.y + r.height / 2});
                });
            });
            return out;
        }""",
        container,
    )


def header_node(page) -> str:
    """The node id the node panel shows (ignoring Gradio's 'processing' overlay text)."""
    m = re.search(r"\d+\.(?:attn|mlp)\.\w+:\d+", page.locator("#node-header").inner_text())
    return m.group(0) if m else ""


# ---- the browser steps (in order, one page) ------------------------------------------------------


def test_page_loads(page, app_server):
    t0 = time.perf_counter()
    page.goto(app_server["url"])
    page.wait_for_selector("#summary table", timeout=90_000)
    assert "full model loss" in page.locator("#summary").inner_text()
    assert app_server["model"] in page.locator("#summary").inner_text() or app_server["model"] == "default"
    print(f"page ready {time.perf_counter() - t0:.1f}s after navigation")
    shot(page, "01_page_loaded")


def test_circuit_graph_renders(page):
    page.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
    pts = node_points(page)
    assert len(pts) >= 2, pts
    layer = page.locator("#layer-select input:checked").get_attribute("value")
    assert all(p["id"].startswith(layer + ".") for p in pts)
    assert header_node(page) in {p["id"] for p in pts}  # the most important node of the layer is preselected
    shot(page, "02_circuit_graph")


def test_click_node_updates_panel(page):
    page.wait_for_function("() => window.__cspClickReady === true")
    before = header_node(page)
    pts = [p for p in node_points(page) if p["id"] != before]
    target = pts[len(pts) // 2]
    page.mouse.move(target["x"] - 3, target["y"] - 3)
    page.mouse.move(target["x"], target["y"], steps=4)
    page.mouse.click(target["x"], target["y"])
    page.wait_for_function("(id) => { const e = document.querySelector('#node-header'); return !!e && e.innerText.includes(id); }", arg=target["id"])
    assert header_node(page) == target["id"]
    page.wait_for_function("(id) => { const i = document.querySelector('#node-select input'); return i && i.value.includes(id); }",
                           arg=target["id"])
    page.wait_for_selector("#node-examples table")
    page.wait_for_selector("#task-acts .js-plotly-plot")
    shot(page, "03_node_clicked")


def test_prompt_returns_predictions(page):
    page.get_by_role("tab", name="Prompt lab").click()
    editor = page.locator("#prompt-input .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text('def f(x):\n    return x + "a')
    page.locator("#prompt-run").click()
    page.wait_for_selector("#next-plot .js-plotly-plot .barlayer .point")
    assert page.locator("#next-plot .barlayer .trace").count() == 2  # full model and circuit
    assert page.locator("#next-plot .barlayer .trace").first.locator(".point").count() == 10
    assert page.locator("#prompt-tokens .csp-tok").count() > 5
    assert "tokens" in page.locator("#prompt-notice").inner_text()
    assert "logit(" in page.locator("#logit-diff").inner_text()
    shot(page, "04_prompt_lab")


def test_ablation_plot_appears(page):
    page.get_by_role("tab", name="Ablations & pruning").click()
    page.locator("#abl-layers label").first.click()
    page.locator("#abl-layers label").nth(1).click()
    page.locator("#abl-run").click()
    page.wait_for_selector("#ablation-plot .js-plotly-plot .barlayer .point")
    page.wait_for_selector("#ablation-table table")
    assert "baseline" in page.locator("#ablation-table").inner_text()
    shot(page, "05_ablation_plot")


def test_other_tabs_render(page):
    page.get_by_role("tab", name="Whole circuit").click()
    page.wait_for_selector("#circuit-overview .js-plotly-plot .scatterlayer path.point")
    assert len(node_points(page, "#circuit-overview")) >= 2
    shot(page, "07_whole_circuit")
    page.get_by_role("tab", name="Curves").click()
    page.wait_for_selector("#faith-plot .js-plotly-plot .scatterlayer .trace", timeout=120_000)
    page.wait_for_function("() => { const d = document.querySelector('#faith-plot .js-plotly-plot'); "
                           "return d && d.layout && d.layout.xaxis && d.layout.xaxis.type === 'log'; }", timeout=120_000)
    shot(page, "08_curves")
    page.get_by_role("tab", name="Embeddings").click()
    page.wait_for_selector("#emb-tokens .js-plotly-plot .barlayer .point")
    page.wait_for_selector("#pos-emb .js-plotly-plot")
    shot(page, "09_embeddings")


def test_shared_url_restores_view(page, browser, app_server):
    if not page.url.startswith(app_server["url"]):
        page.goto(app_server["url"])
        page.wait_for_selector("#summary table", timeout=90_000)
    page.get_by_role("tab", name="Share & files").click()
    page.wait_for_function("() => document.querySelector('#share-link textarea, #share-link input').value.includes('node=')")
    link = page.locator("#share-link textarea, #share-link input").first.input_value()
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(link).query))
    assert {"model", "task", "run", "k", "layer", "node"} <= set(params), params
    # the circuit file download
    page.wait_for_function("() => { const b = document.querySelector('#download'); return !!b && !b.disabled; }")
    with page.expect_download() as download:
        page.locator("#download").click()
    data = json.loads(Path(download.value.path()).read_text())
    assert data["format"] == "csp-circuit" and data["k"] == int(params["k"]) and len(data["nodes"]) == int(params["k"])
    # a different view than the default: a smaller k, another layer, a node in it
    run = params["run"]
    k = max(2, int(params["k"]) * 2 // 3)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    other = context.new_page()
    other.set_default_timeout(60_000)
    try:
        other.goto(app_server["url"] + "?" + urllib.parse.urlencode({**params, "k": k}).replace("+", "%20"))
        other.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
        pts = node_points(other)
        layer = other.locator("#layer-select input:checked").get_attribute("value")
        # choose a node of another layer if there is one, by URL
        layers = other.locator("#layer-select input").evaluate_all("(els) => els.map(e => e.value)")
        counts = other.locator("#layer-select label").evaluate_all("(els) => els.map(e => e.innerText)")
        target_layer = next((l for l, c in zip(layers, counts) if l != layer and not c.strip().endswith(" 0 nodes")), layer)
        other.goto(app_server["url"] + "?" + urllib.parse.urlencode({**params, "k": k, "layer": target_layer, "node": ""}))
        other.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
        pts = node_points(other)
        node = pts[-1]["id"]
        query = urllib.parse.urlencode({"model": params["model"], "task": params["task"], "run": run, "k": k,
                                        "layer": target_layer, "node": node})
        other.goto(app_server["url"] + "?" + query)
        other.wait_for_function("(id) => { const e = document.querySelector('#node-header'); return !!e && e.innerText.includes(id); }", arg=node)
        assert other.locator("#layer-select input:checked").get_attribute("value") == target_layer
        assert int(float(other.locator("#k-slider input[type=number]").input_value())) == k
        restored = dict(urllib.parse.parse_qsl(other.locator("#share-query textarea, #share-query input").first.input_value()))
        assert restored == {"model": params["model"], "task": params["task"], "run": run, "k": str(k),
                            "layer": target_layer, "node": node}
        assert {p["id"] for p in node_points(other)} >= {node}
        shot(other, "06_shared_url_restored")
    finally:
        context.close()


def test_bad_inputs_show_messages(page, app_server, tmp_path):
    if not page.url.startswith(app_server["url"]):
        page.goto(app_server["url"])
    page.get_by_role("tab", name="Circuit browser").click()
    page.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")

    def status_has(text):
        page.wait_for_function("(t) => { const e = document.querySelector('#status'); return !!e && e.innerText.includes(t); }",
                               arg=text)

    # an empty prompt
    page.get_by_role("tab", name="Prompt lab").click()
    page.locator("#prompt-input .cm-content").click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.locator("#prompt-run").click()
    status_has("the prompt is empty")
    # a file that is not a viz_data.pt, and a circuit for another model
    page.get_by_role("tab", name="Share & files").click()
    bad = tmp_path / "not_viz.pt"
    torch.save({"hello": torch.zeros(2)}, bad)
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    status_has("not a viz_data.pt")
    page.locator("#upload button[aria-label*='lear'], #upload button[aria-label*='emove']").first.click()
    page.locator("#upload input[type=file]").set_input_files(str(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"))
    status_has("made for model")
    # an unknown model path
    model_box = page.locator("#model-select input")
    model_box.fill("/no/such/model/folder")
    model_box.press("Enter")
    status_has("/no/such/model/folder")
    shot(page, "10_bad_input_message")
    # the app keeps working
    page.get_by_role("tab", name="Circuit browser").click()
    page.locator("#layer-select label").first.click()
    page.wait_for_function("() => { const d = document.querySelector('#circuit-graph .js-plotly-plot');"
                           " return d && d.layout && d.layout.title && d.layout.title.text.startsWith('0.attn:'); }")


def test_bad_url_params_fall_back(browser, app_server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    try:
        pg.goto(app_server["url"] + "?task=no_such_task&run=app:gone&k=abc&node=9.mlp.post_act:1")
        pg.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
        pg.wait_for_function("() => { const e = document.querySelector('#status'); return !!e && e.innerText.includes('could not restore'); }")
        text = pg.locator("#status").inner_text()
        assert "no_such_task" in text and "k='abc'" in text
        pg.goto(app_server["url"] + "?model=/no/such/dir")
        pg.wait_for_function("() => { const e = document.querySelector('#status'); return !!e && e.innerText.includes('/no/such/dir'); }")
        pg.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
    finally:
        context.close()


# ---- the API ------------------------------------------------------------------------------------


def test_next_tokens_api(app_server):
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(app_server["url"], verbose=False)
    out = client.predict(prompt='def f(x):\n    return x + "a', api_name="/next_tokens")
    assert len(out["full"]) == 10 and all(0 <= r["prob"] <= 1 for r in out["full"])
    assert abs(sum(r["prob"] for r in out["full"])) <= 1.0 + 1e-6
    assert out["circuit"] is not None and len(out["circuit"]) == 10
    t = time.perf_counter()
    client.predict(prompt="import os\n", api_name="/next_tokens")
    print(f"/next_tokens round trip {1000 * (time.perf_counter() - t):.0f} ms")
    # bad input: messages, not tracebacks
    assert "empty" in client.predict(prompt="   ", api_name="/next_tokens")["error"]
    ctrl = client.predict(prompt="x = 1\x00\x07\n", api_name="/next_tokens")
    assert "control" in " ".join(ctrl["notices"])
    long = client.predict(prompt="x = 1\n" * 400, api_name="/next_tokens")
    assert any("kept the last" in n for n in long["notices"]) and long["full"]
    bad = client.predict(prompt="x", model="no-such-org/no-such-model-xyz", api_name="/next_tokens")
    assert "error" in bad and "no-such-model" in bad["error"]


# ---- backend, in-process, on the converted fixture -------------------------------------------------


@pytest.fixture(scope="module")
def backend(converted):
    import app

    os.environ.pop("CSP_APP_IMPORT", None)
    entry = app.get_model(str(converted["rms_sink_bigram"]))
    return app, entry


def test_backend_imports_viz_fixture(backend, tmp_path):
    app, entry = backend
    run = app.import_run_file(entry, str(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"))
    c = run.circuit
    assert c.n_nodes == 93 and c.n_edges == 76
    assert app.circuit_at_k(entry, run, None) is c
    sub = app.circuit_at_k(entry, run, 10)
    assert sub.n_nodes == 10 and all(e.source in sub.nodes and e.target in sub.nodes for e in sub.edges)
    # node panel data from the file: examples with decoded tokens, task activations in two halves
    node = next(n for n in c.nodes if (c.node_data or {}).get(n, {}).get("top"))
    samples = app.stored_quantile_examples(entry, c.node_data[node])
    assert set(samples) == {0.001, 0.01, 0.1, 0.5} and all(isinstance(t, str) for t in samples[0.01]["top"][0]["tokens"])
    c1, c2, labels, _ = app.task_activations(entry, c, node, None)
    assert len(c1) == len(c2) == 6
    # a q node: attention pattern (sink column first) and the channel's q.k contribution
    qnode = next(n for n in c.nodes if ".attn.q:" in n)
    pattern, contrib, toks, has_sink, head = app.attention_for_node(entry, qnode, [1, 2, 3, 4, 5])
    assert has_sink and len(pattern) == 5 and len(pattern[0]) == 6
    assert all(abs(sum(row) - 1) < 1e-5 for row in pattern)


def test_backend_bad_files(backend, tmp_path):
    app, entry = backend
    not_viz = tmp_path / "not_viz.pt"
    torch.save({"hello": torch.zeros(2)}, not_viz)
    with pytest.raises(app.UserError, match="not a viz_data.pt"):
        app.import_run_file(entry, str(not_viz))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    with pytest.raises(app.UserError, match="viz_data.pt"):
        app.import_run_file(entry, str(garbage))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(app.UserError, match="not valid JSON"):
        app.import_run_file(entry, str(bad_json))
    # a circuit made for another model
    from modeling_csp.circuits import CircuitGraph

    other = CircuitGraph(model={"name": "other", "n_layer": 9, "d_model": 8, "d_model_in": 8, "d_mlp": 8, "n_head": 1,
                                "d_head": 8, "vocab_size": 10}, nodes={"0.mlp.post_act:1": None}, edges=[])
    path = other.save(tmp_path / "other.json")
    with pytest.raises(app.UserError, match="made for model"):
        app.import_run_file(entry, str(path))


def test_backend_bad_prompts_and_models(backend):
    app, entry = backend
    with pytest.raises(app.UserError, match="empty"):
        app.encode_prompt(entry, "")
    with pytest.raises(app.UserError, match="empty"):
        app.encode_prompt(entry, "\x00\x01 \n")
    text, notices = app.clean_prompt("a\x00b\tc\n")
    assert text == "ab\tc\n" and "control" in notices[0]
    ids, notices = app.encode_prompt(entry, "a" * 5000)
    assert len(ids) == entry.config.block_size and "kept the last" in notices[0]
    out = app.next_tokens_data(entry, "aaa", None)
    assert len(out["full"]) == 10 and out["circuit"] is None
    with pytest.raises(app.UserError, match="vocabulary"):  # this fixture's tokenizer is bigger than its model
        app.encode_prompt(entry, "ab")
    with pytest.raises(app.UserError, match="could not load|not a|no config"):
        app.get_model("/no/such/folder/anywhere")
    with pytest.raises(app.UserError):
        app.get_model("no-such-org/no-such-model-xyz")
    with pytest.raises(app.UserError, match="control"):
        app.get_model("default\x00")


# ---- backend, in-process, on the test model with the test circuit ---------------------------------


@pytest.fixture(scope="module")
def model_backend(test_circuit):
    import app

    spec, path = test_circuit
    entry = app.get_model(spec)
    run = app.import_run_file(entry, str(path))
    return app, entry, run


def test_backend_live_examples_and_task_activations(model_backend):
    app, entry, run = model_backend
    circuit = run.circuit
    node = max(circuit.nodes, key=lambda n: circuit.nodes[n] or 0)
    samples = app.live_quantile_examples(entry, node)
    assert sorted(samples) == [0.001, 0.01, 0.1, 0.5]
    for frac, q in samples.items():
        for side in ("top", "bottom"):
            for ex in q[side]:
                assert len(ex["tokens"]) == len(ex["activations"]) and 0 <= ex["position"] < len(ex["tokens"])
    peak = lambda ex: ex["activations"][ex["position"]]  # noqa: E731
    assert peak(samples[0.001]["top"][0]) >= peak(samples[0.5]["top"][0]) >= peak(samples[0.001]["bottom"][0])
    c1, c2, labels, (tok1, tok2) = app.task_activations(entry, circuit, node, TASK)
    assert c1 and c2 and all(labels) and tok1 and tok2


def test_backend_circuit_at_k_stats_and_curve(model_backend):
    app, entry, run = model_backend
    full = run.circuit
    assert app.circuit_at_k(entry, run, full.n_nodes) is full
    sub = app.circuit_at_k(entry, run, 10)
    ranked = sorted(full.nodes, key=lambda n: -(full.nodes[n] if full.nodes[n] is not None else -1e9))
    assert set(sub.nodes) == set(ranked[:10])
    quick = app.circuit_stats(entry, run, 10, TASK, quick=True)
    assert quick["full"] is not None and quick["circuit"] is None and quick["pending"]
    stats = app.circuit_stats(entry, run, 10, TASK)
    assert stats["circuit"] is not None and stats["random"] is not None
    assert set(stats["layer_deltas"]) == {f"{l}.{p}" for l in range(entry.n_layer) for p in ("attn", "mlp")}
    curve = app.faithfulness_curve(entry, run, TASK)
    ks = [k for k, _ in curve["points"]]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == full.n_nodes and len(curve["random"]) == len(ks)


def test_backend_ablations_and_prompt(model_backend):
    app, entry, run = model_backend
    circuit = run.circuit
    rows = app.ablation_effects(entry, circuit, TASK, ["0.attn", "0.mlp"], [next(iter(circuit.nodes))], "mean", "full")
    assert rows[0]["baseline"] and rows[0]["d_loss"] == 0
    assert [r["label"] for r in rows[1:]] == ["0.attn", "0.mlp", next(iter(circuit.nodes)), "all chosen"]
    assert all(isinstance(r["d_logit_diff"], float) for r in rows)
    zero = app.ablation_effects(entry, circuit, TASK, ["1.mlp"], [], "zero", "circuit")
    assert zero[0]["label"] == "baseline (circuit)"
    with pytest.raises(app.UserError):
        app.ablation_effects(entry, circuit, TASK, [], [], "mean", "full")
    with pytest.raises(app.UserError, match="does not exist"):
        app.ablation_effects(entry, circuit, TASK, [], ["0.mlp.post_act:999999"], "mean", "full")
    node = next(n for n in circuit.nodes if ".mlp.post_act:" in n)
    out = app.next_tokens_data(entry, 'x = "hello', circuit, node, ('"', "'"))
    assert len(out["full"]) == len(out["circuit"]) == 10
    assert len(out["node_acts"]) == len(out["tokens"]) and out["logit_diff"]["a"] == '"'
    imps, method = app.live_importances(entry, circuit, TASK)
    assert set(imps) == set(circuit.nodes) and method == "exact"
