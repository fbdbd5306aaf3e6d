#!/usr/bin/env python
"""Train the default model's tokenizer: a 2,048-token byte-level BPE on CPython's standard library.

    python scripts/train_default_tokenizer.py [--out work_dirs/default_tokenizer]

The corpus is every `*.py` file under `sysconfig.get_paths()["stdlib"]` of the running Python,
minus test directories and site-packages (see `modeling_csp.data.corpus.stdlib_files`), read in sorted path order. The
tokenizer follows the `tinypython_2k` layout of Gao et al. (2025):

- the same split regex (`TINYPYTHON_PAT_STR`), applied before a regex-free ByteLevel map;
- ids 0..255 are the 256 single bytes, id == byte value;
- ids 256..2046 are the learned merges, in the order they were learned;
- id 2047 is `<|endoftext|>`, used to separate documents.

`encode` never adds special tokens (no bos/eos), like the reference's tiktoken encodings.
The script checks that encode -> decode gives back every stdlib file exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from modeling_csp.data.corpus import stdlib_documents, stdlib_root  # noqa: E402
from modeling_csp.model.tokenization import ENDOFTEXT, TINYPYTHON_PAT_STR, save_hf_tokenizer  # noqa: E402

VOCAB_SIZE = 2048  # 256 bytes + 1791 merges + <|endoftext|>
DEFAULT_OUT = REPO_ROOT / "work_dirs" / "default_tokenizer"


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by the ByteLevel pre-tokenizer."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def make_pre_tokenizer():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TINYPYTHON_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Learn the merges with `tokenizers`' BpeTrainer, then renumber so that id == byte value below 256."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = make_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 1,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    trained = json.loads(tokenizer.to_str())["model"]
    vocab, merges = trained["vocab"], [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    if len(vocab) != VOCAB_SIZE - 1:
        raise RuntimeError(f"BPE training gave {len(vocab)} tokens, expected {VOCAB_SIZE - 1} (corpus too small?)")

    # Renumber: bytes first in byte order, then merged tokens in merge order (the trainer sorts its
    # initial alphabet by code point, which is not byte order). Merge priority is the order of the
    # `merges` list, so renumbering changes no encoding, only the ids.
    alphabet = byte_level_alphabet()
    new_vocab = {alphabet[b]: b for b in range(256)}
    for a, b in merges:
        new_vocab.setdefault(a + b, len(new_vocab))
    if set(new_vocab) != set(vocab):
        raise RuntimeError("renumbered vocabulary differs from the trained one")

    final = Tokenizer(models.BPE(new_vocab, merges, fuse_unk=False, byte_fallback=False))
    final.normalizer = None
    final.pre_tokenizer = make_pre_tokenizer()
    final.decoder = decoders.ByteLevel()
    final.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    if final.token_to_id(ENDOFTEXT) != VOCAB_SIZE - 1 or final.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"{ENDOFTEXT} got id {final.token_to_id(ENDOFTEXT)}, expected {VOCAB_SIZE - 1}")
    return final


def check_round_trip(tokenizer: Tokenizer, docs: list[tuple[str, str]]) -> None:
    """encode -> decode must give back every document exactly; special text must stay plain text."""
    texts = [t for _, t in docs]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    decoded = tokenizer.decode_batch(ids, skip_special_tokens=False)
    bad = [name for (name, text), out in zip(docs, decoded) if out != text]
    if bad:
        raise RuntimeError(f"round trip failed for {len(bad)} file(s), e.g. {bad[:3]}")
    n_tokens = sum(len(i) for i in ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"round trip ok on {len(texts)} files: {n_tokens:,} tokens, {n_bytes / n_tokens:.2f} bytes/token")


def check_with_transformers(out: Path, sample: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok(sample)["input_ids"]
    assert tok.decode(ids) == sample, "AutoTokenizer round trip failed"
    assert tok.eos_token_id == VOCAB_SIZE - 1 and tok.pad_token_id == VOCAB_SIZE - 1
    assert tok(ENDOFTEXT)["input_ids"] == [VOCAB_SIZE - 1]
    assert len(tok) == VOCAB_SIZE
    print(f"AutoTokenizer.from_pretrained({out}) ok: {type(tok).__name__}, {len(tok)} tokens")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--model-max-length", type=int, default=128)
    args = parser.parse_args(argv)

    t0 = time.time()
    root = stdlib_root()
    docs = stdlib_documents(root)
    print(f"Python {sys.version.split()[0]}, stdlib {root}: {len(docs)} files, "
          f"{sum(len(t) for _, t in docs) / 1e6:.1f}M characters")
    tokenizer = train_tokenizer([t for _, t in docs])
    save_hf_tokenizer(tokenizer, args.out, args.model_max_length)
    digest = hashlib.sha256((args.out / "tokenizer.json").read_bytes()).hexdigest()[:16]
    print(f"saved {args.out} (tokenizer.json sha256 {digest}) in {time.time() - t0:.1f}s")
    check_round_trip(tokenizer, docs)
    check_with_transformers(args.out, docs[0][1][:300])
    print("first merges:", [tokenizer.decode([i]) for i in range(256, 266)])


if __name__ == "__main__":
    main()
