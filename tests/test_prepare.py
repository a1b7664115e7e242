"""``prepare``: arrays, fingerprint against numpy, patient-grouped splits, refusal to overwrite,
atomicity, CLI errors, and one end-to-end run on the real LGG data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import FIXTURES, ROOT, shared
from medseg.data.formats import get_reader
from medseg.data.prepare import prepare
from medseg.data.prepared import PreparedDataset
from medseg.errors import MedsegError

TINY = FIXTURES / "lgg_tiny" / "kaggle_3m"
LGG = FIXTURES / "lgg" / "kaggle_3m"
MEDSEG = [sys.executable, "-m", "medseg.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([*MEDSEG, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_prepared_arrays_equal_reader(tmp_path: Path):
    out = prepare("lgg", TINY, tmp_path / "p", workers=1, folds=2)
    ds = PreparedDataset.open(out)
    r = get_reader("lgg")
    spec = r.scan(TINY)
    assert [c.id for c in ds.cases] == [c.id for c in spec.cases]
    for i, case in enumerate(spec.cases):
        d = r.load(spec, case)
        assert isinstance(ds.image(i), np.memmap)
        np.testing.assert_array_equal(ds.image(i), d.image)
        np.testing.assert_array_equal(ds.mask(i), d.mask)
        rec = ds.cases[i]
        assert rec.shape == [4, 3, 256, 256] and rec.dtype == "uint8"
        assert rec.slices == d.slices
        assert rec.fg_slices == [[j for j in range(4) if d.mask[j].any()]]
        assert rec.foreground == [pytest.approx(d.mask.mean())]
    info = json.loads((out / "dataset.json").read_text())
    assert info["source_format"] == "lgg" and info["source"] == str(TINY.resolve()) and info["reader_options"] == {}
    assert ds.classes == ["tumor"] and ds.channels == ["pre-contrast", "FLAIR", "post-contrast"]


def test_fingerprint_against_numpy_coco(tmp_path: Path):
    # 128x128 images have fewer voxels than the per-case sample, so every voxel is used: exact stats
    out = prepare("coco", FIXTURES / "coco", tmp_path / "c", workers=1, folds=2, options={"merge": False})
    ds = PreparedDataset.open(out)
    fp = ds.fingerprint
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((FIXTURES / "coco").glob("*.jpg"))])
    for c, name in enumerate("RGB"):
        v = imgs[..., c].astype(np.float64).ravel()
        st = fp["intensity"][name]
        assert st["mean"] == pytest.approx(v.mean(), rel=1e-5)
        assert st["std"] == pytest.approx(v.std(), rel=1e-5)
        assert (st["min"], st["max"]) == (v.min(), v.max())
        assert st["percentiles"]["99.5"] == pytest.approx(np.percentile(v, 99.5))
        assert st["percentiles"]["50.0"] == pytest.approx(np.percentile(v, 50))
    masks = np.stack([np.asarray(ds.mask(i))[0] for i in range(len(ds))])  # [n, k, h, w]
    for j, name in enumerate(ds.classes):
        cls = fp["classes"][name]
        assert cls["voxel_fraction"] == pytest.approx(masks[:, j].mean())
        assert cls["case_fraction"] == pytest.approx(masks[:, j].any(axis=(1, 2)).mean())
    assert fp["n_cases"] == 6 and fp["n_slices"] == 6 and fp["shape"]["median"] == [1, 3, 128, 128]


def test_fingerprint_class_fractions_lgg(tmp_path: Path):
    out = prepare("lgg", LGG, tmp_path / "l", workers=2, folds=3)
    fp = PreparedDataset.open(out).fingerprint
    masks = [tifffile.imread(p) > 127 for p in sorted(LGG.rglob("*_mask.tif"))]
    per_slice = np.array([m.sum() for m in masks])
    assert fp["n_slices"] == len(masks) == 141
    t = fp["classes"]["tumor"]
    assert t["voxel_fraction"] == pytest.approx(per_slice.sum() / (len(masks) * 256 * 256))
    assert t["slice_fraction"] == pytest.approx((per_slice > 0).mean())
    assert t["case_fraction"] == 1.0
    assert fp["n_patients"] == 6 and fp["spacing"]["median"] == [1.0, 1.0, 1.0]
    # reproducible: the intensity sample does not depend on the process's hash seed
    out2 = prepare("lgg", LGG, tmp_path / "l2", workers=1, folds=3)
    assert PreparedDataset.open(out2).fingerprint["intensity"] == fp["intensity"]


def test_splits_grouped_by_patient(tmp_path: Path):
    src = tmp_path / "kaggle_3m"
    shutil.copytree(TINY, src)
    # a second visit of patient TCGA_CS_5393: a case id of its own, the same patient
    shutil.copytree(src / "TCGA_CS_5393_19990606", src / "TCGA_CS_5393_20000101")
    for f in (src / "TCGA_CS_5393_20000101").iterdir():
        f.rename(f.with_name(f.name.replace("19990606", "20000101")))
    shutil.copytree(TINY / "TCGA_CS_5395_19981004", src / "TCGA_XX_0001_20000101")
    out = prepare("lgg", src, tmp_path / "p", workers=1, folds=3)
    ds = PreparedDataset.open(out)
    splits = json.loads((out / "splits.json").read_text())
    assert splits["grouped_by"] == "patient" and splits["k"] == 3
    patient = {c.id: c.patient for c in ds.cases}
    assert patient["TCGA_CS_5393_20000101"] == patient["TCGA_CS_5393_19990606"] == "TCGA_CS_5393"
    val_sets = [set(f["val"]) for f in splits["folds"]]
    assert sorted(i for v in val_sets for i in v) == sorted(patient)  # every case validated exactly once
    for k, v in enumerate(val_sets):
        tr, va = ds.fold(k)
        assert set(va) == v and set(tr) == set(patient) - v
        assert not {patient[i] for i in tr} & {patient[i] for i in va}
    assert any({"TCGA_CS_5393_20000101", "TCGA_CS_5393_19990606"} <= v for v in val_sets)


def test_cli_split_by_group_leaves_each_hospital_out(tmp_path: Path):
    from typer.testing import CliRunner

    from medseg.cli import app

    src = FIXTURES / "lgg" / "kaggle_3m"  # 2 CS, 1 DU, 3 HT patients
    res = CliRunner().invoke(app, ["prepare", "lgg", str(src), str(tmp_path / "p"), "--workers", "1",
                                   "--split", "group", "--group-regex", "^TCGA_([A-Z0-9]+)_"])
    assert res.exit_code == 0, res.output
    ds = PreparedDataset.open(tmp_path / "p")
    splits = json.loads((tmp_path / "p" / "splits.json").read_text())
    assert [f["name"] for f in splits["folds"]] == ["CS", "DU", "HT"]
    assert [len(f["val"]) for f in splits["folds"]] == [2, 1, 3]
    tr, va = ds.fold(2)
    assert sorted(va) == ["TCGA_HT_7694_19950404", "TCGA_HT_7860_19960513", "TCGA_HT_8105_19980826"]
    assert sorted(tr) == ["TCGA_CS_5393_19990606", "TCGA_CS_5395_19981004", "TCGA_DU_5855_19951217"]
    with pytest.raises(MedsegError, match="--split group and --group-regex go together"):
        prepare("lgg", src, tmp_path / "q", workers=1, split="group")


def test_refuses_to_overwrite(tmp_path: Path):
    out = prepare("lgg", TINY, tmp_path / "p", workers=1, folds=2)
    with pytest.raises(MedsegError, match="output already exists; pass --overwrite to replace it"):
        prepare("lgg", TINY, out, workers=1, folds=2)
    r = _cli("prepare", "lgg", TINY, out, "--folds", "2", "--workers", "1")
    assert r.returncode == 2
    assert f"error: {out}: output already exists; pass --overwrite to replace it" in " ".join(r.stderr.split())
    r = _cli("prepare", "lgg", TINY, out, "--folds", "2", "--workers", "1", "--overwrite")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prepared 2 cases, 2 patients, 8 slices" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_unknown_format_cli(tmp_path: Path):
    r = _cli("prepare", "nosuchformat", TINY, tmp_path / "o")
    assert r.returncode == 2
    msg = " ".join(r.stderr.split())
    assert "unknown format 'nosuchformat'; known:" in msg
    for name in ("coco", "dicom", "lgg", "nifti"):
        assert name in msg.split("known:")[1]
    assert not (tmp_path / "o").exists()


def test_missing_input(tmp_path: Path):
    with pytest.raises(MedsegError, match="input does not exist"):
        prepare("lgg", tmp_path / "nope", tmp_path / "o", workers=1)


def _no_leftovers(tmp_path: Path) -> None:
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob("o.partial-*"))


def test_atomic_on_failure_mid_case(tmp_path: Path, monkeypatch):
    from medseg.data.formats.lgg import LGGReader

    real = LGGReader.load
    calls = []

    def flaky(self, spec, case):
        calls.append(case.id)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(self, spec, case)

    monkeypatch.setattr(LGGReader, "load", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare("lgg", TINY, tmp_path / "o", workers=1, folds=2)
    assert len(calls) == 2  # the first case was written before the failure
    _no_leftovers(tmp_path)


def test_atomic_on_failure_at_the_end(tmp_path: Path, monkeypatch):
    import medseg.data.prepare as prep

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_fingerprint", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare("lgg", TINY, tmp_path / "o", workers=1, folds=2)
    _no_leftovers(tmp_path)


def test_worker_error_is_reported_and_atomic(tmp_path: Path):
    src = tmp_path / "kaggle_3m"
    shutil.copytree(TINY, src)
    bad = src / "TCGA_CS_5395_19981004" / "TCGA_CS_5395_19981004_9.tif"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(MedsegError, match="cannot read TIFF") as e:
        prepare("lgg", src, tmp_path / "o", workers=2, folds=2)
    assert e.value.path == str(bad)
    _no_leftovers(tmp_path)


@pytest.mark.realdata
@pytest.mark.slow
def test_end_to_end_real_lgg(tmp_path: Path):
    src = shared("lgg", "kaggle_3m")
    r = _cli("prepare", "lgg", src, tmp_path / "lgg", "--workers", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    ds = PreparedDataset.open(tmp_path / "lgg")
    folders = [p for p in src.iterdir() if p.is_dir()]
    images = [f for f in src.rglob("*.tif") if not f.name.endswith("_mask.tif")]
    assert len(ds.patients) == len(folders) == 56
    assert sum(c.shape[0] for c in ds.cases) == ds.fingerprint["n_slices"] == len(images)
    splits = ds.splits()
    assert splits["k"] == 5
    assert sorted(i for f in splits["folds"] for i in f["val"]) == sorted(c.id for c in ds.cases)


# --- every bad input of the issue, through the CLI entry point: `error: <path>: <message>`, exit 2 ---
LGG_CASE = "TCGA_CS_5393_19990606"


def _lgg(tmp: Path) -> tuple[Path, Path]:
    src = tmp / "kaggle_3m"
    shutil.copytree(TINY, src)
    return src, src / LGG_CASE / f"{LGG_CASE}_9"


def _bad_missing_folder(tmp):
    return ["lgg", tmp / "nope"], tmp / "nope", "input does not exist"


def _bad_image_without_mask(tmp):
    src, stem = _lgg(tmp)
    Path(f"{stem}_mask.tif").unlink()
    return ["lgg", src], f"{stem}.tif", f"image without a mask (expected {LGG_CASE}_9_mask.tif)"


def _bad_mask_without_image(tmp):
    src, stem = _lgg(tmp)
    Path(f"{stem}.tif").unlink()
    return ["lgg", src], f"{stem}_mask.tif", "mask without an image"


def _bad_size_mismatch(tmp):
    src, stem = _lgg(tmp)
    tifffile.imwrite(f"{stem}_mask.tif", np.zeros((128, 128), np.uint8))
    return ["lgg", src], f"{stem}_mask.tif", "mask size (128, 128) differs from its image's (256, 256)"


def _bad_corrupt_image(tmp):
    src, stem = _lgg(tmp)
    Path(f"{stem}.tif").write_bytes(b"this is not a TIFF file")
    return ["lgg", src], f"{stem}.tif", "cannot read TIFF (TiffFileError: not a TIFF file"


def _bad_truncated_image(tmp):
    src, stem = _lgg(tmp)
    p = Path(f"{stem}.tif")
    p.write_bytes(p.read_bytes()[:-3000])
    return ["lgg", src], p, "cannot read TIFF ("


def _uwmgi_rle(tmp, rle: str):
    src = tmp / "uwmgi"
    shutil.copytree(FIXTURES / "uwmgi", src)
    lines = (src / "train.csv").read_text().splitlines()
    assert lines[1] == "case11_day12_slice_0039,large_bowel,"
    lines[1] += rle
    (src / "train.csv").write_text("\n".join(lines) + "\n")
    return ["uwmgi", src], src / "train.csv", "bad RLE for id case11_day12_slice_0039, class large_bowel: "


def _bad_rle_malformed(tmp):
    argv, path, msg = _uwmgi_rle(tmp, "10 5 2x 3")
    return argv, path, msg + "token 3 ('2x') is not a non-negative integer (run 2)"


def _bad_rle_out_of_range(tmp):
    argv, path, msg = _uwmgi_rle(tmp, "54750 10")  # 234 x 234 = 54756 pixels
    return argv, path, msg + "run 1 (start 54750, length 10) ends at pixel 54759, past the image end (54756 pixels)"


def _bad_rle_unsorted(tmp):
    argv, path, msg = _uwmgi_rle(tmp, "100 5 20 5")
    return argv, path, msg + "run 2: start 20 is not after run 1's start 100 (starts must be strictly increasing)"


def _coco(tmp):
    src = tmp / "coco"
    shutil.copytree(FIXTURES / "coco", src)
    return src, json.loads((src / "_annotations.coco.json").read_text())


def _bad_coco_annotation_to_missing_image(tmp):
    src, doc = _coco(tmp)
    doc["annotations"][1]["image_id"] = 999
    (src / "_annotations.coco.json").write_text(json.dumps(doc))
    return ["coco", src], src / "_annotations.coco.json", "annotation 2 points at image id 999, which is not in 'images'"


def _bad_coco_image_file_missing(tmp):
    src, doc = _coco(tmp)
    missing = src / doc["images"][2]["file_name"]
    missing.unlink()
    return ["coco", src], missing, "image file of image id 4 is missing"


def _bad_unknown_format(tmp):
    return ["lgg2", TINY], None, "unknown format 'lgg2'; known: coco, dicom, folder, lgg, nifti, uwmgi (did you mean 'lgg'?)"


@pytest.mark.parametrize(
    "make",
    [
        _bad_missing_folder, _bad_image_without_mask, _bad_mask_without_image, _bad_size_mismatch,
        _bad_corrupt_image, _bad_truncated_image, _bad_rle_malformed, _bad_rle_out_of_range, _bad_rle_unsorted,
        _bad_coco_annotation_to_missing_image, _bad_coco_image_file_missing, _bad_unknown_format,
    ],
    ids=lambda f: f.__name__[5:],
)
def test_bad_input_cli_error_and_exit_2(make, tmp_path: Path, monkeypatch, capsys):
    from medseg.cli import main

    args, path, message = make(tmp_path)
    out = tmp_path / "prepared"
    monkeypatch.setattr(sys, "argv", ["medseg", "prepare", *map(str, args), str(out), "--workers", "1", "--folds", "2"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    expected = f"error: {path}: {message}" if path is not None else f"error: {message}"
    assert err.startswith(expected), err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob("prepared.partial-*"))


def test_overwrite_never_replaces_something_that_is_not_a_prepared_dataset(tmp_path: Path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(MedsegError, match="output exists and is a file, not a prepared dataset; refusing to replace it"):
        prepare("lgg", TINY, f, workers=1, folds=2, overwrite=True)
    d = tmp_path / "data"
    d.mkdir()
    (d / "scan.tif").write_text("mine too")
    with pytest.raises(MedsegError, match="output exists and is not a prepared dataset; refusing to replace it"):
        prepare("lgg", TINY, d, workers=1, folds=2, overwrite=True)
    assert f.read_text() == "mine" and (d / "scan.tif").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]
