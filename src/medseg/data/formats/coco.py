"""COCO instance annotations (``_annotations.coco.json`` + an image folder, e.g. a Roboflow export).

Polygons, RLE (compressed or not) and bbox-only annotations are rasterised with pycocotools; each
image is a case of depth 1; images without annotations are negatives (empty masks). Categories without
any annotation are dropped. ROOT may also be a Roboflow export root (``train/``, ``valid/``, ``test/``
each with its ``_annotations.coco.json``): all splits become one dataset (the split is kept per case in
``CaseSpec.split``) and ``prepare`` trains on ``train`` and validates on ``valid`` (``--split kfold`` makes
patient-level folds instead).

Merged classes are named after the used categories' common supercategory (Roboflow writes the
project's class there, e.g. "Tumor" -> ``tumor``), else ``foreground``; ``merged_name`` overrides."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.formats import FORMATS
from medseg.data.formats.base import CaseData, CaseSpec, DatasetSpec, Reader, binary_mask, check_2d, expect_prediction
from medseg.data.formats.folder import read_image
from medseg.errors import MedsegError

_JSON_NAMES = ("_annotations.coco.json", "annotations.json", "instances.json")


@FORMATS.register("coco")
class COCOReader(Reader):
    name = "coco"
    description = (
        "COCO JSON + images (polygons, RLE, bbox-only); ROOT = folder with _annotations.coco.json, the JSON, "
        "or an export root whose train/ valid/ test/ each hold one"
    )

    has_spacing = False
    patients = "patient_regex on the image stem; else one patient per image (warned when names look shared)"
    prediction_files = ("*_mask.png",)

    class Options(Reader.Options):
        annotations: str | None = None  # JSON path (relative to ROOT or absolute)
        images: str | None = None  # image folder (default: the JSON's folder)
        merge: bool = True  # all used categories -> one class
        merged_name: str | None = None  # default: the used categories' common supercategory, else "foreground"
        grayscale: bool = False
        patient_regex: str | None = None  # first group (or whole match) of the image stem = patient

    def _paths(self, root: Path) -> list[tuple[Path, Path]]:
        """(annotation JSON, image folder) pairs: one, or one per split folder of an export root."""
        o = self.options
        if o.annotations:
            ann = Path(o.annotations)
            if not ann.is_absolute():
                ann = (root if root.is_dir() else root.parent) / ann
        elif root.is_file():
            ann = root
        elif root.is_dir():
            found = [root / n for n in _JSON_NAMES if (root / n).is_file()] or sorted(root.glob("*.json"))
            if not found:
                # a Roboflow-style export root: train/, valid/, test/ each with its own JSON
                splits = [d / n for d in sorted(root.iterdir()) if d.is_dir() for n in _JSON_NAMES[:1] if (d / n).is_file()]
                if splits and not o.images:
                    return [(a, a.parent) for a in splits]
                raise MedsegError(f"no COCO annotation file ({', '.join(_JSON_NAMES)}) in the folder or its split folders", root)
            ann = found[0]
        else:
            raise MedsegError("not a folder or a COCO JSON file", root)
        if not ann.is_file():
            raise MedsegError("COCO annotation file not found", ann)
        images = Path(o.images) if o.images else ann.parent
        if o.images and not images.is_absolute():
            images = (root if root.is_dir() else root.parent) / images
        if not images.is_dir():
            raise MedsegError("image folder not found", images)
        return [(ann, images)]

    def scan(self, root: Path, require_masks: bool = True) -> DatasetSpec:
        root = Path(root)
        if not root.exists():
            raise MedsegError("not a folder or a COCO JSON file", root)
        sources = self._paths(root)
        docs = [(ann, img_dir, *_read_coco(ann)) for ann, img_dir in sources]
        cats, supers = docs[0][3], docs[0][4]
        for ann, _, _, other, _, _ in docs[1:]:
            if other != cats:
                raise MedsegError(f"categories differ from those of {docs[0][0]}", ann)
        used_ids = sorted({a["category_id"] for *_, anns in docs for per in anns.values() for a in per})
        if self.options.merge:
            common = {supers.get(c) for c in used_ids}
            name = common.pop() if len(common) == 1 else None
            default = name.strip().lower().replace(" ", "_") if name and name.strip().lower() not in ("none", "") else "foreground"
            classes = [self.options.merged_name or default]
            class_of = {cid: 0 for cid in used_ids}
        else:
            classes = [cats[c] for c in used_ids]
            class_of = {cid: j for j, cid in enumerate(used_ids)}
        if require_masks and not classes:
            raise MedsegError("the COCO file has no annotations", docs[0][0])
        rx = re.compile(self.options.patient_regex) if self.options.patient_regex else None
        cases = []
        seen: dict[str, Path] = {}
        for ann_path, img_dir, images, _, _, anns in docs:
            for iid, im in images.items():
                path = img_dir / im["file_name"]
                if not path.is_file():
                    raise MedsegError(f"image file of image id {iid} is missing", path)
                stem = Path(im["file_name"]).stem
                if stem in seen:
                    raise MedsegError(f"two images named {stem!r} (the other is {seen[stem]})", path)
                seen[stem] = path
                patient = stem
                if rx:
                    m = rx.search(stem)
                    patient = (m.group(1) if m.groups() else m.group(0)) if m else stem
                cases.append(
                    CaseSpec(
                        id=stem,
                        patient=patient,
                        split=ann_path.parent.name if len(docs) > 1 else None,
                        sources={
                            "image": str(path),
                            "height": im.get("height"),
                            "width": im.get("width"),
                            "annotations": [
                                {"class": class_of[a["category_id"]], "segmentation": a.get("segmentation"), "bbox": a.get("bbox")}
                                for a in anns[iid]
                            ],
                        },
                    )
                )
        if not cases:
            raise MedsegError("the COCO file lists no images", docs[0][0])
        return DatasetSpec(
            format=self.name,
            root=str(root),
            channels=["gray"] if self.options.grayscale else ["R", "G", "B"],
            classes=classes,
            class_kind="multiclass" if self.options.merge else "multilabel",  # boxes of different categories may overlap
            spatial_dims=2,
            cases=cases,
            has_masks=require_masks,
            meta={"annotations": [str(d[0]) for d in docs] if len(docs) > 1 else str(docs[0][0]),
                  "categories": {str(c): cats[c] for c in used_ids}},
        )

    def load(self, spec: DatasetSpec, case: CaseSpec) -> CaseData:
        from PIL import Image

        path = Path(case.sources["image"])
        try:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im.convert("L" if self.options.grayscale else "RGB"))
        except Exception as e:  # PIL raises OSError/SyntaxError/... for truncated or non-image files
            raise MedsegError(f"cannot decode image ({type(e).__name__}: {e})", path) from None
        h, w = arr.shape[:2]
        hh, ww = case.sources.get("height"), case.sources.get("width")
        if (hh and hh != h) or (ww and ww != w):
            raise MedsegError(f"image is {w}x{h} but the COCO file says {ww}x{hh}", path)
        image = arr[None, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]
        mask = None
        if spec.has_masks:
            mask = np.zeros((1, len(spec.classes), h, w), np.uint8)
            for a in case.sources["annotations"]:
                mask[0, a["class"]] |= _rasterise(a, h, w, path)
        return CaseData(image=np.ascontiguousarray(image), mask=mask, spacing=(1.0, 1.0, 1.0), slices=[path.stem])

    @classmethod
    def options_for_model(cls, channels: int | None) -> dict:
        return {"grayscale": True} if channels == 1 else {}

    @classmethod
    def sniff(cls, path: Path) -> int:
        return 2 if is_coco_folder(Path(path)) else 0

    def read_prediction(self, root, spec, case, shape):
        """``<image stem>[_<class>]_mask.png`` (0/255) per class, as ``write_prediction`` writes them."""

        out = np.zeros(shape, np.uint8)
        for j, name in enumerate(spec.classes):
            suffix = "" if len(spec.classes) == 1 else f"_{_safe(name)}"
            p = expect_prediction(Path(root) / f"{case.id}{suffix}_mask.png", case.id)
            m = read_image(p)
            m = m if m.ndim == 2 else m[..., 0]
            check_2d(m, shape, p)
            out[0, j] = binary_mask(m, p)
        return out

    def write_prediction(self, spec, case, mask, out_dir, probabilities=None):
        from PIL import Image

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for j, name in enumerate(spec.classes):
            suffix = "" if len(spec.classes) == 1 else f"_{_safe(name)}"
            p = out / f"{case.id}{suffix}_mask.png"
            Image.fromarray((mask[0, j] > 0).astype(np.uint8) * 255).save(p)
            written.append(p)
        return written


def is_coco_folder(path: Path) -> bool:
    """A folder holding a COCO JSON by one of its usual names, or an export root whose split folders
    (train/, valid/, ...) each hold ``_annotations.coco.json``."""
    path = Path(path)
    return path.is_dir() and (any((path / n).is_file() for n in _JSON_NAMES)
                              or any((d / _JSON_NAMES[0]).is_file() for d in path.iterdir() if d.is_dir()))


def _read_coco(ann_path: Path) -> tuple[dict[int, dict], dict[int, str], dict[int, str | None], dict[int, list[dict]]]:
    """(images by id, category names by id, supercategories by id, annotations by image id) of one COCO
    JSON, validated."""
    try:
        doc = json.loads(ann_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedsegError(f"malformed COCO JSON: {e}", ann_path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise MedsegError("malformed COCO JSON: no 'images' list", ann_path)
    images: dict[int, dict] = {}
    for im in doc["images"]:
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise MedsegError(f"malformed COCO JSON: image entry without id/file_name: {im!r}"[:200], ann_path)
        name = str(im["file_name"])
        # a file name is relative to the image folder: never a way out of the data set
        if not name or Path(name).is_absolute() or ".." in Path(name.replace("\\", "/")).parts or name.startswith(("/", "\\")):
            raise MedsegError(f"image id {im['id']}: file_name {name!r} leaves the image folder "
                              "(absolute, or with '..'); COCO file names are relative to it", ann_path)
        images[im["id"]] = im
    cats = {c["id"]: str(c["name"]) for c in doc.get("categories", [])}
    supers = {c["id"]: c.get("supercategory") for c in doc.get("categories", [])}
    anns: dict[int, list[dict]] = {i: [] for i in images}
    for a in doc.get("annotations", []):
        if a.get("image_id") not in images:
            raise MedsegError(f"annotation {a.get('id')} points at image id {a.get('image_id')}, which is not in 'images'", ann_path)
        if a.get("category_id") not in cats:
            raise MedsegError(f"annotation {a.get('id')} has unknown category id {a.get('category_id')}", ann_path)
        _check_geometry(a, images[a["image_id"]], ann_path)
        anns[a["image_id"]].append(a)
    return images, cats, supers, anns


def _numbers(values: Any, what: str, where: Path) -> np.ndarray:
    """Finite coordinates, or an error: a NaN vertex once made the rasteriser allocate without bound."""
    try:
        a = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise MedsegError(f"{what} holds values that are not numbers", where) from None
    if not np.isfinite(a).all():
        raise MedsegError(f"{what} has a coordinate that is NaN or infinite", where)
    return a


def _check_geometry(a: dict, im: dict, where: Path) -> None:
    """Polygons of x, y pairs with at least 3 points and a bbox of 4 numbers, finite, and at least
    partly inside the image (an annotation wholly outside it would become an empty mask)."""
    aid = a.get("id")
    seg = a.get("segmentation")
    boxes = []
    if isinstance(seg, list) and seg:
        if not all(isinstance(p, list) for p in seg):
            raise MedsegError(f"annotation {aid}: segmentation must be a list of polygons, each a list of x, y "
                              "coordinates ([[x1, y1, x2, y2, ...]]), or an RLE", where)
        for poly in seg:
            xy = _numbers(poly, f"annotation {aid}: polygon", where)
            if xy.size % 2:
                raise MedsegError(f"annotation {aid} has a polygon with an odd number of coordinates ({xy.size}): "
                                  "COCO polygons are x, y pairs", where)
            if xy.size < 6:
                raise MedsegError(f"annotation {aid} has a polygon with {xy.size // 2} points (< 3)", where)
            boxes.append((xy[0::2].min(), xy[1::2].min(), xy[0::2].max(), xy[1::2].max()))
    elif seg is None or seg == []:
        if a.get("bbox") is not None:
            b = _numbers(a["bbox"], f"annotation {aid}: bbox", where)
            if b.size != 4 or b[2] <= 0 or b[3] <= 0:
                raise MedsegError(f"annotation {aid} has a bbox {a['bbox']!r}: expected [x, y, width, height] "
                                  "with a positive width and height", where)
            boxes.append((b[0], b[1], b[0] + b[2], b[1] + b[3]))
    w, h = im.get("width"), im.get("height")
    if boxes and isinstance(w, (int, float)) and isinstance(h, (int, float)):
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            raise MedsegError(f"annotation {aid} lies wholly outside its {w}x{h} image {im.get('file_name')!r} "
                              f"(x {x0:g}..{x1:g}, y {y0:g}..{y1:g})", where)


def _rasterise(a: dict, h: int, w: int, where: Path) -> np.ndarray:
    from pycocotools import mask as mask_utils

    seg = a.get("segmentation")
    try:
        if isinstance(seg, list) and seg:
            rle = mask_utils.merge(mask_utils.frPyObjects([list(map(float, p)) for p in seg], h, w))
        elif isinstance(seg, dict):
            if list(seg.get("size", [])) != [h, w]:
                raise MedsegError(f"RLE size {seg.get('size')} differs from the image's {[h, w]}", where)
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else dict(seg)
            if isinstance(rle.get("counts"), str):
                rle["counts"] = rle["counts"].encode()
        elif a.get("bbox"):
            x, y, bw, bh = map(float, a["bbox"])
            rle = mask_utils.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w)[0]
        else:
            raise MedsegError("annotation has neither a segmentation nor a bbox", where)
        return mask_utils.decode(rle).astype(np.uint8)
    except MedsegError:
        raise
    except Exception as e:
        raise MedsegError(f"cannot rasterise annotation ({type(e).__name__}: {e})", where) from None


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
