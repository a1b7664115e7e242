"""The LGG experiment scripts (experiments/lgg/) bookkeeping and analysis (no training): pooling time-to-Dice results, scale TTA
members, the LGG error split."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "lgg" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(path: Path, fold: int, medseg: list[float], peer: list[float], budget: float = 30.0) -> str:
    marks = ["5", "10"]
    dice = {"medseg": {str(fold): dict(zip(marks, medseg))}, "peer": {str(fold): dict(zip(marks, peer))}}
    path.write_text(json.dumps({"machine": {"cpus": 2}, "budget_min": budget, "parallel_one_thread_each": True,
                                "threads": 1, "folds": [fold], "config": "configs/lgg_unet.yaml", "dice": dice,
                                "wall_s": 100.0, "summary": {w: {m: {} for m in marks} for w in dice}}))
    return str(path)


def test_time_to_dice_combine_pools_folds(tmp_path):
    ttd = _load("lgg_time_to_dice")
    a = _result(tmp_path / "a.json", 0, medseg=[0.70, 0.80], peer=[0.10, 0.60])
    b = _result(tmp_path / "b.json", 3, medseg=[0.50, 0.90], peer=[0.20, 0.95])
    ttd.combine([a, b], str(tmp_path / "all.json"))
    out = json.loads((tmp_path / "all.json").read_text())
    assert out["folds"] == [0, 3] and out["wall_s"] == 200.0 and out["combined_from"] == [a, b]
    assert out["summary"]["medseg"]["5"]["mean"] == pytest.approx(0.60)
    assert out["summary"]["medseg"]["5"]["std"] == pytest.approx(0.10)
    assert out["summary"]["peer"]["10"]["mean"] == pytest.approx(0.775)
    # ahead on the mean at both marks (0.60 > 0.15, 0.85 > 0.775), but not on fold 3 at 10 minutes
    assert out["medseg_ahead_at_every_mark"] is True
    assert out["medseg_ahead_at_every_mark_every_fold"] is False


def test_time_to_dice_combine_refuses_mixed_results(tmp_path):
    ttd = _load("lgg_time_to_dice")
    a = _result(tmp_path / "a.json", 0, [0.7, 0.8], [0.1, 0.6])
    twice = _result(tmp_path / "twice.json", 0, [0.7, 0.8], [0.1, 0.6])
    with pytest.raises(SystemExit, match=r"fold 0 of medseg appears twice \(again in .*twice.json\)"):
        ttd.combine([a, twice], str(tmp_path / "all.json"))
    short = _result(tmp_path / "short.json", 1, [0.7, 0.8], [0.1, 0.6], budget=10.0)
    with pytest.raises(SystemExit, match=r"budget_min differs .*short.json: 10"):
        ttd.combine([a, short], str(tmp_path / "all.json"))
    assert not (tmp_path / "all.json").exists()
    with pytest.raises(SystemExit, match=r"--out .*a.json is one of the results to pool"):
        ttd.combine([a, _result(tmp_path / "b.json", 1, [0.7, 0.8], [0.1, 0.6])], a)
    assert json.loads(Path(a).read_text())["folds"] == [0]


def test_time_to_dice_combine_names_unreadable_inputs(tmp_path):
    ttd = _load("lgg_time_to_dice")
    a = _result(tmp_path / "a.json", 0, [0.7, 0.8], [0.1, 0.6])
    with pytest.raises(SystemExit, match=r"cannot read .*missing.json: No such file"):
        ttd.combine([a, str(tmp_path / "missing.json")], str(tmp_path / "all.json"))
    (tmp_path / "cut.json").write_text('{"dice": ')
    with pytest.raises(SystemExit, match=r"cut.json is not valid JSON"):
        ttd.combine([a, str(tmp_path / "cut.json")], str(tmp_path / "all.json"))
    (tmp_path / "other.json").write_text(json.dumps({"folds": [1], "rows": {}}))
    with pytest.raises(SystemExit, match=r"other.json is not a result of lgg_time_to_dice.py \(no dice, summary, budget_min, wall_s\)"):
        ttd.combine([a, str(tmp_path / "other.json")], str(tmp_path / "all.json"))
    assert not (tmp_path / "all.json").exists()


def test_cv_dice_scale_members_are_the_same_weights_fed_another_size(tmp_path):
    """``RUN@SIZE`` in lgg_cv_dice rows: the run's fold model, resizing slices to SIZE instead."""
    import shutil

    import torch

    from medseg.bundle import load_bundle, save_bundle
    from medseg.bundle import SHIPPED, WEIGHTS_DIR

    cv = _load("lgg_cv_dice")
    assert cv.parse_run("runs/a") == (Path("runs/a"), None)
    assert cv.parse_run("runs/a@160") == (Path("runs/a"), 160)
    with pytest.raises(SystemExit, match="expected RUN@SIZE"):
        cv.parse_run("runs/a@big")
    (tmp_path / "run" / "fold_0").mkdir(parents=True)
    shutil.copy(WEIGHTS_DIR / SHIPPED["lgg-unet"], tmp_path / "run" / "fold_0" / "model.pt")
    (tmp_path / "tmp").mkdir()
    assert cv._bundle(tmp_path / "run", 0, None, tmp_path / "tmp") == tmp_path / "run" / "fold_0" / "model.pt"
    orig = load_bundle(tmp_path / "run" / "fold_0" / "model.pt")
    got = load_bundle(cv._bundle(tmp_path / "run", 0, 160, tmp_path / "tmp"))
    assert orig["input"]["size"] == [128, 128] and got["input"]["size"] == [160, 160]
    assert all(torch.equal(v, got["state_dict"][k]) for k, v in orig["state_dict"].items())
    assert len(got["members"]) == len(orig["members"]) == 1
    with pytest.raises(SystemExit, match=r"fold_1/model.pt: no such file: fold 1 of .*run was not trained \(trained: fold_0\)"):
        cv._bundle(tmp_path / "run", 1, None, tmp_path / "tmp")
    with pytest.raises(SystemExit, match="divisible by 32"):
        cv._bundle(tmp_path / "run", 0, 100, tmp_path / "tmp")
    orig["input"]["resize"] = False
    save_bundle(orig, tmp_path / "run" / "fold_0" / "model.pt")
    with pytest.raises(SystemExit, match="trained on resized slices"):
        cv._bundle(tmp_path / "run", 0, 160, tmp_path / "tmp")


