"""``medseg tune``: per-class thresholds and presence thresholds chosen for the competition score."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.errors import MedsegError
from medseg.evaluation import tune as tunelib
from medseg.evaluation.tune import best_combination, candidates, class_terms, tune
from medseg.evaluation.uwmgi_score import uwmgi_score


def competition_score(dice_sum: float, n_dice: float, hd_sum: float, n_hd: float) -> float:
    """The competition's formula by hand: 0.4 mean Dice + 0.6 (1 - mean HD); an empty term counts as perfect."""
    dice = dice_sum / n_dice if n_dice else 1.0
    hd = hd_sum / n_hd if n_hd else 0.0
    return 0.4 * dice + 0.6 * (1.0 - hd)


def test_candidates_grid_current_first_and_presence_only_above_threshold():
    assert candidates([0.5, 0.3], [0.4, 0.6], current=(0.5, None)) == [
        (0.5, None), (0.3, None), (0.3, 0.4), (0.3, 0.6), (0.5, 0.6)]
    assert candidates([0.5], [0.5])[-1] == (0.5, None)  # presence 0.5 at threshold 0.5 changes nothing
    with pytest.raises(MedsegError, match=r"probabilities in \[0, 1\], got 1.5"):
        candidates([0.5], [1.5])


def test_class_terms_hand_computed():
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, 0, :2] = 1  # slice 0: two pixels; slice 1: empty
    prob = np.full((2, 4, 4), 0.1, np.float32)
    prob[0, 0, 0], prob[0, 0, 1] = 0.9, 0.6
    prob[1] = 0.0
    prob[1, 3, 3] = 0.55  # a false positive on the empty slice
    t = class_terms(prob, truth, [(0.5, None), (0.5, 0.6), (0.7, None)], objective="uwmgi")
    # (0.5, off): Dice 1 and 0 (2 scored slices); HD from voxel (1,3,3) -> (0.5,.75,.75) to (0,0,.25)
    hd = math.sqrt(0.5**2 + 0.75**2 + 0.5**2) / math.sqrt(3)
    np.testing.assert_allclose(t[0], [1.0, 2, hd, 1])
    # (0.5, 0.6): slice 1's maximum 0.55 < 0.6 -> zeroed, both empty -> skipped; perfect volume
    np.testing.assert_allclose(t[1], [1.0, 1, 0.0, 1])
    # (0.7, off): one of two pixels, Dice 2/3; HD 0.25 (one column of 4) / sqrt(3)
    np.testing.assert_allclose(t[2], [2 / 3, 1, 0.25 / math.sqrt(3), 1])


def test_class_terms_agree_with_the_competition_score():
    rng = np.random.default_rng(0)
    prob = rng.random((5, 12, 10)).astype(np.float32) ** 3
    truth = (rng.random((5, 12, 10)) < 0.2).astype(np.uint8)
    truth[2] = 0
    grid = candidates([0.3, 0.5], [0.8, 0.95])
    terms = class_terms(prob, truth, grid, objective="uwmgi")
    ids = [f"case1_day1_slice_{z + 1:04d}" for z in range(5)]
    for (t, p), row in zip(grid, terms):
        mask = prob > t
        if p is not None:
            mask[prob.reshape(5, -1).max(1) < p] = False
        ref = uwmgi_score({(i, "stomach"): mask[z] for z, i in enumerate(ids)},
                          {(i, "stomach"): truth[z] for z, i in enumerate(ids)}, {i: (12, 10) for i in ids})
        assert competition_score(*row) == pytest.approx(ref.score, abs=1e-12)


def test_best_combination_is_the_exhaustive_optimum():
    rng = np.random.default_rng(1)
    tables = []
    for n in (4, 3, 5):
        t = np.zeros((n, 4))
        t[:, 1] = rng.integers(5, 20, n)
        t[:, 0] = t[:, 1] * rng.random(n)
        t[:, 3] = rng.integers(1, 3, n)
        t[:, 2] = t[:, 3] * rng.random(n)
        tables.append(t)
    brute = max(itertools.product(*[range(len(t)) for t in tables]),
                key=lambda ix: competition_score(*sum(t[i] for t, i in zip(tables, ix))))
    idx, score = best_combination(tables, "uwmgi")
    assert tuple(idx) == brute
    assert score == pytest.approx(competition_score(*sum(t[i] for t, i in zip(tables, brute))))


