"""What transformers users expect of a causal LM: the cache under either name, padding, dtypes, offload, resizing,
attention outputs, generation limits, and a clear ValueError for every malformed input."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import CHECKPOINTS, PROJECT_ROOT, random_ids, tiny_model
from modeling_csp import CSPForCausalLM

TOL = 1e-4


def ids_for(model, n=2, T=24, seed=0):
    return random_ids(model, n, T, seed)  # 24 tokens: shapes below assume it


# ---- the KV cache and generate() --------------------------------------------------------------------


def test_the_cache_is_taken_under_its_new_and_its_old_name(models):
    model = models["rms_sink_bigram"]
    ids = ids_for(model, n=1)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            prefix = model(ids[:, :-1], use_cache=True)
            cache = prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values
            step = model(ids[:, -1:], **{name: cache}).logits[:, -1]
            assert (step - full).abs().max() <= TOL, name


def test_unknown_keyword_arguments_are_refused(models):
    model = models["ln_gpt2"]
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        model(ids_for(model), atention_mask=torch.ones(2, 24))  # a typo must not be swallowed


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_generation_with_the_cache_equals_recomputing_the_prefix(name, models):
    model = models[name]
    prompt = ids_for(model, n=1, T=8, seed=1)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False)
        ids = prompt
        for _ in range(12):  # the reference's loop: the whole prefix every step
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_generation_config_has_no_conflicting_lengths(converted, capfd):
    model = AutoModelForCausalLM.from_pretrained(converted["rms_sink_bigram"], trust_remote_code=True)
    assert model.generation_config.max_length in (None, 20)  # transformers' default, not a second limit
    capfd.readouterr()
    model.generate(ids_for(model, n=1, T=4), max_new_tokens=3, do_sample=False)
    assert "max_length" not in capfd.readouterr().err


def test_generating_past_the_context_says_so(models):
    model = models["rms_sink_bigram"]  # block_size 64
    with pytest.raises(ValueError, match=r"block_size=64 tokens and the prompt has 60; ask for at most max_new_tokens=4"):
        model.generate(ids_for(model, n=1, T=60), max_new_tokens=10)


def test_left_padded_batch_generation_equals_each_row_alone(models):
    model = models["rms_sink_bigram"]
    short, long = ids_for(model, n=1, T=5, seed=2), ids_for(model, n=1, T=9, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone = [model.generate(x, max_new_tokens=6, do_sample=False) for x in (short, long)]
    assert torch.equal(together[0, 4:], alone[0][0]) and torch.equal(together[1], alone[1][0])


# ---- padding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_a_left_padded_row_equals_the_row_alone(name, models):
    model = models[name]
    row = ids_for(model, n=1, T=20)
    padded = torch.cat([torch.full((1, 9), 3), row], dim=1)
    mask = torch.cat([torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(row).logits
        with model.record_activations() as acts_padded:
            in_batch = model(padded, attention_mask=mask).logits[:, 9:]
        with model.record_activations() as acts_alone:
            model(row)
    assert (in_batch - alone).abs().max() <= TOL
    for hook, value in acts_alone.items():
        assert (acts_padded[hook][:, 9:] - value).abs().max() <= TOL, hook


def test_a_tasks_loss_does_not_depend_on_its_batch_mates():
    """Task batches are left-padded to their longest prompt: each prompt's logits must be its own."""
    from modeling_csp.circuits.ablation import task_logits
    from modeling_csp.model.loading import load_model_and_tokenizer
    from modeling_csp.circuits.tasks import make_task_dataset

    model, tokenizer = load_model_and_tokenizer("default")
    batch = make_task_dataset("single_double_quote", tokenizer, n=16, seed=0, max_len=model.config.block_size).test
    lengths = batch.attention_mask.sum(1)
    assert lengths.min() < lengths.max()  # the batch really is padded
    with torch.no_grad():
        together = task_logits(model, batch)
        for i in range(len(lengths)):
            alone = model(batch.input_ids[i:i + 1, -int(lengths[i]):], use_cache=False).logits[:, -1]
            assert (together[i] - alone[0]).abs().max() <= TOL, i


# ---- dtypes, offload, resizing, attentions -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loading_in_half_precision(dtype, converted, models):
    half = AutoModelForCausalLM.from_pretrained(converted["rms_sink_bigram"], trust_remote_code=True, dtype=dtype).eval()
    assert half.dtype == dtype
    for (name, a), (_, b) in zip(models["rms_sink_bigram"].state_dict().items(), half.state_dict().items()):
        assert torch.equal(a.to(dtype), b), name
    with torch.no_grad():
        logits = half(ids_for(half)).logits
    assert torch.isfinite(logits).all()


