"""Copies the model's remote code into the shipped model folder: `python scripts/sync_remote_code.py [--check]`.

`modeling_csp/model/{modeling_csp,configuration_csp}.py` are the originals; a model folder (the shipped
`modeling_csp/default_model/` included) carries copies, because a Hub user loads them with `trust_remote_code`
without this package. Edit the originals, then run this. `--check` (CI) changes nothing and exits 1 naming each
copy that differs from its original.
"""

import argparse
import sys
from pathlib import Path

from modeling_csp.utils.jsonio import write_text_atomic  # the project's atomic write (the package is installed)

PACKAGE = Path(__file__).resolve().parent.parent / "modeling_csp"
ORIGINALS = PACKAGE / "model"
COPIES = PACKAGE / "default_model"
REMOTE_CODE = ("modeling_csp.py", "configuration_csp.py")


def stale_copies() -> list[Path]:
    """The copies whose bytes differ from their originals (absent copies included)."""
    stale = []
    for name in REMOTE_CODE:
        copy = COPIES / name
        if not copy.is_file() or copy.read_bytes() != (ORIGINALS / name).read_bytes():
            stale.append(copy)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a copy is stale")
    args = parser.parse_args(argv)
    stale = stale_copies()
    if args.check:
        for copy in stale:
            original = ORIGINALS / copy.name
            print(f"error: {copy} differs from {original}; run python scripts/sync_remote_code.py", file=sys.stderr)
        return 1 if stale else 0
    for copy in stale:
        write_text_atomic(copy, (ORIGINALS / copy.name).read_text(encoding="utf-8"))
        print(f"updated {copy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
