"""A clinic's DICOM export as it comes: the breast case of dicompyler-core (a real structure set and plan,
tests/fixtures/dicom_export/, cut by scripts/fetch_dicom_exports.py) beside the objects a planning system
exports with it: a multi-frame and a single-frame RTDOSE and a structured report (pydicom's own test
files), a portal image and a scout (made here from a CT slice's header), and a second, unlabelled series."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import FIXTURES, tiny_run
from medseg.data.formats import get_reader
from medseg.errors import MedsegError, MedsegWarning
from test_bad_inputs import Case, run_cli
from test_bad_inputs import _check as check

EXPORT = FIXTURES / "dicom_export" / "breast"
RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481.1"


def export(tmp: Path, mixed: bool = False) -> Path:
    """A copy of the breast export; ``mixed``: with every other kind of object a planning system writes."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    root = tmp / "export"
    shutil.copytree(EXPORT, root / "breast")
    if mixed:
        for name in ("rtdose.dcm", "rtdose_1frame.dcm", "test-SR.dcm"):
            shutil.copy(get_testdata_file(name), root / name)
        first = sorted((root / "breast" / "CT").iterdir())[0]
        portal = pydicom.dcmread(first)
        portal.Modality, portal.SOPClassUID = "RTIMAGE", RT_IMAGE
        portal.SeriesInstanceUID, portal.SOPInstanceUID = generate_uid(), generate_uid()
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation"):
            delattr(portal, tag)
        portal.save_as(root / "portal.dcm")
        scout = pydicom.dcmread(first)
        scout.SeriesInstanceUID, scout.SOPInstanceUID = generate_uid(), generate_uid()
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        scout.save_as(root / "scout.dcm")
        shutil.copytree(FIXTURES / "dicom" / "series", root / "other_patient_mr")
    return root


def rtss(root: Path) -> tuple[Path, pydicom.Dataset]:
    f = root / "breast" / "rtss.dcm"
    return f, pydicom.dcmread(f)


def contour(ds: pydicom.Dataset, roi_name: str, k: int = 0) -> pydicom.Dataset:
    number = next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == roi_name)
    rc = next(rc for rc in ds.ROIContourSequence if int(rc.ReferencedROINumber) == number)
    return rc.ContourSequence[k]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny one-channel model (one epoch on synthetic data): what predict needs, not what it finds."""
    return tiny_run(tmp_path_factory.mktemp("model"))


# ----------------------------------------------------------------------------------- the whole export
def test_a_mixed_export_prepares_with_one_warning_naming_what_it_skipped(tmp_path, monkeypatch, capsys):
    from medseg.data.prepared import PreparedDataset

    root = export(tmp_path, mixed=True)
    code, err = run_cli(monkeypatch, capsys, ["prepare", "dicom", root, tmp_path / "prep", "--labels", "rtstruct",
                                              "--workers", "1"])
    assert code == 0, err
    skipped = [ln for ln in err.splitlines() if "skipped" in ln]
    assert len(skipped) == 1, err
    line = skipped[0]
    for what in ("rtdose.dcm (RTDOSE, a dose grid, multi-frame)", "rtdose_1frame.dcm (RTDOSE, a dose grid)",
                 "breast/rtplan.dcm (RTPLAN, a treatment plan)", "portal.dcm (RTIMAGE, a portal or simulator image)",
                 "scout.dcm (CT scout (ImageType LOCALIZER))", "test-SR.dcm (SR, a structured report)",
                 "image series 'hippo_t1' of 35 slices has no RTSTRUCT"):
        assert what in line, what
    assert line.startswith(f"warning: {root}: skipped 7 files that hold no image series to read")
    ds = PreparedDataset.open(tmp_path / "prep")
    assert len(ds) == 1 and ds.cases[0].shape == [98, 1, 512, 512]
    assert ds.classes == ["Areola", "BODY", "Borders", "Breast", "Heart", "Lt Lung", "Nodes", "Scar", "Tumor Bed",
                          "Tumor Bed Block"]
    splits = ds.splits()
    assert splits["folds"] == [] and "one patient" in err and "--fold full" in err


def test_predict_on_a_mixed_export_writes_an_rtstruct_per_image_series(tmp_path, model, monkeypatch, capsys):
    root = export(tmp_path, mixed=True)
    code, err = run_cli(monkeypatch, capsys, ["predict", model, root, tmp_path / "out", "--as", "rtstruct", "--no-tta"])
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(written) == 2 and all(n.endswith(".rtstruct.dcm") for n in written) and "hippo_t1.rtstruct.dcm" in written
    line = next(ln for ln in err.splitlines() if "skipped" in ln)
    assert "RTSTRUCT: labels, not read when predicting" in line and "portal.dcm" in line and "scout.dcm" in line
    rt = pydicom.dcmread(tmp_path / "out" / next(n for n in written if n != "hippo_t1.rtstruct.dcm"))
    ref = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == "2.16.840.1.113662.2.12.0.3057.1241703565.43"  # the breast CT


def test_the_real_structure_set_fills_as_the_independent_reference(tmp_path):
    """Heart (33 contours) and Lt Lung (165, with holes) against matplotlib's point-in-polygon test of every
    pixel centre, even-odd within a ROI (the benchmark compares all ten ROIs)."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rtstruct_read import reference_fill

    from medseg.data.formats.dicom_rtstruct import read_rtstruct

    spec = get_reader("dicom", labels="rtstruct").scan(EXPORT)
    files = spec.cases[0].sources["files"]
    for roi in ("Heart", "Lt Lung"):
        ours = read_rtstruct(EXPORT / "rtss.dcm", files, [roi], {roi: roi})
        assert ours.sum() > 10_000
        np.testing.assert_array_equal(ours, reference_fill(EXPORT / "rtss.dcm", files, [roi]))


