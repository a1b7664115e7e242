"""The shipped ``lgg-unet``: small fp16 weights in the package, trained without the bundled patients,
and good on them from the command line with nothing downloaded."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from conftest import FIXTURES
from medseg.bundle import SHIPPED, WEIGHTS_DIR

WEIGHTS = WEIGHTS_DIR / SHIPPED["lgg-unet"]
LGG = FIXTURES / "lgg" / "kaggle_3m"
pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"{WEIGHTS} is not in this checkout")


def test_weights_are_small_fp16_and_never_saw_the_bundled_patients():
    assert WEIGHTS.stat().st_size <= 30e6
    raw = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    floats = [v for v in raw["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    trained = set(raw["meta"]["training_patients"])
    assert len(trained) == 50
    bundled = {p.name.rsplit("_", 1)[0] for p in LGG.iterdir() if p.is_dir()}
    assert len(bundled) == 6 and not trained & bundled
    assert (WEIGHTS_DIR.parents[2] / raw["meta"]["card"]).is_file()


def test_cli_predicts_the_unseen_bundled_patients_well(tmp_path):
    from typer.testing import CliRunner

    from medseg.cli import app

    res = CliRunner().invoke(app, ["predict", "lgg-unet", str(LGG), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    dice = []
    for case in sorted(p for p in LGG.iterdir() if p.is_dir()):
        truth = [tifffile.imread(m) > 0 for m in sorted(case.glob("*_mask.tif"))]
        pred = [tifffile.imread(tmp_path / "out" / case.name / m.name) > 0 for m in sorted(case.glob("*_mask.tif"))]
        t, p = np.stack(truth), np.stack(pred)
        assert p.shape == t.shape  # every slice, in the input's 256 x 256
        dice.append(1.0 if not t.any() and not p.any() else 2 * (t & p).sum() / (t.sum() + p.sum()))
    assert np.mean(dice) >= 0.70, dice  # measured 0.756 (per patient 0-0.94), docs/models/lgg-unet.md


def test_python_api_returns_mask_and_probabilities():
    """``Segmenter.load(...).predict(...)`` gives ``.mask`` and ``.prob`` (as the README says), and the mask is
    the probability's decision; ``probabilities=False`` leaves ``.prob`` out to save memory."""
    from medseg import Segmenter

    seg = Segmenter.load("lgg-unet", tta=False)
    pred = seg.predict(FIXTURES / "lgg_tiny" / "kaggle_3m" / "TCGA_CS_5393_19990606")
    assert pred.prob is not None and pred.prob.shape == pred.mask.shape == (4, 1, 256, 256)
    t = seg.spec.postprocess["thresholds"][0]  # tuned into the shipped bundle
    p = pred.prob[:, 0].astype(np.float32)
    clear = np.abs(p - t) > 1e-3  # float16 probabilities: pixels at the threshold may round either way
    assert pred.mask.any() and np.array_equal((pred.mask[:, 0] > 0)[clear], (p > t)[clear])
    assert seg.predict(FIXTURES / "lgg_tiny" / "kaggle_3m" / "TCGA_CS_5393_19990606", probabilities=False).prob is None


def test_shipped_model_is_the_recipe_with_the_rules_it_names():
    """The model card's claims: trained by configs/lgg_unet.yaml (its normalisation and network), with the
    post-processing of the file its meta names (what `medseg tune` chose leaving one hospital out)."""
    from medseg.bundle import load_bundle
    from medseg.config import load_config
    from medseg.evaluation.tune import tuned_rules

    root = WEIGHTS_DIR.parents[2]
    cfg = load_config(root / "configs" / "lgg_unet.yaml")
    b = load_bundle(WEIGHTS)
    assert b["normalization"]["mode"] == cfg.data.normalization == "zscore_body"
    assert b["arch"]["kwargs"]["features"] == cfg.model.kwargs["features"]
    assert len(b["meta"]["members"]) == cfg.train.members == 2
    rules = tuned_rules(root / b["meta"]["postprocess_tuned_on"]["from"])
    assert {k: b["postprocess"][k] for k in rules} == rules
    assert rules["largest_cc"] and rules["components"] == "volume" and rules["thresholds"] == [0.3]
