"""Cross-validation Dice of trained LGG runs, segmented as ``medseg predict`` segments them: the
bundle's TTA and tuned post-processing, and optionally an ensemble of runs trained on the same split.

    .venv/bin/python experiments/lgg/lgg_cv_dice.py best=runs/lgg_unet_best \\
        "best+recipe=runs/lgg_unet_best,runs/lgg_unet" --folds 0,1 [--tta | --no-tta]
    .venv/bin/python experiments/lgg/lgg_cv_dice.py "scales=runs/lgg_unet,runs/lgg_unet@96,runs/lgg_unet@160"

Each ``NAME=RUN[,RUN...]`` is one row; ``--postprocess-from TUNED_RUN`` scores every row with the
threshold and component rule ``medseg tune`` chose on TUNED_RUN, or written in a file laid out as
its ``tune.json`` (e.g. ``experiments/lgg/lgg_postprocess.json``, the rules tuned on the 5-fold recipe
run). For fold K, the row's model is fold K of each run (several: their probabilities averaged, the
first run's threshold and post-processing); ``RUN@SIZE`` is the run's model fed slices resized to
SIZE x SIZE instead of its training size (scale test-time augmentation); every run must hold out
the same patients in fold K, so that every score is on patients no member saw. The score is the LGG
headline metric: the mean over the fold's validation patients of the 3D Dice of the patient's whole
volume at its native 256 x 256 (a patient without tumour scores 1 if the prediction is empty too).
Prints a table (per fold, mean ± std over folds) and writes experiments/lgg/results/lgg_cv_dice.json with
every patient's score.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _val_ids(run: Path, fold: int) -> list[str]:
    splits = json.loads((run / "splits.json").read_text())
    return list(splits["folds"][fold]["val"])


def tuned_postprocess(where: Path) -> dict:
    """The rules ``medseg tune`` wrote into RUN/tune.json (``where`` is the run or that file), as
    ``Segmenter.predict`` overrides."""
    from medseg.errors import MedsegError
    from medseg.evaluation.tune import tuned_rules

    try:
        return tuned_rules(where)
    except MedsegError as e:
        sys.exit(str(e))


def _bundle(run: Path, fold: int, size: int | None, tmp: Path) -> Path:
    """RUN/fold_K/model.pt, or a copy of it that resizes slices to ``size`` (a scale TTA member)."""
    src = run / f"fold_{fold}" / "model.pt"
    if not src.is_file():
        trained = sorted(d.name for d in run.glob("fold_*") if (d / "model.pt").is_file())
        sys.exit(f"{src}: no such file: fold {fold} of {run} was not trained (trained: {', '.join(trained) or 'none'})")
    if size is None:
        return src
    from medseg.bundle import load_bundle, save_bundle

    b = load_bundle(src)
    if not b["input"].get("resize"):
        sys.exit(f"{src}: @{size} needs a model trained on resized slices (data.resize: true)")
    if size % b["input"]["divisor"]:
        sys.exit(f"{src}: @{size}: this network takes sizes divisible by {b['input']['divisor']}")
    b["input"]["size"] = [size] * len(b["input"]["size"])
    return save_bundle(b, tmp / f"{len(list(tmp.iterdir()))}" / "model.pt")


def parse_run(text: str) -> tuple[Path, int | None]:
    """RUN or RUN@SIZE."""
    where, at, size = text.rpartition("@") if "@" in text else (text, "", "")
    if at and not size.isdigit():
        sys.exit(f"{text!r}: expected RUN@SIZE with SIZE a number of pixels")
    return Path(where), int(size) if at else None


def out_of_fold(runs: list[Path], folds: list[int], tta: bool | None, pp: dict | None = None,
                sizes: list[int | None] | None = None, probabilities: bool = False):
    """Yield ``(fold, patient id, Prediction, truth [z, h, w] bool)`` for every validation patient of
    each fold, segmented by the (ensembled) runs' fold-K model; ``sizes`` (one per run, None: the run's
    own) feeds a run's model slices of another size."""
    from medseg.data.prepared import PreparedDataset
    from medseg.errors import MedsegError
    from medseg.inference.segmenter import Segmenter

    sizes = sizes or [None] * len(runs)
    prepared = yaml.safe_load((runs[0] / "config.yaml").read_text())["data"]["prepared"]
    ds = PreparedDataset.open(prepared)
    for k in folds:
        ids = _val_ids(runs[0], k)
        for r in runs[1:]:
            if sorted(_val_ids(r, k)) != sorted(ids):
                sys.exit(f"{r}: fold {k} holds out other patients than {runs[0]}'s fold {k}: not comparable")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                seg = Segmenter.load([_bundle(r, k, z, Path(tmp)) for r, z in zip(runs, sizes)], tta=tta)
            except MedsegError as e:  # a damaged or mismatched model.pt: its one-line message, no traceback
                sys.exit(str(e))
        for cid in ids:
            i = ds.index(cid)
            pred = seg.predict(np.asarray(ds.image(i)), probabilities=probabilities, spatial_dims=ds.spatial_dims,
                               postprocess_overrides=pp)
            yield k, cid, pred, np.asarray(ds.mask(i))[:, 0] > 0


