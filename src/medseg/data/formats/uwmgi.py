"""UW-Madison GI tract segmentation (Kaggle 2022), in the exact competition layout::

    ROOT/train.csv                                          id,class,segmentation (RLE, row-major)
    ROOT/train/caseN/caseN_dayM/scans/slice_XXXX_W_H_PW_PH.png   16-bit grayscale, W x H pixels

One case per case-day (``caseN_dayM``), patient ``caseN``; classes large_bowel, small_bowel, stomach
as separate (overlapping) channels. ROOT may also be the ``train/`` (or ``test/``) folder itself, and
the test layout (images only, no csv) is read with ``require_masks=False``.

Slice thickness is not in the file names; the dataset paper (Lee et al., Data in Brief 2024) gives
3 mm, so spacing is (3.0, PH, PW).

Predictions: ``write_prediction`` appends a case's rows to ``OUT/submission.csv`` (``id,class,predicted``);
``submission_rows``/``write_submission``/``read_submission`` handle a whole submission.
"""
from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from medseg.atomic import atomic_path
from medseg.data import rle as rlelib
from medseg.data.formats import FORMATS
from medseg.data.formats.base import MAP_FOLDERS, CaseData, CaseSpec, DatasetSpec, PredictionTable, Reader
from medseg.errors import MedsegError

CLASSES = ["large_bowel", "small_bowel", "stomach"]  # competition order
SLICE_THICKNESS_MM = 3.0  # not in the file names; value from the dataset paper

_SLICE_FILE = re.compile(
    r"^slice_(?P<n>\d+)_(?P<w>\d+)_(?P<h>\d+)_(?P<pw>\d+(?:\.\d+)?)_(?P<ph>\d+(?:\.\d+)?)\.png$"
)
_CASE_DAY = re.compile(r"^(?P<case>case\d+)_day(?P<day>\d+)$")
_SLICE_ID = re.compile(r"^(?P<caseday>case\d+_day\d+)_slice_(?P<n>\d+)$")


def parse_slice_file(path: Path) -> dict:
    """``slice_0001_266_266_1.50_1.50.png`` -> n, width, height, pixel width/height (mm)."""
    m = _SLICE_FILE.match(path.name)
    if not m:
        raise MedsegError("slice file name does not parse (expected slice_XXXX_W_H_PW_PH.png)", path)
    return {
        "n": int(m["n"]),
        "digits": m["n"],
        "w": int(m["w"]),
        "h": int(m["h"]),
        "pw": float(m["pw"]),
        "ph": float(m["ph"]),
    }


