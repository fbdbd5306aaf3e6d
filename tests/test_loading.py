"""`modeling_csp.loading.shipped_circuits`: a model folder's circuits, never a file outside it.

A model folder (from the hub, or any folder) comes with its own `circuits/index.json`; its paths are the model
author's and must not make the server read other files."""

import json
import shutil

from modeling_csp.loading import shipped_circuits


def test_index_paths_stay_inside_the_circuits_folder(converted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(converted["rms_sink_bigram"], folder)
    (tmp_path / "secret.json").write_text('{"format": "csp-circuit", "SECRET": 1}')
    circuits = folder / "circuits"
    circuits.mkdir()
    (circuits / "ok.json").write_text('{"format": "csp-circuit"}')
    (circuits / "sub").mkdir()
    (circuits / "sub" / "nested.json").write_text('{"format": "csp-circuit"}')
    (circuits / "notes.txt").write_text("not a circuit")
    entries = [{"task": "a", "k": 1, "path": "ok.json"}, {"task": "b", "k": 2, "path": "sub/nested.json"},
               {"task": "c", "k": 3, "path": "../../secret.json"}, {"task": "d", "k": 4, "path": "/etc/passwd"},
               {"task": "e", "k": 5, "path": str(tmp_path / "secret.json")}, {"task": "f", "k": 6, "path": "~/x.json"},
               {"task": "g", "k": 7, "path": "notes.txt"}, {"task": "h", "k": 8, "path": "missing.json"},
               {"task": "i", "k": 9, "path": 12}, {"task": "j", "k": 10, "path": "sub/../../../secret.json"}]
    (circuits / "index.json").write_text(json.dumps(entries))
    listed = shipped_circuits(str(folder))
    assert [(e["task"], e["path"]) for e in listed] == [("a", str(circuits / "ok.json")),
                                                        ("b", str(circuits / "sub" / "nested.json"))]


def test_a_huge_index_is_refused(converted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(converted["rms_sink_bigram"], folder)
    (folder / "circuits").mkdir()
    (folder / "circuits" / "index.json").write_text("[" + " " * 1_100_000 + "]")
    try:
        shipped_circuits(str(folder))
    except ValueError as exc:
        assert "larger than" in str(exc)
    else:
        raise AssertionError("a 1.1 MB index.json was read")
