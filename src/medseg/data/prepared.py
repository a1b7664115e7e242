"""The prepared-dataset format: what ``prepare`` writes and every later stage reads.

Layout::

    OUT/dataset.json        classes, channels, cases (id, patient, shape, spacing, ...), fingerprint
    OUT/splits.json         k folds grouped by patient
    OUT/cases/<id>.img.npy  image[z, c, h, w], native dtype
    OUT/cases/<id>.seg.npy  mask[z, k, h, w], uint8 0/1

Why .npy: ``np.load(mmap_mode="r")`` maps the file with no decoding and no extra copy, so a random
slice costs one page-cache read (tens of microseconds); compressed formats (npz, zarr+blosc, NIfTI.gz)
would decode whole chunks per read, and HDF5 adds a dependency for no gain on local disks.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError

FORMAT_VERSION = 1


@dataclass
class CaseRecord:
    id: str
    patient: str
    shape: list[int]  # [z, c, h, w]
    spacing: list[float]  # [z, y, x] mm
    image: str  # path relative to the dataset root
    mask: str | None
    dtype: str
    sources: list[str] = field(default_factory=list)
    foreground: list[float] | None = None  # fraction of voxels per class
    fg_slices: list[list[int]] | None = None  # per class, slice indices holding that class
    affine: list[list[float]] | None = None
    slices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_foreground(self) -> bool:
        return bool(self.foreground) and any(f > 0 for f in self.foreground)


def case_stem(case_id: str) -> str:
    """The case id made safe for a file name: its arrays are ``cases/<stem>.<what>.npy``, its validation
    predictions ``val_predictions/<stem>.npz``."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case_id)


def case_filename(case_id: str, what: str) -> str:
    return f"cases/{case_stem(case_id)}.{what}.npy"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class PreparedDataset:
    """Read side: ``PreparedDataset.open(path)``; arrays are memory-mapped on first access."""

    def __init__(self, root: Path, info: dict[str, Any]):
        self.root = root
        self.info = info
        self.cases = [CaseRecord(**c) for c in info["cases"]]
        self._index = {c.id: i for i, c in enumerate(self.cases)}
        self._mm: dict[tuple[int, str], np.ndarray] = {}

    @classmethod
    def open(cls, path: str | Path) -> PreparedDataset:
        root = Path(path)
        meta = root / "dataset.json"
        if not meta.is_file():
            raise MedsegError("not a prepared dataset (no dataset.json); run `medseg prepare` first", root)
        try:
            info = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise MedsegError(f"dataset.json is not valid JSON: {e}", meta) from None
        if info.get("format_version") != FORMAT_VERSION:
            raise MedsegError(
                f"prepared format version {info.get('format_version')} is not {FORMAT_VERSION}; re-run prepare",
                meta,
            )
        return cls(root, info)

    # --- metadata ---------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def class_kind(self) -> str:
        return self.info["class_kind"]

    @property
    def channels(self) -> list[str]:
        return list(self.info["channels"])

    @property
    def spatial_dims(self) -> int:
        return int(self.info["spatial_dims"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.info.get("fingerprint", {})

    @property
    def patients(self) -> list[str]:
        return sorted({c.patient for c in self.cases})

    def __len__(self) -> int:
        return len(self.cases)

    def case(self, key: int | str) -> CaseRecord:
        return self.cases[self.index(key)]

    def index(self, key: int | str) -> int:
        if isinstance(key, str):
            if key not in self._index:
                raise MedsegError(f"no case {key!r} in the prepared dataset", self.root)
            return self._index[key]
        return key

    # --- arrays -----------------------------------------------------------------------------
    def _array(self, key: int | str, what: str) -> np.ndarray:
        i = self.index(key)
        hit = self._mm.get((i, what))
        if hit is None:
            rel = self.cases[i].image if what == "image" else self.cases[i].mask
            if rel is None:
                raise MedsegError(f"case {self.cases[i].id!r} has no mask", self.root)
            hit = np.load(self.root / rel, mmap_mode="r")
            self._mm[(i, what)] = hit
        return hit

    def image(self, key: int | str) -> np.ndarray:
        """``image[z, c, h, w]``, memory-mapped, native dtype."""
        return self._array(key, "image")

    def mask(self, key: int | str) -> np.ndarray:
        """``mask[z, k, h, w]`` uint8 0/1, memory-mapped."""
        return self._array(key, "mask")

    def splits(self) -> dict[str, Any]:
        path = self.root / "splits.json"
        if not path.is_file():
            raise MedsegError("splits.json is missing", self.root)
        return json.loads(path.read_text())

    def fold(self, k: int) -> tuple[list[str], list[str]]:
        """(train case ids, validation case ids) of fold ``k``."""
        folds = self.splits()["folds"]
        if not 0 <= k < len(folds):
            raise MedsegError(f"fold {k} is out of range: this dataset has folds 0..{len(folds) - 1}", self.root)
        return list(folds[k]["train"]), list(folds[k]["val"])


class PreparedWriter:
    """Write side. Everything goes to ``OUT.partial-<pid>`` and is renamed to ``OUT`` at the end,
    so an interrupted prepare never leaves a dataset that looks complete."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists():
            if not overwrite:
                raise MedsegError("output already exists; pass --overwrite to replace it", self.out)
            if not self.out.is_dir():
                raise MedsegError("output exists and is a file, not a prepared dataset; refusing to replace it", self.out)
            if not (self.out / "dataset.json").is_file() and any(self.out.iterdir()):
                # never delete a folder that is not a prepared dataset: it may be the user's data
                raise MedsegError("output exists and is not a prepared dataset; refusing to replace it", self.out)
        self.tmp = self.out.with_name(f"{self.out.name}.partial-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        (self.tmp / "cases").mkdir(parents=True)

    def write_arrays(self, case_id: str, image: np.ndarray, mask: np.ndarray | None) -> tuple[str, str | None]:
        img_rel = case_filename(case_id, "img")
        np.save(self.tmp / img_rel, np.ascontiguousarray(image))
        seg_rel = None
        if mask is not None:
            seg_rel = case_filename(case_id, "seg")
            np.save(self.tmp / seg_rel, np.ascontiguousarray(mask, dtype=np.uint8))
        return img_rel, seg_rel

    def finish(self, info: dict[str, Any], splits: dict[str, Any] | None) -> Path:
        info = {"format_version": FORMAT_VERSION, **info}
        info["cases"] = [asdict(c) if isinstance(c, CaseRecord) else c for c in info["cases"]]
        (self.tmp / "dataset.json").write_text(json.dumps(info, indent=1))
        if splits is not None:
            (self.tmp / "splits.json").write_text(json.dumps(splits, indent=1))
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old)
        else:
            os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
