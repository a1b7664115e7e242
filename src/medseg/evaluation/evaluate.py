"""The ``evaluate`` stage: predictions vs ground truth -> metrics.csv, metrics_slices.csv (2D data),
summary.json and report.html.

    from medseg.evaluation.evaluate import evaluate
    summary = evaluate("preds/", "prepared/lgg", out="eval/")
    summary = evaluate("runs/unet")                     # a run's validation predictions

Cases are streamed one at a time (truth, prediction, metrics, forget); only the per-case rows and
the few cases shown in the report are kept. Conventions: docs/evaluation.md and ``metrics.py``.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.formats import FORMATS
from medseg.data.formats.base import MAP_FOLDERS, prediction_journal
from medseg.errors import MedsegError
from medseg.evaluation.metrics import METRICS, case_metrics, check_empty, slice_overlap, summarize
from medseg.evaluation.report import pick_cases, write_report
from medseg.evaluation.sources import open_predictions, open_truth, run_predictions
from medseg.evaluation.viewer import ViewWriter, case_image, case_metrics_row
from medseg.inference.quality_files import QUALITY_FILES
from medseg.rundir import RunDir
from medseg.scores import SCORES, score_for
from medseg.text import plural

CASE_COLUMNS = ["case_id", "patient", "class", "truth_voxels", "pred_voxels", *METRICS]
SLICE_METRICS = ("dice", "iou", "precision", "recall")
SLICE_COLUMNS = ["case_id", "patient", "slice", "class", "truth_pixels", "pred_pixels", *SLICE_METRICS]


def _num(v: Any) -> str:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.10g}"
    return str(v)


def _clean(obj: Any) -> Any:
    """NaN/inf -> None so summary.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def _default_out(pred: Path, run: bool) -> Path:
    if run:
        return pred / "evaluation"
    return pred.with_name((pred.stem if pred.is_file() else pred.name) + "_evaluation")


def task_score(truth: Any) -> Any:
    """The data set's own score (``medseg.scores``) when its data brings one, from the truth's format."""
    return score_for(truth.format, truth.classes)


def evaluate(
    pred: str | Path,
    truth: str | Path | None = None,
    *,
    out: str | Path | None = None,
    fmt: str | None = None,
    images: str | Path | None = None,
    empty: str = "skip",
    nsd_tolerance: float = 1.0,
    console: Any = None,
    report: bool = True,
    score_variant: str = "competition",
    options: dict[str, Any] | None = None,
    unfinished: bool = False,
) -> dict[str, Any]:
    """Evaluate ``pred`` against ``truth`` and write the outputs under ``out``; return the summary.
    ``score_variant`` picks the definition of the data set's own score where it has several."""

    t0 = time.perf_counter()
    check_empty(empty)
    known = sorted({v for n in SCORES.names() for v in SCORES.get(n).variants})
    if score_variant not in known:
        raise MedsegError(f"unknown score variant {score_variant!r} (known: {', '.join(known)})")
    if not (nsd_tolerance >= 0 and math.isfinite(nsd_tolerance)):
        raise MedsegError(f"--nsd-tolerance must be a finite distance >= 0 mm, got {nsd_tolerance}")
    pred = Path(pred)
    run = truth is None and RunDir.is_run(pred)
    if run:
        preds, ds_path = run_predictions(pred, unfinished)
        truth_obj = open_truth(ds_path)
    else:
        if truth is None:
            if pred.is_dir() and (pred / "config.yaml").is_file():
                raise MedsegError("run directory has no fold_K/ folders with validation predictions", pred)
            if RunDir.looks_like_run(pred):
                raise MedsegError("run directory without its config.yaml, which names the prepared data set it "
                                  "was trained on: give TRUTH (the prepared data set)", pred / "config.yaml")
            raise MedsegError("TRUTH is required unless PRED is a run directory", pred)
        truth_obj = open_truth(Path(truth), fmt, Path(images) if images else None, options)
        preds = open_predictions(pred, truth_obj)
    ids = list(truth_obj.ids)
    if preds.ids is not None:
        unknown = sorted(preds.ids - set(ids))
        if unknown:
            raise MedsegError(f"{len(unknown)} predicted cases are not in the ground truth, e.g. {unknown[0]}", preds.path)
        if preds.kind == "run":
            ids = [i for i in ids if i in preds.ids]  # validation cases only
    if not ids:
        raise MedsegError("no cases to evaluate", preds.path)
    classes = truth_obj.classes
    out_dir = Path(out) if out is not None else _default_out(pred, run)
    if out_dir.exists() and not out_dir.is_dir():
        raise MedsegError("output exists and is not a folder", out_dir)
    # everything is written to a staging folder beside OUT and moved in at the end: a failed
    # evaluation leaves no half-written CSV, and an earlier evaluation's files stay until replaced
    if out_dir.parent.is_dir():
        stage = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
        stage.mkdir()
    else:
        import tempfile

        stage = Path(tempfile.mkdtemp(prefix="medseg-evaluate-"))
    try:
        summary = _evaluate(pred, truth_obj, preds, ids, stage, empty=empty,
                            nsd_tolerance=nsd_tolerance, report=report, t0=t0, score_variant=score_variant)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in stage.iterdir():
            shutil.move(str(f), str(out_dir / f.name))  # a rename when both are on one file system
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if console is not None:
        print_summary(summary, out_dir, console)
    return _clean(summary)


