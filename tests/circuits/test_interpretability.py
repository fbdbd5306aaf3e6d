"""The interpretability API, TransformerLens-style: run_with_cache, flexible names, extra hook points, recording
across generate, gradients and attributions, module hooks, and hooks that are private to each thread."""

import threading

import pytest
import torch

from conftest import CHECKPOINTS, random_ids
from modeling_csp.circuits.ablation import ablate, frozen_norm_scales, task_logits
from modeling_csp.circuits.evaluation import evaluate, node_attributions, task_loss
from modeling_csp.circuits.graph import location_width, node_locations


# ---- run_with_cache and the cache -------------------------------------------------------------


def test_run_with_cache_takes_a_regex_a_list_or_a_callable(models):
    model = models["rms_sink_bigram"]
    ids = random_ids(model)
    out, cache = model.run_with_cache(ids, names=r"1\.attn\.(q|k)")
    assert list(cache) == ["1.attn.k", "1.attn.q"] and torch.equal(out.logits, model(ids).logits)
    _, cache = model.run_with_cache(ids, names=["0.mlp.post_act", r"\d+\.resid_mid"])
    assert list(cache) == ["0.resid_mid", "0.mlp.post_act", "1.resid_mid", "2.resid_mid"]  # forward order
    _, cache = model.run_with_cache(ids, names=lambda name: name.endswith("resid_delta"))
    assert len(cache) == 2 * model.config.n_layer
    _, default = model.run_with_cache(ids)
    assert list(default) == model.hook_names()  # the reference's hook points
    with pytest.raises(KeyError, match="unknown hook name"):
        model.run_with_cache(ids, names=["0.attn.qq"])


def test_cache_views_heads_stacks_and_moves(models):
    model = models["rms_sink_bigram"]
    _, cache = model.run_with_cache(random_ids(model), names=r"\d+\.attn\.(q|y)|\d+\.resid_in")
    H, dh = model.config.n_head, model.config.d_head
    assert cache.heads("1.attn.q").shape == (2, 16, H, dh)
    assert torch.equal(cache.heads("1.attn.q")[:, :, 2], cache["1.attn.q"][:, :, 2 * dh:3 * dh])
    with pytest.raises(KeyError, match="has no heads"):
        cache.heads("0.resid_in")
    assert cache.stack(r"\d+\.resid_in").shape == (model.config.n_layer, 2, 16, model.config.d_model)
    moved = cache.to("meta")
    assert moved["0.attn.q"].device.type == "meta" and moved.heads("0.attn.q").shape == (2, 16, H, dh)


def test_recording_the_extra_points_leaves_the_reference_hooks_unchanged(models):
    model = models["catpos_relu_bf16"]  # AbsTopK everywhere, concatenated positions
    ids = random_ids(model)
    _, plain = model.run_with_cache(ids)
    _, everything = model.run_with_cache(ids, names=".*")
    assert set(everything) == set(model.hook_names(extra=True))
    for name, value in plain.items():
        assert (everything[name] - value).abs().max() <= 1e-5, name


# ---- the extra hook points ----------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_attention_patterns_and_the_sinks_share(name, models):
    model = models[name]
    ids = random_ids(model)
    out, cache = model.run_with_cache(ids, names=r"\d+\.attn\.(pattern|sink)", output_attentions=True)
    pattern = cache["0.attn.pattern"]
    assert pattern.shape == (2, model.config.n_head, 16, 16) and torch.all(pattern.triu(1) == 0)
    total = pattern.sum(-1) + (cache["0.attn.sink"] if model.config.sink else 0)
    assert (total - 1).abs().max() <= 1e-5
    assert torch.equal(out.attentions[0], pattern)
    assert ("0.attn.sink" in model.hook_names(extra=True)) == model.config.sink


