"""`modeling_csp.explorer.panels`: the app's other panels as plain results. Each takes what the page holds, and a
problem fills its own panel with the message and clears the rest of it. On the default model (or
$CSP_APP_TEST_MODEL) with the small test circuit; pruning and imports through the server-side run store."""

from __future__ import annotations

import html
import json
import re

import pytest

from conftest import TEST_TASK, markdown_html, markdown_text, quote_task_lines
from modeling_csp.explorer import panels
from modeling_csp.explorer.explorer import Explorer, Settings
from modeling_csp.explorer.sessions import Session, find_run
from modeling_csp.explorer.view import Selection

TASK = TEST_TASK


@pytest.fixture(scope="module")
def page(test_circuit, tmp_path_factory):
    """What a page showing the test circuit holds: model, task, run id, k and a node, and the explorer behind it
    (the test circuit offered as a run of every model, as CSP_APP_IMPORT does; saved runs in a temp store)."""
    spec, path = test_circuit
    explorer = Explorer(Settings(run_files=[str(path)], store_dir=tmp_path_factory.mktemp("store")))
    entry = explorer.get_model(spec)
    run = entry.runs["imported:" + path.stem]
    node = max(run.circuit.nodes, key=lambda n: run.circuit.nodes[n] or 0)
    return {"explorer": explorer, "model": spec, "task": TASK, "run": run.id, "k": run.circuit.n_nodes, "node": node,
            "entry": entry, "path": path}


def test_node_panel(page):
    p = panels.node_panel(page["explorer"], page["model"], page["task"], page["run"], page["k"], page["node"])
    assert "incoming" in p.connections and "Top / bottom activating examples" in p.examples
    assert "pair difference" in p.task and "class 1: correct" in p.task
    # labelled with the selection it was computed for (the page paints it only while it shows that selection)
    assert p.selection == Selection.of(page["model"], page["task"], page["run"], page["k"], None, page["node"])
    assert html.escape(f"{page['node']} on {page['task']}'s examples, circuit k={p.selection.k}") in p.task
    waiting = panels.node_panel_updating(p.selection)
    assert "updating… " + page["node"] in waiting.task and "updating" not in p.task
    attn = next(n for n in find_run(page["entry"], None, page["run"]).circuit.nodes if ".attn.q:" in n)
    q = panels.node_panel(page["explorer"], page["model"], page["task"], page["run"], page["k"], attn)
    assert "head" in q.attention and q.attention_figure is not None and q.qk_figure is not None
    mlp = next(n for n in find_run(page["entry"], None, page["run"]).circuit.nodes if ".mlp." in n)
    m = panels.node_panel(page["explorer"], page["model"], page["task"], page["run"], page["k"], mlp)
    assert "shown for attention nodes" in m.attention and m.attention_figure is None
    gone = panels.node_panel(page["explorer"], page["model"], page["task"], page["run"], page["k"], "9.mlp.post_act:1")
    assert gone == panels.NodePanel(selection=gone.selection) and gone.selection.node == "9.mlp.post_act:1"
    bad = panels.node_panel(page["explorer"], "/no/such/model", page["task"], page["run"], page["k"], page["node"])
    assert "⚠️" in bad.connections and bad.examples == bad.task == ""


def test_node_panel_says_what_the_node_does(page):
    """The "What it does" part: the node's paths, why it fires and its logit effects or drivers (labelled with the
    node); "updating…" while a new selection's panel is on its way; gone for a node outside the circuit."""
    from modeling_csp.circuits.logit_effects import describe_node
    from modeling_csp.explorer.node_walk import final_norm_scale

    p = panels.node_panel(page["explorer"], page["model"], page["task"], page["run"], page["k"], page["node"])
    assert f'class="csp-reading" data-node="{page["node"]}"' in p.reading and f"Why {page['node']}" in p.reading
    entry, circuit = page["entry"], find_run(page["entry"], None, page["run"]).circuit
    report = describe_node(entry.model, entry.tokenizer, circuit, page["node"], entry.means(), final_norm_scale(entry))
    for row in report["why"]:
        assert f'data-node="{row["source"]}"' in p.reading
    if report["logit_effects"]:
        assert f"{report['logit_effects']['up'][0]['logit']:+.4g}" in p.reading
    assert "updating… " + page["node"] in panels.node_panel_updating(p.selection).reading
    gone = panels.node_panel(page["explorer"], page["model"], page["task"], page["run"], page["k"], "9.mlp.post_act:1")
    assert gone.reading == ""


