"""Temporary files that killed writes leave behind, and their removal.

Every file this toolkit writes goes to a temporary file in the same folder first (`jsonio.atomic_path`:
`.<name>.tmp<pid>-XXXXXXXX`; `save_model_folder` stages in a folder `.save.tmp<pid>-XXXXXXXX`; older writers:
`<name>.tmp<pid>`; `tempfile` names: `.tmpXXXXXXXX` or `tmpXXXXXXXX`). A writer killed before its rename leaves that file for good, so the folders that collect them
(the app's run store, model folders, training runs) call `remove_orphan_temps` when a process starts using them
and when a run ends. A file is an orphan when the process named in it is gone, or, when no live writer can be
told from its name, when it is older than a grace period (a write in progress is never that slow).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

GRACE_S = 3600.0  # a temporary file older than this is no write in progress
WITH_PID = re.compile(r"\.tmp(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$")  # <name>.tmp<pid>[-<random or thread>]
WITHOUT_PID = re.compile(r"^\.?tmp[A-Za-z0-9_]{6,}(?:\.[A-Za-z0-9]+)?$")  # tempfile's names


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs now (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def is_orphan_temp(path: Path, now: float | None = None, grace_s: float = GRACE_S) -> bool:
    """Whether `path` is a temporary file of a write that will never finish."""
    name = path.name
    match = WITH_PID.search(name)
    if match is None and not WITHOUT_PID.match(name):
        return False
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    if age > grace_s:
        return True
    if match is None:
        return False
    pid = int(match.group("pid"))
    return pid != os.getpid() and not pid_alive(pid)


def remove_orphan_temps(folder: str | Path, grace_s: float = GRACE_S) -> list[Path]:
    """Removes the orphaned temporary files directly in `folder`; returns what it removed (never raises: a
    folder that is absent or read-only is left as it is)."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    now = time.time()
    for path in entries:
        try:
            if path.is_symlink() or not is_orphan_temp(path, now, grace_s):
                continue
            if path.is_dir():  # a staging folder (save_model_folder)
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed


__all__ = ["GRACE_S", "pid_alive", "is_orphan_temp", "remove_orphan_temps"]
