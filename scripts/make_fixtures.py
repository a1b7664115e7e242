"""Write ``tests/fixtures/`` reproducibly from the real data in ../shared/data.

    .venv/bin/python scripts/make_fixtures.py [--shared PATH]

Everything is derived deterministically (fixed patient/image choices, fixed DICOM UIDs), so running
it twice gives the same pixels. Total size is kept well under 20 MB.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures"

# Small and large tumours, several institutions; each has tumour-free slices too.
LGG_PATIENTS = [
    "TCGA_HT_7860_19960513",  # small tumour
    "TCGA_CS_5395_19981004",  # small tumour
    "TCGA_HT_8105_19980826",  # large tumour
    "TCGA_DU_5855_19951217",  # large tumour
    "TCGA_CS_5393_19990606",  # large tumour
    "TCGA_HT_7694_19950404",  # large tumour, few empty slices
]
LGG_TINY = {"TCGA_CS_5393_19990606": [3, 4, 9, 10], "TCGA_CS_5395_19981004": [2, 9, 12, 13]}  # empty + tumour slices, numbers crossing 9 -> 10
LGG_BUDGET = 15_000_000

COCO_IMAGES = 6
COCO_SIZE = 128
NIFTI_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
DICOM_SOURCE = "hippocampus_003"
DICOM_SLOPE, DICOM_INTERCEPT = 0.5, -10.0
DICOM_SERIES_DESCRIPTION = "hippo t1"  # the reader sanitises this to hippo_t1

LGG_ATTRIBUTION = """# LGG fixture

Real slices of {n} patients from the Kaggle "Brain MRI segmentation" dataset (kaggle_3m), every slice of
each patient, TIFFs as found in ../shared/data (lossless zlib compression, same pixels as the originals).
`lgg_tiny/` holds 2 of these patients x 4 slices for fast unit tests.

Patients: {patients}

Source: Buda, Saha, Mazurowski, "Association of genomic subtypes of lower-grade gliomas with shape
features automatically extracted by a deep learning algorithm", Computers in Biology and Medicine 2019;
images from The Cancer Imaging Archive (TCGA-LGG).
"""


def make_lgg(shared: Path) -> None:
    src = shared / "lgg" / "kaggle_3m"
    dst = OUT / "lgg" / "kaggle_3m"
    shutil.rmtree(OUT / "lgg", ignore_errors=True)
    dst.mkdir(parents=True)
    total, used = 0, []
    for p in LGG_PATIENTS:
        files = sorted((src / p).glob("*.tif"))
        size = sum(f.stat().st_size for f in files)
        if total + size > LGG_BUDGET:
            print(f"lgg: skipping {p}, budget of {LGG_BUDGET} bytes reached")
            continue
        (dst / p).mkdir()
        for f in files:
            _copy_tiff(f, dst / p / f.name)
        total += size
        used.append(p)
    (OUT / "lgg" / "README.md").write_text(LGG_ATTRIBUTION.format(n=len(used), patients=", ".join(used)))

    tiny = OUT / "lgg_tiny" / "kaggle_3m"
    shutil.rmtree(OUT / "lgg_tiny", ignore_errors=True)
    for p, numbers in LGG_TINY.items():
        (tiny / p).mkdir(parents=True)
        for n in numbers:
            for suffix in ("", "_mask"):
                name = f"{p}_{n}{suffix}.tif"
                _copy_tiff(src / p / name, tiny / p / name)
    shutil.copyfile(OUT / "lgg" / "README.md", OUT / "lgg_tiny" / "README.md")


def _copy_tiff(src: Path, dst: Path) -> None:
    """Re-write with zlib compression (the shared copies already are; Kaggle originals are not)."""
    import tifffile

    tifffile.imwrite(dst, tifffile.imread(src), compression="zlib")


def make_coco(shared: Path) -> None:
    from PIL import Image
    from pycocotools import mask as mask_utils

    src = shared / "brain-tumor-coco" / "train"
    doc = json.loads((src / "_annotations.coco.json").read_text())
    dst = OUT / "coco"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    by_image: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images = sorted(doc["images"], key=lambda im: im["id"])[:COCO_IMAGES]
    # what each image's annotations become: the dataset only has polygons, so RLE and bbox-only
    # annotations are derived from them to cover every annotation type the reader accepts
    kinds = ["polygon", "rle", "bbox", "rle_uncompressed", "polygon", "none"]
    out_images, out_anns = [], []
    for kind, im in zip(kinds, images):
        pil = Image.open(src / im["file_name"]).convert("RGB")
        s = COCO_SIZE / im["width"], COCO_SIZE / im["height"]
        pil.resize((COCO_SIZE, COCO_SIZE), Image.BILINEAR).save(dst / im["file_name"], quality=90)
        out_images.append({**im, "width": COCO_SIZE, "height": COCO_SIZE})
        if kind == "none":
            continue
        for a in by_image.get(im["id"], []):
            x, y, w, h = a["bbox"]
            bbox = [round(x * s[0], 2), round(y * s[1], 2), round(w * s[0], 2), round(h * s[1], 2)]
            polys = [[round(v * s[i % 2], 2) for i, v in enumerate(poly)] for poly in a["segmentation"]]
            ann = {**a, "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0}
            if kind == "polygon":
                ann["segmentation"] = polys
            elif kind == "bbox":
                ann.pop("segmentation")
            else:
                rles = mask_utils.frPyObjects(polys, COCO_SIZE, COCO_SIZE)
                m = mask_utils.decode(mask_utils.merge(rles))
                ann["iscrowd"] = 1
                if kind == "rle":
                    rle = mask_utils.encode(np.asfortranarray(m))
                    ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
                else:
                    ann["segmentation"] = {"size": [COCO_SIZE, COCO_SIZE], "counts": _uncompressed_rle(m)}
            out_anns.append(ann)
    out = {**doc, "images": out_images, "annotations": out_anns}
    (dst / "_annotations.coco.json").write_text(json.dumps(out, indent=1))
    (dst / "README.md").write_text(
        "# COCO fixture\n\n6 images of the Kaggle \"Brain Tumor Image DataSet: Semantic Segmentation\" (Roboflow "
        "COCO export, CC BY 4.0), downsized to 128x128. Annotations rescaled; one is turned into compressed RLE, "
        "one into uncompressed RLE, one into a bbox-only annotation; the last image has none.\n"
    )


def _uncompressed_rle(m: np.ndarray) -> list[int]:
    """COCO uncompressed RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = np.asarray(m, np.uint8).flatten(order="F")
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    return [int(c) for c in counts]


