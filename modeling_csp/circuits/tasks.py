# Copyright 2025. MIT license.
"""Binary next-token tasks on Python code, as used to find circuits in weight-sparse transformers.

Gao et al. (2025), "Weight-sparse transformers have interpretable circuits", prune a model down to the
smallest circuit that still solves a *binary* next-token task: every datapoint is a prompt of Python source
and two candidate next tokens, one correct and one plausible but wrong (close a string with `"` or `'`, close a
list with `]` or `]]`, ...). The task loss is the cross-entropy of the model restricted to those two tokens.

This module holds:

- [`TaskExample`], [`Task`]: a raw datapoint (text) and a named generator of them.
- [`list_tasks`], [`get_task`], [`register_builtin_task`]: the task registry. The built-in tasks (the paper's, plus more
  of the same kind) are the generators of `task_generators`, which registers them here; the package
  (`modeling_csp/circuits/__init__.py`) imports it, so they are registered before any circuit module is used.
- [`task_from_pairs`]: a user-defined task from `(prompt, correct, alternative)` triples.
- [`task_from_jsonl`], [`load_task_file`]: a user-defined task from JSON lines `{"prompt", "correct", "incorrect"}`,
  validated against a tokenizer (single-token candidates, prompts within the context, both classes present).
- [`make_task_dataset`]: tokenize a task into [`TaskBatch`] train/test splits, keeping only datapoints whose
  candidates are single tokens *in context* for the given tokenizer.

Scoring a model on a batch (`task_loss`, `task_accuracy`, `evaluate`, `check_task`) is `evaluation`.

Example:

```python
>>> from modeling_csp.circuits.evaluation import last_token_logits, task_loss
>>> from modeling_csp.circuits.tasks import make_task_dataset
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

__all__ = [
    "TaskExample",
    "TaskBatch",
    "TaskDataset",
    "Task",
    "list_tasks",
    "get_task",
    "register_builtin_task",
    "make_task_dataset",
    "task_from_pairs",
    "read_task_jsonl",
    "validate_task_examples",
    "circuit_examples",
    "task_from_jsonl",
    "load_task_file",
    "example_class",
    "DEFAULT_N_EXAMPLES",
    "DEFAULT_DATA_SEED",
]

# A task that keeps fewer examples than this because its candidates do not tokenize as single tokens is
# reported as unusable with that tokenizer (a handful of examples gives no meaningful circuit).
MIN_EXAMPLES = 32
# The examples a task gets unless told otherwise (pruning, evaluating a circuit, `csp tasks --check`, the training
# run's task probe): train and test together, drawn with this seed.
DEFAULT_N_EXAMPLES = 512
DEFAULT_DATA_SEED = 0
DEFAULT_CHUNK_TOKENS = 1024  # padded tokens per forward pass when a batch is run in chunks of similar length


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

    def rows(self, idx: torch.Tensor) -> "TaskBatch":
        """Rows `idx` (CPU indices) on the batch's device, with columns that are padding in every chosen row dropped."""
        examples = [self.examples[i] for i in idx.tolist()] if self.examples else []
        idx = idx.to(self.input_ids.device)
        mask = self.attention_mask[idx]
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        return TaskBatch(
            input_ids=self.input_ids[idx, start:], attention_mask=mask[:, start:], positions=self.positions[idx] - start,
            correct_ids=self.correct_ids[idx], alternative_ids=self.alternative_ids[idx], examples=examples,
        )

    def by_length(self, max_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> list["TaskBatch"]:
        """The batch as chunks of rows of similar length, each without its all-padding columns: the same examples
        in far fewer padded tokens (prompts of one task often differ in length by 2x). A chunk holds at most
        `max_tokens` padded tokens (at least one row); None or 0: the batch as it is, one chunk."""
        if not max_tokens or len(self) == 0:
            return [self]
        lengths = self.attention_mask.sum(1).cpu()
        order = torch.sort(lengths, stable=True).indices
        chunks, start = [], 0
        for end in range(1, len(order) + 1):  # sorted ascending: the chunk's longest row is its last
            if end < len(order) and (end + 1 - start) * int(lengths[order[end]]) <= max_tokens:
                continue
            chunks.append(self.rows(order[start:end]))
            start = end
        return chunks


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


def register_builtin_task(name: str, description: str):
    """Decorator: registers a generator `fn(rng) -> TaskExample` as the built-in task `name` (listed in
    registration order)."""
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
    n: int = DEFAULT_N_EXAMPLES,
    seed: int = DEFAULT_DATA_SEED,
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

    Lines end at "\n" only: U+2028 and the other separators `str.splitlines` also breaks at are valid inside a
    JSON string. Raises `ValueError` naming `source:line` for bad JSON (nesting too deep included), missing or
    unknown fields, non-string or empty values, text that is not Unicode (a lone surrogate), equal candidates,
    and a prompt repeated with other answers."""
    out: list[tuple[int, TaskExample]] = []
    first_line: dict[str, tuple[int, TaskExample]] = {}
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg}); expected one object per line") from None
        except RecursionError:
            raise ValueError(f"{where}: not a task line (JSON nested too deeply); expected one flat object per line") from None
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
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {str(obj[key])[:80]!r}")
            try:
                obj[key].encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"{where}: {key!r} holds a lone surrogate ({obj[key][exc.start]!r}), which is not "
                                 "text; write the character itself or its surrogate pair") from None
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
