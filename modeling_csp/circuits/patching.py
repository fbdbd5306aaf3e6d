"""Activation patching of circuit nodes: which nodes carry the difference between a clean and a corrupted prompt.

For each node (one channel at one node location, see `graph.node_locations`), the corrupted prompt is run with
that node's activation at every position replaced by its value on the clean prompt, and the change of
`metric(logits)` from the plain corrupted run is the node's effect:

    effect(node) = metric(corrupted run, node patched from the clean run) - metric(corrupted run)

This is TransformerLens' `patching` direction (clean into corrupted, "denoising"): a node with a large effect
restores the clean behaviour on its own. The patch is made at the model's own hook points (`model.intervene`),
in the full model (nothing ablated); several nodes are patched in one forward pass, one batch row each.

    from modeling_csp.circuits import patching
    metric = patching.logit_difference(tok.encode("'")[0], tok.encode('"')[0])
    result = patching.node_effects(model, clean_ids, corrupt_ids, circuit.nodes, metric)
    result.ranked()[:10]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .ablation import unchanged_weights
from .graph import location_width, node_locations, parse_node_id

Metric = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_BATCH_SIZE = 64  # nodes patched per forward pass


def logit_difference(token_a: int, token_b: int, position: int = -1) -> Metric:
    """metric(logits (B, T, vocab)) -> (B,): logit of `token_a` minus logit of `token_b` at `position`."""
    a, b, pos = int(token_a), int(token_b), int(position)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at = logits[:, pos]
        return at[:, a] - at[:, b]

    metric.token_a, metric.token_b, metric.position = a, b, pos  # what a caller may want to show
    return metric


@dataclass(frozen=True)
class PatchEffects:
    """The metric on the clean and on the corrupted prompt, and each node's effect (clean -> corrupted)."""

    clean: float
    corrupt: float
    effects: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    direction: str = "clean -> corrupted"

    def ranked(self) -> list[tuple[str, float]]:
        """(node, effect), the largest |effect| first."""
        return sorted(self.effects.items(), key=lambda kv: -abs(kv[1]))

    def recovered(self, node: str) -> float | None:
        """The node's effect as a share of the whole gap (clean − corrupted); None when there is no gap."""
        gap = self.clean - self.corrupt
        return None if gap == 0 else self.effects[node] / gap

    @property
    def nodes_per_second(self) -> float:
        return len(self.effects) / max(self.seconds, 1e-9)  # finite: it goes into strict JSON


def _as_row(ids, name: str) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"{name} must be one prompt's token ids (a list or a 1-D tensor), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} has no tokens")
    return t


