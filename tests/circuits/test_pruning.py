"""Mask training (surrogate gradients, determinism), top-k bisection, and a real prune."""

import re
from pathlib import Path

import pytest
import torch

from modeling_csp.circuits.ablation import ablate, compute_mean_activations, task_logits
from modeling_csp.circuits.evaluation import evaluate, task_loss
from modeling_csp.circuits.graph import CircuitGraph
from modeling_csp.circuits.pruning import (
    NodeMasks, PruneConfig, heaviside_ste, prune_to_target_loss, sweep_k, top_k_masks, train_masks,
)
from conftest import synthetic_batch

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "modeling_csp" / "default_model"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def means(rms_model):
    tokens = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    return compute_mean_activations(rms_model, [tokens], cache_dir=False)


@pytest.fixture(scope="module")
def batch(rms_model):
    return synthetic_batch(rms_model, n=48, T=12)


def test_heaviside_surrogate():
    tau = torch.tensor([-0.5, -0.01, 0.0, 0.01, 0.7], requires_grad=True)
    out = heaviside_ste(tau, temperature=0.5)
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    out.sum().backward()
    s = torch.sigmoid(tau.detach() / 0.5)
    torch.testing.assert_close(tau.grad, s * (1 - s) / 0.5)


def test_mask_gradients_through_the_model(rms_model, means, batch):
    masks = NodeMasks(rms_model.config, generator=torch.Generator().manual_seed(0))
    rms_model.requires_grad_(False)
    keep = masks()
    with ablate(rms_model, keep, means):
        loss = task_loss(task_logits(rms_model, batch), batch)
    (loss + 1e-3 * sum(m.sum() for m in keep.values())).backward()
    rms_model.requires_grad_(True)
    grads = [t.grad for t in masks.tau]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all((g != 0).any() for g in grads)  # the penalty alone makes every gradient nonzero
    assert sum(int((g.abs() > 2.5e-4).sum()) for g in grads) > 0  # and the task loss reaches the masks
    assert all(p.grad is None for p in rms_model.parameters())  # the model stays frozen


def test_training_is_deterministic_and_prunes(rms_model, means, batch):
    config = PruneConfig(steps=12, batch_size=16, lr=0.1, progress=False)
    a, curve = train_masks(rms_model, batch, means, config)
    b, _ = train_masks(rms_model, batch, means, config)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, _ = train_masks(rms_model, batch, means, PruneConfig(steps=12, batch_size=16, lr=0.1, seed=1, progress=False))
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert len(curve) == 12 and curve[0][2] == 2112 and curve[-1][2] < 2112
    assert all(t.abs().max() <= 1 for t in a.values())  # clamped to [-1, 1]


def test_training_shares_the_model_with_other_threads(rms_model, means, batch):
    """Pruning needs no private copy: it leaves the weights' flags and grads alone, and forwards in other
    threads see the unablated model while masks train (hooks are per call context)."""
    from concurrent.futures import ThreadPoolExecutor

    config = PruneConfig(steps=6, batch_size=16, lr=0.1, progress=False)
    serial_scores, _ = train_masks(rms_model, batch, means, config)
    serial_loss = evaluate(rms_model, batch)[0]
    flags = [p.requires_grad for p in rms_model.parameters()]
    with ThreadPoolExecutor(2) as pool:
        training = pool.submit(train_masks, rms_model, batch, means, config)
        losses = [pool.submit(evaluate, rms_model, batch).result()[0] for _ in range(4)]
        scores, _ = training.result()
    assert all(torch.equal(scores[k], serial_scores[k]) for k in scores)
    assert losses == [serial_loss] * 4
    assert [p.requires_grad for p in rms_model.parameters()] == flags
    assert all(p.grad is None for p in rms_model.parameters())


