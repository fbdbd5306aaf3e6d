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
                       models and the Hugging Face cache), judged by real path (links followed); `default` and hub
                       ids are always allowed, and a name shaped like a hub id (org/name) is always a hub id, looked
                       up on the hub only (a folder of that shape is given as ./org/name or its full path)
    CSP_APP_STORE      folder for runs pruned or imported in the app (default: <tmp>/csp_app_runs); they
                       survive a reload and travel in share links
    CSP_APP_THREADS    torch CPU threads (default 2)
    CSP_APP_PRETRAIN_TOKENS  held-out tokens of the example index built (once, cached) for a model that ships
                       none (default 8192; 1024 to 1000000)
    CSP_CACHE_DIR      where mean activations and example indexes are cached (default HF_HOME/csp/mean_activations)

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
from ..circuits import graph as graph_limits
from ..circuits.pruning import PruneConfig
from ..explorer import exports, lab, panels
from ..explorer.analysis import MAX_PRUNE_STEPS, MIN_PRUNE_STEPS, task_names, warm_up
from ..explorer.errors import first_line
from ..explorer.explorer import Explorer, Settings
from ..explorer.models import MAX_UPLOAD_BYTES
from ..explorer.sessions import Session
from ..explorer.view import PICKS, SELECTORS, Progress, Request, Selection, Shown, View, resolve_view


DEFAULT_PROMPT = 'def greet(name):\n    message = "Hello, world'

CSS = """
#status {min-height: 1.5em;}
#model-prep {height: 2.4em; overflow: hidden;}  /* its line (or progress bar) never moves the page below it */
#model-prep p {margin: 0;}
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

# Node links (plotting.node_link) select their node through the same hidden box as a click on the graph.
WALK_JS = """
() => {
  document.addEventListener('click', (e) => {
    const link = e.target && e.target.closest && e.target.closest('a.%s');
    if (!link) return;
    e.preventDefault();
    const box = document.querySelector('#node-click textarea, #node-click input');
    if (!box || !link.dataset.node) return;
    box.value = link.dataset.node + '|link|' + Date.now();
    box.dispatchEvent(new Event('input', {bubbles: true}));
  }, true);
}
""" % plotting.NODE_LINK_CLASS

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


def guarded(fn, status_component):
    """The last line of defence: an unexpected error becomes a message in the status line, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            traceback.print_exc()
            return {status_component: panels.warning_markdown(f"unexpected error: {type(exc).__name__}: {first_line(exc)}")}

    return wrapper


def download_button(path: str | None) -> gr.DownloadButton:
    """The download holding `path`, or disabled: a click on a button without a file does nothing, so a page never
    offers one (nor an older selection's file while the new one is written)."""
    return gr.DownloadButton(value=path, interactive=path is not None)


def file_path(file) -> str | None:
    """The server-side path of an uploaded file, as Gradio hands it over (a path, or an object with one)."""
    return file if isinstance(file, str) or file is None else getattr(file, "path", None) or getattr(file, "name", None)


def discard_upload(path) -> None:
    """Deletes an uploaded file from Gradio's upload folder once the app has read it (and its folder when that
    is left empty): uploads otherwise stay there for as long as the server runs."""
    from gradio.utils import get_upload_folder

    try:
        folder = Path(get_upload_folder()).resolve()
        file = Path(str(path)).resolve()
        if file.is_relative_to(folder) and file != folder and file.is_file():
            file.unlink()
            if file.parent != folder:
                file.parent.rmdir()
    except OSError:  # already gone, or the folder holds more: Gradio's own cleanup takes the rest
        pass


