"""Parity of the converted checkpoints with OpenAI's reference implementation, loaded the hub way."""


import pytest
import torch
from safetensors.torch import load_file

from conftest import CHECKPOINTS, FIXTURES, run_outside_project

TOL = 1e-4

# Runs in a fresh process outside the project: only transformers + the folder's remote code.
REMOTE_SCRIPT = """
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True).eval()
import os
if os.path.exists(os.path.join({folder!r}, "tokenizer.json")):
    AutoTokenizer.from_pretrained({folder!r})  # the folder's tokenizer loads the hub way too
ref = load_file({reference!r})
out = {{}}
with torch.no_grad():
    with model.record_activations() as acts:
        result = model(ref["input_ids"], targets=ref["targets"])
    out["logits"], out["loss"] = result.logits, result.loss.reshape(1)
    out.update({{"hook." + k: v for k, v in acts.items()}})
    out["full_logits"] = model(ref["full_input_ids"]).logits
    out["greedy_output"] = model.generate(ref["greedy_prompt"], max_new_tokens=16, do_sample=False)
out["dtype_is_float32"] = torch.tensor([model.dtype == torch.float32])
save_file({{k: v.contiguous() for k, v in out.items()}}, {output!r})
"""


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_remote_code_matches_reference(name, converted, tmp_path):
    reference = FIXTURES / name / "reference.safetensors"
    output = tmp_path / "ours.safetensors"
    run_outside_project(REMOTE_SCRIPT.format(folder=str(converted[name]), reference=str(reference), output=str(output)), tmp_path)
    ours, ref = load_file(output), load_file(reference)
    assert ours["dtype_is_float32"].item()
    for key in ["logits", "full_logits", "loss"]:
        assert (ours[key] - ref[key]).abs().max().item() <= TOL, key
    hook_keys = sorted(k for k in ref if k.startswith("hook."))
    assert hook_keys == sorted(k for k in ours if k.startswith("hook."))
    for key in hook_keys:
        assert ours[key].shape == ref[key].shape, key
        assert (ours[key] - ref[key]).abs().max().item() <= TOL, key
    assert torch.equal(ours["greedy_output"], ref["greedy_output"])
