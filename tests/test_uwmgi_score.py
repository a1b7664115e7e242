"""The UW-Madison score on synthetic submissions against a straightforward implementation of the
competition's definition written here (loops, scipy's directed_hausdorff on all foreground points)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import directed_hausdorff

from medseg.data.rle import encode
from medseg.errors import MedsegError
from medseg.evaluation.uwmgi_score import CLASSES, hausdorff_normalized, uwmgi_score


def reference_score(pred, truth, shapes):
    """0.4 * mean 2D Dice (both-empty skipped) + 0.6 * (1 - mean normalised 3D HD / sqrt 3)."""
    dices = []
    for key, t in truth.items():
        p = pred[key]
        if t.sum() + p.sum() == 0:
            continue
        dices.append(2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    days = sorted({k[0].rsplit("_slice_", 1)[0] for k in truth})
    hds = []
    for day in days:
        ids = sorted({k[0] for k in truth if k[0].startswith(day + "_slice_")},
                     key=lambda s: int(s.rsplit("_", 1)[1]))
        for cls in CLASSES:
            pv = np.stack([pred[(i, cls)] for i in ids]).astype(bool)
            tv = np.stack([truth[(i, cls)] for i in ids]).astype(bool)
            if not pv.any() and not tv.any():
                continue
            if pv.any() != tv.any():
                hds.append(1.0)
                continue
            a = np.argwhere(pv) / np.array(pv.shape)
            b = np.argwhere(tv) / np.array(tv.shape)
            hds.append(max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]) / math.sqrt(3))
    return 0.4 * float(np.mean(dices)) + 0.6 * (1 - float(np.mean(hds)))


def synthetic(seed, days=3, slices=6, shape=(20, 24)):
    rng = np.random.default_rng(seed)
    pred, truth, shapes = {}, {}, {}
    for d in range(days):
        zz, yy, xx = np.ogrid[:slices, : shape[0], : shape[1]]
        for ci, cls in enumerate(CLASSES):
            c = rng.uniform(0.2, 0.8, 3) * (slices, *shape)
            r = rng.uniform(0.15, 0.4, 3) * (slices, *shape)
            t = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
            c2 = c + rng.normal(0, 2, 3)
            p = ((zz - c2[0]) / r[0]) ** 2 + ((yy - c2[1]) / r[1]) ** 2 + ((xx - c2[2]) / r[2]) ** 2 <= 1
            p ^= rng.random(p.shape) > 0.995  # stray voxels far away: exercises the EDT path
            if d == 1 and ci == 0:
                p[:] = False  # organ missed entirely -> HD 1
            if d == 2 and ci == 1:
                p[:] = t[:] = False  # absent on both sides -> skipped
            if d == 2 and ci == 2:
                t[:] = False  # false-positive organ -> HD 1
            for z in range(slices):
                # out-of-order slice numbers: the volume must be stacked by number, not by key order
                sid = f"case{7 + d}_day{d}_slice_{(z + 1) * 3:04d}"
                shapes[sid] = shape
                truth[(sid, cls)] = t[z].astype(np.uint8)
                pred[(sid, cls)] = p[z].astype(np.uint8)
    return pred, truth, shapes


@pytest.mark.parametrize("seed", range(4))
def test_score_matches_reference(seed):
    pred, truth, shapes = synthetic(seed)
    expected = reference_score(pred, truth, shapes)
    keys = list(truth)[::-1]
    got = uwmgi_score({k: pred[k] for k in keys}, {k: truth[k] for k in keys}, shapes)
    assert got.score == pytest.approx(expected, abs=1e-12)
    # the same through RLE strings, as a submission holds them
    got_rle = uwmgi_score({k: encode(v) for k, v in pred.items()}, {k: encode(v) for k, v in truth.items()}, shapes)
    assert got_rle.score == pytest.approx(expected, abs=1e-12)
    assert got_rle.n_hd == 3 * 3 - 1  # one (case-day, class) empty on both sides


def test_perfect_and_hand_computed():
    t = np.zeros((4, 4), np.uint8)
    t[1, 1] = 1
    e = np.zeros((4, 4), np.uint8)
    truth = {("case1_day1_slice_0001", "stomach"): t, ("case1_day1_slice_0002", "stomach"): e}
    shapes = {"case1_day1_slice_0001": (4, 4), "case1_day1_slice_0002": (4, 4)}
    assert uwmgi_score(truth, truth, shapes).score == 1.0
    p2 = np.zeros((4, 4), np.uint8)
    p2[1, 1] = p2[1, 3] = 1
    # Dice 2*1/(2+1) on slice 1 (slice 2 skipped); HD: (1,3)->(1,1) is 2/4 along x in a [2,4,4] volume
    res = uwmgi_score({("case1_day1_slice_0001", "stomach"): p2, ("case1_day1_slice_0002", "stomach"): e},
                      truth, shapes)
    assert res.dice == pytest.approx(2 / 3)
    assert res.hd == pytest.approx(0.5 / math.sqrt(3))
    assert res.score == pytest.approx(0.4 * 2 / 3 + 0.6 * (1 - 0.5 / math.sqrt(3)))


def test_hausdorff_paths_equal_directed_hausdorff():
    rng = np.random.default_rng(3)
    for trial in range(6):
        t = rng.random((5, 12, 14)) > 0.7
        p = t.copy() if trial % 2 else rng.random((5, 12, 14)) > 0.6
        p[rng.integers(0, 5), rng.integers(0, 12), rng.integers(0, 14)] ^= True
        if not p.any() or not t.any():
            continue
        a, b = np.argwhere(p) / p.shape, np.argwhere(t) / t.shape
        ref = max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]) / math.sqrt(3)
        assert hausdorff_normalized(p, t) == pytest.approx(ref, abs=1e-12)


def test_errors_name_the_problem():
    t = np.zeros((4, 4), np.uint8)
    truth = {("case1_day1_slice_0001", "stomach"): t, ("case1_day1_slice_0001", "small_bowel"): t}
    shapes = {"case1_day1_slice_0001": (4, 4)}
    with pytest.raises(MedsegError, match=r"sub.csv: 1 \(id, class\) pairs of the ground truth have no "
                                          r"prediction, e.g. id case1_day1_slice_0001, class small_bowel"):
        uwmgi_score({("case1_day1_slice_0001", "stomach"): t}, truth, shapes, pred_path="sub.csv")
    extra = dict(truth)
    extra[("case9_day1_slice_0001", "stomach")] = t
    with pytest.raises(MedsegError, match="1 predicted .* not in the ground truth, e.g. id case9_day1_slice_0001"):
        uwmgi_score(extra, truth, shapes)
    with pytest.raises(MedsegError, match=r"mask shape \(3, 4\) differs from the slice shape \(4, 4\)"):
        uwmgi_score({k: t[:3] for k in truth}, truth, shapes)
    with pytest.raises(MedsegError, match="bad RLE for id case1_day1_slice_0001, class .*: odd number of values"):
        uwmgi_score({k: "1 2 5" for k in truth}, truth, shapes)
    with pytest.raises(MedsegError, match="past the image end"):
        uwmgi_score({k: "10 10" for k in truth}, truth, shapes)
