"""`modeling_csp.utils.sizes.approx_bytes`: what caches count against their byte budgets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modeling_csp.utils.sizes import NUMBER_BYTES, approx_bytes


@dataclass
class Holder:
    scores: dict
    note: str


def test_tensors_count_their_storage_once():
    t = torch.zeros(1000, 250)  # 1 MB
    assert approx_bytes(t) == 1_000_000
    assert 1_000_000 <= approx_bytes({"a": t, "b": t[:10], "c": [t]}) < 1_010_000  # views share the storage


def test_nested_values_and_number_lists():
    numbers = [0.5] * 100_000
    assert approx_bytes(numbers) >= NUMBER_BYTES * 100_000
    held = Holder({"x": torch.zeros(10_000), "examples": [{"tokens": list(range(50))} for _ in range(100)]}, "n")
    assert approx_bytes(held) > 40_000 + 100 * 50 * NUMBER_BYTES
    assert approx_bytes(torch.nn.Linear(100, 100)) == (100 * 100 + 100) * 4
