"""The app's other panels as plain results: the node panel, the prompt lab, curves and run details, embeddings,
ablations, live importances, comparison, pruning, imports and downloads.

Each `*_panel` function takes the explorer and what the page holds (strings and numbers as the page has them) and returns a
dataclass of ready-to-show texts and figures. A problem fills the panel it belongs to with its message and
clears the rest of that panel (no stale result stays next to an error); it never raises for bad input.
Pruning and imports return the new `View` (view.py) with the run selected, and the session that now holds it.
"""

from __future__ import annotations

import html
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import plotting
from ..training.train import stages_curve
from . import analysis as A
from .errors import UserError, first_line, log, markdown_literal
from .explorer import Explorer
from .models import ModelEntry, import_run_file
from .node_walk import node_reading
from .runs import Run
from .sessions import Session, choose_run, find_run
from .tasks import MAX_TASK_TEXT_BYTES
from .view import Request, Selection, View, resolve_view

MESSAGE_CSS = "<style>.csp-msg{color:#8a5a00;background:#fff7e6;border:1px solid #f3d9a4;border-radius:4px;padding:6px 8px;margin:4px 0;}</style>"


def message_html(text: str) -> str:
    return f'{MESSAGE_CSS}<div class="csp-msg">⚠️ {html.escape(text)}</div>'


def warning_markdown(text: str) -> str:
    """A warning for a Markdown component, its text shown literally (messages quote what the user typed)."""
    return f"⚠️ {markdown_literal(text)}"


def _explain(exc: BaseException) -> str:
    """The message for a failure: a UserError's own, anything else named (and logged with its traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    import traceback

    traceback.print_exc()
    return f"unexpected error: {type(exc).__name__}: {first_line(exc)}"


def _selection(explorer: Explorer, model: Any, run_id: Any, k: Any) -> tuple[ModelEntry, Run | None, Any]:
    """(model, run, circuit at k) for what the page holds; k is clamped silently (the view already said so)."""
    entry = explorer.get_model(str(model or "") or None)
    run = find_run(entry, None, str(run_id)) if run_id else None
    circuit = None
    if run is not None:
        try:
            k = A.clamp(k, 1, A.max_k(entry, run), "k")[0] if k not in (None, "") else None
        except UserError:
            k = None
        circuit = A.circuit_at_k(entry, run, k)
    return entry, run, circuit


# =====================================================================================================
# Issue 21: a model's one-time preparation (mean activations, node examples), with its progress
# =====================================================================================================


def model_preparation(explorer: Explorer, model: Any, report: Callable[[float, str], None],
                      poll_s: float = 0.5) -> str:
    """Waits for the model's mean activations and node examples (`ModelEntry.prepare`: read from the disk cache,
    else computed once, in a thread of their own that every page shares), calling `report(fraction, text)` as they
    progress; returns the line to show when they are ready, or the problem."""
    import threading

    try:
        entry = explorer.get_model(str(model or "") or None)
    except Exception as exc:
        return warning_markdown(_explain(exc))
    prep = entry.preparation
    if not prep.done.is_set():
        if not prep.started.is_set():
            threading.Thread(target=_prepare_quietly, args=(entry,), daemon=True).start()
        while not prep.done.wait(poll_s):
            report(*prep.state())
    if prep.error:
        return warning_markdown(prep.error)
    done = entry.prepare()
    name = markdown_literal(entry.spec)
    if not done.computed:
        return f"✅ {name}: mean activations and node examples read from the disk cache"
    took = sum(done.seconds.values())
    return f"✅ {name}: mean activations and node examples computed once in {took:.0f} s and cached on disk"


def _prepare_quietly(entry: ModelEntry) -> None:
    try:
        entry.prepare()
    except Exception as exc:  # the page shows `preparation.error`
        log(f"preparing {entry.spec}: {first_line(exc)}")


# =====================================================================================================
# The node panel (what the view's header does not show)
# =====================================================================================================


@dataclass
class NodePanel:
    """Connections, activating examples, activations on the task's examples, for attention nodes the head's
    attention on them, and what the node does (`reading`). Each part shows its own message when it fails."""

    connections: str = ""
    examples: str = ""
    task: str = ""
    attention: str = ""
    attention_figure: Any = None
    qk_figure: Any = None
    selection: Selection = field(default_factory=Selection)  # what it was computed for (the page paints it only then)
    reading: str = ""  # "What it does": paths, why this node, logit effects / driving tokens (node_walk)


def node_panel_updating(selection: Selection) -> NodePanel:
    """What the node panel shows from the moment the page picks `selection` until its panel arrives: the older
    selection's panel is gone, and each part says what is coming."""
    if selection.node is None:
        return NodePanel(selection=selection)
    note = (f'<div class="csp-updating">⏳ updating… {html.escape(str(selection.node))} on '
            f'{html.escape(str(selection.task))}\'s examples, circuit k={selection.k}</div>')
    figure = plotting.message_figure(f"{selection.node}: updating…", 200)
    return NodePanel(note, note, note, note, figure, figure, selection, reading=note)


