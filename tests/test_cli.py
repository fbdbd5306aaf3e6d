"""The `csp` command line: JSON output, evaluate's numbers, shipped circuits, next tokens, and one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, PROJECT_ROOT, TOKENIZER_FIXTURE
from modeling_csp import CSPConfig, CSPForCausalLM
from modeling_csp.circuits.ablation import all_kept
from modeling_csp.circuits.graph import CircuitGraph
from modeling_csp.cli import main

VIZ = FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"
DEFAULT_MODEL = PROJECT_ROOT / "modeling_csp" / "default_model"


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """Mean-activation cache in a temp dir, and thread count restored after in-process CLI runs."""
    monkeypatch.setenv("CSP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "csp_cache"))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-layer model with the fixture tokenizer's 2,048-token vocabulary, saved like a converted folder."""
    from conversion.convert_checkpoint import save_converted_folder

    torch.manual_seed(0)
    config = CSPConfig(block_size=128, vocab_size=2048, n_layer=1, n_head=2, d_head=16, d_model=32, d_mlp=64,
                       bias=False, ln_bias=False, rms_norm=True, tied_unembed=False)
    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    save_converted_folder(CSPForCausalLM(config).eval(), folder, tokenizer_dir=str(TOKENIZER_FIXTURE), name="tiny")
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_json(out):
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [l for l in err.splitlines() if "error" in l.lower()]  # ignore progress bars of models loaded here
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_tasks(capsys):
    code, out, _ = run(capsys, "tasks")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and {"name", "description"} == set(rows[0])
    assert "single_double_quote" in {r["name"] for r in rows}


def test_option_defaults_are_the_librarys(capsys):
    """The CLI's defaults are read off `PruneConfig` (whose evaluation defaults are `EvalOptions`'), so `csp prune`,
    `csp sweep`, `csp tasks --check` and the help text say what a prune in Python does."""
    from modeling_csp.circuits.evaluation import EvalOptions
    from modeling_csp.circuits.pruning import PruneConfig
    from modeling_csp.cli import build_parser

    d, parser = PruneConfig(), build_parser()
    prune = parser.parse_args(["prune", "--model", "m", "--task", "t", "--out", "c.json"])
    sweep = parser.parse_args(["sweep", "--model", "m", "--out-dir", "d"])
    for args in (prune, sweep):
        assert (args.target_loss, args.n_examples, args.seed) == (d.target_loss, d.n_examples, d.seed)
        assert args.steps == d.steps
    assert parser.parse_args(["tasks"]).n_examples == d.n_examples == EvalOptions().n_examples
    assert EvalOptions.from_config(d) == EvalOptions()
    code, out, _ = run(capsys, "prune", "--help")
    assert code == 0 and f"default {d.target_loss}" in out and f"default {d.n_examples}" in out
    code, out, _ = run(capsys, "evaluate", "--help")
    assert code == 0 and f"else {d.n_random};" in " ".join(out.split())


def test_evaluate_numbers(capsys, tiny, tmp_path):
    model = CSPForCausalLM.from_pretrained(tiny)
    full = CircuitGraph.from_masks(model, all_kept(model.config), model_name="tiny").save(tmp_path / "full.json")
    code, out, _ = run(capsys, "evaluate", "--model", tiny, "--task", "single_double_quote", "--circuit", full)
    result = one_json(out)
    assert code == 0
    assert {"full_loss", "circuit_loss", "random_loss", "complement_loss", "full_accuracy", "circuit_accuracy",
            "n_nodes", "n_edges"} <= set(result)
    assert result["circuit_loss"] == pytest.approx(result["full_loss"], abs=1e-6)
    assert result["circuit_accuracy"] == result["full_accuracy"]
    assert result["n_nodes"] == 288 and result["n_edges"] > 0

    empty_masks = {k: torch.zeros_like(v) for k, v in all_kept(model.config).items()}
    empty = CircuitGraph.from_masks(model, empty_masks).save(tmp_path / "empty.json")
    code, out, _ = run(capsys, "evaluate", "--model", tiny, "--task", "single_double_quote", "--circuit", empty)
    result = one_json(out)
    assert result["complement_loss"] == pytest.approx(result["full_loss"], abs=1e-6)
    assert (result["n_random"], result["seed"], result["freeze_norm_scales"]) == (5, 0, False)
    assert result["n_nodes"] == 0 and result["n_edges"] == 0
    code, _, err = run(capsys, "evaluate", "--model", tiny, "--circuit", empty)  # no task given, none in the file
    assert_one_line_error(code, err, "names no built-in task (None) and keeps no task examples: give --task NAME")


def test_evaluate_judges_a_circuit_against_its_own_target(capsys, tiny, tmp_path):
    """Status 1 when the held-out loss misses the target in the file; on another task there is no target to meet."""
    model = CSPForCausalLM.from_pretrained(tiny)
    strict = CircuitGraph.from_masks(model, all_kept(model.config), model_name="tiny", task="single_double_quote",
                                     target_loss=0.01, meta={"options": {"n_examples": 64}}).save(tmp_path / "c.json")
    code, out, err = run(capsys, "evaluate", "--model", tiny, "--circuit", strict)
    result = one_json(out)
    assert code == 1 and result["circuit_loss"] > 0.01 and result["verdict"]["target_reached_heldout"] is False
    assert "warning: target not reached: held-out circuit loss" in err and "error" not in err
    code, out, _ = run(capsys, "evaluate", "--model", tiny, "--task", "for_while", "--circuit", strict)
    assert code == 0 and one_json(out)["verdict"]["target"] is None


