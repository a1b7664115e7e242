"""medseg's plan on a data set it was not developed on, as a new user runs it, scored on fixed test patients.

    python experiments/planning/outside.py NAME --minutes 15 [--data ../shared/data/NAME] [--work runs/outside]

NAME's data is what ``scripts/fetch_outside.py`` cuts under ../shared/data/NAME (``train/`` and ``test/``,
each with ``images/`` and ``masks/``), or for a shared data set what ``shared_split.py`` links under
runs/outside/data/NAME (its native layout); ``source.json`` names the source and the split. The steps are
the CLI's: ``medseg prepare FORMAT DATA/train``, ``medseg plan --minutes M --device cpu``, ``medseg train plan.yaml
--fold full`` (every training case, nothing chosen on the test cases), ``medseg predict RUN DATA/test/images``,
``medseg evaluate PRED DATA/test``. The test set's mean Dice (per case and class, averaged) goes into
``experiments/planning/results/outside.json`` under ``NAME.plan_dice["M"]``, with the plan's choices.
The budget is the whole machine's wall clock: run one at a time.

``--plan FILE --tag T`` trains a given plan instead (an ablation: e.g. the plan before a rule) and records
it in ``results/outside_ablations.json`` under ``NAME.T["M"]``, never in outside.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "outside.json"  # the data sets nobody here tuned for, only
SHARED = HERE / "results" / "shared_budgets.json"  # the four shared sets, the same way
ABLATIONS = HERE / "results" / "outside_ablations.json"
BIN = Path(sys.executable).parent / "medseg"
# published figures beside which each set's plan is read (docs/planning.md says how each compares with ours)
REFERENCES = {
    "drive": {"name": "DRIVE retinal vessels (colour fundus photographs, thin and tubular)", "reference_dice": 0.8171,
              "citation": "Alom et al., R2U-Net, arXiv:1802.06955 (2018): F1 0.8171 on "
              "the DRIVE test set (U-Net 0.8142 in the same table), pooled over the test pixels"},
    "chase": {"name": "CHASE_DB1 retinal vessels of children (colour fundus, thin and tubular)", "reference_dice": 0.8073,
              "citation": "Li et al., IterNet, WACV 2020: F1 0.8073 on CHASE_DB1 (20 train / 8 test images)"},
    "lgg": {"name": "LGG brain MRI (kaggle_3m, 3 channels, 2D slices of patients' volumes)", "reference_dice": 0.836,
            "citation": "Buda et al. 2019, the data set's authors (mateuszbuda.github.io/2017/12/01/brainseg.html): "
            "mean DSC 83.60% per patient, 22-fold cross-validation over 110 patients"},
    "hippocampus": {"name": "MSD Task04 hippocampus (MRI, 3D)", "reference_dice": 0.895,
                    "citation": "Isensee et al., nnU-Net, arXiv:1809.10486 (2018): MSD test set, anterior 0.90, "
                    "posterior 0.89 (mean 0.895)"},
    "brain-tumor-coco": {"name": "brain tumour COCO (Roboflow export, box masks)", "reference_dice": None,
                         "citation": "none published (every mask is its polygon's bounding box)"},
    "uwmgi-derived-sample": {"name": "UW-Madison GI derived sample (36 slices)", "reference_dice": None,
                             "citation": "none for this sample (the competition scores another metric on other data)"},
    "ph2": {"name": "PH2 dermoscopy (natural-colour 2D images, skin lesions)", "reference_dice": 0.930,
            "citation": "Hasan et al., DSNet, arXiv:1907.04305 (2020): mIoU 87.0% on PH2, "
            "as Dice 2 x 0.870 / 1.870 = 0.930; their own split"},
}

SHARED_SETS = ("lgg", "hippocampus", "brain-tumor-coco", "uwmgi-derived-sample")
UW = ["-o", "palette=stomach=255,0,0;large_bowel=0,255,0;small_bowel=255,255,0"]
# per set: reader, prepare / evaluate options, and where the test images and their truth lie in DATA
SETS: dict[str, dict] = {
    "chase": {"prepare": ["-o", r"patient_regex=^Image_(\d+)"]},  # both eyes of a child are one patient
    "lgg": {"format": "lgg", "test_in": "test"},
    "hippocampus": {"format": "nifti", "test_in": "test/imagesTr"},
    "brain-tumor-coco": {"format": "coco", "test_in": "test"},
    "uwmgi-derived-sample": {"prepare": UW + ["-o", r"case_regex=^(case\d+_day\d+)_slice", "-o", r"patient_regex=^(case\d+)"],
                             "evaluate": UW},
}


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([str(BIN), *args], check=True)


def record(name: str, minutes: float, entry: dict, meta: dict) -> None:
    path = SHARED if name in SHARED_SETS else RESULTS
    allr = json.loads(path.read_text()) if path.exists() else {}
    ds = allr.setdefault(name, {})
    src = meta.get("source", {})
    ds["source"] = {k: src[k] for k in ("repository", "commit", "folder", "licence") if k in src}
    ds["split"] = meta.get("rule")
    ds["test_patients"] = meta.get("split", {}).get("test", [])
    for other, entry_ in allr.items():  # references as cited now, on every set recorded
        entry_.update(REFERENCES.get(other, {}))
    ds.setdefault("plan_dice", {})[f"{minutes:g}"] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(allr, indent=1, sort_keys=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("runs/outside"))
    ap.add_argument("--no-record", action="store_true", help="a trial: do not write results/outside.json")
    ap.add_argument("--plan", type=Path, default=None, help="train this plan (its data.prepared replaced)")
    ap.add_argument("--tag", default=None, help="with --plan: the ablation's name")
    a = ap.parse_args()
    fetched = Path("..") / "shared" / "data" / a.name
    data = a.data or (fetched if (fetched / "source.json").exists() else a.work / "data" / a.name)  # shared_split.py's
    meta = json.loads((data / "source.json").read_text())
    st = SETS.get(a.name, {})
    prep = a.work / f"prep_{a.name}"
    if not (prep / "dataset.json").exists():
        sh("prepare", st.get("format", "folder"), str(data / "train"), str(prep), *st.get("prepare", []))
    out = a.work / f"{a.name}_{a.minutes:g}" if a.plan is None else a.work / f"{a.name}_{a.tag}_{a.minutes:g}"
    if a.plan is None:
        sh("plan", str(prep), "--minutes", f"{a.minutes:g}", "--device", "cpu", "--out", str(out / "plan.yaml"))
    else:
        cfg = yaml.safe_load(a.plan.read_text())
        cfg["data"]["prepared"] = str(prep.resolve())
        cfg["train"]["max_minutes"] = a.minutes
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.time()
    sh("train", str(out / "plan.yaml"), "--fold", "full", "--out", str(out / "run"))
    train_min = (time.time() - t0) / 60
    sh("predict", str(out / "run"), str(data / st.get("test_in", "test/images")), str(out / "pred"))
    sh("evaluate", str(out / "pred"), str(data / "test"), "--out", str(out / "eval"), "--no-report",
       "--format", st.get("format", "folder"), *st.get("evaluate", []))
    s = json.loads((out / "eval" / "summary.json").read_text())
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    per_class = {c: round(float(v["dice"]["mean"]), 4) for c, v in s["per_class"].items()}
    entry = {"mean_dice": round(sum(per_class.values()) / len(per_class), 4), "per_class": per_class,
             "n_test": s["n_cases"], "train_wall_minutes": round(train_min, 1),
             "plan": {"mode": plan["data"]["mode"], "size": plan["data"]["size"],
                      "resize": plan["data"].get("resize", False), "batch": plan["data"]["batch_size"],
                      "widths": plan["model"]["kwargs"]["features"], "members": plan["train"]["members"]},
             "command": f"python experiments/planning/outside.py {a.name} --minutes {a.minutes:g}"
             + (f" --plan {a.plan} --tag {a.tag}" if a.plan else "")}
    print(json.dumps(entry, indent=1))
    if a.plan is not None and not a.no_record:
        abl = json.loads(ABLATIONS.read_text()) if ABLATIONS.exists() else {}
        entry["plan_file"] = a.plan.name
        abl.setdefault(a.name, {}).setdefault(a.tag, {})[f"{a.minutes:g}"] = entry
        ABLATIONS.write_text(json.dumps(abl, indent=1) + "\n")
    elif not a.no_record:
        record(a.name, a.minutes, entry, meta)


if __name__ == "__main__":
    main()
