"""The quality estimate: signals on planted cases (a member that disagrees, an empty prediction, an
out-of-distribution intensity), the calibration and review curve by hand, and `calibrate` / `predict
--quality` / `evaluate` / `view` / RTSTRUCT and SEG on a tiny trained run."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import FIXTURES, tiny_run
from medseg.errors import MedsegError
from medseg.text import portable
from medseg.inference.quality import (Calibration, binary_entropy, build_reference, case_intensity_z, count_components,
                                      dice, intensity_percentiles, predict_quality, predict_views, review_curve,
                                      spearman, structure_signals, views)
from test_bad_inputs import Case, run_cli
from test_bad_inputs import _check


# ------------------------------------------------------------------------------ planted cases
def _spec(quality=None):
    from medseg.bundle import PipelineSpec

    return PipelineSpec.read({"name": "planted", "arch": {"name": "unet", "in_channels": 1, "out_channels": 2},
                              "classes": ["organ"], "class_kind": "multiclass", "channels": ["MR"],
                              "input": {"mode": "2d", "divisor": 1}, "normalization": {"mode": "zscore_case"},
                              "postprocess": {}, "tta": {}, "quality": quality}, "planted")


def _net(logit):
    """A 'network' whose class logit is ``logit[h, w]`` on every slice (background logit 0)."""
    def f(x):
        b, _, h, w = x.shape
        out = np.zeros((b, 2, h, w), np.float32)
        out[:, 1] = logit
        return out
    return f


def _segmenter(*logits, quality=None):
    from medseg.inference.segmenter import Segmenter

    return Segmenter(_spec(quality), [_net(lg) for lg in logits], tta=False)


H, W = 8, 16
IMAGE = np.arange(2 * H * W, dtype=np.float32).reshape(2, 1, H, W)


def _columns(cols: range, inside: float, outside: float = -10.0) -> np.ndarray:
    lg = np.full((H, W), outside, np.float32)
    lg[:, cols] = inside
    return lg


def test_a_member_that_disagrees():
    # member A: the organ is columns 0-7; member B: columns 0-3 sure, 4-7 logit -2 (p = 0.119): the mean
    # there is (0.99995 + 0.119) / 2 > 0.5, so the final mask is A's
    b = _columns(range(0, 4), 10.0)
    b[:, 4:8] = -2.0
    seg = _segmenter(_columns(range(0, 8), 10.0), b)
    assert len(views(seg)) == 2
    pred, vm, prob = predict_views(seg, IMAGE, spatial_dims=3)
    np.testing.assert_array_equal(pred.mask[:, 0], np.broadcast_to(_columns(range(0, 8), 1, 0), (2, H, W)))
    np.testing.assert_array_equal(pred.mask, seg.predict(IMAGE, spatial_dims=3).mask)  # the usual prediction
    assert vm[1, :, 0].sum() == 2 * H * 4
    _, rows, unc = predict_quality(seg, IMAGE, spatial_dims=3, uncertainty=True)
    r = rows[0]
    # Dice(A, final) = 1, Dice(B, final) = 2*4/(4+8) = 2/3
    assert r["disagreement"] == pytest.approx(1 - (1 + 2 / 3) / 2)
    sure = 1 / (1 + math.exp(-10))
    half = (sure + 1 / (1 + math.exp(2))) / 2
    h = lambda p: -(p * math.log2(p) + (1 - p) * math.log2(1 - p))  # noqa: E731
    assert r["entropy"] == pytest.approx((h(sure) + h(half)) / 2, abs=2e-3)  # float16 probabilities
    assert r["components"] == 1 and r["volume"] == 2 * H * 8 and r["volume_unit"] == "voxels"
    assert not r["calibrated"] and r["predicted_dice"] == pytest.approx(1 - r["disagreement"])
    # per voxel: the share of views against the mask, 1/2 where B leaves A's columns 4-7
    np.testing.assert_allclose(unc[0, 0, 0], [0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5] + [0] * 8)


def test_the_views_of_a_weighted_ensemble_are_its_prediction():
    from medseg.inference.segmenter import Segmenter

    a = _segmenter(_columns(range(0, 8), 10.0))
    b = _segmenter(_columns(range(0, 12), 1.0), _columns(range(0, 2), 10.0))  # two folds
    ens = Segmenter.ensemble([a, b], weights=[3, 1])
    vs = views(ens)
    assert [round(w, 4) for w, _ in vs] == [0.75, 0.125, 0.125]
    pred, vm, prob = predict_views(ens, IMAGE, spatial_dims=3)
    ref = ens.predict(IMAGE, spatial_dims=3)
    np.testing.assert_array_equal(pred.mask, ref.mask)
    np.testing.assert_allclose(prob.astype(np.float32), ref.prob.astype(np.float32), atol=1e-3)
    assert [int(v.sum()) for v in vm] == [2 * H * 8, 2 * H * 12, 2 * H * 2]


def test_one_network_without_tta_gets_its_flips_as_views():
    from medseg.inference.quality import ensure_views

    seg = _segmenter(_columns(range(0, 8), 10.0))
    assert len(views(seg)) == 1 and ensure_views(seg) and len(views(seg)) == 3
    assert seg.flips == [[-1], [-2]] and not ensure_views(seg)  # already has views: unchanged


def test_components_are_counted_before_the_largest_component_rule():
    lg = _columns(range(0, 3), 10.0)
    lg[:, 8:11] = 10.0  # two separate bands
    seg = _segmenter(lg)
    seg.spec.postprocess = {**seg.spec.postprocess, "largest_cc": True}
    pred, rows, _ = predict_quality(seg, IMAGE, spatial_dims=3)
    assert rows[0]["components"] == 2 and count_components(pred.mask[:, 0], volume=True) == 1


def test_an_empty_prediction_far_below_the_training_volumes():
    ref = {"unit": "voxels", "classes": {"organ": {"log_mean": math.log1p(100.0), "log_std": 0.5, "present": 1.0}}}
    rows = [{"disagreement": d, "entropy": 0.2, "volume": v, "volume_z": (math.log1p(v) - math.log1p(100)) / 0.5,
             "components": 1 if v else 0, "intensity_z": 0.3} for d, v in
            [(0.02, 100), (0.05, 90), (0.1, 130), (0.3, 40), (0.01, 110), (0.6, 0), (0.5, 0)]]
    real = [0.95, 0.9, 0.85, 0.6, 0.97, 0.0, 0.0]
    cal = Calibration.fit(rows, real).to_dict()
    seg = _segmenter(np.full((H, W), -10.0, np.float32), quality={"reference": ref, "calibration": cal})
    _, out, _ = predict_quality(seg, IMAGE, spatial_dims=3)
    r = out[0]
    assert r["volume"] == 0 and r["components"] == 0 and r["entropy"] == 0.0 and r["disagreement"] == 0.0
    assert r["volume_z"] == pytest.approx(-math.log1p(100) / 0.5)
    assert r["calibrated"] and r["review"] and r["predicted_dice"] < 0.5  # both views agree, yet nothing is there


def test_an_out_of_distribution_intensity():
    body = np.arange(1, 101, dtype=np.float32).reshape(1, 1, 10, 10)
    img = np.zeros((1, 1, 12, 12), np.float32)  # a black border: the minimum, left out as background
    img[:, :, 1:11, 1:11] = body
    # numpy's linear percentiles of 1..100: 1 + 0.05*99, 1 + 0.5*99, 1 + 0.95*99
    np.testing.assert_allclose(intensity_percentiles(img), [[5.95, 50.5, 95.05]])
    mask = np.zeros((1, 1, 12, 12), np.uint8)
    ref = build_reference([(img, mask, None), (img + 10 * (img > 0), mask, None)], ["organ"])
    np.testing.assert_allclose(ref["intensity"]["mean"], [[10.95, 55.5, 100.05]])
    np.testing.assert_allclose(ref["intensity"]["std"], [[5.0, 5.0, 5.0]])
    assert case_intensity_z(img + 5 * (img > 0), ref) == pytest.approx(0.0)
    assert case_intensity_z(img * 3, ref) == pytest.approx(np.mean(np.abs(
        (np.array([5.95, 50.5, 95.05]) * 3 - [10.95, 55.5, 100.05]) / 5.0)))
    assert ref["classes"]["organ"]["present"] == 0.0
    # through predict: the row carries the case's distance, and a calibration that learnt "far = worse" flags it
    rows = [{"disagreement": 0.05, "entropy": 0.2, "volume": 10, "volume_z": 0.0, "components": 1, "intensity_z": z}
            for z in (0.1, 0.3, 0.2, 4.0, 5.0, 0.4)]
    cal = Calibration.fit(rows, [0.9, 0.88, 0.91, 0.3, 0.2, 0.87]).to_dict()
    seg = _segmenter(np.zeros((12, 12), np.float32), quality={"reference": ref, "calibration": cal})
    _, near, _ = predict_quality(seg, img + 5 * (img > 0), spatial_dims=3)
    _, far, _ = predict_quality(seg, img * 3, spatial_dims=3)
    assert near[0]["intensity_z"] == pytest.approx(0.0) and far[0]["intensity_z"] == pytest.approx(
        case_intensity_z(img * 3, ref))
    assert not near[0]["review"] and far[0]["review"] and far[0]["predicted_dice"] < near[0]["predicted_dice"]


def test_signals_by_hand():
    assert dice(np.zeros(4), np.zeros(4)) == 1.0 and dice(np.array([1, 1, 0]), np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert binary_entropy(np.array([0.5]))[0] == pytest.approx(1.0)
    m = np.zeros((3, 6, 6), np.uint8)
    m[0, :2, :2] = 1
    m[1, :2, :2] = 1  # joined to slice 0 in 3D
    m[2, 4:, 4:] = 1
    assert count_components(m, volume=True) == 2 and count_components(m, volume=False) == 3
    s = structure_signals(m, np.stack([m, np.zeros_like(m)]), np.full(m.shape, 0.5, np.float32),
                          components=2, voxel=0.002, reference=None, cls="x", intensity_z=None)
    assert s["disagreement"] == pytest.approx(0.5) and s["entropy"] == pytest.approx(1.0)
    assert s["volume"] == pytest.approx(12 * 0.002) and s["volume_z"] is None and s["components"] == 2


def test_review_curve_and_spearman_by_hand():
    pred = [0.9, 0.2, 0.8, 0.3, 0.95]
    real = [0.95, 0.1, 0.5, 0.9, 0.92]  # failures (< 0.7): cases 1 and 2
    # by rising prediction: 1, 3, 2, 0, 4; 10 and 20 % of 5 cases round up to 1 case, 30 % to 2, 60 % to 3
    rc = review_curve(pred, real, shares=(0.1, 0.2, 0.3, 0.6))
    assert (rc["failures"], rc["caught_at_10"], rc["caught_at_20"], rc["caught_at_30"], rc["caught_at_60"]) == (2, 0.5, 0.5, 0.5, 1.0)
    assert review_curve([0.5, 0.6], [0.9, 0.8])["caught_at_20"] is None  # no failure to catch
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0) and spearman([1, 1, 1], [1, 2, 3]) is None


def test_calibration_learns_the_direction_and_round_trips():
    rng = np.random.default_rng(0)
    rows, real = [], []
    for _ in range(40):
        d = float(rng.uniform(0, 0.5))
        rows.append({"disagreement": d, "entropy": float(rng.uniform(0, 1)), "volume": 10, "volume_z": 0.1,
                     "components": 1, "intensity_z": 0.5})
        real.append(1 - 1.5 * d)
    cal = Calibration.fit(rows, real)
    pred = [cal.predict(r) for r in rows]
    assert spearman(pred, real) == pytest.approx(1.0)
    assert max(abs(p - t) for p, t in zip(pred, real)) < 0.03  # ridge's shrinkage is small at 40 cases
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again.predict(rows[0]) == cal.predict(rows[0])
    with pytest.raises(MedsegError, match="too few to calibrate"):
        Calibration.fit(rows[:2], real[:2])
    with pytest.raises(MedsegError, match="another version"):
        Calibration.from_dict({**cal.to_dict(), "features": ["x"]})


def test_views_of_a_members_bundle_with_tta_reproduce_the_prediction():
    """lgg-unet: two member networks x (identity + two flips) = six views, whose mean is the prediction."""
    from medseg.data.formats import get_reader
    from medseg.inference.segmenter import Segmenter

    src = FIXTURES / "lgg_tiny" / "kaggle_3m"
    if not src.is_dir():
        pytest.skip("tests/fixtures/lgg_tiny is missing")
    seg = Segmenter.load("lgg-unet")
    r = get_reader("lgg")
    spec = r.survey(src)
    image = r.read(spec, spec.cases[0]).image[:6]
    assert len(views(seg)) == 6
    pred, vm, prob = predict_views(seg, image, spec.spatial_dims)
    ref = seg.predict(image, spatial_dims=spec.spatial_dims)
    np.testing.assert_array_equal(pred.mask, ref.mask)
    np.testing.assert_allclose(prob.astype(np.float32), ref.prob.astype(np.float32), atol=2e-3)


# ------------------------------------------------------------------------------ a tiny trained run
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two folds of a tiny one-channel model on 8 synthetic patients, with flip TTA."""
    return tiny_run(tmp_path_factory.mktemp("qrun"), n_patients=8, steps=2, fold="all", inference={"tta": True})