def test_evaluate_uses_the_circuits_own_options_capped(capsys, tiny, tmp_path):
    """The random baseline is drawn as the circuit's pruning did (its n_random, seed, frozen norms), as the app
    does; a file asking for huge sizes is capped with a note on stderr."""
    model = CSPForCausalLM.from_pretrained(tiny)
    half_masks = {loc: torch.arange(m.numel()) % 2 == 0 for loc, m in all_kept(model.config).items()}
    options = {"n_random": 3, "seed": 4, "freeze_norm_scales": True, "n_examples": 10**7}
    path = CircuitGraph.from_masks(model, half_masks, model_name="tiny", meta={"options": options}).save(tmp_path / "c.json")
    code, out, err = run(capsys, "evaluate", "--model", tiny, "--task", "single_double_quote", "--circuit", path)
    result = one_json(out)
    assert code == 0 and (result["n_random"], result["seed"], result["freeze_norm_scales"]) == (3, 4, True)
    assert "note: n_examples=10000000 is outside [8, 2048]: using 2048" in err and result["n_examples"] <= 512
    code, out, _ = run(capsys, "evaluate", "--model", tiny, "--task", "single_double_quote", "--circuit", path,
                       "--n-random", 2, "--seed", 1)
    assert (one_json(out)["n_random"], one_json(out)["seed"]) == (2, 1)


def test_prune_writes_a_circuit(capsys, tiny, tmp_path):
    out_file = tmp_path / "c.json"
    code, _, err = run(capsys, "prune", "--model", tiny, "--task", "single_double_quote", "--target-loss", 10,
                       "--out", out_file)
    assert_one_line_error(code, err, "the target loss 10.000 nats is at or above chance (ln 2 = 0.693")
    code, out, err = run(capsys, "prune", "--model", tiny, "--task", "single_double_quote", "--steps", 4, "--quiet",
                         "--n-examples", 64, "--target-loss", 0.6, "--out", out_file)
    summary = one_json(out)
    verdict = summary["verdict"]  # judged on held-out examples, as the file records it
    assert code == 0 and summary["out"] == str(out_file) and summary["target_reached"] == verdict["passed"]
    assert verdict["circuit_loss"] == summary["losses"]["circuit"] and verdict["split"] == "test"
    assert summary["target_reached_train"] == (summary["train_circuit_loss"] <= 0.6)
    assert [line[len("warning: "):] for line in err.splitlines() if line.startswith("warning: ")] == [
        m[2:].lstrip() for m in verdict["messages"] if m.startswith("⚠️")]
    circuit = CircuitGraph.load(out_file, model=CSPForCausalLM.from_pretrained(tiny))
    assert circuit.task == "single_double_quote" and circuit.n_nodes == summary["n_nodes"] == circuit.k
    assert circuit.meta["verdict"] == verdict and circuit.meta["target_reached"] == summary["target_reached"]
    assert circuit.meta["options"]["steps"] == 4 and circuit.meta["options"]["freeze_norm_scales"] is False
    assert len(circuit.pruning_curve) == 4 and set(circuit.losses) == {"full", "circuit", "random", "complement"}
    assert summary["timings"] == circuit.meta["timings"] and "training" in summary["timings"]
    assert "stages:" not in err  # --quiet
    code, _, err = run(capsys, "prune", "--model", tiny, "--task", "single_double_quote", "--steps", 2,
                       "--n-examples", 64, "--target-loss", 0.6, "--out", out_file)
    assert code == 0 and re.search(r"^stages: data and means [\d.]+ s, training [\d.]+ s, bisection [\d.]+ s, "
                                   r"circuit [\d.]+ s; [\d.]+ s in all$", err, re.M), err


def test_circuits_listing(capsys, tiny, tmp_path):
    import shutil

    folder = tmp_path / "with_circuits"
    shutil.copytree(tiny, folder)
    code, out, _ = run(capsys, "circuits", "--model", folder)
    assert code == 0 and out == ""
    model = CSPForCausalLM.from_pretrained(folder)
    (folder / "circuits").mkdir()
    CircuitGraph.from_masks(model, all_kept(model.config), task="for_while", k=288).save(folder / "circuits" / "a.json")
    code, out, _ = run(capsys, "circuits", "--model", folder)
    assert one_json(out) == {"task": "for_while", "k": 288, "path": str((folder / "circuits" / "a.json").resolve()),
                             "at_target": None}
    (folder / "circuits" / "index.json").write_text(json.dumps([{"task": "x", "k": 5, "path": "a.json", "at_target": True}]))
    code, out, _ = run(capsys, "circuits", "--model", folder)
    assert one_json(out)["task"] == "x" and one_json(out)["at_target"] is True


def test_import_viz(capsys, tmp_path):
    code, out, _ = run(capsys, "import-viz", VIZ, tmp_path / "viz.json")
    summary = one_json(out)
    assert code == 0 and summary["n_nodes"] == 93 and summary["n_edges"] == 76
    assert summary["losses"]["circuit"] == pytest.approx(0.15)
    assert CircuitGraph.load(tmp_path / "viz.json").n_edges == 76


def test_errors(capsys, tiny, converted, tmp_path):
    code, _, err = run(capsys, "evaluate", "--model", tiny, "--task", "no_such_task", "--circuit", "x.json")
    assert_one_line_error(code, err, "Unknown task 'no_such_task'", "single_double_quote")

    rms = CSPForCausalLM.from_pretrained(converted["rms_sink_bigram"])
    foreign = CircuitGraph.from_masks(rms, all_kept(rms.config), model_name="rms").save(tmp_path / "foreign.json")
    code, _, err = run(capsys, "evaluate", "--model", tiny, "--task", "for_while", "--circuit", foreign)
    assert_one_line_error(code, err, "circuit was made for model 'rms' (n_layer=3, d_model=64")

    (tmp_path / "broken.json").write_text('{"format": "csp-circuit", "version": 1, "nodes": [')
    code, _, err = run(capsys, "evaluate", "--model", tiny, "--task", "for_while", "--circuit", tmp_path / "broken.json")
    assert_one_line_error(code, err, "not valid JSON")

    (tmp_path / "v.pkl").write_bytes(b"\x80\x04N.")
    code, _, err = run(capsys, "import-viz", tmp_path / "v.pkl", tmp_path / "o.json")
    assert_one_line_error(code, err, "pickle files can run arbitrary code")

    code, _, err = run(capsys, "evaluate", "--model", tmp_path, "--task", "for_while", "--circuit", foreign)
    assert_one_line_error(code, err, "no config.json")

    code, _, err = run(capsys, "prune", "--model", tiny)
    assert_one_line_error(code, err, "required")

    if not (DEFAULT_MODEL / "config.json").is_file():
        code, _, err = run(capsys, "prune", "--model", "default", "--task", "for_while", "--out", tmp_path / "d.json")
        assert_one_line_error(code, err, "default model is not installed")


