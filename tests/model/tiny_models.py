"""Toy-size models with the shipped choices, built in milliseconds, for tests of the model's mechanics."""

import torch

from modeling_csp import CSPConfig, CSPForCausalLM


def tiny_config(**overrides) -> CSPConfig:
    """The shipped choices (sink, AbsTopK, bigram table, RMSNorm, untied) at toy size."""
    fields = {"block_size": 32, "vocab_size": 64, "n_layer": 2, "n_head": 2, "d_model": 16, "d_mlp": 32, "sink": True,
              "afrac": 0.5, "enable_bigram_table": True, "learnable_bigram_table": True, "tie_word_embeddings": False,
              "rms_norm": True, "bias": False, "ln_bias": False}
    return CSPConfig(**(fields | overrides))


def tiny_model(**overrides) -> CSPForCausalLM:
    torch.manual_seed(0)
    model = CSPForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # nonzero sink logits, bias and bigram table, so that each of them is tested
        for block in model.transformer.h if model.config.sink else ():
            block.attn.attn_imp.sink_logit.normal_()
        model.final_logits_bias.normal_()
        if model.bigram_table is not None:
            model.bigram_table.normal_()
    return model