def test_calibrate_fits_out_of_fold_and_writes_every_bundle(run, monkeypatch, capsys):
    from medseg.bundle import load_bundle
    from medseg.inference.segmenter import Segmenter

    code, err = run_cli(monkeypatch, capsys, ["calibrate", run])
    assert code == 0, err
    res = json.loads((run / "calibration.json").read_text())
    assert res["written"] and res["fitted_on"]["cases"] == 8 and res["fitted_on"]["folds"] == [0, 1]
    assert not Path(res["dataset"]).is_absolute() and not Path(res["run"]).is_absolute()  # names no machine's folders
    cases = list(csv.DictReader((run / "calibration_cases.csv").open()))
    # one row per case and structure (the synthetic set has two: disc and square)
    assert len(cases) == 16 and {c["fold"] for c in cases} == {"0", "1"} and {c["structure"] for c in cases} == {"disc", "square"}
    # each fold's rows were predicted by the calibration fitted on the other fold's four cases alone
    other = [c for c in cases if c["fold"] == "1"]
    mine = [c for c in cases if c["fold"] == "0"]
    cal = Calibration.fit([_row(c) for c in other], [float(c["dice"]) for c in other])
    for c in mine:
        assert float(c["nested_predicted_dice"]) == pytest.approx(cal.predict(_row(c)), abs=1e-3)
    q = load_bundle(run / "fold_0" / "model.pt")["quality"]
    assert q["calibration"]["cases"] == 16 and q["reference"]["cases"] == 8 and q["reference"]["unit"] == "ml"
    assert Segmenter.load(run).spec.quality["calibration"] == q["calibration"]


