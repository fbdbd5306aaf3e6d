"""Max |logit difference| between the sparse kernels and dense matmuls after each way of changing a weight.

    PYTHONPATH=CHECKOUT python scripts/weight_change_routes.py [--density 0.06]

The routes are those `tests/model/test_weight_changes.py` checks, on a fresh copy of the same random weight-sparse
model each: one sparse forward pass (so a kernel that keeps state has it), the change, then a no-grad forward
pass (sparse kernels) against one under autograd (dense matmuls). A difference above 1e-5 means the sparse
kernels served weights the model no longer has. `modeling_csp` comes from PYTHONPATH, so the same script
measures any checkout's code (BENCHMARKS.md has the figures before the fix). A route that asserts on its way
(checks of the fixed code) is reported as failing there.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))
from test_weight_changes import ROUTES, make_sparse_model, sparse_and_dense_logits  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.06)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = make_sparse_model(args.density)
    print(f"{'route':<40} max |sparse - dense| logit")
    for name, (change, _) in ROUTES.items():
        model = copy.deepcopy(base)
        sparse_and_dense_logits(model)  # the sparse kernels see the weights once before the change
        try:
            sparse, dense = sparse_and_dense_logits(change(model))
            print(f"{name:<40} {float((sparse - dense).abs().max()):.3g}")
        except AssertionError as exc:
            print(f"{name:<40} failed: {exc}")


if __name__ == "__main__":
    main()
