"""The interactive view of an evaluation: one self-contained HTML file (no server, no network) to scroll
every slice of every case with truth and prediction overlays, and to jump to each error component.

    view = ViewWriter(classes, spatial_dims)
    view.add_case(case_id, patient, image, truth, pred, spacing, metrics)   # [z, c, h, w], [z, k, h, w] x2
    view.add_missing(case_id, "no prediction file")
    view.write("view.html", title)

Each case is stored as two mosaics of its slices (all slices tiled into one picture): the image as a
greyscale JPEG (one display channel, scaled by the case's 0.5-99.5 percentiles; window/level act on it
in the page), and the labels as a lossless PNG whose red byte holds the truth's classes as bits and
whose green byte the prediction's. The page decodes a case's two pictures once, when it is opened, and
draws any plane (axial; coronal and sagittal for volumes) from them with plain canvas. The error
components (a predicted island that touches no truth of its class: false positive; a true structure
that no prediction touches: false negative) are found here with 26-connected labelling in 3D.
"""
from __future__ import annotations

import base64
import io
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from medseg.atomic import atomic_write_text
from medseg.errors import MedsegError
from medseg.evaluation.metrics import case_metrics
from medseg.data.formats import guess_format
from medseg.evaluation.sources import NativeTruth, open_predictions, open_truth, run_predictions
from medseg.rundir import RunDir
from medseg.text import plural

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
JPEG_QUALITY = 85
# three channels in one colour JPEG at 55 with no chroma subsampling: on the 56 shared LGG patients 75 % of
# the bytes of one grey channel at 85 (104 % for the largest patient), each channel 3.2 levels of 255 off on
# average
JPEG_CHANNELS_QUALITY = 55
MAX_CLASSES = 8  # one bit per class in a byte


def mosaic(vol: np.ndarray) -> tuple[np.ndarray, int]:
    """[z, h, w] -> one [rows*h, cols*w] picture of the slices in row-major order, and ``cols``."""
    z, h, w = vol.shape
    cols = max(1, math.ceil(math.sqrt(z)))
    rows = math.ceil(z / cols)
    out = np.zeros((rows * h, cols * w), vol.dtype)
    for i in range(z):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = vol[i]
    return out, cols


def _channels_shown(n: int, display: int) -> list[int]:
    """The image channels the view stores (up to three, the display channel among them)."""
    shown = list(range(min(n, 3)))
    if display not in shown:
        shown[-1] = display
    return shown


def _mosaic_rgb(vol: np.ndarray) -> tuple[np.ndarray, int]:
    """[z, h, w, 3] -> ([rows*h, cols*w, 3], cols)."""
    parts = [mosaic(vol[..., k]) for k in range(vol.shape[-1])]
    return np.stack([p[0] for p in parts], -1), parts[0][1]


def display_channel(image: np.ndarray, truth: np.ndarray) -> int:
    """The channel where the truth's foreground stands out most from the rest (|mean in - mean out| / std);
    channel 0 when there is no foreground or one channel."""
    c = image.shape[1]
    fg = truth.any(axis=1)
    if c == 1 or not fg.any() or fg.all():
        return 0
    best, score = 0, -1.0
    for j in range(c):
        x = image[:, j].astype(np.float32)
        s = float(abs(x[fg].mean() - x[~fg].mean()) / (x.std() + 1e-6))
        if s > score:
            best, score = j, s
    return best


