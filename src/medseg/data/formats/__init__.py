"""Readers of native dataset layouts, one module each, found by name through ``FORMATS``.

    from medseg.data.formats import get_reader
    spec = get_reader("lgg").scan(Path("kaggle_3m"))
"""
from __future__ import annotations

from typing import Any

from medseg.data.formats.base import CaseData, CaseSpec, DatasetSpec, Reader
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


__all__ = ["FORMATS", "get_reader", "Reader", "CaseSpec", "CaseData", "DatasetSpec"]
