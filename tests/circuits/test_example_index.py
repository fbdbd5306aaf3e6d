"""The example index: node statistics and activating examples over held-out text, built once per model."""

import json

import pytest
import torch

from modeling_csp.circuits.example_index import (
    HIST_BINS,
    ExampleIndex,
    build_example_index,
    cache_folder,
    cached_example_index,
    check_token_count,
    hist_bin_edges,
)
from modeling_csp.circuits.graph import (
    QUANTILES,
    node_id,
    node_locations,
    quantile_examples,
)


@pytest.fixture(scope="module")
def windows(rms_model):
    return torch.randint(0, rms_model.config.vocab_size, (24, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def index(rms_model, windows, one_thread):
    return build_example_index(rms_model, windows=windows, per_side=2, batch_size=5)  # several batches: the passes stream


@pytest.fixture(scope="module")
def activations(rms_model, windows):
    locations = node_locations(rms_model.config)
    with torch.no_grad(), rms_model.record_activations(locations) as acts:
        rms_model(windows, use_cache=False, logits_to_keep=1)
    return {loc: a.float() for loc, a in acts.items()}


def test_index_examples_equal_quantile_examples_on_the_same_tokens(rms_model, index, activations, windows):
    checked = exact = 0
    for loc, acts in activations.items():
        for ch in range(0, acts.shape[-1], 5):
            node = node_id(loc, ch)
            mine = index.quantile_examples(rms_model, node, per_side=2, before=6, after=2)
            theirs = quantile_examples(acts[:, :, ch], windows, 2, 6, 2)
            values = acts[:, :, ch].flatten()
            for side in ("top", "bottom"):
                for frac in map(str, QUANTILES):
                    a, b = mine[side][frac], theirs[side][frac]
                    assert len(a) == len(b), (node, side, frac)
                    for ex_a, ex_b in zip(a, b):
                        peak_a, peak_b = ex_a["activations"][ex_a["position"]], ex_b["activations"][ex_b["position"]]
                        assert peak_a == pytest.approx(peak_b, abs=1e-4), (node, side, frac)
                        if int(((values - peak_b).abs() < 1e-3).sum()) <= 1:  # no near-tie (same token, same position)
                            assert ex_a == ex_b, (node, side, frac)  # a peak without ties: the same window
                            exact += 1
                        checked += 1
    assert checked > 500 and exact > 50


def test_density_histogram_and_quantiles(rms_model, index, activations):
    loc = "1.mlp.post_act"
    for ch in (0, 7):
        x = activations[loc][:, :, ch].flatten()
        stats = index.node_stats(node_id(loc, ch))
        assert stats["density"] == pytest.approx(float((x.abs() >= 2.0 ** -14).float().mean()), abs=1e-6)
        assert sum(stats["counts"]) == x.numel() == stats["n_tokens"] and len(stats["edges"]) == len(stats["counts"]) + 1
        assert stats["edges"][0] == stats["min"] == pytest.approx(float(x.min()))
        assert stats["edges"][-1] == stats["max"] == pytest.approx(float(x.max()))
        # the stored bins: two per octave of |x| on each side of zero, one for |x| < 2**-14
        edges = hist_bin_edges()
        expected = [int(((x > lo) & (x <= hi)).sum()) if hi <= 0 else int(((x >= lo) & (x < hi)).sum())
                    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist())]
        expected[HIST_BINS // 2] = int((x.abs() < 2.0 ** -14).sum())
        assert index.hist[index.row(node_id(loc, ch))].tolist() == expected
        median = float(x.sort().values[int(0.5 * (x.numel() - 1))])
        assert stats["quantiles"][0.5] == pytest.approx(median, rel=0.04, abs=1e-6)


def test_save_load_round_trip_and_stale_index_refused(rms_model, index, tmp_path):
    folder = index.save(tmp_path / "idx")
    loaded = ExampleIndex.load(folder, rms_model)
    assert torch.equal(loaded.example_window, index.example_window) and loaded.meta == json.loads(json.dumps(index.meta))
    assert loaded.windows.dtype == torch.int16
    json.loads((folder / "index.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))

    changed = type(rms_model)(rms_model.config).eval()
    changed.load_state_dict(rms_model.state_dict())
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="built for other weights.*csp index-examples"):
        ExampleIndex.load(folder, changed)
    with pytest.raises(ValueError, match="other weights"):
        loaded.quantile_examples(changed, "0.mlp.post_act:0")


def test_corrupt_or_missing_files_are_one_line_errors(index, tmp_path):
    folder = index.save(tmp_path / "idx")
    data = (folder / "index.safetensors").read_bytes()
    (folder / "index.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"index\.safetensors: unreadable example index.*rebuild"):
        ExampleIndex.load(folder)
    (folder / "index.json").write_text('{"format": "csp-example-index", "version": 1, "weights_hash": NaN}')
    with pytest.raises(ValueError, match=r"index\.json: unreadable example index"):
        ExampleIndex.load(folder)
    with pytest.raises(ValueError, match="no example index here"):
        ExampleIndex.load(tmp_path / "nothing")


def test_cached_index_is_reused_and_a_bad_cache_rebuilt(rms_model, windows, tmp_path, one_thread):
    built = cached_example_index(rms_model, None, cache_dir=tmp_path, windows=windows[:4], per_side=1)
    folder = cache_folder(rms_model, tmp_path)
    assert (folder / "index.json").is_file()
    again = cached_example_index(rms_model, None, cache_dir=tmp_path, windows=windows[:2])
    assert again.n_tokens == built.n_tokens == 4 * 48  # from the cache, not rebuilt on 2 windows
    (folder / "index.safetensors").write_bytes(b"garbage")
    rebuilt = cached_example_index(rms_model, None, cache_dir=tmp_path, windows=windows[:2])
    assert rebuilt.n_tokens == 2 * 48


def test_token_count_caps():
    with pytest.raises(ValueError, match="outside 1,024..20,000,000"):
        check_token_count(50_000_000)


def test_the_shipped_index_belongs_to_the_shipped_model_and_is_small():
    from modeling_csp.circuits.example_index import folder_size, shipped_folder
    from modeling_csp.model.loading import DEFAULT_MODEL_DIR, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("default")
    index = ExampleIndex.load(shipped_folder(DEFAULT_MODEL_DIR), model)  # ValueError if built for other weights
    assert index.n_tokens >= 1_000_000 and "held-out CPython stdlib files" in index.meta["text"]
    assert index.density.numel() == 5632 and int(index.hist.sum(1).min()) == index.n_tokens
    assert folder_size(shipped_folder(DEFAULT_MODEL_DIR)) <= 15_000_000
