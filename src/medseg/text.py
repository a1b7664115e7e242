"""Wording shared by the command line and the reports."""
from __future__ import annotations


def plural(n: int, word: str) -> str:
    """``1 case``, ``2 cases``."""
    return f"{n} {word}{'' if n == 1 else 's'}"
