"""The prompt lab's research views as plain results: every head of a layer on a prompt, and circuit patching."""

from __future__ import annotations

import re

import pytest
import torch

from modeling_csp.circuits.patching import logit_difference, node_effects
from modeling_csp.explorer import lab
from modeling_csp.explorer.errors import UserError
from modeling_csp.explorer.explorer import Explorer, Settings


@pytest.fixture(scope="module")
def page(test_circuit, tmp_path_factory):
    """The explorer with the test circuit offered as a run, and what a page showing it holds."""
    spec, path = test_circuit
    explorer = Explorer(Settings(run_files=[str(path)], store_dir=tmp_path_factory.mktemp("store")))
    entry = explorer.get_model(spec)
    run = entry.runs["imported:" + path.stem]
    return {"explorer": explorer, "model": spec, "run": run.id, "k": run.circuit.n_nodes, "entry": entry,
            "circuit": run.circuit}


def test_prompt_attention_is_the_models_own_pattern(page):
    entry = page["entry"]
    att = lab.prompt_attention(entry, "def f(x):\n    return x", "1")
    ids = entry.tokenizer.encode("def f(x):\n    return x", add_special_tokens=False)
    with torch.no_grad():
        out = entry.model(torch.tensor([ids]), output_attentions=True, use_cache=False)
    torch.testing.assert_close(torch.tensor(att.patterns), out.attentions[1][0].float(), atol=1e-5, rtol=1e-5)
    assert att.tokens == entry.token_strs(ids) and len(att.patterns) == entry.config.n_head
    if entry.config.sink:  # the rows and the sink's share make one
        total = torch.tensor(att.patterns).sum(-1) + torch.tensor(att.sink)
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_attention_panel_grid_and_its_errors(page):
    p = lab.attention_panel(page["explorer"], page["model"], 'x = "a', "1")
    n_head = page["entry"].config.n_head
    assert p.layer == "1" and p.layers == [str(l) for l in range(page["entry"].n_layer)]
    assert [t.name for t in p.figure.data] == [f"head {h}" for h in range(n_head)]
    assert "csp-att-tok" in p.tokens and f"layer 1: {n_head} heads on" in p.notice
    bad = lab.attention_panel(page["explorer"], page["model"], "", "1")
    assert "the prompt is empty" in bad.notice and bad.tokens == "" and not bad.figure.data
    with pytest.raises(UserError, match="layer '99' does not exist: this model has layers 0 to"):
        lab.prompt_attention(page["entry"], "x", "99")
    assert lab.attention_panel(page["explorer"], page["model"], "x", "99").layer == "0"  # a stale pick: layer 0


def test_patching_panel_ranks_the_circuits_nodes_as_the_library_does(page):
    p = lab.patching_panel(page["explorer"], page["model"], page["run"], page["k"], "x = 'a", 'x = "a', "'", '"')
    entry, circuit = page["entry"], page["circuit"]
    tok = entry.tokenizer
    expected = node_effects(entry.model, tok.encode("x = 'a"), tok.encode('x = "a'), circuit.nodes,
                            logit_difference(tok.encode("x = 'a'")[-1], tok.encode('x = "a"')[-1]))
    assert f"{circuit.n_nodes} nodes patched" in p.notice
    trace = next(t for t in p.figure.data if t.name == "nodes")
    for (node,), colour in zip(trace.customdata, trace.marker.color):
        assert colour == pytest.approx(expected.effects[node], abs=1e-4)
    best = max(expected.effects, key=lambda n: abs(expected.effects[n]))
    assert p.ranked.index(best) < p.ranked.index("</tr>", p.ranked.index("<td>"))  # the largest effect first


@pytest.mark.parametrize("inputs, message", [
    (("x = 'ab cd", 'x = "a', "'", '"'), r"the clean prompt has [5-9] tokens and the corrupted one 4: patching needs"),
    (("", 'x = "a', "'", '"'), "the clean prompt is empty"),
    (("x = 'a", "\x00", "'", '"'), "the corrupted prompt is empty"),
    (("x = 'a", 'x = "a', " hello world", '"'), r"candidate A ' hello world' is \d+ tokens after the prompt: give a single token"),
    (("x = 'a", 'x = "a', "'", ""), "candidate B is empty"),
    (("x = 'a " * 100, 'x = "a ' * 100, "'", '"'), "more than the model's context"),
])
def test_patching_errors_are_one_line_and_clear_the_view(page, inputs, message):
    p = lab.patching_panel(page["explorer"], page["model"], page["run"], page["k"], *inputs)
    assert re.search(message, p.notice.replace("\\", "")) and "\n" not in p.notice
    assert p.ranked == "" and not any(t.name == "nodes" for t in p.figure.data)


def test_patching_needs_a_circuit(page):
    p = lab.patching_panel(page["explorer"], page["model"], None, None, "x = 'a", 'x = "a', "'", '"')
    assert "choose a pruning run" in p.notice and p.ranked == ""
