"""Bad inputs across every stage, driven through the command line as a user types them.

Each case builds one broken input (from the tiny fixtures, or written here), runs ``medseg ...`` in this
process and asserts: exit code 2, exactly one ``error:`` line on stderr naming the offending file (or
option) and the problem, no traceback, and that no output was written or an existing one was left
intact. Inputs that medseg handles in a stated way (a warning) are tested at the end of the file.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import FIXTURES, ROOT

LGG_TINY = FIXTURES / "lgg_tiny" / "kaggle_3m"
PATIENT = "TCGA_CS_5393_19990606"
CONFIG = ROOT / "configs" / "lgg_unet.yaml"


# ----------------------------------------------------------------------------------------- helpers
@dataclass
class Case:
    """A command line, the file its error must name, a piece of the message, and what must not change."""

    args: list
    names: str | Path  # the offending file (or option) the error line must name
    says: str  # a piece of the problem's wording
    absent: list[Path] = field(default_factory=list)  # must not exist afterwards
    intact: list[Path] = field(default_factory=list)  # files and folders that must be unchanged


def snapshot(paths: list[Path]) -> dict[str, tuple[int, bytes]]:
    out = {}
    for p in paths:
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.exists() else []):
            out[str(f)] = (f.stat().st_size, f.read_bytes()[:4096])
        out[f"exists:{p}"] = (int(p.exists()), b"")
    return out


def run_cli(monkeypatch, capsys, args: list, out: list | None = None) -> tuple[int, str]:
    """Exit code and stderr of ``medseg ARGS`` run in this process (stdout appended to ``out``)."""
    from medseg.cli import main

    monkeypatch.setattr(sys, "argv", ["medseg", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    captured = capsys.readouterr()
    if out is not None:
        out.append(captured.out)
    return e.value.code, captured.err


def assert_one_line_error(code: int, err: str, names: str | Path, says: str) -> None:
    errors = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert str(names) in errors[0], f"{names} not named in: {errors[0]}"
    assert says in errors[0], f"{says!r} not in: {errors[0]}"


def copy_lgg(tmp: Path) -> Path:
    dst = tmp / "kaggle_3m"
    shutil.copytree(LGG_TINY, dst)
    return dst


def save_png(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def folder_set(tmp: Path, masks: dict[str, np.ndarray] | None = None, images: dict[str, np.ndarray] | None = None) -> Path:
    root = tmp / "folder"
    rng = np.random.default_rng(0)
    masks = masks if masks is not None else {"a": np.pad(np.full((4, 4), 255, np.uint8), 6)}
    for stem, m in masks.items():
        img = (images or {}).get(stem, (rng.random(m.shape[:2]) * 200).astype(np.uint8))
        save_png(root / "images" / f"{stem}.png", img)
        save_png(root / "masks" / f"{stem}.png", m)
    return root


def nifti_set(tmp: Path) -> Path:
    dst = tmp / "nifti"
    shutil.copytree(FIXTURES / "nifti", dst)
    return dst


def rewrite_nifti(path: Path, fn: Callable) -> None:
    import nibabel as nib

    img = nib.load(str(path))
    data, affine = fn(np.asarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine, img.header), str(path))


def dicom_set(tmp: Path) -> Path:
    dst = tmp / "dicom"
    shutil.copytree(FIXTURES / "dicom", dst)
    return dst


def coco_set(tmp: Path, edit: Callable[[dict], None]) -> Path:
    dst = tmp / "coco"
    shutil.copytree(FIXTURES / "coco", dst)
    doc = json.loads((dst / "_annotations.coco.json").read_text())
    edit(doc)
    (dst / "_annotations.coco.json").write_text(json.dumps(doc))
    return dst


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from medseg.data.prepare import prepare

    return prepare("lgg", LGG_TINY, tmp_path_factory.mktemp("prep") / "lgg", folds=2, workers=1)


def copy_prepared(prepared: Path, tmp: Path) -> Path:
    dst = tmp / "lgg"
    shutil.copytree(prepared, dst)
    return dst


def config_for(tmp: Path, data: Path, text: str | None = None) -> Path:
    cfg = tmp / "exp.yaml"
    cfg.write_text(text if text is not None else
                   f"data:\n  prepared: {data}\n  mode: 2d\n  size: [64, 64]\n  batch_size: 2\nmodel:\n  name: unet\n"
                   "  kwargs: {features: [4, 8]}\ntrain:\n  epochs: 1\n  steps_per_epoch: 1\n")
    return cfg


class Crafted:
    """A pickle that would create a file when unpickled: loading it must run nothing."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_file(path: Path, marker: Path) -> Path:
    Crafted.marker = str(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    torch.save({"epoch": 1, "state_dict": {}, "payload": Crafted()}, path)
    return path


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder no one may write into: chmod for a normal user, a read-only mount for root."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make a read-only folder as root here: {r.stderr.decode().strip()}")
    yield d
    subprocess.run(["umount", str(d)], check=False)


# ------------------------------------------------------------------------------------------ prepare
def _lgg_mask_values_0_1_7(tmp):
    root = copy_lgg(tmp)
    m = root / PATIENT / f"{PATIENT}_9_mask.tif"
    a = tifffile.imread(m) // 255
    a[0, :3] = 7
    tifffile.imwrite(m, a.astype(np.uint8))
    return Case(["prepare", "lgg", root, tmp / "out"], m, "found values {0, 1, 7}", absent=[tmp / "out"])


def _lgg_uint16_slice_among_uint8(tmp):
    root = copy_lgg(tmp)
    f = root / PATIENT / f"{PATIENT}_9.tif"
    tifffile.imwrite(f, tifffile.imread(f).astype(np.uint16) * 200)
    return Case(["prepare", "lgg", root, tmp / "out"], f, "slice is uint16 but the case's other slices are uint8",
                absent=[tmp / "out"])


def _lgg_mask_without_image(tmp):
    root = copy_lgg(tmp)
    (root / PATIENT / f"{PATIENT}_9.tif").unlink()
    return Case(["prepare", "lgg", root, tmp / "out"], root / PATIENT / f"{PATIENT}_9_mask.tif", "mask without an image",
                absent=[tmp / "out"])


def _lgg_image_without_mask(tmp):
    root = copy_lgg(tmp)
    (root / PATIENT / f"{PATIENT}_9_mask.tif").unlink()
    return Case(["prepare", "lgg", root, tmp / "out"], root / PATIENT / f"{PATIENT}_9.tif", "image without a mask",
                absent=[tmp / "out"])


def _lgg_truncated_tiff(tmp):
    root = copy_lgg(tmp)
    f = root / PATIENT / f"{PATIENT}_4.tif"
    f.write_bytes(f.read_bytes()[:300])
    return Case(["prepare", "lgg", root, tmp / "out"], f, "cannot read TIFF", absent=[tmp / "out"])


def _lgg_mask_size_differs(tmp):
    root = copy_lgg(tmp)
    m = root / PATIENT / f"{PATIENT}_4_mask.tif"
    tifffile.imwrite(m, np.zeros((128, 128), np.uint8))
    return Case(["prepare", "lgg", root, tmp / "out"], m, "mask size (128, 128) differs", absent=[tmp / "out"])


def _lgg_slice_size_differs(tmp):
    root = copy_lgg(tmp)
    f = root / PATIENT / f"{PATIENT}_9.tif"
    tifffile.imwrite(f, np.zeros((128, 128, 3), np.uint8))
    return Case(["prepare", "lgg", root, tmp / "out"], f, "slice size (128, 128) differs", absent=[tmp / "out"])


def _lgg_non_utf8_folder_name(tmp):
    root = copy_lgg(tmp)
    bad = os.fsencode(str(root)) + b"/TCGA_CS_9\xff99_19990606"
    os.rename(os.fsencode(str(root / PATIENT)), bad)
    return Case(["prepare", "lgg", root, tmp / "out"], "TCGA_CS_9", "is not valid UTF-8", absent=[tmp / "out"])


