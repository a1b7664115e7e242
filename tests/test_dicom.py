"""DICOM reader on a synthetic oblique series written from a real hippocampus volume."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import FIXTURES
from medseg.data.formats import get_reader
from medseg.errors import MedsegError

DICOM = FIXTURES / "dicom"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    dst = tmp_path / "dicom"
    shutil.copytree(DICOM, dst)
    return dst


def _load(root: Path = DICOM, **opts):
    r = get_reader("dicom", masks="masks", **opts)
    spec = r.scan(root)
    return r, spec, r.load(spec, spec.cases[0])


def test_scan_ids_and_order():
    r, spec, _ = _load()
    assert [c.id for c in spec.cases] == ["hippo_t1"]  # SeriesDescription "hippo t1", sanitised
    assert spec.cases[0].patient == "HIPPO003"
    assert spec.classes == ["label_1", "label_2"] and spec.class_kind == "multiclass" and spec.spatial_dims == 3
    files = spec.cases[0].sources["files"]
    assert len(files) == 35
    # files were written in reverse slice order: sorting by position along the normal reverses them
    assert [Path(f).name for f in files] == [f"IM{i:04d}.dcm" for i in range(35, 0, -1)]


def test_voxels_equal_source_nifti():
    _, _, d = _load()
    src = nib.load(DICOM / "source.nii.gz")
    assert d.image.dtype == np.float32  # slope 0.5 / intercept -10 -> float
    np.testing.assert_array_equal(d.image[:, 0], np.asarray(src.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(d.affine, src.affine, atol=1e-5)
    assert d.spacing == pytest.approx((2.5, 1.1, 0.9))
    lab = np.asarray(nib.load(DICOM / "masks" / "hippo_t1.nii.gz").dataobj)
    for j, v in enumerate((1, 2)):
        np.testing.assert_array_equal(d.mask[:, j], (lab == v).transpose(2, 1, 0))


def test_affine_matches_simpleitk():
    import SimpleITK as sitk

    _, spec, d = _load()
    rd = sitk.ImageSeriesReader()
    rd.SetFileNames(spec.cases[0].sources["files"])
    im = rd.Execute()
    direction = np.array(im.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(im.GetSpacing())
    lps[:3, 3] = im.GetOrigin()
    np.testing.assert_allclose(d.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-4)
    # SimpleITK's array is (z, y, x) too
    np.testing.assert_allclose(d.image[:, 0], sitk.GetArrayFromImage(im), atol=1e-4)


def test_write_prediction_in_series_geometry(tmp_path: Path):
    r, spec, d = _load()
    files = r.write_prediction(spec, spec.cases[0], d.mask, tmp_path)
    back = nib.load(files[0])
    src = nib.load(DICOM / "source.nii.gz")
    assert files[0].name == "hippo_t1.nii.gz"
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    assert back.shape == src.shape and back.get_data_dtype() == np.uint8
    assert back.header.get_zooms() == pytest.approx((0.9, 1.1, 2.5), abs=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(nib.load(DICOM / "masks" / "hippo_t1.nii.gz").dataobj))


def test_reoriented_mask_is_brought_back(copy: Path):
    p = copy / "masks" / "hippo_t1.nii.gz"
    m = nib.load(p)
    flipped = m.as_reoriented(np.array([[1, -1], [0, 1], [2, 1]]))  # flip i: same world, other voxel order
    nib.save(flipped, p)
    _, _, d = _load(copy)
    lab = np.asarray(nib.load(DICOM / "masks" / "hippo_t1.nii.gz").dataobj)
    np.testing.assert_array_equal(d.mask[:, 0], (lab == 1).transpose(2, 1, 0))


def test_integral_rescale_gives_int16(copy: Path):
    for f in sorted((copy / "series").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.save_as(f)
    _, _, d = _load(copy)
    src = np.asarray(nib.load(DICOM / "source.nii.gz").dataobj)
    assert d.image.dtype == np.int16
    stored = (src + 10) / 0.5
    np.testing.assert_array_equal(d.image[:, 0], (stored - 1024).astype(np.int16).transpose(2, 1, 0))


def test_non_dicom_file_is_skipped(copy: Path):
    (copy / "series" / "notes.txt").write_text("not dicom")
    _, spec, _ = _load(copy)
    assert len(spec.cases[0].sources["files"]) == 35


def test_only_non_dicom_is_an_error(tmp_path: Path):
    (tmp_path / "x.dcm").write_text("not dicom")
    with pytest.raises(MedsegError, match="not a DICOM image file") as e:
        get_reader("dicom").scan(tmp_path, require_masks=False)
    assert e.value.path == str(tmp_path / "x.dcm")


def test_inconsistent_slice_size(copy: Path):
    f = copy / "series" / "IM0007.dcm"
    ds = pydicom.dcmread(f)
    ds.Rows, ds.Columns = 4, 4
    ds.PixelData = np.zeros((4, 4), np.int16).tobytes()
    ds.save_as(f)
    with pytest.raises(MedsegError, match=r"series 'hippo t1' has slices of different sizes"):
        get_reader("dicom").scan(copy / "series", require_masks=False)


def test_missing_position(copy: Path):
    f = copy / "series" / "IM0003.dcm"
    ds = pydicom.dcmread(f)
    del ds.ImagePositionPatient
    ds.save_as(f)
    with pytest.raises(MedsegError, match="series 'hippo t1': slice has no ImagePositionPatient") as e:
        get_reader("dicom").scan(copy / "series", require_masks=False)
    assert e.value.path == str(f)


def test_missing_mask(copy: Path):
    (copy / "masks" / "hippo_t1.nii.gz").unlink()
    with pytest.raises(MedsegError, match="series 'hippo_t1' has no mask"):
        get_reader("dicom", masks="masks").scan(copy)


def test_mask_size_differs(copy: Path):
    p = copy / "masks" / "hippo_t1.nii.gz"
    m = nib.load(p)
    nib.save(nib.Nifti1Image(np.asarray(m.dataobj)[:, :, :-1], m.affine), p)
    r = get_reader("dicom", masks="masks")
    spec = r.scan(copy)
    with pytest.raises(MedsegError, match=r"mask shape \(34, 52, 34\) differs from the series' \(34, 52, 35\)") as e:
        r.load(spec, spec.cases[0])
    assert e.value.path == str(p)


def test_missing_folder(tmp_path: Path):
    with pytest.raises(MedsegError, match="not a folder or a DICOM file"):
        get_reader("dicom").scan(tmp_path / "nope")


def test_images_only_series():
    r = get_reader("dicom")
    spec = r.scan(DICOM / "series", require_masks=False)
    assert not spec.has_masks and spec.classes == [] and [c.id for c in spec.cases] == ["hippo_t1"]
    d = r.load(spec, spec.cases[0])
    assert d.mask is None
    np.testing.assert_array_equal(d.image[:, 0], np.asarray(nib.load(DICOM / "source.nii.gz").dataobj).transpose(2, 1, 0))


def _slice_masks(folder: Path, names: list[str], binary: bool = False) -> np.ndarray:
    """Write the fixture's label map as one PNG per slice (sorted position order); return it as (z, y, x)."""
    from PIL import Image

    lab = np.asarray(nib.load(DICOM / "masks" / "hippo_t1.nii.gz").dataobj).transpose(2, 1, 0)  # (z, row, col)
    folder.mkdir(parents=True)
    for z, name in enumerate(names):
        Image.fromarray(((lab[z] == 1) * 255 if binary else lab[z]).astype(np.uint8)).save(folder / name)
    return lab