def test_next_tokens(capsys, tiny, converted, tmp_path):
    """`csp next-tokens`: the app's /next_tokens answer, from the same library function."""
    from modeling_csp import explorer

    prompt = 'def f(x):\n    return x + "a'
    code, out, _ = run(capsys, "next-tokens", "--model", tiny, "--prompt", prompt, "--top", 5)
    plain = one_json(out)
    assert code == 0 and plain["circuit"] is None and plain["run"] is None and plain["tokens"]
    assert len(plain["full"]) == 5 and {"token", "id", "prob"} == set(plain["full"][0])
    probs = [r["prob"] for r in plain["full"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    mixed = 's = "héllo wörld 日本語 🙂'  # characters split over byte tokens: shown joined, never as U+FFFD
    code, out, _ = run(capsys, "next-tokens", "--model", tiny, "--prompt", mixed)
    answer = one_json(out)
    assert code == 0 and "".join(answer["tokens"]) == mixed and "\ufffd" not in json.dumps(answer, ensure_ascii=False)
    # the whole model as a circuit predicts as the model does; half of its nodes differently
    model = CSPForCausalLM.from_pretrained(tiny)
    whole = CircuitGraph.from_masks(model, all_kept(model.config), model_name="tiny").save(tmp_path / "whole.json")
    code, out, _ = run(capsys, "next-tokens", "--model", tiny, "--prompt", prompt, "--circuit", whole)
    result = one_json(out)
    assert code == 0 and result["circuit_nodes"] == 288 and len(result["full"]) == 10
    assert result["circuit"] == result["full"] and result["full"][:5] == plain["full"]
    half_masks = {loc: torch.arange(m.numel()) % 2 == 0 for loc, m in all_kept(model.config).items()}
    half = CircuitGraph.from_masks(model, half_masks, model_name="tiny").save(tmp_path / "half.json")
    code, out, _ = run(capsys, "next-tokens", "--model", tiny, "--prompt", prompt, "--circuit", half)
    result = one_json(out)
    assert code == 0 and result["circuit_nodes"] == 144 and result["circuit"] != result["full"]
    entry = explorer.Explorer().get_model(str(tiny))
    assert result == explorer.next_tokens(entry, prompt, explorer.import_run_file(entry, str(half)))

    code, _, err = run(capsys, "next-tokens", "--model", tiny, "--prompt", "")
    assert_one_line_error(code, err, "the prompt is empty")
    code, out, _ = run(capsys, "next-tokens", "--model", tiny, "--prompt", " \n\t")  # whitespace is a prompt
    assert code == 0 and one_json(out)["full"]
    code, _, err = run(capsys, "next-tokens", "--model", "nobody/no-such-model", "--prompt", "x = 1")
    assert_one_line_error(code, err, "could not load model 'nobody/no-such-model'")
    rms = CSPForCausalLM.from_pretrained(converted["rms_sink_bigram"])
    foreign = CircuitGraph.from_masks(rms, all_kept(rms.config), model_name="rms").save(tmp_path / "foreign.json")
    code, _, err = run(capsys, "next-tokens", "--model", tiny, "--prompt", "x = 1", "--circuit", foreign)
    assert_one_line_error(code, err, "foreign.json: circuit was made for model 'rms'")


def test_error_exit_code_in_a_fresh_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "modeling_csp.cli", "evaluate", "--model", "nobody/no-such-model", "--task",
         "for_while", "--circuit", str(tmp_path / "c.json")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: could not load model 'nobody/no-such-model'")
    assert "HF_HUB_OFFLINE" in result.stderr


HIDE_MODULES = """import sys
class HideModules:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {hidden!r}:
            raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
sys.meta_path.insert(0, HideModules())
"""  # a fresh interpreter's prelude: the `hidden` packages cannot be imported, as without the [app] extra


def csp_without(hidden: tuple[str, ...], argv: list[str], cwd) -> subprocess.CompletedProcess:
    """`csp ARGV` in a fresh interpreter where the `hidden` packages cannot be imported, as after a plain
    `pip install csp-circuits` without the [app] extra."""
    blocker = HIDE_MODULES.format(hidden=hidden) + f"from modeling_csp.cli import main\nsys.exit(main({argv!r}))\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("hidden", [("plotly",), ("gradio",), ("gradio", "plotly")])
@pytest.mark.parametrize("argv", [["next-tokens", "--model", "default", "--prompt", "x = 1"],
                                  ["space", "build", "space_out"]], ids=["next-tokens", "space-build"])
def test_commands_of_the_app_extra_say_how_to_install_it(tmp_path, hidden, argv):
    result = csp_without(hidden, argv, tmp_path)
    assert result.returncode == 2 and result.stdout == "", result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "needs the app extra: pip install 'csp-circuits[app]'" in result.stderr
    assert f"(not installed: {', '.join(hidden)})" in result.stderr
    assert not (tmp_path / "space_out").exists()


def test_the_app_without_its_extra_says_how_to_install_it(tmp_path):
    code = ("import runpy, sys\n" + HIDE_MODULES.format(hidden=("gradio",)) +
            f"sys.argv = ['app.py']\nrunpy.run_path({str(PROJECT_ROOT / 'app.py')!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 1 and result.stderr == (
        "error: python app.py needs the app extra: pip install 'csp-circuits[app]' (not installed: gradio)\n")


def test_the_library_commands_run_without_the_app_extra(tmp_path):
    result = csp_without(("gradio", "plotly"), ["tasks"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len([json.loads(line) for line in result.stdout.splitlines()]) == 20


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(),
                    reason="the default model (modeling_csp/default_model) has not been trained yet")
def test_prune_and_evaluate_default_model(capsys, tmp_path):
    """The default model through the CLI (a short run with fixed k; reaching the target is in test_pruning)."""
    code, out, _ = run(capsys, "prune", "--model", "default", "--task", "single_double_quote", "--quiet",
                       "--steps", 40, "--k", 40, "--n-examples", 128, "--out", tmp_path / "c.json")
    summary = one_json(out)
    assert code == 0 and summary["k"] == summary["n_nodes"] == 40 and summary["n_edges"] > 0
    code, out, _ = run(capsys, "evaluate", "--model", "default", "--circuit", tmp_path / "c.json")  # its own task
    result = one_json(out)
    assert code == (0 if summary["verdict"]["passed"] else 1)  # judged on held-out examples, as prune judged it
    assert result["n_nodes"] == 40 and result["task"] == "single_double_quote"
    for key in ("full", "circuit", "random", "complement"):
        assert result[f"{key}_loss"] == pytest.approx(summary["losses"][key], abs=1e-5)
    assert result["verdict"]["passed"] == summary["verdict"]["passed"]


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(),
                    reason="the default model (modeling_csp/default_model) has not been trained yet")
def test_evaluate_exits_1_for_a_circuit_that_misses_its_own_target_held_out(capsys):
    """Shipped circuits: status 0 for one whose held-out loss meets the target in its file, 1 (with a warning
    line) for one that reaches it only on its training examples; 2 stays for bad input."""
    from modeling_csp.circuits.evaluation import verdict_of

    shipped = [CircuitGraph.load(DEFAULT_MODEL / "circuits" / e["path"]) for e in
               json.loads((DEFAULT_MODEL / "circuits" / "index.json").read_text()) if e["at_target"]]
    by_outcome = {bool(verdict_of(c).passed): c for c in shipped}
    for passed, circuit in sorted(by_outcome.items()):
        path = DEFAULT_MODEL / "circuits" / f"{circuit.task}.json"
        code, out, err = run(capsys, "evaluate", "--model", "default", "--circuit", path)
        result = one_json(out)
        assert code == (0 if passed else 1) and result["verdict"]["passed"] is passed, (circuit.task, err)
        assert result["target_loss"] == circuit.target_loss
        assert result["target_reached"] == (result["circuit_loss"] <= circuit.target_loss)
        assert ("warning: target" in err) is not passed


QUOTE_ROWS = [{"prompt": f"{v} = {q}{w} {i}", "correct": q, "incorrect": "'" if q == '"' else '"'}
              for i, (v, w, q) in enumerate([("x", "abc", "'"), ("y", "text", '"'), ("name", "hello", "'"),
                                              ("value", "world", '"'), ("key", "data", "'"), ("path", "line", '"'),
                                              ("s", "word", "'"), ("t", "item", '"')])]


def task_file(path, rows=QUOTE_ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tasks_check_reports_accuracy_on_a_task_file(capsys, tiny, tmp_path):
    from modeling_csp.circuits.evaluation import evaluate
    from modeling_csp.model.loading import load_model_and_tokenizer
    from modeling_csp.circuits.tasks import load_task_file, make_task_dataset

    file = task_file(tmp_path / "quotes.jsonl")
    code, out, _ = run(capsys, "tasks", "--check", file, "--model", tiny)
    report = one_json(out)
    assert code == 0 and report["task"] == "quotes" and report["n"] == 8 and report["classes"] == [4, 4]
    model, tokenizer = load_model_and_tokenizer(str(tiny))
    data = make_task_dataset(load_task_file(file, tokenizer), tokenizer)  # csp tasks --check's default size
    test_loss, test_acc = evaluate(model, data.test)
    assert report["test_loss"] == pytest.approx(test_loss) and report["test_accuracy"] == test_acc
    assert 0 <= report["accuracy"] <= 1 and report["n_train"] + report["n_test"] == 8


def test_prune_a_task_file_with_the_shuffled_control(capsys, tiny, tmp_path):
    file, out_file = task_file(tmp_path / "quotes.jsonl"), tmp_path / "c.json"
    code, out, _ = run(capsys, "prune", "--model", tiny, "--task-file", file, "--control", "shuffled", "--steps", 3,
                       "--quiet", "--target-loss", 0.6, "--out", out_file)
    summary = one_json(out)
    assert code == 0 and summary["task"] == "quotes" and summary["control"]["kind"] == "shuffled"
    circuit = CircuitGraph.load(out_file)
    assert circuit.control == summary["control"] and circuit.control["k"] == circuit.k
    assert circuit.control["reached"] == (circuit.control["k_to_target"] is not None)
    assert summary["verdict"]["means_something"] is not None  # judged with the control
    missed = 0 if summary["verdict"]["passed"] else 1  # csp evaluate's status: 1 when the held-out loss misses
    assert circuit.meta["task_file"]["path"] == str(file) and len(circuit.meta["task_file"]["sha256"]) == 64
    assert circuit.meta["options"]["control"] == "shuffled"
    code, out, _ = run(capsys, "evaluate", "--model", tiny, "--task-file", file, "--circuit", out_file)
    assert code == missed and one_json(out)["circuit_loss"] == pytest.approx(circuit.losses["circuit"])
    file.unlink()  # the circuit keeps its examples: it is evaluated on its own task without the file
    code, out, _ = run(capsys, "evaluate", "--model", tiny, "--circuit", out_file)
    assert code == missed and one_json(out)["circuit_loss"] == pytest.approx(circuit.losses["circuit"])
    assert one_json(out)["task"] == "quotes"


def test_task_file_errors(capsys, tiny, tmp_path):
    rows = QUOTE_ROWS[:3] + [{"prompt": "x = 1", "correct": "a"}]
    code, _, err = run(capsys, "tasks", "--check", task_file(tmp_path / "bad.jsonl", rows), "--model", tiny)
    assert_one_line_error(code, err, "bad.jsonl:4: missing incorrect")
    one_class = [r for r in QUOTE_ROWS if r["correct"] == "'"]
    code, _, err = run(capsys, "prune", "--model", tiny, "--task-file", task_file(tmp_path / "one.jsonl", one_class),
                       "--out", tmp_path / "c.json")
    assert_one_line_error(code, err, "one.jsonl: only one class")
    code, _, err = run(capsys, "prune", "--model", tiny, "--task", "for_while", "--task-file", tmp_path / "one.jsonl",
                       "--out", tmp_path / "c.json")
    assert_one_line_error(code, err, "exactly one of --task NAME and --task-file")
    code, _, err = run(capsys, "prune", "--model", tiny, "--task-file", tmp_path / "none.jsonl", "--out", tmp_path / "c.json")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(capsys, "prune", "--model", tiny, "--task", "for_while", "--control", "random", "--out", tmp_path / "c.json")
    assert_one_line_error(code, err, "invalid choice: 'random'")


def test_unreadable_task_lines_and_configs_name_the_file(capsys, tiny, tmp_path):
    """A lone surrogate and nesting too deep name FILE:LINE; an empty or invalid config.json names the file."""
    lines = [json.dumps(r) for r in QUOTE_ROWS[:3]]
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text("\n".join(lines + ['{"prompt": "x = \\udc80", "correct": "a", "incorrect": "b"}']))
    code, _, err = run(capsys, "tasks", "--check", surrogate, "--model", tiny)
    assert_one_line_error(code, err, "surrogate.jsonl:4: 'prompt' holds a lone surrogate")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("\n".join(lines[:1] + ["[" * 100_000]))
    code, _, err = run(capsys, "tasks", "--check", deep, "--model", tiny)
    assert_one_line_error(code, err, "deep.jsonl:2: not a task line (JSON nested too deeply)")
    for name, content in (("empty", ""), ("invalid", "{not json"), ("list", "[1, 2]")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(content)
        code, _, err = run(capsys, "tasks", "--check", surrogate, "--model", folder)
        assert_one_line_error(code, err, str(folder / "config.json"))


# ---- nonsense is refused before any work, and nothing is written ------------------------------------------

TINY_NODES = 288  # the tiny model: 1 layer, 2 * 32 act_in + 3 * 32 q/k/v + 2 * 32 resid_delta + 64 neurons
PRUNE = ("prune", "--task", "single_double_quote", "--out", "OUT/c.json", "--steps", 2, "--n-examples", 32, "--quiet")
SWEEP = ("sweep", "--tasks", "single_double_quote", "--out-dir", "OUT/sweep", "--steps", 2, "--n-examples", 32, "--quiet")


@pytest.mark.parametrize("command, flag, value, message", [
    (PRUNE, "--target-loss", "nan", "argument --target-loss: expected a finite number > 0, got 'nan'"),
    (PRUNE, "--target-loss", "-1", "argument --target-loss: expected a finite number > 0, got '-1'"),
    (PRUNE, "--target-loss", "0", "expected a finite number > 0"),
    (PRUNE, "--target-loss", "inf", "expected a finite number > 0, got 'inf'"),
    (PRUNE, "--target-above-full", "nan", "argument --target-above-full: expected a finite number >= 0, got 'nan'"),
    (PRUNE, "--target-above-full", "-0.1", "expected a finite number >= 0"),
    (PRUNE, "--k", "1000000000", f"--k 1000000000 is more than the {TINY_NODES} nodes of model"),
    (PRUNE, "--k", str(TINY_NODES + 1), f"give a size from 1 to {TINY_NODES}"),
    (PRUNE, "--k", "0", "argument --k: expected an integer >= 1, got '0'"),
    (PRUNE, "--k", "2.5", "argument --k: expected an integer >= 1, got '2.5'"),
    (PRUNE, "--steps", "0", "argument --steps: expected an integer >= 1 and <= 1,000,000"),
    (PRUNE, "--lr", "nan", "argument --lr: expected a finite number > 0"),
    (PRUNE, "--lambda", "-1", "argument --lambda: expected a finite number >= 0"),
    (PRUNE, "--batch-size", "0", "argument --batch-size: expected an integer >= 1"),
    (PRUNE, "--n-examples", "0", "argument --n-examples: expected an integer >= 8 and <= 2,048"),
    (PRUNE, "--seed", "-1", "argument --seed: expected an integer >= 0"),
    (PRUNE, "--threads", "0", "argument --threads: expected an integer >= 1"),
    (SWEEP, "--ks", "1000000000", f"--ks 1000000000 is more than the {TINY_NODES} nodes of model"),
    (SWEEP, "--ks", "8,0", "argument --ks: expected comma-separated integers >= 1, got '8,0'"),
    (SWEEP, "--ks", "8,x", "argument --ks: expected comma-separated integers >= 1"),
    (SWEEP, "--target-loss", "nan", "argument --target-loss: expected a finite number > 0"),
    (("evaluate", "--circuit", "OUT/c.json"), "--n-random", "11", "argument --n-random: expected an integer >= 1 and <= 10"),
    (("next-tokens", "--prompt", "x = 1"), "--top", "0", "argument --top: expected an integer >= 1"),
    (("tasks", "--check", "OUT/t.jsonl"), "--n-examples", "4", "argument --n-examples: expected an integer >= 8"),
])
def test_nonsense_options_are_refused_before_any_work(capsys, tiny, tmp_path, command, flag, value, message):
    argv = [str(a).replace("OUT", str(tmp_path)) for a in command]
    code, out, err = run(capsys, *argv[:1], "--model", tiny, *argv[1:], flag, value)
    assert_one_line_error(code, err, message)
    assert out == "" and list(tmp_path.iterdir()) == []  # no circuit, no folder, no index


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--density", "0"), ("--density", "1.5"), ("--lr", "nan"),
                                         ("--batch-size", "-4"), ("--warmup-frac", "2"), ("--max-minutes", "-1")])
def test_nonsense_training_options_are_refused(capsys, tmp_path, flag, value):
    code, out, err = run(capsys, "train", "--data", tmp_path, "--run-dir", tmp_path / "run", flag, value)
    assert_one_line_error(code, err, f"argument {flag}: expected")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_a_nan_target_is_refused_in_a_fresh_process(tmp_path):
    """What a shell sees: status 2 and one line, for the command of the issue."""
    proc = subprocess.run([sys.executable, "-m", "modeling_csp.cli", "prune", "--model", "default", "--task",
                           "indent_for", "--target-loss", "nan", "--out", str(tmp_path / "c.json")],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "c.json").exists()
    assert proc.stderr.strip().splitlines() == [
        "error: csp prune: argument --target-loss: expected a finite number > 0, got 'nan'"]


def test_every_json_the_cli_writes_is_strict(capsys, tiny, tmp_path):
    """Circuits, the sweep's index and every stdout line parse with a parser that refuses NaN and Infinity."""
    from modeling_csp.utils.jsonio import loads_strict

    outputs = []
    for argv in (("prune", "--model", tiny, "--task", "single_double_quote", "--steps", 2, "--n-examples", 32, "--quiet",
                  "--target-loss", 0.5, "--out", tmp_path / "c.json"),
                 ("sweep", "--model", tiny, "--tasks", "single_double_quote", "--ks", "4,8", "--steps", 2,
                  "--n-examples", 32, "--quiet", "--target-loss", 0.5, "--out-dir", tmp_path / "sweep"),
                 ("import-viz", VIZ, tmp_path / "viz.json"),
                 ("tasks", "--check", task_file(tmp_path / "two.jsonl", QUOTE_ROWS[:2]), "--model", tiny,
                  "--n-examples", 8)):
        code, out, err = run(capsys, *argv)
        assert out.strip(), err
        outputs += out.strip().splitlines()
    assert len([loads_strict(line) for line in outputs]) == 1 + 3 + 1 + 1  # prune, sweep (target, k=4, k=8), viz, check
    files = sorted(tmp_path.rglob("*.json"))
    assert {f.name for f in files} >= {"c.json", "index.json", "single_double_quote_k4.json", "viz.json"}
    for file in files:
        loads_strict(file.read_text())
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("argv, message", [
    (("prune", "--model", "default", "--task", "indent_for", "--out", "{file}/c.json"), "--out {file}/c.json: {file} is not a folder"),
    (("import-viz", str(VIZ), "{dir}"), "OUT {dir}: is a folder; give a file name"),
    (("sweep", "--model", "default", "--out-dir", "{file}/sweep"), "--out-dir {file}/sweep: {file} is not a folder"),
    (("train", "--data", "{dir}", "--run-dir", "{file}"), "--run-dir {file}: exists and is not a folder"),
    (("corpus", "--out", "{file}/corpus"), "--out {file}/corpus: {file} is not a folder"),
])
def test_an_output_that_cannot_be_written_fails_before_any_work(capsys, tmp_path, argv, message):
    """Not after minutes of pruning: the output is checked first, and nothing is created."""
    (tmp_path / "file").write_text("not a folder")
    names = {"file": tmp_path / "file", "dir": tmp_path}
    code, out, err = run(capsys, *(a.format(**names) for a in argv))
    assert_one_line_error(code, err, message.format(**names))
    assert out == "" and [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_in_a_read_only_folder_fails_before_any_work(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, out, err = run(capsys, "prune", "--model", "default", "--task", "indent_for", "--out", locked / "c.json")
    assert_one_line_error(code, err, f"--out {locked / 'c.json'}: cannot write in {locked}")


@pytest.mark.parametrize("argv, message", [
    (("train", "--d-model", "1000000"), "argument --d-model: expected an integer >= 1 and <= 65,536, got '1000000'"),
    (("train", "--n-layer", "100000"), "argument --n-layer: expected an integer >= 1 and <= 1,024"),
    (("train", "--d-mlp", "1e9"), "argument --d-mlp: expected an integer >= 1 and <= 262,144"),
    (("train", "--eval-windows", "1000000000"), "argument --eval-windows: expected an integer >= 1 and <= 65,536"),
    (("train", "--checkpoint-every", "1000000000"), "argument --checkpoint-every: expected an integer >= 1 and <= 1,000,000"),
    (("next-tokens", "--model", "default", "--prompt", "x"), "argument --top: expected an integer >= 1 and <= 50"),
    (("patch", "--model", "default", "--circuit", "c.json", "--clean", "x", "--corrupt", "y", "--candidates", "a", "b"),
     "argument --top: expected an integer >= 1 and <= 1,000,000"),
    (("patch", "--model", "default", "--circuit", "c.json", "--clean", "x", "--corrupt", "y", "--candidates", "a", "b"),
     "argument --batch-size: expected an integer >= 1 and <= 65,536"),
    (("tasks", "--check", "t.jsonl"), "argument --n-examples: expected an integer >= 8 and <= 2,048"),
    (("prune", "--model", "default", "--task", "indent_for", "--out", "c.json"), "argument --n-examples: expected an "
     "integer >= 8 and <= 2,048"),
    (("prune", "--model", "default", "--task", "indent_for", "--out", "c.json"), "argument --steps: expected an integer "
     ">= 1 and <= 1,000,000"),
])
def test_every_count_is_capped_and_the_cap_named(capsys, tmp_path, argv, message):
    flag = message.split()[1].rstrip(":")
    if argv[0] == "train":
        argv = (*argv[:1], "--data", tmp_path, "--run-dir", tmp_path / "run", *argv[1:])
    else:
        argv = (*argv, flag, "1000000000")
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err, message)
    assert out == "" and list(tmp_path.iterdir()) == []


def test_the_cli_caps_next_tokens_as_the_app_does():
    from modeling_csp import cli
    from modeling_csp.explorer.analysis import MAX_TOP

    assert cli.MAX_TOP == MAX_TOP


def test_training_a_model_larger_than_memory_is_refused_before_anything_is_allocated(capsys, tmp_path):
    """1,024 layers of width 65,536 (within each limit) would need hundreds of TiB: refused at once, no corpus read."""
    code, out, err = run(capsys, "train", "--data", tmp_path / "nowhere", "--run-dir", tmp_path / "run", "--n-layer",
                         1024, "--d-model", 65536, "--n-head", 8, "--d-head", 16, "--d-mlp", 262144)
    assert_one_line_error(code, err, "training this model (weights, gradients and optimizer state) needs about",
                          "GiB (1024 layers, d_model 65,536, vocab_size 2,048) but only")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_patch_ranks_circuit_nodes_by_their_patching_effect(capsys, tiny, tmp_path):
    """`csp patch`: the library's node effects for the circuit's nodes, largest first; errors are one line."""
    from modeling_csp.circuits.patching import patch_prompts
    from modeling_csp.model.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny))
    half_masks = {loc: torch.arange(m.numel()) % 3 == 0 for loc, m in all_kept(model.config).items()}
    circuit = CircuitGraph.from_masks(model, half_masks, model_name="tiny").save(tmp_path / "third.json")
    argv = ["patch", "--model", tiny, "--circuit", circuit, "--clean", "x = 'a", "--corrupt", 'x = "a', "--candidates", "'", '"']
    code, out, _ = run(capsys, *argv)
    answer = one_json(out)
    expected = patch_prompts(model, tokenizer, "x = 'a", 'x = "a', ["'", '"'], CircuitGraph.load(circuit).nodes).result
    assert code == 0 and answer["n_nodes"] == len(expected.effects) == len(answer["ranked"])
    assert answer["clean"] == pytest.approx(expected.clean, abs=1e-5)
    assert answer["corrupt"] == pytest.approx(expected.corrupt, abs=1e-5)
    effects = [row["effect"] for row in answer["ranked"]]
    assert [abs(e) for e in effects] == sorted((abs(e) for e in effects), reverse=True)
    for row in answer["ranked"]:
        assert row["effect"] == pytest.approx(expected.effects[row["node"]], abs=1e-4)
    assert answer["clean_tokens"] == ["x", " =", " '", "a"] and answer["corrupt_tokens"][2] == ' "'
    code, out, _ = run(capsys, *argv, "--top", 2)
    assert code == 0 and one_json(out)["ranked"] == answer["ranked"][:2]

    code, _, err = run(capsys, *argv[:5], "--clean", "x = 'abc", "--corrupt", 'x = "a', "--candidates", "'", '"')
    assert_one_line_error(code, err, "the clean prompt has 5 tokens and the corrupted one 4")
    code, _, err = run(capsys, *argv[:5], "--clean", "", "--corrupt", 'x = "a', "--candidates", "'", '"')
    assert_one_line_error(code, err, "the clean prompt is empty")
    code, _, err = run(capsys, *argv[:5], "--clean", "x = 'a", "--corrupt", 'x = "a', "--candidates", "'", "'")
    assert_one_line_error(code, err, "both candidates are the token")
    code, _, err = run(capsys, *argv[:5], "--clean", "x = 'a", "--corrupt", 'x = "a', "--candidates", " hello world", '"')
    assert_one_line_error(code, err, "candidate A ' hello world' is", "give a single token")
    code, _, err = run(capsys, "patch", "--model", tiny, "--circuit", "nope", *argv[5:])
    assert_one_line_error(code, err, "--circuit 'nope' is neither a file nor a circuit shipped with model")


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(), reason="the default model is not installed")
def test_patch_takes_a_circuit_shipped_with_the_model(capsys):
    code, out, _ = run(capsys, "patch", "--model", "default", "--circuit", "bracket_brace_k8", "--clean", "x = 'a",
                       "--corrupt", 'x = "a', "--candidates", "'", '"')
    answer = one_json(out)
    assert code == 0 and answer["task"] == "bracket_brace" and len(answer["ranked"]) == answer["n_nodes"] == 8
    assert answer["clean"] > 0 > answer["corrupt"]  # the model prefers the quote that opened the string
