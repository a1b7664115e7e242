"""``scripts/ship_model.py``: a trained model.pt becomes a shipped fp16 bundle with the post-processing a
tune chose, and names no machine's folders."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _ship_module():
    spec = importlib.util.spec_from_file_location("ship_model", ROOT / "scripts" / "ship_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _trained(path: Path, prepared: str) -> Path:
    from medseg.bundle import save_bundle
    from medseg.models import create_model

    m = create_model("unet", 3, 1, spatial_dims=2, base=4, depth=2)
    return save_bundle({"arch": {"name": "unet", "in_channels": 3, "out_channels": 1, "spatial_dims": 2,
                                 "kwargs": {"base": 4, "depth": 2}},
                        "state_dict": m.state_dict(), "classes": ["tumor"], "class_kind": "multiclass",
                        "channels": ["pre", "flair", "post"],
                        "input": {"mode": "2d", "size": [64, 64], "resize": True, "divisor": 4},
                        "normalization": {"mode": "zscore_body"},
                        "postprocess": {"thresholds": [0.5], "presence": None, "min_size": 0, "largest_cc": False},
                        "tta": {"flips": [[-1], [-2]]},
                        "meta": {"epoch": 3, "fold": "full", "config": {"data": {"prepared": prepared}}}}, path)


def test_ship_takes_the_kept_rules_and_records_where_they_were_chosen(tmp_path, monkeypatch):
    from medseg.bundle import load_bundle

    ship = _ship_module()
    monkeypatch.setattr(ship, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.chdir(ROOT)
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "dataset.json").write_text(json.dumps({"cases": [{"patient": "P2"}, {"patient": "P1"}, {"patient": "P1"}]}))
    model = _trained(tmp_path / "run" / "full" / "model.pt", str(prep))
    kept = "experiments/lgg/lgg_postprocess_loio_zbody.json"
    monkeypatch.setattr(sys, "argv", ["ship_model.py", str(model), "lgg-unet", "--card", "docs/models/lgg-unet.md",
                                      "--postprocess-from", kept])
    ship.main()
    out = tmp_path / "weights" / "lgg-unet.pt"
    b = load_bundle(out)
    assert {k: b["postprocess"][k] for k in ("thresholds", "presence", "largest_cc", "components")} == {
        "thresholds": [0.3], "presence": [None], "largest_cc": True, "components": "volume"}
    tuned = b["meta"]["postprocess_tuned_on"]
    assert tuned["from"] == kept and tuned["run"] == "runs/lgg_loio_zbody" and tuned["folds"] == [0, 1, 2, 3, 4]
    assert b["meta"]["training_patients"] == ["P1", "P2"] and b["normalization"] == {"mode": "zscore_body"}
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())
    # the shipped file names no folder of the machine it was made on
    assert str(tmp_path) not in json.dumps(raw["meta"])
    # outside the working directory, a path keeps its last two parts
    assert raw["meta"]["config"]["data"]["prepared"] == f"{tmp_path.name}/prep"
    assert raw["meta"]["trained_from"] == "full/model.pt"


def test_ship_names_a_rules_file_it_cannot_read(tmp_path, monkeypatch):
    """Run as a script: one line naming the file, before anything is written."""
    model = _trained(tmp_path / "model.pt", "")
    bad = tmp_path / "rules.json"
    bad.write_text('{"classes": [{"threshold": 0.3}]}')
    monkeypatch.setattr(sys, "argv", ["ship_model.py", str(model), "lgg-unet", "--postprocess-from", str(bad)])
    with pytest.raises(SystemExit, match=r"error: .*rules.json: not a tune.json written by `medseg tune` \(KeyError: 'presence'"):
        exec(compile((ROOT / "scripts" / "ship_model.py").read_text(), "ship_model.py", "exec"),
             {"__name__": "__main__", "__file__": str(ROOT / "scripts" / "ship_model.py")})
