"""Cut the planning-system export fixture (tests/fixtures/dicom_export/) from dicompyler-core's example data.

    python scripts/fetch_dicom_exports.py SRC [--out tests/fixtures/dicom_export]

SRC is a checkout of https://github.com/dicompyler/dicompyler-core (commit 0d5729d was used), or a folder
holding its tests/testdata/example_data/{ct.0.dcm,rtss.dcm,rtplan.dcm}. That breast case is a real
export: a structure set of 10 ROIs on a 98-slice CT, and the plan made on it; only its first CT slice is
in the repository. The structure set and the plan are kept byte for byte. The CT series is rebuilt from
the first slice's header and the structure set's references, one slice per referenced instance (its
SOP instance UID, and its position from the contours on it, 3 mm apart), with the pixel data cut down:
-1000 HU outside the BODY contour and 0 HU inside, RLE-compressed (the real pixels are not in the
repository, and 98 x 512 x 512 would be 51 MB).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

SOURCE = "dicompyler/dicompyler-core@0d5729d (tests/testdata/example_data)"


def _find(src: Path, name: str) -> Path:
    for cand in (src / name, src / "tests" / "testdata" / "example_data" / name):
        if cand.is_file():
            return cand
    raise SystemExit(f"{name} not found under {src}")


def write_series(ct0: Path, rtss: Path, out: Path) -> list[Path]:
    import pydicom
    from pydicom.uid import RLELossless

    from medseg.data.formats.dicom_rtstruct import fill_contour

    st = pydicom.dcmread(str(rtss))
    refs = [str(r.ReferencedSOPInstanceUID) for fr in st.ReferencedFrameOfReferenceSequence
            for s in fr.RTReferencedStudySequence for se in s.RTReferencedSeriesSequence for r in se.ContourImageSequence]
    first = pydicom.dcmread(str(ct0))
    z0, step = float(first.ImagePositionPatient[2]), float(first.SliceThickness)
    zs: dict[str, float] = {}
    body = next(int(r.ROINumber) for r in st.StructureSetROISequence if str(r.ROIName).upper() == "BODY")
    polys: dict[str, list[np.ndarray]] = {}
    for rc in st.ROIContourSequence:
        for c in getattr(rc, "ContourSequence", None) or []:
            uid = str(c.ContourImageSequence[0].ReferencedSOPInstanceUID)
            xyz = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
            zs.setdefault(uid, float(xyz[0, 2]))
            if int(rc.ReferencedROINumber) == body:
                polys.setdefault(uid, []).append(xyz)
    # contours sit on their slice to the file's precision: the slice's exact z is the first slice's minus
    # whole steps, as the scanner wrote them
    ipp0 = np.array([float(v) for v in first.ImagePositionPatient])
    dr, dc = (float(v) for v in first.PixelSpacing)
    h, w = int(first.Rows), int(first.Columns)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for uid in refs:
        k = round((z0 - zs[uid]) / step)
        ds = pydicom.dcmread(str(ct0))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.ImagePositionPatient = [f"{v:g}" for v in (ipp0[0], ipp0[1], z0 - k * step)]
        ds.SliceLocation = f"{z0 - k * step:g}"
        ds.InstanceNumber = k + 1
        inside = np.zeros((h, w), bool)
        for xyz in polys.get(uid, []):
            pts = np.stack([(xyz[:, 1] - ipp0[1]) / dr, (xyz[:, 0] - ipp0[0]) / dc], 1)
            f = fill_contour(pts, h, w)
            if f is not None:
                inside[f[0], f[1]] ^= f[2]
        raw = np.where(inside, 1000, 0).astype(np.uint16 if int(ds.PixelRepresentation) == 0 else np.int16)
        ds.compress(RLELossless, raw, generate_instance_uid=False)  # the structure set references this UID
        p = out / f"CT.{uid}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dicom_export")
    a = ap.parse_args()
    case = a.out / "breast"
    if case.exists():
        shutil.rmtree(case)
    files = write_series(_find(a.src, "ct.0.dcm"), _find(a.src, "rtss.dcm"), case / "CT")
    for name in ("rtss.dcm", "rtplan.dcm"):
        shutil.copy(_find(a.src, name), case / name)
    (a.out / "README.md").write_text(
        "# A planning system's export (breast case)\n\n"
        f"Source: {SOURCE}, cut by `scripts/fetch_dicom_exports.py`.\n\n"
        "- `breast/rtss.dcm`, `breast/rtplan.dcm`: the structure set (10 ROIs, 441 contours) and the plan, as "
        "exported.\n"
        f"- `breast/CT/`: the {len(files)} CT slices the structure set references, rebuilt from the one slice in "
        "the repository (header, UIDs, positions); pixel data cut down to -1000 HU outside the BODY contour and "
        "0 HU inside.\n")
    print(f"wrote {len(files)} CT slices and the structure set and plan to {case}")


if __name__ == "__main__":
    main()
