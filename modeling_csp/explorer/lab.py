"""The prompt lab's research views: every head of a layer on the user's prompt, and activation patching of the
circuit's nodes between a clean and a corrupted prompt (`modeling_csp.circuits.patching`).

Computations take a `ModelEntry` and check what the user typed (one-line `UserError`s); the `*_panel` functions
take what the page holds and return ready-to-show results, a problem as its message with every old reading
cleared.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import plotting
from ..circuits.graph import CircuitGraph
from ..circuits.patching import patch_prompts, rank_nodes
from . import analysis as A
from .errors import UserError, markdown_literal
from .explorer import Explorer
from .models import ModelEntry
from .panels import _explain, _selection, warning_markdown

DEFAULT_CLEAN, DEFAULT_CORRUPT = "x = 'a", 'x = "a'
DEFAULT_CANDIDATES = ("'", '"')


# ---- attention of every head of a layer on a prompt -------------------------------------------------


@dataclass(frozen=True)
class PromptAttention:
    """The attention probabilities of every head of `layer` on the prompt: (heads, T, T) over its tokens, and
    per head and query token the attention sink's share (None for a model without a sink)."""

    layer: int
    tokens: list[str]
    patterns: list[list[list[float]]]
    sink: list[list[float]] | None
    notices: list[str] = field(default_factory=list)


def layer_choices(entry: ModelEntry) -> list[str]:
    return [str(l) for l in range(entry.n_layer)]


def parse_layer(entry: ModelEntry, layer: Any) -> int:
    """A layer as the page holds it ('1', 1, None for the first) checked against the model."""
    text = str(layer).strip() if layer not in (None, "") else "0"
    if not re.fullmatch(r"\d{1,4}", text) or int(text) >= entry.n_layer:
        raise UserError(f"layer {text[:20]!r} does not exist: this model has layers 0 to {entry.n_layer - 1}")
    return int(text)


def prompt_attention(entry: ModelEntry, prompt: str | None, layer: Any) -> PromptAttention:
    layer = parse_layer(entry, layer)
    ids, notices = A.encode_prompt(entry, prompt)
    _, acts = entry.run_forward(torch.tensor([ids]), record=rf"{layer}\.attn\.(?:pattern|sink)")
    pattern = acts[f"{layer}.attn.pattern"][0].float()  # (H, T, T)
    sink = acts.get(f"{layer}.attn.sink")
    return PromptAttention(layer, entry.token_strs(ids), pattern.tolist(),
                           None if sink is None else sink[0].float().tolist(), notices)


@dataclass
class AttentionPanel:
    notice: str = ""
    figure: Any = None
    tokens: str = ""
    layers: list[str] = field(default_factory=list)
    layer: str | None = None


def attention_panel(explorer: Explorer, model: Any, prompt: Any, layer: Any) -> AttentionPanel:
    """The grid of every head of the layer and the hoverable tokens; on a problem its message only."""
    layers: list[str] = []
    try:
        entry = explorer.get_model(str(model or "") or None)
        layers = layer_choices(entry)
        layer = layer if str(layer) in layers else "0"
        att = prompt_attention(entry, prompt, layer)
    except Exception as exc:
        msg = _explain(exc)
        return AttentionPanel(warning_markdown(msg), plotting.message_figure(f"⚠️ {msg}", 160), "", layers, None)
    notice = "\n".join(f"ℹ️ {markdown_literal(n)}" for n in att.notices) or (
        f"layer {att.layer}: {len(att.patterns)} heads on {len(att.tokens)} tokens")
    return AttentionPanel(notice, plotting.attention_grid_figure(att.tokens, att.patterns, att.layer),
                          plotting.attention_tokens_html(att.tokens, att.patterns, att.sink), layers, str(att.layer))


# ---- activation patching of the circuit's nodes ---------------------------------------------------------


@dataclass(frozen=True)
class CircuitPatching:
    """Each circuit node's patching effect (clean into corrupted) on logit(a) − logit(b) at the last token."""

    clean_tokens: list[str]
    corrupt_tokens: list[str]
    a: str
    b: str
    clean: float
    corrupt: float
    effects: dict[str, float]
    rows: list[dict]
    nodes_per_second: float


def _typed(text: Any) -> str:
    """What the user typed, without control characters other than newline and tab."""
    text = text if isinstance(text, str) else ""
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")


def circuit_patching(entry: ModelEntry, circuit: CircuitGraph | None, clean: Any, corrupt: Any,
                     a: Any, b: Any) -> CircuitPatching:
    if circuit is None or not circuit.n_nodes:
        raise UserError("choose a pruning run: patching ranks the nodes of a circuit")
    clean, corrupt = _typed(clean), _typed(corrupt)
    for text, name in ((clean, "clean"), (corrupt, "corrupted")):
        if len(text) > A.MAX_PROMPT_CHARS:
            raise UserError(f"the {name} prompt has {len(text):,} characters, more than {A.MAX_PROMPT_CHARS:,}: shorten it")
    a, b = _typed(a)[:A.MAX_CANDIDATE_CHARS], _typed(b)[:A.MAX_CANDIDATE_CHARS]
    try:
        p = patch_prompts(entry.model, entry.tokenizer, clean, corrupt, (a, b), circuit.nodes)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    r = p.result
    return CircuitPatching(entry.token_strs(p.clean_ids), entry.token_strs(p.corrupt_ids), entry.vocab[p.token_a],
                           entry.vocab[p.token_b], r.clean, r.corrupt, dict(r.effects), rank_nodes(r), r.nodes_per_second)


@dataclass
class PatchingPanel:
    notice: str = ""
    ranked: str = ""
    figure: Any = None


def patching_idle(text: str = "Press Patch to rank the circuit's nodes.") -> PatchingPanel:
    """What the patching view shows before a reading, or once its inputs changed (no old reading stays)."""
    return PatchingPanel("", "", plotting.message_figure(text, 160))


def patching_panel(explorer: Explorer, model: Any, run_id: Any, k: Any, clean: Any, corrupt: Any, a: Any,
                   b: Any) -> PatchingPanel:
    """The ranked list of the circuit's nodes by patching effect and the circuit coloured by it."""
    try:
        entry, _, circuit = _selection(explorer, model, run_id, k)
        p = circuit_patching(entry, circuit, clean, corrupt, a, b)
    except Exception as exc:
        msg = _explain(exc)
        return PatchingPanel(warning_markdown(msg), "", plotting.message_figure(f"⚠️ {msg}", 160))
    metric = f"logit({plotting.display_token(p.a)}) − logit({plotting.display_token(p.b)})"
    notice = (f"{len(p.effects)} nodes patched, clean → corrupted, on {len(p.clean_tokens)} tokens "
              f"({p.nodes_per_second:,.0f} nodes/s)")
    figure = plotting.circuit_overview_figure(
        circuit, values=p.effects, value_name="patching effect",
        title=f"Patching effect on {html.escape(metric, quote=False)}: blue +, red −")
    return PatchingPanel(markdown_literal(notice),
                         plotting.patching_effects_html(p.rows, p.clean, p.corrupt, metric, entry.d_head), figure)


__all__ = [
    "DEFAULT_CLEAN", "DEFAULT_CORRUPT", "DEFAULT_CANDIDATES", "PromptAttention", "layer_choices", "parse_layer",
    "prompt_attention", "AttentionPanel", "attention_panel", "CircuitPatching", "circuit_patching", "PatchingPanel",
    "patching_idle", "patching_panel",
]
