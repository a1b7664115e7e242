"""What `predict --quality` costs over prediction with TTA: the same views (every member network under every
flip), each decided on its own, plus the signals.

    .venv/bin/python benchmarks/quality_cost.py [--runs 5] [--threads 2]

Cases:
1. one LGG patient (tests/fixtures/lgg: TCGA_CS_5393, 20 slices of 256 x 256 x 3) with the shipped
   ``lgg-unet`` (two members, flips of width and height: six views);
2. one 3D volume: a 3D U-Net (widths 16..128, patch 40 x 56 x 40, random weights: the cost does not depend
   on them) on a 48 x 72 x 64 volume (a hippocampus crop's size), sliding windows, three flips.

Each: ``Segmenter.predict`` (TTA) against ``predict_quality``, alternating, medians of ``--runs`` after a
warm-up. Prints a table and writes benchmarks/results/quality_cost.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def lgg_case():
    from medseg.data.formats import get_reader
    from medseg.inference.segmenter import Segmenter

    r = get_reader("lgg")
    spec = r.survey(ROOT / "tests" / "fixtures" / "lgg" / "kaggle_3m")
    case = next(c for c in spec.cases if c.id.startswith("TCGA_CS_5393"))
    return "LGG patient, lgg-unet (2 members x 3 flips)", Segmenter.load("lgg-unet", tta=True), r.read(spec, case).image, 2


def volume_case():
    import tempfile

    from medseg.bundle import save_bundle
    from medseg.inference.segmenter import Segmenter
    from medseg.models import create_model

    kw = {"features": [16, 32, 64, 128]}
    m = create_model("unet", 1, 3, spatial_dims=3, **kw)
    b = {"arch": {"name": "unet", "in_channels": 1, "out_channels": 3, "spatial_dims": 3, "kwargs": kw},
         "state_dict": m.state_dict(), "classes": ["anterior", "posterior"], "class_kind": "multiclass",
         "channels": ["MRI"], "input": {"mode": "3d", "size": [40, 56, 40], "overlap": 0.5},
         "normalization": {"mode": "zscore_body"}, "postprocess": {}, "tta": {"enabled": True, "flips": [[-1], [-2]]},
         "meta": {}}
    path = Path(tempfile.mkdtemp()) / "model.pt"
    save_bundle(b, path)
    img = np.random.default_rng(0).normal(100, 20, (48, 1, 72, 64)).astype(np.float32)
    return "3D volume 48x72x64, 3D U-Net (1 net x 3 flips)", Segmenter.load(path, tta=True), img, 3


def main() -> None:
    import torch

    from medseg.inference.quality import predict_quality, views

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality_cost.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for name, seg, image, dims in (lgg_case(), volume_case()):
        def tta():
            seg.predict(image, spatial_dims=dims)

        def quality():
            predict_quality(seg, image, spatial_dims=dims)

        tta(), quality()  # warm-up
        t = {"tta": [], "quality": []}
        for _ in range(a.runs):
            for key, fn in (("tta", tta), ("quality", quality)):
                t0 = time.perf_counter()
                fn()
                t[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append({"case": name, "views": len(views(seg)), "tta_s": med["tta"], "quality_s": med["quality"],
                     "extra": med["quality"] / med["tta"] - 1, "runs": t})
    print(f"{'case':<52} {'views':>5} {'TTA s':>8} {'quality s':>10} {'extra':>7}")
    for r in rows:
        print(f"{r['case']:<52} {r['views']:>5} {r['tta_s']:>8.2f} {r['quality_s']:>10.2f} {100 * r['extra']:>6.0f}%")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": a.threads,
                                 "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
