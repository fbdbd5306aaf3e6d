"""The examples run as a user runs them, and show what they claim."""

import re
import subprocess
import sys

from conftest import PROJECT_ROOT


def test_the_circuit_walkthrough():
    result = subprocess.run([sys.executable, "examples/circuit_walkthrough.py"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"layer \d head \d+: the last position attends to '[^']*[\[{][^']*' at position", out), out  # the opening bracket
    full, alone, without = map(float, re.search(
        r"full model (-?[\d.]+), circuit alone (-?[\d.]+), circuit without \S+ (-?[\d.]+)", out).groups())
    assert alone > 1 and without < alone  # the circuit does the task; its top node matters
    shared = int(re.search(r"the top \d+ nodes share (\d+) with the pruned circuit", out).group(1))
    assert shared > 0


def test_the_readmes_csp_check_example_passes_under_pytest(tmp_path):
    """The README's pytest example for `csp check`, copied out of the README and run as a user's test file."""
    import os

    readme = (PROJECT_ROOT / "README.md").read_text()
    code = re.search(r"<!-- csp check example -->\n```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "test_circuit_holds.py").write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CSP_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