def test_one_patient_trains_with_fold_full(tmp_path, monkeypatch, capsys):
    import yaml

    root = export(tmp_path)
    code, err = run_cli(monkeypatch, capsys, ["prepare", "dicom", root, tmp_path / "prep", "--labels", "rtstruct",
                                              "-o", "rois=heart:Heart", "--workers", "1"])
    assert code == 0, err
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"prepared": str(tmp_path / "prep"), "batch_size": 2, "size": [64, 64]},
                                   "model": {"name": "unet", "kwargs": {"base": 4, "depth": 2}},
                                   "train": {"epochs": 1, "steps_per_epoch": 1}}))
    code, err = run_cli(monkeypatch, capsys, ["train", cfg, "--fold", "0", "--out", tmp_path / "r0"])
    assert code == 2 and "no validation folds (one patient): train with --fold full" in err
    code, err = run_cli(monkeypatch, capsys, ["train", cfg, "--fold", "full", "--out", tmp_path / "run"])
    assert code == 0, err
    assert (tmp_path / "run" / "full" / "model.pt").is_file()


# ------------------------------------------------------------------ references as the standard allows
def test_a_structure_set_that_names_its_series_only_by_frame_of_reference(tmp_path, monkeypatch, capsys):
    root = export(tmp_path)
    f, ds = rtss(root)
    del ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence  # Type 3
    for rc in ds.ROIContourSequence:
        for c in getattr(rc, "ContourSequence", None) or []:
            del c.ContourImageSequence  # Type 3 too: the slice is the one whose plane holds the points
    ds.save_as(f)
    spec = get_reader("dicom", labels="rtstruct").scan(root)
    assert [c.sources["labels_file"] for c in spec.cases] == [str(f)]
    mask = get_reader("dicom", labels="rtstruct", rois="heart:Heart").read(spec, spec.cases[0]).mask
    assert mask.sum() > 10_000
    # a second series in the same frame of reference: which one is meant cannot be told
    second = root / "breast" / "CT2"
    shutil.copytree(root / "breast" / "CT", second)
    uid = pydicom.uid.generate_uid()
    for p in second.iterdir():
        d = pydicom.dcmread(p)
        d.SeriesInstanceUID, d.SeriesDescription = uid, "resampled copy"
        d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        d.save_as(p)
    check(Case(["prepare", "dicom", root, tmp_path / "out", "--labels", "rtstruct"], f,
               "RTSTRUCT could label any of 2 series"), tmp_path, monkeypatch, capsys)


def test_the_series_is_found_under_the_second_frame_of_reference_item(tmp_path):
    root = export(tmp_path)
    f, ds = rtss(root)
    registered = pydicom.Dataset()
    registered.FrameOfReferenceUID = pydicom.uid.generate_uid()  # a registered MR's frame, listed first
    study = pydicom.Dataset()
    series = pydicom.Dataset()
    series.SeriesInstanceUID = pydicom.uid.generate_uid()
    study.RTReferencedSeriesSequence = [series]
    registered.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence.insert(0, registered)
    ds.save_as(f)
    spec = get_reader("dicom", labels="rtstruct").scan(root)
    assert spec.cases[0].sources["labels_file"] == str(f)
    assert get_reader("dicom", labels="rtstruct", rois="heart:Heart").read(spec, spec.cases[0]).mask.sum() > 10_000