def test_lgg_errors_splits_errors_into_rim_and_region_by_hand():
    """A 10 x 10 tumour predicted one pixel to the right, plus a 3 x 3 false region on its slice and a
    2 x 2 one on the next slice right above it (in-plane distance only: a region error)."""
    err = _load("lgg_errors")
    truth = np.zeros((2, 40, 40), bool)
    truth[0, 10:20, 10:20] = True
    pred = np.zeros_like(truth)
    pred[0, 10:20, 11:21] = True
    pred[0, 30:33, 30:33] = True
    pred[1, 12:14, 12:14] = True
    e = err.rim_region(pred, truth, 1)
    assert e == {"tp": 90, "fp_rim": 10, "fp_region": 13, "fn_rim": 10, "fn_region": 0}
    assert err.corrected(e, "rim") == pytest.approx(200 / 213)   # outline right, false regions stay
    assert err.corrected(e, "region") == pytest.approx(180 / 200)  # false regions gone, outline off by one
    wide = err.rim_region(pred, truth, 20)  # everything on slice 0 is near; slice 1's blob still is not
    assert (wide["fp_rim"], wide["fp_region"]) == (19, 4)
    empty = np.zeros_like(truth)
    assert err.rim_region(empty, empty, 2) == {"tp": 0, "fp_rim": 0, "fp_region": 0, "fn_rim": 0, "fn_region": 0}
    assert err.corrected(err.rim_region(empty, empty, 2), "rim") == 1.0


def test_lgg_errors_hysteresis_keeps_components_that_reach_the_high_threshold():
    err = _load("lgg_errors")
    prob = np.zeros((3, 20, 20), np.float32)
    prob[0:2, 2:6, 2:6] = 0.4   # a halo over two slices around one confident voxel
    prob[1, 3, 3] = 0.95
    prob[1, 12:15, 12:15] = 0.6  # never confident
    strict = err.hysteresis(prob, 0.3, 0.9)
    assert strict.sum() == 32 and strict[0:2, 2:6, 2:6].all()
    assert err.hysteresis(prob, 0.3, 0.5).sum() == 32 + 9
    assert err.hysteresis(prob, 0.5, 0.9).sum() == 1
    assert not err.hysteresis(np.zeros_like(prob), 0.1, 0.5).any()


def test_lgg_errors_best_choice_of_components_by_hand():
    err = _load("lgg_errors")
    truth = np.zeros((3, 30, 30), bool)
    truth[0, 0, 0:10] = True
    pred = np.zeros_like(truth)
    pred[0, 0, 0:8] = pred[0, 1, 0:2] = True   # 8 of the tumour, 2 outside
    pred[0, 0:20, 9] = True                    # 1 of the tumour in a 20-voxel streak
    pred[2, 20:25, 20] = True                  # a false region
    # {first}: 16 / (10 + 10); adding the streak (1/20 inside) or the false region only lowers it
    assert err.best_components(pred, truth) == pytest.approx(0.8)
    truth[0, 5, 0:10] = True
    pred[0, 5, 2:8] = pred[0, 6, 2:4] = True   # 6 of a second tumour region, 2 outside
    # {first, second}: 2 (8 + 6) / (10 + 8 + 20); with the streak (now 2 of 20 inside): 32 / 58
    assert err.best_components(pred, truth) == pytest.approx(28 / 38)
    empty = np.zeros_like(truth)
    assert err.best_components(empty, empty) == 1.0
    assert err.best_components(pred, empty) == 1.0   # every component dropped
    assert err.best_components(empty, truth) == 0.0


