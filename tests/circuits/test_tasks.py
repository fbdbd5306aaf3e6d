"""The task registry, datasets (tokenizing, padding, splitting) and task files (`modeling_csp.circuits.tasks`), with
the offline GPT-2-style tokenizer fixture. The built-in tasks' labels are tested in test_task_generators.py."""

import random

import pytest
import torch

from modeling_csp.circuits.tasks import TaskExample, get_task, make_task_dataset, task_from_pairs


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError, match="no_such_task") as info:
        get_task("no_such_task")
    assert "bracket_counting" in str(info.value)


def test_deterministic(fixture_tiktoken):
    a = make_task_dataset("bracket_counting", fixture_tiktoken, n=64, seed=3)
    b = make_task_dataset("bracket_counting", fixture_tiktoken, n=64, seed=3)
    c = make_task_dataset("bracket_counting", fixture_tiktoken, n=64, seed=4)
    assert torch.equal(a.train.input_ids, b.train.input_ids) and torch.equal(a.test.correct_ids, b.test.correct_ids)
    assert a.train.examples == b.train.examples
    assert a.train.examples != c.train.examples


def test_user_defined_task(fixture_tiktoken):
    pairs = [
        ("x = 'abc", "'", '"'),
        ('x = "abc', '"', "'"),
        ("y = [1, 2", "]", "}"),
        ("y = {1, 2", "}", "]"),
        ("return 'text", "'", '"'),
        ('return "text', '"', "'"),
    ]
    task = task_from_pairs("my_quotes", pairs, description="mine")
    assert task.generate(random.Random(0)) in [TaskExample(*p) for p in pairs]
    data = make_task_dataset(task, fixture_tiktoken, n=100, seed=0, test_fraction=0.5)
    assert data.name == "my_quotes" and data.n_dropped == 0
    kept = data.train.examples + data.test.examples
    assert sorted((e.prompt, e.correct, e.alternative) for e in kept) == sorted(pairs)  # pool of 6: all kept once
    for ex, c in zip(data.train.examples, data.train.correct_ids.tolist()):
        assert fixture_tiktoken.decode([c]) == ex.correct


def test_untokenizable_task_raises(fixture_tiktoken):
    # "]]" is no token of the fixture vocabulary and "(self" fuses into one pre-token: nothing is usable
    task = task_from_pairs("hopeless", [(f"x = [[{i}", "]]", "]") for i in range(50)] + [("def f(", "self", "x")])
    with pytest.raises(ValueError, match=r"hopeless.*51 dropped"):
        make_task_dataset(task, fixture_tiktoken, n=40)


def test_max_len_drops_long_prompts(fixture_tiktoken):
    data = make_task_dataset("set_or_string", fixture_tiktoken, n=64, max_len=40)
    assert data.n_dropped > 0
    assert data.train.input_ids.shape[1] <= 40 and data.test.input_ids.shape[1] <= 40


