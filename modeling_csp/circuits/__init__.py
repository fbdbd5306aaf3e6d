"""The circuit library, in layers (each module imports only those below it; pyproject.toml's import-linter
contract keeps it so):

- `pruning`: finding circuits (`PruneConfig`, `prune`); `viz_import`: the original release's viz_data;
  `patching`: activation patching of circuit nodes (`node_effects`, `logit_difference`); `transfer`: a circuit
  on another model of its shape (`evaluate_transfer`, `circuit_through_snapshots`);
  `logit_effects`: what a node does (direct logit effects, driving tokens, `describe_node`);
- `walking`: paths into and out of a node, and its inputs by weight x mean activation (`why_node`);
- `evaluation`: task metrics, running a task with nodes ablated, faithfulness, node effects, `EvalOptions` and
  the verdict;
- `ablation`: ablation contexts and mean activations;
- `graph`: the circuit format (`CircuitGraph`); `task_generators`: the built-in tasks;
- `tasks`: task types, the task registry, datasets and task files.
"""

from . import task_generators  # noqa: F401  registers the built-in tasks with `tasks.list_tasks` / `get_task`
