# Copyright 2025. MIT license.
"""Binary next-token tasks on Python code, as used to find circuits in weight-sparse transformers.

Gao et al. (2025), "Weight-sparse transformers have interpretable circuits", prune a model down to the
smallest circuit that still solves a *binary* next-token task: every datapoint is a prompt of Python source
and two candidate next tokens, one correct and one plausible but wrong (close a string with `"` or `'`, close a
list with `]` or `]]`, ...). The task loss is the cross-entropy of the model restricted to those two tokens.

This module holds:

- [`TaskExample`], [`Task`]: a raw datapoint (text) and a named generator of them.
- [`list_tasks`], [`get_task`]: the built-in tasks (the paper's, plus more of the same kind).
- [`task_from_pairs`]: a user-defined task from `(prompt, correct, alternative)` triples.
- [`task_from_jsonl`], [`load_task_file`]: a user-defined task from JSON lines `{"prompt", "correct", "incorrect"}`,
  validated against a tokenizer (single-token candidates, prompts within the context, both classes present);
  [`check_task`]: the model's accuracy on such a task before pruning.
- [`make_task_dataset`]: tokenize a task into [`TaskBatch`] train/test splits, keeping only datapoints whose
  candidates are single tokens *in context* for the given tokenizer.
- [`task_loss`], [`task_accuracy`], [`last_token_logits`]: evaluate a model on a batch.

Example:

```python
>>> from modeling_csp.tasks import make_task_dataset, last_token_logits, task_loss
>>> data = make_task_dataset("single_double_quote", tokenizer, n=256)
>>> logits = model(data.train.input_ids).logits
>>> loss = task_loss(last_token_logits(logits, data.train), data.train)
```
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "TaskExample",
    "TaskBatch",
    "TaskDataset",
    "Task",
    "list_tasks",
    "get_task",
    "make_task_dataset",
    "task_from_pairs",
    "read_task_jsonl",
    "validate_task_examples",
    "circuit_examples",
    "task_from_jsonl",
    "load_task_file",
    "example_class",
    "check_task",
    "task_loss",
    "task_accuracy",
    "last_token_logits",
]

# A task that keeps fewer examples than this because its candidates do not tokenize as single tokens is
# reported as unusable with that tokenizer (a handful of examples gives no meaningful circuit).
MIN_EXAMPLES = 32


# ----------------------------------------------------------------------------------------------------------
# Data structures
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskExample:
    """
    One raw datapoint: a prompt and the two candidate continuations, as text.

    Args:
        prompt (`str`): Python source the model reads; the decision is made at its last token.
        correct (`str`): the continuation that is right given the prompt, e.g. `'"'`.
        alternative (`str`): the plausible wrong continuation, e.g. `"'"`.
        fallbacks (`tuple[tuple[str, str], ...]`, *optional*): other spellings of the same (correct,
            alternative) pair, tried in order when the tokenizer does not encode the first pair as single
            tokens after the prompt. Byte-level BPE vocabularies differ in which punctuation runs they merge
            (`"]]\\n"` may be one token in one vocabulary and `"]"` + `"]\\n"` in another); fallbacks let one
            generator serve several tokenizers without changing what the task asks.
    """

    prompt: str
    correct: str
    alternative: str
    fallbacks: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for c, a in ((self.correct, self.alternative), *self.fallbacks):
            if not c or not a or c == a:
                raise ValueError(f"candidates must be two different non-empty strings, got {c!r} and {a!r}")

    def spellings(self) -> list[tuple[str, str]]:
        """All (correct, alternative) spellings, preferred first."""
        return [(self.correct, self.alternative), *self.fallbacks]


@dataclass
class TaskBatch:
    """
    A tokenized set of task examples, ready for a causal language model.

    Prompts have different lengths; they are padded on the *left* with the tokenizer's end-of-text id, so that
    the decision position is the last column for every row (`positions == T - 1`). End-of-text is what a model
    trained on packed documents sees before a new document, so left padding with it perturbs the prompt little
    even for models that take no attention mask; `attention_mask` marks the real tokens for models that do.

    Args:
        input_ids (`torch.LongTensor` of shape `(n, T)`): left-padded prompt token ids.
        attention_mask (`torch.LongTensor` of shape `(n, T)`): 1 on prompt tokens, 0 on padding.
        positions (`torch.LongTensor` of shape `(n,)`): index of the last prompt token (all `T - 1`).
        correct_ids (`torch.LongTensor` of shape `(n,)`): token id of the correct candidate.
        alternative_ids (`torch.LongTensor` of shape `(n,)`): token id of the wrong candidate.
        examples (`list[TaskExample]`): the examples, with the candidate spelling that was actually used.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    positions: torch.LongTensor
    correct_ids: torch.LongTensor
    alternative_ids: torch.LongTensor
    examples: list[TaskExample] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "TaskBatch":
        """Return a copy with all tensors on `device`."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            positions=self.positions.to(device),
            correct_ids=self.correct_ids.to(device),
            alternative_ids=self.alternative_ids.to(device),
        )


@dataclass
class TaskDataset:
    """
    Train and test splits of one task for one tokenizer.

    Args:
        name (`str`): the task name.
        train (`TaskBatch`): examples to prune/optimise a circuit on.
        test (`TaskBatch`): held-out examples (no prompt appears in both splits).
        n_dropped (`int`): generated examples that were discarded because a candidate is not a single token
            after the prompt with this tokenizer, or because the prompt was longer than `max_len`.
    """

    name: str
    train: TaskBatch
    test: TaskBatch
    n_dropped: int


@dataclass(frozen=True)
class Task:
    """
    A named binary next-token task.

    Args:
        name (`str`): registry name, e.g. `"bracket_counting"`.
        description (`str`): what the model must do and which context decides the answer.
        generate (`Callable[[random.Random], TaskExample]`): draws one raw example. All randomness must come
            from the given generator so that datasets are reproducible from a seed.
    """

    name: str
    description: str
    generate: Callable[[random.Random], TaskExample]
    examples: tuple[TaskExample, ...] | None = None  # a user-defined task's own list (None: a generator)


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

_TASKS: dict[str, Task] = {}


def _register(name: str, description: str):
    def decorator(fn: Callable[[random.Random], TaskExample]):
        _TASKS[name] = Task(name=name, description=description, generate=fn)
        return fn

    return decorator


def list_tasks() -> list[Task]:
    """Return the built-in tasks, in registration order."""
    return list(_TASKS.values())


def get_task(name: str | Task) -> Task:
    """
    Look up a built-in task by name (a [`Task`] is returned unchanged).

    Raises:
        `ValueError`: the name is unknown; the message lists the known names.
    """
    if isinstance(name, Task):
        return name
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(_TASKS)}") from None


def task_from_pairs(name: str, examples: Sequence[tuple[str, str, str]], description: str = "") -> Task:
    """
    Build a task from explicit `(prompt, correct, alternative)` triples.

    The generator samples a triple with the given random generator, so [`make_task_dataset`] collects every
    distinct triple (as long as `n` and its attempt budget allow) in a seed-dependent order.

    Args:
        name (`str`): task name used in messages and in [`TaskDataset.name`].
        examples (`Sequence[tuple[str, str, str]]`): the triples; candidates are the exact next-token strings.
        description (`str`, *optional*): free text.
    """
    items = [TaskExample(str(p), str(c), str(a)) for p, c, a in examples]
    if not items:
        raise ValueError(f"task {name!r} needs at least one (prompt, correct, alternative) triple")

    def generate(rng: random.Random) -> TaskExample:
        return rng.choice(items)

    description = description or f"user-defined task with {len(items)} examples"
    return Task(name=name, description=description, generate=generate, examples=tuple(items))


def circuit_examples(meta: Any, limit: int | None = None) -> list[tuple[str, str, str]] | None:
    """The (prompt, correct, incorrect) triples a circuit pruned on a task file keeps in `meta["task_examples"]`,
    or None when it keeps none (a built-in task) or they are malformed (or more than `limit`)."""
    triples = meta.get("task_examples") if isinstance(meta, dict) else None
    if not (isinstance(triples, list) and triples and (limit is None or len(triples) <= limit)
            and all(isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) and x for x in t) for t in triples)):
        return None
    return [tuple(t) for t in triples]


# ----------------------------------------------------------------------------------------------------------
# Tokenization and batching
# ----------------------------------------------------------------------------------------------------------


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Return `text -> ids` without special tokens for a tiktoken `Encoding` or a Hugging Face tokenizer."""
    if hasattr(tokenizer, "encode_ordinary"):  # tiktoken: never parse "<|endoftext|>" in code as special
        return tokenizer.encode_ordinary

    def encode(text: str) -> list[int]:
        try:
            out = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            out = tokenizer.encode(text)
        out = getattr(out, "ids", out)  # `tokenizers.Tokenizer` returns an `Encoding`
        return list(out)

    return encode