def _metric_values(metric: Metric, logits: torch.Tensor) -> torch.Tensor:
    values = metric(logits)
    if not isinstance(values, torch.Tensor) or values.shape != (logits.shape[0],):
        raise ValueError(f"the metric must return one value per batch row, shape ({logits.shape[0]},); got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    return values.float()


def _patch(rows: torch.Tensor, channels: torch.Tensor, clean: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Row r of the batch gets the clean activation of channel channels[r'] at every position."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[rows, :, channels] = clean[0, :, channels].T.to(x.dtype)
        return out

    return fn


@torch.no_grad()
@unchanged_weights
def node_effects(model, clean_ids, corrupt_ids, nodes: Iterable[str], metric: Metric,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> PatchEffects:
    """Each node's patching effect on `metric(logits)`: the corrupted run with that node (at every position) set to
    its clean-run value, minus the plain corrupted run (see the module docstring). Clean and corrupted prompts must
    have the same number of tokens; `metric` maps (B, T, vocab) logits to (B,) values (`logit_difference`)."""
    clean, corrupt = _as_row(clean_ids, "clean_ids"), _as_row(corrupt_ids, "corrupt_ids")
    if clean.numel() != corrupt.numel():
        raise ValueError(f"the clean prompt has {clean.numel()} tokens and the corrupted one {corrupt.numel()}: "
                         "patching needs prompts of the same token length")
    config = model.config
    if clean.numel() > config.block_size:
        raise ValueError(f"the prompts have {clean.numel()} tokens, more than the model's context of {config.block_size}")
    top = int(max(clean.max(), corrupt.max()))
    if top >= config.vocab_size or int(min(clean.min(), corrupt.min())) < 0:
        raise ValueError(f"token id {top} is outside the model's vocabulary ({config.vocab_size})")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    nodes = list(dict.fromkeys(nodes))
    parsed = [parse_node_id(n) for n in nodes]
    for node, (loc, ch) in zip(nodes, parsed):
        if loc not in node_locations(config) or ch >= location_width(config, loc):
            raise ValueError(f"node {node!r} is not in this model (its locations: {config.n_layer} layers)")

    device = next(model.parameters()).device
    clean, corrupt = clean.to(device)[None], corrupt.to(device)[None]
    started = time.perf_counter()
    locations = sorted({loc for loc, _ in parsed}, key=node_locations(config).index)
    with model.record_activations(locations) as acts:
        clean_metric = _metric_values(metric, model(clean, use_cache=False).logits)
    clean_acts = {loc: acts[loc] for loc in locations}
    corrupt_metric = _metric_values(metric, model(corrupt, use_cache=False).logits)

    effects: dict[str, float] = {}
    for start in range(0, len(nodes), int(batch_size)):
        chunk = parsed[start:start + int(batch_size)]
        plan: dict[str, tuple[list[int], list[int]]] = {}
        for row, (loc, ch) in enumerate(chunk):
            plan.setdefault(loc, ([], []))
            plan[loc][0].append(row)
            plan[loc][1].append(ch)
        fns = {loc: _patch(torch.tensor(rows, device=device), torch.tensor(chs, device=device), clean_acts[loc])
               for loc, (rows, chs) in plan.items()}
        with model.intervene(fns):
            patched = _metric_values(metric, model(corrupt.expand(len(chunk), -1), use_cache=False).logits)
        for node, value in zip(nodes[start:start + len(chunk)], (patched - corrupt_metric).tolist()):
            effects[node] = float(value)
    return PatchEffects(float(clean_metric[0]), float(corrupt_metric[0]), effects, time.perf_counter() - started)


def candidate_token(tokenizer, context_ids: list[int], text: str, name: str = "candidate") -> int:
    """The token id of `text` right after the context (tokenized in context, as the model would see it); a
    candidate must be exactly one token there."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{name} is empty: give the one token to compare")
    context = tokenizer.decode(context_ids)
    full = tokenizer.encode(context + text, add_special_tokens=False)
    extra = full[len(context_ids):] if full[:len(context_ids)] == list(context_ids) else \
        tokenizer.encode(text, add_special_tokens=False)
    if len(extra) != 1:
        raise ValueError(f"{name} {text!r} is {len(extra)} tokens after the prompt: give a single token")
    return int(extra[0])


def prompt_ids(tokenizer, text: str, name: str, block_size: int) -> list[int]:
    """A prompt's token ids; an empty prompt or one longer than the model's context is an error."""
    ids = tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) and text else []
    if not ids:
        raise ValueError(f"the {name} prompt is empty: type some code")
    if len(ids) > block_size:
        raise ValueError(f"the {name} prompt has {len(ids)} tokens, more than the model's context of {block_size}: "
                         "shorten it")
    return list(ids)


@dataclass(frozen=True)
class PromptPatching:
    """`node_effects` for two prompts and two candidate tokens, with what was patched."""

    clean_ids: list[int]
    corrupt_ids: list[int]
    token_a: int
    token_b: int
    result: PatchEffects


def patch_prompts(model, tokenizer, clean: str, corrupt: str, candidates: Sequence[str], nodes: Iterable[str],
                  batch_size: int = DEFAULT_BATCH_SIZE) -> PromptPatching:
    """Each node's effect on logit(candidate A) − logit(candidate B) at the last token, patching the clean
    prompt's activations into the corrupted one's (the candidates tokenized after the clean prompt)."""
    block = int(model.config.block_size)
    clean_ids, corrupt_ids = prompt_ids(tokenizer, clean, "clean", block), prompt_ids(tokenizer, corrupt, "corrupted", block)
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError(f"the clean prompt has {len(clean_ids)} tokens and the corrupted one {len(corrupt_ids)}: "
                         "patching needs prompts of the same token length")
    if len(candidates) != 2:
        raise ValueError(f"give two candidates, got {len(candidates)}")
    a = candidate_token(tokenizer, clean_ids, candidates[0], "candidate A")
    b = candidate_token(tokenizer, clean_ids, candidates[1], "candidate B")
    if a == b:
        raise ValueError(f"both candidates are the token {candidates[0]!r}: give two different tokens")
    if max(a, b) >= model.config.vocab_size:
        raise ValueError(f"a candidate's token id is outside the model's vocabulary ({model.config.vocab_size})")
    result = node_effects(model, clean_ids, corrupt_ids, nodes, logit_difference(a, b), batch_size)
    return PromptPatching(clean_ids, corrupt_ids, a, b, result)


def rank_nodes(effects: PatchEffects, top: int | None = None) -> list[dict]:
    """JSON-ready rows for the ranked list: node, effect and the share of the clean − corrupted gap it recovers."""
    rows = []
    for node, value in effects.ranked()[:top]:
        share = effects.recovered(node)
        rows.append({"node": node, "effect": round(value, 6), "recovered": None if share is None else round(share, 6)})
    return rows


__all__ = ["Metric", "DEFAULT_BATCH_SIZE", "logit_difference", "PatchEffects", "node_effects", "candidate_token",
           "prompt_ids", "PromptPatching", "patch_prompts", "rank_nodes"]
