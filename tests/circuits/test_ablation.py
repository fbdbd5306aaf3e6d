"""Mean/zero ablation through model.intervene, against manual computations on a converted fixture model."""

import pytest
import torch
import torch.nn.functional as F

from modeling_csp.circuits.ablation import (
    ablate, all_kept, compute_mean_activations, frozen_norm_scales, mean_ablate, task_logits, zero_ablate,
)
from modeling_csp.circuits.evaluation import evaluate
from modeling_csp.circuits.graph import location_width, node_locations
from modeling_csp.model.modeling_csp import abs_topk
from modeling_csp.circuits.tasks import TaskBatch
from conftest import synthetic_batch


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def means(rms_model, tokens):
    return compute_mean_activations(rms_model, [tokens], cache_dir=False)


def test_means_match_recorded_activations(rms_model, tokens, means, tmp_path):
    with torch.no_grad(), rms_model.record_activations() as acts:
        rms_model(tokens)
    assert set(means) == set(node_locations(rms_model.config))
    for loc, mean in means.items():
        assert mean.shape == (location_width(rms_model.config, loc),)
        torch.testing.assert_close(mean, acts[loc].mean(dim=(0, 1)), atol=1e-5, rtol=1e-5)

    cached = compute_mean_activations(rms_model, [tokens], cache_dir=tmp_path)
    files = list(tmp_path.glob("means-*.pt"))
    assert len(files) == 1
    torch.save({k: v + 1 for k, v in cached.items()}, files[0])  # a cache hit returns what the file holds
    again = compute_mean_activations(rms_model, [tokens], cache_dir=tmp_path)
    torch.testing.assert_close(again["0.attn.q"], cached["0.attn.q"] + 1)
    compute_mean_activations(rms_model, [tokens[:4]], cache_dir=tmp_path)  # other tokens: another entry
    assert len(list(tmp_path.glob("means-*.pt"))) == 2


def test_all_kept_is_identity(rms_model, tokens, means):
    with torch.no_grad():
        clean = rms_model(tokens).logits
        with mean_ablate(rms_model, all_kept(rms_model.config), means):
            kept = rms_model(tokens).logits
    assert torch.equal(clean, kept)


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_location_fully_ablated_is_the_fill(rms_model, tokens, means, kind):
    masks = {"1.attn.v": torch.zeros(location_width(rms_model.config, "1.attn.v"), dtype=torch.bool)}
    ctx = mean_ablate(rms_model, masks, means) if kind == "mean" else zero_ablate(rms_model, masks)
    with torch.no_grad(), ctx, rms_model.record_activations(r"1\.attn\.v") as acts:
        rms_model(tokens)
    fill = means["1.attn.v"] if kind == "mean" else torch.zeros_like(means["1.attn.v"])
    torch.testing.assert_close(acts["1.attn.v"], fill.expand_as(acts["1.attn.v"]))


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_partial_ablation_matches_manual_layer(rms_model, tokens, means, kind):
    """Ablate some MLP neurons; the MLP's residual write must equal c_proj of the manually masked neurons."""
    loc = "0.mlp.post_act"
    keep = torch.rand(location_width(rms_model.config, loc), generator=torch.Generator().manual_seed(1)) < 0.5
    fill = means if kind == "mean" else None
    with torch.no_grad():
        with rms_model.record_activations(r"0\.mlp\.(post_act|resid_delta)") as clean:
            rms_model(tokens)
        with ablate(rms_model, {loc: keep}, fill), rms_model.record_activations(r"0\.mlp\.resid_delta") as ablated:
            rms_model(tokens)
    post = clean[loc]
    manual = torch.where(keep, post, means[loc] if kind == "mean" else torch.zeros_like(post))
    delta = rms_model.transformer.h[0].mlp.c_proj(manual)
    if "mlp_out" in rms_model.config.afrac_locations:
        delta = abs_topk(delta, int(rms_model.config.afrac * delta.shape[-1]))
    torch.testing.assert_close(ablated["0.mlp.resid_delta"], delta, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ablated["0.mlp.resid_delta"], clean["0.mlp.resid_delta"])


def test_gradients_flow_to_float_masks(rms_model, tokens, means):
    mask = torch.ones(location_width(rms_model.config, "2.mlp.post_act"), requires_grad=True)
    with ablate(rms_model, {"2.mlp.post_act": mask}, means):
        loss = F.cross_entropy(rms_model(tokens).logits[:, -1], tokens[:, 0])
    loss.backward()
    assert torch.isfinite(mask.grad).all() and mask.grad.abs().sum() > 0


def test_bad_masks_and_vocab(rms_model, means):
    with pytest.raises(ValueError, match=r"expected \(64,\)"):
        with ablate(rms_model, {"0.attn.q": torch.ones(3)}, means):
            pass
    too_big = TaskBatch(torch.full((2, 4), 600), torch.ones(2, 4, dtype=torch.long), torch.full((2,), 3),
                        torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not belong to this model"):
        task_logits(rms_model, too_big)


def test_frozen_norm_scales(rms_model, means):
    batch = synthetic_batch(rms_model)
    with torch.no_grad():
        clean = task_logits(rms_model, batch)
        with frozen_norm_scales(rms_model, batch):
            frozen = task_logits(rms_model, batch)
    torch.testing.assert_close(clean, frozen, atol=1e-5, rtol=1e-5)  # nothing ablated: same numbers
    masks = {"0.attn.resid_delta": torch.zeros(64, dtype=torch.bool)}
    assert evaluate(rms_model, batch, masks, means, freeze_norm_scales=True) != evaluate(rms_model, batch, masks, means)
    assert "forward" not in vars(rms_model.transformer.ln_f)  # patched forwards are removed again
