"""Fine-tuning the way transformers users do: gradient checkpointing, embeddings as input, peft prompt tuning and
LoRA, and `resparsify_` to bring merged LoRA weights back to the model's sparsity."""

import pytest
import torch
from conftest import random_ids
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from conftest import tiny_model

from modeling_csp import CSPForCausalLM


def _grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_plain_gradients():
    model = tiny_model().train()
    ids = random_ids(model, 2, 12)
    plain = _grads(model, ids)
    model.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    checkpointed = _grads(model, ids)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6), name


def test_embeddings_as_input_give_the_ids_logits():
    model = tiny_model()
    ids = random_ids(model, 2, 10)
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(model(inputs_embeds=embeds, input_ids=ids).logits, expected)
        assert torch.equal(model(inputs_embeds=embeds).logits, expected)  # the bigram rows read off the embeddings
        soft = torch.cat([torch.randn(2, 3, model.config.d_model), embeds], dim=1)  # a soft prompt has no bigram row
        with_prompt = model(inputs_embeds=soft).logits
        no_bigram = model.lm_head(model.transformer(inputs_embeds=soft).last_hidden_state) + model.final_logits_bias
        assert (with_prompt[:, :3] - no_bigram[:, :3]).abs().max() <= 1e-5


def test_embeddings_that_several_tokens_share_are_an_error_naming_the_fix():
    model = tiny_model()
    with torch.no_grad():
        model.transformer.wte.weight[5] = model.transformer.wte.weight[6]
    embeds = model.get_input_embeddings()(torch.tensor([[1, 5, 2]]))
    with torch.no_grad(), pytest.raises(ValueError, match="pass input_ids alongside inputs_embeds"):
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match=rf"inputs_embeds must be a \(batch, sequence, d_model={model.config.d_model}\) tensor"):
        model(inputs_embeds=torch.zeros(1, 3, 8))


def test_generation_from_embeddings_equals_generation_from_ids():
    model = tiny_model()
    ids = random_ids(model, 1, 6)
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        from_ids = model.generate(ids, max_new_tokens=6, do_sample=False)
        both = model.generate(input_ids=ids, inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
        only_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
    assert torch.equal(both, from_ids)
    assert torch.equal(only_embeds, from_ids[:, 6:])  # transformers returns only the new tokens here


def test_peft_prompt_tuning_trains_the_prompt():
    model = get_peft_model(tiny_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ids = random_ids(model.base_model, 2, 10)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 14, model.config.vocab_size) and torch.isfinite(out.loss)
    out.loss.backward()
    prompt = model.prompt_encoder["default"].embedding.weight
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.base_model.transformer.parameters())  # the transformer is frozen


def test_resparsify_brings_merged_lora_weights_back_to_the_model_density(converted):
    model = CSPForCausalLM.from_pretrained(converted["rms_sink_bigram"]).eval()
    matrices = {n: p for n, p in model.named_parameters() if n.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight"))}
    loaded = {n: int(p.count_nonzero()) for n, p in matrices.items()}
    assert all(nnz < 0.5 * matrices[n].numel() for n, nnz in loaded.items())  # sparse, as trained
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn", "c_fc", "c_proj"], init_lora_weights=False))
    merged = lora.merge_and_unload()
    after_merge = {n: p for n, p in merged.named_parameters() if n in matrices}
    assert all(int(p.count_nonzero()) == p.numel() for p in after_merge.values())  # the merge made them dense
    dense = {n: p.detach().clone() for n, p in after_merge.items()}
    densities = merged.resparsify_()
    for name, weight in after_merge.items():
        assert int(weight.count_nonzero()) == loaded[name], name
        assert densities[name] == loaded[name] / weight.numel()
        kept = weight != 0  # the entries of largest magnitude survive, unchanged
        assert torch.equal(weight[kept], dense[name][kept])
        assert dense[name][kept].abs().min() >= dense[name][~kept].abs().max(), name
    ids = random_ids(merged, 1, 8)
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits).all()
