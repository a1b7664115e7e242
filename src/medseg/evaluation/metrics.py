"""Segmentation metrics on binary masks, spacing-aware (mm), with an explicit empty-mask convention.

Overlap metrics (Dice, IoU, precision, recall) come from voxel counts, vectorised over slices and
classes. Surface metrics (HD, HD95, ASSD, NSD) are MONAI's (``compute_hausdorff_distance``,
``compute_average_surface_distance``, ``compute_surface_dice`` with ``use_subvoxels=False``):
surface voxels are ``mask XOR binary_erosion(mask)`` and distances exact Euclidean distances in mm
between surface voxels, from MONAI's ``get_edge_surface_distance`` called once per case and class
(the four ``compute_*`` functions would each recompute it); ``tests/test_metrics.py`` checks
equality with the ``compute_*`` functions.

Empty masks (see docs/evaluation.md) -- ``empty`` decides what a class absent from BOTH prediction
and truth scores:

- ``"skip"``: NaN, left out of every mean (the nnU-Net / MONAI convention);
- ``"one"``: a perfect score (Dice/IoU/precision/recall/NSD 1, distances 0);
- ``"zero"``: a failure (Dice/IoU/precision/recall/NSD 0, distances = the volume's diagonal in mm).

A class present on exactly one side always scores Dice/IoU/NSD 0 and distances equal to the
volume's diagonal in mm (the largest possible distance, the BraTS-style worst value), so it never
yields NaN or inf. Precision with an empty prediction (truth non-empty) and recall with an empty
truth (prediction non-empty) are 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.errors import MedsegError

EMPTY_CONVENTIONS = ("skip", "one", "zero")
OVERLAP_METRICS = ("dice", "iou", "precision", "recall")
SURFACE_METRICS = ("hd", "hd95", "assd", "nsd")
METRICS = OVERLAP_METRICS + SURFACE_METRICS
LOWER_IS_BETTER = frozenset({"hd", "hd95", "assd"})


def check_empty(empty: str) -> str:
    if empty not in EMPTY_CONVENTIONS:
        raise MedsegError(f"unknown empty-mask convention {empty!r}; use one of {', '.join(EMPTY_CONVENTIONS)}")
    return empty


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def counts(pred: np.ndarray, truth: np.ndarray, axes: int | Sequence[int] | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, fp, fn) voxel counts of two binary masks, summed over ``axes`` (all if None)."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise MedsegError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    ax = tuple(axes) if isinstance(axes, Sequence) else axes
    tp = np.count_nonzero(p & t, axis=ax)
    ps = np.count_nonzero(p, axis=ax)
    ts = np.count_nonzero(t, axis=ax)
    return np.asarray(tp, np.int64), np.asarray(ps - tp, np.int64), np.asarray(ts - tp, np.int64)


def overlap_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, empty: str = "skip"
                        ) -> dict[str, np.ndarray]:
    """Dice, IoU, precision, recall from counts (any shape), with the empty convention applied."""
    check_empty(empty)
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    out = {
        "dice": _safe_div(2 * tp, 2 * tp + fp + fn),
        "iou": _safe_div(tp, tp + fp + fn),
        "precision": _safe_div(tp, tp + fp),
        "recall": _safe_div(tp, tp + fn),
    }
    both_empty = (tp + fp + fn) == 0
    if both_empty.any():
        fill = {"skip": np.nan, "one": 1.0, "zero": 0.0}[empty]
        for v in out.values():
            v[both_empty] = fill
    return out


def case_dice(pred: np.ndarray, truth: np.ndarray, empty: str = "one") -> float:
    """Dice of two binary masks of any shape (e.g. a whole patient's 3D mask).

    Both empty: 1 (``empty="one"``), 0 (``"zero"``) or NaN (``"skip"``); exactly one empty: 0.
    With ``empty="one"`` this is the LGG headline metric (per-patient 3D Dice where a patient
    without tumour scores 1 if the prediction is empty too, else 0).
    """
    tp, fp, fn = counts(pred, truth)
    return float(overlap_from_counts(tp, fp, fn, empty)["dice"])


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to the surface of ``truth``, and back.

    Both masks must be non-empty. This is MONAI's ``get_edge_surface_distance`` (bounding-box crop,
    ``mask XOR erosion`` surfaces, exact Euclidean distances), called once so that HD, HD95, ASSD
    and NSD share it instead of recomputing it per metric as the ``compute_*`` functions do.
    """
    import warnings

    import torch
    from monai.metrics.utils import get_edge_surface_distance

    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if not p.any() or not t.any():
        raise ValueError("surface_distances needs two non-empty masks")
    sp = [1.0] * p.ndim if spacing is None else [float(v) for v in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's own internal deprecation notice
        _, (d_pt, d_tp), _ = get_edge_surface_distance(
            torch.from_numpy(p), torch.from_numpy(t), distance_metric="euclidean", spacing=sp, symmetric=True
        )
    return np.asarray(d_pt, dtype=np.float64), np.asarray(d_tp, dtype=np.float64)


def diagonal_mm(shape: Sequence[int], spacing: Sequence[float] | None) -> float:
    sp = np.ones(len(shape)) if spacing is None else np.asarray(spacing, dtype=np.float64)
    return float(np.sqrt(np.sum((np.asarray(shape) * sp) ** 2)))


def surface_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None,
                    tolerance: float = 1.0, empty: str = "skip") -> dict[str, float]:
    """HD (max), HD95, ASSD (mm) and surface Dice at ``tolerance`` mm, as MONAI defines them."""
    check_empty(empty)
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise MedsegError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    pa, ta = bool(p.any()), bool(t.any())
    worst = diagonal_mm(p.shape, spacing)
    if not pa and not ta:
        if empty == "skip":
            return dict.fromkeys(SURFACE_METRICS, float("nan"))
        good = empty == "one"
        return {"hd": 0.0 if good else worst, "hd95": 0.0 if good else worst,
                "assd": 0.0 if good else worst, "nsd": 1.0 if good else 0.0}
    if pa != ta:
        return {"hd": worst, "hd95": worst, "assd": worst, "nsd": 0.0}
    d_pt, d_tp = surface_distances(p, t, spacing)
    return {
        "hd": float(max(d_pt.max(), d_tp.max())),
        # torch.quantile (MONAI) and np.percentile both interpolate linearly
        "hd95": float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))),
        "assd": float(np.concatenate([d_pt, d_tp]).mean()),
        "nsd": float((np.count_nonzero(d_pt <= tolerance) + np.count_nonzero(d_tp <= tolerance))
                     / (d_pt.size + d_tp.size)),
    }


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None,
                 tolerance: float = 1.0, empty: str = "skip", surface: bool = True
                 ) -> list[dict[str, float]]:
    """All metrics of one case, one dict per class; ``pred``/``truth`` are ``[z, k, h, w]`` (class axis 1)."""
    p = np.asarray(pred)
    t = np.asarray(truth)
    if p.shape != t.shape:
        raise MedsegError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    axes = tuple(i for i in range(p.ndim) if i != 1)
    tp, fp, fn = counts(p, t, axes=axes)
    ov = overlap_from_counts(tp, fp, fn, empty)
    rows = []
    for k in range(p.shape[1]):
        row = {"truth_voxels": int(tp[k] + fn[k]), "pred_voxels": int(tp[k] + fp[k])}
        row.update({m: float(ov[m][k]) for m in OVERLAP_METRICS})
        if surface:
            row.update(surface_metrics(p[:, k], t[:, k], spacing, tolerance, empty))
        rows.append(row)
    return rows


def slice_overlap(pred: np.ndarray, truth: np.ndarray, empty: str = "skip") -> dict[str, np.ndarray]:
    """Per-slice, per-class Dice/IoU/precision/recall of ``[z, k, h, w]`` masks: arrays ``[z, k]``,
    plus the ``truth_pixels``/``pred_pixels`` counts."""
    tp, fp, fn = counts(pred, truth, axes=(2, 3))
    out = overlap_from_counts(tp, fp, fn, empty)
    out["truth_pixels"] = tp + fn
    out["pred_pixels"] = tp + fp
    return out


def summarize(values: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """mean, median, std (population), min, max and n over the finite values; NaN never leaks in."""
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"mean": None, "median": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std()),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}