# ---- issue 22: a circuit on another model of its shape (csp evaluate), and csp check for CI

SHIPPED_OK = DEFAULT_MODEL / "circuits" / "while_return_true.json"  # held-out loss 0.064, target 0.15
SHIPPED_SMALL = DEFAULT_MODEL / "circuits" / "if_ternary_k8.json"  # 2.attn.v:52 -> 2.attn.resid_delta:25 carries it


@pytest.fixture(scope="module")
def edited_default(tmp_path_factory):
    """The default model with one weight of if_ternary_k8 scaled, saved as a folder: a stand-in fine-tuned copy."""
    from modeling_csp.model.loading import load_model_and_tokenizer
    from modeling_csp.model.saving import save_model_folder

    model, _ = load_model_and_tokenizer("default")
    with torch.no_grad():
        model.transformer.h[2].attn.c_proj.weight[25, 52] *= 0.2
    return save_model_folder(model, tmp_path_factory.mktemp("edited") / "edited", tokenizer_json_dir=DEFAULT_MODEL)


@pytest.mark.skipif(not SHIPPED_OK.is_file(), reason="the default model is not installed")
def test_evaluate_on_another_model_says_where_it_was_pruned_and_what_changed(capsys, edited_default):
    code, out, err = run(capsys, "evaluate", "--model", edited_default, "--circuit", SHIPPED_SMALL, "--n-random", 1)
    result = one_json(out)
    assert code == 1  # an 8-node circuit misses its target, here as on the model it was pruned on
    assert f"note: pruned on 'default' (weights {result['transfer']['pruned_on']['weights_hash']}), evaluated on " \
           f"'{edited_default}'" in err
    transfer = result["transfer"]
    assert not transfer["same_weights"] and transfer["evaluated_on"]["name"] == str(edited_default)
    assert {c["node"] for c in transfer["changed_nodes"][:2]} == {"2.attn.v:52", "2.attn.resid_delta:25"}
    assert result["verdict"]["target"] == CircuitGraph.load(SHIPPED_SMALL).target_loss


