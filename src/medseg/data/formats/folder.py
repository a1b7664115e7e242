"""A plain folder of 2D images and masks: ``ROOT/images/<stem>.<ext>`` + ``ROOT/masks/<stem>.<ext>``.

Without masks (``scan(..., require_masks=False)``, i.e. images to segment) the images may also lie
straight in ``ROOT/`` (a flat folder, used when there is no ``images/`` subfolder), or ``ROOT`` may be one
image file; ``write_prediction`` then writes ``OUT/<stem>.png`` instead of ``OUT/masks/<stem>.png``.

Images and masks are paired by stem (png, jpg, jpeg, tif, tiff, bmp; a mask may have another extension
than its image). Masks are read as

- ``binary``: one class (``foreground`` or ``classes[0]``), masks stored as {0, 255} or {0, 1}; other
  values are an error naming the file, unless ``mask_threshold`` is given (pixel > threshold) or the
  masks are JPEG, which cannot store exact values (thresholded at half range);
- ``labels``: integer labels 0 (background), 1..K -> classes ``classes`` or ``class1..classK``; a value
  above K is an error naming the file;
- ``palette``: colour-coded RGB masks, e.g. ``stomach=255,0,0;large_bowel=0,255,0;small_bowel=255,255,0``;
  every pixel goes to the nearest palette colour or to background (0,0,0), so resized masks with
  blurred edges map cleanly; colours that are no blend of palette colours are an error when they cover
  more than 0.25% of the image (an undeclared label), else a warning.
- ``auto`` (default): palette if one is given; else binary if every mask holds only {0,255} or {0,1},
  labels if the largest value is at most 50, binary otherwise (so grey PNG masks need ``mask_threshold``).

All three are exclusive (``multiclass``). ``case_regex`` groups stems into multi-slice cases
(slices sorted by stem, numbers numerically); by default each image is its own case of depth 1.
``patient_regex`` groups cases into patients (its first group of the stem); without it each case is its
own patient, and ``prepare`` warns when the names suggest otherwise.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np

from medseg.data.formats import FORMATS
from medseg.data.formats.base import (MAP_FOLDERS, CaseData,
    CaseSpec,
    ClassNames,
    DatasetSpec,
    Reader,
    binary_mask,
    check_2d,
    expect_prediction)
from medseg.data.formats.lgg import read_tiff
from medseg.data.formats.palette import BACKGROUND, map_palette, parse_palette
from medseg.errors import MedsegError, warn

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_LOSSY = (".jpg", ".jpeg")  # cannot store exact mask values: thresholded at half range
_AUTO_LABEL_MAX = 50


def read_image(path: Path) -> np.ndarray:
    """A 2D image as ``[h, w]`` or ``[h, w, c]`` in its native dtype, or a MedsegError naming the file."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_tiff(path)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("P", "PA"):  # palette PNGs: real colours, not palette indices
                im = im.convert("RGBA" if im.mode == "PA" else "RGB")
            elif im.mode in ("1", "LA"):
                im = im.convert("L")
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise MedsegError(f"cannot read image ({type(e).__name__}: {e})", path) from None


