"""What a node does: direct logit effects (checked against the model's own forward pass with the node's write added
to the final residual) and read drivers (checked against the read computed by hand from the model's weights)."""

import pytest
import torch

from conftest import app_test_model, random_ids
from modeling_csp.circuits.ablation import compute_mean_activations
from modeling_csp.circuits.graph import CircuitGraph, location_width
from modeling_csp.circuits.logit_effects import (
    direct_logit_effects, mean_final_norm_scale, read_drivers, residual_direction, token_drives,
)
from modeling_csp.circuits.walking import why_node
from modeling_csp.model.modeling_csp import abs_topk


@pytest.fixture(scope="module")
def default_model(one_thread):
    from modeling_csp.model.loading import load_model_and_tokenizer

    spec = app_test_model()
    if spec is None:
        pytest.skip("no default model installed")
    return load_model_and_tokenizer(spec)


@torch.no_grad()
def logit_change_from_final_residual(model, ids, direction, amount=0.5):
    """(change of the logits at every position, the final norm's scale there) when `amount` x `direction` is added
    to the final residual with the final norm's per-position scale held at its clean value: the direct path."""
    with model.record_activations(["ln_f.scale"]) as clean:
        base = model(ids, use_cache=False).logits
    scale = clean["ln_f.scale"]
    with model.intervene({"final_resid": lambda x: x + amount * direction.to(x.dtype),
                          "ln_f.scale": lambda s: scale}):
        moved = model(ids, use_cache=False).logits
    return (moved - base) / amount, scale[..., 0]


def check_against_forward(model, node):
    ids = random_ids(model, n=1, T=6, seed=3)
    direction, _ = residual_direction(model, node)
    change, scale = logit_change_from_final_residual(model, ids, direction)
    for pos in (0, 5):
        fx = direct_logit_effects(model, node, top=10, norm_scale=float(scale[0, pos]))
        torch.testing.assert_close(fx.logits, change[0, pos].float(), atol=1e-4, rtol=1e-4)
        assert [i for i, _ in fx.up] == change[0, pos].topk(10).indices.tolist()
        assert [i for i, _ in fx.down] == (-change[0, pos]).topk(10).indices.tolist()
        assert fx.up[0][1] >= fx.up[-1][1] and fx.down[0][1] <= fx.down[-1][1]


@pytest.mark.parametrize("node", ["3.mlp.post_act:17", "2.attn.resid_delta:5", "1.attn.v:40", "0.attn.act_in:9"])
def test_direct_logit_effects_match_the_default_models_forward_pass(default_model, node):
    check_against_forward(default_model[0], node)


@pytest.mark.parametrize("name", ["rms_sink_bigram", "ln_gpt2"])  # RMSNorm; LayerNorm (centres the write first)
def test_direct_logit_effects_match_a_fixture_models_forward_pass(models, name, one_thread):
    model = models[name]
    for node in (f"{model.config.n_layer - 1}.mlp.post_act:3", "0.mlp.resid_delta:7", "0.attn.v:2"):
        check_against_forward(model, node)


def test_mlp_neuron_direction_is_its_output_column(default_model):
    model, _ = default_model
    d, path = residual_direction(model, "3.mlp.post_act:17")
    assert torch.equal(d, model.transformer.h[3].mlp.c_proj.weight[:, 17].float()) and "c_proj column 17" in path
    with pytest.raises(ValueError, match="attention pattern"):
        direct_logit_effects(model, "1.attn.q:3")
    with pytest.raises(ValueError, match="not in this model"):
        direct_logit_effects(model, "9.mlp.post_act:3")
    with pytest.raises(ValueError, match="top must be"):
        direct_logit_effects(model, "3.mlp.post_act:17", top=0)
    with pytest.raises(ValueError, match="norm_scale"):
        direct_logit_effects(model, "3.mlp.post_act:17", norm_scale=float("nan"))


def test_mean_final_norm_scale_is_the_recorded_mean(default_model):
    model, _ = default_model
    ids = random_ids(model, n=2, T=8)
    with torch.no_grad(), model.record_activations(["ln_f.scale"]) as acts:
        model(ids, use_cache=False)
    assert mean_final_norm_scale(model, ids, batch_size=1) == pytest.approx(float(acts["ln_f.scale"].mean()), rel=1e-5)