def _pad_id(tokenizer: Any) -> int:
    for attr in ("eot_token", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError("The tokenizer has no eot_token, eos_token_id or pad_token_id to pad with; pass pad_token_id")


def _single_token(prompt_ids: list[int], ids: list[int]) -> int | None:
    """The candidate's id if `ids` is `prompt_ids` plus exactly one token, else None."""
    if len(ids) == len(prompt_ids) + 1 and ids[:-1] == prompt_ids:
        return ids[-1]
    return None


def _resolve(ex: TaskExample, prompt_ids: list[int], encode) -> tuple[TaskExample, int, int] | None:
    """Pick the first spelling whose two candidates are distinct single tokens right after the prompt."""
    for correct, alternative in ex.spellings():
        c = _single_token(prompt_ids, encode(ex.prompt + correct))
        a = _single_token(prompt_ids, encode(ex.prompt + alternative))
        if c is not None and a is not None and c != a:
            return TaskExample(ex.prompt, correct, alternative), c, a
    return None


def _collate(rows: list[tuple[TaskExample, list[int], int, int]], pad_id: int) -> TaskBatch:
    n = len(rows)
    T = max((len(ids) for _, ids, _, _ in rows), default=0)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, T), dtype=torch.long)
    for i, (_, ids, _, _) in enumerate(rows):
        input_ids[i, T - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, T - len(ids) :] = 1
    return TaskBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        positions=torch.full((n,), T - 1, dtype=torch.long),
        correct_ids=torch.tensor([c for _, _, c, _ in rows], dtype=torch.long),
        alternative_ids=torch.tensor([a for _, _, _, a in rows], dtype=torch.long),
        examples=[ex for ex, _, _, _ in rows],
    )


