"""``report.html``: one self-contained page (figures embedded as base64 PNG, a few lines of inline JS
to sort the per-case table, no network) with the summary per class, the per-case table, Dice and
HD95 box plots per class, best/median/worst cases as contour overlays and, for a run, the training
curves. Sections carry stable ids (summary, plots, examples, cases, curves, conventions) that the
tests look for."""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from medseg.evaluation.metrics import METRICS
from medseg.text import plural

_LABELS = {"dice": "Dice", "iou": "IoU", "precision": "Precision", "recall": "Recall", "hd": "HD (max) mm",
           "hd95": "HD95 mm", "assd": "ASSD mm", "nsd": "NSD"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:1.6em;margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
#cases th{cursor:pointer;user-select:none} #cases th:hover{background:#e6eefc}
.scroll{max-height:520px;overflow:auto;border:1px solid #eee;display:inline-block}
.meta{color:#666;font-size:13px} img{max-width:100%} .example{margin:8px 0 20px}
.kpi{display:inline-block;margin:4px 18px 4px 0;font-size:15px} .kpi b{font-size:20px}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var b=t.tBodies[0],rows=Array.from(b.rows),asc=th.dataset.dir!=='asc';
    t.querySelectorAll('th').forEach(function(h){h.dataset.dir='';h.textContent=h.textContent.replace(/ [▲▼]$/,'')});
    th.dataset.dir=asc?'asc':'desc';th.textContent+=asc?' ▲':' ▼';
    rows.sort(function(x,y){var a=x.cells[i].textContent,c=y.cells[i].textContent,
      na=parseFloat(a),nc=parseFloat(c);
      if(isNaN(na)&&isNaN(nc))return asc?a.localeCompare(c):c.localeCompare(a);
      if(isNaN(na))return 1; if(isNaN(nc))return -1; return asc?na-nc:nc-na;});
    rows.forEach(function(r){b.appendChild(r)});});});});
"""


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return html.escape(str(v))


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colours(n: int) -> list[tuple[float, float, float]]:
    """The view's palette (one colour per class, the same in report.html and view.html)."""
    from medseg.evaluation.viewer import COLOURS

    return [tuple(int(h[i:i + 2], 16) / 255 for i in (1, 3, 5)) for h in (COLOURS[j % len(COLOURS)] for j in range(n))]