def _lgg_spacing_for_slices(tmp):
    root = copy_lgg(tmp)
    return Case(["prepare", "lgg", root, tmp / "out", "--spacing", "1,1,1"], root,
                "--spacing 1,1,1: this layout stores independent 2D slices; only volumes are resampled",
                absent=[tmp / "out"])


def _lgg_group_regex_misses_a_patient(tmp):
    root = copy_lgg(tmp)
    return Case(["prepare", "lgg", root, tmp / "out", "--split", "group", "--group-regex", r"^TCGA_(\d+)_"], root,
                "finds no group in patient id 'TCGA_CS_5393'", absent=[tmp / "out"])


def _lgg_empty_folder(tmp):
    (tmp / "empty").mkdir()
    return Case(["prepare", "lgg", tmp / "empty", tmp / "out"], tmp / "empty", "no LGG slices", absent=[tmp / "out"])


def _folder_binary_mask_with_grey_values(tmp):
    m = np.zeros((16, 16), np.uint8)
    m[2:5, 2:5], m[6:9, 6:9], m[10:13, 10:13] = 3, 128, 255
    root = folder_set(tmp, {"a": m})
    return Case(["prepare", "folder", root, tmp / "out"], root / "masks" / "a.png", "found values {0, 3, 128, 255}",
                absent=[tmp / "out"])


def _folder_label_beyond_classes(tmp):
    m = np.zeros((16, 16), np.uint8)
    m[2:5, 2:5], m[8:12, 8:12] = 1, 3
    root = folder_set(tmp, {"a": m})
    return Case(["prepare", "folder", root, tmp / "out", "-o", "classes=liver,kidney"], root / "masks" / "a.png",
                "label values [3] in a mask but only labels 0..2 are declared", absent=[tmp / "out"])


def _folder_palette_with_undeclared_colour(tmp):
    m = np.zeros((16, 16, 3), np.uint8)
    m[2:6, 2:6] = (255, 0, 0)
    m[8:14, 8:14] = (0, 0, 255)  # a whole blue region: a label the palette does not have
    root = folder_set(tmp, {"a": m})
    return Case(["prepare", "folder", root, tmp / "out", "-o", "palette=stomach=255,0,0;bowel=0,255,0"],
                root / "masks" / "a.png", "a label the palette does not declare", absent=[tmp / "out"])


def _folder_uint16_slice_in_a_case(tmp):
    root = folder_set(tmp, {"p1_1": np.zeros((16, 16), np.uint8), "p1_2": np.zeros((16, 16), np.uint8)},
                      images={"p1_2": np.full((16, 16), 3000, np.uint16)})
    return Case(["prepare", "folder", root, tmp / "out", "-o", "case_regex=^(p\\d+)_", "-o", "classes=x"],
                root / "images" / "p1_2.png", "image is uint16 but the case's first slice is uint8", absent=[tmp / "out"])


def _folder_mask_without_image(tmp):
    root = folder_set(tmp)
    save_png(root / "masks" / "b.png", np.zeros((16, 16), np.uint8))
    return Case(["prepare", "folder", root, tmp / "out"], root / "masks" / "b.png", "mask without an image",
                absent=[tmp / "out"])


def _folder_image_without_mask(tmp):
    root = folder_set(tmp)
    save_png(root / "images" / "b.png", np.zeros((16, 16), np.uint8))
    return Case(["prepare", "folder", root, tmp / "out"], root / "images" / "b.png", "image without a mask",
                absent=[tmp / "out"])


