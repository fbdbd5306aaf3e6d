"""The circuit library, in layers (each module imports only those below it; pyproject.toml's import-linter
contract keeps it so):

- `pruning`: finding circuits (`PruneConfig`, `prune`); `viz_import`: the original release's viz_data;
  `patching`: activation patching of circuit nodes (`node_effects`, `logit_difference`);
- `evaluation`: task metrics, running a task with nodes ablated, faithfulness, node effects, `EvalOptions` and
  the verdict;
- `ablation`: ablation contexts and mean activations;
- `graph`: the circuit format (`CircuitGraph`); `task_generators`: the built-in tasks;
- `tasks`: task types, the task registry, datasets and task files.
"""

from . import task_generators  # noqa: F401  registers the built-in tasks with `tasks.list_tasks` / `get_task`
