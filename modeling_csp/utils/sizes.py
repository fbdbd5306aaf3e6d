"""How much memory a cached value holds, estimated, so that caches are bounded in bytes rather than entries
(one circuit with 40 MB of activating examples and one float are not the same entry); and handing freed memory
back to the system after a large value goes."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from dataclasses import fields, is_dataclass
from typing import Any

NUMBER_BYTES = 32  # a Python int or float object and its slot in a list
SAMPLE = 16  # items measured of a container larger than 4 x this; the rest is taken to be like them


def approx_bytes(value: Any) -> int:
    """Bytes `value` holds: tensors and arrays by their storage (each storage once), containers, dataclasses and
    objects with a `__dict__` by what they hold. A list whose first item is a number is taken to hold numbers
    only, and a large container is measured on a sample of its items: circuits carry millions of values, and an
    estimate must cost milliseconds."""
    return _size(value, set(), set())


def _size(obj: Any, seen: set, storages: set) -> int:
    import torch

    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            return obj.element_size() * (obj._nnz() * 2 if obj.is_sparse else obj.numel())
        storage = obj.untyped_storage()
        if storage.data_ptr() in storages:
            return 0
        storages.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, torch.nn.Module):
        return sum(_size(t, seen, storages) for t in obj.state_dict(keep_vars=True).values())
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int) and hasattr(obj, "dtype"):  # numpy arrays
        return nbytes
    total = sys.getsizeof(obj)
    if isinstance(obj, (str, bytes, bytearray, int, float, bool, type(None))):
        return total
    if isinstance(obj, dict):  # keys and values apart: (key, value) tuples made here would be freed and their
        # ids reused while `seen` holds them
        return total + _sum(list(obj), seen, storages) + _sum(list(obj.values()), seen, storages)
    if isinstance(obj, (list, tuple)):
        if obj and isinstance(obj[0], (int, float)) and not isinstance(obj[0], bool):
            return total + NUMBER_BYTES * len(obj)
        items = list(obj)
    elif isinstance(obj, (set, frozenset)):
        items = list(obj)
    elif is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name, None) for f in fields(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = [vars(obj)]
    else:
        return total
    return total + _sum(items, seen, storages)


def _sum(items: list, seen: set, storages: set) -> int:
    """Bytes of the items, measured on a sample of them when there are many."""
    if len(items) > 4 * SAMPLE:
        sample = items[:: len(items) // SAMPLE][:SAMPLE]
        return sum(_size(x, seen, storages) for x in sample) * len(items) // len(sample)
    return sum(_size(x, seen, storages) for x in items)


def release_freed_memory() -> None:
    """Asks the C allocator to hand memory that Python has freed back to the system (glibc's `malloc_trim`; a
    no-op elsewhere), so that a large value gone shows in the process's resident size."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


__all__ = ["approx_bytes", "release_freed_memory", "NUMBER_BYTES"]