def test_hf_style_tokenizer(fixture_tiktoken):
    enc = fixture_tiktoken

    class HFLike:  # `encode(text, add_special_tokens=...)` and `eos_token_id`, like a transformers tokenizer
        eos_token_id = enc.eot_token

        def encode(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return enc.encode_ordinary(text)

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    class RawTokenizers:  # `tokenizers.Tokenizer`-like: returns an object with `.ids`
        def encode(self, text):
            return Encoding(enc.encode_ordinary(text))

    ref = make_task_dataset("while_return_true", enc, n=32)
    hf = make_task_dataset("while_return_true", HFLike(), n=32)
    raw = make_task_dataset("while_return_true", RawTokenizers(), n=32, pad_token_id=enc.eot_token)
    for other in (hf, raw):
        assert torch.equal(ref.train.input_ids, other.train.input_ids)
        assert torch.equal(ref.train.correct_ids, other.train.correct_ids)
    with pytest.raises(ValueError, match="pad"):
        make_task_dataset("while_return_true", RawTokenizers(), n=32)


def test_batch_to(fixture_tiktoken):
    batch = make_task_dataset("for_while", fixture_tiktoken, n=32).test.to("cpu")
    assert batch.input_ids.device.type == "cpu" and len(batch.examples) == len(batch)


# ---------------------------------------------------------------------------------------------------------
# User-defined tasks from JSON lines
# ---------------------------------------------------------------------------------------------------------


def jsonl(*rows) -> str:
    import json

    return "\n".join(r if isinstance(r, str) else json.dumps(dict(zip(("prompt", "correct", "incorrect"), r))) for r in rows)


QUOTES = [("x = 'abc", "'", '"'), ('x = "abc', '"', "'"), ("return 'text", "'", '"'), ('return "text', '"', "'")]


def test_task_from_jsonl_keeps_every_example(fixture_tiktoken):
    from modeling_csp.circuits.tasks import example_class, task_from_jsonl

    text = jsonl(*QUOTES, "", QUOTES[0])  # blank lines are skipped, an exact repeat adds nothing
    task = task_from_jsonl(text, fixture_tiktoken, max_len=128, name="quotes", source="q.jsonl")
    assert task.name == "quotes" and "4 examples" in task.description and "q.jsonl" in task.description
    data = make_task_dataset(task, fixture_tiktoken, n=100, seed=0)
    kept = data.train.examples + data.test.examples
    assert sorted((e.prompt, e.correct, e.alternative) for e in kept) == sorted(QUOTES)
    assert sorted(example_class(e) for e in kept) == [0, 0, 1, 1]


@pytest.mark.parametrize("text, message", [
    (jsonl(QUOTES[0], "{not json"), r"q\.jsonl:2: not valid JSON"),
    (jsonl(QUOTES[0], "[1, 2, 3]"), r"q\.jsonl:2: expected a JSON object"),
    (jsonl(QUOTES[0], '{"prompt": "x = 1", "correct": "a"}'), r"q\.jsonl:2: missing incorrect"),
    (jsonl(QUOTES[0], '{"prompt": "x", "correct": "a", "incorrect": "b", "note": 1}'), r"q\.jsonl:2: unknown field\(s\) note"),
    (jsonl(QUOTES[0], ("x = 'a", 3, '"')), r"q\.jsonl:2: 'correct' must be a non-empty string"),
    (jsonl(QUOTES[0], ("x = 'a", "'", "'")), r"q\.jsonl:2: 'correct' and 'incorrect' are the same"),
    (jsonl(QUOTES[0], QUOTES[1], (QUOTES[0][0], '"', "'")), r"q\.jsonl:3: the prompt of line 1 again, with other answers"),
    ("\n\n", r"q\.jsonl: no examples"),
    (jsonl(QUOTES[0], '{"prompt": "x = \\ud800", "correct": "a", "incorrect": "b"}'),
     r"q\.jsonl:2: 'prompt' holds a lone surrogate \('\\ud800'\)"),
    (jsonl(QUOTES[0], "[" * 100_000), r"q\.jsonl:2: not a task line \(JSON nested too deeply\)"),
])
def test_task_file_format_errors_name_the_line(fixture_tiktoken, text, message):
    from modeling_csp.circuits.tasks import task_from_jsonl

    with pytest.raises(ValueError, match=message):
        task_from_jsonl(text, fixture_tiktoken, max_len=128, source="q.jsonl")


def test_task_lines_end_at_newlines_only():
    """U+2028 (and the other separators `str.splitlines` breaks at) is valid inside a JSON string: the line stays
    whole, and the lines after it keep their numbers."""
    import json

    from modeling_csp.circuits.tasks import read_task_jsonl

    odd = {"prompt": "s = 'a\u2028b\x1c\x85", "correct": "'", "incorrect": '"'}
    text = jsonl(json.dumps(odd, ensure_ascii=False), QUOTES[1])
    assert [(n, ex.prompt) for n, ex in read_task_jsonl(text)] == [(1, odd["prompt"]), (2, QUOTES[1][0])]
    with pytest.raises(ValueError, match=r"^q\.jsonl:3: missing incorrect"):
        read_task_jsonl(text + '\n{"prompt": "x", "correct": "a"}', "q.jsonl")


LONG = "y = '" + "text " * 40 + "end"


def test_task_file_token_errors_name_the_line(fixture_tiktoken):
    from modeling_csp.circuits.tasks import task_from_jsonl

    def fails(rows, message, max_len=128):
        with pytest.raises(ValueError, match=message):
            task_from_jsonl(jsonl(*rows), fixture_tiktoken, max_len=max_len, source="t.jsonl")

    fails([*QUOTES, ("x = [1", "]", "]]")], r"t\.jsonl:5: incorrect '\]\]' is not a single token after the prompt \(it adds 2 tokens\)")
    fails([*QUOTES, ("def f(", "self", "x")], r"t\.jsonl:5: correct 'self' is not a single token .*merges with the end")
    fails([*QUOTES, (LONG, "'", '"')], r"t\.jsonl:5: the prompt is \d+ tokens, more than the model's context of 16",
          max_len=16)
    fails([QUOTES[0], QUOTES[2]], r"t\.jsonl: only one class: in all 2 examples the correct answer is the candidate that sorts second")
    task_from_jsonl(jsonl(*QUOTES, (LONG, "'", '"')), fixture_tiktoken, max_len=None)  # no limit given


def test_load_task_file(fixture_tiktoken, tmp_path):
    from modeling_csp.circuits.tasks import load_task_file

    path = tmp_path / "my_quotes.jsonl"
    path.write_text(jsonl(*QUOTES) + "\n")
    assert load_task_file(path, fixture_tiktoken).name == "my_quotes"
    assert load_task_file(path, fixture_tiktoken, name="other").name == "other"
    with pytest.raises(ValueError, match="does not exist"):
        load_task_file(tmp_path / "missing.jsonl", fixture_tiktoken)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_task_file(path, fixture_tiktoken)