def score_row(runs: list[Path], folds: list[int], tta: bool | None, pp: dict | None = None,
              sizes: list[int | None] | None = None) -> dict[str, dict[str, float]]:
    """Per fold, per validation patient: the 3D Dice of the (ensembled) runs' fold-K model."""
    from medseg.evaluation.metrics import case_dice

    out: dict[str, dict[str, float]] = {str(k): {} for k in folds}
    for k, cid, pred, truth in out_of_fold(runs, folds, tta, pp, sizes):
        out[str(k)][cid] = case_dice(pred.mask[:, 0] > 0, truth, empty="one")
    return out


def fold_summary(per: dict[str, dict[str, float]]) -> dict:
    """``per[fold][patient]`` scores -> each fold's mean, and their mean and std over folds."""
    fold_means = {k: float(np.mean(list(v.values()))) for k, v in per.items()}
    return {"per_fold": fold_means, "mean": float(np.mean(list(fold_means.values()))),
            "std": float(np.std(list(fold_means.values())))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", help="NAME=RUN[,RUN...], each RUN optionally RUN@SIZE")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="flip TTA on or off (default: each bundle's own setting)")
    ap.add_argument("--postprocess-from", type=Path, default=None, help="a tuned run (or its tune.json): its rules for every row")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "lgg" / "results" / "lgg_cv_dice.json"))
    args = ap.parse_args()
    folds = [int(v) for v in args.folds.split(",")]
    pp = tuned_postprocess(args.postprocess_from) if args.postprocess_from else None
    result: dict = {"folds": folds, "tta": args.tta, "postprocess": pp, "rows": {}}
    for spec in args.rows:
        name, _, where = spec.partition("=")
        pairs = [parse_run(p) for p in where.split(",") if p]
        if not name or not pairs:
            sys.exit(f"row {spec!r}: expected NAME=RUN[,RUN...]")
        runs, sizes = [r for r, _ in pairs], [z for _, z in pairs]
        for r in runs:
            if not (r / "splits.json").is_file() or not (r / "config.yaml").is_file():
                sys.exit(f"{r}: not a training run (no splits.json and config.yaml)")
        t0 = time.perf_counter()
        per = score_row(runs, folds, args.tta, pp, sizes)
        result["rows"][name] = {"runs": [str(r) + (f"@{z}" if z else "") for r, z in zip(runs, sizes)], **fold_summary(per),
                                "per_patient": per, "seconds": time.perf_counter() - t0}
    head = f"{'row':<24}" + "".join(f"{'fold ' + str(k):>9}" for k in folds) + f"{'mean ± std':>18}"
    print(head)
    for name, r in result["rows"].items():
        print(f"{name:<24}" + "".join(f"{r['per_fold'][str(k)]:>9.3f}" for k in folds)
              + f"{r['mean']:>11.3f} ± {r['std']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
