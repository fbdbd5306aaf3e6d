"""Training (modeling_csp.training, `csp train`): the top-k projection, schedules, a tiny run, bit-exact resume,
the saved model folder, and data-parallel training under `accelerate launch`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import PROJECT_ROOT
from modeling_csp.training.train import (
    TokenData, TrainConfig, annealed, lr_at, project_topk, train, val_windows, write_curve_svg,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(n_layer=1, d_model=32, n_head=2, d_head=16, d_mlp=64, batch_size=8, eval_every=2, eval_windows=4,
            checkpoint_every=2, density=0.2, bigram_density=0.1, anneal_frac=0.5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus folder of random tokens with some structure (every token is followed by token + 1 half the time)."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)

    def tokens(n):
        x = rng.integers(0, 2047, n)
        follow = rng.random(n) < 0.5
        x[1:][follow[1:]] = (x[:-1][follow[1:]] + 1) % 2047
        return x.astype(np.uint16)

    np.save(folder / "train.npy", tokens(20000))
    np.save(folder / "val.npy", tokens(2000))
    np.save(folder / "val_extra.npy", tokens(1000))
    return folder


def test_project_topk_keeps_exactly_k():
    p = torch.tensor([0.5, -3.0, 1.0, 1.0, 1.0, -0.1, 2.0, 0.0])
    project_topk(p, 0.5)  # k = 4: 3, 2 and the first two of the tied 1.0s
    assert p.tolist() == [0.0, -3.0, 1.0, 1.0, 0.0, 0.0, 2.0, 0.0]
    big = torch.randn(1 << 21, generator=torch.Generator().manual_seed(0))
    project_topk(big, 0.05, exact=False)  # sampled threshold: k up to a few percent
    assert abs(int(big.count_nonzero()) / big.numel() - 0.05) < 0.005
    project_topk(big, 0.02)
    assert int(big.count_nonzero()) == -(-2 * big.numel() // 100)  # k = ceil(density * n)


def test_schedules():
    assert annealed(0.1, 0, 100) == 1.0 and annealed(0.1, 100, 100) == pytest.approx(0.1)
    assert annealed(0.1, 50, 100, "geometric") == pytest.approx(0.1**0.5) and annealed(0.1, 500, 100) == pytest.approx(0.1)
    assert annealed(0.1, 50, 100, "linear") == pytest.approx(0.55)
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="anneal_shape"):
        TrainConfig(anneal_shape="cosine")


def test_val_windows_and_missing_corpus(corpus, tmp_path):
    data = TokenData(corpus)
    w = val_windows(data.val, 128)
    assert w.shape == ((2000 - 1) // 128, 129) and torch.equal(w[1], torch.from_numpy(data.val[128:257].astype(np.int64)))
    assert val_windows(data.val, 128, limit=3).shape == (3, 129)
    with pytest.raises(ValueError, match="build the corpus first"):
        TokenData(tmp_path)


def test_tiny_run_sparsifies_and_learns(corpus, tmp_path):
    result = train(TrainConfig(steps=8, lr=1e-2, **TINY), corpus, tmp_path, progress=False)
    rec = result.record
    assert result.finished and [r["step"] for r in rec["curve"]] == [2, 4, 6, 8]
    assert rec["final"]["density"] == pytest.approx(0.2, abs=0.01)
    assert rec["final"]["density_per_matrix"]["bigram_table"] == pytest.approx(0.1, abs=1e-4)
    assert rec["curve"][-1]["val_loss"] < rec["curve"][0]["val_loss"] < 7.7  # it learns the +1 structure
    assert rec["final"]["val_extra_loss"] is not None and rec["data"]["train_tokens"] == 20000
    mats = [p for n, p in result.model.named_parameters() if p.ndim == 2 and n != "bigram_table"]
    assert all(int(p.count_nonzero()) == pytest.approx(0.2 * p.numel(), abs=1) for p in mats)
    assert (tmp_path / "checkpoint.pt").is_file() and json.loads((tmp_path / "training_curve.json").read_text())["final"]
    assert (tmp_path / "loss_curve.svg").read_text().startswith("<svg")


def test_resume_is_bit_exact(corpus, tmp_path):
    config = TrainConfig(steps=6, **TINY)
    straight = train(config, corpus, tmp_path / "a", progress=False)
    first = train(TrainConfig(steps=6, max_minutes=0.0, **TINY), corpus, tmp_path / "b", progress=False)
    assert not first.finished and first.record["final"] is None  # stopped after one step, with a checkpoint
    resumed = train(config, corpus, tmp_path / "b", progress=False)
    assert resumed.finished
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in resumed.record["curve"]][-1] == pytest.approx(straight.record["curve"][-1]["train_loss"])
    with pytest.raises(ValueError, match="trained with other settings.*'lr'"):
        train(TrainConfig(steps=6, lr=1e-3, **TINY), corpus, tmp_path / "b", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # a rerun elsewhere re-saves: the record keeps where the run trained
    try:
        again = train(config, corpus, tmp_path / "b", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert again.finished and again.record["environment"]["threads"] == threads


def test_curve_svg(tmp_path):
    rows = [{"tokens": t, "train_loss": 5 - t / 100, "val_loss": 5.2 - t / 100} for t in (0, 100, 200)]
    write_curve_svg(rows, tmp_path / "c.svg")
    svg = (tmp_path / "c.svg").read_text()
    assert svg.count("<polyline") == 2 and "val 3.200" in svg


def test_csp_train_writes_a_loadable_model(corpus, tmp_path, capsys):
    from modeling_csp.cli import main
    from modeling_csp.model.loading import load_model_and_tokenizer

    args = ["train", "--data", str(corpus), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model"),
            "--steps", "4", "--quiet"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["finished"] and summary["out"] == str(tmp_path / "model")
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "model"))
    assert model.config.n_layer == 1 and tokenizer.eos_token_id == 2047
    card = (tmp_path / "model" / "README.md").read_text()
    assert "## Training" in card and "Held-out loss" in card
    assert (tmp_path / "model" / "loss_curve.svg").is_file() and (tmp_path / "model" / "training_curve.json").is_file()
    # retraining in place, the tokenizer taken from the output folder itself (as the default model is rebuilt)
    (tmp_path / "model" / "circuits").mkdir()
    assert main(args + ["--tokenizer-dir", str(tmp_path / "model")]) == 0
    assert load_model_and_tokenizer(str(tmp_path / "model"))[1].eos_token_id == 2047
    assert (tmp_path / "model" / "circuits").is_dir()  # what is not the model's own stays

    (corpus / "meta.json").write_text(json.dumps({"tokenizer_sha256": "0" * 64}))
    try:
        assert main(args[:4] + [str(tmp_path / "run2")] + args[5:]) == 2
        assert "tokenized with another tokenizer" in capsys.readouterr().err
    finally:
        (corpus / "meta.json").unlink()


def test_data_parallel_under_accelerate_launch(corpus, tmp_path):
    """Two CPU processes train on halves of the same global batches: the same losses as one process."""
    options = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()] + ["--steps", "4", "--quiet"]
    single = train(TrainConfig(steps=4, **TINY), corpus, tmp_path / "single", progress=False)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "modeling_csp.cli", "train", "--data", str(corpus),
           "--run-dir", str(tmp_path / "ddp"), "--threads", "1", *options]
    # torchrun-style processes on the CPU (gloo): `accelerate launch --cpu` would start a single process
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "ddp" / "training_curve.json").read_text())
    assert record["environment"]["processes"] == 2
    for a, b in zip(record["curve"], single.record["curve"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=2e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=2e-3)


def test_second_stage_starts_from_a_finished_run(corpus, tmp_path):
    first = train(TrainConfig(steps=4, **TINY), corpus, tmp_path / "one", progress=False)
    options = {**TINY, "anneal_frac": 0.0}
    second = train(TrainConfig(steps=2, lr=1e-3, init_from=str(tmp_path / "one"), **options), corpus, tmp_path / "two",
                   progress=False)
    rec = second.record
    assert rec["previous"]["final"]["steps"] == 4 and rec["previous"]["curve"] == first.record["curve"]
    assert rec["final"]["total_tokens"] == (4 + 2) * 8 * 128 and rec["final"]["steps"] == 2
    assert rec["final"]["density"] == pytest.approx(0.2, abs=0.01)  # anneal_frac 0: the density is held
    assert rec["curve"][0]["val_loss"] == pytest.approx(first.record["curve"][-1]["val_loss"], abs=0.05)  # not from scratch
    from modeling_csp.training.train import training_card

    assert "then, continued from those weights" in training_card(rec)
    third = train(TrainConfig(steps=2, lr=5e-4, init_from=str(tmp_path / "two"), **options), corpus,
                  tmp_path / "third", progress=False).record
    from modeling_csp.training.train import training_stages

    assert [s["final"]["steps"] for s in training_stages(third)] == [4, 2, 2]
    assert third["final"]["total_tokens"] == (4 + 2 + 2) * 8 * 128
    assert training_card(third).count("then, continued from those weights") == 2
    with pytest.raises(ValueError, match="no training_curve.json"):
        train(TrainConfig(steps=2, init_from=str(tmp_path / "nothing"), **options), corpus, tmp_path / "three", progress=False)


def test_continue_a_saved_model_folder_watching_tasks(corpus, tmp_path):
    """A model folder saved by csp train (like the shipped default model) is a starting point too; the task probe
    puts train-split accuracies in the curve and snapshots keep each checkpoint's weights."""
    from safetensors.torch import load_file

    from modeling_csp.model.loading import load_tokenizer
    from modeling_csp.training.train import save_trained_model, task_probe, training_stages

    first = train(TrainConfig(steps=4, **TINY), corpus, tmp_path / "one", progress=False)
    save_trained_model(first, tmp_path / "model", PROJECT_ROOT / "modeling_csp" / "default_model")
    probe = task_probe(load_tokenizer(str(tmp_path / "model")), ["while_return_true", "indent_for"], n=64, max_len=128)
    options = {**TINY, "anneal_frac": 0.0}
    second = train(TrainConfig(steps=4, init_from=str(tmp_path / "model"), **options), corpus, tmp_path / "two",
                   progress=False, probe=probe, snapshots=True)
    assert [s["final"]["steps"] for s in training_stages(second.record)] == [4, 4]
    assert second.record["curve"][0]["val_loss"] == pytest.approx(first.record["curve"][-1]["val_loss"], abs=0.05)
    for row in second.record["curve"]:
        assert set(row["tasks"]) == {"while_return_true", "indent_for"} and all(0 <= a <= 1 for a in row["tasks"].values())
    assert sorted(p.name for p in (tmp_path / "two" / "snapshots").iterdir()) == ["step_2.safetensors", "step_4.safetensors"]
    last = load_file(tmp_path / "two" / "snapshots" / "step_4.safetensors")
    for name, value in second.model.state_dict().items():
        if name in last:
            assert torch.equal(value, last[name]), name
    with pytest.raises(ValueError, match="architecture differs"):
        train(TrainConfig(steps=2, init_from=str(tmp_path / "model"), **{**options, "d_mlp": 128}), corpus,
              tmp_path / "three", progress=False)


