"""Synthetic and converted datasets in the exact UW-Madison GI tract competition layout (for tests,
demos and fixtures)::

    OUT/train.csv                                                  id,class,segmentation
    OUT/train/caseN/caseN_dayM/scans/slice_XXXX_W_H_PW_PH.png      16-bit grayscale

    from medseg.data.formats.uwmgi_synthetic import write_uwmgi_synthetic
    root = write_uwmgi_synthetic("/tmp/uwmgi")      # then: medseg prepare uwmgi /tmp/uwmgi out/
"""
from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.data.formats.folder import read_image
from medseg.data.formats.palette import map_palette
from medseg.data.formats.uwmgi import CLASSES
from medseg.data.rle import encode
from medseg.errors import MedsegError

# (width, height, pixel spacing mm) of the competition's scans; 360 wide x 310 high is the one
# non-square size (file name slice_XXXX_360_310_1.50_1.50.png, array shape (310, 360))
SIZES = [(266, 266, 1.50), (234, 234, 1.50), (276, 276, 1.63), (360, 310, 1.50)]
DERIVED_PALETTE = {"stomach": (255, 0, 0), "large_bowel": (0, 255, 0), "small_bowel": (255, 255, 0)}


def slice_filename(n: int, w: int, h: int, pw: float, ph: float) -> str:
    return f"slice_{n:04d}_{w}_{h}_{pw:.2f}_{ph:.2f}.png"


def _save_png16(path: Path, a: np.ndarray, level: int = 1) -> None:
    from PIL import Image

    assert a.dtype == np.uint16
    Image.fromarray(a).save(path, compress_level=level)  # level 1: fast; 9: smallest (fixtures)


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (d < 0), 0 outside, a smooth ramp of width ``edge`` between: tissue, not a cut-out."""
    return np.clip(0.5 - d / edge, 0.0, 1.0)


def _profile(t: float, lo: float, hi: float) -> float:
    """Organ size along z: 0 outside [lo, hi], growing to 1 in the middle (a rounded organ)."""
    if not lo < t < hi:
        return 0.0
    u = (t - lo) / (hi - lo) * 2 - 1
    return float(np.sqrt(1 - u * u))


def _case_day_slices(rng: np.random.Generator, w: int, h: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``image[z, h, w]`` uint16 and ``mask[z, 3, h, w]`` (competition class order) of one case-day."""
    ys = np.linspace(-1, 1, h, dtype=np.float32)[:, None] * (h / max(h, w))
    xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :] * (w / max(h, w))
    body = _soft(np.sqrt((ys / 0.82) ** 2 + (xs / 0.9) ** 2) - 1, 0.04)
    # smooth coil-like bias field and fat/muscle texture: a few random low-frequency waves
    field = np.zeros((h, w), np.float32)
    for _ in range(4):
        fy, fx, ph = rng.uniform(1, 4, 3).tolist()
        field += np.cos(fy * np.pi * ys + fx * np.pi * xs + ph)
    st_c = (np.array([-0.3, 0.28]) + rng.normal(0, 0.04, 2)).tolist()  # stomach: upper, image right
    lb_R = float(rng.uniform(0.5, 0.6))  # large bowel: a frame around the abdomen
    sb_c = rng.normal(0, 0.05, (5, 2)) + np.array([0.15, -0.05])  # small bowel loops, central
    sb_c[:, 0] += np.linspace(-0.2, 0.25, 5)
    sb_c[:, 1] += np.linspace(-0.25, 0.2, 5)[::-1]
    sb_c = sb_c.tolist()  # python floats keep the float32 grids float32
    images = np.empty((n, h, w), np.uint16)
    masks = np.zeros((n, 3, h, w), np.uint8)
    for z in range(n):
        t = z / max(n - 1, 1)
        st_s = _profile(t, 0.05, 0.6)
        lb_s = _profile(t, 0.15, 0.95)
        sb_s = _profile(t, 0.4, 1.01)
        d_st = np.sqrt(((ys - st_c[0]) / (0.24 * st_s + 1e-6)) ** 2 + ((xs - st_c[1]) / (0.2 * st_s + 1e-6)) ** 2) - 1
        r = np.sqrt((ys / 0.95) ** 2 + (xs / 1.05) ** 2)
        d_lb = np.abs(r - lb_R) / (0.07 * lb_s + 1e-6) - 1
        d_lb = np.where(ys > 0.45, np.float32(1), d_lb)  # the frame is open at the bottom (pelvis)
        d_sb = np.full((h, w), 1.0, np.float32)
        for cy, cx in sb_c:
            d_sb = np.minimum(d_sb, np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2) / (0.1 * sb_s + 1e-6) - 1)
        organs = {"large_bowel": d_lb, "small_bowel": d_sb, "stomach": d_st}
        for cls, size in (("large_bowel", lb_s), ("small_bowel", sb_s), ("stomach", st_s)):
            if size == 0:  # absent on this slice (the 1e-6 radius would still leave a pixel or two)
                organs[cls] = np.ones((h, w), np.float32)
        img = 2200 * body + 300 * field * body
        for k, cls in enumerate(CLASSES):
            d = organs[cls]
            masks[z, k] = (d < 0) & (body > 0.5)
            img += {"large_bowel": 1400, "small_bowel": 2600, "stomach": 3300}[cls] * _soft(d, 0.3) * body
        img += rng.standard_normal((h, w), dtype=np.float32) * (120 * (0.3 + body))
        images[z] = np.clip(img, 0, 65535).astype(np.uint16)
    return images, masks


