"""The planned config against the hand-written one on one data set: the same folds, the same machine, the
same wall clock. The hand-written config trains first (as written, on the whole machine); its wall time is
the plan's ``--minutes``; both runs are scored by ``medseg evaluate RUN`` (stored validation
predictions, the bundle's rules, no TTA: the same for both).

    .venv/bin/python experiments/planning/plan_vs_hand.py NAME CONFIG PREPARED --fold 0 [--out runs/plan_vs_hand]
    .venv/bin/python experiments/planning/plan_vs_hand.py NAME --plan-only PREPARED --minutes 44 --fold 0

Adds a row to experiments/planning/results/plan_vs_hand.json: per run the mean Dice over cases and classes,
per-class Dice, minutes and the command.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "planning" / "results" / "plan_vs_hand.json"


def _medseg(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medseg", *args], check=True)
    return (time.perf_counter() - t0) / 60


def _scores(run: Path) -> dict:
    _medseg("evaluate", str(run), "--out", str(run / "evaluation"))
    s = json.loads((run / "evaluation" / "summary.json").read_text())
    per = {c: round(float(v["dice"]["mean"]), 4) for c, v in s["per_class"].items()}
    return {"mean_dice": round(float(s["dataset"]["mean_dice"]), 4), "per_class": per}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("config", nargs="?")
    ap.add_argument("prepared", type=Path)
    ap.add_argument("--fold", default="0")
    ap.add_argument("--minutes", type=float, default=None, help="the plan's budget when the hand run is not rerun")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/plan_vs_hand"))
    a = ap.parse_args()
    out = a.out / a.name
    row: dict = {"fold": a.fold, "prepared": a.prepared.name}
    minutes = a.minutes
    if not a.plan_only:
        hand = out / "hand"
        minutes = _medseg("train", a.config, "--fold", a.fold, "--out", str(hand), "--set", f"data.prepared={a.prepared.resolve()}")
        row["hand"] = {"config": a.config, "minutes": round(minutes, 2), **_scores(hand)}
    plan_file = out / "plan.yaml"
    out.mkdir(parents=True, exist_ok=True)
    _medseg("plan", str(a.prepared), "--minutes", f"{minutes:.2f}", "--device", "cpu", "--out", str(plan_file))
    took = _medseg("train", str(plan_file), "--fold", a.fold, "--out", str(out / "plan"))
    row["plan"] = {"minutes_budget": round(minutes, 2), "minutes": round(took, 2), **_scores(out / "plan"),
                   "plan": plan_file.read_text().replace(str(a.prepared.resolve()), "PREPARED")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    res[a.name] = {**res.get(a.name, {}), **row}
    RESULTS.write_text(json.dumps(res, indent=1))
    for k in ("hand", "plan"):
        if k in row:
            print(f"{a.name} {k}: mean Dice {row[k]['mean_dice']:.4f} {row[k]['per_class']} in {row[k]['minutes']:.1f} min")


if __name__ == "__main__":
    main()
