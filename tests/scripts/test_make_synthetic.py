"""scripts/make_synthetic.py: model folders of the released shapes with random sparse weights."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import PROJECT_ROOT
from modeling_csp.model.saving import weight_density

SCRIPT = PROJECT_ROOT / "scripts" / "make_synthetic.py"
spec = importlib.util.spec_from_file_location("make_synthetic", SCRIPT)
make_synthetic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_synthetic)


def run_script(capsys, *args) -> tuple[int, str, str]:
    """The script's exit status, stdout and stderr, run as `python scripts/make_synthetic.py ARGS` would."""
    status = make_synthetic.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("shape, millions", [
    ("default", 5.5), ("default_x4", 22.1), ("default_x16", 84.0), ("csp_sweep1", 11.6),
    ("csp_yolo1", 110.1),  # the release says 118M; its config is not published (see the script)
    ("csp_yolo2", 475.8),  # the release says 475M
])
def test_every_shape_has_its_parameter_count(shape, millions):
    config = make_synthetic.shape_config(shape)
    assert config.vocab_size == 2048 and config.rms_norm and config.sink and config.enable_bigram_table
    assert config.afrac == 0.25 and config.n_head * config.d_head == config.d_model
    assert make_synthetic.parameter_count(config) / 1e6 == pytest.approx(millions, abs=0.05)


def test_the_default_shape_is_the_default_models_config():
    shipped = json.loads((PROJECT_ROOT / "modeling_csp" / "default_model" / "config.json").read_text())
    config = make_synthetic.shape_config("default").to_dict()
    for key in ("n_layer", "d_model", "n_head", "d_head", "d_mlp", "block_size", "vocab_size", "rms_norm", "sink",
                "afrac", "bias", "enable_bigram_table", "learnable_bigram_table", "tie_word_embeddings"):
        assert config[key] == shipped[key], key


def test_csp_yolo1_is_the_shape_issue_21_measured():
    c = make_synthetic.shape_config("csp_yolo1")
    assert (c.n_layer, c.d_model, c.n_head, c.d_head, c.d_mlp, c.block_size) == (8, 1024, 16, 64, 4096, 1024)


def test_a_written_folder_loads_runs_and_has_the_density_asked(tmp_path, capsys):
    out = tmp_path / "synthetic"
    status, stdout, stderr = run_script(capsys, "default", out, "--density", "0.02", "--seed", "3")
    assert status == 0, stderr
    assert "5.5M parameters at 2% density" in stdout
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert weight_density(model) == pytest.approx(0.02, rel=0.01)
    assert model.bigram_table.count_nonzero() / model.bigram_table.numel() == pytest.approx(0.02, rel=0.01)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape == (1, 5, 2048) and torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.1  # unit-gain weights: logits large enough to prefer one token
    assert (out / "tokenizer.json").read_bytes() == (make_synthetic.DEFAULT_MODEL / "tokenizer.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name != "synthetic"]  # the temp folder was renamed


@pytest.mark.parametrize("args, message", [
    (("csp_yolo3",), "unknown shape 'csp_yolo3'; choose one of default,"),
    (("default", "--density", "0"), "density 0.0 is outside (0, 1]"),
    (("default", "--density", "1.5"), "density 1.5 is outside (0, 1]"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    status, _, stderr = run_script(capsys, args[0], tmp_path / "out", *args[1:])
    assert status == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_existing_output_folder_is_refused(tmp_path, capsys):
    status, _, stderr = run_script(capsys, "default", tmp_path)
    assert status == 2 and "already exists" in stderr