def pick_cases(case_score: dict[str, float]) -> list[tuple[str, str]]:
    """(label, case id) for the best, median and worst case by mean Dice over classes (distinct ids)."""
    if not case_score:
        return []
    order = sorted(case_score, key=lambda c: (case_score[c], c))
    picks = [("best", order[-1]), ("median", order[len(order) // 2]), ("worst", order[0])]
    out, seen = [], set()
    for label, cid in picks:
        if cid not in seen:
            seen.add(cid)
            out.append((label, cid))
    return out


def _box_plots(rows: list[dict[str, Any]], classes: list[str], labels: dict[str, str] = _LABELS) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    cols = _colours(len(classes))
    for ax, metric in zip(axes, ("dice", "hd95")):
        data = []
        for cls in classes:
            v = np.array([r[metric] for r in rows if r["class"] == cls], dtype=float)
            data.append(v[np.isfinite(v)])
        pos = [i + 1 for i, d in enumerate(data) if d.size]
        vals = [d for d in data if d.size]
        if vals:
            bp = ax.boxplot(vals, positions=pos, widths=0.55, patch_artist=True, showmeans=True)
            for patch, i in zip(bp["boxes"], pos):
                patch.set_facecolor((*cols[i - 1], 0.45))
            rng = np.random.default_rng(0)
            for p, d in zip(pos, vals):
                ax.scatter(p + rng.uniform(-0.15, 0.15, d.size), d, s=8, color="k", alpha=0.5, zorder=3)
        ax.set_xticks(range(1, len(classes) + 1), classes, rotation=20 if len(classes) > 3 else 0)
        ax.set_title(f"{labels[metric]} per case")
        ax.grid(axis="y", alpha=0.3)
        if metric == "dice":
            ax.set_ylim(-0.03, 1.03)
        elif vals and max(float(v.max()) for v in vals) > 20 * max(float(np.median(np.concatenate(vals))), 1.0):
            ax.set_yscale("symlog", linthresh=1.0)  # a few missed cases (diagonal distance) would flatten the rest
            ax.set_ylim(bottom=0)
            ax.set_title(f"{labels[metric]} per case (symlog)")
    fig.tight_layout()
    return _png(fig)


def _display(image: np.ndarray) -> np.ndarray:
    """One channel of ``image[c, h, w]`` scaled to [0, 1] by its 1st/99th percentiles."""
    c = image.shape[0]
    a = np.asarray(image[c // 2], dtype=np.float32)  # middle channel: FLAIR for LGG
    lo, hi = np.percentile(a, (1, 99)) if a.size else (0, 1)
    return np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def _overlay(label: str, case_id: str, score: float, image: np.ndarray, truth: np.ndarray, pred: np.ndarray,
             classes: list[str]) -> tuple[str, int]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    area = (np.asarray(truth) > 0).sum(axis=(1, 2, 3)) + (np.asarray(pred) > 0).sum(axis=(1, 2, 3))
    z = int(np.argmax(area))
    bg = _display(np.asarray(image[z]))
    cols = _colours(len(classes))
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    for ax, title, m in zip(axes, ("image", "truth", "prediction"), (None, truth, pred)):
        ax.imshow(bg, cmap="gray", interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
        if m is None:
            continue
        for k in range(len(classes)):
            sl = np.asarray(m[z, k]) > 0
            if sl.any():
                ax.contour(sl.astype(np.float32), levels=[0.5], colors=[cols[k]], linewidths=1.4)
    handles = [Line2D([0], [0], color=cols[k], lw=2, label=c) for k, c in enumerate(classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(classes), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _png(fig), z


def _curves(curves: dict[str, Path]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for fold, path in sorted(curves.items()):
        try:
            with open(path, newline="") as f:
                data = list(csv.DictReader(f))
        except OSError:
            continue
        if not data or "epoch" not in data[0]:
            continue

        def col(name: str) -> np.ndarray:
            return np.array([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in data])

        from matplotlib.ticker import MaxNLocator

        ep = col("epoch")
        style = {"marker": "o", "markersize": 3} if len(ep) <= 30 else {}
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        for name in ("train_loss", "val_loss"):
            if name in data[0]:
                v = col(name)
                ok = np.isfinite(v)  # validation runs every val_every epochs only
                axes[0].plot(ep[ok], v[ok], label=name, **style)
        axes[0].set_title(f"{fold}: loss")
        per_class = [n for n in data[0] if n.startswith("val_dice_") and n != "val_dice_mean"]
        # the mean over classes only adds a line when there are several classes
        for name in per_class + (["val_dice_mean"] if "val_dice_mean" in data[0] and len(per_class) != 1 else []):
            v = col(name)
            ok = np.isfinite(v)
            axes[1].plot(ep[ok], v[ok], label=name[len("val_dice_"):], **style)
        axes[1].set_title(f"{fold}: validation Dice")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        out.append((fold, _png(fig)))
    return out


def write_report(path: Path, summary: dict[str, Any], rows: list[dict[str, Any]], classes: list[str],
                 shown: list[tuple[str, str, float, np.ndarray, np.ndarray, np.ndarray]],
                 curves: dict[str, Path] | None = None) -> Path:
    """Write the report; ``shown`` holds (label, case id, mean Dice, image, truth, pred) per example."""
    e = html.escape
    unit = summary.get("conventions", {}).get("distance_unit", "mm")
    labels = {k: v.replace(" mm", f" {unit}") for k, v in _LABELS.items()}
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>medseg evaluation</title>",
             f"<style>{_CSS}</style></head><body>",
             "<h1>medseg evaluation</h1>",
             f"<p class='meta'>predictions: {e(str(summary.get('pred', '')))}<br>truth: {e(str(summary.get('truth', '')))}"
             f"<br>{plural(summary['n_cases'], 'case')}, {plural(summary['n_patients'], 'patient')}, classes: {e(', '.join(classes))}</p>"]
    d = summary["dataset"]
    parts.append("<section id='summary'><h2>Summary</h2><div>")
    kpis = [("mean Dice", d["mean_dice"]), ("mIoU", d["miou"]), ("patient-level Dice", d["patient_mean_dice"]),
            (f"mean HD95 ({unit})", d["mean_hd95"]), ("mean NSD", d["mean_nsd"])]
    if summary.get("task_score"):
        own = summary[summary["task_score"]]
        kpis.insert(0, (own["label"], own["score"]))
    parts += [f"<span class='kpi'>{e(k)}: <b>{_fmt(v, 4)}</b></span>" for k, v in kpis]
    parts.append(f"</div><p class='meta'>per case (3D, distances in {unit}), statistics over cases</p>"
                 "<table id='summary-table'><thead><tr><th>class</th>")
    parts += [f"<th>{labels[m]}<br><small>mean ± std (median)</small></th>" for m in METRICS]
    parts.append("<th>n</th></tr></thead><tbody>")
    for cls in classes:
        pc = summary["per_class"][cls]
        parts.append(f"<tr><td>{e(cls)}</td>")
        for m in METRICS:
            s = pc[m]
            nd = 2 if m in ("hd", "hd95", "assd") else 3
            parts.append(f"<td>{_fmt(s['mean'], nd)} ± {_fmt(s['std'], nd)} ({_fmt(s['median'], nd)})</td>")
        parts.append(f"<td>{pc['dice']['n']}</td></tr>")
    parts.append("</tbody></table>")
    if summary["n_patients"] < summary["n_cases"]:
        parts.append(f"<h3>Per patient</h3><p class='meta'>each patient's mean over its cases, then statistics over "
                     f"the {summary['n_patients']} patients</p><table id='patient-table'><thead><tr><th>class</th>")
        parts += [f"<th>{labels[m]}<br><small>mean ± std (median)</small></th>" for m in METRICS]
        parts.append("<th>n</th></tr></thead><tbody>")
        for cls in classes:
            pp = summary["per_patient"][cls]
            parts.append(f"<tr><td>{e(cls)}</td>")
            for m in METRICS:
                nd = 2 if m in ("hd", "hd95", "assd") else 3
                parts.append(f"<td>{_fmt(pp[m]['mean'], nd)} ± {_fmt(pp[m]['std'], nd)} ({_fmt(pp[m]['median'], nd)})</td>")
            parts.append(f"<td>{pp['dice']['n']}</td></tr>")
        parts.append("</tbody></table>")
    if "slices" in summary:
        sl = summary["slices"]
        parts.append("<p class='meta'>per slice (mean over scored slices): " + "; ".join(
            f"{e(c)}: Dice {_fmt(sl[c]['dice']['mean'])}, IoU {_fmt(sl[c]['iou']['mean'])}, precision "
            f"{_fmt(sl[c]['precision']['mean'])}, recall {_fmt(sl[c]['recall']['mean'])} (n={sl[c]['dice']['n']})"
            for c in classes) + " — every slice in metrics_slices.csv</p>")
    parts.append("</section>")

    parts.append(f"<section id='plots'><h2>Dice and HD95 per class</h2><img alt='box plots' src='{_box_plots(rows, classes, labels)}'></section>")

    parts.append("<section id='examples'><h2>Best, median and worst cases</h2>")
    if not shown:
        parts.append("<p>No case has a defined Dice (every class empty on both sides).</p>")
    for label, cid, score, image, truth, pred in shown:
        src, z = _overlay(label, cid, score, image, truth, pred, classes)
        parts.append(f"<div class='example' data-case='{e(cid)}'><h3>{e(label)}: {e(cid)}</h3>"
                     f"<p class='meta'>mean Dice over classes {score:.3f}; slice {z + 1} of {len(truth)}, counted from 1 (the one with the most "
                     "foreground in truth and prediction); contours: one colour per class</p>"
                     f"<img alt='{e(label)} case overlay' src='{src}'></div>")
    parts.append("</section>")

    if curves:
        figs = _curves(curves)
        if figs:
            parts.append("<section id='curves'><h2>Training curves</h2>")
            parts += [f"<img alt='{e(f)} training curves' src='{src}'>" for f, src in figs]
            parts.append("</section>")

    parts.append("<section id='cases'><h2>Per case</h2><p class='meta'>click a column header to sort</p>"
                 "<div class='scroll'><table class='sortable' id='cases-table'><thead><tr>"
                 "<th>case</th><th>patient</th><th>class</th><th>truth voxels</th><th>pred voxels</th>")
    parts += [f"<th>{labels[m]}</th>" for m in METRICS]
    parts.append("</tr></thead><tbody>")
    for r in rows:
        parts.append(f"<tr><td>{e(r['case_id'])}</td><td>{e(r['patient'])}</td><td>{e(r['class'])}</td>"
                     f"<td>{r['truth_voxels']}</td><td>{r['pred_voxels']}</td>"
                     + "".join(f"<td>{_fmt(r[m], 2 if m in ('hd', 'hd95', 'assd') else 3)}</td>" for m in METRICS)
                     + "</tr>")
    parts.append("</tbody></table></div></section>")

    c = summary["conventions"]
    parts.append("<section id='conventions'><h2>Conventions</h2><ul>"
                 f"<li>empty-mask option: <b>{e(c['empty'])}</b> — a class absent from both prediction and truth: {e(c['both_empty'])}</li>"
                 f"<li>a class present on one side only: {e(c['one_side_empty'])}</li>"
                 f"<li>distances: {e(c['distances'])}; NSD tolerance {c['nsd_tolerance']} {e(c.get('distance_unit', 'mm'))}</li>"
                 f"<li>patient level: {e(c['patient_level'])}</li></ul></section>")
    parts.append(f"<script>{_JS}</script></body></html>")
    path = Path(path)
    path.write_text("".join(parts), encoding="utf-8")
    return path
