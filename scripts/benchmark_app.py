"""Benchmark of the app (`app.py`) as a user sees it, in a real browser.

    python scripts/benchmark_app.py                    # the embedded default model
    python scripts/benchmark_app.py --model FOLDER --runs 10 --out app_bench.json

Measures, on this machine:
- page ready: from starting `python app.py` until the page shows the circuit graph (Playwright, chromium);
- selecting a layer, a node (a Plotly click on the graph) and a k (the slider's number box), each from the
  user's action until the page shows the result (the graph's title, the node panel, the summary's node count);
  each interaction is measured on its own: the app's follow-up events (the node panel; for a new k the random
  baseline and the layer deltas) finish before the next one starts, then --settle seconds pass;
- `/next_tokens` round trips through `gradio_client`;
- memory: the app process's peak resident set size (RSS, sampled every 250 ms) and its RSS at the end;
- memory under load: RSS after the first 100 and after 1,000 mixed `/next_tokens` calls (valid prompts, runs
  and k; unknown tasks, runs and hub ids; k out of range; empty and long prompts), which must stay within 10%.

Targets (issues 3 and 8): page ready < 15 s, each selection and /next_tokens < 500 ms, memory < 1.5 GB, RSS after
1,000 mixed API calls within 10% of its level after the first 100.

    python scripts/benchmark_app.py --soak             # 16 clients, 10 prunes, 20 large uploads, 1,000 API calls

The soak (issue 19): `--clients` threads call `/next_tokens` (`--api-calls` calls in all) while browser pages prune
(`--prunes`, `--prune-steps` steps each) and upload `--uploads` distinct circuit files of about `--upload-mb` MB,
each prune at the same time as its share of the uploads. It records the app's RSS idle, after the first prune,
after three and at the end, and the disk the app leaves behind: its run store and Gradio's upload folder. Target:
RSS at the end within 300 MB of its level after the first prune, no failed call, no upload left behind, the
store within its cap.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _report import write_section  # noqa: E402

from modeling_csp.utils.jsonio import dumps_strict, write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
NODE_RE = re.compile(r"\d+\.(?:attn|mlp)\.\w+:\d+")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.last = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.25):  # light polling: this thread shares the GIL with Playwright's waits
            try:
                rss = self.proc.memory_info().rss
            except Exception:
                break
            self.last = rss
            self.peak = max(self.peak, rss)


def node_points(page) -> list[dict]:
    return page.evaluate(
        """() => {
            const div = document.querySelector('#circuit-graph .js-plotly-plot');
            if (!div || !div._fullData) return [];
            const traces = div.querySelectorAll('.scatterlayer .trace');
            const out = [];
            div._fullData.forEach((t) => {
                if (t.name !== 'nodes') return;
                const pts = traces[t.index] ? traces[t.index].querySelectorAll('path.point') : [];
                t.customdata.forEach((c, j) => { const r = pts[j] && pts[j].getBoundingClientRect();
                    if (r) out.push({id: c[0], x: r.x + r.width / 2, y: r.y + r.height / 2}); });
            });
            return out;
        }"""
    )


GRAPH_SELECTED_JS = """(id) => {
    const e = document.querySelector('#node-header');
    const d = document.querySelector('#circuit-graph .js-plotly-plot');
    if (!e || !e.innerText.includes(id) || !d || !d._fullData) return false;
    return d._fullData.some((t) => t.name === 'selected' && t.customdata && t.customdata[0][0] === id);
}"""


GRAPH_TITLE_JS = """() => {
    const d = document.querySelector('#circuit-graph .js-plotly-plot');
    return !!d && !!d.layout && !!d.layout.title;
}"""


def follow_ups_done(page) -> None:
    """The view's follow-up steps have finished: the node panel shows the selected node, and the summary has
    its slow numbers (no "…")."""
    page.wait_for_function("""() => {
        const h = document.querySelector('#node-header'), t = document.querySelector('#task-acts h4');
        const s = document.querySelector('#summary');
        const m = h && h.innerText.match(/\\d+\\.(attn|mlp)\\.\\w+:\\d+/);
        return !!m && !!t && t.innerText.startsWith(m[0] + ' ') && !!s && !s.innerText.includes('…');
    }""")


def header_node(page) -> str:
    m = NODE_RE.search(page.locator("#node-header").inner_text())
    return m.group(0) if m else ""


# /next_tokens calls of every kind, good and bad, cycled through for the memory measurement
MIXED_CALLS = [
    {"prompt": 'def f(x):\n    return x + "a'},
    {"prompt": "for i in range(10):\n    print(i", "task": "single_double_quote"},
    {"prompt": "while True:\n    if done:\n        return", "task": "while_return_true", "k": 5},
    {"prompt": "x = 1\n", "task": "single_double_quote", "run": "shipped:single_double_quote_k24", "k": 99999},
    {"prompt": "x", "task": "nope"},
    {"prompt": "x", "run": "nope"},
    {"prompt": ""},
    {"prompt": "x", "model": "nobody/nothing"},
    {"prompt": "y = 2\n" * 200},
    {"prompt": "    ", "task": "single_double_quote", "k": -5},
]


def mixed_calls(client, n: int, rss, checkpoints=(100,)) -> dict:
    """n mixed /next_tokens calls; the process's RSS (MB) after the first call and at each checkpoint and n."""
    marks = {}
    for i in range(1, n + 1):
        out = client.predict(**MIXED_CALLS[(i - 1) % len(MIXED_CALLS)], api_name="/next_tokens")
        assert "full" in out or "error" in out, out
        if i == 1 or i in checkpoints or i == n:
            marks[i] = round(rss() / 2**20)
    return marks


