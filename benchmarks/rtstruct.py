"""Time to write an RTSTRUCT (and a DICOM SEG) for a 200-slice series with 3 structures.

    .venv/bin/python benchmarks/rtstruct.py [--slices 200] [--size 256]

The series is synthetic (one MR slice of the DICOM fixture repeated along its normal, new UIDs, resized
pixel grid); the structures are 3 overlapping ellipsoids. Prints the medians of 3 runs and writes
benchmarks/results/rtstruct.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_series(folder: Path, n: int, size: int) -> list[Path]:
    import pydicom
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(sorted((ROOT / "tests" / "fixtures" / "dicom" / "series").iterdir())[0])
    iop = np.array([float(v) for v in src.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.array([float(v) for v in src.ImagePositionPatient])
    series = generate_uid()
    files = []
    for z in range(n):
        ds = src.copy()
        ds.Rows = ds.Columns = size
        ds.PixelData = np.zeros((size, size), np.uint16).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp + z * normal]
        ds.InstanceNumber = z + 1
        f = folder / f"IM{z:04d}.dcm"
        ds.save_as(f)
        files.append(f)
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rtstruct.json")
    a = ap.parse_args()
    from medseg.data.formats.dicom_rtstruct import write_rtstruct
    from medseg.data.formats.dicom_seg import write_seg

    zz, yy, xx = np.mgrid[:a.slices, :a.size, :a.size]
    c = np.array([a.slices / 2, a.size / 2, a.size / 2])
    mask = np.stack([(((zz - c[0]) / (0.4 * a.slices)) ** 2 + ((yy - c[1] - dy) / (0.25 * a.size)) ** 2
                      + ((xx - c[2]) / (0.2 * a.size)) ** 2 <= 1) for dy in (-0.1 * a.size, 0, 0.1 * a.size)], 1).astype(np.uint8)
    res = {"machine": platform.machine(), "slices": a.slices, "size": a.size, "structures": 3}
    with tempfile.TemporaryDirectory() as tmp:
        files = make_series(Path(tmp), a.slices, a.size)
        for name, fn in (("rtstruct", write_rtstruct), ("seg", write_seg)):
            times = []
            for i in range(3):
                t = time.perf_counter()
                fn(files, mask, ["a", "b", "c"], Path(tmp) / f"{name}{i}.dcm")
                times.append(time.perf_counter() - t)
            res[f"{name}_s"] = round(statistics.median(times), 3)
    print(f"{a.slices} slices {a.size}x{a.size}, 3 structures: RTSTRUCT {res['rtstruct_s']:.2f} s, SEG {res['seg_s']:.2f} s (median of 3)")
    a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