def test_prompt_panel_clears_on_error(page):
    args = (page["model"], page["task"], page["run"], page["k"], page["node"])
    ok = panels.prompt_panel(page["explorer"], *args, 'x = "hello', '"', "'")
    assert ok.json["full"] and ok.json["circuit"] and "logit(" in ok.logit_diff and "csp-tok" in ok.tokens
    assert "activations of" in ok.node_acts
    err = panels.prompt_panel(page["explorer"], *args, "", '"', "'")
    assert markdown_text(err.notice) == "⚠️ the prompt is empty: type some Python code" and err.tokens == "" and err.json is None
    assert err.logit_diff == "" and err.node_acts == "" and "prompt is empty" in err.figure.layout.annotations[0].text
    spaces = panels.prompt_panel(page["explorer"], *args, "    ", "", "'")  # indentation is a prompt; one candidate is not a pair
    assert spaces.json["full"] and markdown_text(spaces.logit_diff).startswith("ℹ️ type a candidate token in both boxes")


def test_prompt_lab_shows_characters_split_over_tokens_as_text(page):
    """Byte tokens of é, 日 or 🙂 show as the whole character on the token completing it, and alone (top next
    tokens) as ⟨c3⟩-style escapes of their bytes: never U+FFFD, in the page or the `/next_tokens` answer."""
    import html
    import re

    from modeling_csp.model.tokenization import bytes_to_unicode

    prompt = 's = "héllo wörld 日本語 🙂'
    args = (page["model"], page["task"], page["run"], page["k"], page["node"])
    p = panels.prompt_panel(page["explorer"], *args, prompt, "é", "'")
    for part in (p.tokens, p.node_acts):
        shown = [html.unescape(t) for t in re.findall(r'<span class="csp-tok"[^>]*>(.*?)</span>', part)]
        assert "".join(shown) == prompt and "\ufffd" not in part
    assert "\ufffd" not in p.figure.to_json() + p.notice + p.logit_diff
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    tokenizer = page["entry"].tokenizer
    answer = panels.api_next_tokens(page["explorer"], prompt, page["model"])
    assert "".join(answer["tokens"]) == prompt
    for row in p.json["full"] + p.json["circuit"] + answer["full"]:
        token_bytes = bytes(char_to_byte[c] for c in tokenizer.convert_ids_to_tokens(row["id"]))
        parts = re.split(r"⟨([0-9a-f]{2})⟩", row["token"])
        assert b"".join(bytes.fromhex(t) if i % 2 else t.encode() for i, t in enumerate(parts)) == token_bytes, row
    assert "\ufffd" not in json.dumps(answer, ensure_ascii=False)


def test_ablation_and_importance_panels(page):
    args = (page["model"], page["task"], page["run"], page["k"])
    ok = panels.ablation_panel(page["explorer"], *args, ["0.attn"], [page["node"]], "mean", "circuit")
    assert "baseline (circuit)" in markdown_text(ok.table) and len(ok.figure.data) == 2
    err = panels.ablation_panel(page["explorer"], *args, [], [], "mean", "full model")
    assert markdown_text(err.table).startswith("⚠️ choose at least one") and "choose at least one" in err.figure.layout.annotations[0].text
    steps = []
    fig = panels.importance_panel(page["explorer"], *args, page["node"], progress=lambda done, total: steps.append(done))
    assert fig.data[0].type == "bar" and steps == [min(n, page["k"]) for n in range(16, page["k"] + 16, 16)]  # a step per pass of 16 nodes
    assert "choose a task" in panels.importance_panel(page["explorer"], page["model"], None, page["run"], page["k"], None).layout.annotations[0].text
    assert set(panels.circuit_nodes(page["explorer"], page["model"], page["run"], 5)) <= set(
        panels.circuit_nodes(page["explorer"], page["model"], page["run"], page["k"])) and panels.circuit_nodes(page["explorer"], "/no/model", None, 1) == []
    cmp = panels.compare_panel(page["explorer"], *args, page["run"])
    assert cmp.text.startswith("nodes: 0 only in") and cmp.figure.data
    assert markdown_text(panels.compare_panel(page["explorer"], *args, None).text) == "⚠️ choose a run to compare with"


