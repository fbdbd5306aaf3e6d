"""Circuit browser, prompt lab and ablation plots for weight-sparse transformers (a Gradio 6 app).

    python app.py                      # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT respected)

The repository's `app.py` (and a Space's, written by `csp space build`) only calls `main`. Runs unchanged as a
Hugging Face Space (see hub_cards/space_card.md). This module is the layout and the event
wiring only: what the browser shows is decided by the view model `modeling_csp.explorer.view.resolve_view`
(explorer, session, request) -> View, the other panels by `modeling_csp.explorer.panels`, and both are tested without
a browser. A view change answers in steps: the selection, graph and node header first (the node panel and the
numbers still to come marked "updating…"), then the node panel, then the slower numbers (random baseline, layer
deltas). Each answer is painted only while the page shows the selection it was computed for (`Shown`).

Environment:
    CSP_MODELS         comma-separated models the model box lists ('default', hub ids); default: the list in
                       csp_space.json beside app.py (written by `csp space build`), else "default"
    CSP_APP_MODEL      model shown first (default: the first listed model)
    CSP_APP_IMPORT     os.pathsep-separated circuit files (.json) or viz_data.pt files to offer as runs
    CSP_MODEL_ROOTS    os.pathsep-separated folders the model box may open models from (default: the package's
                       models and the Hugging Face cache); `default` and hub ids are always allowed
    CSP_APP_STORE      folder for runs pruned or imported in the app (default: <tmp>/csp_app_runs); they
                       survive a reload and travel in share links
    CSP_APP_THREADS    torch CPU threads (default 2)
    CSP_APP_PRETRAIN_TOKENS  tokens of held-out text used for live activating examples (default 8192)

API: `/next_tokens` (gradio_client): prompt [, model, task, run, k] -> JSON with the top tokens and probabilities
of the full model and of the circuit alone (everything outside it mean-ablated); the same answer as
`csp next-tokens` and `modeling_csp.explorer.next_tokens`, validated as the page validates.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import traceback
from dataclasses import replace
from pathlib import Path

import gradio as gr
import gradio.component_meta as component_meta
import torch

from .. import plotting
from ..explorer import panels
from ..explorer.analysis import task_names, warm_up
from ..explorer.errors import first_line
from ..explorer.explorer import Explorer, Settings
from ..explorer.models import MAX_UPLOAD_BYTES
from ..explorer.sessions import Session
from ..explorer.view import PICKS, SELECTORS, Progress, Request, Selection, Shown, View, resolve_view


DEFAULT_PROMPT = 'def greet(name):\n    message = "Hello, world'

CSS = """
#status {min-height: 1.5em;}
#status p {margin: 0;}
.csp-summary table {font-size: 13px;}
#node-click, #share-query {display: none !important;}
.csp-updating {color: #8a5a00; font-style: italic;}
#prune-progress p, #prune-here-progress p {margin: 4px 0; padding: 6px 8px; background: #eef4ff; border-radius: 4px;
  font-weight: 600;}
footer {display: none !important;}
"""

# Plotly clicks on a node (any figure inside #circuit-graph, #circuit-overview or #importance-plot) are written to
# the hidden #node-click textbox as "<node id>|<source>|<time>", whose input event selects the node. Enter in a
# slider's number box leaves the box, which applies the typed value (Gradio applies it on blur).
PAGE_JS = """
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
  let queued = false;  // Gradio replaces a plot's div when its figure changes: hook new ones once drawn
  new MutationObserver(() => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; hookAll(); });
  }).observe(document.body, {childList: true, subtree: true});
  setInterval(hookAll, 1000);
  hookAll();
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && e.target && e.target.matches && e.target.matches('input[type=number]')
        && e.target.closest('#k-slider, #channel-slider, #edge-threshold, #prune-steps')) { e.target.blur(); }
  }, true);
  window.__cspClickReady = true;
}
"""

# The link to the current view. (The address bar is left alone: Plotly draws colour bars with gradients that
# reference the page's URL, and rewriting it with history.replaceState blanks them.)
SHARE_JS = "(q) => q ? (window.location.origin + window.location.pathname + '?' + q) : ''"


# Selectors whose values the view model checks. Gradio's own checks raise when a value is out of range or no
# longer among the choices (a task without a circuit empties the node list under a selected node), which
# leaves components stuck in an error state; here the view model clamps or falls back, with a message.
# (`is_template`: the page draws them as the built-in component. Defining a component class makes Gradio write
# a .pyi stub beside this file; that is switched off while these three are defined.)
_write_stub = getattr(component_meta, "create_or_modify_pyi", None)
component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
try:
    class Choice(gr.Dropdown):
        is_template = True

        def preprocess(self, payload):
            return payload

    class Options(gr.Radio):
        is_template = True

        def preprocess(self, payload):
            return payload

    class Number(gr.Slider):
        is_template = True

        def preprocess(self, payload):
            return payload
finally:
    if _write_stub is not None:
        component_meta.create_or_modify_pyi = _write_stub


shown = Shown()


@functools.lru_cache(maxsize=4096)
def page_lock(session_hash) -> threading.Lock:
    """One lock per page (recently seen), so that its numbers are computed once, not by each step that asks."""
    return threading.Lock()


def guarded(fn, status_component):
    """The last line of defence: an unexpected error becomes a message in the status line, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            traceback.print_exc()
            return {status_component: f"⚠️ unexpected error: {type(exc).__name__}: {first_line(exc)}"}

    return wrapper


