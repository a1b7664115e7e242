"""Reading structure sets: a planning system's export rasterised by medseg, against an independent fill,
and a written RTSTRUCT read back against the same masks as a DICOM SEG.

    .venv/bin/python benchmarks/rtstruct_read.py [--runs 3]

1. The breast export (tests/fixtures/dicom_export/breast: 98 CT slices of 512 x 512, 10 ROIs, 441
   contours as exported; scripts/fetch_dicom_exports.py): `medseg prepare dicom ... --labels rtstruct`
   end to end, and ``read_rtstruct`` alone; its voxels against the reference fill, which tests every
   pixel centre of the slice against every contour with matplotlib's point-in-polygon test and combines
   a ROI's contours by the even-odd rule (what medseg did before the scan-line fill).
2. Those masks written as an RTSTRUCT and as a SEG (medseg's writers), each read back through
   ``medseg evaluate``'s reader: the time of each and their ratio.

Medians of ``--runs``; prints a table and writes benchmarks/results/rtstruct_read.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "tests" / "fixtures" / "dicom_export" / "breast"


def reference_fill(rtss: Path, files: list[str], classes: list[str]) -> np.ndarray:
    """Every pixel centre against every contour (matplotlib), even-odd within a ROI: the independent fill."""
    import pydicom
    from matplotlib.path import Path as Polygon

    ds = pydicom.dcmread(str(rtss))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    h, w = int(sources[0].Rows), int(sources[0].Columns)
    uid_z = {str(s.SOPInstanceUID): z for z, s in enumerate(sources)}
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    rr, cc = np.mgrid[:h, :w]
    centres = np.stack([rr.ravel(), cc.ravel()], 1).astype(np.float64)
    out = np.zeros((len(sources), len(classes), h, w), np.uint8)
    for rc in ds.ROIContourSequence:
        name = names[int(rc.ReferencedROINumber)]
        if name not in classes:
            continue
        for c in getattr(rc, "ContourSequence", None) or []:
            z = uid_z[str(c.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            s = sources[z]
            ipp = np.array([float(v) for v in s.ImagePositionPatient])
            iop = np.array([float(v) for v in s.ImageOrientationPatient])
            dr, dc = (float(v) for v in s.PixelSpacing)
            d = np.array([float(v) for v in c.ContourData]).reshape(-1, 3) - ipp
            pts = np.stack([d @ iop[3:] / dr, d @ iop[:3] / dc], 1)
            inside = Polygon(pts).contains_points(centres).reshape(h, w)
            out[z, classes.index(name)] ^= inside.astype(np.uint8)
    return out


def timed(fn, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    import warnings

    from medseg.data.formats import get_reader
    from medseg.data.formats.dicom_rtstruct import read_rtstruct, write_rtstruct
    from medseg.data.formats.dicom_seg import read_seg, write_seg

    warnings.simplefilter("ignore")
    reader = get_reader("dicom", labels="rtstruct")
    spec = reader.scan(CASE)
    case = spec.cases[0]
    files, classes = case.sources["files"], spec.classes
    n_contours = sum(1 for _ in __import__("pydicom").dcmread(str(CASE / "rtss.dcm")).ROIContourSequence
                     for _ in (getattr(_, "ContourSequence", None) or []))
    t_read, mask = timed(lambda: read_rtstruct(CASE / "rtss.dcm", files, classes), a.runs)
    t_ref, ref = timed(lambda: reference_fill(CASE / "rtss.dcm", files, classes), 1)
    differ = int((mask != ref).sum())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "medseg", "prepare", "dicom", str(CASE), str(tmp / "prep"), "--labels", "rtstruct",
               "--overwrite", "--workers", "1"]
        t_prep, _ = timed(lambda: subprocess.run(cmd, check=True, capture_output=True), a.runs)
        rt = write_rtstruct(files, mask, classes, tmp / "w.rtstruct.dcm")
        seg = write_seg(files, mask, classes, tmp / "w.seg.dcm")
        t_rt, back = timed(lambda: read_rtstruct(rt, files, classes), a.runs)
        t_seg, back_seg = timed(lambda: read_seg(seg, files, classes), a.runs)
    rows = {
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "case": "dicompyler-core breast export", "slices": len(files), "rois": len(classes), "contours": n_contours,
        "prepare_s": round(t_prep, 3), "read_rtstruct_s": round(t_read, 3), "reference_fill_s": round(t_ref, 3),
        "voxels_differing_from_reference": differ, "foreground_voxels": int(ref.sum()),
        "written_rtstruct_read_s": round(t_rt, 3), "written_seg_read_s": round(t_seg, 3),
        "rtstruct_over_seg": round(t_rt / t_seg, 2),
        "written_round_trip_dice": round(float(2 * (back & back_seg).sum() / max(1, back.sum() + back_seg.sum())), 5),
    }
    print(f"{'measure':<48}{'value':>12}")
    for k, v in rows.items():
        print(f"{k:<48}{v!s:>12}")
    out = ROOT / "benchmarks" / "results" / "rtstruct_read.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