def _no_truth(folder: Path, read: set[Path], names: tuple[str, ...] | None = None) -> None:
    """The prediction files of a folder (``names``, the layout's globs; else any file of a kind that was
    read) that no truth case read, probability maps and bookkeeping aside: refused as the extra cases of a
    submission or a prepared data set are, since an extra case usually means the wrong TRUTH."""
    import fnmatch

    def kind(p: Path) -> str:
        return ".nii.gz" if p.name.endswith(".nii.gz") else p.suffix

    kinds = {kind(p) for p in read}
    extra = []
    for f in sorted(Path(folder).rglob("*")):
        rel = f.relative_to(folder)
        if (not f.is_file() or f.resolve() in read or any(part.startswith(".") for part in rel.parts)
                or any(m in rel.parts for m in MAP_FOLDERS.values()) or any(f"_{m}." in f.name for m in MAP_FOLDERS)
                or rel.name in QUALITY_FILES):
            continue
        if any(fnmatch.fnmatch(f.name, g) for g in names) if names is not None else kind(f) in kinds:
            extra.append(str(rel))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise MedsegError(f"{len(extra)} prediction file{'s' if len(extra) > 1 else ''} match no ground-truth case: "
                          f"{', '.join(extra[:3])}{more} (remove them, or give the TRUTH they belong to)", folder)


