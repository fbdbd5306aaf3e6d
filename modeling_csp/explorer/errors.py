"""What the explorer says when something cannot be done: `UserError` for what was asked, `log` for the server, and
`markdown_literal` for any text a user gave (a link, an upload, a text box) shown in a Markdown component."""

from __future__ import annotations

import html
import re
import sys

_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>:$])")


class UserError(ValueError):
    """A problem with what the user asked for; shown as a message, never as a traceback."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name when it has none), for one-line messages."""
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0] if text else type(exc).__name__


def markdown_literal(text) -> str:
    """`text` as Markdown that shows exactly these characters: HTML as entities and Markdown's punctuation
    backslash-escaped, so that text from a link, an upload or a box never becomes a heading, an image or a link."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", html.escape(str(text), quote=False))


def log(message: str) -> None:
    print(f"[explorer] {message}", file=sys.stderr, flush=True)  # stdout stays clean for the CLI's JSON


__all__ = ["UserError", "first_line", "log", "markdown_literal"]
