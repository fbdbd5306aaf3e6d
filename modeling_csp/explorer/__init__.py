"""The circuit explorer behind the app (`modeling_csp.app`), the `/next_tokens` API and `csp next-tokens`; no Gradio here.

Nothing is kept per process: an `Explorer(Settings(...))` holds what one host has (loaded models, saved runs, user
tasks, hub lookups), and every function that needs it takes it (or a `ModelEntry` of it).

- `errors`: `UserError` and one-line messages.
- `tasks`: user tasks, named by their content (`UserTasks`).
- `runs`: runs (`Run`) and the store of runs saved in the app (`RunStore`).
- `models`: which spec names which model (allowed roots, timed and cached hub lookups) and `ModelEntry`, a loaded
  model with its runs and caches; `import_run_file`.
- `explorer`: `Settings` and `Explorer` (`get_model`).
- `sessions`: a browser session (`Session`) and the runs it is offered.
- `analysis`: what is computed about a circuit, as typed results (losses through `modeling_csp.circuits.evaluation`,
  the routine `csp evaluate` uses), cached per model (caches bounded in bytes); a live prune runs in a worker
  process that sends back only the circuit, so the server's memory stays flat.
- `node_walk`: what the node panel's "What it does" shows (`circuits.logit_effects.describe_node`, cached per node).
- `view`: the browser's view model, `resolve_view(explorer, session, Request) -> View`.
- `panels`: the app's other panels as plain results.
- `lab`: the prompt lab's attention grid and activation patching, as computations and panels.

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
from .errors import UserError, first_line
from .explorer import Explorer, Settings
from .models import HubLookup, ModelEntry, default_roots, import_run_file
from .runs import Run, RunStore
from .sessions import Session, choose_run, find_run, runs_for_task, session_runs
from .tasks import UserTasks
from .view import Request, View, resolve_view, search_nodes

__all__ = [
    "TOP_N", "AblationRow", "CircuitStats", "FaithCurve", "HeadAttention", "NodeExamples", "PromptResult",
    "PruneOutcome", "PruneTarget", "TaskActivations", "ablation_effects", "best_layer", "best_node", "candidate_id",
    "circuit_at_k", "circuit_stats", "clamp", "clean_prompt", "embedding_channel", "encode_prompt",
    "faithfulness_curve", "full_loss", "head_attention", "live_importances", "max_k", "next_tokens",
    "node_examples", "predict", "prune_circuit", "prune_target", "task_activations", "task_names", "top_tokens",
    "warm_up", "UserError", "first_line", "Explorer", "Settings", "HubLookup", "ModelEntry", "default_roots",
    "import_run_file", "Run", "RunStore", "Session", "choose_run", "find_run", "runs_for_task", "session_runs",
    "UserTasks", "Request", "View", "resolve_view", "search_nodes",
]