def _evaluate(pred: Path, truth_obj: Any, preds: Any, ids: list[str], out_dir: Path, *, empty: str,
              nsd_tolerance: float, report: bool, t0: float, score_variant: str) -> dict[str, Any]:
    from medseg.inference.quality_files import case_rows, read_quality

    classes = truth_obj.classes
    two_d = truth_obj.spatial_dims == 2
    score = task_score(truth_obj)
    quality = read_quality(pred) if preds.kind == "folder" else {}  # predict --quality wrote it beside the masks

    rows: list[dict[str, Any]] = []
    case_score: dict[str, float] = {}
    slice_vals: dict[str, dict[str, list[np.ndarray]]] = {c: {m: [] for m in SLICE_METRICS} for c in classes}
    terms = np.zeros(4)
    seen_slices: set[str] = set()
    slice_file = out_dir / "metrics_slices.csv"
    view = ViewWriter(classes, truth_obj.spatial_dims, "mm" if truth_obj.spacing_known else "px") if report else None
    fh = open(slice_file, "w", newline="") if two_d else None
    stack = contextlib.ExitStack()
    try:
        sw = csv.writer(fh, lineterminator="\n") if fh else None
        if sw:
            sw.writerow(SLICE_COLUMNS)
        journal = stack.enter_context(prediction_journal())
        for i, case_id in enumerate(ids):
            t = truth_obj.load(case_id)
            p = preds.loader(case_id, t)
            crow = case_metrics(p, t.mask, spacing=t.spacing, tolerance=nsd_tolerance, empty=empty)
            qrows = case_rows(quality, case_id, classes)
            for k, cls in enumerate(classes):
                q = qrows[k]
                rows.append({"case_id": case_id, "patient": t.patient, "class": cls, **crow[k],
                             **({"predicted_dice": q["predicted_dice"], "review": bool(q["review"])} if q else {})})
            if view is not None:
                view.add_case(case_id, t.patient, case_image(t)[0], t.mask, p, t.spacing, case_metrics_row(crow),
                              affine=t.affine, slices=t.slices,
                              quality={c: q for c, q in zip(classes, qrows) if q is not None} or None)
            dices = [r["dice"] for r in crow if math.isfinite(r["dice"])]
            if dices:
                case_score[case_id] = float(np.mean(dices))
            if two_d:
                so = slice_overlap(p, t.mask, empty=empty)
                names = t.slices or [str(z + 1) for z in range(p.shape[0])]  # counted from 1, as the view does
                for k, cls in enumerate(classes):
                    for m in SLICE_METRICS:
                        slice_vals[cls][m].append(so[m][:, k])
                for z, name in enumerate(names):
                    for k, cls in enumerate(classes):
                        sw.writerow([case_id, t.patient, name, cls, int(so["truth_pixels"][z, k]),
                                     int(so["pred_pixels"][z, k]), *(_num(float(so[m][z, k])) for m in SLICE_METRICS)])
            if preds.table is not None:  # every id of a one-file submission must be a truth slice
                seen_slices.update(t.slices or [])
            if score is not None:
                terms += score.case_terms(p, t.mask, score_variant)
    finally:
        stack.close()
        if fh:
            fh.close()
    if preds.kind == "folder":
        fmt = getattr(truth_obj, "format", None)
        _no_truth(preds.path, journal, FORMATS.get(fmt).prediction_files if fmt in FORMATS else None)
    if preds.table is not None:
        extra = sorted(preds.table.slice_ids - seen_slices)
        if extra:
            raise MedsegError(f"{len(extra)} ids of the submission are not in the ground truth, e.g. {extra[0]}",
                              preds.path)

    columns = CASE_COLUMNS + (["predicted_dice", "review"] if quality else [])
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else str(r[c]).lower() if isinstance(r[c], bool) else _num(r[c])
                        for c in columns])

    summary = build_summary(rows, classes, empty=empty, nsd_tolerance=nsd_tolerance,
                            spacing_known=truth_obj.spacing_known)
    summary.update(pred=str(pred), truth=str(truth_obj.path), kind=preds.kind, spatial_dims=truth_obj.spatial_dims,
                   class_kind=truth_obj.class_kind)
    if preds.rules:
        summary["decision"] = preds.rules
    if quality:
        summary["quality"] = quality_summary(rows, classes)
    if two_d:
        summary["slices"] = {
            cls: {m: summarize(np.concatenate(v) if v else []) for m, v in slice_vals[cls].items()}
            for cls in classes
        }
    if score is not None:
        summary["task_score"] = score.name
        summary[score.name] = {**score.result(terms), "label": score.label, "variant": score_variant,
                               "definition": score.definition(score_variant)}
    summary["seconds_metrics"] = time.perf_counter() - t0
    files = {"metrics": "metrics.csv", "summary": "summary.json"}
    if two_d:
        files["slices"] = "metrics_slices.csv"
    if report:
        shown = []
        for label, cid in pick_cases(case_score):
            t = truth_obj.load(cid)
            shown.append((label, cid, case_score[cid], t.image(), t.mask, preds.loader(cid, t)))
        write_report(out_dir / "report.html", summary, rows, classes, shown, curves=preds.curves)
        files["report"] = "report.html"
        view.write(out_dir / "view.html", f"medseg view: {pred.name} vs {truth_obj.path.name}")
        files["view"] = "view.html"
    summary["files"] = files
    summary["seconds"] = time.perf_counter() - t0
    (out_dir / "summary.json").write_text(json.dumps(_clean(summary), indent=1, allow_nan=False))
    return summary


