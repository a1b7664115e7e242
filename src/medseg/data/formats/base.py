"""The reader contract: ``scan`` a native layout (cheap, validates pairing), then ``load`` one case.

Every reader returns arrays in one convention so the later stages never care where data came from:
``image[z, c, h, w]`` in its native dtype and ``mask[z, k, h, w]`` uint8 0/1, one channel per class
(overlapping labels stay exact); ``spacing`` is (z, y, x) in mm.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from medseg.errors import MedsegError, warn
from medseg.text import plural

ClassKind = Literal["multiclass", "multilabel"]



def _split_names(v: Any) -> Any:
    # the CLI passes "-o classes=a,b" as one string
    return [c.strip() for c in v.split(",") if c.strip()] if isinstance(v, str) else v


# a reader option holding class names: a list, or one comma-separated string from the CLI
ClassNames = Annotated[Optional[list[str]], BeforeValidator(_split_names)]


@dataclass
class CaseSpec:
    """One case found by ``scan``: an id, its patient and where its files are (reader-specific)."""

    id: str
    patient: str
    sources: dict[str, Any] = field(default_factory=dict)
    split: str | None = None  # the dataset's own split ("train", "valid", "test"), when it ships one


@dataclass
class DatasetSpec:
    format: str
    root: str
    channels: list[str]
    classes: list[str]
    class_kind: ClassKind  # multiclass: exclusive labels (softmax); multilabel: may overlap (sigmoid)
    spatial_dims: int  # 2: stacks of 2D slices; 3: true volumes
    cases: list[CaseSpec]
    has_masks: bool
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseData:
    image: np.ndarray  # [z, c, h, w], native dtype
    mask: np.ndarray | None  # [z, k, h, w] uint8 in {0, 1}
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (z, y, x) mm
    affine: np.ndarray | None = None  # 4x4, for writing outputs in the input's geometry
    slices: list[str] | None = None  # a name per slice (LGG slice number, UW-Madison slice id)
    meta: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str | Path) -> None:
        """Shape and value checks every reader's output must pass."""
        if self.image.ndim != 4:
            raise MedsegError(f"image must be [z, c, h, w], got shape {self.image.shape}", where)
        if self.mask is not None:
            if self.mask.ndim != 4:
                raise MedsegError(f"mask must be [z, k, h, w], got shape {self.mask.shape}", where)
            if self.mask.shape[0] != self.image.shape[0] or self.mask.shape[2:] != self.image.shape[2:]:
                raise MedsegError(
                    f"mask shape {self.mask.shape} does not match image shape {self.image.shape}", where
                )
        if self.slices is not None and len(self.slices) != self.image.shape[0]:
            raise MedsegError(f"{len(self.slices)} slice names for {self.image.shape[0]} slices", where)
        sp = np.asarray(self.spacing, dtype=np.float64)
        if sp.shape != (3,) or not (np.isfinite(sp).all() and (sp > 0).all()):
            raise MedsegError(f"voxel spacing {tuple(self.spacing)} (z, y, x) mm: each must be a positive finite "
                              "number (a damaged header?)", where)


def finite_image(image: np.ndarray, rule: str, case: CaseSpec, where: str | Path) -> np.ndarray:
    """``image`` when every voxel is finite; else an error naming the slice's file (rule ``error``), or
    a copy with NaN/Inf replaced by 0 (``zero``) or the channel's finite minimum (``min``) and a warning.
    One bad voxel would otherwise turn a whole case's normalisation, and so its prediction, into NaN."""
    if image.dtype.kind not in "fc":
        return image
    bad = ~np.isfinite(image)
    n = int(bad.sum())
    if n == 0:
        return image
    z = int(np.flatnonzero(bad.any(axis=(1, 2, 3)))[0])
    files = case.sources.get("images") if isinstance(case.sources, dict) else None
    named = files[z] if isinstance(files, list) and len(files) == image.shape[0] else where
    what = f"{plural(n, 'non-finite voxel')} (NaN or Inf) in the image" + (f", first in slice {z + 1}"
                                                                            if named == where and image.shape[0] > 1 else "")
    if rule == "error":
        raise MedsegError(what, named, hint="-o nonfinite=zero or nonfinite=min replaces them")
    out = np.array(image, copy=True)
    for c in range(out.shape[1]):
        ch, m = out[:, c], bad[:, c]
        if m.any():
            finite = ch[~m]
            ch[m] = 0 if rule == "zero" or finite.size == 0 else finite.min()
    warn(f"{what}: replaced by {'0' if rule == 'zero' else 'the channel minimum'} (nonfinite={rule})", named)
    return out


