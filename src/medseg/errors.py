"""One exception type for every user-facing problem, and one warning type for what medseg handles but
the user should know: the CLI prints each as one line (``error: path: problem`` / ``warning: ...``)."""
from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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


def with_path(e: OSError, path: str | Path) -> OSError:
    """``e`` naming ``path`` when the system did not say which file failed (a write that fills the disk
    reports ``No space left on device`` with no file name)."""
    if e.filename:
        return e
    out = type(e)(e.errno, e.strerror or str(e) or type(e).__name__, str(path))
    out.__cause__ = e
    return out


@contextmanager
def naming(path: str | Path | None) -> Iterator[None]:
    """An OSError raised in the block without a file name (a full disk mid-write) names ``path``, the
    output the command was writing."""
    try:
        yield
    except OSError as e:
        if e.filename or path is None:
            raise
        raise with_path(e, path) from None


def os_error_line(e: OSError) -> str:
    """``path: problem`` of an operating-system error (a read-only or full output folder, ...)."""
    what = e.strerror or str(e) or type(e).__name__
    return f"{e.filename}: {what}" if e.filename else what


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    # a library's warning (highdicom, torch, ...) is shown as medseg's are: one line, no source line
    text = " ".join(str(message).split())
    if not issubclass(category, MedsegWarning):
        text = f"{text} ({category.__name__} from {Path(filename).parent.name}/{Path(filename).name})"
    print(f"warning: {text}", file=file or sys.stderr)


@contextmanager
def warning_lines() -> Iterator[None]:
    """Within the block every warning reaches stderr as one ``warning:`` line (the CLI and each member
    process of a training run)."""
    saved = warnings.showwarning
    warnings.showwarning = _one_line
    try:
        yield
    finally:
        warnings.showwarning = saved
