"""The converter's output format and its refusal of bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import FIXTURES, PROJECT_ROOT
from conversion.convert_checkpoint import ConversionError, check_memory, convert_checkpoint, load_original
from modeling_csp import CSPConfig, CSPForCausalLM
from modeling_csp.model.modeling_csp import decode_uint


def copy_fixture(name, tmp_path):
    return shutil.copytree(FIXTURES / name, tmp_path / name)


def test_bfloat16_values_are_kept_exactly(converted):
    original = torch.load(FIXTURES / "catpos_relu_bf16" / "final_model.pt", weights_only=True)
    with safe_open(converted["catpos_relu_bf16"] / "model.safetensors", "pt") as f:
        values = f.get_tensor("transformer.h.0.attn.c_attn.weight.sparse_values")
        indices = f.get_tensor("transformer.h.0.attn.c_attn.weight.sparse_indices")
    assert values.dtype == torch.bfloat16 and indices.dtype == torch.uint8 and indices.shape[1] == 4
    dense = original["transformer.h.0.attn.c_attn.weight"].flatten()
    assert torch.equal(dense[decode_uint(indices, "indices")], values)
    assert int(dense.count_nonzero()) == values.numel()


def test_config_keeps_training_only_keys(converted):
    config = json.loads((converted["rms_sink_bigram"] / "config.json").read_text())
    assert config["pfrac"] == 0.0625 and config["sparse_matmul_impl"] == "torch"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_csp.CSPForCausalLM"
    assert (converted["rms_sink_bigram"] / "tokenizer.json").exists()
    assert "max_length" not in json.loads((converted["rms_sink_bigram"] / "generation_config.json").read_text())
    assert "rms_sink_bigram" in (converted["rms_sink_bigram"] / "README.md").read_text()


def test_sparse_file_is_a_tenth_of_the_dense_checkpoint(tmp_path):
    config = CSPConfig(block_size=64, vocab_size=512, n_layer=2, n_head=4, d_model=128, rms_norm=True, bias=False,
                       ln_bias=False, tied_unembed=False)
    model = CSPForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:  # keep 3% of each weight matrix, as a weight-sparse model does
                p.mul_(torch.rand(p.shape, generator=generator) < 0.03)
    src = tmp_path / "orig"
    src.mkdir()
    torch.save(model.state_dict(), src / "final_model.pt")
    (src / "beeg_config.json").write_text(json.dumps({k: getattr(config, k) for k in
        ["block_size", "vocab_size", "n_layer", "n_head", "d_model", "rms_norm", "bias", "ln_bias", "tied_unembed"]}))
    out = convert_checkpoint(str(src), tmp_path / "out")
    assert (out / "model.safetensors").stat().st_size <= (src / "final_model.pt").stat().st_size / 10
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(0, 512, (2, 64), generator=generator)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


def test_save_and_reload_round_trip(converted, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(converted["rms_sink_bigram"], trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with safe_open(tmp_path / "again" / "model.safetensors", "pt") as f:
        assert not any(k.endswith(".weight") for k in f.keys())  # every weight stays stored sparse


def test_device_map_with_disk_offload_gives_the_same_logits(converted, tmp_path):
    folder = converted["rms_sink_bigram"]
    ids = torch.arange(40).view(1, 40) % 512
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    split = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, device_map="auto", max_memory={"cpu": "1500KB"},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    assert "disk" in set(split.hf_device_map.values()) and "cpu" in set(split.hf_device_map.values())
    with torch.no_grad():
        assert (split(ids).logits - model(ids).logits).abs().max() <= 1e-6


def test_state_dict_tensors_are_all_accounted_for():
    model = load_original(FIXTURES / "ln_gpt2")  # carries attn.bias masks, no final_logits_bias
    assert torch.equal(model.final_logits_bias, torch.zeros(model.config.vocab_size))
    assert model.transformer.wte.weight is model.lm_head.weight


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / "beeg_config.json").unlink(), "beeg_config.json: file not found"),
        (lambda d: (d / "final_model.pt").unlink(), "final_model.pt: file not found"),
        (lambda d: (d / "beeg_config.json").write_text("{not json"), "beeg_config.json: not valid JSON"),
        (lambda d: _edit_config(d, frobnicate=3), "unknown key(s) ['frobnicate']"),
        (lambda d: _edit_config(d, activation_type="swish"), "activation_type='swish'"),
        (lambda d: _edit_state(d, lambda sd: sd.pop("transformer.h.0.mlp.c_fc.weight")), "missing tensor(s)"),
        (lambda d: _edit_state(d, lambda sd: sd.update(extra=torch.zeros(2))), "unexpected tensor(s) extra"),
        (lambda d: _edit_state(d, lambda sd: sd.update({"transformer.wpe.weight": torch.zeros(3, 3)})), "has shape (3, 3)"),
        (lambda d: _edit_state(d, lambda sd: sd["transformer.h.1.attn.c_proj.weight"].fill_(float("nan"))), "NaN"),
        (lambda d: torch.save({"model": object()}, d / "final_model.pt", _use_new_zipfile_serialization=True), "weights-only"),
        (lambda d: _edit_config(d, n_head=0), "n_head=0 must be a positive integer"),
        (lambda d: _edit_config(d, d_pos_emb=-3), "d_pos_emb=-3 must be null or a positive integer"),
        (lambda d: _edit_config(d, n_layer=1000), "n_layer=1000 but the checkpoint has 3 layers"),
        (lambda d: _edit_config(d, n_layer=10**6), "n_layer=1,000,000 is more than the limit of 1,024"),
        (lambda d: _edit_config(d, d_model=128), "has shape (512, 64), the config expects (512, 128)"),
        (lambda d: _edit_config(d, d_model=2**30, d_head=2**26), "d_model=1,073,741,824 is more than the limit of 65,536"),
    ],
)
def test_bad_input_is_a_clear_error(corrupt, message, tmp_path):
    src = copy_fixture("rms_sink_bigram", tmp_path)
    corrupt(src)
    with pytest.raises(ConversionError, match=None) as error:
        convert_checkpoint(str(src), tmp_path / "out")
    assert message in str(error.value)


def test_output_folder_problems_are_clear_errors(tmp_path):
    src = FIXTURES / "rms_sink_bigram"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConversionError, match="exists and is not a folder"):
        convert_checkpoint(str(src), tmp_path / "a_file")
    with pytest.raises(ConversionError, match="cannot create the output folder"):
        convert_checkpoint(str(src), tmp_path / "a_file" / "below")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    from conftest import TOKENIZER_FIXTURE

    with pytest.raises(ConversionError, match="tokenizer has ids up to 2047 but the model's vocab_size is 512"):
        convert_checkpoint(str(FIXTURES / "rms_sink_bigram"), tmp_path / "out", tokenizer_dir=str(TOKENIZER_FIXTURE))


def test_a_model_too_big_for_memory_is_refused_before_allocating():
    huge = CSPConfig(vocab_size=10**6, d_model=2**16, n_head=1, n_layer=1, d_mlp=8)
    with pytest.raises(ConversionError, match=r"beeg_config.json: the model needs about .* GiB .* but only .* is available"):
        check_memory(huge, "beeg_config.json")


def test_works_from_a_non_editable_install(tmp_path):
    """`pip install .` (not -e) must carry everything the converter reads, the model-card template included."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(PROJECT_ROOT)], check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    code = ("import conversion, sys; assert conversion.__file__.startswith(sys.argv[1]), conversion.__file__; "
            "from conversion.convert_checkpoint import main; sys.exit(main(sys.argv[2:]))")
    result = subprocess.run([sys.executable, "-c", code, str(target), str(FIXTURES / "rms_sink_bigram"), str(tmp_path / "out")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rms_sink_bigram" in (tmp_path / "out" / "README.md").read_text()


def _edit_config(folder, **changes):
    config = json.loads((folder / "beeg_config.json").read_text())
    config.update(changes)
    (folder / "beeg_config.json").write_text(json.dumps(config))


def _edit_state(folder, edit):
    state = torch.load(folder / "final_model.pt", weights_only=True)
    edit(state)
    torch.save(state, folder / "final_model.pt")


@pytest.mark.parametrize("case", ["no source", "dst is a file", "n_head=0", "tokenizer too large"])
def test_cli_reports_one_line_errors(case, tmp_path):
    from conftest import TOKENIZER_FIXTURE

    src, dst, extra = FIXTURES / "rms_sink_bigram", tmp_path / "out", []
    if case == "no source":
        src = tmp_path / "nowhere"
    elif case == "dst is a file":
        dst.write_text("x")
    elif case == "n_head=0":
        src = copy_fixture("rms_sink_bigram", tmp_path)
        _edit_config(src, n_head=0)
    else:
        extra = ["--tokenizer-dir", str(TOKENIZER_FIXTURE)]
    result = subprocess.run([sys.executable, "-m", "conversion.convert_checkpoint", str(src), str(dst), *extra],
                            cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("vocab_size, message", [
    (10**11, "Invalid CSPConfig: vocab_size=100,000,000,000 is more than the limit of 1,048,576"),  # was a traceback
    (1e11, "Invalid CSPConfig: vocab_size=100000000000.0 must be a positive integer"),
])
def test_a_config_declaring_a_huge_vocabulary_is_one_line_naming_the_file(tmp_path, capsys, vocab_size, message):
    from conversion.convert_checkpoint import main

    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "ln_gpt2", src)
    config = json.loads((src / "beeg_config.json").read_text())
    (src / "beeg_config.json").write_text(json.dumps({**config, "vocab_size": vocab_size}))
    assert main([str(src), str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [f"error: {src / 'beeg_config.json'}: {message}"]
