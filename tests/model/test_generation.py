"""generate() in every decoding mode transformers' GenerationTesterMixin covers, each with and without the KV cache.

Without a cache every step recomputes the whole prefix; with one it reads the stored keys and values. The two must
pick the same tokens, on a tiny model with the shipped choices (sink, AbsTopK, bigram table) and sparse kernels.
"""

import pytest
import torch

from conftest import random_ids, tiny_model

NEW = 8


@pytest.fixture(scope="module")
def model(one_thread):
    return tiny_model()


def generate(model, ids, use_cache, seed=0, **kwargs):
    torch.manual_seed(seed)  # sampling modes draw from torch's global generator
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, use_cache=use_cache, pad_token_id=0, **kwargs)


MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=0),
    "beam": dict(do_sample=False, num_beams=3),
    "beam_sample": dict(do_sample=True, num_beams=3, top_k=0),
}


@pytest.mark.parametrize("mode", MODES)
def test_each_decoding_mode_gives_the_same_tokens_with_and_without_the_cache(model, mode):
    ids = random_ids(model, n=2, T=6)
    with_cache, without = generate(model, ids, True, **MODES[mode]), generate(model, ids, False, **MODES[mode])
    assert with_cache.shape == (2, 6 + NEW)
    assert torch.equal(with_cache, without)


def test_sampling_depends_on_the_seed(model):
    """So that the equalities above are not those of a model that always picks the same token."""
    ids = random_ids(model, n=2, T=6)
    draws = {tuple(generate(model, ids, True, seed=seed, **MODES["sample"]).flatten().tolist()) for seed in range(4)}
    assert len(draws) > 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_assisted_decoding_equals_greedy(model, use_cache):
    """A smaller draft model proposes tokens; greedy verification keeps exactly the big model's greedy tokens."""
    assistant = tiny_model(seed=1)
    ids = random_ids(model, n=1, T=6)
    greedy = generate(model, ids, use_cache, do_sample=False)
    assisted = generate(model, ids, True, do_sample=False, assistant_model=assistant)
    assert not torch.equal(generate(assistant, ids, True, do_sample=False), greedy)  # the draft really differs
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_lookup_decoding_equals_greedy(model, use_cache):
    ids = random_ids(model, n=1, T=6).repeat(1, 2)  # a repeated prompt, so that lookups find candidates
    greedy = generate(model, ids, use_cache, do_sample=False)
    assert torch.equal(generate(model, ids, True, do_sample=False, prompt_lookup_num_tokens=3), greedy)


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_rows_generate_what_each_row_alone_generates(model, use_cache):
    ids = random_ids(model, n=2, T=6)
    batch, mask = ids.clone(), torch.ones_like(ids)
    batch[0, :2], mask[0, :2] = 0, 0  # row 0 is its last 4 tokens, left-padded
    out = generate(model, batch, use_cache, do_sample=False, attention_mask=mask)
    assert torch.equal(out[0, 2:], generate(model, ids[:1, 2:], use_cache, do_sample=False)[0])
    assert torch.equal(out[1], generate(model, ids[1:], use_cache, do_sample=False)[0])


def test_generation_continues_from_a_returned_cache(model):
    ids = random_ids(model, n=1, T=6)
    whole = generate(model, ids, True, do_sample=False)
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        assert cache.get_seq_length() == 6 + 3 - 1  # the last token's keys are written by the next step
        rest = model.generate(first.sequences, max_new_tokens=NEW - 3, min_new_tokens=NEW - 3, do_sample=False,
                              pad_token_id=0, **{"cache" if hasattr(first, "cache") else "past_key_values": cache})
    assert torch.equal(rest, whole)


@pytest.mark.parametrize("use_cache", [True, False])
def test_logits_to_keep_returns_the_last_positions_of_the_full_logits(model, use_cache):
    ids = random_ids(model, n=2, T=6)
    with torch.no_grad():
        full = model(ids, use_cache=use_cache).logits
        for keep in (1, 3):
            kept = model(ids, use_cache=use_cache, logits_to_keep=keep).logits
            assert kept.shape == (2, keep, 99)
            assert (kept - full[:, -keep:]).abs().max() <= 1e-5
