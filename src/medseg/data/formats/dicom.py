"""DICOM series (a folder searched recursively; one case per SeriesInstanceUID).

Slices are ordered by their position along the slice normal, rescaled with RescaleSlope/Intercept, and
given the RAS affine that dcm2niix / nibabel / SimpleITK would give the NIfTI of the series (LPS
negated in x and y), so predictions are written as NIfTI in the series' geometry.

Training masks live in the folder of option ``masks``, one per case (series), either

- a NIfTI label map ``<case id>.nii.gz`` (reoriented to the series if its axes are permuted/flipped), or
- a folder ``<case id>/`` of 2D images (png/jpg/tif/bmp), one per slice: named after the DICOM files
  (``IM0001.png`` for ``IM0001.dcm``), or otherwise taken in natural name order as the slices in
  position order (first = lowest along the slice normal). Pixel values are label indices, or 0/255.
"""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from medseg.data.formats import FORMATS
from medseg.data.formats.base import CaseData, CaseSpec, ClassNames, DatasetSpec, Reader, expect_prediction, patient_of
from medseg.data.formats.folder import EXTENSIONS, _is_gray, _natural, read_image
from medseg.data.formats.nifti_io import (labels_to_mask,
    load_nifti,
    nifti_array,
    read_label_prediction,
    to_zyx,
    write_volume_nifti)
from medseg.data.formats.dicom_objects import (LABEL_MODALITIES, check_even, class_map, label_names, missing_place,
                                               not_an_image, referenced_series, series_affine, series_info,
                                               skipped_line)
from medseg.data.formats.dicom_rtstruct import CROSSING_TOLERANCE, read_rtstruct, write_rtstruct
from medseg.data.formats.dicom_seg import read_seg, write_seg
from medseg.errors import MedsegError, warn