def _folder_corrupt_png(tmp):
    root = folder_set(tmp)
    (root / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return Case(["prepare", "folder", root, tmp / "out"], root / "images" / "a.png", "cannot read image",
                absent=[tmp / "out"])


def _folder_mask_size_differs(tmp):
    root = folder_set(tmp)
    save_png(root / "masks" / "a.png", np.zeros((8, 8), np.uint8))
    return Case(["prepare", "folder", root, tmp / "out", "-o", "mask_mode=binary"], root / "masks" / "a.png",
                "mask size (8, 8) differs", absent=[tmp / "out"])


def _folder_patient_regex_without_group(tmp):
    root = folder_set(tmp)
    return Case(["prepare", "folder", root, tmp / "out", "-o", "patient_regex=^a"], "patient_regex", "needs a (group)",
                absent=[tmp / "out"])


def _folder_patient_regex_no_match(tmp):
    root = folder_set(tmp)
    return Case(["prepare", "folder", root, tmp / "out", "-o", "patient_regex=^(p\\d+)"], root / "images" / "a.png",
                "does not match patient_regex", absent=[tmp / "out"])


def _folder_bad_palette_option(tmp):
    root = folder_set(tmp)
    return Case(["prepare", "folder", root, tmp / "out", "-o", "palette=stomach=255,0"], "stomach=255,0",
                "expected name=R,G,B", absent=[tmp / "out"])


def _folder_colour_mask_without_palette(tmp):
    m = np.zeros((16, 16, 3), np.uint8)
    m[2:6, 2:6] = (255, 0, 0)
    root = folder_set(tmp, {"a": m})
    return Case(["prepare", "folder", root, tmp / "out"], root / "masks" / "a.png", "colour mask", absent=[tmp / "out"])


def _folder_unknown_option(tmp):
    root = folder_set(tmp)
    return Case(["prepare", "folder", root, tmp / "out", "-o", "mask_treshold=3"], "mask_treshold",
                "bad option for format 'folder'", absent=[tmp / "out"])


def _nifti_spacing_not_three_numbers(tmp):
    root = nifti_set(tmp)
    return Case(["prepare", "nifti", root, tmp / "out", "--spacing", "1,x,1"], root,
                "--spacing '1,x,1': expected 'auto', 'native' or three positive numbers Z,Y,X in mm",
                absent=[tmp / "out"])


def _nifti_label_shifted_50mm(tmp):
    root = nifti_set(tmp)
    lab = root / "labelsTr" / "hippocampus_003.nii.gz"

    def shift(data, aff):
        aff[0, 3] += 50.0
        return data, aff

    rewrite_nifti(lab, shift)
    return Case(["prepare", "nifti", root, tmp / "out"], lab, "affine differs from its image's (origin 50 mm apart",
                absent=[tmp / "out"])


def _nifti_4d_image_among_3d(tmp):
    root = nifti_set(tmp)
    img = root / "imagesTr" / "hippocampus_004.nii.gz"
    rewrite_nifti(img, lambda d, a: (np.stack([d, d], axis=-1), a))
    return Case(["prepare", "nifti", root, tmp / "out"], img, "has 2 channels, the data set 1", absent=[tmp / "out"])


def _nifti_classes_option_against_dataset_json(tmp):
    root = nifti_set(tmp)
    return Case(["prepare", "nifti", root, tmp / "out", "-o", "classes=left,right"], root / "dataset.json",
                "disagrees with the classes dataset.json names", absent=[tmp / "out"])


def _nifti_label_shape_differs(tmp):
    root = nifti_set(tmp)
    lab = root / "labelsTr" / "hippocampus_001.nii.gz"
    rewrite_nifti(lab, lambda d, a: (d[:-2], a))
    return Case(["prepare", "nifti", root, tmp / "out"], lab, "label shape", absent=[tmp / "out"])


def _nifti_truncated_gzip(tmp):
    root = nifti_set(tmp)
    img = root / "imagesTr" / "hippocampus_003.nii.gz"
    img.write_bytes(img.read_bytes()[:2000])
    return Case(["prepare", "nifti", root, tmp / "out"], img, "cannot read NIfTI", absent=[tmp / "out"])


def _nifti_unknown_label_value(tmp):
    root = nifti_set(tmp)
    lab = root / "labelsTr" / "hippocampus_004.nii.gz"

    def add(d, a):
        d = np.asarray(d).copy()
        d[0, 0, 0] = 5
        return d, a

    rewrite_nifti(lab, add)
    return Case(["prepare", "nifti", root, tmp / "out"], lab, "label values [5] are not among the known labels",
                absent=[tmp / "out"])


def _nifti_label_without_image(tmp):
    root = nifti_set(tmp)
    (root / "imagesTr" / "hippocampus_004.nii.gz").unlink()
    return Case(["prepare", "nifti", root, tmp / "out"], root / "labelsTr" / "hippocampus_004.nii.gz",
                "label without an image", absent=[tmp / "out"])


def _nifti_image_without_label(tmp):
    root = nifti_set(tmp)
    (root / "labelsTr" / "hippocampus_004.nii.gz").unlink()
    return Case(["prepare", "nifti", root, tmp / "out"], root / "imagesTr" / "hippocampus_004.nii.gz",
                "image without a label", absent=[tmp / "out"])


def _nifti_non_integer_labels(tmp):
    root = nifti_set(tmp)
    lab = root / "labelsTr" / "hippocampus_001.nii.gz"
    rewrite_nifti(lab, lambda d, a: (np.asarray(d, np.float32) * 0.5, a))
    return Case(["prepare", "nifti", root, tmp / "out"], lab, "non-integer values", absent=[tmp / "out"])


def _nifti_dataset_json_broken(tmp):
    root = nifti_set(tmp)
    (root / "dataset.json").write_text("{not json")
    return Case(["prepare", "nifti", root, tmp / "out"], root / "dataset.json", "not valid JSON", absent=[tmp / "out"])


def _dicom_missing_slice(tmp):
    root = dicom_set(tmp)
    (root / "series" / "IM0005.dcm").unlink()
    return Case(["prepare", "dicom", root / "series", tmp / "out", "-o", f"masks={root / 'masks'}"], root / "series",
                "is missing 1 slice", absent=[tmp / "out"])


def _dicom_missing_slice_images_only(tmp):
    root = dicom_set(tmp)
    (root / "series" / "IM0003.dcm").unlink()
    return Case(["prepare", "dicom", root / "series", tmp / "out", "--images-only"], root / "series",
                "between IM0004.dcm and IM0002.dcm", absent=[tmp / "out"])


def _dicom_uneven_steps(tmp):
    import pydicom

    root = dicom_set(tmp)
    f = root / "series" / "IM0005.dcm"
    ds = pydicom.dcmread(f)
    pos = [float(v) for v in ds.ImagePositionPatient]
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ds.ImagePositionPatient = [p + 0.4 * float(s) * n for p, n, s in zip(pos, normal, [ds.get("SpacingBetweenSlices", 1)] * 3)]
    ds.save_as(f)
    return Case(["prepare", "dicom", root / "series", tmp / "out", "--images-only"], root / "series",
                "uneven slice steps", absent=[tmp / "out"])


def _dicom_duplicate_position(tmp):
    root = dicom_set(tmp)
    import pydicom

    a = pydicom.dcmread(root / "series" / "IM0004.dcm")
    b = pydicom.dcmread(root / "series" / "IM0005.dcm")
    b.ImagePositionPatient = a.ImagePositionPatient
    b.save_as(root / "series" / "IM0005.dcm")
    return Case(["prepare", "dicom", root / "series", tmp / "out", "--images-only"], "IM000",
                "two slices at the same position", absent=[tmp / "out"])


def _dicom_without_masks_option(tmp):
    root = dicom_set(tmp)
    return Case(["prepare", "dicom", root / "series", tmp / "out"], root / "series", "needs option masks=",
                absent=[tmp / "out"])


def _dicom_mask_shape_differs(tmp):
    root = dicom_set(tmp)
    lab = root / "masks" / "hippo_t1.nii.gz"
    rewrite_nifti(lab, lambda d, a: (np.asarray(d)[:, :, :-1], a))
    return Case(["prepare", "dicom", root / "series", tmp / "out", "-o", f"masks={root / 'masks'}"], lab,
                "differs", absent=[tmp / "out"])


def _coco_file_name_escapes(tmp):
    def edit(doc):
        doc["images"][0]["file_name"] = "../../secret.jpg"

    root = coco_set(tmp, edit)
    return Case(["prepare", "coco", root, tmp / "out"], root / "_annotations.coco.json",
                "file_name '../../secret.jpg' leaves the image folder", absent=[tmp / "out"])


def _coco_absolute_file_name(tmp):
    def edit(doc):
        doc["images"][1]["file_name"] = "/etc/hostname"

    root = coco_set(tmp, edit)
    return Case(["prepare", "coco", root, tmp / "out"], root / "_annotations.coco.json",
                "file_name '/etc/hostname' leaves the image folder", absent=[tmp / "out"])


def _coco_annotation_of_unknown_image(tmp):
    def edit(doc):
        doc["annotations"][0]["image_id"] = 999999

    root = coco_set(tmp, edit)
    return Case(["prepare", "coco", root, tmp / "out"], root / "_annotations.coco.json",
                "points at image id 999999", absent=[tmp / "out"])


def _coco_image_file_missing(tmp):
    root = coco_set(tmp, lambda doc: None)
    doc = json.loads((root / "_annotations.coco.json").read_text())
    missing = root / doc["images"][0]["file_name"]
    missing.unlink()
    return Case(["prepare", "coco", root, tmp / "out"], missing, "is missing", absent=[tmp / "out"])


def _coco_malformed_json(tmp):
    root = coco_set(tmp, lambda doc: None)
    (root / "_annotations.coco.json").write_text('{"images": [')
    return Case(["prepare", "coco", root, tmp / "out"], root / "_annotations.coco.json", "malformed COCO JSON",
                absent=[tmp / "out"])


def _coco_two_point_polygon(tmp):
    def edit(doc):
        a = next(a for a in doc["annotations"] if a.get("segmentation"))
        a["segmentation"] = [[1, 1, 5, 5]]

    root = coco_set(tmp, edit)
    return Case(["prepare", "coco", root, tmp / "out"], root / "_annotations.coco.json", "a polygon with 2 points",
                absent=[tmp / "out"])


def _uwmgi_rle_beyond_the_image(tmp):
    root = tmp / "uw"
    shutil.copytree(FIXTURES / "uwmgi", root)
    rows = (root / "train.csv").read_text().splitlines()
    i = next(n for n, r in enumerate(rows) if r.endswith(",") and n > 0)
    rows[i] += "99999999 5"
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return Case(["prepare", "uwmgi", root, tmp / "out"], root / "train.csv", "99999999", absent=[tmp / "out"])


def _uwmgi_bad_id(tmp):
    root = tmp / "uw"
    shutil.copytree(FIXTURES / "uwmgi", root)
    rows = (root / "train.csv").read_text().splitlines()
    rows.append("case1_slice_0001,stomach,")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return Case(["prepare", "uwmgi", root, tmp / "out"], root / "train.csv", "case1_slice_0001", absent=[tmp / "out"])


def _uwmgi_8bit_slice_among_16bit(tmp):
    root = tmp / "uw"
    shutil.copytree(FIXTURES / "uwmgi", root)
    f = sorted(root.rglob("*.png"))[1]
    a = np.asarray(Image.open(f))
    Image.fromarray((a // 256).astype(np.uint8)).save(f)
    return Case(["prepare", "uwmgi", root, tmp / "out"], f, "slice is stored as uint8 but the case-day's first slice as",
                absent=[tmp / "out"])


def _prepare_option_without_equals(tmp):
    return Case(["prepare", "lgg", LGG_TINY, tmp / "out", "-o", "classes"], "--option", "must be key=value",
                absent=[tmp / "out"])


def _prepare_unknown_format(tmp):
    return Case(["prepare", "lggg", LGG_TINY, tmp / "out"], "unknown format 'lggg'", "did you mean 'lgg'",
                absent=[tmp / "out"])


def _prepare_output_exists(tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "dataset.json").write_text('{"mine": 1}')
    return Case(["prepare", "lgg", LGG_TINY, out], out, "output already exists; pass --overwrite", intact=[out])


def _prepare_output_is_a_file(tmp):
    out = tmp / "out"
    out.write_text("my notes")
    return Case(["prepare", "lgg", LGG_TINY, out, "--overwrite"], out, "is a file", intact=[out])


def _prepare_overwrite_refuses_user_folder(tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    return Case(["prepare", "lgg", LGG_TINY, out, "--overwrite"], out, "is not a prepared dataset", intact=[out])


def _prepare_foreign_partial_folder(tmp):
    foreign = tmp / "out.partial"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not medseg's")
    return Case(["prepare", "lgg", LGG_TINY, tmp / "out"], foreign, "was not made by medseg prepare",
                intact=[foreign], absent=[tmp / "out"])


def _prepare_bad_split(tmp):
    return Case(["prepare", "lgg", LGG_TINY, tmp / "out", "--split", "random"], "--split", "must be 'auto', 'kfold' or 'group'",
                absent=[tmp / "out"])


def _prepare_missing_input(tmp):
    return Case(["prepare", "lgg", tmp / "nothing", tmp / "out"], tmp / "nothing", "input does not exist",
                absent=[tmp / "out"])


# ------------------------------------------------------------------------------------------ inspect
def _inspect_missing_array(tmp, prepared):
    ds = copy_prepared(prepared, tmp)
    f = next((ds / "cases").glob("*.img.npy"))
    f.unlink()
    return Case(["inspect", ds], f, "array file is missing", intact=[ds])


def _inspect_truncated_array(tmp, prepared):
    ds = copy_prepared(prepared, tmp)
    f = next((ds / "cases").glob("*.seg.npy"))
    f.write_bytes(f.read_bytes()[:-100])
    return Case(["inspect", ds], f, "array file is truncated", intact=[ds])


def _inspect_garbage_array(tmp, prepared):
    ds = copy_prepared(prepared, tmp)
    f = next((ds / "cases").glob("*.img.npy"))
    f.write_bytes(b"garbage" * 10)
    return Case(["inspect", ds], f, "not a readable .npy array", intact=[ds])


def _inspect_wrong_shape_array(tmp, prepared):
    ds = copy_prepared(prepared, tmp)
    f = next((ds / "cases").glob("*.img.npy"))
    np.save(f, np.zeros((1, 3, 8, 8), np.uint8))
    return Case(["inspect", ds], f, "differs from dataset.json's", intact=[ds])


def _inspect_broken_dataset_json(tmp, prepared):
    ds = copy_prepared(prepared, tmp)
    (ds / "dataset.json").write_text("{")
    return Case(["inspect", ds], ds / "dataset.json", "not valid JSON", intact=[ds])


def _inspect_not_prepared(tmp, prepared):
    return Case(["inspect", LGG_TINY], LGG_TINY, "not a prepared dataset")


def _inspect_old_format_version(tmp, prepared):
    ds = copy_prepared(prepared, tmp)
    info = json.loads((ds / "dataset.json").read_text())
    info["format_version"] = 0
    (ds / "dataset.json").write_text(json.dumps(info))
    return Case(["inspect", ds], ds / "dataset.json", "re-run prepare", intact=[ds])


# -------------------------------------------------------------------------------------------- train
def _train_yaml_syntax_error(tmp, prepared):
    cfg = config_for(tmp, prepared, "data:\n  prepared: x\n  mode: [2d\nmodel: {}\n")
    return Case(["train", cfg, "--out", tmp / "run"], f"{cfg}:4", "invalid YAML", absent=[tmp / "run"])


def _train_yaml_python_object_tag(tmp, prepared):
    marker = tmp / "pwned"
    cfg = config_for(tmp, prepared, f'data: !!python/object/apply:os.system ["touch {marker}"]\n')
    return Case(["train", cfg, "--out", tmp / "run"], f"{cfg}:1", "python/object/apply:os.system is not allowed",
                absent=[tmp / "run", marker])


def _train_set_typo(tmp, prepared):
    cfg = config_for(tmp, prepared)
    return Case(["train", cfg, "--set", "train.epohcs=3", "--out", tmp / "run"], "--set train.epohcs",
                "did you mean 'train.epochs'", absent=[tmp / "run"])


def _train_set_without_equals(tmp, prepared):
    cfg = config_for(tmp, prepared)
    return Case(["train", cfg, "--set", "train.epochs", "--out", tmp / "run"], "--set", "must be key=value",
                absent=[tmp / "run"])


def _train_config_missing(tmp, prepared):
    return Case(["train", tmp / "nope.yaml", "--out", tmp / "run"], tmp / "nope.yaml", "config file not found",
                absent=[tmp / "run"])


def _train_unknown_yaml_key(tmp, prepared):
    cfg = config_for(tmp, prepared)
    cfg.write_text(cfg.read_text() + "optimiser: {lr: 1}\n")
    return Case(["train", cfg, "--out", tmp / "run"], cfg, "unknown key 'optimiser'", absent=[tmp / "run"])


def _train_prepared_missing(tmp, prepared):
    cfg = config_for(tmp, tmp / "no_data")
    return Case(["train", cfg, "--out", tmp / "run"], cfg, "prepared dataset not found", absent=[tmp / "run"])


def _train_truncated_array(tmp, prepared):
    ds = copy_prepared(prepared, tmp)
    f = next((ds / "cases").glob("*.img.npy"))
    f.write_bytes(f.read_bytes()[:-500])
    cfg = config_for(tmp, ds)
    return Case(["train", cfg, "--out", tmp / "run"], f, "array file is truncated", absent=[tmp / "run"])


def _train_missing_array(tmp, prepared):
    ds = copy_prepared(prepared, tmp)
    f = next((ds / "cases").glob("*.seg.npy"))
    f.unlink()
    cfg = config_for(tmp, ds)
    return Case(["train", cfg, "--out", tmp / "run"], f, "array file is missing", absent=[tmp / "run"])


def _train_wrong_value_type(tmp, prepared):
    cfg = config_for(tmp, prepared)
    return Case(["train", cfg, "--set", "train.epochs=many", "--out", tmp / "run"], cfg, "train.epochs",
                absent=[tmp / "run"])


def _train_config_not_a_mapping(tmp, prepared):
    cfg = config_for(tmp, prepared, "- a\n- b\n")
    return Case(["train", cfg, "--out", tmp / "run"], cfg, "config must be a YAML mapping", absent=[tmp / "run"])


def _train_config_not_text(tmp, prepared):
    cfg = tmp / "exp.yaml"
    cfg.write_bytes(b"data:\n  prepared: \xff\xfe\n")
    return Case(["train", cfg, "--out", tmp / "run"], cfg, "not a text file", absent=[tmp / "run"])


def _train_bad_fold(tmp, prepared):
    cfg = config_for(tmp, prepared)
    return Case(["train", cfg, "--fold", "7", "--out", tmp / "run"], prepared, "fold 7 is out of range",
                absent=[tmp / "run" / "fold_7"])


def _resume_run(tmp: Path, prepared: Path) -> tuple[Path, Path]:
    """A run directory as training leaves it (config.yaml saved), with fold 0's last.ckpt to resume."""
    from medseg.config import dump_config, load_config

    cfg = config_for(tmp, prepared)
    run = tmp / "run"
    (run / "fold_0" / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_config(cfg)))
    return cfg, run


def _train_resume_truncated_checkpoint(tmp, prepared):
    cfg, run = _resume_run(tmp, prepared)
    import torch

    last = run / "fold_0" / "checkpoints" / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(1000)}}, last)
    last.write_bytes(last.read_bytes()[:700])
    return Case(["train", cfg, "--out", run, "--resume"], last, "damaged, truncated or not a medseg checkpoint",
                intact=[run])