# ------------------------------------------------------------------ contours as planning systems write them
def test_a_point_roi_is_skipped_with_a_warning(tmp_path):
    root = export(tmp_path)
    f, ds = rtss(root)
    roi = pydicom.Dataset()
    roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = 99, "Iso", ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID
    ds.StructureSetROISequence.append(roi)
    pt = pydicom.Dataset()
    pt.ContourGeometricType, pt.NumberOfContourPoints = "POINT", 1
    pt.ContourData = list(contour(ds, "Heart").ContourData[:3])
    rc = pydicom.Dataset()
    rc.ReferencedROINumber, rc.ContourSequence = 99, [pt]
    ds.ROIContourSequence.append(rc)
    obs = pydicom.Dataset()
    obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType = 99, 99, "ISOCENTER"
    ds.RTROIObservationsSequence.append(obs)
    ds.save_as(f)
    with pytest.warns(MedsegWarning, match="point or line ROI 'Iso' \\(no area\\)"):
        spec = get_reader("dicom", labels="rtstruct").scan(root)
    assert "Iso" not in spec.classes and "Heart" in spec.classes


def _twist(ds: pydicom.Dataset, roi: str, i: int, j: int) -> None:
    """Swap points i and j of a ROI's first contour: a self-crossing whose loop grows with j - i."""
    c = contour(ds, roi)
    xyz = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
    xyz[[i, j]] = xyz[[j, i]]
    c.ContourData = [f"{v:.4f}" for v in xyz.ravel()]


def test_a_tiny_self_crossing_loop_is_filled_even_odd_with_a_warning(tmp_path):
    root = export(tmp_path)
    f, ds = rtss(root)
    _twist(ds, "BODY", 10, 11)  # neighbours: a bow tie of a fraction of a pixel
    ds.save_as(f)
    reader = get_reader("dicom", labels="rtstruct", rois="body:BODY")
    spec = reader.scan(root)
    with pytest.warns(MedsegWarning, match=r"1 contour cross themselves in loops under 0.5 pixels' area, filled by the "
                                           r"even-odd rule: BODY slice \d+"):
        assert reader.read(spec, spec.cases[0]).mask.sum() > 1_000_000


def test_a_large_self_crossing_loop_is_refused_naming_roi_and_slice(tmp_path, monkeypatch, capsys):
    root = export(tmp_path)
    f, ds = rtss(root)
    _twist(ds, "Heart", 2, 12)
    ds.save_as(f)
    err = check(Case(["prepare", "dicom", root, tmp_path / "out", "--labels", "rtstruct", "--workers", "1"], f,
                     "ROI 'Heart': a contour on slice"), tmp_path, monkeypatch, capsys)
    assert "crosses itself, cutting off a loop of" in err and "option crossing_tolerance" in err
    # the tolerance is an option: raised, the same contour is filled even-odd
    spec = get_reader("dicom", labels="rtstruct", rois="heart:Heart", crossing_tolerance=1e6).scan(root)
    with pytest.warns(MedsegWarning, match="cross themselves"):
        get_reader("dicom", labels="rtstruct", rois="heart:Heart", crossing_tolerance=1e6).read(spec, spec.cases[0])


def test_a_5000_point_crossing_contour_is_checked_like_a_short_one(tmp_path, monkeypatch, capsys):
    root = export(tmp_path)
    f, ds = rtss(root)
    c = contour(ds, "Heart")
    xyz = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
    centre, z = xyz[:, :2].mean(0), xyz[0, 2]
    t = np.linspace(0, 2 * np.pi, 5000, endpoint=False)
    ring = np.stack([centre[0] + 20 * np.cos(t), centre[1] + 20 * np.sin(t), np.full_like(t, z)], 1)
    ring[[100, 1600]] = ring[[1600, 100]]  # a crossing far along the contour
    c.ContourData, c.NumberOfContourPoints = [f"{v:.4f}" for v in ring.ravel()], 5000
    ds.save_as(f)
    check(Case(["prepare", "dicom", root, tmp_path / "out", "--labels", "rtstruct", "-o", "rois=heart:Heart"], f,
               "crosses itself"), tmp_path, monkeypatch, capsys)


# ------------------------------------------------------------------------------------ nothing silent
def test_two_rois_of_one_name_are_refused_without_rois_and_merged_with_it(tmp_path, monkeypatch, capsys):
    root = export(tmp_path)
    f, ds = rtss(root)
    next(r for r in ds.StructureSetROISequence if r.ROIName == "Scar").ROIName = "Heart"
    ds.save_as(f)
    check(Case(["prepare", "dicom", root, tmp_path / "out", "--labels", "rtstruct"], f,
               "ROIs 5 and 8 are both named 'Heart'"), tmp_path, monkeypatch, capsys)
    with pytest.warns(MedsegWarning, match="ROIs 5 and 8 are both named 'Heart', merged"):
        spec = get_reader("dicom", labels="rtstruct", rois="heart:Heart").scan(root)
    assert spec.classes == ["heart"]