def make_task_dataset(
    task: Task | str,
    tokenizer: Any,
    n: int = 512,
    seed: int = 0,
    test_fraction: float = 0.25,
    max_len: int | None = None,
    pad_token_id: int | None = None,
) -> TaskDataset:
    """
    Generate, tokenize and split a task.

    Examples are drawn until `n` distinct prompts are kept (or an attempt budget of `20 * n + 200` draws runs
    out, which only happens for tasks with a small pool such as [`task_from_pairs`]). An example is *dropped*
    when none of its candidate spellings gives two different single tokens in context, i.e. when
    `encode(prompt + candidate) != encode(prompt) + [one id]`: scoring a token the model would never emit
    there (because BPE merges it with the prompt or splits it) measures nothing. Prompts longer than `max_len`
    tokens are dropped too (a model cannot read past its block size).

    Args:
        task (`Task` or `str`): a task or the name of a built-in one.
        tokenizer: a `tiktoken.Encoding` (encoded with `encode_ordinary`, padded with `eot_token`) or a Hugging
            Face tokenizer (encoded with `add_special_tokens=False`, padded with `eos_token_id`).
        n (`int`): number of examples to keep, train and test together.
        seed (`int`): seed of the generator; the same seed gives the same dataset.
        test_fraction (`float`): share of the kept examples in the test split.
        max_len (`int`, *optional*): drop prompts with more tokens than this.
        pad_token_id (`int`, *optional*): padding id, when the tokenizer has none.

    Returns:
        [`TaskDataset`]: train/test [`TaskBatch`]es and the number of dropped examples.

    Raises:
        `ValueError`: fewer than `min(n, 32)` examples survive the dropping (the tokenizer cannot express the
            task), or fewer than 2 examples in all; the message names the task and the counts.
    """
    task = get_task(task)
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    encode = _encoder(tokenizer)
    pad_id = _pad_id(tokenizer) if pad_token_id is None else pad_token_id

    rng = random.Random(seed)
    rows: list[tuple[TaskExample, list[int], int, int]] = []
    seen: set[str] = set()
    n_untokenizable = n_too_long = 0
    for _ in range(20 * n + 200):
        if len(rows) >= n:
            break
        ex = task.generate(rng)
        if ex.prompt in seen:  # distinct prompts keep train and test disjoint
            continue
        seen.add(ex.prompt)
        prompt_ids = encode(ex.prompt)
        if max_len is not None and len(prompt_ids) > max_len:
            n_too_long += 1
            continue
        resolved = _resolve(ex, prompt_ids, encode)
        if resolved is None:
            n_untokenizable += 1
            continue
        rows.append((resolved[0], prompt_ids, resolved[1], resolved[2]))

    n_dropped = n_untokenizable + n_too_long
    if len(rows) < 2 or (n_dropped and len(rows) < min(n, MIN_EXAMPLES)):
        raise ValueError(
            f"Task {task.name!r} kept only {len(rows)} examples with this tokenizer: {n_dropped} dropped "
            f"({n_untokenizable} whose candidates are not single tokens after the prompt, {n_too_long} longer "
            f"than max_len={max_len})."
        )
    n_test = round(len(rows) * test_fraction)
    if test_fraction > 0:
        n_test = min(max(n_test, 1), len(rows) - 1)
    n_train = len(rows) - n_test
    return TaskDataset(
        name=task.name,
        train=_collate(rows[:n_train], pad_id),
        test=_collate(rows[n_train:], pad_id),
        n_dropped=n_dropped,
    )


# ----------------------------------------------------------------------------------------------------------
# User-defined tasks from JSON lines
# ----------------------------------------------------------------------------------------------------------

TASK_FILE_FIELDS = ("prompt", "correct", "incorrect")


def example_class(ex: TaskExample) -> int:
    """0 when the correct candidate sorts first (as text), else 1: the two classes of a binary task (the circuit
    file's `task_docs` store class 0 first). A task with one class is solved by always answering the same."""
    return 0 if ex.correct == min(ex.correct, ex.alternative) else 1


def read_task_jsonl(text: str, source: str = "<text>") -> list[tuple[int, TaskExample]]:
    """[(line number, example)] from one `{"prompt", "correct", "incorrect"}` object per line (blank lines skipped).

    Raises `ValueError` naming `source:line` for bad JSON, missing or unknown fields, non-string or empty
    values, equal candidates, and a prompt repeated with other answers."""
    out: list[tuple[int, TaskExample]] = []
    first_line: dict[str, tuple[int, TaskExample]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg}); expected one object per line") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with {', '.join(TASK_FILE_FIELDS)}")
        missing = [k for k in TASK_FILE_FIELDS if k not in obj]
        unknown = sorted(set(obj) - set(TASK_FILE_FIELDS))
        if missing or unknown:
            raise ValueError(f"{where}: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown field(s) {', '.join(unknown)}"] if unknown else [])
            ) + f" (each line needs exactly {', '.join(TASK_FILE_FIELDS)})")
        for key in TASK_FILE_FIELDS:
            if not isinstance(obj[key], str) or not obj[key]:
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {obj[key]!r}")
        if obj["correct"] == obj["incorrect"]:
            raise ValueError(f"{where}: 'correct' and 'incorrect' are the same ({obj['correct']!r})")
        ex = TaskExample(obj["prompt"], obj["correct"], obj["incorrect"])
        if ex.prompt in first_line:
            m, other = first_line[ex.prompt]
            if other != ex:
                raise ValueError(f"{where}: the prompt of line {m} again, with other answers")
            continue  # an exact repeat adds nothing
        first_line[ex.prompt] = (n, ex)
        out.append((n, ex))
    if not out:
        raise ValueError(f"{source}: no examples (one JSON object {{\"prompt\", \"correct\", \"incorrect\"}} per line)")
    return out


