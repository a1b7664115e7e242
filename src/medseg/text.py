"""Wording shared by the command line and the reports."""
from __future__ import annotations

from pathlib import Path


def plural(n: int, word: str) -> str:
    """``1 case``, ``2 cases``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def portable(path: str | Path) -> str:
    """A path as a file meant to travel records it (a shipped model, a result kept with the project):
    relative to the working directory, or its last two parts, so that it names no machine's folders."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(Path(*p.parts[-2:]))