def make_nifti(shared: Path) -> None:
    src = shared / "hippocampus"
    dst = OUT / "nifti"
    shutil.rmtree(dst, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
        for c in NIFTI_CASES:
            shutil.copyfile(src / sub / f"{c}.nii.gz", dst / sub / f"{c}.nii.gz")
    (dst / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Hippocampus",
                "description": "Left and right hippocampus segmentation (3 cases of MSD Task04)",
                "licence": "CC-BY-SA 4.0",
                "reference": "Simpson et al., Medical Segmentation Decathlon, 2019",
                "modality": {"0": "MRI"},
                "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
                "numTraining": len(NIFTI_CASES),
                "training": [
                    {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in NIFTI_CASES
                ],
            },
            indent=1,
        )
    )


def dicom_geometry() -> np.ndarray:
    """A RAS affine with anisotropic spacing, an in-plane rotation and an offset, so that the DICOM
    reader's sorting, spacing and LPS->RAS conversion are all exercised."""
    t = np.deg2rad(15.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.9, 1.1, 2.5])
    aff[:3, 3] = [-20.0, 35.5, -12.25]
    return aff


def make_dicom(shared: Path) -> None:
    import nibabel as nib
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    src = shared / "hippocampus"
    dst = OUT / "dicom"
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "series").mkdir(parents=True)
    (dst / "masks").mkdir()
    vol = np.asarray(nib.load(src / "imagesTr" / f"{DICOM_SOURCE}.nii.gz").dataobj)  # (i, j, k)
    lab = np.asarray(nib.load(src / "labelsTr" / f"{DICOM_SOURCE}.nii.gz").dataobj).astype(np.uint8)
    stored = np.round(vol).astype(np.int16)
    values = (stored.astype(np.float32) * DICOM_SLOPE + DICOM_INTERCEPT).astype(np.float32)
    aff = dicom_geometry()
    nib.save(nib.Nifti1Image(values, aff), dst / "source.nii.gz")
    case_id = "hippo_t1"
    nib.save(nib.Nifti1Image(lab, aff), dst / "masks" / f"{case_id}.nii.gz")

    lps = np.diag([-1.0, -1.0, 1.0]) @ aff[:3, :3]
    zooms = np.linalg.norm(aff[:3, :3], axis=0)
    row_cos, col_cos = lps[:, 0] / zooms[0], lps[:, 1] / zooms[1]
    origin_lps = np.diag([-1.0, -1.0, 1.0]) @ aff[:3, 3]
    nx, ny, nz = vol.shape
    study, series, frame = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
    # files named in an order that is not the slice order, so sorting by position is required
    order = list(range(nz))[::-1]
    for file_index, k in enumerate(order):
        sop = f"1.2.826.0.1.3680043.8.498.10.{k + 1}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.99"
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "MR"
        ds.PatientID = "HIPPO003"
        ds.PatientName = "Anonymous"
        ds.SeriesDescription = DICOM_SERIES_DESCRIPTION
        ds.SeriesNumber = 1
        ds.InstanceNumber = file_index + 1
        pos = origin_lps + k * (lps[:, 2])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cos, *col_cos)]
        # PixelSpacing = [between rows (j), between columns (i)]
        ds.PixelSpacing = [f"{zooms[1]:.6f}", f"{zooms[0]:.6f}"]
        ds.SliceThickness = f"{zooms[2]:.6f}"
        ds.RescaleSlope = f"{DICOM_SLOPE}"
        ds.RescaleIntercept = f"{DICOM_INTERCEPT}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        # pixel [row r, column c] = voxel (i=c, j=r, k)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(dst / "series" / f"IM{file_index + 1:04d}.dcm", enforce_file_format=True)
    (dst / "README.md").write_text(
        "# DICOM fixture\n\nA synthetic MR series written with pydicom from MSD Task04 Hippocampus "
        f"{DICOM_SOURCE} (Simpson et al. 2019, CC BY-SA 4.0): int16 stored values, RescaleSlope "
        f"{DICOM_SLOPE}, RescaleIntercept {DICOM_INTERCEPT}, oblique in-plane geometry. `source.nii.gz` holds "
        "the rescaled voxels in the same geometry (for checking); `masks/hippo_t1.nii.gz` its labels.\n"
    )