def write_uwmgi_synthetic(
    out_dir: str | Path,
    n_cases: int = 3,
    days_per_case: int = 2,
    slices_per_day: int = 12,
    seed: int = 0,
    *,
    split: str = "train",
    with_csv: bool = True,
    sizes: Sequence[tuple[int, int, float]] | None = None,
) -> Path:
    """Write a small dataset in the exact competition layout and return ``out_dir``.

    Case-days cycle through the four competition sizes and both pixel spacings; organs are smooth
    blobs that appear and disappear along z (so some slices have empty organs) and the stomach and
    the large bowel overlap on some slices. ``train.csv`` rows come in a shuffled slice order, three
    rows per slice in competition class order, RLE by ``medseg.data.rle.encode``.
    ``split="test", with_csv=False`` writes the test layout (images only). ``sizes`` (width, height,
    pixel spacing) replaces the competition's four sizes (``SIZES``), cycled the same way.
    """
    sizes = list(sizes) if sizes is not None else SIZES
    if not sizes:
        raise MedsegError("sizes: give at least one (width, height, pixel spacing)")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, str]] = []
    k = 0
    for c in range(n_cases):
        case = f"case{c * 7 + 2}"  # non-consecutive numbers, like the competition's
        for d in range(days_per_case):
            w, h, sp = sizes[k % len(sizes)]
            k += 1
            day = f"{case}_day{d * 5 + (c % 3)}"
            scans = out / split / case / day / "scans"
            scans.mkdir(parents=True, exist_ok=True)
            images, masks = _case_day_slices(rng, w, h, slices_per_day)
            for z in range(slices_per_day):
                n = z + 1
                _save_png16(scans / slice_filename(n, w, h, sp, sp), images[z])
                sid = f"{day}_slice_{n:04d}"
                rows.extend((sid, cls, encode(masks[z, j])) for j, cls in enumerate(CLASSES))
    if with_csv:
        per_slice = [rows[i : i + 3] for i in range(0, len(rows), 3)]
        order = rng.permutation(len(per_slice))
        _write_csv(out / "train.csv", [r for i in order for r in per_slice[i]])
    return out


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "class", "segmentation"])
        w.writerows(rows)


_DERIVED_NAME = re.compile(r"^(?P<case>case\d+)_(?P<day>day\d+)_slice_(?P<n>\d+)$")


def write_uwmgi_from_derived(
    src: str | Path,
    dst: str | Path = "uwmgi",
    n_slices: int | None = 30,
    size: tuple[int, int, float] = (234, 234, 1.50),
) -> Path:
    """Convert the derived UW-Madison sample (512x512 RGB PNG + colour-coded masks: red stomach,
    green large bowel, yellow small bowel) to the competition layout under ``dst``.

    Images are resized to a competition size (bilinear) and stored as 16-bit grayscale; masks are
    mapped to the nearest palette colour at full size (the sample's edges are blurred) and resized
    with nearest neighbour. ``n_slices`` keeps the first n slices in natural name order (None: all
    36). The default, 30 slices of 9 patients at 234x234, stays under 1 MB as a test fixture
    (all 36 take about 1.2 MB).
    """
    from PIL import Image

    src, dst = Path(src), Path(dst)
    img_dir, mask_dir = src / "images", src / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise MedsegError("expected images/ and masks/ (the derived UW-Madison sample)", src)
    stems = sorted((p.stem for p in img_dir.glob("*.png")), key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])
    if n_slices is not None:
        stems = stems[:n_slices]
    if not stems:
        raise MedsegError("no images/*.png", src)
    w, h, sp = size
    colours = [DERIVED_PALETTE[c] for c in CLASSES]
    rows: list[tuple[str, str, str]] = []
    for stem in stems:
        m = _DERIVED_NAME.match(stem)
        if not m:
            raise MedsegError("file name is not caseN_dayM_slice_XXXX.png", img_dir / f"{stem}.png")
        mask_path = mask_dir / f"{stem}.png"
        if not mask_path.is_file():
            raise MedsegError("image without a mask", img_dir / f"{stem}.png")
        rgb = read_image(img_dir / f"{stem}.png")
        gray = rgb[..., 0] if rgb.ndim == 3 else rgb
        small = np.asarray(Image.fromarray(gray).resize((w, h), Image.BILINEAR), np.float32)
        img16 = np.round(small * 16).astype(np.uint16)  # 8-bit -> a 12-bit-like MRI range, still 16-bit PNG
        labels = map_palette(read_image(mask_path), colours)  # 0 background, k+1 = CLASSES[k]
        labels = np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))
        day = f"{m['case']}_{m['day']}"
        scans = dst / "train" / m["case"] / day / "scans"
        scans.mkdir(parents=True, exist_ok=True)
        _save_png16(scans / slice_filename(int(m["n"]), w, h, sp, sp), img16, level=9)
        rows.extend((stem, cls, encode(labels == k + 1)) for k, cls in enumerate(CLASSES))
    _write_csv(dst / "train.csv", rows)
    return dst
