"""Sparse storage on disk: exact under every load dtype, and every corrupted or mismatched file refused in one line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_csp import CSPConfig, CSPForCausalLM
from modeling_csp.model.modeling_csp import decode_uint, encode_uint, sparsify

W = "transformer.h.0.mlp.c_fc.weight"  # a sparse-stored weight of the rms_sink_bigram checkpoint


def test_index_digits_survive_every_float_cast():
    """transformers casts every checkpoint tensor to the parameter's dtype before converting it; base-256 digits
    come through bf16, fp16 and fp32 exactly, where int32 indices above 256 (bf16) or 2**24 (fp32) would not."""
    x = torch.tensor([0, 1, 255, 256, 257, 2**24 + 1, 2**31 + 7, 2**32 - 1])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(decode_uint(encode_uint(x).to(dtype), "x"), x)
    assert int(torch.tensor(2**24 + 1).float()) != 2**24 + 1  # what the old int32 layout lost


def test_a_matrix_past_2_to_the_24_elements_loads_exactly(tmp_path):
    config = CSPConfig(vocab_size=4100, block_size=8, n_layer=1, n_head=1, d_model=8, d_mlp=8, enable_bigram_table=True,
                       learnable_bigram_table=True, rms_norm=True, bias=False)
    model = CSPForCausalLM(config)
    with torch.no_grad():
        model.bigram_table.zero_()
        flat = torch.tensor([3, 2**24 + 1, 2**24 + 3, 4100 * 4100 - 1])  # odd indices float32 cannot hold
        model.bigram_table.view(-1)[flat] = torch.tensor([0.5, -1.25, 2.0, 3.5])
    model.save_pretrained(tmp_path / "big")
    for dtype in (torch.float32, torch.bfloat16):
        loaded = CSPForCausalLM.from_pretrained(tmp_path / "big", dtype=dtype)
        assert torch.equal(loaded.bigram_table.view(-1).nonzero().flatten(), flat)
        assert torch.equal(loaded.bigram_table, model.bigram_table.to(dtype))


def test_each_sparse_tensor_records_its_shape():
    parts = sparsify(torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, -1.0]]))
    assert parts["sparse_values"].tolist() == [2.0, -1.0]
    assert decode_uint(parts["sparse_indices"], "i").tolist() == [1, 5]
    assert decode_uint(parts["sparse_shape"], "s").tolist() == [2, 3]


def _edit_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _swap_first_two(t):
    t[W + ".sparse_indices"][[0, 1]] = t[W + ".sparse_indices"][[1, 0]]


def _set_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


CORRUPTIONS = {
    "duplicate index": (lambda t: t[W + ".sparse_indices"].__setitem__(1, t[W + ".sparse_indices"][0]), "strictly increasing"),
    "unsorted indices": (_swap_first_two, "strictly increasing"),
    "out-of-range index": (lambda t: t[W + ".sparse_indices"].__setitem__(-1, torch.tensor([255, 255, 255, 0])), "within [0, 16384)"),
    "float indices": (lambda t: t.update({W + ".sparse_indices": t[W + ".sparse_indices"].float()}), "has dtype F32, expected uint8"),
    "int32 indices (the old layout)": (lambda t: t.update({W + ".sparse_indices": decode_uint(t[W + ".sparse_indices"], "i").int()}), "has dtype I32"),
    "bool indices": (lambda t: t.update({W + ".sparse_indices": t[W + ".sparse_indices"] > 0}), "has dtype BOOL"),
    "1-D uint8 indices": (lambda t: t.update({W + ".sparse_indices": t[W + ".sparse_indices"][:, 0].contiguous()}), "must have shape (n, 4)"),
    "int values": (lambda t: t.update({W + ".sparse_values": t[W + ".sparse_values"].int()}), "expected floating-point values"),
    "fewer values than indices": (lambda t: t.update({W + ".sparse_values": t[W + ".sparse_values"][:-1].clone()}), "values but"),
    "NaN value": (lambda t: t[W + ".sparse_values"].__setitem__(0, float("nan")), "NaN"),
    "NaN in a dense tensor": (lambda t: t["final_logits_bias"].__setitem__(0, float("nan")), "final_logits_bias holds NaN"),
    "missing tensor": (lambda t: [t.pop(W + "." + p) for p in ("sparse_values", "sparse_indices", "sparse_shape")], f"missing tensor(s) {W}"),
    "missing shape record": (lambda t: t.pop(W + ".sparse_shape"), "missing " + W + ".sparse_shape"),
    "unexpected tensor": (lambda t: t.update(extra=torch.zeros(2)), "unexpected tensor(s) extra"),
    "recorded shape differs": (lambda t: t.update({W + ".sparse_shape": encode_uint(torch.tensor([128, 128]))}), "stored with shape (128, 128)"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupted_file_is_refused_naming_file_and_tensor(case, converted, tmp_path):
    folder = shutil.copytree(converted["rms_sink_bigram"], tmp_path / "model")
    edit, message = CORRUPTIONS[case]
    _edit_weights(folder, edit)
    with pytest.raises(ValueError) as error:
        CSPForCausalLM.from_pretrained(folder)
    text = str(error.value)
    assert message in text and "model.safetensors" in text and "\n" not in text, text


@pytest.mark.parametrize("change, message", [
    ({"d_mlp": 128}, "config.json does not match the weights"),
    ({"n_layer": 2}, "unexpected tensor(s) transformer.h.2"),
    ({"n_layer": 4}, "missing tensor(s) transformer.h.3"),
    ({"enable_bigram_table": False}, "unexpected tensor(s) bigram_table"),
])
def test_a_config_that_no_longer_matches_the_weights_is_refused(change, message, converted, tmp_path):
    folder = shutil.copytree(converted["rms_sink_bigram"], tmp_path / "model")
    _set_config(folder, **change)
    with pytest.raises(ValueError, match=None) as error:
        CSPForCausalLM.from_pretrained(folder)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_truncated_file_is_refused(converted, tmp_path):
    folder = shutil.copytree(converted["rms_sink_bigram"], tmp_path / "model")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        CSPForCausalLM.from_pretrained(folder)


def test_saving_a_model_folder_removes_temp_files_of_killed_writes(tmp_path):
    """A model folder written again loses the temporary files that earlier, killed writes left there."""
    import os
    import time

    from conftest import dead_pid
    from modeling_csp.model.saving import save_model_folder

    dst = tmp_path / "model"
    dst.mkdir()
    old = time.time() - 2 * 3600
    for name in (".tmpq8x_k2ab", f".model.safetensors.tmp{dead_pid()}-5"):  # an hour-old tempfile, a dead writer's
        (dst / name).write_bytes(b"\0" * 100)
    os.utime(dst / ".tmpq8x_k2ab", (old, old))
    config = CSPConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, d_model=8, d_mlp=8, rms_norm=True, bias=False)
    save_model_folder(CSPForCausalLM(config), dst)
    assert not [f.name for f in dst.iterdir() if "tmp" in f.name]
    assert (dst / "model.safetensors").is_file()