def report_unread(spec: DatasetSpec, companions: tuple[str, ...], limit: int = 200_000) -> list[Path]:
    """One warning naming the files under the layout's root that no case reads (a stray scan, a file in
    another format, a mistyped name): a reader that skips a file says so. Hidden files and ``companions``
    (globs of a file's name or its path under the root) are not counted."""
    import fnmatch
    import os

    root = Path(spec.root)
    if not root.is_dir():
        return []
    used: set[str] = set()

    def collect(v: Any) -> None:
        if isinstance(v, (str, Path)):
            used.add(os.path.normpath(os.path.abspath(v)))
        elif isinstance(v, (list, tuple)):
            for x in v:
                collect(x)
        elif isinstance(v, dict):
            for x in v.values():
                collect(x)

    for c in spec.cases:
        collect(c.sources)
    unread: list[Path] = []
    seen = 0
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            seen += 1
            if seen > limit or f.startswith("."):
                continue
            p = os.path.normpath(os.path.abspath(os.path.join(dirpath, f)))
            rel = os.path.relpath(p, root)
            if p in used or any(fnmatch.fnmatch(f, g) or fnmatch.fnmatch(rel, g) for g in companions):
                continue
            unread.append(Path(rel))
    if unread:
        shown = ", ".join(map(str, unread[:5])) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        warn(f"{plural(len(unread), 'file')} not read (not part of the {spec.format} layout): {shown}", root)
    return unread


def binary_mask(m: np.ndarray, where: str | Path) -> np.ndarray:
    """A binary mask stored as {0, 255} or {0, 1} (copies of a data set differ) as bool; any other set of
    values is an error naming the file and the values found, never a guess."""
    m = np.asarray(m)
    if m.dtype == bool:
        return m
    values = np.unique(m)
    found = set(values.tolist())
    if not (found <= {0, 255} or found <= {0, 1}):
        shown = ", ".join(str(v) for v in values[:8].tolist()) + (", ..." if values.size > 8 else "")
        raise MedsegError(f"a binary mask must hold {{0, 255}} or {{0, 1}}; found values {{{shown}}}", where)
    return m > 0


def patient_of(case_id: str, regex: str | None, where: str | Path) -> str:
    """The patient of ``case_id`` by ``regex`` (its first group, else the whole match), or the case itself."""
    if not regex:
        return case_id
    import re

    try:
        rx = re.compile(regex)
    except re.error as e:
        raise MedsegError(f"bad option patient_regex={regex!r}: {e}") from None
    m = rx.search(case_id)
    if not m:
        raise MedsegError(f"case id {case_id!r} does not match patient_regex {regex!r}", where)
    return m.group(1) if rx.groups else m.group(0)


class PredictionTable(ABC):
    """Predictions of all cases in one file, keyed by slice id and class (``read_prediction_table``)."""

    path: Path
    slice_ids: set[str]

    @abstractmethod
    def masks(self, slices: list[str], classes: list[str], size: tuple[int, int]) -> np.ndarray:
        """``mask[z, k, h, w]`` of the slices ``slices``; a MedsegError naming the file for a missing row."""


MAP_FOLDERS = {"prob": "probabilities", "uncertainty": "uncertainty"}  # the folder layouts' map folders


def case_path(case: CaseSpec, spec: DatasetSpec) -> str:
    """A file (or folder) that names ``case`` in error messages."""
    s = case.sources or {}
    for key in ("images", "files", "image", "path", "file", "folder", "dir"):
        v = s.get(key)
        if isinstance(v, (list, tuple)) and v:
            return str(v[0])
        if isinstance(v, (str, Path)):
            return str(v)
    return str(spec.root)


_JOURNALS: list[set[Path]] = []


def expect_prediction(path: Path, case_id: str, what: str = "") -> Path:
    """``path`` if it exists, else the error that the case has no prediction (naming its folder). Every
    reader finds its prediction files through here, so ``prediction_journal`` knows which files were read."""
    if not path.is_file():
        raise MedsegError(f"no prediction for case {case_id}{what} (expected {path.name})", path.parent)
    for j in _JOURNALS:
        j.add(Path(path).resolve())
    return path


@contextmanager
def prediction_journal() -> Iterator[set[Path]]:
    """The prediction files ``expect_prediction`` hands out within the block (``evaluate`` names the files
    of a predictions folder that no truth case read)."""
    seen: set[Path] = set()
    _JOURNALS.append(seen)
    try:
        yield seen
    finally:
        _JOURNALS.remove(seen)


def check_2d(m: np.ndarray, shape: tuple[int, ...], path: Path) -> None:
    """A predicted slice must be 2D and of the truth's size."""
    if m.ndim != 2:
        raise MedsegError(f"expected a 2D mask, got an array of shape {m.shape}", path)
    if m.shape != tuple(shape[2:]):
        raise MedsegError(f"prediction is {m.shape[0]}x{m.shape[1]} but the truth slice is {shape[2]}x{shape[3]}", path)


