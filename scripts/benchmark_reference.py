"""The port against OpenAI's own code on the same weights: forward and greedy generation; writes a section of BENCHMARKS.md.

    python scripts/benchmark_reference.py --reference PATH [--runs 5] [--shape sweep|tiny] [--out BENCHMARKS.md]

PATH is a checkout of github.com/openai/circuit_sparsity (the folder that holds `circuit_sparsity/inference/gpt.py`);
its code is imported from there, never copied into this project. One set of random weight-sparse weights is written in
the original format (`beeg_config.json` + `final_model.pt`) to a temp folder; the reference loads it with its own
`load_model`, the port through `conversion.convert_checkpoint` and `AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`. In the same process, interleaved run by run:
  - forward: a batch of token ids, no autograd (the reference's `model(idx)` against the port's `model(ids)`);
  - greedy generation after a 16-token prompt: the reference's own `GPT.generate(idx, n, top_k=1)` (its loop runs the
    whole prefix through the model at every step; top-k 1 makes its sampling greedy) against the port's `generate()`.
Logits must agree to 1e-4 and the tokens exactly, or the script says so and exits with status 1.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch
import transformers
from _report import write_section

transformers.utils.logging.disable_progress_bar()

SECTION = "reference-benchmark"
TOLERANCE = 1e-4

# The released csp_sweep models' layout at the size of scripts/benchmark.py; `tiny` is for the script's own test.
SHAPES = {
    "sweep": {"config": {"block_size": 256, "vocab_size": 2048, "n_layer": 8, "n_head": 16, "d_head": 16, "d_model": 256,
                         "d_mlp": 1024},
              "batch": 4, "seq": 256, "prompt": 16, "new_tokens": 240},
    "tiny": {"config": {"block_size": 48, "vocab_size": 256, "n_layer": 2, "n_head": 4, "d_head": 16, "d_model": 64,
                        "d_mlp": 256},
             "batch": 2, "seq": 48, "prompt": 16, "new_tokens": 32},
}
LAYOUT = {"bias": False, "ln_bias": False, "rms_norm": True, "sink": True, "afrac": 0.25,
          "afrac_loctypes": "attn_in,attn_out,mlp_in,mlp_out", "tied_unembed": False, "enable_bigram_table": True,
          "learnable_bigram_table": True, "activation_type": "gelu", "residual_activation_type": "identity", "dropout": 0.0}


class ReferenceNotFound(Exception):
    """PATH does not hold OpenAI's code, or it cannot be imported from there."""


def import_reference(path: Path) -> tuple[types.ModuleType, list[str]]:
    """OpenAI's `circuit_sparsity.inference.gpt` imported from `path`, and what had to be shimmed to import it on CPU."""
    if not (path / "circuit_sparsity" / "inference" / "gpt.py").is_file():
        raise ReferenceNotFound(f"{path} does not hold OpenAI's circuit_sparsity (no circuit_sparsity/inference/gpt.py); "
                                "pass --reference the root of a checkout of github.com/openai/circuit_sparsity")
    shims = []
    try:
        import blobfile
    except ImportError:
        # `load_model` only calls `bf.join` on local paths; the package itself reads cloud storage, unused here.
        blobfile = types.ModuleType("blobfile")
        blobfile.join = os.path.join
        sys.modules["blobfile"] = blobfile
        shims.append("`blobfile` (not installed) is a stand-in module whose `join` is `os.path.join`, the only call "
                     "`load_model` makes on a local folder")
    sys.path.insert(0, str(path))
    try:
        from circuit_sparsity.inference import gpt
    except ImportError as exc:
        raise ReferenceNotFound(f"cannot import circuit_sparsity.inference.gpt from {path}: {exc}") from None
    if not Path(gpt.__file__).resolve().is_relative_to(path.resolve()):
        raise ReferenceNotFound(f"circuit_sparsity was imported from {gpt.__file__}, not from {path}: uninstall that "
                                "copy or pass its folder")
    return gpt, shims


def reference_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    except OSError:
        return "unknown (git not found)"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def write_original_checkpoint(folder: Path, config: dict, density: float, seed: int = 0) -> None:
    """Random weights in the original format: every matrix keeps its top `density` fraction by magnitude (as the
    training projection does), vectors are perturbed so that norms, sink and biases matter."""
    from modeling_csp.model.configuration_csp import CSPConfig
    from modeling_csp.model.modeling_csp import expected_shapes

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(CSPConfig.from_original_config(dict(config))).items():
        if len(shape) == 2:
            weight = 0.02 * torch.randn(shape, generator=generator) if "bigram" not in name else torch.randn(shape, generator=generator)
            k = max(1, int(density * weight.numel()))
            keep = weight.abs().flatten().topk(k).indices
            sparse = torch.zeros(weight.numel())
            sparse[keep] = weight.flatten()[keep]
            state[name] = sparse.view(shape)
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[name] = 0.5 * torch.randn(shape, generator=generator)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "beeg_config.json").write_text(json.dumps(config, allow_nan=False))
    torch.save(state, folder / "final_model.pt")


def load_reference(gpt: types.ModuleType, folder: Path):
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # `load_model` reads through tiktoken's cache, which would keep a copy
    with contextlib.redirect_stdout(io.StringIO()):  # its constructor prints the parameter count
        return gpt.load_model(str(folder), flash=True, grad_checkpointing=False, cuda=False)  # a sink needs flash=True


def load_port(folder: Path, converted: Path):
    from transformers import AutoModelForCausalLM

    from conversion.convert_checkpoint import convert_checkpoint

    convert_checkpoint(str(folder), converted)
    return AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True).eval()