def test_best_combination_coordinate_ascent_beyond_the_budget(monkeypatch):
    # one candidate per class dominates (higher Dice sum, lower Hausdorff): ascent must find it
    tables = [np.array([[5.0, 10, 0.5, 1], [9.0, 10, 0.1, 1], [6.0, 10, 0.3, 1]]),
              np.array([[2.0, 10, 0.9, 1], [3.0, 10, 0.8, 1], [8.0, 10, 0.2, 1]])]
    monkeypatch.setattr(tunelib, "_MAX_COMBINATIONS", 1)
    assert best_combination(tables, "uwmgi")[0] == [1, 2]


# ------------------------------------------------------------------------------------ on a run directory
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from medseg.data.prepare import prepare
    from medseg.data.formats.uwmgi_synthetic import write_uwmgi_synthetic

    tmp = tmp_path_factory.mktemp("tune")
    data = write_uwmgi_synthetic(tmp / "uw", n_cases=2, days_per_case=1, slices_per_day=6, seed=2)
    return prepare("uwmgi", data, tmp / "prep", folds=2, workers=1)


def _bundle(class_kind: str = "multilabel") -> dict:
    from medseg.models import create_model

    k = 3 if class_kind == "multilabel" else 4
    m = create_model("unet", 3, k, spatial_dims=2, base=4, depth=2)
    return {"arch": {"name": "unet", "in_channels": 3, "out_channels": k, "spatial_dims": 2,
                     "kwargs": {"base": 4, "depth": 2}},
            "state_dict": m.state_dict(), "classes": ["large_bowel", "small_bowel", "stomach"],
            "class_kind": class_kind, "channels": ["MRI"],
            "input": {"mode": "2.5d", "context": 1, "stride": 2, "size": [64, 64], "resize": False, "divisor": 2},
            "normalization": {"mode": "zscore_case"},
            "postprocess": {"thresholds": [0.5, 0.5, 0.5], "presence": None, "min_size": 0, "largest_cc": False},
            "tta": {"flips": [[-1], [-2]]}, "meta": {}}


def _fake_run(tmp: Path, prepared: Path, class_kind: str = "multilabel") -> Path:
    """A run whose fold-0 validation probabilities are known: 0.8 inside each organ, 0.45 on its first
    row of pixels (so a threshold < 0.45 is needed), and a 0.55 blob on each slice where the organ is
    absent (so a presence threshold in 0.6..0.8 is needed)."""
    from medseg.data.prepared import PreparedDataset, case_filename
    from medseg.bundle import save_bundle

    ds = PreparedDataset.open(prepared)
    run = tmp / "run"
    (run / "fold_0" / "val_predictions").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"prepared": str(prepared)}}))
    save_bundle(_bundle(class_kind), run / "fold_0" / "model.pt")
    for cid in ds.fold(0)[1]:
        truth = np.asarray(ds.mask(cid)).astype(bool)
        prob = np.where(truth, 0.8, 0.05).astype(np.float32)
        for z in range(truth.shape[0]):
            for j in range(truth.shape[1]):
                if truth[z, j].any():
                    r = np.flatnonzero(truth[z, j].any(1))[0]
                    prob[z, j, r][truth[z, j, r]] = 0.45
                else:
                    prob[z, j, 10:14, 10:14] = 0.55
        name = Path(case_filename(cid, "x")).name[: -len(".x.npy")]
        np.savez_compressed(run / "fold_0" / "val_predictions" / f"{name}.npz", prob=prob.astype(np.float16),
                            mask=(prob > 0.5).astype(np.uint8))
    return run


