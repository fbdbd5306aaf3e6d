"""`modeling_csp.explorer.analysis`: what the app computes about a circuit, as typed results (no Gradio).

Imports and bad input run on the converted `rms_sink_bigram` fixture; circuits at k, losses, node data,
attention, ablations, predictions and pruning on the embedded default model (or $CSP_APP_TEST_MODEL) with the
small circuit of `conftest.build_test_circuit`.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURES, TEST_TASK
from modeling_csp.circuits.graph import parse_node_id
from modeling_csp.circuits.evaluation import MAX_EXAMPLES, verdict_of
from modeling_csp.explorer import analysis as A
from modeling_csp.explorer.errors import UserError
from modeling_csp.explorer.explorer import Explorer, Settings
from modeling_csp.explorer.models import import_run_file

TASK = TEST_TASK


@pytest.fixture(scope="module")
def explorer():
    """The library's explorer: any folder, saved runs in memory only."""
    return Explorer()


# ---- on the converted fixture ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def entry(explorer, converted):
    return explorer.get_model(str(converted["rms_sink_bigram"]))


def test_imported_viz_fixture(entry):
    run = import_run_file(entry, str(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"))
    c = run.circuit
    assert c.n_nodes == 93 and c.n_edges == 76
    assert A.circuit_at_k(entry, run, None) is c and A.max_k(entry, run) == 93
    sub = A.circuit_at_k(entry, run, 10)
    assert sub.n_nodes == 10 and all(e.source in sub.nodes and e.target in sub.nodes for e in sub.edges)
    assert A.circuit_at_k(entry, run, 10) is sub  # cached per model, run and k
    # the file's task activations (its task is not one of ours): two halves, at most 5 each
    node = next(n for n in c.nodes if (c.node_data or {}).get(n, {}).get("top"))
    acts = A.task_activations(entry, run, c, node, None)
    assert [len(x) for x in acts.classes] == [5, 5] and "first half" in acts.names[0]
    assert all(len(r.tokens) == len(r.values) for cls in acts.classes for r in cls)


def test_bad_prompts(entry):
    with pytest.raises(UserError, match="empty"):
        A.encode_prompt(entry, "")
    with pytest.raises(UserError, match="empty"):
        A.encode_prompt(entry, "\x00\x01")
    text, notices = A.clean_prompt("a\x00b\tc\n")
    assert text == "ab\tc\n" and "control" in notices[0]
    text, notices = A.clean_prompt("x" * (A.MAX_PROMPT_CHARS + 10))
    assert len(text) == A.MAX_PROMPT_CHARS and "kept the last" in notices[0]
    ids, notices = A.encode_prompt(entry, "a" * 5000)
    assert len(ids) == entry.config.block_size and "kept the last" in notices[0]
    with pytest.raises(UserError, match="not a node id"):
        A.predict(entry, "aaa", None, "nonsense")


def test_clamp():
    assert A.clamp(5, 1, 10, "k") == (5, None)
    assert A.clamp("7", 1, 10, "k") == (7, None)
    assert A.clamp(99999, 1, 10, "k") == (10, "k=99999 is outside [1, 10]: using 10")
    assert A.clamp(-5, 1, 10, "k")[0] == 1
    assert A.clamp(3.6, 1, 10, "k") == (4, "k=3.6 is not a whole number: using 4")
    for bad in ("abc", None, float("nan"), float("inf"), [1]):
        with pytest.raises(UserError, match="not a number"):
            A.clamp(bad, 1, 10, "k")


# ---- on the test model with the test circuit ---------------------------------------------------------


@pytest.fixture(scope="module")
def model_run(explorer, test_circuit):
    spec, path = test_circuit
    entry = explorer.get_model(spec)
    return entry, import_run_file(entry, str(path))


def test_activating_examples_five_per_side_with_wide_context(model_run):
    entry, run = model_run
    circuit = run.circuit
    node = max(circuit.nodes, key=lambda n: circuit.nodes[n] or 0)
    ex = A.node_examples(entry, circuit, node)
    index, on_disk = A.node_index(entry)
    assert on_disk and ex.source == f"example index over {index.n_tokens:,} held-out tokens"  # the shipped index
    assert sorted(ex.samples) == [0.001, 0.01, 0.1, 0.5]
    for q in ex.samples.values():
        for side in ("top", "bottom"):
            assert len(q[side]) == A.EXAMPLES_PER_SIDE
            for e in q[side]:
                assert len(e["tokens"]) == len(e["activations"]) and 0 <= e["position"] < len(e["tokens"])
    widths = [len(e["tokens"]) for q in ex.samples.values() for side in q.values() for e in side]
    assert max(widths) == A.CONTEXT_BEFORE + A.CONTEXT_AFTER + 1  # about 50 tokens around the peak
    peak = lambda e: e["activations"][e["position"]]  # noqa: E731
    assert peak(ex.samples[0.001]["top"][0]) >= peak(ex.samples[0.5]["top"][0]) >= peak(ex.samples[0.001]["bottom"][0])


def test_histogram_and_density_of_a_node_from_the_example_index(model_run):
    entry, run = model_run
    node = next(iter(run.circuit.nodes))
    stats = A.node_activation_stats(entry, node)
    index, _ = A.node_index(entry)
    assert index.n_tokens >= 1_000_000 and sum(stats.counts) == index.n_tokens
    assert len(stats.edges) == len(stats.counts) + 1 and 0 <= stats.density <= 1 and stats.source.startswith("example index")


def test_without_an_index_the_app_builds_a_small_one_once_and_caches_it(converted, tmp_path):
    entry = Explorer(Settings(cache_dir=tmp_path, pretrain_tokens=1024)).get_model(str(converted["rms_sink_bigram"]))
    stats = A.node_activation_stats(entry, "0.mlp.post_act:3")
    index, full = A.node_index(entry)
    assert not full and stats.source.startswith("app's example index") and "csp index-examples" in stats.source
    assert sum(stats.counts) == index.n_tokens == entry.pretrain_tokens
    assert sorted(entry.prepare().computed) == ["index", "means"]
    restarted = Explorer(Settings(cache_dir=tmp_path, pretrain_tokens=1024)).get_model(str(converted["rms_sink_bigram"]))
    assert A.node_activation_stats(restarted, "0.mlp.post_act:3") == stats and restarted.prepare().computed == []
    with pytest.raises(ValueError, match="not a node of the indexed model"):
        A.node_activation_stats(entry, "0.mlp.post_act:100000")


def test_task_activations_name_the_classes_and_pair_them(model_run):
    entry, run = model_run
    node = next(iter(run.circuit.nodes))
    acts = A.task_activations(entry, run, run.circuit, node, TASK)
    assert [len(c) for c in acts.classes] == [5, 5]
    assert acts.names[0].startswith("class 1: correct «") and acts.names[1].startswith("class 2: correct «")
    first = acts.classes[0][0]
    assert len(first.tokens) == len(first.values) and "".join(first.tokens).strip()
    diffs = acts.pair_differences()
    a, b = acts.classes[0][0], acts.classes[1][0]
    n = min(len(a.values), len(b.values))
    assert len(diffs) == 5 and diffs[0].values == pytest.approx([x - y for x, y in zip(a.values[-n:], b.values[-n:])])


def test_attention_for_every_attention_node(model_run):
    """Every attention node (act_in, q, k, v, resid_delta) shows its head's attention on the task's examples;
    q and k channels also their own q·k contribution; MLP nodes have none."""
    entry, run = model_run
    circuit = run.circuit
    kinds = {}
    for n in circuit.nodes:
        kinds.setdefault(parse_node_id(n)[0].split(".", 1)[1], n)
    assert {"attn.act_in", "attn.q", "attn.k", "attn.v", "attn.resid_delta"} <= set(kinds)
    for kind, node in kinds.items():
        att = A.head_attention(entry, run, circuit, node, TASK)
        if not kind.startswith("attn"):
            assert att is None
            continue
        assert len(att.rows) == 10 and {r.class_index for r in att.rows} == {0, 1}
        for r in att.rows:
            assert len(r.weights) == len(r.tokens)
            assert sum(r.weights) + (r.sink or 0) == pytest.approx(1, abs=1e-4)
        T = len(att.tokens)
        assert len(att.pattern) == T and len(att.pattern[0]) == T + att.sink
        assert (att.contrib is not None) == (kind in ("attn.q", "attn.k"))
        if kind in ("attn.q", "attn.k", "attn.v"):
            assert att.head == parse_node_id(node)[1] // entry.d_head
    with pytest.raises(UserError, match="choose a task"):
        A.head_attention(entry, run, circuit, kinds["attn.q"], None)


def test_circuit_at_k_stats_and_curve(model_run):
    entry, run = model_run
    full = run.circuit
    assert A.circuit_at_k(entry, run, full.n_nodes) is full
    sub = A.circuit_at_k(entry, run, 10)
    ranked = sorted(full.nodes, key=lambda n: -(full.nodes[n] if full.nodes[n] is not None else -1e9))
    assert set(sub.nodes) == set(ranked[:10])
    quick = A.circuit_stats(entry, run, 10, TASK, quick=True)
    assert quick.full is not None and quick.circuit is None and not quick.complete
    stats = A.circuit_stats(entry, run, 10, TASK)
    assert stats.complete and None not in (stats.circuit, stats.random, stats.complement)
    assert set(stats.layer_deltas) == {f"{l}.{p}" for l in range(entry.n_layer) for p in ("attn", "mlp")}
    assert A.circuit_stats(entry, run, 10, TASK) is stats  # cached
    curve = A.faithfulness_curve(entry, run, TASK)
    ks = [k for k, _ in curve.points]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == full.n_nodes and len(curve.random) == len(ks)
    layer = A.best_layer(entry, sub, stats.layer_deltas)
    node = A.best_node(sub, layer)
    assert node in sub.nodes and node.startswith(layer + ".")


def test_the_app_and_csp_evaluate_give_the_same_numbers(model_run, test_circuit, tmp_path, capsys, monkeypatch):
    """One evaluation routine: same examples, same random draws, frozen norm scales honoured."""
    from modeling_csp.cli import main

    monkeypatch.setenv("CSP_CACHE_DIR", str(tmp_path / "cache"))
    entry, _ = model_run
    spec, path = test_circuit
    data = json.loads(path.read_text())
    results = {}
    for name, options in (("plain", {"n_examples": 64, "data_seed": 0}),
                          ("frozen", {"n_examples": 64, "data_seed": 0, "freeze_norm_scales": True, "n_random": 3,
                                      "seed": 7})):
        data["meta"] = {"options": options}
        file = tmp_path / f"{name}.json"
        file.write_text(json.dumps(data))
        run = import_run_file(entry, str(file))
        run.id = f"imported:{name}-same-numbers"  # distinct cache keys
        app = A.circuit_stats(entry, run, run.circuit.n_nodes, TASK)
        before = torch.get_num_threads()
        code = main(["evaluate", "--model", spec, "--task", TASK, "--circuit", str(file)])
        torch.set_num_threads(before)
        cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0 and cli["n_random"] == options.get("n_random", 5)
        # Same routine, same examples and draws; the app's cached mean activations may come from other batches than
        # the CLI's (an earlier test filled the cache), which moves float32 sums by a few 1e-6 (sdpa's masked path).
        for key in ("full", "circuit", "random", "complement"):
            assert getattr(app, key) == pytest.approx(cli[f"{key}_loss"], abs=2e-5), (name, key)
        results[name] = app
    assert results["frozen"].circuit != pytest.approx(results["plain"].circuit, abs=1e-6)  # the option is honoured


def test_sizes_from_a_circuit_file_are_capped(model_run, test_circuit, tmp_path):
    entry, _ = model_run
    data = json.loads(test_circuit[1].read_text())
    data["meta"] = {"options": {"n_examples": 100_000, "n_random": 10**7}}
    file = tmp_path / "huge_options.json"
    file.write_text(json.dumps(data))
    run = import_run_file(entry, str(file))
    run.id = "imported:huge-options"
    stats = A.circuit_stats(entry, run, run.circuit.n_nodes, TASK, quick=True)  # the full model's loss, capped
    assert stats.full is not None and stats.error is None
    assert any("n_examples=100000" in n for n in stats.notices) and any("n_random" in n for n in stats.notices)
    assert len(entry.task_batch(TASK, A._options(run))) <= MAX_EXAMPLES // 4  # the test split of the capped set


def test_ablations_importances_and_predictions(model_run):
    entry, run = model_run
    circuit = run.circuit
    first = next(iter(circuit.nodes))
    rows = A.ablation_effects(entry, run, circuit, TASK, ["0.attn", "0.mlp"], [first], "mean", "full")
    assert rows[0].baseline and rows[0].d_loss == 0 and rows[0].label == "baseline (full model)"
    assert [r.label for r in rows[1:]] == ["0.attn", "0.mlp", first, "all chosen"]
    zero = A.ablation_effects(entry, run, circuit, TASK, ["1.mlp"], [], "zero", "circuit")
    assert zero[0].label == "baseline (circuit)"
    for layers, nodes, message in (([], [], "at least one"), ([], ["0.mlp.post_act:999999"], "does not exist"),
                                   (["9.attn"], [], "no layer"), ([], ["junk"], "not a node id"),
                                   ([], [f"0.mlp.post_act:{i}" for i in range(A.MAX_ABLATE_NODES + 1)], "at most")):
        with pytest.raises(UserError, match=message):
            A.ablation_effects(entry, run, circuit, TASK, layers, nodes, "mean", "full")
    with pytest.raises(UserError, match="choose a task"):
        A.ablation_effects(entry, run, circuit, None, ["0.attn"], [], "mean", "full")
    calls = []
    imps, method = A.live_importances(entry, run, circuit, TASK, progress=lambda done, total: calls.append((done, total)))
    assert set(imps) == set(circuit.nodes) and method == "exact"
    assert calls[-1] == (circuit.n_nodes, circuit.n_nodes)  # after each pass of up to 16 nodes
    assert [done for done, _ in calls] == [min(n, circuit.n_nodes) for n in range(16, circuit.n_nodes + 16, 16)]
    node = next(n for n in circuit.nodes if ".mlp.post_act:" in n)
    r = A.predict(entry, 'x = "hello', circuit, node, ('"', "'"))
    assert len(r.full) == len(r.circuit) == 10 and len(r.node_acts) == len(r.tokens)
    assert r.logit_diff.a == '"' and r.logit_note is None
    spaces = A.predict(entry, "    ", None, candidates=("", "'"))  # whitespace is context; one candidate is no pair
    assert spaces.full and spaces.logit_diff is None and "both boxes" in spaces.logit_note


def test_next_tokens_clamps_k_with_a_notice(model_run):
    """The `/next_tokens` answer: the full model's top tokens, and the circuit's at the run's k or a smaller k."""
    entry, run = model_run
    plain = A.next_tokens(entry, 'x = "hello', top=5)
    assert plain["run"] is None and plain["circuit"] is None and plain["circuit_nodes"] is None
    assert len(plain["full"]) == 5 and plain["full"][0]["prob"] >= plain["full"][-1]["prob"]
    out = A.next_tokens(entry, 'x = "hello', run)
    assert out["run"] == run.id and out["circuit_nodes"] == run.circuit.n_nodes and out["notices"] == []
    small = A.next_tokens(entry, 'x = "hello', run, k=5)
    assert small["circuit_nodes"] == 5 and small["circuit"] != out["circuit"]
    for k, used in ((-5, 1), (99999, run.circuit.n_nodes)):
        clamped = A.next_tokens(entry, 'x = "hello', run, k=k)
        assert clamped["circuit_nodes"] == used and f"k={k} is outside" in clamped["notices"][0]
    with pytest.raises(UserError, match="not a number"):
        A.next_tokens(entry, "x", run, k="many")
    assert len(A.next_tokens(entry, "x", top=10**6)["full"]) == A.MAX_TOP


def test_pruning_says_beforehand_when_the_target_is_out_of_reach(model_run):
    """Before pruning: a target under the full model's held-out loss is out of reach, one at or above chance
    (ln 2) is refused, absolute or relative, and no message calls a target at or above chance reachable."""
    import math

    entry, _ = model_run
    fulls = {task: A.full_loss(entry, task, A.EvalOptions()) for task in A.task_names()}
    good = min(fulls, key=fulls.get)  # the task the model does best, and one it does not do at all
    bad = max(fulls, key=fulls.get)
    assert fulls[good] < 0.5 and fulls[bad] >= math.log(2)
    strict = A.prune_target(entry, good, 0.5 * fulls[good])
    suggested = min(1.2 * fulls[good], (fulls[good] + math.log(2)) / 2)
    assert not strict.reachable and strict.message.startswith("⚠️") and f"= {suggested:.3f} nats" in strict.message
    relative = A.prune_target(entry, good, 1.2, relative=True)
    assert relative.reachable and relative.target == pytest.approx(1.2 * fulls[good]) and "1.20 ×" in relative.message
    hopeless = A.prune_target(entry, bad, 0.15)
    assert not hopeless.reachable and "at or above chance" in hopeless.message and "within reach" not in hopeless.message
    for target, relative in ((math.log(2), False), (0.8, False), (1.2, True)):
        with pytest.raises(UserError, match=r"at or above chance \(ln 2 = 0\.693"):
            A.prune_target(entry, bad, target, relative)
    with pytest.raises(UserError, match=f"{fulls[bad]:.3f}, itself at or above chance"):
        A.prune_target(entry, bad, 1.2, True)
    for task, full in fulls.items():  # 1.2 x the full model: refused, or a target under chance
        try:
            goal = A.prune_target(entry, task, 1.2, relative=True)
        except UserError as exc:
            assert 1.2 * full >= math.log(2) and "at or above chance" in str(exc)
        else:
            assert goal.target < math.log(2) and goal.reachable
    for target, relative, message in ((0, False, "between 0 and 10"), (12, False, "between 0 and 10"),
                                      ("x", False, "not a number"), ("nan", False, "not a number"),
                                      (50, True, "factor")):
        with pytest.raises(UserError, match=message):
            A.prune_target(entry, "with_as", target, relative)
    with pytest.raises(UserError, match="choose a task"):
        A.prune_target(entry, None, 0.15)


def test_two_users_at_once_prune_and_browse_the_same_model(model_run):
    """One user prunes (minutes of masked forwards on the shared model) while another asks for predictions with
    and without a circuit: the second gets the answers it gets alone, and the pruning run is unaffected."""
    from concurrent.futures import ThreadPoolExecutor

    entry, run = model_run
    alone = [A.next_tokens(entry, 'x = "hello', run, k=5), A.next_tokens(entry, "def f(x):\n    return x")]
    calls = []
    with ThreadPoolExecutor(2) as pool:
        # a task the model does but ships no circuit for (on one it fails, such as with_as, the empty circuit
        # can already be within 1.2x of the full model's loss)
        pruning = pool.submit(A.prune_circuit, entry, "single_double_quote", 1.2, A.MIN_PRUNE_STEPS, True,
                              lambda fraction, desc: calls.append((fraction, desc)))
        during = []
        while not pruning.done() or not during:
            during.append([A.next_tokens(entry, 'x = "hello', run, k=5), A.next_tokens(entry, "def f(x):\n    return x")])
        outcome = pruning.result()
    assert all(answers == alone for answers in during)
    assert outcome.run.circuit.n_nodes > 0 and outcome.run.circuit.task == "single_double_quote"
    assert all(p.grad is None for p in entry.model.parameters())
    # the progress the app shows: every stage in order, with its counts
    stages = list(dict.fromkeys(desc.split(":")[0] for _, desc in calls))
    assert stages == ["mean activations", "pruning worker", "data", "mask training", "k bisection", "evaluation"], stages
    assert f"mask training: step {A.MIN_PRUNE_STEPS} of {A.MIN_PRUNE_STEPS}" in [d for _, d in calls]
    assert [f for f, _ in calls] == sorted(f for f, _ in calls) and calls[-1][0] == 1.0
    # the message is the held-out verdict: ✅ only when the circuit meets its target there
    c, verdict = outcome.run.circuit, verdict_of(outcome.run.circuit)
    assert outcome.reached == bool(verdict.passed and c.n_nodes <= entry.n_total_nodes / 2)
    assert outcome.message.startswith("✅") == outcome.reached
    assert f"{c.losses['circuit']:.3f}" in outcome.message and verdict.messages(without=("control",))[0][1:] in outcome.message


def test_a_prune_waits_for_a_free_worker_and_a_failing_worker_is_one_line(model_run, tmp_path, monkeypatch):
    """Pruning runs in a worker process, at most `prune_slots` at once: a prune beyond that says it waits; a worker
    that fails (here its model folder is gone) comes back as one line, and the slot is free again."""
    import threading

    from modeling_csp.circuits.pruning import PruneConfig

    entry, _ = model_run
    monkeypatch.setattr(entry, "folder", str(tmp_path / "gone"))
    said, outcome = [], {}

    def prune():
        try:
            A.prune_in_worker(entry, entry.tasks.resolve(TASK), PruneConfig(steps=10), None,
                              lambda fraction, desc: said.append(desc))
        except UserError as exc:
            outcome["error"] = str(exc)

    assert entry.prune_slots.acquire(blocking=False)  # another prune holds the only slot
    waiting = threading.Thread(target=prune)
    waiting.start()
    waiting.join(2)
    assert waiting.is_alive() and said == ["pruning worker: waiting for another prune on this server to finish"]
    entry.prune_slots.release()
    waiting.join(300)
    assert said[-1] == "pruning worker: starting (it loads the model)"
    assert "\n" not in outcome["error"] and "gone" in outcome["error"], outcome
    assert entry.prune_slots.acquire(blocking=False)
    entry.prune_slots.release()
