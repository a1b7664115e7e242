"""Benchmark ``medseg predict`` on UW-Madison: one case-day of 144 slices at 266x266 in the competition's
test layout (16-bit PNGs on disk) -> the 2.5D model -> ``submission.csv`` (RLE per slice and class).
Issue 8's target: under 20 s on 2 CPU cores without TTA.

    .venv/bin/python benchmarks/uwmgi_predict.py [--runs 3] [--threads 2] [--slices 144] [--size 266]
        [--model RUN_OR_BUNDLE] [--tta]

Without ``--model`` the 2.5D model of ``configs/uwmgi_25d_unet.yaml`` (default ``unet``, 3 input slices
i-2, i, i+2, 3 sigmoid outputs) with RANDOM weights is used: speed does not depend on the weights, but
the masks mean nothing (said in the output). Random weights give noisy masks with many more runs than a
trained model's, so the RLE share is an upper bound. The images are synthetic
(``medseg.data.synthetic.write_uwmgi_synthetic``), written once to a temp folder.

Each timed run is the whole ``medseg.inference.predict.predict`` call: loading the model, scanning and
reading the PNGs, inference, RLE encoding and writing ``submission.csv``; the table shows the median of
``--runs``. One more run, split by stage (read / infer / RLE + write), shows where the time goes.
Prints a table and writes benchmarks/results/uwmgi_predict.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["large_bowel", "small_bowel", "stomach"]


def random_bundle(path: Path) -> Path:
    """The 2.5D UW-Madison model of configs/uwmgi_25d_unet.yaml with random weights."""
    import torch

    from medseg.bundle import save_bundle
    from medseg.models import create_model, model_info

    torch.manual_seed(0)
    m = create_model("unet", 3, 3).eval()
    return save_bundle({
        "arch": {"name": "unet", "in_channels": 3, "out_channels": 3, "spatial_dims": 2, "kwargs": {}},
        "state_dict": m.state_dict(), "classes": CLASSES, "class_kind": "multilabel", "channels": ["MRI"],
        "input": {"mode": "2.5d", "context": 1, "stride": 2, "size": [256, 256], "resize": False,
                  "divisor": model_info("unet")["required_divisor"]},
        "normalization": {"mode": "zscore_case"},
        "postprocess": {"thresholds": [0.5] * 3, "presence": None, "min_size": 0, "largest_cc": False},
        "tta": {"flips": [[-1], [-2]]},
        "meta": {"note": "random weights (benchmark only)"},
    }, path)


def staged(model: str | Path, images: Path, out: Path, tta: bool) -> dict[str, float]:
    """One run split by stage, with the same calls ``predict`` makes."""
    from medseg.data.formats import get_reader
    from medseg.data.formats.uwmgi import submission_rows, write_submission
    from medseg.inference.segmenter import Segmenter

    t = {}
    t0 = time.perf_counter()
    seg = Segmenter.load(model, tta=tta)
    t["load_model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    reader = get_reader("uwmgi")
    spec = reader.scan(images, require_masks=False)
    datas = [(c, reader.load(spec, c)) for c in spec.cases]
    t["read_png"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = [(c, seg.predict(d.image, spatial_dims=2)) for c, d in datas]
    t["inference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = [r for c, p in preds for r in submission_rows(c.sources["slices"], p.mask, seg.classes)]
    write_submission(rows, out / "submission.csv")
    t["rle_and_csv"] = time.perf_counter() - t0
    t["positive_rows"] = sum(1 for r in rows if r[2])
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=144)
    ap.add_argument("--size", type=int, default=266, choices=[266, 234, 276], help="square competition size")
    ap.add_argument("--model", default=None, help="run directory or model.pt (default: random-weight 2.5D unet)")
    ap.add_argument("--tta", action="store_true", help="also time flip TTA (x3 forward passes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "uwmgi_predict.json"))
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from medseg.data.formats import uwmgi_synthetic as synthetic
    from medseg.inference.predict import predict

    tmp = Path(tempfile.mkdtemp(prefix="medseg-uwbench-"))
    try:
        size = next(s for s in synthetic.SIZES if s[0] == a.size)
        images = synthetic.write_uwmgi_synthetic(tmp / "data", n_cases=1, days_per_case=1, slices_per_day=a.slices,
                                                 split="test", with_csv=False, sizes=[size]) / "test"
        model = a.model or random_bundle(tmp / "model.pt")
        note = "RANDOM-weight 2.5D unet (speed only; masks are meaningless)" if a.model is None else str(a.model)
        results = []
        for tta in [False, True] if a.tta else [False]:
            times = []
            for r in range(a.runs):
                out = tmp / f"out_{tta}_{r}"
                t0 = time.perf_counter()
                predict(model, images, out, fmt="uwmgi", tta=tta, progress=False)
                times.append(time.perf_counter() - t0)
                rows = (out / "submission.csv").read_text().count("\n") - 1
                assert rows == 3 * a.slices, rows
            stages = staged(model, images, tmp / f"staged_{tta}", tta)
            med = statistics.median(times)
            results.append({"tta": "x3 flips" if tta else "off", "slices": a.slices, "size": [a.size, a.size],
                            "seconds_per_case_day": med, "slices_per_s": a.slices / med,
                            "runs": [round(t, 3) for t in times], "stages_one_run": stages,
                            "target_s": 20.0 if not tta else None})
        print(f"\nUW-Madison predict, one case-day of {a.slices} slices at {a.size}x{a.size}, {a.threads} threads; "
              f"{note}")
        print(f"{'TTA':10s} {'s/case-day':>11s} {'slices/s':>9s} {'load':>6s} {'read':>6s} {'infer':>6s} {'RLE+csv':>8s}")
        for r in results:
            s = r["stages_one_run"]
            print(f"{r['tta']:10s} {r['seconds_per_case_day']:11.2f} {r['slices_per_s']:9.1f} {s['load_model']:6.2f} "
                  f"{s['read_png']:6.2f} {s['inference']:6.2f} {s['rle_and_csv']:8.2f}")
        doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads,
                           "load_avg": list(os.getloadavg())},
               "model": note, "target": "< 20 s per 144-slice case-day at 266x266 on 2 CPU cores, no TTA",
               "results": results}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=2))
        print(f"wrote {a.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
