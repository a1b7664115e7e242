"""NIfTI volumes: the MSD / nnU-Net layout (``imagesTr/`` + ``labelsTr/`` [+ ``dataset.json``]), a list
of (image, label) pairs, or a single NIfTI file / a folder of NIfTI files (images only).

A list of pairs is a ``.csv`` (columns ``image,label`` and optionally ``id,patient``) or a ``.json``
(a list of ``{"image": ..., "label": ...}`` objects, or an MSD-style ``dataset.json`` whose ``training``
list holds them); paths are relative to the list's folder. Give it as ROOT or as option ``pairs``.

Arrays are stored as (z, y, x) = NIfTI (k, j, i) transposed; the affine is kept so predictions are
written back in the input's exact geometry (the source header is re-read for that)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.formats import FORMATS
from medseg.data.formats.base import CaseData, CaseSpec, ClassNames, DatasetSpec, Reader, patient_of
from medseg.data.formats.nifti_io import (_is_nifti, check_same_grid, labels_to_mask, load_nifti, nifti_array,
                                          nifti_stem, read_label_prediction, to_zyx, write_label_nifti)
from medseg.errors import MedsegError

_MODALITY = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")



@FORMATS.register("nifti")
class NiftiReader(Reader):
    name = "nifti"
    description = "NIfTI: MSD/nnU-Net imagesTr/ + labelsTr/ (+ dataset.json), or NIfTI file(s) for images only"
    patients = "patient column of a list of pairs, or patient_regex on the case id; else one per case (warned when names look shared)"

    class Options(Reader.Options):
        images: str = "imagesTr"
        labels: str = "labelsTr"
        classes: ClassNames = None  # names of label values 1..K when there is no dataset.json
        pairs: str | None = None  # a .csv/.json list of (image, label) pairs (relative to ROOT or absolute)
        patient_regex: str | None = None  # first group of the case id = patient (time points of one patient)


    def label_globs(self) -> tuple[str, ...]:
        return (f"{self.options.labels}/*",)

    def scan(self, root: Path, require_masks: bool = True) -> DatasetSpec:
        root = Path(root)
        if not root.exists():
            raise MedsegError("not a folder or a NIfTI file", root)
        pairs = None
        if self.options.pairs:
            pairs = Path(self.options.pairs)
            if not pairs.is_absolute():
                pairs = (root if root.is_dir() else root.parent) / pairs
            if not pairs.is_file():
                raise MedsegError("list of pairs not found", pairs)
        elif root.is_file() and root.suffix.lower() in (".csv", ".json"):
            pairs = root
        if pairs is not None:
            return self._scan_pairs(pairs, require_masks)
        info = _dataset_json(root) if root.is_dir() else {}
        img_dir, lab_dir = root / self.options.images, root / self.options.labels
        if root.is_file():
            if not _is_nifti(root):
                raise MedsegError("not a NIfTI file (.nii or .nii.gz)", root)
            files, lab_dir, msd = [root], None, False
        elif img_dir.is_dir():
            files, msd = sorted(p for p in img_dir.iterdir() if _is_nifti(p)), True
            if not lab_dir.is_dir():
                if require_masks:
                    raise MedsegError(f"label folder {self.options.labels}/ is missing (use --images-only to predict)", lab_dir)
                lab_dir = None
        else:
            if (root / "imagesTs").is_dir() and not require_masks:
                img_dir = root / "imagesTs"
            else:
                img_dir = root
            files, lab_dir, msd = sorted(p for p in img_dir.iterdir() if _is_nifti(p)), None, False
            if require_masks:
                raise MedsegError(f"no {self.options.images}/ folder: labels are only read from the MSD layout (use --images-only)", root)
        if not files:
            raise MedsegError("no NIfTI files (.nii, .nii.gz) found", img_dir if root.is_dir() else root)

        labels = _by_stem(sorted(p for p in lab_dir.iterdir() if _is_nifti(p))) if lab_dir else {}
        _by_stem(files)  # x.nii beside x.nii.gz: an error, not a silent choice
        groups: dict[str, dict[int, Path]] = {}
        for p in files:
            stem = nifti_stem(p)
            m = _MODALITY.match(stem)
            if m and (m["case"] in labels or stem not in labels):
                groups.setdefault(m["case"], {})[int(m["ch"])] = p
            else:
                groups.setdefault(stem, {})[0] = p
        cases = []
        n_ch = None
        for cid, chans in sorted(groups.items()):
            order = sorted(chans)
            if order != list(range(len(order))):
                raise MedsegError(f"case {cid!r} has modality files {order}, expected 0..{len(order) - 1}", chans[order[0]])
            if n_ch is not None and len(order) != n_ch:
                raise MedsegError(f"case {cid!r} has {len(order)} modality files, other cases {n_ch}", chans[order[0]])
            n_ch = len(order)
            lab = labels.get(cid)
            if require_masks and lab is None:
                raise MedsegError(f"image without a label (expected {self.options.labels}/{cid}.nii.gz)", chans[0])
            cases.append(
                CaseSpec(
                    id=cid,
                    patient=patient_of(cid, self.options.patient_regex, chans[0]),
                    sources={"image": str(chans[0]), "images": [str(chans[i]) for i in order], "label": str(lab) if lab and require_masks else None},
                )
            )
        if require_masks:
            for stem, p in sorted(labels.items()):
                if stem not in groups:
                    raise MedsegError(f"label without an image (expected {self.options.images}/{stem}.nii.gz)", p)

        return self._finish(root, cases, n_ch, info, require_masks, msd)

    def _finish(
        self, root: Path, cases: list[CaseSpec], n_ch: int | None, info: dict[str, Any], require_masks: bool, msd: bool
    ) -> DatasetSpec:
        """Channels and classes (shared by the folder layouts and the list of pairs)."""
        # channels: dataset.json, else the first image's 4th dimension
        names = info.get("channel_names") or info.get("modality")
        first = load_nifti(cases[0].sources["image"])
        depth = first.shape[3] if len(first.shape) >= 4 and n_ch == 1 else 1
        n_total = n_ch * depth if n_ch else depth
        if isinstance(names, dict) and len(names) == n_total:
            channels = [str(names[k]) for k in sorted(names, key=lambda s: int(s))]
        elif n_total == 1:
            channels = ["image"]
        else:
            channels = [f"ch{i}" for i in range(n_total)]

        classes: list[str] = []
        values: list[int] = []
        if require_masks:
            classes, values = self._classes(info, cases, root)
        return DatasetSpec(
            format=self.name,
            root=str(root),
            channels=channels,
            classes=classes,
            class_kind="multiclass",
            spatial_dims=3,
            cases=cases,
            has_masks=require_masks,
            meta={"label_values": values, "msd": msd},
        )

    def _scan_pairs(self, path: Path, require_masks: bool) -> DatasetSpec:
        """Cases from a .csv/.json list of (image, label) pairs; paths relative to the list's folder."""
        rows, info = _read_pairs(path)
        if not rows:
            raise MedsegError("the list of pairs is empty", path)
        cases: list[CaseSpec] = []
        seen: dict[str, str] = {}
        for where, row in rows:
            img = _listed_file(row.get("image"), path, where, "image")
            lab = None
            if require_masks:
                if not row.get("label"):
                    raise MedsegError(f"{where}: image {row['image']} has no label (use --images-only to predict)", path)
                lab = _listed_file(row["label"], path, where, "label")
            cid = str(row.get("id") or nifti_stem(img))
            if cid in seen:
                raise MedsegError(f"{where}: case id {cid!r} is used twice (also {seen[cid]}); add an id column", path)
            seen[cid] = where
            cases.append(
                CaseSpec(
                    id=cid,
                    patient=str(row.get("patient") or patient_of(cid, self.options.patient_regex, img)),
                    sources={"image": str(img), "images": [str(img)], "label": str(lab) if lab else None},
                )
            )
        return self._finish(path, cases, 1, info, require_masks, False)

    def _classes(self, info: dict[str, Any], cases: list[CaseSpec], root: Path) -> tuple[list[str], list[int]]:
        labels = info.get("labels")
        if isinstance(labels, dict) and labels:
            pairs = []
            for k, v in labels.items():
                # MSD: {"1": "Anterior"}; nnU-Net v2: {"Anterior": 1}
                if str(k).lstrip("-").isdigit():
                    pairs.append((int(k), str(v)))
                elif isinstance(v, int):
                    pairs.append((int(v), str(k)))
            pairs = sorted(p for p in pairs if p[0] != 0)
            if pairs:
                names = [n for _, n in pairs]
                if self.options.classes and list(self.options.classes) != names:
                    raise MedsegError(f"option classes={','.join(self.options.classes)} disagrees with the classes "
                                      f"dataset.json names ({', '.join(names)}); drop the option or edit the file",
                                      root / "dataset.json" if root.is_dir() else root)
                return names, [v for v, _ in pairs]
        found: set[int] = set()
        for c in cases:  # no dataset.json: the label values present decide the classes
            img = load_nifti(c.sources["label"])
            found |= set(np.unique(nifti_array(img, c.sources["label"])).astype(int).tolist())
        k = max(found - {0}, default=0)
        if k == 0:
            raise MedsegError("no foreground label in any label map", root)
        values = list(range(1, k + 1))
        if self.options.classes:
            if len(self.options.classes) != k:
                raise MedsegError(f"option classes names {len(self.options.classes)} classes but labels go up to {k}", root)
            return list(self.options.classes), values
        return [f"label_{v}" for v in values], values

    def load(self, spec: DatasetSpec, case: CaseSpec) -> CaseData:
        arrays = []
        first = None
        for p in case.sources["images"]:
            img = load_nifti(p)
            first = first or img
            a = nifti_array(img, p)
            if img.shape[:3] != first.shape[:3]:
                raise MedsegError(f"modality shape {img.shape[:3]} differs from {first.shape[:3]}", p)
            try:
                arrays.append(to_zyx(a))
            except ValueError as e:
                raise MedsegError(str(e), p) from None
        image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)
        mask = None
        if case.sources.get("label"):
            lp = case.sources["label"]
            limg = load_nifti(lp)
            lab = nifti_array(limg, lp)
            if lab.ndim == 4 and lab.shape[3] == 1:
                lab = lab[..., 0]
            if lab.shape[:3] != first.shape[:3] or lab.ndim > 3:
                raise MedsegError(f"label shape {lab.shape} differs from image shape {first.shape[:3]}", lp)
            check_same_grid(limg.affine, first.affine, first.header.get_zooms()[:3], lp, "its image's")
            mask = labels_to_mask(to_zyx(lab)[:, 0], spec.meta["label_values"], lp)
        hdr = first.header
        zooms = [float(z) for z in hdr.get_zooms()[:3]]
        zooms += [1.0] * (3 - len(zooms))
        meta = {
            "qform_code": int(hdr["qform_code"]),
            "sform_code": int(hdr["sform_code"]),
            "dtype": str(hdr.get_data_dtype()),
            "nifti_shape": [int(s) for s in first.shape],
        }
        return CaseData(
            image=np.ascontiguousarray(image),
            mask=mask,
            spacing=(zooms[2], zooms[1], zooms[0]),
            affine=np.asarray(first.affine, float),
            meta=meta,
        )

    @classmethod
    def sniff(cls, path: Path) -> int:
        """A NIfTI file, the MSD layout (imagesTr/, labelsTr/), or NIfTI files in the folder or its subfolders."""
        path = Path(path)
        if path.is_file():
            return 2 if path.name.lower().endswith((".nii", ".nii.gz")) else 0
        if not path.is_dir():
            return 0
        if (path / "imagesTr").is_dir() or (path / "labelsTr").is_dir():
            return 2
        top = sorted(path.iterdir())[:2000]
        files = [p for p in top if p.is_file()] + [f for d in [p for p in top if p.is_dir()][:20] for f in d.iterdir()]
        return 1 if any(f.name.lower().endswith((".nii", ".nii.gz")) for f in files) else 0

    def read_prediction(self, root, spec, case, shape):
        return read_label_prediction(Path(root), spec, case, shape)

    def slice_count(self, spec: DatasetSpec, case: CaseSpec) -> int:
        shape = load_nifti(case.sources["image"]).shape  # the header only
        return int(shape[2]) if len(shape) >= 3 else 1

    def write_prediction(self, spec, case, mask, out_dir, probabilities=None):
        values = spec.meta.get("label_values") or list(range(1, mask.shape[1] + 1))
        return write_label_nifti(mask, values, case.sources["image"], Path(out_dir) / f"{case.id}.nii.gz", probabilities,
                                 self.map_name)


