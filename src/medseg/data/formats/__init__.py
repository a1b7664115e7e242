"""Readers of native dataset layouts, one module each, found by name through ``FORMATS``.

    from medseg.data.formats import get_reader
    spec = get_reader("lgg").scan(Path("kaggle_3m"))
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.data.formats.base import CaseData, CaseSpec, DatasetSpec, Reader
from medseg.errors import MedsegError
from medseg.registry import Registry

FORMATS: Registry[type[Reader]] = Registry(
    "format",
    [
        "medseg.data.formats.lgg",
        "medseg.data.formats.uwmgi",
        "medseg.data.formats.coco",
        "medseg.data.formats.nifti",
        "medseg.data.formats.dicom",
        "medseg.data.formats.folder",
    ],
)


def get_reader(name: str, **options: Any) -> Reader:
    """The reader registered as ``name``, with its options validated."""
    return FORMATS.get(name)(**options)


def guess_format(path: str | Path) -> str:
    """The format whose ``sniff`` is surest of ``path`` (``--format`` overrides); ties go to the format
    registered first."""
    path = Path(path)
    if not path.exists():
        raise MedsegError("no such file or folder", path)
    scores = [(FORMATS.get(n).sniff(path), -i, n) for i, n in enumerate(FORMATS.builtin_order())]
    best = max(scores)
    if best[0] <= 0:
        raise MedsegError("cannot tell the data set's format; pass --format (see `medseg formats`)", path)
    return best[2]


__all__ = ["FORMATS", "get_reader", "guess_format", "Reader", "CaseSpec", "CaseData", "DatasetSpec"]
