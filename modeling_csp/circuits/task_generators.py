"""The built-in tasks: generators of random but realistic Python snippets, each ending where one of two candidate
next tokens is right, registered with `tasks.register_builtin_task` in the order `list_tasks` lists them.

Nothing imports the generators by name: importing this module registers them (the package `__init__` does, so
`get_task("bracket_counting")` works wherever a circuit module is imported). It sits above `tasks` and nothing in
`tasks` imports it back, so the two never form an import cycle.
"""

from __future__ import annotations

import random
from typing import Sequence

from .tasks import TaskExample, register_builtin_task


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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
    "set_or_string",
    "After a variable name, continue with `.add` if it was initialised as `set()` or ` +=` if as `\"\"`; names vary "
    "and distractor lines (including another set or string) sit in between.",
)
def _set_or_string_varied(rng: random.Random) -> TaskExample:
    return _set_or_string(rng, fixed_name=False)


@register_builtin_task(
    "set_or_string_fixedvarname",
    "As `set_or_string`, but the variable is always `x` and there are no distractor lines.",
)
def _set_or_string_fixed(rng: random.Random) -> TaskExample:
    return _set_or_string(rng, fixed_name=True)


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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


@register_builtin_task(
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