def _train_resume_crafted_checkpoint(tmp, prepared):
    cfg, run = _resume_run(tmp, prepared)
    last = crafted_file(run / "fold_0" / "checkpoints" / "last.ckpt", tmp / "pwned")
    return Case(["train", cfg, "--out", run, "--resume"], last, "refused unloaded", intact=[run],
                absent=[tmp / "pwned"])


def _train_resume_without_run(tmp, prepared):
    cfg = config_for(tmp, prepared)
    return Case(["train", cfg, "--out", tmp / "run", "--resume"], tmp / "run", "no run here", absent=[tmp / "run"])


# ------------------------------------------------------------------------------------ plan and view
def _plan_not_a_prepared_dataset(tmp, prepared):
    return Case(["plan", LGG_TINY, "--out", tmp / "plan.yaml"], LGG_TINY, "not a prepared dataset",
                absent=[tmp / "plan.yaml"])


def _plan_output_exists(tmp, prepared):
    out = tmp / "plan.yaml"
    out.write_text("keep")
    return Case(["plan", prepared, "--out", out], out, "already exists", intact=[out])


def _view_truth_missing(tmp):
    return Case(["view", LGG_TINY, tmp / "nothing", "--no-open", "--out", tmp / "v.html"], tmp / "nothing",
                "no such file", absent=[tmp / "v.html"])


