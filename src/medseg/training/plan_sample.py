"""What ``medseg plan`` measures on a sample of a prepared data set's masks and images.

    centres_of(ds)       # [classes, 2] mean foreground position (y, x), as fractions of the slice
    thickness_of(ds)     # [classes] median thickness in pixels of each class's foreground on a slice
"""
from __future__ import annotations

import numpy as np

from medseg.data.prepared import PreparedDataset


def _picks(ds: PreparedDataset, j: int, max_slices: int) -> list[tuple[int, int]]:
    """Up to ``max_slices`` (case, slice) pairs holding class ``j``, spread evenly over the cases."""
    picks = [(i, z) for i, c in enumerate(ds.cases) for z in (c.fg_slices[j] if c.fg_slices else [])]
    return picks[::max(1, len(picks) // max_slices)]


def centres_of(ds: PreparedDataset, max_slices: int = 400) -> np.ndarray:
    """[classes, 2] mean foreground position (y, x) as a fraction of the slice, over up to ``max_slices``
    foreground slices per class spread over the cases."""
    k = len(ds.classes)
    out = np.full((k, 2), np.nan)
    for j in range(k):
        ys, xs = [], []
        for i, z in _picks(ds, j, max_slices):
            m = np.asarray(ds.mask(i)[z, j])
            yy, xx = np.nonzero(m)
            if len(yy):
                ys.append(yy.mean() / max(1, m.shape[0] - 1))
                xs.append(xx.mean() / max(1, m.shape[1] - 1))
        if ys:
            out[j] = [np.mean(ys), np.mean(xs)]
    return out


def filled_channels(ds: PreparedDataset, max_cases: int = 200) -> tuple[int, int, int]:
    """(cases whose middle slice holds two identical channels, cases looked at, the channel most often in
    such a pair): a data set that fills a missing sequence with another, which the network should see."""
    c = len(ds.channels)
    if c < 2:
        return 0, 0, 0
    shared = np.zeros(c, int)
    n = seen = 0
    step = max(1, len(ds.cases) // max_cases)
    for i in range(0, len(ds.cases), step):
        seen += 1
        img = ds.image(i)
        sl = np.asarray(img[img.shape[0] // 2])
        pairs = [(a, b) for a in range(c) for b in range(a + 1, c)
                 if sl[a].std() > 0 and np.array_equal(sl[a], sl[b])]
        for a, b in pairs:
            shared[a] += 1
            shared[b] += 1
        n += bool(pairs)
    return n * step, seen * step, int(np.argmax(shared))


def thickness(mask: np.ndarray) -> float:
    """Thickness in pixels of the foreground of a 2D mask: twice its area over its boundary length. The
    boundary is counted in pixel edges between foreground and background (or the image's edge), which
    over-count a boundary of random direction by 4/pi (Crofton), so the edges are taken at pi/4. A ring or
    band ``t`` pixels wide gives about ``t``; a disc of diameter ``d`` about ``d / 2``, so only thin shapes
    (vessels, walls, rings) come out small."""
    m = np.pad(np.asarray(mask, bool), 1)
    area = int(m.sum())
    if not area:
        return float("nan")
    edges = int((m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum())
    return 2.0 * area / (edges * np.pi / 4)


def thickness_of(ds: PreparedDataset, max_slices: int = 200) -> np.ndarray:
    """[classes] the median over up to ``max_slices`` foreground slices of each class's ``thickness``
    (NaN for a class on no slice), in the prepared data's pixels."""
    out = np.full(len(ds.classes), np.nan)
    for j in range(len(ds.classes)):
        t = [thickness(np.asarray(ds.mask(i)[z, j])) for i, z in _picks(ds, j, max_slices)]
        t = [v for v in t if np.isfinite(v)]
        if t:
            out[j] = float(np.median(t))
    return out


__all__ = ["centres_of", "filled_channels", "thickness", "thickness_of"]