def read_png16(path: Path) -> tuple[np.ndarray, str]:
    """(a grayscale PNG as uint16, the dtype the file stored): 16-bit files keep their values, 8-bit ones
    are widened (their values then sit on another scale, which the caller must know)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise MedsegError(f"cannot read PNG ({type(e).__name__}: {e})", path) from None
    if a.ndim == 3:  # an RGB(A) export of a grayscale slice
        a = a[..., 0]
    stored = str(a.dtype)
    if a.dtype != np.uint16:
        if a.dtype not in (np.uint8, np.int32, np.uint32):
            raise MedsegError(f"unexpected PNG pixel type {a.dtype}", path)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise MedsegError("PNG values do not fit 16 bits", path)
        a = a.astype(np.uint16)
    return a, stored


def read_train_csv(path: Path, check_rle: bool = True) -> dict[str, dict[str, str]]:
    """``train.csv`` as ``{slice id: {class: rle}}`` (rows may come in any order); RLE syntax checked
    unless ``check_rle`` is False (``scan`` checks it later, with the image size)."""
    path = Path(path)
    out: dict[str, dict[str, str]] = {}
    try:
        f = open(path, newline="")
    except OSError as e:
        raise MedsegError(f"cannot read csv ({e.strerror})", path) from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise MedsegError("empty csv (expected header id,class,segmentation)", path)
        cols = [h.strip() for h in header]
        missing = [c for c in ("id", "class", "segmentation") if c not in cols]
        if missing:
            raise MedsegError(f"csv has no column {', '.join(missing)} (header: {','.join(cols)})", path)
        i_id, i_cls, i_seg = cols.index("id"), cols.index("class"), cols.index("segmentation")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < len(cols):
                row = row + [""] * (len(cols) - len(row))
            sid, cls, seg = row[i_id].strip(), row[i_cls].strip(), row[i_seg]
            if not _SLICE_ID.match(sid):
                raise MedsegError(f"line {line}: id {sid!r} is not caseN_dayM_slice_XXXX", path)
            if cls not in CLASSES:
                raise MedsegError(f"line {line}: unknown class {cls!r} (expected one of {', '.join(CLASSES)})", path)
            per = out.setdefault(sid, {})
            if cls in per:
                raise MedsegError(f"line {line}: duplicate row for id {sid}, class {cls}", path)
            if check_rle:
                rlelib.validate(seg, where=path, row=f"id {sid}, class {cls} (line {line})")
            per[cls] = seg.strip()
    for sid, per in out.items():
        lacking = [c for c in CLASSES if c not in per]
        if lacking:
            raise MedsegError(f"id {sid} has no row for class {', '.join(lacking)}", path)
    return out


def _find_images_dir(root: Path) -> Path:
    """ROOT/train, ROOT/test, or ROOT itself when it holds caseN folders."""
    if any(_is_case_dir(p) for p in root.iterdir()):
        return root
    for name in ("train", "test"):
        if (root / name).is_dir():
            return root / name
    raise MedsegError("no UW-Madison images: expected train/ or test/ holding caseN/caseN_dayM/scans/", root)


def _is_case_dir(p: Path) -> bool:
    return p.is_dir() and re.fullmatch(r"case\d+", p.name) is not None


@FORMATS.register("uwmgi")
class UWMGIReader(Reader):
    name = "uwmgi"
    description = "UW-Madison GI tract (Kaggle): train.csv (RLE) + train/caseN/caseN_dayM/scans/*.png"
    patients = "caseN of caseN_dayM (a patient's days are one patient)"
    aggregate_files = ("submission.csv",)

    @classmethod
    def sniff(cls, path: Path) -> int:
        """``train.csv``, ``caseN`` folders, or ``scans/`` folders up to three levels down."""
        path = Path(path)
        if not path.is_dir():
            return 0
        if path.name == "scans" or (path / "train.csv").is_file():
            return 2
        if any(q.is_dir() and re.match(r"^case\d+", q.name) for q in path.iterdir()):
            return 2
        return 2 if any(p.is_dir() for pat in ("scans", "*/scans", "*/*/scans", "*/*/*/scans") for p in path.glob(pat)) else 0

    @classmethod
    def truth_from_file(cls, path: Path, images: Path | None = None) -> tuple[Path, dict] | None:
        # the competition's train.csv: its images in ``images`` (or the train/ folder beside it)
        if Path(path).suffix.lower() != ".csv":
            return None
        return (Path(images) if images else Path(path).parent), {"csv": str(Path(path).resolve())}

    @classmethod
    def read_prediction_table(cls, path: Path) -> PredictionTable:
        return _Submission(Path(path))

    class Options(Reader.Options):
        rle_order: Literal["C", "F"] = "C"
        csv: str = "train.csv"

    def _csv_path(self, root: Path, images_dir: Path) -> Path | None:
        p = Path(self.options.csv)
        if p.is_absolute():
            return p if p.is_file() else None
        for base in (root, images_dir.parent):
            if (base / p).is_file():
                return base / p
        return None

    def scan(self, root: Path, require_masks: bool = True) -> DatasetSpec:
        root = Path(root)
        if not root.is_dir():
            raise MedsegError("not a folder", root)
        images_dir = _find_images_dir(root)
        csv_path = self._csv_path(root, images_dir) if require_masks else None
        if require_masks and csv_path is None:
            raise MedsegError(
                f"no {self.options.csv} beside the images (use --images-only for the test layout)", root
            )
        labels = read_train_csv(csv_path, check_rle=False) if csv_path else {}

        groups: dict[str, list[tuple[dict, Path]]] = {}
        for case_dir in sorted(p for p in images_dir.iterdir() if _is_case_dir(p)):
            for day_dir in sorted(p for p in case_dir.iterdir() if p.is_dir()):
                m = _CASE_DAY.match(day_dir.name)
                if not m or m["case"] != case_dir.name:
                    raise MedsegError(f"expected a {case_dir.name}_dayM folder", day_dir)
                scans = day_dir / "scans"
                if not scans.is_dir():
                    raise MedsegError("case-day folder has no scans/ folder", day_dir)
                files = [f for f in scans.iterdir() if f.is_file() and not f.name.startswith(".")]
                if files:
                    groups[day_dir.name] = [(parse_slice_file(f), f) for f in files]
        if not groups:
            raise MedsegError("no slices found (expected caseN/caseN_dayM/scans/slice_*.png)", images_dir)

        cases: list[CaseSpec] = []
        seen: set[str] = set()
        for case_id in sorted(groups, key=_natural):
            items = sorted(groups[case_id], key=lambda t: t[0]["n"])
            first = items[0][0]
            for info, f in items:
                if (info["w"], info["h"]) != (first["w"], first["h"]):
                    raise MedsegError(
                        f"slice size {info['w']}x{info['h']} differs from the case-day's "
                        f"{first['w']}x{first['h']} ({items[0][1].name})",
                        f,
                    )
                if (info["pw"], info["ph"]) != (first["pw"], first["ph"]):
                    raise MedsegError(
                        f"pixel spacing {info['pw']}x{info['ph']} differs from the case-day's {first['pw']}x{first['ph']}",
                        f,
                    )
            numbers = [info["n"] for info, _ in items]
            if len(set(numbers)) != len(numbers):
                dup = next(n for n in numbers if numbers.count(n) > 1)
                raise MedsegError(f"two files for slice {dup}", items[0][1].parent)
            slice_ids = [f"{case_id}_slice_{info['digits']}" for info, _ in items]
            rles = None
            if csv_path:
                rles = []
                for sid, (_, f) in zip(slice_ids, items):
                    per = labels.get(sid)
                    if per is None:
                        if require_masks:
                            raise MedsegError(f"image without rows in {csv_path.name} (id {sid})", f)
                        per = {}
                    for c in CLASSES:  # past-the-end check needs the size from the file name
                        rlelib.validate(per.get(c, ""), first["w"] * first["h"], where=csv_path, row=f"id {sid}, class {c}")
                    rles.append([per.get(c, "") for c in CLASSES])
                seen.update(slice_ids)
            cases.append(
                CaseSpec(
                    id=case_id,
                    patient=_CASE_DAY.match(case_id)["case"],
                    sources={
                        "folder": str(items[0][1].parent.parent),
                        "csv": str(csv_path) if csv_path else None,
                        "images": [str(f) for _, f in items],
                        "slices": slice_ids,
                        "size": [first["h"], first["w"]],
                        "pixel_spacing": [first["ph"], first["pw"]],
                        "rles": rles,
                    },
                )
            )
        if csv_path:
            orphans = [sid for sid in labels if sid not in seen]
            if orphans:
                orphans.sort(key=_natural)
                raise MedsegError(
                    f"id {orphans[0]} has no image under {images_dir}"
                    + (f" ({len(orphans) - 1} more ids without images)" if len(orphans) > 1 else ""),
                    csv_path,
                )
        return DatasetSpec(
            format=self.name,
            root=str(root),
            channels=["MRI"],
            classes=list(CLASSES),
            class_kind="multilabel",
            spatial_dims=2,
            cases=cases,
            has_masks=csv_path is not None,
            meta={"slice_thickness_mm": SLICE_THICKNESS_MM, "rle_order": self.options.rle_order},
        )

    def load(self, spec: DatasetSpec, case: CaseSpec) -> CaseData:
        h, w = case.sources["size"]
        imgs = []
        first = None
        for p in case.sources["images"]:
            a, stored = read_png16(Path(p))
            if a.shape != (h, w):
                raise MedsegError(
                    f"image is {a.shape[1]}x{a.shape[0]} (WxH) but its name says {w}x{h}", p
                )
            first = first or stored
            if stored != first:  # an 8-bit slice among 16-bit ones has another intensity scale
                raise MedsegError(f"slice is stored as {stored} but the case-day's first slice as {first}", p)
            imgs.append(a)
        image = np.stack(imgs)[:, None]  # [z, 1, h, w] uint16
        mask = None
        rles = case.sources.get("rles")
        if rles is not None:
            order = self.options.rle_order
            csv_path = case.sources["csv"]
            mask = np.zeros((len(rles), len(CLASSES), h, w), np.uint8)
            for z, (sid, per) in enumerate(zip(case.sources["slices"], rles)):
                for k, (cls, s) in enumerate(zip(CLASSES, per)):
                    if s:
                        mask[z, k] = rlelib.decode(s, (h, w), order, where=csv_path, row=f"id {sid}, class {cls}")
        ph, pw = case.sources["pixel_spacing"]
        return CaseData(
            image=image,
            mask=mask,
            spacing=(SLICE_THICKNESS_MM, float(ph), float(pw)),
            slices=list(case.sources["slices"]),
            meta={"pixel_spacing_from": "file name", "slice_thickness_mm": SLICE_THICKNESS_MM},
        )

    def write_prediction(self, spec, case, mask, out_dir, probabilities=None):
        """Append the case's rows to ``out_dir/submission.csv`` (created with its header if absent)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "submission.csv"
        rows = submission_rows(case.sources["slices"], mask, spec.classes, order=self.options.rle_order)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            if new:
                w.writerow(["id", "class", "predicted"])
            w.writerows(rows)
        written = [path]
        if probabilities is not None:
            p = out / MAP_FOLDERS[self.map_name] / f"{case.id}.npy"
            p.parent.mkdir(exist_ok=True)
            np.save(p, np.asarray(probabilities, np.float16))
            written.append(p)
        return written


