"""What the explorer says when something cannot be done: `UserError` for what was asked, `log` for the server."""

from __future__ import annotations

import sys


class UserError(ValueError):
    """A problem with what the user asked for; shown as a message, never as a traceback."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name when it has none), for one-line messages."""
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0] if text else type(exc).__name__


def log(message: str) -> None:
    print(f"[explorer] {message}", file=sys.stderr, flush=True)  # stdout stays clean for the CLI's JSON


__all__ = ["UserError", "first_line", "log"]