class Page:
    """The page of one app over one explorer: its components (one layout method per tab, as attributes), how a
    `View` is painted onto them (`show`), and each tab's events (one wiring method per tab). Events are wired once
    every tab is laid out: most of them paint the view, whose components lie on several tabs. `shown` remembers
    what each browser page shows (view.py's `Shown`)."""

    def __init__(self, explorer: Explorer):
        self.explorer = explorer
        self.shown = Shown()
        self._page_locks = functools.lru_cache(maxsize=4096)(lambda session_hash: threading.Lock())
        self.tabs: dict[str, gr.Tab] = {}  # by id, in the page's order

    def page_lock(self, session_hash) -> threading.Lock:
        """One lock per page (recently seen), so that its numbers are computed once, not by each step that asks."""
        return self._page_locks(session_hash)

    # ---- layout: one method per tab ---------------------------------------------------------------

    def selectors(self) -> None:
        """The state, the selectors above the tabs, the status line, the summary and the "no circuit yet" box."""
        self.session = gr.State(Session())
        self.saved = gr.BrowserState([], storage_key="csp-saved-runs")
        self.tab = gr.State("browser")
        gr.Markdown("## Circuits in weight-sparse transformers\nBrowse the circuits of OpenAI-style weight-sparse "
                    "models (Gao et al. 2025): pick a model, a task, a pruning run and its size k.")
        settings = self.explorer.settings
        with gr.Row(equal_height=True):
            self.model_in = Choice(choices=list(dict.fromkeys([settings.default_model, *settings.models])), value=None,
                                   label="Model", allow_custom_value=True,
                                   info="'default', a hub id (org/name), or ./folder or /path on this server",
                                   elem_id="model-select", scale=2)
            self.task_in = Choice(choices=task_names(), value=None, label="Task", elem_id="task-select", scale=2)
            self.run_in = Choice(choices=[], value=None, label="Pruning run", elem_id="run-select", scale=3)
            self.k_in = Number(1, 2, value=1, step=1, label="k (nodes kept)", elem_id="k-slider", scale=2)
        self.status = gr.Markdown("", elem_id="status")
        self.prep_md = gr.Markdown("", elem_id="model-prep")  # issue 21: the model's one-time preparation
        self.summary = gr.Markdown("Loading…", elem_id="summary", elem_classes=["csp-summary"])
        with gr.Group(visible=False, elem_id="no-circuit") as self.empty_box:
            self.empty_md = gr.Markdown("", elem_id="no-circuit-md")
            self.empty_btn = gr.Button("Prune a circuit for this task", variant="primary", elem_id="prune-here")
            self.empty_progress = gr.Markdown("", elem_id="prune-here-progress")
            self.empty_out = gr.Markdown("", elem_id="prune-here-md")

    def browser_tab(self) -> None:
        with gr.Tab("Circuit browser", id="browser") as self.tabs["browser"]:
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    self.layer_in = Options(choices=[], value=None, label="Layer (ablation Δ · nodes)",
                                            elem_id="layer-select")
                    self.layer_bars = gr.Plot(plotting.message_figure("Loading…", 200), elem_id="layer-bars",
                                              show_label=False)
                with gr.Column(scale=3):
                    with gr.Row():
                        self.search_in = gr.Textbox(label="Find a node (Enter)",
                                                    placeholder="id or label: h3.ch5, n12, r80, 1.attn.q",
                                                    elem_id="node-search", scale=3)
                        self.edges_in = Number(0, 100, value=0, step=5, label="Hide edges below |w| (% of the largest)",
                                               elem_id="edge-threshold", scale=2)
                    # (a figure from the start: the browser loads Plotly while the first view is computed)
                    self.graph = gr.Plot(plotting.message_figure("Loading the circuit…"), elem_id="circuit-graph",
                                         show_label=False)
                    self.node_in = Choice(choices=[], value=None, label="Selected node (or click one in the graph)",
                                          elem_id="node-select")
            with gr.Group(elem_id="node-panel"):
                self.node_header = gr.Markdown("", elem_id="node-header")
                self.zero_centered = gr.Checkbox(value=True, label="zero-centred colours", elem_id="zero-centered")
                self.label_box()
            with gr.Tabs(elem_id="node-tabs"):
                with gr.Tab("Task examples", id="node-task"):
                    self.task_acts = gr.HTML("", elem_id="task-acts")
                with gr.Tab("Activating examples", id="node-examples-tab"):
                    self.examples = gr.HTML("", elem_id="node-examples")
                with gr.Tab("Attention", id="node-attention"):
                    self.attn_rows = gr.HTML("", elem_id="attn-rows")
                    with gr.Row():
                        self.attn_plot = gr.Plot(elem_id="attn-pattern", show_label=False)
                        self.qk_plot = gr.Plot(elem_id="qk-contrib", show_label=False)
                with gr.Tab("Connections", id="node-connections"):
                    self.connections = gr.HTML("", elem_id="connections")
                self.walk_tab()

    def overview_tab(self) -> None:
        with gr.Tab("Whole circuit", id="overview") as self.tabs["overview"]:
            self.overview = gr.Plot(elem_id="circuit-overview", show_label=False)

    def curves_tab(self) -> None:
        with gr.Tab("Curves", id="curves") as self.tabs["curves"]:
            self.faith_plot = gr.Plot(elem_id="faith-plot", show_label=False)
            self.prune_plot = gr.Plot(elem_id="prune-plot", show_label=False)
            self.train_plot = gr.Plot(elem_id="train-plot", show_label=False)
            self.circuit_through_training_block()
            self.details = gr.HTML("", elem_id="run-details")

    def embeddings_tab(self) -> None:
        with gr.Tab("Embeddings", id="embeddings") as self.tabs["embeddings"]:
            self.channel_in = Number(0, 1, value=0, step=1, label="Residual channel", elem_id="channel-slider")
            self.emb_notice = gr.Markdown("", elem_id="emb-notice")
            self.emb_tokens = gr.Plot(show_label=False, elem_id="emb-tokens")
            with gr.Row():
                self.emb_hist = gr.Plot(show_label=False, elem_id="emb-hist")
                self.pos_plot = gr.Plot(show_label=False, elem_id="pos-emb")

    def prompt_tab(self) -> None:
        with gr.Tab("Prompt lab", id="prompt") as self.tabs["prompt"]:
            with gr.Row():
                with gr.Column(scale=2):
                    self.prompt_in = gr.Code(value=DEFAULT_PROMPT, language="python", label="Prompt (Python code)",
                                             elem_id="prompt-input", interactive=True)
                    with gr.Row():
                        self.cand_a = gr.Textbox(value='"', label="candidate A", elem_id="cand-a", max_length=100)
                        self.cand_b = gr.Textbox(value="'", label="candidate B", elem_id="cand-b", max_length=100)
                    self.prompt_btn = gr.Button("Predict next token", variant="primary", elem_id="prompt-run")
                with gr.Column(scale=3):
                    self.prompt_notice = gr.Markdown("", elem_id="prompt-notice")
                    self.prompt_tokens = gr.HTML("", elem_id="prompt-tokens")
                    self.logit_diff = gr.Markdown("", elem_id="logit-diff")
            self.next_plot = gr.Plot(plotting.message_figure("Press Predict next token.", 160), elem_id="next-plot",
                                     show_label=False)
            self.prompt_node_acts = gr.HTML("", elem_id="prompt-node-acts")
            with gr.Accordion("/next_tokens output (JSON)", open=False):
                self.prompt_json = gr.JSON(label="/next_tokens output", elem_id="prompt-json")
            self.lab_views()

    # ---- issue 22: the prompt lab's attention grid and activation patching (layout) ------------------

    def lab_views(self) -> None:
        """Every head of a chosen layer on the prompt, and activation patching of the circuit's nodes."""
        gr.Markdown("### Attention of every head")
        with gr.Row(equal_height=True):
            self.att_layer = Options(choices=["0"], value="0", label="Layer", elem_id="att-layer", scale=3)
            self.att_btn = gr.Button("Show attention", elem_id="att-run", scale=1)
        self.att_notice = gr.Markdown("", elem_id="att-notice")
        self.att_grid = gr.Plot(plotting.message_figure("Press Show attention (or pick a layer).", 160), elem_id="att-grid",
                                show_label=False)
        self.att_tokens = gr.HTML("", elem_id="att-tokens", js_on_load=plotting.ATTENTION_TOKENS_JS)
        self.att_key = gr.State(None)
        gr.Markdown("### Activation patching\nEach node of the shown circuit is patched from the clean run into the "
                    "corrupted one (same token length); its effect is the change of logit(A) − logit(B) at the last token.")
        with gr.Row(equal_height=True):
            self.patch_clean = gr.Textbox(value=lab.DEFAULT_CLEAN, label="clean prompt", elem_id="patch-clean", scale=3)
            self.patch_corrupt = gr.Textbox(value=lab.DEFAULT_CORRUPT, label="corrupted prompt", elem_id="patch-corrupt",
                                            scale=3)
            self.patch_a = gr.Textbox(value=lab.DEFAULT_CANDIDATES[0], label="candidate A", elem_id="patch-a",
                                      max_length=100, scale=1)
            self.patch_b = gr.Textbox(value=lab.DEFAULT_CANDIDATES[1], label="candidate B", elem_id="patch-b",
                                      max_length=100, scale=1)
            self.patch_btn = gr.Button("Patch", variant="primary", elem_id="patch-run", scale=1)
        self.patch_notice = gr.Markdown("", elem_id="patch-notice")
        with gr.Row():
            with gr.Column(scale=2):
                self.patch_list = gr.HTML("", elem_id="patch-list")
            with gr.Column(scale=3):
                self.patch_graph = gr.Plot(lab.patching_idle().figure, elem_id="patch-graph", show_label=False)
        self.patch_key = gr.State(None)

    def ablations_tab(self) -> None:
        """Ablations, live importances, comparison, pruning (its defaults are the library's `PruneConfig`) and
        user tasks."""
        prune_defaults = PruneConfig()
        with gr.Tab("Ablations & pruning", id="ablations") as self.tabs["ablations"]:
            with gr.Row():
                self.abl_layers = gr.CheckboxGroup(choices=[], label="Ablate layers", elem_id="abl-layers")
                self.abl_nodes = Choice(choices=[], value=[], multiselect=True, allow_custom_value=True,
                                        label="Ablate nodes (any 'location:index')", elem_id="abl-nodes")
            with gr.Row():
                self.abl_mode = gr.Radio(["mean", "zero"], value=prune_defaults.ablation, label="Ablation",
                                         elem_id="abl-mode")
                self.abl_base = gr.Radio(["full model", "circuit"], value="full model", label="Ablate from",
                                         elem_id="abl-base")
                self.abl_btn = gr.Button("Ablate", variant="primary", elem_id="abl-run")
            self.abl_plot = gr.Plot(plotting.message_figure("Choose layers or nodes and press Ablate.", 160),
                                    elem_id="ablation-plot", show_label=False)
            self.abl_table = gr.Markdown("", elem_id="ablation-table")
            self.imp_btn = gr.Button("Compute every circuit node's importance (live)", elem_id="imp-run")
            self.imp_plot = gr.Plot(plotting.message_figure("Press the button to ablate every circuit node in turn.", 160),
                                    elem_id="importance-plot", show_label=False)
            with gr.Row():
                self.cmp_in = Choice(choices=[], value=None, label="Compare with run", elem_id="compare-select")
                self.cmp_btn = gr.Button("Compare", elem_id="compare-run")
            self.cmp_plot = gr.Plot(plotting.message_figure("Choose a run to compare with.", 160), elem_id="compare-plot",
                                    show_label=False)
            self.cmp_md = gr.Markdown("", elem_id="compare-md")
            gr.Markdown("### Run pruning\nLearns node masks for the task, then bisects for the smallest circuit "
                        "reaching the target loss. The result becomes a run of this session (kept on the server, "
                        "so it survives a reload and can be shared by link).")
            with gr.Row():
                self.pr_task = Choice(choices=task_names(), value=None, label="Task", elem_id="prune-task")
                self.pr_mode = gr.Radio(["nats", "× full model's loss"], value="nats", label="Target is",
                                        elem_id="prune-mode")
                self.pr_target = gr.Number(value=prune_defaults.target_loss, label="Target loss", elem_id="prune-target")
                self.pr_steps = Number(MIN_PRUNE_STEPS, MAX_PRUNE_STEPS, value=prune_defaults.steps, step=10,
                                       label="Mask training steps", elem_id="prune-steps")
                self.pr_control = gr.Checkbox(prune_defaults.control is not None,
                                              label="Shuffled-answer control (about doubles the time)",
                                              elem_id="prune-control")
            self.pr_check = gr.Markdown("", elem_id="prune-check")
            self.pr_btn = gr.Button("Run pruning", variant="primary", elem_id="prune-run")
            self.pr_progress = gr.Markdown("", elem_id="prune-progress")
            self.pr_md = gr.Markdown("", elem_id="prune-md")
            gr.Markdown("### Your own task\nOne JSON object per line, `{\"prompt\": ..., \"correct\": ..., "
                        "\"incorrect\": ...}`: each answer one token right after the prompt, and each of the two "
                        "answers correct somewhere (else always giving one answer solves it). The task joins the "
                        "task list of this session; its runs carry its examples.")
            with gr.Row():
                self.ct_text = gr.Textbox(lines=5, max_lines=12, label="Task lines (JSON lines)",
                                          elem_id="custom-task-text",
                                          placeholder='{"prompt": "x = \'a", "correct": "\'", "incorrect": "\\""}',
                                          scale=3)
                with gr.Column(scale=1):
                    self.ct_file = gr.File(label="or a .jsonl file", file_types=[".jsonl", ".json", ".txt"],
                                           elem_id="custom-task-file")
                    self.ct_name = gr.Textbox(label="Name", placeholder="my_task", elem_id="custom-task-name")
            self.ct_btn = gr.Button("Check and add the task", elem_id="custom-task-add")
            self.ct_md = gr.Markdown("", elem_id="custom-task-md")

    def share_tab(self) -> None:
        with gr.Tab("Share & files", id="share") as self.tabs["share"]:
            self.share_link = gr.Textbox(label="Link to this view", elem_id="share-link", buttons=["copy"],
                                         interactive=False)
            self.download = gr.DownloadButton("Download circuit (csp-circuit JSON)", value=None, interactive=False,
                                              elem_id="download")
            self.upload = gr.File(label=f"Import a circuit file (.json) or the original visualizer's viz_data.pt "
                                        f"(up to {MAX_UPLOAD_BYTES // 1_000_000} MB)", file_types=[".json", ".pt"],
                                  elem_id="upload")
            self.upload_md = gr.Markdown("", elem_id="upload-md")
            self.export_controls()

    def plumbing(self) -> None:
        """Hidden boxes: Plotly clicks arrive in node_click (see PAGE_JS); share_query holds the view's query."""
        self.node_click = gr.Textbox(visible="hidden", elem_id="node-click", label="clicked node")
        self.share_query = gr.Textbox(visible="hidden", elem_id="share-query", label="query")
        self.view_outputs = [
            self.session, self.model_in, self.task_in, self.pr_task, self.run_in, self.cmp_in, self.k_in, self.summary,
            self.status, self.empty_box, self.empty_md, self.empty_out, self.layer_in, self.node_in, self.graph,
            self.layer_bars, self.overview, self.share_query, self.node_header, self.abl_layers, self.channel_in,
            self.connections, self.examples, self.task_acts, self.attn_rows, self.attn_plot, self.qk_plot, self.download,
            self.reading, *self.export_outputs]
        self.selection = [self.model_in, self.task_in, self.run_in, self.k_in, self.layer_in, self.node_in,
                          self.edges_in, self.tab]
        self.node_inputs = [self.model_in, self.task_in, self.run_in, self.k_in, self.layer_in, self.node_in,
                            self.zero_centered]
        self.node_outputs = [self.connections, self.examples, self.task_acts, self.attn_rows, self.attn_plot,
                             self.qk_plot, self.status, self.reading]

    # ---- painting ---------------------------------------------------------------------------------

    def show(self, view: View, request: gr.Request | None = None, ticket: int | None = None) -> dict:
        """Component updates for the parts of the page this view changes; nothing for the slow numbers of a
        selection the page no longer shows, nor for a selection overtaken by a later one."""
        none = view.run is None
        before = self.shown.current(request)
        skip = {self.summary: gr.skip()}  # (an empty dict reads as one value)
        overtaken = (not self.shown.shows(request, view.selected, numbers_only=True) if view.numbers_only
                     else not self.shown.newest(request, ticket))
        if overtaken:  # (no figures built for an answer that will not be painted)
            return skip
        parts = {
            "model": lambda: {self.model_in: gr.Dropdown(choices=view.model_choices, value=view.model)},
            "task": lambda: {self.task_in: gr.Dropdown(choices=view.task_choices, value=view.task),
                             self.pr_task: gr.Dropdown(choices=view.task_choices, value=view.task)},
            "run": lambda: {self.run_in: gr.Dropdown(choices=view.run_choices, value=None if none else view.run.id),
                            self.cmp_in: gr.Dropdown(choices=view.run_choices, value=None)},
            "k": lambda: {self.k_in: gr.Slider(minimum=1, maximum=max(view.k_max, 2), value=view.k or 1, step=1,
                                               interactive=not none)},
            "summary": lambda: {self.summary: view.summary},
            "status": lambda: {self.status: view.status},
            "empty": lambda: {self.empty_box: gr.Group(visible=none), self.empty_md: view.empty or "",
                              self.empty_out: ""},
            "layer": lambda: {self.layer_in: gr.Radio(choices=view.layer_choices)  # not the value the user may
                              if view.numbers_only                                   # have changed since
                              else gr.Radio(choices=view.layer_choices, value=view.layer)},
            "node": lambda: {self.node_in: gr.Dropdown(choices=view.node_choices, value=view.node)},
            "graph": lambda: {self.graph: view.graph},
            "layer_bars": lambda: {self.layer_bars: view.layer_bars},
            "overview": lambda: {self.overview: view.overview},
            "share": lambda: {self.share_query: view.share_query},
            "node_header": lambda: {self.node_header: view.node_header},
        }
        out = {self.session: view.session}
        for name in view.parts_to_paint(before):
            out.update(parts[name]())
        if not view.numbers_only and view.selected != before:  # the node panel of the old selection goes
            out.update(self.node_outputs_of(panels.node_panel_updating(view.selected)))
        if not view.numbers_only and (before is None or before.numbers != view.selected.numbers):
            # the download of an older selection is never left on the button: on the Share tab the new one
            # is written now, elsewhere when the tab opens
            path = (panels.download_path(self.explorer, view.model, view.run.id, view.k)
                    if view.tab == "share" and view.run else None)
            out[self.download] = download_button(path)
        out.update(self.export_updates(view, before))
        if "run" in view.changed:
            out[self.abl_layers] = gr.CheckboxGroup(choices=plotting.layer_names(view.entry.n_layer), value=[])
            out[self.channel_in] = gr.Slider(minimum=0, maximum=int(view.entry.config.d_model) - 1, step=1)
        # accepted last, once the answer is built: a pick made meanwhile (its answer may reach the page first)
        # then drops this one, rather than being painted over by it
        return out if self.shown.accept(request, view, ticket) else skip

    def node_outputs_of(self, p: panels.NodePanel) -> dict:
        return {self.connections: p.connections, self.examples: p.examples, self.task_acts: p.task,
                self.attn_rows: p.attention,
                self.attn_plot: p.attention_figure or plotting.message_figure("No attention pattern for this node.", 200),
                self.qk_plot: p.qk_figure or plotting.message_figure("q·k contributions are shown for q and k channels.",
                                                                     200),
                self.reading: p.reading}

    def new_run(self, result: panels.NewRun, message_box, request) -> dict:
        """A run pruned or imported here, shown (it joins the browser's saved runs), with its message."""
        if result.view is None:
            return {message_box: result.message}
        ticket, _ = self.shown.begin(request, Request("load"))  # the new run is the newest pick
        return {**self.show(result.view, request, ticket), message_box: result.message,
                self.saved: result.view.session.saved()}

    # ---- events: the view ---------------------------------------------------------------------------

    def on_view(self, event):
        def handler(state, model, task, run, k, layer, node, edges, tab_name, request: gr.Request):
            page = self.shown.current(request)
            if event == "stats":  # the numbers of what the page shows now, one computation at a time per page
                if page is not None:
                    model, task, run, k, layer, node = (getattr(page, name) for name in SELECTORS)
                with self.page_lock(getattr(request, "session_hash", None)):
                    asked = Request(event, model, task, run, k, layer, node, edges, tab=tab_name)
                    return self.show(resolve_view(self.explorer, state, asked), request, None)
            asked = Request(event, model, task, run, k, layer, node, edges, tab=tab_name)
            ticket, fresh = self.shown.begin(request, asked)
            if event in PICKS and not fresh:  # a re-send of the newest pick, or of what is shown: no change
                return {self.summary: gr.skip()}
            return self.show(resolve_view(self.explorer, state, replace(asked, fresh=fresh)), request, ticket)

        return guarded(handler, self.status)

    def on_load(self, saved_runs, request: gr.Request):
        query = dict(request.query_params) if request is not None else {}
        ticket, _ = self.shown.begin(request, Request("load"))
        view = resolve_view(self.explorer, None, Request("load", query=query, saved=saved_runs))
        return {**self.show(view, request, ticket), self.saved: view.session.saved()}

    def on_click(self, state, model, task, run, k, layer, node, edges, tab_name, clicked, request: gr.Request):
        node, _, rest = (clicked or "").partition("|")
        asked = Request("click" if rest.startswith("graph") else "node", model, task, run, k, layer, node, edges,
                        tab=tab_name)
        ticket, fresh = self.shown.begin(request, asked)
        if not fresh:
            return {self.summary: gr.skip()}
        return self.show(resolve_view(self.explorer, state, replace(asked, fresh=fresh)), request, ticket)

    def on_search(self, state, model, task, run, k, layer, node, edges, tab_name, text, request: gr.Request):
        asked = Request("search", model, task, run, k, layer, node, edges, search=text, tab=tab_name)
        ticket, _ = self.shown.begin(request, asked)
        return self.show(resolve_view(self.explorer, state, asked), request, ticket)

    def on_node_panel(self, model, task, run, k, layer, node, zc, request: gr.Request):
        """The panel of the node the page shows now (as `Shown` knows it: the page's boxes may still hold a
        pick whose answer is on its way), painted only if the page still shows it when done."""
        page = self.shown.current(request)
        if page is not None:
            model, task, run, k, layer, node = (getattr(page, name) for name in SELECTORS)
        p = panels.node_panel(self.explorer, model, task, run, k, node, zc, layer=layer)
        if not self.shown.shows(request, p.selection):
            return {self.connections: gr.skip()}  # the page has moved on: its own node panel step follows
        return self.node_outputs_of(p)

    def on_empty_check(self, model, task, run, target, mode, request: gr.Request):
        """Before pruning from "no circuit yet": what the full model's loss says about the target."""
        if run or not self.shown.shows(request, Selection.of(model, task), True):
            return {self.empty_out: gr.skip()}
        return {self.empty_out: panels.prune_check(self.explorer, model, task, target, mode != "nats")}

    def chain(self, trigger, fn, inputs, outputs=None, stats=True, **kwargs):
        """An event that changes the view, then the node panel, then the slow numbers (painted only while the
        page shows their selection); returns the event's own step."""
        first = trigger(fn if inspect.isgeneratorfunction(fn) else guarded(fn, self.status), inputs,
                        outputs or self.view_outputs, **kwargs)
        # (Gradio's default, "once", drops a step triggered while the same step is pending: the node panel and
        # numbers of the last pick would never come; "always_last" runs the newest trigger when it is done)
        last = dict(show_progress="hidden", trigger_mode="always_last")
        step = first.then(guarded(self.on_node_panel, self.status), self.node_inputs, self.node_outputs, **last)
        if stats:
            step.then(self.on_view("stats"), [self.session] + self.selection, self.view_outputs, **last).then(
                guarded(self.on_empty_check, self.status),
                [self.model_in, self.task_in, self.run_in, self.pr_target, self.pr_mode], [self.empty_out, self.status],
                **last)
        return first

    def wire_browser(self, demo: gr.Blocks) -> None:
        """The page's load and the selectors: each answers with the view, then the node panel, then the numbers."""
        view_in = [self.session] + self.selection
        self.chain(demo.load, self.on_load, [self.saved], self.view_outputs + [self.saved])
        # A dropdown pick ends with the box losing focus (Gradio 6 sends "input" for the pick and again for the blur):
        # one request per pick. A blur without a pick asks for what is shown, which changes nothing.
        # A pick made while the previous one of the same box is on its way is sent when that one is done
        # ("always_last"; Gradio's "once" would drop it while the box shows it).
        pick = dict(trigger_mode="always_last")
        self.chain(self.model_in.blur, self.on_view("model"), view_in, concurrency_id="model", concurrency_limit=2,
                   **pick)
        self.chain(self.task_in.blur, self.on_view("task"), view_in, **pick)
        self.chain(self.run_in.blur, self.on_view("run"), view_in, **pick)
        # (selections answer within a few hundred ms: no progress overlays, whose drawing on every output costs
        # as much as the answer)
        self.chain(self.k_in.release, self.on_view("k"), view_in, show_progress="hidden", **pick)
        # (the numbers follow every pick: a layer or node pick may have overtaken the pick of a run or k whose
        # own numbers step then found the page elsewhere; cached, they cost little)
        self.chain(self.layer_in.input, self.on_view("layer"), view_in, show_progress="hidden", **pick)
        self.chain(self.node_in.blur, self.on_view("node"), view_in, show_progress="hidden", **pick)
        self.chain(self.node_click.change, self.on_click, view_in + [self.node_click], show_progress="hidden", **pick)
        self.chain(self.search_in.submit, self.on_search, view_in + [self.search_in], show_progress="hidden", **pick)
        self.edges_in.release(self.on_view("edges"), view_in, self.view_outputs, show_progress="hidden")
        self.zero_centered.input(guarded(self.on_node_panel, self.status), self.node_inputs, self.node_outputs,
                                 show_progress="minimal")
        self.share_query.change(None, [self.share_query], [self.share_link], js=SHARE_JS)

    # ---- events: the other tabs, each computing its figures when it opens ---------------------------------

    def wire_tab_names(self) -> None:
        """The open tab's name in `tab` (the view computes the overview only while it is open)."""
        for name, t in self.tabs.items():
            t.select(lambda n=name: n, None, self.tab, queue=False, show_progress="hidden")

    def wire_overview(self) -> None:
        def on_overview(state, model, task, run, k, layer, node, edges, _tab, request: gr.Request):
            ticket, _ = self.shown.begin(request)
            return self.show(resolve_view(self.explorer, state, Request("tab", model, task, run, k, layer, node, edges,
                                                                        tab="overview")), request, ticket)

        self.tabs["overview"].select(guarded(on_overview, self.status), [self.session] + self.selection, self.view_outputs)

    def wire_curves(self) -> None:
        def on_curves(model, task, run, k):
            p = panels.curves_panel(self.explorer, model, task, run, k)
            return {self.faith_plot: p.faithfulness, self.prune_plot: p.pruning, self.train_plot: p.training,
                    self.details: p.details}

        self.tabs["curves"].select(guarded(on_curves, self.status), [self.model_in, self.task_in, self.run_in, self.k_in],
                                [self.faith_plot, self.prune_plot, self.train_plot, self.details, self.status])

    # ---- issue 22: a circuit through training (Curves tab) ----------------------------------------

    def circuit_through_training_block(self) -> None:
        self.through_training_plot = gr.Plot(elem_id="through-training-plot", show_label=False)

    def wire_circuit_through_training(self) -> None:
        def on_curves(model):
            return {self.through_training_plot: panels.circuit_through_training_panel(self.explorer, model)}

        self.tabs["curves"].select(guarded(on_curves, self.status), [self.model_in],
                                   [self.through_training_plot, self.status])

    # ---- end of issue 22: a circuit through training ----------------------------------------------

    def wire_embeddings(self) -> None:
        def on_embeddings(model, channel):
            p = panels.embeddings_panel(self.explorer, model, channel)
            return {self.channel_in: gr.Slider(value=p.channel), self.emb_tokens: p.tokens, self.emb_hist: p.histogram,
                    self.pos_plot: p.positions, self.emb_notice: p.notice}

        emb_outputs = [self.channel_in, self.emb_tokens, self.emb_hist, self.pos_plot, self.emb_notice, self.status]
        self.tabs["embeddings"].select(guarded(on_embeddings, self.status), [self.model_in, self.channel_in], emb_outputs)
        self.channel_in.release(guarded(on_embeddings, self.status), [self.model_in, self.channel_in], emb_outputs)

    def wire_prompt(self) -> None:
        def on_prompt(model, task, run, k, node, prompt, a, b, zc):
            p = panels.prompt_panel(self.explorer, model, task, run, k, node, prompt, a, b, zc)
            return {self.prompt_notice: p.notice, self.prompt_tokens: p.tokens, self.next_plot: p.figure,
                    self.logit_diff: p.logit_diff, self.prompt_node_acts: p.node_acts, self.prompt_json: p.json}

        prompt_inputs = [self.model_in, self.task_in, self.run_in, self.k_in, self.node_in, self.prompt_in, self.cand_a,
                         self.cand_b, self.zero_centered]
        prompt_outputs = [self.prompt_notice, self.prompt_tokens, self.next_plot, self.logit_diff,
                          self.prompt_node_acts, self.prompt_json, self.status]
        for trigger in (self.prompt_btn.click, self.cand_a.submit, self.cand_b.submit):
            trigger(guarded(on_prompt, self.status), prompt_inputs, prompt_outputs)

    # ---- issue 22: the prompt lab's attention grid and activation patching (events) ------------------

    def wire_lab(self) -> None:
        """Each reading is computed on a press (or a layer pick, or when the tab opens) and cleared as soon as what it
        was computed from changes; a reading that arrives after such a change is cleared by the step after it
        (its inputs are kept in `att_key` / `patch_key`)."""
        att_in = [self.model_in, self.prompt_in, self.att_layer]
        att_out = [self.att_notice, self.att_grid, self.att_tokens, self.att_layer, self.att_key, self.status]

        def on_attention(model, prompt, layer):
            p = lab.attention_panel(self.explorer, model, prompt, layer)
            return {self.att_notice: p.notice, self.att_grid: p.figure, self.att_tokens: p.tokens,
                    self.att_layer: gr.Radio(choices=p.layers, value=p.layer) if p.layers else gr.skip(),
                    self.att_key: [model, prompt, p.layer or layer]}

        def att_blank(text="Press Show attention (or pick a layer) to draw every head of the layer on the prompt."):
            return {self.att_notice: "", self.att_grid: plotting.message_figure(text, 160), self.att_tokens: "",
                    self.att_key: None}

        def att_check(key, model, prompt, layer):
            return gr.skip() if key is None or key == [model, prompt, layer] else att_blank()

        last = dict(trigger_mode="always_last", show_progress="minimal")
        for trigger in (self.att_btn.click, self.prompt_btn.click, self.att_layer.input, self.tabs["prompt"].select):
            trigger(guarded(on_attention, self.status), att_in, att_out, **last).then(
                att_check, [self.att_key] + att_in, [self.att_notice, self.att_grid, self.att_tokens, self.att_key],
                show_progress="hidden")
        for trigger in (self.prompt_in.change, self.model_in.change):
            trigger(att_blank, None, [self.att_notice, self.att_grid, self.att_tokens, self.att_key],
                    queue=False, show_progress="hidden")

        patch_in = [self.model_in, self.run_in, self.k_in, self.patch_clean, self.patch_corrupt, self.patch_a,
                    self.patch_b]
        patch_out = [self.patch_notice, self.patch_list, self.patch_graph, self.patch_key]

        def on_patch(*inputs):
            p = lab.patching_panel(self.explorer, *inputs)
            return {self.patch_notice: p.notice, self.patch_list: p.ranked, self.patch_graph: p.figure,
                    self.patch_key: list(inputs)}

        def patch_blank():
            p = lab.patching_idle()
            return {self.patch_notice: p.notice, self.patch_list: p.ranked, self.patch_graph: p.figure,
                    self.patch_key: None}

        def patch_check(key, *inputs):
            return gr.skip() if key is None or key == list(inputs) else patch_blank()

        for trigger in (self.patch_btn.click, self.patch_clean.submit, self.patch_corrupt.submit):
            trigger(guarded(on_patch, self.status), patch_in, patch_out + [self.status], **last).then(
                patch_check, [self.patch_key] + patch_in, patch_out, show_progress="hidden")
        for component in patch_in:
            component.change(patch_blank, None, patch_out, queue=False, show_progress="hidden")

    def wire_ablations(self) -> None:
        """Ablations, live importances and comparison of the shown circuit."""
        shown_circuit = [self.model_in, self.task_in, self.run_in, self.k_in]

        def on_ablations_tab(model, task, run, k, target, mode):
            return {self.abl_nodes: gr.Dropdown(choices=panels.circuit_nodes(self.explorer, model, run, k), value=[]),
                    self.pr_check: panels.prune_check(self.explorer, model, task, target, mode != "nats")}

        self.tabs["ablations"].select(guarded(on_ablations_tab, self.status), shown_circuit + [self.pr_target, self.pr_mode],
                                   [self.abl_nodes, self.pr_check, self.status])

        def on_ablate(model, task, run, k, layers, nodes, mode, base):
            p = panels.ablation_panel(self.explorer, model, task, run, k, layers, nodes, mode, base)
            return {self.abl_plot: p.figure, self.abl_table: p.table}

        self.abl_btn.click(guarded(on_ablate, self.status),
                           shown_circuit + [self.abl_layers, self.abl_nodes, self.abl_mode, self.abl_base],
                           [self.abl_plot, self.abl_table, self.status], concurrency_limit=2, concurrency_id="ablate")

        def on_importances(model, task, run, k, node, progress=gr.Progress()):
            report = lambda done, total: progress(done / max(total, 1), desc=f"node {done} of {total}")  # noqa: E731
            return {self.imp_plot: panels.importance_panel(self.explorer, model, task, run, k, node, report)}

        self.imp_btn.click(guarded(on_importances, self.status), shown_circuit + [self.node_in],
                           [self.imp_plot, self.status], concurrency_limit=2, concurrency_id="ablate")

        def on_compare(model, task, run, k, other):
            p = panels.compare_panel(self.explorer, model, task, run, k, other)
            return {self.cmp_plot: p.figure, self.cmp_md: p.text}

        self.cmp_btn.click(guarded(on_compare, self.status), shown_circuit + [self.cmp_in],
                           [self.cmp_plot, self.cmp_md, self.status])

    def wire_pruning(self) -> None:
        """Pruning, here or from "no circuit yet", and user tasks: new runs, which join the browser's saved runs."""
        def on_check(model, task, target, mode):
            return {self.pr_check: panels.prune_check(self.explorer, model, task, target, mode != "nats")}

        for trigger in (self.pr_task.input, self.pr_mode.input, self.pr_target.submit, self.pr_target.blur):
            trigger(guarded(on_check, self.status), [self.model_in, self.pr_task, self.pr_target, self.pr_mode],
                    [self.pr_check, self.status])

        def prune_buttons(running: bool):
            """Both prune buttons off while a prune of this page runs (back on afterwards, also after an error)."""
            return lambda: {self.pr_btn: gr.Button(interactive=not running),
                            self.empty_btn: gr.Button(interactive=not running)}

        options = [self.pr_target, self.pr_mode, self.pr_steps, self.pr_control, self.tab]
        for button, box, task_box, finish in (
            (self.pr_btn, self.pr_progress, self.pr_task,
             lambda result, request: self.new_run(result, self.pr_md, request)),
            (self.empty_btn, self.empty_progress, self.task_in,
             lambda result, request: {**self.new_run(result, self.empty_out, request), self.pr_md: result.message,
                                      self.status: result.message}),
        ):
            started = button.click(prune_buttons(True), None, [self.pr_btn, self.empty_btn], queue=False,
                                   show_progress="hidden")
            self.chain(started.then, self.pruning(box, finish), [self.session, self.model_in, task_box] + options,
                       self.view_outputs + [self.pr_md, self.saved, self.status, box],
                       concurrency_limit=1, concurrency_id="prune", show_progress="hidden").then(
                prune_buttons(False), None, [self.pr_btn, self.empty_btn], queue=False, show_progress="hidden")

        def on_custom_task(state, model, text, file, name, tab_name, request: gr.Request):
            result = panels.add_custom_task(self.explorer, state, model, text, file_path(file), name, tab_name)
            return self.new_run(result, self.ct_md, request)

        self.chain(self.ct_btn.click, on_custom_task,
                   [self.session, self.model_in, self.ct_text, self.ct_file, self.ct_name, self.tab],
                   self.view_outputs + [self.ct_md, self.saved], concurrency_limit=2, concurrency_id="ablate")

    def pruning(self, box, finish):
        """A prune as a page step: its stage and step counts in `box` while it runs (polled from the pruning
        thread's reports), then `finish(result, request)`."""
        def handler(state, model, task, target, mode, steps, control, tab_name, request: gr.Request):
            progress, done = Progress(), {}

            def work():
                done["result"] = panels.prune_new_run(self.explorer, state, model, task, target, mode != "nats", steps,
                                                      progress, tab_name, control)

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
                yield {box: "", self.status: panels.warning_markdown(f"unexpected error: {type(exc).__name__}: "
                                                                    f"{first_line(exc)}")}

        return handler

    def wire_share(self) -> None:
        """The download of the shown circuit (written when the tab opens) and imports, which join the saved runs."""
        def on_share_tab(model, run, k):
            return {self.download: download_button(panels.download_path(self.explorer, model, run, k))}

        self.tabs["share"].select(guarded(on_share_tab, self.status), [self.model_in, self.run_in, self.k_in],
                               [self.download, self.status])

        def on_upload(state, file, model, tab_name, request: gr.Request):
            """Imports the file as a saved run, and empties the box for the next file."""
            if file is None:
                return {self.upload_md: ""}
            path = file_path(file)
            try:
                result = panels.import_new_run(self.explorer, state, model, path, Path(str(path)).name, tab_name)
            finally:
                discard_upload(path)
            return {**self.new_run(result, self.upload_md, request), self.upload: None}

        self.chain(self.upload.upload, on_upload, [self.session, self.upload, self.model_in, self.tab],
                   self.view_outputs + [self.upload_md, self.saved, self.upload])

    # ---- issue 22: walking the circuit (the node panel's "What it does" tab, links between nodes) --------------

    def walk_tab(self) -> None:
        """The node panel's "What it does" tab: the node's paths, why it fires, its logit effects or drivers."""
        with gr.Tab("What it does", id="node-reading-tab"):
            self.reading = gr.HTML("", elem_id="node-reading")

    def wire_walk(self, demo: gr.Blocks) -> None:
        """A click on a node link (connections, the reading's tables) selects that node as a click on the graph does:
        the page script writes it into the hidden node-click box (source "link", so the graph is redrawn)."""
        demo.load(None, None, None, js=WALK_JS)

    # ---- issue 22: export and node labels ---------------------------------------------------------
    # Figures and the circuit as files (Share & files tab), and a label box in the node panel. Every file on a
    # download button is for the selection the page shows: `export_updates` (part of each painted view) empties
    # the figure button and rewrites the circuit files whenever the selection changes.

    def label_box(self) -> None:
        with gr.Row(equal_height=True, elem_id="node-label-row"):
            self.label_in = gr.Textbox(label="Label this node (a note; kept with the run and its share link)",
                                       max_length=graph_limits.MAX_LABEL_CHARS, elem_id="node-label", scale=4,
                                       placeholder="e.g. detects an open bracket")
            self.label_btn = gr.Button("Save label", elem_id="node-label-save", scale=1)
        self.label_md = gr.Markdown("", elem_id="node-label-md")

    def export_controls(self) -> None:
        from .. import export

        problem = export.image_export_problem()
        gr.Markdown("### Export\nFiles that work offline: the circuit as an interactive HTML page (graph and node "
                    "table) and as CSV tables; any figure as HTML" + (", PNG or SVG." if problem is None else
                                                                      f". ({problem})"))
        with gr.Row():
            self.files_btn = gr.Button("Make the circuit files", elem_id="export-circuit-make")
            self.page_download = gr.DownloadButton("Circuit page (HTML)", value=None, interactive=False,
                                                   elem_id="download-page")
            self.nodes_download = gr.DownloadButton("Nodes (CSV)", value=None, interactive=False,
                                                    elem_id="download-nodes")
            self.edges_download = gr.DownloadButton("Edges (CSV)", value=None, interactive=False,
                                                    elem_id="download-edges")
        with gr.Row(equal_height=True):
            self.figure_in = gr.Dropdown(choices=[(name, key) for key, name in exports.FIGURES.items()], value="graph",
                                         label="Figure", elem_id="export-figure", scale=2)
            self.format_in = gr.Radio(list(export.FIGURE_FORMATS) if problem is None else ["html"], value="html",
                                      label="Format", elem_id="export-format", scale=1)
            self.figure_btn = gr.Button("Make the file", elem_id="export-make", scale=1)
            self.figure_download = gr.DownloadButton("Download figure", value=None, interactive=False,
                                                     elem_id="export-download", scale=1)
        self.export_md = gr.Markdown("", elem_id="export-md")
        self.export_outputs = [self.page_download, self.nodes_download, self.edges_download, self.figure_download,
                               self.export_md, self.label_in, self.label_md]

    def circuit_file_updates(self, files: "exports.CircuitFiles") -> dict:
        return {button: gr.DownloadButton(value=path, interactive=path is not None)
                for button, path in ((self.page_download, files.page), (self.nodes_download, files.nodes),
                                     (self.edges_download, files.edges))}

    def export_updates(self, view: View, before) -> dict:
        """Part of each painted view: no file of another selection on any export button (the new selection's are
        made on demand, `wire_export`), and the selected node's label in the label box."""
        if view.numbers_only or view.selected == before:
            return {}
        out = {self.figure_download: gr.DownloadButton(value=None, interactive=False), self.export_md: "",
               self.label_md: "",
               self.label_in: (view.circuit.labels.get(view.node, "") if view.circuit is not None and view.node
                               else "")}
        if before is None or before.numbers != view.selected.numbers:
            out.update(self.circuit_file_updates(exports.CircuitFiles()))
        return out

    def wire_export(self) -> None:
        """The circuit files and a figure file, each made on demand for the shown selection (the circuit page
        inlines plotly.js: 5 MB and seconds of work, not for every selection), and node labels (a label saves a
        new run, which the page then shows)."""
        def on_circuit_files(request: gr.Request):
            page = self.shown.current(request)
            if page is None or page.run is None:
                return {**self.circuit_file_updates(exports.CircuitFiles()),
                        self.export_md: panels.warning_markdown("no circuit is shown: pick a run first")}
            files = exports.circuit_downloads(self.explorer, page.model, page.run, page.k)
            if self.shown.current(request) != page:  # the selection changed meanwhile: the files are not for it
                files = exports.CircuitFiles()
            return {**self.circuit_file_updates(files), self.export_md: ""}

        self.files_btn.click(guarded(on_circuit_files, self.status), None,
                             [self.page_download, self.nodes_download, self.edges_download, self.export_md, self.status],
                             concurrency_limit=2, concurrency_id="export")

        def on_figure(which, fmt, model, task, run, k, layer, node, edges, request: gr.Request):
            page = self.shown.current(request)
            if page is not None:  # what the page shows (its boxes may hold a pick whose answer is on its way)
                model, task, run, k, layer, node = (getattr(page, name) for name in SELECTORS)
            try:
                path = exports.figure_download(self.explorer, which, fmt, model, task, run, k, layer, node, edges)
            except ValueError as exc:
                return {self.figure_download: gr.DownloadButton(value=None, interactive=False),
                        self.export_md: panels.warning_markdown(first_line(exc))}
            if self.shown.current(request) != page:  # the selection changed meanwhile: that file is not for it
                return {self.figure_download: gr.DownloadButton(value=None, interactive=False), self.export_md: ""}
            return {self.figure_download: gr.DownloadButton(value=path, interactive=True),
                    self.export_md: f"✅ {exports.FIGURES[which]} as {fmt.upper()}: press Download figure"}

        self.figure_btn.click(guarded(on_figure, self.status),
                              [self.figure_in, self.format_in, self.model_in, self.task_in, self.run_in, self.k_in,
                               self.layer_in, self.node_in, self.edges_in],
                              [self.figure_download, self.export_md, self.status], concurrency_limit=2,
                              concurrency_id="export")
        stale = lambda: {self.figure_download: gr.DownloadButton(value=None, interactive=False),  # noqa: E731
                         self.export_md: ""}
        for trigger in (self.figure_in.input, self.format_in.input, self.edges_in.release):
            trigger(stale, None, [self.figure_download, self.export_md], queue=False, show_progress="hidden")

        def on_label(state, model, task, run, k, layer, node, edges, tab_name, text, request: gr.Request):
            result = exports.label_node(self.explorer, state, model, task, run, k, layer, node, text, edges, tab_name)
            return self.new_run(result, self.label_md, request)

        for trigger in (self.label_btn.click, self.label_in.submit):
            self.chain(trigger, on_label, [self.session] + self.selection + [self.label_in],
                       self.view_outputs + [self.label_md, self.saved], show_progress="hidden")

    # ---- issue 21: a model's mean activations and node examples, computed once with a progress bar -------------

    def wire_preparation(self, demo: gr.Blocks) -> None:
        """On page load and on a model pick: a progress bar while the model's means and node examples are
        computed (once per model, shared by every page; read from the disk cache after a restart), then one line."""
        def on_prepare(model, progress=gr.Progress()):
            report = lambda fraction, text: progress(fraction, desc=text)  # noqa: E731
            return panels.model_preparation(self.explorer, model, report)

        for trigger in (demo.load, self.model_in.change):
            trigger(on_prepare, [self.model_in], [self.prep_md], concurrency_limit=16, concurrency_id="prepare",
                    trigger_mode="always_last", show_progress="full")

    def api(self) -> None:
        explorer = self.explorer

        def next_tokens(prompt: str, model: str = "", task: str = "", run: str = "", k: int = 0) -> dict:
            """Top-10 next tokens and probabilities of the full model and of the circuit alone (nodes outside it
            mean-ablated) for a prompt. model/task/run/k default to the default model and its first circuit; an
            unknown model, task or run is an error, k is clamped to the run's range with a notice."""
            return panels.api_next_tokens(explorer, prompt, model, task, run, k)

        gr.api(next_tokens, api_name="next_tokens", concurrency_limit=4, concurrency_id="browse")


def build_app(explorer: Explorer) -> gr.Blocks:
    """The page over `explorer`: the tabs laid out in order, then each tab's events."""
    page = Page(explorer)
    # delete_cache: every hour Gradio deletes the files this app received or wrote that are an hour old, and all
    # of them when the server stops
    with gr.Blocks(title="Circuit browser · weight-sparse transformers", delete_cache=(3600, 3600)) as demo:
        page.selectors()
        with gr.Tabs():
            for tab in (page.browser_tab, page.overview_tab, page.curves_tab, page.embeddings_tab, page.prompt_tab,
                        page.ablations_tab, page.share_tab):
                tab()
        page.plumbing()
        page.wire_browser(demo)
        page.wire_tab_names()
        for wire in (page.wire_overview, page.wire_curves, page.wire_embeddings, page.wire_prompt, page.wire_lab,
                     page.wire_ablations, page.wire_pruning, page.wire_share, page.wire_circuit_through_training,
                     page.wire_export):
            wire()
        page.wire_walk(demo)
        page.wire_preparation(demo)
        page.api()
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
