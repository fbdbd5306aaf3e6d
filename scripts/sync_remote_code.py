"""Copies the model's remote code into the shipped model folder: `python scripts/sync_remote_code.py [--check]`.

`modeling_csp/model/{modeling_csp,configuration_csp}.py` are the originals; a model folder (the shipped
`modeling_csp/default_model/` included) carries copies, because a Hub user loads them with `trust_remote_code`
without this package. Edit the originals, then run this. `--check` (CI) changes nothing and exits 1 naming each
copy that differs from its original.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

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


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        write_atomic(copy, (ORIGINALS / copy.name).read_bytes())
        print(f"updated {copy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
