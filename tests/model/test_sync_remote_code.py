"""scripts/sync_remote_code.py: the shipped model folder's remote code is a copy of modeling_csp/model/'s, kept
in step by the script (CI runs `--check`)."""

import shutil
import subprocess
import sys

from conftest import PROJECT_ROOT

REMOTE_CODE = ("modeling_csp.py", "configuration_csp.py")


def sync(root, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "scripts" / "sync_remote_code.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_check_names_a_stale_copy_and_a_sync_refreshes_it(tmp_path):
    """On a copy of the layout (the script finds the package beside its own folder), so the checkout is untouched."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(PROJECT_ROOT / "scripts" / "sync_remote_code.py", tmp_path / "scripts")
    for folder in ("model", "default_model"):
        (tmp_path / "modeling_csp" / folder).mkdir(parents=True)
        for name in REMOTE_CODE:
            shutil.copy(PROJECT_ROOT / "modeling_csp" / folder / name, tmp_path / "modeling_csp" / folder / name)
    assert sync(tmp_path, "--check").returncode == 0
    original = tmp_path / "modeling_csp" / "model" / "configuration_csp.py"
    original.write_text(original.read_text() + "\n# an edit of the original\n")
    check = sync(tmp_path, "--check")
    copy = tmp_path / "modeling_csp" / "default_model" / "configuration_csp.py"
    assert check.returncode == 1 and check.stderr.count("\n") == 1, check.stderr
    assert f"{copy} differs from {original}" in check.stderr and "an edit" not in copy.read_text()
    assert sync(tmp_path).returncode == 0
    assert copy.read_bytes() == original.read_bytes() and sync(tmp_path, "--check").returncode == 0
    assert sorted(p.name for p in copy.parent.iterdir()) == sorted(REMOTE_CODE)  # no temp file left behind

