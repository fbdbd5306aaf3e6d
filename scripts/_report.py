"""Replaces one marked section of a markdown file: what the benchmark and report scripts write into."""

from pathlib import Path

from modeling_csp.utils.jsonio import write_text_atomic


def write_section(path: Path, name: str, text: str) -> None:
    """Puts `text` between `<!-- {name}:start -->` and `<!-- {name}:end -->` in `path` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.is_file() else ""
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        doc = head + start + "\n" + text.strip() + "\n" + end + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip() + ("\n\n" if doc else "") + start + "\n" + text.strip() + "\n" + end + "\n"
    write_text_atomic(path, doc)