def test_curves_panel_shows_the_pruning_config_and_training_metrics(page):
    p = panels.curves_panel(page["explorer"], page["model"], page["task"], page["run"], page["k"])
    assert p.faithfulness.layout.xaxis.type == "log" and p.faithfulness.layout.xaxis.tickvals
    assert "<h4>Pruning configuration</h4>" in p.details and "<td>n_examples</td><td>64</td>" in p.details
    assert "<h4>Model training: final metrics</h4>" in p.details
    if page["model"] == "default":  # the embedded model ships its training record
        curve = page["entry"].training_curve
        assert f"<td>val_loss</td><td>{curve['final']['val_loss']:.4g}</td>" in p.details
    shipped = next(r for r in page["entry"].runs.values() if r.source == "shipped") if page["model"] == "default" else None
    if shipped is not None:
        details = panels.run_details(page["entry"], shipped)
        assert "<td>target_reached</td><td>True</td>" in details and "<td>steps</td><td>200</td>" in details


def test_embeddings_panel_clamps_the_channel(page):
    p = panels.embeddings_panel(page["explorer"], page["model"], 99999)
    d = page["entry"].config.d_model
    assert p.channel == d - 1 and f"channel=99999 is outside [0, {d - 1}]" in markdown_text(p.notice) and p.tokens.data
    assert markdown_text(panels.embeddings_panel(page["explorer"], page["model"], "x").notice).startswith("⚠️ channel='x' is not a number")


def test_next_tokens_api_validates_like_the_page(page):
    ok = panels.api_next_tokens(page["explorer"], 'x = "a', page["model"], page["task"], page["run"], 5)
    assert ok["run"] == page["run"] and ok["circuit_nodes"] == 5 and ok["notices"] == []
    assert panels.api_next_tokens(page["explorer"], "x", page["model"], "nope")["error"].startswith("unknown task 'nope'")
    assert "unknown run 'nope'" in panels.api_next_tokens(page["explorer"], "x", page["model"], page["task"], "nope")["error"]
    assert "is a circuit for single_double_quote, not with_as" in panels.api_next_tokens(page["explorer"], 
        "x", page["model"], "with_as", page["run"])["error"]
    for k, used in ((-5, 1), (99999, page["k"])):
        out = panels.api_next_tokens(page["explorer"], "x", page["model"], page["task"], page["run"], k)
        assert out["circuit_nodes"] == used and f"k={k} is outside" in out["notices"][0]
    assert "not a number" in panels.api_next_tokens(page["explorer"], "x", page["model"], page["task"], page["run"], "lots")["error"]
    assert "no run for with_as" in panels.api_next_tokens(page["explorer"], "x", page["model"], "with_as", "", 3)["notices"][0]
    assert "empty" in panels.api_next_tokens(page["explorer"], "", page["model"])["error"]


def test_an_imported_run_joins_the_session_and_survives_a_reload(page, tmp_path):
    session = Session()
    new = panels.import_new_run(page["explorer"], session, page["model"], str(page["path"]), "mine.json")
    assert markdown_text(new.message).startswith("✅ imported mine.json") and new.view.run.id.startswith("saved:")
    assert new.view.session.runs == {new.view.run.id: page["model"]} and new.view.run.id in dict(
        (v, n) for n, v in new.view.run_choices)
    from modeling_csp.explorer.view import Request, resolve_view

    reloaded = resolve_view(page["explorer"], None, Request("load", query={"task": TASK}, saved=new.view.session.saved()))
    assert new.view.run.id in [v for _, v in reloaded.run_choices]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    failed = panels.import_new_run(page["explorer"], session, page["model"], str(bad), "bad.json")
    assert failed.view is None and markdown_text(failed.message).startswith("⚠️ could not import bad.json: ")
    assert markdown_text(panels.import_new_run(page["explorer"], session, page["model"], None).message).endswith("no file")
    path = panels.download_path(page["explorer"], page["model"], new.view.run.id, 5)
    assert json.loads(open(path).read())["k"] == 5


