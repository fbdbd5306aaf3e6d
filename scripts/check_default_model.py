#!/usr/bin/env python
"""Quality check of the shipped default model (or any folder saved by train_default_model.py).

    HF_HUB_OFFLINE=1 python scripts/check_default_model.py [--folder modeling_csp/default_model]

Prints: the final losses recorded in training_curve.json, the val loss recomputed from the
folder on the held-out stdlib files, the density of every weight matrix, and the accuracy on
quote matching (close `x = 'abc def` with `'` and `y = "hello world` with `"`): the model is right
when the logit of the opening quote's token beats the other quote's token at the last position.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = REPO_ROOT / "modeling_csp" / "default_model"

WORDS = (
    "hello world value name file path data error line text item list key result number message "
    "config user default time start end open close read write input output string count index "
    "module class function method object type format return local global option field table row "
    "column header body title label status state mode level size length width height color green "
    "blue red apple house tree river cloud water fire stone light dark quick brown fox lazy dog"
).split()
NAMES = "x y s msg name text label key result value title prefix sep line word out path".split()


def quote_prompts(n: int = 200, seed: int = 0) -> list[tuple[str, str]]:
    """[(prompt, quote that closes it)] with random identifiers and words, half `'` and half `"`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = "'" if i % 2 == 0 else '"'
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        v = rng.choice(NAMES)
        template = rng.randrange(5)
        if template == 0:
            prompt = f"{v} = {q}{words}"
        elif template == 1:
            prompt = f"print({q}{words}"
        elif template == 2:
            prompt = f"def f({v}):\n    return {q}{words}"
        elif template == 3:
            prompt = f"{v}.append({q}{words}"
        else:
            prompt = f"raise ValueError({q}{words}"
        out.append((prompt, q))
    return out


def quote_accuracy(model, tokenizer, n: int = 200, seed: int = 0) -> tuple[float, int]:
    """Accuracy of logit[closing quote] > logit[other quote], over prompts where the quote is one token."""
    ids = {q: tokenizer.convert_tokens_to_ids(q) for q in ("'", '"')}
    correct = kept = 0
    for prompt, q in quote_prompts(n, seed):
        prompt_ids = tokenizer(prompt)["input_ids"]
        if tokenizer(prompt + q)["input_ids"] != prompt_ids + [ids[q]]:
            continue  # the quote is not a single token in this context
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids]), use_cache=False).logits[0, -1]
        other = "'" if q == '"' else '"'
        correct += bool(logits[ids[q]] > logits[ids[other]])
        kept += 1
    return correct / max(1, kept), kept


def weight_densities(model) -> dict[str, float]:
    return {
        name: int(p.count_nonzero()) / p.numel()
        for name, p in model.named_parameters()
        if p.ndim == 2
    }


def val_loss(model, tokenizer, val_files: list[str], max_windows: int | None, block_size: int) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping windows of the held-out stdlib files (as in training)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for name in val_files:
        path = root / name
        if path.is_file():
            try:
                ids += tokenizer(path.read_text(encoding="utf-8"), verbose=False)["input_ids"] + [eot]
            except UnicodeDecodeError:
                continue
    tokens = torch.tensor(ids)
    n = (len(tokens) - 1) // block_size
    starts = torch.arange(n) * block_size
    if max_windows is not None and max_windows < n:
        starts = starts[torch.linspace(0, n - 1, max_windows).round().long()]
    windows = torch.stack([tokens[s : s + block_size + 1] for s in starts.tolist()])
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), 64):
            w = windows[i : i + 64]
            total += float(model(w[:, :-1], targets=w[:, 1:], use_cache=False).loss) * w[:, 1:].numel()
    return total / windows[:, 1:].numel(), int(windows[:, 1:].numel())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--n-quote", type=int, default=200)
    parser.add_argument("--max-val-windows", type=int, default=None, help="default: all held-out windows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(args.folder), trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.folder))
    record = json.loads((args.folder / "training_curve.json").read_text())
    final = record["final"]
    print(f"folder: {args.folder} ({sum(f.stat().st_size for f in args.folder.iterdir() if f.is_file()) / 1e6:.2f} MB, "
          f"model.safetensors {(args.folder / 'model.safetensors').stat().st_size / 1e6:.2f} MB)")
    print(f"recorded: {final['steps']} steps, {final['tokens']:,} tokens, {final['train_seconds'] / 60:.1f} min; "
          f"final train loss {final['train_loss']:.4f}, val loss {final['val_loss']:.4f} ({final['val_tokens']:,} tokens)")

    loss, n_tokens = val_loss(model, tokenizer, record["data"]["val_files"], args.max_val_windows, model.config.block_size)
    print(f"val loss recomputed from the folder: {loss:.4f} nats/token on {n_tokens:,} held-out tokens")

    dens = weight_densities(model)
    matrices = {n: p for n, p in model.named_parameters() if p.ndim == 2 and n != "bigram_table"}
    overall = sum(int(p.count_nonzero()) for p in matrices.values()) / sum(p.numel() for p in matrices.values())
    print("weight density per matrix:")
    for name, d in dens.items():
        p = dict(model.named_parameters())[name]
        print(f"  {name:40s} {tuple(p.shape)!s:14s} {d:.4f}  ({int(p.count_nonzero()):,} nonzero)")
    print(f"  overall (excluding bigram_table): {overall:.4f}")

    acc, kept = quote_accuracy(model, tokenizer, args.n_quote)
    print(f"quote matching: accuracy {acc:.3f} on {kept} of {args.n_quote} prompts (quote a single token in context)")
    try:  # the project's task module, when present: the paper's single_double_quote task
        from modeling_csp.circuits.evaluation import last_token_logits, task_accuracy
        from modeling_csp.circuits.tasks import make_task_dataset

        data = make_task_dataset("single_double_quote", tokenizer, n=256, max_len=model.config.block_size)
        split = data.test if getattr(data, "test", None) is not None else data.train
        with torch.no_grad():
            logits = model(split.input_ids, attention_mask=getattr(split, "attention_mask", None), use_cache=False).logits
        print(f"modeling_csp.circuits.tasks single_double_quote: accuracy {float(task_accuracy(last_token_logits(logits, split), split)):.3f}")
    except Exception as e:  # noqa: BLE001 - optional extra
        print(f"(modeling_csp.circuits.tasks check skipped: {type(e).__name__}: {e})")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main()
