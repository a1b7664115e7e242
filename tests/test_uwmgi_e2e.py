"""UW-Madison end to end, through the command line: a synthetic dataset in the exact competition layout
-> ``medseg prepare uwmgi`` -> ``medseg train`` (2.5D config, a few steps) -> ``medseg tune`` ->
``medseg predict`` on the test layout (images only) -> ``submission.csv`` -> ``medseg evaluate``.

Scores are checked against a scorer written here from the competition's definition (decoded masks,
exact distance transforms over whole volumes), independent of ``medseg.evaluation.uwmgi_score``.
"""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medseg.cli import app
from medseg.data.formats.uwmgi_synthetic import write_uwmgi_synthetic

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["large_bowel", "small_bowel", "stomach"]
NAME = re.compile(r"^slice_(\d+)_(\d+)_(\d+)_([\d.]+)_([\d.]+)\.png$")


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _cli(*args: str) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, f"{args}: {r.output}\n{r.exception!r}"
    return " ".join(r.output.split())  # rich wraps long lines


def _decode(rle: str, h: int, w: int) -> np.ndarray:
    """Plain-loop RLE decode (1-indexed starts, row-major), checking the competition's rules."""
    flat = np.zeros(h * w, np.uint8)
    nums = [int(t) for t in rle.split()]
    assert len(nums) % 2 == 0, rle
    prev_end = -1  # exclusive end of the previous run
    for s, n in zip(nums[0::2], nums[1::2]):
        assert n >= 1 and s - 1 > prev_end, "runs sorted, disjoint and not touching (canonical)"
        assert s - 1 + n <= h * w, "run past the image"
        flat[s - 1:s - 1 + n] = 1
        prev_end = s - 1 + n
    return flat.reshape(h, w)


