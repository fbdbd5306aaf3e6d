"""What the explorer computes about a run's circuit, as typed results: circuits at k and their losses, node
data (activating examples, activations on the task's examples, attention of the node's head), next-token
predictions, ablations, live importances and pruning.

Every function takes a `ModelEntry` (models.py) and caches what is worth caching in that model's `memo`, so
repeated views cost nothing and one model's values never evict another's. Losses come from
`modeling_csp.circuits.evaluation`, the routine `csp evaluate` uses, with the options the circuit was pruned with.
Values that come from users (k, channels, steps, targets, prompts, node lists) are checked here, so that the
app and the API validate alike; `clamp` says what it changed.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..circuits.graph import CircuitGraph, parse_node_id
from ..circuits.evaluation import (
    CHANCE_LOSS, DEFAULT_RANDOM_MARGIN, CircuitVerdict, EvalOptions, check_target, circuit_losses, verdict_of,
)
from ..circuits.pruning import PruneConfig
from ..circuits.tasks import list_tasks
from .errors import UserError, first_line, log
from .explorer import Explorer
from .models import ModelEntry
from .runs import Run

TOP_N = 10  # next tokens shown by default
MAX_TOP = 50
MAX_EXACT_IMPORTANCES = 128  # larger circuits get attribution importances (one backward pass)
MAX_PROMPT_CHARS = 20_000
MAX_CANDIDATE_CHARS = 100
MAX_ABLATE_NODES = 64
MIN_PRUNE_STEPS, MAX_PRUNE_STEPS = 10, 2000
EXAMPLES_PER_SIDE = 5  # activating examples per quantile and side, as the original visualizer shows
CONTEXT_BEFORE, CONTEXT_AFTER = 40, 10  # tokens around an example's peak
TASK_EXAMPLES_PER_CLASS = 5


def task_names() -> list[str]:
    return [t.name for t in list_tasks()]


def clamp(value: Any, lo: int, hi: int, name: str) -> tuple[int, str | None]:
    """`value` as an int in [lo, hi], and a message when it had to change; UserError when it is no number."""
    try:
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not a number") from None
    out = min(max(int(round(number)), lo), hi)
    if not lo <= number <= hi:
        return out, f"{name}={value!r} is outside [{lo}, {hi}]: using {out}"
    if out != number:
        return out, f"{name}={value!r} is not a whole number: using {out}"
    return out, None


def parse_node(node: str) -> tuple[str, int]:
    """(location, channel) of a node id, or UserError."""
    try:
        return parse_node_id(node)
    except (ValueError, AttributeError):
        raise UserError(f"{node!r} is not a node id such as '0.mlp.post_act:12'") from None


def _options(run: Run | None) -> EvalOptions:
    return EvalOptions.of(run.load() if run is not None else None)


# =====================================================================================================
# Circuits at k and their losses
# =====================================================================================================


def max_k(entry: ModelEntry, run: Run) -> int:
    """The largest k a run can show: any size for runs with pruning scores, else its own size."""
    return entry.n_total_nodes if run.scores is not None else run.load().n_nodes


def _rank(circuit: CircuitGraph) -> list[str]:
    """Nodes, most important first (unknown importance last, then forward order)."""
    return sorted(circuit.nodes, key=lambda n: -(circuit.nodes[n] if circuit.nodes[n] is not None else -math.inf))


def circuit_at_k(entry: ModelEntry, run: Run, k: int | None) -> CircuitGraph:
    """The run's circuit with k nodes: the circuit itself at its own size; otherwise the top-k nodes by the
    run's pruning scores (runs pruned in the app) or by the nodes' ablation importance (edges kept between
    them). Cached per model, run and k."""
    full = run.load()
    if k is None or k == full.n_nodes or (k >= full.n_nodes and run.scores is None):
        return full
    k = max(1, int(k))

    def make() -> CircuitGraph:
        if run.scores is not None:
            from ..circuits.pruning import top_k_masks

            sub = CircuitGraph.from_masks(entry.model, top_k_masks(run.scores, k), dict(full.nodes),
                                          model_name=entry.spec, task=full.task, ablation=full.ablation,
                                          target_loss=full.target_loss, k=k, meta=dict(full.meta))
            sub.node_data, sub.task_docs = full.node_data, full.task_docs
            sub.labels = {n: text for n, text in full.labels.items() if n in sub.nodes}
            return sub
        keep = set(_rank(full)[:k])
        return CircuitGraph(
            model=full.model, nodes={n: v for n, v in full.nodes.items() if n in keep},
            edges=[e for e in full.edges if e.source in keep and e.target in keep], task=full.task,
            ablation=full.ablation, target_loss=full.target_loss, k=k, node_data=full.node_data,
            task_docs=full.task_docs, meta={**full.meta, "sub_circuit_of": run.id},
            labels={n: text for n, text in full.labels.items() if n in keep},
        )

    return entry.memo.get("circuit", (run.id, k), make)


@dataclass(frozen=True)
class CircuitStats:
    """Task losses (nats) of the full model, the circuit, random same-size circuits (mean) and the complement,
    and each sublayer's ablation delta. `live`: some were computed now rather than read from the file;
    `complete`: nothing more will be computed; `notices`: capped evaluation options; `verdict`: what the held-out
    losses say (`evaluation.circuit_verdict`; against the circuit's target only at its own k and task)."""

    full: float | None = None
    circuit: float | None = None
    random: float | None = None
    complement: float | None = None
    layer_deltas: dict[str, float] = field(default_factory=dict)
    live: bool = False
    complete: bool = False
    error: str | None = None
    notices: tuple[str, ...] = ()
    verdict: CircuitVerdict | None = None

    @property
    def random_as_good(self) -> bool:
        """Random circuits of the same size do as well: the circuit says little about which nodes matter."""
        return (self.random is not None and self.circuit is not None
                and self.random <= self.circuit + DEFAULT_RANDOM_MARGIN)


def full_loss(entry: ModelEntry, task: str, options: EvalOptions) -> float:
    """The full model's task loss on the task's held-out split (cached per task and split)."""
    from ..circuits.evaluation import evaluate

    batch = entry.task_batch(task, options)

    def compute():
        return evaluate(entry.model, batch)[0]

    return entry.memo.get("full_loss", (task, options.data_key), compute)


def circuit_stats(entry: ModelEntry, run: Run, k: int | None, task: str | None, quick: bool = False) -> CircuitStats:
    """The run's stored numbers at its own k and task, computed live otherwise (`evaluation.circuit_losses`
    with the run's options, as `csp evaluate` does). `quick` computes nothing new except the full model's loss,
    so that a view answers fast; the rest follows in a second call. Cached per model, run, k and task."""
    circuit = circuit_at_k(entry, run, k)
    whole = run.load()
    task = task or circuit.task
    key = (run.id, circuit.n_nodes, task)
    done = entry.memo.peek("stats", key)
    if done is not None:
        return done
    options = _options(run)
    own = circuit is whole and task == whole.task
    stored = circuit.losses if own else {}
    values = {name: stored.get(name) for name in ("full", "circuit", "random", "complement")}
    deltas = dict(circuit.layer_deltas) if own else {}
    live, error = False, None
    if task is None:
        return entry.memo.get("stats", key, lambda: CircuitStats(**values, layer_deltas=deltas, complete=True,
                                                                  notices=options.notices))
    try:
        if values["full"] is None:
            values["full"], live = full_loss(entry, task, options), True
        if quick:
            return CircuitStats(**values, layer_deltas=deltas, live=live, notices=options.notices)
        batch = entry.task_batch(task, options)
        masks = circuit.masks(entry.config)
        means = entry.means_for(circuit)
        if any(v is None for v in values.values()):
            losses = circuit_losses(entry.model, batch, masks, means, options)
            values = {name: losses[name] if v is None else v for name, v in values.items()}
            live = True
        if not deltas:
            from ..circuits.evaluation import layer_ablation_deltas

            deltas = layer_ablation_deltas(entry.model, batch, masks, means, options.freeze_norm_scales)
            live = True
    except UserError as exc:
        error = str(exc)
    except Exception as exc:
        error = f"could not evaluate the circuit on {task}: {first_line(exc)}"
    verdict = None if error else verdict_of(circuit, values, own_task=own)
    stats = CircuitStats(**values, layer_deltas=deltas, live=live, complete=True, error=error, notices=options.notices,
                         verdict=verdict)
    return entry.memo.get("stats", key, lambda: stats)


@dataclass(frozen=True)
class FaithCurve:
    """Task loss of the run's top-k circuits and of random circuits of the same sizes, [(k, loss)]."""

    points: list[tuple[int, float]]
    random: list[tuple[int, float]]


def faithfulness_curve(entry: ModelEntry, run: Run, task: str | None) -> FaithCurve:
    """Top-k circuits at log-spaced k (and the run's own k), cached per model, run and task."""
    whole = run.load()
    task = task or whole.task
    if task is None:
        raise UserError("this run names no task: choose a task to compute its faithfulness curve")

    def compute():
        from ..circuits.evaluation import evaluate, random_masks_like

        options = _options(run)
        n_max = max_k(entry, run)
        ks = sorted({max(1, int(round(v))) for v in torch.logspace(0, math.log10(max(n_max, 1)), 10).tolist()}
                    | {whole.n_nodes})
        batch = entry.task_batch(task, options)
        gen = torch.Generator().manual_seed(options.seed)
        points, random = [], []
        for k in ks:
            c = circuit_at_k(entry, run, k)
            masks, means = c.masks(entry.config), entry.means_for(c)
            points.append((k, evaluate(entry.model, batch, masks, means, options.freeze_norm_scales)[0]))
            random.append((k, evaluate(entry.model, batch, random_masks_like(masks, gen), means,
                                       options.freeze_norm_scales)[0]))
        return FaithCurve(points, random)

    return entry.memo.get("curve", (run.id, task), compute)


def best_layer(entry: ModelEntry, circuit: CircuitGraph, deltas: dict | None) -> str | None:
    """The sublayer to show first: largest ablation delta (these deltas, else the circuit's), then most nodes."""
    from .. import plotting

    tmp = CircuitGraph(model=circuit.model, nodes=circuit.nodes, edges=[], layer_deltas=deltas or circuit.layer_deltas)
    return plotting.most_important_layer(tmp, entry.n_layer)


def best_node(circuit: CircuitGraph, layer: str | None) -> str | None:
    """The layer's most important node (by ablation importance), or None when it has none."""
    from .. import plotting

    nodes = plotting.layer_node_ids(circuit, layer) if layer else []
    if not nodes:
        return None
    return max(nodes, key=lambda n: circuit.nodes[n] if circuit.nodes[n] is not None else -math.inf)


# =====================================================================================================
# Nodes: activating examples, activations on the task, attention of the node's head
# =====================================================================================================


@dataclass(frozen=True)
class NodeExamples:
    """{fraction: {"top"|"bottom": [{"tokens" (decoded), "activations", "position" (peak)}]}} and their source."""

    samples: dict[float, dict[str, list[dict]]]
    source: str


def _decoded(entry: ModelEntry, data: dict, per_side: int) -> dict:
    out: dict = {}
    for side in ("top", "bottom"):
        for frac, examples in (data.get(side) or {}).items():
            conv = []
            for ex in list(examples)[:per_side]:
                toks = ex.get("tokens", []) if isinstance(ex, dict) else ex[0]
                acts = ex.get("activations", ex.get("acts", [])) if isinstance(ex, dict) else ex[1]
                pos = ex.get("position", ex.get("pos")) if isinstance(ex, dict) else ex[2]
                conv.append({"tokens": entry.token_strs(toks), "activations": acts, "position": pos})
            out.setdefault(float(frac), {})[side] = conv
    return out


def node_examples(entry: ModelEntry, circuit: CircuitGraph, node: str, per_side: int = EXAMPLES_PER_SIDE) -> NodeExamples:
    """Top and bottom activating examples at the 0.1%, 1%, 10% and 50% quantiles, `per_side` each with about
    50 tokens of context: from the model's example index (shipped or built by `csp index-examples`) when there
    is one, else those stored with the circuit when it stores that many, else from the app's small index over
    held-out text, built once per model and cached (`node_index`)."""
    index, full = node_index(entry)
    data = (circuit.node_data or {}).get(node)
    if not full and data and all(len(v) >= per_side for side in ("top", "bottom") for v in (data.get(side) or {"": []}).values()):
        return NodeExamples(_decoded(entry, data, per_side), "stored with the circuit")
    raw = entry.memo.get("examples", (node, per_side, index.meta["n_tokens"]), lambda: index.quantile_examples(
        entry.model, node, per_side, CONTEXT_BEFORE, CONTEXT_AFTER))
    return NodeExamples(_decoded(entry, raw, per_side), index_source(index, full))


# ---- issue 22: example index (node statistics over held-out text) ----------------------------------


def node_index(entry: ModelEntry) -> tuple[Any, bool]:
    """(the model's `ExampleIndex`, whether it is a full index): the one shipped in the model folder or built by
    `csp index-examples`, else the app's own over `pretrain_tokens` held-out tokens, built once per model and
    cached on disk, so that later starts read it (`ModelEntry.prepare`)."""
    index = entry.example_index()
    return index, index.meta.get("source") != "model_cache"


def index_source(index: Any, full: bool) -> str:
    text = f"example index over {index.n_tokens:,} held-out tokens"
    return text if full else f"app's {text}, cached; `csp index-examples MODEL` indexes 1M"


@dataclass(frozen=True)
class NodeActivationStats:
    """A node's activation histogram over the indexed tokens and its density (fraction of tokens active)."""

    node: str
    density: float
    edges: list[float]
    counts: list[int]
    quantiles: dict[float, float]
    source: str


def node_activation_stats(entry: ModelEntry, node: str) -> NodeActivationStats:
    index, full = node_index(entry)
    s = index.node_stats(node)
    return NodeActivationStats(node, s["density"], s["edges"], s["counts"], s["quantiles"], index_source(index, full))


@dataclass(frozen=True)
class TaskRow:
    """One task example: its tokens and a value per token (an activation, or a difference)."""

    tokens: list[str]
    values: list[float]


@dataclass(frozen=True)
class TaskActivations:
    """A node's activations on the task's examples of each class; `names` say what each class is."""

    names: tuple[str, str]
    classes: tuple[list[TaskRow], list[TaskRow]]
    source: str

    def pair_differences(self) -> list[TaskRow]:
        """Per pair (i-th example of each class): class 1 − class 2, aligned at the decision token (the last),
        over the positions both have, on class 1's tokens."""
        out = []
        for a, b in zip(*self.classes):
            n = min(len(a.values), len(b.values))
            out.append(TaskRow(a.tokens[len(a.tokens) - n:], [x - y for x, y in zip(a.values[-n:], b.values[-n:])]))
        return out


def _task_classes(batch) -> tuple[list[int], list[int], tuple[str, str]]:
    """Task examples split by which candidate is correct (the first or second of the sorted pair); names give
    the (up to two) most common correct tokens of each class and their shares."""
    from ..plotting import display_token

    c1, c2, lab1, lab2 = [], [], Counter(), Counter()
    for i, ex in enumerate(batch.examples):
        first = min(ex.correct, ex.alternative)
        (c1 if ex.correct == first else c2).append(i)
        (lab1 if ex.correct == first else lab2)[ex.correct] += 1

    def name(counter, n):
        if not counter:
            return f"class {n}"
        total = sum(counter.values())
        common = counter.most_common(2)
        if common[0][1] / total > 0.99:
            return f"class {n}: correct «{display_token(common[0][0])}»"
        return f"class {n}: correct " + ", ".join(f"«{display_token(t)}» {c / total:.0%}" for t, c in common)

    return c1, c2, (name(lab1, 1), name(lab2, 2))


def _task_rows(entry: ModelEntry, run: Run | None, task: str, per_class: int):
    """(batch, store, chosen example indices per class, class names) for a task's held-out examples."""
    batch, store = entry.task_activations(task, _options(run))
    c1, c2, names = _task_classes(batch)
    return batch, store, (c1[:per_class], c2[:per_class]), names


def _real(batch, i: int) -> slice:
    """The columns of example i that are prompt, not left padding."""
    return slice(batch.input_ids.shape[1] - int(batch.attention_mask[i].sum()), None)


def task_activations(entry: ModelEntry, run: Run | None, circuit: CircuitGraph, node: str, task: str | None,
                     per_class: int = TASK_EXAMPLES_PER_CLASS) -> TaskActivations:
    """The node's activation per token on `per_class` held-out examples of each class of a known task (run
    live); for a task this package does not know, the activations the circuit file stores (first half of its
    task documents one class, second half the other)."""
    loc, ch = parse_node_id(node)
    if entry.tasks.known(task):
        batch, store, chosen, names = _task_rows(entry, run, task, per_class)
        rows = tuple([TaskRow(entry.token_strs(batch.input_ids[i, _real(batch, i)].tolist()),
                              store[loc][i, _real(batch, i), ch].float().tolist()) for i in idx] for idx in chosen)
        return TaskActivations(names, rows, "live, held-out examples")
    stored = ((circuit.node_data or {}).get(node) or {}).get("task_activations")
    if stored is None or not circuit.task_docs:
        raise UserError("no task chosen and the circuit stores no task activations")
    rows = []
    for doc, acts in zip(circuit.task_docs, stored):
        n = len(doc)
        while n > 0 and doc[n - 1] == 0:  # zero-padded at the end
            n -= 1
        rows.append(TaskRow(entry.token_strs(doc[: max(n, 1)]), [float(a) for a in acts[: max(n, 1)]]))
    half = len(rows) // 2
    return TaskActivations(("class 1 (first half of the file's documents)", "class 2 (second half)"),
                           (rows[:half][:per_class], rows[half:][:per_class]), "stored with the circuit")


@dataclass(frozen=True)
class AttentionRow:
    """Where one task example's decision token (its last) attends: a weight per token, and to the sink."""

    tokens: list[str]
    weights: list[float]
    sink: float | None
    class_index: int


@dataclass(frozen=True)
class HeadAttention:
    """The attention of the head an attention node belongs to (q/k/v) or feeds/is fed by (act_in/resid_delta),
    on the task's examples: each example's decision-token row, one example's whole pattern (the sink as the
    first key column when the head has one), and for q/k channels that channel's own q·k/√d contribution."""

    layer: int
    head: int
    other_heads: tuple[int, ...]
    names: tuple[str, str]
    rows: list[AttentionRow]
    tokens: list[str]
    pattern: list[list[float]]
    sink: bool
    contrib: list[list[float]] | None
    note: str


def _node_heads(circuit: CircuitGraph, node: str, d_head: int) -> list[int]:
    loc, ch = parse_node_id(node)
    layer, kind = loc.split(".", 1)
    if kind in ("attn.q", "attn.k", "attn.v"):
        return [ch // d_head]
    qkv = re.compile(rf"^{layer}\.attn\.[qkv]:")
    linked = [e.target if e.source == node else e.source for e in circuit.edges if node in (e.source, e.target)]
    heads = [parse_node_id(n)[1] // d_head for n in linked if qkv.match(n)]
    if not heads:  # nothing linked: the heads this layer's circuit uses
        heads = [parse_node_id(n)[1] // d_head for n in circuit.nodes if qkv.match(n)]
    return list(dict.fromkeys(heads))


def head_attention(entry: ModelEntry, run: Run | None, circuit: CircuitGraph, node: str, task: str | None,
                   per_class: int = TASK_EXAMPLES_PER_CLASS) -> HeadAttention | None:
    """The attention for an attention node on the task's held-out examples (None for MLP nodes). Computed
    from the q and k recorded once per task, so it costs no forward pass."""
    loc, ch = parse_node_id(node)
    layer_s, kind = loc.split(".", 1)
    if not kind.startswith("attn."):
        return None
    if not entry.tasks.known(task):
        raise UserError("choose a task to see this head's attention on its examples")
    layer, d = int(layer_s), entry.d_head
    heads = _node_heads(circuit, node, d)
    if not heads:
        raise UserError(f"no attention head of layer {layer} is in the circuit")
    head = heads[0]
    batch, store, chosen, names = _task_rows(entry, run, task, per_class)
    imp = getattr(entry.model.transformer.h[layer].attn, "attn_imp", None)
    sink_logit = getattr(imp, "sink_logit", None)
    sink = None if sink_logit is None else float(sink_logit.detach()[head])

    def pattern(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cols = _real(batch, i)
        q = store[f"{layer}.attn.q"][i, cols, head * d:(head + 1) * d].float()
        k = store[f"{layer}.attn.k"][i, cols, head * d:(head + 1) * d].float()
        T = q.shape[0]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = (q @ k.T / math.sqrt(d)).masked_fill(~causal, float("-inf"))
        if sink is not None:
            scores = torch.cat([torch.full((T, 1), sink), scores], dim=1)
        return torch.softmax(scores, dim=1), q, k

    rows = []
    for class_index, idx in enumerate(chosen):
        for i in idx:
            p, _, _ = pattern(i)
            last = p[-1].tolist()
            tokens = entry.token_strs(batch.input_ids[i, _real(batch, i)].tolist())
            rows.append(AttentionRow(tokens, last[1:] if sink is not None else last,
                                     last[0] if sink is not None else None, class_index))
    first = next((i for idx in chosen for i in idx), None)
    if first is None:
        raise UserError(f"task {task!r} has no held-out examples")
    p, q, k = pattern(first)
    contrib = None
    if kind in ("attn.q", "attn.k"):
        c = ch % d
        T = q.shape[0]
        contrib = (torch.outer(q[:, c], k[:, c]) / math.sqrt(d)).masked_fill(
            ~torch.ones(T, T, dtype=torch.bool).tril(), float("nan")).tolist()
    note = "" if kind in ("attn.q", "attn.k", "attn.v") else (
        f"head {head}: the head this node is linked to in the circuit" +
        (f" (also: {', '.join(map(str, heads[1:]))})" if len(heads) > 1 else ""))
    return HeadAttention(layer, head, tuple(heads[1:]), names, rows,
                         entry.token_strs(batch.input_ids[first, _real(batch, first)].tolist()), p.tolist(),
                         sink is not None, contrib, note)


def embedding_channel(entry: ModelEntry, channel: Any) -> tuple[int, list[float], list[list[float]], str | None]:
    """(channel clamped to the residual width, every token's embedding weight in it, the position embedding
    matrix, a message when the channel was clamped)."""
    c, notice = clamp(0 if channel in (None, "") else channel, 0, entry.config.d_model - 1, "channel")
    wte = entry.model.transformer.wte.weight.detach()[:, c].tolist()
    return c, wte, entry.model.transformer.wpe.weight.detach().tolist(), notice


# =====================================================================================================
# Prompt lab: next tokens of the full model and of the circuit alone
# =====================================================================================================


def clean_prompt(prompt: str | None) -> tuple[str, list[str]]:
    """Drops control characters other than newline and tab and keeps the last MAX_PROMPT_CHARS characters;
    (text, notices). Whitespace is a prompt (indentation is context); only nothing at all is empty."""
    notices = []
    text = prompt if isinstance(prompt, str) else ""
    if len(text) > MAX_PROMPT_CHARS:  # cut first: a huge prompt costs no more than a long one
        notices.append(f"the prompt has {len(text):,} characters: kept the last {MAX_PROMPT_CHARS:,}")
        text = text[-MAX_PROMPT_CHARS:]
    cleaned = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    if cleaned != text:
        notices.append(f"removed {len(text) - len(cleaned)} control character(s) from the prompt")
    if not cleaned:
        raise UserError("the prompt is empty: type some Python code")
    return cleaned, notices


def encode_prompt(entry: ModelEntry, prompt: str | None) -> tuple[list[int], list[str]]:
    """(token ids, notices): the cleaned prompt, its last block_size tokens if longer than the context."""
    text, notices = clean_prompt(prompt)
    ids = list(entry.tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise UserError("the prompt gives no tokens")
    block = int(entry.config.block_size)
    if len(ids) > block:
        notices.append(f"the prompt has {len(ids)} tokens, more than the model's context of {block}: "
                       f"kept the last {block}")
        ids = ids[-block:]
    bad = [i for i in ids if i >= entry.config.vocab_size]
    if bad:
        raise UserError(f"the tokenizer gives token id {bad[0]}, past the model's vocabulary of "
                        f"{entry.config.vocab_size}: this tokenizer does not belong to this model")
    return ids, notices


def candidate_id(entry: ModelEntry, text: str | None, ids: list[int]) -> tuple[int | None, str | None]:
    """A candidate next token typed by the user: its id in context (first token if it splits), and a note."""
    if not text:
        return None, None
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")[:MAX_CANDIDATE_CHARS]
    ctx = entry.tokenizer.decode(ids)
    full = entry.tokenizer.encode(ctx + text, add_special_tokens=False)
    extra = full[len(ids):] if full[: len(ids)] == ids else entry.tokenizer.encode(text, add_special_tokens=False)
    if not extra:
        return None, f"{text!r} gives no token"
    if extra[0] >= entry.config.vocab_size:
        return None, f"{text!r} maps to a token id outside the model's vocabulary"
    note = None if len(extra) == 1 else f"{text!r} is {len(extra)} tokens here; using its first, {entry.vocab[extra[0]]!r}"
    return int(extra[0]), note


def top_tokens(entry: ModelEntry, logits: torch.Tensor, n: int = TOP_N) -> list[dict[str, Any]]:
    """[{"token", "id", "prob"}] of the n most likely next tokens, most likely first; "token" is the token's text
    alone, the bytes of a partial character as `⟨e9⟩` escapes (the id gives the exact bytes)."""
    probs = torch.softmax(logits.float(), dim=-1)
    p, idx = probs.topk(max(1, min(int(n), probs.shape[-1])))
    return [{"token": entry.vocab[i], "id": int(i), "prob": round(float(v), 6)} for v, i in zip(p.tolist(), idx.tolist())]


@dataclass(frozen=True)
class LogitDiff:
    a: str
    b: str
    full: float
    circuit: float | None


@dataclass(frozen=True)
class PromptResult:
    """What the prompt lab shows: the prompt's tokens, the top next tokens of the full model and of the circuit
    alone, the logit difference of two candidates (or why there is none), the node's activation per token."""

    tokens: list[str]
    ids: list[int]
    notices: list[str]
    full: list[dict[str, Any]]
    circuit: list[dict[str, Any]] | None = None
    circuit_k: int | None = None
    logit_diff: LogitDiff | None = None
    logit_note: str | None = None
    node: str | None = None
    node_acts: list[float] | None = None


def predict(entry: ModelEntry, prompt: str | None, circuit: CircuitGraph | None, node: str | None = None,
            candidates: tuple[str | None, str | None] = (None, None), top: int = TOP_N) -> PromptResult:
    """Runs the prompt through the full model and the circuit alone (everything outside it ablated)."""
    ids, notices = encode_prompt(entry, prompt)
    x = torch.tensor([ids])
    loc, ch = parse_node(node) if node else (None, None)
    logits, acts = entry.run_forward(x, record=re.escape(loc) if node else None)
    full = top_tokens(entry, logits[0, -1], top)
    circuit_top = circuit_logits = None
    if circuit is not None and circuit.n_nodes:
        try:
            circuit_logits, _ = entry.run_forward(x, circuit.masks(entry.config), entry.means_for(circuit))
            circuit_top = top_tokens(entry, circuit_logits[0, -1], top)
        except UserError as exc:
            notices.append(str(exc))
        except ValueError as exc:
            notices.append(f"circuit not applied: {exc}")
    ia, na = candidate_id(entry, candidates[0], ids)
    ib, nb = candidate_id(entry, candidates[1], ids)
    notices += [n for n in (na, nb) if n]
    diff, note = None, None
    if ia is not None and ib is not None:
        diff = LogitDiff(entry.vocab[ia], entry.vocab[ib], float(logits[0, -1, ia] - logits[0, -1, ib]),
                         float(circuit_logits[0, -1, ia] - circuit_logits[0, -1, ib]) if circuit_logits is not None else None)
    elif not candidates[0] or not candidates[1]:
        note = "type a candidate token in both boxes to see their logit difference"
    else:
        note = "no logit difference: a candidate gives no usable token (see the notes above)"
    node_acts = acts[loc][0, :, ch].tolist() if node else None
    return PromptResult(entry.token_strs(ids), ids, notices, full, circuit_top,
                        circuit.n_nodes if circuit_top is not None else None, diff, note, node, node_acts)


def next_tokens(entry: ModelEntry, prompt: str, run: Run | None = None, k: Any = None, top: Any = TOP_N) -> dict[str, Any]:
    """The prompt's tokens and the top next tokens with probabilities of the full model and of the run's
    circuit alone at k nodes (k clamped to the run's range, as the app does): the app's `/next_tokens` answer
    and the output of `csp next-tokens`."""
    notices = []
    top, note = clamp(top, 1, MAX_TOP, "top")
    notices += [note] if note else []
    circuit = None
    if run is not None:
        if k not in (None, "", 0):
            k, note = clamp(k, 1, max_k(entry, run), "k")
            notices += [note] if note else []
        circuit = circuit_at_k(entry, run, k or None)
    result = predict(entry, prompt, circuit, top=top)
    return {"model": entry.spec, "run": run.id if run else None,
            "circuit_nodes": circuit.n_nodes if circuit is not None else None,
            "tokens": result.tokens, "notices": notices + result.notices, "full": result.full, "circuit": result.circuit}


# =====================================================================================================
# Ablations and live importances
# =====================================================================================================


@dataclass(frozen=True)
class AblationRow:
    """One ablation: task loss and mean logit difference (correct − alternative), and their changes from the
    baseline (the full model or the circuit)."""

    label: str
    loss: float
    logit_diff: float
    d_loss: float
    d_logit_diff: float
    baseline: bool = False


def ablation_effects(entry: ModelEntry, run: Run | None, circuit: CircuitGraph | None, task: str | None,
                     layers: list[str], nodes: list[str], mode: str, base: str) -> list[AblationRow]:
    """Each chosen sublayer and node ablated in turn (and all of them together), relative to the full model
    (base "full") or to the circuit (base "circuit"); the first row is the baseline."""
    from .. import plotting
    from ..circuits.ablation import ablate, all_kept, frozen_norm_scales, task_logits
    from ..circuits.evaluation import task_loss

    if not entry.tasks.known(task):
        raise UserError("choose a task to ablate on")
    if mode not in ("mean", "zero") or base not in ("full", "circuit"):
        raise UserError("ablation must be mean or zero, from the full model or the circuit")
    layers, nodes = list(dict.fromkeys(layers or [])), list(dict.fromkeys(nodes or []))
    if not layers and not nodes:
        raise UserError("choose at least one layer or node to ablate")
    if len(nodes) > MAX_ABLATE_NODES:
        raise UserError(f"choose at most {MAX_ABLATE_NODES} nodes to ablate at once (got {len(nodes)})")
    bad = [l for l in layers if l not in plotting.layer_names(entry.n_layer)]
    if bad:
        raise UserError(f"no layer {bad[0]!r} in this model")
    if base == "circuit" and circuit is None:
        raise UserError("no circuit selected: ablate from the full model, or choose a run")
    options = _options(run)
    batch = entry.task_batch(task, options)
    means = entry.means() if mode == "mean" else None
    start = circuit.masks(entry.config) if base == "circuit" else all_kept(entry.config)

    def masked(remove_layers, remove_nodes):
        m = {loc: v.clone() for loc, v in start.items()}
        for loc in m:
            if plotting.sublayer_of(loc) in remove_layers:
                m[loc][:] = False
        for n in remove_nodes:
            loc, i = parse_node(n)
            if loc not in m or i >= m[loc].numel():
                raise UserError(f"node {n} does not exist in this model")
            m[loc][i] = False
        return m

    def measure(masks):
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if options.freeze_norm_scales:
                stack.enter_context(frozen_norm_scales(entry.model, batch))
            if masks is not None:
                stack.enter_context(ablate(entry.model, masks, means))
            logits = task_logits(entry.model, batch)
        idx = torch.arange(len(batch))
        ld = float((logits[idx, batch.correct_ids] - logits[idx, batch.alternative_ids]).mean())
        return float(task_loss(logits, batch)), ld

    conditions = [(l, [l], []) for l in layers] + [(n, [], [n]) for n in nodes]
    if len(conditions) > 1:
        conditions.append(("all chosen", layers, nodes))
    plans = [(label, masked(ls, ns)) for label, ls, ns in conditions]  # bad node ids fail before any forward pass
    base_loss, base_ld = measure(start if base == "circuit" else None)
    rows = [AblationRow(f"baseline ({'circuit' if base == 'circuit' else 'full model'})", base_loss, base_ld, 0.0, 0.0, True)]
    for label, masks in plans:
        loss, ld = measure(masks)
        rows.append(AblationRow(label, loss, ld, loss - base_loss, ld - base_ld))
    return rows


def live_importances(entry: ModelEntry, run: Run | None, circuit: CircuitGraph, task: str | None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, float], str]:
    """Every circuit node's importance on the task, now: exact (one forward pass per node, `progress(done,
    total)` after each) up to MAX_EXACT_IMPORTANCES nodes, first-order attribution beyond. (importances, method)."""
    from ..circuits.evaluation import node_importances

    if not entry.tasks.known(task):
        raise UserError("choose a task to compute importances on")
    options = _options(run)
    batch = entry.task_batch(task, options)
    method = "exact" if circuit.n_nodes <= MAX_EXACT_IMPORTANCES else "attribution"
    means = entry.means_for(circuit)
    imps = node_importances(entry.model, batch, circuit.masks(entry.config), means, options.freeze_norm_scales,
                            method=method, progress=progress)
    return imps, method


# =====================================================================================================
# Pruning in the app
# =====================================================================================================


@dataclass(frozen=True)
class PruneTarget:
    """A pruning target (nats) for a task, and what the full model's loss says about it before any pruning."""

    task: str
    full_loss: float
    target: float
    reachable: bool  # the full model reaches it (a circuit rarely does much better)
    message: str


def prune_target(entry: ModelEntry, task: str | None, target: Any, relative: bool = False) -> PruneTarget:
    """The target in nats: `target` itself, or `target` × the full model's held-out loss when `relative`; and a
    message that warns when even the full model misses it. A target at or above chance (ln 2) is refused: a
    circuit reaching it would not do the task."""
    if not entry.tasks.known(task):
        raise UserError("choose a task to prune for")
    full = full_loss(entry, task, EvalOptions())
    try:
        value = float(target)
        if not math.isfinite(value):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"the target {target!r} is not a number") from None
    if relative:
        if not 0 < value <= 20:
            raise UserError("a relative target must be a factor in (0, 20] of the full model's loss")
        nats, what = value * full, f"the target {value:g} × the full model's held-out loss {full:.3f} ="
    else:
        if not 0 < value < 10:
            raise UserError("the target loss must be between 0 and 10 nats")
        nats, what = value, "the target"
    at_chance = full >= CHANCE_LOSS
    try:
        check_target(nats, what)
    except ValueError as exc:
        hint = (f" The full model's held-out loss on {task} is {full:.3f}, itself at or above chance: it does not do "
                "this task, so no circuit of it will." if at_chance else
                f" A factor below {CHANCE_LOSS / full:.2f} of the full model's {full:.3f} is under chance."
                if relative else "")
        raise UserError(str(exc) + "." + hint) from None
    reachable = full <= nats
    head = f"The full model's held-out loss on {task} is {full:.3f} nats"
    if reachable:
        message = f"{head}; the target {nats:.3f} nats is {nats / max(full, 1e-9):.2f} × that."
    elif at_chance:
        message = (f"⚠️ {head}, at or above chance (ln 2 = {CHANCE_LOSS:.3f}): the model does not do this task, so "
                   f"pruning will not reach the target {nats:.3f} nats, nor any target below chance.")
    else:
        suggestion = min(1.2 * full, (full + CHANCE_LOSS) / 2)  # above the full model, still below chance
        message = (f"⚠️ {head}, above the target {nats:.3f}: pruning will most likely not reach it (a circuit "
                   f"rarely beats the full model by much). A target relative to the full model, such as "
                   f"{suggestion / full:.2f} × {full:.3f} = {suggestion:.3f} nats, is within reach.")
    return PruneTarget(task, full, nats, reachable, message)


@dataclass(frozen=True)
class WorkerPrune:
    """What a pruning worker sends back: the circuit and what the app shows of the pruning, nothing else."""

    circuit: CircuitGraph
    scores: dict[str, torch.Tensor]
    verdict: CircuitVerdict | None
    seconds: float


def _task_spec(task) -> tuple:
    """A task as plain data for the worker (a task's generator is a closure, which does not pickle): a user
    task's examples, or a built-in task's name."""
    if task.examples is not None:
        return ("pairs", task.name, task.description, [(e.prompt, e.correct, e.alternative) for e in task.examples])
    return ("builtin", task.name)


def _task_from_spec(spec: tuple):
    from ..circuits.tasks import get_task, task_from_pairs

    if spec[0] == "pairs":
        return task_from_pairs(spec[1], spec[3], description=spec[2])
    return get_task(spec[1])


def _end_with_parent() -> None:
    """On Linux, this process is killed when the server that started it ends (elsewhere it ends at its next
    message, when the pipe is gone)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def prune_worker_main(out_fd: int) -> None:
    """The pruning worker (a fresh interpreter, `prune_in_worker`): reads (folder, spec, task, config, means,
    threads) as a pickle on stdin, loads the model from its folder, prunes, and writes ("progress", fraction,
    description) messages, then ("done", WorkerPrune) or ("error", one line), as pickles on `out_fd`."""
    _end_with_parent()
    with open(out_fd, "wb") as out:
        def send(message) -> None:
            pickle.dump(message, out)
            out.flush()

        try:
            from ..circuits.pruning import prune
            from ..model.loading import load_model_and_tokenizer

            folder, spec, task_spec, config, means, threads = pickle.load(sys.stdin.buffer)
            task = _task_from_spec(task_spec)
            torch.set_num_threads(threads)
            model, tokenizer = load_model_and_tokenizer(folder)
            model.eval()
            result = prune(model, tokenizer, task, config, means=means, model_name=spec,
                           progress=lambda fraction, desc: send(("progress", float(fraction), str(desc))))
            send(("done", WorkerPrune(result.circuit, result.scores, result.verdict, result.seconds)))
        except BaseException as exc:  # the server shows it as one line
            send(("error", first_line(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {first_line(exc)}"))


WORKER_CODE = ("import sys; sys.path[:0] = sys.argv[2:]; "
               "from modeling_csp.explorer.analysis import prune_worker_main; prune_worker_main(int(sys.argv[1]))")


def prune_in_worker(entry: ModelEntry, task, config: PruneConfig, means,
                    progress: Callable[[float, str], None]) -> WorkerPrune:
    """Prunes in a fresh interpreter that loads the model from its folder and sends back only the circuit (its
    scores and verdict): what pruning allocates goes when that process ends, so the server's memory stays flat.
    At most `entry.prune_slots` workers run at once; a prune beyond that waits, and says so. (A subprocess, not
    multiprocessing: spawn would re-run the caller's main script.)"""
    import subprocess

    if not entry.prune_slots.acquire(blocking=False):
        progress(0.0, "pruning worker: waiting for another prune on this server to finish")
        entry.prune_slots.acquire()
    try:
        progress(0.0, "pruning worker: starting (it loads the model)")
        read_fd, write_fd = os.pipe()
        try:
            worker = subprocess.Popen([sys.executable, "-c", WORKER_CODE, str(write_fd), *sys.path],
                                      stdin=subprocess.PIPE, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        with open(read_fd, "rb") as messages:
            try:
                worker.stdin.write(pickle.dumps((str(entry.folder), entry.spec, _task_spec(task), config, means,
                                                 torch.get_num_threads())))
                worker.stdin.close()
                while True:
                    try:
                        message = pickle.load(messages)  # our own worker's output, nothing from outside
                    except (EOFError, pickle.UnpicklingError):
                        worker.wait()
                        raise UserError(f"the pruning worker stopped without a result (exit code {worker.returncode});"
                                        " the server may be short of memory, try again later") from None
                    if message[0] == "progress":
                        progress(message[1], message[2])
                    elif message[0] == "error":
                        raise UserError(message[1])
                    else:
                        return message[1]
            finally:
                if worker.poll() is None:
                    try:
                        worker.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        worker.kill()
                        worker.wait()
    finally:
        entry.prune_slots.release()


@dataclass(frozen=True)
class PruneOutcome:
    """A pruning run made in the app: the run (its circuit and scores), whether it reached its target, and the
    message to show (✅ only for a reached target with a circuit smaller than half of the model)."""

    run: Run
    reached: bool
    message: str
    target: PruneTarget


def prune_circuit(entry: ModelEntry, task: str | None, target: Any = PruneConfig.target_loss,
                  steps: Any = PruneConfig.steps, relative: bool = False,
                  progress: Callable[[float, str], None] | None = None, control: bool = False) -> PruneOutcome:
    """Prunes the shared model for a task (mean ablation, the pruning defaults otherwise), with the
    shuffled-answer control when asked; its hooks are this call's own, so other users' views keep running on the
    same model meanwhile. `progress(fraction, description)` hears of every stage with its counts ("mask training:
    step 40 of 200", "k bisection: probe 3 (at most 15), k=1,410", "control: ...", "evaluation: ..."). The
    message is the held-out verdict (`evaluation.circuit_verdict`): ✅ only for a target reached on held-out
    examples, below chance, by a circuit smaller than half of the model."""
    goal = prune_target(entry, task, target, relative)
    steps, note = clamp(steps, MIN_PRUNE_STEPS, MAX_PRUNE_STEPS, "steps")
    report = progress or (lambda fraction, desc: None)
    report(0, "mean activations")
    means = entry.means()
    config = PruneConfig(target_loss=goal.target, steps=steps, control="shuffled" if control else None)
    result = prune_in_worker(entry, entry.tasks.resolve(task), config, means,
                             lambda fraction, desc: report(0.02 + 0.98 * fraction, desc))
    c, verdict = result.circuit, result.verdict
    share = c.n_nodes / entry.n_total_nodes
    size = f"k={c.n_nodes:,} of {entry.n_total_nodes:,} nodes ({share:.0%}), {c.n_edges:,} edges"
    texts = list(verdict.messages(without=("control",)))
    if verdict.passed and share > 0.5:  # reached, but with most of the model: no ✅
        texts[0] = "⚠️" + texts[0][1:]
        texts.append(f"⚠️ that takes {share:.0%} of the model's nodes: most of the model, not a circuit; train longer "
                     "(more steps)")
    elif not verdict.passed:
        texts.append("Train longer, or set a higher target (below chance)" if not verdict.at_or_above_chance else
                     "Train longer; if the full model itself is weak on this task, no circuit will do it")
    message = ". ".join([f"{texts[0]} — {size}" if texts else size] + texts[1:]) + "."
    if c.control:
        message += " " + control_text(c.control, c.losses.get("random"), verdict)
    message += f" ({result.seconds:.0f} s, {steps} steps)" + (f" — {note}" if note else "")
    run = Run(id=f"pruned:{task}:{int(time.time())}", name=f"pruned here · {task} · k={c.k} · {time.strftime('%H:%M')}",
              source="pruned", circuit=c, scores=result.scores, task=task, k=c.k, tasks=entry.tasks)
    return PruneOutcome(run, bool(verdict.passed and share <= 0.5), message, goal)


def control_text(control: dict, random: float | None = None, verdict: CircuitVerdict | None = None) -> str:
    """One line on a circuit's shuffled-answer control (docs/circuit_format.md): what the same pruning finds when
    the answers are noise, at the circuit's size (held out and on training examples) and to reach the target, and
    whether the circuit means something: the held-out judgement of `verdict` when given, else said to be a
    training-split reading."""
    needs = (f"needs k={control['k_to_target']} to reach the target" if control.get("k_to_target") is not None
             else "cannot reach the target")
    base = f", random same-size {random:.3f}" if random is not None else ""
    test = control.get("test_loss_at_k")
    held = (f"loss {test:.3f} held out ({control['loss_at_k']:.3f} on training examples)"
            if isinstance(test, (int, float)) else f"loss {control['loss_at_k']:.3f} on training examples")
    note = verdict.note("control") if verdict is not None else None
    if note is not None:
        judged = ("✅ " if note.good else "⚠️ ") + note.text
    else:
        fits = control.get("k_to_target") is not None and control["k_to_target"] <= control["k"]
        judged = ("⚠️ training-split reading only: " + ("the control does as well, this circuit may fit noise" if fits
                                                        else "the control needs more nodes than the circuit"))
    return (f"Shuffled-answer control: {held} at k={control['k']}{base}; on its training examples it {needs} — "
            f"{judged}.")


def warm_up(explorer: Explorer, spec: str | None = None) -> None:
    """Loads a model and precomputes what a first view and a first ablation need; never raises."""
    try:  # in the order the first view needs them: its summary, its node panel, then ablations
        entry = explorer.get_model(spec)
        first = next((r for r in entry.runs.values() if r.task), None)
        if first is not None:
            full_loss(entry, first.task, _options(first))
            entry.task_activations(first.task, _options(first))
        entry.prepare()
    except Exception as exc:
        log(f"warm-up skipped: {first_line(exc)}")


__all__ = [
    "TOP_N", "control_text", "clamp", "parse_node", "task_names", "max_k", "circuit_at_k", "CircuitStats", "full_loss", "circuit_stats",
    "FaithCurve", "faithfulness_curve", "best_layer", "best_node", "NodeExamples", "node_examples",
    "node_index", "NodeActivationStats", "node_activation_stats", "TaskRow",
    "TaskActivations", "task_activations", "AttentionRow", "HeadAttention", "head_attention", "embedding_channel",
    "clean_prompt", "encode_prompt", "candidate_id", "top_tokens", "LogitDiff", "PromptResult", "predict",
    "next_tokens", "AblationRow", "ablation_effects", "live_importances", "PruneTarget", "prune_target",
    "PruneOutcome", "prune_circuit", "WorkerPrune", "prune_in_worker", "warm_up",
]
