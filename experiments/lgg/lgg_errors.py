"""Where a run's out-of-fold errors lie, and whether any voxel-level rule recovers them.

    .venv/bin/python experiments/lgg/lgg_errors.py runs/lgg_unet_m2 [--tta] [--threshold 0.3] \\
        [--small 6000] --out experiments/lgg/results/lgg_errors.json

Every validation patient of every fold is segmented as ``lgg_cv_dice.py`` segments it (the fold's
model, the bundle's or ``--tta``'s flips), keeping the tumour probability. Then, at ``--threshold``
(default: the threshold ``medseg tune`` chose, from RUN/tune.json):
- per patient: 3D Dice, recall, precision and tumour size; the mean over patients with tumours under
  ``--small`` voxels and over the rest;
- the error split: a false-positive voxel within R pixels (in-plane, same slice) of the true mask, or
  a false negative within R pixels of the prediction, is a *rim* error (where the outline was drawn);
  any other is a *region* error (a region found or missed whole). The mean Dice with every rim error
  corrected, and with every region error corrected, bounds what a better outline or a better detector
  could buy;
- voxel-level rules on the same probabilities: thresholds, the largest component over the volume,
  hysteresis (components above a low threshold kept only where they reach a high one), smoothing of
  the probabilities across neighbouring slices, and filling holes per slice.
Scores are mean ± std over folds of the mean per-patient 3D Dice, as in ``lgg_cv_dice.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "lgg"))

Rule = Callable[[np.ndarray], np.ndarray]


def rim_region(pred: np.ndarray, truth: np.ndarray, r: int) -> dict[str, int]:
    """False positives and negatives of ``pred`` against ``truth`` (``[z, h, w]`` bool), split into rim
    errors (within ``r`` pixels in-plane of the other mask, 8-connected steps) and region errors."""
    from scipy import ndimage

    st = np.zeros((3, 3, 3), bool)
    st[1] = True  # in-plane only: a slice's outline, not its neighbours
    fp, fn = pred & ~truth, truth & ~pred
    fp_rim = int((fp & ndimage.binary_dilation(truth, st, iterations=r)).sum())
    fn_rim = int((fn & ndimage.binary_dilation(pred, st, iterations=r)).sum())
    return {"tp": int((pred & truth).sum()), "fp_rim": fp_rim, "fp_region": int(fp.sum()) - fp_rim,
            "fn_rim": fn_rim, "fn_region": int(fn.sum()) - fn_rim}


def corrected(e: dict[str, int], fix: str) -> float:
    """The Dice with every ``fix`` ("rim" or "region") error corrected: its false positives dropped, its
    false negatives found."""
    tp = e["tp"] + e[f"fn_{fix}"]
    other = "region" if fix == "rim" else "rim"
    denom = 2 * tp + e[f"fp_{other}"] + e[f"fn_{other}"]
    return 1.0 if denom == 0 else 2.0 * tp / denom


def hysteresis(prob: np.ndarray, low: float, high: float) -> np.ndarray:
    """Components (3D face connectivity) of ``prob > low`` that hold a voxel above ``high``."""
    from scipy import ndimage

    lab, n = ndimage.label(prob > low)
    if not n:
        return lab > 0
    keep = np.zeros(n + 1, bool)
    keep[1:] = ndimage.maximum(prob, lab, np.arange(1, n + 1)) > high
    return keep[lab]


def best_components(pred: np.ndarray, truth: np.ndarray) -> float:
    """The highest Dice of any subset of ``pred``'s components (3D face connectivity) against ``truth``.

    Dice of a subset is 2·Σoverlap / (Σvolume + |truth|); a ratio like that is maximised by the
    components whose overlap / volume exceeds half the optimum, so the best subset is one of the
    prefixes of the components sorted by that share (the empty one included)."""
    from scipy import ndimage

    t = int(truth.sum())
    if t == 0:
        return 1.0  # every component dropped: both empty
    lab, n = ndimage.label(pred)
    if not n:
        return 0.0
    vol = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    hit = np.bincount(lab[truth], minlength=n + 1)[1:]
    order = np.argsort(-hit / vol, kind="stable")
    num = 2.0 * np.concatenate([[0], np.cumsum(hit[order])])
    den = t + np.concatenate([[0], np.cumsum(vol[order])])
    return float((num / den).max())


def rules(t: float) -> dict[str, Rule]:
    from scipy import ndimage

    from medseg.inference.postprocess import largest_component

    def z_smooth(w: float) -> Rule:
        return lambda p: ndimage.convolve1d(p, [w, 1 - 2 * w, w], axis=0, mode="nearest") > t

    out: dict[str, Rule] = {}
    for v in sorted({0.2, 0.3, 0.4, 0.5, t}):
        out[f"threshold {v:g}"] = lambda p, v=v: p > v
        out[f"threshold {v:g} + largest component"] = lambda p, v=v: largest_component(p > v)
    for lo in (0.1, 0.2, 0.3):
        for hi in (0.5, 0.7, 0.9):
            out[f"hysteresis {lo:g} / {hi:g}"] = lambda p, lo=lo, hi=hi: hysteresis(p, lo, hi)
    for w in (0.15, 0.25):
        out[f"slices smoothed {w:g}/{1 - 2 * w:g}/{w:g}, threshold {t:g}"] = z_smooth(w)
    out[f"threshold {t:g} + holes filled per slice"] = lambda p: np.stack([ndimage.binary_fill_holes(s) for s in p > t])
    return out


def main() -> None:
    from lgg_cv_dice import fold_summary, out_of_fold, parse_run, tuned_postprocess

    from medseg.evaluation.metrics import case_dice

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="RUN[,RUN...]: a run, or runs trained on the same split (probabilities averaged)")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="flip TTA on or off (default: each bundle's own setting)")
    ap.add_argument("--threshold", type=float, default=None, help="default: RUN/tune.json's, else 0.5")
    ap.add_argument("--small", type=int, default=6000, help="tumours under this many voxels are 'small'")
    ap.add_argument("--rim", default="1,2,3", help="rim widths R in pixels")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "lgg" / "results" / "lgg_errors.json"))
    args = ap.parse_args()
    pairs = [parse_run(p) for p in args.run.split(",") if p]
    runs, sizes = [r for r, _ in pairs], [z for _, z in pairs]
    for r in runs:
        if not (r / "splits.json").is_file() or not (r / "config.yaml").is_file():
            sys.exit(f"{r}: not a training run (no splits.json and config.yaml)")
    t = args.threshold
    if t is None:
        t = tuned_postprocess(runs[0])["thresholds"][0] if (runs[0] / "tune.json").is_file() else 0.5
    widths = [int(v) for v in args.rim.split(",")]
    table = rules(t)
    t0 = time.perf_counter()
    patients: dict[str, dict] = {}
    by_rule: dict[str, dict[str, float]] = {n: {} for n in table}
    fold_of: dict[str, int] = {}
    oracle_at = sorted({0.1, 0.2, 0.3, 0.4, 0.5, t})
    by_choice: dict[float, dict[str, float]] = {v: {} for v in oracle_at}
    for k, cid, pred, truth in out_of_fold(runs, [int(v) for v in args.folds.split(",")], args.tta, sizes=sizes,
                                           probabilities=True):
        prob = pred.prob[:, 0].astype(np.float32)
        m = prob > t
        tp = int((m & truth).sum())
        fold_of[cid] = k
        patients[cid] = {"fold": k, "dice": case_dice(m, truth), "recall": tp / max(int(truth.sum()), 1),
                         "precision": tp / max(int(m.sum()), 1), "tumour_voxels": int(truth.sum()),
                         "errors": {str(r): rim_region(m, truth, r) for r in widths}}
        for n, rule in table.items():
            by_rule[n][cid] = case_dice(rule(prob), truth)
        for v in oracle_at:
            by_choice[v][cid] = best_components(prob > v, truth)
    small = {c for c, p in patients.items() if p["tumour_voxels"] < args.small}

    def group(per: dict[str, float]) -> dict[str, float]:
        by_fold: dict[str, dict[str, float]] = {}
        for c, v in per.items():
            by_fold.setdefault(str(fold_of[c]), {})[c] = v
        return {**fold_summary(by_fold), f"small (<{args.small})": float(np.mean([per[c] for c in small])) if small else None,
                "others": float(np.mean([v for c, v in per.items() if c not in small]))}

    base = {c: p["dice"] for c, p in patients.items()}
    result = {"runs": [str(r) for r in runs], "tta": args.tta, "threshold": t, "small_voxels": args.small,
              "n_small": len(small), "n_patients": len(patients), "at_threshold": group(base),
              "corrected": {f"{fix} errors within {r} px": group({c: corrected(p["errors"][str(r)], fix) for c, p in patients.items()})
                            for r in widths for fix in ("rim", "region")}
              | {f"best choice of components, threshold {v:g}": group(by_choice[v]) for v in oracle_at},
              "rules": {n: group(v) for n, v in by_rule.items()}, "patients": patients,
              "seconds": time.perf_counter() - t0}

    print(f"{len(patients)} patients, {len(small)} with tumours under {args.small} voxels; threshold {t:g}")
    print(f"{'patient':<24}{'fold':>5}{'Dice':>7}{'recall':>8}{'prec.':>7}{'voxels':>8}")
    for c, p in sorted(patients.items(), key=lambda kv: kv[1]["dice"])[:12]:
        print(f"{c:<24}{p['fold']:>5}{p['dice']:>7.3f}{p['recall']:>8.2f}{p['precision']:>7.2f}{p['tumour_voxels']:>8}")
    head = f"{'':<52}{'mean ± std':>15}{'small':>8}{'others':>8}"
    for title, rows in (("errors corrected", {"as predicted": result["at_threshold"], **result["corrected"]}),
                        ("voxel-level rules", result["rules"])):
        print(f"\n{title}\n{head}")
        for n, g in rows.items():
            s = g[f"small (<{args.small})"]
            print(f"{n:<52}{g['mean']:>8.3f} ± {g['std']:.3f}{'' if s is None else f'{s:>8.3f}':>8}{g['others']:>8.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