def summarize(values: list[float]) -> dict:
    if not values:
        return {}
    return {"n": len(values), "median_ms": round(1000 * statistics.median(values), 1),
            "max_ms": round(1000 * max(values), 1), "min_ms": round(1000 * min(values), 1)}


SOAK_TASK = "else_elif"  # a task the default model ships no circuit for


def large_circuit(source: Path, out: Path, megabytes: float, seed: int) -> Path:
    """A valid circuit file of about `megabytes` MB, distinct per `seed`: the shipped circuit `source` grown with
    more nodes, each given a copy of an existing node's activating examples."""
    import json

    from modeling_csp.circuits.graph import location_width, node_locations
    from modeling_csp.model.configuration_csp import CSPConfig

    config = CSPConfig.from_pretrained(ROOT / "modeling_csp" / "default_model")
    data = json.loads(source.read_text())
    examples = list(data["node_data"].values())
    want = int(megabytes * 1e6 / len(json.dumps(examples[0])))
    have = {(n["location"], n["index"]) for n in data["nodes"]}
    free = [(loc, i) for loc in node_locations(config) for i in range(location_width(config, loc)) if (loc, i) not in have]
    for loc, i in free[: max(0, want - len(data["nodes"]))]:
        data["nodes"].append({"location": loc, "index": i, "importance": 1e-6 * (seed + 1)})
        data["node_data"][f"{loc}:{i}"] = examples[len(data["nodes"]) % len(examples)]
    data["k"] = len(data["nodes"])
    data["meta"] = {**data.get("meta", {}), "note": f"soak upload {seed}"}
    out.write_text(json.dumps(data))
    return out


def stop(proc: subprocess.Popen) -> None:
    """Stops the app: asked first, killed after 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_until_up(proc: subprocess.Popen, url: str, timeout_s: float = 300) -> None:
    """Returns once the app at `url` answers 200; exits naming the reason if it dies or stays silent."""
    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"app.py did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.2)


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(files, bytes) under a folder, every file counted."""
    files = [f for f in Path(folder).rglob("*") if f.is_file()] if Path(folder).exists() else []
    return len(files), sum(f.stat().st_size for f in files)


