#!/usr/bin/env python
"""Writes the README's report on the shipped default model: pretraining loss, every task's full-model
accuracy and loss, and the shipped circuits (sizes, circuit / random / complement losses, the k sweep).

    HF_HUB_OFFLINE=1 python scripts/report_default_model.py [--folder modeling_csp/default_model] [--readme README.md]

Full-model numbers are computed live on each task's test split (the split `csp prune` reports on);
circuit numbers are read from the circuit files in the folder's circuits/index.json, which
`csp sweep --model default --out-dir modeling_csp/default_model/circuits ...` writes.
The text goes between the README's `<!-- default-model-report:start/end -->` markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from modeling_csp.ablation import evaluate  # noqa: E402
from modeling_csp.loading import load_model_and_tokenizer  # noqa: E402
from modeling_csp.tasks import list_tasks, make_task_dataset  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from _report import write_section  # noqa: E402

SHIP_ACCURACY = 0.9


def full_model_table(model, tokenizer) -> dict[str, tuple[float, float, int]]:
    """task -> (loss, accuracy, n test examples) of the unablated model, with `csp prune`'s defaults."""
    out = {}
    for task in list_tasks():
        data = make_task_dataset(task, tokenizer, n=512, seed=0, max_len=model.config.block_size)
        loss, acc = evaluate(model, data.test)
        out[task.name] = (loss, acc, len(data.test))
    return out


def report(folder: Path) -> str:
    model, tokenizer = load_model_and_tokenizer(str(folder))
    curve = json.loads((folder / "training_curve.json").read_text())
    final, args, c = curve["final"], curve["args"], model.config
    index_file = folder / "circuits" / "index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else []
    full = full_model_table(model, tokenizer)

    lines = [
        f"{c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads x d_head {c.d_head}, d_mlp {c.d_mlp}, "
        f"context {c.block_size}; {100 * final['density']:.1f}% of weight-matrix entries nonzero "
        f"(bigram table {100 * final['density_per_matrix']['bigram_table']:.1f}%), AbsTopK afrac {c.afrac}. "
        f"Trained on {final['tokens']:,} tokens of CPython's standard library in {final['train_seconds'] / 60:.0f} "
        f"minutes ({args['threads']} CPU thread): held-out loss **{final['val_loss']:.3f}** nats/token "
        f"(train {final['train_loss']:.3f}).",
        "",
        "Task losses are the mean binary cross-entropy over the two candidates, in nats, on each task's test split; "
        f"circuits are shipped for the tasks where the full model's accuracy is at least {SHIP_ACCURACY}. "
        "Circuit: everything outside it mean-ablated. Random: the mean of 5 random circuits with the same number of "
        "nodes per location. Complement: only the circuit ablated.",
        "",
        "| task | full acc | full loss | circuit k (nodes / edges) | circuit acc | circuit loss | random loss | complement loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    at_target = {e["task"]: e for e in index if e.get("at_target")}
    for name, (loss, acc, _) in sorted(full.items(), key=lambda kv: -kv[1][1]):
        e = at_target.get(name)
        if e is None:
            lines.append(f"| {name} | {acc:.2f} | {loss:.3f} | - | - | - | - | - |")
            continue
        L = e["losses"]
        flag = " (random as good)" if e["random_baseline_as_good"] else ""
        reached = "" if e["target_reached"] else " (target not reached)"
        lines.append(
            f"| {name} | {acc:.2f} | {loss:.3f} | {e['n_nodes']} / {e['n_edges']}{reached} | {e['circuit_accuracy']:.2f} | "
            f"{L['circuit']:.3f} | {L['random']:.3f}{flag} | {L['complement']:.3f} |"
        )
    ks = sorted({e["k"] for e in index if not e.get("at_target")})
    if ks:
        lines += ["", "Faithfulness curve of the shipped circuits (circuit loss at k nodes, same mask ranking):", "",
                  "| task | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        by_task: dict[str, dict[int, float]] = {}
        for e in index:
            by_task.setdefault(e["task"], {})[e["k"]] = e["losses"]["circuit"]
        for name in sorted(at_target):
            lines.append(f"| {name} | " + " | ".join(f"{by_task[name].get(k, float('nan')):.3f}" for k in ks) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=REPO_ROOT / "modeling_csp" / "default_model")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = report(args.folder)
    write_section(args.readme, "default-model-report", text)
    print(text)


if __name__ == "__main__":
    main()
