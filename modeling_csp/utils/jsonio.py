"""Strict JSON out: every JSON file and line this toolkit writes goes through here.

Strict means what any JSON parser accepts: no bare `NaN` or `Infinity` (`json.dumps` writes them by default,
and browsers, `jq` and other languages refuse the file). A float that is not finite is a value that was not
computed (a test split with no examples, a loss that overflowed), so it is written as `null`, which every
format doc of this project reads as "unknown".

Atomic files: every file this toolkit writes (JSON, text, checkpoints, safetensors, arrays) goes to a temporary
file in the same folder (`.NAME.tmpPID-XXXXXXXX`; `utils.tempfiles` removes those a killed writer left) and is
then renamed over the target, so a reader never sees half a file and a kill leaves the old one intact. The temporary file gets the mode `open()` would have
given the target (0o666 less the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


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


def process_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which races with
    other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the umask."""
    return 0o666 & ~process_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` for writers that want a file name (safetensors, tokenizers): renamed over
    `path`, with the umask's mode, when the block ends without an error, removed otherwise."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:120]}.tmp{os.getpid()}-", suffix="")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """`open(path, mode)` for writing (torch.save, np.save, downloads), through `atomic_path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding or ("utf-8" if mode == "w" else None)) as f:
        yield f


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` through a temporary file in the same folder."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` through a temporary file in the same folder."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """`shutil.copy` through a temporary file (a `copy_function` for shutil.copytree); the umask's mode."""
    dst = Path(dst)
    if dst.is_dir():
        dst = dst / Path(src).name
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def write_json_atomic(path: str | Path, obj: Any, trailing_newline: bool = True, **kwargs) -> Path:
    """Strict JSON (`dumps_strict`, with `kwargs` such as indent) written atomically to `path`."""
    return write_text_atomic(path, dumps_strict(obj, **kwargs) + ("\n" if trailing_newline else ""))


def loads_strict(text: str) -> Any:
    """`json.loads` that refuses NaN and Infinity, as strict parsers elsewhere do (tests use it on our files)."""
    def refuse(name):
        raise ValueError(f"not strict JSON: bare {name}")

    return json.loads(text, parse_constant=refuse)


__all__ = ["finite_or_none", "dumps_strict", "write_text_atomic", "write_json_atomic", "loads_strict", "atomic_path",
           "atomic_open", "write_bytes_atomic", "copy_file_atomic", "new_file_mode", "process_umask"]
