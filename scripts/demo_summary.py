"""One-screen summary of `make demo`: each model's scores on the held-out bundled patients.

    .venv/bin/python scripts/demo_summary.py NAME=EVAL_DIR [NAME=EVAL_DIR ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main(args: list[str]) -> None:
    runs = [(a.split("=", 1)[0], json.loads((Path(a.split("=", 1)[1]) / "summary.json").read_text())) for a in args]
    unit = runs[0][1]["conventions"].get("distance_unit", "mm") if runs else "mm"
    # "held out": patients neither model trained on, nor chose a checkpoint on (the recipe validates once, at the end)
    t = Table(title="make demo: held-out bundled LGG patients (FLAIR abnormality)")
    for col in ("model", "patients", "Dice/patient", "IoU", "prec", "recall", f"HD95 {unit}"):
        t.add_column(col)
    for name, s in runs:
        c = s["per_class"][s["classes"][0]]
        f = lambda v, nd=3: "-" if v is None else f"{v:.{nd}f}"  # noqa: E731
        t.add_row(name, str(s["n_patients"]), f(c["dice"]["mean"]), f(c["iou"]["mean"]),
                  f(c["precision"]["mean"]), f(c["recall"]["mean"]), f(c["hd95"]["mean"], 1))
    Console().print(t)
    for a in args:
        name, where = a.split("=", 1)
        print(f"{name}: {Path(where) / 'report.html'}")


if __name__ == "__main__":
    main(sys.argv[1:])
