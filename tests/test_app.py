"""The app in a real browser (Playwright + Debian's chromium) and its `/next_tokens` API.

The browser tests start `python app.py` on a free localhost port (HF_HUB_OFFLINE=1) with the embedded default
model (or the model in $CSP_APP_TEST_MODEL), plus a small circuit built from the model's weights
(`conftest.build_test_circuit`) and imported through CSP_APP_IMPORT, so they do not depend on which circuits
the model ships. Each step saves a screenshot under tests/artifacts/ (git-ignored; CI keeps it as an artifact).

What the app computes (modeling_csp.explorer) is tested in-process in test_explorer.py.
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
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