def _row(c: dict) -> dict:
    return {k: (float(c[k]) if c[k] != "" else None) for k in ("disagreement", "entropy", "volume", "volume_z",
                                                              "intensity_z")} | {"components": int(c["components"])}


def test_calibrate_into_a_bundle_fits_on_its_training_patients_only(run, tmp_path):
    import shutil

    from medseg.bundle import load_bundle, set_bundle_field
    from medseg.evaluation.calibrate import calibrate

    b = tmp_path / "model.pt"
    shutil.copy(run / "fold_0" / "model.pt", b)
    set_bundle_field(b, "meta", {"training_patients": ["p00", "p01", "p02", "p03", "p04"]})
    res = calibrate(run, into=b)
    assert res["fitted_on"]["cases"] == 5 and res["into"] == portable(b) == f"{b.parent.name}/model.pt"
    used = [c["used_for_fit"] for c in csv.DictReader((run / "calibration_cases.csv").open())]
    assert used.count("true") == 10 and used.count("false") == 6
    assert load_bundle(b)["quality"]["reference"]["cases"] == 5
    with pytest.raises(MedsegError, match="none of the run's validation patients"):
        set_bundle_field(b, "meta", {"training_patients": ["somebody else"]})
        calibrate(run, into=b, write=False)


def test_predict_quality_then_evaluate_and_view(run, tmp_path, monkeypatch, capsys):
    from medseg.evaluation.calibrate import calibrate

    calibrate(run)
    src = FIXTURES / "nifti"
    if not src.is_dir():
        pytest.skip("tests/fixtures/nifti is missing")
    out = tmp_path / "out"
    said: list[str] = []
    code, err = run_cli(monkeypatch, capsys, ["predict", run, src, out, "--quality", "--review-below", "1.0"], said)
    assert code == 0, err
    rows = list(csv.DictReader((out / "quality.csv").open()))
    assert rows and all(r["calibrated"] == "true" and r["review"] == "true" for r in rows)  # below 1.0: every one
    assert [float(r["predicted_dice"]) for r in rows] == sorted(float(r["predicted_dice"]) for r in rows)
    n = len({r["case"] for r in rows})
    assert f"review {n} of {n} cases (a structure's predicted Dice < 1)" in " ".join(said[0].split())
    doc = json.loads((out / "quality.json").read_text())
    assert doc["calibrated"] and doc["review_below"] == 1.0 and len(doc["rows"]) == len(rows)
    # evaluate: the predicted Dice beside the real one, and how well they agree
    code, err = run_cli(monkeypatch, capsys, ["evaluate", out, src, "--out", tmp_path / "eval"], said)
    assert code == 0, err
    metrics = list(csv.DictReader((tmp_path / "eval" / "metrics.csv").open()))
    # the truth names its labels Anterior and Posterior: paired by position with the model's disc and square
    by = {(r["case"], {"disc": "Anterior", "square": "Posterior"}[r["structure"]]): float(r["predicted_dice"])
          for r in rows}
    assert len(metrics) == len(rows)
    assert all(float(m["predicted_dice"]) == pytest.approx(by[(m["case_id"], m["class"])], abs=1e-3) for m in metrics)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    q = summary["quality"][metrics[0]["class"]]
    assert q["flagged"] == q["cases"] == len(metrics) // len(summary["quality"])
    assert "quality estimate, " in " ".join(said[1].split())
    # view: the predicted quality in the table, riskiest first
    page = (tmp_path / "eval" / "view.html").read_text()
    data = json.loads(page.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert data["cases"] and all(c["quality"]["review"] for c in data["cases"])
    from test_view import _chromium

    res = _chromium(tmp_path / "eval" / "view.html", """
      out.rows = V.rows();
      out.shown = getComputedStyle(document.querySelector('#cases th[data-k="predicted"]')).display;
      out.flag = document.querySelector('#cases td.review').textContent;""", tmp_path / "probe.html")
    pred = {c["id"]: c["quality"]["predicted"] for c in data["cases"]}
    assert res["rows"] == sorted(pred, key=pred.get)  # the riskiest case first, as the page opens
    assert res["shown"] != "none" and res["flag"].endswith("\u2691")
    code, err = run_cli(monkeypatch, capsys, ["predict", run, src, tmp_path / "x", "--review-below", "1.5", "--quality"])
    assert code == 2 and "--review-below must be in [0, 1], got 1.5" in err


def test_save_uncertainty_writes_maps_in_the_input_geometry(run, tmp_path, monkeypatch, capsys):
    import nibabel as nib

    src = FIXTURES / "nifti"
    if not src.is_dir():
        pytest.skip("tests/fixtures/nifti is missing")
    out = tmp_path / "out"
    code, err = run_cli(monkeypatch, capsys, ["predict", run, src, out, "--save-uncertainty"])
    assert code == 0, err
    assert (out / "quality.csv").is_file()  # implies --quality
    for img in sorted((src / "imagesTr").glob("*.nii.gz")):
        u = nib.load(out / img.name.replace(".nii.gz", "_uncertainty.nii.gz"))
        ref = nib.load(img)
        np.testing.assert_allclose(u.affine, ref.affine)
        a = np.asarray(u.dataobj)
        assert a.shape[:3] == ref.shape[:3] and a.shape[3] == 2  # one map per structure
        # the share of 3 views (identity and two flips) against the mask
        assert set(np.round(np.unique(a) * 3, 2)) <= {0.0, 1.0, 2.0, 3.0}
    code, err = run_cli(monkeypatch, capsys, ["evaluate", out, src, "--out", tmp_path / "eval", "--no-report"])
    assert code == 0, err  # the maps and quality files are not taken for extra predictions
    code, err = run_cli(monkeypatch, capsys, ["predict", run, src, tmp_path / "y", "--save-uncertainty",
                                              "--save-probabilities"])
    assert code == 2 and "write the same files: choose one" in err


def test_rtstruct_and_seg_carry_the_review_flag(run, tmp_path, monkeypatch, capsys):
    from medseg.evaluation.calibrate import calibrate

    src = FIXTURES / "dicom" / "series"
    if not src.is_dir():
        pytest.skip("tests/fixtures/dicom is missing")
    calibrate(run)
    for form in ("rtstruct", "seg"):
        out = tmp_path / form
        code, err = run_cli(monkeypatch, capsys, ["predict", run, src, out, "--as", form, "--quality",
                                                  "--review-below", "1.0"])
        assert code == 0, err
        f = next(out.glob(f"*.{form}.dcm"))
        ds = pydicom.dcmread(f)
        text = (ds.StructureSetROISequence[0].ROIDescription if form == "rtstruct"
                else ds.SegmentSequence[0].SegmentDescription)
        row = next(csv.DictReader((out / "quality.csv").open()))
        assert text == f"REVIEW: predicted Dice {float(row['predicted_dice']):.2f} (medseg quality)"
        if form == "rtstruct":
            assert ds.RTROIObservationsSequence[0].ROIObservationDescription == text


# ------------------------------------------------------------------------------ bad input: one line, nothing written
def _calibrate_no_run(tmp, run):
    return Case(["calibrate", tmp / "nope"], tmp / "nope", "run directory not found")


def _calibrate_bad_review_threshold(tmp, run):
    return Case(["calibrate", run, "--review-below", "1.5"], "--review-below", "must be in [0, 1], got 1.5",
                intact=[run])


def _calibrate_into_a_damaged_bundle(tmp, run):
    bad = tmp / "model.pt"
    bad.write_bytes(b"not a bundle")
    return Case(["calibrate", run, "--into", bad], bad, "cannot read model bundle", intact=[run, bad])


def _calibrate_without_the_prepared_data(tmp, run):
    return Case(["calibrate", run, "--data", tmp / "gone"], tmp / "gone", "prepared dataset of the run not found",
                intact=[run])


def _calibrate_an_unfinished_run(tmp, run):
    import shutil

    dst = tmp / "killed"
    shutil.copytree(run, dst)
    state = dst / "fold_1" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "state": "training"}))
    return Case(["calibrate", dst], dst / "fold_1", "did not finish", intact=[dst])


