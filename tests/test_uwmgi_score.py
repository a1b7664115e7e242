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


# ------------------------------------------------------------------ the mle-bench grader's variant
def grader_reference(sub_rows, answer_rows, shapes):
    """The public mle-bench grader's computation, written out here from its published description:
    rows in the answers' order; RLE decoded column-major; Dice per row (both empty skipped); per
    case-day, the classes OR-ed per slice and slices stacked in id order; Hausdorff on coordinates over
    the shape with the grader's shortcuts (equal 0, one side empty 1, prediction > 10x truth 1)."""
    def decode_f(rle, h, w):
        m = np.zeros(h * w, np.uint8)
        vals = [int(v) for v in (rle or "").split()]
        for s, n in zip(vals[0::2], vals[1::2]):
            m[s - 1:s - 1 + n] = 1
        return m.reshape((w, h)).T

    subs = [decode_f(r, *shapes[i]) for i, _, r in sub_rows]
    ans = [decode_f(r, *shapes[i]) for i, _, r in answer_rows]
    dices = []
    for p, t in zip(subs, ans):
        if p.sum() == 0 and t.sum() == 0:
            continue
        dices.append(2 * (p * t).sum() / (p.sum() + t.sum()))

    def by_day(masks, rows):
        slices: dict = {}
        for m, (i, _, _) in sorted(zip(masks, rows), key=lambda x: x[1][0]):
            slices.setdefault(i, []).append(m)
        days: dict = {}
        for i, ms in slices.items():
            days.setdefault(i.split("_slice_")[0], []).append(np.logical_or.reduce(ms).astype(np.uint8))
        return {d: np.stack(v) for d, v in days.items()}

    sp, sa = by_day(subs, sub_rows), by_day(ans, answer_rows)
    hds = []
    for d in sa:
        p, t = sp[d], sa[d]
        if p.sum() == 0 and t.sum() == 0:
            continue
        if np.array_equal(p, t):
            hds.append(0.0)
        elif p.sum() == 0 or t.sum() == 0 or p.sum() > 10 * t.sum():
            hds.append(1.0)
        else:
            a, b = np.argwhere(t) / t.shape, np.argwhere(p) / t.shape
            hds.append(max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]) / math.sqrt(3))
    return 0.4 * float(np.mean(dices)) + 0.6 * (1 - float(np.mean(hds)))


@pytest.mark.parametrize("seed", range(4))
def test_mlebench_variant_agrees_with_the_graders_computation(seed):
    pred, truth, shapes = synthetic(seed, shape=(20, 24))  # not square: the pixel order matters
    rows_t = [(i, c, encode(truth[(i, c)])) for i, c in sorted(truth)]
    rows_p = [(i, c, encode(pred[(i, c)])) for i, c, _ in rows_t]
    expected = grader_reference(rows_p, rows_t, shapes)
    got = uwmgi_score({(i, c): r for i, c, r in rows_p}, {(i, c): r for i, c, r in rows_t}, shapes, variant="mlebench")
    assert got.score == pytest.approx(expected, abs=1e-9)
    arrays = uwmgi_score(pred, truth, shapes, variant="mlebench")  # masks instead of RLE strings: the same
    assert arrays.score == pytest.approx(expected, abs=1e-9)
    competition = uwmgi_score(pred, truth, shapes)
    assert competition.dice == pytest.approx(got.dice, abs=1e-12)  # only the Hausdorff term differs
    assert abs(competition.score - got.score) > 1e-4


def test_mlebench_variant_large_prediction_shortcut_and_speed():
    """A prediction over 10x the truth's volume scores distance 1 without computing it; a large one under
    that bound is computed exactly (distance transform), not by pairwise distances."""
    import time

    shape = (266, 266)
    ids = [f"case1_day1_slice_{z:04d}" for z in range(1, 81)]
    shapes = {i: shape for i in ids}
    truth, pred = {}, {}
    for z, i in enumerate(ids):
        t = np.zeros(shape, np.uint8)
        t[100:160, 100:160] = 1
        p = np.zeros(shape, np.uint8)
        p[60:230, 40:240] = 1  # about 9.4x the truth: computed
        for c in CLASSES:
            truth[(i, c)], pred[(i, c)] = (t, p) if c == "stomach" else (np.zeros(shape, np.uint8),) * 2
    t0 = time.perf_counter()
    got = uwmgi_score(pred, truth, shapes, variant="mlebench")
    assert time.perf_counter() - t0 < 60  # 80 slices of 266², 1.4 M predicted voxels: seconds, not minutes
    # by hand: the truth lies inside the prediction; the farthest predicted voxel (229, 239) is 70 rows and
    # 80 columns from the truth's box, on coordinates divided by 266
    hd = math.hypot(70 / 266, 80 / 266) / math.sqrt(3)
    dice = 2 * 60 * 60 / (60 * 60 + 170 * 200)
    assert got.hd == pytest.approx(hd, abs=1e-12)
    assert got.score == pytest.approx(0.4 * dice + 0.6 * (1 - hd), abs=1e-12)
    for i in ids:
        pred[(i, "stomach")] = np.ones(shape, np.uint8)  # 19.6x: the grader's shortcut
    assert uwmgi_score(pred, truth, shapes, variant="mlebench").hd == 1.0


def test_unknown_variant_is_refused():
    pred, truth, shapes = synthetic(0, days=1, slices=2)
    with pytest.raises(MedsegError, match="--uw-score must be one of competition, mlebench"):
        uwmgi_score(pred, truth, shapes, variant="kaggle")