def soak(args) -> dict:
    """Clients on /next_tokens while browser pages prune and upload at once; RSS and disk along the way."""
    import tempfile

    import psutil
    from gradio_client import Client
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="csp_soak_"))
    store, gradio_tmp = work / "store", work / "gradio"
    shipped = ROOT / "modeling_csp" / "default_model" / "circuits" / "if_ternary.json"
    uploads = [large_circuit(shipped, work / f"upload_{i:02d}.json", args.upload_mb, i) for i in range(args.uploads)]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "CSP_APP_MODEL": args.model, "CSP_APP_STORE": str(store),
           "GRADIO_TEMP_DIR": str(gradio_tmp), "CSP_CACHE_DIR": str(work / "cache")}
    log = open(args.log, "w") if args.log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    app = psutil.Process(proc.pid)
    rss = lambda: round(app.memory_info().rss / 2**20)  # noqa: E731
    results: dict = {"model": args.model, "clients": args.clients, "api_calls": args.api_calls, "prunes": args.prunes,
                     "prune_steps": args.prune_steps, "uploads": args.uploads,
                     "upload_mb": round(sum(u.stat().st_size for u in uploads) / len(uploads) / 1e6, 1) if uploads else 0,
                     "load_start": round(os.getloadavg()[0], 1)}
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            wait_until_up(proc, url)
            client = Client(url, verbose=False)
            client.predict(prompt="import os\n", api_name="/next_tokens")
            pages = []
            for _ in range(1 + max(1, -(-args.uploads // max(1, args.prunes)))):
                pg = browser.new_page(viewport={"width": 1400, "height": 1000})
                pg.set_default_timeout(600_000)
                pg.goto(url)
                pg.wait_for_selector("#summary p")
                pages.append(pg)
            time.sleep(5)  # the app's warm-up in the background
            results["rss_idle_mb"] = rss()
            pruner, uploaders = pages[0], pages[1:]
            pruner.get_by_role("tab", name="Ablations & pruning").click()
            box = pruner.locator("#prune-steps input[type=number]")
            box.fill(str(args.prune_steps))
            box.press("Enter")
            task = pruner.locator("#prune-task input")
            task.click()
            task.fill(SOAK_TASK)
            pruner.locator(f"#prune-task [role=option][aria-label='{SOAK_TASK}']").click()
            for pg in uploaders:
                pg.get_by_role("tab", name="Share & files").click()

            done = threading.Event()
            calls = iter(range(args.api_calls))
            calls_lock = threading.Lock()
            api_times: list[float] = []

            def client_loop(i: int):
                try:  # a slow answer is no failure on a shared machine: 16 clients queue behind 4 workers
                    c = Client(url, verbose=False, httpx_kwargs={"timeout": 600})
                except Exception as exc:
                    errors.append(f"client {i} could not connect: {type(exc).__name__}: {str(exc)[:200]}")
                    return
                while not done.is_set():
                    with calls_lock:
                        n = next(calls, None)
                    if n is None:
                        return
                    t = time.perf_counter()
                    try:
                        out = c.predict(**MIXED_CALLS[n % len(MIXED_CALLS)], api_name="/next_tokens")
                        if not ("full" in out or "error" in out):
                            errors.append(f"/next_tokens answered {str(out)[:200]}")
                    except Exception as exc:
                        errors.append(f"/next_tokens raised {type(exc).__name__}: {str(exc)[:200]}")
                    api_times.append(time.perf_counter() - t)

            threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
            t_start = time.perf_counter()
            for th in threads:
                th.start()
            results["rss_after_prune_mb"] = []
            pending = list(uploads)
            for r in range(args.prunes):
                share = pending[: len(pending) // (args.prunes - r)] if r < args.prunes - 1 else pending
                pending = pending[len(share):]
                before = pruner.locator("#prune-md").inner_text()
                pruner.locator("#prune-run").click()  # the prune and this round's uploads, at once
                for pg, path in zip(uploaders, share):
                    pg.locator("#upload input[type=file]").set_input_files(str(path))
                pruner.wait_for_function(
                    "(b) => { const t = document.querySelector('#prune-md').innerText;"
                    " return t !== b && /reached|failed/.test(t); }", arg=before)
                message = pruner.locator("#prune-md").inner_text()
                if "failed" in message:
                    errors.append(f"prune {r + 1}: {message[:300]}")
                for pg, path in zip(uploaders, share):
                    pg.wait_for_function("(n) => { const t = document.querySelector('#upload-md').innerText;"
                                         " return t.includes(n) && (t.includes('✅') || t.includes('⚠️')); }", arg=path.name)
                    text = pg.locator("#upload-md").inner_text()
                    if "✅" not in text:
                        errors.append(f"upload {path.name}: {text[:300]}")
                results["rss_after_prune_mb"].append(rss())
                results["uploads_done"] = args.uploads - len(pending)
                if args.out:  # what a stopped soak has measured so far
                    write_json_atomic(args.out, {**results, "errors": errors}, indent=1)
            for th in threads:
                th.join()
            results["soak_s"] = round(time.perf_counter() - t_start, 1)
            results["api_median_ms"] = round(1000 * statistics.median(api_times), 1) if api_times else None
            results["api_done"] = len(api_times)
            browser.close()
        time.sleep(3)
        results["rss_end_mb"] = rss()
        first = results["rss_after_prune_mb"][0]
        results["rss_growth_after_first_prune_mb"] = results["rss_end_mb"] - first
        results["store_files"], results["store_bytes"] = folder_bytes(store)
        results["gradio_tmp_files"], results["gradio_tmp_bytes"] = folder_bytes(gradio_tmp)
        results["uploads_left"] = sum(1 for f in gradio_tmp.rglob("upload_*.json")) if gradio_tmp.exists() else 0
        results["errors"] = errors
        results["load_end"] = round(os.getloadavg()[0], 1)
    finally:
        stop(proc)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return results


def soak_lines(r: dict) -> list[str]:
    after = r["rss_after_prune_mb"]
    return [
        "## The app under a soak",
        "",
        f"`python scripts/benchmark_app.py --soak --clients {r['clients']} --prunes {r['prunes']} --uploads {r['uploads']} "
        f"--api-calls {r['api_calls']}`: `python app.py` with the model `{r['model']}`; {r['clients']} threads call "
        f"`/next_tokens` ({r['api_done']:,} mixed calls, median {r['api_median_ms']} ms) while one browser page prunes "
        f"{r['prunes']} times ({r['prune_steps']} steps each) and others upload {r['uploads']} distinct circuit files of "
        f"{r['upload_mb']} MB, each prune at the same time as its share of the uploads ({r['soak_s']} s in all). "
        f"Load average (1 min) {r['load_start']} at the start, {r['load_end']} at the end.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| RSS idle (after start and one call) | {r['rss_idle_mb']} MB | |",
        f"| RSS after the 1st prune | {after[0]} MB | |",
        f"| RSS after the 3rd prune | {after[min(2, len(after) - 1)]} MB | |",
        f"| RSS at the end vs after the 1st prune | {r['rss_end_mb']} MB ({r['rss_growth_after_first_prune_mb']:+} MB) | within 300 MB |",
        f"| failed calls, prunes and uploads | {len(r['errors'])} | 0 |",
        f"| run store on disk | {r['store_files']} files, {r['store_bytes'] / 1e6:.1f} MB | within its 500 MB cap |",
        f"| Gradio's upload folder | {r['gradio_tmp_files']} files, {r['gradio_tmp_bytes'] / 1e6:.1f} MB "
        f"({r['uploads_left']} uploads left) | no upload left |",
    ]


PREPARED_JS = """() => { const e = document.querySelector('#model-prep');
    return !!e && /✅|⚠️/.test(e.innerText); }"""


def app_env(args, port: int) -> dict:
    """The app's environment: the model (a folder: its parent as the allowed root), circuits to offer, and the
    cache folder (a fresh one unless --cache-dir names one)."""
    import tempfile

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "CSP_APP_MODEL": args.model}
    folder = Path(args.model).expanduser()
    if args.model != "default" and folder.is_dir():
        folder = folder.resolve()
        env.update(CSP_APP_MODEL=str(folder), CSP_MODEL_ROOTS=str(folder.parent))
    if args.imports:
        env["CSP_APP_IMPORT"] = args.imports
    if not args.cache_dir:
        args.cache_dir = tempfile.mkdtemp(prefix="csp_app_cache_")
    env["CSP_CACHE_DIR"] = str(args.cache_dir)
    return env


def open_page(p, args, proc, url: str, t_start: float, out: dict):
    """(browser, page) on the app once it answers, with `out` given the seconds since `t_start` until the server is
    up, the page ready, and the model's mean activations and node examples prepared (computed once, or read from
    the cache on a warm start), and the preparation's line."""
    browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(args.timeout * 1000)
    wait_until_up(proc, url)
    out["server_up_s"] = round(time.perf_counter() - t_start, 2)
    page.goto(url)
    page.wait_for_selector("#circuit-graph .js-plotly-plot .scatterlayer path.point")
    page.wait_for_function("() => window.__cspClickReady === true")
    out["page_ready_s"] = round(time.perf_counter() - t_start, 2)
    page.wait_for_function(PREPARED_JS)
    out["prepared_s"] = round(time.perf_counter() - t_start, 2)
    out["prepared"] = page.locator("#model-prep").inner_text().strip()
    return browser, page


def warm_start(args) -> dict:
    """A second start of the app on the cache the first one filled: its page ready and prepared times."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    t_start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=app_env(args, port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    out = {}
    try:
        with sync_playwright() as p:
            browser, _ = open_page(p, args, proc, url, t_start, out)
            browser.close()
    finally:
        stop(proc)
    return out


def task_names() -> list[str]:
    from modeling_csp.circuits.tasks import list_tasks

    return [t.name for t in list_tasks()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default",
                        help="model for CSP_APP_MODEL: 'default' (the embedded model) or a model folder (its parent "
                             "becomes CSP_MODEL_ROOTS)")
    parser.add_argument("--import", "--circuit", dest="imports", default="",
                        help="circuit files for CSP_APP_IMPORT (os.pathsep-separated), offered as runs")
    parser.add_argument("--cache-dir", help="CSP_CACHE_DIR of the app (mean activations, example index); default: a "
                                            "fresh empty folder, so the first start computes them (cold)")
    parser.add_argument("--warm", action="store_true",
                        help="also start the app a second time on the same cache and measure its page ready (warm)")
    parser.add_argument("--task", help="a task to pick for the task-selection latency (default: one without a run)")
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each interaction")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--benchmarks", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"),
                        help="markdown file whose app section is rewritten ('' for none)")
    parser.add_argument("--log", help="write the app's output here")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait after each measured interaction's follow-up events have finished")
    parser.add_argument("--api-calls", type=int, default=1000,
                        help="mixed /next_tokens calls for the memory check (0: none)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds any one wait in the browser may take")
    parser.add_argument("--soak", action="store_true", help="run the soak (RSS and disk under load) instead")
    parser.add_argument("--clients", type=int, default=16, help="soak: threads calling /next_tokens")
    parser.add_argument("--prunes", type=int, default=10, help="soak: prunes in the browser")
    parser.add_argument("--prune-steps", type=int, default=10, help="soak: mask training steps of each prune")
    parser.add_argument("--uploads", type=int, default=20, help="soak: distinct circuit files uploaded")
    parser.add_argument("--upload-mb", type=float, default=34.0, help="soak: size of each uploaded circuit file")
    args = parser.parse_args(argv)

    if args.soak:
        results = soak(args)
        print(dumps_strict(results, indent=1))
        lines = soak_lines(results)
        print("\n".join(lines))
        if args.out:
            write_json_atomic(args.out, results, indent=1)
        if args.benchmarks:
            write_section(Path(args.benchmarks), "app-soak", "\n".join(lines))
        return 0

    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = app_env(args, port)
    results: dict = {"model": args.model, "cache_dir": env["CSP_CACHE_DIR"]}
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    t_start = time.perf_counter()
    log = open(args.log, "w") if args.log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = RssSampler(proc.pid)
    sampler.start()
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, args, proc, url, t_start, results)
            # measure steady state: one k change, then wait for its follow-ups
            box = page.locator("#k-slider input[type=number]")
            box.fill(str(max(1, int(float(box.input_value())) - 1)))
            box.press("Tab")
            follow_ups_done(page)
            time.sleep(6)

            # layers: click each layer that has nodes, in turn
            layers = page.locator("#layer-select input").evaluate_all("(els) => els.map(e => e.value)")
            labels = page.locator("#layer-select label").evaluate_all("(els) => els.map(e => e.innerText)")
            with_nodes = [l for l, lab in zip(layers, labels) if not lab.strip().endswith(" 0 nodes")]
            times = []
            current = page.locator("#layer-select input:checked").get_attribute("value")
            for i in range(args.runs):
                target = [l for l in with_nodes if l != current][i % max(1, len(with_nodes) - 1)] if len(with_nodes) > 1 else current
                t = time.perf_counter()
                page.locator(f"#layer-select label:has(input[value='{target}'])").click()
                page.wait_for_function(
                    "(l) => { const d = document.querySelector('#circuit-graph .js-plotly-plot');"
                    " return d && d.layout && d.layout.title && d.layout.title.text.startsWith(l + ':'); }", arg=target)
                times.append(time.perf_counter() - t)
                current = target
                follow_ups_done(page)
                time.sleep(args.settle)
            results["select_layer"] = summarize(times)

            # nodes: click a point of the graph
            times = []
            for i in range(args.runs):
                before = header_node(page)
                pts = [q for q in node_points(page) if q["id"] != before]
                q = pts[i % len(pts)]
                page.mouse.move(q["x"] - 4, q["y"] - 4)
                page.mouse.move(q["x"], q["y"], steps=3)
                t = time.perf_counter()
                page.mouse.click(q["x"], q["y"])
                page.wait_for_function(GRAPH_SELECTED_JS, arg=q["id"])  # node panel and graph both updated
                times.append(time.perf_counter() - t)
                follow_ups_done(page)
                time.sleep(args.settle)
            results["select_node"] = summarize(times)

            # k: type into the slider's number box and leave it (the slider's release event)
            k_max = int(float(box.get_attribute("max") or box.input_value()))
            times = []
            for i in range(args.runs):
                k = max(1, int(k_max * (0.9 - 0.1 * i)))
                box.fill(str(k))
                t = time.perf_counter()
                box.press("Tab")
                page.wait_for_function("(k) => { const e = document.querySelector('#summary');"
                                       " return !!e && e.innerText.includes(k + ' of '); }", arg=k)
                page.wait_for_function(GRAPH_TITLE_JS)  # the graph of the new circuit is drawn
                times.append(time.perf_counter() - t)
                follow_ups_done(page)
                time.sleep(args.settle)
            results["select_k"] = summarize(times)

            # tasks: pick another task (its view: the task's runs, or "no circuit yet"), then back
            times = []
            first = page.locator("#task-select input").input_value()
            other = args.task or next(t for t in task_names() if t != first)
            for i in range(args.runs):
                target = other if i % 2 == 0 else first
                page.locator("#task-select input").click()
                page.locator("#task-select input").fill(target)
                option = page.locator(f"#task-select [role=option][aria-label='{target}']")
                option.wait_for()
                t = time.perf_counter()
                option.click()
                page.wait_for_function("(t) => { const e = document.querySelector('#summary');"
                                       " return !!e && e.innerText.includes(t) && !e.innerText.includes('updating'); }",
                                       arg=target)
                times.append(time.perf_counter() - t)
                page.wait_for_timeout(0)
                time.sleep(args.settle)
            results["select_task"] = summarize(times)
            browser.close()

        # /next_tokens through gradio_client
        from gradio_client import Client

        client = Client(url, verbose=False)
        client.predict(prompt="import os\n", api_name="/next_tokens")  # first call: connection set-up
        prompts = ['def f(x):\n    return x + "a', "for i in range(10):\n    print(i", "class A:\n    def __init__(self, x):\n        self.x ="]
        times = []
        for i in range(args.runs):
            t = time.perf_counter()
            out = client.predict(prompt=prompts[i % len(prompts)], api_name="/next_tokens")
            times.append(time.perf_counter() - t)
            assert "full" in out, out
        results["next_tokens"] = summarize(times)
        t = time.perf_counter()
        results["api_rss_mb"] = (mixed_calls(client, args.api_calls, lambda: sampler.proc.memory_info().rss)
                                 if args.api_calls else {})
        results["api_calls_s"] = round(time.perf_counter() - t, 1)
        time.sleep(0.2)
        results["rss_peak_mb"] = round(sampler.peak / 2**20)
        results["rss_end_mb"] = round(sampler.last / 2**20)
    finally:
        sampler.stop.set()
        stop(proc)

    if args.warm:
        results["warm"] = warm_start(args)
    print(dumps_strict(results, indent=1))
    lines = [
        "## The app",
        "",
        f"`python scripts/benchmark_app.py --runs {args.runs}`: `python app.py` with the model `{args.model or 'default'}` on",
        f"{os.cpu_count()} CPU cores, driven in headless chromium (Playwright); each interaction from the user's action",
        "until the page shows its result, median and max over the runs.",
        f"Load average (1 min) of the machine: {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| page ready after `python app.py` | {results['page_ready_s']} s | < 15 s |",
    ]
    lines.append(f"| mean activations and node examples ready (cold: computed once and cached) | "
                 f"{results['prepared_s']} s | |")
    if "warm" in results:
        lines.append(f"| page ready, second start on the same cache (warm) | {results['warm']['page_ready_s']} s; "
                     f"prepared at {results['warm']['prepared_s']} s | |")
    for key, name in (("select_layer", "select a layer"), ("select_node", "select a node (click)"),
                      ("select_k", "select k"), ("select_task", "select a task"),
                      ("next_tokens", "`/next_tokens` (gradio_client)")):
        r = results[key]
        lines.append(f"| {name} | median {r['median_ms']} ms, max {r['max_ms']} ms | < 500 ms |")
    lines.append(f"| memory (RSS) | peak {results['rss_peak_mb']} MB, end {results['rss_end_mb']} MB | < 1536 MB |")
    marks = results["api_rss_mb"]
    if marks:
        first100, last = marks.get(100, marks[min(marks)]), marks[max(marks)]
        results["api_rss_growth"] = round(last / first100 - 1, 4)
        lines.append(f"| RSS after {max(marks):,} mixed `/next_tokens` calls vs after 100 | {first100} MB → {last} MB "
                     f"({100 * results['api_rss_growth']:+.1f}%; {results['api_calls_s']} s for the calls) | within ±10% |")
    print("\n".join(lines))
    if args.out:
        write_json_atomic(args.out, results, indent=1)
    if args.benchmarks:
        write_section(Path(args.benchmarks), "app-benchmark", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