def interleaved(variants: dict, runs: int) -> dict[str, list[float]]:
    """Seconds per run of each variant, alternating within each run so that load from other processes falls on all."""
    times = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg()[0]}


def measure(reference_path: Path, shape: str, runs: int, density: float, seed: int = 0) -> dict:
    gpt, shims = import_reference(reference_path)
    started_on = machine()
    spec = SHAPES[shape]
    config = {**spec["config"], **LAYOUT}
    with tempfile.TemporaryDirectory(prefix="csp-reference-bench-") as tmp:
        original = Path(tmp) / "original"
        write_original_checkpoint(original, config, density, seed)
        reference = load_reference(gpt, original)
        port = load_port(original, Path(tmp) / "converted")
    ids = torch.randint(0, config["vocab_size"], (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(seed + 1))
    prompt = torch.randint(0, config["vocab_size"], (1, spec["prompt"]), generator=torch.Generator().manual_seed(seed + 2))
    new = spec["new_tokens"]

    def forward_reference():
        return reference(ids)[0]

    def forward_port():
        return port(ids, use_cache=False).logits

    def generate_reference():
        return reference.generate(prompt, new, top_k=1)

    def generate_port():
        return port.generate(prompt, max_new_tokens=new, do_sample=False)

    with torch.no_grad():
        logit_diff = (forward_port() - forward_reference()).abs().max().item()
        reference_tokens, port_tokens = generate_reference(), generate_port()  # also the warm-up
        forward = interleaved({"reference": forward_reference, "port": forward_port}, runs)
        generation = interleaved({"reference": generate_reference, "port": generate_port}, runs)
    return {
        "machine": started_on, "shape": shape, "config": config, "density": density, "runs": runs, "spec": spec,
        "shims": shims, "reference_commit": reference_commit(reference_path), "logit_diff": logit_diff,
        "same_tokens": bool(torch.equal(reference_tokens, port_tokens)), "forward": forward, "generation": generation,
    }


def report(result: dict) -> str:
    m, spec, config = result["machine"], result["spec"], result["config"]
    fwd, gen = result["forward"], result["generation"]
    forward_ratio = statistics.median(p / r for p, r in zip(fwd["port"], fwd["reference"]))
    speedup = statistics.median(r / p for p, r in zip(gen["port"], gen["reference"]))
    n_fwd, new = spec["batch"] * spec["seq"], spec["new_tokens"]
    shims = result["shims"] or ["none"]
    lines = [
        "## The port against OpenAI's own code",
        "",
        (f"`python scripts/benchmark_reference.py --reference PATH --runs {result['runs']} --shape {result['shape']}`: "
        f"OpenAI's `circuit_sparsity` (commit {result['reference_commit']}) imported from PATH, its own `load_model` "
        "and `GPT.generate`, against this port loaded through `conversion` and `AutoModelForCausalLM.from_pretrained"
        "(..., trust_remote_code=True)`, on one set of random weights written in the original format: "
        f"{config['n_layer']} layers, d_model {config['d_model']}, {config['n_head']} heads x d_head {config['d_head']}, "
        f"d_mlp {config['d_mlp']}, vocab {config['vocab_size']}, RMSNorm, sink, AbsTopK {config['afrac']}, bigram table, "
        f"{100 * result['density']:g}% dense weights."),
        "",
        (f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, transformers "
        f"{m['transformers']}, Python {m['python']}, {m['date']}, 1-minute load average {m['load']:.1f} at the start."),
        f"Shimmed in the reference to run here: {'; '.join(shims)}.",
        "",
        (f"Medians of {result['runs']} runs, the two sides interleaved run by run; the ratio is the median over runs of "
        "the ratio within a run, which cancels most of the load other processes put on a shared machine."),
        "",
        f"| forward, batch {spec['batch']} x {spec['seq']}, no autograd | median s | tokens/s | time vs reference |",
        "|---|---|---|---|",
        (f"| OpenAI's `GPT.forward` | {statistics.median(fwd['reference']):.4f} | "
        f"{n_fwd / statistics.median(fwd['reference']):,.0f} | 1.00x |"),
        (f"| port `model(ids)` | {statistics.median(fwd['port']):.4f} | {n_fwd / statistics.median(fwd['port']):,.0f} | "
        f"{forward_ratio:.2f}x |"),
        "",
        f"Max abs logit difference {result['logit_diff']:.1e} (tolerance {TOLERANCE:g}).",
        "",
        f"| greedy generation, {new} tokens after a {spec['prompt']}-token prompt | median s | tokens/s | speed vs reference |",
        "|---|---|---|---|",
        (f"| OpenAI's `GPT.generate(idx, {new}, top_k=1)` (whole prefix each step) | {statistics.median(gen['reference']):.3f} | "
        f"{new / statistics.median(gen['reference']):,.1f} | 1.0x |"),
        (f"| port `generate(ids, max_new_tokens={new}, do_sample=False)` | {statistics.median(gen['port']):.3f} | "
        f"{new / statistics.median(gen['port']):,.1f} | {speedup:.1f}x |"),
        "",
        f"Same tokens: {'yes' if result['same_tokens'] else '**NO**'}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=Path, help="root of a checkout of openai/circuit_sparsity")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="sweep")
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.runs < 1 or not 0 < args.density <= 1:
        parser.error("--runs must be at least 1 and --density in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = measure(args.reference, args.shape, args.runs, args.density)
    except ReferenceNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = report(result)
    print(text)
    write_section(args.out, SECTION, text)
    if result["logit_diff"] > TOLERANCE or not result["same_tokens"]:
        print(f"error: the port disagrees with the reference (max abs logit difference {result['logit_diff']:.1e}, "
              f"same tokens: {result['same_tokens']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