def test_training_options_zero_ablation_and_frozen_norms(rms_model, batch):
    config = PruneConfig(steps=3, batch_size=16, lr=0.1, ablation="zero", freeze_norm_scales=True, progress=False)
    scores, curve = train_masks(rms_model, batch, None, config)
    assert len(curve) == 3 and all(torch.isfinite(s).all() for s in scores.values())
    assert "forward" not in vars(rms_model.transformer.h[0].ln_1)
    with pytest.raises(ValueError, match="ablation must be"):
        PruneConfig(ablation="resample")


@pytest.mark.parametrize("options, message", [
    ({"target_loss": float("nan")}, "target_loss must be a finite number > 0, got nan"),
    ({"target_loss": -1.0}, "target_loss must be a finite number > 0, got -1.0"),
    ({"target_loss": 0}, "target_loss must be a finite number > 0"),
    ({"target_above_full": float("nan")}, "target_above_full must be a finite number >= 0, got nan"),
    ({"k": 0}, "k must be an integer >= 1, got 0"),
    ({"k": 2.5}, "k must be an integer, not 2.5"),
    ({"lr": float("inf")}, "lr must be a finite number > 0"),
    ({"n_random": 0}, "n_random must be an integer >= 1"),
    ({"steps": -1}, "steps must be an integer >= 0"),
])
def test_prune_config_refuses_nonsense(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PruneConfig(**options)


def test_top_k_masks():
    scores = {"0.attn.q": torch.tensor([0.5, -1.0, 0.9]), "0.attn.k": torch.tensor([0.7, 0.1])}
    masks = top_k_masks(scores, 3)
    assert masks["0.attn.q"].tolist() == [True, False, True] and masks["0.attn.k"].tolist() == [True, False]
    assert sum(int(m.sum()) for m in top_k_masks(scores, 0).values()) == 0
    assert sum(int(m.sum()) for m in top_k_masks(scores, 99).values()) == 5


def test_bisection_reaches_target(rms_model, means, batch):
    scores, _ = train_masks(rms_model, batch, means, PruneConfig(steps=15, batch_size=24, lr=0.1, progress=False))
    full = evaluate(rms_model, batch)[0]
    empty = evaluate(rms_model, batch, top_k_masks(scores, 0), means)[0]
    assert empty > full + 0.1, "ablating everything should hurt the synthetic task"
    target = (full + empty) / 2
    k, loss, reached = prune_to_target_loss(rms_model, batch, scores, means, target)
    assert reached and loss <= target and 0 < k < 2112
    assert evaluate(rms_model, batch, top_k_masks(scores, k), means)[0] == pytest.approx(loss)
    assert evaluate(rms_model, batch, top_k_masks(scores, k - 1), means)[0] > target  # smallest k of the bisection
    curve = sweep_k(rms_model, batch, scores, means, [0, k, 2112])
    assert curve[1][1] == pytest.approx(loss) and curve[2][1] == pytest.approx(full, abs=1e-6)
    # unreachable target: the better of the trained circuit and the full model, flagged
    trained = sum(int((s > 0).sum()) for s in scores.values())
    k, loss, reached = prune_to_target_loss(rms_model, batch, scores, means, full - 1.0)
    assert not reached and k in (trained, 2112)
    assert loss == pytest.approx(min(full, evaluate(rms_model, batch, top_k_masks(scores, trained), means)[0]), abs=1e-6)


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(),
                    reason="the default model (modeling_csp/default_model) has not been trained yet")
def test_default_model_prune_reaches_target(tmp_path):
    from modeling_csp.model.loading import load_model_and_tokenizer
    from modeling_csp.circuits.pruning import prune

    model, tokenizer = load_model_and_tokenizer("default")
    config = PruneConfig(n_examples=256, progress=False)
    result = prune(model, tokenizer, "single_double_quote", config, model_name="default", cache_dir=tmp_path)
    assert result.target_reached and result.train_loss <= 0.15
    circuit = result.circuit
    assert 0 < circuit.n_nodes < 2816 and circuit.n_edges > 0
    assert circuit.losses["circuit"] < circuit.losses["random"] and not circuit.meta["random_baseline_as_good"]
    assert circuit.model["name"] == "default" and circuit.meta["options"]["target_loss"] == 0.15
    loaded = CircuitGraph.load(circuit.save(tmp_path / "c.json"), model=model)
    assert loaded.nodes == circuit.nodes


