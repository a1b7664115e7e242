"""``medseg predict`` on each device present: slices per second of a folder of LGG patients with the
shipped ``lgg-unet`` and its flip TTA (x3), model loading excluded (it is timed apart).

    .venv/bin/python benchmarks/predict_device.py [--input tests/fixtures/lgg/kaggle_3m] [--runs 3]

Each run reads every patient's TIFFs, predicts, and writes the masks one after another, the model loaded
once before; the whole ``predict`` call (loading the model, reading ahead and writing behind on threads)
is timed too. Prints a table and writes benchmarks/results/predict_device.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shown(p: Path) -> str:
    """A path relative to the project when inside it (results name no machine's folders)."""
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name


def run_once(seg, reader, spec, out: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for case in spec.cases:
        data = reader.load(spec, case)
        pred = seg.predict(data.image, probabilities=False, spatial_dims=spec.spatial_dims)
        reader.write_prediction(spec, case, pred.mask, out)
        n += data.image.shape[0]
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", type=Path, default=ROOT / "tests" / "fixtures" / "lgg" / "kaggle_3m")
    ap.add_argument("--model", default="lgg-unet")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict_device.json")
    a = ap.parse_args()

    import torch

    from medseg.data.formats import FORMATS, get_reader, guess_format
    from medseg.inference.segmenter import Segmenter

    fmt = guess_format(a.input)
    reader = get_reader(fmt, **FORMATS.get(fmt).options_for_model(3))
    spec = reader.scan(a.input, require_masks=False)
    rows = []
    for device in a.devices.split(","):
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{device}: no CUDA GPU here, skipped")
            continue
        t0 = time.perf_counter()
        seg = Segmenter.load(a.model, device=device)
        load_s = time.perf_counter() - t0
        tmp = Path(tempfile.mkdtemp(prefix="medseg-bench-"))
        run_once(seg, reader, spec, tmp)  # warm-up: kernels, caches, autotuning
        times = []
        for _ in range(a.runs):
            dt, n = run_once(seg, reader, spec, tmp)
            times.append(dt)
        shutil.rmtree(tmp, ignore_errors=True)
        # the whole command (model loading, reading ahead, writing behind), as `medseg predict` runs it
        from medseg.inference.predict import predict

        whole = []
        for _ in range(a.runs):
            out = Path(tempfile.mkdtemp(prefix="medseg-bench-")) / "out"
            t1 = time.perf_counter()
            predict(a.model, a.input, out, device=device, progress=False)
            whole.append(time.perf_counter() - t1)
            shutil.rmtree(out.parent, ignore_errors=True)
        med = statistics.median(times)
        rows.append({"device": device, "model": a.model, "tta": 1 + len(seg.flips), "slices": n, "cases": len(spec.cases),
                     "load_s": round(load_s, 3), "runs_s": [round(t, 4) for t in times], "median_s": round(med, 4),
                     "slices_per_s": round(n / med, 1), "predict_command_s": round(statistics.median(whole), 4),
                     "predict_command_slices_per_s": round(n / statistics.median(whole), 1)})
    cpu_row = next((r for r in rows if r["device"] == "cpu"), None)
    print(f"{'device':8s} {'slices':>6s} {'tta':>4s} {'load s':>7s} {'median s':>9s} {'slices/s':>9s} {'vs cpu':>7s}"
          f" {'command slices/s':>17s}")
    for r in rows:
        ratio = r["slices_per_s"] / cpu_row["slices_per_s"] if cpu_row else float("nan")
        r["vs_cpu"] = round(ratio, 2)
        print(f"{r['device']:8s} {r['slices']:6d} {r['tta']:4d} {r['load_s']:7.2f} {r['median_s']:9.3f} "
              f"{r['slices_per_s']:9.1f} {ratio:6.2f}x {r['predict_command_slices_per_s']:17.1f}")
    info = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "input": _shown(a.input), "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