def validate_task_examples(numbered: Sequence[tuple[int, TaskExample]], tokenizer: Any, max_len: int | None = None,
                           source: str = "<text>") -> None:
    """Checks user examples against a tokenizer; the first problem is a `ValueError` naming `source:line`.

    Each candidate must be exactly one token right after the prompt (`encode(prompt + c) == encode(prompt) + [id]`,
    so that scoring that token is what the model would do), the prompt at most `max_len` tokens (the model's
    context), and both classes (`example_class`) must occur, else always giving the same answer solves it."""
    encode = _encoder(tokenizer)
    for n, ex in numbered:
        where = f"{source}:{n}"
        prompt_ids = encode(ex.prompt)
        if max_len is not None and len(prompt_ids) > max_len:
            raise ValueError(f"{where}: the prompt is {len(prompt_ids)} tokens, more than the model's context of {max_len}")
        ids = {}
        for key, cand in (("correct", ex.correct), ("incorrect", ex.alternative)):
            full = encode(ex.prompt + cand)
            ids[key] = _single_token(prompt_ids, full)
            if ids[key] is None:
                why = (f"it adds {len(full) - len(prompt_ids)} tokens" if full[: len(prompt_ids)] == prompt_ids
                       else "it merges with the end of the prompt")
                raise ValueError(f"{where}: {key} {cand!r} is not a single token after the prompt ({why})")
        if ids["correct"] == ids["incorrect"]:
            raise ValueError(f"{where}: correct and incorrect are the same token after the prompt")
    classes = [example_class(ex) for _, ex in numbered]
    if len(set(classes)) < 2:
        which = "sorts first" if classes[0] == 0 else "sorts second"
        raise ValueError(
            f"{source}: only one class: in all {len(classes)} examples the correct answer is the candidate that {which}; "
            "add examples where the other candidate is correct (else always answering the same solves the task)"
        )


def task_from_jsonl(text: str, tokenizer: Any, max_len: int | None = None, name: str = "custom",
                    source: str = "<text>") -> Task:
    """A validated user-defined task from JSON lines (pasted text or a file's content); see `read_task_jsonl`
    and `validate_task_examples`. The description records the number of examples and the text's sha256."""
    numbered = read_task_jsonl(text, source)
    validate_task_examples(numbered, tokenizer, max_len, source)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return task_from_pairs(name, [(ex.prompt, ex.correct, ex.alternative) for _, ex in numbered],
                           description=f"user-defined task from {source}: {len(numbered)} examples (sha256 {digest})")


def load_task_file(path: Any, tokenizer: Any, max_len: int | None = None, name: str | None = None) -> Task:
    """`task_from_jsonl` on a file; the task is named after the file's stem unless `name` is given."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    return task_from_jsonl(text, tokenizer, max_len, name or path.stem, source=str(path))


def check_task(model, tokenizer, task: "Task | str", n: int = 512, seed: int = 0) -> dict[str, Any]:
    """The full model on a task before pruning: accuracy and loss on all its examples and on the test split that
    pruning reports on, plus the class counts (`example_class`)."""
    from .ablation import evaluate

    task = get_task(task)
    data = make_task_dataset(task, tokenizer, n=n, seed=seed, max_len=model.config.block_size)
    train_loss, train_acc = evaluate(model, data.train)
    test_loss, test_acc = evaluate(model, data.test) if len(data.test) else (float("nan"), float("nan"))
    n_train, n_test = len(data.train), len(data.test)
    examples = data.train.examples + data.test.examples
    classes = [example_class(ex) for ex in examples]
    total = n_train + n_test
    return {
        "task": task.name, "n": total, "n_train": n_train, "n_test": n_test, "n_dropped": data.n_dropped,
        "classes": [classes.count(0), classes.count(1)],
        "accuracy": (train_acc * n_train + (test_acc * n_test if n_test else 0)) / total,
        "loss": (train_loss * n_train + (test_loss * n_test if n_test else 0)) / total,
        "test_accuracy": test_acc, "test_loss": test_loss,
    }


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def last_token_logits(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """Select the logits at each row's decision position: `(n, T, V) -> (n, V)`."""
    positions = batch.positions.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), positions]


