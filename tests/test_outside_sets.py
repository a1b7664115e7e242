"""``scripts/fetch_outside.py``: public data sets cut into the folder layout with their fixed test split,
on miniature copies of each source's layout (the real ones, when cut under ../shared/data, are checked
too); and ``medseg prepare folder`` reading the cut."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, shared


def _img(path: Path, arr: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def _drive(src: Path) -> Path:
    rng = np.random.default_rng(0)
    root = src / "DRIVE" / "datasets"
    for folder, suffix, ids in (("training", "training", (21, 22, 23)), ("testing", "test", (1, 2))):
        for k in ids:
            _img(root / folder / "images" / f"{k:02d}_{suffix}.tif", rng.integers(0, 255, (24, 20, 3), dtype=np.uint8))
            m = np.zeros((24, 20), np.uint8)
            m[:, k % 20] = 255  # a one-pixel vessel in column k mod 20
            _img(root / folder / "1st_manual" / f"{k:02d}_manual1.gif", m, "GIF")
    return src


def _chase(src: Path) -> Path:
    rng = np.random.default_rng(2)
    for child in (1, 10, 11):
        for eye in "LR":
            stem = f"Image_{child:02d}{eye}"
            _img(src / "CHASEDB1" / f"{stem}.jpg", rng.integers(0, 255, (12, 14, 3), dtype=np.uint8), "JPEG")
            m = np.zeros((12, 14), np.uint8)
            m[child % 12, :] = 255
            _img(src / "CHASEDB1" / f"{stem}_1stHO.png", m)
            _img(src / "CHASEDB1" / f"{stem}_2ndHO.png", 255 - m)  # the second observer is not used
    return src


def _ph2(src: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(1)
    root = src / "PH2Dataset" / "PH2 Dataset images"
    for i in range(n):
        name = f"IMD{i + 2:03d}"
        _img(root / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp", rng.integers(0, 255, (16, 18, 3), dtype=np.uint8), "BMP")
        m = np.zeros((16, 18), np.uint8)
        m[4:4 + i, 5:12] = 255
        _img(root / name / f"{name}_lesion" / f"{name}_lesion.bmp", m, "BMP")
    return src


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_outside.py"), *args],
                          capture_output=True, text=True)


def test_drive_keeps_its_own_split_and_pairs_each_image_with_its_vessels(tmp_path):
    src = _drive(tmp_path / "src")
    r = _run("drive", str(src), "--out", str(tmp_path / "drive"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "drive"
    meta = json.loads((out / "source.json").read_text())
    assert meta["split"] == {"train": ["drive_21", "drive_22", "drive_23"], "test": ["drive_01", "drive_02"]}
    assert meta["source"]["repository"] == "mipple1986/data" and len(meta["source"]["commit"]) == 40
    m = np.asarray(Image.open(out / "test" / "masks" / "drive_02.png"))
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255} and np.array_equal(np.nonzero(m.any(0))[0], [2])
    assert np.asarray(Image.open(out / "train" / "images" / "drive_22.png")).shape == (24, 20, 3)


def test_ph2_puts_every_fourth_lesion_in_the_test_set(tmp_path):
    src = _ph2(tmp_path / "src")
    assert _run("ph2", str(src), "--out", str(tmp_path / "ph2")).returncode == 0
    meta = json.loads((tmp_path / "ph2" / "source.json").read_text())
    assert meta["split"]["test"] == ["IMD005", "IMD009"]  # positions 3 and 7 of IMD002..IMD009
    assert len(meta["split"]["train"]) == 6 and not set(meta["split"]["train"]) & set(meta["split"]["test"])
    m = np.asarray(Image.open(tmp_path / "ph2" / "test" / "masks" / "IMD005.png"))
    assert (m == 255).sum() == 3 * 7  # rows 4..6, columns 5..11 of lesion IMD005 (i = 3)


def test_chase_splits_by_child_and_reads_the_first_observer(tmp_path):
    assert _run("chase", str(_chase(tmp_path / "src")), "--out", str(tmp_path / "chase")).returncode == 0
    meta = json.loads((tmp_path / "chase" / "source.json").read_text())
    assert meta["split"] == {"train": ["Image_01L", "Image_01R", "Image_10L", "Image_10R"],
                             "test": ["Image_11L", "Image_11R"]}
    m = np.asarray(Image.open(tmp_path / "chase" / "test" / "masks" / "Image_11R.png"))
    assert np.array_equal(np.nonzero(m.any(1))[0], [11])


def test_a_source_without_the_layout_is_refused_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _run("ph2", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and "no ph2 images found" in r.stderr and str(tmp_path / "empty") in r.stderr


@pytest.mark.parametrize("name, n_train, n_test", [("drive", 20, 20), ("chase", 20, 8), ("ph2", 150, 50)])
def test_the_real_cut_matches_its_recorded_split(name, n_train, n_test):
    root = shared(name)
    meta = json.loads((root / "source.json").read_text())
    for part, n in (("train", n_train), ("test", n_test)):
        stems = sorted(p.stem for p in (root / part / "masks").glob("*.png"))
        assert stems == sorted(meta["split"][part]) and len(stems) == n


def test_prepare_reads_the_cut_as_one_image_per_patient(tmp_path):
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.data.prepared import PreparedDataset

    _run("drive", str(_drive(tmp_path / "src")), "--out", str(tmp_path / "drive"))
    r = CliRunner().invoke(app, ["prepare", "folder", str(tmp_path / "drive" / "train"), str(tmp_path / "prep"),
                                 "--folds", "3", "--workers", "1"])
    assert r.exit_code == 0, r.output
    ds = PreparedDataset.open(tmp_path / "prep")
    assert sorted(ds.patients) == ["drive_21", "drive_22", "drive_23"] and ds.classes == ["foreground"]
    assert all(tuple(c.shape) == (1, 3, 24, 20) for c in ds.cases), [c.shape for c in ds.cases]


def _split(name: str, src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "planning" / "shared_split.py"), name,
                           "--src", str(src), "--out", str(out)], capture_output=True, text=True)


def test_shared_splits_link_whole_patients_into_train_or_test(tmp_path):
    """The fixed test splits of the shared sets (experiments/planning/shared_split.py), on miniature
    layouts: every fifth LGG patient with all its slices, every fifth MSD case with its label, every
    fourth UW patient with all its days, COCO's own valid/."""
    lgg = tmp_path / "lgg" / "kaggle_3m"
    names = [f"TCGA_XX_{i:04d}_20000101" for i in range(10)]
    for n in names:
        (lgg / n).mkdir(parents=True)
        (lgg / n / f"{n}_1.tif").write_bytes(b"x")
    assert _split("lgg", tmp_path / "lgg", tmp_path / "o_lgg").returncode == 0
    meta = json.loads((tmp_path / "o_lgg" / "source.json").read_text())
    assert meta["split"]["test"] == [names[4], names[9]]
    assert (tmp_path / "o_lgg" / "test" / names[4] / f"{names[4]}_1.tif").exists()
    assert sorted(p.name for p in (tmp_path / "o_lgg" / "train").iterdir()) == [n for n in names if n not in meta["split"]["test"]]

    msd = tmp_path / "hippo"
    for i in range(6):
        for sub in ("imagesTr", "labelsTr"):
            (msd / sub).mkdir(parents=True, exist_ok=True)
            (msd / sub / f"hippocampus_{i:03d}.nii.gz").write_bytes(b"x")
    assert _split("hippocampus", msd, tmp_path / "o_h").returncode == 0
    assert sorted(p.name for p in (tmp_path / "o_h" / "test" / "labelsTr").iterdir()) == ["hippocampus_004.nii.gz"]
    assert len(list((tmp_path / "o_h" / "train" / "imagesTr").iterdir())) == 5

    uw = tmp_path / "uw"
    stems = [f"case{c}_day{d}_slice_0001" for c in (2, 5, 11, 30, 41) for d in (0, 7)]
    for s in stems:
        for sub in ("images", "masks"):
            (uw / sub).mkdir(parents=True, exist_ok=True)
            (uw / sub / f"{s}.png").write_bytes(b"x")
    assert _split("uwmgi-derived-sample", uw, tmp_path / "o_uw").returncode == 0
    meta = json.loads((tmp_path / "o_uw" / "source.json").read_text())
    assert meta["split"]["test"] == ["case30"]  # case2, case5, case11, case30 (by number): the fourth
    assert sorted(p.name for p in (tmp_path / "o_uw" / "test" / "masks").iterdir()) == [
        "case30_day0_slice_0001.png", "case30_day7_slice_0001.png"]

    coco = tmp_path / "coco"
    for part in ("train", "valid"):
        (coco / part).mkdir(parents=True)
        (coco / part / "_annotations.coco.json").write_text(json.dumps({"images": [{"file_name": f"{part}_b.jpg"},
                                                                                   {"file_name": f"{part}_a.jpg"}]}))
    assert _split("brain-tumor-coco", coco, tmp_path / "o_c").returncode == 0
    meta = json.loads((tmp_path / "o_c" / "source.json").read_text())
    assert meta["split"]["test"] == ["valid_a.jpg", "valid_b.jpg"] and (tmp_path / "o_c" / "test" / "_annotations.coco.json").exists()
    r = _split("lgg", tmp_path / "nowhere", tmp_path / "o_x")
    assert r.returncode != 0 and "nowhere: no such folder" in r.stderr
