"""How much memory a cached value holds, estimated, so that caches are bounded in bytes rather than entries
(one circuit of 40 MB of activating examples and one float are not the same entry)."""

from __future__ import annotations

import sys
from dataclasses import fields, is_dataclass
from typing import Any

NUMBER_BYTES = 32  # a Python int or float object and its slot in a list


def approx_bytes(value: Any) -> int:
    """Bytes `value` holds: tensors and arrays by their storage (each storage once), containers, dataclasses and
    objects with a `__dict__` by what they hold. A list whose first item is a number is taken to hold numbers
    only (counted without visiting each one: circuits carry millions of them)."""
    import torch

    total, seen, storages = 0, set(), set()
    stack = [value]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided:
                total += obj.element_size() * obj._nnz() * 2 if obj.is_sparse else obj.element_size() * obj.numel()
                continue
            storage = obj.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
            continue
        if isinstance(obj, torch.nn.Module):
            stack.extend(obj.state_dict(keep_vars=True).values())
            continue
        nbytes = getattr(obj, "nbytes", None)
        if isinstance(nbytes, int) and hasattr(obj, "dtype"):  # numpy arrays
            total += nbytes
            continue
        total += sys.getsizeof(obj)
        if isinstance(obj, (str, bytes, bytearray, int, float, bool, type(None))):
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            if obj and isinstance(obj[0], (int, float)) and not isinstance(obj[0], bool):
                total += NUMBER_BYTES * len(obj)
            else:
                stack.extend(obj)
        elif isinstance(obj, (set, frozenset)):
            stack.extend(obj)
        elif is_dataclass(obj) and not isinstance(obj, type):
            stack.extend(getattr(obj, f.name, None) for f in fields(obj))
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return total


__all__ = ["approx_bytes", "NUMBER_BYTES"]
