"""A fixed test split of a shared data set, as links in its native layout, for ``outside.py``.

    python experiments/planning/shared_split.py NAME [--src ../shared/data/NAME] [--out runs/outside/data/NAME]

Writes ``OUT/train/`` and ``OUT/test/`` in the source's own layout (symbolic links, nothing copied) and
``OUT/source.json`` with the rule and the test patients. The rules are fixed here, before any plan is
trained on them:

- lgg (kaggle_3m): patients sorted, every fifth (positions 4, 9, ...) is a test patient: 11 of 56;
- hippocampus (MSD): cases sorted, every fifth: 40 of 200;
- brain-tumor-coco (Roboflow export): the export's own split, ``valid/`` (100 images) against ``train/``;
- uwmgi-derived-sample: patients (``caseN``) sorted, every fourth is a test patient, with all its slices.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def split_lgg(src: Path, out: Path) -> dict:
    root = src / "kaggle_3m" if (src / "kaggle_3m").is_dir() else src
    patients = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("TCGA_"))
    test = [p for i, p in enumerate(patients) if i % 5 == 4]
    for p in patients:
        _link(root / p, out / ("test" if p in test else "train") / p)
    return {"test": test, "rule": "patients sorted, every fifth (positions 4, 9, ...) is a test patient"}


def split_hippocampus(src: Path, out: Path) -> dict:
    cases = sorted(p.name[: -len(".nii.gz")] for p in (src / "imagesTr").glob("*.nii.gz") if not p.name.startswith("."))
    test = [c for i, c in enumerate(cases) if i % 5 == 4]
    for c in cases:
        part = "test" if c in test else "train"
        for sub in ("imagesTr", "labelsTr"):
            _link(src / sub / f"{c}.nii.gz", out / part / sub / f"{c}.nii.gz")
    return {"test": test, "rule": "cases sorted, every fifth (positions 4, 9, ...) is a test case"}


def split_coco(src: Path, out: Path) -> dict:
    _link(src / "train", out / "train")
    _link(src / "valid", out / "test")
    data = json.loads((src / "valid" / "_annotations.coco.json").read_text())
    return {"test": sorted(im["file_name"] for im in data["images"]), "rule": "the export's own valid/ split"}


def split_uwmgi(src: Path, out: Path) -> dict:
    stems = sorted(p.stem for p in (src / "images").glob("*.png"))
    patients = sorted({re.match(r"^(case\d+)_", s).group(1) for s in stems}, key=lambda p: int(p[4:]))
    test = [p for i, p in enumerate(patients) if i % 4 == 3]
    for s in stems:
        part = "test" if re.match(r"^(case\d+)_", s).group(1) in test else "train"
        for sub in ("images", "masks"):
            _link(src / sub / f"{s}.png", out / part / sub / f"{s}.png")
    return {"test": test, "rule": "patients (caseN, by number) sorted, every fourth is a test patient"}


SPLITS = {"lgg": split_lgg, "hippocampus": split_hippocampus, "brain-tumor-coco": split_coco,
          "uwmgi-derived-sample": split_uwmgi}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(SPLITS))
    ap.add_argument("--src", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    src = a.src or Path("..") / "shared" / "data" / a.name
    out = a.out or Path("runs") / "outside" / "data" / a.name
    if not src.is_dir():
        raise SystemExit(f"{src}: no such folder (the shared data set {a.name})")
    info = SPLITS[a.name](src, out)
    meta = {"name": a.name, "source": {"repository": "shared data (../shared/data/README.md)", "folder": a.name},
            "split": {"test": info["test"]}, "rule": info["rule"]}
    (out / "source.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{out}: {len(info['test'])} test patients")


if __name__ == "__main__":
    main()
