"""Kaggle LGG brain MRI (``kaggle_3m/``): one folder per patient of ``<case>_<n>.tif`` slices
(256x256x3 uint8: pre-contrast, FLAIR, post-contrast) and ``<case>_<n>_mask.tif`` (0/255)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medseg.data.formats import FORMATS
from medseg.data.formats.base import (CaseData, CaseSpec, DatasetSpec, Reader, binary_mask, check_2d,
                                     expect_prediction)
from medseg.errors import MedsegError, warn

_SLICE = re.compile(r"^(?P<case>.+)_(?P<n>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)


def read_tiff(path: Path) -> np.ndarray:
    """A TIFF page as an array (uncompressed or compressed), or a MedsegError naming the file."""
    import tifffile

    try:
        a = tifffile.imread(path)
    except Exception as e:  # tifffile raises several types for corrupt/truncated files
        raise MedsegError(f"cannot read TIFF ({type(e).__name__}: {e})", path) from None
    if a.size == 0:  # a damaged header can decode to no pixels at all
        raise MedsegError("cannot read TIFF (no pixels: damaged or empty file)", path)
    return a


@FORMATS.register("lgg")
class LGGReader(Reader):
    name = "lgg"
    description = "Kaggle LGG kaggle_3m/: patient folders of <case>_<n>.tif + <case>_<n>_mask.tif (masks 0/255 or 0/1)"
    has_spacing = False
    label_files = ("*_mask.tif", "*_mask.tiff", "*_mask.TIF")
    prediction_files = label_files
    patients = "TCGA_<inst>_<id> of the folder name (a patient's dates are one patient)"

    def scan(self, root: Path, require_masks: bool = True) -> DatasetSpec:
        root = Path(root)
        if not root.is_dir():
            raise MedsegError("not a folder", root)
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders and any(root.glob("*.tif")):
            folders = [root]  # a single patient folder
        cases: list[CaseSpec] = []
        for folder in folders:
            images: dict[int, Path] = {}
            masks: dict[int, Path] = {}
            for f in folder.iterdir():
                m = _SLICE.match(f.name)
                if not m:
                    continue
                found = masks if m["mask"] else images
                n = int(m["n"])
                if n in found:  # _9 and _09: keeping either would silently drop the other
                    raise MedsegError(f"two files for slice {n} ({found[n].name} and {f.name}); keep one", folder)
                found[n] = f
            if not images and not masks:
                continue
            for n in sorted(set(masks) - set(images)):
                raise MedsegError("mask without an image", masks[n])
            if require_masks:
                for n in sorted(set(images) - set(masks)):
                    raise MedsegError("image without a mask (expected " + images[n].stem + "_mask.tif)", images[n])
            order = sorted(images)  # numeric order: 1, 2, ..., 10
            cases.append(
                CaseSpec(
                    id=folder.name,
                    patient=_patient_id(folder.name),
                    sources={
                        "folder": str(folder),
                        "images": [str(images[n]) for n in order],
                        "masks": [str(masks[n]) for n in order] if require_masks else None,
                        "numbers": order,
                    },
                )
            )
        if not cases:
            raise MedsegError("no LGG slices (<case>_<n>.tif) found", root)
        return DatasetSpec(
            format=self.name,
            root=str(root),
            channels=["pre-contrast", "FLAIR", "post-contrast"],
            classes=["tumor"],
            class_kind="multiclass",
            spatial_dims=2,
            cases=cases,
            has_masks=require_masks,
        )

    def load(self, spec: DatasetSpec, case: CaseSpec) -> CaseData:
        # filled slice by slice into preallocated [z, c, h, w] arrays: one case in memory, no stack copies
        paths = case.sources["images"]
        image = None
        for z, p in enumerate(paths):
            a = read_tiff(Path(p))
            if a.ndim == 2:
                warn("greyscale slice in a 3-channel data set: its one channel is repeated 3 times", p)
                a = np.repeat(a[..., None], 3, axis=-1)
            if a.ndim != 3 or a.shape[-1] != 3:
                raise MedsegError(f"expected an HxWx3 slice, got shape {a.shape}", p)
            if image is None:
                image = np.empty((len(paths), 3, *a.shape[:2]), a.dtype)
            elif a.shape[:2] != image.shape[2:]:
                raise MedsegError(f"slice size {a.shape[:2]} differs from the case's {image.shape[2:]}", p)
            elif a.dtype != image.dtype:  # a silent cast would rescale nothing and wrap or clip values
                raise MedsegError(f"slice is {a.dtype} but the case's other slices are {image.dtype}", p)
            image[z] = a.transpose(2, 0, 1)
        mask = None
        if case.sources.get("masks"):
            mask = np.empty((len(paths), 1, *image.shape[2:]), np.uint8)
            for z, p in enumerate(case.sources["masks"]):
                m = read_tiff(Path(p))
                if m.ndim == 3:
                    m = m[..., 0]
                if m.shape != image.shape[2:]:
                    raise MedsegError(f"mask size {m.shape} differs from its image's {image.shape[2:]}", p)
                mask[z, 0] = binary_mask(m, p)
        return CaseData(
            image=image,
            mask=mask,
            spacing=(1.0, 1.0, 1.0),
            slices=[str(n) for n in case.sources["numbers"]],
        )

    @classmethod
    def sniff(cls, path: Path) -> int:
        """Slices named ``<case>_<n>.tif`` in the folder, or in its patient folders."""
        path = Path(path)
        if not path.is_dir():
            return 0
        top = sorted(path.iterdir())[:2000]
        if any(p.is_file() and _SLICE.match(p.name) for p in top):
            return 2
        for d in [p for p in top if p.is_dir()][:20]:
            if any(_SLICE.match(p.name) for p in d.iterdir() if p.is_file()):
                return 2
        return 0

    def read_prediction(self, root, spec, case, shape):
        numbers = case.sources["numbers"]
        if len(numbers) != shape[0]:
            raise MedsegError(f"case {case.id}: {len(numbers)} slices in the layout, {shape[0]} in the truth", root)
        out = np.zeros(shape, np.uint8)
        for z, n in enumerate(numbers):
            p = expect_prediction(Path(root) / case.id / f"{case.id}_{n}_mask.tif", case.id, f" slice {n}")
            m = read_tiff(p)
            if m.ndim == 3:
                m = m[..., 0]
            check_2d(m, shape, p)
            out[z, 0] = binary_mask(m, p)
        return out

    def write_prediction(self, spec, case, mask, out_dir, probabilities=None):
        import tifffile

        folder = Path(out_dir) / case.id
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for z, n in enumerate(case.sources["numbers"]):
            path = folder / f"{case.id}_{n}_mask.tif"
            tifffile.imwrite(path, (mask[z, 0] > 0).astype(np.uint8) * 255)
            written.append(path)
            if probabilities is not None:
                p = folder / f"{case.id}_{n}_{self.map_name}.tif"
                tifffile.imwrite(p, probabilities[z].astype(np.float16 if probabilities.dtype != np.uint8 else np.uint8))
                written.append(p)
        return written


def _patient_id(folder: str) -> str:
    # TCGA_CS_4941_19960909 -> TCGA_CS_4941 (a patient may have several dates)
    parts = folder.split("_")
    return "_".join(parts[:3]) if len(parts) >= 4 and parts[0] == "TCGA" else folder