def node_panel(explorer: Explorer, model: Any, task: Any, run_id: Any, k: Any, node: Any, zero_centered: bool = True,
               layer: Any = None) -> NodePanel:
    """The panel of a node of the circuit (model, run, k), labelled with that selection (`layer`: the layer the
    page shows, which names the selection when no node is selected)."""
    selection = Selection.of(model, task, run_id, k, layer, node)
    try:
        entry, run, circuit = _selection(explorer, model, run_id, k)
    except Exception as exc:
        return NodePanel(connections=message_html(_explain(exc)), selection=selection)
    if circuit is None or not node or node not in circuit.nodes:
        return NodePanel(selection=selection)
    task = task if entry.tasks.known(task) else circuit.task
    panel = NodePanel(selection=selection)

    def part(fn: Callable[[], str]) -> str:
        try:
            return fn()
        except Exception as exc:
            return message_html(_explain(exc))

    panel.connections = part(lambda: plotting.connections_html(plotting.connections_table(circuit, node, entry.d_head)))

    def examples():
        stats = A.node_activation_stats(entry, node)  # issue 22: histogram and density over the example index
        histogram = plotting.activation_histogram_html(node, stats.edges, stats.counts, stats.density, stats.source)
        ex = A.node_examples(entry, circuit, node)
        return histogram + plotting.quantile_examples_html(ex.samples, zero_centered,
                                                           title=f"Top / bottom activating examples ({ex.source})")

    panel.examples = part(examples)

    def task_part():
        acts = A.task_activations(entry, run, circuit, node, task)
        rows = tuple([(r.tokens, r.values) for r in cls] for cls in acts.classes)
        diffs = [(r.tokens, r.values) for r in acts.pair_differences()]
        return plotting.task_examples_html(rows, acts.names, diffs, zero_centered,
                                           title=f"{node} on {task or 'the task'}'s examples, circuit "
                                                 f"k={circuit.n_nodes} ({acts.source})")

    panel.task = part(task_part)
    panel.reading = part(lambda: plotting.node_reading_html(node_reading(entry, circuit, node), entry.d_head))
    try:
        att = A.head_attention(entry, run, circuit, node, task)
    except Exception as exc:
        panel.attention = message_html(_explain(exc))
        return panel
    if att is None:
        panel.attention = plotting.TABLE_CSS + ('<div class="csp-ex-title">Attention patterns are shown for attention '
                                           "nodes (act_in, q, k, v and resid_delta of an attention layer).</div>")
    else:
        title = f"{att.layer}.attn head {att.head} on {task}'s examples" + (f" — {att.note}" if att.note else "")
        panel.attention = plotting.attention_rows_html(att.rows, att.names, title)
        panel.attention_figure = plotting.attention_pattern_figure(
            att.pattern, att.tokens, f"head {att.head}: whole pattern on the first example", sink=att.sink)
        if att.contrib is not None:
            label = plotting.node_label(node, entry.d_head)
            panel.qk_figure = plotting.attention_pattern_figure(
                att.contrib, att.tokens, f"{label}: its own q·k/√d contribution", zero_centered=True)
    return panel


# =====================================================================================================
# Prompt lab
# =====================================================================================================