def test_circuits_at_several_k_share_one_mask_training(rms_model, means, batch):
    scores, _ = train_masks(rms_model, batch, means, PruneConfig(steps=30, batch_size=16, progress=False))
    small, large = top_k_masks(scores, 4), top_k_masks(scores, 12)
    assert all(bool((large[loc] | ~small[loc]).all()) for loc in small)  # nested: same ranking


def test_sweep_over_tasks_under_accelerate_launch(tmp_path):
    """Two CPU processes share the tasks; the main process merges index.json, which `csp circuits` reads."""
    import json
    import os
    import subprocess
    import sys

    from modeling_csp.cli import shipped_circuits

    out = tmp_path / "circuits"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "modeling_csp.cli", "sweep", "--model", "default",
           "--tasks", "while_return_true,bracket_brace", "--ks", "4,8", "--steps", "20", "--n-examples", "64",
           "--out-dir", str(out), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CSP_CACHE_DIR": str(tmp_path / "cache"), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 6  # each task once (2 processes, one task each), at the target and at k = 4, 8
    assert sorted((e["task"], e["at_target"]) for e in lines if e["at_target"]) == [("bracket_brace", True), ("while_return_true", True)]
    index = json.loads((out / "index.json").read_text())
    assert {(e["task"], e["k"]) for e in index} == {(e["task"], e["k"]) for e in lines}
    assert not list(out.glob(".sweep-*"))
    (tmp_path / "model").mkdir()
    for name in DEFAULT_MODEL.iterdir():  # a model folder with these circuits, as `csp circuits` sees it
        if name.is_file():
            (tmp_path / "model" / name.name).symlink_to(name)
    (tmp_path / "model" / "circuits").symlink_to(out)
    listed = shipped_circuits(str(tmp_path / "model"))
    assert {(e["task"], e["k"]) for e in listed} == {(e["task"], e["k"]) for e in index}
    assert all(Path(e["path"]).is_file() for e in listed)


class MetaGuard:
    """Runs code with the model on the `meta` device, failing where a tensor on another device meets a meta tensor.

    PyTorch lets some such ops pass on meta (indexing with CPU indices) that fail on a GPU, so every op is checked.
    Reading a meta tensor (`.item()`, `.tolist()`, `nonzero`) gives placeholder values: the path runs, numbers are
    meaningless, and any tensor created on a hard-coded device that reaches the model shows up in `mixed`."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        aten, guard = torch.ops.aten, self
        self.mixed, self.meta_ops = [], 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                devices = {t.device.type for t in tensors if t.dim() > 0}  # 0-dim CPU scalars are fine anywhere
                if "meta" in devices and len(devices) > 1:
                    guard.mixed.append(f"{func}: {sorted(devices)}")
                if tensors and tensors[0].is_meta:
                    guard.meta_ops += 1
                    x = tensors[0]
                    if func is aten._local_scalar_dense.default:
                        return False if x.dtype == torch.bool else (0.1 if x.is_floating_point() else 0)
                    if func is aten.nonzero.default:
                        return torch.empty((0, x.dim()), dtype=torch.long, device="meta")
                    if func is aten._to_copy.default and str(kwargs.get("device")) == "cpu":
                        return torch.zeros(x.shape, dtype=kwargs.get("dtype") or x.dtype)
                return func(*args, **kwargs)

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.fixture(scope="module")
def meta_model():
    from modeling_csp import CSPConfig, CSPForCausalLM

    config = CSPConfig(block_size=128, vocab_size=2048, n_layer=2, n_head=2, d_head=16, d_model=32, d_mlp=64,
                       bias=False, ln_bias=False, rms_norm=True, tied_unembed=False)
    return CSPForCausalLM(config).to("meta").eval()


def test_meta_guard_catches_a_hard_coded_device(meta_model):
    with MetaGuard() as guard:
        meta_model.transformer.wte.weight[torch.tensor([0, 1])]  # CPU indices into a meta tensor: PyTorch lets it pass
    assert guard.mixed and "meta" in guard.mixed[0] and "cpu" in guard.mixed[0]


def test_pruning_path_on_the_meta_device(meta_model):
    """Means, masks, task batches, the control and the circuits at several k: nothing leaves the model's device."""
    from transformers import PreTrainedTokenizerFast

    from modeling_csp.circuits.pruning import prune

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(DEFAULT_MODEL))  # the shipped tokenizer.json
    with MetaGuard() as guard:
        means = compute_mean_activations(meta_model, [torch.randint(0, 2048, (4, 32))], cache_dir=False)
        config = PruneConfig(steps=3, n_examples=32, n_random=2, n_example_tokens=0, control="shuffled", progress=False)
        result = prune(meta_model, tokenizer, "single_double_quote", config, means=means, ks=(4,))
    assert all(m.device.type == "meta" for m in means.values())
    assert all(m.device.type == "meta" for m in result.keep_masks.values())
    assert guard.meta_ops > 1000 and guard.mixed == []
    assert result.circuit.control["kind"] == "shuffled" and result.at_k[4].control["k"] == 4


