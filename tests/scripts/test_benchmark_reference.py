"""scripts/benchmark_reference.py: the port against OpenAI's own code. The full run needs a checkout of
github.com/openai/circuit_sparsity at $CSP_REFERENCE_PATH (never part of this project)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "benchmark_reference.py"
REFERENCE = os.environ.get("CSP_REFERENCE_PATH")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_refuses_a_path_without_openais_code(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    result = run_script("--reference", str(tmp_path), "--runs", "1", "--shape", "tiny", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (f"error: {tmp_path} does not hold OpenAI's circuit_sparsity (no circuit_sparsity/inference/gpt.py); pass "
         "--reference the root of a checkout of github.com/openai/circuit_sparsity")]
    assert not out.exists()


@pytest.mark.skipif(not REFERENCE or not (Path(REFERENCE) / "circuit_sparsity" / "inference" / "gpt.py").is_file(),
                    reason="set CSP_REFERENCE_PATH to a checkout of github.com/openai/circuit_sparsity to run the "
                           "port against OpenAI's code")
def test_tiny_run_agrees_with_the_reference_and_writes_its_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    result = run_script("--reference", REFERENCE, "--runs", "1", "--shape", "tiny", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    doc = out.read_text()
    assert doc.startswith("# Benchmarks\n\nkept text\n")
    section = doc.split("<!-- reference-benchmark:start -->", 1)[1].split("<!-- reference-benchmark:end -->", 1)[0]
    assert "Same tokens: yes." in section
    assert "Machine: " in section and "1 torch threads" in section
    diff = float(section.split("Max abs logit difference ", 1)[1].split(" ", 1)[0])
    assert diff <= 1e-4
    rows = [line for line in section.splitlines() if line.startswith("| port ")]
    assert len(rows) == 2  # forward and generation, each with its ratio to the reference