def _pair_logits(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    if logits.dim() == 3:
        logits = last_token_logits(logits, batch)
    c = logits.gather(-1, batch.correct_ids.to(logits.device)[:, None])
    a = logits.gather(-1, batch.alternative_ids.to(logits.device)[:, None])
    return torch.cat([c, a], dim=-1).float()


def task_loss(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """
    Binary cross-entropy of the model restricted to the two candidates, averaged over the batch.

    `mean(-log softmax([l_correct, l_alternative])[0])`, in nats: `log 2` when the model cannot tell the
    candidates apart, 0 when it is certain and right. (The reference `circuit_sparsity` code stores twice this
    number; its visualizer halves it for display.)

    Args:
        logits (`torch.Tensor`): `(n, V)` logits at the decision position, or `(n, T, V)` full logits (the last
            position is then taken with [`last_token_logits`]).
        batch (`TaskBatch`): the batch the logits were computed on.

    Returns:
        `torch.Tensor`: scalar loss (float32), differentiable.
    """
    pair = _pair_logits(logits, batch)
    return -F.log_softmax(pair, dim=-1)[:, 0].mean()


def task_accuracy(logits: torch.Tensor, batch: TaskBatch) -> float:
    """Fraction of examples whose correct candidate gets a strictly higher logit than the alternative."""
    pair = _pair_logits(logits, batch)
    return (pair[:, 0] > pair[:, 1]).float().mean().item()


# ----------------------------------------------------------------------------------------------------------
# Snippet helpers: random but realistic names, values and filler code
# ----------------------------------------------------------------------------------------------------------

# Short, common identifiers: most byte-level code vocabularies have them as one token after a space, which
# matters for tasks whose candidates are names.
NAMES = (
    "x y z a b c n m k s v w data value result name key item count total path text line size obj args res "
    "out msg state tag col entry node index items values lines prefix current seen parts words acc buf tmp "
    "num word label row"
).split()
# The most common of them, for tasks whose candidates are names (fewer examples dropped for multi-token names).
SHORT_NAMES = "x y z a b c n k s v w data value name key item path text line size obj args res out msg".split()
FUNC_NAMES = (
    "process main run build update compute parse load check handle get_data make helper transform collect "
    "render setup apply"
).split()
CLASS_NAMES = "Config Parser Node Item Record Handler Cache Point Model Task Buffer Reader".split()
WORDS = (
    "hello world foo bar spam eggs name value error done ok yes no data file path test user admin config the "
    "result is not found new old start stop"
).split()
PATHS = ("path", "filename", "fname", "file_path", "name", "src", "config_file")


def _names(rng: random.Random, k: int, avoid: Sequence[str] = (), pool: Sequence[str] = NAMES) -> list[str]:
    """`k` distinct variable names from `pool`, none of them in `avoid`."""
    return rng.sample([nm for nm in pool if nm not in avoid], k)


def _int(rng: random.Random) -> str:
    return str(rng.choice([0, 1, 2, 3, 5, 10, rng.randint(0, 99)]))


def _quoted(rng: random.Random, q: str | None = None) -> str:
    q = q or rng.choice("\"'")
    return q + " ".join(rng.sample(WORDS, rng.randint(1, 2))) + q


def _filler_line(rng: random.Random, avoid: Sequence[str]) -> list[str]:
    """One complete, self-contained statement (possibly a 2-line `if`), relative indentation."""
    v, u = _names(rng, 2, avoid)
    choice = rng.randrange(11)
    if choice == 0:
        return [f"{v} = {_int(rng)}"]
    if choice == 1:
        return [f"{v} = {u} + {_int(rng)}"]
    if choice == 2:
        return [f"{v} = [{_int(rng)}, {_int(rng)}, {_int(rng)}]"]
    if choice == 3:
        return [f"{v} = {_quoted(rng)}"]
    if choice == 4:
        return [f"print({u})"]
    if choice == 5:
        return [f"{v} = len({u})"]
    if choice == 6:
        return [f"{v} = {rng.choice(FUNC_NAMES)}({u})"]
    if choice == 7:
        return [f"# {' '.join(rng.sample(WORDS, 3))}"]
    if choice == 8:
        return [f"{v} += {_int(rng)}"]
    if choice == 9:
        return [f"{v} = {{{_quoted(rng)}: {_int(rng)}}}"]
    return [f"if {u} > {_int(rng)}:", f"    {v} = {_int(rng)}"]


def _filler(rng: random.Random, avoid: Sequence[str] = (), lo: int = 0, hi: int = 3) -> list[str]:
    lines: list[str] = []
    for _ in range(rng.randint(lo, hi)):
        lines += _filler_line(rng, avoid)
    return lines


def _wrap(rng: random.Random, lines: list[str], styles: Sequence[str] = ("top", "def", "method")) -> str:
    """
    Place relative-indented `lines` at module level, in a function or in a method, and join them.

    The last line is the partial line the model continues; an empty last line means the prompt ends right
    after a newline.
    """
    style = rng.choice(list(styles))
    header: list[str] = []
    if rng.random() < 0.3:
        header += [f"import {rng.choice(['os', 'sys', 're', 'json', 'math'])}", ""]
    if style == "top":
        indent = ""
    elif style == "def":
        args = ", ".join(_names(rng, rng.randint(0, 2)))
        header.append(f"def {rng.choice(FUNC_NAMES)}({args}):")
        if rng.random() < 0.3:
            header.append(f'    """{" ".join(rng.sample(WORDS, 3)).capitalize()}."""')
        indent = "    "
    else:
        args = "".join(", " + a for a in _names(rng, rng.randint(0, 2)))
        header += [f"class {rng.choice(CLASS_NAMES)}:", f"    def {rng.choice(FUNC_NAMES)}(self{args}):"]
        indent = "        "
    body = [indent + line if line else line for line in lines[:-1]]
    last = indent + lines[-1] if lines[-1] else ""
    return "\n".join(header + body + [last])


# ----------------------------------------------------------------------------------------------------------
# Built-in tasks. Each generator picks one of two classes at random (balanced on average), builds a prompt
# whose context decides the class, and returns the candidates as exact next-token strings.
# ----------------------------------------------------------------------------------------------------------


@_register(
    "single_double_quote",
    "Close a string literal with the quote character that opened it: `\"` vs `'`.",
)
def _single_double_quote(rng: random.Random) -> TaskExample:
    q, other = rng.sample(["\"", "'"], 2)
    text = " ".join(rng.sample(WORDS, rng.randint(1, 4)))
    if rng.random() < 0.3:
        text = text.capitalize()
    v = _names(rng, 1)[0]
    context = rng.randrange(5)
    if context == 0:
        line, suffix = f"{v} = {q}{text}", "\n"
    elif context == 1:
        line, suffix = f"print({q}{text}", ")\n"
    elif context == 2:
        line, suffix = f"{v}[{_quoted(rng)}] = {q}{text}", "\n"  # the key's quote type is a distractor
    elif context == 3:
        line, suffix = f"{v} = [{_quoted(rng)}, {q}{text}", ""
    else:
        line, suffix = f"return {q}{text}", "\n"
    styles = ("def", "method") if line.startswith("return") else ("top", "def", "method")
    prompt = _wrap(rng, _filler(rng, (), 0, 3) + [line], styles)
    spellings = [(q + suffix, other + suffix), (q, other)] if suffix else [(q, other)]
    return TaskExample(prompt, *spellings[0], fallbacks=tuple(spellings[1:]))


def _bracket_elem(rng: random.Random) -> str:
    return rng.choice([_int(rng), _int(rng), rng.choice(NAMES), _quoted(rng)])


@_register(
    "bracket_counting",
    "Close a (possibly nested) list literal at the end of its line: `]]` when two lists are open, `]` when one is.",
)
def _bracket_counting(rng: random.Random) -> TaskExample:
    depth = rng.choice([1, 2])

    def inner() -> str:
        return "[" + ", ".join(_bracket_elem(rng) for _ in range(rng.randint(1, 3))) + "]"

    done = [inner() if rng.random() < 0.5 else _bracket_elem(rng) for _ in range(rng.randint(0, 3))]
    last_elem = rng.choice([_int(rng), rng.choice(NAMES)])  # a literal string would fuse with the bracket
    if depth == 2:
        open_items = [_bracket_elem(rng) for _ in range(rng.randint(0, 2))] + [last_elem]
        literal = "[" + "".join(d + ", " for d in done) + "[" + ", ".join(open_items)
    else:
        literal = "[" + "".join(d + ", " for d in done) + last_elem
    line = rng.choice([f"{_names(rng, 1)[0]} = ", "return "]) + literal
    styles = ("top", "def", "method") if not line.startswith("return") else ("def", "method")
    prompt = _wrap(rng, _filler(rng, (), 0, 3) + [line], styles)
    right, wrong = "]" * depth, "]" * (3 - depth)
    # Preferred spellings first; the last one is how a vocabulary without any "]]" token writes the answer:
    # "]]\n" becomes "]" + "]\n", so the first token is "]" (depth 2) or "]\n" (depth 1).
    split = ("]", "]\n") if depth == 2 else ("]\n", "]")
    return TaskExample(prompt, right + "\n", wrong + "\n", fallbacks=((right, wrong), split))


def _set_or_string(rng: random.Random, fixed_name: bool) -> TaskExample:
    is_set = rng.random() < 0.5
    v = "x" if fixed_name else _names(rng, 1)[0]
    it, seq = _names(rng, 2, (v,))
    init = "set()" if is_set else rng.choice(['""', "''"])
    lines = [f"{v} = {init}"]
    if not fixed_name:
        other = _names(rng, 1, (v, it, seq))[0]
        distractor = other + " = " + rng.choice(["set()", '""'])  # an unrelated set or string
        lines = _filler(rng, (v, it), 0, 2) + ([distractor] if rng.random() < 0.6 else []) + lines
        lines = lines + _filler(rng, (v, it), 0, 3)
    if rng.random() < 0.7:
        lines.append(f"for {it} in {seq}:")
        if not fixed_name:
            lines += ["    " + ln for ln in _filler(rng, (v, it), 0, 1)]
        lines.append(f"    {v}")
    else:
        lines += [v]
    prompt = _wrap(rng, lines, ("def", "method", "top"))
    pair = (".add", " +=") if is_set else (" +=", ".add")
    # Vocabularies that split "." from the name still show the decision at the ".": method call vs "+=".
    return TaskExample(prompt, *pair, fallbacks=(tuple(c.replace(".add", ".") for c in pair),))


@_register(
    "set_or_string",
    "After a variable name, continue with `.add` if it was initialised as `set()` or ` +=` if as `\"\"`; names vary "
    "and distractor lines (including another set or string) sit in between.",
)
def _set_or_string_varied(rng: random.Random) -> TaskExample:
    return _set_or_string(rng, fixed_name=False)


@_register(
    "set_or_string_fixedvarname",
    "As `set_or_string`, but the variable is always `x` and there are no distractor lines.",
)
def _set_or_string_fixed(rng: random.Random) -> TaskExample:
    return _set_or_string(rng, fixed_name=True)


@_register(
    "while_return_true",
    "After `True`, a `while True` header continues with `:` and a `return True` statement ends the line.",
)
def _while_return_true(rng: random.Random) -> TaskExample:
    is_while = rng.random() < 0.5
    v, u = _names(rng, 2)
    lines = _filler(rng, (), 0, 3)
    if is_while:
        lines += _filler(rng, (), 0, 1) + ["while True"]
        correct, alternative = ":\n", "\n"
    else:
        lines += [rng.choice([f"if {v} > {_int(rng)}:", f"if {v} == {u}:", f"if not {v}:", f"if {v} is None:"])]
        lines += ["    return True"]
        correct, alternative = "\n", ":\n"
    prompt = _wrap(rng, lines, ("def", "method"))
    bare = tuple(c.replace(":\n", ":") for c in (correct, alternative))  # ":" where ":\n" is not one token
    return TaskExample(prompt, correct, alternative, fallbacks=(bare,))


@_register(
    "with_as",
    "Inside `with open(p) as f:`, use the handle bound by `as` (` f`) rather than another name such as the path.",
)
def _with_as(rng: random.Random) -> TaskExample:
    handle, path_var = _names(rng, 2, pool=SHORT_NAMES)
    other = _names(rng, 1, (handle, path_var))[0]
    lines = [f"{path_var} = {_quoted(rng)}"] + _filler(rng, (handle, path_var), 0, 2)
    lines += [f"with open({path_var}) as {handle}:"]
    lines += ["    " + ln for ln in _filler(rng, (handle, path_var), 0, 1)]
    lines += [rng.choice([f"    for {other} in", f"    {other} =", "    return"])]
    prompt = _wrap(rng, lines, ("def", "method"))
    alt = path_var if rng.random() < 0.7 else _names(rng, 1, (handle, path_var, other), SHORT_NAMES)[0]
    return TaskExample(prompt, " " + handle, " " + alt)


@_register(
    "with_open",
    "A file opened for reading is used with `.read`, one opened for writing or appending with `.write`.",
)
def _with_open(rng: random.Random) -> TaskExample:
    reading = rng.random() < 0.5
    modes = ["", ', "r"', ", 'r'", ', "rb"'] if reading else [', "w"', ", 'w'", ', "a"', ', "wb"']
    mode = rng.choice(modes)
    f, other = _names(rng, 2)
    path = rng.choice([_quoted(rng), rng.choice(PATHS)])
    lines = _filler(rng, (f,), 0, 2) + [f"with open({path}{mode}) as {f}:"]
    lines += ["    " + ln for ln in _filler(rng, (f,), 0, 1)]
    lines += [rng.choice([f"    {f}", f"    {other} = {f}"])]
    prompt = _wrap(rng, lines, ("top", "def", "method"))
    correct, alternative = (".read", ".write") if reading else (".write", ".read")
    return TaskExample(prompt, correct, alternative)


@_register(
    "for_while",
    "After the loop variable, a `for` loop continues with ` in` and a `while` loop with a comparison ` <`.",
)
def _for_while(rng: random.Random) -> TaskExample:
    is_for = rng.random() < 0.5
    i = rng.choice(["i", "j", "k", "n", "idx", "step", "index", "count"])
    lines = _filler(rng, (i,), 0, 3) + ([f"{i} = 0"] if rng.random() < 0.5 else [])
    lines += [("for " if is_for else "while ") + i]
    prompt = _wrap(rng, lines, ("top", "def", "method"))
    correct, alternative = (" in", " <") if is_for else (" <", " in")
    return TaskExample(prompt, correct, alternative)


@_register(
    "else_elif",
    "After `else` the header ends with `:`; after `elif` a condition follows (its first name).",
)
def _else_elif(rng: random.Random) -> TaskExample:
    is_else = rng.random() < 0.5
    v = _names(rng, 1, pool=SHORT_NAMES)[0]
    w = _names(rng, 1, (v,))[0]
    lines = _filler(rng, (v,), 0, 2)
    lines += [rng.choice([f"if {v} > {_int(rng)}:", f"if {v} == {_quoted(rng)}:", f"if {v} is None:", f"if not {v}:"])]
    lines += [f"    {w} = {_int(rng)}", "else" if is_else else "elif"]
    prompt = _wrap(rng, lines, ("top", "def", "method"))
    if is_else:
        return TaskExample(prompt, ":\n", " " + v, fallbacks=((":", " " + v),))
    return TaskExample(prompt, " " + v, ":\n", fallbacks=((" " + v, ":"),))


def _condition(rng: random.Random, v: str) -> str:
    return rng.choice([f"{v} > {_int(rng)}", f"{v} is None", f"{v} == {_int(rng)}", f"not {v}", f"{v}"])


@_register(
    "if_ternary",
    "After a condition, a conditional expression (`y = a if c`) continues with ` else`, an `if` statement with `:`.",
)
def _if_ternary(rng: random.Random) -> TaskExample:
    ternary = rng.random() < 0.5
    v, y, a = _names(rng, 3)
    cond = _condition(rng, v)
    lines = _filler(rng, (y,), 0, 3)
    lines += [f"{rng.choice(['return', y + ' ='])} {a} if {cond}" if ternary else f"if {cond}"]
    prompt = _wrap(rng, lines, ("def", "method"))
    if ternary:
        return TaskExample(prompt, " else", ":\n", fallbacks=((" else", ":"),))
    return TaskExample(prompt, ":\n", " else", fallbacks=((":", " else"),))


@_register(
    "if_equals",
    "After a name, a condition (`if x`, `elif x`, `while x`) compares with ` ==` while a statement assigns with ` =`.",
)
def _if_equals(rng: random.Random) -> TaskExample:
    compare = rng.random() < 0.5
    v = _names(rng, 1)[0]
    lines = _filler(rng, (), 0, 3)
    lines += [f"{rng.choice(['if', 'if', 'while', 'assert'])} {v}" if compare else v]
    prompt = _wrap(rng, lines, ("top", "def", "method"))
    return TaskExample(prompt, *((" ==", " =") if compare else (" =", " ==")))


@_register(
    "fstring_brace",
    "Inside an f-string, close an open `{` replacement field with `}`; with no field open, close the string.",
)
def _fstring_brace(rng: random.Random) -> TaskExample:
    in_field = rng.random() < 0.5
    q = rng.choice("\"'")
    v, a, b = _names(rng, 3)
    parts = [rng.choice(WORDS)]
    if rng.random() < 0.6:
        parts.append("{" + a + "}")  # a closed field before the decision point
    parts.append("{" + b if in_field else b)
    body = " ".join(parts)
    lines = _filler(rng, (), 0, 3) + [rng.choice([f"{v} = f{q}{body}", f"return f{q}{body}", f"{v} += f{q}{body}"])]
    prompt = _wrap(rng, lines, ("def", "method"))
    return TaskExample(prompt, *(("}", q) if in_field else (q, "}")))


@_register(
    "bracket_brace",
    "Close the innermost open literal with its matching bracket: `]` for a list, `}` for a set or dict.",
)
def _bracket_brace(rng: random.Random) -> TaskExample:
    is_list = rng.random() < 0.5
    v = _names(rng, 1)[0]
    elems = [_int(rng) for _ in range(rng.randint(0, 2))] + [rng.choice([_int(rng), rng.choice(NAMES)])]
    if is_list:
        inner = "[" + ", ".join(elems)
    elif rng.random() < 0.5:
        inner = "{" + ", ".join(elems)
    else:  # dict literal
        inner = "{" + ", ".join(f"{_quoted(rng)}: {e}" for e in elems)
    if rng.random() < 0.3:  # nested inside the other kind of bracket
        inner = ("{" + _quoted(rng) + ": " if is_list else "[") + inner
    lines = _filler(rng, (), 0, 3) + [f"{v} = {inner}"]
    prompt = _wrap(rng, lines, ("top", "def", "method"))
    right, wrong = ("]", "}") if is_list else ("}", "]")
    if inner.count("[") + inner.count("{") > 1:  # still inside the outer literal: no newline follows
        return TaskExample(prompt, right, wrong)
    return TaskExample(prompt, right + "\n", wrong + "\n", fallbacks=((right, wrong),))


@_register(
    "var_swap",
    "Complete a swap `a, b = b, a`: after `a, b = b,` the other name ` a` follows.",
)
def _var_swap(rng: random.Random) -> TaskExample:
    a, b = _names(rng, 2, pool=SHORT_NAMES)
    lines = [f"{a} = {_int(rng)}", f"{b} = {_int(rng)}"] if rng.random() < 0.5 else []
    lines = _filler(rng, (a, b), 0, 2) + lines + _filler(rng, (a, b), 0, 1)
    lines += [f"{a}, {b} = {b},"]
    prompt = _wrap(rng, lines, ("top", "def", "method"))
    return TaskExample(prompt, " " + a, " " + b)


@_register(
    "var_if",
    "Inside `if v ...:` return the variable that was tested rather than another recently assigned one.",
)
def _var_if(rng: random.Random) -> TaskExample:
    v, w = _names(rng, 2, pool=SHORT_NAMES)
    fn = rng.choice(FUNC_NAMES)
    defs = [f"{v} = {fn}({rng.choice(NAMES)})", f"{w} = {_int(rng)}"]
    rng.shuffle(defs)
    lines = _filler(rng, (v, w), 0, 2) + defs + [f"if {_condition(rng, v)}:", "    return"]
    prompt = _wrap(rng, lines, ("def", "method"))
    return TaskExample(prompt, " " + v, " " + w)


@_register(
    "indent_for",
    "After a `for` header the next line is indented one level deeper; after a plain statement it keeps the level. "
    "Candidates are whitespace tokens (one space of the indent goes with the following word in BPE).",
)
def _indent_for(rng: random.Random) -> TaskExample:
    is_for = rng.random() < 0.5
    i, seq, v = _names(rng, 3)
    lines = _filler(rng, (), 0, 3)
    if is_for:
        lines.append(f"for {i} in {rng.choice([seq, f'range({_int(rng)})', f'range(len({seq}))'])}:")
    else:
        statement = _filler_line(rng, ())
        while len(statement) > 1:  # a block opener (`if ...:`) would be followed by a deeper line
            statement = _filler_line(rng, ())
        lines += statement
    lines.append("")
    style = rng.choice(["def", "method"])
    prompt = _wrap(rng, lines, (style,))
    level = 4 if style == "def" else 8
    deeper, same = " " * (level + 3), " " * (level - 1)
    return TaskExample(prompt, *((deeper, same) if is_for else (same, deeper)))


@_register(
    "lambda_func",
    "After the parameters, a `lambda` continues with `:` and a `def` closes its parameter list with `):`.",
)
def _lambda_func(rng: random.Random) -> TaskExample:
    is_lambda = rng.random() < 0.5
    f = rng.choice(FUNC_NAMES + ["key", "fn", "func", "cb"])
    params = ", ".join(_names(rng, rng.randint(1, 3)))
    lines = _filler(rng, (f,), 0, 3)
    lines += [f"{f} = lambda {params}" if is_lambda else f"def {f}({params}"]
    prompt = _wrap(rng, lines, ("top", "def", "method"))
    if is_lambda:
        return TaskExample(prompt, ":", "):\n", fallbacks=((":", ")"),))
    return TaskExample(prompt, "):\n", ":", fallbacks=((")", ":"),))


@_register(
    "enumerate_range",
    "In the loop body, `for i, x in enumerate(xs)` uses the element ` x`, `for i in range(len(xs))` indexes ` xs`.",
)
def _enumerate_range(rng: random.Random) -> TaskExample:
    use_enumerate = rng.random() < 0.5
    i = rng.choice(["i", "j", "k", "idx", "n"])
    x, xs = _names(rng, 2, (i,), SHORT_NAMES)
    acc = _names(rng, 1, (i, x, xs))[0]
    lines = _filler(rng, (x, xs, i), 0, 2) + [f"{acc} = 0"]
    lines += [f"for {i}, {x} in enumerate({xs}):" if use_enumerate else f"for {i} in range(len({xs})):"]
    lines += ["    " + ln for ln in _filler(rng, (x, xs, i, acc), 0, 1)] + [f"    {acc} +="]
    prompt = _wrap(rng, lines, ("top", "def", "method"))
    return TaskExample(prompt, *((" " + x, " " + xs) if use_enumerate else (" " + xs, " " + x)))


@_register(
    "final_kwarg",
    "In a call that passes keyword arguments in signature order, close the call with `)` after the function's "
    "last parameter and continue with `,` otherwise.",
)
def _final_kwarg(rng: random.Random) -> TaskExample:
    fn = rng.choice(FUNC_NAMES)
    pos, *kws = _names(rng, rng.randint(3, 4))
    sig = ", ".join([pos] + [f"{k}={_int(rng)}" for k in kws])
    final = rng.random() < 0.5
    stop = len(kws) if final else rng.randint(1, len(kws) - 1)
    call = f"{fn}({rng.choice(NAMES)}, " + ", ".join(f"{k}={_int(rng)}" for k in kws[:stop])
    lines = [f"def {fn}({sig}):", f"    return {pos}", ""] + _filler(rng, (), 0, 2) + [f"{_names(rng, 1)[0]} = {call}"]
    prompt = "\n".join(lines)
    if final:
        return TaskExample(prompt, ")\n", ",", fallbacks=((")", ","),))
    return TaskExample(prompt, ",", ")\n", fallbacks=((",", ")"),))


@_register(
    "class_init",
    "In `__init__`, `self.a =` is assigned from the parameter of the same name ` a`, not another parameter.",
)
def _class_init(rng: random.Random) -> TaskExample:
    params = _names(rng, rng.randint(2, 3), pool=SHORT_NAMES)
    target = rng.choice(params)
    others = [p for p in params if p != target]
    done = [p for p in others if rng.random() < 0.5]
    lines = [f"class {rng.choice(CLASS_NAMES)}:"]
    if rng.random() < 0.3:
        lines.append(f'    """{" ".join(rng.sample(WORDS, 3)).capitalize()}."""')
    lines.append(f"    def __init__(self, {', '.join(params)}):")
    lines += [f"        self.{p} = {p}" for p in done] + [f"        self.{target} ="]
    return TaskExample("\n".join(lines), " " + target, " " + rng.choice(others))