def test_patching_an_attention_pattern_changes_what_the_head_writes(models):
    model = models["rms_sink_bigram"]
    ids = random_ids(model)

    def uniform(p):
        causal = torch.ones_like(p).tril()
        return causal / causal.sum(-1, keepdim=True)

    with torch.no_grad(), model.intervene({"0.attn.pattern": uniform}), model.record_activations(r"0\.attn\.(pattern|y)") as acts:
        model(ids)
    _, clean = model.run_with_cache(ids, names=r"0\.attn\.(v|y)")
    v = clean.heads("0.attn.v").transpose(1, 2)  # (B, H, T, dh)
    expected = (uniform(acts["0.attn.pattern"]) @ v).transpose(1, 2).reshape(2, 16, -1)
    assert (acts["0.attn.y"] - expected).abs().max() <= 1e-5
    assert (acts["0.attn.y"] - clean["0.attn.y"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="can be recorded, not replaced"), model.intervene({"0.attn.sink": lambda s: s * 0}):
        model(ids)


def test_embeddings_pre_activation_and_norm_scales(models):
    model = models["ln_gpt2"]
    ids = random_ids(model)
    _, c = model.run_with_cache(ids, names=["tok_emb", "pos_emb", r"\d+\.mlp\.(pre|post)_act", r"\d+\.ln_1\.scale", r"\d+\.resid_in"])
    assert torch.allclose(c["tok_emb"] + c["pos_emb"], c["0.resid_in"])
    assert torch.equal(c["0.mlp.post_act"], model.transformer.h[0].mlp.act_fn(c["0.mlp.pre_act"]))
    x = c["1.resid_in"]
    assert torch.allclose(c["1.ln_1.scale"], torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5))


# ---- interventions ------------------------------------------------------------------------------


def test_intervene_takes_regex_keys_and_transformerlens_style_functions(models):
    model = models["rms_sink_bigram"]
    ids = random_ids(model)
    seen = []

    def tl_style(act, hook):  # TransformerLens passes (activation, hook) and reads hook.name
        seen.append(hook.name)
        return act * 0

    with torch.no_grad(), model.intervene({r"\d+\.mlp\.post_act": tl_style}), model.record_activations(r"\d+\.mlp\.resid_delta") as acts:
        model(ids)
    assert seen == [f"{l}.mlp.post_act" for l in range(model.config.n_layer)]
    assert all(torch.all(acts[f"{l}.mlp.resid_delta"] == 0) for l in range(model.config.n_layer))
    with torch.no_grad(), model.intervene({"0.mlp.post_act": lambda a: a * 0}), model.record_activations("0.mlp.resid_delta") as one:
        model(ids)
    assert torch.all(one["0.mlp.resid_delta"] == 0)


