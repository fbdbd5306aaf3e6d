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


def test_what_a_killed_atomic_write_leaves_is_removed(tmp_path):
    """The names `atomic_path` and `save_model_folder` really use: a file and a staging folder of a dead writer."""
    import subprocess
    import sys

    (tmp_path / "circuit.json").write_text("old")
    (tmp_path / "model").mkdir()
    writer = ("import os, sys, tempfile\n"
              "from modeling_csp.utils.jsonio import atomic_path\n"
              "with atomic_path(sys.argv[1] + '/circuit.json') as tmp:\n"
              "    tmp.write_text('half')\n"
              "    tempfile.mkdtemp(dir=sys.argv[1] + '/model', prefix=f'.save.tmp{os.getpid()}-')\n"
              "    os._exit(0)  # killed before the rename\n")
    subprocess.run([sys.executable, "-c", writer, str(tmp_path)], check=True, cwd=os.getcwd())
    left = [p for p in tmp_path.iterdir() if p.name != "circuit.json" and p.name != "model"]
    assert len(left) == 1 and left[0].name.startswith(".circuit.json.tmp")
    assert remove_orphan_temps(tmp_path) == left and remove_orphan_temps(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["circuit.json", "model"]
    assert list((tmp_path / "model").iterdir()) == [] and (tmp_path / "circuit.json").read_text() == "old"