def submission_rows(
    case_slices: list[str], mask: np.ndarray, classes: list[str], order: Literal["C", "F"] = "C"
) -> list[tuple[str, str, str]]:
    """``(id, class, rle)`` rows for ``mask[z, k, h, w]``: slices in the given order, then classes in
    competition order (large_bowel, small_bowel, stomach)."""
    mask = np.asarray(mask)
    if mask.ndim != 4 or mask.shape[0] != len(case_slices) or mask.shape[1] != len(classes):
        raise MedsegError(
            f"mask shape {mask.shape} does not match {len(case_slices)} slices x {len(classes)} classes"
        )
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise MedsegError(f"class {unknown[0]!r} is not a UW-Madison class ({', '.join(CLASSES)})")
    ks = [(c, classes.index(c)) for c in CLASSES if c in classes]
    return [(sid, c, rlelib.encode(mask[z, k], order)) for z, sid in enumerate(case_slices) for c, k in ks]


def write_submission(rows: Iterable[tuple[str, str, str]], path: str | Path) -> Path:
    """Write ``id,class,predicted`` rows to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "class", "predicted"])
        w.writerows(rows)
    return path


class _Submission(PredictionTable):
    """A submission CSV as predictions of every case-day."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = read_submission(path)
        self.slice_ids = {sid for sid, _ in self.rows}

    def masks(self, slices: list[str], classes: list[str], size: tuple[int, int]) -> np.ndarray:
        out = np.zeros((len(slices), len(classes), *size), np.uint8)
        for z, sid in enumerate(slices):
            for k, cls in enumerate(classes):
                if (sid, cls) not in self.rows:
                    raise MedsegError(f"no row for id {sid}, class {cls}", self.path)
                out[z, k] = rlelib.decode(self.rows[(sid, cls)], size, where=self.path, row=f"id {sid}, class {cls}")
        return out


