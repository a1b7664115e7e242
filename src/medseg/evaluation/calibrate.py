"""``medseg calibrate RUN``: fit the quality estimate (``medseg.inference.quality``) on a run's
out-of-fold predictions and store it in the bundles.

Each fold's model re-predicts its own validation cases (TTA and member views, as ``predict --quality``
does), with the signals measured against that fold's training cases only; the real Dice of each case
and structure is the target. The figures reported (``RUN/calibration.json``) are nested: each fold's
cases are scored by a calibration fitted on the other folds alone. The calibration written is then
fitted on every fold.

``--into BUNDLE`` calibrates another bundle trained the same way (e.g. a model trained on every case,
or a shipped one): the run's folds are decided with that bundle's post-processing and TTA, and when
the bundle records its training patients (``meta.training_patients``) only those patients' cases are
used, so that patients it never saw stay free for measuring it.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.text import portable

FIELDS = ("fold", "case", "patient", "structure", "dice", "agreement", "nested_predicted_dice")


def _reference(ds: Any, ids: Sequence[str], has_spacing: bool) -> dict[str, Any]:
    from medseg.inference.quality import build_reference

    items = []
    for cid in ids:
        i = ds.index(cid)
        items.append((np.asarray(ds.image(i)), np.asarray(ds.mask(i)), ds.case(i).spacing if has_spacing else None))
    return build_reference(items, ds.classes)


def _target_bundle(into: str | Path) -> tuple[Path, dict[str, Any]]:
    from medseg.bundle import load_bundle, resolve_model

    _, files = resolve_model(into, "all", unfinished=False)
    if len(files) != 1 or files[0].suffix != ".pt":
        raise MedsegError("--into takes one model.pt bundle or a shipped model name", into)
    return files[0], load_bundle(files[0])


def _patient_of(cid: str, ds: Any) -> str:
    return ds.case(ds.index(cid)).patient


def calibrate(
    run: str | Path,
    *,
    folds: str | Sequence[int] = "all",
    data: str | Path | None = None,
    into: str | Path | None = None,
    review_below: float = 0.7,
    alpha: float = 1.0,
    write: bool = True,
    device: str = "auto",
    console: Any = None,
) -> dict[str, Any]:
    """Fit the quality calibration on ``run``'s validation folds; write it into every fold's ``model.pt``
    (or into ``into``) and ``RUN/calibration.json``; return that file's content."""
    from medseg.bundle import set_bundle_field
    from medseg.data.formats import FORMATS
    from medseg.data.prepared import PreparedDataset
    from medseg.inference.postprocess import check_probability
    from medseg.inference.quality import (QUALITY_FORMAT, Calibration, dice, ensure_views, predict_quality,
                                          review_curve, spearman)
    from medseg.inference.segmenter import Segmenter
    from medseg.machine import resolve_device
    from medseg.rundir import RunDir

    check_probability(review_below, "--review-below")
    run = Path(run)
    if not run.is_dir():
        raise MedsegError("run directory not found", run)
    rd = RunDir(run)
    fold_dirs = rd.fold_dirs(folds)
    RunDir.check_finished([d / "model.pt" for _, d in fold_dirs])
    ds_path = rd.dataset(data)
    if not ds_path.exists():
        raise MedsegError("prepared dataset of the run not found (pass --data PREPARED)", ds_path)
    ds = PreparedDataset.open(ds_path)
    if any(c.mask is None for c in ds.cases):
        raise MedsegError("calibration needs every case's mask: the prepared dataset has cases without", ds_path)
    fmt = ds.info.get("source_format")
    has_spacing = bool(FORMATS.get(fmt).has_spacing) if fmt in FORMATS else True
    target_path, target = _target_bundle(into) if into is not None else (None, None)
    keep_patients = set((target or {}).get("meta", {}).get("training_patients") or [])
    overrides = dict(target["postprocess"]) if target is not None and target.get("postprocess") else None
    tta = bool((target.get("tta") or {}).get("enabled")) if target is not None else None
    if target is not None and list(target["classes"]) != ds.classes:
        raise MedsegError(f"the bundle's classes {target['classes']} are not the run's {ds.classes}", target_path)
    dev = resolve_device(device)
    rows: list[dict[str, Any]] = []
    splits = rd.splits() or ds.splits()
    for fk, fd in fold_dirs:
        train_ids = list(splits["folds"][fk]["train"])
        val_ids = rd.split_val_cases(fk, ds)
        ref = _reference(ds, train_ids, has_spacing)
        seg = Segmenter.load(fd / "model.pt", tta=tta, device=dev)
        ensure_views(seg)  # as predict --quality will
        seg.spec.quality = {"reference": ref}  # measured against this fold's training cases, uncalibrated
        for cid in val_ids:
            i = ds.index(cid)
            truth = np.asarray(ds.mask(i))
            pred, qrows, _ = predict_quality(seg, np.asarray(ds.image(i)), ds.spatial_dims, overrides,
                                             spacing=ds.case(i).spacing if has_spacing else None)
            for j, q in enumerate(qrows):
                rows.append({"fold": fk, "case": cid, "patient": ds.case(i).patient, **q,
                             "dice": dice(pred.mask[:, j], truth[:, j]), "agreement": 1.0 - q["disagreement"]})
        if console is not None:
            console.print(f"  fold {fk}: {len(val_ids)} validation cases re-predicted", highlight=False)
    fit_rows = [r for r in rows if not keep_patients or r["patient"] in keep_patients]
    if not fit_rows:
        raise MedsegError("none of the run's validation patients is among the bundle's training patients", target_path)
    # nested: each fold's cases predicted by a calibration fitted on the other folds' cases
    for fk, _ in fold_dirs:
        others = [r for r in fit_rows if r["fold"] != fk]
        cal_k = Calibration.fit(others, [r["dice"] for r in others], alpha) if len(others) >= 3 else None
        for r in rows:
            if r["fold"] == fk:
                r["nested_predicted_dice"] = cal_k.predict(r) if cal_k else None
    scored = [r for r in fit_rows if r.get("nested_predicted_dice") is not None]
    per_structure = {}
    for c in ds.classes:
        rs = [r for r in scored if r["structure"] == c]
        real = [r["dice"] for r in rs]
        per_structure[c] = {
            "cases": len(rs), "mean_dice": float(np.mean(real)) if rs else None,
            "spearman": spearman([r["nested_predicted_dice"] for r in rs], real),
            "spearman_agreement_only": spearman([r["agreement"] for r in rs], real),
            "mean_abs_error": float(np.mean([abs(r["nested_predicted_dice"] - r["dice"]) for r in rs])) if rs else None,
            "review": review_curve([r["nested_predicted_dice"] for r in rs], real, review_below)}
    review_all = review_curve([r["nested_predicted_dice"] for r in scored], [r["dice"] for r in scored], review_below)
    cal = Calibration.fit(fit_rows, [r["dice"] for r in fit_rows], alpha)
    if target is not None:
        ids = [c.id for c in ds.cases if not keep_patients or c.patient in keep_patients]
        reference = _reference(ds, ids, has_spacing)
    else:
        reference = _reference(ds, [c.id for c in ds.cases], has_spacing)
    block = {"format": QUALITY_FORMAT, "reference": reference, "calibration": cal.to_dict(),
             "review_below": review_below,
             "fitted_on": {"run": run.name, "folds": [fk for fk, _ in fold_dirs], "cases": len({r["case"] for r in fit_rows}),
                           "postprocess": overrides, "tta": tta},
             "nested": {"per_structure": per_structure, "review": review_all}}
    result = {"run": portable(run), "dataset": portable(ds_path), "into": portable(target_path) if target_path else None,
              **{k: block[k] for k in ("fitted_on", "nested", "review_below", "calibration")}, "written": False}
    if write:
        for path in ([target_path] if target_path is not None else [d / "model.pt" for _, d in fold_dirs]
                     + ([rd.fold_dir("full") / "model.pt"] if (rd.fold_dir("full") / "model.pt").is_file() else [])):
            set_bundle_field(path, "quality", block)
        result["written"] = True
    from medseg.atomic import atomic_write_text

    atomic_write_text(run / "calibration.json", json.dumps(result, indent=1))
    with open(run / "calibration_cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = [*FIELDS, "disagreement", "entropy", "volume", "volume_z", "components", "intensity_z", "used_for_fit"]
        w.writerow(cols)
        for r in rows:
            w.writerow([("" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r.get(c), float) else r[c]))
                        for c in cols[:-1]] + [str(not keep_patients or r["patient"] in keep_patients).lower()])
    if console is not None:
        print_calibration(result, console)
    return result


def print_calibration(result: dict[str, Any], console: Any) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title=f"quality estimate, each fold scored by a fit on the others ({result['fitted_on']['cases']} cases)",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("structure", "cases", "Dice", "Spearman", "agreement", "|error|", "failures", "@10%", "@20%", "@30%"):
        t.add_column(col)

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    for c, s in result["nested"]["per_structure"].items():
        rv = s["review"]
        t.add_row(c, str(s["cases"]), f(s["mean_dice"]), f(s["spearman"]), f(s["spearman_agreement_only"]),
                  f(s["mean_abs_error"]), str(rv["failures"]), f(rv["caught_at_10"]), f(rv["caught_at_20"]),
                  f(rv["caught_at_30"]))
    console.print(t)
    console.print(f"Spearman: predicted against real Dice (agreement: the views' agreement alone); @N%: the share "
                  f"of failures (real Dice < {result['review_below']:g}) among the N% riskiest cases. "
                  f"{'Written into ' + (result['into'] or 'every fold') if result['written'] else 'Not written'}.",
                  highlight=False)
