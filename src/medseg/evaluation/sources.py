"""Where predictions and ground truth come from, as cases of ``mask[z, k, h, w]`` uint8 0/1.

Ground truth: a prepared dataset, a native layout a registered reader understands (or a labels table
file its format owns), or a plain folder of label maps.
Predictions: a predictions folder in the input's own layout (read back by its reader's
``read_prediction``), a prepared dataset, a run's ``fold_K/val_predictions/<case>.npz``, or one file
holding every case's predictions (a submission) that the truth's format reads. Everything is loaded one
case at a time.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.bundle import load_bundle
from medseg.data.formats import FORMATS, get_reader, guess_format
from medseg.data.formats.base import CaseSpec, DatasetSpec, Reader, binary_mask
from medseg.data.formats.folder import _is_gray, read_image
from medseg.data.formats.nifti_io import load_nifti, nifti_array, nifti_stem, to_zyx
from medseg.data.prepared import PreparedDataset
from medseg.errors import MedsegError
from medseg.inference.postprocess import decide, merge_config
from medseg.rundir import RunDir


@dataclass
class TruthCase:
    id: str
    patient: str
    mask: np.ndarray  # [z, k, h, w] uint8
    spacing: tuple[float, float, float]
    slices: list[str] | None
    image: Callable[[], np.ndarray]  # lazy [z, c, h, w], only read for the report's overlays
    has_mask: bool = True  # False: images only (``medseg view`` without truth), ``mask`` is all zeros
    affine: np.ndarray | None = None  # (column, row, slice) index -> RAS mm, when the layout stores one


def _grid_affine(rec: Any) -> np.ndarray | None:
    """A prepared case's affine on its stored grid: the source's, its columns rescaled when prepare resampled
    the case (directions and origin kept: the view needs orientation, the readout positions to a voxel)."""
    if rec.affine is None:
        return None
    a = np.asarray(rec.affine, float).copy()
    if rec.native:
        src = [float(s) for s in rec.native["spacing"]]
        for col, axis in ((0, 2), (1, 1), (2, 0)):  # affine columns (column, row, slice) <- spacing (z, y, x)
            a[:3, col] *= float(rec.spacing[axis]) / src[axis]
    return a


class Truth:
    """Ground truth: ``ids``, ``patient(id)``, ``load(id)``, plus the native layout when known."""

    classes: list[str]
    class_kind: str
    spatial_dims: int
    ids: list[str]
    path: Path
    prepared: Any = None  # PreparedDataset when the truth is one
    spacing_known: bool = True  # False: the layout stores no voxel size, distances are in pixels
    format: str | None = None  # the reader of the truth's native layout (a prepared set's source format)

    def patient(self, case_id: str) -> str:
        raise NotImplementedError

    def load(self, case_id: str) -> TruthCase:
        raise NotImplementedError

    def native(self) -> tuple[Reader, DatasetSpec, dict[str, CaseSpec]] | None:
        """(reader, spec, cases by id) of the native layout, to locate a predictions folder's files."""
        return None


