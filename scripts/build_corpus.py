#!/usr/bin/env python
"""Build the default model's training corpus (see modeling_csp/data/corpus.py): the stdlib plus pinned wheels.

    python scripts/build_corpus.py [--out work_dirs/corpus] [--tokenizer modeling_csp/default_model/tokenizer.json]

Downloads the pinned wheels from PyPI with pip (exact versions, sha256-checked), deduplicates, splits by
file and writes uint16 token arrays and meta.json; prints the per-source table of the model card.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from modeling_csp.data.corpus import PYPI_INDEX, build_corpus, sources_table  # noqa: E402
from modeling_csp.utils.jsonio import dumps_strict  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "work_dirs" / "corpus"
DEFAULT_TOKENIZER = REPO_ROOT / "modeling_csp" / "default_model" / "tokenizer.json"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="tokenizer.json to tokenize with")
    p.add_argument("--wheels", type=Path, help="where the wheels are kept (default OUT/wheels)")
    p.add_argument("--index-url", default=PYPI_INDEX)
    args = p.parse_args(argv)
    meta = build_corpus(args.out, args.tokenizer, args.wheels, index_url=args.index_url)
    print(sources_table(meta))
    print(dumps_strict({"out": str(args.out), "tokens": meta["tokens"]}))


if __name__ == "__main__":
    main()
