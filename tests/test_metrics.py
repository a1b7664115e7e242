"""Metrics against hand-computed values on small arrays, and surface distances against MONAI."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.evaluation.metrics import (
    case_dice,
    case_metrics,
    counts,
    overlap_from_counts,
    slice_overlap,
    summarize,
    surface_metrics,
)


def test_overlap_hand_computed():
    # pred 3 pixels, truth 2 pixels, 1 shared: tp 1, fp 2, fn 1
    p = np.zeros((4, 4), bool)
    t = np.zeros((4, 4), bool)
    p[0, 0] = p[0, 1] = p[0, 2] = True
    t[0, 2] = t[3, 3] = True
    tp, fp, fn = counts(p, t)
    assert (int(tp), int(fp), int(fn)) == (1, 2, 1)
    m = overlap_from_counts(tp, fp, fn)
    assert m["dice"] == pytest.approx(2 / 5)
    assert m["iou"] == pytest.approx(1 / 4)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("empty,expected", [("skip", None), ("one", 1.0), ("zero", 0.0)])
def test_empty_empty_convention(empty, expected):
    z = np.zeros((3, 5, 5), bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from 0/0
        m = overlap_from_counts(*counts(z, z), empty=empty)
        s = surface_metrics(z, z, spacing=(2, 1, 1), empty=empty)
    for key in ("dice", "iou", "precision", "recall"):
        assert (math.isnan(m[key]) if expected is None else m[key] == expected)
    if expected is None:
        assert all(math.isnan(v) for v in s.values())
    elif expected == 1.0:
        assert s == {"hd": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    else:
        diag = math.sqrt(6**2 + 5**2 + 5**2)
        assert s == pytest.approx({"hd": diag, "hd95": diag, "assd": diag, "nsd": 0.0})


def test_empty_vs_nonempty_is_zero_and_worst_distance():
    z = np.zeros((2, 4, 4), bool)
    t = z.copy()
    t[1, 2, 2] = True
    diag = math.sqrt((2 * 3.0) ** 2 + (4 * 0.5) ** 2 + (4 * 0.5) ** 2)
    for empty in ("skip", "one", "zero"):
        for a, b in ((z, t), (t, z)):
            m = overlap_from_counts(*counts(a, b), empty=empty)
            assert m["dice"] == 0.0 and m["iou"] == 0.0 and m["precision"] == 0.0 and m["recall"] == 0.0
            s = surface_metrics(a, b, spacing=(3.0, 0.5, 0.5), empty=empty)
            assert s == pytest.approx({"hd": diag, "hd95": diag, "assd": diag, "nsd": 0.0})


def test_case_dice_lgg_headline():
    z = np.zeros((2, 1, 4, 4), np.uint8)
    t = z.copy()
    t[0, 0, 1, 1] = 1
    assert case_dice(z, z, empty="one") == 1.0
    assert case_dice(z, z, empty="zero") == 0.0
    assert math.isnan(case_dice(z, z, empty="skip"))
    assert case_dice(t, z) == 0.0 and case_dice(z, t) == 0.0
    assert case_dice(t, t) == 1.0
    with pytest.raises(MedsegError, match="unknown empty-mask convention 'nan'"):
        case_dice(t, t, empty="nan")


def test_single_voxel():
    p = np.zeros((3, 3, 3), bool)
    t = p.copy()
    p[1, 1, 1] = True
    t[1, 1, 1] = True
    s = surface_metrics(p, t, spacing=(5, 1, 1))
    assert s == {"hd": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    t2 = np.zeros_like(t)
    t2[2, 1, 1] = True  # one slice further: 5 mm with anisotropic spacing
    s = surface_metrics(p, t2, spacing=(5, 1, 1), tolerance=4.9)
    assert s == pytest.approx({"hd": 5.0, "hd95": 5.0, "assd": 5.0, "nsd": 0.0})
    assert surface_metrics(p, t2, spacing=(5, 1, 1), tolerance=5.0)["nsd"] == 1.0


def test_anisotropic_hand_computed():
    # two 1-voxel-thick squares (every voxel is surface); truth shifted by 1 column (x spacing 0.5)
    # and the prediction has one extra voxel 3 rows away (y spacing 2)
    p = np.zeros((1, 8, 8), bool)
    t = np.zeros((1, 8, 8), bool)
    t[0, 2:4, 2:4] = True
    p[0, 2:4, 3:5] = True
    p[0, 6, 3] = True  # 3 rows below row 3: 6 mm from truth (0, 3, 3)
    s = surface_metrics(p, t, spacing=(1.0, 2.0, 0.5), tolerance=0.5)
    # pred -> truth: (2,3),(3,3) 0; (2,4),(3,4) 0.5; (6,3) 6.0. truth -> pred: (2,2),(3,2) 0.5; rest 0
    d_pt = np.array([0, 0.5, 0, 0.5, 6.0])
    d_tp = np.array([0.5, 0, 0.5, 0])
    assert s["hd"] == pytest.approx(6.0)
    assert s["hd95"] == pytest.approx(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
    assert s["assd"] == pytest.approx(np.concatenate([d_pt, d_tp]).mean())
    assert s["nsd"] == pytest.approx(8 / 9)


def _monai(p: np.ndarray, t: np.ndarray, spacing, tol):
    import torch

    yp = torch.from_numpy(p[None, None].astype(np.float32))
    yt = torch.from_numpy(t[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's own internal deprecation notice
        return _monai_values(yp, yt, spacing, tol)


def _monai_values(yp, yt, spacing, tol):
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    return {
        "hd": compute_hausdorff_distance(yp, yt, spacing=spacing).item(),
        "hd95": compute_hausdorff_distance(yp, yt, percentile=95, spacing=spacing).item(),
        "assd": compute_average_surface_distance(yp, yt, symmetric=True, spacing=spacing).item(),
        "nsd": compute_surface_dice(yp, yt, [tol], spacing=spacing).item(),
    }


@pytest.mark.parametrize("seed", range(6))
def test_surface_metrics_equal_monai_on_random_shapes(seed):
    from scipy.ndimage import binary_dilation, gaussian_filter

    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(4, 12)), int(rng.integers(10, 30)), int(rng.integers(10, 30)))
    t = gaussian_filter(rng.random(shape), 1.5) > 0.52
    p = binary_dilation(t) if seed % 2 else t.copy()
    p ^= rng.random(shape) > 0.97  # scattered errors, some near the border
    t[0, 0, 0] = True  # touches the volume border
    if not t.any() or not p.any():
        pytest.skip("degenerate random draw")
    spacing = tuple(float(v) for v in rng.uniform(0.4, 3.0, 3))
    ours = surface_metrics(p, t, spacing=spacing, tolerance=1.5)
    ref = _monai(p, t, spacing, 1.5)
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-5)
    # 2D too
    ours2 = surface_metrics(p[1], t[1], spacing=spacing[1:], tolerance=1.5) if p[1].any() and t[1].any() else None
    if ours2 is not None:
        assert ours2 == pytest.approx(_monai(p[1], t[1], spacing[1:], 1.5), rel=1e-5, abs=1e-5)


def test_case_metrics_rows_and_shape_error():
    t = np.zeros((2, 2, 6, 6), np.uint8)
    p = t.copy()
    t[:, 0, 1:3, 1:3] = 1
    p[:, 0, 1:3, 1:4] = 1
    rows = case_metrics(p, t, spacing=(1, 1, 1), empty="one")
    assert rows[0]["truth_voxels"] == 8 and rows[0]["pred_voxels"] == 12
    assert rows[0]["dice"] == pytest.approx(16 / 20)
    assert rows[1]["dice"] == 1.0 and rows[1]["hd95"] == 0.0  # class 2 empty on both sides
    with pytest.raises(MedsegError, match=r"prediction shape \(2, 2, 6, 5\) differs from truth shape"):
        case_metrics(p[..., :5], t)


def test_slice_overlap_and_summary():
    t = np.zeros((3, 1, 4, 4), np.uint8)
    p = t.copy()
    t[0, 0, 0, 0] = 1
    p[0, 0, 0, 0] = 1
    p[1, 0, 1, 1] = 1
    s = slice_overlap(p, t)
    assert s["dice"][:, 0].tolist()[:2] == [1.0, 0.0] and math.isnan(s["dice"][2, 0])
    assert s["truth_pixels"][:, 0].tolist() == [1, 0, 0]
    summ = summarize(s["dice"][:, 0])
    assert summ == {"mean": 0.5, "median": 0.5, "std": 0.5, "min": 0.0, "max": 1.0, "n": 2}
    assert summarize([float("nan")])["mean"] is None