class PreparedTruth(Truth):
    def __init__(self, path: Path):
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
        self.format = ds.info.get("source_format")
        known = ds.info.get("spacing_known")
        if known is None:  # prepared before the flag existed: the source reader tells
            known = FORMATS.get(self.format).has_spacing if self.format in FORMATS else True
        self.spacing_known = bool(known)

    def patient(self, case_id: str) -> str:
        return self.prepared.case(case_id).patient

    def load(self, case_id: str) -> TruthCase:
        ds = self.prepared
        rec = ds.case(case_id)
        return TruthCase(id=rec.id, patient=rec.patient, mask=np.asarray(ds.mask(case_id)),
                         spacing=tuple(float(s) for s in rec.spacing), slices=rec.slices,
                         image=lambda: np.asarray(ds.image(case_id)), affine=_grid_affine(rec))

    def native(self):
        if self._native is False:
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
    def __init__(self, path: Path, fmt: str, options: dict[str, Any] | None = None, masks: bool = True):
        self.path = Path(path)
        self.reader = get_reader(fmt, **(options or {}))
        self.spec = self.reader.survey(self.path, require_masks=masks)
        self.format = fmt
        self.masks = masks
        if masks and not self.spec.has_masks:
            raise MedsegError("the ground truth has no masks", path)
        if not self.spec.classes:
            raise MedsegError("the layout names no classes without its masks: give the ground truth", path)
        self.classes = list(self.spec.classes)
        self.class_kind = self.spec.class_kind
        self.spatial_dims = self.spec.spatial_dims
        self.cases = {c.id: c for c in self.spec.cases}
        self.ids = list(self.cases)
        self.spacing_known = bool(self.reader.has_spacing)
        self._cache: tuple[str, Any] | None = None

    def _data(self, case_id: str):
        if self._cache is None or self._cache[0] != case_id:
            data = self.reader.read(self.spec, self.cases[case_id])
            self._cache = (case_id, data)
        return self._cache[1]

    def patient(self, case_id: str) -> str:
        return self.cases[case_id].patient

    def load(self, case_id: str) -> TruthCase:
        data = self._data(case_id)
        mask = data.mask
        if mask is None and self.masks:
            raise MedsegError(f"case {case_id} has no mask", self.path)
        if not self.masks:  # images only: an empty mask gives predictions their shape
            z, _, h, w = data.image.shape
            mask = np.zeros((z, len(self.classes), h, w), np.uint8)
        return TruthCase(id=case_id, patient=self.cases[case_id].patient, mask=mask,
                         spacing=tuple(float(s) for s in data.spacing), slices=data.slices,
                         image=lambda: self._data(case_id).image, has_mask=self.masks,
                         affine=None if data.affine is None else np.asarray(data.affine, float))

    def native(self):
        return self.reader, self.spec, self.cases


_LABEL_2D = (".png", ".tif", ".tiff", ".bmp")


def _label_files(folder: Path) -> dict[str, Path]:
    """{stem: file} of the label maps straight in ``folder`` (2D images or NIfTI volumes)."""

    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            if f.name.lower().endswith((".nii", ".nii.gz")):
                out[nifti_stem(f)] = f
            elif f.suffix.lower() in _LABEL_2D:
                out[f.stem] = f
    return out