def test_nested_scores_choose_on_the_other_folds():
    from medseg.evaluation.tune import nested_scores

    # one class, one rule set, two candidates; rows (Dice sum, cases, 0, 0) per fold
    t = {0: [[np.array([[1.8, 2, 0, 0], [1.0, 2, 0, 0]])]],   # fold 0 prefers candidate 0 (0.9 vs 0.5)
         1: [[np.array([[0.8, 2, 0, 0], [1.6, 2, 0, 0]])]]}   # fold 1 prefers candidate 1 (0.8 vs 0.4)
    # pooled, both candidates score 2.6 / 4 = 0.65 (a tie: candidate 0), i.e. 0.9 and 0.4 per fold;
    # nested, fold 0 gets fold 1's choice (0.5) and fold 1 gets fold 0's (0.4)
    assert nested_scores(t, [0, 1], 1) == {0: (0, [1], 0.5), 1: (0, [0], 0.4)}
    assert nested_scores(t, [0], 1) == {}
    # a second rule set that only fold 1's cases favour is what fold 0 is scored with
    t2 = {0: [t[0][0], [np.array([[0.2, 2, 0, 0], [0.2, 2, 0, 0]])]],
          1: [t[1][0], [np.array([[2.0, 2, 0, 0], [0.0, 2, 0, 0]])]]}
    assert nested_scores(t2, [0, 1], 2)[0] == (1, [0], 0.1)


def test_tune_finds_the_planted_thresholds_and_writes_the_bundle(tmp_path, prepared):
    from medseg.bundle import load_bundle
    from medseg.inference.segmenter import Segmenter

    run = _fake_run(tmp_path, prepared)
    res = tune(run)
    assert res["score"] == 1.0 and res["score_before"] < 1.0 and res["written"]
    for c in res["classes"]:
        # the first perfect candidate in grid order: threshold 0.3 (< 0.45), presence 0.6 (> 0.55, <= 0.8)
        assert (c["threshold"], c["presence"]) == (0.3, 0.6), c
        assert c["before"] == {"threshold": 0.5, "presence": None}
    b = load_bundle(run / "fold_0" / "model.pt")
    assert b["postprocess"]["thresholds"] == [0.3] * 3 and b["postprocess"]["presence"] == [0.6] * 3
    assert b["meta"]["tuned"]["score"] == 1.0 and not b["tta"].get("enabled")
    assert json.loads((run / "tune.json").read_text())["score"] == 1.0
    seg = Segmenter.load(run)  # what `medseg predict` reads
    assert seg.spec.postprocess["presence"] == [0.6] * 3 and seg.spec.postprocess["thresholds"] == [0.3] * 3


def test_tune_dry_run_and_custom_grid(tmp_path, prepared):
    from medseg.bundle import load_bundle

    run = _fake_run(tmp_path, prepared)
    res = tune(run, thresholds=[0.5], presence=[0.9], write=False)
    assert not res["written"] and not (run / "tune.json").exists()
    # presence 0.9 cannot remove the 0.55 blobs of absent organs; keeping each organ's largest component
    # over the case-day's volume does (the 0.45 rows stay lost at threshold 0.5)
    assert res["largest_cc"] and res["components"] == "volume"
    assert res["score_before"] < res["score"] < 1.0 and res["classes"][0]["presence"] is None
    assert load_bundle(run / "fold_0" / "model.pt")["postprocess"]["presence"] is None


def test_tune_errors(tmp_path, prepared):
    with pytest.raises(MedsegError, match=r"not a run directory: no fold_K/model.pt") as e:
        tune(tmp_path)
    assert e.value.path == str(tmp_path)
    run = _fake_run(tmp_path / "a", prepared, class_kind="multiclass")
    with pytest.raises(MedsegError, match="this model is a softmax over 3 classes"):
        tune(run)
    run = _fake_run(tmp_path / "b", prepared)
    with pytest.raises(MedsegError, match=r"fold 3 has no model.pt \(folds here: 0\)"):
        tune(run, folds="3")
    for f in (run / "fold_0" / "val_predictions").glob("*.npz"):
        f.unlink()
    with pytest.raises(MedsegError, match=r"no validation predictions \(val_predictions/\*.npz\)") as e:
        tune(run)
    assert e.value.path == str(run / "fold_0")


