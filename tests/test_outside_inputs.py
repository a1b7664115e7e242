"""Inputs from outside: the cases a new user meets that the first matrix (test_bad_inputs.py) did not hold,
grouped by the mechanism that handles each kind, so that a new case of a kind is caught by the mechanism and
not by a patch for one example (CONTRIBUTING.md, "How medseg treats input").

- values are checked where they enter (non-finite voxels, probabilities, spacings and memory, config
  kwargs, ONNX sidecars against their graph);
- every reader states what it did not use, and refuses a silent choice (duplicates);
- evaluate pairs predictions and truth both ways and compares grids;
- runs know whether they finished; one writer per output folder;
- a failure leaves nothing, and every OSError names its path.

Each error case asserts what the first matrix asserts: exit 2, one ``error:`` line naming the file and
the problem, no traceback, nothing written, nothing existing changed.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile


from test_bad_inputs import (LGG_TINY, PATIENT, Case, assert_one_line_error, coco_set, config_for, copy_lgg,
                             folder_set, nifti_set, rewrite_nifti, run_cli, save_png)
from test_bad_inputs import _check as check

OTHER = "TCGA_CS_5395_19981004"


# ----------------------------------------------------------------------------------------- helpers
def float_nifti(path: Path, edit) -> None:
    """Rewrite a NIfTI image as float32 after ``edit(data)`` (NaN and Inf need a float file)."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj).astype(np.float32)
    edit(data)
    hdr = img.header.copy()
    hdr.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(data, img.affine, hdr), str(path))


def float_lgg_slice(root: Path, value: float, n: int = 9) -> Path:
    """A float32 copy of every slice of the first patient with ``value`` in one pixel of slice ``n``."""
    for f in (root / PATIENT).glob(f"{PATIENT}_*.tif"):
        if f.name.endswith("_mask.tif"):
            continue
        a = tifffile.imread(f).astype(np.float32)
        if f.name == f"{PATIENT}_{n}.tif":
            a[100, 120, 1] = value
        tifffile.imwrite(f, a)
    return root / PATIENT / f"{PATIENT}_{n}.tif"


def one_patient(tmp: Path) -> Path:
    root = copy_lgg(tmp)
    shutil.rmtree(root / OTHER)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from medseg.data.prepare import prepare

    return prepare("lgg", LGG_TINY, tmp_path_factory.mktemp("prep") / "lgg", folds=2, workers=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepared) -> Path:
    """A tiny finished run (one epoch, one step) on the tiny LGG set."""
    from medseg.training.run import train

    tmp = tmp_path_factory.mktemp("run")
    train(config_for(tmp, prepared), fold="0", out=tmp / "run")
    return tmp / "run"


def killed(run: Path, tmp: Path) -> Path:
    """A copy of ``run`` as a SIGKILL in its second epoch leaves it: state.json still says training."""
    dst = tmp / "killed"
    shutil.copytree(run, dst)
    state = json.loads((dst / "fold_0" / "state.json").read_text())
    (dst / "fold_0" / "state.json").write_text(json.dumps({**state, "state": "training"}))
    return dst


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    from medseg.inference.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx("lgg-unet", out)
    return out


def onnx_copy(src: Path, tmp: Path, edit=None) -> Path:
    dst = tmp / "m.onnx"
    shutil.copy(src, dst)
    doc = json.loads(src.with_suffix(".json").read_text())
    if edit:
        edit(doc)
    dst.with_suffix(".json").write_text(json.dumps(doc))
    return dst


# ------------------------------------------------------------------ values checked where they enter
def _nonfinite_nifti_nan(tmp):
    root = nifti_set(tmp)
    img = root / "imagesTr" / "hippocampus_003.nii.gz"
    float_nifti(img, lambda d: d.__setitem__((3, 4, 5), np.nan))
    return Case(["prepare", "nifti", root, tmp / "out"], img, "1 non-finite voxel (NaN or Inf) in the image",
                absent=[tmp / "out"])


def _nonfinite_nifti_inf(tmp):
    root = nifti_set(tmp)
    img = root / "imagesTr" / "hippocampus_001.nii.gz"
    float_nifti(img, lambda d: d.__setitem__((slice(0, 2), 4, 5), np.inf))
    return Case(["prepare", "nifti", root, tmp / "out"], img, "2 non-finite voxels", absent=[tmp / "out"])


def _nonfinite_nifti_minus_inf(tmp):
    root = nifti_set(tmp)
    img = root / "imagesTr" / "hippocampus_004.nii.gz"
    float_nifti(img, lambda d: d.__setitem__((0, 0, 0), -np.inf))
    return Case(["prepare", "nifti", root, tmp / "out"], img, "nonfinite=zero or nonfinite=min replaces them",
                absent=[tmp / "out"])


def _nonfinite_nifti_predict(tmp):
    root = nifti_set(tmp)
    img = root / "imagesTr" / "hippocampus_004.nii.gz"
    float_nifti(img, lambda d: d.__setitem__((1, 1, 1), np.nan))
    return Case(["predict", "lgg-unet", img, tmp / "out"], img, "non-finite voxel", absent=[tmp / "out"])


def _nonfinite_lgg_tiff_predict(tmp):
    root = one_patient(tmp)
    f = float_lgg_slice(root, np.nan)
    return Case(["predict", "lgg-unet", root, tmp / "out"], f, "1 non-finite voxel (NaN or Inf)", absent=[tmp / "out"])