def test_shuffled_labels_swap_about_half(batch):
    from modeling_csp.circuits.pruning import shuffled_labels

    a, b = shuffled_labels(batch, 0), shuffled_labels(batch, 0)
    assert torch.equal(a.correct_ids, b.correct_ids)  # deterministic
    swapped = a.correct_ids != batch.correct_ids
    assert 0.25 < swapped.float().mean() < 0.75
    assert torch.equal(a.correct_ids[swapped], batch.alternative_ids[swapped])
    assert torch.equal(a.alternative_ids[swapped], batch.correct_ids[swapped])
    assert torch.equal(a.correct_ids[~swapped], batch.correct_ids[~swapped])
    assert not torch.equal(shuffled_labels(batch, 1).correct_ids, a.correct_ids)


def test_control_record(rms_model, means, batch):
    """The control prunes the same prompts with shuffled answers: the model is at chance or worse on them."""
    from modeling_csp.circuits.pruning import run_control

    train, test = synthetic_batch(rms_model, n=48, T=12, seed=1), batch
    full = evaluate(rms_model, train)[0]
    control = run_control(rms_model, train, test, means, PruneConfig(steps=10, batch_size=16, lr=0.1, progress=False),
                          target_loss=full + 0.05)
    record = control.record(rms_model, 20)
    assert record["kind"] == "shuffled" and record["k"] == 20 and record["n_total_nodes"] == 2112
    assert record["full_loss"] > full + 0.05  # half the answers are now the model's less favoured token
    assert 0.25 < record["swapped_fraction"] < 0.75
    assert record["reached"] == (record["k_to_target"] is not None)
    loss, _ = evaluate(rms_model, control.train, top_k_masks(control.scores, 20), means)
    assert record["loss_at_k"] == pytest.approx(loss)
    with pytest.raises(ValueError, match="control must be one of"):
        PruneConfig(control="permuted")


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(), reason="the default model has not been trained yet")
def test_prune_reports_every_stage_in_order_and_judges_on_held_out_examples():
    """`progress(fraction, description)` hears of each stage with its counts, in order, on a short real prune
    with its control; the circuit's verdict is `circuit_verdict` of its held-out losses, stored in the file."""
    import json
    import re

    from modeling_csp.circuits.evaluation import circuit_verdict
    from modeling_csp.model.loading import load_model_and_tokenizer
    from modeling_csp.circuits.pruning import prune

    model, tokenizer = load_model_and_tokenizer("default")
    config = PruneConfig(steps=6, n_examples=32, n_random=1, n_example_tokens=0, n_mean_tokens=2048, target_loss=0.5,
                         control="shuffled", max_exact_importances=0, progress=False)
    calls = []
    result = prune(model, tokenizer, "while_return_true", config, cache_dir=False, ks=[8],
                   progress=lambda fraction, desc: calls.append((fraction, desc)))
    fractions, descs = [f for f, _ in calls], [d for _, d in calls]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] == 1.0

    def stage(desc):
        return re.match(r"(control: )?[a-z ]+", desc).group(0)

    order = list(dict.fromkeys(stage(d) for d in descs))
    assert order == ["data", "mask training", "k bisection", "control: mask training", "control: k bisection",
                     "evaluation"]
    assert [d for d in descs if d.startswith("mask training")] == [f"mask training: step {i} of 6" for i in range(1, 7)]
    probes = [re.match(r"k bisection: probe (\d+) \(at most (\d+)\), k=([\d,]+)$", d) for d in descs
              if d.startswith("k bisection")]
    assert all(probes) and [int(p.group(1)) for p in probes] == list(range(1, len(probes) + 1)) and len(probes) > 3
    assert len(probes) <= int(probes[0].group(2))
    assert any(d.startswith("evaluation: circuit 2 of 2 (k=8)") for d in descs)

    circuit, verdict = result.circuit, result.verdict
    recomputed = circuit_verdict(circuit.losses, circuit.target_loss, result.train_loss, circuit.control, circuit.k)
    assert verdict == recomputed and circuit.meta["verdict"] == verdict.as_dict()
    assert result.target_reached == circuit.meta["target_reached"] == (circuit.losses["circuit"] <= 0.5)
    assert result.target_reached_train == circuit.meta["target_reached_train"] == (result.train_loss <= 0.5)
    assert verdict.reached_only_on_train == (result.target_reached_train and not result.target_reached)
    assert json.loads(json.dumps(circuit.meta["verdict"], allow_nan=False)) == circuit.meta["verdict"]
    small = result.at_k[8]
    assert small.meta["verdict"]["circuit_loss"] == small.losses["circuit"] and small.meta["verdict"]["split"] == "test"


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(), reason="the default model has not been trained yet")
def test_a_target_at_or_above_chance_is_refused(tmp_path):
    """Also one relative to a full model that is itself worse than chance: a sweep skips that task and says why."""
    import math

    from modeling_csp.circuits.evaluation import TargetAtChance
    from modeling_csp.model.loading import load_model_and_tokenizer
    from modeling_csp.circuits.pruning import prune, prune_sweep
    from modeling_csp.circuits.tasks import make_task_dataset

    for target in (math.log(2), 0.8, 10):
        with pytest.raises(TargetAtChance, match="at or above chance"):
            PruneConfig(target_loss=target)
    model, tokenizer = load_model_and_tokenizer("default")
    config = PruneConfig(ablation="zero", target_above_full=0.05, n_examples=64, n_example_tokens=0, progress=False)
    full = evaluate(model, make_task_dataset("set_or_string_fixedvarname", tokenizer, n=64, max_len=128).train)[0]
    assert full >= math.log(2)  # the model does not do this task
    with pytest.raises(TargetAtChance, match=f"training loss {full:.3f}"):
        prune(model, tokenizer, "set_or_string_fixedvarname", config)
    summaries = prune_sweep(model, tokenizer, ["set_or_string_fixedvarname"], tmp_path, config)
    assert summaries[0]["path"] is None and "at or above chance" in summaries[0]["refused"]
    assert list(tmp_path.iterdir()) == []


def test_prune_refuses_a_circuit_larger_than_the_model_before_any_work(rms_model):
    """PruneConfig cannot know the model; `prune` checks k and ks against its node count before it trains."""
    from modeling_csp.circuits.graph import n_total_nodes
    from modeling_csp.circuits.pruning import prune

    n = n_total_nodes(rms_model.config)
    for config, ks in ((PruneConfig(k=n + 1, progress=False), ()), (PruneConfig(progress=False), (8, 10**9))):
        with pytest.raises(ValueError, match=f"outside 1..{n}"):
            prune(rms_model, None, "single_double_quote", config, ks=ks)