@pytest.mark.skipif(not SHIPPED_OK.is_file(), reason="the default model is not installed")
def test_check_exits_0_when_the_circuit_holds_1_when_not_2_on_bad_input(capsys, edited_default, tiny, tmp_path):
    code, out, err = run(capsys, "check", "--model", "default", "--circuit", SHIPPED_OK, "--max-loss", 0.15)
    assert code == 0 and out.startswith("ok: while_return_true circuit (117 nodes) pruned on 'default'"), err
    assert len(out.splitlines()) == 1 and "held-out loss 0.06" in out

    code, out, _ = run(capsys, "check", "--model", "default", "--circuit", SHIPPED_OK, "--max-loss", 0.01)
    assert code == 1 and out.startswith("fail: ") and "> --max-loss 0.01" in out and len(out.splitlines()) == 1

    code, out, _ = run(capsys, "check", "--model", edited_default, "--circuit", SHIPPED_SMALL, "--max-loss", 5)
    assert code == 1 and "evaluated on" in out and "target not reached" in out  # its own verdict fails

    code, _, err = run(capsys, "check", "--model", tiny, "--circuit", SHIPPED_OK, "--max-loss", 0.15)
    assert_one_line_error(code, err, "circuit was made for model 'default' (n_layer=4, d_model=128",
                          f"not '{tiny}' (n_layer=1, d_model=32", "same shape")
    code, _, err = run(capsys, "check", "--model", "default", "--circuit", tmp_path / "none.json", "--max-loss", 0.1)
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(capsys, "check", "--model", "default", "--circuit", SHIPPED_OK, "--max-loss", "nan")
    assert_one_line_error(code, err, "--max-loss")
