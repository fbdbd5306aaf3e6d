"""Strict JSON out: every JSON file and line this toolkit writes goes through here.

Strict means what any JSON parser accepts: no bare `NaN` or `Infinity` (`json.dumps` writes them by default,
and browsers, `jq` and other languages refuse the file). A float that is not finite is a value that was not
computed (a test split with no examples, a loss that overflowed), so it is written as `null`, which every
format doc of this project reads as "unknown". Files are written to a temporary file in the same folder and
then renamed over the target, so a reader never sees half a file and a crash leaves the old one intact.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """`obj` with every non-finite float (also in nested dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kwargs) -> str:
    """`json.dumps` that writes non-finite floats as null and can never emit NaN/Infinity."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)  # the common case, at C speed
    except ValueError:
        return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes `text` (UTF-8) to a temporary file next to `path`, then renames it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, obj: Any, trailing_newline: bool = True, **kwargs) -> Path:
    """Strict JSON (`dumps_strict`, with `kwargs` such as indent) written atomically to `path`."""
    return write_text_atomic(path, dumps_strict(obj, **kwargs) + ("\n" if trailing_newline else ""))


def loads_strict(text: str) -> Any:
    """`json.loads` that refuses NaN and Infinity, as strict parsers elsewhere do (tests use it on our files)."""
    def refuse(name):
        raise ValueError(f"not strict JSON: bare {name}")

    return json.loads(text, parse_constant=refuse)


__all__ = ["finite_or_none", "dumps_strict", "write_text_atomic", "write_json_atomic", "loads_strict"]
