"""``medseg train``: validate everything, then train one fold or all folds (``training.fit``, and
``training.members`` for side-by-side members).

The run directory's layout is ``medseg.rundir.RunDir``'s: training writes through it, and every later
stage reads through it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medseg.atomic import atomic_write_text
from medseg.config import dump_config, load_config
from medseg.errors import MedsegError
from medseg.rundir import RunDir
from medseg.scores import score_named
from medseg.training.fit import _rank, check_checkpoint, fit_fold
from medseg.training.members import fit_members
from medseg.training.task import check_resume, check_task, folds_of, selection_metric
from medseg.training.warm_start import warm_start_weights


def train(config_path: str | Path, fold: str | int = "0", overrides: dict[str, str] | None = None, out: str | Path | None = None,
          resume: bool = False, console: Any = None) -> dict[str, Any]:
    """Train fold ``fold`` (or ``"all"``) of ``config_path``; returns a summary {fold: scores}."""
    config_path = Path(config_path)
    cfg = load_config(config_path, overrides)
    ds, task = check_task(cfg, config_path)
    folds = folds_of(ds, fold, config_path)
    run = Path(out) if out is not None else Path("runs") / config_path.stem
    rd = RunDir(run)
    if cfg.train.init and not resume:  # a wrong path or network fails now, not after the first fold
        for k in folds:
            warm_start_weights(cfg, task, ds, k)
        if console is not None and not Path(cfg.train.init).is_dir() and any(k != "full" for k in folds):
            console.print(f"train.init: every fold starts from the same weights ({cfg.train.init}); if they were "
                          "trained on any of this dataset's patients, the validation scores are optimistic", highlight=False)
    if resume:
        check_resume(cfg, run)
        for k in folds:  # a damaged or crafted checkpoint fails now, before anything in the run is rewritten
            for last in sorted(rd.fold_dir(k).glob("**/checkpoints/last.ckpt")):
                check_checkpoint(last)
    else:
        busy = [f for f in folds if any(rd.fold_dir(f).glob("**/checkpoints/last.ckpt"))]  # members' too
        if busy:
            raise MedsegError(f"fold {busy[0]} of this run directory already has checkpoints; pass --resume to continue it "
                              "or choose another --out", run)
    created = [p for p in (run, *(rd.fold_dir(k) for k in folds)) if not p.exists()]
    try:
        return _train_folds(cfg, task, ds, folds, fold, rd, resume, console)
    except BaseException:
        if _rank() == 0:
            remove_unstarted(created)
        raise


def remove_unstarted(created: list[Path]) -> None:
    """After a failed or interrupted ``train``: the folders this call created that hold no checkpoint
    (nothing to resume) go, innermost first; a fold that reached a checkpoint stays for ``--resume``."""
    import shutil

    for p in reversed(created):
        if p.is_dir() and not any(p.rglob("last.ckpt")):
            shutil.rmtree(p, ignore_errors=True)


def _train_folds(cfg: Any, task: Any, ds: Any, folds: list[Any], fold: str | int, rd: RunDir, resume: bool,
                 console: Any) -> dict[str, Any]:
    run = rd.root
    if _rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rd.config_path, dump_config(cfg))
        atomic_write_text(rd.splits_path, json.dumps(ds.splits(), indent=1))
    results: dict[str, Any] = {}
    for k in folds:
        fold_dir = rd.fold_dir(k)
        if _rank() == 0:
            fold_dir.mkdir(parents=True, exist_ok=True)
            RunDir.mark(fold_dir, finished=False, fold=str(k))
        if cfg.train.members > 1:
            results[str(k)] = fit_members(cfg, task, ds, k, fold_dir, resume, console)
            if console is not None and results[str(k)]:
                console.print(f"fold {k}: the {cfg.train.members} members averaged: "
                              f"per-patient Dice {results[str(k)]['val_dice_mean']:.4f}", highlight=False)
        else:
            fit_fold(cfg, task, ds, k, fold_dir, resume, console)
            results[str(k)] = _best_scores(fold_dir, selection_metric(task))
        if _rank() == 0:
            RunDir.mark(fold_dir, finished=True, fold=str(k))
    if str(fold) == "all" and _rank() == 0:
        summary = _cv_summary(results, task.classes, selection_metric(task), task.score)
        atomic_write_text(rd.cv_summary_path, json.dumps(summary, indent=1))
        if console is not None:
            console.print(f"cross-validation: mean per-patient Dice {summary['mean']['val_dice_mean']:.4f} "
                          f"± {summary['std']['val_dice_mean']:.4f} over {len(folds)} folds")
            key = f"val_{task.score}_score"
            if key in summary["mean"]:
                console.print(f"cross-validation: mean {score_named(task.score).label} {summary['mean'][key]:.4f} "
                              f"± {summary['std'][key]:.4f}")
    return results

def _best_scores(fold_dir: Path, metric: str = "val_dice_mean") -> dict[str, Any]:
    """The best epoch's row of metrics.csv (by ``metric``)."""
    import csv

    p = fold_dir / "metrics.csv"
    if not p.is_file():
        return {}
    rows = [r for r in csv.DictReader(p.open()) if r.get(metric)]
    if not rows:
        return {}
    best = max(rows, key=lambda r: float(r[metric]))
    return {k: (float(v) if v not in ("", None) else None) for k, v in best.items()}

def _cv_summary(results: dict[str, Any], classes: list[str], selected_by: str = "val_dice_mean",
                score: str | None = None) -> dict[str, Any]:
    import numpy as np

    keys = [f"val_dice_{c}" for c in classes] + ["val_dice_mean"] + ([f"val_{score}_score"] if score else [])
    vals = {k: [r[k] for r in results.values() if r.get(k) is not None] for k in keys}
    return {
        "selected_by": selected_by,
        "folds": results,
        "mean": {k: float(np.mean(v)) if v else math.nan for k, v in vals.items()},
        "std": {k: float(np.std(v)) if v else math.nan for k, v in vals.items()},
    }
