"""The quality estimate's files and lines: ``quality.csv`` / ``quality.json`` beside the masks, the review line
an RTSTRUCT ROI or SEG segment carries, predict's list of cases to review, and reading them back for
evaluate and the view.

    write_quality(rows, out_dir, meta); rows = read_quality(out_dir)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medseg.errors import MedsegError
from medseg.inference.quality import QUALITY_FORMAT, SIGNALS

QUALITY_FILES = ("quality.csv", "quality.json")  # what predict --quality writes beside the masks

COLUMNS = ("case", "structure", "predicted_dice", "review", "calibrated", *SIGNALS, "volume", "volume_unit")


def write_quality(rows: Sequence[dict[str, Any]], out_dir: Any, meta: dict[str, Any]) -> list[Any]:
    """``quality.csv`` (one row per case and structure, by rising predicted Dice: the riskiest first) and
    ``quality.json`` (the same rows in case and structure order)."""
    import csv
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    with open(out_dir / "quality.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in sorted(rows, key=lambda r: (r["predicted_dice"], r["case"], r["structure"])):
            w.writerow([_fmt(r.get(c)) for c in COLUMNS])
    (out_dir / "quality.json").write_text(json.dumps({"format": QUALITY_FORMAT, **meta, "rows": list(rows)}, indent=1))
    return [out_dir / "quality.csv", out_dir / "quality.json"]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def case_rows(quality: dict[tuple[str, str], dict[str, Any]], case_id: str,
              classes: Sequence[str]) -> list[dict[str, Any] | None]:
    """A case's quality rows in the order of ``classes``: by name, or by position when the truth names its
    classes otherwise (label 1 is the model's first structure, as masks are paired)."""
    rows = [r for (c, _), r in quality.items() if c == case_id]
    by_name = {str(r["structure"]): r for r in rows}
    if all(c in by_name for c in classes):
        return [by_name[c] for c in classes]
    return [rows[j] if j < len(rows) else None for j in range(len(classes))]


def read_quality(path: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(case, structure): row}`` from a predictions folder's ``quality.json`` (empty if none)."""
    import json
    from pathlib import Path

    p = Path(path)
    p = p / "quality.json" if p.is_dir() else p
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text())
        return {(str(r["case"]), str(r["structure"])): r for r in doc["rows"]}
    except (ValueError, KeyError, TypeError) as e:
        raise MedsegError(f"not a medseg quality file ({type(e).__name__})", p) from None


def note(row: dict[str, Any]) -> str:
    """The line an RTSTRUCT ROI or SEG segment carries: the flag first, as a planning system's list shows it."""
    kind = "predicted Dice" if row.get("calibrated") else "view agreement"
    return f"{'REVIEW' if row['review'] else 'ok'}: {kind} {row['predicted_dice']:.2f} (medseg quality)"[:64]


def print_review(rows: Sequence[dict[str, Any]], below: float, console: Any, where: Any) -> None:
    """The cases flagged for review, riskiest first, at the end of ``predict``."""
    flagged = sorted((r for r in rows if r["review"]), key=lambda r: r["predicted_dice"])
    cases = {r["case"] for r in rows}
    if not flagged:
        console.print(f"[green]review[/]: none of {len(cases)} case{'s' if len(cases) != 1 else ''} flagged "
                      f"(predicted Dice >= {below:g} for every structure) -> {where}", highlight=False)
        return
    fc = list(dict.fromkeys(r["case"] for r in flagged))
    console.print(f"[yellow]review[/] {len(fc)} of {len(cases)} case{'s' if len(cases) != 1 else ''} "
                  f"(a structure's predicted Dice < {below:g}), riskiest first -> {where}", highlight=False)
    for r in flagged[:20]:
        console.print(f"  {r['case']}  {r['structure']}  predicted Dice {r['predicted_dice']:.2f}  "
                      f"(disagreement {r['disagreement']:.2f}, {r['components']} component"
                      f"{'s' if r['components'] != 1 else ''})", highlight=False)
    if len(flagged) > 20:
        console.print(f"  ... and {len(flagged) - 20} more in quality.csv", highlight=False)
