#!/usr/bin/env python
"""Train the project's embedded default model (thin calls of `csp train`, i.e. `modeling_csp.training`).

    python scripts/build_corpus.py                          # once: work_dirs/corpus (stdlib + pinned projects)
    python scripts/train_default_model.py                   # the shipped recipe, into modeling_csp/default_model
    python scripts/train_default_model.py --runs work_dirs/smoke --steps 300 --out work_dirs/smoke/model  # smoke run
    accelerate launch --num_processes 4 scripts/train_default_model.py ...   # data-parallel over 4 GPUs

Four stages (see modeling_csp/training/train.py): stage 1 anneals every weight matrix from dense to 15% nonzero
(geometrically over its first 60%, top-k after every AdamW step, bigram table at 5%); stage 2 starts from its
weights with a new optimizer at 25% density (lr 3e-3, 3,500 steps) and saves a model folder; stage 3 continues
that folder at 35% density (lr 2e-3, 6,000 steps) and stage 4 continues stage 3 at 45% (lr 1e-3, 8,000 steps).
Stages 3 and 4 probe the 20 tasks on their train splits at every evaluation and keep the snapshot whose tasks
reach 0.9 most often (`--select-snapshot best`); stage 4's is the shipped model. Each stage
checkpoints into its run folder under `--runs` (default work_dirs/) and a rerun resumes there; the finished
model is written to `--out` with `save_model_folder` (sparse safetensors, remote code, tokenizer, model card
with the corpus sources and licences). Options given on the command line are passed to every stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from modeling_csp.cli import main as csp_main  # noqa: E402

ARCH = ["--n-layer", "4", "--d-model", "128", "--n-head", "8", "--d-head", "16", "--d-mlp", "512",
        "--batch-size", "32", "--density", "0.15", "--bigram-density", "0.05", "--eval-every", "500",
        "--checkpoint-every", "500", "--data", str(REPO_ROOT / "work_dirs" / "corpus")]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "work_dirs", help="where the stages' run folders go")
    args, rest = parser.parse_known_args(argv)
    stage1 = ARCH + ["--run-dir", str(args.runs / "run_4l15"), "--steps", "7500", "--lr", "5e-3",
                     "--anneal-frac", "0.6", "--anneal-shape", "geometric", "--seed", "0"]
    stage2 = ARCH + ["--run-dir", str(args.runs / "run_4l15_stage2"), "--init-from", str(args.runs / "run_4l15"),
                     "--steps", "3500", "--lr", "3e-3", "--anneal-frac", "0", "--seed", "1", "--density", "0.25",
                     "--out", str(args.runs / "model_stage2")]
    stage3 = ARCH + ["--run-dir", str(args.runs / "run_4l35_stage3"), "--init-from", str(args.runs / "model_stage2"),
                     "--steps", "6000", "--lr", "2e-3", "--anneal-frac", "0", "--seed", "2", "--density", "0.35",
                     "--task-probe", "all", "--snapshots", "--select-snapshot", "best",
                     "--out", str(args.runs / "model_stage3")]
    stage4 = ARCH + ["--run-dir", str(args.runs / "run_4l45_stage4"), "--init-from", str(args.runs / "model_stage3"),
                     "--steps", "8000", "--lr", "1e-3", "--anneal-frac", "0", "--seed", "3", "--density", "0.45",
                     "--task-probe", "all", "--snapshots", "--select-snapshot", "best",
                     "--out", str(REPO_ROOT / "modeling_csp" / "default_model")]
    for stage in (stage1, stage2, stage3, stage4):
        code = csp_main(["train", *stage, *rest])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
