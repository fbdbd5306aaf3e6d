"""The app in a real browser (Playwright + Debian's chromium) and its `/next_tokens` API.

The browser tests start `python app.py` on a free localhost port (HF_HUB_OFFLINE=1) with the embedded default
model (or the model in $CSP_APP_TEST_MODEL), plus a small circuit built from the model's weights
(`conftest.build_test_circuit`) and imported through CSP_APP_IMPORT, so they do not depend on which circuits
the model ships. Models may be opened from the package and from one extra root, which holds a model folder whose
circuits/index.json points outside it. Each step saves a screenshot under tests/artifacts/ (git-ignored; CI
keeps it as an artifact). Each test opens a page of its own at the app's first view (the `page` fixture), so
any test runs alone; steps wait for what the page shows, never for a fixed time (sleeps only pace a user's
clicks or a polling loop).

What the page shows is decided by the view model and the panels, tested without a browser in
test_explorer_view.py and test_explorer_panels.py.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, PROJECT_ROOT, free_port, serve_app, tracebacks_through_project_code
from modeling_csp.plotting import sublayer_of

ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PRUNE_TASK = "else_elif"  # a task the default model ships no circuit for (and does better than chance)
WEAK_TASK = "with_as"  # a task the default model does no better than chance: every target is refused


@pytest.fixture(scope="module")
def folders(test_circuit, tmp_path_factory):
    """An allowed root with a hostile model folder (its index points outside) and a link to a folder outside, a real
    model folder that is not under any root, and one in the app's working folder named like a hub id
    (`work_dirs/outside_model_<pid>`, git-ignored, removed afterwards)."""
    from modeling_csp.model.loading import resolve_model

    source = Path(resolve_model(test_circuit[0]))
    if not source.is_dir():
        pytest.skip("the test model is not a local folder")
    base = tmp_path_factory.mktemp("folders")
    (base / "secret.json").write_text('{"format": "csp-circuit", "SECRET": "do not show"}')
    out = {"root": base / "root", "hostile": base / "root" / "hostile", "outside": base / "outside", "base": base}
    for name in ("hostile", "outside"):
        out[name].mkdir(parents=True)
        for f in source.iterdir():
            if f.is_file():
                (out[name] / f.name).symlink_to(f)
    (out["root"] / "link_out").symlink_to(out["outside"], target_is_directory=True)
    relative = Path("work_dirs") / f"outside_model_{os.getpid()}"
    (PROJECT_ROOT / relative).mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            (PROJECT_ROOT / relative / f.name).symlink_to(f)
    out["hub_shaped"] = str(relative)
    (out["hostile"] / "circuits").mkdir()
    (out["hostile"] / "circuits" / "index.json").write_text(json.dumps(
        [{"task": "single_double_quote", "k": 1, "path": "../../../secret.json"},
         {"task": "single_double_quote", "k": 2, "path": "/etc/passwd"}]))
    yield out
    shutil.rmtree(PROJECT_ROOT / relative)


@pytest.fixture(scope="module")
def app_server(test_circuit, folders):
    from modeling_csp.model.loading import DEFAULT_MODEL_DIR

    spec, circuit_path = test_circuit
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CSP_APP_MODEL": spec, "CSP_APP_IMPORT": str(circuit_path),
           "CSP_MODEL_ROOTS": os.pathsep.join([str(DEFAULT_MODEL_DIR), str(folders["root"])]),
           "CSP_APP_STORE": str(folders["base"] / "store"), "CSP_CACHE_DIR": str(folders["base"] / "cache")}
    t0 = time.perf_counter()
    try:
        with serve_app(sys.executable, PROJECT_ROOT, env, ARTIFACTS / "app_server.log") as url:
            yield {"url": url, "model": spec, "run": "imported:test_circuit", "started_s": time.perf_counter() - t0,
                   "circuit": circuit_path}
    finally:
        ours = tracebacks_through_project_code((ARTIFACTS / "app_server.log").read_text())
        assert not ours, f"the server logged a traceback through the project's code:\n{ours[0][-3000:]}"


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api as playwright  # in the dev extra

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`), as .ci/run does")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def new_page(browser, url=None):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(180_000)
    if url:
        pg.goto(url)
        pg.wait_for_selector("#summary p", timeout=120_000)
    return pg


def test_the_server_log_check_fails_on_project_frames_only():
    """What the app fixture's teardown asserts on: a venv inside the checkout (`.ci/run`'s `.ci-lowest`) is not
    project code, a frame in app.py or modeling_csp is."""
    venv = PROJECT_ROOT / ".ci-lowest" / "lib" / "python3.11" / "site-packages"
    web_stack = (f'Traceback (most recent call last):\n  File "{venv}/gradio/routes.py", line 1838, in sse_stream\n'
                 "fastapi.exceptions.HTTPException: 404: Not Found\n")
    ours = (f'Traceback (most recent call last):\n  File "{venv}/gradio/blocks.py", line 1, in call\n'
            f'  File "{PROJECT_ROOT}/app.py", line 1, in on_task\nValueError: x\n')
    assert tracebacks_through_project_code(web_stack) == []
    assert len(tracebacks_through_project_code("a line\n" + web_stack + ours)) == 1


@pytest.fixture
def page(browser, app_server):
    """A page of its own (a new browser context: no runs in its localStorage) at the app's first view, loaded,
    ready for clicks and settled, so that every test starts from the same state and runs alone as in the file."""
    pg = new_page(browser, app_server["url"])
    pg.wait_for_function("() => window.__cspClickReady === true")
    settle(pg)
    yield pg
    pg.context.close()


# ---- helpers -------------------------------------------------------------------------------------


def shot(page, name: str) -> None:
    """A full-page screenshot once Plotly has drawn every figure on the page."""
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].every((d) => !d.offsetParent || d._fullLayout)")
    page.screenshot(path=str(ARTIFACTS / f"app_{name}.png"), full_page=True)


def text_of(page, selector: str) -> str:
    return page.locator(selector).first.inner_text()


def wait_text(page, selector: str, text: str, timeout: float = 90_000) -> None:
    """Waits until `selector` shows `text`; on a timeout the failure says what it shows instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("([s, t]) => { const e = document.querySelector(s); return !!e && e.innerText.includes(t); }",
                               arg=[selector, text], timeout=timeout)
    except PlaywrightTimeout:
        shown = page.locator(selector).first.inner_text(timeout=5_000) if page.locator(selector).count() else "(absent)"
        pytest.fail(f"{selector} did not show {text!r} within {timeout / 1000:g} s; it shows {shown[:600]!r}")


def assert_no_errors(page) -> None:
    """No component stuck in Gradio's error state and no error toast (what broke the page before)."""
    errors = page.locator("[data-testid='status-tracker'] .error, .toast-body.error")
    assert errors.count() == 0, [e.inner_text()[:200] for e in errors.all()]


def choose(page, selector: str, label: str) -> None:
    """Picks a dropdown option by its label, as a user does: open, type to filter, click."""
    box = page.locator(f"{selector} input")
    box.click()
    box.fill(label)
    page.locator(f"{selector} [role=option][aria-label={json.dumps(label)}]").click()


