"""Where predictions and ground truth come from, as cases of ``mask[z, k, h, w]`` uint8 0/1.

Ground truth: a prepared dataset, or a native layout a registered reader understands.
Predictions: a predictions folder in the input's own layout (one loader per format in
``PRED_LAYOUTS``), a prepared dataset, a run's ``fold_K/val_predictions/<case>.npz``, or a
UW-Madison submission CSV. Everything is loaded one case at a time.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.formats.base import CaseSpec, DatasetSpec, Reader
from medseg.errors import MedsegError


@dataclass
class TruthCase:
    id: str
    patient: str
    mask: np.ndarray  # [z, k, h, w] uint8
    spacing: tuple[float, float, float]
    slices: list[str] | None
    image: Callable[[], np.ndarray]  # lazy [z, c, h, w], only read for the report's overlays


class Truth:
    """Ground truth: ``ids``, ``patient(id)``, ``load(id)``, plus the native layout when known."""

    classes: list[str]
    class_kind: str
    spatial_dims: int
    ids: list[str]
    path: Path
    prepared: Any = None  # PreparedDataset when the truth is one

    def patient(self, case_id: str) -> str:
        raise NotImplementedError

    def load(self, case_id: str) -> TruthCase:
        raise NotImplementedError

    def native(self) -> tuple[Reader, DatasetSpec, dict[str, CaseSpec]] | None:
        """(reader, spec, cases by id) of the native layout, to locate a predictions folder's files."""
        return None


class PreparedTruth(Truth):
    def __init__(self, path: Path):
        from medseg.data.prepared import PreparedDataset

        ds = PreparedDataset.open(path)
        if not ds.info.get("has_masks", True) or any(c.mask is None for c in ds.cases):
            raise MedsegError("the prepared dataset has no masks (prepared with --images-only)", path)
        self.prepared = ds
        self.path = Path(path)
        self.classes = ds.classes
        self.class_kind = ds.class_kind
        self.spatial_dims = ds.spatial_dims
        self.ids = [c.id for c in ds.cases]
        self._native: Any = False

    def patient(self, case_id: str) -> str:
        return self.prepared.case(case_id).patient

    def load(self, case_id: str) -> TruthCase:
        ds = self.prepared
        rec = ds.case(case_id)
        return TruthCase(id=rec.id, patient=rec.patient, mask=np.asarray(ds.mask(case_id)),
                         spacing=tuple(float(s) for s in rec.spacing), slices=rec.slices,
                         image=lambda: np.asarray(ds.image(case_id)))

    def native(self):
        if self._native is False:
            from medseg.data.formats import get_reader

            info = self.prepared.info
            self._native = None
            if info.get("source_format") and info.get("source") and Path(info["source"]).exists():
                try:
                    reader = get_reader(info["source_format"], **(info.get("reader_options") or {}))
                    spec = reader.scan(Path(info["source"]), require_masks=False)
                except MedsegError:
                    return None
                # the mask-less scan does not know the label values / palette: take them from prepare
                spec.meta = {**spec.meta, **{k: v for k, v in (info.get("meta") or {}).items() if v}}
                spec.classes = self.classes
                self._native = (reader, spec, {c.id: c for c in spec.cases})
        return self._native


class NativeTruth(Truth):
    def __init__(self, path: Path, fmt: str, options: dict[str, Any] | None = None):
        from medseg.data.formats import get_reader

        self.path = Path(path)
        self.reader = get_reader(fmt, **(options or {}))
        self.spec = self.reader.scan(self.path, require_masks=True)
        if not self.spec.has_masks:
            raise MedsegError("the ground truth has no masks", path)
        self.classes = list(self.spec.classes)
        self.class_kind = self.spec.class_kind
        self.spatial_dims = self.spec.spatial_dims
        self.cases = {c.id: c for c in self.spec.cases}
        self.ids = list(self.cases)
        self._cache: tuple[str, Any] | None = None

    def _data(self, case_id: str):
        if self._cache is None or self._cache[0] != case_id:
            data = self.reader.load(self.spec, self.cases[case_id])
            data.check(case_id)
            self._cache = (case_id, data)
        return self._cache[1]

    def patient(self, case_id: str) -> str:
        return self.cases[case_id].patient

    def load(self, case_id: str) -> TruthCase:
        data = self._data(case_id)
        if data.mask is None:
            raise MedsegError(f"case {case_id} has no mask", self.path)
        return TruthCase(id=case_id, patient=self.cases[case_id].patient, mask=data.mask,
                         spacing=tuple(float(s) for s in data.spacing), slices=data.slices,
                         image=lambda: self._data(case_id).image)

    def native(self):
        return self.reader, self.spec, self.cases