def quality_summary(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """The quality estimate against the real Dice, per structure: Spearman correlation and the review curve
    (failures: real Dice < the review threshold 0.7; a case with neither truth nor prediction scores 1)."""
    from medseg.inference.quality import REVIEW_BELOW, review_curve, spearman

    out: dict[str, Any] = {}
    for cls in classes:
        rs = [r for r in rows if r["class"] == cls and r.get("predicted_dice") is not None]
        real = [1.0 if r["truth_voxels"] == 0 and r["pred_voxels"] == 0 else float(r["dice"]) for r in rs]
        real_ok = [(r, d) for r, d in zip(rs, real) if math.isfinite(d)]
        pred = [float(r["predicted_dice"]) for r, _ in real_ok]
        dice = [d for _, d in real_ok]
        order = sorted(range(len(real_ok)), key=lambda i: pred[i])
        out[cls] = {"cases": len(real_ok), "spearman": spearman(pred, dice),
                    "flagged": sum(bool(r["review"]) for r, _ in real_ok),
                    "flagged_failures": sum(bool(r["review"]) and d < REVIEW_BELOW for r, d in real_ok),
                    "review": review_curve(pred, dice, REVIEW_BELOW),
                    # riskiest first: what a reviewer opens, with what it really scored
                    "by_risk": [{"case": real_ok[i][0]["case_id"], "predicted_dice": pred[i], "dice": dice[i],
                                 "review": bool(real_ok[i][0]["review"])} for i in order]}
    return out


def build_summary(rows: list[dict[str, Any]], classes: list[str], *, empty: str, nsd_tolerance: float,
                  spacing_known: bool = True) -> dict[str, Any]:
    """Per class: case-level and patient-level (mean over a patient's cases) statistics. Without a known
    voxel spacing (TIFF/PNG layouts) distances are in pixels (slices 1 apart) and say so."""
    unit = "mm" if spacing_known else "px"
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_class[r["class"]].append(r)
    per_class: dict[str, Any] = {}
    per_patient: dict[str, Any] = {}
    patients: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    headline: dict[str, float | None] = {}
    for cls in classes:
        rs = by_class[cls]
        per_class[cls] = {m: summarize([r[m] for r in rs]) for m in METRICS}
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rs:
            groups[r["patient"]].append(r)
        pmeans = {}
        one = []
        for pat, prs in groups.items():
            pmeans[pat] = {m: _nanmean([r[m] for r in prs]) for m in METRICS}
            # LGG headline: a case with no tumour scores 1 if the prediction is empty too, else 0
            one.append(float(np.mean([1.0 if r["truth_voxels"] == 0 and r["pred_voxels"] == 0 else r["dice"]
                                      for r in prs])))
            patients[pat][cls] = pmeans[pat]
        per_patient[cls] = {m: summarize([v[m] for v in pmeans.values()]) for m in METRICS}
        headline[cls] = float(np.mean(one)) if one else None

    def over_classes(metric: str, table: dict[str, Any]) -> float | None:
        vals = [table[c][metric]["mean"] for c in classes if table[c][metric]["mean"] is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "n_cases": len({r["case_id"] for r in rows}),
        "n_patients": len(patients),
        "classes": classes,
        "conventions": {
            "empty": empty,
            "both_empty": {"skip": "NaN, left out of means", "one": "perfect score (1, distances 0)",
                           "zero": "failure (0, distances = volume diagonal)"}[empty],
            "one_side_empty": f"Dice/IoU/NSD 0, HD/HD95/ASSD = the volume diagonal in {unit}",
            "nsd_tolerance": nsd_tolerance,
            "distance_unit": unit,
            "distances": ("mm, using each case's voxel spacing (z, y, x); MONAI definitions" if spacing_known else
                          "px: the data set stores no voxel spacing, so distances count pixels (slices 1 apart); "
                          "MONAI definitions"),
            "patient_level": "mean over the patient's cases, then statistics over patients",
        },
        "dataset": {
            "mean_dice": over_classes("dice", per_class),
            "miou": over_classes("iou", per_class),
            "mean_precision": over_classes("precision", per_class),
            "mean_recall": over_classes("recall", per_class),
            "mean_hd95": over_classes("hd95", per_class),
            "mean_assd": over_classes("assd", per_class),
            "mean_nsd": over_classes("nsd", per_class),
            "patient_mean_dice": over_classes("dice", per_patient),
        },
        "per_class": per_class,
        "per_patient": per_patient,
        "patient_dice_empty_one": headline,
        "patients": dict(patients),
    }


def _nanmean(vals: list[float]) -> float:
    a = np.asarray(vals, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def print_summary(summary: dict[str, Any], out_dir: Path, console: Any) -> None:
    from rich.table import Table

    def f(v: float | None, nd: int = 3) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    unit = summary["conventions"].get("distance_unit", "mm")
    from rich import box

    # no inner borders and compact cells: the table fits an 80-column terminal without wrapping
    t = Table(title=f"{plural(summary['n_cases'], 'case')}, {plural(summary['n_patients'], 'patient')} "
                    f"(empty={summary['conventions']['empty']})", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("class", "Dice", "IoU", "prec", "recall", f"HD95 {unit}", f"ASSD {unit}", "NSD"):
        t.add_column(col, overflow="fold")

    def mean_std(st: dict[str, Any]) -> str:  # no "± 0.000" from a single case
        return f(st["mean"]) if (st.get("n") or 0) < 2 else f"{f(st['mean'])}±{f(st['std'])}"

    for cls in summary["classes"]:
        pc = summary["per_class"][cls]
        t.add_row(cls, *(mean_std(pc[m]) for m in ("dice", "iou")),
                  f(pc["precision"]["mean"]), f(pc["recall"]["mean"]), f(pc["hd95"]["mean"], 2),
                  f(pc["assd"]["mean"], 2), f(pc["nsd"]["mean"]))
    console.print(t)
    d = summary["dataset"]
    line = f"mean Dice {f(d['mean_dice'])}, mIoU {f(d['miou'])}, patient-level Dice {f(d['patient_mean_dice'])}"
    if summary.get("task_score"):
        u = summary[summary["task_score"]]
        line += (f"; {u['label']} {u['score']:.4f} (Dice {u['dice']:.4f}, HD {u['hd']:.4f}"
                 f"{'' if u.get('variant') in (None, 'competition') else ', ' + u['variant']})")
    console.print(line, highlight=False)
    if summary.get("decision"):
        console.print(f"masks: {summary['decision']}", highlight=False)
    for cls, q in (summary.get("quality") or {}).items():
        rv = q["review"]
        worst = ", ".join(f"{r['case']} {r['predicted_dice']:.2f}/{r['dice']:.2f}{' (review)' if r['review'] else ''}"
                          for r in q["by_risk"][:5])
        console.print(f"riskiest {cls} (predicted/real Dice): {worst}", highlight=False)
        caught = "" if rv["caught_at_20"] is None else f", {100 * rv['caught_at_20']:.0f}% of them in the riskiest 20%"
        console.print(f"quality estimate, {cls}: Spearman {f(q['spearman'], 2)} with the real Dice over {q['cases']} cases; "
                      f"{q['flagged']} flagged, {q['flagged_failures']} of them failures; {rv['failures']} failures "
                      f"(Dice < {rv['below']:g}){caught}", highlight=False)
    console.print(f"[green]wrote[/] {', '.join(summary['files'].values())} in {summary['seconds']:.1f} s -> {out_dir}")