def _view_without_truth_or_images(tmp):
    return Case(["view", LGG_TINY, "--no-open", "--out", tmp / "v.html"], LGG_TINY, "give TRUTH, or --image",
                absent=[tmp / "v.html"])


def _predict_as_seg_for_tiff_input(tmp):
    return Case(["predict", "lgg-unet", LGG_TINY, tmp / "out", "--as", "seg"], "--as", "is for inputs with several output forms",
                absent=[tmp / "out"])


def _dicom_rtstruct_of_another_series(tmp):
    import pydicom

    from medseg.data.formats import get_reader
    from medseg.data.formats.dicom_rtstruct import write_rtstruct

    study = tmp / "study"
    shutil.copytree(FIXTURES / "dicom" / "series", study)
    r = get_reader("dicom", masks="masks")
    spec = r.scan(FIXTURES / "dicom")
    f = write_rtstruct(spec.cases[0].sources["files"], r.load(spec, spec.cases[0]).mask, spec.classes, study / "rt.dcm")
    ds = pydicom.dcmread(f)
    ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3"
    for i, c in enumerate(c for rc in ds.ROIContourSequence for c in rc.ContourSequence):
        c.ContourImageSequence[0].ReferencedSOPInstanceUID = f"1.2.3.{i}"  # drawn on that other series
    ds.save_as(f)
    return Case(["prepare", "dicom", study, tmp / "out", "--labels", "rtstruct"], f,
                "references series 1.2.3, which is not among the image series found", absent=[tmp / "out"])


def _dicom_series_without_its_seg(tmp):
    study = tmp / "study"
    shutil.copytree(FIXTURES / "dicom" / "series", study)
    (study / "labels.dcm").write_bytes(b"not a SEG")  # unreadable: skipped, so the series has none
    return Case(["prepare", "dicom", study, tmp / "out", "--labels", "seg"], "IM0", "has no SEG file referencing it",
                absent=[tmp / "out"])


# ------------------------------------------------------------------------------------------ predict
def _predict_input_missing(tmp):
    return Case(["predict", "lgg-unet", tmp / "nothing", tmp / "out"], tmp / "nothing", "no such file or folder",
                absent=[tmp / "out"])


def _predict_output_is_input(tmp):
    root = copy_lgg(tmp)
    return Case(["predict", "lgg-unet", root / PATIENT, root / PATIENT, "--overwrite"], root / PATIENT,
                "the output folder is the input folder", intact=[root])