def guess_format(path: Path) -> str:
    """The reader for a native layout, from tell-tale files (``--format`` overrides)."""
    p = Path(path)
    if p.is_file():
        if p.name.lower().endswith((".nii", ".nii.gz")):
            return "nifti"
        raise MedsegError("cannot tell the format of this file; pass --format", p)
    if not p.is_dir():
        raise MedsegError("no such file or folder", p)
    if (p / "train.csv").is_file() or any(q.is_dir() and q.name.startswith("case") for q in p.iterdir()):
        return "uwmgi"
    if (p / "labelsTr").is_dir() or (p / "imagesTr").is_dir():
        return "nifti"
    if (p / "images").is_dir() and (p / "masks").is_dir():
        return "folder"
    if any(p.glob("*/*_mask.tif")) or any(p.glob("*_mask.tif")):
        return "lgg"
    if any(p.glob("*.nii.gz")) or any(p.glob("*.nii")):
        return "nifti"
    from medseg.data.formats.coco import is_coco_folder

    if is_coco_folder(p):
        return "coco"
    raise MedsegError("cannot tell the dataset format; pass --format (see `medseg formats`)", p)


def is_prepared(path: Path) -> bool:
    """A prepared dataset (an MSD folder has a dataset.json too, without ``format_version``)."""
    import json

    meta = Path(path) / "dataset.json"
    if not meta.is_file():
        return False
    try:
        return "format_version" in json.loads(meta.read_text())
    except (OSError, ValueError):
        return False