class Reader(ABC):
    """Base class of a format reader. Subclasses set ``name``, ``description`` and ``Options``."""

    name: ClassVar[str]
    description: ClassVar[str]
    # how cases are grouped into patients (folds never split a patient): shown by `medseg formats`
    patients: ClassVar[str] = "one patient per case"
    # False where the layout stores no voxel size (TIFF/PNG/JPEG slices): spacing is a 1 mm placeholder,
    # so distances are in pixels
    has_spacing: ClassVar[bool] = True
    # what a map beside the masks holds (write_prediction's ``probabilities``): "prob", or "uncertainty"
    # for predict --save-uncertainty; it names the files (``_prob``) or folders (``probabilities/``)
    map_name: str = "prob"
    # files write_prediction builds up over all cases (appended per case): replaced whole by predict --overwrite
    aggregate_files: ClassVar[tuple[str, ...]] = ()

    # files a layout holds beside its cases (lists, metadata, a data set's README): never reported unread
    companions: ClassVar[tuple[str, ...]] = ("*.md", "*.txt", "*.json", "*.csv", "*.pdf", "LICENSE*", "Thumbs.db")
    # label files of the layout (glob of the path under ROOT): not read when predicting, and not reported then
    label_files: ClassVar[tuple[str, ...]] = ()
    # names of the prediction files write_prediction writes (globs); None: any file of a kind it wrote.
    # evaluate names the ones no truth case reads
    prediction_files: ClassVar[tuple[str, ...] | None] = None

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        # NaN or Inf voxels: refused (error), or replaced by 0 (zero) or the channel's finite minimum (min)
        nonfinite: Literal["error", "zero", "min"] = "error"

    def __init__(self, **options: Any):
        try:
            self.options = self.Options(**options)
        except ValidationError as e:
            bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise MedsegError(f"bad option for format {self.name!r}: {bad}") from None

    @abstractmethod
    def scan(self, root: Path, require_masks: bool = True) -> DatasetSpec:
        """List the cases under ``root``; raise MedsegError naming the file for any pairing problem."""

    @abstractmethod
    def load(self, spec: DatasetSpec, case: CaseSpec) -> CaseData:
        """Read one case's arrays; raise MedsegError naming the file if it cannot be read."""

    # what every stage calls: the reader's own methods, then the checks no reader may skip
    def survey(self, root: Path, require_masks: bool = True) -> DatasetSpec:
        """``scan``, then one warning naming the files under ``root`` that no case uses."""
        spec = self.scan(root, require_masks)
        report_unread(spec, self.companions + (() if require_masks else self.label_globs()))
        return spec

    def label_globs(self) -> tuple[str, ...]:
        return self.label_files

    def read(self, spec: DatasetSpec, case: CaseSpec) -> CaseData:
        """``load``, then the shape checks and the non-finite rule (option ``nonfinite``)."""
        data = self.load(spec, case)
        where = case_path(case, spec)
        data.check(where)
        data.image = finite_image(data.image, self.options.nonfinite, case, where)
        return data

    @classmethod
    def sniff(cls, path: Path) -> int:
        """How surely ``path`` is in this layout: 0 not, 1 plausibly, 2 by its tell-tale files, 3 by an
        explicit layout (``guess_format`` takes the highest; ties go to the earlier registered format)."""
        return 0

    def read_prediction(self, root: Path, spec: DatasetSpec, case: CaseSpec, shape: tuple[int, ...]) -> np.ndarray:
        """Read back what ``write_prediction`` wrote for ``case`` under ``root`` as ``mask[z, k, h, w]``
        of ``shape``; a MedsegError naming the file when it is missing or does not fit."""
        raise MedsegError(f"reading a {self.name!r} predictions folder is not supported", root)

    @classmethod
    def options_for_model(cls, channels: int | None) -> dict[str, Any]:
        """Reader options that fit a model taking ``channels`` image channels (predicting)."""
        return {}

    @classmethod
    def truth_from_file(cls, path: Path, images: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
        """(root, options) to read ground truth given as one file of this format (a labels table such as
        a competition's CSV), with its images under ``images``; None if this format has no such file."""
        return None

    @classmethod
    def read_prediction_table(cls, path: Path) -> PredictionTable | None:
        """Predictions of every case in one file (a submission), if this format writes them so."""
        return None

    def slice_count(self, spec: DatasetSpec, case: CaseSpec) -> int:
        """How many slices ``load`` will return for ``case`` (progress bars); cheap, no pixel data read.
        The default: one per image file (2D layouts)."""
        return len(case.sources.get("images") or [None])

    def write_prediction(
        self,
        spec: DatasetSpec,
        case: CaseSpec,
        mask: np.ndarray,
        out_dir: Path,
        probabilities: np.ndarray | None = None,
    ) -> list[Path]:
        """Write ``mask[z, k, h, w]`` for ``case`` under ``out_dir`` in this layout; return the files."""
        raise MedsegError(f"format {self.name!r} cannot write predictions yet")
