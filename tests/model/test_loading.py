"""Loading a model folder: every weight format checked the same way, and a folder's circuits, never a file outside it.

A model folder (from the hub, or any folder) may hold `model.safetensors`, its shards, or PyTorch `.bin` files (one or
sharded); each goes through `check_weight_files` whichever loader reads it. It comes with its own
`circuits/index.json`; its paths are the model author's and must not make the server read other files."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import PROJECT_ROOT
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from modeling_csp import CSPForCausalLM
from modeling_csp.model.loading import load_model_and_tokenizer, shipped_circuits


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


# ---- strict loading of every weight format -------------------------------------------------------------------

SINK = "transformer.h.0.attn.attn_imp.sink_logit"


def _without_weights(converted_folder, dst):
    """The converted folder (config, remote code, tokenizer) with no weight file."""
    shutil.copytree(converted_folder, dst)
    (dst / "model.safetensors").unlink()
    return dst


def _save_shards(tensors: dict, folder, stem: str, suffix: str, save, n_shards: int = 3):
    """Writes `tensors` as `n_shards` files plus the index transformers reads (a tensor's sparse parts stay together)."""
    bases = sorted({key.rsplit(".", 1)[0] if key.rsplit(".", 1)[-1].startswith("sparse_") else key for key in tensors})
    weight_map = {}
    for i in range(n_shards):
        shard = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{suffix}"
        mine = set(bases[i::n_shards])
        part = {k: v for k, v in tensors.items() if k in mine or k.rsplit(".", 1)[0] in mine}
        save(part, folder / shard)
        weight_map |= dict.fromkeys(part, shard)
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_bin(folder, dense: dict, sparse: dict):
    torch.save(dense, folder / "pytorch_model.bin")


def write_sparse_bin(folder, dense: dict, sparse: dict):
    torch.save(sparse, folder / "pytorch_model.bin")  # the sparse parts of model.safetensors, pickled


def write_sharded_bin(folder, dense: dict, sparse: dict):
    _save_shards(dense, folder, "pytorch_model", "bin", torch.save)


def write_sharded_safetensors(folder, dense: dict, sparse: dict):
    _save_shards(sparse, folder, "model", "safetensors", lambda t, f: save_file(t, f, metadata={"format": "pt"}))


FORMATS = {"pytorch_model.bin": write_bin, "pytorch_model.bin, sparse layout": write_sparse_bin, "sharded .bin": write_sharded_bin,
           "sharded safetensors": write_sharded_safetensors}


def _weights(converted_folder):
    """(dense state dict, the sparse layout of model.safetensors) of a converted model."""
    dense = {k: v.clone() for k, v in CSPForCausalLM.from_pretrained(converted_folder).state_dict().items()}
    return dense, load_file(converted_folder / "model.safetensors")


CORRUPTIONS = {  # edit of a state dict (dense or sparse layout) -> what the one-line error says
    "NaN in sink_logit": (lambda t: t[SINK].__setitem__(0, float("nan")), f"{SINK} holds NaN"),
    "wrong shape": (lambda t: t.update(final_logits_bias=t["final_logits_bias"][:-1].clone()), "final_logits_bias has shape (511,)"),
    "missing tensor": (lambda t: t.pop(SINK), f"missing tensor(s) {SINK}"),
    "unexpected tensor": (lambda t: t.update(extra=torch.zeros(2)), "unexpected tensor(s) extra"),
}


def _loaders(folder):
    """Every way this project loads a model folder."""
    return {
        "AutoModelForCausalLM": lambda: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True),
        "CSPForCausalLM": lambda: CSPForCausalLM.from_pretrained(folder),
        "load_model_and_tokenizer": lambda: load_model_and_tokenizer(str(folder))[0],
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_weight_format_loads_with_the_same_logits(fmt, converted, tmp_path):
    source = converted["rms_sink_bigram"]
    folder = _without_weights(source, tmp_path / "model")
    FORMATS[fmt](folder, *_weights(source))
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = CSPForCausalLM.from_pretrained(source)(ids).logits
        for name, load in _loaders(folder).items():
            assert torch.equal(load().eval()(ids).logits, expected), name


@pytest.mark.parametrize("case", CORRUPTIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_weight_format_is_checked_by_every_loader(fmt, case, converted, tmp_path, capsys):
    from modeling_csp.cli import main

    source = converted["rms_sink_bigram"]
    folder = _without_weights(source, tmp_path / "model")
    edit, message = CORRUPTIONS[case]
    dense, sparse = _weights(source)
    edit(dense)
    edit(sparse)
    FORMATS[fmt](folder, dense, sparse)
    for name, load in _loaders(folder).items():
        with pytest.raises(ValueError) as error:
            load()
        assert message in str(error.value) and "\n" not in str(error.value), (name, str(error.value))
    capsys.readouterr()
    assert main(["next-tokens", "--model", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_dense_bin_with_nan_fails_the_cli_in_a_fresh_process(converted, tmp_path):
    """The issue's case: `csp next-tokens` printed "prob": NaN with exit status 0."""
    source = converted["rms_sink_bigram"]
    folder = _without_weights(source, tmp_path / "model")
    dense, _ = _weights(source)
    dense[SINK][0] = float("nan")
    write_bin(folder, dense, None)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-m", "modeling_csp.cli", "next-tokens", "--model", str(folder), "--prompt", "x"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.count("\n") == 1 and f"pytorch_model.bin: {SINK} holds NaN" in result.stderr, result.stderr


class NotATensor:
    pass


def test_a_bin_with_objects_other_than_tensors_is_refused_unread(converted, tmp_path):
    folder = _without_weights(converted["rms_sink_bigram"], tmp_path / "model")
    dense, _ = _weights(converted["rms_sink_bigram"])
    torch.save({**dense, "extra": NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds objects other than tensors.*weights_only=True.*model.safetensors") as error:
        CSPForCausalLM.from_pretrained(folder)
    assert "\n" not in str(error.value)


def test_a_tied_model_may_store_its_unembedding_only_as_a_copy_of_the_embedding(converted, tmp_path):
    source = converted["ln_gpt2"]  # tied_unembed: lm_head.weight is transformer.wte.weight
    folder = _without_weights(source, tmp_path / "model")
    dense, _ = _weights(source)
    assert "lm_head.weight" in dense  # state_dict() lists the tied weight under both names
    write_bin(folder, dense, None)
    ids = torch.randint(0, 2048, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(CSPForCausalLM.from_pretrained(folder)(ids).logits, CSPForCausalLM.from_pretrained(source)(ids).logits)
    dense["lm_head.weight"] = dense["lm_head.weight"] * 2
    write_bin(folder, dense, None)
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        CSPForCausalLM.from_pretrained(folder)


def test_the_file_transformers_reads_is_the_one_checked(converted, tmp_path):
    """`use_safetensors=False` reads pytorch_model.bin beside model.safetensors; `variant` reads model.<variant>.*."""
    source = converted["rms_sink_bigram"]
    dense, sparse = _weights(source)
    dense["final_logits_bias"][0] = float("inf")
    sparse[SINK][0] = float("nan")
    both = shutil.copytree(source, tmp_path / "both")
    write_bin(both, dense, None)
    CSPForCausalLM.from_pretrained(both)  # model.safetensors comes first, and it is sound
    with pytest.raises(ValueError, match="pytorch_model.bin: final_logits_bias holds NaN"):
        CSPForCausalLM.from_pretrained(both, use_safetensors=False)
    variant = shutil.copytree(source, tmp_path / "variant")
    save_file(sparse, variant / "model.fp16.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"model.fp16.safetensors: {SINK} holds NaN"):
        CSPForCausalLM.from_pretrained(variant, variant="fp16")


def test_a_truncated_bin_is_refused(converted, tmp_path):
    folder = _without_weights(converted["rms_sink_bigram"], tmp_path / "model")
    write_bin(folder, _weights(converted["rms_sink_bigram"])[0], None)
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="pytorch_model.bin: not a readable PyTorch weights file") as error:
        CSPForCausalLM.from_pretrained(folder)
    assert "\n" not in str(error.value)


# ---- sizes checked before anything is allocated ---------------------------------------------------------------


def _with_config(converted_folder, dst, **changes):
    shutil.copytree(converted_folder, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"n_layer": 1_000_000}, "n_layer=1,000,000 is more than the limit of 1,024"),  # 10^5 took 34 s to build
    ({"vocab_size": 60_000}, "the bigram table of vocab_size=60,000 has 3,600,000,000 entries, more than the limit"),
    ({"d_model": 10**7, "n_head": 1}, "d_model=10,000,000 is more than the limit of 65,536"),
])
def test_a_config_declaring_a_huge_model_is_refused_by_every_loader(converted, tmp_path, capsys, changes, message):
    """A 2 MB model.safetensors whose config.json declares a 60,000-token bigram table asked for 14.4 GB."""
    from modeling_csp.cli import main

    folder = _with_config(converted["rms_sink_bigram"], tmp_path / "model", **changes)
    with pytest.raises(ValueError, match=f"could not load model .*: Invalid CSPConfig: {message}"):
        load_model_and_tokenizer(str(folder))
    with pytest.raises(ValueError, match=f"Invalid CSPConfig: {message}"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    (tmp_path / "t.jsonl").write_text('{"prompt": "x = (1", "correct": ")", "incorrect": "]"}\n')
    assert main(["tasks", "--check", str(tmp_path / "t.jsonl"), "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not load model") and message in err[0]


def test_a_model_larger_than_the_memory_allowed_is_refused_before_it_is_built(converted, monkeypatch):
    """CSP_MAX_MODEL_BYTES caps what one model may take (below the machine's free memory, which is always checked)."""
    from modeling_csp.model.configuration_csp import CSPConfig

    folder = converted["rms_sink_bigram"]
    config = CSPConfig.from_pretrained(folder)
    assert config.n_values() >= sum(t.numel() for t in CSPForCausalLM(config).state_dict().values())
    monkeypatch.setenv("CSP_MAX_MODEL_BYTES", str(config.n_values() * 4 - 1))
    with pytest.raises(ValueError, match=r"could not load model .*: model .* needs about 1\.8 MiB \(3 layers, d_model "
                                         r"64, vocab_size 512\) but only 1\.8 MiB is available \(CSP_MAX_MODEL_BYTES\)"):
        load_model_and_tokenizer(str(folder))
    with pytest.raises(ValueError, match=r"the model needs about .* but only .* is available \(CSP_MAX_MODEL_BYTES\)"):
        CSPForCausalLM(config)
    with torch.device("meta"):  # nothing is allocated there (from_pretrained builds on it): nothing to refuse
        CSPForCausalLM(config)
    monkeypatch.setenv("CSP_MAX_MODEL_BYTES", str(config.n_values() * 4))
    load_model_and_tokenizer(str(folder))