def test_cli_tune_prints_and_rejects_bad_grids(tmp_path, prepared):
    from typer.testing import CliRunner

    from medseg.cli import app

    run = _fake_run(tmp_path, prepared)
    r = CliRunner().invoke(app, ["tune", str(run), "--dry-run"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "tuned on 1 validation case of fold 0: UW-Madison score" in out and "-> 1.0000" in out
    assert "large_bowel t 0.30, presence 0.60" in out
    r = CliRunner().invoke(app, ["tune", str(run), "--thresholds", "0.3,abc"])
    assert isinstance(r.exception, MedsegError) and "--thresholds must be comma-separated numbers" in str(r.exception)


def test_tune_with_tta_scores_what_predict_does(tmp_path, prepared):
    """With TTA the validation cases are predicted again; the 'before' score is then exactly the score of
    the masks `medseg predict` makes with the bundle's current settings, and TTA is stored as on."""
    from medseg.data.prepared import PreparedDataset
    from medseg.bundle import load_bundle
    from medseg.inference.segmenter import Segmenter

    run = _fake_run(tmp_path, prepared)
    ds = PreparedDataset.open(prepared)
    seg = Segmenter.load(run, tta=True)
    pred, truth, shapes = {}, {}, {}
    for cid in ds.fold(0)[1]:
        rec = ds.case(cid)
        m = seg.predict(np.asarray(ds.image(cid)), spatial_dims=2).mask
        t = np.asarray(ds.mask(cid))
        for z, sid in enumerate(rec.slices):
            shapes[sid] = t.shape[2:]
            for j, c in enumerate(ds.classes):
                pred[(sid, c)], truth[(sid, c)] = m[z, j], t[z, j]
    expected = uwmgi_score(pred, truth, shapes).score
    res = tune(run, tta=True, thresholds=[0.4, 0.5], presence=[0.6])
    # (tune decides on the float16 probabilities predict returns, predict on float32: a pixel at 0.5 may differ)
    assert res["tta"] is True and res["score_before"] == pytest.approx(expected, abs=2e-3)
    assert res["score"] >= res["score_before"]
    assert load_bundle(run / "fold_0" / "model.pt")["tta"]["enabled"] is True


# ------------------------------------------------------------------- one-class softmax, Dice per case (LGG)
def _one_class_dataset(out: Path) -> Path:
    """Four 2D-slice cases of one class (``tumor``): a column through slices 1..3, one 3D object."""
    from medseg.data.prepared import CaseRecord, PreparedWriter
    from medseg.data.splits import make_splits

    w = PreparedWriter(out, overwrite=True)
    recs = []
    for p in range(4):
        img = np.zeros((5, 1, 16, 16), np.float32)
        mask = np.zeros((5, 1, 16, 16), np.uint8)
        mask[1:4, 0, 4 + p : 10 + p, 5:11] = 1
        ir, sr = w.write_arrays(f"c{p}", img, mask)
        recs.append(CaseRecord(id=f"c{p}", patient=f"p{p}", shape=list(img.shape), spacing=[1.0, 1.0, 1.0],
                               image=ir, mask=sr, dtype="float32", foreground=[float(mask.mean())],
                               fg_slices=[[1, 2, 3]], slices=[str(z) for z in range(5)]))
    fp = {"intensity": {"c0": {"mean": 0.0, "std": 1.0, "min": 0.0, "max": 0.0, "percentiles": {}}},
          "classes": {"tumor": {"voxel_fraction": 0.1, "slice_fraction": 0.6, "case_fraction": 1.0}},
          "n_cases": 4, "n_patients": 4, "n_slices": 20}
    info = {"name": "one", "source_format": "synthetic", "source": "", "reader_options": {}, "channels": ["c0"],
            "classes": ["tumor"], "class_kind": "multiclass", "spatial_dims": 2, "has_masks": True, "meta": {},
            "fingerprint": fp, "cases": recs}
    return w.finish(info, make_splits([r.id for r in recs], [r.patient for r in recs], [True] * 4, k=2, seed=0))


def _one_class_run(tmp_path: Path, postprocess: dict, blob: tuple) -> Path:
    """A one-class softmax run on ``_one_class_dataset`` whose stored validation probabilities are the
    truth at 0.8, its first row at 0.4 (threshold 0.3 needed), 0.05 elsewhere and 0.9 on ``blob`` (an
    index into the case's (slices, rows, cols)), stored with their background channel."""
    from medseg.data.prepared import PreparedDataset, case_filename
    from medseg.bundle import save_bundle
    from medseg.models import create_model

    prepared = _one_class_dataset(tmp_path / "one")
    ds = PreparedDataset.open(prepared)
    run = tmp_path / "run"
    (run / "fold_0" / "val_predictions").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"prepared": str(prepared)}}))
    m = create_model("unet", 1, 2, spatial_dims=2, base=4, depth=2)
    save_bundle({"arch": {"name": "unet", "in_channels": 1, "out_channels": 2, "spatial_dims": 2,
                          "kwargs": {"base": 4, "depth": 2}}, "state_dict": m.state_dict(), "classes": ["tumor"],
                 "class_kind": "multiclass", "channels": ["c0"],
                 "input": {"mode": "2d", "context": 0, "stride": 1, "size": None, "resize": False, "divisor": 4},
                 "normalization": {"mode": "zscore_case"}, "postprocess": postprocess, "tta": {}, "meta": {}},
                run / "fold_0" / "model.pt")
    val = ds.fold(0)[1]
    for cid in val:
        truth = np.asarray(ds.mask(cid))[:, 0].astype(bool)
        fg = np.where(truth, 0.8, 0.05).astype(np.float32)
        r = np.flatnonzero(truth.any((0, 2)))[0]
        fg[:, r][truth[:, r]] = 0.4
        fg[blob] = 0.9
        prob = np.stack([1 - fg, fg], axis=1)
        name = Path(case_filename(cid, "x")).name[: -len(".x.npy")]
        np.savez_compressed(run / "fold_0" / "val_predictions" / f"{name}.npz", prob=prob.astype(np.float16),
                            mask=(fg > 0.5).astype(np.uint8)[:, None])
    return run


