"""`modeling_csp.circuits.model_cache`: a model's mean activations and example index, computed once and read back
from disk by every later call (and process), recomputed for other weights or an unreadable file."""

from __future__ import annotations

import shutil

import pytest
import torch

from modeling_csp.circuits import model_cache
from modeling_csp.circuits.ablation import default_cache_dir
from modeling_csp.circuits.example_index import META_FILE, TENSOR_FILE, cache_folder
from modeling_csp.model.configuration_csp import CSPConfig
from modeling_csp.model.loading import load_model_and_tokenizer

TOKENS = 1024  # the smallest index the app builds


@pytest.fixture
def fixture_model(converted, one_thread):
    """The converted `rms_sink_bigram` checkpoint with its tokenizer, fresh per test (tests change its weights)."""
    model, tokenizer = load_model_and_tokenizer(str(converted["rms_sink_bigram"]))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def computed_once(converted, tmp_path_factory):
    """(cache folder, `Prepared`, progress reports) of the first `prepare` of the fixture model: computed."""
    model, tokenizer = load_model_and_tokenizer(str(converted["rms_sink_bigram"]))
    cache, steps = tmp_path_factory.mktemp("model_cache"), []
    torch.set_num_threads(1)
    first = model_cache.prepare(model.eval(), tokenizer, index_tokens=TOKENS, cache_dir=cache,
                                progress=lambda fraction, text: steps.append((fraction, text)))
    return cache, first, steps


@pytest.fixture
def cache_copy(computed_once, tmp_path):
    """A copy of the computed cache folder, for a test to read or spoil."""
    shutil.copytree(computed_once[0], tmp_path / "cache", copy_function=shutil.copy2)
    return tmp_path / "cache"


def cache_files(cache_dir, model) -> dict:
    """{file name: mtime in ns} of everything cached for `model`'s weights."""
    folder = cache_folder(model, cache_dir)
    means = sorted(cache_dir.glob("means-*.pt"))
    return {p.name: p.stat().st_mtime_ns for p in [*means, folder / META_FILE, folder / TENSOR_FILE]}


def test_the_first_call_computes_both_with_one_progress(computed_once):
    _, first, steps = computed_once
    assert first.computed == ["means", "index"] and not first.index_on_disk
    assert steps[-1] == (1.0, "ready") and any(t.startswith("mean activations: batch") for _, t in steps)
    assert any(t.startswith("node examples: batch") for _, t in steps)
    assert [f for f, _ in steps] == sorted(f for f, _ in steps)  # one progress over both, never going back


def test_a_second_call_reads_both_from_disk_and_computes_nothing(computed_once, cache_copy, fixture_model):
    model, tokenizer = fixture_model
    written, steps = cache_files(cache_copy, model), []
    again = model_cache.prepare(model, tokenizer, index_tokens=TOKENS, cache_dir=cache_copy,
                                progress=lambda fraction, text: steps.append((fraction, text)))
    assert again.computed == [] and again.index_on_disk
    assert cache_files(cache_copy, model) == written  # nothing rewritten
    assert not any(t.startswith(("mean activations: batch", "node examples: batch")) for _, t in steps)
    first = computed_once[1]
    assert all(torch.equal(first.means[loc], again.means[loc]) for loc in first.means)
    assert torch.equal(first.index.hist, again.index.hist) and first.index.meta == again.index.meta


def test_changed_weights_are_computed_anew_beside_the_old_files(computed_once, cache_copy, fixture_model):
    model, tokenizer = fixture_model
    old_files = cache_files(cache_copy, model)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)
    after = model_cache.prepare(model, tokenizer, index_tokens=TOKENS, cache_dir=cache_copy, progress=lambda *a: None)
    before = computed_once[1]
    assert after.computed == ["means", "index"]
    assert after.index.meta["weights_hash"] != before.index.meta["weights_hash"]
    assert not torch.equal(after.means["0.mlp.post_act"], before.means["0.mlp.post_act"])
    assert len(list(cache_copy.glob("means-*.pt"))) == 2 and set(old_files) <= {p.name for p in cache_copy.rglob("*")}


def test_corrupted_cache_files_are_recomputed_not_raised(computed_once, cache_copy, fixture_model):
    model, tokenizer = fixture_model
    (means_file,) = cache_copy.glob("means-*.pt")
    means_file.write_bytes(b"not a torch file")
    (cache_folder(model, cache_copy) / TENSOR_FILE).write_bytes(b"\x00" * 100)
    again = model_cache.prepare(model, tokenizer, index_tokens=TOKENS, cache_dir=cache_copy, progress=lambda *a: None)
    first = computed_once[1]
    assert again.computed == ["means", "index"]
    assert all(torch.allclose(first.means[loc], again.means[loc]) for loc in first.means)
    assert torch.equal(first.index.hist, again.index.hist)
    assert model_cache.prepare(model, tokenizer, index_tokens=TOKENS, cache_dir=cache_copy,
                               progress=lambda *a: None).computed == []  # and rewritten whole


def test_the_default_cache_is_where_pruning_and_csp_index_examples_look(cache_copy, fixture_model, monkeypatch):
    monkeypatch.setenv("CSP_CACHE_DIR", str(cache_copy))
    model, tokenizer = fixture_model
    assert default_cache_dir() == cache_copy and (cache_folder(model) / META_FILE).is_file()
    assert model_cache.prepare(model, tokenizer, index_tokens=TOKENS, progress=lambda *a: None).computed == []


def test_sizes_are_checked_and_batches_bounded_at_released_size(fixture_model, tmp_path):
    model, tokenizer = fixture_model
    for tokens in (10, 10**9):
        with pytest.raises(ValueError, match="pick 1,024 to 1,000,000"):
            model_cache.example_index(model, tokenizer, tokens, cache_dir=tmp_path)
    yolo1 = CSPConfig(n_layer=8, d_model=1024, n_head=16, d_head=64, d_mlp=4096, vocab_size=2048, block_size=1024)
    assert model_cache.means_batch_size(yolo1) == 1  # 82k nodes x 1,024 tokens x 4 bytes: 335 MB a window
    assert model_cache.index_batch_size(yolo1, 128) == 4
    assert model_cache.means_batch_size(model.config) == 32 and model_cache.index_batch_size(model.config, 128) == 64