def test_an_import_with_forged_edges_says_they_were_recomputed(page, tmp_path):
    data = json.loads(open(page["path"]).read())
    data["edges"] = [{**e, "weight": 10 + e["weight"]} for e in data["edges"]]
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(data))
    new = panels.import_new_run(page["explorer"], Session(), page["model"], str(forged), "forged.json")
    assert new.view is not None and markdown_text(new.message).startswith("✅ imported forged.json")
    assert f"⚠️ {len(data['edges']):,} of {len(data['edges']):,} edges do not match the model's weights" in markdown_text(new.message)
    assert new.view.run.load().edges == find_run(page["entry"], None, page["run"]).circuit.edges


def test_pruning_from_the_page(page, tmp_path, monkeypatch):
    """Pruning warns beforehand, then a short run that misses its target says so (no ✅) and becomes a saved
    run of the session, selected in the view."""
    monkeypatch.setenv("CSP_CACHE_DIR", str(tmp_path / "cache"))
    check = panels.prune_check(page["explorer"], page["model"], "bracket_brace", 0.01, False)
    assert check.startswith("⚠️ The full model's held-out loss on bracket_brace is") and "above the target 0.010" in check
    assert "relative" in check
    assert panels.prune_check(page["explorer"], page["model"], "bracket_brace", 1.1, True).startswith("The full model's held-out loss")
    weak = panels.prune_check(page["explorer"], page["model"], "with_as", 0.1, False)  # the model does not do with_as: no target helps
    assert weak.startswith("⚠️") and "at or above chance" in weak and "within reach" not in weak
    assert markdown_text(panels.prune_check(page["explorer"], page["model"], None, 0.15, False)) == "⚠️ choose a task to prune for"
    stages = []
    new = panels.prune_new_run(page["explorer"], Session(), page["model"], "bracket_brace", 0.01, False, 3,
                               progress=lambda f, desc: stages.append(desc))
    assert markdown_text(new.message).startswith("⚠️ target not reached") and "✅" not in markdown_text(new.message)
    assert "steps=3 is outside [10, 2000]: using 10" in markdown_text(new.message)
    assert stages[0] == "mean activations" and "mask training: step 10 of 10" in stages
    assert [s.split(":")[0] for s in stages[1:]] == sorted([s.split(":")[0] for s in stages[1:]],
                                                           key=["pruning worker", "data", "mask training", "k bisection", "evaluation"].index)
    view = new.view
    assert view.task == "bracket_brace" and view.run.id.startswith("saved:") and view.run.scores is not None
    assert view.k_max == page["entry"].n_total_nodes and view.session.runs == {view.run.id: page["model"]}
    assert page["explorer"].store.load(view.run.id) is not None
    failed = panels.prune_new_run(page["explorer"], Session(), page["model"], "nope", 0.15, False, 10)
    assert failed.view is None and markdown_text(failed.message) == "⚠️ pruning failed: choose a task to prune for"