def test_lgg_errors_end_to_end_on_the_tiny_lgg_sample(tmp_path, monkeypatch, capsys):
    """The shipped model as fold 0 of a run holding out both tiny-sample patients: the script's
    per-patient Dice is the Segmenter's, and rim + region corrections are consistent."""
    import shutil
    import sys

    import yaml

    from medseg.data.prepare import prepare
    from medseg.data.prepared import PreparedDataset
    from medseg.evaluation.metrics import case_dice
    from medseg.bundle import SHIPPED, WEIGHTS_DIR
    from medseg.inference.segmenter import Segmenter

    src = ROOT / "tests" / "fixtures" / "lgg_tiny" / "kaggle_3m"
    if not src.is_dir():
        pytest.skip("tests/fixtures/lgg_tiny is missing (python scripts/make_fixtures.py)")
    ds = PreparedDataset.open(prepare("lgg", src, tmp_path / "prepared", workers=1))
    run = tmp_path / "run"
    (run / "fold_0").mkdir(parents=True)
    shutil.copy(WEIGHTS_DIR / SHIPPED["lgg-unet"], run / "fold_0" / "model.pt")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"prepared": str(tmp_path / "prepared")}}))
    ids = [c.id for c in ds.cases]
    (run / "splits.json").write_text(json.dumps({"folds": [{"train": [], "val": ids}]}))
    out = tmp_path / "errors.json"
    monkeypatch.setattr(sys, "argv", ["lgg_errors.py", str(run), "--folds", "0", "--no-tta", "--threshold", "0.4",
                                      "--small", "400", "--rim", "2", "--out", str(out)])
    _load("lgg_errors").main()
    got = json.loads(out.read_text())
    seg = Segmenter.load(run / "fold_0" / "model.pt", tta=False)
    for i, cid in enumerate(ids):
        truth = np.asarray(ds.mask(i))[:, 0] > 0
        prob = seg.predict(np.asarray(ds.image(i)), probabilities=True).prob[:, 0].astype(np.float32)
        p = got["patients"][cid]
        assert p["dice"] == pytest.approx(case_dice(prob > 0.4, truth, empty="one"))
        assert p["tumour_voxels"] == int(truth.sum())
        e = p["errors"]["2"]
        assert e["tp"] + e["fn_rim"] + e["fn_region"] == int(truth.sum())
        assert e["tp"] + e["fp_rim"] + e["fp_region"] == int((prob > 0.4).sum())
    assert got["threshold"] == 0.4 and got["n_patients"] == 2
    assert got["rules"]["threshold 0.4"]["mean"] == pytest.approx(got["at_threshold"]["mean"])
    best = got["corrected"]["best choice of components, threshold 0.4"]["mean"]
    assert best >= got["rules"]["threshold 0.4 + largest component"]["mean"] - 1e-12
    assert best >= got["at_threshold"]["mean"] - 1e-12
    assert "voxel-level rules" in capsys.readouterr().out
    (run / "fold_0" / "model.pt").write_bytes((run / "fold_0" / "model.pt").read_bytes()[:1000])
    monkeypatch.setattr(sys, "argv", ["lgg_errors.py", str(run), "--folds", "0", "--out", str(tmp_path / "again.json")])
    with pytest.raises(SystemExit, match=r"fold_0/model.pt: cannot read model bundle: damaged"):
        _load("lgg_errors").main()
    assert not (tmp_path / "again.json").exists()
    monkeypatch.setattr(sys, "argv", ["lgg_errors.py", str(tmp_path / "nowhere"), "--out", str(out)])
    with pytest.raises(SystemExit, match="nowhere: not a training run"):
        _load("lgg_errors").main()


def test_cv_dice_names_a_damaged_tune_json(tmp_path):
    cv = _load("lgg_cv_dice")
    (tmp_path / "tune.json").write_text('{"classes": [{"threshold": 0.3')
    with pytest.raises(SystemExit, match=r"tune.json: not a tune.json written by `medseg tune` \(JSONDecodeError"):
        cv.tuned_postprocess(tmp_path)
    (tmp_path / "tune.json").write_text('{"classes": []}')
    with pytest.raises(SystemExit, match=r"not a tune.json .*KeyError: 'largest_cc'"):
        cv.tuned_postprocess(tmp_path / "tune.json")
    (tmp_path / "tune.json").write_text(json.dumps({"classes": [{"threshold": 0.3, "presence": None}],
                                                    "largest_cc": False, "components": None}))
    assert cv.tuned_postprocess(tmp_path) == {"thresholds": [0.3], "presence": [None], "largest_cc": False,
                                              "components": None}
