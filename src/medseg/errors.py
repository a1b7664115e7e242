"""One exception type for every user-facing problem, and one warning type for what medseg handles but
the user should know: the CLI prints each as one line (``error: path: problem`` / ``warning: ...``)."""
from __future__ import annotations

import warnings
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


class MedsegWarning(UserWarning):
    """Input that medseg handled in a stated way (the CLI prints ``warning: path: problem``)."""


def warn(message: str, path: str | Path | None = None) -> None:
    """Emit a :class:`MedsegWarning` naming ``path``."""
    warnings.warn(f"{path}: {message}" if path is not None else message, MedsegWarning, stacklevel=2)

