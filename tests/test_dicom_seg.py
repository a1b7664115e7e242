"""DICOM SEG out and back: the fixture series' labels written as a SEG (highdicom), read back exactly,
valid for dciodvfy, and the SEG's own errors (foreign instances, unknown segments) named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import FIXTURES, dciodvfy_errors
from medseg.data.formats import get_reader
from medseg.data.formats.dicom_seg import read_seg, write_seg
from medseg.errors import MedsegError

DICOM = FIXTURES / "dicom"


@pytest.fixture(scope="module")
def series():
    r = get_reader("dicom", masks="masks", write_as="seg", algorithm="test-model")
    spec = r.scan(DICOM)
    return r, spec, spec.cases[0], r.load(spec, spec.cases[0])


def test_mask_to_seg_to_mask_is_exact_with_overlaps(series, tmp_path):
    r, spec, case, data = series
    mask = data.mask.copy()
    mask[10:14, 0, 5:20, 5:20] = 1  # overlapping classes stay overlapping: one set of frames per segment
    mask[10:14, 1, 5:20, 5:20] = 1
    [f] = r.write_prediction(spec, case, mask, tmp_path)
    assert f.name == f"{case.id}.seg.dcm"
    assert np.array_equal(r.read_prediction(tmp_path, spec, case, mask.shape), mask)
    ds = pydicom.dcmread(f)
    src = pydicom.dcmread(case.sources["files"][0])
    assert ds.Modality == "SEG" and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert [s.SegmentLabel for s in ds.SegmentSequence] == spec.classes
    algo = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "test-model"
    # each frame sits where its source slice is: the same position, orientation and pixel spacing
    pos = {str(s.SOPInstanceUID): [float(v) for v in s.ImagePositionPatient]
           for s in (pydicom.dcmread(p, stop_before_pixels=True) for p in case.sources["files"])}
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == \
        [float(v) for v in src.ImageOrientationPatient]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in src.PixelSpacing]
    for fr in ds.PerFrameFunctionalGroupsSequence:
        uid = str(fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert np.allclose([float(v) for v in fr.PlanePositionSequence[0].ImagePositionPatient], pos[uid])
    refs = {str(x.ReferencedSOPInstanceUID) for x in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in case.sources["files"]}


def test_seg_passes_dciodvfy(series, tmp_path):
    r, spec, case, data = series
    [f] = r.write_prediction(spec, case, data.mask, tmp_path)
    assert dciodvfy_errors(f) == []


def test_seg_errors_name_the_file(series, tmp_path):
    r, spec, case, data = series
    f = write_seg(case.sources["files"], data.mask, ["hippocampus", "label_2"], tmp_path / "a.seg.dcm")
    with pytest.raises(MedsegError, match="segment 'hippocampus' matches no class"):
        read_seg(f, case.sources["files"], spec.classes)
    with pytest.raises(MedsegError, match=r"references 1 instance\(s\) not in the series"):
        read_seg(f, case.sources["files"][1:], spec.classes)
    with pytest.raises(MedsegError, match="mask has 3 slices, the series 35"):
        write_seg(case.sources["files"], data.mask[:3], spec.classes, tmp_path / "b.seg.dcm")
    (tmp_path / "c.seg.dcm").write_bytes(b"not dicom")
    with pytest.raises(MedsegError, match="not a readable DICOM SEG"):
        read_seg(tmp_path / "c.seg.dcm", case.sources["files"], spec.classes)


def test_as_seg_is_only_for_dicom_inputs(tmp_path):
    from medseg.inference.predict import predict

    with pytest.raises(MedsegError, match="--as is for inputs with several output forms"):
        predict("lgg-unet", FIXTURES / "lgg_tiny" / "kaggle_3m", tmp_path / "o", write_as="seg", device="cpu")
