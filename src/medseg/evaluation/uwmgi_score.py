"""The UW-Madison GI Tract Image Segmentation (Kaggle 2022) score, exactly as the competition graded it.

    score = 0.4 * mean_dice + 0.6 * (1 - mean_hd)

- ``mean_dice``: 2D Dice per (slice, class) ``2|P∩T| / (|P|+|T|)``, averaged over every (slice, class)
  pair except those where prediction and truth are both empty (skipped).
- ``mean_hd``: per (case-day, class), the slices of the case-day are stacked in slice order into a
  volume ``[z, h, w]``; each foreground voxel's index is divided by the volume's shape along each axis;
  the symmetric Hausdorff distance between the two point sets (max of the two directed distances,
  as ``scipy.spatial.distance.directed_hausdorff``) is divided by √3 (so it lies in [0, 1]).
  Exactly one side empty: 1. Both empty: skipped. Averaged over the remaining (case-day, class) pairs.
- A term with nothing to average (everything empty on both sides) counts as perfect (Dice 1, HD 0).

``variant="mlebench"`` follows the public mle-bench grader instead (see ``mlebench_hd``); the two
differ by up to about 0.1 on one submission, so say which one a number is.

Speed: a directed Hausdorff distance from A to B is the maximum over the points of A minus B of their
distance to B, on the bounding box of ``A ∪ B`` only (every point of B is inside it, so the values are
exact): a KD-tree over B's surface voxels when A minus B is a thin shell (a good prediction), else a
Euclidean distance transform of ``not B`` (sampling 1/shape). Masks are decoded one case-day at a time,
never the whole submission. ``tests/test_uwmgi_score.py`` checks both paths against directed_hausdorff.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from medseg.data.rle import decode
from medseg.errors import MedsegError
from medseg.scores import SCORES, TaskScore

CLASSES = ("large_bowel", "small_bowel", "stomach")
_ID = re.compile(r"^(?P<day>case\d+_day\d+)_slice_(?P<n>\d+)$")

MaskLike = Union[np.ndarray, str, None]  # a 2D mask, an RLE string ("" / None / NaN = empty)


@dataclass
class UWMGIResult:
    score: float
    dice: float  # mean 2D Dice over scored (slice, class) pairs
    hd: float  # mean normalised 3D Hausdorff over scored (case-day, class) pairs
    n_dice: int  # scored (slice, class) pairs
    n_hd: int  # scored (case-day, class) pairs
    per_case_day: list[dict[str, Any]] = field(default_factory=list)  # case_day, class, dice, hd, slices

    def as_dict(self) -> dict[str, Any]:
        return {"score": self.score, "dice": self.dice, "hd": self.hd, "n_dice": self.n_dice, "n_hd": self.n_hd}


def split_id(slice_id: str, where: str | Path | None = None) -> tuple[str, int]:
    """``caseN_dayM_slice_XXXX`` -> (``caseN_dayM``, XXXX)."""
    m = _ID.match(slice_id)
    if not m:
        raise MedsegError(f"id {slice_id!r} is not of the form caseN_dayM_slice_XXXX", where)
    return m["day"], int(m["n"])


def _directed(a: np.ndarray, b: np.ndarray, sampling: np.ndarray) -> float:
    """max over the points of ``a`` of the distance to the nearest point of ``b`` (both non-empty,
    already cropped to a box holding all of ``b``)."""
    from scipy.ndimage import binary_erosion, distance_transform_edt
    from scipy.spatial import cKDTree

    outside = a & ~b  # points of a inside b are at distance 0
    n = int(np.count_nonzero(outside))
    if n == 0:
        return 0.0
    if n * 16 < a.size:
        # few points to place (a good prediction): a KD-tree over b's surface (the nearest point of b
        # to a point outside b is always a surface voxel) beats a distance transform of the whole box
        surface = b & ~binary_erosion(b)
        tree = cKDTree(np.argwhere(surface) * sampling)
        return float(tree.query(np.argwhere(outside) * sampling, k=1)[0].max())
    return float(distance_transform_edt(~b, sampling=sampling)[outside].max())


def hausdorff_normalized(pred: np.ndarray, truth: np.ndarray) -> float:
    """Symmetric Hausdorff distance between the foreground voxels of two non-empty ``[z, h, w]``
    volumes, on coordinates divided by the shape, divided by √3."""
    union = pred | truth
    box = []
    for ax in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != ax)
        nz = np.flatnonzero(union.any(axis=other))
        box.append(slice(int(nz[0]), int(nz[-1]) + 1))
    p, t = pred[tuple(box)], truth[tuple(box)]
    sampling = 1.0 / np.asarray(pred.shape, dtype=np.float64)
    return max(_directed(p, t, sampling), _directed(t, p, sampling)) / math.sqrt(3.0)


def volume_terms(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, float | None]:
    """One (case-day, class): the 2D Dice of every scored slice (both-empty slices left out) and the
    normalised 3D Hausdorff distance (None when both volumes are empty, 1 when exactly one is)."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    inter = np.count_nonzero(p & t, axis=(1, 2))
    total = np.count_nonzero(p, axis=(1, 2)) + np.count_nonzero(t, axis=(1, 2))
    scored = total > 0
    dice = 2.0 * inter[scored] / total[scored]
    pa, ta = bool(p.any()), bool(t.any())
    hd = None if not (pa or ta) else 1.0 if pa != ta else hausdorff_normalized(p, t)
    return dice, hd