def test_whole_model_disk_offload_gives_exact_logits(converted, models, tmp_path):
    offloaded = AutoModelForCausalLM.from_pretrained(
        converted["rms_sink_bigram"], trust_remote_code=True, device_map="auto", max_memory={"cpu": "1MB"},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    assert set(offloaded.hf_device_map.values()) == {"disk"}
    ids = ids_for(offloaded)
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, models["rms_sink_bigram"](ids).logits)


@pytest.mark.parametrize("new_size", [600, 500])
def test_resize_token_embeddings_resizes_every_vocabulary_tensor(new_size, converted, tmp_path):
    model = CSPForCausalLM.from_pretrained(converted["rms_sink_bigram"]).eval()  # vocab 512, untied, bigram table
    ids = ids_for(model) % min(new_size, 512)
    with torch.no_grad():
        before = model(ids).logits[..., : min(new_size, 512)]
        model.resize_token_embeddings(new_size)
        after = model(ids).logits
    assert model.config.vocab_size == new_size
    for tensor in (model.transformer.wte.weight, model.lm_head.weight):
        assert tensor.shape[0] == new_size
    assert model.final_logits_bias.shape == (new_size,) and model.bigram_table.shape == (new_size, new_size)
    assert (after[..., : min(new_size, 512)] - before).abs().max() <= TOL
    model.save_pretrained(tmp_path / "resized")
    again = CSPForCausalLM.from_pretrained(tmp_path / "resized").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, after)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_output_attentions_returns_the_probabilities(name, models):
    model = models[name]
    ids = ids_for(model)
    with torch.no_grad():
        plain = model(ids).logits
        out = model(ids, output_attentions=True)
    assert (out.logits - plain).abs().max() <= TOL
    assert len(out.attentions) == model.config.n_layer
    probs = out.attentions[0]
    assert probs.shape == (2, model.config.n_head, 24, 24)
    assert torch.all(probs.triu(1) == 0)  # causal
    sums = probs.sum(-1)
    if model.config.sink:  # the sink takes the rest of each row
        assert torch.all(sums <= 1 + 1e-6) and sums.min() < 0.999
    else:
        assert (sums - 1).abs().max() <= 1e-5


# ---- malformed inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("make_input, message", [
    (lambda: dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "input_ids is empty"),
    (lambda: dict(input_ids=torch.tensor([[1, 2, 512]])), r"must lie in \[0, 512\)"),
    (lambda: dict(input_ids=torch.tensor([[1, -1, 2]])), r"must lie in \[0, 512\)"),
    (lambda: dict(input_ids=torch.tensor([1, 2, 3])), "add a batch dimension"),
    (lambda: dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer token ids"),
    (lambda: dict(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4)), r"attention_mask must have shape \(batch, past \+ T\) = \(1, 3\)"),
    (lambda: dict(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 1, 3, 4)), r"a 4-D attention_mask must have shape \(batch, 1, T, keys\) = \(1, 1, 3, 3\)"),
    (lambda: dict(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(3, 3)), "attention_mask must have shape"),
    (lambda: dict(input_ids=torch.zeros(1, 65, dtype=torch.long)), "longer than the model's context"),
])
def test_malformed_input_is_a_clear_value_error(make_input, message, models):
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        models["rms_sink_bigram"](**make_input())


def test_an_empty_input_is_an_error_not_a_signal(converted):
    """The sink's flash-attention kernel dies with SIGFPE on T=0: run it where a crash cannot take pytest down."""
    code = (f"import torch; from modeling_csp import CSPForCausalLM\n"
            f"m = CSPForCausalLM.from_pretrained({str(converted['rms_sink_bigram'])!r}).eval()\n"
            "try:\n    m(torch.zeros(1, 0, dtype=torch.long))\nexcept ValueError as e:\n    print('ValueError:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ValueError: input_ids is empty" in result.stdout, result.stderr[-1000:]


def test_an_older_transformers_is_refused_in_words():
    code = "import transformers; transformers.__version__ = '5.8.1'\nimport modeling_csp.modeling_csp\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "needs transformers>=5.13,<6 (installed: 5.8.1)" in result.stderr


def test_the_loss_takes_already_shifted_labels_as_trainer_passes_them():
    """`shift_labels` (Trainer, context parallelism) gives the loss of the same labels shifted inside."""
    model = tiny_model()
    ids = random_ids(model, n=2, T=8)
    with torch.no_grad():
        shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
        expected = model(ids, labels=ids).loss
        assert (model(ids, shift_labels=shifted).loss - expected).abs() <= 1e-6
        assert (model(ids, labels=ids, shift_labels=shifted).loss - expected).abs() <= 1e-6
