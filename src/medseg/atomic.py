"""Atomic writes: a file appears whole under its name or not at all (a crash or Ctrl-C mid-write leaves
the previous file, never half of a new one).

    with atomic_path(out / "model.pt") as tmp:   # write to tmp with any library
        torch.save(bundle, tmp)
    atomic_write_text(out / "tune.json", text)
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medseg.errors import with_path


def temp_name(path: Path) -> Path:
    """A temporary name beside ``path`` (same folder, so the final rename is atomic), keeping its suffix
    so that libraries choosing a format by extension still see it; ``*.tmp-<pid>*`` marks leftovers."""
    path = Path(path)
    return path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` when the block ends without an error,
    delete it otherwise."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:  # a full disk mid-write: the error names the file, not only the system's reason
        raise with_path(e, path) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


__all__ = ["atomic_path", "atomic_write_text", "temp_name"]