def _predict_output_not_empty(tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    return Case(["predict", "lgg-unet", LGG_TINY, out], out, "output folder already holds files", intact=[out])


def _predict_output_is_file(tmp):
    out = tmp / "out"
    out.write_text("keep")
    return Case(["predict", "lgg-unet", LGG_TINY, out], out, "output exists and is not a folder", intact=[out])


def _predict_model_missing(tmp):
    return Case(["predict", tmp / "model.pt", LGG_TINY, tmp / "out"], tmp / "model.pt", "not found",
                absent=[tmp / "out"])


def _predict_damaged_model(tmp):
    m = tmp / "model.pt"
    m.write_bytes(b"PK\x03\x04 not a zip really")
    return Case(["predict", m, LGG_TINY, tmp / "out"], m, "cannot read model bundle", absent=[tmp / "out"])


def _predict_crafted_model(tmp):
    m = crafted_file(tmp / "model.pt", tmp / "pwned")
    return Case(["predict", m, LGG_TINY, tmp / "out"], m, "refused unloaded", absent=[tmp / "out", tmp / "pwned"])


def _predict_bad_tta_flips(tmp):
    return Case(["predict", "lgg-unet", LGG_TINY, tmp / "out", "--tta-flips", "-4"], "bad TTA flip '-4'",
                "expected axes -1", absent=[tmp / "out"])


def _predict_flips_and_no_tta(tmp):
    return Case(["predict", "lgg-unet", LGG_TINY, tmp / "out", "--tta-flips", "-1", "--no-tta"], "--tta-flips",
                "contradict", absent=[tmp / "out"])


def _predict_bad_threshold(tmp):
    return Case(["predict", "lgg-unet", LGG_TINY, tmp / "out", "--threshold", "high"], "--threshold 'high'",
                "expected a number", absent=[tmp / "out"])


def _predict_bad_weights(tmp):
    return Case(["predict", "lgg-unet,lgg-unet", LGG_TINY, tmp / "out", "--weights", "0.7,x"], "0.7,x", "weights",
                absent=[tmp / "out"])


def _predict_unknown_format(tmp):
    return Case(["predict", "lgg-unet", LGG_TINY, tmp / "out", "--format", "tiff"], "unknown format 'tiff'", "known:",
                absent=[tmp / "out"])


def _predict_unknown_device(tmp):
    return Case(["predict", "lgg-unet", LGG_TINY, tmp / "out", "--device", "gpu"], "unknown device 'gpu'",
                "use auto, cpu, cuda or cuda:N", absent=[tmp / "out"])


def _predict_bundle_with_an_unknown_input_mode(tmp):
    from medseg.bundle import load_bundle, save_bundle

    b = load_bundle(ROOT / "src" / "medseg" / "weights" / "lgg-unet.pt")
    b["input"] = {**b["input"], "mode": "4d"}
    m = save_bundle(b, tmp / "model.pt")
    return Case(["predict", m, LGG_TINY, tmp / "out"], m, "not a valid medseg pipeline description: input.mode",
                absent=[tmp / "out"])


def _predict_corrupt_slice_leaves_no_folder(tmp):
    root = copy_lgg(tmp)
    shutil.rmtree(root / "TCGA_CS_5395_19981004")
    f = root / PATIENT / f"{PATIENT}_10.tif"
    f.write_bytes(f.read_bytes()[:200])
    return Case(["predict", "lgg-unet", root, tmp / "out"], f, "cannot read TIFF", absent=[tmp / "out"])


def _predict_wrong_channel_count(tmp):
    root = tmp / "imgs"
    save_png(root / "a.png", np.zeros((32, 32, 3), np.uint8) + 5)
    save_png(root / "b.png", np.zeros((32, 32), np.uint8))
    return Case(["predict", "lgg-unet", root / "b.png", tmp / "out"], root / "b.png", "channels",
                absent=[tmp / "out"])


# ----------------------------------------------------------------------------------------- evaluate
def _pred_copy(tmp: Path) -> tuple[Path, Path]:
    """A predictions folder in the LGG layout (the truth's own masks) for the tiny LGG patients."""
    truth = copy_lgg(tmp)
    pred = tmp / "pred"
    for m in truth.rglob("*_mask.tif"):
        dst = pred / m.parent.name / m.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(m, dst)
    return pred, truth


def _evaluate_pred_missing(tmp):
    return Case(["evaluate", tmp / "nothing", LGG_TINY, "--out", tmp / "ev"], tmp / "nothing", "no such file",
                absent=[tmp / "ev"])


def _evaluate_truth_missing(tmp):
    pred, _ = _pred_copy(tmp)
    return Case(["evaluate", pred, tmp / "nothing", "--out", tmp / "ev"], tmp / "nothing", "no such file",
                absent=[tmp / "ev"])


def _evaluate_prediction_values_0_1_7(tmp):
    pred, truth = _pred_copy(tmp)
    m = pred / PATIENT / f"{PATIENT}_9_mask.tif"
    a = (tifffile.imread(m) > 0).astype(np.uint8)
    a[0, 0] = 7
    tifffile.imwrite(m, a)
    return Case(["evaluate", pred, truth, "--out", tmp / "ev"], m, "found values {0, 1, 7}", absent=[tmp / "ev"])


def _evaluate_prediction_missing_a_slice(tmp):
    pred, truth = _pred_copy(tmp)
    (pred / PATIENT / f"{PATIENT}_10_mask.tif").unlink()
    return Case(["evaluate", pred, truth, "--out", tmp / "ev"], pred / PATIENT, "no prediction for case",
                absent=[tmp / "ev"])


def _evaluate_prediction_size_differs(tmp):
    pred, truth = _pred_copy(tmp)
    m = pred / PATIENT / f"{PATIENT}_3_mask.tif"
    tifffile.imwrite(m, np.zeros((100, 100), np.uint8))
    return Case(["evaluate", pred, truth, "--out", tmp / "ev"], m, "prediction is 100x100", absent=[tmp / "ev"])


def _evaluate_extra_case(tmp):
    pred, truth = _pred_copy(tmp)
    ds = tmp / "p1"
    from medseg.data.prepare import prepare

    prepare("lgg", truth, ds, folds=2, workers=1)
    ds2 = tmp / "p2"
    shutil.rmtree(truth / PATIENT)
    prepare("lgg", truth, ds2, folds=2, workers=1)
    return Case(["evaluate", ds, ds2, "--out", tmp / "ev"], ds, "predicted cases are not in the ground truth",
                absent=[tmp / "ev"])


def _evaluate_bad_empty_convention(tmp):
    pred, truth = _pred_copy(tmp)
    return Case(["evaluate", pred, truth, "--out", tmp / "ev", "--empty", "nan"], "empty-mask convention 'nan'",
                "skip", absent=[tmp / "ev"])


def _evaluate_negative_tolerance(tmp):
    pred, truth = _pred_copy(tmp)
    return Case(["evaluate", pred, truth, "--out", tmp / "ev", "--nsd-tolerance", "-1"], "--nsd-tolerance",
                "finite distance >= 0", absent=[tmp / "ev"])


def _evaluate_bad_uw_score(tmp):
    pred, truth = _pred_copy(tmp)
    return Case(["evaluate", pred, truth, "--out", tmp / "ev", "--uw-score", "kaggle"], "unknown score variant 'kaggle'",
                "known: competition, mlebench", absent=[tmp / "ev"])


def _evaluate_out_is_a_file(tmp):
    pred, truth = _pred_copy(tmp)
    (tmp / "ev").write_text("keep")
    return Case(["evaluate", pred, truth, "--out", tmp / "ev"], tmp / "ev", "not a folder", intact=[tmp / "ev"])


def _evaluate_failure_keeps_earlier_results(tmp):
    pred, truth = _pred_copy(tmp)
    ev = tmp / "ev"
    ev.mkdir()
    (ev / "metrics.csv").write_text("an earlier evaluation\n")
    m = pred / PATIENT / f"{PATIENT}_4_mask.tif"
    m.write_bytes(b"II*\x00broken")
    return Case(["evaluate", pred, truth, "--out", ev], m, "cannot read TIFF", intact=[ev])


def _evaluate_run_without_predictions(tmp):
    run = tmp / "run"
    (run / "fold_0").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {prepared: nowhere}\n")
    return Case(["evaluate", run], run / "config.yaml", "not found", absent=[run / "evaluation"])


def _evaluate_submission_bad_rle(tmp):
    sub = tmp / "submission.csv"
    rows = (FIXTURES / "uwmgi" / "train.csv").read_text().splitlines()
    out = ["id,class,predicted"] + [r.rsplit(",", 1)[0] + "," for r in rows[1:]]
    out[1] = out[1] + "5 3 4 2"  # runs out of order
    sub.write_text("\n".join(out) + "\n")
    return Case(["evaluate", sub, FIXTURES / "uwmgi" / "train.csv", "--out", tmp / "ev"], sub, "id ",
                absent=[tmp / "ev"])


def _evaluate_label_folder_missing_prediction(tmp):
    truth, pred = tmp / "truth", tmp / "pred"
    for stem in ("a", "b"):
        save_png(truth / f"{stem}.png", np.pad(np.full((4, 4), 255, np.uint8), 6))
    save_png(pred / "a.png", np.zeros((16, 16), np.uint8))
    return Case(["evaluate", pred, truth, "--out", tmp / "ev"], pred, "no prediction for case b", absent=[tmp / "ev"])


def _evaluate_label_folder_size_differs(tmp):
    truth, pred = tmp / "truth", tmp / "pred"
    save_png(truth / "a.png", np.pad(np.full((4, 4), 255, np.uint8), 6))
    save_png(pred / "a.png", np.zeros((8, 8), np.uint8))
    return Case(["evaluate", pred, truth, "--out", tmp / "ev"], pred / "a.png", "prediction shape",
                absent=[tmp / "ev"])


# ------------------------------------------------------------------------------------------- export
def _export_existing_output(tmp):
    out = tmp / "model.onnx"
    out.write_bytes(b"an earlier export")
    return Case(["export", "lgg-unet", out], out, "already exists; pass --overwrite", intact=[out],
                absent=[tmp / "model.json"])


def _export_existing_sidecar(tmp):
    side = tmp / "model.json"
    side.write_text("{}")
    return Case(["export", "lgg-unet", tmp / "model.onnx"], side, "already exists", intact=[side],
                absent=[tmp / "model.onnx"])


def _export_not_onnx(tmp):
    return Case(["export", "lgg-unet", tmp / "model.pt"], tmp / "model.pt", "must be a .onnx file",
                absent=[tmp / "model.pt"])


def _export_model_missing(tmp):
    return Case(["export", tmp / "nope", tmp / "m.onnx"], tmp / "nope", "not", absent=[tmp / "m.onnx"])


def _export_bad_size(tmp):
    return Case(["export", "lgg-unet", tmp / "m.onnx", "--size", "big"], "--size 'big'", "expected H,W",
                absent=[tmp / "m.onnx"])


def _export_old_opset(tmp):
    return Case(["export", "lgg-unet", tmp / "m.onnx", "--opset", "9"], "opset 9", "too old", absent=[tmp / "m.onnx"])


def _export_crafted_checkpoint(tmp):
    ck = crafted_file(tmp / "run" / "fold_0" / "checkpoints" / "best.ckpt", tmp / "pwned")
    shutil.copy(ROOT / "src" / "medseg" / "weights" / "lgg-unet.pt", tmp / "run" / "fold_0" / "model.pt")
    return Case(["export", ck, tmp / "m.onnx"], ck, "refused unloaded", absent=[tmp / "m.onnx", tmp / "pwned"])


def _export_damaged_model(tmp):
    m = tmp / "model.pt"
    m.write_bytes(os.urandom(256))
    return Case(["export", m, tmp / "m.onnx"], m, "cannot read model bundle", absent=[tmp / "m.onnx"])


# --------------------------------------------------------------------------------------------- tune
def _tune_run_missing(tmp):
    return Case(["tune", tmp / "run"], tmp / "run", "run directory not found")


def _tune_bad_thresholds(tmp):
    return Case(["tune", tmp / "run", "--thresholds", "0.3,high"], "--thresholds", "comma-separated numbers")


def _tune_fold_without_model(tmp):
    (tmp / "run" / "fold_0").mkdir(parents=True)
    return Case(["tune", tmp / "run"], tmp / "run", "model.pt", absent=[tmp / "run" / "tune.json"])


def _tune_damaged_model(tmp):
    (tmp / "run" / "fold_0").mkdir(parents=True)
    (tmp / "run" / "fold_0" / "model.pt").write_bytes(b"\x80\x04garbage")
    return Case(["tune", tmp / "run"], tmp / "run" / "fold_0" / "model.pt", "cannot read model bundle",
                intact=[tmp / "run"])


def _tune_crafted_model(tmp):
    m = crafted_file(tmp / "run" / "fold_0" / "model.pt", tmp / "pwned")
    return Case(["tune", tmp / "run"], m, "refused unloaded", absent=[tmp / "pwned", tmp / "run" / "tune.json"])


def _tune_without_data(tmp):
    (tmp / "run" / "fold_0").mkdir(parents=True)
    shutil.copy(ROOT / "src" / "medseg" / "weights" / "lgg-unet.pt", tmp / "run" / "fold_0" / "model.pt")
    return Case(["tune", tmp / "run"], tmp / "run", "no config.yaml in the run", intact=[tmp / "run"])


PLAIN = [f for n, f in sorted(globals().items()) if n.startswith("_") and callable(f) and n.split("_")[1] in
         ("lgg", "folder", "nifti", "dicom", "coco", "uwmgi", "prepare", "predict", "evaluate", "export", "tune", "view")]
WITH_PREPARED = [f for n, f in sorted(globals().items()) if n.startswith(("_inspect_", "_train_", "_plan_"))]


def _check(case: Case, tmp: Path, monkeypatch, capsys) -> str:
    """Run the case; one error line naming its file and problem, nothing written, nothing existing changed,
    no staging or temporary file left behind. Returns stderr."""
    before = snapshot(case.intact)
    code, err = run_cli(monkeypatch, capsys, case.args)
    assert_one_line_error(code, err, case.names, case.says)
    for p in case.absent:
        assert not p.exists(), f"{p} was written"
    assert snapshot(case.intact) == before, "an existing output was changed"
    leftovers = [p for p in tmp.rglob("*") if (".partial" in p.name or ".tmp-" in p.name) and p not in case.intact]
    assert not leftovers, f"left behind: {leftovers}"
    return err


@pytest.mark.parametrize("make", PLAIN, ids=lambda f: f.__name__[1:])
def test_bad_input(make, tmp_path, monkeypatch, capsys):
    _check(make(tmp_path), tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("make", WITH_PREPARED, ids=lambda f: f.__name__[1:])
def test_bad_prepared_or_training_input(make, prepared, tmp_path, monkeypatch, capsys):
    _check(make(tmp_path, prepared), tmp_path, monkeypatch, capsys)


def test_the_matrix_has_at_least_100_cases():
    assert len(PLAIN) + len(WITH_PREPARED) + len(READ_ONLY) >= 100


# ------------------------------------------------------------------------------ read-only outputs
READ_ONLY = ["prepare", "predict", "export", "evaluate", "train", "inspect-overlay"]


@pytest.mark.parametrize("stage", READ_ONLY)
def test_read_only_output_folder(stage, readonly_dir, prepared, tmp_path, monkeypatch, capsys):
    out = readonly_dir / "out"
    pred, truth = (_pred_copy(tmp_path) if stage == "evaluate" else (None, None))
    args = {
        "prepare": ["prepare", "lgg", LGG_TINY, out, "--workers", "1"],
        "predict": ["predict", "lgg-unet", LGG_TINY / PATIENT, out],
        "export": ["export", "lgg-unet", readonly_dir / "m.onnx"],
        "evaluate": ["evaluate", pred, truth, "--out", out, "--no-report"],
        "train": ["train", config_for(tmp_path, prepared), "--out", out],
        "inspect-overlay": ["inspect", prepared, "--overlay", readonly_dir / "o.png"],
    }[stage]
    code, err = run_cli(monkeypatch, capsys, args)
    assert_one_line_error(code, err, readonly_dir, "Read-only file system" if os.geteuid() == 0 else "Permission denied")
    assert not any(readonly_dir.iterdir())


# --------------------------------------------------------------- handled inputs: warnings, honest output
def test_lgg_masks_stored_0_1_keep_their_labels_through_prepare_predict_evaluate(tmp_path, monkeypatch, capsys):
    """The 0/1 variant of a bundled patient: prepare keeps every tumour voxel, and evaluate reads truth and
    prediction with the same rule (a prediction equal to the truth scores Dice 1)."""
    from medseg.data.prepared import PreparedDataset

    src = FIXTURES / "lgg" / "kaggle_3m" / "TCGA_HT_7860_19960513"
    root = tmp_path / "kaggle_3m" / src.name
    shutil.copytree(src, root)
    n_fg = 0
    for m in root.glob("*_mask.tif"):
        a = tifffile.imread(m)
        n_fg += int((a > 0).sum())
        tifffile.imwrite(m, (a > 0).astype(np.uint8))  # the 0/1 copies of the data set
    assert n_fg > 0
    code, err = run_cli(monkeypatch, capsys, ["prepare", "lgg", root.parent, tmp_path / "prep", "--workers", "1"])
    assert code == 0, err
    ds = PreparedDataset.open(tmp_path / "prep")
    assert int(np.asarray(ds.mask(0)).sum()) == n_fg
    pred = tmp_path / "pred" / src.name
    shutil.copytree(root, pred, ignore=shutil.ignore_patterns("*[0-9].tif"))
    code, err = run_cli(monkeypatch, capsys, ["evaluate", tmp_path / "pred", root.parent, "--out", tmp_path / "ev",
                                              "--no-report"])
    assert code == 0, err
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["per_class"]["tumor"]["dice"]["mean"] == 1.0
    assert s["conventions"]["distance_unit"] == "px"  # TIFF slices carry no spacing


def test_shipped_model_predicts_the_0_1_patient_like_the_0_255_one(tmp_path, monkeypatch, capsys):
    """prepare -> predict (no training) -> evaluate on the 0/1 variant gives the same score as on the original."""
    src = FIXTURES / "lgg_tiny" / "kaggle_3m"
    v01 = tmp_path / "v01"
    shutil.copytree(src, v01)
    for m in v01.rglob("*_mask.tif"):
        tifffile.imwrite(m, (tifffile.imread(m) > 0).astype(np.uint8))
    code, err = run_cli(monkeypatch, capsys, ["predict", "lgg-unet", src, tmp_path / "pred", "--no-tta"])
    assert code == 0, err
    scores = []
    for truth in (src, v01):
        out = tmp_path / f"ev_{truth.name}"
        code, err = run_cli(monkeypatch, capsys, ["evaluate", tmp_path / "pred", truth, "--out", out, "--no-report"])
        assert code == 0, err
        scores.append(json.loads((out / "summary.json").read_text())["per_class"]["tumor"]["dice"]["mean"])
    assert scores[0] == scores[1] and scores[0] > 0.3


def test_greyscale_slice_among_rgb_is_a_warning_naming_it(tmp_path, monkeypatch, capsys):
    root = copy_lgg(tmp_path)
    f = root / PATIENT / f"{PATIENT}_9.tif"
    tifffile.imwrite(f, tifffile.imread(f)[..., 1])
    code, err = run_cli(monkeypatch, capsys, ["prepare", "lgg", root, tmp_path / "out", "--workers", "2"])
    assert code == 0, err
    assert f"warning: {f}: greyscale slice in a 3-channel data set" in err


def test_rgba_image_with_transparency_is_a_warning(tmp_path, monkeypatch, capsys):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:4, :4, 3] = 0
    root = folder_set(tmp_path, images={"a": rgba})
    code, err = run_cli(monkeypatch, capsys, ["prepare", "folder", root, tmp_path / "out", "--workers", "1"])
    assert code == 0, err
    assert f"warning: {root / 'images' / 'a.png'}: RGBA image with transparent pixels" in err


def test_names_that_suggest_shared_patients_are_warned(tmp_path, monkeypatch, capsys):
    masks = {f"p{i}_t{t}": np.pad(np.full((4, 4), 255, np.uint8), 6) for i in range(3) for t in range(2)}
    root = folder_set(tmp_path, masks)
    code, err = run_cli(monkeypatch, capsys, ["prepare", "folder", root, tmp_path / "out", "--workers", "1",
                                              "--folds", "2"])
    assert code == 0, err
    assert "3 groups of case names share a prefix" in err and "patient_regex" in err
    code, err = run_cli(monkeypatch, capsys, ["prepare", "folder", root, tmp_path / "out2", "--workers", "1",
                                              "--folds", "3", "-o", r"patient_regex=^(p\d+)_"])
    assert code == 0 and "share a prefix" not in err
    splits = json.loads((tmp_path / "out2" / "splits.json").read_text())
    for f in splits["folds"]:  # both time points of a patient on the same side of every fold
        assert {c.split("_")[0] for c in f["train"]}.isdisjoint({c.split("_")[0] for c in f["val"]})


def test_fewer_patients_than_folds_is_said(tmp_path, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, ["prepare", "lgg", LGG_TINY, tmp_path / "out", "--workers", "1"])
    assert code == 0
    assert "warning: 5 folds asked for but the data set has 2 patients: made 2 folds" in err


def test_formats_lists_each_readers_patient_rule(monkeypatch, capsys):
    import io

    from rich.console import Console

    import medseg.cli
    from medseg.data.formats import FORMATS

    buf = io.StringIO()
    monkeypatch.setattr(medseg.cli, "console", Console(file=buf, width=400))
    code, _ = run_cli(monkeypatch, capsys, ["formats"])
    assert code == 0
    text = buf.getvalue()
    assert "patients (folds never split one)" in text
    for name in FORMATS.names():
        assert FORMATS.get(name).patients in text, name
    assert "the PatientID tag" in text and "caseN of caseN_dayM" in text


def test_killed_prepare_is_resumed_and_its_workers_die_with_it(tmp_path):
    """A prepare killed mid-run leaves OUT.partial; the next run reuses the finished cases and completes."""
    import signal
    import time

    out = tmp_path / "out"
    medseg = [sys.executable, "-c", "from medseg.cli import main; main()"]
    # every process (workers too) reads the second patient slowly, so the kill lands after the first is written
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import time\n"
        "import medseg.data.formats.lgg as lgg\n"
        "orig = lgg.LGGReader.load\n"
        "def load(self, spec, case):\n"
        "    if case.id.endswith('5395_19981004'):\n"
        "        time.sleep(120)\n"
        "    return orig(self, spec, case)\n"
        "lgg.LGGReader.load = load\n")
    env = {**os.environ, "PYTHONPATH": str(patch)}
    p = subprocess.Popen([*medseg, "prepare", "lgg", str(LGG_TINY), str(out), "--workers", "2"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    partial = tmp_path / "out.partial"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not list((partial / "cases").glob("*.done.json")):
        time.sleep(0.2)
    assert p.poll() is None, p.stderr.read().decode()
    assert list((partial / "cases").glob("*.done.json")), "the first case was never written"

    def descendants(pid: int) -> list[int]:
        kids = [int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
        return kids + [d for k in kids for d in descendants(k)]

    family = descendants(p.pid)
    assert family, "prepare --workers 2 started no worker processes"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()

    def running(pid: int) -> bool:
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    deadline = time.time() + 20  # the forkserver ends when its parent does, and the workers end with it
    while any(running(c) for c in family) and time.time() < deadline:
        time.sleep(0.2)
    assert not [c for c in family if running(c)], "processes of the killed prepare are still running"
    assert partial.is_dir() and not out.exists()
    r = subprocess.run([*medseg, "prepare", "lgg", str(LGG_TINY), str(out), "--workers", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming an interrupted prepare: 1 of 2 cases already written" in r.stderr
    assert not partial.exists() and (out / "dataset.json").is_file()
    from medseg.data.prepare import prepare

    fresh = prepare("lgg", LGG_TINY, tmp_path / "fresh", workers=1)
    for f in sorted((fresh / "cases").iterdir()):
        np.testing.assert_array_equal(np.load(f), np.load(out / "cases" / f.name))
    a, b = (json.loads((d / "dataset.json").read_text()) for d in (out, fresh))
    a["fingerprint"].pop("prepare_seconds"), b["fingerprint"].pop("prepare_seconds")
    a.pop("name"), b.pop("name")
    assert a == b


def test_a_partial_folder_of_another_input_is_replaced(tmp_path):
    from medseg.data.prepare import prepare
    from medseg.data.prepared import PreparedWriter

    w = PreparedWriter(tmp_path / "out", key={"input": "somewhere else"})
    (w.tmp / "cases" / "junk.img.npy").write_bytes(b"x")
    w.tmp.joinpath(".medseg-partial.json").write_text(json.dumps({"pid": 999999, "host": "h", "key": {"x": 1}}))
    prepare("lgg", LGG_TINY, tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "cases" / "junk.img.npy").exists()
    assert not (tmp_path / "out.partial").exists()


def test_crafted_checkpoint_runs_nothing_through_every_loader(tmp_path):
    from medseg.errors import MedsegError
    from medseg.bundle import bundle_from_checkpoint, load_bundle
    from medseg.training.fit import _ckpt_epoch, check_checkpoint

    marker = tmp_path / "pwned"
    ck = crafted_file(tmp_path / "run" / "fold_0" / "checkpoints" / "last.ckpt", marker)
    shutil.copy(ROOT / "src" / "medseg" / "weights" / "lgg-unet.pt", tmp_path / "run" / "fold_0" / "model.pt")
    assert _ckpt_epoch(ck) is None
    for load in (check_checkpoint, bundle_from_checkpoint, load_bundle):
        with pytest.raises(MedsegError, match="refused unloaded"):
            load(ck)
    assert not marker.exists()
    with open(ck, "rb") as f:  # the file really is a code-running pickle
        assert b"system" in f.read()


def test_version_and_instant_model_list(monkeypatch, capsys):
    from importlib.metadata import version

    out: list[str] = []
    code, _ = run_cli(monkeypatch, capsys, ["--version"], out)
    assert code == 0 and out[0].strip() == f"medseg {version('medseg')}"
    from medseg.models.table import print_model_table
    from rich.console import Console

    rows = print_model_table(Console(file=open(os.devnull, "w")))
    assert {r["name"] for r in rows} >= {"unet", "attention_unet", "swin_unetr"}
    assert "forward_img_s" not in rows[0]  # listing builds and times nothing



def test_dicom_series_with_masks_as_truth(tmp_path, monkeypatch, capsys):
    """`evaluate PRED DICOM_DIR --format dicom -o masks=...`: a DICOM case as the ground truth."""
    root = dicom_set(tmp_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(root / "masks" / "hippo_t1.nii.gz", pred / "hippo_t1.nii.gz")
    code, err = run_cli(monkeypatch, capsys, ["evaluate", pred, root / "series", "--format", "dicom",
                                              "-o", f"masks={root / 'masks'}", "--out", tmp_path / "ev", "--no-report"])
    assert code == 0, err
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["dataset"]["mean_dice"] == 1.0 and s["conventions"]["distance_unit"] == "mm"


@pytest.mark.parametrize("fmt,root,opts", [
    ("lgg", LGG_TINY, {}),
    ("nifti", FIXTURES / "nifti", {}),
    ("dicom", FIXTURES / "dicom" / "series", {}),
    ("uwmgi", FIXTURES / "uwmgi", {}),
    ("coco", FIXTURES / "coco", {}),
])
def test_progress_counts_slices_without_reading_pixels(fmt, root, opts):
    """`predict`'s progress bar counts slices (a single patient is not 0/1 for minutes): each reader's
    cheap ``slice_count`` equals what ``load`` returns."""
    from medseg.data.formats import get_reader

    reader = get_reader(fmt, **opts)
    spec = reader.scan(root, require_masks=False)
    for case in spec.cases[:3]:
        assert reader.slice_count(spec, case) == reader.load(spec, case).image.shape[0], case.id