@dataclass
class PromptPanel:
    notice: str = ""
    tokens: str = ""
    figure: Any = None
    logit_diff: str = ""
    node_acts: str = ""
    json: dict | None = None


def prompt_panel(explorer: Explorer, model: Any, task: Any, run_id: Any, k: Any, node: Any, prompt: Any, a: Any, b: Any,
                 zero_centered: bool = True) -> PromptPanel:
    """Top next tokens of the full model and the circuit, the candidates' logit difference, the node's
    activation per token; on a problem only its message (the previous prediction is cleared)."""
    try:
        entry, run, circuit = _selection(explorer, model, run_id, k)
        node = node if circuit is not None and node in circuit.nodes else None
        r = A.predict(entry, prompt, circuit, node, (a if isinstance(a, str) else None, b if isinstance(b, str) else None))
    except Exception as exc:
        msg = _explain(exc)
        return PromptPanel(notice=warning_markdown(msg), figure=plotting.message_figure(f"⚠️ {msg}", 160))
    if r.logit_diff is not None:
        d = r.logit_diff
        ld = (f"**logit({markdown_literal(plotting.display_token(d.a))}) − "
              f"logit({markdown_literal(plotting.display_token(d.b))})**: full model {d.full:+.3f}"
              + (f" · circuit {d.circuit:+.3f}" if d.circuit is not None else ""))
    else:
        ld = f"ℹ️ {markdown_literal(r.logit_note)}"
    node_html = ""
    if r.node:
        node_html = plotting.TABLE_CSS + plotting.token_heatmap_html(
            r.tokens, r.node_acts, zero_centered=zero_centered, title=f"activations of {r.node} on the prompt (full model)")
    title = f"Top {len(r.full)} next tokens" + (f" (circuit: {r.circuit_k} nodes)" if r.circuit else "")
    return PromptPanel(
        notice="\n".join(f"ℹ️ {markdown_literal(n)}" for n in r.notices) or f"{len(r.tokens)} token{'s' if len(r.tokens) != 1 else ''}",
        tokens=plotting.TABLE_CSS + plotting.tokens_html(r.tokens, r.ids),
        figure=plotting.next_tokens_figure([(t["token"], t["prob"]) for t in r.full],
                                           [(t["token"], t["prob"]) for t in r.circuit] if r.circuit else None, title),
        logit_diff=ld, node_acts=node_html, json={"full": r.full, "circuit": r.circuit, "notices": r.notices})


# =====================================================================================================
# Curves and run details, embeddings
# =====================================================================================================


