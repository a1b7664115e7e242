"""Post-processing of predicted masks: presence threshold, small-component removal, largest component.

Connectivity follows the data: for 2D datasets (``spatial_dims == 2``: LGG, image folders, UW-Madison
slices) every rule works per slice, because slices are independent images; for 3D volumes (NIfTI,
DICOM) the rules work on the whole volume with 3D face connectivity (6-neighbourhood), so a structure
that continues across slices counts once. 2D components use 4-connectivity (``scipy.ndimage.label``'s
default structure). ``components: volume`` makes ``min_size`` and ``largest_cc`` of a 2D model work on
the stack of a case's slices in 3D: when the slices are a volume (LGG), a tumour is one object across
slices, and a false positive on a few slices is a small object of its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.errors import MedsegError

DEFAULTS: dict[str, Any] = {"thresholds": None, "presence": None, "min_size": 0, "largest_cc": False, "components": None}
COMPONENTS = ("slice", "volume")


def _per_class(value: Any, k: int, default: float) -> list[float]:
    """A per-class list from a scalar, a list or None."""
    if value is None:
        return [default] * k
    if isinstance(value, (int, float)):
        return [float(value)] * k
    vals = [default if v is None else float(v) for v in value]
    if len(vals) != k:
        raise ValueError(f"expected {k} per-class values, got {len(vals)}")
    return vals


def remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Zero the connected components of a binary 2D or 3D ``mask`` with fewer than ``min_size`` pixels."""
    from scipy import ndimage

    if min_size <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels].astype(mask.dtype)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest connected component of a binary 2D or 3D ``mask`` (ties: the first label)."""
    from scipy import ndimage

    if not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return (labels == int(np.argmax(sizes))).astype(mask.dtype)


def postprocess(
    mask: np.ndarray,
    slice_max: np.ndarray | None,
    cfg: dict[str, Any],
    spatial_dims: int = 2,
) -> np.ndarray:
    """Apply the rules of ``cfg`` in place to ``mask[z, k, h, w]`` (uint8 0/1) and return it.

    ``slice_max[z, k]`` is each class's maximum probability per slice; with ``presence[j]`` set, class j
    is zeroed where that maximum (per slice in 2D, over the volume in 3D) is below the threshold.
    Order: presence, then ``min_size``, then ``largest_cc``; components per slice or over the volume as
    ``cfg["components"]`` says (default: per slice in 2D, over the volume in 3D).
    """
    k = mask.shape[1]
    presence = cfg.get("presence")
    min_size = int(cfg.get("min_size") or 0)
    largest = bool(cfg.get("largest_cc"))
    if presence is not None and slice_max is not None:
        pres = _per_class(presence, k, 0.0)
        for j in range(k):
            if spatial_dims == 3:
                if slice_max[:, j].max(initial=0.0) < pres[j]:
                    mask[:, j] = 0
            else:
                mask[slice_max[:, j] < pres[j], j] = 0
    if min_size <= 1 and not largest:
        return mask
    volume = cfg.get("components") == "volume" if cfg.get("components") else spatial_dims == 3
    for j in range(k):
        if volume:
            m = mask[:, j]
            if min_size > 1:
                m = remove_small(m, min_size)
            if largest:
                m = largest_component(m)
            mask[:, j] = m
        else:
            for z in range(mask.shape[0]):
                m = mask[z, j]
                if not m.any():
                    continue
                if min_size > 1:
                    m = remove_small(m, min_size)
                if largest:
                    m = largest_component(m)
                mask[z, j] = m
    return mask


def decide(prob: np.ndarray, class_kind: str, cfg: dict[str, Any], spatial_dims: int = 2) -> np.ndarray:
    """``mask[z, k, h, w]`` from probabilities as prediction decides it: argmax (or a tuned threshold for
    one class) over a softmax that includes its background, per-class thresholds for sigmoids; then the
    post-processing rules of ``cfg``."""
    z, out, h, w = prob.shape
    k = out - 1 if class_kind == "multiclass" else out
    mask = np.zeros((z, k, h, w), np.uint8)
    slice_max = np.zeros((z, k), np.float32)
    decide_slices(prob, np.arange(z), thresholds_for(cfg, k), class_kind, mask, None, slice_max)
    return postprocess(mask, slice_max, cfg, spatial_dims)


def merge_config(base: dict[str, Any] | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The bundle's post-processing with CLI/API overrides (``None`` values do not override)."""
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (base or {}).items()})
    out.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return out


def check_config(cfg: dict[str, Any], classes: Sequence[str], where: Any = None) -> None:
    """Per-class ``thresholds``/``presence`` lists must have one value per class, and ``components`` be
    known (MedsegError otherwise)."""

    if cfg.get("components") not in (None, *COMPONENTS):
        raise MedsegError(f"components must be one of {', '.join(COMPONENTS)}, got {cfg.get('components')!r}", where)
    for key in ("thresholds", "presence"):
        v = cfg.get(key)
        if isinstance(v, (list, tuple)) and len(v) != len(classes):
            raise MedsegError(f"{len(v)} {key} values for {len(classes)} classes ({', '.join(classes)}): "
                              "give one number for every class, or one per class", where)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if x is not None:  # None: no rule for that class
                check_probability(x, key, where)
    m = cfg.get("min_size")
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
        raise MedsegError(f"min_size must be a whole number of pixels >= 0, got {m!r}", where)


def check_probability(x: Any, what: str, where: Any = None) -> float:
    """A probability or threshold: a number in [0, 1] (1.5, NaN or -0.1 would empty or fill every mask)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise MedsegError(f"{what} must be a number in [0, 1], got {x!r}", where) from None
    if not 0.0 <= v <= 1.0:  # also NaN
        raise MedsegError(f"{what} must be in [0, 1], got {x!r}", where)
    return v


def thresholds_for(cfg: dict[str, Any], k: int) -> list[float]:
    """Multilabel decision thresholds per class (default 0.5)."""
    return _per_class(cfg.get("thresholds"), k, 0.5)


def decide_slices(p: np.ndarray, idx: np.ndarray, thr: list[float], class_kind: str, mask: np.ndarray,
                  prob: np.ndarray | None, slice_max: np.ndarray) -> None:
    """Fill masks, probabilities and per-slice class maxima of slices ``idx`` from probabilities ``p``
    (``[b, out, h, w]``; multiclass ``out`` has the background first)."""
    k = mask.shape[1]
    if class_kind == "multiclass" and k == 1:
        # one class against background: p1 > 0.5 is the argmax, and a tuned threshold moves it
        mask[idx, 0] = p[:, 1] > thr[0]
        pc = p[:, 1:]
    elif class_kind == "multiclass":
        am = p.argmax(axis=1)
        for j in range(k):
            mask[idx, j] = am == j + 1
        pc = p[:, 1:]
    else:
        for j in range(k):
            mask[idx, j] = p[:, j] > thr[j]
        pc = p
    slice_max[idx] = pc.reshape(pc.shape[0], k, -1).max(axis=2)
    if prob is not None:
        prob[idx] = pc


__all__: Sequence[str] = ["decide", "decide_slices", "postprocess", "remove_small", "largest_component",
                          "merge_config", "thresholds_for", "check_config"]
