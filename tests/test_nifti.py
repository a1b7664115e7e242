"""NIfTI reader on 3 real MSD hippocampus cases: layout, transposition, spacing, write-back, errors."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import FIXTURES
from medseg.data.formats import get_reader
from medseg.errors import MedsegError

NIFTI = FIXTURES / "nifti"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    dst = tmp_path / "msd"
    shutil.copytree(NIFTI, dst)
    return dst


def test_scan_msd_with_dataset_json():
    spec = get_reader("nifti").scan(NIFTI)
    assert [c.id for c in spec.cases] == ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
    assert [c.patient for c in spec.cases] == [c.id for c in spec.cases]
    assert spec.classes == ["Anterior", "Posterior"] and spec.class_kind == "multiclass"
    assert spec.channels == ["MRI"] and spec.spatial_dims == 3


def test_load_transposes_and_one_hot():
    r = get_reader("nifti")
    spec = r.scan(NIFTI)
    for case in spec.cases:
        img = nib.load(case.sources["image"])
        lab = np.asarray(nib.load(case.sources["label"]).dataobj)
        d = r.load(spec, case)
        x, y, z = img.shape
        assert d.image.shape == (z, 1, y, x)
        assert d.image.dtype == img.get_data_dtype()  # native dtype (uint8 for 001, float32 for 003)
        np.testing.assert_array_equal(d.image[:, 0], np.asarray(img.dataobj).transpose(2, 1, 0))
        assert d.mask.shape == (z, 2, y, x) and d.mask.dtype == np.uint8
        for j, v in enumerate((1, 2)):
            np.testing.assert_array_equal(d.mask[:, j], (lab == v).transpose(2, 1, 0))
        np.testing.assert_array_equal(d.affine, img.affine)
        assert d.meta["qform_code"] == 1 and d.meta["sform_code"] == 1
    assert r.load(spec, spec.cases[0]).image.dtype == np.uint8


def test_spacing_affine_and_write_back(copy: Path, tmp_path: Path):
    # give one case a non-trivial geometry: anisotropic zooms and a rotation
    aff = np.array([[0.0, -0.7, 0.0, 12.0], [0.5, 0.0, 0.0, -3.0], [0.0, 0.0, 2.0, 40.5], [0, 0, 0, 1]])
    for sub in ("imagesTr", "labelsTr"):
        p = copy / sub / "hippocampus_003.nii.gz"
        src = nib.load(p)
        out = nib.Nifti1Image(np.asarray(src.dataobj), aff, src.header)
        out.set_qform(aff, 1)
        out.set_sform(aff, 2)
        nib.save(out, p)
    r = get_reader("nifti")
    spec = r.scan(copy)
    case = spec.cases[1]
    d = r.load(spec, case)
    assert d.spacing == pytest.approx((2.0, 0.7, 0.5))  # zooms (0.5, 0.7, 2.0) reordered to (z, y, x)
    np.testing.assert_allclose(d.affine, aff)
    assert (d.meta["qform_code"], d.meta["sform_code"]) == (1, 2)
    files = r.write_prediction(spec, case, d.mask, tmp_path / "pred")
    assert [f.name for f in files] == ["hippocampus_003.nii.gz"]
    back = nib.load(files[0])
    ref = nib.load(case.sources["label"])
    np.testing.assert_allclose(back.affine, aff, atol=1e-6)
    assert back.shape == ref.shape
    assert back.header.get_zooms() == pytest.approx((0.5, 0.7, 2.0))
    assert back.get_data_dtype() == np.uint8
    assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == (1, 2)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(ref.dataobj).astype(np.uint8))


def test_no_dataset_json_classes_from_values(copy: Path):
    (copy / "dataset.json").unlink()
    spec = get_reader("nifti").scan(copy)
    assert spec.classes == ["label_1", "label_2"] and spec.channels == ["image"]
    assert get_reader("nifti", classes=["ant", "post"]).scan(copy).classes == ["ant", "post"]


def test_modality_suffix_and_4d(copy: Path):
    img_dir = copy / "imagesTr"
    for p in sorted(img_dir.glob("*.nii.gz")):
        stem = p.name[: -len(".nii.gz")]
        shutil.copyfile(p, img_dir / f"{stem}_0001.nii.gz")
        p.rename(img_dir / f"{stem}_0000.nii.gz")
    (copy / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T1b"}, "labels": {"background": 0, "a": 1, "p": 2}}))
    r = get_reader("nifti")
    spec = r.scan(copy)
    assert [c.id for c in spec.cases] == ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
    assert spec.channels == ["T1", "T1b"] and spec.classes == ["a", "p"]
    d = r.load(spec, spec.cases[0])
    assert d.image.shape[1] == 2
    np.testing.assert_array_equal(d.image[:, 0], d.image[:, 1])

    # a 4D file: the 4th axis becomes channels
    one = nib.load(NIFTI / "imagesTr" / "hippocampus_001.nii.gz")
    a = np.asarray(one.dataobj)
    four = np.stack([a, 255 - a], axis=-1)
    f = copy / "four.nii.gz"
    nib.save(nib.Nifti1Image(four, one.affine), f)
    spec4 = r.scan(f, require_masks=False)
    d4 = r.load(spec4, spec4.cases[0])
    assert spec4.channels == ["ch0", "ch1"]
    np.testing.assert_array_equal(d4.image[:, 1], (255 - a).transpose(2, 1, 0))


def test_folder_of_images_only(copy: Path):
    spec = get_reader("nifti").scan(copy / "imagesTr", require_masks=False)
    assert len(spec.cases) == 3 and spec.classes == [] and not spec.has_masks


def test_image_without_label(copy: Path):
    (copy / "labelsTr" / "hippocampus_003.nii.gz").unlink()
    with pytest.raises(MedsegError, match=r"image without a label \(expected labelsTr/hippocampus_003.nii.gz\)") as e:
        get_reader("nifti").scan(copy)
    assert e.value.path == str(copy / "imagesTr" / "hippocampus_003.nii.gz")


def test_label_without_image(copy: Path):
    (copy / "imagesTr" / "hippocampus_004.nii.gz").unlink()
    with pytest.raises(MedsegError, match="label without an image") as e:
        get_reader("nifti").scan(copy)
    assert e.value.path == str(copy / "labelsTr" / "hippocampus_004.nii.gz")


def test_label_shape_differs(copy: Path):
    p = copy / "labelsTr" / "hippocampus_001.nii.gz"
    src = nib.load(p)
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[:-2], src.affine), p)
    r = get_reader("nifti")
    spec = r.scan(copy)
    with pytest.raises(MedsegError, match=r"label shape \(33, 51, 35\) differs from image shape \(35, 51, 35\)") as e:
        r.load(spec, spec.cases[0])
    assert e.value.path == str(p)


def test_unreadable_file(copy: Path):
    p = copy / "imagesTr" / "hippocampus_004.nii.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # valid gzip, truncated volume
    r = get_reader("nifti")
    spec = r.scan(copy)
    with pytest.raises(MedsegError, match="cannot read NIfTI") as e:
        r.load(spec, spec.cases[2])
    assert e.value.path == str(p)
    p.write_bytes(b"not a nifti at all")
    with pytest.raises(MedsegError, match="cannot read NIfTI") as e:
        r.load(spec, spec.cases[2])
    assert e.value.path == str(p)


def test_missing_folder(tmp_path: Path):
    with pytest.raises(MedsegError, match="not a folder or a NIfTI file"):
        get_reader("nifti").scan(tmp_path / "nope")


@pytest.mark.parametrize("codes", [(0, 0), (1, 0), (0, 2), (1, 1)])
def test_write_back_keeps_qform_sform_codes(tmp_path: Path, codes: tuple[int, int]):
    from medseg.data.formats.nifti_io import write_label_nifti

    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    aff[:3, 3] = [1, 2, 3]
    ref = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), aff)
    ref.set_qform(aff, codes[0])
    ref.set_sform(aff, codes[1])
    nib.save(ref, tmp_path / "ref.nii.gz")
    mask = np.zeros((6, 2, 5, 4), np.uint8)
    mask[1, 0, 2, 3] = mask[5, 1, 4, 0] = 1
    out = write_label_nifti(mask, [1, 2], tmp_path / "ref.nii.gz", tmp_path / "o.nii.gz")[0]
    back, ref = nib.load(out), nib.load(tmp_path / "ref.nii.gz")
    assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == codes
    np.testing.assert_allclose(back.affine, ref.affine)
    lab = np.asarray(back.dataobj)
    assert lab.shape == (4, 5, 6) and lab[3, 2, 1] == 1 and lab[0, 4, 5] == 2 and lab.sum() == 3


def _pairs_layout(tmp_path: Path) -> Path:
    """Images and labels in folders that do not follow MSD naming, listed in a CSV."""
    root = tmp_path / "pairs"
    (root / "scans").mkdir(parents=True)
    (root / "segs").mkdir()
    for i, c in enumerate(("hippocampus_004", "hippocampus_001")):
        shutil.copyfile(NIFTI / "imagesTr" / f"{c}.nii.gz", root / "scans" / f"img{i}.nii.gz")
        # uncompressed .nii: a list may mix both extensions
        (root / "segs" / f"seg_{c}.nii").write_bytes(gzip.decompress((NIFTI / "labelsTr" / f"{c}.nii.gz").read_bytes()))
    return root


def test_list_of_pairs_csv(tmp_path: Path):
    root = _pairs_layout(tmp_path)
    (root / "pairs.csv").write_text(
        "image,label,id,patient\n"
        "scans/img0.nii.gz,segs/seg_hippocampus_004.nii,h4,p1\n"
        f"{root / 'scans' / 'img1.nii.gz'},segs/seg_hippocampus_001.nii,,\n"
    )
    r = get_reader("nifti", classes="ant,post")
    spec = r.scan(root / "pairs.csv")
    assert [c.id for c in spec.cases] == ["h4", "img1"]  # listed order; id column, else the image stem
    assert [c.patient for c in spec.cases] == ["p1", "img1"]
    assert spec.classes == ["ant", "post"] and spec.meta["label_values"] == [1, 2] and spec.channels == ["image"]
    d = r.load(spec, spec.cases[0])
    img = nib.load(NIFTI / "imagesTr" / "hippocampus_004.nii.gz")
    lab = np.asarray(nib.load(NIFTI / "labelsTr" / "hippocampus_004.nii.gz").dataobj)
    np.testing.assert_array_equal(d.image[:, 0], np.asarray(img.dataobj).transpose(2, 1, 0))
    np.testing.assert_array_equal(d.mask[:, 1], (lab == 2).transpose(2, 1, 0))
    np.testing.assert_array_equal(d.affine, img.affine)
    # the same list given as option pairs (relative to ROOT) with ROOT a folder
    assert [c.id for c in get_reader("nifti", pairs="pairs.csv").scan(root).cases] == ["h4", "img1"]


def test_list_of_pairs_json_msd_dataset_json(copy: Path):
    # an MSD dataset.json is itself a list of pairs ("training") with label names
    spec = get_reader("nifti").scan(copy / "dataset.json")
    assert [c.id for c in spec.cases] == ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
    assert spec.classes == ["Anterior", "Posterior"] and spec.channels == ["MRI"]
    (copy / "list.json").write_text(json.dumps([{"image": "imagesTr/hippocampus_003.nii.gz", "label": "labelsTr/hippocampus_003.nii.gz"}]))
    r = get_reader("nifti")
    spec = r.scan(copy / "list.json")
    assert [c.id for c in spec.cases] == ["hippocampus_003"] and spec.classes == ["label_1", "label_2"]
    assert r.load(spec, spec.cases[0]).mask.shape[1] == 2
    spec = r.scan(copy / "list.json", require_masks=False)
    assert spec.cases[0].sources["label"] is None and spec.classes == []


@pytest.mark.parametrize(
    "text, match, culprit",
    [
        ("image,label\nscans/nope.nii.gz,segs/seg_hippocampus_004.nii\n", r"image listed in pairs.csv \(line 2\) does not exist", "scans/nope.nii.gz"),
        ("image,label\nscans/img0.nii.gz,segs/nope.nii\n", r"label listed in pairs.csv \(line 2\) does not exist", "segs/nope.nii"),
        ("image,label\nscans/img0.nii.gz,\n", r"line 2: image scans/img0.nii.gz has no label \(use --images-only", "pairs.csv"),
        ("image,label\nscans/img0.nii.gz,segs/seg_hippocampus_004.nii\nscans/img0.nii.gz,segs/seg_hippocampus_001.nii\n",
         r"line 3: case id 'img0' is used twice \(also line 2\)", "pairs.csv"),
        ("img,lab\na,b\n", r"csv has no image column \(header: img,lab", "pairs.csv"),
        ("image,label\n", r"the list of pairs is empty", "pairs.csv"),
    ],
)
def test_list_of_pairs_errors(tmp_path: Path, text: str, match: str, culprit: str):
    root = _pairs_layout(tmp_path)
    (root / "pairs.csv").write_text(text)
    with pytest.raises(MedsegError, match=match) as e:
        get_reader("nifti").scan(root / "pairs.csv")
    assert e.value.path == str(root / culprit)


def test_list_of_pairs_option_missing(tmp_path: Path):
    with pytest.raises(MedsegError, match="list of pairs not found") as e:
        get_reader("nifti", pairs="nope.csv").scan(tmp_path)
    assert e.value.path == str(tmp_path / "nope.csv")


def test_patient_regex_groups_time_points_into_one_patient(copy: Path):
    for f in ("imagesTr", "labelsTr"):  # two time points of patient 001 and one of 004
        (copy / f / "hippocampus_003.nii.gz").rename(copy / f / "hippocampus_001-t2.nii.gz")
    spec = get_reader("nifti", patient_regex=r"^(hippocampus_\d+)").scan(copy)
    assert {c.id: c.patient for c in spec.cases} == {
        "hippocampus_001": "hippocampus_001", "hippocampus_001-t2": "hippocampus_001",
        "hippocampus_004": "hippocampus_004"}
    with pytest.raises(MedsegError, match="does not match patient_regex"):
        get_reader("nifti", patient_regex=r"^(case\d+)").scan(copy)


def test_label_on_another_grid_is_refused_within_tolerance(copy: Path):
    """A label shifted by 0.0001 voxel is the same grid (float32 headers); by half a voxel it is not."""
    lab = copy / "labelsTr" / "hippocampus_001.nii.gz"
    img = nib.load(str(lab))
    reader = get_reader("nifti")
    for shift, ok in ((1e-4, True), (0.5, False)):
        aff = img.affine.copy()
        aff[1, 3] += shift
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff, img.header), str(lab))
        spec = reader.scan(copy)
        case = next(c for c in spec.cases if c.id == "hippocampus_001")
        if ok:
            assert reader.load(spec, case).mask.any()
        else:
            with pytest.raises(MedsegError, match="affine differs from its image's") as e:
                reader.load(spec, case)
            assert e.value.path == str(lab)
