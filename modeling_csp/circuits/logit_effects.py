"""What a node does: its direct effect on the logits (write side) and what drives it (read side).

    from modeling_csp.circuits.logit_effects import direct_logit_effects, read_drivers, mean_final_norm_scale
    scale = mean_final_norm_scale(model, windows)           # the final norm's typical 1/rms
    fx = direct_logit_effects(model, "3.mlp.post_act:12", norm_scale=scale)
    fx.up, fx.down                                           # [(token id, logit change per unit activation)] x 10
    drivers = read_drivers(model, "1.attn.q:5", circuit, means)
    drivers.tokens_up, drivers.upstream                      # tokens and circuit nodes that drive it most

Write side. A node writes a vector `d` into the residual stream per unit of its activation:

    {l}.attn.resid_delta:c, {l}.mlp.resid_delta:c   d = e_c (the channel itself)
    {l}.mlp.post_act:j                              d = mlp.c_proj[:, j]
    {l}.attn.v:i                                    d = attn.c_proj[:, i]   (the OV path: value channel i is the
                                                    output channel y_i, a per-head mix of v over positions)
    {l}.attn.act_in:c                               d = attn.c_proj @ W_V[:, c]  (the OV path from a read channel)

Its direct effect is `d` read straight through the final norm and the unembedding, skipping every later
sublayer, as the model computes logits (`lm_head(ln_f(x))`): with the norm's per-position scale s = 1/rms (1/std
for LayerNorm, whose mean subtraction centres d first) held fixed, adding d to the final residual changes the
logits by `s * W_U @ (gain * d)`. The norm's bias, the logit bias and the bigram table do not depend on x.
s is positive and the same for every token, so it scales the effects and never reorders them: pass the typical
one (`mean_final_norm_scale`) for logits at a typical position. AbsTopK and a ReLU on the residual stream (where
a config has them) are not in this linear path.

Read side (q, k, v, act_in, and an MLP neuron's input). The tokens that drive a node: its activation when the
residual stream entering its sublayer is one token's embedding alone (no position embedding; a concatenated
position embedding is at position 0), computed by the model's own forward pass with that residual put in place,
so the read norm, AbsTopK and the activation function are all the model's. The circuit nodes that drive it: its
inputs by weight x mean activation (`walking.why_node`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..utils.devices import input_device
from .graph import CircuitGraph, location_width, parse_location, parse_node_id
from .walking import Contribution, why_node

WRITE_KINDS = ("attn.resid_delta", "mlp.resid_delta", "mlp.post_act", "attn.v", "attn.act_in")
READ_KINDS = ("attn.act_in", "attn.q", "attn.k", "attn.v", "mlp.act_in", "mlp.post_act")
MAX_TOP = 100


@dataclass
class LogitEffects:
    """A node's direct logit effects per unit of its activation: `up` and `down` the top tokens as
    [(token id, logit change)], `logits` the whole (vocab,) vector, `path` how it reaches the logits."""

    node: str
    path: str
    norm_scale: float
    up: list[tuple[int, float]]
    down: list[tuple[int, float]]
    logits: torch.Tensor = field(repr=False)


@dataclass
class ReadDrivers:
    """What drives a read node: tokens by its activation on their embedding alone (`tokens_up`, `tokens_down`:
    [(token id, activation)]) and, with a circuit and means, its circuit inputs (`upstream`, `walking.why_node`)."""

    node: str
    tokens_up: list[tuple[int, float]]
    tokens_down: list[tuple[int, float]]
    upstream: list[Contribution] | None = None


def _check_top(top: int) -> int:
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
        raise ValueError(f"top must be an integer from 1 to {MAX_TOP}, not {top!r}")
    return top


def _check_in_model(model, node: str) -> tuple[int, str, int]:
    location, index = parse_node_id(node)
    layer, kind = parse_location(location)
    if layer >= model.config.n_layer:
        raise ValueError(f"node {node!r} is not in this model: it has layers 0 to {model.config.n_layer - 1}")
    if index >= location_width(model.config, location):
        raise ValueError(f"node {node!r} is not in this model: {location} has channels 0 to "
                         f"{location_width(model.config, location) - 1}")
    return layer, kind, index


def is_write_node(node: str) -> bool:
    return parse_node_id(node)[0].split(".", 1)[1] in WRITE_KINDS


def is_read_node(node: str) -> bool:
    return parse_node_id(node)[0].split(".", 1)[1] in READ_KINDS


@torch.no_grad()
def residual_direction(model, node: str) -> tuple[torch.Tensor, str]:
    """(d, path): the (d_model,) vector the node writes into the residual stream per unit activation, and a phrase
    for the path (see the module docstring). ValueError for q and k (they act through the attention pattern) and
    the MLP's act_in (it reaches the residual only through the nonlinear neurons)."""
    layer, kind, index = _check_in_model(model, node)
    block = model.transformer.h[layer]
    d_model = model.config.d_model
    if kind.endswith("resid_delta"):
        d = torch.zeros(d_model, device=block.mlp.c_proj.weight.device)
        d[index] = 1.0
        return d, f"residual channel {index}"
    if kind == "mlp.post_act":
        return block.mlp.c_proj.weight[:, index].float(), f"mlp.c_proj column {index}"
    width = model.config.n_head * model.config.d_head
    if kind == "attn.v":
        return block.attn.c_proj.weight[:, index].float(), f"OV path: attn.c_proj column {index} (value channel {index})"
    if kind == "attn.act_in":
        w_v = block.attn.c_attn.weight[2 * width:, index].float()
        return block.attn.c_proj.weight.float() @ w_v, f"OV path: attn.c_proj @ W_V[:, {index}]"
    raise ValueError(f"{node} has no direct path to the logits: q and k channels act through their head's attention "
                     "pattern and an MLP's act_in through its neurons; read_drivers tells what drives it")