def build_app(explorer: Explorer) -> gr.Blocks:
    with gr.Blocks(title="Circuit browser · weight-sparse transformers") as demo:
        session = gr.State(Session())
        saved = gr.BrowserState([], storage_key="csp-saved-runs")
        tab = gr.State("browser")
        gr.Markdown("## Circuits in weight-sparse transformers\nBrowse the circuits of OpenAI-style weight-sparse "
                    "models (Gao et al. 2025): pick a model, a task, a pruning run and its size k.")
        with gr.Row(equal_height=True):
            model_in = Choice(choices=list(dict.fromkeys([explorer.settings.default_model, *explorer.settings.models])), value=None, label="Model", allow_custom_value=True,
                              info="'default', a hub id (org/name), or a model folder on this server",
                              elem_id="model-select", scale=2)
            task_in = Choice(choices=task_names(), value=None, label="Task", elem_id="task-select", scale=2)
            run_in = Choice(choices=[], value=None, label="Pruning run", elem_id="run-select", scale=3)
            k_in = Number(1, 2, value=1, step=1, label="k (nodes kept)", elem_id="k-slider", scale=2)
        status = gr.Markdown("", elem_id="status")
        summary = gr.Markdown("Loading…", elem_id="summary", elem_classes=["csp-summary"])
        with gr.Group(visible=False, elem_id="no-circuit") as empty_box:
            empty_md = gr.Markdown("", elem_id="no-circuit-md")
            empty_btn = gr.Button("Prune a circuit for this task", variant="primary", elem_id="prune-here")
            empty_progress = gr.Markdown("", elem_id="prune-here-progress")
            empty_out = gr.Markdown("", elem_id="prune-here-md")

        with gr.Tabs():
            with gr.Tab("Circuit browser", id="browser") as browser_tab:
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        layer_in = Options(choices=[], value=None, label="Layer (ablation Δ · nodes)", elem_id="layer-select")
                        layer_bars = gr.Plot(plotting.message_figure("Loading…", 200), elem_id="layer-bars", show_label=False)
                    with gr.Column(scale=3):
                        with gr.Row():
                            search_in = gr.Textbox(label="Find a node (Enter)", placeholder="id or label: h3.ch5, n12, r80, 1.attn.q",
                                                   elem_id="node-search", scale=3)
                            edges_in = Number(0, 100, value=0, step=5, label="Hide edges below |w| (% of the largest)",
                                              elem_id="edge-threshold", scale=2)
                        # (a figure from the start: the browser loads Plotly while the first view is computed)
                        graph = gr.Plot(plotting.message_figure("Loading the circuit…"), elem_id="circuit-graph",
                                        show_label=False)
                        node_in = Choice(choices=[], value=None, label="Selected node (or click one in the graph)",
                                         elem_id="node-select")
                with gr.Group(elem_id="node-panel"):
                    node_header = gr.Markdown("", elem_id="node-header")
                    zero_centered = gr.Checkbox(value=True, label="zero-centred colours", elem_id="zero-centered")
                with gr.Tabs(elem_id="node-tabs"):
                    with gr.Tab("Task examples", id="node-task"):
                        task_acts = gr.HTML("", elem_id="task-acts")
                    with gr.Tab("Activating examples", id="node-examples-tab"):
                        examples = gr.HTML("", elem_id="node-examples")
                    with gr.Tab("Attention", id="node-attention"):
                        attn_rows = gr.HTML("", elem_id="attn-rows")
                        with gr.Row():
                            attn_plot = gr.Plot(elem_id="attn-pattern", show_label=False)
                            qk_plot = gr.Plot(elem_id="qk-contrib", show_label=False)
                    with gr.Tab("Connections", id="node-connections"):
                        connections = gr.HTML("", elem_id="connections")
            with gr.Tab("Whole circuit", id="overview") as overview_tab:
                overview = gr.Plot(elem_id="circuit-overview", show_label=False)
            with gr.Tab("Curves", id="curves") as curves_tab:
                faith_plot = gr.Plot(elem_id="faith-plot", show_label=False)
                prune_plot = gr.Plot(elem_id="prune-plot", show_label=False)
                train_plot = gr.Plot(elem_id="train-plot", show_label=False)
                details = gr.HTML("", elem_id="run-details")
            with gr.Tab("Embeddings", id="embeddings") as emb_tab:
                channel_in = Number(0, 1, value=0, step=1, label="Residual channel", elem_id="channel-slider")
                emb_notice = gr.Markdown("", elem_id="emb-notice")
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
                            cand_a = gr.Textbox(value='"', label="candidate A", elem_id="cand-a", max_length=100)
                            cand_b = gr.Textbox(value="'", label="candidate B", elem_id="cand-b", max_length=100)
                        prompt_btn = gr.Button("Predict next token", variant="primary", elem_id="prompt-run")
                    with gr.Column(scale=3):
                        prompt_notice = gr.Markdown("", elem_id="prompt-notice")
                        prompt_tokens = gr.HTML("", elem_id="prompt-tokens")
                        logit_diff = gr.Markdown("", elem_id="logit-diff")
                next_plot = gr.Plot(plotting.message_figure("Press Predict next token.", 160), elem_id="next-plot", show_label=False)
                prompt_node_acts = gr.HTML("", elem_id="prompt-node-acts")
                with gr.Accordion("/next_tokens output (JSON)", open=False):
                    prompt_json = gr.JSON(label="/next_tokens output", elem_id="prompt-json")
            with gr.Tab("Ablations & pruning", id="ablations") as ablations_tab:
                with gr.Row():
                    abl_layers = gr.CheckboxGroup(choices=[], label="Ablate layers", elem_id="abl-layers")
                    abl_nodes = Choice(choices=[], value=[], multiselect=True, allow_custom_value=True,
                                       label="Ablate nodes (any 'location:index')", elem_id="abl-nodes")
                with gr.Row():
                    abl_mode = gr.Radio(["mean", "zero"], value="mean", label="Ablation", elem_id="abl-mode")
                    abl_base = gr.Radio(["full model", "circuit"], value="full model", label="Ablate from", elem_id="abl-base")
                    abl_btn = gr.Button("Ablate", variant="primary", elem_id="abl-run")
                abl_plot = gr.Plot(plotting.message_figure("Choose layers or nodes and press Ablate.", 160),
                                   elem_id="ablation-plot", show_label=False)
                abl_table = gr.Markdown("", elem_id="ablation-table")
                imp_btn = gr.Button("Compute every circuit node's importance (live)", elem_id="imp-run")
                imp_plot = gr.Plot(plotting.message_figure("Press the button to ablate every circuit node in turn.", 160),
                                   elem_id="importance-plot", show_label=False)
                with gr.Row():
                    cmp_in = Choice(choices=[], value=None, label="Compare with run", elem_id="compare-select")
                    cmp_btn = gr.Button("Compare", elem_id="compare-run")
                cmp_plot = gr.Plot(plotting.message_figure("Choose a run to compare with.", 160), elem_id="compare-plot",
                                   show_label=False)
                cmp_md = gr.Markdown("", elem_id="compare-md")
                gr.Markdown("### Run pruning\nLearns node masks for the task, then bisects for the smallest circuit "
                            "reaching the target loss. The result becomes a run of this session (kept on the server, "
                            "so it survives a reload and can be shared by link).")
                with gr.Row():
                    pr_task = Choice(choices=task_names(), value=None, label="Task", elem_id="prune-task")
                    pr_mode = gr.Radio(["nats", "× full model's loss"], value="nats", label="Target is",
                                       elem_id="prune-mode")
                    pr_target = gr.Number(value=0.15, label="Target loss", elem_id="prune-target")
                    pr_steps = Number(10, 2000, value=200, step=10, label="Mask training steps", elem_id="prune-steps")
                    pr_control = gr.Checkbox(False, label="Shuffled-answer control (about doubles the time)",
                                             elem_id="prune-control")
                pr_check = gr.Markdown("", elem_id="prune-check")
                pr_btn = gr.Button("Run pruning", variant="primary", elem_id="prune-run")
                pr_progress = gr.Markdown("", elem_id="prune-progress")
                pr_md = gr.Markdown("", elem_id="prune-md")
                gr.Markdown("### Your own task\nOne JSON object per line, `{\"prompt\": ..., \"correct\": ..., "
                            "\"incorrect\": ...}`: each answer one token right after the prompt, and each of the two "
                            "answers correct somewhere (else always giving one answer solves it). The task joins the "
                            "task list of this session; its runs carry its examples.")
                with gr.Row():
                    ct_text = gr.Textbox(lines=5, max_lines=12, label="Task lines (JSON lines)", elem_id="custom-task-text",
                                         placeholder='{"prompt": "x = \'a", "correct": "\'", "incorrect": "\\""}', scale=3)
                    with gr.Column(scale=1):
                        ct_file = gr.File(label="or a .jsonl file", file_types=[".jsonl", ".json", ".txt"],
                                          elem_id="custom-task-file")
                        ct_name = gr.Textbox(label="Name", placeholder="my_task", elem_id="custom-task-name")
                ct_btn = gr.Button("Check and add the task", elem_id="custom-task-add")
                ct_md = gr.Markdown("", elem_id="custom-task-md")
            with gr.Tab("Share & files", id="share") as share_tab:
                share_link = gr.Textbox(label="Link to this view", elem_id="share-link", buttons=["copy"], interactive=False)
                download = gr.DownloadButton("Download circuit (csp-circuit JSON)", value=None, elem_id="download")
                upload = gr.File(label=f"Import a circuit file (.json) or the original visualizer's viz_data.pt "
                                       f"(up to {MAX_UPLOAD_BYTES // 1_000_000} MB)", file_types=[".json", ".pt"], elem_id="upload")
                upload_md = gr.Markdown("", elem_id="upload-md")

        # hidden plumbing: Plotly clicks arrive in node_click (see PAGE_JS); share_query holds the view's query
        node_click = gr.Textbox(visible="hidden", elem_id="node-click", label="clicked node")
        share_query = gr.Textbox(visible="hidden", elem_id="share-query", label="query")

        # ------------------------------------------------------------------------------------------
        # the view: one function from (session, request) to View; here only its mapping onto components

        def show(view: View, request: gr.Request | None = None, ticket: int | None = None) -> dict:
            """Component updates for the parts of the page this view changes; nothing for the slow numbers of a
            selection the page no longer shows, nor for a selection overtaken by a later one."""
            none = view.run is None
            before = shown.current(request)
            if not shown.accept(request, view, ticket):
                return {summary: gr.skip()}  # (an empty dict reads as one value)
            parts = {
                "model": lambda: {model_in: gr.Dropdown(choices=view.model_choices, value=view.model)},
                "task": lambda: {task_in: gr.Dropdown(choices=view.task_choices, value=view.task),
                                 pr_task: gr.Dropdown(choices=view.task_choices, value=view.task)},
                "run": lambda: {run_in: gr.Dropdown(choices=view.run_choices, value=None if none else view.run.id),
                                cmp_in: gr.Dropdown(choices=view.run_choices, value=None)},
                "k": lambda: {k_in: gr.Slider(minimum=1, maximum=max(view.k_max, 2), value=view.k or 1, step=1,
                                              interactive=not none)},
                "summary": lambda: {summary: view.summary},
                "status": lambda: {status: view.status},
                "empty": lambda: {empty_box: gr.Group(visible=none), empty_md: view.empty or "", empty_out: ""},
                "layer": lambda: {layer_in: gr.Radio(choices=view.layer_choices)  # not the value the user may
                                  if view.numbers_only                              # have changed since
                                  else gr.Radio(choices=view.layer_choices, value=view.layer)},
                "node": lambda: {node_in: gr.Dropdown(choices=view.node_choices, value=view.node)},
                "graph": lambda: {graph: view.graph},
                "layer_bars": lambda: {layer_bars: view.layer_bars},
                "overview": lambda: {overview: view.overview},
                "share": lambda: {share_query: view.share_query},
                "node_header": lambda: {node_header: view.node_header},
            }
            out = {session: view.session}
            for name in view.parts_to_paint(before):
                out.update(parts[name]())
            if not view.numbers_only and view.selected != before:  # the node panel of the old selection goes
                out.update(node_outputs_of(panels.node_panel_updating(view.selected)))
            if not view.numbers_only and (before is None or before.numbers != view.selected.numbers):
                # the download of an older selection is never left on the button: on the Share tab the new one
                # is written now, elsewhere when the tab opens
                path = panels.download_path(explorer, view.model, view.run.id, view.k) if view.tab == "share" and view.run else None
                out[download] = gr.DownloadButton(value=path)
            if "run" in view.changed:
                out[abl_layers] = gr.CheckboxGroup(choices=plotting.layer_names(view.entry.n_layer), value=[])
                out[channel_in] = gr.Slider(minimum=0, maximum=int(view.entry.config.d_model) - 1, step=1)
            return out

        view_outputs = [session, model_in, task_in, pr_task, run_in, cmp_in, k_in, summary, status, empty_box, empty_md,
                        empty_out, layer_in, node_in, graph, layer_bars, overview, share_query, node_header, abl_layers,
                        channel_in, connections, examples, task_acts, attn_rows, attn_plot, qk_plot, download]
        selection = [model_in, task_in, run_in, k_in, layer_in, node_in, edges_in, tab]

        def on_view(event):
            def handler(state, model, task, run, k, layer, node, edges, tab_name, request: gr.Request):
                page = shown.current(request)
                if event == "stats":  # the numbers of what the page shows now, one computation at a time per page
                    if page is not None:
                        model, task, run, k, layer, node = (getattr(page, name) for name in SELECTORS)
                    with page_lock(getattr(request, "session_hash", None)):
                        asked = Request(event, model, task, run, k, layer, node, edges, tab=tab_name)
                        return show(resolve_view(explorer, state, asked), request, None)
                asked = Request(event, model, task, run, k, layer, node, edges, tab=tab_name)
                ticket, fresh = shown.begin(request, asked)
                if event in PICKS and not fresh:  # a re-send of the newest pick, or of what is shown: no change
                    return {summary: gr.skip()}
                return show(resolve_view(explorer, state, replace(asked, fresh=fresh)), request, ticket)

            return guarded(handler, status)

        def on_load(saved_runs, request: gr.Request):
            query = dict(request.query_params) if request is not None else {}
            ticket, _ = shown.begin(request, Request("load"))
            view = resolve_view(explorer, None, Request("load", query=query, saved=saved_runs))
            return {**show(view, request, ticket), saved: view.session.saved()}

        def on_click(state, model, task, run, k, layer, node, edges, tab_name, clicked, request: gr.Request):
            node, _, rest = (clicked or "").partition("|")
            asked = Request("click" if rest.startswith("graph") else "node", model, task, run, k, layer, node, edges,
                            tab=tab_name)
            ticket, fresh = shown.begin(request, asked)
            if not fresh:
                return {summary: gr.skip()}
            return show(resolve_view(explorer, state, replace(asked, fresh=fresh)), request, ticket)

        def on_search(state, model, task, run, k, layer, node, edges, tab_name, text, request: gr.Request):
            asked = Request("search", model, task, run, k, layer, node, edges, search=text, tab=tab_name)
            ticket, _ = shown.begin(request, asked)
            return show(resolve_view(explorer, state, asked), request, ticket)

        def node_outputs_of(p: panels.NodePanel) -> dict:
            return {connections: p.connections, examples: p.examples, task_acts: p.task, attn_rows: p.attention,
                    attn_plot: p.attention_figure or plotting.message_figure("No attention pattern for this node.", 200),
                    qk_plot: p.qk_figure or plotting.message_figure("q·k contributions are shown for q and k channels.", 200)}

        def on_node_panel(model, task, run, k, layer, node, zc, request: gr.Request):
            """The panel of the node the page shows now (as `Shown` knows it: the page's boxes may still hold a
            pick whose answer is on its way), painted only if the page still shows it when done."""
            page = shown.current(request)
            if page is not None:
                model, task, run, k, layer, node = (getattr(page, name) for name in SELECTORS)
            p = panels.node_panel(explorer, model, task, run, k, node, zc, layer=layer)
            if not shown.shows(request, p.selection):
                return {connections: gr.skip()}  # the page has moved on: its own node panel step follows
            return node_outputs_of(p)

        node_inputs = [model_in, task_in, run_in, k_in, layer_in, node_in, zero_centered]
        node_outputs = [connections, examples, task_acts, attn_rows, attn_plot, qk_plot, status]

        def on_empty_check(model, task, run, target, mode, request: gr.Request):
            """Before pruning from "no circuit yet": what the full model's loss says about the target."""
            if run or not shown.shows(request, Selection.of(model, task), True):
                return {empty_out: gr.skip()}
            return {empty_out: panels.prune_check(explorer, model, task, target, mode != "nats")}

        def chain(trigger, fn, inputs, outputs=None, stats=True, **kwargs):
            """An event that changes the view, then the node panel, then the slow numbers (painted only while the
            page shows their selection); returns the event's own step."""
            first = trigger(fn if inspect.isgeneratorfunction(fn) else guarded(fn, status), inputs,
                            outputs or view_outputs, **kwargs)
            # (Gradio's default, "once", drops a step triggered while the same step is pending: the node panel and
            # numbers of the last pick would never come; "always_last" runs the newest trigger when it is done)
            last = dict(show_progress="hidden", trigger_mode="always_last")
            step = first.then(guarded(on_node_panel, status), node_inputs, node_outputs, **last)
            if stats:
                step.then(on_view("stats"), [session] + selection, view_outputs, **last).then(
                    guarded(on_empty_check, status), [model_in, task_in, run_in, pr_target, pr_mode],
                    [empty_out, status], **last)
            return first

        chain(demo.load, on_load, [saved], view_outputs + [saved])
        # A dropdown pick ends with the box losing focus (Gradio 6 sends "input" for the pick and again for the blur):
        # one request per pick. A blur without a pick asks for what is shown, which changes nothing.
        # A pick made while the previous one of the same box is on its way is sent when that one is done
        # ("always_last"; Gradio's "once" would drop it while the box shows it).
        pick = dict(trigger_mode="always_last")
        chain(model_in.blur, on_view("model"), [session] + selection, concurrency_id="model", concurrency_limit=2, **pick)
        chain(task_in.blur, on_view("task"), [session] + selection, **pick)
        chain(run_in.blur, on_view("run"), [session] + selection, **pick)
        # (selections answer within a few hundred ms: no progress overlays, whose drawing on every output costs
        # as much as the answer)
        chain(k_in.release, on_view("k"), [session] + selection, show_progress="hidden", **pick)
        # (the numbers follow every pick: a layer or node pick may have overtaken the pick of a run or k whose
        # own numbers step then found the page elsewhere; cached, they cost little)
        chain(layer_in.input, on_view("layer"), [session] + selection, show_progress="hidden", **pick)
        chain(node_in.blur, on_view("node"), [session] + selection, show_progress="hidden", **pick)
        chain(node_click.change, on_click, [session] + selection + [node_click], show_progress="hidden", **pick)
        chain(search_in.submit, on_search, [session] + selection + [search_in], show_progress="hidden", **pick)
        edges_in.release(on_view("edges"), [session] + selection, view_outputs, show_progress="hidden")
        zero_centered.input(guarded(on_node_panel, status), node_inputs, node_outputs, show_progress="minimal")
        share_query.change(None, [share_query], [share_link], js=SHARE_JS)

        # ------------------------------------------------------------------------------------------
        # tabs: each computes its figures when it opens

        for name, t in (("browser", browser_tab), ("overview", overview_tab), ("curves", curves_tab),
                        ("embeddings", emb_tab), ("prompt", prompt_tab), ("ablations", ablations_tab), ("share", share_tab)):
            t.select(lambda n=name: n, None, tab, queue=False, show_progress="hidden")

        def on_overview(state, model, task, run, k, layer, node, edges, _tab, request: gr.Request):
            ticket, _ = shown.begin(request)
            return show(resolve_view(explorer, state, Request("tab", model, task, run, k, layer, node, edges, tab="overview")),
                        request, ticket)

        overview_tab.select(guarded(on_overview, status), [session] + selection, view_outputs)

        def on_curves(model, task, run, k):
            p = panels.curves_panel(explorer, model, task, run, k)
            return {faith_plot: p.faithfulness, prune_plot: p.pruning, train_plot: p.training, details: p.details}

        curves_tab.select(guarded(on_curves, status), [model_in, task_in, run_in, k_in],
                          [faith_plot, prune_plot, train_plot, details, status])

        def on_embeddings(model, channel):
            p = panels.embeddings_panel(explorer, model, channel)
            return {channel_in: gr.Slider(value=p.channel), emb_tokens: p.tokens, emb_hist: p.histogram,
                    pos_plot: p.positions, emb_notice: p.notice}

        emb_outputs = [channel_in, emb_tokens, emb_hist, pos_plot, emb_notice, status]
        emb_tab.select(guarded(on_embeddings, status), [model_in, channel_in], emb_outputs)
        channel_in.release(guarded(on_embeddings, status), [model_in, channel_in], emb_outputs)

        def on_ablations_tab(model, task, run, k, target, mode):
            return {abl_nodes: gr.Dropdown(choices=panels.circuit_nodes(explorer, model, run, k), value=[]),
                    pr_check: panels.prune_check(explorer, model, task, target, mode != "nats")}

        ablations_tab.select(guarded(on_ablations_tab, status), [model_in, task_in, run_in, k_in, pr_target, pr_mode],
                             [abl_nodes, pr_check, status])

        def on_share_tab(model, run, k):
            return {download: gr.DownloadButton(value=panels.download_path(explorer, model, run, k))}

        share_tab.select(guarded(on_share_tab, status), [model_in, run_in, k_in], [download, status])

        # ------------------------------------------------------------------------------------------
        # prompt lab, ablations, importances, comparison

        def on_prompt(model, task, run, k, node, prompt, a, b, zc):
            p = panels.prompt_panel(explorer, model, task, run, k, node, prompt, a, b, zc)
            return {prompt_notice: p.notice, prompt_tokens: p.tokens, next_plot: p.figure, logit_diff: p.logit_diff,
                    prompt_node_acts: p.node_acts, prompt_json: p.json}

        prompt_inputs = [model_in, task_in, run_in, k_in, node_in, prompt_in, cand_a, cand_b, zero_centered]
        prompt_outputs = [prompt_notice, prompt_tokens, next_plot, logit_diff, prompt_node_acts, prompt_json, status]
        for trigger in (prompt_btn.click, cand_a.submit, cand_b.submit):
            trigger(guarded(on_prompt, status), prompt_inputs, prompt_outputs)

        def on_ablate(model, task, run, k, layers, nodes, mode, base):
            p = panels.ablation_panel(explorer, model, task, run, k, layers, nodes, mode, base)
            return {abl_plot: p.figure, abl_table: p.table}

        abl_btn.click(guarded(on_ablate, status), [model_in, task_in, run_in, k_in, abl_layers, abl_nodes, abl_mode, abl_base],
                      [abl_plot, abl_table, status], concurrency_limit=2, concurrency_id="ablate")

        def on_importances(model, task, run, k, node, progress=gr.Progress()):
            report = lambda done, total: progress(done / max(total, 1), desc=f"node {done} of {total}")  # noqa: E731
            return {imp_plot: panels.importance_panel(explorer, model, task, run, k, node, report)}

        imp_btn.click(guarded(on_importances, status), [model_in, task_in, run_in, k_in, node_in], [imp_plot, status],
                      concurrency_limit=2, concurrency_id="ablate")

        def on_compare(model, task, run, k, other):
            p = panels.compare_panel(explorer, model, task, run, k, other)
            return {cmp_plot: p.figure, cmp_md: p.text}

        cmp_btn.click(guarded(on_compare, status), [model_in, task_in, run_in, k_in, cmp_in], [cmp_plot, cmp_md, status])

        # ------------------------------------------------------------------------------------------
        # new runs: pruning (here or from "no circuit yet") and imports; they join the browser's saved runs

        def on_check(model, task, target, mode):
            return {pr_check: panels.prune_check(explorer, model, task, target, mode != "nats")}

        for trigger in (pr_task.input, pr_mode.input, pr_target.submit, pr_target.blur):
            trigger(guarded(on_check, status), [model_in, pr_task, pr_target, pr_mode], [pr_check, status])

        def new_run(result: panels.NewRun, message_box, request) -> dict:
            if result.view is None:
                return {message_box: result.message}
            ticket, _ = shown.begin(request, Request("load"))  # the new run is the newest pick
            return {**show(result.view, request, ticket), message_box: result.message, saved: result.view.session.saved()}

        def pruning(box, finish):
            """A prune as a page step: its stage and step counts in `box` while it runs (polled from the pruning
            thread's reports), then `finish(result, request)`."""
            def handler(state, model, task, target, mode, steps, control, tab_name, request: gr.Request):
                progress, done = Progress(), {}

                def work():
                    done["result"] = panels.prune_new_run(explorer, state, model, task, target, mode != "nats", steps, progress,
                                                          tab_name, control)

                worker = threading.Thread(target=work, daemon=True)
                worker.start()
                text = None
                while worker.is_alive():
                    if progress.text != text:
                        text = progress.text
                        yield {box: text}
                    worker.join(0.5)
                result = done.get("result") or panels.NewRun(None, "⚠️ pruning failed: see the server log")
                try:
                    yield {**finish(result, request), box: ""}
                except Exception as exc:
                    traceback.print_exc()
                    yield {box: "", status: f"⚠️ unexpected error: {type(exc).__name__}: {first_line(exc)}"}

            return handler

        def prune_buttons(running: bool):
            """Both prune buttons off while a prune of this page runs (back on afterwards, also after an error)."""
            return lambda: {pr_btn: gr.Button(interactive=not running), empty_btn: gr.Button(interactive=not running)}

        prune_inputs = [session, model_in, pr_task, pr_target, pr_mode, pr_steps, pr_control, tab]
        for button, box, inputs, finish in (
            (pr_btn, pr_progress, prune_inputs, lambda result, request: new_run(result, pr_md, request)),
            (empty_btn, empty_progress, [session, model_in, task_in, pr_target, pr_mode, pr_steps, pr_control, tab],
             lambda result, request: {**new_run(result, empty_out, request), pr_md: result.message,
                                      status: result.message}),
        ):
            started = button.click(prune_buttons(True), None, [pr_btn, empty_btn], queue=False, show_progress="hidden")
            chain(started.then, pruning(box, finish), inputs, view_outputs + [pr_md, saved, status, box],
                  concurrency_limit=1, concurrency_id="prune", show_progress="hidden").then(
                prune_buttons(False), None, [pr_btn, empty_btn], queue=False, show_progress="hidden")

        def on_custom_task(state, model, text, file, name, tab_name, request: gr.Request):
            path = file if isinstance(file, str) or file is None else getattr(file, "path", None) or getattr(file, "name", None)
            result = panels.add_custom_task(explorer, state, model, text, path, name, tab_name)
            return new_run(result, ct_md, request)

        chain(ct_btn.click, on_custom_task, [session, model_in, ct_text, ct_file, ct_name, tab],
              view_outputs + [ct_md, saved], concurrency_limit=2, concurrency_id="ablate")

        def on_upload(state, file, model, tab_name, request: gr.Request):
            """Imports the file as a saved run, and empties the box for the next file."""
            if file is None:
                return {upload_md: ""}
            path = file if isinstance(file, str) else getattr(file, "path", None) or getattr(file, "name", None)
            result = panels.import_new_run(explorer, state, model, path, Path(str(path)).name, tab_name)
            return {**new_run(result, upload_md, request), upload: None}

        chain(upload.upload, on_upload, [session, upload, model_in, tab], view_outputs + [upload_md, saved, upload])

        def next_tokens(prompt: str, model: str = "", task: str = "", run: str = "", k: int = 0) -> dict:
            """Top-10 next tokens and probabilities of the full model and of the circuit alone (nodes outside it
            mean-ablated) for a prompt. model/task/run/k default to the default model and its first circuit; an
            unknown model, task or run is an error, k is clamped to the run's range with a notice."""
            return panels.api_next_tokens(explorer, prompt, model, task, run, k)

        gr.api(next_tokens, api_name="next_tokens", concurrency_limit=4, concurrency_id="browse")
        demo.load(None, None, None, js=PAGE_JS)
    # The UI's own events stay out of the API page; /next_tokens is the documented endpoint.
    for block_fn in demo.fns.values():
        if block_fn.api_name != "next_tokens" and block_fn.api_visibility == "public":
            block_fn.api_visibility = "undocumented"
    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo


def main(app_dir: str | Path = ".") -> None:
    """Configures the explorer from the environment (the model list from `app_dir`'s csp_space.json), builds the
    page and serves it."""
    torch.set_num_threads(int(os.environ.get("CSP_APP_THREADS", "2")))
    explorer = Explorer(Settings.from_env(Path(app_dir)))
    demo = build_app(explorer)
    # the model and what the first view needs load while the server starts (started earlier, this thread
    # slows Gradio's import more than it saves)
    threading.Thread(target=warm_up, args=(explorer,), daemon=True).start()
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME"),
                server_port=int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None,
                css=CSS, theme=gr.themes.Soft(), max_file_size=MAX_UPLOAD_BYTES)
