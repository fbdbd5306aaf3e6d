"""The usual transformers structure: `CSPModel` (AutoModel) gives hidden states, `CSPForCausalLM` is the head on it;
attention goes through transformers' registry; the config's knobs are transformers' own."""

import dataclasses
import inspect
import json

import pytest
import torch
from conftest import random_ids
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from conftest import tiny_model
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import modeling_csp.model.modeling_csp as modeling
from modeling_csp import CSPConfig, CSPForCausalLM, CSPModel
from modeling_csp.model.modeling_csp import SINK_ATTENTION

TOL = 1e-5


# ---- the base model ----------------------------------------------------------------------------------------


def test_the_lm_is_the_head_on_the_base_model(models):
    model = models["rms_sink_bigram"]
    assert isinstance(model.base_model, CSPModel) and model.base_model is model.transformer
    ids = random_ids(model, 2, 12)
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state  # (B, T, d_model), after ln_f
        logits = model.lm_head(hidden) + model.final_logits_bias + model.bigram_table[ids]
        assert hidden.shape == (2, 12, model.config.d_model)
        assert (logits - model(ids).logits).abs().max() <= 1e-4


def test_the_base_model_saves_and_loads_with_automodel(tmp_path):
    model = tiny_model()
    ids = random_ids(model, 2, 10)
    model.base_model.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_csp.CSPModel" and (tmp_path / "base" / "modeling_csp.py").exists()
    with safe_open(tmp_path / "base" / "model.safetensors", "pt") as f:  # no prefix, no head
        keys = set(f.keys())
    assert "h.0.attn.c_attn.weight.sparse_values" in keys and not any(k.startswith("lm_head") for k in keys)
    model.save_pretrained(tmp_path / "lm")
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["auto_map"] == modeling.AUTO_MAP
    with torch.no_grad():
        expected = model.transformer(ids).last_hidden_state
        for folder in ("base", "lm"):  # the base model alone, or the base of a whole LM checkpoint
            base = AutoModel.from_pretrained(tmp_path / folder, trust_remote_code=True).eval()
            assert type(base).__name__ == "CSPModel"
            assert torch.equal(base(ids).last_hidden_state, expected), folder


def test_the_base_model_loader_is_strict_too(tmp_path):
    tiny_model().base_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("h.1.attn.attn_imp.sink_logit")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor\(s\) h.1.attn.attn_imp.sink_logit"):
        CSPModel.from_pretrained(tmp_path)


def test_transformers_reports_a_missing_tensor_where_we_refuse_it(tmp_path):
    """The documented difference: transformers' loader initialises a missing weight at random and lists it;
    ours refuses the folder."""
    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("transformer.h.0.attn.attn_imp.sink_logit")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, info = PreTrainedModel.from_pretrained.__func__(CSPForCausalLM, tmp_path, output_loading_info=True)
    info = info if isinstance(info, dict) else dataclasses.asdict(info)
    assert "transformer.h.0.attn.attn_imp.sink_logit" in set(info["missing_keys"])
    with pytest.raises(ValueError, match="missing tensor"):
        CSPForCausalLM.from_pretrained(tmp_path)


# ---- attention through transformers' registry ---------------------------------------------------------------


@pytest.mark.parametrize("sink", [True, False])
def test_every_attention_implementation_gives_the_same_logits(sink, tmp_path):
    model = tiny_model(sink=sink)
    model.save_pretrained(tmp_path)
    ids = random_ids(model, 2, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row takes the masked path
    results = {}
    for implementation in ("eager", "sdpa", SINK_ATTENTION):
        loaded = CSPForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.config._attn_implementation == implementation
        with torch.no_grad():
            results[implementation] = [loaded(ids).logits, loaded(ids, attention_mask=mask).logits,
                                       loaded.generate(ids[1:, :6], max_new_tokens=5, do_sample=False)]
    for implementation, (plain, padded, generated) in results.items():
        assert (plain - results["eager"][0]).abs().max() <= TOL, implementation
        assert (padded - results["eager"][1]).abs().max() <= TOL, implementation
        assert torch.equal(generated, results["eager"][2]), implementation


def test_the_sink_attention_is_a_registered_function_of_public_ops():
    assert ALL_ATTENTION_FUNCTIONS[SINK_ATTENTION] is modeling.sdpa_with_sink_attention_forward
    assert CSPForCausalLM._supports_attention_backend and CSPForCausalLM._supports_sdpa
    assert "torch.ops.aten" not in inspect.getsource(modeling)


def test_a_sink_model_refuses_an_attention_that_cannot_add_the_sink():
    model = tiny_model()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="cannot add this model's attention sink"):
        model(torch.tensor([[1, 2, 3]]))


# ---- transformers' conventions ------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_resizing_then_post_init_keeps_every_resized_tensor(tied):
    model = tiny_model(tie_word_embeddings=tied)
    model.resize_token_embeddings(80)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.post_init()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_model_saved_without_the_sparse_layout_loads_back(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, save_original_format=False)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "bigram_table" in set(f.keys())  # dense, as transformers saved it
    ids = random_ids(model, 2, 10)
    with torch.no_grad():
        assert torch.equal(CSPForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_tie_word_embeddings_is_the_one_knob_and_tied_unembed_its_old_name(tmp_path):
    assert CSPConfig(tied_unembed=True, tie_word_embeddings=False).tie_word_embeddings is False
    assert CSPConfig(tied_unembed=False).tie_word_embeddings is False and CSPConfig().tie_word_embeddings is True
    assert CSPConfig(tie_word_embeddings=False).tied_unembed is False
    config = CSPConfig.from_dict(CSPConfig(tie_word_embeddings=False).to_dict())
    assert config.tie_word_embeddings is False
    tied = tiny_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    tied.save_pretrained(tmp_path / "tied")
    model = CSPForCausalLM.from_pretrained(tmp_path / "tied")
    model.config.tie_word_embeddings = False  # untie, then train the head on its own
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2)
    model.save_pretrained(tmp_path / "untied")
    untied = CSPForCausalLM.from_pretrained(tmp_path / "untied")
    assert untied.config.tie_word_embeddings is False
    assert torch.equal(untied.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)


def test_token_ids_are_config_fields_without_a_warning(caplog):
    with caplog.at_level("WARNING"):
        config = CSPConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert "unknown key" not in caplog.text
    assert CSPConfig.from_dict(config.to_dict()).eos_token_id == 2


def test_past_key_values_warns_as_transformers_models_do():
    model = tiny_model()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        cache = model(ids[:, :3], use_cache=True)[modeling._OUTPUT_CACHE_FIELD]
        if modeling._OUTPUT_CACHE_FIELD != "cache":
            pytest.skip("this transformers still calls the cache past_key_values")
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated .* Use `cache` instead"):
            step = model(ids[:, 3:], past_key_values=cache).logits
        assert (step[:, -1] - model(ids).logits[:, -1]).abs().max() <= 1e-4