def _evaluate_a_damaged_quality_file(tmp, run):
    import shutil

    src = FIXTURES / "nifti"
    out = tmp / "pred"
    out.mkdir()
    for f in (src / "labelsTr").glob("*.nii.gz"):
        shutil.copy(f, out / f.name)
    (out / "quality.json").write_text("{")
    return Case(["evaluate", out, src, "--out", tmp / "eval"], out / "quality.json", "not a medseg quality file",
                absent=[tmp / "eval"], intact=[out])


def _predict_uncertainty_into_an_rtstruct(tmp, run):
    return Case(["predict", run, FIXTURES / "dicom" / "series", tmp / "out", "--as", "rtstruct", "--save-uncertainty"],
                "--save-uncertainty", "writes NIfTI maps; a RTSTRUCT holds binary structures", absent=[tmp / "out"])


def _predict_negative_review_threshold(tmp, run):
    return Case(["predict", run, FIXTURES / "nifti", tmp / "out", "--quality", "--review-below", "-0.1"],
                "--review-below", "must be in [0, 1], got -0.1", absent=[tmp / "out"])


BAD = [_calibrate_no_run, _calibrate_bad_review_threshold, _calibrate_into_a_damaged_bundle,
       _calibrate_without_the_prepared_data, _calibrate_an_unfinished_run, _evaluate_a_damaged_quality_file,
       _predict_uncertainty_into_an_rtstruct, _predict_negative_review_threshold]


@pytest.mark.parametrize("make", BAD, ids=lambda f: f.__name__[1:])
def test_bad_input(make, run, tmp_path, monkeypatch, capsys):
    _check(make(tmp_path, run), tmp_path, monkeypatch, capsys)