def test_tune_one_class_softmax_for_dice_with_the_volume_largest_component(tmp_path):
    """Planted: the tumour's first row has probability 0.4 (threshold 0.3 needed) and a 0.9 blob sits on
    slice 4, away from it (only the largest component over the volume removes it; per slice it is the
    largest on its slice). Softmax probabilities are stored with their background channel."""
    from medseg.bundle import load_bundle
    from medseg.inference.segmenter import Segmenter

    run = _one_class_run(tmp_path, {}, np.s_[4, 13:15, 13:15])
    res = tune(run, presence=[])
    assert res["objective"] == "dice" and res["written"]
    # before: argmax misses the first row (6 of 36 px) on each of the 3 tumour slices, adds the 4-px blob
    tp, t_sum, p_sum = 90, 108, 90 + 4
    assert res["score_before"] == pytest.approx(2 * tp / (t_sum + p_sum))
    assert res["score"] == pytest.approx(1.0)
    assert res["largest_cc"] and res["components"] == "volume" and res["classes"][0]["threshold"] == 0.3
    assert res["per_fold"] == {"0": {"score_before": pytest.approx(res["score_before"]), "score": pytest.approx(1.0)}}
    assert res["nested"] == {}  # one fold: nothing to choose on but itself
    pp = load_bundle(run / "fold_0" / "model.pt")["postprocess"]
    assert pp["thresholds"] == [0.3] and pp["largest_cc"] and pp["components"] == "volume"
    # the segmenter decides a one-class softmax by its tuned foreground threshold, not by argmax
    seg = Segmenter.load(run / "fold_0" / "model.pt")
    x = np.random.default_rng(0).normal(size=(5, 1, 16, 16)).astype(np.float32)
    p = seg.predict(x, probabilities=True, postprocess_overrides={"largest_cc": False}).prob[:, 0].astype(np.float32)
    got = seg.predict(x, postprocess_overrides={"largest_cc": False}).mask[:, 0]
    near = np.abs(p - 0.3) < 1e-3  # fp16 storage of the probabilities
    np.testing.assert_array_equal(got[~near], (p > 0.3)[~near])