def test_your_own_task_is_checked_pruned_with_its_control_and_comes_back_by_link(page, tmp_path, monkeypatch):
    """Paste or upload task lines: the task joins the session's task list (checked: the full model's accuracy),
    a pruning run with the shuffled-answer control is browsable, and a link to it works on a server that has
    forgotten the task (the run carries its examples)."""
    from modeling_csp.circuits.evaluation import verdict_of
    from modeling_csp.explorer.view import Request, resolve_view

    monkeypatch.setenv("CSP_CACHE_DIR", str(tmp_path / "cache"))
    added = panels.add_custom_task(page["explorer"], Session(), page["model"], quote_task_lines(), None, "quotes")
    assert markdown_text(added.message).startswith("✅ added custom:quotes:") and "the full model's accuracy" in markdown_text(added.message)
    name = added.view.task
    assert name.startswith("custom:quotes:") and name in added.view.task_choices and added.view.run is None
    assert added.view.empty and "No circuit yet" in added.view.empty
    file = tmp_path / "quotes.jsonl"
    file.write_text(quote_task_lines())
    assert panels.add_custom_task(page["explorer"], Session(), page["model"], "", str(file)).view.task == name  # same lines, same name

    new = panels.prune_new_run(page["explorer"], added.view.session, page["model"], name, 1.5, True, 10, control=True)
    assert "Shuffled-answer control: loss" in new.message, new.message
    view = new.view
    assert view.task == name and view.run.task == name and name in view.task_choices
    assert "Shuffled-answer control: loss" in view.summary and f"**Task** `{name}`: your task" in view.summary
    circuit = view.run.load()
    assert circuit.control["kind"] == "shuffled" and len(circuit.meta["task_examples"]) == 40
    verdict = verdict_of(circuit)  # a custom task's circuit is judged like any other, on its held-out examples
    assert ("better than the full model" in new.message) == bool(verdict.better_than_full)
    assert new.message.startswith("✅") == bool(verdict.passed and circuit.n_nodes <= view.entry.n_total_nodes / 2)

    restarted = Explorer(page["explorer"].settings)  # a restarted server: only the run store's folder remembers
    assert not restarted.tasks.known(name)
    linked = resolve_view(restarted, None, Request("load", query={"task": name, "run": view.run.id}))
    assert linked.task == name and linked.run.id == view.run.id and not linked.notices, (linked.notices, new.message)
    assert len(linked.run.load().edges) == len(circuit.edges)  # (a large run's file leaves them out: rebuilt)


@pytest.mark.parametrize("text, message", [
    ("", "paste or upload task lines first"),
    ('{"prompt": "x = \'a", "correct": "\'"}', "line:1: missing incorrect"),
    ("not json", "line:1: not valid JSON"),
    ('{"prompt": "x = \'a", "correct": "\'", "incorrect": "\\""}', "only one class"),
    ('{"prompt": "x = \'a", "correct": "\' + 1", "incorrect": "\\""}', "line:1: correct \"' + 1\" is not a single token"),
    ("x" * 1_000_001, "up to 1 MB"),
])
def test_bad_task_lines_are_named(page, text, message):
    bad = panels.add_custom_task(page["explorer"], Session(), page["model"], text)
    shown = markdown_text(bad.message)
    assert bad.view is None and shown.startswith("⚠️") and message in shown, shown


def test_unknown_user_tasks_are_errors_not_guesses(page):
    out = panels.api_next_tokens(page["explorer"], "x = 'a", page["model"], "custom:gone:0123456789ab")
    assert "is not known here any more" in out["error"]


def test_concurrent_downloads_each_get_their_own_complete_file(page):
    """12 requests at once, 4 rounds, for the same run and k: every answer is its own file, and every file is the
    whole circuit (no request rewrites a file another is serving)."""
    from concurrent.futures import ThreadPoolExecutor

    from modeling_csp.circuits.graph import CircuitGraph

    def download(_):
        return panels.download_path(page["explorer"], page["model"], page["run"], page["k"])

    paths = []
    with ThreadPoolExecutor(12) as pool:
        for _ in range(4):
            paths += list(pool.map(download, range(12)))
    assert len(set(paths)) == 48
    expected = CircuitGraph.load(page["path"]).to_dict()
    for path in paths:
        assert CircuitGraph.load(path).to_dict() == expected


def test_old_downloads_are_removed(page):
    import os
    from pathlib import Path

    first = Path(panels.download_path(page["explorer"], page["model"], page["run"], page["k"]))
    hour_ago = first.parent.stat().st_mtime - 3600
    os.utime(first.parent, (hour_ago, hour_ago))
    second = Path(panels.download_path(page["explorer"], page["model"], page["run"], page["k"]))
    assert second.is_file() and not first.parent.exists()


