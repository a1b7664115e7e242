"""Bundle fold K of several runs of one recipe (different seeds, trained the way ``train.members``
trains its members: one thread each, side by side) into a run whose folds hold them as members, with
the same ``merge_members`` that ``medseg train`` calls after its members finish. docs/lgg.md used it
for folds 0-3 of the two-member cross-validation (seed 0 and seed 1 came from two 5-fold runs):

    .venv/bin/python experiments/lgg/merge_runs.py runs/lgg_unet_m2 runs/lgg_unet_bf16 runs/lgg_unet_bf16_s1 \\
        --config configs/lgg_unet.yaml --folds 0,1,2,3

Each fold's ``member_I`` is a link to fold K of the I-th run; every run must hold out the same
patients. Prints each fold's ensemble validation scores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--config", type=Path, required=True, help="the recipe the runs were trained with")
    ap.add_argument("--folds", default="0,1,2,3,4")
    a = ap.parse_args()
    from medseg.config import dump_config, load_config
    from medseg.training.members import merge_members
    from medseg.training.task import check_task

    if len(a.runs) < 2:
        sys.exit("give at least two runs to merge")
    missing = [r for r in a.runs if not (r / "splits.json").is_file()]
    if missing:
        sys.exit(f"{missing[0]}: no splits.json (not a run directory)")
    splits = [json.loads((r / "splits.json").read_text()) for r in a.runs]
    folds = [int(v) for v in a.folds.split(",")]
    cfg = load_config(a.config, {"train.members": str(len(a.runs))})
    ds, task = check_task(cfg, a.config)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "config.yaml").write_text(dump_config(cfg))
    shutil.copy(a.runs[0] / "splits.json", a.out / "splits.json")
    for k in folds:
        for r, sp in zip(a.runs[1:], splits[1:]):
            if sorted(sp["folds"][k]["val"]) != sorted(splits[0]["folds"][k]["val"]):
                sys.exit(f"{r}: fold {k} holds out other patients than {a.runs[0]}'s fold {k}")
        fd = a.out / f"fold_{k}"
        fd.mkdir(exist_ok=True)
        for i, r in enumerate(a.runs):
            link = fd / f"member_{i}"
            if not link.exists():
                os.symlink((r / f"fold_{k}").resolve(), link)
        print(f"fold {k}: {json.dumps(merge_members(cfg, task, ds, k, fd))}")


if __name__ == "__main__":
    main()
