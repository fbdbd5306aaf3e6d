"""`modeling_csp.utils.tempfiles`: temporary files of killed writes are found and removed, writes in progress
never."""

from __future__ import annotations

import os
import time

from conftest import dead_pid
from modeling_csp.utils.tempfiles import GRACE_S, is_orphan_temp, remove_orphan_temps


def test_only_orphans_go(tmp_path):
    dead, old = dead_pid(), time.time() - 2 * GRACE_S
    orphans = [f".abc.json.tmp{dead}-1234", f"checkpoint.tmp{dead}", ".tmpk3j_x9aq"]
    kept = [f".abc.json.tmp{os.getpid()}-99",  # this process is writing it
            f"checkpoint.tmp{os.getppid()}",  # a live writer
            ".tmpabcd1234",  # tempfile's name, young: maybe in progress
            "abc.json", "model.safetensors", "tmp_notes.txt", "checkpoint.pt"]  # not temporary files
    for name in orphans + kept:
        (tmp_path / name).write_text("x")
    os.utime(tmp_path / ".tmpk3j_x9aq", (old, old))
    os.utime(tmp_path / "abc.json", (old, old))  # old, but no temporary file
    removed = remove_orphan_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(orphans)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    os.utime(tmp_path / f"checkpoint.tmp{os.getppid()}", (old, old))  # a live pid, but far too old to be writing
    assert is_orphan_temp(tmp_path / f"checkpoint.tmp{os.getppid()}")


def test_an_absent_folder_is_left_alone(tmp_path):
    assert remove_orphan_temps(tmp_path / "nothing") == []