def type_number(page, selector: str, value) -> None:
    """Types a value into a slider's number box and presses Enter."""
    box = page.locator(f"{selector} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def node_points(page, container: str = "#circuit-graph") -> list[dict]:
    """The node markers of a Plotly figure: id, and the screen centre of its point (the figure scrolled into view
    first, so that every point can be clicked whatever the lines above it)."""
    return page.evaluate(
        """(sel) => {
            const div = document.querySelector(sel + ' .js-plotly-plot');
            if (!div || !div._fullData) return [];
            const box = div.getBoundingClientRect();
            if (box.top < 0 || box.bottom > window.innerHeight) div.scrollIntoView({block: 'center'});
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
    m = re.search(r"\d+\.(?:attn|mlp)\.\w+:\d+", text_of(page, "#node-header"))
    return m.group(0) if m else ""


def choose_containing(page, selector: str, text: str) -> None:
    """Picks the first dropdown option whose label contains `text`."""
    page.locator(f"{selector} input").click()
    page.locator(f"{selector} [role=option]", has_text=text).first.click()


# ---- the browser steps (each on a page of its own, from the first view) ---------------------------


def test_page_loads(browser, app_server):
    page = new_page(browser)
    try:
        t0 = time.perf_counter()
        page.goto(app_server["url"])
        page.wait_for_selector("#summary table", timeout=120_000)
        for element in ("#task-select", "#run-select", "#k-slider", "#summary", "#status"):
            assert page.locator(element).count() >= 1, element
        assert "full model loss" in text_of(page, "#summary")
        print(f"page ready {time.perf_counter() - t0:.1f}s after navigation")
        page.wait_for_selector("#task-acts table")
        shot(page, "01_page_loaded")
    finally:
        page.context.close()


def test_circuit_graph_renders(page):
    page.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
    pts = node_points(page)
    assert len(pts) >= 2, pts
    layer = page.locator("#layer-select input:checked").get_attribute("value")
    assert all(p["id"].startswith(layer + ".") for p in pts)
    assert header_node(page) in {p["id"] for p in pts}  # the most important node of the layer is preselected
    if layer.endswith("attn"):  # q, k and v each on a row of their own
        ticks = page.evaluate("() => document.querySelector('#circuit-graph .js-plotly-plot').layout.yaxis.ticktext")
        assert {"q", "k", "v"} <= set(ticks), ticks
    shot(page, "02_circuit_graph")


def test_click_node_updates_panel(page):
    page.wait_for_function("() => window.__cspClickReady === true")
    before = header_node(page)
    pts = [p for p in node_points(page) if p["id"] != before]
    target = pts[len(pts) // 2]
    page.mouse.move(target["x"] - 3, target["y"] - 3)
    page.mouse.move(target["x"], target["y"], steps=4)
    page.mouse.click(target["x"], target["y"])
    wait_text(page, "#node-header", target["id"])
    page.wait_for_function("(id) => { const i = document.querySelector('#node-select input'); return i && i.value.includes(id); }",
                           arg=target["id"])
    page.wait_for_selector("#task-acts table")
    assert "class 1: correct «" in text_of(page, "#task-acts") and "pair difference" in text_of(page, "#task-acts")
    page.get_by_role("tab", name="Activating examples").click()
    page.wait_for_selector("#node-examples table")
    assert text_of(page, "#node-examples").count("peak") >= 30  # 5 per side and quantile
    page.get_by_role("tab", name="Attention").click()
    page.wait_for_selector("#attn-rows .csp-ex-title")
    shot(page, "03_node_clicked")
    page.get_by_role("tab", name="Task examples").click()


def test_every_task_can_be_picked(page, app_server):
    """All 20 tasks from the task box: a circuit or "no circuit yet" with a prune button, never an error."""
    from modeling_csp.explorer.analysis import task_names

    shipped = set()
    for task in task_names():
        choose(page, "#task-select", task)
        wait_text(page, "#summary", f"Task {task}:")
        if page.locator("#no-circuit-md").first.is_visible():
            assert f"No circuit yet for {task}" in text_of(page, "#no-circuit-md")
            assert page.locator("#prune-here").is_visible()
            wait_text(page, "#prune-here-md", f"The full model's held-out loss on {task}")  # the last step of the change
        else:
            shipped.add(task)
            page.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
            page.wait_for_function("() => !document.querySelector('#summary').innerText.includes('…')")
            assert header_node(page)
        assert_no_errors(page)
        if task == PRUNE_TASK:
            shot(page, "04_task_without_circuit")
    assert len(task_names()) == 20 and shipped  # the test circuit's task at least
    choose(page, "#task-select", "single_double_quote")
    wait_text(page, "#summary", "Task single_double_quote:")
    page.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
    assert_no_errors(page)


def test_typed_values_out_of_range_are_clamped(page):
    k_max = int(float(page.locator("#k-slider input[type=number]").get_attribute("max")))
    type_number(page, "#k-slider", 99999)
    wait_text(page, "#status", f"k=99999 is outside [1, {k_max}]: using {k_max}")
    assert int(float(page.locator("#k-slider input[type=number]").input_value())) == k_max
    type_number(page, "#k-slider", -5)
    wait_text(page, "#status", "k=-5 is outside")
    wait_text(page, "#summary", "1 of ")
    type_number(page, "#k-slider", 3)  # Enter applies a typed value
    wait_text(page, "#summary", "3 of ")
    assert "outside" not in text_of(page, "#status")
    for box in ("#model-select", "#task-select"):  # a dropdown sends its value again when it loses focus
        page.locator(f"{box} input").click()
        page.locator("#summary").click()
    state = settle(page)  # the page must not change
    assert "3 of " in state["summary"] and state["k"] == "3", state
    type_number(page, "#edge-threshold", 500)
    wait_text(page, "#status", "edge threshold (%)=500 is outside [0, 100]")
    type_number(page, "#edge-threshold", 0)
    assert_no_errors(page)
    shot(page, "05_clamped_values")
    page.get_by_role("tab", name="Embeddings").click()
    page.wait_for_selector("#emb-tokens .js-plotly-plot .barlayer .point")
    type_number(page, "#channel-slider", 99999)
    wait_text(page, "#emb-notice", "channel=99999 is outside")
    assert_no_errors(page)
    page.get_by_role("tab", name="Circuit browser").click()
    type_number(page, "#k-slider", k_max)
    wait_text(page, "#summary", f"{k_max} of ")


def test_node_search(page):
    node = header_node(page)
    label = page.locator("#node-select input").input_value().split(" · ")[0]
    search = page.locator("#node-search textarea, #node-search input").first
    search.fill(node)
    search.press("Enter")
    wait_text(page, "#status", f"match '{node}'")
    search.fill("zzz")
    search.press("Enter")
    wait_text(page, "#status", "no node of this circuit matches 'zzz'")
    assert header_node(page) == node and label


def test_prune_from_no_circuit_yet_then_reload_and_share(page, browser, app_server):
    """The prune button of a task without a circuit: warned beforehand, no ✅ for a missed target, and the run
    survives a reload and opens from a share link in another browser."""
    page.get_by_role("tab", name="Ablations & pruning").click()
    type_number(page, "#prune-steps", 10)
    page.get_by_role("tab", name="Circuit browser").click()
    choose(page, "#task-select", PRUNE_TASK)
    wait_text(page, "#no-circuit-md", f"No circuit yet for {PRUNE_TASK}")
    wait_text(page, "#prune-here-md", "The full model's held-out loss on")
    page.locator("#prune-here").click()
    page.wait_for_function("() => /target (not )?reached/.test(document.querySelector('#status').innerText)",
                           timeout=600_000)
    message = text_of(page, "#status")
    if "not reached" in message:
        assert "✅" not in message
    wait_text(page, "#summary", "pruned here")
    page.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
    assert page.locator("#run-select input").input_value().startswith("pruned here")
    page.wait_for_selector("#task-acts table")
    assert_no_errors(page)
    shot(page, "06_pruned_here")
    # a reload: the browser keeps its runs (localStorage), the server the circuit
    page.reload()
    page.wait_for_selector("#summary table")
    choose(page, "#task-select", PRUNE_TASK)
    wait_text(page, "#summary", "pruned here")
    # the share link, in a browser that has never seen the run
    page.get_by_role("tab", name="Share & files").click()
    page.wait_for_function("() => document.querySelector('#share-link textarea, #share-link input').value.includes('run=saved')")
    link = page.locator("#share-link textarea, #share-link input").first.input_value()
    other = new_page(browser, link)
    try:
        wait_text(other, "#summary", "pruned here")
        assert other.locator("#run-select input").input_value().startswith("pruned here")
        assert "⚠️" not in text_of(other, "#status")
        shot(other, "07_shared_pruned_run")
    finally:
        other.context.close()
    page.get_by_role("tab", name="Circuit browser").click()


def test_your_own_task_from_a_file_pruned_with_its_control(page, tmp_path):
    """Upload task lines: the task is checked and selected (no circuit yet); pruning it with the shuffled-answer
    control shows the control next to the random baseline."""
    from conftest import quote_task_lines

    lines = tmp_path / "quotes.jsonl"
    lines.write_text(quote_task_lines(30))
    page.get_by_role("tab", name="Ablations & pruning").click()
    page.locator("#custom-task-file input[type=file]").set_input_files(str(lines))
    wait_text(page, "#custom-task-file", "quotes.jsonl")  # uploaded
    page.locator("#custom-task-add").click()
    wait_text(page, "#custom-task-md", "✅ added custom:quotes:")
    assert "the full model's accuracy" in text_of(page, "#custom-task-md")
    task = page.locator("#task-select input").input_value()
    assert task.startswith("custom:quotes:")
    page.locator("#custom-task-text textarea").fill('{"prompt": "x = 1", "correct": "\'", "incorrect": "\'"}')
    page.locator("#custom-task-add").click()
    wait_text(page, "#custom-task-md", "line:1: 'correct' and 'incorrect' are the same")
    page.locator("#custom-task-text textarea").fill("")
    type_number(page, "#prune-steps", 10)
    page.locator("#prune-control input").check()
    page.get_by_role("tab", name="Circuit browser").click()
    wait_text(page, "#no-circuit-md", f"No circuit yet for {task}")
    page.locator("#prune-here").click()
    wait_text(page, "#summary", "Shuffled-answer control: loss", timeout=600_000)
    assert "random same-size" in text_of(page, "#summary") and page.locator("#task-select input").input_value() == task
    assert_no_errors(page)
    shot(page, "08_own_task_with_control")
    page.get_by_role("tab", name="Ablations & pruning").click()
    page.locator("#prune-control input").uncheck()
    page.get_by_role("tab", name="Circuit browser").click()


def test_imported_run_survives_a_reload(page, app_server, tmp_path):
    mine = tmp_path / "my_upload.json"
    mine.write_text(Path(app_server["circuit"]).read_text())
    page.get_by_role("tab", name="Share & files").click()
    page.locator("#upload input[type=file]").set_input_files(str(mine))
    wait_text(page, "#upload-md", "✅ imported my_upload.json")
    wait_text(page, "#summary", "imported · my_upload.json")
    page.reload()
    page.wait_for_selector("#summary table")
    task = json.loads(mine.read_text())["task"]
    choose(page, "#task-select", task)  # the first view may show another task
    wait_text(page, "#summary", f"Task {task}:")  # the run list below is this task's, not the first view's
    wait_text(page, "#summary", "Run ")
    page.locator("#run-select input").click()
    names = page.locator("#run-select [role=option]").all_inner_texts()
    assert any("imported · my_upload.json" in n for n in names), names
    page.keyboard.press("Escape")


def test_model_box_path_attacks(page, folders):
    """Folders outside the allowed roots, paths that leave a root, and absent folders all read the same; a
    model folder whose index points outside loads without reading it."""
    page.get_by_role("tab", name="Circuit browser").click()
    box = page.locator("#model-select input")
    seen = set()
    for spec in (str(folders["outside"]), "/etc", "../../etc", str(folders["root"] / ".." / "outside"),
                 "/no/such/folder", str(folders["base"] / "secret.json")):
        box.fill(spec)
        box.press("Enter")
        wait_text(page, "#status", f"model {spec!r} is not available")
        page.wait_for_function("() => document.querySelector('#model-select input').value === 'default'")
        message = next(line for line in text_of(page, "#status").splitlines() if line.startswith("⚠️"))
        seen.add(re.sub(r"model '.*' is not", "model X is not", message))
        assert "Task" in text_of(page, "#summary")
    assert len(seen) == 1, seen
    shot(page, "08_path_attack_message")
    box.fill(str(folders["hostile"]))
    box.press("Enter")
    wait_text(page, "#summary", f"Model {folders['hostile']} ·")
    page.locator("#run-select input").click()
    names = page.locator("#run-select [role=option]").all_inner_texts()
    assert not any("shipped" in n for n in names), names
    page.keyboard.press("Escape")
    assert "SECRET" not in page.content() and "root:x" not in page.content()
    assert_no_errors(page)
    box.fill("default")
    box.press("Enter")
    wait_text(page, "#summary", "Model default ·")  # the view has switched back, not just the box
    state = settle(page)  # the hostile model's follow-up steps have finished: none may have put it back in the box
    assert page.locator("#model-select input").input_value() == "default" and "Model default ·" in state["summary"]


def test_size_attacks(page, app_server, tmp_path):
    """A circuit file asking for 10^7 evaluation examples is capped (the summary says so); long candidates are
    cut by the box."""
    data = json.loads(Path(app_server["circuit"]).read_text())
    data["meta"] = {"options": {"n_examples": 10**7, "n_random": 10**6}}
    huge = tmp_path / "huge_options.json"
    huge.write_text(json.dumps(data))
    page.get_by_role("tab", name="Share & files").click()
    page.locator("#upload input[type=file]").set_input_files(str(huge))
    wait_text(page, "#upload-md", "✅ imported huge_options.json")
    wait_text(page, "#summary", "n_examples=10000000 is outside [8, 2048]: using 2048", timeout=300_000)
    page.get_by_role("tab", name="Prompt lab").click()
    page.locator("#cand-a textarea, #cand-a input").first.fill("x" * 500)
    assert len(page.locator("#cand-a textarea, #cand-a input").first.input_value()) <= 100
    page.locator("#cand-a textarea, #cand-a input").first.fill('"')
    assert_no_errors(page)
    page.get_by_role("tab", name="Circuit browser").click()
    shot(page, "09_size_capped")
    choose_containing(page, "#run-select", "test_circuit")  # back to a circuit evaluated on the usual 64 examples
    wait_text(page, "#summary", "Run imported · test_circuit")
    # the slow numbers of the huge-options run, still being computed, do not paint over this run's
    summary = settle(page)["summary"]
    assert "Run imported · test_circuit" in summary and "n_examples=10000000" not in summary


def test_prompt_lab_and_its_errors(page):
    page.get_by_role("tab", name="Prompt lab").click()
    editor = page.locator("#prompt-input .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text('def f(x):\n    return x + "a')
    page.locator("#prompt-run").click()
    page.wait_for_selector("#next-plot .js-plotly-plot .barlayer .point")
    assert page.locator("#next-plot .barlayer .trace").count() == 2  # full model and circuit
    assert page.locator("#prompt-tokens .csp-tok").count() > 5
    wait_text(page, "#logit-diff", "logit(")
    shot(page, "10_prompt_lab")
    # an empty prompt: the message, and the old prediction gone
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.locator("#prompt-run").click()
    wait_text(page, "#prompt-notice", "the prompt is empty")
    page.wait_for_function("() => document.querySelectorAll('#prompt-tokens .csp-tok').length === 0")
    assert page.locator("#next-plot .barlayer .point").count() == 0
    # whitespace is a prompt; one candidate box empty says why there is no logit difference
    editor.click()
    page.keyboard.insert_text("    ")
    page.locator("#cand-b textarea, #cand-b input").first.fill("")
    page.locator("#prompt-run").click()
    wait_text(page, "#logit-diff", "type a candidate token in both boxes")
    page.wait_for_selector("#next-plot .js-plotly-plot .barlayer .point")
    assert_no_errors(page)
    shot(page, "11_prompt_errors")


def test_ablations_importances_and_pruning_check(page):
    page.get_by_role("tab", name="Ablations & pruning").click()
    page.locator("#abl-layers label").first.click()
    page.locator("#abl-run").click()
    page.wait_for_selector("#ablation-plot .js-plotly-plot .barlayer .point")
    wait_text(page, "#ablation-table", "baseline")
    page.locator("#imp-run").click()
    page.wait_for_selector("#importance-plot .js-plotly-plot .barlayer .point", timeout=300_000)
    choose(page, "#prune-task", PRUNE_TASK)
    page.locator("#prune-target input").fill("0.01")
    page.locator("#prune-target input").press("Enter")
    wait_text(page, "#prune-check", "above the target 0.010")
    page.get_by_label("× full model's loss").check()
    page.locator("#prune-target input").fill("1.2")
    page.locator("#prune-target input").press("Enter")
    wait_text(page, "#prune-check", "1.20 × that")
    choose(page, "#prune-task", WEAK_TASK)
    wait_text(page, "#prune-check", "at or above chance")  # 1.2 × with_as's full loss: refused
    assert_no_errors(page)
    shot(page, "12_ablations")


def test_other_tabs_render(page):
    page.get_by_role("tab", name="Whole circuit").click()
    page.wait_for_selector("#circuit-overview .js-plotly-plot .scatterlayer path.point")
    assert len(node_points(page, "#circuit-overview")) >= 2
    shot(page, "13_whole_circuit")
    page.get_by_role("tab", name="Curves").click()
    page.wait_for_function("() => { const d = document.querySelector('#faith-plot .js-plotly-plot'); "
                           "return d && d.layout && d.layout.xaxis && d.layout.xaxis.type === 'log'; }", timeout=300_000)
    ticks = page.evaluate("() => document.querySelector('#faith-plot .js-plotly-plot').layout.xaxis.ticktext")
    assert ticks and all(re.fullmatch(r"[0-9.e+-]+", t) and float(t) > 0 for t in ticks)
    wait_text(page, "#run-details", "Model training: final metrics")
    shot(page, "14_curves")
    page.get_by_role("tab", name="Embeddings").click()
    page.wait_for_selector("#emb-tokens .js-plotly-plot .barlayer .point")
    shot(page, "15_embeddings")


def test_shared_url_restores_view(page, browser, app_server):
    page.get_by_role("tab", name="Circuit browser").click()
    choose(page, "#task-select", "single_double_quote")
    wait_text(page, "#summary", "Task single_double_quote:")
    page.get_by_role("tab", name="Share & files").click()
    page.wait_for_function("() => document.querySelector('#share-link textarea, #share-link input').value.includes('node=')")
    link = page.locator("#share-link textarea, #share-link input").first.input_value()
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(link).query))
    assert {"model", "task", "run", "k", "layer", "node"} <= set(params), params
    page.wait_for_function("() => { const b = document.querySelector('#download'); return !!b && !b.disabled; }")
    with page.expect_download() as download:
        page.locator("#download").click()
    data = json.loads(Path(download.value.path()).read_text())
    assert data["format"] == "csp-circuit" and data["k"] == int(params["k"]) and len(data["nodes"]) == int(params["k"])
    # a task picked on this tab: the button offers the new selection's circuit, never the old one's
    choose(page, "#task-select", "indent_for")
    wait_text(page, "#summary", "Task indent_for:")
    page.wait_for_function("() => { const b = document.querySelector('#download'); return !!b && !b.disabled; }")
    with page.expect_download() as download:
        page.locator("#download").click()
    shown_k = int(float(page.locator("#k-slider input[type=number]").input_value()))
    assert json.loads(Path(download.value.path()).read_text())["task"] == "indent_for"
    assert json.loads(Path(download.value.path()).read_text())["k"] == shown_k
    k = max(2, int(params["k"]) * 2 // 3)
    other = new_page(browser, app_server["url"] + "?" + urllib.parse.urlencode({**params, "k": k, "node": ""}))
    try:
        other.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
        node = node_points(other)[-1]["id"]
        query = urllib.parse.urlencode({**params, "k": k, "layer": sublayer_of(node), "node": node})
        other.goto(app_server["url"] + "?" + query)
        wait_text(other, "#node-header", node)
        assert int(float(other.locator("#k-slider input[type=number]").input_value())) == k
        restored = dict(urllib.parse.parse_qsl(other.locator("#share-query textarea, #share-query input").first.input_value()))
        assert restored["node"] == node and restored["k"] == str(k) and restored["run"] == params["run"]
        shot(other, "16_shared_url_restored")
    finally:
        other.context.close()


def test_bad_files_and_links_show_messages(page, browser, app_server, tmp_path):
    page.get_by_role("tab", name="Share & files").click()
    bad = tmp_path / "not_viz.pt"
    torch.save({"hello": torch.zeros(2)}, bad)
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    wait_text(page, "#upload-md", "not a viz_data.pt")
    page.locator("#upload input[type=file]").set_input_files(str(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"))
    wait_text(page, "#upload-md", "made for model")
    assert_no_errors(page)
    shot(page, "17_bad_file_message")
    other = new_page(browser, app_server["url"] + "?task=no_such_task&run=saved:0123456789abcdef&k=abc&node=9.mlp.post_act:1")
    try:
        other.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
        wait_text(other, "#status", "unknown task 'no_such_task'")
        assert "k='abc' is not a number" in text_of(other, "#status")
        other.goto(app_server["url"] + "?model=/etc")
        wait_text(other, "#status", "model '/etc' is not available")
        other.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
        assert_no_errors(other)
    finally:
        other.context.close()


# ---- the API ------------------------------------------------------------------------------------


def test_next_tokens_api(app_server):
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(app_server["url"], verbose=False)
    out = client.predict(prompt='def f(x):\n    return x + "a', api_name="/next_tokens")
    assert len(out["full"]) == 10 and all(0 <= r["prob"] <= 1 for r in out["full"])
    assert out["circuit"] is not None and len(out["circuit"]) == 10
    # validated as the page validates
    assert client.predict(prompt="x", task="nope", api_name="/next_tokens")["error"].startswith("unknown task 'nope'")
    assert "unknown run" in client.predict(prompt="x", run="nope", api_name="/next_tokens")["error"]
    run = app_server["run"]
    for k in (-5, 99999):
        answer = client.predict(prompt="x = 1", task="single_double_quote", run=run, k=k, api_name="/next_tokens")
        assert f"k={k} is outside" in answer["notices"][0] and answer["circuit_nodes"] >= 1
    assert "empty" in client.predict(prompt="", api_name="/next_tokens")["error"]
    long = client.predict(prompt="x = 1\n" * 10_000, api_name="/next_tokens")
    assert any("kept the last" in n for n in long["notices"]) and long["full"]
    # an unknown hub id fails fast, and the second time from the cache
    t = time.perf_counter()
    bad = client.predict(prompt="x", model="nobody/nothing", api_name="/next_tokens")
    first = time.perf_counter() - t
    t = time.perf_counter()
    again = client.predict(prompt="x", model="nobody/nothing", api_name="/next_tokens")
    assert "nobody/nothing" in bad["error"] and again == bad and time.perf_counter() - t < max(first, 2.0)
    assert "is not available" in client.predict(prompt="x", model="/etc", api_name="/next_tokens")["error"]


def test_next_tokens_api_opens_no_folder_outside_the_roots(app_server, folders):
    """Through the API: a hub-shaped relative folder is looked up on the hub (and not found), never opened; relative,
    `..`, absolute and linked folders outside the roots read as one message; an existing folder and an absent one
    answer alike."""
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(app_server["url"], verbose=False)

    def error(spec):
        answer = client.predict(prompt="x", model=spec, api_name="/next_tokens")
        assert "full" not in answer, (spec, answer)
        return re.sub(r"model '.*?'", "model SPEC", answer["error"])

    hub_shaped = {spec: error(spec) for spec in (folders["hub_shaped"], "modeling_csp/explorer", "modeling_csp/nothere")}
    assert len(set(hub_shaped.values())) == 1 and "hub lookup failed" in hub_shaped["modeling_csp/nothere"], hub_shaped
    outside = {spec: error(spec) for spec in (
        "./" + folders["hub_shaped"], folders["hub_shaped"] + "/.", os.path.relpath(folders["outside"], PROJECT_ROOT),
        str(folders["outside"]), str(folders["root"] / "link_out"), str(folders["root"] / ".." / "outside"),
        "./modeling_csp/explorer", "./modeling_csp/nothere")}
    assert len(set(outside.values())) == 1 and "is not available" in next(iter(outside.values())), outside
    assert "full" in client.predict(prompt="x", model=str(folders["hostile"]), api_name="/next_tokens")


def test_links_open_no_folder_outside_the_roots_and_show_their_text_as_text(browser, app_server, folders):
    """`?model=work_dirs/...` falls back to the default model and no page's model box offers it; `?task=<img…><h1>…`
    is shown as those characters: no heading or image is made of it, and the image is never fetched."""
    probe = f"http://127.0.0.1:{free_port()}/csp-probe.png"
    markup = f'<img src="{probe}"><h1>Your session expired</h1>'
    page = new_page(browser)
    fetched = []
    page.on("request", lambda request: fetched.append(request.url) if request.url.startswith(probe) else None)
    try:
        page.goto(app_server["url"] + "?" + urllib.parse.urlencode({"task": markup}))
        page.wait_for_selector("#summary p", timeout=120_000)
        wait_text(page, "#status", f"unknown task {markup!r}")
        assert page.locator("#status h1, #status img, #summary h1, #summary img").count() == 0
        assert "Your session expired" not in page.locator("h1").all_inner_texts()
        page.goto(app_server["url"] + "?" + urllib.parse.urlencode({"model": folders["hub_shaped"]}))
        page.wait_for_selector("#summary p", timeout=120_000)
        wait_text(page, "#status", f"could not load model {folders['hub_shaped']!r}")
        wait_text(page, "#summary", "Model default ·")
        shot(page, "19_links_stay_text")
        assert page.locator("#model-select input").input_value() == "default"
    finally:
        page.context.close()
    other = new_page(browser, app_server["url"])
    try:
        other.locator("#model-select input").click()
        offered = other.locator("#model-select [role=option]").all_inner_texts()
        assert offered and not any("outside" in o for o in offered), offered
        other.keyboard.press("Escape")
    finally:
        other.context.close()
    assert fetched == []


# ---- rapid changes: every panel shows the page's one selection --------------------------------------------

SHIPPED = ("indent_for", "while_return_true", "lambda_func", "bracket_brace", "fstring_brace", "if_ternary")
PAGE_STATE_JS = """() => {
  const q = (s) => document.querySelector(s);
  const plot = q('#circuit-graph .js-plotly-plot');
  const layout = plot && plot.layout;
  const title = layout && layout.title ? (typeof layout.title === 'string' ? layout.title : layout.title.text || '') : '';
  const message = layout && layout.annotations && layout.annotations.length ? layout.annotations[0].text || '' : '';
  const acts = q('#task-acts h4');
  const checked = q('#layer-select input:checked');
  return {task: q('#task-select input').value, k: q('#k-slider input[type=number]').value,
          header: q('#node-header').innerText, acts: acts ? acts.innerText : '', acts_text: q('#task-acts').innerText,
          layer: checked ? checked.value : null, graph: title || message, node: q('#node-select input').value,
          summary: q('#summary').innerText};
}"""


def page_state(page) -> dict:
    return page.evaluate(PAGE_STATE_JS)


def settle(page, quiet_s: float = 4.0, timeout_s: float = 240.0) -> dict:
    """Waits until the page has stopped changing (the same state for `quiet_s`, no pending numbers) and returns
    that state."""
    deadline = time.time() + timeout_s
    last, since = None, time.time()
    while time.time() < deadline:
        state = page_state(page)
        busy = any("…" in state[part] or "updating" in state[part] for part in ("summary", "acts_text", "graph"))
        busy = busy or not state["summary"].strip()
        if state != last or busy:
            last, since = state, time.time()
        elif time.time() - since >= quiet_s:
            return state
        time.sleep(0.5)
    pytest.fail(f"the page did not settle within {timeout_s:.0f} s: {last}")


def disagreements(state: dict) -> list[str]:
    """What in a settled page does not belong to the selection its selectors show (empty when it all agrees)."""
    task, out = state["task"], []
    if f"Task {task}:" not in state["summary"]:
        out.append(f"summary is not about {task}")
    header = re.search(r"\d+\.(?:attn|mlp)\.\w+:\d+", state["header"])
    acts = re.match(r"(\S+) on (.+)'s examples", state["acts"])
    if state["layer"] is None:  # a task without a circuit: no node, no node panel
        if header or state["acts_text"].strip() or f"No circuit for {task}" not in state["graph"]:
            out.append(f"a task without a circuit shows {state['header']!r} / {state['acts']!r} / {state['graph']!r}")
        return out
    if not state["graph"].startswith(state["layer"]) and state["graph"] != f"The circuit has no nodes in {state['layer']}.":
        out.append(f"layer {state['layer']} selected, graph shows {state['graph'][:40]!r}")
    if header:
        if not header.group(0).startswith(state["layer"] + "."):
            out.append(f"header node {header.group(0)} is not in layer {state['layer']}")
        if header.group(0) not in state["node"]:
            out.append(f"header node {header.group(0)}, node box {state['node']!r}")
        if not acts or acts.group(1) != header.group(0) or acts.group(2) != task:
            out.append(f"header {header.group(0)} on {task}, task panel {state['acts']!r}")
    elif state["acts_text"].strip():
        out.append(f"no node selected, task panel {state['acts']!r}")
    return out


def trials(name: str, results: list[list[str]]) -> None:
    """Reports how many trials ended inconsistent (the closing note quotes these lines), then asserts none did."""
    bad = [r for r in results if r]
    print(f"{name}: {len(bad)} of {len(results)} trials ended inconsistent {bad}")
    assert not bad, bad


def test_a_task_without_a_circuit_clears_the_node_panel(page):
    choose(page, "#task-select", PRUNE_TASK)
    state = settle(page)
    assert state["task"] == PRUNE_TASK
    trials("task without a circuit after load", [disagreements(state)])


@pytest.mark.parametrize("gap_s", [1.5, 0.3])
def test_rapid_task_picks_end_on_one_selection(page, gap_s):
    """Five tasks picked `gap_s` apart, three times: the settled page shows the last one everywhere."""
    results = []
    for trial in range(3):
        picks = [*SHIPPED[trial:], *SHIPPED[:trial]][:4] + [PRUNE_TASK if trial == 1 else SHIPPED[(trial + 4) % 6]]
        for task in picks:
            t = time.perf_counter()
            choose(page, "#task-select", task)
            time.sleep(max(0.0, gap_s - (time.perf_counter() - t)))
        state = settle(page)
        results.append(disagreements(state) + ([] if state["task"] == picks[-1] else [f"task box {state['task']}"]))
    trials(f"5 task picks {gap_s} s apart", results)
    assert_no_errors(page)


def test_rapid_layer_clicks_end_on_one_selection(page):
    """Nine layer clicks 80 ms apart, three times: the graph, layer list, node and node panel agree."""
    results = []
    labels = page.locator("#layer-select label")
    n = labels.count()
    assert n >= 4
    for trial in range(3):
        order = [(trial + 3 * i) % n for i in range(9)]
        for i in order:
            labels.nth(i).click()
            time.sleep(0.08)
        state = settle(page)
        want = page.locator("#layer-select input").nth(order[-1]).get_attribute("value")
        results.append(disagreements(state) + ([] if state["layer"] == want else [f"layer {state['layer']}, clicked {want}"]))
    trials("9 layer clicks 80 ms apart", results)


def test_typed_k_is_not_overwritten(page):
    """Clicking into the k box and typing: the typed digits stay, and the page shows that k (four tries)."""
    box = page.locator("#k-slider input[type=number]")
    k_max = int(float(box.get_attribute("max")))
    results = []
    for k in (k_max - 7, k_max // 2, 12, k_max - 1):
        box.click()
        box.select_text()
        box.press_sequentially(str(k), delay=150)
        typed = box.input_value()
        box.press("Enter")
        state = settle(page)
        problems = disagreements(state) + ([] if typed == str(k) else [f"typed {k}, the box held {typed}"])
        if f"{k} of " not in state["summary"] or state["k"] != str(k):
            problems.append(f"k={k} typed, the page shows k={state['k']}")
        print(f"typed k={k}: {problems or 'consistent'}")
        results.append(problems)
    trials("typed k", results)


def test_a_task_pick_is_sent_once(page):
    """One pick from the task list is one request of the task event (Gradio 6 dropdowns also fire on blur)."""
    deps = page.evaluate("""() => {
      const cfg = window.gradio_config;
      const box = cfg.components.find((c) => c.props && c.props.elem_id === 'task-select');
      return cfg.dependencies.filter((d) => (d.targets || []).some((t) => t[0] === box.id)).map((d) => d.id);
    }""")
    assert deps
    sent = []

    def count(request):
        if "/queue/join" in request.url and request.method == "POST":
            body = request.post_data_json or {}
            if body.get("fn_index") in deps:
                sent.append(body["fn_index"])

    page.on("request", count)
    for task in ("lambda_func", PRUNE_TASK):
        sent.clear()
        choose(page, "#task-select", task)
        settle(page)
        print(f"a pick of {task}: {len(sent)} request(s) of the task event")
        assert len(sent) == 1, sent


def test_numbers_of_an_old_k_are_marked_updating(page):
    """After a k change the summary and the layer bars say "updating…" (the bars of the old k are gone) until the
    new k's losses and layer deltas arrive."""
    k = int(float(page.locator("#k-slider input[type=number]").get_attribute("max"))) - 9
    bars_say = "(t) => { const d = document.querySelector('#layer-bars .js-plotly-plot'); const l = d && d.layout; " \
               "return !!l && JSON.stringify([l.title, l.annotations || []]).includes(t); }"
    type_number(page, "#k-slider", k)
    wait_text(page, "#summary", "updating… ", timeout=30_000)
    page.wait_for_function(bars_say, arg="updating…", timeout=30_000)
    assert f"k={k}" in text_of(page, "#summary")
    page.wait_for_function("() => !document.querySelector('#summary').innerText.includes('updating')", timeout=300_000)
    page.wait_for_function(bars_say, arg=f"k={k}", timeout=60_000)
    page.wait_for_selector("#layer-bars .js-plotly-plot .barlayer .point", state="attached")
    assert not page.evaluate(bars_say, "updating") and "…" not in text_of(page, "#summary")
    assert "Δ …" not in text_of(page, "#layer-select")


# whether each prune button is disabled (null for a button the page has not drawn: a hidden box or tab)
BUTTONS_JS = "() => ['#prune-here', '#prune-run'].map((s) => { const b = document.querySelector(s); return b ? b.disabled : null; })"


def test_pruning_shows_its_stage_and_disables_the_buttons(page):
    """A short prune from "no circuit yet": a visible progress line with the stage and how far it is, both prune
    buttons off while it runs and on again afterwards."""
    page.get_by_role("tab", name="Ablations & pruning").click()
    type_number(page, "#prune-steps", 10)
    page.get_by_role("tab", name="Circuit browser").click()
    choose(page, "#task-select", PRUNE_TASK)
    wait_text(page, "#prune-here-md", "The full model's held-out loss on")
    page.locator("#prune-here").click()
    wait_text(page, "#prune-here-progress", "⏳", timeout=60_000)
    assert page.locator("#prune-here-progress").bounding_box()["height"] > 10
    page.get_by_role("tab", name="Ablations & pruning").click()  # (a tab's buttons are drawn when it opens)
    page.wait_for_selector("#prune-run")
    assert page.evaluate(BUTTONS_JS) == [True, True]
    seen = set()
    while not re.search(r"target (not )?reached|failed", text_of(page, "#status")):
        line = page.evaluate("() => { const e = document.querySelector('#prune-here-progress'); "
                              "return e ? e.innerText.trim() : ''; }")
        if line:
            seen.add(line)
        time.sleep(0.3)
    print("progress lines seen:", sorted(seen))
    assert seen and all(re.fullmatch(r"⏳ .+", line) for line in seen), seen
    assert any(re.search(r"\S+.* · \d+%$", line) for line in seen), seen
    assert any(re.search(r"mask training: step \d+ of 10 · \d+%", line) for line in seen), seen  # the stage, counted
    page.wait_for_function(f"() => ({BUTTONS_JS})().every((disabled) => disabled !== true)")
    assert page.evaluate(BUTTONS_JS)[1] is False
    assert page.evaluate("() => [...document.querySelectorAll('#prune-progress, #prune-here-progress')]"
                          ".map((e) => e.innerText.trim()).join('')") == ""
    assert_no_errors(page)


# ---- issue 22: prompt lab — attention grid and activation patching

GRID_SHAPES_JS = """() => { const d = document.querySelector('#att-grid .js-plotly-plot');
    return d && d.data ? d.data.filter((t) => t.type === 'heatmap').map((t) => [t.z.length, t.z[0].length]) : []; }"""
PATCH_GRAPH_JS = """() => { const d = document.querySelector('#patch-graph .js-plotly-plot');
    const t = d && d.data ? d.data.find((t) => t.name === 'nodes') : null;
    return t ? {n: t.customdata.length, colors: t.marker.color, bar: d._fullData.find((u) => u.name === 'nodes')
               .marker.colorbar.title.text} : null; }"""


def replace_prompt(page, text: str) -> None:
    editor = page.locator("#prompt-input .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(text)


def test_attention_grid_of_a_layer_shows_where_a_hovered_token_attends(page):
    page.get_by_role("tab", name="Prompt lab").click()
    replace_prompt(page, "def f(x):\n    return '<b>' + x")
    page.locator("#att-run").click()
    wait_text(page, "#att-notice", "layer 0:")
    page.wait_for_selector("#att-layer input[value='1']")  # the model's layers, once the first grid came
    page.locator("#att-layer input[value='1']").check()
    wait_text(page, "#att-notice", "layer 1:")
    n_head, n_tok = map(int, re.search(r"(\d+) heads on (\d+) tokens", text_of(page, "#att-notice")).groups())
    page.wait_for_function(f"() => ({GRID_SHAPES_JS})().length === {n_head}")
    assert page.evaluate(GRID_SHAPES_JS) == [[n_tok, n_tok]] * n_head  # one (query x key) pattern per head
    tokens = page.locator("#att-tokens .csp-att-tok")
    assert tokens.count() == n_tok and "<b>" in page.locator("#att-tokens .csp-tokens").inner_text()  # text, not markup
    tokens.nth(4).hover()
    wait_text(page, "#att-tokens .csp-att-readout", "(token 4) attends to")
    readout = text_of(page, "#att-tokens .csp-att-readout")
    assert all(f"head {h}:" in readout for h in range(n_head)), readout
    shot(page, "22_attention_grid")
    replace_prompt(page, "x = 1")  # a new prompt: the old grid goes
    page.wait_for_function("() => document.querySelectorAll('#att-tokens .csp-att-tok').length === 0")
    assert page.evaluate(GRID_SHAPES_JS) == []
    assert_no_errors(page)


def test_activation_patching_ranks_the_circuit_and_colours_its_graph(page):
    page.get_by_role("tab", name="Prompt lab").click()
    page.locator("#patch-run").click()
    wait_text(page, "#patch-notice", "nodes patched")
    n_nodes = int(re.search(r"(\d+) nodes patched", text_of(page, "#patch-notice")).group(1))
    effects = [float(t) for t in page.locator("#patch-list table tr td:nth-child(3)").all_inner_texts()]
    assert effects and len(effects) == min(n_nodes, 30)
    assert [abs(e) for e in effects] == sorted((abs(e) for e in effects), reverse=True)
    page.wait_for_function(f"() => {{ const g = ({PATCH_GRAPH_JS})(); return g && g.n === {n_nodes}; }}")
    graph = page.evaluate(PATCH_GRAPH_JS)
    assert graph["bar"] == "patching effect" and max(abs(c) for c in graph["colors"]) == pytest.approx(
        max(abs(e) for e in effects), abs=1e-3)
    shot(page, "23_patching")
    # an input changes: the reading goes at once
    page.locator("#patch-b input, #patch-b textarea").first.fill("(")
    page.wait_for_function("() => !document.querySelector('#patch-list table')")
    page.wait_for_function(f"() => ({PATCH_GRAPH_JS})() === null")
    # prompts of different token lengths: one line naming both, and nothing else
    page.locator("#patch-clean input, #patch-clean textarea").first.fill("x = 'abc def")
    page.locator("#patch-run").click()
    wait_text(page, "#patch-notice", "tokens and the corrupted one 4")
    assert page.locator("#patch-list table").count() == 0 and page.evaluate(PATCH_GRAPH_JS) is None
    assert_no_errors(page)
# ---- issue 22: circuits across checkpoints


def test_curves_tab_shows_the_shipped_circuits_through_training(page, app_server):
    from modeling_csp.circuits.transfer import read_circuit_through_training
    from modeling_csp.model.loading import resolve_model

    shipped = read_circuit_through_training(resolve_model(app_server["model"]))
    page.get_by_role("tab", name="Curves").click()
    plot = "document.querySelector('#through-training-plot .js-plotly-plot')"
    page.wait_for_function(f"() => {{ const d = {plot}; return d && d.layout && ((d.data && d.data.length) || "
                           "(d.layout.annotations && d.layout.annotations.length)); }", timeout=300_000)
    traces = page.evaluate(f"() => {plot}.data.map((t) => ({{name: t.name, x: t.x, y: t.y}}))")
    if shipped is None:  # $CSP_APP_TEST_MODEL without the file
        assert "ships no circuit-through-training" in page.evaluate(f"() => {plot}.layout.annotations[0].text")
        return
    rows = [r for r in shipped["circuits"].values() if r["at_target"]]
    names = [t["name"] for t in traces]
    assert {f"{r['task']} ({r['k']} nodes)" for r in rows} <= set(names) and "chance (ln 2)" in names
    for row in rows:
        circuit = traces[names.index(f"{row['task']} ({row['k']} nodes)")]
        full = traces[names.index(f"{row['task']}: full model")]
        assert circuit["x"] == shipped["snapshots"]
        assert circuit["y"] == pytest.approx(row["circuit"]) and full["y"] == pytest.approx(row["full"])
    assert page.evaluate(f"() => {plot}.layout.yaxis.type") == "log"
    shot(page, "22_circuit_through_training")
# ---- issue 22: walking the circuit

READING_NODE_JS = "() => { const r = document.querySelector('#node-reading .csp-reading'); return r ? r.dataset.node : ''; }"


def graph_traces(page) -> dict[str, list[str]]:
    """{trace name: node ids in its customdata} of the circuit graph as drawn."""
    return page.evaluate("""() => {
        const d = document.querySelector('#circuit-graph .js-plotly-plot');
        const out = {};
        ((d && d._fullData) || []).forEach((t) => { out[t.name] = (t.customdata || []).map((c) => c[0]); });
        return out;
    }""")


def test_connection_links_walk_the_circuit(page, app_server):
    """A connection is a link: clicking it selects that node (graph, node box, panel and share link follow); the graph
    draws the new node's paths; "What it does" shows its reading, and never the old node's after the click."""
    from conftest import TEST_TASK

    query = {"model": app_server["model"], "task": TEST_TASK, "run": app_server["run"]}
    page.goto(f"{app_server['url']}?{urllib.parse.urlencode(query)}")
    wait_text(page, "#summary", "Run imported · test_circuit")
    settle(page)
    start = header_node(page)
    page.get_by_role("tab", name="What it does").click()
    page.wait_for_function(f"(id) => ({READING_NODE_JS})() === id", arg=start)
    text = text_of(page, "#node-reading")
    assert f"Why {start}" in text and ("Direct logit effects" in text or "Tokens that drive" in text), text[:500]
    assert "Upstream" in text and "Downstream" in text
    page.get_by_role("tab", name="Connections").click()
    page.wait_for_selector("#connections a.csp-node-link")
    links = page.eval_on_selector_all("#connections a.csp-node-link", "(as) => as.map((a) => a.dataset.node)")
    same_layer = [n for n in links if sublayer_of(n) == sublayer_of(start)]
    assert same_layer, links  # the test circuit joins every node to another of its layer by a weight
    target = same_layer[0]
    page.locator(f"#connections a.csp-node-link[data-node='{target}']").first.click()
    wait_text(page, "#node-header", target)
    assert page.evaluate(READING_NODE_JS) in ("", target)  # the old node's reading is gone at once
    page.wait_for_function("(id) => { const i = document.querySelector('#node-select input'); return i && i.value.includes(id); }",
                           arg=target)
    page.wait_for_function("(id) => { const q = document.querySelector('#share-query textarea, #share-query input');"
                           " return q && new URLSearchParams(q.value).get('node') === id; }", arg=target)
    page.wait_for_function("""([id, start]) => {
        const d = document.querySelector('#circuit-graph .js-plotly-plot');
        if (!d || !d._fullData) return false;
        const sel = d._fullData.find((t) => t.name === 'selected');
        const ring = d._fullData.filter((t) => t.name === 'upstream nodes' || t.name === 'downstream nodes');
        return sel && sel.customdata[0][0] === id && ring.some((t) => t.customdata.some((c) => c[0] === start));
    }""", arg=[target, start])
    traces = graph_traces(page)
    assert "upstream path" in traces or "downstream path" in traces, sorted(traces)
    page.get_by_role("tab", name="What it does").click()
    page.wait_for_function(f"(id) => ({READING_NODE_JS})() === id", arg=target)
    text = text_of(page, "#node-reading")
    assert f"Why {target}" in text and f"Why {start}" not in text and start in text  # start is on one of its paths
    shot(page, "22_walk_link")
    assert_no_errors(page)


def test_reading_links_select_their_node(page):
    """The node links of "What it does" (paths, inputs) select their node too."""
    page.get_by_role("tab", name="What it does").click()
    start = header_node(page)
    page.wait_for_function(f"(id) => ({READING_NODE_JS})() === id", arg=start)
    links = page.eval_on_selector_all("#node-reading a.csp-node-link", "(as) => as.map((a) => a.dataset.node)")
    assert links, text_of(page, "#node-reading")[:400]
    target = links[0]
    page.locator(f"#node-reading a.csp-node-link[data-node='{target}']").first.click()
    wait_text(page, "#node-header", target)
    page.wait_for_function(f"(id) => ({READING_NODE_JS})() === id", arg=target)
    layer = page.locator("#layer-select input:checked").get_attribute("value")
    assert layer == sublayer_of(target)  # a node of another layer brings its layer's graph
    assert_no_errors(page)
# ---- issue 22: export and node labels -------------------------------------------------------------


def download_from(page, selector: str) -> Path:
    """Waits until the download button holds a file (enabled), then downloads it."""
    page.wait_for_function("(s) => { const b = document.querySelector(s); return !!b && !b.disabled; }", arg=selector)
    with page.expect_download() as download:
        page.locator(selector).click()
    return Path(download.value.path())


def test_export_circuit_page_works_offline_and_figures_follow_the_selection(page, browser, app_server, tmp_path):
    page.get_by_role("tab", name="Share & files").click()
    assert page.locator("#download-page").is_disabled()  # made on demand (5 MB), not for every selection
    page.locator("#export-circuit-make").click()
    html_page = tmp_path / "circuit.html"
    shutil.copy(download_from(page, "#download-page"), html_page)
    nodes_csv = download_from(page, "#download-nodes").read_bytes().decode()
    assert nodes_csv.startswith("node,location,layer,index,importance,label\r\n")
    n_nodes = nodes_csv.count("\r\n") - 1
    offline = browser.new_context(offline=True)
    try:
        asked = []
        offline.route(re.compile(r"^https?://"), lambda route: (asked.append(route.request.url), route.abort()))
        pg = offline.new_page()
        pg.goto(html_page.as_uri())
        pg.wait_for_selector(".js-plotly-plot .scatterlayer path.point")
        assert pg.locator("#node-table tbody tr").count() == n_nodes
        assert asked == []  # nothing fetched: plotly.js is inlined
        pg.screenshot(path=str(ARTIFACTS / "app_22_exported_circuit_page.png"), full_page=False)
    finally:
        offline.close()
    # a figure file is for the selection it was made for: made on demand, gone as soon as the selection changes
    assert page.locator("#export-download").is_disabled()
    page.locator("#export-make").click()
    figure = download_from(page, "#export-download").read_text()
    layer = page.locator("#layer-select input:checked").get_attribute("value")
    assert f"{layer}:" in figure and "Plotly.newPlot" in figure and not re.search(r"<script[^>]*src=[\"']?https?:", figure)
    page.get_by_role("tab", name="Circuit browser").click()
    other = next(p for p in node_points(page) if p["id"] != header_node(page))
    page.mouse.click(other["x"], other["y"])
    wait_text(page, "#node-header", other["id"])
    page.wait_for_function("() => document.querySelector('#export-download').disabled")
    assert_no_errors(page)


def test_label_a_node_then_reload_by_share_link_and_hover(page, browser, app_server):
    node = header_node(page)
    label = 'opens "(", a <b>bold</b> note'
    box = page.locator("#node-label textarea, #node-label input").first
    box.fill(label)
    page.locator("#node-label-save").click()
    wait_text(page, "#node-label-md", f"labelled {node}")
    page.wait_for_function("() => (document.querySelector('#share-query textarea, #share-query input').value || '')"
                           ".includes('run=saved')")
    query = page.locator("#share-query textarea, #share-query input").first.input_value()
    assert dict(urllib.parse.parse_qsl(query))["node"] == node
    other = new_page(browser, app_server["url"] + "?" + query)
    try:
        wait_text(other, "#node-header", node)
        other.wait_for_function("(t) => { const b = document.querySelector('#node-label textarea, #node-label input');"
                                " return !!b && b.value === t; }", arg=label)
        other.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
        point = next(p for p in node_points(other) if p["id"] == node)
        other.mouse.move(point["x"] - 4, point["y"] - 4)
        other.mouse.move(point["x"], point["y"], steps=4)
        other.wait_for_function("() => (document.querySelector('#circuit-graph .hoverlayer') || {textContent: ''})"
                                ".textContent.includes('label:')")
        hover = other.evaluate("() => document.querySelector('#circuit-graph .hoverlayer').textContent")
        assert "<b>bold</b>" in hover  # shown as text, not markup
        assert other.locator("#circuit-graph .hoverlayer b", has_text="bold").count() == 0
        shot(other, "23_label_in_hover")
        other.get_by_role("tab", name="Share & files").click()
        other.locator("#export-circuit-make").click()
        assert html.escape(label) in download_from(other, "#download-page").read_text()  # the download carries it
    finally:
        other.context.close()
# ---- issue 22: example index (histogram, density, examples over >= 1M held-out tokens)


HIST_NODE_JS = ("() => { const b = document.querySelector('#node-examples .csp-hist-block'); "
                "return b ? [document.querySelectorAll('#node-examples .csp-hist-block').length, b.dataset.node] : null; }")


def test_node_histogram_density_and_examples_come_from_the_index(page):
    """A clicked node's Activating examples tab shows its histogram and density over the shipped index's tokens,
    and examples labelled as the index's; clicking another node replaces both (never the old node's)."""
    page.wait_for_function("() => window.__cspClickReady === true")
    for i in range(2):
        pts = [p for p in node_points(page) if p["id"] != header_node(page)]  # positions now: the page may have moved
        target = pts[len(pts) // 2]
        page.mouse.move(target["x"] - 3, target["y"] - 3)
        page.mouse.move(target["x"], target["y"], steps=4)
        page.mouse.click(target["x"], target["y"])
        wait_text(page, "#node-header", target["id"])
        if i == 0:
            page.get_by_role("tab", name="Activating examples").click()
        page.wait_for_function(f"() => {{ const r = ({HIST_NODE_JS})(); return r && r[1] === {json.dumps(target['id'])}; }}",
                               timeout=120_000)
        assert page.evaluate(HIST_NODE_JS) == [1, target["id"]]  # one histogram, the clicked node's
        wait_text(page, "#node-examples table", "peak")
        density = text_of(page, "#node-examples .csp-density")
        assert re.search(rf"{re.escape(target['id'])}: active on \d+\.\d\d% of tokens \([\d,]+ of ([\d,]+);",
                         density), density
        assert int(re.search(r"of ([\d,]+);", density).group(1).replace(",", "")) >= 1_000_000
        assert page.locator("#node-examples svg.csp-hist rect").count() >= 2
        assert re.search(r"Top / bottom activating examples \(example index over [\d,]+ held-out tokens\)",
                         text_of(page, "#node-examples")), text_of(page, "#node-examples")[:300]
    shot(page, "22_node_histogram")
    assert_no_errors(page)


# ---- issue 21: a model's mean activations and node examples, prepared once with a progress bar ----------


def small_model_folder(folder: Path) -> Path:
    """A small random weight-sparse model (2 layers, d_model 64) with the embedded model's tokenizer: a model
    folder that ships no example index and has nothing cached yet."""
    from modeling_csp import CSPConfig, CSPForCausalLM
    from modeling_csp.model.loading import DEFAULT_MODEL_DIR
    from modeling_csp.model.saving import save_model_folder

    torch.manual_seed(0)
    config = CSPConfig(vocab_size=2048, n_layer=2, d_model=64, n_head=4, d_head=16, d_mlp=256, block_size=128,
                       rms_norm=True, sink=True, afrac=0.25, enable_bigram_table=True, learnable_bigram_table=True,
                       bias=False, ln_bias=False, tie_word_embeddings=False)
    model = CSPForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(torch.rand_like(p) < 0.1)
    return save_model_folder(model, folder, tokenizer_json_dir=DEFAULT_MODEL_DIR, name="small synthetic")


PREP_JS = "() => { const e = document.querySelector('#model-prep'); return e ? e.innerText : ''; }"


def test_a_models_means_and_examples_are_prepared_once_with_progress_and_reused_after_a_restart(browser, tmp_path):
    """A model folder with nothing cached: the page shows a progress bar naming the step and its batches while the
    mean activations and node examples are computed, then says they were computed once; a restart of the app on
    the same cache reads them (the cache files are not rewritten) and says so."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    folder = small_model_folder(tmp_path / "models" / "small")
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CSP_APP_MODEL": str(folder), "CSP_MODEL_ROOTS": str(tmp_path / "models"),
           "CSP_CACHE_DIR": str(cache), "CSP_APP_STORE": str(tmp_path / "store"), "CSP_APP_PRETRAIN_TOKENS": "2048"}
    seen = []
    with serve_app(sys.executable, PROJECT_ROOT, env, ARTIFACTS / "app_server_prepare.log") as url:
        page = new_page(browser, url)
        try:
            shown = page.wait_for_function(f"() => {{ const t = ({PREP_JS})(); "
                                           "return /(mean activations|node examples): batch \\d+ of \\d+/.test(t) && t; }")
            seen.append(shown.json_value())  # the progress as the page showed it
            wait_text(page, "#model-prep", "✅")
            assert "computed once in" in text_of(page, "#model-prep") and "cached on disk" in text_of(page, "#model-prep")
            shot(page, "21_model_prepared")
        finally:
            page.context.close()
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert any(p.name.startswith("means-") for p in files) and any(p.name == "index.safetensors" for p in files)
    assert re.search(r"(mean activations|node examples): batch \d+ of \d+", seen[0]), seen

    with serve_app(sys.executable, PROJECT_ROOT, env, ARTIFACTS / "app_server_prepare_again.log") as url:
        page = new_page(browser, url)
        try:
            wait_text(page, "#model-prep", "✅")
            assert "read from the disk cache" in text_of(page, "#model-prep"), text_of(page, "#model-prep")
            assert_no_errors(page)
        finally:
            page.context.close()
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == files  # nothing recomputed