def _safe_id(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("_")
    return s or "series"


def is_dicom(f: Path) -> bool:
    """``.dcm``, or a file without extension that has the DICOM preamble."""
    if f.suffix.lower() == ".dcm":
        return True
    if f.suffix:
        return False
    try:
        with open(f, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


@FORMATS.register("dicom")
class DicomReader(Reader):
    name = "dicom"
    description = "DICOM series in a folder (recursive), one case per SeriesInstanceUID; masks as NIfTI or image folders"
    patients = "the PatientID tag (patient_regex on the case id overrides it)"
    companions = ("*",)  # every file is opened; the reader names the objects it does not take

    class Options(Reader.Options):
        masks: str | None = None  # folder of <case id>.nii.gz or <case id>/ image folders (relative to ROOT or absolute)
        classes: ClassNames = None  # names of label values 1..K
        patient_regex: str | None = None  # first group of the case id = patient (default: the PatientID tag)
        labels: Optional[Literal["seg", "rtstruct"]] = None  # labels as DICOM SEG or RTSTRUCT files in ROOT (else masks=)
        rois: Optional[str] = None  # class:Name|Other,class2:Name2 (labels=seg|rtstruct); default: every name is a class
        write_as: Literal["nifti", "seg", "rtstruct"] = "nifti"  # predictions: NIfTI in the series' geometry, DICOM SEG or RTSTRUCT
        algorithm: str = "medseg"  # the model named in a SEG's algorithm identification
        # labels=rtstruct: a contour crossing itself is filled even-odd when its loops are at most this many
        # pixels' area (a warning), else refused
        crossing_tolerance: float = Field(CROSSING_TOLERANCE, ge=0)
        # labels=seg: a FRACTIONAL segment is foreground where its value is at least this (a warning)
        seg_threshold: float = Field(0.5, gt=0, le=1)

    def scan(self, root: Path, require_masks: bool = True) -> DatasetSpec:
        import pydicom
        from pydicom.errors import InvalidDicomError

        root = Path(root)
        if not root.exists():
            raise MedsegError("not a folder or a DICOM file", root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        series: dict[str, list[tuple[Path, Any]]] = {}
        label_files: list[tuple[Path, Any]] = []
        skipped: list[tuple[Path, str]] = []  # named in one warning at the end
        unplaced: list[tuple[Path, Any]] = []  # slices without a place in space
        last_error: Exception | None = None
        for f in files:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
                last_error = e
                if not any(fnmatch.fnmatch(f.name, g) for g in Reader.companions):  # a README beside the export
                    skipped.append((f, "not DICOM"))
                continue
            if str(getattr(ds, "Modality", "")) in LABEL_MODALITIES:
                label_files.append((f, ds))  # labels, not an image series
                continue
            why = not_an_image(ds)  # plans, doses, portal images, scouts, ...: beside the images, not images
            if why is not None:
                skipped.append((f, why))
                if missing_place(ds):
                    unplaced.append((f, ds))
                continue
            series.setdefault(str(ds.SeriesInstanceUID), []).append((f, ds))
        for f, ds in unplaced:  # among its series' other slices: a broken series, not an object beside it
            uid = str(getattr(ds, "SeriesInstanceUID", ""))
            if uid in series:
                name = str(getattr(series[uid][0][1], "SeriesDescription", "") or uid)
                raise MedsegError(f"series {name!r}: slice has no {', '.join(missing_place(ds))}", f)
        if not series:
            if len(files) == 1:
                why = f" ({type(last_error).__name__}: {last_error})" if last_error else f" ({skipped[0][1]})" if skipped else ""
                raise MedsegError(f"not a DICOM image file{why}", files[0])
            raise MedsegError("no DICOM image series found" + (f"; {skipped_line(root, skipped)}" if skipped else ""), root)

        cases: list[CaseSpec] = []
        used: set[str] = set()
        for uid, items in sorted(series.items(), key=lambda kv: str(kv[1][0][0])):
            sources = self._series_geometry(uid, items)
            first = items[0][1]
            base = _safe_id(str(getattr(first, "SeriesDescription", "") or uid))
            cid, n = base, 2
            while cid in used:
                cid, n = f"{base}_{n}", n + 1
            used.add(cid)
            sources["series_uid"] = uid
            patient = (patient_of(cid, self.options.patient_regex, items[0][0]) if self.options.patient_regex
                       else str(getattr(first, "PatientID", "") or cid))
            cases.append(CaseSpec(id=cid, patient=patient, sources=sources))

        classes: list[str] = []
        values: list[int] = []
        if require_masks and self.options.labels:
            return self._scan_label_objects(root, cases, label_files, series, skipped)
        skipped += [(f, f"{ds.Modality}: labels, not read {'when predicting' if not require_masks else 'with masks='}")
                    for f, ds in label_files]
        if require_masks:
            if not self.options.masks:
                raise MedsegError(
                    "DICOM training data needs option masks=<folder holding <case id>.nii.gz or <case id>/ slice images> "
                    "(or use --images-only)",
                    root,
                )
            mdir = Path(self.options.masks)
            if not mdir.is_absolute():
                mdir = (root if root.is_dir() else root.parent) / mdir
            if not mdir.is_dir():
                raise MedsegError("mask folder not found", mdir)
            found: set[int] = set()
            for c in cases:
                mp = next((mdir / f"{c.id}{ext}" for ext in (".nii.gz", ".nii") if (mdir / f"{c.id}{ext}").is_file()), None)
                if mp is not None:
                    c.sources["mask"] = str(mp)
                    found |= set(np.unique(nifti_array(load_nifti(mp), mp)).astype(int).tolist())
                elif (mdir / c.id).is_dir():
                    c.sources["mask_images"], c.sources["mask_binary"], vals = _mask_images(mdir / c.id, c.sources["files"])
                    found |= vals
                else:  # a scout or a second series of the export: named in the warning, not read
                    skipped.append((Path(c.sources["files"][0]).parent, f"image series {c.id!r} has no mask "
                                    f"{mdir.name}/{c.id}.nii.gz or {mdir.name}/{c.id}/"))
            masked = [c for c in cases if "mask" in c.sources or "mask_images" in c.sources]
            if not masked:
                c = cases[0]
                who = f"series {c.id!r} has" if len(cases) == 1 else f"none of the {len(cases)} image series has"
                raise MedsegError(f"{who} no mask (expected {mdir / (c.id + '.nii.gz')} or a folder {mdir / c.id}/)",
                                  c.sources["files"][0])
            cases = masked
            k = max(found - {0}, default=0)
            if k == 0:
                raise MedsegError("no foreground label in any mask", mdir)
            values = list(range(1, k + 1))
            if self.options.classes:
                if len(self.options.classes) != k:
                    raise MedsegError(f"option classes names {len(self.options.classes)} classes but masks have labels up to {k}", mdir)
                classes = list(self.options.classes)
            else:
                classes = [f"label_{v}" for v in values]
        if skipped:
            warn(skipped_line(root, skipped), root)
        return DatasetSpec(
            format=self.name,
            root=str(root),
            channels=["image"],
            classes=classes,
            class_kind="multiclass",
            spatial_dims=3,
            cases=cases,
            has_masks=require_masks,
            meta={"label_values": values},
        )

    def _scan_label_objects(self, root: Path, cases: list[CaseSpec], label_files: list[tuple[Path, Any]],
                            series: dict[str, list[tuple[Path, Any]]], skipped: list[tuple[Path, str]]) -> DatasetSpec:
        """Labels as SEG or RTSTRUCT files beside the series, each matched to the series it references
        (``dicom_objects.referenced_series``); image series without one are skipped, named in the warning."""
        kind = "SEG" if self.options.labels == "seg" else "RTSTRUCT"
        by_uid = {c.sources["series_uid"]: c for c in cases}
        info = {uid: series_info(items) for uid, items in series.items()}
        found: list[str] = []
        notes: list[str] = []
        for f, ds in label_files:
            if str(ds.Modality) != kind:
                skipped.append((f, f"{ds.Modality}: labels of the other kind (labels={self.options.labels})"))
                continue
            case = by_uid[referenced_series(ds, f, info)]
            names, more = label_names(ds, f, mapped=bool(self.options.rois))
            found += names
            notes += more
            if "labels_file" in case.sources:
                raise MedsegError(f"two {kind} files for series {case.id!r}: {case.sources['labels_file']} and this one", f)
            case.sources["labels_file"] = str(f)
        labelled = [c for c in cases if "labels_file" in c.sources]
        if not labelled and len(cases) == 1:
            raise MedsegError(f"series {cases[0].id!r} has no {kind} file referencing it", cases[0].sources["files"][0])
        if not labelled:
            raise MedsegError(f"no {kind} file references any of the {len(cases)} image series "
                              f"({', '.join(c.id for c in cases)})", root)
        skipped += [(Path(c.sources["files"][0]).parent, f"image series {c.id!r} of {len(c.sources['files'])} slices "
                     f"has no {kind}") for c in cases if "labels_file" not in c.sources]
        classes, names = class_map(self.options.rois, found, root)
        left = sorted(set(found) - set(names))
        if left:
            notes.append(f"{kind} names not in option rois, left out: {', '.join(left)}")
        if skipped:
            notes.insert(0, skipped_line(root, skipped))
        if notes:
            warn("; ".join(notes), root)
        return DatasetSpec(format=self.name, root=str(root), channels=["image"], classes=classes,
                           class_kind="multilabel", spatial_dims=3, cases=labelled, has_masks=True,
                           meta={"label_names": names})

    def _series_geometry(self, uid: str, items: list[tuple[Path, Any]]) -> dict[str, Any]:
        """Sort a series' slices along the normal; check sizes; compute spacing and the affine."""
        label = str(getattr(items[0][1], "SeriesDescription", "") or uid)
        sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
        if len(sizes) > 1:
            raise MedsegError(f"series {label!r} has slices of different sizes {sorted(sizes)}", items[0][0].parent)
        iop = np.array([float(v) for v in items[0][1].ImageOrientationPatient])
        row_cos, col_cos = iop[:3], iop[3:]
        normal = np.cross(row_cos, col_cos)
        pos = {f: np.array([float(v) for v in ds.ImagePositionPatient]) for f, ds in items}
        order = sorted(items, key=lambda it: float(pos[it[0]] @ normal))
        dist = np.array([pos[f] @ normal for f, _ in order])
        if len(dist) > 1 and np.any(np.diff(dist) < 1e-4):
            dup = order[int(np.argmin(np.diff(dist))) + 1][0]
            raise MedsegError(f"series {label!r} has two slices at the same position", dup)
        ps = tuple(float(v) for v in order[0][1].PixelSpacing)
        thick = float(getattr(order[0][1], "SliceThickness", 0) or 0) or 1.0
        z = float(np.median(np.diff(dist))) if len(dist) > 1 else thick
        check_even(label, order, dist, z)
        aff = series_affine(pos[order[0][0]], pos[order[-1][0]], len(order), row_cos, col_cos, ps, thick)
        return {
            "image": str(order[0][0]),
            "files": [str(f) for f, _ in order],
            "spacing": [z, ps[0], ps[1]],
            "affine": aff.tolist(),
            "rows": sizes.pop()[0],
        }

    def load(self, spec: DatasetSpec, case: CaseSpec) -> CaseData:
        import pydicom

        slices, slopes, inters = [], [], []
        for f in case.sources["files"]:
            try:
                ds = pydicom.dcmread(f)
                a = ds.pixel_array
            except Exception as e:
                raise MedsegError(f"cannot read DICOM pixels ({type(e).__name__}: {e})", f) from None
            if a.ndim != 2:
                raise MedsegError(f"expected a 2D grayscale slice, got pixel shape {a.shape}", f)
            slices.append(a)
            slopes.append(float(getattr(ds, "RescaleSlope", 1) or 1))
            inters.append(float(getattr(ds, "RescaleIntercept", 0) or 0))
        raw = np.stack(slices)
        slope, inter = np.array(slopes)[:, None, None], np.array(inters)[:, None, None]
        vals = raw * slope + inter
        # int16 when rescaling stays integral and in range (CT), else float32
        if np.all(slope == np.rint(slope)) and np.all(inter == np.rint(inter)) and vals.min() >= -32768 and vals.max() <= 32767:
            image = vals.astype(np.int16)
        else:
            image = (raw.astype(np.float64) * slope + inter).astype(np.float32)
        image = image[:, None]
        affine = np.array(case.sources["affine"])
        mask = None
        if case.sources.get("labels_file"):
            f, files, names = case.sources["labels_file"], case.sources["files"], spec.meta.get("label_names")
            if self.options.labels == "seg":
                mask = read_seg(f, files, spec.classes, names, self.options.seg_threshold)
            else:
                mask = read_rtstruct(f, files, spec.classes, names, self.options.crossing_tolerance)
        elif case.sources.get("mask"):
            mp = case.sources["mask"]
            mimg = load_nifti(mp)
            lab = nifti_array(mimg, mp)
            lab = _to_geometry(lab, mimg.affine, affine, mp)
            lab_zyx = to_zyx(lab)[:, 0]
            if lab_zyx.shape != (image.shape[0], *image.shape[2:]):
                raise MedsegError(f"mask shape {lab.shape} differs from the series' {tuple(reversed((image.shape[0], *image.shape[2:])))}", mp)
            mask = labels_to_mask(lab_zyx, spec.meta["label_values"], mp)
        elif case.sources.get("mask_images"):
            lab_zyx = np.stack(
                [_read_mask_slice(Path(p), image.shape[2:], case.sources["mask_binary"]) for p in case.sources["mask_images"]]
            )
            mask = labels_to_mask(lab_zyx, spec.meta["label_values"], Path(case.sources["mask_images"][0]).parent)
        return CaseData(
            image=np.ascontiguousarray(image),
            mask=mask,
            spacing=tuple(case.sources["spacing"]),
            affine=affine,
            meta={"series_uid": case.sources["series_uid"], "n_files": len(case.sources["files"])},
        )

    @classmethod
    def sniff(cls, path: Path) -> int:
        """A DICOM file (``.dcm``, or the ``DICM`` preamble), or such files in the folder or its subfolders."""
        path = Path(path)
        if path.is_file():
            return 2 if is_dicom(path) else 0
        if not path.is_dir():
            return 0
        top = sorted(path.iterdir())[:2000]
        files = [p for p in top if p.is_file()] + [f for d in [p for p in top if p.is_dir()][:20] for f in d.iterdir()]
        return 1 if any(is_dicom(f) for f in files[:50] if f.is_file()) else 0

    def read_prediction(self, root, spec, case, shape):
        seg = Path(root) / f"{case.id}.seg.dcm"
        if seg.is_file():  # written with --as seg
            return read_seg(expect_prediction(seg, case.id), case.sources["files"], spec.classes)
        rt = Path(root) / f"{case.id}.rtstruct.dcm"
        if rt.is_file():  # written with --as rtstruct
            return read_rtstruct(expect_prediction(rt, case.id), case.sources["files"], spec.classes)
        return read_label_prediction(Path(root), spec, case, shape)  # written as NIfTI in the series' geometry

    def slice_count(self, spec: DatasetSpec, case: CaseSpec) -> int:
        return len(case.sources["files"])

    def write_prediction(self, spec, case, mask, out_dir, probabilities=None):
        import nibabel as nib

        if self.options.write_as != "nifti":
            if probabilities is not None:
                flag = "--save-probabilities" if self.map_name == "prob" else "--save-uncertainty"
                raise MedsegError(f"{flag} writes NIfTI maps; a {self.options.write_as.upper()} holds "
                                  "binary structures (use --as nifti)")
            write = write_seg if self.options.write_as == "seg" else write_rtstruct
            names = list(spec.classes or self.options.classes or [f"label_{j + 1}" for j in range(mask.shape[1])])
            notes = getattr(self, "notes", {}).get(case.id)  # predict --quality: a review line per structure
            return [write(case.sources["files"], mask, names,
                          Path(out_dir) / f"{case.id}.{self.options.write_as}.dcm", self.options.algorithm, notes)]

        values = spec.meta.get("label_values") or list(range(1, mask.shape[1] + 1))
        lab = np.zeros((mask.shape[0], *mask.shape[2:]), np.uint8)
        for j, v in enumerate(values):
            lab[mask[:, j] > 0] = v
        hdr = nib.Nifti1Header()
        hdr["qform_code"] = hdr["sform_code"] = 1  # scanner coordinates
        return write_volume_nifti(lab, np.array(case.sources["affine"]), hdr, Path(out_dir) / f"{case.id}.nii.gz", probabilities, nib,
                                  self.map_name)




def _mask_images(folder: Path, dicom_files: list[str]) -> tuple[list[str], bool, set[int]]:
    """A series' slice masks in slice order, whether they are 0/255, and the label values present."""

    files = sorted((f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS), key=lambda f: _natural(f.name))
    by_stem = {f.stem: f for f in files}
    stems = [Path(d).stem for d in dicom_files]
    if len(files) == len(stems) and all(s in by_stem for s in stems):
        ordered = [by_stem[s] for s in stems]  # named after the DICOM files
    elif len(files) == len(stems):
        ordered = files  # numbered in position order
    else:
        raise MedsegError(f"mask folder has {len(files)} images but the series has {len(stems)} slices", folder)
    values: set[int] = set()
    for f in ordered:
        values |= set(np.unique(_read_mask_slice(f, None, False)).tolist())
    binary = values <= {0, 255} and 255 in values
    return [str(f) for f in ordered], binary, ({0, 1} if binary else values)


def _read_mask_slice(path: Path, size: tuple[int, ...] | None, binary: bool) -> np.ndarray:
    m = read_image(path)
    if m.ndim == 3:
        if not _is_gray(m):
            raise MedsegError("colour mask slice: expected a greyscale label image", path)
        m = m[..., 0]
    if size is not None and m.shape != tuple(size):
        raise MedsegError(f"mask size {m.shape} differs from the DICOM slice's {tuple(size)}", path)
    if not np.issubdtype(m.dtype, np.integer):
        raise MedsegError(f"mask values must be integers, got {m.dtype}", path)
    return (m > 0).astype(np.uint8) if binary else m


def _to_geometry(lab: np.ndarray, src_aff: np.ndarray, dst_aff: np.ndarray, where: str) -> np.ndarray:
    """Reorient a mask array (axis permutations/flips only) so its affine matches the series'."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    if lab.ndim == 4 and lab.shape[3] == 1:
        lab = lab[..., 0]
    if lab.ndim != 3:
        raise MedsegError(f"mask must be a 3D label map, got shape {lab.shape}", where)
    if not np.allclose(src_aff, dst_aff, atol=1e-3):
        t = ornt_transform(io_orientation(src_aff), io_orientation(dst_aff))
        new_aff = src_aff @ nib.orientations.inv_ornt_aff(t, lab.shape)
        lab = apply_orientation(lab, t)
        if not np.allclose(new_aff, dst_aff, atol=1e-2):
            raise MedsegError("mask geometry (affine) differs from the DICOM series'", where)
    return lab
