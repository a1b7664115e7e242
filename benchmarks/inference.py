"""Benchmark ``medseg predict``: one LGG patient from files on disk to masks on disk, eager PyTorch vs
onnxruntime (float, and int8 calibrated on the prepared LGG set), with and without flip TTA; the masks'
agreement with PyTorch's over every slice of the prepared LGG dataset; and peak memory on a synthetic 512x512x200 volume, through the
2D path (slices in batches) and the 3D path (Gaussian sliding windows streamed in z slabs).

    .venv/bin/python benchmarks/inference.py [--runs 5] [--threads 2] [--patient TCGA_DU_5854_19951104]
        [--model RUN_OR_BUNDLE] [--volume-slices 200] [--skip-volume] [--skip-volume-3d]

Without ``--model`` the default ``unet`` (``create_model("unet", 3, 2)``) with RANDOM weights is used:
the speed of a network does not depend on its weights, but the masks mean nothing (said in the output).
The 3D volume run uses a small random 3D unet (features 8-16-32, patch 32x128x128, overlap 0.25): it measures
the memory of the volume-sized buffers, which do not depend on the network.
Every timed run is the whole ``medseg.inference.predict.predict`` call (model loading, reading the TIFFs,
inference, writing the masks); the table shows the median of ``--runs``. Peak RSS: VmHWM
of this process (LGG) and of a child process that runs only the volume (so the LGG runs do not count).
Prints a table and writes benchmarks/results/inference.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM of its memory map (getrusage's ru_maxrss would carry the
    parent's peak into a child across fork + exec on Linux, hiding the child's own peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _random_bundle(path: Path, channels: list[str]) -> Path:
    from medseg.bundle import save_bundle
    from medseg.models import create_model

    import torch

    torch.manual_seed(0)
    m = create_model("unet", len(channels), 2).eval()
    return save_bundle(
        {
            "arch": {"name": "unet", "in_channels": len(channels), "out_channels": 2, "spatial_dims": 2, "kwargs": {}},
            "state_dict": m.state_dict(),
            "classes": ["tumor"],
            "class_kind": "multiclass",
            "channels": channels,
            "input": {"mode": "2d", "context": 0, "stride": 1, "size": [256, 256]},
            "normalization": {"mode": "zscore_case"},
            "postprocess": {"thresholds": [0.5], "presence": None, "min_size": 0, "largest_cc": False},
            "tta": {"flips": [[-1], [-2]]},
            "meta": {"note": "random weights (benchmark only)"},
        },
        path,
    )


def _random_bundle_3d(path: Path) -> Path:
    from medseg.bundle import save_bundle
    from medseg.models import create_model

    import torch

    torch.manual_seed(0)
    kw = {"features": [8, 16, 32]}
    m = create_model("unet", 1, 3, spatial_dims=3, **kw).eval()
    return save_bundle(
        {
            "arch": {"name": "unet", "in_channels": 1, "out_channels": 3, "spatial_dims": 3, "kwargs": kw},
            "state_dict": m.state_dict(),
            "classes": ["a", "b"],
            "class_kind": "multiclass",
            "channels": ["CT"],
            "input": {"mode": "3d", "context": 0, "stride": 1, "size": [32, 128, 128], "overlap": 0.25},
            "normalization": {"mode": "zscore_case"},
            "postprocess": {},
            "tta": {"flips": []},
            "meta": {"note": "random weights (benchmark only)"},
        },
        path,
    )


def volume_child(args: argparse.Namespace) -> None:
    """Run only the synthetic volume (NIfTI on disk -> NIfTI masks on disk) and print JSON."""
    import nibabel as nib
    import torch

    from medseg.inference.predict import predict

    torch.set_num_threads(args.threads)
    tmp = Path(args.tmp)
    z = args.volume_slices
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    vol = np.empty((512, 512, z), np.int16)  # NIfTI (x, y, z)
    for k in range(z):  # a bright disc on noise, built slice by slice (no float volume in memory)
        vol[:, :, k] = (rng.integers(0, 200, (512, 512)) + 800 * ((yy - 256) ** 2 + (xx - 200 - k) ** 2 < 4000)).astype(np.int16)
    (tmp / "vol").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 1.5, 1.0])), str(tmp / "vol" / "ct.nii"))
    del vol
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    predict(args.model_1ch, tmp / "vol" / "ct.nii", tmp / "vol_out", tta=False, backend=args.backend, overwrite=True)
    shutil.rmtree(tmp / "vol_out", ignore_errors=True)
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "slices": z, "peak_rss_mb": _rss_mb(), "rss_before_predict_mb": rss_before}))


def dev_agreement(model: str, onnx: dict[str, Path], prepared: Path) -> dict:
    """Share of pixels whose mask equals PyTorch's, over every slice of every case of ``prepared``
    (the same pipeline from arrays, no TTA)."""
    from medseg import Segmenter
    from medseg.data.prepared import PreparedDataset

    ds = PreparedDataset.open(prepared)
    ref = Segmenter.load(model, tta=False)
    segs = {k: Segmenter.load(p, tta=False) for k, p in onnx.items()}
    same = {k: 0 for k in segs}
    total = slices = 0
    for c in ds.cases:
        image = np.asarray(ds.image(c.id))
        m = ref.predict(image).mask
        for k, s in segs.items():
            same[k] += int((s.predict(image).mask == m).sum())
        total += m.size
        slices += image.shape[0]
    return {"cases": len(ds.cases), "slices": slices, "agreement": {k: v / total for k, v in same.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", type=Path, default=SHARED / "lgg" / "kaggle_3m")
    ap.add_argument("--patient", default="TCGA_DU_5854_19951104")  # 36 slices
    ap.add_argument("--model", default=None, help="run dir / bundle (default: random-weight default unet)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--volume-slices", type=int, default=200)
    ap.add_argument("--calibration", type=Path, default=ROOT / "prepared" / "lgg",
                    help="prepared LGG dataset: int8 calibration and the dev-set mask agreement (prepared from --src when missing)")
    ap.add_argument("--skip-volume", action="store_true")
    ap.add_argument("--skip-volume-3d", action="store_true", help="skip the 3D sliding-window volume run")
    ap.add_argument("--backend", default="onnx", help=argparse.SUPPRESS)
    ap.add_argument("--volume-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-1ch", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference.json")
    args = ap.parse_args()
    if args.volume_child:
        return volume_child(args)
    patient = args.src / args.patient
    if not patient.is_dir():
        sys.exit(f"error: {patient}: LGG patient not found (set MEDSEG_SHARED_DATA)")

    import torch
    from rich.console import Console
    from rich.table import Table

    from medseg.inference.export import export_onnx
    from medseg.inference.predict import predict

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="medseg-bench-inf-"))
    note = "trained model" if args.model else "RANDOM-weight default unet (speed only; masks are meaningless)"
    try:
        model = args.model or str(_random_bundle(tmp / "model.pt", ["pre-contrast", "FLAIR", "post-contrast"]))
        onnx_path = tmp / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(model, onnx_path)
        export_s = time.perf_counter() - t0
        calib = args.calibration
        if not (calib / "dataset.json").is_file():
            from medseg.data.prepare import prepare

            calib = prepare("lgg", args.src, tmp / "prepared")
        int8_path = tmp / "model_int8.onnx"
        t0 = time.perf_counter()
        # a random-weight net gives near-tied logits, so its int8 masks may differ: measured, not required
        export_onnx(model, int8_path, int8=calib, min_agreement=0.0 if not args.model else 0.999)
        int8_s = time.perf_counter() - t0
        int8_rec = json.loads(int8_path.with_suffix(".json").read_text())["onnx"]["int8"]
        # random weights make masks meaningless: the dev-set agreement is measured for trained models only
        dev = dev_agreement(model, {"onnx": onnx_path, "onnx int8": int8_path}, calib) if args.model else None
        n = len([p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")])
        rows = []
        for backend, m in (("torch", model), ("onnx", str(onnx_path)), ("onnx int8", str(int8_path))):
            for tta in (False, True):
                times = []
                for r in range(args.runs):
                    out = tmp / f"out_{backend}_{tta}"
                    t0 = time.perf_counter()
                    predict(m, patient, out, tta=tta, overwrite=True)
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                rows.append({"backend": backend, "tta": "x3 flips" if tta else "off", "slices": n,
                             "seconds_per_patient": med, "slices_per_s": n / med,
                             "runs": [round(t, 3) for t in times]})
        # masks of the two backends on this patient (same pipeline)
        import tifffile

        a = np.stack([tifffile.imread(p) for p in sorted((tmp / "out_torch_False").rglob("*_mask.tif"))])
        b = np.stack([tifffile.imread(p) for p in sorted((tmp / "out_onnx_False").rglob("*_mask.tif"))])
        c = np.stack([tifffile.imread(p) for p in sorted((tmp / "out_onnx int8_False").rglob("*_mask.tif"))])
        agree = float((a == b).mean())
        agree8 = float((a == c).mean())
        rss_lgg = _rss_mb()

        def child(model_path: Path, backend: str) -> dict:
            proc = subprocess.run(
                [sys.executable, __file__, "--volume-child", "--tmp", str(tmp), "--model-1ch", str(model_path),
                 "--threads", str(args.threads), "--volume-slices", str(args.volume_slices), "--backend", backend],
                capture_output=True, text=True,
            )
            if proc.returncode:
                sys.exit(f"volume run failed:\n{proc.stderr[-3000:]}")
            return json.loads(proc.stdout.strip().splitlines()[-1])

        vol = vol3d = None
        if not args.skip_volume:
            m1 = _random_bundle(tmp / "model_1ch.pt", ["CT"])
            export_onnx(m1, tmp / "model_1ch.onnx")
            vol = child(tmp / "model_1ch.onnx", "onnx")
            if not args.skip_volume_3d:
                vol3d = child(_random_bundle_3d(tmp / "model_3d.pt"), "torch")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    t = Table(title=f"medseg predict, LGG {args.patient} ({n} slices 256x256x3), {args.threads} threads; {note}")
    for c in ("backend", "TTA", "s / patient (median)", "slices/s", "runs (s)"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["backend"], r["tta"], f"{r['seconds_per_patient']:.2f}", f"{r['slices_per_s']:.1f}",
                  " ".join(f"{x:.2f}" for x in r["runs"]))
    console.print(t)
    speedup = rows[0]["seconds_per_patient"] / rows[2]["seconds_per_patient"]
    speedup8 = rows[0]["seconds_per_patient"] / rows[4]["seconds_per_patient"]
    console.print(f"onnxruntime vs eager PyTorch (no TTA): {speedup:.2f}x faster; masks equal on {agree * 100:.3f}% of pixels; "
                  f"ONNX export {export_s:.1f} s; peak RSS (LGG runs) {rss_lgg:.0f} MB")
    console.print(f"onnxruntime int8 vs eager PyTorch (no TTA): {speedup8:.2f}x faster; masks equal on {agree8 * 100:.3f}% of "
                  f"pixels of this patient; int8 export {int8_s:.1f} s ({int8_rec['calibration_slices']} calibration slices, "
                  f"{100 * int8_rec['mask_agreement']:.3f}% agreement on {int8_rec['checked_slices']} held-out slices)")
    if dev:
        console.print("masks equal to PyTorch's over every slice of " + f"{dev['cases']} prepared cases ({dev['slices']} slices): "
                      + ", ".join(f"{k} {100 * v:.3f}%" for k, v in dev["agreement"].items()))
    if vol:
        console.print(f"synthetic 512x512x{vol['slices']} NIfTI volume, 2D path, onnxruntime: {vol['seconds']:.1f} s "
                      f"({vol['slices'] / vol['seconds']:.1f} slices/s), peak RSS {vol['peak_rss_mb']:.0f} MB")
    if vol3d:
        console.print(f"the same volume, 3D sliding windows (small random 3D unet, PyTorch): {vol3d['seconds']:.1f} s, "
                      f"peak RSS {vol3d['peak_rss_mb']:.0f} MB")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "load_avg": os.getloadavg()},
        "model": note,
        "patient": args.patient,
        "lgg": rows,
        "onnx_speedup_no_tta": speedup,
        "onnx_int8_speedup_no_tta": speedup8,
        "backend_mask_agreement": agree,
        "int8_mask_agreement": agree8,
        "int8_export": int8_rec,
        "dev_set_mask_agreement": dev,
        "export_seconds": export_s,
        "peak_rss_lgg_mb": rss_lgg,
        "volume": vol,
        "volume_3d": vol3d,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