# --- the mle-bench grader's variant ------------------------------------------------------------------
# The public mle-bench grader of this competition computes the Hausdorff term differently from the
# competition's written definition: the three classes are merged (OR) per slice into one volume per
# case-day; RLE strings are decoded in column-major pixel order (truth and prediction alike, so the Dice
# term is unchanged but the volume is scrambled); a prediction with more than 10x the truth's voxels
# scores distance 1. ``variant="mlebench"`` reproduces it so that its medal thresholds can be used.
VARIANTS = ("competition", "mlebench")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise MedsegError(f"--uw-score must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return variant


def mlebench_view(mask: np.ndarray) -> np.ndarray:
    """A ``[..., h, w]`` mask as the mle-bench grader sees it: its row-major RLE decoded column-major."""
    h, w = mask.shape[-2:]
    flat = np.asarray(mask).reshape(*mask.shape[:-2], h * w)
    return np.swapaxes(flat.reshape(*mask.shape[:-2], w, h), -1, -2)


def mlebench_hd(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """The grader's distance for one case-day: ``pred``/``truth`` ``[z, k, h, w]`` in medseg's orientation
    (classes merged here); None when both are empty (skipped, as the grader's NaN)."""
    p = mlebench_view(np.asarray(pred, bool).any(axis=1))
    t = mlebench_view(np.asarray(truth, bool).any(axis=1))
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    if n_p == 0 and n_t == 0:
        return None
    if np.array_equal(p, t):
        return 0.0
    if n_p == 0 or n_t == 0 or n_p > 10 * n_t:
        return 1.0
    return hausdorff_normalized(np.ascontiguousarray(p), np.ascontiguousarray(t))


@SCORES.register("uwmgi")
class UWMGIScore(TaskScore):
    """The competition score as a data-set score: training picks checkpoints by it, tune optimises it."""

    name = "uwmgi"
    label = "UW-Madison score"
    variants = VARIANTS

    @classmethod
    def applies(cls, fmt: str | None, classes: list[str]) -> bool:
        # read by the uwmgi reader, or another layout holding exactly its three organs (the derived sample)
        return fmt == "uwmgi" or sorted(classes) == sorted(CLASSES)

    def class_terms(self, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
        dice, hd = volume_terms(pred, truth)
        return np.array([float(dice.sum()), dice.size, 0.0 if hd is None else hd, 0 if hd is None else 1], float)

    def case_terms(self, pred: np.ndarray, truth: np.ndarray, variant: str = "competition") -> np.ndarray:
        return self.case_and_class_terms(pred, truth, variant)[0]

    def case_and_class_terms(self, pred: np.ndarray, truth: np.ndarray,
                             variant: str = "competition") -> tuple[np.ndarray, list[np.ndarray]]:
        """(the case's ``[4]`` sums, each class's): one pass for the score and its per-class report."""
        per = [self.class_terms(pred[:, k], truth[:, k]) for k in range(pred.shape[1])]
        total = sum(per, np.zeros(4))
        if check_variant(variant) == "mlebench":  # one merged distance per case-day instead of one per class
            hd = mlebench_hd(pred, truth)
            total[2:] = (0.0, 0) if hd is None else (hd, 1)
        return total, per

    def definition(self, variant: str = "competition") -> str:
        if check_variant(variant) == "competition":
            return "the competition's written definition (Hausdorff per case-day and class)"
        return ("the public mle-bench grader's (classes merged per case-day, column-major RLE order, "
                "prediction > 10x truth -> distance 1)")

    def value(self, total: np.ndarray) -> np.ndarray:
        total = np.asarray(total, np.float64)
        d, nd, h, nh = (total[..., i] for i in range(4))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_dice = np.where(nd > 0, d / np.maximum(nd, 1), 1.0)
            mean_hd = np.where(nh > 0, h / np.maximum(nh, 1), 0.0)
        return 0.4 * mean_dice + 0.6 * (1.0 - mean_hd)


def _as_mask(value: MaskLike, shape: tuple[int, int], where: str | Path | None, row: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if value.shape != tuple(shape):
            raise MedsegError(f"{row}: mask shape {value.shape} differs from the slice shape {tuple(shape)}", where)
        return value != 0

    return decode(value, shape, order="C", where=where, row=row).astype(bool)


def uwmgi_score(
    pred: Mapping[tuple[str, str], MaskLike],
    truth: Mapping[tuple[str, str], MaskLike],
    shapes: Mapping[str, tuple[int, int]],
    *,
    pred_path: str | Path | None = None,
    truth_path: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    variant: str = "competition",
) -> UWMGIResult:
    """Score ``pred`` against ``truth``; both map ``(slice id, class)`` to a mask or an RLE string.

    ``shapes`` maps each slice id to its (height, width). Every (id, class) of ``truth`` needs a
    prediction, and a prediction for an (id, class) absent from ``truth`` is an error too.
    """
    missing = [k for k in truth if k not in pred]
    if missing:
        i, c = missing[0]
        raise MedsegError(
            f"{len(missing)} (id, class) pairs of the ground truth have no prediction, e.g. id {i}, class {c}",
            pred_path,
        )
    extra = [k for k in pred if k not in truth]
    if extra:
        i, c = extra[0]
        raise MedsegError(
            f"{len(extra)} predicted (id, class) pairs are not in the ground truth, e.g. id {i}, class {c}",
            pred_path,
        )
    days: dict[str, list[tuple[int, str]]] = defaultdict(list)
    classes_of: dict[str, set[str]] = defaultdict(set)
    for slice_id, cls in truth:
        day, n = split_id(slice_id, truth_path)
        classes_of[day].add(cls)
    for slice_id in {k[0] for k in truth}:
        day, n = split_id(slice_id, truth_path)
        if slice_id not in shapes:
            raise MedsegError(f"no image size known for id {slice_id}", truth_path)
        days[day].append((n, slice_id))

    check_variant(variant)
    scorer = UWMGIScore()
    total = np.zeros(4)
    rows: list[dict[str, Any]] = []
    for d_i, day in enumerate(sorted(days)):
        ids = [s for _, s in sorted(days[day])]
        shape = tuple(int(v) for v in shapes[ids[0]])
        for s in ids:
            if tuple(int(v) for v in shapes[s]) != shape:
                raise MedsegError(f"{day}: slice {s} is {tuple(shapes[s])}, the case-day's first slice {shape}",
                                  truth_path)
        classes = sorted(classes_of[day])
        vol_p = np.zeros((len(ids), len(classes), *shape), dtype=bool)
        vol_t = np.zeros_like(vol_p)
        for k, cls in enumerate(classes):
            for z, s in enumerate(ids):
                if (s, cls) in truth:
                    row = f"id {s}, class {cls}"
                    vol_t[z, k] = _as_mask(truth[(s, cls)], shape, truth_path, row)
                    vol_p[z, k] = _as_mask(pred[(s, cls)], shape, pred_path, row)
        day_total, per = scorer.case_and_class_terms(vol_p, vol_t, variant)
        total += day_total
        for cls, (d, nd, h, nh) in zip(classes, per):
            rows.append({"case_day": day, "class": cls, "slices": len(ids), "scored_slices": int(nd),
                         "dice": d / nd if nd else None, "hd": h if nh and variant == "competition" else None})
        if variant == "mlebench":
            rows.append({"case_day": day, "class": "all (merged)", "slices": len(ids),
                         "hd": float(day_total[2]) if day_total[3] else None})
        if progress:
            progress(d_i + 1, len(days))
    r = scorer.result(total)
    return UWMGIResult(score=r["score"], dice=r["dice"], hd=r["hd"], n_dice=r["n_dice"], n_hd=r["n_hd"],
                       per_case_day=rows)
