"""The table of docs/quality.md from experiments/quality/results/*.json (run.sh writes them).

    .venv/bin/python experiments/quality/table.py
"""
from __future__ import annotations

import json
from pathlib import Path

R = Path(__file__).resolve().parent / "results"
ROWS = [  # file, data set, model and decision rules, how the calibration was fitted
    ("lgg_loio.json", "LGG, 56 patients", "5 leave-one-hospital-out folds (15 min, 2 members, flip TTA), the run's rules",
     "on the other hospitals"),
    ("lgg_unet_shipped.json", "LGG, the 50 patients `lgg-unet` trained on", "the same folds, `lgg-unet`'s rules (threshold 0.3, largest component)",
     "on the other hospitals"),
    ("hippo.json", "MSD hippocampus, 200 cases", "3 folds, 3D U-Net, 8 min, flip views", "on the other folds"),
    ("coco.json", "brain-tumour COCO, 500 images", "3 folds, 2D U-Net, 6 min, flip views", "on the other folds"),
]


def f(v: float | None, pct: bool = False) -> str:
    return "-" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.2f}")


def main() -> None:
    print("| data set | model, decision | structure | cases | mean Dice | failures | Spearman (views' agreement alone) "
          "| \\|error\\| | @10% | @20% | @30% |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, ds, model, _ in ROWS:
        p = R / name
        if not p.is_file():
            continue
        d = json.loads(p.read_text())
        for s, q in d["nested"]["per_structure"].items():
            rv = q["review"]
            print(f"| {ds} | {model} | {s} | {q['cases']} | {f(q['mean_dice'])} | {rv['failures']} | "
                  f"{f(q['spearman'])} ({f(q['spearman_agreement_only'])}) | {f(q['mean_abs_error'])} | "
                  f"{f(rv['caught_at_10'], True)} | {f(rv['caught_at_20'], True)} | {f(rv['caught_at_30'], True)} |")
    six = R / "lgg_unet_six_summary.json"
    if six.is_file():
        q = json.loads(six.read_text())["quality"]["tumor"]
        rv = q["review"]
        print(f"| LGG, the 6 bundled patients `lgg-unet` never saw | shipped `lgg-unet` with its calibration | tumor | "
              f"{q['cases']} | - | {rv['failures']} | {f(q['spearman'])} | - | {f(rv['caught_at_10'], True)} | "
              f"{f(rv['caught_at_20'], True)} | {f(rv['caught_at_30'], True)} |")


if __name__ == "__main__":
    main()