def _hd(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.ndimage import distance_transform_edt

    sampling = 1.0 / np.asarray(a.shape, float)
    d_ab = distance_transform_edt(~b, sampling=sampling)[a].max()
    d_ba = distance_transform_edt(~a, sampling=sampling)[b].max()
    return max(d_ab, d_ba) / math.sqrt(3)


def reference_score(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> float:
    """Competition score of ``{case_day: mask[z, 3, h, w]}`` pairs: 0.4 mean 2D Dice over (slice, class)
    pairs not empty on both sides + 0.6 (1 - mean 3D Hausdorff over (case-day, class) pairs)."""
    dices, hds = [], []
    for day in truth:
        p, t = pred[day].astype(bool), truth[day].astype(bool)
        for k in range(t.shape[1]):
            for z in range(t.shape[0]):
                s = p[z, k].sum() + t[z, k].sum()
                if s:
                    dices.append(2 * (p[z, k] & t[z, k]).sum() / s)
            pa, ta = p[:, k].any(), t[:, k].any()
            if pa and ta:
                hds.append(_hd(p[:, k], t[:, k]))
            elif pa or ta:
                hds.append(1.0)
    return 0.4 * (np.mean(dices) if dices else 1.0) + 0.6 * (1 - (np.mean(hds) if hds else 0.0))


def _slices(images: Path) -> dict[str, list[tuple[str, int, int]]]:
    """{case_day: [(slice id, h, w)]} from the file names alone, in slice order."""
    out: dict[str, list[tuple[str, int, int, int]]] = {}
    for f in images.rglob("*.png"):
        m = NAME.match(f.name)
        day = f.parent.parent.name
        out.setdefault(day, []).append((f"{day}_slice_{m[1]}", int(m[1]), int(m[3]), int(m[2])))
    return {d: [(s, h, w) for s, _, h, w in sorted(v, key=lambda t: t[1])] for d, v in out.items()}


def _truth_masks(csv_path: Path, slices: dict[str, list[tuple[str, int, int]]]) -> dict[str, np.ndarray]:
    rows = {(r["id"], r["class"]): r["segmentation"] for r in csv.DictReader(open(csv_path))}
    return {d: np.stack([np.stack([_decode(rows[(s, c)], h, w) for c in CLASSES]) for s, h, w in v])
            for d, v in slices.items()}


@pytest.mark.slow
def test_competition_layout_to_scored_submission(tmp_path: Path):
    import torch

    torch.set_num_threads(1)
    data = write_uwmgi_synthetic(tmp_path / "uw", n_cases=3, days_per_case=2, slices_per_day=6, seed=3)
    pngs = sorted((data / "train").rglob("*.png"))
    sizes = {(m[2], m[3]) for m in (NAME.match(p.name) for p in pngs)}
    assert sizes == {("266", "266"), ("234", "234"), ("276", "276"), ("360", "310")}
    assert {NAME.match(p.name)[4] for p in pngs} == {"1.50", "1.63"}
    with Image.open(pngs[0]) as im:
        assert im.mode in ("I;16", "I;16B", "I")  # 16-bit grayscale
    # the test layout: images only, no csv (the hidden test set's shape)
    test = tmp_path / "comp" / "test"
    shutil.copytree(data / "train", test)

    out = _cli("prepare", "uwmgi", data, tmp_path / "prep", "--folds", "3", "--workers", "1")
    assert "prepared 6 cases, 3 patients, 36 slices" in out
    _cli("train", ROOT / "configs" / "uwmgi_25d_unet.yaml", "--out", tmp_path / "run",
         "--set", f"data.prepared={tmp_path / 'prep'}", "--set", "data.size=[64, 64]", "--set", "data.batch_size=4",
         "--set", "model.kwargs={base: 4, depth: 3}", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=3",
         "--set", "optim.lr=0.01")
    fold = tmp_path / "run" / "fold_0"
    b = torch.load(fold / "model.pt", weights_only=True)
    assert b["input"]["mode"] == "2.5d" and (b["input"]["context"], b["input"]["stride"]) == (1, 2)
    assert b["arch"]["in_channels"] == 3 and b["class_kind"] == "multilabel"

    # validation logged the competition score of its own thresholded predictions, per case-day
    slices = _slices(data / "train")
    truth = _truth_masks(data / "train.csv", slices)
    val = {f.stem: np.load(f)["mask"] for f in (fold / "val_predictions").glob("*.npz")}
    assert val and set(val) < set(truth)
    logged = list(csv.DictReader(open(fold / "metrics.csv")))[-1]
    assert float(logged["val_uwmgi_score"]) == pytest.approx(reference_score(val, {d: truth[d] for d in val}), abs=1e-5)

    out = _cli("tune", tmp_path / "run")
    tuned = json.loads((tmp_path / "run" / "tune.json").read_text())
    assert f"UW-Madison score {tuned['score_before']:.4f} -> {tuned['score']:.4f}" in out
    assert tuned["score"] >= tuned["score_before"] and tuned["case_days"] == len(val)
    b = torch.load(fold / "model.pt", weights_only=True)
    assert b["postprocess"]["thresholds"] == [c["threshold"] for c in tuned["classes"]]
    assert b["postprocess"]["presence"] == [c["presence"] for c in tuned["classes"]]

    _cli("predict", tmp_path / "run", test, tmp_path / "out")
    sub = tmp_path / "out" / "submission.csv"
    rows = list(csv.reader(open(sub)))
    assert rows[0] == ["id", "class", "predicted"]
    expected = [(s, c) for d in sorted(slices, key=_natural) for s, _, _ in slices[d] for c in CLASSES]
    assert [(r[0], r[1]) for r in rows[1:]] == expected  # every id x class of the input, in order
    size = {s: (h, w) for v in slices.values() for s, h, w in v}
    got = {(r[0], r[1]): _decode(r[2], *size[r[0]]) for r in rows[1:]}  # valid RLE, or _decode fails
    assert all((r[2] == "") == (not got[(r[0], r[1])].any()) for r in rows[1:])
    pred = {d: np.stack([np.stack([got[(s, c)] for c in CLASSES]) for s, _, _ in v]) for d, v in slices.items()}
    assert any(m.any() for m in pred.values())
    # what tune promised on the validation case-days is what predict delivers there (same model, no TTA)
    assert reference_score({d: pred[d] for d in val}, {d: truth[d] for d in val}) == pytest.approx(tuned["score"], abs=2e-3)

    out = _cli("evaluate", sub, data / "train.csv", "--images", data / "train", "--out", tmp_path / "ev", "--no-report")
    score = json.loads((tmp_path / "ev" / "summary.json").read_text())["uwmgi"]["score"]
    assert score == pytest.approx(reference_score(pred, truth), abs=1e-9)
    assert f"UW-Madison score {score:.4f}" in out


@pytest.mark.slow
def test_3d_config_trains_and_predicts_a_submission(tmp_path: Path):
    import torch

    torch.set_num_threads(1)
    data = write_uwmgi_synthetic(tmp_path / "uw", n_cases=2, days_per_case=1, slices_per_day=8, seed=5)
    _cli("prepare", "uwmgi", data, tmp_path / "prep", "--folds", "2", "--workers", "1")
    _cli("train", ROOT / "configs" / "uwmgi_3d.yaml", "--out", tmp_path / "run",
         "--set", f"data.prepared={tmp_path / 'prep'}", "--set", "data.size=[8, 64, 64]", "--set", "model.kwargs={base: 4, depth: 3}",
         "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2")
    row = list(csv.DictReader(open(tmp_path / "run" / "fold_0" / "metrics.csv")))[-1]
    assert 0.0 <= float(row["val_uwmgi_score"]) <= 1.0
    b = torch.load(tmp_path / "run" / "fold_0" / "model.pt", weights_only=True)
    assert b["input"]["mode"] == "3d" and b["arch"]["spatial_dims"] == 3
    shutil.copytree(data / "train", tmp_path / "test")
    _cli("predict", tmp_path / "run", tmp_path / "test", tmp_path / "out")
    rows = list(csv.reader(open(tmp_path / "out" / "submission.csv")))
    slices = _slices(data / "train")
    assert [(r[0], r[1]) for r in rows[1:]] == [(s, c) for d in sorted(slices, key=_natural) for s, _, _ in slices[d] for c in CLASSES]
