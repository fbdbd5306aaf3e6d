"""Strict JSON out: what any JSON parser reads, written whole or not at all."""

import json
import math
import os
from pathlib import Path

import pytest

from modeling_csp.utils.jsonio import atomic_open, dumps_strict, loads_strict, write_json_atomic


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


# ---- atomic files: a killed writer leaves the old file or the new one, never part of one ----------------------

def two_circuits():
    """The test circuit (imported from the original visualizer's file) in two versions that differ."""
    from conftest import FIXTURES
    from modeling_csp.circuits.viz_import import import_viz_data

    circuits = [import_viz_data(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt") for _ in range(2)]
    circuits[1].meta["version"] = 1
    return circuits


def write_every_output(folder, version: int, circuits) -> None:
    """One round of the toolkit's writers at `version` (0 or 1): a circuit file (what `csp prune --out` and
    `csp import-viz` write, through CircuitGraph.save), a model folder (safetensors, config, remote code, tokenizer,
    card), a loss-curve SVG and a JSON index, each large enough that a kill often lands inside a write."""
    from pathlib import Path

    import torch

    from modeling_csp import CSPConfig, CSPForCausalLM
    from modeling_csp.model.loading import DEFAULT_MODEL_DIR
    from modeling_csp.model.saving import save_model_folder
    from modeling_csp.training.train import write_curve_svg

    folder = Path(folder)
    circuits[version].save(folder / "circuit.json")
    torch.manual_seed(version)
    model = CSPForCausalLM(CSPConfig(block_size=64, vocab_size=2048, n_layer=1, n_head=2, d_head=16, d_model=32,
                                     d_mlp=64, tied_unembed=False))
    save_model_folder(model, folder / "model", tokenizer_json_dir=DEFAULT_MODEL_DIR, name="tiny")
    curve = [{"tokens": i, "train_loss": 3 + version + 1 / (i + 1), "val_loss": 3 + 1 / (i + 2)} for i in range(30000)]
    write_curve_svg(curve, folder / "loss_curve.svg")
    write_json_atomic(folder / "index.json", [{"k": i, "loss": version + i / 7} for i in range(50000)])


def write_until_killed(folder, circuits, started) -> None:
    import sys

    sys.stderr = open(os.devnull, "w")  # progress bars
    started.set()
    while True:
        for version in (1, 0):
            write_every_output(folder, version, circuits)


def _files(folder):
    """{relative path: content} of the outputs in `folder`, not the temporary files a killed writer leaves."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def test_writers_killed_at_random_points_never_leave_a_truncated_file(tmp_path):
    """20 writer processes, each killed (SIGKILL) at a random moment while it rewrites every output over and over
    (versions 1, 0, 1, ... over version 0): each file is then whole, either version, never a truncated one."""
    import multiprocessing
    import random
    import shutil
    import time

    import torch

    torch.set_num_threads(1)
    circuits, expected = two_circuits(), []
    for version in (0, 1):
        start = time.perf_counter()
        write_every_output(tmp_path / f"expected{version}", version, circuits)
        round_s = time.perf_counter() - start
        expected.append(_files(tmp_path / f"expected{version}"))
    assert expected[0].keys() == expected[1].keys() and len(expected[0]) >= 10
    assert all(expected[0][f] != expected[1][f] for f in (Path("circuit.json"), Path("model/model.safetensors")))
    context = multiprocessing.get_context("forkserver")  # imports once, then forks a fresh writer per try
    context.set_forkserver_preload(["torch", "modeling_csp.model.saving", "modeling_csp.training.train", "test_jsonio"])
    rng = random.Random(0)
    for attempt in range(20):
        folder = tmp_path / f"try{attempt}"
        shutil.copytree(tmp_path / "expected0", folder)
        started = context.Event()
        writer = context.Process(target=write_until_killed, args=(folder, circuits, started))
        writer.start()
        assert started.wait(300), "the writer did not start"
        time.sleep(rng.uniform(0, 2 * round_s))
        writer.kill()
        writer.join()
        found = _files(folder)
        assert found.keys() == expected[0].keys()
        for name, content in found.items():
            assert content in (expected[0][name], expected[1][name]), f"try {attempt}: {name} is truncated"


def test_files_written_get_the_mode_the_umask_gives(tmp_path):
    """Under umask 022 every file is rw-r--r-- (mkstemp's 0600 is not left on them), model.safetensors included;
    under 077, rw-------."""
    from conversion.convert_checkpoint import convert_checkpoint
    from conftest import FIXTURES

    circuits = two_circuits()
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            folder = tmp_path / oct(umask)
            write_every_output(folder, 0, circuits)
            convert_checkpoint(str(FIXTURES / "ln_gpt2"), folder / "converted")
        finally:
            os.umask(old)
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert {"model.safetensors", "config.json", "circuit.json", "loss_curve.svg"} <= {p.name for p in files}
        assert {str(p.relative_to(folder)): oct(p.stat().st_mode & 0o777) for p in files} == {
            str(p.relative_to(folder)): oct(mode) for p in files}


def test_atomic_open_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.bin"]
    with atomic_open(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["state.bin"]