def make_dicom_lgg(shared: Path) -> None:
    """8 slices of a bundled LGG patient (tests/fixtures/lgg, in the repo) as an axial MR series: its FLAIR channel
    as uint16 slices (0.9375 mm pixels, 3 mm slices, written top slice first), the tumour masks as 0/255
    PNGs named after the DICOM files: real anatomy for the RTSTRUCT and SEG round trips."""
    import tifffile
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    patient = OUT / "lgg" / "kaggle_3m" / "TCGA_CS_5393_19990606"
    dst = OUT / "dicom_lgg"
    shutil.rmtree(dst, ignore_errors=True)
    case_id = "lgg_flair"
    (dst / "series").mkdir(parents=True)
    (dst / "masks" / case_id).mkdir(parents=True)
    masks = [tifffile.imread(patient / f"{patient.name}_{i}_mask.tif") for i in range(1, len(list(patient.glob("*_mask.tif"))) + 1)]
    tumour = [i for i, m in enumerate(masks) if m.any()]
    first = max(0, tumour[0] - 1)
    slices = list(range(first, min(len(masks), first + 8)))  # 8 contiguous slices from just above the tumour
    n = len(slices)
    base = "1.2.826.0.1.3680043.8.498.20"
    for k, i in enumerate(slices):
        img = tifffile.imread(patient / f"{patient.name}_{i + 1}.tif")[..., 1].astype(np.uint16)  # FLAIR
        mask = masks[i]
        name = f"IM{n - k:04d}"  # files in reverse slice order: the reader sorts by position
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = f"{base}.10.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.99"
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = f"{base}.1", f"{base}.2", f"{base}.3"
        ds.Modality, ds.PatientID, ds.PatientName = "MR", "TCGA_CS_5393", "TCGA^CS5393"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "19990606", "120000", "1"
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "lgg flair", 1, k + 1
        ds.ImagePositionPatient = ["-120.0", "-120.0", f"{3.0 * k:.1f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing, ds.SliceThickness = ["0.9375", "0.9375"], "3.0"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = img.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(img).tobytes()
        ds.save_as(dst / "series" / f"{name}.dcm", enforce_file_format=True)
        Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(dst / "masks" / case_id / f"{name}.png")
    (dst / "README.md").write_text(
        "# DICOM LGG fixture\n\n8 contiguous slices, from just above the tumour, of the bundled LGG patient TCGA_CS_5393_19990606 (tests/fixtures/lgg; Buda et al. "
        "2019, TCGA-LGG) as an axial MR series written with pydicom by scripts/make_fixtures.py: the FLAIR channel "
        "as uint16, 0.9375 mm pixels, 3 mm slices (assumed: the source stores no geometry). "
        "`masks/lgg_flair/` holds the tumour masks as 0/255 PNGs named after the DICOM files.\n"
    )


def make_uwmgi(shared: Path) -> None:
    try:
        from medseg.data.formats.uwmgi_synthetic import write_uwmgi_from_derived
    except ImportError as e:
        print(f"warning: skipping the uwmgi fixture: medseg.data.synthetic.write_uwmgi_from_derived is not available ({e})")
        return
    dst = OUT / "uwmgi"
    shutil.rmtree(dst, ignore_errors=True)
    write_uwmgi_from_derived(shared / "uwmgi-derived-sample", dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--only", nargs="*", choices=["lgg", "coco", "nifti", "dicom", "dicom_lgg", "uwmgi"])
    args = ap.parse_args()
    if not args.shared.is_dir():
        sys.exit(f"error: {args.shared}: shared data folder not found")
    makers = {"lgg": make_lgg, "coco": make_coco, "nifti": make_nifti, "dicom": make_dicom, "dicom_lgg": make_dicom_lgg, "uwmgi": make_uwmgi}
    for name in args.only or makers:
        makers[name](args.shared)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in sorted(OUT.iterdir()) if p.is_dir()}
    for name, size in sizes.items():
        print(f"{name:10s} {size / 1e6:7.2f} MB")
    print(f"{'total':10s} {sum(sizes.values()) / 1e6:7.2f} MB")


if __name__ == "__main__":
    main()