def _by_stem(files: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in files:
        stem = nifti_stem(p)
        if stem in out:
            raise MedsegError(f"two files for case {stem!r} ({out[stem].name} and {p.name}); keep one", p.parent)
        out[stem] = p
    return out


def _read_pairs(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """(("line N" / "entry N", row), dataset-level info) of a .csv or .json list of pairs."""
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MedsegError(f"list of pairs is not valid JSON: {e}", path) from None
        info = doc if isinstance(doc, dict) else {}
        items = doc.get("training") if isinstance(doc, dict) else doc
        if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
            raise MedsegError('expected a list of {"image": ..., "label": ...} objects (or a dict with a "training" list)', path)
        return [(f"entry {i + 1}", it) for i, it in enumerate(items)], info
    if path.suffix.lower() != ".csv":
        raise MedsegError("a list of pairs must be a .csv or a .json file", path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        if "image" not in cols:
            raise MedsegError(f"csv has no image column (header: {','.join(cols)}; expected image,label[,id,patient])", path)
        reader.fieldnames = cols
        rows = [(f"line {n}", {k: (v or "").strip() for k, v in r.items() if k}) for n, r in enumerate(reader, start=2)]
    return [(w, r) for w, r in rows if any(r.values())], {}


def _listed_file(value: Any, listing: Path, where: str, what: str) -> Path:
    if not value or not isinstance(value, str):
        raise MedsegError(f"{where}: no {what} path", listing)
    p = Path(value)
    p = p if p.is_absolute() else listing.parent / p
    if not p.is_file():
        raise MedsegError(f"{what} listed in {listing.name} ({where}) does not exist", p)
    if not _is_nifti(p):
        raise MedsegError(f"{what} listed in {listing.name} ({where}) is not a NIfTI file (.nii or .nii.gz)", p)
    return p


def _dataset_json(root: Path) -> dict[str, Any]:
    p = root / "dataset.json"
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedsegError(f"dataset.json is not valid JSON: {e}", p) from None
    return d if isinstance(d, dict) else {}
