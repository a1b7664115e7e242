"""The benchmark scripts' bookkeeping (no training): pooling time-to-Dice results run one fold at a time."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
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

    from medseg.inference.bundle import load_bundle, save_bundle
    from medseg.inference.segmenter import SHIPPED, WEIGHTS_DIR

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
    with pytest.raises(SystemExit, match="divisible by 32"):
        cv._bundle(tmp_path / "run", 0, 100, tmp_path / "tmp")
    orig["input"]["resize"] = False
    save_bundle(orig, tmp_path / "run" / "fold_0" / "model.pt")
    with pytest.raises(SystemExit, match="trained on resized slices"):
        cv._bundle(tmp_path / "run", 0, 160, tmp_path / "tmp")
