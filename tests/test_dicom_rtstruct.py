"""RTSTRUCT out and back on the oblique hippocampus DICOM fixture: contours in patient coordinates that
rasterise back to the mask, holes kept, valid for dciodvfy, and the structure set's errors named."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import FIXTURES, dciodvfy_errors
from medseg.data.formats import get_reader
from medseg.data.formats.dicom_rtstruct import read_rtstruct, slice_contours, write_rtstruct
from medseg.errors import MedsegError, MedsegWarning

DICOM = FIXTURES / "dicom"


@pytest.fixture(scope="module")
def series():
    r = get_reader("dicom", masks="masks", write_as="rtstruct", algorithm="test-model")
    spec = r.scan(DICOM)
    return r, spec, spec.cases[0], r.load(spec, spec.cases[0])


def test_self_intersection():
    from medseg.data.formats.dicom_rtstruct import crossing_loops

    square = np.array([[0, 0], [0, 2], [2, 2], [2, 0]], float)
    assert crossing_loops(square) is None
    assert crossing_loops(square[[0, 2, 1, 3]]) > 0  # a bow tie
    assert all(crossing_loops(c) is None for c in slice_contours(np.pad(np.ones((5, 7), np.uint8), 2)))


def test_contours_of_a_square_run_half_way_between_pixel_centres():
    m = np.zeros((6, 6), np.uint8)
    m[1:4, 2:5] = 1
    [c] = slice_contours(m)
    assert c[:, 0].min() == pytest.approx(0.5) and c[:, 0].max() == pytest.approx(3.5)
    assert c[:, 1].min() == pytest.approx(1.5) and c[:, 1].max() == pytest.approx(4.5)


def test_mask_to_rtstruct_to_mask_per_structure_with_a_hole(series, tmp_path):
    r, spec, case, data = series
    mask = data.mask.copy()
    mask[20, 1] = 0
    mask[20, 1, 10:30, 5:25] = 1
    mask[20, 1, 15:25, 10:20] = 0  # a ring: its inner contour is a hole
    mask[25, 0] = 1  # a whole slice: contours on the image's border
    [f] = r.write_prediction(spec, case, mask, tmp_path)
    assert f.name == f"{case.id}.rtstruct.dcm"
    back = r.read_prediction(tmp_path, spec, case, mask.shape)
    for j in range(len(spec.classes)):
        a, b = mask[:, j] > 0, back[:, j] > 0
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98, spec.classes[j]
    assert np.array_equal(back[20, 1], mask[20, 1])  # the hole stays a hole
    assert back[25, 0].all()
    ds = pydicom.dcmread(f)
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in case.sources["files"]]
    assert ds.Modality == "RTSTRUCT" and ds.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert [x.ROIName for x in ds.StructureSetROISequence] == spec.classes
    # every contour point lies on the plane of the slice it references, inside its image
    uid = {str(s.SOPInstanceUID): s for s in src}
    for rc in ds.ROIContourSequence:
        assert len(rc.ROIDisplayColor) == 3
        for c in rc.ContourSequence:
            s = uid[str(c.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            iop = np.array([float(v) for v in s.ImageOrientationPatient])
            d = np.array([float(v) for v in c.ContourData]).reshape(-1, 3) - np.array([float(v) for v in s.ImagePositionPatient])
            assert np.abs(d @ np.cross(iop[:3], iop[3:])).max() < 1e-3
            rows, cols = d @ iop[3:] / float(s.PixelSpacing[0]), d @ iop[:3] / float(s.PixelSpacing[1])
            e = 1e-3  # pixels: the file stores 4 decimals of mm
            assert rows.min() >= -0.5 - e and cols.min() >= -0.5 - e and rows.max() <= s.Rows - 0.5 + e and cols.max() <= s.Columns - 0.5 + e


def test_rtstruct_passes_dciodvfy(series, tmp_path):
    r, spec, case, data = series
    [f] = r.write_prediction(spec, case, data.mask, tmp_path)
    assert dciodvfy_errors(f) == []


def test_rtstruct_errors_name_the_file_and_the_roi(series, tmp_path):
    r, spec, case, data = series
    files = case.sources["files"]
    f = write_rtstruct(files, data.mask, spec.classes, tmp_path / "a.dcm")

    def edited(name, change):
        ds = pydicom.dcmread(f)
        change(ds)
        out = tmp_path / name
        ds.save_as(out)
        return out

    with pytest.raises(MedsegError, match="ROI 'label_1' matches no class"):
        read_rtstruct(f, files, ["hippocampus", "label_2"])
    with pytest.raises(MedsegError, match="references frame of reference 1.2.3.4"):
        read_rtstruct(edited("b.dcm", lambda ds: setattr(ds.ReferencedFrameOfReferenceSequence[0], "FrameOfReferenceUID", "1.2.3.4")), files, spec.classes)
    with pytest.warns(UserWarning, match="ROI 'label_2' has no contours: read as empty"):
        empty = read_rtstruct(edited("c.dcm", lambda ds: delattr(ds.ROIContourSequence[1], "ContourSequence")), files, spec.classes)
    assert not empty[:, 1].any() and empty[:, 0].any()

    iop = np.array([float(v) for v in pydicom.dcmread(files[0], stop_before_pixels=True).ImageOrientationPatient])
    x, y = iop[:3], iop[3:]  # along the rows, along the columns (the fixture's slices share them)

    def moved(name, points):  # the first contour of the first ROI replaced by points(its points)
        def change(ds):
            c = ds.ROIContourSequence[0].ContourSequence[0]
            pts = points(np.array([float(v) for v in c.ContourData]).reshape(-1, 3))
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [f"{v:.4f}" for v in pts.ravel()]
        return edited(name, change)

    with pytest.raises(MedsegError, match="ROI 'label_1': a contour on slice .* runs outside the image"):
        read_rtstruct(moved("d.dcm", lambda pts: pts + 500 * x), files, spec.classes)  # 500 mm along the rows
    with pytest.raises(MedsegError, match="mm off slice"):
        read_rtstruct(moved("e.dcm", lambda pts: pts + 3 * np.cross(x, y)), files, spec.classes)
    def bowtie(pts):  # four points whose edges cross
        return np.stack([pts[0], pts[0] + 5 * x + 5 * y, pts[0] + 5 * x, pts[0] + 5 * y])

    with pytest.raises(MedsegError, match="ROI 'label_1': a contour on slice .* crosses itself"):
        read_rtstruct(moved("g.dcm", bowtie), files, spec.classes)
    with pytest.raises(MedsegError, match="ROI 'label_1': a contour of type 'CURVE' is not one DICOM defines"):
        read_rtstruct(edited("f.dcm", lambda ds: setattr(ds.ROIContourSequence[0].ContourSequence[0], "ContourGeometricType",
                                                          "CURVE")), files, spec.classes)
    with pytest.raises(MedsegError, match=r"references instance .* not in the series"):
        read_rtstruct(f, files[:17] + files[18:], spec.classes)  # the middle slice, which holds contours, left out


def _study(tmp_path, kind: str, names: list[str], mask_of):
    """The fixture series and one label object of ``kind`` for it, named ``names`` (mask_of(mask) -> [z, k, h, w])."""
    from medseg.data.formats.dicom_seg import write_seg

    study = tmp_path / "study"
    shutil.copytree(DICOM / "series", study / "series")
    r = get_reader("dicom", masks="masks")
    spec = r.scan(DICOM)
    case = spec.cases[0]
    mask = r.load(spec, case).mask
    files = [str(study / "series" / Path(s).name) for s in case.sources["files"]]  # the copies, in slice order
    write = write_seg if kind == "seg" else write_rtstruct
    write(files, mask_of(mask), names, study / f"labels.{kind}.dcm", "hand")
    return study, mask


@pytest.mark.parametrize("kind", ["rtstruct", "seg"])
def test_prepare_reads_label_objects_with_rois_mapped_to_classes(tmp_path, kind, recwarn):
    def with_body(m):  # the two structures, and a body outline a planning export also holds
        return np.concatenate([m, np.ones_like(m[:, :1])], 1)

    study, mask = _study(tmp_path, kind, ["Hippo_A", "HIPPO_P", "External"], with_body)
    r = get_reader("dicom", labels=kind, rois="anterior:Hippo_A,posterior:Hippo_P|HIPPO_P")
    spec = r.scan(study)
    assert spec.classes == ["anterior", "posterior"] and spec.class_kind == "multilabel"
    assert any("left out: External" in str(w.message) for w in recwarn)
    got = r.load(spec, spec.cases[0]).mask
    if kind == "seg":
        assert np.array_equal(got, mask)
    else:
        for j in range(2):
            a, b = mask[:, j] > 0, got[:, j] > 0
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98
    plain = get_reader("dicom", labels=kind).scan(study)  # no mapping: every name is a class
    assert plain.classes == ["External", "HIPPO_P", "Hippo_A"]


def test_label_objects_that_fit_no_series_are_named(tmp_path):
    study, _ = _study(tmp_path, "rtstruct", ["a", "b"], lambda m: m)
    f = study / "labels.rtstruct.dcm"
    ds = pydicom.dcmread(f)
    ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    ref.SeriesInstanceUID = "1.2.3.4.5"
    ds.save_as(f)
    with pytest.warns(MedsegWarning, match=r"names series 1.2.3.4.5, which is not here, but its references point at "
                                           r"instances of series 'hippo t1': labelled that one"):
        assert len(get_reader("dicom", labels="rtstruct").scan(study).cases) == 1
    for i, c in enumerate(c for rc in ds.ROIContourSequence for c in getattr(rc, "ContourSequence", [])):
        c.ContourImageSequence[0].ReferencedSOPInstanceUID = f"1.2.3.{i}"
    ds.save_as(f)
    with pytest.raises(MedsegError, match=r"RTSTRUCT references series 1.2.3.4.5, which is not among the image series"):
        get_reader("dicom", labels="rtstruct").scan(study)
    f.unlink()
    with pytest.raises(MedsegError, match="has no RTSTRUCT file referencing it"):
        get_reader("dicom", labels="rtstruct").scan(study)


@pytest.mark.parametrize("geometry", ["flipped", "non-square"])
def test_contours_sit_where_the_series_geometry_puts_the_voxels(tmp_path, geometry):
    """On a flipped series (both in-plane directions reversed) and one with non-square pixels, the round
    trip holds and the contours' patient coordinates agree exactly with the reader's affine."""
    study = tmp_path / "dicom"
    shutil.copytree(DICOM, study)
    for f in (study / "series").iterdir():
        ds = pydicom.dcmread(f)
        if geometry == "flipped":
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in -iop]
        else:
            ds.PixelSpacing = ["0.7", "1.3"]
        ds.save_as(f)
    r0 = get_reader("dicom", masks="masks")
    spec0 = r0.scan(DICOM)
    mask = r0.load(spec0, spec0.cases[0]).mask  # the same voxels, on the changed grid
    r = get_reader("dicom", write_as="rtstruct", classes=spec0.classes)
    spec = r.scan(study, require_masks=False)
    spec.classes = spec0.classes
    case = spec.cases[0]
    [f] = r.write_prediction(spec, case, mask, tmp_path / "out")
    back = r.read_prediction(tmp_path / "out", spec, case, mask.shape)
    a, b = mask > 0, back > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98
    # every contour point, taken back through the reader's own affine (RAS; contours are LPS), lands on its
    # slice's plane, on the half-pixel grid between pixel centres, inside the image
    inv = np.linalg.inv(np.array(case.sources["affine"]))
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in case.sources["files"]]
    for c in pydicom.dcmread(f).ROIContourSequence[0].ContourSequence:
        z = uids.index(str(c.ContourImageSequence[0].ReferencedSOPInstanceUID))
        lps = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
        ijk = (inv @ np.c_[lps * np.array([-1, -1, 1]), np.ones(len(lps))].T)[:3].T  # column, row, slice
        assert np.abs(ijk[:, 2] - z).max() < 1e-3
        half = ijk[:, :2] * 2
        assert np.abs(half - np.round(half)).max() < 1e-3
        assert ijk[:, :2].min() >= -0.5 - 1e-3 and ijk[:, 0].max() <= mask.shape[3] - 0.5 + 1e-3 and ijk[:, 1].max() <= mask.shape[2] - 0.5 + 1e-3


@pytest.mark.parametrize("kind", ["rtstruct", "seg"])
def test_round_trip_on_a_real_lgg_tumour(tmp_path, kind):
    """The bundled LGG patient as a DICOM series (scripts/make_fixtures.py --only dicom_lgg): its tumour
    through an RTSTRUCT (Dice >= 0.98) or a SEG (exact), both valid for dciodvfy."""
    r = get_reader("dicom", masks="masks", classes=["tumour"], write_as=kind)
    spec = r.scan(FIXTURES / "dicom_lgg")
    case = spec.cases[0]
    mask = r.load(spec, case).mask
    assert mask.shape == (8, 1, 256, 256) and mask.sum() > 1000
    [f] = r.write_prediction(spec, case, mask, tmp_path)
    back = r.read_prediction(tmp_path, spec, case, mask.shape)
    if kind == "seg":
        assert np.array_equal(back, mask)
    else:
        assert 2 * (back & mask).sum() / (back.sum() + mask.sum()) >= 0.98
    assert dciodvfy_errors(f) == []


def test_cli_predict_writes_seg_and_rtstruct_for_a_dicom_series(tmp_path, monkeypatch, capsys):
    """`medseg predict RUN DICOM OUT --as seg|rtstruct` with a (tiny, 1-channel) trained model: one file per
    series, read back by the reader as the same masks the NIfTI output holds."""
    import sys

    import yaml

    from medseg.cli import main
    from medseg.training.run import train
    from medseg.training.synthetic import make_synthetic

    syn = make_synthetic(tmp_path / "syn", n_patients=4, slices=4, size=32, channels=1)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"prepared": str(syn), "batch_size": 4}, "model": {"name": "unet", "kwargs": {"base": 8, "depth": 3}},
                                   "train": {"epochs": 1, "steps_per_epoch": 2}}))
    train(cfg, out=tmp_path / "run")
    outs = {}
    for kind in ("nifti", "seg", "rtstruct"):
        monkeypatch.setattr(sys, "argv", ["medseg", "predict", str(tmp_path / "run"), str(DICOM / "series"), str(tmp_path / kind),
                                          "--as", kind, "--device", "cpu", "--no-tta"])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 0, capsys.readouterr().err
        outs[kind] = sorted(p.name for p in (tmp_path / kind).iterdir())
    assert outs == {"nifti": ["hippo_t1.nii.gz"], "seg": ["hippo_t1.seg.dcm"], "rtstruct": ["hippo_t1.rtstruct.dcm"]}
    r = get_reader("dicom", classes=["disc", "square"])
    spec = r.scan(DICOM / "series", require_masks=False)
    spec.classes, spec.meta["label_values"] = ["disc", "square"], [1, 2]
    shape = (35, 2, 52, 34)
    ref = r.read_prediction(tmp_path / "nifti", spec, spec.cases[0], shape)
    assert np.array_equal(r.read_prediction(tmp_path / "seg", spec, spec.cases[0], shape), ref)
    rt = r.read_prediction(tmp_path / "rtstruct", spec, spec.cases[0], shape)
    if ref.any():
        assert 2 * (rt & ref).sum() / (rt.sum() + ref.sum()) >= 0.98
    assert pydicom.dcmread(tmp_path / "seg" / "hippo_t1.seg.dcm").SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "run"
