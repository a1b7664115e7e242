"""Which connected components to keep: the largest component against other rules, on a run's
out-of-fold predictions (RUN/fold_K/val_predictions), mean per-patient 3D Dice as `lgg_cv_dice.py`.

    .venv/bin/python experiments/lgg/lgg_component_rules.py runs/lgg_unet_fill [--threshold 0.3] \\
        [--out experiments/lgg/results/lgg_component_rules.json]

Each patient's tumour probability is thresholded, its components labelled over the volume (3D face
connectivity, as ``components: volume``), and each rule keeps some of them:
- ``all``: every component; ``largest``: the most voxels (what ``largest_cc`` does);
- ``largest_mass`` / ``largest_peak``: the highest summed / peak probability;
- ``fraction F`` (``mass_fraction F``): every component of at least F times the largest's voxels (mass);
- ``peak Q``: every component whose peak probability reaches Q (the largest if none does).
Dice is counted from each component's size and overlap with the truth, so every rule costs one labelling.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
Comp = dict[str, float]


def components(prob: np.ndarray, truth: np.ndarray, t: float) -> list[Comp]:
    from scipy import ndimage

    m = prob > t
    lab, n = ndimage.label(m)
    if not n:
        return []
    idx = np.arange(1, n + 1)
    cols = (ndimage.sum(m, lab, idx), ndimage.maximum(prob, lab, idx), ndimage.sum(prob, lab, idx),
            ndimage.sum(truth, lab, idx))
    return [{"size": float(a), "peak": float(b), "mass": float(c), "tp": float(d)} for a, b, c, d in zip(*cols)]


def _largest(key: str) -> Callable[[list[Comp]], list[bool]]:
    def rule(cs: list[Comp]) -> list[bool]:
        i = int(np.argmax([c[key] for c in cs])) if cs else -1
        return [j == i for j in range(len(cs))]
    return rule


def _fraction(f: float, key: str) -> Callable[[list[Comp]], list[bool]]:
    def rule(cs: list[Comp]) -> list[bool]:
        top = max((c[key] for c in cs), default=0.0)
        return [c[key] >= f * top for c in cs]
    return rule


def _peak(q: float) -> Callable[[list[Comp]], list[bool]]:
    def rule(cs: list[Comp]) -> list[bool]:
        keep = [c["peak"] >= q for c in cs]
        return keep if any(keep) else _largest("size")(cs)
    return rule


RULES: dict[str, Callable[[list[Comp]], list[bool]]] = {
    "all": lambda cs: [True] * len(cs), "largest": _largest("size"),
    "largest_mass": _largest("mass"), "largest_peak": _largest("peak"),
    **{f"fraction {f}": _fraction(f, "size") for f in (0.05, 0.1, 0.2, 0.3, 0.5)},
    **{f"mass_fraction {f}": _fraction(f, "mass") for f in (0.05, 0.1, 0.2, 0.3, 0.5)},
    **{f"peak {q}": _peak(q) for q in (0.8, 0.9, 0.95, 0.98)},
}


def dice(cs: list[Comp], keep: list[bool], truth_voxels: float) -> float:
    pred = sum(c["size"] for c, k in zip(cs, keep) if k)
    tp = sum(c["tp"] for c, k in zip(cs, keep) if k)
    if truth_voxels == 0:
        return 1.0 if pred == 0 else 0.0
    return 2 * tp / (pred + truth_voxels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "lgg" / "results" / "lgg_component_rules.json")
    a = ap.parse_args()
    from medseg.data.prepared import PreparedDataset
    from medseg.errors import MedsegError
    from medseg.rundir import RunDir

    try:
        run = RunDir(a.run)
        ds = PreparedDataset.open(run.dataset())
        cases = []
        for k, fd in run.fold_dirs("all"):
            for cid in run.val_cases(k, ds):
                with np.load(RunDir.val_prediction(fd, cid)) as z:
                    prob = z["prob"][:, -1].astype(np.float32)  # the tumour: softmax's last channel, or the one sigmoid
                truth = np.asarray(ds.mask(ds.index(cid)))[:, 0] != 0
                cases.append({"case": cid, "fold": k, "truth": float(truth.sum()),
                              "components": components(prob, truth, a.threshold)})
    except MedsegError as e:
        raise SystemExit(f"error: {e}") from None
    folds = sorted({c["fold"] for c in cases})
    rows = []
    print(f"{'rule':20s} {'mean':>6s}  " + "  ".join(f"fold {k}" for k in folds))
    for name, rule in RULES.items():
        per = {c["case"]: dice(c["components"], rule(c["components"]), c["truth"]) for c in cases}
        per_fold = [float(np.mean([per[c["case"]] for c in cases if c["fold"] == k])) for k in folds]
        rows.append({"rule": name, "mean_over_folds": float(np.mean(per_fold)), "std": float(np.std(per_fold)),
                     "per_fold": per_fold, "per_patient": per})
        print(f"{name:20s} {np.mean(per_fold):6.3f}  " + "  ".join(f"{v:6.3f}" for v in per_fold))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"run": str(a.run), "threshold": a.threshold, "rows": rows,
                                 "components": {c["case"]: c["components"] for c in cases}}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
