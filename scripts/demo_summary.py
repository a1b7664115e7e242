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
    t = Table(title="make demo: held-out bundled LGG patients (FLAIR abnormality)")
    for col in ("model", "patients", "Dice / patient", "IoU", "precision", "recall", "HD95 mm"):
        t.add_column(col)
    for a in args:
        name, where = a.split("=", 1)
        s = json.loads((Path(where) / "summary.json").read_text())
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