def _is_gray(a: np.ndarray) -> bool:
    return a.ndim == 2 or (a.shape[-1] >= 3 and bool((a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()))


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def _list(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in EXTENSIONS:
            if f.stem in out:
                raise MedsegError(f"two files with the stem {f.stem!r} ({out[f.stem].name})", f)
            out[f.stem] = f
    return out


@FORMATS.register("folder")
class FolderReader(Reader):
    name = "folder"
    description = "images/ + masks/ of 2D PNG/JPG/TIF/BMP paired by file stem (binary, label or colour masks)"
    has_spacing = False
    label_files = ("masks/*",)
    patients = "patient_regex on the file stem; else one patient per case (warned when names look shared)"

    class Options(Reader.Options):
        mask_mode: Literal["auto", "binary", "labels", "palette"] = "auto"
        classes: ClassNames = None
        palette: str | None = None
        patient_regex: str | None = None
        case_regex: str | None = None
        # auto: grey when the first image is grey, even stored as RGB; stored: as the file stores it
        channels: Literal["auto", "stored", "gray", "rgb"] = "auto"
        # binary masks: foreground = pixel > this (grey or blurred masks); default: exact {0,255}/{0,1}
        mask_threshold: float | None = None

    def _regex(self, key: str) -> re.Pattern | None:
        text = getattr(self.options, key)
        if text is None:
            return None
        try:
            rx = re.compile(text)
        except re.error as e:
            raise MedsegError(f"bad option {key}={text!r}: {e}") from None
        if rx.groups < 1:
            raise MedsegError(f"bad option {key}={text!r}: needs a (group)")
        return rx

    def scan(self, root: Path, require_masks: bool = True) -> DatasetSpec:
        root = Path(root)
        img_dir, mask_dir = root / "images", root / "masks"
        if root.is_file() and not require_masks:  # one image to segment
            if root.suffix.lower() not in EXTENSIONS:
                raise MedsegError(f"not an image file ({', '.join(EXTENSIONS)})", root)
            layout, images = "file", {root.stem: root}
        elif not root.is_dir():
            raise MedsegError("not a folder", root)
        elif img_dir.is_dir():
            layout, images = "images", _list(img_dir)
            if not images:
                raise MedsegError(f"no images ({', '.join(EXTENSIONS)})", img_dir)
        elif require_masks:
            raise MedsegError("no images/ folder (expected ROOT/images/ and ROOT/masks/)", root)
        else:  # images to segment straight in the folder
            layout, images = "flat", _list(root)
            if not images:
                raise MedsegError(f"no images ({', '.join(EXTENSIONS)}) in the folder and no images/ subfolder", root)
        masks: dict[str, Path] = {}
        if require_masks:
            if not mask_dir.is_dir():
                raise MedsegError("no masks/ folder (use --images-only for images without masks)", root)
            masks = _list(mask_dir)
            for stem in sorted(set(masks) - set(images), key=_natural):
                raise MedsegError("mask without an image (no images/" + stem + ".*)", masks[stem])
            for stem in sorted(set(images) - set(masks), key=_natural):
                raise MedsegError("image without a mask (no masks/" + stem + ".*)", images[stem])

        case_rx, patient_rx = self._regex("case_regex"), self._regex("patient_regex")
        groups: dict[str, list[str]] = {}
        for stem in images:
            if case_rx is None:
                cid = stem
            else:
                m = case_rx.search(stem)
                if not m:
                    raise MedsegError(f"file stem does not match case_regex {case_rx.pattern!r}", images[stem])
                cid = m.group(1)
            groups.setdefault(cid, []).append(stem)
        cases = []
        for cid in sorted(groups, key=_natural):
            stems = sorted(groups[cid], key=_natural)
            if patient_rx is None:
                patient = cid
            else:
                m = patient_rx.search(stems[0])
                if not m:
                    raise MedsegError(f"file stem does not match patient_regex {patient_rx.pattern!r}", images[stems[0]])
                patient = m.group(1)
            cases.append(
                CaseSpec(
                    id=cid,
                    patient=patient,
                    sources={
                        "image": str(images[stems[0]]),
                        "images": [str(images[s]) for s in stems],
                        "masks": [str(masks[s]) for s in stems] if require_masks else None,
                        "stems": stems,
                    },
                )
            )

        first = read_image(images[next(iter(images))])
        chan = self.options.channels
        if chan == "auto":
            chan = "gray" if _is_gray(first) else "rgb"
        elif chan == "stored":
            chan = "rgb" if first.ndim == 3 else "gray"
        mode, classes, colours = self._mask_mode(masks if require_masks else {})
        return DatasetSpec(
            format=self.name,
            root=str(root),
            channels=["gray"] if chan == "gray" else ["R", "G", "B"],
            classes=classes,
            class_kind="multiclass",
            spatial_dims=2,
            cases=cases,
            has_masks=require_masks,
            meta={"channels_mode": chan, "mask_mode": mode, "palette": [list(c) for c in colours] or None,
                  "layout": layout},
        )

    def _mask_mode(self, masks: dict[str, Path]) -> tuple[str, list[str], list[tuple[int, int, int]]]:
        """(resolved mode, class names, palette colours) -- reads the masks only when it must."""
        o = self.options
        mode = o.mask_mode
        if mode == "auto" and o.palette:
            mode = "palette"
        if mode == "palette":
            if not o.palette:
                raise MedsegError("mask_mode=palette needs a palette option, e.g. stomach=255,0,0;liver=0,255,0")
            pal = parse_palette(o.palette)
            if o.classes and o.classes != [n for n, _ in pal]:
                raise MedsegError(f"classes {o.classes} disagree with the palette's {[n for n, _ in pal]}")
            return mode, [n for n, _ in pal], [c for _, c in pal]
        if mode == "auto" and o.classes and len(o.classes) > 1:
            mode = "labels"
        if mode == "binary":
            if o.classes and len(o.classes) != 1:
                raise MedsegError(f"mask_mode=binary has one class, got classes {o.classes}")
            return mode, list(o.classes or ["foreground"]), []
        if mode == "labels" and o.classes:
            return mode, list(o.classes), []
        # auto without classes, or labels without classes: look at every mask's values
        seen = np.zeros(65536, bool)
        for stem, p in masks.items():
            m = read_image(p)
            if m.ndim == 3:
                if not _is_gray(m):
                    raise MedsegError(
                        "colour mask: give a palette, e.g. -o palette='stomach=255,0,0;large_bowel=0,255,0'", p
                    )
                m = m[..., 0]
            if not np.issubdtype(m.dtype, np.integer) or m.min() < 0 or m.max() > 65535:
                raise MedsegError(f"mask values must be integers 0..65535, got {m.dtype}", p)
            seen[np.unique(m)] = True
        values = set(np.flatnonzero(seen).tolist())
        if not masks:
            values = {0, 1}
        top = max(values)
        if mode == "auto":
            mode = "binary" if values <= {0, 255} or values <= {0, 1} or top > _AUTO_LABEL_MAX else "labels"
        if mode == "binary":
            return mode, list(o.classes or ["foreground"]), []
        if o.classes:  # one class named, but the masks hold labels 0..top
            if top > len(o.classes):
                raise MedsegError(
                    f"masks hold labels up to {top} but only {len(o.classes)} class given ({', '.join(o.classes)})",
                    next(iter(masks.values())).parent,
                )
            return mode, list(o.classes), []
        if top < 1:
            raise MedsegError("every mask is empty: cannot tell the label classes (give classes=...)", next(iter(masks.values())).parent)
        return mode, [f"class{i}" for i in range(1, top + 1)], []

    def load(self, spec: DatasetSpec, case: CaseSpec) -> CaseData:
        chan = spec.meta.get("channels_mode", "gray")
        imgs = []
        for p in case.sources["images"]:
            a = read_image(Path(p))
            if a.ndim == 3 and a.shape[-1] == 4:
                if not (a[..., 3] == a[..., 3].max()).all():
                    warn("RGBA image with transparent pixels: the alpha channel is dropped", p)
                a = a[..., :3]
            if a.ndim == 3 and a.shape[-1] != 3:
                raise MedsegError(f"expected a grey or RGB image, got shape {a.shape}", p)
            if imgs and a.dtype != imgs[0].dtype:  # stacking would upcast one slice's scale silently
                raise MedsegError(f"image is {a.dtype} but the case's first slice is {imgs[0].dtype}", p)
            if chan == "gray":
                if a.ndim == 3:
                    if not _is_gray(a):
                        warn("colour image in a greyscale data set: converted to its luminance", p)
                    a = a[..., 0] if _is_gray(a) else _luminance(a)
                a = a[None]
            else:
                a = np.repeat(a[None], 3, axis=0) if a.ndim == 2 else a.transpose(2, 0, 1)
            if imgs and a.shape != imgs[0].shape:
                raise MedsegError(f"image size {a.shape[1:]} differs from the case's {imgs[0].shape[1:]}", p)
            imgs.append(a)
        image = np.ascontiguousarray(np.stack(imgs))  # [z, c, h, w]
        mask = None
        if case.sources.get("masks"):
            k = len(spec.classes)
            ms = []
            for p, img in zip(case.sources["masks"], imgs):
                ms.append(self._read_mask(Path(p), spec, k, img.shape[1:]))
            labels = np.stack(ms)  # [z, h, w] 0..k
            mask = (labels[:, None] == np.arange(1, k + 1, dtype=labels.dtype)[None, :, None, None]).astype(np.uint8)
        return CaseData(image=image, mask=mask, spacing=(1.0, 1.0, 1.0), slices=list(case.sources["stems"]))

    def _read_mask(self, p: Path, spec: DatasetSpec, k: int, size: tuple[int, int]) -> np.ndarray:
        m = read_image(p)
        if m.shape[:2] != tuple(size):
            raise MedsegError(f"mask size {m.shape[:2]} differs from its image's {tuple(size)}", p)
        mode = spec.meta["mask_mode"]
        if mode == "palette":
            if m.ndim == 2:
                raise MedsegError("palette masks must be RGB images, got a greyscale one", p)
            return map_palette(m, [tuple(c) for c in spec.meta["palette"]], p)
        if m.ndim == 3:
            if not _is_gray(m):
                raise MedsegError("colour mask: give a palette option, or a greyscale mask", p)
            m = m[..., 0]
        if mode == "binary":
            return self._binary(m, p)
        values = np.unique(m)
        extra = values[(values < 0) | (values > k)]
        if extra.size:
            raise MedsegError(f"label values {extra[:5].tolist()} in a mask but only labels 0..{k} are declared "
                              f"({', '.join(spec.classes)})", p)
        return m.astype(np.uint8)

    def _binary(self, m: np.ndarray, p: Path) -> np.ndarray:
        """{0, 255} or {0, 1}; grey values only where the file cannot hold exact ones (JPEG) or a
        ``mask_threshold`` is given: then pixel > threshold (default half range) is foreground."""
        thr = self.options.mask_threshold
        if thr is None and p.suffix.lower() in _LOSSY:
            thr = 0.5 if not np.issubdtype(m.dtype, np.integer) else float(np.iinfo(m.dtype).max) / 2
        if thr is None:
            try:
                return binary_mask(m, p).astype(np.uint8)
            except MedsegError as e:
                raise MedsegError(e.problem, p, hint="-o mask_threshold=127 thresholds grey masks; "
                                  "-o mask_mode=labels reads label values") from None
        return (m > thr).astype(np.uint8)

    @classmethod
    def options_for_model(cls, channels: int | None) -> dict:
        # a grey scan saved as RGB (three equal channels) reaches a 3-channel model as its three stored
        # channels (auto would make it grey); a file stored with one channel still meets the channel check
        return {"channels": "stored"} if channels == 3 else {}

    @classmethod
    def sniff(cls, path: Path) -> int:
        """An ``images/`` folder (the explicit layout) surely; any other folder or image file weakly: plain
        images are the catch-all, and ``scan`` says what such a folder lacks."""
        path = Path(path)
        if path.is_file():
            return 1 if path.suffix.lower() in EXTENSIONS else 0
        if not path.is_dir():
            return 0
        return 3 if (path / "images").is_dir() else 1

    def read_prediction(self, root, spec, case, shape):
        root = Path(root)
        folder = root / "masks" if (root / "masks").is_dir() else root
        palette = spec.meta.get("palette")
        k = shape[1]
        out = np.zeros(shape, np.uint8)
        for z, stem in enumerate(case.sources["stems"]):
            p = expect_prediction(folder / f"{stem}.png", case.id, f" ({stem})")
            m = read_image(p)
            if palette and m.ndim == 3:
                lab = map_palette(m, [tuple(c) for c in palette], p)
            elif palette:  # a label map: what predict writes when its input's layout named no palette
                lab = m
            else:
                lab = m if m.ndim == 2 else m[..., 0]
                if k == 1:
                    lab = binary_mask(lab, p).astype(np.uint8)
            check_2d(lab, shape, p)
            if int(lab.max()) > k:
                raise MedsegError(f"label {int(lab.max())} in a prediction but only {k} classes", p)
            for j in range(k):
                out[z, j] = lab == j + 1
        return out

    def write_prediction(self, spec, case, mask, out_dir, probabilities=None):
        """``out_dir/masks/<stem>.png`` for an ``images/`` layout, ``out_dir/<stem>.png`` for a flat folder
        or a single image (the input's layout): 0/255 for one class, label values, or palette colours,
        the size of the input image. Probabilities: ``out_dir/probabilities/<stem>.npy`` ([k, h, w] float16)."""
        from PIL import Image

        flat = spec.meta.get("layout") in ("flat", "file")
        folder = Path(out_dir) if flat else Path(out_dir) / "masks"
        folder.mkdir(parents=True, exist_ok=True)
        mask = np.asarray(mask) > 0
        k = mask.shape[1]
        # exclusive classes: label j+1 where channel j is set (a later channel wins any overlap)
        labels = np.zeros((mask.shape[0], *mask.shape[2:]), np.uint8)
        for j in range(k):
            labels[mask[:, j]] = j + 1
        colours = spec.meta.get("palette")
        written = []
        for z, stem in enumerate(case.sources["stems"]):
            if colours:
                lut = np.array([BACKGROUND, *colours], np.uint8)
                out = lut[labels[z]]
            elif k == 1:
                out = labels[z] * np.uint8(255)
            else:
                out = labels[z]
            path = folder / f"{stem}.png"
            Image.fromarray(out).save(path)
            written.append(path)
            if probabilities is not None:
                pp = Path(out_dir) / MAP_FOLDERS[self.map_name] / f"{stem}.npy"
                pp.parent.mkdir(exist_ok=True)
                np.save(pp, np.asarray(probabilities[z], np.float16))
                written.append(pp)
        return written


def _luminance(a: np.ndarray) -> np.ndarray:
    y = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
    return np.round(y).astype(a.dtype)