def _table(title: str, rows: list[tuple[str, Any]], head: tuple[str, str] = ("option", "value")) -> str:
    """A small two-column HTML table with a title (values as the page shows them: 4 significant digits)."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)[:120]

    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(cell(v))}</td></tr>" for k, v in rows)
    return (f'<div class="csp-details"><h4>{html.escape(title)}</h4><table class="csp-q">'
            f"<tr><th>{head[0]}</th><th>{head[1]}</th></tr>{body}</table></div>")


DETAILS_CSS = ("<style>.csp-details-row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start;}"
               ".csp-details{min-width:260px;} .csp-details h4{margin:4px 0;} .csp-details td{font-size:12.5px;}</style>")


def run_details(entry: ModelEntry, run: Run | None) -> str:
    """The run's pruning configuration and outcome, and the model's final training metrics, as three tables
    side by side (HTML)."""
    from ..circuits.evaluation import verdict_of

    parts = []
    if run is not None:
        circuit = run.load()
        meta = circuit.meta or {}
        config = meta.get("options") or meta.get("prune_config") or {}
        if isinstance(config, dict) and config:
            parts.append(_table("Pruning configuration", [(k, v) for k, v in config.items()
                                                          if not isinstance(v, (dict, list))]))
        verdict = verdict_of(circuit)  # judged now on the held-out losses, also for files older than meta.verdict
        judged = [("target_reached", verdict.passed), ("target_reached_train", verdict.target_reached_train),
                  ("reached_only_on_train", verdict.reached_only_on_train),
                  ("at_or_above_chance", verdict.at_or_above_chance), ("better_than_full", verdict.better_than_full),
                  ("means_something", verdict.means_something)] if verdict.target is not None else []
        outcome = [(k, v) for k, v in judged if v is not None] + [
            (k, meta[k]) for k in ("train_circuit_loss", "full_accuracy", "circuit_accuracy", "random_baseline_as_good",
                                   "importance_method", "n_train", "n_test", "seconds") if k in meta]
        if outcome:
            parts.append(_table("Pruning outcome", outcome, ("measure", "value")))
        if not parts:
            parts.append('<div class="csp-details"><h4>Pruning</h4>This run records no pruning configuration.</div>')
    curve = entry.training_curve if isinstance(entry.training_curve, dict) else {}
    final = curve.get("final") if isinstance(curve.get("final"), dict) else {}
    last = (curve.get("curve") or [{}])[-1] if isinstance(curve.get("curve"), list) else {}
    metrics = [(k, v) for k, v in {**(last if isinstance(last, dict) else {}), **final}.items()
               if isinstance(v, (int, float, str, bool))]
    for name, value in (final.get("quote_accuracy") or {}).items() if isinstance(final.get("quote_accuracy"), dict) else []:
        metrics.append((f"quote_accuracy.{name}", value))
    parts.append(_table("Model training: final metrics", metrics, ("metric", "value")) if metrics else
                 '<div class="csp-details"><h4>Model training</h4>This model ships no training record.</div>')
    return plotting.TABLE_CSS + DETAILS_CSS + '<div class="csp-details-row">' + "".join(parts) + "</div>"


@dataclass
class CurvesPanel:
    faithfulness: Any = None
    pruning: Any = None
    training: Any = None
    details: str = ""


def curves_panel(explorer: Explorer, model: Any, task: Any, run_id: Any, k: Any) -> CurvesPanel:
    """Faithfulness (task loss vs k, log-log, with the full model, target and random baseline), the pruning
    curve, the model's training curve, and the run's configuration and the model's final metrics."""
    try:
        entry, run, circuit = _selection(explorer, model, run_id, k)
    except Exception as exc:
        msg = _explain(exc)
        return CurvesPanel(plotting.message_figure(msg), plotting.message_figure(msg), plotting.message_figure(msg),
                           message_html(msg))
    record = entry.training_curve
    curve = stages_curve(dict(record)) if record and record.get("curve") else None
    panel = CurvesPanel(training=plotting.training_curve_figure(curve), details=run_details(entry, run))
    if run is None:
        panel.faithfulness = plotting.message_figure("No run selected.")
        panel.pruning = plotting.message_figure("No run selected.")
        return panel
    panel.pruning = plotting.pruning_curve_figure(run.load().pruning_curve)
    task = task if entry.tasks.known(task) else None
    try:
        curve = A.faithfulness_curve(entry, run, task)
        stats = A.circuit_stats(entry, run, circuit.n_nodes, task)
        panel.faithfulness = plotting.faithfulness_figure(curve.points, stats.full, circuit.target_loss, stats.random,
                                                          circuit.n_nodes, curve.random)
    except Exception as exc:
        panel.faithfulness = plotting.message_figure(f"⚠️ {_explain(exc)}")
    return panel


# ---- issue 22: a circuit through training (Curves tab) ----------------------------------------


def circuit_through_training_panel(explorer: Explorer, model: Any) -> Any:
    """The model's shipped circuits' held-out loss at each kept snapshot of its weights, with the full model's
    (the folder's circuit_through_training.json), or a message figure saying why there is none."""
    from ..circuits.transfer import read_circuit_through_training

    try:
        entry = explorer.get_model(str(model or "") or None)
        curve = read_circuit_through_training(entry.folder)
    except ValueError as exc:  # a malformed file that came with the model: said, not logged as a bug
        return plotting.message_figure(f"⚠️ {exc}")
    except Exception as exc:
        return plotting.message_figure(f"⚠️ {_explain(exc)}")
    return plotting.circuit_through_training_figure(curve)


@dataclass
class EmbeddingsPanel:
    channel: int = 0
    tokens: Any = None
    histogram: Any = None
    positions: Any = None
    notice: str = ""


