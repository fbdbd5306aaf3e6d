"""Shared test helpers: where the reference fixtures are, and converted copies of them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
CHECKPOINTS = ["ln_gpt2", "rms_sink_bigram", "catpos_relu_bf16"]
TOKENIZER_FIXTURE = FIXTURES / "tokenizer_tinypython_like"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    if not FIXTURES.is_dir():
        raise pytest.UsageError(f"reference fixtures not found at {FIXTURES}: put shared/ beside the project root")


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Converts each fixture checkpoint once per session: name -> converted folder."""
    from conversion.convert_checkpoint import convert_checkpoint

    root = tmp_path_factory.mktemp("converted")
    return {
        name: convert_checkpoint(str(FIXTURES / name), root / name, tokenizer_dir=str(TOKENIZER_FIXTURE))
        for name in CHECKPOINTS
    }


def run_outside_project(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter where this project is not importable (as a hub user would)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"), PYTHONNOUSERSITE="1")
    guard = (  # block the project's top-level packages even if it is pip-installed
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('modeling_csp', 'conversion'):\n"
        "            raise ImportError(f'{name} is blocked: remote code must not need the project')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", guard + code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result
