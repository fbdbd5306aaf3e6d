#!/usr/bin/env python
"""Train the project's embedded default model (a thin call of `modeling_csp.training`).

    python scripts/build_corpus.py                          # once: work_dirs/corpus (stdlib + pinned projects)
    python scripts/train_default_model.py                   # the shipped recipe, into modeling_csp/default_model
    python scripts/train_default_model.py --steps 300 --out work_dirs/smoke      # quick smoke run
    accelerate launch --num_processes 4 scripts/train_default_model.py ...   # data-parallel over 4 GPUs

The recipe (defaults below; see modeling_csp/training.py): top-k weights after every AdamW step with the kept
fraction annealed geometrically to `--density`, a learnable bigram table at `--bigram-density`, warmup and
cosine decay. The run checkpoints into `--run-dir` and resumes from there when restarted; the finished model
is written to `--out` with `save_model_folder` (sparse safetensors, remote code, tokenizer, model card).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from modeling_csp.cli import main as csp_main  # noqa: E402

# The shipped model's recipe; any `csp train` option given on the command line overrides these.
DEFAULTS = [
    "--data", str(REPO_ROOT / "work_dirs" / "corpus"),
    "--run-dir", str(REPO_ROOT / "work_dirs" / "default_model_run"),
    "--out", str(REPO_ROOT / "modeling_csp" / "default_model"),
    "--n-layer", "4", "--d-model", "128", "--n-head", "8", "--d-head", "16", "--d-mlp", "512",
    "--steps", "7500", "--batch-size", "32", "--lr", "5e-3", "--density", "0.15", "--bigram-density", "0.05",
    "--anneal-frac", "0.6", "--anneal-shape", "geometric", "--eval-every", "500", "--checkpoint-every", "500",
]

if __name__ == "__main__":
    sys.exit(csp_main(["train", *DEFAULTS, *sys.argv[1:]]))
