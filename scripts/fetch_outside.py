"""Cut public data sets nobody tuned medseg on into the plain folder layout, with a fixed test split.

    python scripts/fetch_outside.py drive SRC [--out ../shared/data/drive]
    python scripts/fetch_outside.py ph2 SRC [--out ../shared/data/ph2]
    python scripts/fetch_outside.py chase SRC [--out ../shared/data/chase]

SRC is a checkout of the repository named in SOURCES (the commit used is recorded there). Each data set is
written as ``OUT/train/{images,masks}`` and ``OUT/test/{images,masks}`` (PNG, masks 0/255), which
``medseg prepare folder OUT/train`` reads, plus ``OUT/source.json``: where it came from, the split and its
rule. The test split is fixed here, before anything is trained, and never used to choose a rule:

- drive (retinal vessels, thin and tubular; Staal et al. 2004): the data set's own split, its 20 test
  images (01-20, first observer) against its 20 training images (21-40). One image per eye and person.
- chase (retinal vessels of children, CHASE_DB1; Fraz et al. 2012): 28 images, both eyes of 14 children;
  the usual split by child: the first 10 children (20 images) train, the last 4 (8 images) test.
- ph2 (dermoscopy, natural colour; Mendonca et al. 2013): 200 lesions, one per image; every fourth by
  name (IMD002, IMD003, ... sorted; positions 3, 7, 11, ...) is a test case: 50 test, 150 train.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SOURCES = {
    "drive": {"repository": "mipple1986/data", "commit": "92b9449a2e7a38dbd4c62825418dafcd5eba4fec",
              "folder": "DRIVE/datasets", "licence": "DRIVE terms (research use, cite Staal et al. 2004)"},
    "chase": {"repository": "mipple1986/data", "commit": "92b9449a2e7a38dbd4c62825418dafcd5eba4fec",
              "folder": "CHASEDB1", "licence": "CHASE_DB1 terms (research use, cite Fraz et al. 2012)"},
    "ph2": {"repository": "chelseaparlett/SkinCancerVariation", "commit": "e06866b70a49acfba5762f289ca169f056e97997",
            "folder": "PH2Dataset/PH2 Dataset images", "licence": "PH2 terms (research use, cite Mendonca et al. 2013)"},
}


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "1", "P") else im.convert("L"))


def _write(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _mask(path: Path) -> np.ndarray:
    m = _read(path)
    if m.ndim == 3:
        m = m[..., 0]
    return np.where(m > 127, 255, 0).astype(np.uint8)


def cut_drive(src: Path, out: Path) -> dict:
    root = src / SOURCES["drive"]["folder"]
    if not root.is_dir():
        root = src
    split = {"train": [], "test": []}
    for part, folder, suffix in (("train", "training", "training"), ("test", "testing", "test")):
        for img in sorted((root / folder / "images").glob(f"*_{suffix}.tif")):
            k = img.name.split("_")[0]
            _write(_read(img), out / part / "images" / f"drive_{k}.png")
            _write(_mask(root / folder / "1st_manual" / f"{k}_manual1.gif"), out / part / "masks" / f"drive_{k}.png")
            split[part].append(f"drive_{k}")
    return {"split": split, "rule": "the data set's own split: test 01-20 (first observer), train 21-40"}


def cut_chase(src: Path, out: Path) -> dict:
    root = src / SOURCES["chase"]["folder"]
    if not root.is_dir():
        root = src
    split = {"train": [], "test": []}
    for img in sorted(root.glob("Image_[0-9][0-9][LR].jpg")):
        child = int(img.stem[6:8])
        part = "train" if child <= 10 else "test"
        _write(_read(img), out / part / "images" / f"{img.stem}.png")
        _write(_mask(root / f"{img.stem}_1stHO.png"), out / part / "masks" / f"{img.stem}.png")
        split[part].append(img.stem)
    return {"split": split, "rule": "by child: children 01-10 (20 images) train, 11-14 (8 images) test (first observer)"}


def cut_ph2(src: Path, out: Path) -> dict:
    root = src / SOURCES["ph2"]["folder"]
    if not root.is_dir():
        root = src
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("IMD"))
    split = {"train": [], "test": []}
    for i, name in enumerate(names):
        part = "test" if i % 4 == 3 else "train"
        _write(_read(root / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp"), out / part / "images" / f"{name}.png")
        _write(_mask(root / name / f"{name}_lesion" / f"{name}_lesion.bmp"), out / part / "masks" / f"{name}.png")
        split[part].append(name)
    return {"split": split, "rule": "names sorted, every fourth (positions 3, 7, 11, ...) is a test case"}


CUTS = {"chase": cut_chase, "drive": cut_drive, "ph2": cut_ph2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(CUTS))
    ap.add_argument("src", type=Path, help="a checkout of the source repository (see SOURCES)")
    ap.add_argument("--out", type=Path, default=None, help="default: ../shared/data/NAME")
    a = ap.parse_args()
    out = a.out or Path("..") / "shared" / "data" / a.name
    info = CUTS[a.name](a.src, out)
    if not info["split"]["train"] or not info["split"]["test"]:
        raise SystemExit(f"{a.src}: no {a.name} images found (expected {SOURCES[a.name]['folder']})")
    meta = {"name": a.name, "source": SOURCES[a.name], **info}
    (out / "source.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{out}: {len(info['split']['train'])} train, {len(info['split']['test'])} test")


if __name__ == "__main__":
    main()
