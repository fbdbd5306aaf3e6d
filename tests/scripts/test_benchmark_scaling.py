"""scripts/benchmark_scaling.py: the scaling table, measured on the default row with prune and app skipped."""

import importlib.util
import json
import subprocess
import sys

from conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "benchmark_scaling.py"
spec = importlib.util.spec_from_file_location("benchmark_scaling", SCRIPT)
benchmark_scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark_scaling)


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=600)


def test_the_default_row_fills_its_section_between_the_markers(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept above\n")
    result = run_script("--rows", "default", "--skip", "prune,app", "--runs", "1", "--cache", tmp_path / "cache",
                        "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = out.read_text()
    assert doc.startswith("# Benchmarks\n\nkept above\n")
    section = doc.split("<!-- scaling-benchmark:start -->", 1)[1].split("<!-- scaling-benchmark:end -->", 1)[0]
    assert "cores, torch " in section and "load average" in section
    row = next(line for line in section.splitlines() if line.startswith("| default |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "5.5M"  # the shipped model's parameters
    load_s = float(cells[3])
    rss_after_load, load_peak = (int(x) for x in cells[4].split(" / "))
    assert 0 < load_s < 60 and 100 < rss_after_load < 1.05 * load_peak  # ru_maxrss and VmRSS count a little apart
    assert cells[5] == "128"  # its context is shorter than the 256 tokens asked
    sparse_s, dense_s = (float(x) for x in cells[6].split(" / "))
    assert 0 < sparse_s < 10 and 0 < dense_s < 10
    tok_sparse, tok_dense = (float(x) for x in cells[8].split(" / "))
    assert tok_sparse > 1 and tok_dense > 1
    assert cells[9] == "skipped" and cells[11] == "skipped"
    results = json.loads((tmp_path / "cache" / "scaling_results.json").read_text())
    assert results["default"]["nnz"] < results["default"]["params"]
    assert results["default"]["forward_sparse_peak_mb"] > 0.95 * rss_after_load


def test_an_unknown_row_or_column_exits_2_with_one_line(tmp_path, capsys):
    for args, message in ((("--rows", "default,x3"), "unknown row x3; choose from default, x4,"),
                          (("--skip", "load"), "unknown column to skip load; choose from prune, app"),
                          (("--prune-rows", "yolo9"), "unknown prune row yolo9")):
        assert benchmark_scaling.main([*args, "--cache", str(tmp_path), "--out", str(tmp_path / "B.md")]) == 2
        stderr = capsys.readouterr().err
        assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "B.md").exists()


def test_a_rerun_that_skips_prune_and_app_keeps_their_earlier_figures(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    earlier = {"prune_s": 12.3, "prune_k": 7, "prune_peak_mb": 999, "prune_timings": {"training": 9.0},
               "page_ready_s": 4.5, "selection_ms": 321, "selection_kind": "task", "forward_sparse": -1.0}
    (cache / "scaling_results.json").write_text(json.dumps({"default": earlier}))
    result = run_script("--rows", "default", "--skip", "prune,app", "--runs", "1", "--cache", cache,
                        "--out", tmp_path / "B.md")
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads((cache / "scaling_results.json").read_text())["default"]
    kept = {k: v for k, v in earlier.items() if k != "forward_sparse"}
    assert {k: row[k] for k in kept} == kept
    assert row["forward_sparse"] > 0  # measured again, not kept
    line = next(x for x in (tmp_path / "B.md").read_text().splitlines() if x.startswith("| default |"))
    assert "| 12.3, 7 nodes (training 9) | 999 | 4.5 | 321 (task) |" in line


def test_a_childs_peak_memory_is_its_own_not_the_parents(tmp_path):
    """wait4's ru_maxrss of a vfork-started child carries the parent's peak over exec; the table must not."""
    ballast = bytearray(600 * 2**20)  # this process's peak: at least 600 MB
    ballast[::4096] = b"x" * len(ballast[::4096])
    child = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1)"
    code, _, _, peak = benchmark_scaling.run_child([sys.executable, "-c", child])
    del ballast
    assert code == 0 and 200 <= peak < 450, peak