def test_node_explains_a_circuit_node(capsys):
    """`csp node`: a shipped circuit by name or a file; the walk, why_node, logit effects and drivers of one node,
    the library's `describe_node` numbers; a node outside the circuit is a one-line error naming some it has."""
    from modeling_csp.circuits.logit_effects import direct_logit_effects

    circuit_file = DEFAULT_MODEL / "circuits" / "bracket_brace_k8.json"
    circuit = CircuitGraph.from_dict(json.loads(circuit_file.read_text()))
    write = next(n for n in circuit.nodes if ".attn.v:" in n)  # both: writes through OV, reads its values
    code, out, _ = run(capsys, "node", "--model", "default", "--circuit", "bracket_brace_k8", write, "--top", 3)
    report = one_json(out)
    assert code == 0 and report["node"] == write and report["circuit"].endswith("bracket_brace_k8.json")
    assert set(report["downstream"]["nodes"]) == {e.target for e in circuit.edges if e.source == write}
    fx = report["logit_effects"]
    assert len(fx["up"]) == len(fx["down"]) == 3 and 0 < fx["norm_scale"] and "OV path" in fx["path"]
    from modeling_csp.model.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("default")
    expected = direct_logit_effects(model, write, 3, fx["norm_scale"])
    assert [r["id"] for r in fx["up"]] == [i for i, _ in expected.up]
    assert [r["logit"] for r in fx["down"]] == pytest.approx([v for _, v in expected.down], abs=1e-5)
    assert len(report["drivers"]["tokens_up"]) == 3 and isinstance(report["drivers"]["tokens_up"][0]["token"], str)

    reader = next(n for n in circuit.nodes if any(e.target == n for e in circuit.edges) and ".attn.k:" in n)
    code, out, _ = run(capsys, "node", "--model", "default", "--circuit", circuit_file, reader)
    report = one_json(out)
    assert code == 0 and report["logit_effects"] is None and report["why"]  # k: no path to the logits; has inputs
    assert {r["source"] for r in report["why"]} == {e.source for e in circuit.edges if e.target == reader}

    code, _, err = run(capsys, "node", "--model", "default", "--circuit", circuit_file, "1.attn.v:21")
    assert_one_line_error(code, err, "not in the circuit", "such as")
    code, _, err = run(capsys, "node", "--model", "default", "--circuit", "no_such_circuit", write)
    assert_one_line_error(code, err, "neither a file nor a circuit shipped", "csp circuits")
    code, _, err = run(capsys, "node", "--model", "default", "--circuit", circuit_file, "1.attn.v")
    assert_one_line_error(code, err, "bad node id")
