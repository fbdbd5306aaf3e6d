"""Tests for `modeling_csp.tasks` with the offline GPT-2-style test tokenizer from the shared fixtures."""

import math
import random
import re
from pathlib import Path

import pytest
import torch

from modeling_csp.circuits.tasks import (
    Task,
    TaskExample,
    get_task,
    last_token_logits,
    list_tasks,
    make_task_dataset,
    task_accuracy,
    task_from_pairs,
    task_loss,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TOKENIZER_DIR = FIXTURES / "tokenizer_tinypython_like"
PAT_STR = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
EOT = 2047

PAPER_TASKS = [
    "single_double_quote",
    "bracket_counting",
    "set_or_string",
    "set_or_string_fixedvarname",
    "while_return_true",
]
N = 128


@pytest.fixture(scope="module")
def fixture_tiktoken():
    """tinypython_2k-like tiktoken encoding built offline from data-gym files (`get_encoding` needs network)."""
    tiktoken_load = pytest.importorskip("tiktoken.load")
    import tiktoken

    if not (TOKENIZER_DIR / "vocab.bpe").exists():
        pytest.skip(f"tokenizer fixture not found at {TOKENIZER_DIR}")
    ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(TOKENIZER_DIR / "vocab.bpe"), encoder_json_file=str(TOKENIZER_DIR / "encoder.json")
    )
    return tiktoken.Encoding(
        "tinypython_like", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT}
    )


@pytest.fixture(scope="module")
def datasets(fixture_tiktoken):
    return {t.name: make_task_dataset(t, fixture_tiktoken, n=N, seed=0) for t in list_tasks()}


# ---------------------------------------------------------------------------------------------------------
# Label checks: re-derive the right answer from the prompt text, independently of the generators.
# ---------------------------------------------------------------------------------------------------------


def _last_line(ex):
    return ex.prompt.split("\n")[-1]


def _canonical_first(enc, ex, completion):
    """First token of `completion` as the tokenizer writes it after the prompt."""
    prompt_ids = enc.encode_ordinary(ex.prompt)
    full = enc.encode_ordinary(ex.prompt + completion)
    assert full[: len(prompt_ids)] == prompt_ids
    return full[len(prompt_ids)]


def _one(enc, text):
    (tok,) = enc.encode_ordinary(text)
    return tok


def check_single_double_quote(ex, enc):
    q = [c for c in _last_line(ex) if c in "\"'"][-1]  # the open string's quote is the last one on the line
    assert ex.correct[0] == q and ex.alternative[0] != q


def check_bracket_counting(ex, enc):
    line = _last_line(ex)
    depth = line.count("[") - line.count("]")
    assert depth in (1, 2)
    assert _canonical_first(enc, ex, "]" * depth + "\n") == _one(enc, ex.correct)
    assert _canonical_first(enc, ex, "]" * (3 - depth) + "\n") == _one(enc, ex.alternative)


def check_set_or_string(ex, enc):
    var = _last_line(ex).strip()
    inits = re.findall(rf"^\s*{re.escape(var)} = (.*)$", ex.prompt, flags=re.M)
    assert inits[-1] in ("set()", '""', "''")
    assert ex.correct == (".add" if inits[-1] == "set()" else " +=")


def check_set_or_string_fixedvarname(ex, enc):
    assert _last_line(ex).strip() == "x"
    check_set_or_string(ex, enc)


def check_while_return_true(ex, enc):
    line = _last_line(ex).strip()
    assert line in ("while True", "return True")
    assert ex.correct.startswith(":") == (line == "while True")
    assert ex.correct == "\n" or ex.alternative == "\n"


def check_with_as(ex, enc):
    handle = re.findall(r" as (\w+):", ex.prompt)[-1]
    assert ex.correct == " " + handle and ex.alternative != ex.correct


def check_with_open(ex, enc):
    m = re.search(r"open\([^,)]+(?:, [\"'](\w+)[\"'])?\)", ex.prompt)
    mode = m.group(1) or "r"
    assert ex.correct == (".read" if "r" in mode else ".write")


def check_for_while(ex, enc):
    keyword = _last_line(ex).split()[0]
    assert ex.correct == {"for": " in", "while": " <"}[keyword]


def check_else_elif(ex, enc):
    keyword = _last_line(ex).strip()
    condition = re.findall(r"^\s*if (.*):$", ex.prompt, flags=re.M)[-1]
    if keyword == "else":
        assert ex.correct.startswith(":")
    else:
        assert keyword == "elif" and ex.correct.strip() in re.findall(r"\w+", condition)