@torch.no_grad()
def direct_logit_effects(model, node: str, top: int = 10, norm_scale: float = 1.0) -> LogitEffects:
    """The node's direct effect on the logits per unit of its activation, the `top` tokens it raises and lowers most
    (see the module docstring for which nodes and how: through the final norm with its scale `norm_scale` held fixed,
    then the unembedding)."""
    _check_top(top)
    if not (isinstance(norm_scale, (int, float)) and norm_scale > 0 and norm_scale < float("inf")):
        raise ValueError(f"norm_scale must be a positive finite number (the final norm's 1/rms), not {norm_scale!r}")
    d, path = residual_direction(model, node)
    ln_f = model.transformer.ln_f
    if not isinstance(ln_f, torch.nn.RMSNorm):
        d = d - d.mean()  # LayerNorm subtracts the mean before scaling
    gain = ln_f.weight.float() if getattr(ln_f, "weight", None) is not None else torch.ones_like(d)
    logits = float(norm_scale) * (model.lm_head.weight.float() @ (gain * d))
    k = min(top, logits.numel())
    up, down = logits.topk(k), (-logits).topk(k)
    return LogitEffects(
        node, path + " → final norm → unembedding", float(norm_scale),
        [(int(i), float(v)) for v, i in zip(up.values.tolist(), up.indices.tolist())],
        [(int(i), -float(v)) for v, i in zip(down.values.tolist(), down.indices.tolist())],
        logits.cpu(),
    )


@torch.no_grad()
def mean_final_norm_scale(model, input_ids: torch.Tensor, batch_size: int = 32) -> float:
    """The final norm's per-position scale (1/rms, or 1/std for LayerNorm) averaged over every position of the
    (n, T) windows `input_ids` (held-out text: `ablation.example_windows`)."""
    device = input_device(model)
    total, count = 0.0, 0
    for chunk in input_ids.split(batch_size):
        with model.record_activations(["ln_f.scale"]) as acts:
            model.transformer(chunk.to(device), use_cache=False)
        total += float(acts["ln_f.scale"].double().sum())
        count += acts["ln_f.scale"].numel()
    if count == 0:
        raise ValueError("no tokens given to measure the final norm's scale on")
    return total / count


