"""What the app shows, computed in-process by `modeling_csp.explorer` (no Gradio, no browser).

Bad input and imports run on the converted `rms_sink_bigram` fixture; circuits at k, losses, node data,
ablations and next-token predictions on the embedded default model (or $CSP_APP_TEST_MODEL) with the small
circuit of `conftest.build_test_circuit`.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES, TEST_TASK
from modeling_csp import explorer
from modeling_csp.circuits import CircuitGraph
from modeling_csp.explorer import UserError

TASK = TEST_TASK


# ---- on the converted fixture ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def entry(converted):
    return explorer.get_model(str(converted["rms_sink_bigram"]))


def test_imports_viz_fixture(entry):
    run = explorer.import_run_file(entry, str(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"))
    c = run.circuit
    assert c.n_nodes == 93 and c.n_edges == 76
    assert explorer.circuit_at_k(entry, run, None) is c
    sub = explorer.circuit_at_k(entry, run, 10)
    assert sub.n_nodes == 10 and all(e.source in sub.nodes and e.target in sub.nodes for e in sub.edges)
    assert explorer.max_k(entry, run) == 93
    # node panel data from the file: examples with decoded tokens, task activations in two halves
    node = next(n for n in c.nodes if (c.node_data or {}).get(n, {}).get("top"))
    samples = explorer.stored_quantile_examples(entry, c.node_data[node])
    assert set(samples) == {0.001, 0.01, 0.1, 0.5} and all(isinstance(t, str) for t in samples[0.01]["top"][0]["tokens"])
    assert explorer.node_examples(entry, c, node) == (samples, "stored with the circuit")
    c1, c2, labels, _ = explorer.task_activations(entry, c, node, None)
    assert len(c1) == len(c2) == 6
    # a q node: attention pattern (sink column first) and the channel's q.k contribution
    qnode = next(n for n in c.nodes if ".attn.q:" in n)
    pattern, contrib, toks, has_sink, head = explorer.attention_for_node(entry, qnode, [1, 2, 3, 4, 5])
    assert has_sink and len(pattern) == 5 and len(pattern[0]) == 6
    assert all(abs(sum(row) - 1) < 1e-5 for row in pattern)


def test_bad_files(entry, tmp_path):
    not_viz = tmp_path / "not_viz.pt"
    torch.save({"hello": torch.zeros(2)}, not_viz)
    with pytest.raises(UserError, match="not a viz_data.pt"):
        explorer.import_run_file(entry, str(not_viz))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    with pytest.raises(UserError, match="viz_data.pt"):
        explorer.import_run_file(entry, str(garbage))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        explorer.import_run_file(entry, str(bad_json))
    # a circuit made for another model
    other = CircuitGraph(model={"name": "other", "n_layer": 9, "d_model": 8, "d_model_in": 8, "d_mlp": 8, "n_head": 1,
                                "d_head": 8, "vocab_size": 10}, nodes={"0.mlp.post_act:1": None}, edges=[])
    path = other.save(tmp_path / "other.json")
    with pytest.raises(UserError, match="made for model"):
        explorer.import_run_file(entry, str(path))


def test_bad_prompts_and_models(entry):
    with pytest.raises(UserError, match="empty"):
        explorer.encode_prompt(entry, "")
    with pytest.raises(UserError, match="empty"):
        explorer.encode_prompt(entry, "\x00\x01 \n")
    text, notices = explorer.clean_prompt("a\x00b\tc\n")
    assert text == "ab\tc\n" and "control" in notices[0]
    ids, notices = explorer.encode_prompt(entry, "a" * 5000)
    assert len(ids) == entry.config.block_size and "kept the last" in notices[0]
    out = explorer.next_tokens_data(entry, "aaa", None)
    assert len(out["full"]) == 10 and out["circuit"] is None
    with pytest.raises(UserError, match="could not load|not a|no config"):
        explorer.get_model("/no/such/folder/anywhere")
    with pytest.raises(UserError):
        explorer.get_model("no-such-org/no-such-model-xyz")
    with pytest.raises(UserError, match="control"):
        explorer.get_model("default\x00")
    with pytest.raises(UserError, match="unknown run"):
        explorer.choose_run(entry, "shipped:nothing")
    with pytest.raises(UserError, match="channel must be in"):
        explorer.embedding_channel(entry, entry.config.d_model)
    with pytest.raises(UserError, match="choose a task"):
        explorer.prune_circuit(entry, None)
    with pytest.raises(UserError, match="between 0 and 10"):
        explorer.prune_circuit(entry, TASK, target_loss=12)


def test_session_runs(entry):
    """Runs imported or pruned in a session are offered with the model's own runs, for that model only."""
    run = explorer.import_run_file(entry, str(FIXTURES / "viz_rms_sink_bigram" / "viz_data.pt"), unique=True)
    session: dict = {}
    assert explorer.find_run(entry, session, run.id) is None
    explorer.add_session_run(session, entry, run)
    assert explorer.find_run(entry, session, run.id) is run
    assert run in explorer.session_runs(entry, session)
    assert run in explorer.runs_for_task(entry, session, run.task)
    session["model_of"][run.id] = "another model"
    assert run not in explorer.session_runs(entry, session)
    assert run not in explorer.runs_for_task(entry, session, run.task)


# ---- on the test model with the test circuit ---------------------------------------------------------


@pytest.fixture(scope="module")
def model_run(test_circuit):
    spec, path = test_circuit
    entry = explorer.get_model(spec)
    return entry, explorer.import_run_file(entry, str(path))