def check_if_ternary(ex, enc):
    line = _last_line(ex).strip()
    if line.startswith("if "):
        assert ex.correct.startswith(":")
    else:
        assert " if " in line and ex.correct == " else"


def check_if_equals(ex, enc):
    words = _last_line(ex).split()
    assert ex.correct == (" ==" if words[0] in ("if", "elif", "while", "assert") else " =")


def check_fstring_brace(ex, enc):
    line = _last_line(ex)
    start = max(line.rfind('f"'), line.rfind("f'"))
    inside = line[start + 2 :]
    assert ex.correct == ("}" if inside.count("{") > inside.count("}") else line[start + 1])


def check_bracket_brace(ex, enc):
    stack = []
    for ch in re.sub(r"\"[^\"]*\"|'[^']*'", "", _last_line(ex)):
        if ch in "[{":
            stack.append(ch)
        elif ch in "]}":
            stack.pop()
    assert ex.correct[0] == {"[": "]", "{": "}"}[stack[-1]]


def check_var_swap(ex, enc):
    a, b = re.match(r"\s*(\w+), (\w+) = (\w+),$", _last_line(ex)).group(1, 2)
    assert (ex.correct, ex.alternative) == (" " + a, " " + b)


def check_var_if(ex, enc):
    assert _last_line(ex).strip() == "return"
    condition = ex.prompt.split("\n")[-2]
    names = re.findall(r"\w+", condition)
    assert ex.correct.strip() in names and ex.alternative.strip() not in names


def check_indent_for(ex, enc):
    assert ex.prompt.endswith("\n")
    header = ex.prompt.split("\n")[-2]
    indent = len(header) - len(header.lstrip(" "))
    deeper = header.lstrip().startswith("for ") and header.endswith(":")
    expected = indent + 4 if deeper else indent
    assert _canonical_first(enc, ex, " " * expected + "x = 1") == _one(enc, ex.correct)


def check_lambda_func(ex, enc):
    line = _last_line(ex)
    assert ex.correct.startswith(":" if " = lambda " in line else ")")


def check_enumerate_range(ex, enc):
    m = re.search(r"for \w+, (\w+) in enumerate\((\w+)\):", ex.prompt)
    if m:
        assert ex.correct == " " + m.group(1)
    else:
        seq = re.search(r"for \w+ in range\(len\((\w+)\)\):", ex.prompt).group(1)
        assert ex.correct == " " + seq


def check_final_kwarg(ex, enc):
    last_param = re.search(r"def \w+\((.*)\):", ex.prompt).group(1).split(", ")[-1].split("=")[0]
    last_passed = _last_line(ex).split(", ")[-1].split("=")[0]
    assert ex.correct.startswith(")" if last_passed == last_param else ",")


def check_class_init(ex, enc):
    attr = re.match(r"\s*self\.(\w+) =$", _last_line(ex)).group(1)
    assert ex.correct == " " + attr and ex.alternative != ex.correct


CHECKS = {name[len("check_") :]: fn for name, fn in globals().items() if name.startswith("check_")}


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_registry():
    names = [t.name for t in list_tasks()]
    assert len(names) == len(set(names)) >= 12
    assert set(PAPER_TASKS) <= set(names)
    assert set(names) <= set(CHECKS), "every task needs a label check in this file"
    for t in list_tasks():
        assert isinstance(t, Task) and t.description and get_task(t.name) is t


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError, match="no_such_task") as info:
        get_task("no_such_task")
    assert "bracket_counting" in str(info.value)


@pytest.mark.parametrize("name", [t.name for t in list_tasks()])
def test_task_examples(name, datasets, fixture_tiktoken):
    enc = fixture_tiktoken
    data = datasets[name]
    assert data.name == name
    assert len(data.train) + len(data.test) == N
    assert len(data.test) == round(N * 0.25)
    n_correct_classes = set()
    for batch in (data.train, data.test):
        n, T = batch.input_ids.shape
        assert batch.attention_mask.shape == (n, T) and batch.positions.tolist() == [T - 1] * n
        assert (batch.correct_ids != batch.alternative_ids).all()
        for i, ex in enumerate(batch.examples):
            prompt_ids = enc.encode_ordinary(ex.prompt)
            # left padding with end-of-text, prompt right-aligned, mask marks the prompt
            assert batch.input_ids[i, T - len(prompt_ids) :].tolist() == prompt_ids
            assert (batch.input_ids[i, : T - len(prompt_ids)] == EOT).all()
            assert batch.attention_mask[i].sum().item() == len(prompt_ids) and batch.attention_mask[i, -1] == 1
            # candidates are single tokens in context
            assert enc.encode_ordinary(ex.prompt + ex.correct) == prompt_ids + [batch.correct_ids[i].item()]
            assert enc.encode_ordinary(ex.prompt + ex.alternative) == prompt_ids + [batch.alternative_ids[i].item()]
            CHECKS[name](ex, enc)
            n_correct_classes.add(ex.correct)
    assert len(n_correct_classes) >= 2, "both classes of the binary task must occur"