@torch.no_grad()
def token_drives(model, node: str) -> torch.Tensor:
    """(vocab,) the read node's activation when the residual stream entering its sublayer is each token's embedding
    alone (a one-token sequence), by the model's own forward pass. An MLP neuron reads its pre-activation
    (`mlp.pre_act`, before the activation function and AbsTopK), as the graph's edges into it do."""
    layer, kind, index = _check_in_model(model, node)
    if kind not in READ_KINDS:
        raise ValueError(f"{node} is a write channel: it reads nothing of its own (direct_logit_effects tells what it "
                         "does; its circuit inputs are in why_node)")
    device = input_device(model)
    vocab = model.config.vocab_size
    wte = model.transformer.wte.weight
    entry = f"{layer}.resid_in" if kind.startswith("attn") else f"{layer}.resid_mid"
    location = f"{layer}.mlp.pre_act" if kind == "mlp.post_act" else f"{layer}.{kind}"
    out = []

    def grab(x):  # the value, and no later layer computed
        out.append(x[:, 0, index].detach().float())
        raise _Reached

    for start in range(0, vocab, 512):
        ids = torch.arange(start, min(vocab, start + 512), device=device).unsqueeze(1)  # (b, 1)
        embedding = wte[ids].to(wte.dtype)  # (b, 1, d_model)
        try:
            with model.intervene({entry: lambda x, e=embedding: e.to(x.dtype), location: grab}):
                model.transformer(ids, use_cache=False)
        except _Reached:
            pass
    return torch.cat(out).cpu()


class _Reached(Exception):
    """Ends a forward pass at the hook point `token_drives` reads."""


def read_drivers(model, node: str, circuit: CircuitGraph | None = None, means: dict[str, torch.Tensor] | None = None,
                 top: int = 10) -> ReadDrivers:
    """The `top` tokens that drive the read node most up and down (`token_drives`) and, given the circuit and its
    mean activations, its circuit inputs ranked by |weight x mean activation| (`walking.why_node`)."""
    _check_top(top)
    drives = token_drives(model, node)
    k = min(top, drives.numel())
    up, down = drives.topk(k), (-drives).topk(k)
    upstream = why_node(model, circuit, node, means, top=top) if circuit is not None and means is not None else None
    return ReadDrivers(node, [(int(i), float(v)) for v, i in zip(up.values.tolist(), up.indices.tolist())],
                       [(int(i), -float(v)) for v, i in zip(down.values.tolist(), down.indices.tolist())], upstream)


def describe_node(model, tokenizer, circuit: CircuitGraph, node: str, means: dict[str, torch.Tensor],
                  norm_scale: float = 1.0, top: int = 10) -> dict:
    """Everything above about one circuit node as plain JSON-ready data (what `csp node` prints and the app's node
    panel shows): its upstream and downstream walks, why it fires (`why`), its direct logit effects (write nodes,
    else null) and the tokens that drive it (read nodes, else null). Token ids come with their text."""
    from ..model.tokenization import token_text
    from .walking import downstream, upstream

    _check_top(top)
    up, down = upstream(circuit, node), downstream(circuit, node)

    def tokens(pairs, value_name):
        return [{"id": i, "token": token_text(tokenizer, i), value_name: v} for i, v in pairs]

    effects = drivers = None
    if is_write_node(node):
        fx = direct_logit_effects(model, node, top, norm_scale)
        effects = {"path": fx.path, "norm_scale": fx.norm_scale, "up": tokens(fx.up, "logit"),
                   "down": tokens(fx.down, "logit")}
    if is_read_node(node):
        rd = read_drivers(model, node, top=top)
        drivers = {"tokens_up": tokens(rd.tokens_up, "activation"), "tokens_down": tokens(rd.tokens_down, "activation")}
    return {
        "node": node,
        "upstream": {"nodes": up.nodes, "n_edges": len(up.edges)},
        "downstream": {"nodes": down.nodes, "n_edges": len(down.edges)},
        "why": [asdict(r) for r in why_node(model, circuit, node, means, top=top)],
        "logit_effects": effects,
        "drivers": drivers,
    }


__all__ = ["describe_node", "LogitEffects", "ReadDrivers", "direct_logit_effects", "read_drivers", "token_drives",
           "residual_direction", "mean_final_norm_scale", "is_write_node", "is_read_node", "WRITE_KINDS", "READ_KINDS"]