def to_bytes(vol: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A channel [z, h, w] scaled to 0-255 by its 0.5 and 99.5 percentiles, and those two values (the page
    maps a byte back to the image's own units for its readout)."""
    x = vol.astype(np.float32)
    lo, hi = np.percentile(x, [0.5, 99.5]) if x.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((x - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8), float(lo), float(hi)


def bits(mask: np.ndarray) -> np.ndarray:
    """[z, k, h, w] 0/1 -> [z, h, w] uint8 with bit j set where class j is."""
    out = np.zeros((mask.shape[0], *mask.shape[2:]), np.uint8)
    for j in range(min(mask.shape[1], MAX_CLASSES)):
        out |= (mask[:, j] > 0).astype(np.uint8) << j
    return out


def components(truth: np.ndarray, pred: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """False-positive islands (predicted components touching no truth of their class) and false-negative
    structures (true components no prediction touches), per class: kind, class, voxels, slice range and
    the slice with most of its voxels, and its centre (y, x) there."""
    from scipy import ndimage

    out = []
    struct = np.ones((3, 3, 3), bool)
    for j, cls in enumerate(classes):
        t, p = truth[:, j] > 0, pred[:, j] > 0
        for kind, a, other in (("FP", p, t), ("FN", t, p)):
            if not a.any():
                continue
            lab, n = ndimage.label(a, structure=struct)
            hit = np.unique(lab[other & (lab > 0)])
            sizes = np.bincount(lab.ravel(), minlength=n + 1)
            boxes = ndimage.find_objects(lab)
            for i in range(1, n + 1):
                if i in hit:
                    continue
                sl = boxes[i - 1]
                sub = lab[sl] == i
                per_z = sub.sum(axis=(1, 2))
                zc = int(np.argmax(per_z))
                yy, xx = np.nonzero(sub[zc])
                out.append({"kind": kind, "class": cls, "voxels": int(sizes[i]), "z0": int(sl[0].start),
                            "z1": int(sl[0].stop - 1), "z": int(sl[0].start + zc),
                            "y": int(sl[1].start + round(float(yy.mean()))), "x": int(sl[2].start + round(float(xx.mean())))})
    out.sort(key=lambda c: -c["voxels"])
    return out


def _data_uri(arr: np.ndarray, fmt: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg-rgb":  # three image channels, not colour: no chroma subsampling
        Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=JPEG_CHANNELS_QUALITY, subsampling=0)
        fmt = "jpeg"
    elif fmt == "jpeg":
        Image.fromarray(arr, "L").save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(arr, "RGB").save(buf, "PNG", optimize=True)
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ViewWriter:
    """Collects cases (encoded as they come, so only their pictures stay in memory) and writes the page."""

    def __init__(self, classes: list[str], spatial_dims: int, distance_unit: str = "mm"):
        self.classes = list(classes)[:MAX_CLASSES]
        self.spatial_dims = spatial_dims
        self.unit = distance_unit
        self.cases: list[dict[str, Any]] = []
        self.channel: int | None = None

    def add_case(self, case_id: str, patient: str, image: np.ndarray | None, truth: np.ndarray | None,
                 pred: np.ndarray, spacing: tuple[float, float, float] | None, metrics: dict[str, Any] | None = None,
                 note: str | None = None, affine: np.ndarray | None = None, slices: list[str] | None = None,
                 quality: dict[str, Any] | None = None) -> None:
        """``quality``: ``{structure: row}`` of ``predict --quality`` (the table shows the lowest predicted
        Dice and the review flag, riskiest first); ``affine``: (column, row, slice) index -> RAS mm, so planes are drawn in the radiological
        convention with orientation letters; ``slices``: a name per slice (file numbers) for the readout."""
        z, k, h, w = pred.shape
        t = truth if truth is not None else np.zeros_like(pred)
        lo, hi, raw, shown, ranges = 0.0, 255.0, None, [0], None
        if image is None or image.shape[0] != z or image.shape[2:] != (h, w):
            grey = np.zeros((z, h, w), np.uint8)
            note = note or ("no image" if image is None else f"image {tuple(image.shape)} does not fit the masks")
        else:
            if self.channel is None or self.channel >= image.shape[1]:
                self.channel = display_channel(image, t)
            ch = image[:, self.channel]
            shown = _channels_shown(image.shape[1], self.channel)
            if len(shown) > 1:  # every channel, three to a colour JPEG (4:4:4), in less than one grey JPEG at 85
                scaled = [to_bytes(image[:, j]) for j in shown]
                _, lo, hi = scaled[shown.index(self.channel)]
                grey = np.stack([s[0] for s in scaled] + [np.zeros_like(scaled[0][0])] * (3 - len(shown)), -1)
                ranges = [[round(s[1], 4), round(s[2], 4)] for s in scaled]
            else:
                grey, lo, hi = to_bytes(ch)
            if len(shown) == 1 and ch.dtype.kind in "iu" and ch.size and 255 < int(ch.max()) - int(ch.min()) < 65536:
                # integers wider than a byte (CT in HU, 12-bit MR): stored exactly, two bytes a voxel in a
                # lossless PNG, so window/level and the readout work in the image's own units
                raw = {"offset": int(ch.min()), "min": int(ch.min()), "max": int(ch.max())}
                grey = (ch.astype(np.int64) - raw["offset"]).astype(np.uint16)
        img, cols = mosaic(grey) if grey.ndim == 3 else _mosaic_rgb(grey)
        lab = np.stack([mosaic(bits(t))[0], mosaic(bits(pred))[0], np.zeros(img.shape[:2], np.uint8)], axis=-1)
        entry = {"id": case_id, "patient": patient, "z": z, "h": h, "w": w, "cols": cols,
                 "spacing": [float(s) for s in (spacing or (1.0, 1.0, 1.0))],
                 "img": (_data_uri(img, "jpeg-rgb") if img.ndim == 3 else _data_uri(img, "jpeg")) if raw is None
                 else _data_uri(np.stack([img >> 8, img & 255, np.zeros_like(img)], -1).astype(np.uint8), "png"),
                 "raw": raw, "channels": [f"channel {j + 1}" for j in shown] if ranges else None,
                 "display": shown.index(self.channel) if ranges else 0, "ranges": ranges,
                 "lab": _data_uri(lab, "png"), "truth": truth is not None, "metrics": metrics or {},
                 "components": components(t, pred, self.classes) if truth is not None else [], "note": note,
                 "affine": None if affine is None else np.round(np.asarray(affine, float), 5).tolist(),
                 "range": [round(lo, 4), round(hi, 4)], "slices": None if slices is None else [str(s) for s in slices],
                 "quality": quality_entry(quality)}
        self.cases.append(entry)

    def add_missing(self, case_id: str, patient: str, reason: str) -> None:
        self.cases.append({"id": case_id, "patient": patient, "missing": reason, "metrics": {}, "components": []})

    def write(self, path: str | Path, title: str) -> Path:
        data = {"title": title, "classes": self.classes, "colours": COLOURS[:len(self.classes)],
                "planes": 3 if self.spatial_dims == 3 else 1, "unit": self.unit, "cases": self.cases}
        page = resources.files("medseg.evaluation").joinpath("viewer.html").read_text()
        blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # no "</script>" inside the script
        path = Path(path)
        atomic_write_text(path, page.replace("/*DATA*/null", blob).replace("{{title}}", _escape(title)))
        return path


def quality_entry(rows: dict[str, Any] | None) -> dict[str, Any] | None:
    """The view's summary of a case's quality rows: its lowest predicted Dice and whether any is flagged."""
    if not rows:
        return None
    return {"predicted": round(min(float(r["predicted_dice"]) for r in rows.values()), 4),
            "review": any(bool(r["review"]) for r in rows.values()),
            "per_structure": {c: round(float(r["predicted_dice"]), 4) for c, r in rows.items()}}


def case_quality(quality: dict[tuple[str, str], dict[str, Any]], case_id: str,
                 classes: list[str]) -> dict[str, Any] | None:
    """``{class: row}`` of one case from ``read_quality``'s table (None when it has none)."""
    from medseg.inference.quality_files import case_rows

    return {c: r for c, r in zip(classes, case_rows(quality, case_id, classes)) if r is not None} or None


def case_image(t: Any) -> tuple[np.ndarray | None, str | None]:
    """A truth case's image for the view, or None and why (the view then marks the case) when it cannot be read."""
    try:
        return np.asarray(t.image()), None
    except (MedsegError, OSError, ValueError) as e:
        return None, f"image not shown ({e})"


def case_metrics_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The table's columns for one case from its per-class metric rows: mean Dice and HD95 over classes
    (NaN left out) and the volume error (predicted - true voxels, over true voxels, all classes)."""
    def mean(key: str) -> float | None:
        v = [r[key] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        return float(np.mean(v)) if v else None

    tv = sum(int(r["truth_voxels"]) for r in rows)
    pv = sum(int(r["pred_voxels"]) for r in rows)
    return {"dice": mean("dice"), "hd95": mean("hd95"), "volume_error": (pv - tv) / tv if tv else None,
            "truth_voxels": tv, "pred_voxels": pv}


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["ViewWriter", "view", "components", "mosaic", "case_image", "case_metrics_row", "COLOURS"]


def view(pred: str | Path, truth: str | Path | None = None, *, out: str | Path | None = None, fmt: str | None = None,
         images: str | Path | None = None, options: dict[str, Any] | None = None, console: Any = None) -> Path:
    """The view of any predictions against their truth (``medseg view``): every case the truth lists, those
    that cannot be shown (no prediction, a size that disagrees, an unreadable image) marked with the reason
    instead of stopping. Returns the HTML file."""
    pred = Path(pred)
    if truth is None and images is not None and not RunDir.is_run(pred):  # predictions over their images, no truth
        truth_obj = NativeTruth(Path(images), fmt or guess_format(Path(images)), options, masks=False)
        preds = open_predictions(pred, truth_obj)
        ids = list(truth_obj.ids)
    elif truth is None:
        if not RunDir.is_run(pred):
            raise MedsegError("give TRUTH, or --image with the images the predictions were made from "
                              "(TRUTH may be left out for a run directory)", pred)
        preds, ds_path = run_predictions(pred, unfinished=True)  # a look at a run in progress: warned
        truth_obj = open_truth(ds_path)
        ids = [i for i in truth_obj.ids if i in (preds.ids or ())]
    else:
        truth_obj = open_truth(Path(truth), fmt, Path(images) if images else None, options)
        preds = open_predictions(pred, truth_obj)
        ids = list(truth_obj.ids)
    from medseg.inference.quality_files import read_quality

    unit = "mm" if truth_obj.spacing_known else "px"
    quality = read_quality(pred) if pred.is_dir() else {}
    w = ViewWriter(truth_obj.classes, truth_obj.spatial_dims, unit)
    skipped: list[tuple[str, str]] = []
    for cid in ids:
        t = truth_obj.load(cid)
        try:
            p = preds.loader(cid, t)
        except MedsegError as e:
            w.add_missing(cid, t.patient, e.problem)
            skipped.append((cid, e.problem))
            continue
        image, why = case_image(t)
        if why:
            skipped.append((cid, why))
        if not t.has_mask:
            w.add_case(cid, t.patient, image, None, p, t.spacing, affine=t.affine, slices=t.slices,
                       quality=case_quality(quality, cid, truth_obj.classes))
            continue
        rows = case_metrics(p, t.mask, spacing=t.spacing)
        w.add_case(cid, t.patient, image, t.mask, p, t.spacing, case_metrics_row(rows), affine=t.affine, slices=t.slices,
                   quality=case_quality(quality, cid, truth_obj.classes))
    if out is None:  # beside the predictions; inside a run directory
        run = truth is None and images is None
        out = pred / "view.html" if run else pred.with_name((pred.stem if pred.is_file() else pred.name) + "_view.html")
    path = w.write(out, f"medseg view: {pred.name}" + (f" vs {Path(truth).name}" if truth is not None else ""))
    if console is not None:
        for cid, why in skipped:
            console.print(f"[yellow]skipped[/] {cid}: {why}", highlight=False)
        n = len(ids) - sum(1 for c in w.cases if c.get("missing"))
        console.print(f"[green]view[/] of {n} of {plural(len(ids), 'case')} "
                      f"({plural(sum(len(c['components']) for c in w.cases), 'error component')}) -> {path}", highlight=False)
    return path
