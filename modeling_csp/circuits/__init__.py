"""The circuit library: tasks (`tasks`), the circuit format (`graph`: `CircuitGraph`), ablation (`ablation`),
evaluation (`evaluation`), pruning (`pruning`) and the original release's viz_data (`viz_import`)."""
