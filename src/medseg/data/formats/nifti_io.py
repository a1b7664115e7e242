"""NIfTI files: arrays in medseg's (z, y, x) order, and label maps read and written in an image's exact
geometry (the NIfTI reader's, and the DICOM reader's masks and NIfTI predictions)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.formats.base import CaseSpec, DatasetSpec, expect_prediction
from medseg.errors import MedsegError


def nifti_stem(p: Path | str) -> str:
    name = Path(p).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")) and not p.name.startswith((".", "._"))


def load_nifti(path: Path | str):
    """``nib.load`` with a MedsegError naming the file on any failure."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as e:
        raise MedsegError(f"cannot read NIfTI ({type(e).__name__}: {e})", path) from None


def nifti_array(img, path: Path | str) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip, short data, ...
        raise MedsegError(f"cannot read NIfTI data ({type(e).__name__}: {e})", path) from None


def to_zyx(a: np.ndarray) -> np.ndarray:
    """NIfTI (i, j, k[, c]) -> (z, c, y, x)."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim == 3:
        return a.transpose(2, 1, 0)[:, None]
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    if a.ndim == 5 and a.shape[3] == 1:  # (x, y, z, t=1, c) as some tools write vector images
        return a[:, :, :, 0].transpose(2, 3, 1, 0)
    raise ValueError(f"unsupported NIfTI shape {a.shape}")


# Two grids are the same when every entry of their affines agrees to this fraction of the smallest voxel
# size (ITK's default is 1e-6 of the spacing; headers saved in float32 need more, a real shift is far more).
GRID_TOLERANCE = 1e-3


def check_same_grid(affine: np.ndarray, ref: np.ndarray, zooms: Any, where: Path | str, what: str) -> None:
    """A label map must lie on its image's voxel grid: a shifted or rotated one labels other anatomy."""
    tol = GRID_TOLERANCE * max(min(float(z) for z in zooms), 1e-6)
    diff = np.abs(np.asarray(affine, float) - np.asarray(ref, float))
    if diff.max() > tol:
        shift = float(np.linalg.norm(np.asarray(affine, float)[:3, 3] - np.asarray(ref, float)[:3, 3]))
        raise MedsegError(f"affine differs from {what} (origin {shift:.3g} mm apart, largest entry difference "
                          f"{diff.max():.3g}; tolerance {tol:.2g}): the label is not on the image's voxel grid", where)


def labels_to_mask(lab: np.ndarray, values: list[int], where: Path | str) -> np.ndarray:
    """(z, y, x) label map -> (z, k, y, x) uint8, one channel per label value."""
    lab = np.asarray(lab)
    if lab.dtype.kind == "f":
        r = np.rint(lab)
        if not np.array_equal(r, lab):
            raise MedsegError("label map holds non-integer values", where)
        lab = r
    lab = lab.astype(np.int64)
    extra = sorted(set(np.unique(lab).tolist()) - {0, *values})
    if extra:
        raise MedsegError(f"label values {extra[:5]} are not among the known labels {values}", where)
    return np.stack([(lab == v) for v in values], axis=1).astype(np.uint8)


def read_label_prediction(root: Path, spec: DatasetSpec, case: CaseSpec, shape: tuple[int, ...]) -> np.ndarray:
    """``<case>.nii.gz`` (or ``.nii``) under ``root`` -- a label map as ``write_label_nifti`` writes it -- as
    ``mask[z, k, h, w]`` with the data set's label values."""
    p = root / f"{case.id}.nii.gz"
    if not p.is_file() and (root / f"{case.id}.nii").is_file():
        p = root / f"{case.id}.nii"
    expect_prediction(p, case.id)
    img = load_nifti(p)
    ref = case.sources.get("affine")
    if ref is None and _is_nifti(Path(str(case.sources.get("image", "")))):
        ref_img = load_nifti(case.sources["image"])
        ref, zooms = ref_img.affine, ref_img.header.get_zooms()[:3]
    else:
        zooms = None if ref is None else np.linalg.norm(np.asarray(ref, float)[:3, :3], axis=0)
    if ref is not None:  # a prediction off the truth's grid would be scored against other anatomy
        check_same_grid(img.affine, ref, zooms, p, "the truth image's")
    lab = nifti_array(img, p)
    if lab.ndim == 4 and lab.shape[3] == 1:
        lab = lab[..., 0]
    if lab.ndim != 3:
        raise MedsegError(f"expected a 3D label map, got shape {lab.shape}", p)
    zyx = to_zyx(lab)[:, 0]
    if zyx.shape != (shape[0], *shape[2:]):
        raise MedsegError(f"prediction shape {zyx.shape} (z, y, x) differs from the truth's {(shape[0], *shape[2:])}", p)
    values = spec.meta.get("label_values") or list(range(1, shape[1] + 1))
    return labels_to_mask(zyx, values, p)


def write_label_nifti(
    mask: np.ndarray, values: list[int], ref_path: Path | str, out: Path, probabilities: np.ndarray | None = None,
    map_name: str = "prob",
) -> list[Path]:
    """``mask[z, k, h, w]`` -> a uint8 label map (channel j -> ``values[j]``) with the header and affine
    of the NIfTI image at ``ref_path`` (and float32 probabilities beside it if given)."""
    import nibabel as nib

    ref = load_nifti(ref_path)
    lab = np.zeros((mask.shape[0], *mask.shape[2:]), np.uint8)
    for j, v in enumerate(values):
        lab[mask[:, j] > 0] = v
    return write_volume_nifti(lab, ref.affine, ref.header, out, probabilities, nib, map_name)


def write_volume_nifti(lab, affine, header, out: Path, probabilities, nib, map_name: str = "prob") -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(lab.transpose(2, 1, 0), affine, hdr)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    if hdr is not None:  # keep both codes as the input had them (0 included), so nibabel picks the same affine
        img.set_qform(affine, int(hdr["qform_code"]))
        img.set_sform(affine, int(hdr["sform_code"]))
    img.header.set_intent("label")
    if hdr is not None and img.header.get_data_shape()[:3] != lab.shape[::-1]:
        raise MedsegError("prediction shape does not match the reference image", out)
    nib.save(img, str(out))
    written = [out]
    if probabilities is not None:
        p = out.with_name(nifti_stem(out) + f"_{map_name}.nii.gz")
        prob = nib.Nifti1Image(np.asarray(probabilities, np.float32).transpose(3, 2, 0, 1), affine)
        nib.save(prob, str(p))
        written.append(p)
    return written
