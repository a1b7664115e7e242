"""The evaluate stage end to end on tiny fixtures: every PRED/TRUTH kind, the CSV/JSON schema,
hand-checked values, and malformed predictions -> clear errors."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from medseg.data.formats import get_reader
from medseg.errors import MedsegError
from medseg.evaluation.evaluate import CASE_COLUMNS, SLICE_COLUMNS, evaluate

LGG = FIXTURES / "lgg_tiny" / "kaggle_3m"
NIFTI = FIXTURES / "nifti"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def lgg_prepared(tmp_path_factory) -> Path:
    from medseg.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("lgg")
    return prepare("lgg", LGG, tmp / "prepared", folds=2, workers=1)


def write_lgg_predictions(out: Path, change) -> dict[str, np.ndarray]:
    """Predictions in the LGG layout: ``change(case_id, truth_mask) -> mask``; returns them by case."""
    reader = get_reader("lgg")
    spec = reader.scan(LGG)
    preds = {}
    for case in spec.cases:
        truth = reader.load(spec, case).mask
        preds[case.id] = change(case.id, truth.copy())
        reader.write_prediction(spec, case, preds[case.id], out)
    return preds


def test_lgg_folder_vs_prepared_schema_and_values(tmp_path: Path, lgg_prepared: Path):
    def change(cid, m):
        if cid.endswith("5395_19981004"):
            m[:] = 0  # missed entirely
            return m
        m[0, 0, 0:4, 0:5] = 1  # 20 false-positive pixels on the first slice
        return m

    preds = write_lgg_predictions(tmp_path / "pred", change)
    s = evaluate(tmp_path / "pred", lgg_prepared, out=tmp_path / "ev", report=False)
    rows = read_csv(tmp_path / "ev" / "metrics.csv")
    assert list(rows[0]) == CASE_COLUMNS
    assert [r["case_id"] for r in rows] == ["TCGA_CS_5393_19990606", "TCGA_CS_5395_19981004"]
    r0, r1 = rows
    t0 = int(r0["truth_voxels"])
    assert t0 > 0 and int(r0["pred_voxels"]) == t0 + 20
    assert float(r0["dice"]) == pytest.approx(2 * t0 / (2 * t0 + 20))
    assert float(r0["iou"]) == pytest.approx(t0 / (t0 + 20))
    assert float(r0["recall"]) == 1.0
    # missed tumour: Dice 0, distances = the volume diagonal (4 slices x 256 x 256 at 1 mm)
    assert float(r1["dice"]) == 0.0 and float(r1["pred_voxels"]) == 0
    assert float(r1["hd95"]) == pytest.approx(math.sqrt(4**2 + 256**2 + 256**2))
    slices = read_csv(tmp_path / "ev" / "metrics_slices.csv")
    assert list(slices[0]) == SLICE_COLUMNS
    assert len(slices) == 8 and slices[0]["slice"] == "3"  # numeric slice order 3, 4, 9, 10
    s0 = slices[0]  # case 0, first slice: the truth plus 20 false-positive pixels
    tp0, pp0 = int(s0["truth_pixels"]), int(s0["pred_pixels"])
    assert pp0 == tp0 + 20 and float(s0["dice"]) == pytest.approx(2 * tp0 / (2 * tp0 + 20))
    assert float(s0["precision"]) == pytest.approx(tp0 / pp0) and float(s0["recall"]) == (1.0 if tp0 else 0.0)
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(s))
    for key in ("n_cases", "n_patients", "classes", "conventions", "dataset", "per_class", "per_patient",
                "patient_dice_empty_one", "patients", "slices", "files", "seconds"):
        assert key in summary
    assert summary["per_class"]["tumor"]["dice"]["mean"] == pytest.approx((float(r0["dice"]) + 0) / 2)
    assert summary["dataset"]["miou"] == pytest.approx((float(r0["iou"]) + 0) / 2)
    assert summary["conventions"]["empty"] == "skip"
    per_slice = [float(r["precision"]) for r in slices if r["precision"] != ""]
    assert summary["slices"]["tumor"]["precision"]["mean"] == pytest.approx(np.mean(per_slice))
    assert summary["slices"]["tumor"]["recall"]["n"] == sum(r["recall"] != "" for r in slices)
    assert "report" not in summary["files"]
    # the same truth read from the native layout gives the same rows
    evaluate(tmp_path / "pred", LGG, out=tmp_path / "ev2", report=False)
    assert read_csv(tmp_path / "ev2" / "metrics.csv") == rows
    # and a prepared dataset as PRED is the truth itself: perfect
    s3 = evaluate(lgg_prepared, lgg_prepared, out=tmp_path / "ev3", report=False)
    assert s3["dataset"]["mean_dice"] == 1.0 and s3["dataset"]["mean_hd95"] == 0.0
    assert preds  # written


@pytest.mark.filterwarnings("error")  # empty masks: no RuntimeWarning (0/0, mean of empty slice)
def test_empty_convention_option(tmp_path: Path, lgg_prepared: Path):
    # a case without tumour (truth emptied in a copy of the layout), predicted empty
    src = tmp_path / "kaggle_3m"
    shutil.copytree(LGG, src)
    import tifffile

    for f in (src / "TCGA_CS_5395_19981004").glob("*_mask.tif"):
        tifffile.imwrite(f, np.zeros((256, 256), np.uint8))
    reader = get_reader("lgg")
    spec = reader.scan(src)
    for case in spec.cases:
        reader.write_prediction(spec, case, reader.load(spec, case).mask, tmp_path / "pred")
    got = {}
    for empty in ("skip", "one", "zero"):
        s = evaluate(tmp_path / "pred", src, out=tmp_path / empty, empty=empty, report=False)
        got[empty] = read_csv(tmp_path / empty / "metrics.csv")[1]
        assert s["patient_dice_empty_one"]["tumor"] == 1.0  # the LGG headline ignores the option
    assert got["skip"]["dice"] == "" and got["skip"]["hd95"] == ""
    assert got["one"]["dice"] == "1" and got["one"]["hd95"] == "0" and got["one"]["nsd"] == "1"
    assert got["zero"]["dice"] == "0" and float(got["zero"]["hd95"]) == pytest.approx(math.sqrt(4**2 + 2 * 256**2))
    with pytest.raises(MedsegError, match="unknown empty-mask convention 'nan'"):
        evaluate(tmp_path / "pred", src, out=tmp_path / "x", empty="nan")


def test_malformed_lgg_predictions(tmp_path: Path, lgg_prepared: Path):
    write_lgg_predictions(tmp_path / "pred", lambda cid, m: m)
    missing = tmp_path / "pred" / "TCGA_CS_5395_19981004" / "TCGA_CS_5395_19981004_9_mask.tif"
    missing.unlink()
    with pytest.raises(MedsegError, match="no prediction for case TCGA_CS_5395_19981004 slice 9 "
                                          r"\(expected TCGA_CS_5395_19981004_9_mask.tif\)"):
        evaluate(tmp_path / "pred", lgg_prepared, out=tmp_path / "ev", report=False)
    import tifffile

    tifffile.imwrite(missing, np.zeros((128, 256), np.uint8))
    with pytest.raises(MedsegError, match="prediction is 128x256 but the truth slice is 256x256") as e:
        evaluate(tmp_path / "pred", lgg_prepared, out=tmp_path / "ev", report=False)
    assert e.value.path == str(missing)
    with pytest.raises(MedsegError, match="TRUTH is required unless PRED is a run directory"):
        evaluate(tmp_path / "pred", None)


def make_run(tmp: Path, prepared: Path, bad: str | None = None) -> Path:
    from medseg.data.prepared import PreparedDataset

    ds = PreparedDataset.open(prepared)
    run = tmp / "run"
    (run / "fold_0" / "val_predictions").mkdir(parents=True)
    (run / "config.yaml").write_text(f"data:\n  prepared: {prepared}\nmodel:\n  name: unet\n")
    rec = ds.cases[1]
    m = np.asarray(ds.mask(rec.id)).copy()
    m[:, :, 100:110, 100:110] = 1  # false positives on every slice
    if bad == "shape":
        m = m[:, :, :100]
    payload = {"prob": m.astype(np.float16)} if bad == "nomask" else {"mask": m, "prob": m.astype(np.float16)}
    np.savez(run / "fold_0" / "val_predictions" / f"{rec.id}.npz", **payload)
    with open(run / "fold_0" / "metrics.csv", "w") as f:
        f.write("epoch,train_loss,val_loss,val_dice_tumor,lr\n")
        for ep in range(5):
            f.write(f"{ep},{1 / (ep + 1):.3f},{1.2 / (ep + 1):.3f},{0.5 + ep / 10:.2f},0.001\n")
    return run


def test_run_dir(tmp_path: Path, lgg_prepared: Path):
    run = make_run(tmp_path, lgg_prepared)
    s = evaluate(run)
    ev = run / "evaluation"
    rows = read_csv(ev / "metrics.csv")
    assert [r["case_id"] for r in rows] == ["TCGA_CS_5395_19981004"]  # validation cases only
    t = int(rows[0]["truth_voxels"])
    assert s["kind"] == "run" and int(rows[0]["pred_voxels"]) > t
    html = (ev / "report.html").read_text()
    curves = html.split("<section id='curves'>")[1].split("</section>")[0]
    assert curves.count("<img alt='fold_0 training curves' src='data:image/png;base64,") == 1
    for bad, msg in (("nomask", "no 'mask' array in the file"), ("shape", r"prediction shape \(4, 1, 100, 256\) differs")):
        shutil.rmtree(run)
        make_run(tmp_path, lgg_prepared, bad=bad)
        with pytest.raises(MedsegError, match=msg):
            evaluate(run, report=False)


def test_nifti_predictions_folder(tmp_path: Path):
    reader = get_reader("nifti")
    spec = reader.scan(NIFTI)
    case = spec.cases[0]
    data = reader.load(spec, case)
    pred = data.mask.copy()
    k = int(np.flatnonzero(pred.reshape(pred.shape[0], -1).any(1))[0])
    pred[k] = 0  # drop the first slice holding labels: lower Dice, spacing-aware distances
    for c in spec.cases:
        reader.write_prediction(spec, c, pred if c is case else reader.load(spec, c).mask, tmp_path / "pred")
    s = evaluate(tmp_path / "pred", NIFTI, out=tmp_path / "ev", report=False)
    rows = read_csv(tmp_path / "ev" / "metrics.csv")
    assert s["classes"] == spec.classes and len(rows) == len(spec.cases) * len(spec.classes)
    assert not (tmp_path / "ev" / "metrics_slices.csv").exists()  # 3D data: no per-slice table
    first = [r for r in rows if r["case_id"] == case.id]
    for k_, r in enumerate(first):
        t = data.mask[:, k_].astype(bool)
        p = pred[:, k_].astype(bool)
        assert float(r["dice"]) == pytest.approx(2 * (t & p).sum() / (t.sum() + p.sum()))
    assert all(float(r["dice"]) == 1.0 for r in rows if r["case_id"] != case.id)
    (tmp_path / "pred" / f"{spec.cases[1].id}.nii.gz").unlink()
    with pytest.raises(MedsegError, match=f"no prediction for case {spec.cases[1].id}"):
        evaluate(tmp_path / "pred", NIFTI, out=tmp_path / "ev", report=False)


def test_png_folder_predictions(tmp_path: Path):
    from PIL import Image

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(root / "images" / f"img{i}.png")
        lab = np.zeros((20, 24), np.uint8)
        lab[2:8, 3:9] = 1
        lab[10:15, 10:20] = 2
        Image.fromarray(lab).save(root / "masks" / f"img{i}.png")
    reader = get_reader("folder")
    spec = reader.scan(root)
    assert spec.classes == ["class1", "class2"]
    for c in spec.cases:
        m = reader.load(spec, c).mask.copy()
        if c.id == "img1":
            m[0, 1] = 0  # class2 missed
        reader.write_prediction(spec, c, m, tmp_path / "pred")
    evaluate(tmp_path / "pred", root, out=tmp_path / "ev", report=False)
    rows = {(r["case_id"], r["class"]): r for r in read_csv(tmp_path / "ev" / "metrics.csv")}
    assert rows[("img1", "class2")]["dice"] == "0" and rows[("img1", "class1")]["dice"] == "1"
    assert rows[("img0", "class2")]["dice"] == "1"


def test_uwmgi_submission(tmp_path: Path):
    from medseg.data.formats.uwmgi import read_train_csv, write_submission
    from medseg.data.rle import decode, encode
    from medseg.data.formats.uwmgi_synthetic import write_uwmgi_synthetic
    from medseg.evaluation.uwmgi_score import uwmgi_score

    root = write_uwmgi_synthetic(tmp_path / "uw", n_cases=2, days_per_case=1, slices_per_day=6, seed=1)
    truth = read_train_csv(root / "train.csv")
    spec = get_reader("uwmgi").scan(root)
    shapes = {sid: tuple(c.sources["size"]) for c in spec.cases for sid in c.sources["slices"]}
    # perfect submission
    rows = [(sid, cls, rle) for sid, per in truth.items() for cls, rle in per.items()]
    write_submission(rows, tmp_path / "perfect.csv")
    s = evaluate(tmp_path / "perfect.csv", root, out=tmp_path / "ev0", report=False)
    assert s["uwmgi"]["score"] == 1.0
    # a worse one: stomach shifted by 3 pixels everywhere
    sub = {}
    for sid, per in truth.items():
        for cls, rle in per.items():
            m = decode(rle, shapes[sid])
            sub[(sid, cls)] = encode(np.roll(m, 3, axis=1)) if cls == "stomach" else rle
    write_submission([(i, c, r) for (i, c), r in sub.items()], tmp_path / "sub.csv")
    s = evaluate(tmp_path / "sub.csv", root / "train.csv", images=root / "train", out=tmp_path / "ev1", report=False)
    ref = uwmgi_score(sub, {(i, c): r for i, per in truth.items() for c, r in per.items()}, shapes)
    assert s["uwmgi"]["score"] == pytest.approx(ref.score, abs=1e-12) and ref.score < 1.0
    assert s["n_cases"] == 2 and s["n_patients"] == 2
    # the same against the prepared dataset (slice ids come from the prepared records)
    from medseg.data.prepare import prepare

    prep = prepare("uwmgi", root, tmp_path / "prep", folds=2, workers=1)
    s2 = evaluate(tmp_path / "sub.csv", prep, out=tmp_path / "ev1b", report=False)
    assert s2["uwmgi"] == s["uwmgi"]
    # --uw-score mlebench: the public grader's definition, from the same submission
    s3 = evaluate(tmp_path / "sub.csv", root, out=tmp_path / "ev1c", report=False, score_variant="mlebench")
    ref3 = uwmgi_score(sub, {(i, c): r for i, per in truth.items() for c, r in per.items()}, shapes, variant="mlebench")
    assert s3["uwmgi"]["variant"] == "mlebench" and s["uwmgi"]["variant"] == "competition"
    assert s3["uwmgi"]["score"] == pytest.approx(ref3.score, abs=1e-12)
    assert s3["uwmgi"]["dice"] == pytest.approx(s["uwmgi"]["dice"], abs=1e-12)
    assert read_csv(tmp_path / "ev1b" / "metrics.csv") == read_csv(tmp_path / "ev1" / "metrics.csv")
    # malformed submissions
    items = list(sub.items())
    write_submission([(i, c, r) for (i, c), r in items[1:]], tmp_path / "missing.csv")
    with pytest.raises(MedsegError, match=f"no row for id {items[0][0][0]}, class {items[0][0][1]}"):
        evaluate(tmp_path / "missing.csv", root, out=tmp_path / "ev2", report=False)
    write_submission([(i, c, r) for (i, c), r in items] + [("case99_day1_slice_0001", "stomach", "")],
                     tmp_path / "extra.csv")
    with pytest.raises(MedsegError, match="1 ids of the submission are not in the ground truth, e.g. case99_day1"):
        evaluate(tmp_path / "extra.csv", root, out=tmp_path / "ev3", report=False)
    write_submission([(i, c, "5 3 1 2" if k == 4 else r) for k, ((i, c), r) in enumerate(items)], tmp_path / "bad.csv")
    with pytest.raises(MedsegError, match="bad RLE .*run 2: start 1 is not after run 1's start 5"):
        evaluate(tmp_path / "bad.csv", root, out=tmp_path / "ev4", report=False)


def test_cli_errors(tmp_path: Path):
    from typer.testing import CliRunner

    from medseg.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nothing"), str(LGG), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, MedsegError) and "no such file or folder" in str(res.exception)


def test_plain_folder_of_label_maps_as_truth(tmp_path: Path):
    """TRUTH may be a bare folder of label maps; predictions are paired with it by file name."""
    from PIL import Image

    t1 = np.zeros((10, 10), np.uint8)
    t1[2:6, 2:6] = 1
    t1[7:9, 7:9] = 2
    p1 = t1.copy()
    p1[2:4, 2:6] = 0  # half of label 1 missed
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred" / "masks").mkdir(parents=True)
    Image.fromarray(t1).save(tmp_path / "truth" / "a.png")
    Image.fromarray(p1).save(tmp_path / "pred" / "masks" / "a.png")  # as `medseg predict` lays them out
    s = evaluate(tmp_path / "pred", tmp_path / "truth", out=tmp_path / "ev", report=False)
    assert s["classes"] == ["label_1", "label_2"]
    assert s["per_class"]["label_1"]["dice"]["mean"] == pytest.approx(2 * 8 / (16 + 8))
    assert s["per_class"]["label_2"]["dice"]["mean"] == 1.0
    assert s["conventions"]["distance_unit"] == "px"


def test_label_folder_of_nifti_volumes_keeps_spacing_in_mm(tmp_path: Path):
    import nibabel as nib

    lab = np.zeros((8, 9, 6), np.uint8)
    lab[2:5, 2:6, 1:4] = 1
    for d in ("truth", "pred"):
        (tmp_path / d).mkdir()
        nib.save(nib.Nifti1Image(lab, np.diag([2.0, 2.0, 3.0, 1.0])), str(tmp_path / d / "c1.nii.gz"))
    s = evaluate(tmp_path / "pred", tmp_path / "truth", out=tmp_path / "ev", report=False)
    assert s["per_class"]["foreground"]["dice"]["mean"] == 1.0
    assert s["conventions"]["distance_unit"] == "mm" and s["spatial_dims"] == 3


def test_a_data_set_score_is_a_plug_in(tmp_path: Path):
    """A data set's own score comes from the registry (``medseg.scores``): evaluate reports whatever score
    applies to the truth's format, and names none itself."""
    from PIL import Image

    from medseg.scores import SCORES, TaskScore

    @SCORES.register("test_fraction")
    class _Fraction(TaskScore):
        name, label = "test_fraction", "fraction score"

        @classmethod
        def applies(cls, fmt, classes):
            return fmt == "folder" and classes == ["spot"]

        def class_terms(self, pred, truth):  # the Dice sum: matched pixels / truth pixels
            return np.array([float((pred & truth).sum()), float(truth.sum()), 0.0, 0.0])

        def value(self, total):
            return total[..., 0] / np.maximum(total[..., 1], 1)

    try:
        for d in ("images", "masks", "pred/masks"):
            (tmp_path / d).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "a.png")
        t = np.zeros((8, 8), np.uint8)
        t[2:6, 2:6] = 255
        Image.fromarray(t).save(tmp_path / "masks" / "a.png")
        p = t.copy()
        p[2:4] = 0
        Image.fromarray(p).save(tmp_path / "pred" / "masks" / "a.png")
        s = evaluate(tmp_path / "pred", tmp_path, out=tmp_path / "ev", report=False, fmt="folder",
                     options={"classes": "spot"})
        assert s["task_score"] == "test_fraction"
        assert s["test_fraction"]["score"] == pytest.approx(8 / 16) and s["test_fraction"]["label"] == "fraction score"
    finally:
        SCORES._entries.pop("test_fraction")
