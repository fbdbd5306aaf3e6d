"""A short soak of the real app server (issue 19), in the normal suite: 8 clients on `/next_tokens` while a
browser page prunes and three others upload circuit files, all at once; then no call, prune or upload failed,
the server's memory came back (the prune runs in a worker process) and its disk did too (uploads deleted once
imported, the run store within its cap). It runs `scripts/benchmark_app.py --soak` at a small scale; the long
soak (16 clients, 10 prunes, 20 uploads of 34 MB) and its figures are in BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, tracebacks_through_project_code

pytestmark = pytest.mark.soak
RSS_BOUND_MB = 300  # the bound on what the server may keep after the load


def test_eight_clients_one_prune_three_uploads_at_once(tmp_path):
    from modeling_csp.explorer.runs import MAX_STORE_BYTES
    from modeling_csp.model.loading import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("no default model installed (modeling_csp/default_model)")
    out, log = tmp_path / "soak.json", PROJECT_ROOT / "tests" / "artifacts" / "soak_app.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "scripts/benchmark_app.py", "--soak", "--clients", "8", "--prunes", "1", "--uploads", "3",
         "--upload-mb", "10", "--api-calls", "160", "--prune-steps", "10", "--out", str(out), "--benchmarks", "",
         "--log", str(log)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    print(json.dumps(r, indent=1))  # the figures, shown when the test fails
    assert r["errors"] == [] and r["api_done"] == 160 and r["uploads_done"] == 3, r
    assert r["rss_end_mb"] - r["rss_idle_mb"] <= RSS_BOUND_MB, r  # the prune's memory went with its worker
    assert r["uploads_left"] == 0, r  # deleted once imported
    assert r["store_bytes"] <= MAX_STORE_BYTES and r["store_files"] <= 3 + 1, r
    # what stays in Gradio's folder is the share tab's download of each shown circuit (slimmer than the uploads;
    # Gradio's delete_cache removes it after an hour), not the uploads
    assert r["gradio_tmp_bytes"] < r["uploads"] * r["upload_mb"] * 1e6, r
    ours = tracebacks_through_project_code(Path(log).read_text())
    assert not ours, ours[0][-3000:]
