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
