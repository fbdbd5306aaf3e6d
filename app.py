"""Circuit browser, prompt lab and ablation plots for weight-sparse transformers (a Gradio 6 app).

    python app.py                      # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT respected)

Runs unchanged as a Hugging Face Space (see hub_cards/space_card.md). The app is a thin layer: everything it
computes comes from `modeling_csp.explorer` (models and their shared caches, runs, circuits at k, losses,
node data, next-token predictions, ablations), which builds on `modeling_csp.loading`, `.circuits`,
`.ablation` and `.pruning`; every figure comes from `modeling_csp.plotting`. What lives here is the Gradio
layer: components, per-session state, markdown/HTML formatting and the event wiring.

k: a run's circuit has k nodes; a smaller k shows its k most important nodes (by ablation importance; for runs
pruned here, the top-k by pruning score, so any k up to the model's size), with losses computed live. A view
change answers in steps: the graph and the node panel's text first, then the node's figures, then the random
baseline and the layer deltas (which need ablations).

Environment:
    CSP_APP_MODEL      model shown first (default: "default", the embedded model)
    CSP_APP_IMPORT     os.pathsep-separated circuit files (.json) or viz_data.pt files to offer as runs
    CSP_APP_THREADS    torch CPU threads (default 2)
    CSP_APP_PRETRAIN_TOKENS  tokens of held-out text used for live activating examples (default 8192)

API: `/next_tokens` (gradio_client): prompt -> JSON with the top tokens and probabilities of the full model and
of the circuit alone (everything outside it mean-ablated); the same answer as `csp next-tokens` and
`modeling_csp.explorer.next_tokens`.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("CSP_APP_THREADS", "2")))

import gradio as gr  # noqa: E402

from modeling_csp import explorer, plotting  # noqa: E402
from modeling_csp.circuits import CircuitGraph, parse_node_id  # noqa: E402
from modeling_csp.explorer import (  # noqa: E402
    TOP_N,
    ModelEntry,
    Run,
    UserError,
    ablation_effects,
    add_pruned_run,
    add_session_run,
    attention_example_ids,
    attention_for_node,
    best_layer,
    best_node,
    choose_run,
    circuit_at_k,
    circuit_stats,
    default_model_spec,
    embedding_channel,
    faithfulness_curve,
    find_run,
    first_line,
    get_model,
    import_run_file,
    live_importances,
    loaded_models,
    max_k,
    next_tokens_data,
    node_examples,
    prune_circuit,
    runs_for_task,
    session_runs,
    task_activations,
    warm_up,
)
from modeling_csp.explorer import next_tokens as next_tokens_answer  # noqa: E402
from modeling_csp.tasks import get_task, list_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_PROMPT = 'def greet(name):\n    message = "Hello, world'

# The app's environment configures the explorer (see the module docstring).
explorer.settings.default_model = os.environ.get("CSP_APP_MODEL", "default")
explorer.settings.run_files = [p for p in os.environ.get("CSP_APP_IMPORT", "").split(os.pathsep) if p]
explorer.settings.pretrain_tokens = int(os.environ.get("CSP_APP_PRETRAIN_TOKENS", "8192"))

# =====================================================================================================
# The Gradio layer
# =====================================================================================================


CSS = """
#status {min-height: 1.5em;}
#prune-md {min-height: 70px;}
#status p {margin: 0;}
.csp-summary table {font-size: 13px;}
#node-click {display: none !important;}
#share-query {display: none !important;}
footer {display: none !important;}
"""

# Plotly clicks on a node (any figure inside #circuit-graph or #circuit-overview) are written to the hidden
# #node-click textbox as "<node id>|<time>", whose input event selects the node.
CLICK_JS = """
() => {
  const hookAll = () => {
    document.querySelectorAll('#circuit-graph .js-plotly-plot, #circuit-overview .js-plotly-plot, #importance-plot .js-plotly-plot').forEach((div) => {
      if (div.__cspHooked || typeof div.on !== 'function') return;
      div.__cspHooked = true;
      const source = div.closest('#circuit-graph') ? 'graph' : 'other';
      div.on('plotly_click', (ev) => {
        const p = ev && ev.points && ev.points[0];
        if (!p || p.customdata === undefined) return;
        const id = Array.isArray(p.customdata) ? p.customdata[0] : p.customdata;
        if (typeof id !== 'string' || id.indexOf(':') < 0) return;
        const box = document.querySelector('#node-click textarea, #node-click input');
        if (!box) return;
        if (source === 'graph' && window.Plotly) {  // move the selection ring now; the server skips the graph
          const i = div.data.findIndex((t) => t.name === 'selected');
          const ring = {x: [[p.x]], y: [[p.y]], customdata: [[[id]]]};
          if (i >= 0) { window.Plotly.restyle(div, ring, [i]); }
          else { window.Plotly.addTraces(div, {x: [p.x], y: [p.y], customdata: [[id]], name: 'selected', mode: 'markers',
                 hoverinfo: 'skip', showlegend: false,
                 marker: {size: 28, color: 'rgba(0,0,0,0)', line: {width: 3, color: '#111'}}}); }
        }
        box.value = id + '|' + source + '|' + Date.now();
        box.dispatchEvent(new Event('input', {bubbles: true}));
      });
    });
  };
  // Gradio replaces a plot's div when its figure changes: hook new ones as soon as Plotly has drawn them.
  let queued = false;
  new MutationObserver(() => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; hookAll(); });
  }).observe(document.body, {childList: true, subtree: true});
  setInterval(hookAll, 1000);
  hookAll();
  window.__cspClickReady = true;
}
"""

# The link to the current view. (The address bar is left alone: Plotly draws colour bars with gradients that
# reference the page's URL, and rewriting it with history.replaceState blanks them.)
SHARE_JS = """
(q) => q ? (window.location.origin + window.location.pathname + '?' + q) : ''
"""


def _fmt(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}g}"


def _summary_md(entry: ModelEntry, run: Run | None, circuit: CircuitGraph | None, stats: dict | None, task: str | None) -> str:
    lines = [f"**Model** `{entry.spec}` · {entry.n_layer} layers · d_model {entry.config.d_model} · "
             f"{entry.config.n_head}×{entry.d_head} heads · d_mlp {entry.config.d_mlp} · vocab {entry.config.vocab_size}"]
    if task:
        try:
            lines.append(f"**Task** `{task}`: {get_task(task).description}")
        except ValueError:
            lines.append(f"**Task** `{task}`")
    if run is None or circuit is None:
        lines.append("**No circuit** for this task yet: run pruning in the *Ablations & pruning* tab, or import a "
                     "circuit file in *Share & files*.")
        return "\n\n".join(lines)
    total = entry.n_total_nodes
    s = stats or {}
    pending = "…" if s.get("pending") else "n/a"
    val = lambda key: _fmt(s.get(key)) if s.get(key) is not None else pending  # noqa: E731
    row = (f"| full model loss | circuit loss | random same-size | nodes | edges | target |\n|---|---|---|---|---|---|\n"
           f"| {val('full')} | {val('circuit')} | {val('random')} | "
           f"{circuit.n_nodes} of {total} | {circuit.n_edges} | {_fmt(circuit.target_loss)} |")
    lines.append(f"**Run** {run.name} · ablation: {circuit.ablation}" + (" · losses computed live" if s.get("live") else ""))
    lines.append(row)
    if s.get("error"):
        lines.append(f"⚠️ {s['error']}")
    if s.get("random") is not None and s.get("circuit") is not None and s["random"] <= s["circuit"] + 0.02:
        lines.append("⚠️ random circuits of the same size do as well: this circuit says little about which nodes matter.")
    return "\n\n".join(lines)


def _layer_choices(circuit: CircuitGraph | None, entry: ModelEntry, deltas: dict | None):
    if circuit is None:
        return []
    rows = plotting.layer_summary(circuit, entry.n_layer)
    out = []
    for r in rows:
        d = (deltas or {}).get(r["layer"], r["delta"])
        out.append((f"{r['layer']} · Δ {_fmt(d, 3)} · {r['n_nodes']} nodes", r["layer"]))
    return out


def _node_choices(circuit: CircuitGraph | None, layer: str | None, d_head: int):
    if circuit is None or not layer:
        return []
    return [(f"{plotting.node_label(n, d_head)} · {n} · {_fmt(circuit.nodes[n], 3)}", n)
            for n in plotting.layer_node_ids(circuit, layer)]


def _query(model, task, run, k, layer, node) -> str:
    params = {"model": model, "task": task, "run": run, "k": k, "layer": layer, "node": node}
    return urllib.parse.urlencode({key: v for key, v in params.items() if v not in (None, "")})


def _write_download(circuit: CircuitGraph | None, run: Run | None) -> str | None:
    if circuit is None:
        return None
    folder = Path(tempfile.gettempdir()) / "csp_app_downloads"
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{circuit.task or 'circuit'}_k{circuit.n_nodes}_{(run.id if run else 'x')}")[:120]
    path = folder / f"{name}.json"
    circuit.save(path)
    return str(path)


def build_app() -> gr.Blocks:
    task_names = [t.name for t in list_tasks()]

    with gr.Blocks(title="Circuit browser · weight-sparse transformers") as demo:
        session = gr.State({})
        active_tab = gr.State("browser")
        gr.Markdown("## Circuits in weight-sparse transformers\nBrowse the circuits of OpenAI-style weight-sparse "
                    "models (Gao et al. 2025): pick a model, a task, a pruning run and its size k.")
        with gr.Row(equal_height=True):
            model_in = gr.Dropdown(choices=[default_model_spec()], value=None, label="Model", allow_custom_value=True,
                                   info="'default', a converted folder, or a hub id", elem_id="model-select", scale=2)
            task_in = gr.Dropdown(choices=task_names, value=None, label="Task", elem_id="task-select", scale=2)
            run_in = gr.Dropdown(choices=[], value=None, label="Pruning run", elem_id="run-select", scale=3)
            k_in = gr.Slider(1, 2, value=1, step=1, label="k (nodes kept)", elem_id="k-slider", scale=2)
        status = gr.Markdown("", elem_id="status")
        summary = gr.Markdown("Loading…", elem_id="summary", elem_classes=["csp-summary"])

        with gr.Tabs():
            with gr.Tab("Circuit browser", id="browser") as browser_tab:
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        layer_in = gr.Radio(choices=[], value=None, label="Layer (ablation Δ · nodes)", elem_id="layer-select")
                        layer_bars = gr.Plot(label="Layer ablation deltas", elem_id="layer-bars", show_label=False)
                    with gr.Column(scale=3):
                        graph = gr.Plot(label="Layer graph", elem_id="circuit-graph", show_label=False)
                        node_in = gr.Dropdown(choices=[], value=None, label="Selected node (or click one in the graph)",
                                              elem_id="node-select")
                with gr.Group(elem_id="node-panel"):
                    node_header = gr.Markdown("", elem_id="node-header")
                    zero_centered = gr.Checkbox(value=True, label="zero-centred colours", elem_id="zero-centered")
                    with gr.Row():
                        connections = gr.HTML("", label="Connections (in / out)", elem_id="connections")
                    examples = gr.HTML("", elem_id="node-examples", label="Activating examples")
                    task_acts = gr.Plot(label="Activations on the task's examples", elem_id="task-acts", show_label=False)
                    with gr.Row(visible=False) as attn_row:
                        attn_plot = gr.Plot(label="Head attention pattern", elem_id="attn-pattern", show_label=False)
                        qk_plot = gr.Plot(label="Channel q·k contribution", elem_id="qk-contrib", show_label=False)
            with gr.Tab("Whole circuit", id="overview") as overview_tab:
                overview = gr.Plot(elem_id="circuit-overview", show_label=False)
            with gr.Tab("Curves", id="curves") as curves_tab:
                faith_plot = gr.Plot(elem_id="faith-plot", show_label=False)
                prune_plot = gr.Plot(elem_id="prune-plot", show_label=False)
                train_plot = gr.Plot(elem_id="train-plot", show_label=False)
            with gr.Tab("Embeddings", id="embeddings") as emb_tab:
                channel_in = gr.Slider(0, 1, value=0, step=1, label="Residual channel", elem_id="channel-slider")
                emb_tokens = gr.Plot(show_label=False, elem_id="emb-tokens")
                with gr.Row():
                    emb_hist = gr.Plot(show_label=False, elem_id="emb-hist")
                    pos_plot = gr.Plot(show_label=False, elem_id="pos-emb")
            with gr.Tab("Prompt lab", id="prompt") as prompt_tab:
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt_in = gr.Code(value=DEFAULT_PROMPT, language="python", label="Prompt (Python code)",
                                            elem_id="prompt-input", interactive=True)
                        with gr.Row():
                            cand_a = gr.Textbox(value='"', label="candidate A", elem_id="cand-a")
                            cand_b = gr.Textbox(value="'", label="candidate B", elem_id="cand-b")
                        prompt_btn = gr.Button("Predict next token", variant="primary", elem_id="prompt-run")
                    with gr.Column(scale=3):
                        prompt_notice = gr.Markdown("", elem_id="prompt-notice")
                        prompt_tokens = gr.HTML("", elem_id="prompt-tokens", label="Tokens")
                        logit_diff = gr.Markdown("", elem_id="logit-diff")
                next_plot = gr.Plot(plotting.message_figure("Press Predict next token.", 160), elem_id="next-plot", show_label=False)
                prompt_node_acts = gr.HTML("", elem_id="prompt-node-acts")
                with gr.Accordion("/next_tokens output (JSON)", open=False):
                    prompt_json = gr.JSON(label="/next_tokens output", elem_id="prompt-json")
            with gr.Tab("Ablations & pruning", id="ablations") as ablations_tab:
                with gr.Row():
                    abl_layers = gr.CheckboxGroup(choices=[], label="Ablate layers", elem_id="abl-layers")
                    abl_nodes = gr.Dropdown(choices=[], value=[], multiselect=True, allow_custom_value=True,
                                            label="Ablate nodes (any 'location:index')", elem_id="abl-nodes")
                with gr.Row():
                    abl_mode = gr.Radio(["mean", "zero"], value="mean", label="Ablation", elem_id="abl-mode")
                    abl_base = gr.Radio(["full model", "circuit"], value="full model", label="Ablate from",
                                        elem_id="abl-base")
                    abl_btn = gr.Button("Ablate", variant="primary", elem_id="abl-run")
                abl_plot = gr.Plot(plotting.message_figure("Choose layers or nodes and press Ablate.", 160), elem_id="ablation-plot", show_label=False)
                abl_table = gr.Markdown("", elem_id="ablation-table")
                imp_btn = gr.Button("Compute every circuit node's importance (live)", elem_id="imp-run")
                imp_plot = gr.Plot(plotting.message_figure("Press the button to ablate every circuit node in turn.", 160), elem_id="importance-plot", show_label=False)
                with gr.Row():
                    cmp_in = gr.Dropdown(choices=[], value=None, label="Compare with run", elem_id="compare-select")
                    cmp_btn = gr.Button("Compare", elem_id="compare-run")
                cmp_plot = gr.Plot(plotting.message_figure("Choose a run to compare with.", 160), elem_id="compare-plot", show_label=False)
                cmp_md = gr.Markdown("", elem_id="compare-md")
                gr.Markdown("### Run pruning\nLearns node masks for the task, then bisects for the smallest circuit "
                            "reaching the target loss. The result becomes a run of this session.")
                with gr.Row():
                    pr_task = gr.Dropdown(choices=task_names, value=None, label="Task", elem_id="prune-task")
                    pr_target = gr.Number(value=0.15, label="Target loss (nats)", minimum=0.0, elem_id="prune-target")
                    pr_steps = gr.Slider(10, 1000, value=200, step=10, label="Mask training steps", elem_id="prune-steps")
                    pr_btn = gr.Button("Run pruning", variant="primary", elem_id="prune-run")
                pr_md = gr.Markdown("", elem_id="prune-md")
            with gr.Tab("Share & files", id="share") as share_tab:
                share_link = gr.Textbox(label="Link to this view", elem_id="share-link", buttons=["copy"], interactive=False)
                download = gr.DownloadButton("Download circuit (csp-circuit JSON)", value=None, elem_id="download")
                upload = gr.File(label="Import a circuit file (.json) or the original visualizer's viz_data.pt",
                                 file_types=[".json", ".pt"], elem_id="upload")

        # hidden plumbing: Plotly clicks arrive in node_click (see CLICK_JS); share_query holds the view's query
        node_click = gr.Textbox(visible="hidden", elem_id="node-click", label="clicked node")
        share_query = gr.Textbox(visible="hidden", elem_id="share-query", label="query")

        # ------------------------------------------------------------------------------------------
        # outputs of the view pipeline

        view_outputs = [model_in, task_in, run_in, k_in, summary, layer_in, layer_bars, overview, node_in, graph,
                        abl_layers, abl_nodes, cmp_in, pr_task, share_query, download, status, channel_in,
                        node_header, connections, examples, faith_plot, prune_plot, train_plot]
        node_outputs = [node_in, graph, node_header, connections, examples, share_query, status, overview, channel_in]

        def message(exc: BaseException) -> str:
            return f"⚠️ {exc}"

        def safe(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except UserError as exc:
                    gr.Warning(str(exc))
                    return {status: message(exc)}
                except Exception as exc:  # never a traceback in the UI
                    traceback.print_exc()
                    gr.Warning(f"{type(exc).__name__}: {first_line(exc)}")
                    return {status: f"⚠️ unexpected error: {type(exc).__name__}: {first_line(exc)}"}

            return wrapper

        def node_panel(entry: ModelEntry, circuit: CircuitGraph | None, node: str | None, task: str | None,
                       zc: bool, prompt: str | None) -> dict:
            """The node panel's header, connections and activating examples (the figures follow in
            `node_extras`, a second event, so that the graph and the panel's text show first)."""
            out = {node_header: "", connections: "", examples: ""}
            if circuit is None or not node or node not in circuit.nodes:
                out[node_header] = "*Select a node in the graph or the list above.*"
                return out
            label = plotting.node_label(node, entry.d_head)
            imp = circuit.nodes[node]
            out[node_header] = (f"### `{node}` · {label}\n{plotting._node_detail(node, entry.d_head)} · "
                                f"ablation importance **{_fmt(imp)}** (task-loss increase when it alone is ablated)")
            out[connections] = plotting.connections_html(plotting.connections_table(circuit, node, entry.d_head))
            try:
                samples, src = node_examples(entry, circuit, node)
                out[examples] = plotting.quantile_examples_html(samples, zc, title=f"Top / bottom activating examples ({src})")
            except UserError as exc:
                out[examples] = f"<p>⚠️ {exc}</p>"
            return out

        def node_extras(entry: ModelEntry, circuit: CircuitGraph | None, node: str | None, task: str | None,
                        zc: bool, prompt: str | None) -> dict:
            """The node panel's figures: activations on the task's examples, and for q/k channels the head's
            attention pattern and the channel's q·k contribution."""
            out = {attn_row: gr.Row(visible=False)}
            if circuit is None or not node or node not in circuit.nodes:
                out[task_acts] = plotting.message_figure("No node selected.", 200)
                return out
            loc, ch = parse_node_id(node)
            label = plotting.node_label(node, entry.d_head)
            notes = []
            try:
                c1, c2, labels, _ = task_activations(entry, circuit, node, task)
                out[task_acts] = plotting.task_activations_figure(c1, c2, labels, zc,
                                                                  title=f"{node} on the task's examples")
            except UserError as exc:
                out[task_acts] = plotting.message_figure(str(exc))
            kind = loc.split(".")[-1]
            if kind in ("q", "k"):
                try:
                    ids = attention_example_ids(entry, circuit, task, prompt)
                    if ids:
                        pattern, contrib, toks, has_sink, head = attention_for_node(entry, node, ids)
                        out[attn_row] = gr.Row(visible=True)
                        out[attn_plot] = plotting.attention_pattern_figure(pattern, toks, f"{loc.split('.')[0]}.attn head {head}: attention pattern", sink=has_sink)
                        out[qk_plot] = plotting.attention_pattern_figure(contrib, toks, f"{label}: its own q·k/√d contribution", zero_centered=True)
                except UserError as exc:
                    notes.append(str(exc))
            if notes:
                out[status] = "\n".join(f"⚠️ {n}" for n in notes)
            return out

        def resolve_view(session_state: dict, model, task, run_id, k, layer, node, zc, prompt, *, reset_from: str,
                         tab: str = "browser", send: str = "all"):
            """Computes the whole view; `reset_from` says which selector changed, so that the selections
            after it fall back to their defaults (most important layer, most important node)."""
            t0 = time.perf_counter()
            session_state = session_state if isinstance(session_state, dict) else {}
            session_state.setdefault("runs", {})
            entry = get_model(model)
            order = ["model", "task", "run", "k", "layer", "node"]
            reset = order[order.index(reset_from) + 1:] if reset_from in order else []
            all_runs = session_runs(entry, session_state)
            if "task" in reset or not task:
                # first task that has a run, else the first task
                tasked = [r.task for r in all_runs if r.task in task_names]
                task = tasked[0] if tasked else (task if task in task_names else task_names[0])
            if task not in task_names:
                raise UserError(f"unknown task {task!r}")
            runs = runs_for_task(entry, session_state, task)
            run = find_run(entry, session_state, run_id) if "run" not in reset else None
            if run is None or run not in runs:
                run = runs[0] if runs else None
            circuit = stats = None
            k_update = gr.Slider(minimum=1, maximum=2, value=1, interactive=False)
            if run is not None:
                full = run.load(entry)
                n_max = max_k(entry, run)
                if "k" in reset or k is None:
                    k = full.n_nodes
                k = int(min(max(1, int(k)), max(n_max, 1)))
                circuit = circuit_at_k(entry, run, k)
                stats = circuit_stats(entry, run, k, task, quick=True)
                k_update = gr.Slider(minimum=1, maximum=max(n_max, 2), value=k, step=1, interactive=True)
            deltas = (stats or {}).get("layer_deltas") or (circuit.layer_deltas if circuit else {})
            layer_names = plotting.layer_names(entry.n_layer)
            if circuit is not None and ("layer" in reset or layer not in layer_names):
                layer = best_layer(entry, circuit, deltas)
            if circuit is not None and ("node" in reset or node not in circuit.nodes or plotting.sublayer_of(node) != layer):
                if node in (circuit.nodes if circuit else {}) and "node" not in reset:
                    layer = plotting.sublayer_of(node)
                else:
                    node = best_node(circuit, layer)
            # Send only what changed, and figures of hidden tabs only when they are shown (the browser re-renders
            # every figure it receives); compute only what is sent.
            skip = set()
            if send in ("k", "layer"):
                skip |= {model_in, task_in, run_in, abl_layers, cmp_in, pr_task, prune_plot, train_plot, faith_plot}
            if send == "k":  # the layer list and bars follow in refresh_stats (with the new deltas)
                skip |= {layer_in, layer_bars}
            if send == "layer":
                skip |= {k_in, summary, layer_in, layer_bars}
            if tab != "ablations":
                skip.add(abl_nodes)
            if tab != "share":
                skip.add(download)
            if tab != "overview":
                skip.add(overview)
            parts = {
                session: lambda: session_state,
                model_in: lambda: gr.Dropdown(choices=list(dict.fromkeys([entry.spec, default_model_spec()] + loaded_models())),
                                              value=entry.spec),
                task_in: lambda: gr.Dropdown(value=task),
                run_in: lambda: gr.Dropdown(choices=[(r.name, r.id) for r in runs], value=run.id if run else None),
                k_in: lambda: k_update,
                summary: lambda: _summary_md(entry, run, circuit, stats, task),
                layer_in: lambda: gr.Radio(choices=_layer_choices(circuit, entry, deltas), value=layer if circuit else None),
                node_in: lambda: gr.Dropdown(choices=_node_choices(circuit, layer, entry.d_head), value=node),
                abl_layers: lambda: gr.CheckboxGroup(choices=layer_names, value=[]),
                abl_nodes: lambda: gr.Dropdown(choices=list(circuit.nodes) if circuit else [], value=[]),
                cmp_in: lambda: gr.Dropdown(choices=[(r.name, r.id) for r in all_runs if run is None or r.id != run.id],
                                            value=None),
                pr_task: lambda: gr.Dropdown(value=task),
                share_query: lambda: _query(entry.spec, task, run.id if run else None, k if run else None, layer, node),
                download: lambda: gr.DownloadButton(value=_write_download(circuit, run)),
                status: lambda: "",
                channel_in: lambda: gr.Slider(minimum=0, maximum=int(entry.config.d_model) - 1, step=1),
                prune_plot: lambda: plotting.pruning_curve_figure(circuit.pruning_curve if circuit else []),
                train_plot: lambda: plotting.training_curve_figure(entry.training_curve),
                faith_plot: lambda: plotting.message_figure(
                    "No run selected." if circuit is None else "Computing… (switch to this tab to refresh)"),
            }
            if circuit is None:
                empty = plotting.message_figure("No circuit for this task yet.")
                parts.update({layer_bars: lambda: empty, graph: lambda: empty, overview: lambda: empty})
            else:
                def bars():
                    rows = plotting.layer_summary(circuit, entry.n_layer)
                    for r in rows:
                        r["delta"] = deltas.get(r["layer"], r["delta"])
                    return plotting.layer_bars_figure(rows, layer)

                parts[layer_bars] = bars
                parts[graph] = lambda: plotting.layer_graph_figure(circuit, layer, node)
                parts[overview] = lambda: plotting.circuit_overview_figure(circuit, entry.n_layer, node)
                if node and plotting.split_node(node)[2] in ("act_in", "resid_delta") and plotting.split_node(node)[3] < entry.config.d_model:
                    parts[channel_in] = lambda: gr.Slider(minimum=0, maximum=int(entry.config.d_model) - 1, step=1,
                                                          value=plotting.split_node(node)[3])
            out = {c: make() for c, make in parts.items() if c not in skip}
            out.update(node_panel(entry, circuit, node, task, zc, prompt))
            session_state["view"] = {"model": entry.spec, "task": task, "run": run.id if run else None, "k": k,
                                     "layer": layer, "node": node}
            if tab == "curves" and run is not None:
                out.update(show_curves(session_state, entry.spec, task, run.id, k))
            print(f"[app] view ({reset_from}) {time.perf_counter() - t0:.3f}s")
            return out

        def current(session_state, model, run_id, task, k):
            entry = get_model(model)
            run = find_run(entry, session_state or {}, run_id)
            circuit = circuit_at_k(entry, run, int(k)) if run is not None else None
            return entry, run, circuit

        # ------------------------------------------------------------------------------------------
        # events: selectors

        view_inputs = [session, model_in, task_in, run_in, k_in, layer_in, node_in, zero_centered, prompt_in, active_tab]

        def on_load(session_state, zc, prompt, request: gr.Request):
            """The first view: from the URL's query parameters (model, task, run, k, layer, node) where given
            and valid, else the defaults; whatever cannot be restored is named in the status line."""
            params = {key: v for key, v in (dict(request.query_params) if request is not None else {}).items() if v}
            model = params.get("model") or default_model_spec()
            try:
                get_model(model)
            except UserError as exc:
                gr.Warning(str(exc))
                out = resolve_view(session_state, default_model_spec(), None, None, None, None, None, zc, prompt,
                                   reset_from="model")
                out[status] = f"⚠️ {exc}; showing {default_model_spec()} instead"
                return out
            task, run_id, k = params.get("task"), params.get("run"), params.get("k")
            problems = []
            if task is not None and task not in task_names:
                problems.append(f"unknown task {task!r}")
                task = None
            try:
                k = int(k) if k is not None else None
            except ValueError:
                problems.append(f"k={k!r} is not a number")
                k = None
            entry = get_model(model)
            if run_id and find_run(entry, session_state or {}, run_id) is None:
                problems.append(f"run {run_id!r} is not available here (runs made or imported in another session are "
                                "not shared; download the circuit file and import it)")
                run_id = None
            reset_from = "node"
            if not task:
                reset_from = "model"
            elif not run_id:
                reset_from = "task"
            elif k is None:
                reset_from = "run"
            elif not params.get("layer"):
                reset_from = "k"
            elif not params.get("node"):
                reset_from = "layer"
            out = resolve_view(session_state, model, task, run_id, k, params.get("layer"), params.get("node"), zc,
                               prompt, reset_from=reset_from)
            view = (session_state or {}).get("view") or {}
            if params.get("layer") and view.get("layer") != params["layer"] and reset_from in ("node", "layer"):
                problems.append(f"layer {params['layer']!r} is not in this circuit")
            if params.get("node") and view.get("node") != params["node"] and reset_from == "node":
                problems.append(f"node {params['node']!r} is not in this circuit")
            if problems:
                out[status] = "⚠️ could not restore all of the link: " + "; ".join(problems)
            return out

        @safe
        def extras_handler(session_state, model, task, run_id, k, node, zc, prompt):
            t0 = time.perf_counter()
            try:
                return _extras(session_state, model, task, run_id, k, node, zc, prompt)
            finally:
                print(f"[app] extras {node} {time.perf_counter() - t0:.3f}s")

        def _extras(session_state, model, task, run_id, k, node, zc, prompt):
            entry = get_model(model)
            run = find_run(entry, session_state or {}, run_id)
            circuit = circuit_at_k(entry, run, int(k)) if run is not None and k is not None else None
            return node_extras(entry, circuit, node, task, zc, prompt)

        extras_inputs = [session, model_in, task_in, run_in, k_in, node_in, zero_centered, prompt_in]
        extras_outputs = [task_acts, attn_row, attn_plot, qk_plot, status]

        def make_view_handler(reset_from):
            def handler(session_state, model, task, run_id, k, layer, node, zc, prompt, tab):
                try:
                    return resolve_view(session_state, model, task, run_id, k, layer, node, zc, prompt,
                                        reset_from=reset_from, tab=tab,
                                        send=reset_from if reset_from in ("k", "layer") else "all")
                except UserError as exc:  # a bad model or task: say so and go back to the last good view
                    previous = (session_state or {}).get("view") or {}
                    gr.Warning(str(exc))
                    out = {status: message(exc)}
                    if reset_from == "model" and previous.get("model"):
                        out[model_in] = gr.Dropdown(value=previous["model"])
                    if reset_from == "task" and previous.get("task"):
                        out[task_in] = gr.Dropdown(value=previous["task"])
                    return out

            return safe(handler)

        @safe
        def refresh_stats(session_state, model, task, run_id, k, layer):
            """Second step after a view change: random baseline and layer deltas (slower), then the summary,
            the layer list and the layer bars again."""
            t0 = time.perf_counter()
            entry = get_model(model)
            run = find_run(entry, session_state or {}, run_id)
            if run is None or k is None:
                return {status: gr.skip()}
            circuit = circuit_at_k(entry, run, int(k))
            stats = circuit_stats(entry, run, int(k), task)
            print(f"[app] stats k={k} {time.perf_counter() - t0:.3f}s")
            deltas = stats.get("layer_deltas") or {}
            rows = plotting.layer_summary(circuit, entry.n_layer)
            for r in rows:
                r["delta"] = deltas.get(r["layer"], r["delta"])
            return {summary: _summary_md(entry, run, circuit, stats, task),
                    layer_in: gr.Radio(choices=_layer_choices(circuit, entry, deltas), value=layer),
                    layer_bars: plotting.layer_bars_figure(rows, layer)}

        refresh_inputs = [session, model_in, task_in, run_in, k_in, layer_in]
        refresh_outputs = [summary, layer_in, layer_bars, status]

        def view_event(trigger, reset_from):
            trigger(make_view_handler(reset_from), view_inputs, view_outputs + [session],
                    show_progress="minimal" if reset_from == "k" else "full").then(
                extras_handler, extras_inputs, extras_outputs, show_progress="hidden").then(
                refresh_stats, refresh_inputs, refresh_outputs, show_progress="hidden")

        demo.load(safe(on_load), [session, zero_centered, prompt_in], view_outputs + [session]).then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden").then(
            refresh_stats, refresh_inputs, refresh_outputs, show_progress="hidden")
        view_event(model_in.input, "model")
        view_event(task_in.input, "task")
        view_event(run_in.input, "run")
        view_event(k_in.release, "k")
        layer_in.input(make_view_handler("layer"), view_inputs, view_outputs + [session], show_progress="minimal").then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden")

        @safe
        def select_node(session_state, model, task, run_id, k, node, zc, prompt, tab="browser"):
            t0 = time.perf_counter()
            entry, run, circuit = current(session_state, model, run_id, task, k)
            if circuit is None:
                raise UserError("no circuit selected")
            if node not in circuit.nodes:
                raise UserError(f"{node} is not a node of this circuit")
            layer = plotting.sublayer_of(node)
            out = {node_in: gr.Dropdown(choices=_node_choices(circuit, layer, entry.d_head), value=node),
                   graph: plotting.layer_graph_figure(circuit, layer, node),
                   share_query: _query(entry.spec, task, run.id, k, layer, node), status: ""}
            if tab == "overview":
                out[overview] = plotting.circuit_overview_figure(circuit, entry.n_layer, node)
            out.update(node_panel(entry, circuit, node, task, zc, prompt))
            if plotting.split_node(node)[2] in ("act_in", "resid_delta") and plotting.split_node(node)[3] < entry.config.d_model:
                out[channel_in] = gr.Slider(value=plotting.split_node(node)[3])
            print(f"[app] node {node} {time.perf_counter() - t0:.3f}s")
            return out

        node_sel_inputs = [session, model_in, task_in, run_in, k_in, node_in, zero_centered, prompt_in, active_tab]
        node_in.input(select_node, node_sel_inputs, node_outputs, show_progress="minimal").then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden")

        @safe
        def click_node(session_state, model, task, run_id, k, clicked, current_layer, zc, prompt, tab):
            node, _, rest = (clicked or "").partition("|")
            source = rest.split("|")[0]
            if not node:
                return {status: gr.skip()}
            entry, run, circuit = current(session_state, model, run_id, task, k)
            if circuit is None or node not in circuit.nodes:
                return {status: gr.skip()}
            out = select_node(session_state, model, task, run_id, k, node, zc, prompt, tab)
            layer = plotting.sublayer_of(node)
            if source == "graph" and layer == current_layer:
                out.pop(graph, None)  # the page moved the selection ring itself
            if layer != current_layer:
                stats = circuit_stats(entry, run, int(k), task)
                out[layer_in] = gr.Radio(choices=_layer_choices(circuit, entry, stats.get("layer_deltas")), value=layer)
                rows = plotting.layer_summary(circuit, entry.n_layer)
                for r in rows:
                    r["delta"] = (stats.get("layer_deltas") or {}).get(r["layer"], r["delta"])
                out[layer_bars] = plotting.layer_bars_figure(rows, layer)
            return out

        node_click.change(click_node, [session, model_in, task_in, run_in, k_in, node_click, layer_in, zero_centered, prompt_in,
                                       active_tab],
                         node_outputs + [layer_in, layer_bars], show_progress="minimal").then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden")
        zero_centered.input(select_node, node_sel_inputs, node_outputs, show_progress="minimal").then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden")

        share_query.change(None, [share_query], [share_link], js=SHARE_JS)

        # ------------------------------------------------------------------------------------------
        # curves and embeddings (computed when their tab opens)

        @safe
        def show_curves(session_state, model, task, run_id, k):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            if run is None:
                return {faith_plot: plotting.message_figure("No run selected.")}
            curve = faithfulness_curve(entry, run, task)
            stats = circuit_stats(entry, run, int(k), task)
            return {faith_plot: plotting.faithfulness_figure(curve["points"], stats.get("full"), circuit.target_loss,
                                                             stats.get("random"), int(k), curve["random"])}

        curves_tab.select(show_curves, [session, model_in, task_in, run_in, k_in], [faith_plot, status])

        @safe
        def show_overview(session_state, model, task, run_id, k, node):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            if circuit is None:
                return {overview: plotting.message_figure("No circuit for this task yet.")}
            return {overview: plotting.circuit_overview_figure(circuit, entry.n_layer, node)}

        overview_tab.select(show_overview, [session, model_in, task_in, run_in, k_in, node_in], [overview, status])

        @safe
        def show_ablations(session_state, model, task, run_id, k):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            return {abl_nodes: gr.Dropdown(choices=list(circuit.nodes) if circuit else [])}

        ablations_tab.select(show_ablations, [session, model_in, task_in, run_in, k_in], [abl_nodes, status])

        @safe
        def show_share(session_state, model, task, run_id, k):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            return {download: gr.DownloadButton(value=_write_download(circuit, run))}

        share_tab.select(show_share, [session, model_in, task_in, run_in, k_in], [download, status])
        for tab_name, tab in (("browser", browser_tab), ("overview", overview_tab), ("curves", curves_tab),
                              ("embeddings", emb_tab), ("prompt", prompt_tab), ("ablations", ablations_tab),
                              ("share", share_tab)):
            tab.select(lambda name=tab_name: name, None, active_tab, queue=False, show_progress="hidden")

        @safe
        def show_embeddings(model, channel):
            entry = get_model(model)
            c = int(channel or 0)
            wte, wpe = embedding_channel(entry, c)
            return {emb_tokens: plotting.embedding_tokens_figure(entry.vocab, wte, c),
                    emb_hist: plotting.weights_histogram_figure(wte, f"Token embedding weights of channel {c}"),
                    pos_plot: plotting.position_embedding_figure(wpe, c if c < len(wpe[0]) else None),
                    status: ""}

        emb_tab.select(show_embeddings, [model_in, channel_in], [emb_tokens, emb_hist, pos_plot, status])
        channel_in.release(show_embeddings, [model_in, channel_in], [emb_tokens, emb_hist, pos_plot, status])

        # ------------------------------------------------------------------------------------------
        # prompt lab

        @safe
        def run_prompt(session_state, model, task, run_id, k, node, prompt, a, b, zc):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            data = next_tokens_data(entry, prompt, circuit, node if node else None, (a, b))
            notices = data["notices"]
            ld = data.get("logit_diff")
            ld_md = ""
            if ld:
                ld_md = (f"**logit({plotting.display_token(ld['a'])}) − logit({plotting.display_token(ld['b'])})**: "
                         f"full model {ld['full']:+.3f}" + (f" · circuit {ld['circuit']:+.3f}" if ld["circuit"] is not None else ""))
            node_html = ""
            if data.get("node"):
                node_html = plotting.token_heatmap_html(data["tokens"], data["node_acts"], zero_centered=zc,
                                                        title=f"activations of {data['node']} on the prompt (full model)")
                node_html = plotting._CSS + node_html
            title = f"Top {TOP_N} next tokens" + (f" (circuit: {data['circuit_k']} nodes)" if data["circuit"] else "")
            return {
                prompt_tokens: plotting._CSS + plotting.tokens_html(data["tokens"], data["ids"]),
                prompt_notice: "\n".join(f"ℹ️ {n}" for n in notices) or f"{len(data['tokens'])} tokens",
                next_plot: plotting.next_tokens_figure([(r["token"], r["prob"]) for r in data["full"]],
                                                       [(r["token"], r["prob"]) for r in data["circuit"]] if data["circuit"] else None,
                                                       title),
                logit_diff: ld_md, prompt_node_acts: node_html, status: "",
                prompt_json: {"full": data["full"], "circuit": data["circuit"], "notices": notices},
            }

        prompt_outputs = [prompt_tokens, prompt_notice, next_plot, logit_diff, prompt_node_acts, status, prompt_json]
        prompt_inputs = [session, model_in, task_in, run_in, k_in, node_in, prompt_in, cand_a, cand_b, zero_centered]
        prompt_btn.click(run_prompt, prompt_inputs, prompt_outputs)

        def next_tokens(prompt: str, model: str = "", task: str = "", run: str = "", k: int = 0) -> dict:
            """Top-10 next tokens and probabilities of the full model and of the circuit alone (nodes outside it
            mean-ablated) for a prompt. model/task/run/k default to the default model and its first circuit."""
            try:
                entry = get_model(model or None)
                chosen = choose_run(entry, run or None, task or None)
                return next_tokens_answer(entry, prompt, chosen, int(k) if k else None)
            except UserError as exc:
                return {"error": str(exc)}
            except Exception as exc:
                return {"error": f"{type(exc).__name__}: {first_line(exc)}"}

        gr.api(next_tokens, api_name="next_tokens", concurrency_limit=4, concurrency_id="browse")

        # ------------------------------------------------------------------------------------------
        # ablations, importances, comparison, pruning

        @safe
        def run_ablation(session_state, model, task, run_id, k, layers, nodes, mode, base):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            rows = ablation_effects(entry, circuit, task, list(layers or []), list(nodes or []), mode,
                                    "circuit" if base == "circuit" else "full")
            table = "| ablation | task loss | Δ loss | logit diff | Δ logit diff |\n|---|---|---|---|---|\n" + "\n".join(
                f"| {r['label']} | {r['loss']:.4f} | {r['d_loss']:+.4f} | {r['logit_diff']:.3f} | {r['d_logit_diff']:+.3f} |"
                for r in rows)
            return {abl_plot: plotting.ablation_effect_figure([r for r in rows if not r.get("baseline")],
                                                              f"{mode}-ablation from the {base} on {task}"),
                    abl_table: table, status: ""}

        abl_btn.click(run_ablation, [session, model_in, task_in, run_in, k_in, abl_layers, abl_nodes, abl_mode, abl_base],
                      [abl_plot, abl_table, status], concurrency_limit=2, concurrency_id="ablate")

        @safe
        def run_importances(session_state, model, task, run_id, k, node):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            if circuit is None:
                raise UserError("no circuit selected")
            imps, method = live_importances(entry, circuit, task)
            return {imp_plot: plotting.importance_bar_figure(
                        imps, node, entry.d_head, title=f"Live node importances on {task} ({len(imps)} nodes, {method})"),
                    status: ""}

        imp_btn.click(run_importances, [session, model_in, task_in, run_in, k_in, node_in], [imp_plot, status],
                      concurrency_limit=2, concurrency_id="ablate")

        @safe
        def run_compare(session_state, model, task, run_id, k, other_id):
            entry, run, circuit = current(session_state, model, run_id, task, k)
            other = find_run(entry, session_state or {}, other_id)
            if circuit is None or other is None:
                raise UserError("choose a run to compare with")
            oc = other.load(entry)
            d = circuit.diff(oc)
            md = (f"nodes: {len(d.nodes_only_self)} only in {run.name}, {len(d.nodes_both)} in both, "
                  f"{len(d.nodes_only_other)} only in {other.name} · edges: {len(d.edges_only_self)} / "
                  f"{len(d.edges_both)} / {len(d.edges_only_other)}")
            return {cmp_plot: plotting.circuit_diff_figure(d, "this", "other"), cmp_md: md, status: ""}

        cmp_btn.click(run_compare, [session, model_in, task_in, run_in, k_in, cmp_in], [cmp_plot, cmp_md, status])

        def run_pruning(session_state, model, task, target, steps, zc, prompt, progress=gr.Progress(track_tqdm=True)):
            try:
                entry = get_model(model)
                result = prune_circuit(entry, task, target, steps, progress=lambda f, desc: progress(f, desc=desc))
            except UserError as exc:
                gr.Warning(str(exc))
                return {status: message(exc), pr_md: message(exc)}
            except Exception as exc:
                traceback.print_exc()
                return {status: f"⚠️ pruning failed: {first_line(exc)}", pr_md: f"⚠️ pruning failed: {first_line(exc)}"}
            session_state = session_state if isinstance(session_state, dict) else {}
            run = add_pruned_run(session_state, entry, task, result)
            c = result.circuit
            out = resolve_view(session_state, entry.spec, task, run.id, c.k, None, None, zc, prompt, reset_from="run")
            out[pr_md] = (f"✅ k={c.k} nodes, {c.n_edges} edges · circuit loss {_fmt(c.losses.get('circuit'))} "
                          f"(target {c.target_loss}, {'reached' if result.target_reached else 'not reached'}) · "
                          f"{result.seconds:.0f}s")
            return out

        pr_btn.click(run_pruning, [session, model_in, pr_task, pr_target, pr_steps, zero_centered, prompt_in],
                     view_outputs + [session, pr_md], concurrency_limit=1, concurrency_id="prune", show_progress_on=[pr_md]).then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden").then(
            refresh_stats, refresh_inputs, refresh_outputs, show_progress="hidden")

        # ------------------------------------------------------------------------------------------
        # files

        def on_upload(session_state, file, model, zc, prompt):
            try:
                if file is None:
                    return {status: gr.skip()}
                path = file if isinstance(file, str) else getattr(file, "name", None) or getattr(file, "path", None)
                entry = get_model(model)
                run = import_run_file(entry, path, Path(path).name, unique=True)
                session_state = session_state if isinstance(session_state, dict) else {}
                add_session_run(session_state, entry, run)
                task = run.task
                out = resolve_view(session_state, entry.spec, task, run.id, None, None, None, zc, prompt,
                                   reset_from="run")
                if task is None:  # untasked runs are listed under every task: keep the current one
                    pass
                out[status] = f"✅ imported {Path(path).name}: {run.circuit.n_nodes} nodes, {run.circuit.n_edges} edges"
                return out
            except UserError as exc:
                gr.Warning(str(exc))
                return {status: message(exc)}
            except Exception as exc:
                traceback.print_exc()
                return {status: f"⚠️ could not import the file: {first_line(exc)}"}

        upload.upload(on_upload, [session, upload, model_in, zero_centered, prompt_in], view_outputs + [session]).then(
            extras_handler, extras_inputs, extras_outputs, show_progress="hidden").then(
            refresh_stats, refresh_inputs, refresh_outputs, show_progress="hidden")

        demo.load(None, None, None, js=CLICK_JS)
    # The UI's own events stay out of the API page; /next_tokens is the documented endpoint.
    for block_fn in demo.fns.values():
        if block_fn.api_name != "next_tokens" and block_fn.api_visibility == "public":
            block_fn.api_visibility = "undocumented"
    demo.queue(default_concurrency_limit=4)
    return demo


demo = build_app()

if __name__ == "__main__":
    threading.Thread(target=warm_up, daemon=True).start()
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME"),
                server_port=int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None,
                css=CSS, theme=gr.themes.Soft())