def embeddings_panel(explorer: Explorer, model: Any, channel: Any) -> EmbeddingsPanel:
    """One residual channel's token and position embeddings (the channel clamped to the model's width)."""
    try:
        entry = explorer.get_model(str(model or "") or None)
        c, wte, wpe, note = A.embedding_channel(entry, channel)
    except Exception as exc:
        msg = _explain(exc)
        return EmbeddingsPanel(0, plotting.message_figure(msg), plotting.message_figure(msg), plotting.message_figure(msg),
                               warning_markdown(msg))
    return EmbeddingsPanel(c, plotting.embedding_tokens_figure(entry.vocab, wte, c),
                           plotting.weights_histogram_figure(wte, f"Token embedding weights of channel {c}"),
                           plotting.position_embedding_figure(wpe, c if c < len(wpe[0]) else None),
                           warning_markdown(note) if note else "")


# =====================================================================================================
# Ablations, importances, comparison
# =====================================================================================================


@dataclass
class AblationPanel:
    figure: Any = None
    table: str = ""


def ablation_panel(explorer: Explorer, model: Any, task: Any, run_id: Any, k: Any, layers: Any, nodes: Any, mode: Any,
                   base: Any) -> AblationPanel:
    try:
        entry, run, circuit = _selection(explorer, model, run_id, k)
        base = "circuit" if base == "circuit" else "full"
        rows = A.ablation_effects(entry, run, circuit, task, list(layers or []), list(nodes or []), str(mode), base)
    except Exception as exc:
        msg = _explain(exc)
        return AblationPanel(plotting.message_figure(f"⚠️ {msg}", 160), warning_markdown(msg))
    table = "| ablation | task loss | Δ loss | logit diff | Δ logit diff |\n|---|---|---|---|---|\n" + "\n".join(
        f"| {markdown_literal(r.label)} | {r.loss:.4f} | {r.d_loss:+.4f} | {r.logit_diff:.3f} | {r.d_logit_diff:+.3f} |" for r in rows)
    where = "circuit" if base == "circuit" else "full model"
    figure = plotting.ablation_effect_figure([{"label": r.label, "d_loss": r.d_loss, "d_logit_diff": r.d_logit_diff}
                                              for r in rows if not r.baseline], f"{mode}-ablation from the {where} on {task}")
    return AblationPanel(figure, table)


def importance_panel(explorer: Explorer, model: Any, task: Any, run_id: Any, k: Any, node: Any,
                     progress: Callable[[int, int], None] | None = None):
    """A bar figure of every circuit node's live importance (or a message figure)."""
    try:
        entry, run, circuit = _selection(explorer, model, run_id, k)
        if circuit is None:
            raise UserError("no circuit selected")
        imps, method = A.live_importances(entry, run, circuit, task, progress)
    except Exception as exc:
        return plotting.message_figure(f"⚠️ {_explain(exc)}", 160)
    return plotting.importance_bar_figure(imps, node, entry.d_head,
                                          title=f"Live node importances on {task} ({len(imps)} nodes, {method})")


@dataclass
class ComparePanel:
    figure: Any = None
    text: str = ""


def compare_panel(explorer: Explorer, model: Any, task: Any, run_id: Any, k: Any, other_id: Any) -> ComparePanel:
    try:
        entry, run, circuit = _selection(explorer, model, run_id, k)
        other = find_run(entry, None, str(other_id)) if other_id else None
        if circuit is None or other is None:
            raise UserError("choose a run to compare with")
        d = circuit.diff(other.load())
    except Exception as exc:
        msg = _explain(exc)
        return ComparePanel(plotting.message_figure(f"⚠️ {msg}", 160), warning_markdown(msg))
    text = (f"nodes: {len(d.nodes_only_self)} only in {markdown_literal(run.name)}, {len(d.nodes_both)} in both, "
            f"{len(d.nodes_only_other)} only in {markdown_literal(other.name)} · edges: {len(d.edges_only_self)} / "
            f"{len(d.edges_both)} / {len(d.edges_only_other)}")
    return ComparePanel(plotting.circuit_diff_figure(d, "this", "other"), text)