def test_a_rois_name_that_matches_nothing_lists_the_names_there_are(tmp_path, monkeypatch, capsys):
    root = export(tmp_path)
    err = check(Case(["prepare", "dicom", root, tmp_path / "out", "--labels", "rtstruct", "-o",
                      "rois=heart:Hart|Coeur,lung:Lt Lung"], root, "option rois: class 'heart' (Hart|Coeur) matches no ROI in any case"),
                tmp_path, monkeypatch, capsys)
    assert "the names there are: Areola, BODY, Borders" in err


def test_a_fractional_seg_is_thresholded_at_one_half_with_a_warning(tmp_path):
    import highdicom as hd

    from medseg.data.formats.dicom_seg import read_seg

    series = sorted((FIXTURES / "dicom" / "series").iterdir())
    sources = [pydicom.dcmread(p) for p in series]
    spec = get_reader("dicom").scan(FIXTURES / "dicom" / "series", require_masks=False)
    files = spec.cases[0].sources["files"]
    ordered = [pydicom.dcmread(p) for p in files]
    for d in ordered:  # attributes a SEG copies from its sources, absent from this anonymised series
        for tag in ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDate",
                    "StudyTime"):
            if tag not in d:
                setattr(d, tag, "")
    h, w = int(ordered[0].Rows), int(ordered[0].Columns)
    prob = np.zeros((len(files), h, w), np.float32)
    prob[:, 5:15, 5:15] = 0.25  # faint: not foreground
    prob[:, 20:30, 10:20] = 0.75
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="disc", segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(source_images=ordered, pixel_array=prob, segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
                              segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=5,
                              sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test",
                              manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    seg.save_as(tmp_path / "f.seg.dcm")
    assert len(sources) == len(files)
    with pytest.warns(MedsegWarning, match="a FRACTIONAL segmentation: foreground where the value is at least 0.5"):
        m = read_seg(tmp_path / "f.seg.dcm", files, ["disc"])
    assert m[:, 0, 20:30, 10:20].all() and not m[:, 0, 5:15, 5:15].any() and m.sum() == len(files) * 100
    with pytest.warns(MedsegWarning):
        assert read_seg(tmp_path / "f.seg.dcm", files, ["disc"], threshold=0.2).sum() == len(files) * 200


def test_dicom_export_cases_are_errors_that_name_the_file(tmp_path, monkeypatch, capsys):
    """A folder of only skipped objects, and a structure set whose references fit nothing."""
    from pydicom.data import get_testdata_file

    only = tmp_path / "plans"
    only.mkdir()
    shutil.copy(get_testdata_file("rtplan.dcm"), only / "rtplan.dcm")
    shutil.copy(get_testdata_file("rtdose.dcm"), only / "rtdose.dcm")
    check(Case(["prepare", "dicom", only, tmp_path / "out", "--images-only"], only,
               "no DICOM image series found; skipped 2 files that hold no image series to read"),
          tmp_path, monkeypatch, capsys)
    with pytest.raises(MedsegError, match="not a DICOM image file \\(RTPLAN, a treatment plan\\)"):
        get_reader("dicom").scan(only / "rtplan.dcm", require_masks=False)


def test_an_open_contour_beside_areas_is_skipped_with_a_warning(tmp_path):
    """A line drawn in a ROI (OPEN_PLANAR) encloses nothing: the ROI's closed contours are read, the line
    named in a warning; a ROI made only of lines is no class."""
    root = export(tmp_path)
    f, ds = rtss(root)
    line = contour(ds, "Heart", 1)
    line.ContourGeometricType = "OPEN_PLANAR"
    borders = contour(ds, "Borders")
    number = next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == "Borders")
    for rc in ds.ROIContourSequence:
        if int(rc.ReferencedROINumber) == number:
            for c in rc.ContourSequence:
                c.ContourGeometricType = "OPEN_PLANAR"
    ds.save_as(f)
    with pytest.warns(MedsegWarning, match="point or line ROI 'Borders'"):
        spec = get_reader("dicom", labels="rtstruct").scan(root)
    assert "Borders" not in spec.classes and borders.ContourGeometricType == "OPEN_PLANAR"
    reader = get_reader("dicom", labels="rtstruct", rois="heart:Heart")
    spec = reader.scan(root)
    with pytest.warns(MedsegWarning, match=r"1 contour that enclose no area skipped: Heart \(OPEN_PLANAR\)"):
        assert reader.read(spec, spec.cases[0]).mask.sum() > 10_000
