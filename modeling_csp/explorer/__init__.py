"""The circuit explorer behind the app (`app.py`), the `/next_tokens` API and `csp next-tokens`; no Gradio here.

- `registry`: models (`get_model`, with the app's allowed roots and timed, cached hub lookups), runs, the
  server-side store of saved runs, sessions.
- `analysis`: what is computed about a circuit, as typed results (losses through `modeling_csp.evaluation`,
  the routine `csp evaluate` uses), cached per model.
- `view`: the browser's view model, `resolve_view(session, Request) -> View`.
- `panels`: the app's other panels as plain results.

A problem with what was asked for raises `UserError` (a ValueError whose message is meant for the user); the
view model and the panels turn it into a message where it belongs.
"""

from .analysis import (
    TOP_N, AblationRow, CircuitStats, FaithCurve, HeadAttention, NodeExamples, PromptResult, PruneOutcome,
    PruneTarget, TaskActivations, ablation_effects, best_layer, best_node, candidate_id, circuit_at_k,
    circuit_stats, clamp, clean_prompt, embedding_channel, encode_prompt, faithfulness_curve, full_loss,
    head_attention, live_importances, max_k, next_tokens, node_examples, predict, prune_circuit, prune_target,
    task_activations, task_names, top_tokens, warm_up,
)
from .registry import (
    HubLookup, ModelEntry, Run, RunStore, Session, Settings, UserError, choose_run, default_model_spec, default_roots,
    find_run, first_line, get_model, hub, import_run_file, loaded_models, resolve_spec, run_store, runs_for_task,
    session_runs, settings,
)
from .view import Request, View, resolve_view, search_nodes

__all__ = [
    "TOP_N", "AblationRow", "CircuitStats", "FaithCurve", "HeadAttention", "NodeExamples", "PromptResult",
    "PruneOutcome", "PruneTarget", "TaskActivations", "ablation_effects", "best_layer", "best_node", "candidate_id",
    "circuit_at_k", "circuit_stats", "clamp", "clean_prompt", "embedding_channel", "encode_prompt",
    "faithfulness_curve", "full_loss", "head_attention", "live_importances", "max_k", "next_tokens",
    "node_examples", "predict", "prune_circuit", "prune_target", "task_activations", "task_names", "top_tokens",
    "warm_up", "HubLookup", "ModelEntry", "Run", "RunStore", "Session", "Settings", "UserError",
    "choose_run", "default_model_spec", "default_roots", "find_run", "first_line", "get_model", "hub", "import_run_file",
    "loaded_models", "resolve_spec", "run_store", "runs_for_task", "session_runs", "settings", "Request", "View",
    "resolve_view", "search_nodes",
]
