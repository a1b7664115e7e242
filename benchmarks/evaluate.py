"""Evaluation speed: the 56 LGG dev patients (prepared truth vs an LGG predictions folder: every slice,
Dice + IoU + HD95 + ASSD + NSD per case, per-slice Dice, report) and the UW-Madison score on 10,000
synthetic slices (RLE strings, as a submission holds them), and the whole evaluate path on a synthetic
UW-Madison submission CSV (7 case-days x 144 slices by default).

    .venv/bin/python benchmarks/evaluate.py [--slices 10000] [--lgg PATH_TO_kaggle_3m] [--out JSON]

Prints a table and writes benchmarks/results/evaluate.json. Targets: LGG < 20 s, UW-Madison < 60 s (2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def lgg(kaggle_3m: Path, tmp: Path) -> dict:
    from scipy.ndimage import binary_dilation, binary_erosion

    from medseg.data.formats import get_reader
    from medseg.data.prepare import prepare
    from medseg.data.prepared import PreparedDataset
    from medseg.evaluation.evaluate import evaluate

    prep = prepare("lgg", kaggle_3m, tmp / "prepared", folds=5, workers=2, progress=False)
    ds = PreparedDataset.open(prep)
    reader = get_reader("lgg")
    spec = reader.scan(kaggle_3m, require_masks=False)
    cases = {c.id: c for c in spec.cases}
    rng = np.random.default_rng(0)
    for i, rec in enumerate(ds.cases):  # a plausible prediction: eroded/dilated truth + a stray blob
        m = np.asarray(ds.mask(i)).astype(bool)
        inplane = np.ones((1, 1, 3, 3), bool)  # grow/shrink within slices only
        if i % 3 == 0:
            m = binary_dilation(m, inplane, iterations=2)
        elif i % 3 == 1:
            m = binary_erosion(m, inplane)
        z = int(rng.integers(0, m.shape[0]))
        m[z, 0, 20:26, 30:36] = True
        reader.write_prediction(spec, cases[rec.id], m.astype(np.uint8), tmp / "pred")
    slices = int(sum(c.shape[0] for c in ds.cases))
    out = {}
    for report in (False, True):
        t0 = time.perf_counter()
        s = evaluate(tmp / "pred", prep, out=tmp / f"eval_{report}", report=report)
        out["seconds_with_report" if report else "seconds"] = time.perf_counter() - t0
    out.update(cases=len(ds), slices=slices, mean_dice=s["dataset"]["mean_dice"], mean_hd95=s["dataset"]["mean_hd95"])
    return out


def uwmgi(n_slices: int) -> dict:
    from medseg.data.rle import encode
    from medseg.evaluation.uwmgi_score import CLASSES, uwmgi_score

    rng = np.random.default_rng(0)
    pred, truth, shapes = {}, {}, {}
    sizes = [(266, 266), (234, 234), (276, 276), (310, 360)]
    total, d = 0, 0
    while total < n_slices:  # case-days of 144 slices, organs as shifted ellipsoids
        z = min(144, n_slices - total)
        h, w = sizes[d % 4]
        zz, yy, xx = np.ogrid[:z, :h, :w]
        for cls in CLASSES:
            c = rng.uniform(0.3, 0.7, 3) * (z, h, w)
            r = rng.uniform(0.1, 0.3, 3) * (z, h, w)
            c2 = c + rng.normal(0, 3, 3)
            t = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
            p = ((zz - c2[0]) / r[0]) ** 2 + ((yy - c2[1]) / r[1]) ** 2 + ((xx - c2[2]) / r[2]) ** 2 <= 1
            for s in range(z):
                sid = f"case{d}_day{d % 3}_slice_{s + 1:04d}"
                shapes[sid] = (h, w)
                truth[(sid, cls)] = encode(t[s])
                pred[(sid, cls)] = encode(p[s])
        d += 1
        total += z
    t0 = time.perf_counter()
    res = uwmgi_score(pred, truth, shapes)
    return {"seconds": time.perf_counter() - t0, "slices": n_slices, "case_days": d, "score": res.score}


def uwmgi_full(tmp: Path, case_days: int) -> dict:
    """The whole ``evaluate`` path on a submission CSV: decode, every metric per case-day, score, report."""
    from medseg.data.formats import get_reader
    from medseg.data.formats.uwmgi import submission_rows, write_submission
    from medseg.data.formats.uwmgi_synthetic import write_uwmgi_synthetic
    from medseg.evaluation.evaluate import evaluate

    root = write_uwmgi_synthetic(tmp / "uw", n_cases=case_days, days_per_case=1, slices_per_day=144, seed=0)
    reader = get_reader("uwmgi")
    spec = reader.scan(root)
    rows = []
    for i, case in enumerate(spec.cases):
        m = reader.load(spec, case).mask
        m[:, 2] = np.roll(m[:, 2], 1 + i % 3, axis=2)  # stomach off by a few pixels
        rows += submission_rows(case.sources["slices"], m, spec.classes)
    write_submission(rows, tmp / "submission.csv")
    t0 = time.perf_counter()
    s = evaluate(tmp / "submission.csv", root, out=tmp / "uw_eval")
    return {"seconds": time.perf_counter() - t0, "slices": 144 * case_days, "case_days": case_days,
            "score": s["uwmgi"]["score"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=10000)
    ap.add_argument("--uw-full-case-days", type=int, default=7, help="case-days of 144 slices for the full path")
    ap.add_argument("--lgg", type=Path, default=ROOT.parent / "shared" / "data" / "lgg" / "kaggle_3m")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "evaluate.json")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.lgg.is_dir():
            results["lgg"] = lgg(args.lgg, Path(tmp))
        if args.uw_full_case_days > 0:
            results["uwmgi_full"] = uwmgi_full(Path(tmp), args.uw_full_case_days)
    results["uwmgi"] = uwmgi(args.slices)
    print(f"{'benchmark':<44} {'size':>22} {'seconds':>9} {'target':>7}")
    if "lgg" in results:
        r = results["lgg"]
        size = f"{r['cases']} cases/{r['slices']} slices"
        print(f"{'LGG evaluate, cold (metrics+CSVs, no report)':<44} {size:>22} {r['seconds']:>9.2f} {'< 20':>7}")
        print(f"{'LGG evaluate, warm (with report.html)':<44} {size:>22} {r['seconds_with_report']:>9.2f} {'< 20':>7}")
    else:
        print(f"LGG data not found at {args.lgg}: skipped")
    r = results["uwmgi"]
    print(f"{'UW-Madison score':<44} {str(r['slices']) + ' slices':>22} {r['seconds']:>9.2f} {'< 60':>7}")
    if "uwmgi_full" in results:
        r = results["uwmgi_full"]
        print(f"{'UW-Madison evaluate (CSV, all metrics, report)':<44} {str(r['slices']) + ' slices':>22} "
              f"{r['seconds']:>9.2f} {'':>7}")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