@torch.no_grad()
def reads_by_hand(model, layer, kind, index):
    """The read node's value on each token's embedding alone, from the weights: the sublayer's norm, AbsTopK where the
    config puts it, the linear read (and its bias)."""
    block = model.transformer.h[layer]
    afrac = {loc: model.config.afrac for loc in model.config.afrac_locations} if model.config.afrac else {}
    x = model.transformer.wte.weight.float()
    norm = block.ln_1 if kind.startswith("attn") else block.ln_2
    read = norm(x)
    sparse_at = "attn_in" if kind.startswith("attn") else "mlp_in"
    if sparse_at in afrac:
        read = abs_topk(read, int(afrac[sparse_at] * read.shape[-1]))
    if kind.endswith("act_in"):
        return read[:, index]
    if kind == "mlp.post_act":
        fc = block.mlp.c_fc
        return read @ fc.weight[index] + (fc.bias[index] if fc.bias is not None else 0)
    width = model.config.n_head * model.config.d_head
    offset = {"attn.q": 0, "attn.k": width, "attn.v": 2 * width}[kind]
    qkv = read @ block.attn.c_attn.weight.T + (block.attn.c_attn.bias if block.attn.c_attn.bias is not None else 0)
    part = qkv[:, offset: offset + width]
    loc = {"attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v"}[kind]
    if loc in afrac:
        part = abs_topk(part, int(afrac[loc] * width))
    return part[:, index]


@pytest.mark.parametrize("node", ["1.attn.q:5", "2.attn.k:70", "0.attn.v:3", "1.attn.act_in:12", "2.mlp.act_in:8",
                                  "3.mlp.post_act:17"])
def test_token_drives_match_the_read_by_hand_on_the_default_model(default_model, node):
    model, _ = default_model
    location, index = node.rsplit(":", 1)
    layer, kind = location.split(".", 1)
    torch.testing.assert_close(token_drives(model, node), reads_by_hand(model, int(layer), kind, int(index)),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("node", ["1.attn.q:2", "0.attn.k:10", "1.mlp.post_act:5", "0.mlp.act_in:4"])
def test_token_drives_match_the_read_by_hand_on_a_fixture_model(models, node, one_thread):
    model = models["ln_gpt2"]  # LayerNorm and biases
    location, index = node.rsplit(":", 1)
    layer, kind = location.split(".", 1)
    torch.testing.assert_close(token_drives(model, node), reads_by_hand(model, int(layer), kind, int(index)),
                               atol=1e-4, rtol=1e-4)


def test_read_drivers_rank_tokens_and_circuit_inputs(default_model):
    model, tokenizer = default_model
    circuit = CircuitGraph.load(next(iter(sorted((model_dir(model) / "circuits").glob("*_k24.json")))), model=model)
    means = compute_mean_activations(model, tokenizer)
    node = next(n for n in circuit.nodes if n.split(".")[1:2] in (["attn"], ["mlp"]) and ":" in n
                and n.split(":")[0].endswith(("q", "k", "v", "act_in", "post_act"))
                and any(e.target == n for e in circuit.edges))
    drivers = read_drivers(model, node, circuit, means, top=5)
    drives = token_drives(model, node)
    assert [i for i, _ in drivers.tokens_up] == drives.topk(5).indices.tolist()
    assert drivers.tokens_down[0][1] == pytest.approx(float(drives.min()), abs=1e-6)
    assert drivers.upstream == why_node(model, circuit, node, means, top=5) and drivers.upstream
    assert read_drivers(model, node).upstream is None  # no circuit: tokens only
    with pytest.raises(ValueError, match="write channel"):
        read_drivers(model, "1.mlp.resid_delta:3")


def model_dir(model):
    from pathlib import Path

    return Path(model.config._name_or_path)


def test_every_location_kind_has_a_reading(default_model):
    """Each node either writes to the logits or reads (or both): the panel always has something to show."""
    model, _ = default_model
    for location in ("0.attn.act_in", "0.attn.q", "0.attn.k", "0.attn.v", "0.attn.resid_delta", "0.mlp.act_in",
                     "0.mlp.post_act", "0.mlp.resid_delta"):
        assert location_width(model.config, location) > 0
        node = f"{location}:0"
        try:
            direct_logit_effects(model, node, top=1)
        except ValueError:
            token_drives(model, node)