def test_csp_train_keeps_the_best_probed_snapshot(corpus, tmp_path, capsys):
    """`--select-snapshot best`: the model folder gets the snapshot whose probed tasks (train splits) reach 0.9
    most often, with the curve and final numbers of that step."""
    from modeling_csp.cli import main
    from modeling_csp.model.loading import load_model_and_tokenizer
    from modeling_csp.training.train import best_probed_step

    base = ["train", "--data", str(corpus), "--steps", "6", "--quiet"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(base + ["--run-dir", str(tmp_path / "bad"), "--select-snapshot", "best"]) == 2
    assert "--select-snapshot best needs --task-probe" in capsys.readouterr().err
    assert main(base + ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model"), "--snapshots",
                        "--task-probe", "while_return_true,indent_for", "--select-snapshot", "best"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = json.loads((tmp_path / "run" / "training_curve.json").read_text())
    chosen = best_probed_step(run)
    assert summary["step"] == summary["final"]["steps"] == chosen
    saved = json.loads((tmp_path / "model" / "training_curve.json").read_text())
    assert saved["selected_step"] == chosen and saved["curve"][-1]["step"] == chosen
    assert f"the snapshot after {chosen:,} of 6 steps" in (tmp_path / "model" / "README.md").read_text()
    model, _ = load_model_and_tokenizer(str(tmp_path / "model"))
    assert model.config.n_layer == 1


def test_a_killed_runs_checkpoint_temp_file_is_removed(corpus, tmp_path):
    """`checkpoint.tmp<pid>` of a run killed mid-save goes when the next run in that folder starts (and ends);
    another live writer's temp file stays."""
    from conftest import dead_pid

    out = tmp_path / "run"
    out.mkdir()
    killed = out / f"checkpoint.tmp{dead_pid()}"
    killed.write_bytes(b"\0" * 1000)
    live = out / f"checkpoint.tmp{os.getppid()}"
    live.write_bytes(b"\0")
    train(TrainConfig(steps=2, **TINY), corpus, out, progress=False)
    assert not killed.exists() and live.exists()
    assert sorted(p.name for p in out.iterdir() if ".tmp" in p.name) == [live.name]