def test_concurrent_interventions_on_one_model_equal_serial_runs(models):
    """Hooks belong to the calling thread: four threads with different interventions share one model, no lock."""
    model = models["rms_sink_bigram"]
    ids = random_ids(model, n=4, T=32)
    width = model.config.d_mlp
    plans = [{f"{l}.mlp.post_act": (lambda x, i=i: x * (torch.arange(width) % 4 != i))} for i, l in enumerate([0, 1, 2, 0])]

    def run(plan):
        with torch.no_grad(), model.intervene(plan), model.record_activations(r"\d+\.mlp\.post_act") as acts:
            return model(ids).logits, dict(acts)

    serial = [run(plan) for plan in plans]
    results, barrier = [None] * len(plans), threading.Barrier(len(plans))

    def worker(i):
        barrier.wait()
        results[i] = [run(plans[i]) for _ in range(5)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (logits, acts), runs in zip(serial, results):
        for got_logits, got_acts in runs:
            assert torch.equal(got_logits, logits)
            assert all(torch.equal(got_acts[k], v) for k, v in acts.items())
    assert len({round(float(l.sum()), 3) for l, _ in serial}) == len(plans)  # the plans really differ


def test_frozen_norm_scales_intervene_instead_of_patching_modules(models, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import synthetic_batch

    model = models["rms_sink_bigram"]
    batch = synthetic_batch(model, n=8)
    masks = {loc: torch.rand(location_width(model.config, loc), generator=torch.Generator().manual_seed(1)) > 0.5
             for loc in node_locations(model.config)}
    means = {loc: torch.zeros(location_width(model.config, loc)) for loc in masks}
    with torch.no_grad():
        assert evaluate(model, batch, None, None, freeze_norm_scales=True) == evaluate(model, batch)  # nothing ablated
        frozen = evaluate(model, batch, masks, means, freeze_norm_scales=True)
        assert frozen != evaluate(model, batch, masks, means)
        with frozen_norm_scales(model, batch):
            assert all("forward" not in m.__dict__ for m in model.modules())
    offloaded = AutoModelForCausalLM.from_pretrained(converted["rms_sink_bigram"], trust_remote_code=True, device_map="auto",
                                                     max_memory={"cpu": "1MB"}, offload_folder=str(tmp_path / "off")).eval()
    with torch.no_grad():
        assert evaluate(offloaded, batch, masks, means, freeze_norm_scales=True) == pytest.approx(frozen, abs=1e-6)


# ---- across generate, gradients, attributions -----------------------------------------------------


def test_recording_across_generate_keeps_every_step(models):
    model = models["rms_sink_bigram"]
    prompt = random_ids(model, n=1, T=6)
    with torch.no_grad(), model.record_activations(["0.resid_in", "1.attn.pattern"], steps=True) as acts:
        out = model.generate(prompt, max_new_tokens=5, do_sample=False)
    steps = acts["0.resid_in"]
    assert [s.shape[1] for s in steps] == [6, 1, 1, 1, 1]  # the prompt, then one token per step (KV cache)
    assert acts.concat("0.resid_in").shape == (1, 10, model.config.d_model)
    assert [p.shape[-1] for p in acts["1.attn.pattern"]] == [6, 7, 8, 9, 10]  # each step attends to the cache
    with torch.no_grad():
        _, full = model.run_with_cache(out[:, :-1], names="0.resid_in")
    assert (acts.concat("0.resid_in") - full["0.resid_in"]).abs().max() <= 1e-5


def test_record_gradients_gives_activation_gradients(models):
    model = models["rms_sink_bigram"]
    ids = random_ids(model)
    with model.record_activations("1.resid_mid", detach=False) as acts, model.record_gradients("1.resid_mid") as grads:
        loss = model(ids, labels=ids).loss
        (expected,) = torch.autograd.grad(loss, [acts["1.resid_mid"]], retain_graph=True)
        loss.backward()
    assert torch.allclose(grads["1.resid_mid"], expected)
    model.zero_grad(set_to_none=True)


def test_node_attributions_are_the_first_order_effect_of_mean_ablation(models):
    from conftest import synthetic_batch

    model = models["rms_sink_bigram"]
    model.requires_grad_(False)  # works with frozen weights too
    batch = synthetic_batch(model, n=8)
    means = {loc: torch.randn(location_width(model.config, loc), generator=torch.Generator().manual_seed(2)) * 0.1
             for loc in node_locations(model.config)}
    attributions = node_attributions(model, batch, means)
    loc, eps = "1.mlp.post_act", 1e-3
    top = attributions[loc].abs().topk(3).indices.tolist()
    with torch.no_grad():
        base = task_loss(task_logits(model, batch), batch).item()
        for i in top:  # move node i a small step towards its mean: loss change / step = the attribution
            m = torch.ones(location_width(model.config, loc))
            m[i] = 1 - eps
            with ablate(model, {loc: m}, means):
                changed = task_loss(task_logits(model, batch), batch).item()
            assert (changed - base) / eps == pytest.approx(float(attributions[loc][i]), rel=0.05, abs=1e-4)
    model.requires_grad_(True)


# ---- module hooks ------------------------------------------------------------------------------------


def test_module_hooks_see_batch_time_features_on_every_kernel_path(models):
    model = models["rms_sink_bigram"]
    ids = random_ids(model, n=3, T=11)
    mlp = model.transformer.h[0].mlp
    seen = {}
    handles = [module.register_forward_hook(lambda mod, args, out, key=key: seen.__setitem__(key, (args[0].shape, out)))
               for key, module in (("act_fn", mlp.act_fn), ("c_fc", mlp.c_fc))]
    try:
        for sparse in (True, False):
            model.set_sparse_kernels(sparse)
            with torch.no_grad():
                _, cache = model.run_with_cache(ids, names=r"0\.mlp\.(pre|post)_act")
            assert seen["act_fn"][0] == (3, 11, model.config.d_mlp) and seen["c_fc"][1].shape == (3, 11, model.config.d_mlp)
            assert torch.equal(seen["act_fn"][1], cache["0.mlp.post_act"]) and torch.equal(seen["c_fc"][1], cache["0.mlp.pre_act"])
    finally:
        model.set_sparse_kernels(True)
        for h in handles:
            h.remove()