@pytest.mark.parametrize("naming", ["dicom_stems", "numbered"])
def test_masks_as_image_folders(tmp_path: Path, naming: str):
    # sorted by position the files run IM0035 .. IM0001 (written in reverse): slice z is IM{35 - z}
    names = [f"IM{35 - z:04d}.png" for z in range(35)] if naming == "dicom_stems" else [f"{z}.png" for z in range(35)]
    lab = _slice_masks(tmp_path / "m" / "hippo_t1", names)
    r = get_reader("dicom", masks=str(tmp_path / "m"), classes="ant,post")
    spec = r.scan(DICOM / "series")
    assert spec.classes == ["ant", "post"] and spec.meta["label_values"] == [1, 2]
    d = r.load(spec, spec.cases[0])
    assert d.mask.shape == (35, 2, 52, 34)
    for j, v in enumerate((1, 2)):
        np.testing.assert_array_equal(d.mask[:, j], lab == v)


def test_binary_mask_images(tmp_path: Path):
    lab = _slice_masks(tmp_path / "m" / "hippo_t1", [f"s{z:02d}.png" for z in range(35)], binary=True)
    r = get_reader("dicom", masks=str(tmp_path / "m"))
    spec = r.scan(DICOM / "series")
    assert spec.classes == ["label_1"]  # 0/255 -> one class
    np.testing.assert_array_equal(r.load(spec, spec.cases[0]).mask[:, 0], lab == 1)


def test_mask_image_folder_errors(tmp_path: Path):
    from PIL import Image

    folder = tmp_path / "m" / "hippo_t1"
    _slice_masks(folder, [f"{z}.png" for z in range(35)])
    (folder / "34.png").unlink()
    with pytest.raises(MedsegError, match="mask folder has 34 images but the series has 35 slices") as e:
        get_reader("dicom", masks=str(tmp_path / "m")).scan(DICOM / "series")
    assert e.value.path == str(folder)
    Image.fromarray(np.zeros((52, 30), np.uint8)).save(folder / "34.png")
    r = get_reader("dicom", masks=str(tmp_path / "m"))
    spec = r.scan(DICOM / "series")
    with pytest.raises(MedsegError, match=r"mask size \(52, 30\) differs from the DICOM slice's \(52, 34\)") as e:
        r.load(spec, spec.cases[0])
    assert e.value.path == str(folder / "34.png")
