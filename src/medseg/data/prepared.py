"""The prepared-dataset format: what ``prepare`` writes and every later stage reads.

Layout::

    OUT/dataset.json        classes, channels, cases (id, patient, shape, spacing, ...), fingerprint
    OUT/splits.json         k folds grouped by patient
    OUT/cases/<id>.img.npy  image[z, c, h, w], native dtype
    OUT/cases/<id>.seg.npy  mask[z, k, h, w], uint8 0/1

Volumes whose spacing differs from the data set's target spacing are stored resampled to it
(``target_spacing`` in dataset.json, ``native`` in the case's record: the source's shape and spacing).

While ``prepare`` runs, everything lives in ``OUT.partial/`` (see ``PreparedWriter``).

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

from medseg.atomic import atomic_write_text
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
    affine: list[list[float]] | None = None  # the source's voxel-to-world matrix
    native: dict[str, Any] | None = None  # resampled in prepare: the source's {"shape", "spacing"}
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
            path = self.root / rel
            check_array(path, self.cases[i].shape if what == "image" else None)
            try:
                hit = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise MedsegError(f"cannot read the array ({type(e).__name__}: {e}); re-run medseg prepare", path) from None
            self._mm[(i, what)] = hit
        return hit

    def image(self, key: int | str) -> np.ndarray:
        """``image[z, c, h, w]``, memory-mapped, native dtype."""
        return self._array(key, "image")

    def mask(self, key: int | str) -> np.ndarray:
        """``mask[z, k, h, w]`` uint8 0/1, memory-mapped."""
        return self._array(key, "mask")

    def verify(self) -> None:
        """Check that every case's arrays are present, complete and of the shape ``dataset.json`` says."""
        for c in self.cases:
            check_array(self.root / c.image, c.shape)
            if c.mask is not None:
                shp = check_array(self.root / c.mask)
                want = [c.shape[0], len(self.classes), *c.shape[2:]]
                if list(shp) != want:
                    raise MedsegError(f"mask shape {list(shp)} differs from the case's {want} [z, k, h, w]",
                                      self.root / c.mask)

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


_OWNER = ".medseg-partial.json"  # marks a partial folder as prepare's own: only such folders are ever deleted
# a case of a partial folder is finished once cases/<stem>.done.json (its statistics) is written, last;
# cases/<stem>.sample.npy holds its intensity sample for the fingerprint
DONE = ".done.json"


def done_path(root: Path, case_id: str) -> Path:
    return root / f"cases/{case_stem(case_id)}{DONE}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / _OWNER).read_text())
    except (OSError, ValueError):
        return None


class PreparedWriter:
    """Write side. Everything goes to ``OUT.partial/`` and is renamed to ``OUT`` at the end, so an
    interrupted prepare never leaves a dataset that looks complete.

    ``key`` describes the job (reader, input, options): a run killed before the end leaves its partial
    folder, and the next run with the same key resumes it (``done()`` lists the cases it finished);
    with another key the stale folder is replaced. A partial folder whose owner is still running is
    an error, and folders without prepare's marker are never touched."""

    def __init__(self, out: str | Path, overwrite: bool = False, key: dict[str, Any] | None = None):
        self.out = Path(out)
        if self.out.exists():
            if not overwrite:
                raise MedsegError("output already exists; pass --overwrite to replace it", self.out)
            if not self.out.is_dir():
                raise MedsegError("output exists and is a file, not a prepared dataset; refusing to replace it", self.out)
            if not (self.out / "dataset.json").is_file() and any(self.out.iterdir()):
                # never delete a folder that is not a prepared dataset: it may be the user's data
                raise MedsegError("output exists and is not a prepared dataset; refusing to replace it", self.out)
        self.key = json.loads(json.dumps(key or {}, default=str))
        self.tmp = self.out.with_name(f"{self.out.name}.partial")
        self.resumed = False
        self._clean_stale()
        if self.tmp.exists():
            owner = _owner(self.tmp)
            if owner is None:
                raise MedsegError("a folder of this name exists and was not made by medseg prepare; move it away",
                                  self.tmp)
            pid = int(owner.get("pid", -1))
            if pid != os.getpid() and _alive(pid) and owner.get("host") == _host():
                raise MedsegError(f"another medseg prepare (pid {pid}) is writing this output", self.out)
            if owner.get("key") == self.key and key is not None:
                self.resumed = True
            else:
                shutil.rmtree(self.tmp)
        (self.tmp / "cases").mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.tmp / _OWNER, json.dumps({"pid": os.getpid(), "host": _host(), "key": self.key}))

    def _clean_stale(self) -> None:
        """Partial folders of earlier versions (``OUT.partial-<pid>``) whose process is gone."""
        for old in self.out.parent.glob(f"{self.out.name}.partial-*"):
            suffix = old.name.rsplit("-", 1)[-1]
            if old.is_dir() and suffix.isdigit() and not _alive(int(suffix)) and (old / "cases").is_dir() \
                    and {p.name for p in old.iterdir()} <= {"cases", "dataset.json", "splits.json", _OWNER}:
                shutil.rmtree(old, ignore_errors=True)

    def done(self) -> dict[str, dict[str, Any]]:
        """{case id: stored result} of the cases a killed run finished, each checked against its arrays."""
        out: dict[str, dict[str, Any]] = {}
        if not self.resumed:
            return out
        for f in (self.tmp / "cases").glob(f"*{DONE}"):
            try:
                res = json.loads(f.read_text())
                rec = res["record"]
                for rel in (rec["image"], rec["mask"], case_filename(rec["id"], "sample")):
                    if rel is not None:
                        check_array(self.tmp / rel, rec["shape"] if rel == rec["image"] else None)
            except (OSError, ValueError, KeyError, TypeError, MedsegError):
                continue  # redone
            out[rec["id"]] = res
        return out

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
        for f in [*(self.tmp / "cases").glob(f"*{DONE}"), *(self.tmp / "cases").glob("*.sample.npy")]:
            f.unlink()
        (self.tmp / _OWNER).unlink(missing_ok=True)
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


def _host() -> str:
    import socket

    return socket.gethostname()


def check_array(path: Path, shape: list[int] | None = None) -> tuple[int, ...]:
    """The shape of the ``.npy`` at ``path`` after checking that it is present, readable and as long as its
    header says (a truncated file would fail deep inside training); a MedsegError naming it otherwise."""
    from numpy.lib import format as npformat

    if not path.is_file():
        raise MedsegError("array file is missing (re-run medseg prepare)", path)
    try:
        with open(path, "rb") as f:
            version = npformat.read_magic(f)
            read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
            shp, _, dtype = read(f)
            offset = f.tell()
    except (OSError, ValueError, EOFError) as e:
        raise MedsegError(f"not a readable .npy array ({type(e).__name__}: {e}); re-run medseg prepare", path) from None
    need = offset + int(np.prod(shp, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise MedsegError(f"array file is truncated ({size} of {need} bytes); re-run medseg prepare", path)
    if shape is not None and list(shp) != list(shape):
        raise MedsegError(f"array shape {list(shp)} differs from dataset.json's {list(shape)}", path)
    return tuple(shp)