def test_paper_tasks_keep_everything(datasets):
    for name in PAPER_TASKS:
        assert datasets[name].n_dropped == 0


def test_varied_prompts(datasets):
    data = datasets["set_or_string"]
    prompts = [ex.prompt for ex in data.train.examples]
    assert len({p.count("\n") for p in prompts}) > 3  # random number of distractor lines
    assert len({p.split("\n")[-1].strip() for p in prompts}) > 10  # random variable names
    fixed = datasets["set_or_string_fixedvarname"]
    assert {ex.prompt.split("\n")[-1].strip() for ex in fixed.train.examples} == {"x"}


def test_deterministic(fixture_tiktoken):
    a = make_task_dataset("bracket_counting", fixture_tiktoken, n=64, seed=3)
    b = make_task_dataset("bracket_counting", fixture_tiktoken, n=64, seed=3)
    c = make_task_dataset("bracket_counting", fixture_tiktoken, n=64, seed=4)
    assert torch.equal(a.train.input_ids, b.train.input_ids) and torch.equal(a.test.correct_ids, b.test.correct_ids)
    assert a.train.examples == b.train.examples
    assert a.train.examples != c.train.examples


def test_train_test_disjoint(datasets):
    for data in datasets.values():
        train = {ex.prompt for ex in data.train.examples}
        test = {ex.prompt for ex in data.test.examples}
        assert len(train) == len(data.train) and len(test) == len(data.test)
        assert not train & test


def test_single_double_quote_prompt_ends_inside_string(datasets):
    for ex in datasets["single_double_quote"].train.examples:
        line = _last_line(ex)
        q = ex.correct[0]
        assert line.count(q) % 2 == 1  # the string opened by q is still open
        assert {ex.correct[0], ex.alternative[0]} == {'"', "'"}


def test_loss_and_accuracy(datasets):
    batch = datasets["single_double_quote"].test
    n, V = len(batch), 2048
    rows = torch.arange(n)
    equal = torch.zeros(n, V)
    assert task_loss(equal, batch).item() == pytest.approx(math.log(2))
    assert task_accuracy(equal, batch) == 0.0  # ties are not correct

    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(0))
    logits[rows, batch.correct_ids] = logits[rows, batch.alternative_ids] + 1.0
    assert task_loss(logits, batch).item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-5)
    assert task_loss(logits, batch).item() < math.log(2)
    assert task_accuracy(logits, batch) == 1.0

    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(1), requires_grad=True)
    lc, la = logits[rows, batch.correct_ids], logits[rows, batch.alternative_ids]
    manual = torch.stack([-torch.log(torch.exp(c) / (torch.exp(c) + torch.exp(a))) for c, a in zip(lc, la)]).mean()
    loss = task_loss(logits, batch)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    loss.backward()
    assert logits.grad is not None
    assert task_accuracy(logits, batch) == pytest.approx((lc > la).float().mean().item())


def test_last_token_logits(datasets):
    batch = datasets["bracket_counting"].test
    n, T = batch.input_ids.shape
    full = torch.randn(n, T, 2048)
    last = last_token_logits(full, batch)
    assert torch.equal(last, full[:, -1])
    assert task_loss(full, batch).item() == pytest.approx(task_loss(last, batch).item())


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
        eos_token_id = EOT

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
    raw = make_task_dataset("while_return_true", RawTokenizers(), n=32, pad_token_id=EOT)
    for other in (hf, raw):
        assert torch.equal(ref.train.input_ids, other.train.input_ids)
        assert torch.equal(ref.train.correct_ids, other.train.correct_ids)
    with pytest.raises(ValueError, match="pad"):
        make_task_dataset("while_return_true", RawTokenizers(), n=32)


def test_batch_to(datasets):
    batch = datasets["for_while"].test.to("cpu")
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
])
def test_task_file_format_errors_name_the_line(fixture_tiktoken, text, message):
    from modeling_csp.circuits.tasks import task_from_jsonl

    with pytest.raises(ValueError, match=message):
        task_from_jsonl(text, fixture_tiktoken, max_len=128, source="q.jsonl")


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