def test_live_examples_and_task_activations(model_run):
    entry, run = model_run
    circuit = run.circuit
    node = max(circuit.nodes, key=lambda n: circuit.nodes[n] or 0)
    samples = explorer.live_quantile_examples(entry, node)
    assert sorted(samples) == [0.001, 0.01, 0.1, 0.5]
    for frac, q in samples.items():
        for side in ("top", "bottom"):
            for ex in q[side]:
                assert len(ex["tokens"]) == len(ex["activations"]) and 0 <= ex["position"] < len(ex["tokens"])
    peak = lambda ex: ex["activations"][ex["position"]]  # noqa: E731
    assert peak(samples[0.001]["top"][0]) >= peak(samples[0.5]["top"][0]) >= peak(samples[0.001]["bottom"][0])
    assert explorer.node_examples(entry, circuit, node)[1].startswith("live")
    c1, c2, labels, (tok1, tok2) = explorer.task_activations(entry, circuit, node, TASK)
    assert c1 and c2 and all(labels) and tok1 and tok2
    # attention on a q/k node: the prompt when it encodes, else the task's first example
    ids = explorer.attention_example_ids(entry, circuit, TASK, "x = 1\n")
    assert ids == explorer.encode_prompt(entry, "x = 1\n")[0]
    assert explorer.attention_example_ids(entry, circuit, TASK, "   ")
    assert explorer.attention_example_ids(entry, circuit, None, None) is None


def test_circuit_at_k_stats_and_curve(model_run):
    entry, run = model_run
    full = run.circuit
    assert explorer.circuit_at_k(entry, run, full.n_nodes) is full
    sub = explorer.circuit_at_k(entry, run, 10)
    ranked = sorted(full.nodes, key=lambda n: -(full.nodes[n] if full.nodes[n] is not None else -1e9))
    assert set(sub.nodes) == set(ranked[:10])
    quick = explorer.circuit_stats(entry, run, 10, TASK, quick=True)
    assert quick["full"] is not None and quick["circuit"] is None and quick["pending"]
    stats = explorer.circuit_stats(entry, run, 10, TASK)
    assert stats["circuit"] is not None and stats["random"] is not None
    assert set(stats["layer_deltas"]) == {f"{l}.{p}" for l in range(entry.n_layer) for p in ("attn", "mlp")}
    curve = explorer.faithfulness_curve(entry, run, TASK)
    ks = [k for k, _ in curve["points"]]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == full.n_nodes and len(curve["random"]) == len(ks)
    layer = explorer.best_layer(entry, sub, stats["layer_deltas"])
    node = explorer.best_node(sub, layer)
    assert node in sub.nodes and node.startswith(layer + ".")


def test_ablations_and_prompt(model_run):
    entry, run = model_run
    circuit = run.circuit
    rows = explorer.ablation_effects(entry, circuit, TASK, ["0.attn", "0.mlp"], [next(iter(circuit.nodes))], "mean", "full")
    assert rows[0]["baseline"] and rows[0]["d_loss"] == 0
    assert [r["label"] for r in rows[1:]] == ["0.attn", "0.mlp", next(iter(circuit.nodes)), "all chosen"]
    assert all(isinstance(r["d_logit_diff"], float) for r in rows)
    zero = explorer.ablation_effects(entry, circuit, TASK, ["1.mlp"], [], "zero", "circuit")
    assert zero[0]["label"] == "baseline (circuit)"
    with pytest.raises(UserError):
        explorer.ablation_effects(entry, circuit, TASK, [], [], "mean", "full")
    with pytest.raises(UserError, match="does not exist"):
        explorer.ablation_effects(entry, circuit, TASK, [], ["0.mlp.post_act:999999"], "mean", "full")
    node = next(n for n in circuit.nodes if ".mlp.post_act:" in n)
    out = explorer.next_tokens_data(entry, 'x = "hello', circuit, node, ('"', "'"))
    assert len(out["full"]) == len(out["circuit"]) == 10
    assert len(out["node_acts"]) == len(out["tokens"]) and out["logit_diff"]["a"] == '"'
    imps, method = explorer.live_importances(entry, circuit, TASK)
    assert set(imps) == set(circuit.nodes) and method == "exact"


def test_next_tokens(model_run):
    """The `/next_tokens` answer: the full model's top tokens, and the circuit's at the run's k or a smaller k."""
    entry, run = model_run
    plain = explorer.next_tokens(entry, 'x = "hello', top=5)
    assert plain["run"] is None and plain["circuit"] is None and plain["circuit_nodes"] is None
    assert len(plain["full"]) == 5 and plain["full"][0]["prob"] >= plain["full"][-1]["prob"]
    assert plain["tokens"] == explorer.next_tokens_data(entry, 'x = "hello', None)["tokens"]
    out = explorer.next_tokens(entry, 'x = "hello', run)
    assert out["run"] == run.id and out["circuit_nodes"] == run.circuit.n_nodes
    assert len(out["full"]) == len(out["circuit"]) == 10 and out["full"][:5] == plain["full"]
    small = explorer.next_tokens(entry, 'x = "hello', run, k=5)
    assert small["circuit_nodes"] == 5 and small["circuit"] != out["circuit"]


def test_the_default_models_shipped_target_circuit_is_chosen_first():
    entry = explorer.get_model("default")
    shipped = [r for r in entry.runs.values() if r.source == "shipped"]
    assert shipped, "the default model ships circuits"
    for task in {r.task for r in shipped}:
        run = explorer.choose_run(entry, task=task)
        assert run.source == "shipped" and "(target loss)" in run.name
        assert run.load(entry).meta["target_reached"]
