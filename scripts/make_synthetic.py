"""Writes a model folder of a released shape with random sparse weights, for benchmarks at released sizes.

    python scripts/make_synthetic.py SHAPE OUT [--density 0.005] [--seed 0]
    python scripts/make_synthetic.py --list

A random-weights model solves no task; it has the shapes, sparsity and file layout of a released one, so load time,
memory, forward, generation, pruning and the app can be measured at that size without the release's downloads.

Weights: in every weight matrix (and the bigram table) the `density` fraction of largest-magnitude entries of a
standard normal draw is kept, as scripts/benchmark.py's make_sparse_model and the training projection do; the kept
values are then scaled so that the matrix keeps unit gain (sum of squares per output row = 1), so activations and
logits keep a usable size through the layers at any density. Norm gains and sink logits are 1 + 0.1 N(0, 1) and
0.1 N(0, 1). Each matrix is made sparse in place, one at a time: the dense model exists once (1.9 GB for csp_yolo2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_csp import CSPConfig, CSPForCausalLM  # noqa: E402
from modeling_csp.model.saving import ModelFolderError, save_model_folder  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "modeling_csp" / "default_model"

# What every shape shares with the released csp models and the default model: RMSNorm, attention sink, learnable
# bigram table, AbsTopK keeping 25% of activations, no biases, untied unembedding, the 2048-token vocabulary.
FAMILY = dict(
    vocab_size=2048, bias=False, ln_bias=False, rms_norm=True, sink=True, afrac=0.25, tied_unembed=False,
    enable_bigram_table=True, learnable_bigram_table=True, activation_type="gelu", tokenizer_name="stdlib_py_2k",
)

SHAPES: dict[str, dict] = {
    # modeling_csp/default_model/config.json: 5.5M parameters, of which the 2048 x 2048 bigram table is 4.2M (76%).
    "default": dict(n_layer=4, d_model=128, n_head=8, d_head=16, d_mlp=512, block_size=128),
    # The default model x4 in total parameters (22.1M): width x4 (d_model 512, 8 heads x 64) and one layer more;
    # width alone cannot reach x4 because the bigram table does not grow with it.
    "default_x4": dict(n_layer=5, d_model=512, n_head=8, d_head=64, d_mlp=2048, block_size=128),
    # The default model x16 in total parameters (84.0M, x15.3): width x8 (d_model 1024, 16 heads x 64), 6 layers.
    "default_x16": dict(n_layer=6, d_model=1024, n_head=16, d_head=64, d_mlp=4096, block_size=128),
    # csp_sweep1 size: 8 layers, d_model 256, 16 heads x 16, context 256, as scripts/benchmark.py's
    # sweep_sized_config and issue 21 item 5 (the release's beeg_config.json files are not in the code repository).
    "csp_sweep1": dict(n_layer=8, d_model=256, n_head=16, d_head=16, d_mlp=1024, block_size=256),
    # csp_yolo1 as issue 21 measured it: 8 layers, d_model 1024, 16 heads x 64, d_mlp 4096, context 1024. The
    # release's README says 118M total parameters; this shape counts 110.2M (the config itself is not published in
    # github.com/openai/circuit_sparsity, only on its blob store), so the released one differs in some field.
    "csp_yolo1": dict(n_layer=8, d_model=1024, n_head=16, d_head=64, d_mlp=4096, block_size=1024),
    # csp_yolo2: the release's README says 475M total parameters and publishes no config. ASSUMED: the yolo1 family
    # (d_mlp = 4 d_model, heads of 64, context 1024) at 12 layers and d_model 1792 (28 heads), which counts 475.8M.
    "csp_yolo2": dict(n_layer=12, d_model=1792, n_head=28, d_head=64, d_mlp=7168, block_size=1024),
}


class SyntheticError(ValueError):
    """Bad input to make_synthetic, as one line naming the problem and the fix."""


def shape_config(shape: str) -> CSPConfig:
    if shape not in SHAPES:
        raise SyntheticError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)} (--list shows them)")
    return CSPConfig(**FAMILY, **SHAPES[shape])


def parameter_count(config: CSPConfig) -> int:
    """Total parameters of a model of this config, computed without building it."""
    with torch.device("meta"):
        model = CSPForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def make_synthetic_model(config: CSPConfig, density: float = 0.005, seed: int = 0) -> CSPForCausalLM:
    """A model of `config` whose weight matrices keep `density` of their entries (see the module docstring)."""
    if not 0 < density <= 1:
        raise SyntheticError(f"density {density} is outside (0, 1]; pass a fraction such as 0.005 for 0.5%")
    torch.manual_seed(seed)
    model = CSPForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if p.ndim == 2:
            p.normal_()
            k = max(1, int(density * p.numel()))
            if k < p.numel():
                magnitude = p.abs().view(-1)
                threshold = magnitude.kthvalue(p.numel() - k + 1).values
                p.mul_(magnitude.view_as(p) >= threshold)
                del magnitude
            if name != "bigram_table":  # the bigram table adds logits directly: N(0, 1) tails are logit-sized
                p.mul_(math.sqrt(p.shape[0]) / p.norm().clamp(min=1e-12))
        elif name.endswith("sink_logit"):
            p.normal_(0.0, 0.1)
        else:
            p.copy_(1 + 0.1 * torch.randn_like(p))
    model._record_densities()
    return model


def write_synthetic(shape: str, out: str | os.PathLike, density: float = 0.005, seed: int = 0) -> Path:
    """Writes the model folder to a temp folder beside OUT, then renames it into place (OUT must not exist)."""
    config = shape_config(shape)
    out = Path(out)
    if out.exists():
        raise SyntheticError(f"{out}: already exists; remove it or choose a new output folder")
    model = make_synthetic_model(config, density, seed)
    staging = out.parent / f".{out.name}.tmp{os.getpid()}"
    try:
        save_model_folder(model, staging, tokenizer_json_dir=DEFAULT_MODEL, name=f"synthetic-{shape}",
                          source=f"scripts/make_synthetic.py {shape} --density {density} --seed {seed}: random weights",
                          card_extra="Random sparse weights of a released shape, for benchmarks; it solves no task.")
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="?", help="one of: " + ", ".join(SHAPES))
    parser.add_argument("out", nargs="?", help="the model folder to write (must not exist)")
    parser.add_argument("--density", type=float, default=0.005, help="fraction of each weight matrix kept (0.005)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the shapes and their parameter counts")
    args = parser.parse_args(argv)
    if args.list:
        for shape in SHAPES:
            print(f"{shape:12s} {parameter_count(shape_config(shape)) / 1e6:7.1f}M  {json.dumps(SHAPES[shape])}")
        return 0
    if args.shape is None or args.out is None:
        parser.error("give SHAPE and OUT (or --list)")
    try:
        start = time.perf_counter()
        out = write_synthetic(args.shape, args.out, args.density, args.seed)
    except (SyntheticError, ModelFolderError, OSError) as e:
        print(f"make_synthetic: {e}", file=sys.stderr)
        return 2
    n_params = parameter_count(shape_config(args.shape))
    print(f"{out}: {args.shape}, {n_params / 1e6:.1f}M parameters at {100 * args.density:g}% density, "
          f"{folder_size(out) / 1e6:.1f} MB on disk, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
