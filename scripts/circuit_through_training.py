"""The embedded model's shipped circuits at each earlier version of its weights kept in git history: each
circuit's held-out loss (with that snapshot's own mean activations) and the full model's, written to
modeling_csp/default_model/circuit_through_training.json for the app's Curves tab.

The training snapshots themselves were not kept, but every stage's final weights were committed; versions of
another shape (the 2-layer models before stage 3) or another tokenizer are skipped and listed with the reason.

    python scripts/circuit_through_training.py [--out FILE]

With your own training run (`csp train --snapshots`), the same curve is
`circuit_through_snapshots(circuits, [(f"step {n}", f"RUN/snapshots/step_{n}.safetensors"), ...], tokenizer)`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from modeling_csp import CSPForCausalLM  # noqa: E402
from modeling_csp.circuits.graph import ARCH_FIELDS, CircuitGraph  # noqa: E402
from modeling_csp.circuits.transfer import circuit_through_snapshots  # noqa: E402
from modeling_csp.model.loading import load_model_and_tokenizer, shipped_circuits  # noqa: E402
from modeling_csp.utils.jsonio import write_json_atomic  # noqa: E402

MODEL = "modeling_csp/default_model"
OUT = ROOT / MODEL / "circuit_through_training.json"


def git(*args: str, binary: bool = False):
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True).stdout
    return out if binary else out.decode()


def weight_versions() -> list[dict]:
    """Every commit that changed the shipped weights, oldest first: {commit, date, subject}."""
    lines = git("log", "--format=%h%x09%ad%x09%s", "--date=short", "--", f"{MODEL}/model.safetensors").splitlines()
    return [dict(zip(("commit", "date", "subject"), line.split("\t", 2))) for line in reversed(lines)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer("default")
    today = json.loads((ROOT / MODEL / "config.json").read_text())
    tokenizer_blob = git("hash-object", f"{MODEL}/tokenizer.json").strip()
    entries = shipped_circuits("default")
    circuits = [CircuitGraph.load(e["path"]) for e in entries]

    snapshots, info, skipped = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for version in weight_versions():
            commit = version["commit"]
            config = json.loads(git("show", f"{commit}:{MODEL}/config.json"))
            shape = {f: config.get(f) for f in ARCH_FIELDS if f in today}
            if shape != {f: today.get(f) for f in shape}:
                skipped.append({**version, "why": f"another shape: {shape}"})
                continue
            if git("rev-parse", f"{commit}:{MODEL}/tokenizer.json").strip() != tokenizer_blob:
                skipped.append({**version, "why": "another tokenizer"})
                continue
            folder = Path(tmp) / commit
            folder.mkdir()
            for name in ("config.json", "model.safetensors"):
                (folder / name).write_bytes(git("show", f"{commit}:{MODEL}/{name}", binary=True))
            record = json.loads(git("show", f"{commit}:{MODEL}/training_curve.json"))
            final = record.get("final") or {}
            tokens = final.get("total_tokens") or final.get("tokens")
            label = f"{commit} ({tokens / 1e6:.0f}M tokens)" if tokens else commit
            snapshots.append((label, folder))
            info.append({**version, "label": label, "total_tokens": tokens, "val_loss": final.get("val_loss"),
                         "density": (record.get("config") or {}).get("density"),
                         "weights_bytes": (folder / "model.safetensors").stat().st_size})
            print(f"{label}: {version['subject'][:80]}", file=sys.stderr)

        def load(folder):  # weights and config only: the tokenizer is today's (checked above)
            return CSPForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

        curve = circuit_through_snapshots(circuits, snapshots, tokenizer, loader=load,
                                          progress=lambda label: print(f"evaluating at {label}", file=sys.stderr))
    for name, entry in zip(curve["circuits"], entries):
        curve["circuits"][name].update(path=Path(entry["path"]).name, at_target=entry.get("at_target"))
    write_json_atomic(args.out, {
        "description": "Held-out task loss of each shipped circuit (pruned on the final weights) at each earlier "
                       "version of the weights in git history, with that version's own mean activations; 'full' is "
                       "the full model's loss on the same examples. Regenerate: python scripts/circuit_through_training.py",
        "model_weights_hash": circuits[0].model.get("weights_hash") if circuits else None,
        **curve, "snapshot_info": info, "skipped": skipped,
    }, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