def open_truth(path: Path, fmt: str | None = None, images: Path | None = None) -> Truth:
    path = Path(path)
    if fmt is None and is_prepared(path):
        return PreparedTruth(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        # a UW-Madison train.csv: images in --images (or the train/ folder beside it)
        root = Path(images) if images else path.parent
        return NativeTruth(root, fmt or "uwmgi", {"csv": str(path.resolve())})
    return NativeTruth(path, fmt or guess_format(path))


# --- predictions ------------------------------------------------------------------------------

PredLoader = Callable[[Path, Reader, DatasetSpec, CaseSpec, tuple[int, ...]], np.ndarray]
PRED_LAYOUTS: dict[str, PredLoader] = {}


def register_pred_layout(fmt: str) -> Callable[[PredLoader], PredLoader]:
    """Register how a predictions folder written by ``reader.write_prediction`` is read back."""

    def deco(fn: PredLoader) -> PredLoader:
        PRED_LAYOUTS[fmt] = fn
        return fn

    return deco


def _expect(path: Path, case_id: str, what: str) -> Path:
    if not path.is_file():
        raise MedsegError(f"no prediction for case {case_id}{what} (expected {path.name})", path.parent)
    return path


def _check_2d(m: np.ndarray, shape: tuple[int, ...], path: Path) -> None:
    if m.shape != tuple(shape[2:]):
        raise MedsegError(f"prediction is {m.shape[0]}x{m.shape[1]} but the truth slice is {shape[2]}x{shape[3]}", path)


@register_pred_layout("lgg")
def _pred_lgg(root: Path, reader: Reader, spec: DatasetSpec, case: CaseSpec, shape: tuple[int, ...]) -> np.ndarray:
    from medseg.data.formats.lgg import read_tiff

    numbers = case.sources["numbers"]
    if len(numbers) != shape[0]:
        raise MedsegError(f"case {case.id}: {len(numbers)} slices in the layout, {shape[0]} in the truth", root)
    out = np.zeros(shape, np.uint8)
    for z, n in enumerate(numbers):
        p = _expect(root / case.id / f"{case.id}_{n}_mask.tif", case.id, f" slice {n}")
        m = read_tiff(p)
        if m.ndim == 3:
            m = m[..., 0]
        _check_2d(m, shape, p)
        out[z, 0] = m > (127 if m.max() > 1 else 0)
    return out


@register_pred_layout("folder")
def _pred_folder(root: Path, reader: Reader, spec: DatasetSpec, case: CaseSpec, shape: tuple[int, ...]) -> np.ndarray:
    from medseg.data.formats.folder import map_palette, read_image

    folder = root / "masks" if (root / "masks").is_dir() else root
    stems = case.sources["stems"]
    palette = spec.meta.get("palette")
    k = shape[1]
    out = np.zeros(shape, np.uint8)
    for z, stem in enumerate(stems):
        p = _expect(folder / f"{stem}.png", case.id, f" ({stem})")
        m = read_image(p)
        if palette:
            lab = map_palette(m, [tuple(c) for c in palette])
        else:
            lab = m if m.ndim == 2 else m[..., 0]
            if k == 1:
                lab = (lab > (127 if lab.max() > 1 else 0)).astype(np.uint8)
        _check_2d(lab, shape, p)
        if int(lab.max()) > k:
            raise MedsegError(f"label {int(lab.max())} in a prediction but only {k} classes", p)
        for j in range(k):
            out[z, j] = lab == j + 1
    return out


@register_pred_layout("coco")
def _pred_coco(root: Path, reader: Reader, spec: DatasetSpec, case: CaseSpec, shape: tuple[int, ...]) -> np.ndarray:
    """``<image stem>[_<class>]_mask.png`` (0/255) per class, as the COCO reader writes them."""
    from medseg.data.formats.coco import _safe
    from medseg.data.formats.folder import read_image

    out = np.zeros(shape, np.uint8)
    for j, name in enumerate(spec.classes):
        suffix = "" if len(spec.classes) == 1 else f"_{_safe(name)}"
        p = _expect(root / f"{case.id}{suffix}_mask.png", case.id, "")
        m = read_image(p)
        m = m if m.ndim == 2 else m[..., 0]
        _check_2d(m, shape, p)
        out[0, j] = m > (127 if m.max() > 1 else 0)
    return out


@register_pred_layout("nifti")
def _pred_nifti(root: Path, reader: Reader, spec: DatasetSpec, case: CaseSpec, shape: tuple[int, ...]) -> np.ndarray:
    from medseg.data.formats.nifti import labels_to_mask, load_nifti, nifti_array, to_zyx

    p = root / f"{case.id}.nii.gz"
    if not p.is_file() and (root / f"{case.id}.nii").is_file():
        p = root / f"{case.id}.nii"
    _expect(p, case.id, "")
    lab = nifti_array(load_nifti(p), p)
    if lab.ndim == 4 and lab.shape[3] == 1:
        lab = lab[..., 0]
    if lab.ndim != 3:
        raise MedsegError(f"expected a 3D label map, got shape {lab.shape}", p)
    zyx = to_zyx(lab)[:, 0]
    if zyx.shape != (shape[0], *shape[2:]):
        raise MedsegError(f"prediction shape {zyx.shape} (z, y, x) differs from the truth's {(shape[0], *shape[2:])}", p)
    values = spec.meta.get("label_values") or list(range(1, shape[1] + 1))
    return labels_to_mask(zyx, values, p)


@dataclass
class Predictions:
    """Predicted masks by case id; ``kind`` is folder / prepared / run / submission."""

    kind: str
    path: Path
    loader: Callable[[str, TruthCase], np.ndarray]
    ids: set[str] | None = None  # case ids available (None: every truth case, checked on load)
    run_dir: Path | None = None
    curves: dict[str, Path] = field(default_factory=dict)  # fold -> training metrics.csv
    submission: dict[tuple[str, str], str] | None = None


def _check_shape(m: np.ndarray, t: TruthCase, where: Path) -> np.ndarray:
    if m.shape != t.mask.shape:
        raise MedsegError(f"case {t.id}: prediction shape {tuple(m.shape)} differs from the truth's "
                          f"{tuple(t.mask.shape)} [z, k, h, w]", where)
    return m


def prepared_predictions(path: Path) -> Predictions:
    from medseg.data.prepared import PreparedDataset

    ds = PreparedDataset.open(path)

    def load(case_id: str, t: TruthCase) -> np.ndarray:
        if case_id not in ds._index:
            raise MedsegError(f"no prediction for case {case_id}", path)
        return _check_shape(np.asarray(ds.mask(case_id)), t, path)

    return Predictions("prepared", Path(path), load, ids={c.id for c in ds.cases})


def run_predictions(run: Path) -> tuple[Predictions, Path]:
    """(predictions, prepared dataset path) of a run directory's validation predictions."""
    import yaml

    cfg_path = run / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MedsegError(f"cannot read the run's config ({e})", cfg_path) from None
    prepared = (cfg.get("data") or {}).get("prepared")
    if not prepared:
        raise MedsegError("config has no data.prepared (the prepared dataset of the run)", cfg_path)
    cand = [Path(prepared)] if Path(prepared).is_absolute() else [Path(prepared), run / prepared, run.parent / prepared]
    ds_path = next((c for c in cand if (c / "dataset.json").is_file()), None)
    if ds_path is None:
        raise MedsegError(f"the run's prepared dataset {prepared!r} is not found", cfg_path)
    files: dict[str, Path] = {}
    curves: dict[str, Path] = {}
    for fold in sorted(run.glob("fold_*"), key=lambda p: p.name):
        for f in sorted((fold / "val_predictions").glob("*.npz")):
            if f.stem in files:
                raise MedsegError(f"case {f.stem} has validation predictions in two folds ({files[f.stem].parent.parent.name})", f)
            files[f.stem] = f
        if (fold / "metrics.csv").is_file():
            curves[fold.name] = fold / "metrics.csv"
        for m in sorted(fold.glob("member_*/metrics.csv")):  # train.members: each member's own curves
            curves[f"{fold.name}/{m.parent.name}"] = m
    if not files:
        raise MedsegError("no validation predictions (fold_K/val_predictions/<case>.npz)", run)

    def load(case_id: str, t: TruthCase) -> np.ndarray:
        f = files[case_id]
        try:
            with np.load(f) as z:
                if "mask" not in z.files:
                    raise MedsegError(f"no 'mask' array in the file (has {', '.join(z.files) or 'nothing'})", f)
                m = z["mask"]
        except (OSError, ValueError) as e:
            raise MedsegError(f"cannot read predictions ({e})", f) from None
        return _check_shape((np.asarray(m) > 0).astype(np.uint8), t, f)

    return Predictions("run", run, load, ids=set(files), run_dir=run, curves=curves), ds_path


def folder_predictions(path: Path, truth: Truth) -> Predictions:
    native = truth.native()
    if native is None:
        raise MedsegError("cannot locate the prediction files: the truth's native layout is unknown or missing "
                          "(pass the native layout as TRUTH, or a prepared dataset whose source still exists)", path)
    reader, spec, cases = native
    fmt = spec.format
    if fmt not in PRED_LAYOUTS:
        raise MedsegError(f"reading a {fmt!r} predictions folder is not supported yet (known: "
                          f"{', '.join(sorted(PRED_LAYOUTS))})", path)

    def load(case_id: str, t: TruthCase) -> np.ndarray:
        if case_id not in cases:
            raise MedsegError(f"case {case_id} is not in the native layout {spec.root}", path)
        return _check_shape(PRED_LAYOUTS[fmt](Path(path), reader, spec, cases[case_id], t.mask.shape), t, path)

    return Predictions("folder", Path(path), load)


def submission_predictions(path: Path, truth: Truth) -> Predictions:
    from medseg.data import rle
    from medseg.data.formats.uwmgi import read_submission

    sub = read_submission(path)
    classes = truth.classes

    def load(case_id: str, t: TruthCase) -> np.ndarray:
        if not t.slices:
            raise MedsegError(f"case {case_id} has no slice ids to match the submission's", truth.path)
        out = np.zeros(t.mask.shape, np.uint8)
        h, w = t.mask.shape[2:]
        for z, sid in enumerate(t.slices):
            for k, cls in enumerate(classes):
                if (sid, cls) not in sub:
                    raise MedsegError(f"no row for id {sid}, class {cls}", path)
                out[z, k] = rle.decode(sub[(sid, cls)], (h, w), where=path, row=f"id {sid}, class {cls}")
        return out

    return Predictions("submission", Path(path), load, submission=sub)


def open_predictions(path: Path, truth: Truth | None) -> Predictions:
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return submission_predictions(path, truth)
    if is_prepared(path):
        return prepared_predictions(path)
    if path.is_dir() and (path / "submission.csv").is_file() and not any(path.glob("*/*_mask.tif")):
        return submission_predictions(path / "submission.csv", truth)
    if not path.exists():
        raise MedsegError("no such file or folder", path)
    return folder_predictions(path, truth)