# ---- issue 22: csp index-examples


def test_index_examples_writes_an_index_the_library_loads(capsys, tiny, tmp_path):
    from modeling_csp.circuits.example_index import ExampleIndex
    from modeling_csp.model.loading import load_model_and_tokenizer

    code, out, err = run(capsys, "index-examples", tiny, "--tokens", 4096, "--out", tmp_path / "idx")
    assert code == 0, err
    report = one_json(out)
    assert report["n_tokens"] == 4096 and report["text"].startswith("66 held-out CPython stdlib files")
    assert report["bytes"] == sum(f.stat().st_size for f in (tmp_path / "idx").iterdir())
    assert "indexing examples (2 passes)" in err and "2/2" in err  # the progress bar: one batch of 32 windows, 2 passes
    model, _ = load_model_and_tokenizer(str(tiny))
    index = ExampleIndex.load(tmp_path / "idx", model)
    assert index.meta["weights_hash"] == report["weights_hash"] and index.density.numel() == report["nodes"]


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "50000000"], "--tokens: expected an integer >= 1024 and <= 20,000,000, got '50000000'"),
    (["--tokens", "10"], "--tokens: expected an integer >= 1024"),
    (["--corpus", "{tmp}"], "has no val_extra.npy; build the corpus with `csp corpus --out"),
])
def test_index_examples_refuses_bad_counts_and_corpora(capsys, tiny, tmp_path, argv, message):
    code, _, err = run(capsys, "index-examples", tiny, "--out", tmp_path / "idx", *[a.format(tmp=tmp_path) for a in argv])
    assert_one_line_error(code, err, message)


def test_prune_uses_every_core_where_single_passes_of_a_small_model_use_one():
    """A prune's batched passes gain from threads (BENCHMARKS.md); a small model's single passes do not."""
    from modeling_csp.cli import SMALL_MODEL_D, _set_threads, build_parser

    small = CSPConfig(d_model=SMALL_MODEL_D, n_head=8)
    torch.set_num_threads(2)  # as torch starts on a 2-core machine (the fixture restores the count)
    prune = build_parser().parse_args(["prune", "--model", "default", "--task", "single_double_quote", "--out", "c.json"])
    _set_threads(prune, small)
    assert torch.get_num_threads() == 2
    _set_threads(build_parser().parse_args(["next-tokens", "--model", "default", "--prompt", "x"]), small)
    assert torch.get_num_threads() == 1
    _set_threads(build_parser().parse_args(["prune", "--model", "default", "--task", "single_double_quote", "--out", "c.json", "--threads", "1"]), small)
    assert torch.get_num_threads() == 1