def test_tune_again_can_drop_the_component_rule_it_chose_before(tmp_path):
    """A bundle already tuned to keep the largest component is still weighed against no component rule:
    here a 320-voxel false region (columns 12..15 of every slice) outsizes the 108-voxel tumour, so the
    rule keeps the wrong object (the LGG patient TCGA_CS_5395 in miniature)."""
    from medseg.bundle import load_bundle

    run = _one_class_run(tmp_path, {"largest_cc": True, "components": "volume"}, np.s_[:, :, 12:16])
    res = tune(run, presence=[])
    assert res["score_before"] == pytest.approx(0.0)  # threshold 0.5 and the largest component: the region alone
    assert not res["largest_cc"] and res["classes"][0]["threshold"] == 0.3
    assert res["score"] == pytest.approx(2 * 108 / (108 + 108 + 320))
    assert not load_bundle(run / "fold_0" / "model.pt")["postprocess"]["largest_cc"]


def test_evaluate_run_applies_the_tuned_rules_and_says_so(tmp_path, prepared):
    """`medseg evaluate RUN` scores the masks `medseg predict` would write: after tune, with its rules."""
    from medseg.evaluation.evaluate import evaluate

    run = _fake_run(tmp_path, prepared)
    before = evaluate(run, out=tmp_path / "e0", report=False)
    assert before["decision"].startswith("training's own decision")
    tune(run)
    after = evaluate(run, out=tmp_path / "e1", report=False)
    assert "medseg tune" in after["decision"] and "optimistic" in after["decision"]
    assert after["dataset"]["mean_dice"] == 1.0 > before["dataset"]["mean_dice"]
    assert after["uwmgi"]["score"] == 1.0 > before["uwmgi"]["score"]


def test_tuned_rules_read_back_what_tune_wrote_and_name_a_bad_file(tmp_path, prepared):
    """What `medseg tune` chose is read back (from the run or its tune.json) as the bundle's rules, and a
    JSON file of the same shape keeps a choice once its run is gone (experiments/lgg/lgg_postprocess*.json)."""
    from medseg.bundle import load_bundle
    from medseg.evaluation.tune import tuned_rules

    run = _fake_run(tmp_path, prepared)
    tune(run)
    pp = load_bundle(run / "fold_0" / "model.pt")["postprocess"]
    want = {k: pp.get(k) for k in ("thresholds", "presence", "largest_cc", "components")}
    assert tuned_rules(run) == tuned_rules(run / "tune.json") == want == {
        "thresholds": [0.3] * 3, "presence": [0.6] * 3, "largest_cc": False, "components": None}
    root = Path(__file__).resolve().parents[1] / "experiments" / "lgg"
    assert tuned_rules(root / "lgg_postprocess_loio_zbody.json") == {
        "thresholds": [0.3], "presence": [None], "largest_cc": True, "components": "volume"}
    with pytest.raises(MedsegError, match=r"nowhere/tune.json: no such file \(run `medseg tune"):
        tuned_rules(tmp_path / "nowhere")
    bad = tmp_path / "bad.json"
    for text, why in (('{"classes": [{"threshold": 0.3', "JSONDecodeError"), ('{"classes": []}', "KeyError: 'largest_cc'"),
                      ('{"classes": [], "largest_cc": true, "components": null}', "no classes"),
                      ('{"classes": [{"threshold": 0.3, "presence": null}], "largest_cc": true, "components": "3d"}',
                       "components not slice/volume/null")):
        bad.write_text(text)
        with pytest.raises(MedsegError, match=rf"bad.json: not a tune.json written by `medseg tune` \(.*{why}"):
            tuned_rules(bad)
