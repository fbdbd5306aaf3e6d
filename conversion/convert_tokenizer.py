"""Convert the circuit_sparsity `tinypython_2k` data gym tokenizer to a Hugging Face tokenizer folder.

    python -m conversion.convert_tokenizer TOK_DIR DST [--model-max-length N]

TOK_DIR holds `encoder.json` + `vocab.bpe`. The result is checked against tiktoken before returning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modeling_csp.model.tokenization import (
    TINYPYTHON_PAT_STR,
    build_tokenizer_json,
    load_data_gym,
    save_hf_tokenizer,
    tiktoken_encoding,
)

# a short sample touching every branch of the split pattern, to catch a broken conversion early
_PARITY_SAMPLE = "def f(x):\r\n\treturn x // 2  # héllo 日本 🎉\n\n\n    path = '/usr/lib//'\n<|endoftext|>123456 \xa0 "


def convert_tokenizer(tok_dir: str | Path, dst_dir: str | Path, model_max_length: int | None = None,
                      vocab_size: int | None = None) -> Path:
    """Write tokenizer.json + configs for the data gym tokenizer in `tok_dir` to `dst_dir`; with `vocab_size`
    (the model's), refuse a tokenizer whose ids the model has no embedding for."""
    mergeable_ranks, special_tokens = load_data_gym(tok_dir)
    n_ids = 1 + max([*mergeable_ranks.values(), *special_tokens.values()])
    if vocab_size is not None and n_ids > vocab_size:
        raise ValueError(f"{tok_dir}: the tokenizer has ids up to {n_ids - 1} but the model's vocab_size is {vocab_size}; "
                         "pass the model's own tokenizer")
    tokenizer = build_tokenizer_json(mergeable_ranks, special_tokens, TINYPYTHON_PAT_STR)
    expected = tiktoken_encoding(tok_dir).encode(_PARITY_SAMPLE, allowed_special="all")
    got = tokenizer.encode(_PARITY_SAMPLE, add_special_tokens=False).ids
    if got != expected:
        raise ValueError(f"{tok_dir}: converted tokenizer disagrees with tiktoken on the parity sample")
    return save_hf_tokenizer(tokenizer, dst_dir, model_max_length=model_max_length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.convert_tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("tok_dir", metavar="TOK_DIR", help="folder with encoder.json and vocab.bpe")
    parser.add_argument("dst", metavar="DST", help="output folder (created if missing)")
    parser.add_argument("--model-max-length", type=int, default=None, help="context length to record (block_size)")
    parser.add_argument("--vocab-size", type=int, default=None, help="the model's vocab_size: refuse a larger tokenizer")
    args = parser.parse_args(argv)
    try:
        dst = convert_tokenizer(args.tok_dir, args.dst, model_max_length=args.model_max_length, vocab_size=args.vocab_size)
    except (OSError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"wrote {dst / 'tokenizer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
