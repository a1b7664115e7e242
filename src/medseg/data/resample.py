"""Volumes to a target voxel spacing and back: done once in ``prepare`` for training (a 3D case costs more
to resample than to read, and every epoch would repeat it) and per case in ``predict``, whose
probabilities go back to each input's own grid before thresholds and post-processing.

    target = target_spacing(spacings, shapes)          # the rule below, (z, y, x) in mm
    small = resample(image, shape_for(image.shape, spacing, target))

Images and probabilities are interpolated linearly; masks per class channel, kept where the
interpolated value is at least 0.5 (so exclusive labels stay exclusive).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.machine import check_memory

ANISOTROPY = 3.0  # a coarse axis this many times the finest: resampling it to the median smears it
TOLERANCE = 0.02  # relative spacing difference below which a case is used as it is


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> list[float]:
    """The median spacing per axis; when one axis is at least ``ANISOTROPY`` times coarser than the finest
    and holds under a third of the voxels of the others (few thick slices), its 10th percentile instead,
    so that few cases lose slices (nnU-Net's rule). ``spacings`` and ``shapes``: [cases, 3] (z, y, x)."""
    sp = np.asarray(spacings, float)
    sh = np.asarray(shapes, float)
    target = np.median(sp, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    median_shape = np.median(sh, axis=0)
    if (target[coarse] >= ANISOTROPY * target[others].min()
            and median_shape[coarse] * ANISOTROPY < median_shape[others].min()):
        target[coarse] = max(float(np.percentile(sp[:, coarse], 10)), float(target[others].max()))
    return [float(v) for v in target]


def needs_resampling(spacing: Sequence[float], target: Sequence[float] | None) -> bool:
    if target is None:
        return False
    return any(abs(float(s) - float(t)) > TOLERANCE * float(t) for s, t in zip(spacing, target))


def shape_for(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    """The (z, y, x) grid covering the same extent at ``target`` spacing; ``shape`` is [z, c, h, w]."""
    zyx = (shape[0], shape[2], shape[3])
    return tuple(max(1, int(round(n * float(s) / float(t)))) for n, s, t in zip(zyx, spacing, target))


def resample(arr: np.ndarray, size: Sequence[int], mask: bool = False, where: str | None = None) -> np.ndarray:
    """``arr`` [z, c, h, w] on the grid ``size`` (z, y, x): linear for images and probabilities (integer
    images rounded back to their dtype), per channel >= 0.5 for ``mask``. One channel at a time in
    float32, so a large CT volume needs one channel's copy, not the whole case's."""
    import torch
    from torch.nn import functional as F

    size = tuple(int(v) for v in size)
    if tuple(arr.shape[0:1] + arr.shape[2:]) == size:
        return arr
    out_dtype = np.uint8 if mask else arr.dtype
    voxels = float(np.prod(size))
    check_memory(voxels * (arr.shape[1] * np.dtype(out_dtype).itemsize + 8) + arr[:, 0].size * 4.0,
                 f"resampling a {'x'.join(map(str, arr.shape[0:1] + arr.shape[2:]))} volume to "
                 f"{'x'.join(map(str, size))} voxels", where)
    out = np.empty((size[0], arr.shape[1], size[1], size[2]), out_dtype)
    for c in range(arr.shape[1]):
        x = torch.from_numpy(np.ascontiguousarray(arr[:, c], dtype=np.float32))[None, None]
        y = F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
        if mask:
            out[:, c] = y >= 0.5
        elif np.issubdtype(out_dtype, np.integer):
            info = np.iinfo(out_dtype)
            out[:, c] = np.clip(np.rint(y), info.min, info.max)
        else:
            out[:, c] = y
    return out


__all__ = ["needs_resampling", "resample", "shape_for", "target_spacing"]
