"""One exception type for every user-facing problem: the CLI prints it and exits non-zero."""
from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """A problem with the user's input, reported as `path: problem` without a traceback."""

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.path = None if path is None else str(path)
        self.problem = message
        self.hint = hint
        text = f"{self.path}: {message}" if self.path else message
        if hint:
            text += f" ({hint})"
        super().__init__(text)