def _nonfinite_lgg_tiff_prepare(tmp):
    root = copy_lgg(tmp)
    f = float_lgg_slice(root, np.inf, n=4)
    return Case(["prepare", "lgg", root, tmp / "out", "--workers", "1"], f, "non-finite voxel", absent=[tmp / "out"])


def _nonfinite_lgg_evaluate_truth(tmp):
    root = copy_lgg(tmp)
    f = float_lgg_slice(root, np.nan, n=10)
    pred = tmp / "pred"
    for m in root.rglob("*_mask.tif"):
        (pred / m.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(m, pred / m.parent.name / m.name)
    return Case(["evaluate", pred, root, "--out", tmp / "ev"], f, "non-finite voxel", absent=[tmp / "ev"])


def _nonfinite_folder_tiff(tmp):
    root = folder_set(tmp)
    img = root / "images" / "a.png"
    img.unlink()
    a = np.full((16, 16), 7.0, np.float32)
    a[2, 3] = np.nan
    tifffile.imwrite(root / "images" / "a.tif", a)
    return Case(["prepare", "folder", root, tmp / "out", "--workers", "1"], root / "images" / "a.tif",
                "non-finite voxel", absent=[tmp / "out"])


def _nonfinite_bad_rule(tmp):
    root = nifti_set(tmp)
    return Case(["prepare", "nifti", root, tmp / "out", "-o", "nonfinite=mean"], "nonfinite",
                "bad option for format 'nifti'", absent=[tmp / "out"])


def _nonfinite_predict_bad_rule(tmp):
    root = one_patient(tmp)
    return Case(["predict", "lgg-unet", root, tmp / "out", "-o", "nonfinite=drop"], "nonfinite",
                "bad option for format 'lgg'", absent=[tmp / "out"])


# probabilities and thresholds: numbers in [0, 1] (predict's flags; the config's and bundles' rules likewise)
PROBABILITIES = [
    (["--threshold", "1.5"], "--threshold", "--threshold must be in [0, 1], got 1.5"),
    (["--threshold", "nan"], "--threshold", "must be in [0, 1], got nan"),
    (["--threshold=-0.1"], "--threshold", "must be in [0, 1], got -0.1"),
    (["--threshold", "inf"], "--threshold", "must be in [0, 1], got inf"),
    (["--presence", "0.5,2"], "--presence", "--presence must be in [0, 1], got 2.0"),
    (["--presence", "2"], "--presence", "must be in [0, 1], got 2.0"),
    (["--presence", "NaN"], "--presence", "must be in [0, 1]"),
    (["--min-size=-3"], "min_size", "min_size must be a whole number of pixels >= 0, got -3"),
]
# target spacings: three positive finite numbers
SPACINGS = ["nan,1,1", "-1,1,1", "0,1,1", "1,inf,1"]


@pytest.mark.parametrize("flags,names,says", PROBABILITIES, ids=lambda v: v if isinstance(v, str) else "_".join(v))
def test_outside_probability(flags, names, says, tmp_path, monkeypatch, capsys):
    check(Case(["predict", "lgg-unet", one_patient(tmp_path), tmp_path / "out", *flags], names, says,
               absent=[tmp_path / "out"]), tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_outside_spacing(spacing, tmp_path, monkeypatch, capsys):
    root = nifti_set(tmp_path)
    check(Case(["prepare", "nifti", root, tmp_path / "out", f"--spacing={spacing}"], root,
               "three positive numbers Z,Y,X in mm", absent=[tmp_path / "out"]), tmp_path, monkeypatch, capsys)


def _spacing_tiny_needs_tebibytes(tmp):
    root = nifti_set(tmp)
    return Case(["prepare", "nifti", root, tmp / "out", "--spacing", "0.001,0.001,0.001"], "hippocampus_001.nii.gz",
                "to 35000x51000x35000 voxels needs 511.4 TiB of memory; this machine has", absent=[tmp / "out"])


# configs: checked before a run directory exists
def _config_section_twice(tmp, prepared):
    cfg = config_for(tmp, prepared)
    cfg.write_text(cfg.read_text() + "data:\n  batch_size: 4\n")
    return Case(["train", cfg, "--out", tmp / "run"], f"{cfg}:", "key 'data' is given twice (lines 1 and",
                absent=[tmp / "run"])


def _config_nested_key_twice(tmp, prepared):
    cfg = config_for(tmp, prepared)
    cfg.write_text(cfg.read_text().replace("  batch_size: 2\n", "  batch_size: 2\n  batch_size: 8\n"))
    return Case(["train", cfg, "--out", tmp / "run"], cfg, "key 'batch_size' is given twice", absent=[tmp / "run"])


# --set values checked before a run directory exists: (value, what the error names, its problem); the
# network and every loss term are built, and each term computed once on a tiny batch
CONFIG_SETS = [
    ("loss.terms=[{name: dice, kwargs: {smooth_nr: 1, smooth_nr: 2}}]", "--set loss.terms", "key 'smooth_nr' is given twice"),
    ("loss.terms=[{name: dice_ce, kwargs: {smoth: 1e-5}}]", "loss.terms[0] (dice_ce", "unexpected keyword argument 'smoth'"),
    ("loss.terms=[{name: dice, kwargs: {smooth_nr: abc}}]", "loss.terms[0] (dice", "could not convert string to float: 'abc'"),
    ("loss.terms=[{name: focal, kwargs: {gamma: [1, 2]}}]", "loss.terms[0] (focal", "kwargs {'gamma': [1, 2]}"),
    ("loss.terms=[{name: tversky, kwargs: {alpah: 0.3}}]", "loss.terms[0] (tversky", "unexpected keyword argument 'alpah'"),
    ("model.kwargs.featurs=[4, 8]", "model 'unet'", "unexpected keyword argument 'featurs'"),
    ("model.kwargs.features=abc", "model 'unet' with kwargs {'features': 'abc'}", "invalid literal for int()"),
    ("model.kwargs.features=[-4, 8]", "exp.yaml", "U-Net features must be at least two positive widths, got (-4, 8)"),
    ("postprocess.thresholds=[1.5]", "postprocess.thresholds", "probabilities must be in [0, 1]"),
    ("postprocess.presence=.nan", "postprocess.presence", "probabilities must be in [0, 1]"),
]


@pytest.mark.parametrize("value,names,says", CONFIG_SETS, ids=[v.split("=")[0] + str(i) for i, (v, _, _) in enumerate(CONFIG_SETS)])
def test_outside_config_value(value, names, says, prepared, tmp_path, monkeypatch, capsys):
    check(Case(["train", config_for(tmp_path, prepared), "--out", tmp_path / "run", "--set", value], names, says,
               absent=[tmp_path / "run"]), tmp_path, monkeypatch, capsys)


def _config_auto_on_bad_data(tmp, prepared):
    bad = tmp / "notprepared"
    bad.mkdir()
    return Case(["train", bad, "--auto", "--out", tmp / "run"], bad, "not a prepared dataset", absent=[tmp / "run"])


def _config_failed_train_in_existing_run(tmp, prepared):
    """A second fold that fails before its first checkpoint leaves the run as it was."""
    run = tmp / "run"
    (run / "fold_0").mkdir(parents=True)
    (run / "fold_0" / "keep.txt").write_text("earlier work")
    return Case(["train", config_for(tmp, prepared), "--out", run, "--fold", "1", "--set",
                 "model.kwargs.featurs=[4]"], "model 'unet'", "featurs", absent=[run / "fold_1"], intact=[run])


# ONNX sidecars checked against their graph
def _onnx_sidecar_claims_three_classes(tmp, onnx_model):
    m = onnx_copy(onnx_model, tmp, lambda d: d.update(classes=["a", "b", "c"]))
    return Case(["predict", m, one_patient(tmp), tmp / "out"], m.with_suffix(".json"), "the sidecar is inconsistent",
                absent=[tmp / "out"])


def _onnx_sidecar_of_another_model(tmp, onnx_model):
    def edit(d):
        d["classes"] = ["a", "b", "c"]
        d["arch"]["out_channels"] = 4

    m = onnx_copy(onnx_model, tmp, edit)
    return Case(["predict", m, one_patient(tmp), tmp / "out"], m.with_suffix(".json"),
                "the sidecar says the output has 4 channels, the ONNX graph 2", absent=[tmp / "out"])


def _onnx_sidecar_other_input_channels(tmp, onnx_model):
    def edit(d):
        d["channels"] = ["t1"]
        d["arch"]["in_channels"] = 1

    m = onnx_copy(onnx_model, tmp, edit)
    return Case(["predict", m, one_patient(tmp), tmp / "out"], m.with_suffix(".json"),
                "the sidecar says the input has 1 channels, the ONNX graph 3", absent=[tmp / "out"])


def _onnx_graph_with_an_extra_input(tmp, onnx_model):
    import onnx
    from onnx import TensorProto, helper

    g = onnx.load(str(onnx_model))
    g.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    m = onnx_copy(onnx_model, tmp)
    onnx.save(g, str(m))
    return Case(["predict", m, one_patient(tmp), tmp / "out"], m, "the ONNX graph takes 2 inputs", absent=[tmp / "out"])


def _onnx_export_opset_99(tmp, onnx_model):
    return Case(["export", "lgg-unet", tmp / "x.onnx", "--opset", "99"], "opset 99",
                "newer than this PyTorch's ONNX exporter writes", absent=[tmp / "x.onnx", tmp / "x.json"])


# ------------------------------------------------------------ readers state what they did not use
def _reader_lgg_slice_9_and_09(tmp):
    root = copy_lgg(tmp)
    shutil.copy(root / PATIENT / f"{PATIENT}_9.tif", root / PATIENT / f"{PATIENT}_09.tif")
    return Case(["prepare", "lgg", root, tmp / "out"], root / PATIENT, "two files for slice 9", absent=[tmp / "out"])


def _reader_lgg_mask_9_and_09(tmp):
    root = copy_lgg(tmp)
    shutil.copy(root / PATIENT / f"{PATIENT}_9_mask.tif", root / PATIENT / f"{PATIENT}_009_mask.tif")
    return Case(["prepare", "lgg", root, tmp / "out"], root / PATIENT, "two files for slice 9", absent=[tmp / "out"])


def _reader_lgg_predict_slice_9_and_09(tmp):
    root = one_patient(tmp)
    shutil.copy(root / PATIENT / f"{PATIENT}_10.tif", root / PATIENT / f"{PATIENT}_010.tif")
    return Case(["predict", "lgg-unet", root, tmp / "out"], root / PATIENT, "two files for slice 10",
                absent=[tmp / "out"])


def _reader_lgg_tif_and_tiff(tmp):
    root = copy_lgg(tmp)
    shutil.copy(root / PATIENT / f"{PATIENT}_3.tif", root / PATIENT / f"{PATIENT}_3.tiff")
    return Case(["prepare", "lgg", root, tmp / "out"], root / PATIENT, "two files for slice 3", absent=[tmp / "out"])


def _reader_nifti_nii_beside_niigz(tmp):
    import nibabel as nib

    root = nifti_set(tmp)
    img = nib.load(str(root / "imagesTr" / "hippocampus_003.nii.gz"))
    nib.save(img, str(root / "imagesTr" / "hippocampus_003.nii"))
    return Case(["prepare", "nifti", root, tmp / "out"], root / "imagesTr",
                "two files for case 'hippocampus_003' (hippocampus_003.nii and hippocampus_003.nii.gz)",
                absent=[tmp / "out"])


def _reader_nifti_label_nii_beside_niigz(tmp):
    import nibabel as nib

    root = nifti_set(tmp)
    lab = nib.load(str(root / "labelsTr" / "hippocampus_001.nii.gz"))
    nib.save(lab, str(root / "labelsTr" / "hippocampus_001.nii"))
    return Case(["prepare", "nifti", root, tmp / "out"], root / "labelsTr", "two files for case 'hippocampus_001'",
                absent=[tmp / "out"])


# COCO geometry the rasteriser cannot draw: (segmentation of the first polygon annotation, or None to make the
# first annotation a bbox-only one with the given box; what the error says). NaN once grew to 23 GB.
NAN, INF = float("nan"), 1e400
COCO_GEOMETRY = {
    "odd_number_of_coordinates": ([[10, 10, 60, 10, 60, 60, 10]], None, "a polygon with an odd number of coordinates (7)"),
    "nan_coordinate": ([[10, 10, 60, 10, NAN, 60, 10, 60]], None, "polygon has a coordinate that is NaN or infinite"),
    "infinite_coordinate": ([[10, 10, INF, 10, 60, 60, 10, 60]], None, "NaN or infinite"),
    "text_coordinate": ([[10, 10, "x", 10, 60, 60, 10, 60]], None, "polygon holds values that are not numbers"),
    "polygon_wholly_outside": ([[1000, 1000, 1100, 1000, 1100, 1100]], None, "lies wholly outside"),
    "bbox_wholly_outside": (None, "right", "lies wholly outside its"),
    "bbox_at_negative_coordinates": (None, [-50, -50, 20, 20], "lies wholly outside"),
    "bbox_zero_width": (None, [10, 10, 0, 20], "expected [x, y, width, height] with a positive width and height"),
    "bbox_three_numbers": (None, [10, 10, 20], "expected [x, y, width, height]"),
    "bbox_nan": (None, [10, NAN, 20, 20], "bbox has a coordinate that is NaN or infinite"),
    "flat_segmentation": ([10, 10, 60, 10, 60, 60], None, "segmentation must be a list of polygons"),
}


@pytest.mark.parametrize("name", COCO_GEOMETRY)
def test_outside_coco_geometry(name, tmp_path, monkeypatch, capsys):
    seg, box, says = COCO_GEOMETRY[name]

    def edit(doc):
        if seg is not None:
            next(a for a in doc["annotations"] if a.get("segmentation"))["segmentation"] = seg
            return
        a = doc["annotations"][0]
        im = next(i for i in doc["images"] if i["id"] == a["image_id"])
        a["segmentation"], a["bbox"] = [], [im["width"] + 5, 10, 20, 20] if box == "right" else box

    root = coco_set(tmp_path, edit)
    check(Case(["prepare", "coco", root, tmp_path / "out"], root / "_annotations.coco.json", says,
               absent=[tmp_path / "out"]), tmp_path, monkeypatch, capsys)


# --------------------------------------------------------------------- evaluate pairs both ways
def _pred_and_truth(tmp: Path) -> tuple[Path, Path]:
    truth = copy_lgg(tmp)
    pred = tmp / "pred"
    for m in truth.rglob("*_mask.tif"):
        (pred / m.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(m, pred / m.parent.name / m.name)
    return pred, truth


def _pairing_extra_lgg_patient(tmp):
    pred, truth = _pred_and_truth(tmp)
    shutil.copytree(pred / PATIENT, pred / "TCGA_XX_0000_20000101")
    return Case(["evaluate", pred, truth, "--out", tmp / "ev"], pred, "match no ground-truth case", absent=[tmp / "ev"])


def _pairing_extra_lgg_slice(tmp):
    pred, truth = _pred_and_truth(tmp)
    shutil.copy(pred / PATIENT / f"{PATIENT}_9_mask.tif", pred / PATIENT / f"{PATIENT}_99_mask.tif")
    return Case(["evaluate", pred, truth, "--out", tmp / "ev"], pred,
                f"1 prediction file match no ground-truth case: {PATIENT}/{PATIENT}_99_mask.tif", absent=[tmp / "ev"])


def _pairing_extra_nifti_case(tmp):
    root = nifti_set(tmp)
    pred = tmp / "pred"
    shutil.copytree(root / "labelsTr", pred)
    shutil.copy(pred / "hippocampus_001.nii.gz", pred / "hippocampus_999.nii.gz")
    return Case(["evaluate", pred, root, "--out", tmp / "ev"], pred, "hippocampus_999.nii.gz", absent=[tmp / "ev"])


def _pairing_extra_png(tmp):
    root = folder_set(tmp, {s: np.pad(np.full((4, 4), 255, np.uint8), 6) for s in ("a", "b")})
    pred = tmp / "pred"
    shutil.copytree(root / "masks", pred)
    shutil.copy(pred / "a.png", pred / "c.png")
    return Case(["evaluate", pred, root, "--out", tmp / "ev"], pred, "match no ground-truth case: c.png",
                absent=[tmp / "ev"])


def _pairing_missing_prediction(tmp):
    pred, truth = _pred_and_truth(tmp)
    shutil.rmtree(pred / OTHER)
    return Case(["evaluate", pred, truth, "--out", tmp / "ev"], pred / OTHER, f"no prediction for case {OTHER}",
                absent=[tmp / "ev"])


def _off_grid(tmp: Path, case: str, edit) -> tuple[Path, Path, Path]:
    """(truth root, predictions folder, the prediction whose affine ``edit`` changed in place)."""
    root = nifti_set(tmp)
    pred = tmp / "pred"
    shutil.copytree(root / "labelsTr", pred)

    def change(d, a):
        edit(a)
        return d, a

    rewrite_nifti(pred / f"{case}.nii.gz", change)
    return root, pred, pred / f"{case}.nii.gz"


def _grid_nifti_prediction_50mm_off(tmp):
    root, pred, f = _off_grid(tmp, "hippocampus_003", lambda a: a.__setitem__((1, 3), a[1, 3] + 50.0))
    return Case(["evaluate", pred, root, "--out", tmp / "ev"], f,
                "affine differs from the truth image's (origin 50 mm apart", absent=[tmp / "ev"])


def _grid_nifti_prediction_flipped(tmp):
    root, pred, f = _off_grid(tmp, "hippocampus_001", lambda a: a.__setitem__((0, 0), -a[0, 0]))
    return Case(["evaluate", pred, root, "--out", tmp / "ev"], f, "the label is not on the image's voxel grid",
                absent=[tmp / "ev"])


def _grid_nifti_prediction_other_voxel_size(tmp):
    root, pred, f = _off_grid(tmp, "hippocampus_004", lambda a: a.__setitem__((2, 2), a[2, 2] * 1.5))
    return Case(["evaluate", pred, root, "--out", tmp / "ev"], f, "affine differs", absent=[tmp / "ev"])


def _pairing_run_without_config(tmp, run):
    dst = tmp / "run"
    shutil.copytree(run, dst)
    (dst / "config.yaml").unlink()
    return Case(["evaluate", dst], dst / "config.yaml", "run directory without its config.yaml", intact=[dst])


# --------------------------------------------------------------------- runs know whether they finished
def _finished_predict_on_killed_run(tmp, run):
    k = killed(run, tmp)
    return Case(["predict", k, one_patient(tmp), tmp / "out"], k / "fold_0",
                "its training did not finish", absent=[tmp / "out"], intact=[k])


def _finished_predict_on_killed_model_file(tmp, run):
    k = killed(run, tmp)
    return Case(["predict", k / "fold_0" / "model.pt", one_patient(tmp), tmp / "out"], k / "fold_0",
                "model.pt is only the best epoch so far", absent=[tmp / "out"], intact=[k])


def _finished_export_killed_run(tmp, run):
    k = killed(run, tmp)
    return Case(["export", k, tmp / "m.onnx"], k / "fold_0", "pass --unfinished to use it as it is",
                absent=[tmp / "m.onnx", tmp / "m.json"], intact=[k])


def _finished_evaluate_killed_run(tmp, run):
    k = killed(run, tmp)
    return Case(["evaluate", k, "--out", tmp / "ev"], k / "fold_0", "its training did not finish",
                absent=[tmp / "ev"], intact=[k])


def _finished_state_unreadable(tmp, run):
    k = killed(run, tmp)
    (k / "fold_0" / "state.json").write_text("{half")
    return Case(["predict", k, one_patient(tmp), tmp / "out"], k / "fold_0", "its state.json is unreadable",
                absent=[tmp / "out"], intact=[k])


# ------------------------------------------------------------------ one writer; failure leaves nothing
def _writer_overwrite_failure_keeps_earlier_masks(tmp):
    root = copy_lgg(tmp)
    out = tmp / "out"
    (out / PATIENT).mkdir(parents=True)
    (out / PATIENT / f"{PATIENT}_3_mask.tif").write_bytes(b"earlier result")
    f = root / OTHER / sorted(p.name for p in (root / OTHER).glob("*[0-9].tif"))[0]
    f.write_bytes(f.read_bytes()[:300])  # the second patient fails after the first is predicted
    return Case(["predict", "lgg-unet", root, out, "--overwrite"], f, "cannot read TIFF", intact=[out])


def _writer_predict_second_case_fails(tmp):
    root = copy_lgg(tmp)
    out = tmp / "out"
    f = root / OTHER / sorted(p.name for p in (root / OTHER).glob("*[0-9].tif"))[-1]
    f.write_bytes(b"not a tiff")
    return Case(["predict", "lgg-unet", root, out], f, "cannot read TIFF", absent=[out])


BASIC = [f for n, f in sorted(globals().items()) if n.startswith("_") and callable(f)
         and n.split("_")[1] in ("nonfinite", "spacing", "reader", "pairing", "grid", "writer")
         and f.__code__.co_argcount == 1]
WITH_PREPARED = [f for n, f in sorted(globals().items()) if n.startswith("_config_")]
WITH_ONNX = [f for n, f in sorted(globals().items()) if n.startswith("_onnx_")]
WITH_RUN = [f for n, f in sorted(globals().items()) if n.startswith(("_finished_", "_pairing_run"))]


@pytest.mark.parametrize("make", BASIC, ids=lambda f: f.__name__[1:])
def test_outside_input(make, tmp_path, monkeypatch, capsys):
    check(make(tmp_path), tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("make", WITH_PREPARED, ids=lambda f: f.__name__[1:])
def test_outside_config(make, prepared, tmp_path, monkeypatch, capsys):
    check(make(tmp_path, prepared), tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("make", WITH_ONNX, ids=lambda f: f.__name__[1:])
def test_outside_onnx(make, onnx_model, tmp_path, monkeypatch, capsys):
    check(make(tmp_path, onnx_model), tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("make", WITH_RUN, ids=lambda f: f.__name__[1:])
def test_outside_run(make, run, tmp_path, monkeypatch, capsys):
    check(make(tmp_path, run), tmp_path, monkeypatch, capsys)


# ----------------------------------------------------------- more of the same kinds, each its mechanism
def _reader_folder_png_and_jpg_of_one_stem(tmp):
    root = folder_set(tmp)
    save_png(root / "images" / "a.jpg", np.zeros((16, 16), np.uint8))
    return Case(["prepare", "folder", root, tmp / "out"], root / "images", "two files with the stem 'a'",
                absent=[tmp / "out"])


def _pairing_extra_coco_mask(tmp):
    from medseg.data.formats import get_reader

    root = coco_set(tmp, lambda d: None)
    spec = get_reader("coco").scan(root)
    pred = tmp / "pred"
    pred.mkdir()
    reader = get_reader("coco")
    for c in spec.cases:
        reader.write_prediction(spec, c, reader.load(spec, c).mask, pred)
    shutil.copy(next(pred.glob("*_mask.png")), pred / "elsewhere_mask.png")
    return Case(["evaluate", pred, root, "--out", tmp / "ev"], pred, "elsewhere_mask.png", absent=[tmp / "ev"])


_HELD: list[int] = []


def _writer_output_locked_by_another_predict(tmp):
    import fcntl

    root = one_patient(tmp)
    out = tmp / "out"
    out.mkdir()
    fd = os.open(out / ".medseg-lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a predict running in another process holds it
    _HELD.append(fd)
    return Case(["predict", "lgg-unet", root, out], out, "another medseg predict is writing into this folder (process 4242)",
                intact=[out])


def _writer_predict_option_unknown(tmp):
    return Case(["predict", "lgg-unet", one_patient(tmp), tmp / "out", "-o", "colour=red"], "colour",
                "bad option for format 'lgg'", absent=[tmp / "out"])


def _writer_predict_option_without_equals(tmp):
    return Case(["predict", "lgg-unet", one_patient(tmp), tmp / "out", "-o", "nonfinite"], "--option",
                "--option must be key=value, got 'nonfinite'", absent=[tmp / "out"])


MORE = [_reader_folder_png_and_jpg_of_one_stem, _pairing_extra_coco_mask,
        _writer_output_locked_by_another_predict, _writer_predict_option_unknown, _writer_predict_option_without_equals]


@pytest.mark.parametrize("make", MORE, ids=lambda f: f.__name__[1:])
def test_outside_input_more(make, tmp_path, monkeypatch, capsys):
    try:
        check(make(tmp_path), tmp_path, monkeypatch, capsys)
    finally:
        while _HELD:
            os.close(_HELD.pop())


def test_at_least_80_new_cases():
    cases = BASIC + WITH_PREPARED + WITH_ONNX + WITH_RUN + MORE
    assert len(set(cases)) == len(cases) and len(cases) + len(PROBABILITIES) + len(SPACINGS) + len(CONFIG_SETS) + len(COCO_GEOMETRY) >= 80


# ------------------------------------------------------------ handled in a stated way: the right result
def test_nonfinite_voxels_replaced_on_request_with_a_warning(tmp_path, monkeypatch, capsys):
    from medseg.data.prepared import PreparedDataset

    root = nifti_set(tmp_path)
    img = root / "imagesTr" / "hippocampus_003.nii.gz"
    float_nifti(img, lambda d: (d.__setitem__((3, 4, 5), np.nan), d.__setitem__((6, 7, 8), np.inf)))
    for rule in ("zero", "min"):
        code, err = run_cli(monkeypatch, capsys, ["prepare", "nifti", root, tmp_path / rule, "--workers", "1",
                                                  "--spacing", "native", "-o", f"nonfinite={rule}"])
        assert code == 0, err
        assert f"warning: {img}: 2 non-finite voxels (NaN or Inf) in the image" in err and f"nonfinite={rule}" in err
        ds = PreparedDataset.open(tmp_path / rule)
        a = np.asarray(ds.image(ds.index("hippocampus_003")))
        assert np.isfinite(a).all()
        import nibabel as nib

        raw = np.asarray(nib.load(str(img)).dataobj)
        want = 0.0 if rule == "zero" else float(np.nanmin(np.where(np.isfinite(raw), raw, np.nan)))
        assert a.min() == want
        assert "NaN" not in json.dumps(ds.fingerprint) and "Infinity" not in json.dumps(ds.fingerprint)


def test_predict_replaces_a_nan_pixel_on_request_and_finds_the_tumour(tmp_path, monkeypatch, capsys):
    root = one_patient(tmp_path)
    code, err = run_cli(monkeypatch, capsys, ["predict", "lgg-unet", root, tmp_path / "ref", "--no-tta"])
    assert code == 0, err
    f = float_lgg_slice(root, np.nan, n=10)
    code, err = run_cli(monkeypatch, capsys, ["predict", "lgg-unet", root, tmp_path / "out", "--no-tta",
                                              "-o", "nonfinite=min"])
    assert code == 0, err
    assert f"warning: {f}: 1 non-finite voxel (NaN or Inf) in the image: replaced by the channel minimum" in err
    a = np.stack([tifffile.imread(p) > 0 for p in sorted((tmp_path / "ref" / PATIENT).glob("*_mask.tif"))])
    b = np.stack([tifffile.imread(p) > 0 for p in sorted((tmp_path / "out" / PATIENT).glob("*_mask.tif"))])
    assert a.sum() > 1000 and 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.98


def test_files_no_reader_uses_are_named_in_one_warning(tmp_path, monkeypatch, capsys):
    root = copy_lgg(tmp_path)
    (root / PATIENT / "notes.docx").write_bytes(b"x")
    save_png(root / PATIENT / "screenshot.png", np.zeros((4, 4), np.uint8))
    (root / ".DS_Store").write_bytes(b"x")  # hidden: not reported
    (root / "README.md").write_text("companion")  # a data set's own notes: not reported
    code, err = run_cli(monkeypatch, capsys, ["prepare", "lgg", root, tmp_path / "out", "--workers", "1"])
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "not read" in ln]
    assert lines == [f"warning: {root}: 2 files not read (not part of the lgg layout): "
                     f"{PATIENT}/notes.docx, {PATIENT}/screenshot.png"]
    # predicting reads no masks: they are not reported
    code, err = run_cli(monkeypatch, capsys, ["predict", "lgg-unet", root, tmp_path / "pred", "--no-tta"])
    assert code == 0 and "2 files not read" in err and "_mask.tif" not in err


def test_predict_on_an_unfinished_run_goes_on_when_told(tmp_path, run, monkeypatch, capsys):
    k = killed(run, tmp_path)
    code, err = run_cli(monkeypatch, capsys, ["predict", k, one_patient(tmp_path), tmp_path / "out", "--unfinished"])
    assert code == 0, err
    assert f"warning: {k / 'fold_0'}: its training did not finish" in err and "best epoch so far" in err
    assert len(list((tmp_path / "out" / PATIENT).glob("*_mask.tif"))) == 4


def test_a_run_records_that_it_finished(tmp_path, prepared, monkeypatch):
    """state.json says training while fit runs and finished after it; a fold trained by an older medseg
    (no state.json) counts as finished."""
    from medseg.rundir import RunDir
    from medseg.training import run as run_mod

    seen = []
    real = run_mod.fit_fold

    def spy(cfg, task, ds, k, fold_dir, *a, **kw):
        seen.append(json.loads((fold_dir / "state.json").read_text())["state"])
        return real(cfg, task, ds, k, fold_dir, *a, **kw)

    monkeypatch.setattr(run_mod, "fit_fold", spy)
    run_mod.train(config_for(tmp_path, prepared), fold="0", out=tmp_path / "r")
    assert seen == ["training"]
    assert json.loads((tmp_path / "r" / "fold_0" / "state.json").read_text())["state"] == "finished"
    assert RunDir.unfinished(tmp_path / "r" / "fold_0") is None
    (tmp_path / "r" / "fold_0" / "state.json").unlink()
    assert RunDir.unfinished(tmp_path / "r" / "fold_0") is None


def test_a_dead_predicts_staging_folder_is_removed_by_the_next(tmp_path, monkeypatch, capsys):
    root = one_patient(tmp_path)
    out = tmp_path / "out"
    stale = out / ".partial-999999"
    (stale / PATIENT).mkdir(parents=True)
    (stale / PATIENT / "half.tif").write_bytes(b"x")
    code, err = run_cli(monkeypatch, capsys, ["predict", "lgg-unet", root, out, "--no-tta"])
    assert code == 0, err  # only medseg's own bookkeeping was there: not "a folder that holds results"
    assert sorted(p.name for p in out.iterdir()) == [PATIENT]
    assert len(list((out / PATIENT).glob("*_mask.tif"))) == 4


def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    root = one_patient(tmp_path)
    monkeypatch.setattr(np, "save", _enospc)
    code, err = run_cli(monkeypatch, capsys, ["prepare", "lgg", root, tmp_path / "prep", "--workers", "1"])
    assert_one_line_error(code, err, tmp_path / "prep", "No space left on device")
    monkeypatch.undo()
    monkeypatch.setattr(tifffile, "imwrite", _enospc)
    code, err = run_cli(monkeypatch, capsys, ["predict", "lgg-unet", root, tmp_path / "out", "--no-tta"])
    assert_one_line_error(code, err, tmp_path / "out", "No space left on device")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_in_training_names_the_run_and_leaves_nothing(tmp_path, prepared, monkeypatch, capsys):
    monkeypatch.setattr(np, "savez_compressed", _enospc)  # the first validation predictions
    code, err = run_cli(monkeypatch, capsys, ["train", config_for(tmp_path, prepared), "--out", tmp_path / "run"])
    assert_one_line_error(code, err, tmp_path / "run", "No space left on device")
    assert not (tmp_path / "run").exists()


def test_diverged_training_stops_and_writes_no_model(tmp_path, prepared, monkeypatch, capsys):
    """A NaN that reached the prepared arrays (written by hand, past prepare's check) makes the loss NaN:
    training stops at that step, and the run it created goes."""
    ds = tmp_path / "lgg"
    shutil.copytree(prepared, ds)
    for f in (ds / "cases").glob("*.img.npy"):
        a = np.load(f).astype(np.float32)
        a[:] = np.nan
        np.save(f, a)
    code, err = run_cli(monkeypatch, capsys, ["train", config_for(tmp_path, ds), "--out", tmp_path / "run"])
    assert_one_line_error(code, err, ds, "the training loss is nan at epoch 1, step 1: training diverged")
    assert not (tmp_path / "run").exists()


def test_a_bundle_with_nan_weights_is_not_written(tmp_path):
    import torch

    from medseg.bundle import load_bundle, save_bundle
    from conftest import ROOT
    from medseg.errors import MedsegError

    b = load_bundle(ROOT / "src" / "medseg" / "weights" / "lgg-unet.pt")
    name = next(k for k, t in b["state_dict"].items() if t.is_floating_point())
    b["state_dict"][name] = torch.full_like(b["state_dict"][name], float("nan"))
    with pytest.raises(MedsegError, match=f"weights hold NaN \\({name}\\)"):
        save_bundle(b, tmp_path / "model.pt")
    assert not list(tmp_path.iterdir())


def test_library_warnings_are_one_line(capsys):
    import warnings

    from medseg.errors import warn, warning_lines

    with warning_lines():
        warnings.warn("PatientName is in an\n old style", UserWarning)
        warn("a stated choice", "some/file")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: PatientName is in an old style (UserWarning from tests/test_outside_inputs.py)")
    assert err[1] == "warning: some/file: a stated choice"


def test_members_of_a_killed_train_die_with_it(tmp_path, prepared):
    """SIGKILL of `train` with two members: neither member goes on writing checkpoints."""
    import signal

    cfg = config_for(tmp_path, prepared)
    cfg.write_text(cfg.read_text().replace("epochs: 1", "epochs: 1000").replace("steps_per_epoch: 1", "steps_per_epoch: 2")
                   + "  members: 2\n")
    p = subprocess.Popen([sys.executable, "-m", "medseg", "train", str(cfg), "--out", str(tmp_path / "run")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    members: list[int] = []
    while time.time() < deadline and p.poll() is None and len(members) < 2:
        out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        members = [int(c) for c in out]
        time.sleep(0.3)
    while time.time() < deadline and p.poll() is None and not list((tmp_path / "run").glob("fold_0/member_*/checkpoints/last.ckpt")):
        time.sleep(0.3)
    assert p.poll() is None and len(members) == 2, p.stderr.read().decode()[-2000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()

    def running(pid: int) -> bool:
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    deadline = time.time() + 20
    while any(running(m) for m in members) and time.time() < deadline:
        time.sleep(0.2)
    assert not [m for m in members if running(m)], "member processes outlived the killed train"


def test_a_voxel_spacing_that_is_not_positive_is_refused_by_every_reader():
    from medseg.data.formats.base import CaseData
    from medseg.errors import MedsegError

    image = np.zeros((2, 1, 4, 4), np.float32)
    CaseData(image=image, mask=None, spacing=(1.0, 0.5, 0.5)).check("x")
    for bad in ((0.0, 1.0, 1.0), (float("nan"), 1.0, 1.0), (1.0, -1.0, 1.0), (1.0, float("inf"), 1.0)):
        with pytest.raises(MedsegError, match="each must be a positive finite number"):
            CaseData(image=image, mask=None, spacing=bad).check("case.nii.gz")


def test_workers_below_one_are_refused(tmp_path, monkeypatch, capsys):
    check(Case(["prepare", "lgg", LGG_TINY, tmp_path / "out", "--workers", "0"], "--workers",
               "--workers must be 1 or more, got 0", absent=[tmp_path / "out"]), tmp_path, monkeypatch, capsys)


def test_a_truth_folder_evaluated_against_itself_has_no_extra_predictions(tmp_path, monkeypatch, capsys):
    """The images beside the masks in an LGG folder are not predictions: only the layout's prediction names
    (``Reader.prediction_files``) count as extras."""
    code, err = run_cli(monkeypatch, capsys, ["evaluate", LGG_TINY, LGG_TINY, "--out", tmp_path / "ev", "--no-report"])
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["dataset"]["mean_dice"] == 1.0