# =====================================================================================================
# Pruning, imports and downloads: new runs
# =====================================================================================================


def circuit_nodes(explorer: Explorer, model: Any, run_id: Any, k: Any) -> list[str]:
    """The shown circuit's node ids (to offer for ablation), none when there is no circuit."""
    try:
        _, _, circuit = _selection(explorer, model, run_id, k)
    except Exception as exc:
        log(f"no circuit nodes: {first_line(exc)}")
        return []
    return list(circuit.nodes) if circuit is not None else []


def prune_check(explorer: Explorer, model: Any, task: Any, target: Any, relative: bool) -> str:
    """What the full model's loss says about a pruning target, before pruning (markdown)."""
    try:
        entry = explorer.get_model(str(model or "") or None)
        return A.prune_target(entry, task, target, bool(relative)).message
    except Exception as exc:
        return warning_markdown(_explain(exc))


def _with_new_run(explorer: Explorer, session: Session, entry: ModelEntry, run: Run, tab: str) -> tuple[View, list[str]]:
    """Saves a new run (store), makes it the session's and returns the view that shows it, and notes."""
    saved, notice = explorer.store.save(run)
    session = (session if isinstance(session, Session) else Session()).with_run(saved.id, entry.spec)
    view = resolve_view(explorer, session, Request("run", model=entry.spec, task=saved.task or session.view.get("task"),
                                                   run=saved.id, tab=tab))
    return view, [notice] if notice else []


@dataclass
class NewRun:
    """A run made by pruning or an import: the view that shows it (None when it failed) and the message."""

    view: View | None
    message: str
    notes: list[str] = field(default_factory=list)


def prune_new_run(explorer: Explorer, session: Session, model: Any, task: Any, target: Any, relative: bool, steps: Any,
                  progress: Callable[[float, str], None] | None = None, tab: str = "browser",
                  control: bool = False) -> NewRun:
    try:
        entry = explorer.get_model(str(model or "") or None)
        outcome = A.prune_circuit(entry, task, target, steps, bool(relative), progress, bool(control))
        view, notes = _with_new_run(explorer, session, entry, outcome.run, tab)
    except Exception as exc:
        return NewRun(None, warning_markdown(f"pruning failed: {_explain(exc)}"))
    return NewRun(view, outcome.message + "".join(f" {warning_markdown(n)}" for n in notes), notes)


def add_custom_task(explorer: Explorer, session: Session, model: Any, text: Any, path: Any = None, label: Any = None,
                    tab: str = "browser") -> NewRun:
    """Your own task from pasted JSON lines (or, when none are pasted, an uploaded file): validated against the
    model, checked (the full model's accuracy on it) and added to the session's tasks; the view shows it, with
    its "no circuit yet" button to prune it."""
    from ..circuits.evaluation import check_task

    try:
        entry = explorer.get_model(str(model or "") or None)
        source = "pasted lines"
        if not (isinstance(text, str) and text.strip()) and path:
            p = Path(str(path))
            try:
                size = p.stat().st_size
                if size > MAX_TASK_TEXT_BYTES:
                    raise UserError(f"{p.name} is {size / 1e6:.1f} MB; task files up to "
                                    f"{MAX_TASK_TEXT_BYTES / 1e6:.0f} MB are read")
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{p.name} is not UTF-8 text") from None
            except OSError:
                raise UserError(f"{p.name} cannot be read; upload it again") from None
            source, label = p.name, label or p.stem
        task = entry.tasks.from_text(text, entry.tokenizer, entry.config.block_size, label or "my_task")
        check = check_task(entry.model, entry.tokenizer, task)
        session = (session if isinstance(session, Session) else Session()).with_task(task.name)
        view = resolve_view(explorer, session, Request("task", model=entry.spec, task=task.name, tab=tab))
    except Exception as exc:
        return NewRun(None, warning_markdown(_explain(exc)))
    classes = check["classes"]
    warn = (" ⚠️ the full model gets under 90% of it right: a circuit for it may explain little."
            if check["accuracy"] < 0.9 else "")
    return NewRun(view, f"✅ added `{task.name}` from {markdown_literal(source)}: {len(task.examples)} examples ({classes[0]} / "
                        f"{classes[1]} per class), {check['n_test']} held out; the full model's accuracy "
                        f"{check['accuracy']:.0%}, loss {check['loss']:.3f} nats.{warn} Prune it with the button "
                        "at the top (it is now the selected task).")