def read_submission(path: str | Path) -> dict[tuple[str, str], str]:
    """A submission (``id,class,predicted``; ``segmentation`` is accepted too) as ``{(id, class): rle}``."""
    path = Path(path)
    try:
        f = open(path, newline="")
    except OSError as e:
        raise MedsegError(f"cannot read submission ({e.strerror})", path) from None
    out: dict[tuple[str, str], str] = {}
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise MedsegError("empty submission (expected header id,class,predicted)", path)
        cols = [h.strip() for h in header]
        rle_col = "predicted" if "predicted" in cols else "segmentation" if "segmentation" in cols else None
        missing = [c for c in ("id", "class") if c not in cols] + ([] if rle_col else ["predicted"])
        if missing:
            raise MedsegError(f"submission has no column {', '.join(missing)} (header: {','.join(cols)})", path)
        i_id, i_cls, i_rle = cols.index("id"), cols.index("class"), cols.index(rle_col)
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            row = row + [""] * (len(cols) - len(row))
            key = (row[i_id].strip(), row[i_cls].strip())
            if key in out:
                raise MedsegError(f"line {line}: duplicate row for id {key[0]}, class {key[1]}", path)
            rlelib.validate(row[i_rle], where=path, row=f"id {key[0]}, class {key[1]} (line {line})")
            out[key] = row[i_rle].strip()
    return out


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
