"""Why a softmax class dies: the 2.5D hippocampus recipe (seed 0), whose posterior output collapsed,
trained with one change at a time, validated every epoch, and the first epochs' per-class Dice tabled.

    .venv/bin/python experiments/planning/dying_class.py PREPARED_HIPPOCAMPUS --minutes 5 \\
        [--only baseline,fp32] [--parallel 2] [--out runs/dying_class]

Each variant is `medseg train configs/hippocampus_25d_unet.yaml --fold 0` with `--set` overrides, on one
thread (two variants side by side on a 2-core machine), stopped by the clock after ``--minutes``: the
learning-rate schedule is by steps, so a stopped run followed the full recipe's schedule up to there.
Writes experiments/planning/results/dying_class.json (per variant: per-epoch validation Dice of each
class) and prints a table.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "hippocampus_25d_unet.yaml"

VARIANTS: dict[str, list[str]] = {
    "baseline": [],                                   # the recipe: bf16 autocast on AMX CPUs, lr 2e-3
    "seed1": ["train.seed=1"],                        # the seed that trained
    "fp32": ["train.precision=32"],                   # bf16 autocast off
    "lr5e-4": ["optim.lr=0.0005"],                    # a quarter of the learning rate
    "warmup3": ["schedule.warmup_epochs=3"],          # a 3-epoch warm-up instead of 1
    "ce_only": ["loss.terms=[{name: ce, weight: 1.0}]"],  # no Dice term
    "instance_norm": ["model.kwargs={norm: instance}"],   # no batch statistics
    "leakyrelu": ["model.kwargs={act: leakyrelu}"],        # nnU-Net's activation: a unit below zero still learns
    "wide_top": ["model.kwargs={features: [16, 32, 64, 128, 256]}"],  # 16 channels at full resolution, not 8
}


def _run(name: str, sets: list[str], prepared: Path, out: Path, minutes: float) -> subprocess.Popen:
    args = [sys.executable, "-m", "medseg", "train", str(CONFIG), "--fold", "0", "--out", str(out / name),
            "--set", f"data.prepared={prepared}", "--set", "train.val_every=1",
            "--set", f"train.max_minutes={minutes}"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(out / f"{name}.log", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)


def _curve(run: Path) -> list[dict]:
    rows = []
    with open(run / "fold_0" / "metrics.csv") as f:
        for r in csv.DictReader(f):
            if r.get("val_dice_mean"):
                rows.append({k: float(v) for k, v in r.items() if k.startswith(("epoch", "val_dice"))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prepared", type=Path)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/dying_class"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    todo = a.only.split(",")
    running: list[tuple[str, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < a.parallel:
            name = todo.pop(0)
            running.append((name, _run(name, VARIANTS[name], a.prepared.resolve(), a.out, a.minutes)))
        time.sleep(5)
        running = [(n, p) for n, p in running if p.poll() is None]
    res_path = ROOT / "experiments" / "planning" / "results" / "dying_class.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    for name in a.only.split(","):
        try:
            results[name] = {"sets": VARIANTS[name], "minutes": a.minutes, "curve": _curve(a.out / name)}
        except FileNotFoundError:
            print(f"{name}: no metrics (see {a.out / name}.log)")
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(results, indent=1))
    print(f"{'variant':<14} " + " ".join(f"ep{int(r['epoch'])}:ant/post" for r in results.get("baseline", {}).get("curve", [])[:1]))
    for name, r in results.items():
        cells = [f"{c.get('val_dice_anterior', c.get('val_dice_label_1', 0)):.2f}/"
                 f"{c.get('val_dice_posterior', c.get('val_dice_label_2', 0)):.2f}" for c in r["curve"]]
        print(f"{name:<14} " + " ".join(cells))
    print(f"-> {res_path}")


if __name__ == "__main__":
    main()
