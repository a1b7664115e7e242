"""Colour-coded masks: a palette of class colours (``stomach=255,0,0;large_bowel=0,255,0``) and the mapping
of a mask's pixels to labels, tolerant of the blended edges that resizing leaves and strict about colours
that belong to no class."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import MedsegError, warn

BACKGROUND = (0, 0, 0)
# A blurred or resized colour mask blends neighbouring colours: a pixel is accepted when it lies within this
# distance (0..255 units) of a blend of the palette colours (background included).
PALETTE_TOLERANCE = 40.0
# Off-palette pixels beyond this fraction of the image are a label the palette does not declare (an
# error); fewer are the artefacts of resizing and re-encoding (mapped to the nearest colour, warned).
OFF_PALETTE_FRACTION = 0.0025


def parse_palette(text: str) -> list[tuple[str, tuple[int, int, int]]]:
    """``"stomach=255,0,0;large_bowel=0,255,0"`` -> ``[("stomach", (255, 0, 0)), ...]``."""
    out: list[tuple[str, tuple[int, int, int]]] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, eq, rgb = part.partition("=")
        vals = rgb.split(",")
        if not eq or not name.strip() or len(vals) != 3 or not all(v.strip().isdigit() for v in vals):
            raise MedsegError(f"bad palette entry {part!r}: expected name=R,G,B (e.g. stomach=255,0,0)")
        colour = tuple(int(v) for v in vals)
        if max(colour) > 255:
            raise MedsegError(f"bad palette entry {part!r}: colour values must be 0..255")
        if colour == BACKGROUND:
            raise MedsegError(f"bad palette entry {part!r}: (0,0,0) is the background")
        if any(n == name.strip() for n, _ in out) or any(c == colour for _, c in out):
            raise MedsegError(f"bad palette entry {part!r}: name or colour used twice")
        out.append((name.strip(), colour))  # type: ignore[arg-type]
    if not out:
        raise MedsegError("empty palette: expected name=R,G,B;name=R,G,B")
    return out


# A blurred or resized colour mask blends neighbouring colours: a pixel is accepted when it lies within this
# distance (0..255 units) of a blend of the palette colours (background included).
PALETTE_TOLERANCE = 40.0
# Off-palette pixels beyond this fraction of the image are a label the palette does not declare (an
# error); fewer are the artefacts of resizing and re-encoding (mapped to the nearest colour, warned).
OFF_PALETTE_FRACTION = 0.0025


def map_palette(rgb: np.ndarray, colours: list[tuple[int, int, int]], where: str | Path | None = None) -> np.ndarray:
    """Label map (0 background, j+1 for ``colours[j]``) of an ``[h, w, 3]`` image by nearest colour.

    Colours that are no blend of palette colours (``PALETTE_TOLERANCE``) are an error naming ``where`` when
    they cover more than ``OFF_PALETTE_FRACTION`` of the image (an undeclared label: mapping it to the
    nearest colour would merge or drop it), else a warning."""
    ref = np.array([BACKGROUND, *colours], np.int32)  # [n, 3]
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise MedsegError(f"a colour mask must be [h, w, 3], got shape {rgb.shape}", where)
    px = rgb[..., :3].reshape(-1, 3).astype(np.int64)
    if rgb.dtype != np.uint8:  # 16-bit colour masks: compare in 8-bit units
        px = px >> 8
    # few distinct colours per mask: map each distinct colour once instead of every pixel
    uniq, inverse = np.unique((px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2], return_inverse=True)
    u = np.stack([uniq >> 16, (uniq >> 8) & 255, uniq & 255], axis=1)
    d = ((u[:, None, :] - ref[None]) ** 2).sum(-1)
    far = _off_palette(u.astype(np.float64), ref.astype(np.float64))
    if far.any():
        inverse = inverse.ravel()
        n_far = int(np.bincount(inverse, minlength=len(u))[far].sum())
        bad = [tuple(int(v) for v in c) for c in u[far][:3]]
        what = (f"{n_far} pixels ({100 * n_far / inverse.size:.2g}%) have colours such as {bad} that are neither "
                f"background nor a palette colour {[tuple(c) for c in colours]} nor a blend of them")
        if n_far > OFF_PALETTE_FRACTION * inverse.size:
            raise MedsegError(f"{what}: a label the palette does not declare", where)
        warn(f"{what}: scattered edge pixels, each mapped to its nearest palette colour", where)
    return d.argmin(1).astype(np.uint8)[inverse.ravel()].reshape(rgb.shape[:2])


def _off_palette(u: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Which colours ``u[m, 3]`` lie farther than the tolerance from every blend (convex combination) of
    the ``ref`` colours: resizing blends two or three neighbouring labels, never adds a new hue."""
    from scipy.optimize import nnls

    w = 1e3  # weight of the "weights sum to 1" row
    a = np.vstack([ref.T, np.full((1, len(ref)), w)])
    far = np.zeros(len(u), bool)
    for i, c in enumerate(u):
        far[i] = nnls(a, np.append(c, w))[1] > PALETTE_TOLERANCE
    return far