MARKUP = '<img src="x.png" onerror="alert(1)"><h1>Your session expired</h1>[sign in](x) *now* `code`'


def shown_literally(markdown: str) -> str:
    """The text a Markdown component shows, after checking that no element was made of the user's text."""
    rendered = markdown_html(markdown)
    assert not re.search(r"<(img|h1|a|em)\b", rendered) and "<code>code</code>" not in rendered, rendered
    return markdown_text(markdown)


def test_user_text_stays_text_in_every_panel(page, tmp_path):
    """File names, typed node ids, candidates and task-file names come back as the characters given."""
    explorer, model = page["explorer"], page["model"]
    new = panels.import_new_run(explorer, Session(), model, str(page["path"]), MARKUP + ".json")
    assert shown_literally(new.message).startswith(f"✅ imported {MARKUP}.json")
    assert f"Run imported · {MARKUP}.json" in shown_literally(new.view.summary)
    missing = panels.import_new_run(explorer, Session(), model, str(tmp_path / "missing.json"), MARKUP)
    assert shown_literally(missing.message).startswith(f"⚠️ could not import {MARKUP}: ")
    other = panels.compare_panel(explorer, model, page["task"], new.view.run.id, page["k"], page["run"])
    assert f"only in imported · {MARKUP}.json" in shown_literally(other.text)
    file = tmp_path / '<img src=x.png><h1>tasks<h1>.jsonl'
    file.write_text(quote_task_lines())
    added = panels.add_custom_task(explorer, Session(), model, "", str(file))
    assert f"from {file.name}:" in shown_literally(added.message)
    broken = tmp_path / "<h1>broken<h1>.jsonl"
    broken.write_text("not json\n")
    assert shown_literally(panels.add_custom_task(explorer, Session(), model, "", str(broken)).message).startswith(
        "⚠️ line:1: not valid JSON")
    args = (model, page["task"], page["run"], page["k"], page["node"])
    prompt = panels.prompt_panel(explorer, *args, 'x = "hello', MARKUP, "'")
    assert shown_literally(prompt.logit_diff) and shown_literally(prompt.notice)
    ablated = panels.ablation_panel(explorer, model, page["task"], page["run"], page["k"], [], [MARKUP], "mean", "full")
    assert MARKUP in shown_literally(ablated.table)
    waiting = panels.node_panel_updating(Selection.of(model, MARKUP, page["run"], page["k"], None, MARKUP))
    assert "<img" not in waiting.task and html.escape(MARKUP) in waiting.task
    assert "<h1>" not in panels.curves_panel(explorer, MARKUP, page["task"], page["run"], page["k"]).details
    assert MARKUP in shown_literally(panels.embeddings_panel(explorer, MARKUP, 0).notice)


# ---- issue 22: a circuit through training


def test_circuit_through_training_panel(page, tmp_path):
    from modeling_csp.circuits.transfer import read_circuit_through_training

    fig = panels.circuit_through_training_panel(page["explorer"], page["model"])
    shipped = read_circuit_through_training(page["entry"].folder)
    if shipped is None:  # $CSP_APP_TEST_MODEL without the file
        assert "ships no circuit-through-training" in fig.layout.annotations[0].text
    else:  # the embedded model: one line per circuit found for the target, and the full model's beside it
        at_target = [r for r in shipped["circuits"].values() if r["at_target"]]
        assert len(fig.data) == 2 * len(at_target) + 1 and list(fig.data[0].x) == shipped["snapshots"]
    gone = panels.circuit_through_training_panel(page["explorer"], "/no/such/model")
    assert gone.layout.annotations[0].text.startswith("⚠️")
    (tmp_path / "circuit_through_training.json").write_text('{"snapshots": ["a"], "circuits": {"t": {"circuit": [NaN]}}}')
    with pytest.raises(ValueError, match="not strict JSON"):
        read_circuit_through_training(tmp_path)
    (tmp_path / "circuit_through_training.json").write_text('{"snapshots": ["a"], "circuits": {"t": {"circuit": [1, 2]}}}')
    with pytest.raises(ValueError, match="a number per snapshot"):
        read_circuit_through_training(tmp_path)