def is_label_folder(path: Path) -> bool:
    """A folder holding only label maps (no images/, imagesTr/ or patient subfolders)."""
    p = Path(path)
    if not p.is_dir() or any(q.is_dir() for q in p.iterdir()):
        return False
    files = [q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")]
    return bool(files) and len(_label_files(p)) == len(files)


def read_label_map(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(``labels[z, h, w]`` integer, spacing) of one label map file: a 2D image or a NIfTI volume."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        img = load_nifti(path)
        lab = nifti_array(img, path)
        if lab.ndim == 4 and lab.shape[3] == 1:
            lab = lab[..., 0]
        if lab.ndim != 3:
            raise MedsegError(f"expected a 3D label map, got shape {lab.shape}", path)
        if lab.dtype.kind == "f" and not np.array_equal(np.rint(lab), lab):
            raise MedsegError("label map holds non-integer values", path)
        z = [float(v) for v in img.header.get_zooms()[:3]]
        return to_zyx(lab.astype(np.int64))[:, 0], (z[2], z[1], z[0])

    m = read_image(path)
    if m.ndim == 3:
        if not _is_gray(m):
            raise MedsegError("colour label map: give label values in a greyscale image", path)
        m = m[..., 0]
    if not np.issubdtype(m.dtype, np.integer) and m.dtype != bool:
        raise MedsegError(f"label values must be integers, got {m.dtype}", path)
    return m[None].astype(np.int64), (1.0, 1.0, 1.0)


class LabelFolderTruth(Truth):
    """A plain folder of label maps (``<case>.png`` or ``<case>.nii.gz``), paired with predictions by
    name. Binary maps ({0, 255} or {0, 1}) are one class; other values are labels 1..K."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files = _label_files(self.path)
        self.ids = list(self.files)
        values: set[int] = set()
        for f in self.files.values():
            values |= set(np.unique(read_label_map(f)[0]).tolist())
        if min(values, default=0) < 0:
            raise MedsegError(f"negative label values {sorted(v for v in values if v < 0)[:3]}", self.path)
        self.binary = values <= {0, 255} or values <= {0, 1}
        k = 1 if self.binary else max(values)
        if k > 255:
            raise MedsegError(f"values up to {k}: these look like images, not label maps (pass --format for a "
                              "data set layout)", self.path)
        if k < 1:
            raise MedsegError("every label map is empty: cannot tell the classes", self.path)
        self.classes = ["foreground"] if self.binary else [f"label_{v}" for v in range(1, k + 1)]
        self.class_kind = "multiclass"
        self.spatial_dims = 3 if any(f.name.lower().endswith((".nii", ".nii.gz")) for f in self.files.values()) else 2
        self.spacing_known = self.spatial_dims == 3

    def to_mask(self, lab: np.ndarray, where: Path) -> np.ndarray:
        """``labels[z, h, w]`` -> ``mask[z, k, h, w]`` with this truth's classes."""
        k = len(self.classes)
        if self.binary:
            return binary_mask(lab, where)[:, None].astype(np.uint8)
        extra = sorted(set(np.unique(lab).tolist()) - set(range(k + 1)))
        if extra:
            raise MedsegError(f"label values {extra[:5]} beyond the truth's labels 0..{k}", where)
        return (lab[:, None] == np.arange(1, k + 1)[None, :, None, None]).astype(np.uint8)

    def patient(self, case_id: str) -> str:
        return case_id

    def load(self, case_id: str) -> TruthCase:
        f = self.files[case_id]
        lab, spacing = read_label_map(f)
        mask = self.to_mask(lab, f)
        return TruthCase(id=case_id, patient=case_id, mask=mask, spacing=spacing, slices=None,
                         image=lambda: mask.astype(np.float32))


def label_folder_predictions(path: Path, truth: LabelFolderTruth) -> Predictions:
    """Predictions as label maps named like the truth's (``PRED/<case>.*`` or ``PRED/masks/<case>.*``)."""
    folder = path / "masks" if (path / "masks").is_dir() and not _label_files(path) else path
    files = _label_files(folder)

    def load(case_id: str, t: TruthCase) -> np.ndarray:
        if case_id not in files:
            raise MedsegError(f"no prediction for case {case_id} (expected {case_id}.png or {case_id}.nii.gz)", folder)
        lab, _ = read_label_map(files[case_id])
        return _check_shape(truth.to_mask(lab, files[case_id]), t, files[case_id])

    return Predictions("folder", Path(path), load)


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


def open_truth(path: Path, fmt: str | None = None, images: Path | None = None,
               options: dict[str, Any] | None = None) -> Truth:
    path = Path(path)
    if fmt is None and is_prepared(path):
        return PreparedTruth(path)
    if fmt is None and is_label_folder(path):
        return LabelFolderTruth(path)
    if path.is_file():  # a labels table (a competition's CSV), read by the format that owns such files
        for name in [fmt] if fmt else FORMATS.builtin_order():
            found = FORMATS.get(name).truth_from_file(path, images)
            if found is not None:
                return NativeTruth(found[0], name, {**found[1], **(options or {})})
    return NativeTruth(path, fmt or guess_format(path), options)


# --- predictions ------------------------------------------------------------------------------

@dataclass
class Predictions:
    """Predicted masks by case id; ``kind`` is folder / prepared / run / submission."""

    kind: str
    path: Path
    loader: Callable[[str, TruthCase], np.ndarray]
    ids: set[str] | None = None  # case ids available (None: every truth case, checked on load)
    run_dir: Path | None = None
    curves: dict[str, Path] = field(default_factory=dict)  # fold -> training metrics.csv
    table: Any = None  # one-file predictions (PredictionTable) of kind "submission"
    rules: str | None = None  # how a run's probabilities became masks (said in the summary)


def _check_shape(m: np.ndarray, t: TruthCase, where: Path) -> np.ndarray:
    if m.shape != t.mask.shape:
        raise MedsegError(f"case {t.id}: prediction shape {tuple(m.shape)} differs from the truth's "
                          f"{tuple(t.mask.shape)} [z, k, h, w]", where)
    return m


def prepared_predictions(path: Path) -> Predictions:
    ds = PreparedDataset.open(path)

    def load(case_id: str, t: TruthCase) -> np.ndarray:
        if case_id not in ds._index:
            raise MedsegError(f"no prediction for case {case_id}", path)
        return _check_shape(np.asarray(ds.mask(case_id)), t, path)

    return Predictions("prepared", Path(path), load, ids={c.id for c in ds.cases})


def run_predictions(run: Path, unfinished: bool = False) -> tuple[Predictions, Path]:
    """(predictions, prepared dataset path) of a run directory's validation predictions (of an unfinished
    fold: as ``RunDir.check_finished``)."""
    rd = RunDir(run)
    ds_path = rd.dataset()
    files = rd.val_predictions(unfinished)
    if not files:
        raise MedsegError("no validation predictions (fold_K/val_predictions/<case>.npz)", run)
    tuned = _tuned_rules(rd)
    spatial_dims = int(json.loads((ds_path / "dataset.json").read_text()).get("spatial_dims", 2))

    def load(case_id: str, t: TruthCase) -> np.ndarray:
        f = files[case_id]
        rules = tuned.get(f.parent.parent.name)
        want = "prob" if rules else "mask"
        try:
            with np.load(f) as z:
                if want not in z.files:
                    raise MedsegError(f"no {want!r} array in the file (has {', '.join(z.files) or 'nothing'})", f)
                m = z[want]
        except (OSError, ValueError) as e:
            raise MedsegError(f"cannot read predictions ({e})", f) from None
        if rules:
            return _check_shape(decide(np.asarray(m, np.float32), rules[1], rules[0], spatial_dims), t, f)
        return _check_shape((np.asarray(m) > 0).astype(np.uint8), t, f)

    if tuned:
        rules = (f"the rules `medseg tune` chose ({rd.tune_path}), stored in each fold's model.pt, applied to "
                 "the stored probabilities; they were chosen on these same validation cases, so the score is optimistic")
    else:
        rules = "training's own decision (argmax, or 0.5 for sigmoids), no post-processing"
    return Predictions("run", run, load, ids=set(files), run_dir=run, curves=rd.curves(), rules=rules), ds_path


def _tuned_rules(rd: RunDir) -> dict[str, tuple[dict[str, Any], str]]:
    """{fold folder: (post-processing rules, class kind)} for the folds whose model.pt ``tune`` wrote."""

    out = {}
    for _, fold in rd.fold_dirs("all") if rd.trained_folds() else []:
        b = load_bundle(fold / "model.pt")
        if (b.get("meta") or {}).get("tuned"):
            out[fold.name] = (merge_config(b.get("postprocess"), None), b["class_kind"])
    return out


def folder_predictions(path: Path, truth: Truth) -> Predictions:
    native = truth.native()
    if native is None:
        raise MedsegError("cannot locate the prediction files: the truth's native layout is unknown or missing "
                          "(pass the native layout as TRUTH, or a prepared dataset whose source still exists)", path)
    reader, spec, cases = native

    def load(case_id: str, t: TruthCase) -> np.ndarray:
        if case_id not in cases:
            raise MedsegError(f"case {case_id} is not in the native layout {spec.root}", path)
        return _check_shape(reader.read_prediction(Path(path), spec, cases[case_id], t.mask.shape), t, path)

    return Predictions("folder", Path(path), load)


def table_predictions(path: Path, truth: Truth) -> Predictions:
    """Predictions of every case in one file (a submission), read by the truth's format."""
    fmt = truth.format
    table = FORMATS.get(fmt).read_prediction_table(path) if fmt in FORMATS else None
    if table is None:
        raise MedsegError(f"a {fmt or 'data set of this'} format's predictions are not one file: "
                          "give the predictions folder", path)

    def load(case_id: str, t: TruthCase) -> np.ndarray:
        if not t.slices:
            raise MedsegError(f"case {case_id} has no slice ids to match the file's", truth.path)
        return table.masks(t.slices, truth.classes, t.mask.shape[2:])

    return Predictions("submission", Path(path), load, table=table)


def open_predictions(path: Path, truth: Truth | None) -> Predictions:
    path = Path(path)
    if isinstance(truth, LabelFolderTruth):
        if not path.is_dir():
            raise MedsegError("expected a folder of label maps named like the truth's", path)
        return label_folder_predictions(path, truth)
    if path.is_file() and not is_prepared(path):
        return table_predictions(path, truth)
    if is_prepared(path):
        return prepared_predictions(path)
    if path.is_dir():  # a predictions folder holding the format's one-file predictions
        fmt = truth.format if truth is not None else None
        for name in FORMATS.get(fmt).aggregate_files if fmt in FORMATS else ():
            if (path / name).is_file():
                return table_predictions(path / name, truth)
    if not path.exists():
        raise MedsegError("no such file or folder", path)
    return folder_predictions(path, truth)