def import_new_run(explorer: Explorer, session: Session, model: Any, path: Any, name: str | None = None,
                   tab: str = "browser") -> NewRun:
    try:
        if not path:
            raise UserError("no file")
        entry = explorer.get_model(str(model or "") or None)
        run = import_run_file(entry, str(path), name or Path(str(path)).name)
        view, notes = _with_new_run(explorer, session, entry, run, tab)
    except Exception as exc:
        return NewRun(None, warning_markdown(f"could not import {name or 'the file'}: {_explain(exc)}"))
    c = view.run.load()
    notes = [*run.circuit.notices, *notes]  # e.g. edges recomputed from the model's weights
    return NewRun(view, f"✅ imported {markdown_literal(name or Path(str(path)).name)}: {c.n_nodes} nodes, "
                        f"{c.n_edges} edges" + "".join(f" {warning_markdown(n)}" for n in notes), notes)


def api_next_tokens(explorer: Explorer, prompt: Any, model: Any = "", task: Any = "", run: Any = "",
                    k: Any = 0) -> dict[str, Any]:
    """The `/next_tokens` answer, validated as the page validates: an unknown model, task or run is an error,
    a run of another task too; k is clamped to the run's range with a notice. Errors are {"error": message}."""
    try:
        entry = explorer.get_model(str(model or "").strip() or None)
        task = str(task or "").strip() or None
        if task is not None:
            entry.tasks.resolve(task)  # an unknown task is an error
        chosen = choose_run(entry, str(run or "").strip() or None, task)
        answer = A.next_tokens(entry, prompt, chosen, k)
        if chosen is None and k not in (None, "", 0):
            answer["notices"].insert(0, f"k={k!r} ignored: no run for {task or 'this model'}")
        return answer
    except Exception as exc:
        return {"error": _explain(exc)}


DOWNLOADS_DIR = Path(tempfile.gettempdir()) / "csp_app_downloads"
DOWNLOAD_KEEP_S = 900  # a download's file outlives the request that wrote it by this long (Gradio copies it at once)


def download_path(explorer: Explorer, model: Any, run_id: Any, k: Any) -> str | None:
    """The shown circuit written as a csp-circuit file for download: a fresh folder per request, so concurrent
    requests never rewrite each other's file; older downloads are removed here."""
    try:
        entry, run, circuit = _selection(explorer, model, run_id, k)
    except Exception as exc:
        log(f"no download: {first_line(exc)}")
        return None
    if circuit is None:
        return None
    DOWNLOADS_DIR.mkdir(parents=True, exist_ok=True)
    remove_old_downloads(DOWNLOADS_DIR, DOWNLOAD_KEEP_S)
    folder = Path(tempfile.mkdtemp(dir=DOWNLOADS_DIR, prefix="download-"))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{circuit.task or 'circuit'}_k{circuit.n_nodes}_{run.id}")[:120]
    return str(circuit.save(folder / f"{name}.json"))


def remove_old_downloads(folder: Path, keep_s: float) -> None:
    """Deletes the per-request download folders in `folder` last changed more than `keep_s` seconds ago."""
    cutoff = time.time() - keep_s
    for sub in folder.glob("download-*"):
        try:
            if sub.stat().st_mtime < cutoff:
                shutil.rmtree(sub, ignore_errors=True)
        except OSError:  # removed by a concurrent request
            pass


__all__ = [
    "NodePanel", "node_panel", "node_panel_updating", "PromptPanel", "prompt_panel", "CurvesPanel", "curves_panel", "run_details",
    "EmbeddingsPanel", "embeddings_panel", "AblationPanel", "ablation_panel", "importance_panel", "ComparePanel",
    "compare_panel", "circuit_nodes", "prune_check", "api_next_tokens", "NewRun", "prune_new_run", "add_custom_task", "import_new_run", "download_path", "message_html",
    "warning_markdown",
]
