"""Where the network looks: 3D slabs along z whose sliding windows equal a whole-volume pass, MONAI's
Gaussian-weighted sliding windows, and resizing to and from a training size. Pure arithmetic on arrays:
no model, no backend."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

# 3D inference streams slabs along z through sliding windows: a slab's float32 buffers (ours and
# MONAI's, see ``_ranges``) stay near SLAB_BYTES, so peak memory does not grow with the volume's depth
# beyond the uint8 masks (a 512 x 512 x 200 volume with one channel, three outputs and 32-slice windows
# runs in slabs of about 50 slices; see docs/inference.md for the measured peak).
SLAB_BYTES = 512 * 2**20
DECIDE_SLICES = 16  # slices decided at a time: argmax/reshape copies stay small


def z_slabs(depth: int, plane: int, roi_z: int, overlap: float, budget: int) -> list[tuple[int, int, int, int]]:
    """``(a, b, lo, hi)`` per slab: run sliding windows on slices ``[a, b)``, keep ``[lo, hi)``.

    ``budget`` is the number of voxels a slab may hold (``plane`` voxels per slice). The kept ranges tile
    ``[0, depth)``. Each slab starts on a multiple of MONAI's window step along z and reaches one window
    beyond its kept range on both sides, so every kept voxel is covered by exactly the windows (same
    positions, same Gaussian weights) of a whole-volume ``sliding_window_inference``: the result equals
    the whole-volume one while memory follows the slab, not the volume.
    """
    step = max(int(roi_z * (1 - overlap)), 1)  # MONAI's scan interval (_get_scan_interval)
    if depth <= roi_z or depth * plane <= budget:
        return [(0, depth, 0, depth)]
    # the kept core: what the budget leaves beside the two halos, but at least two windows deep so the
    # halos never cost more than the core (memory gives way to compute only that far)
    core = max(-(-2 * roi_z // step) * step, (budget // max(plane, 1) - 2 * roi_z) // step * step)
    if depth <= core + roi_z:
        return [(0, depth, 0, depth)]
    out = []
    lo = 0
    while lo < depth:
        hi = min(depth, lo + core)
        out.append((*slab_for(lo, hi, depth, roi_z, overlap), lo, hi))
        lo = hi
    return out


def slab_for(lo: int, hi: int, depth: int, roi_z: int, overlap: float) -> tuple[int, int]:
    """The slab ``[a, b)`` whose sliding windows cover slices ``[lo, hi)`` exactly as a whole-volume pass
    does: it starts on a multiple of MONAI's window step at least one window before ``lo`` and ends one
    window after ``hi`` (or at the volume's edges). Any ``[lo, hi)`` works, so an ensemble's members with
    other window sizes can follow one member's slabs."""
    step = max(int(roi_z * (1 - overlap)), 1)
    a = 0 if lo == 0 else max(0, (lo - roi_z + 1) // step * step)
    b = depth if hi == depth else min(depth, hi + roi_z)
    return a, b


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``x[b, c, h, w]`` (same as training's resize)."""
    import torch
    import torch.nn.functional as F

    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), size=size, mode="bilinear",
                      align_corners=False)
    return t.numpy()


def sliding_windows(x: np.ndarray, roi: list[int], probabilities: Callable[[np.ndarray], np.ndarray],
                    batch: int, overlap: float) -> np.ndarray:
    """MONAI's Gaussian-weighted sliding windows of ``roi`` over ``x[b, c, *spatial]`` (a numpy batch),
    each window's probabilities from ``probabilities`` (numpy in, numpy out)."""
    import torch
    from monai.inferers import sliding_window_inference

    def predictor(t):
        return torch.from_numpy(np.ascontiguousarray(probabilities(t.numpy())))

    with torch.inference_mode():
        p = sliding_window_inference(torch.from_numpy(np.ascontiguousarray(x)), roi, sw_batch_size=batch,
                                     predictor=predictor, overlap=overlap, mode="gaussian")
    return p.numpy()


def on_grid(chunks: Callable[[np.ndarray], Iterator[tuple[np.ndarray, np.ndarray]]], image: np.ndarray,
            spacing: Sequence[float] | None, target: Sequence[float] | None,
            where: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``chunks(image)`` on the grid a model was trained at: the volume resampled to ``target`` spacing,
    its probabilities resampled back to ``image``'s grid (the decision is made there)."""
    from medseg.data.resample import needs_resampling, resample, shape_for

    if spacing is None or not needs_resampling(spacing, target):
        yield from chunks(image)
        return
    size = shape_for(image.shape, spacing, target)
    p = None
    for idx, q in chunks(resample(image, size, where=where)):
        if p is None:
            p = np.empty((size[0], q.shape[1], size[1], size[2]), np.float32)
        p[idx] = q
    back = resample(p, (image.shape[0], image.shape[2], image.shape[3]))
    del p
    for s in range(0, image.shape[0], DECIDE_SLICES):
        e = min(image.shape[0], s + DECIDE_SLICES)
        yield np.arange(s, e), back[s:e]
