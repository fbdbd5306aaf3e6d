"""The built-in tasks (`modeling_csp.circuits.task_generators`): every example's label is re-derived from its prompt
text, both classes occur, and each task tokenizes with the offline GPT-2-style fixture tokenizer."""

import re

import pytest

from modeling_csp.circuits.tasks import Task, get_task, list_tasks, make_task_dataset

PAPER_TASKS = [
    "single_double_quote",
    "bracket_counting",
    "set_or_string",
    "set_or_string_fixedvarname",
    "while_return_true",
]
N = 128


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




def test_registry():
    names = [t.name for t in list_tasks()]
    assert len(names) == len(set(names)) >= 12
    assert set(PAPER_TASKS) <= set(names)
    assert set(names) <= set(CHECKS), "every task needs a label check in this file"
    for t in list_tasks():
        assert isinstance(t, Task) and t.description and get_task(t.name) is t


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
            assert (batch.input_ids[i, : T - len(prompt_ids)] == enc.eot_token).all()
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
