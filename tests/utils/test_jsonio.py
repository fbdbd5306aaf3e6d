"""Strict JSON out: what any JSON parser reads, written whole or not at all."""

import json
import math

import pytest

from modeling_csp.utils.jsonio import dumps_strict, loads_strict, write_json_atomic


def test_non_finite_floats_become_null_everywhere():
    obj = {"loss": float("nan"), "curve": [[0, float("inf")], (1, -float("inf"))], "ok": 0.5, "n": 3, "s": "NaN"}
    text = dumps_strict(obj)
    assert loads_strict(text) == {"loss": None, "curve": [[0, None], [1, None]], "ok": 0.5, "n": 3, "s": "NaN"}
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        json.dumps(float("nan"), allow_nan=False)  # what dumps_strict guards against


def test_the_strict_parser_refuses_what_json_dumps_writes_by_default():
    default = json.dumps({"loss": math.nan})
    assert default == '{"loss": NaN}'
    with pytest.raises(ValueError, match="bare NaN"):
        loads_strict(default)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "index.json"
    path.write_text("old")
    write_json_atomic(path, [{"k": 8, "loss": float("nan")}], indent=1)
    assert loads_strict(path.read_text()) == [{"k": 8, "loss": None}] and path.read_text().endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not json": object()})
    assert loads_strict(path.read_text()) == [{"k": 8, "loss": None}]  # a failed write keeps the old file
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]
