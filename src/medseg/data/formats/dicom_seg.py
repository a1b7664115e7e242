"""DICOM Segmentation objects (SEG) written and read with highdicom: the format planning systems and PACS
viewers load segmentations in, referencing the series they were made on.

    files = write_seg(source_files, mask, classes, out_path, algorithm="lgg-unet")
    mask = read_seg(seg_path, source_files, classes)       # [z, k, h, w] uint8, source order

A binary SEG with one segment per class, one frame per source slice and segment, the algorithm named
(family: artificial intelligence), referencing every source instance, its study, patient and frame of
reference. Overlapping classes stay overlapping: each segment is its own set of frames.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_path
from medseg.errors import MedsegError, warn

_TISSUE = ("85756007", "SCT", "Tissue")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")  # a generic category and type: the segment label names the class


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("medseg")
    except Exception:  # running from a source tree
        return "0"


def write_seg(source_files: Sequence[str | Path], mask: np.ndarray, classes: Sequence[str], out: str | Path,
              algorithm: str = "medseg", notes: Sequence[str] | None = None) -> Path:
    """``mask[z, k, h, w]`` (z in the order of ``source_files``) as one binary SEG file at ``out``; ``notes``
    (one per class, e.g. the quality estimate's review line) in each segment's SegmentDescription."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(str(f)) for f in source_files]
    for ds in sources:  # type 2 patient and study attributes a SEG copies: present, if empty (as DICOM allows)
        for tag in _TYPE2:
            if tag not in ds:
                setattr(ds, tag, "")
    if len(sources) != mask.shape[0]:
        raise MedsegError(f"mask has {mask.shape[0]} slices, the series {len(sources)}", Path(source_files[0]).parent)
    concept = hd.sr.CodedConcept(*_TISSUE)
    algo = hd.AlgorithmIdentificationSequence(name=algorithm[:64], version=_version(),
                                              family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(segment_number=j + 1, segment_label=str(c)[:64],
                                              segmented_property_category=concept, segmented_property_type=concept,
                                              algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                              algorithm_identification=algo)
                    for j, c in enumerate(classes)]
    for d, text in zip(descriptions, notes or []):
        d.SegmentDescription = str(text)[:64]
    pixels = np.ascontiguousarray(mask.transpose(0, 2, 3, 1) > 0)  # [frames, rows, columns, segments]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9001,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg", manufacturer_model_name=algorithm[:64],
            software_versions=_version(), device_serial_number="0", series_description=f"{algorithm} segmentation"[:64],
            omit_empty_frames=False)
    except (ValueError, TypeError) as e:
        raise MedsegError(f"cannot make a DICOM SEG of this series ({e})", Path(source_files[0]).parent) from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        seg.save_as(tmp)
    return out


def read_seg(path: str | Path, source_files: Sequence[str | Path], classes: Sequence[str],
             names: dict[str, str] | None = None, threshold: float = 0.5) -> np.ndarray:
    """A SEG's segments as ``[z, k, h, w]`` uint8 in the order of ``source_files``, segments matched to
    ``classes`` by label (or through ``names``, label -> class, which skips the labels it lacks); a frame
    that references an instance outside the series, or a label that names no class, is an error naming the file."""
    import highdicom as hd
    import pydicom

    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as e:
        raise MedsegError(f"not a readable DICOM SEG ({type(e).__name__}: {e})", path) from None
    uids = [str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in source_files]
    referenced = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    missing = sorted(referenced - set(uids))
    if missing:
        raise MedsegError(f"references {len(missing)} instance(s) not in the series, e.g. {missing[0]}", path)
    labels = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    if names is not None:
        labels = {n: names[lab] for n, lab in labels.items() if lab in names}
    index = {c: j for j, c in enumerate(classes)}
    unknown = [lab for lab in labels.values() if lab not in index]
    if unknown:
        raise MedsegError(f"segment {unknown[0]!r} matches no class ({', '.join(classes)})", path)
    out = np.zeros((len(uids), len(classes), int(seg.Rows), int(seg.Columns)), np.uint8)
    present = [u for u in uids if u in referenced]
    if present and labels:
        numbers = sorted(labels)
        arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=present, segment_numbers=numbers,
                                                ignore_spatial_locations=True)
        rows = [uids.index(u) for u in present]
        fractional = str(getattr(seg, "SegmentationType", "BINARY")) == "FRACTIONAL"
        if fractional:  # probabilities or occupancies in [0, 1]: > 0 would take every faint voxel
            warn(f"a FRACTIONAL segmentation: foreground where the value is at least {threshold:g} "
                 "(option seg_threshold)", path)
        for n_i, n in enumerate(numbers):
            fg = arr[..., n_i] >= threshold if fractional else arr[..., n_i] > 0
            out[rows, index[labels[n]]] |= fg.astype(np.uint8)
    return out


__all__ = ["write_seg", "read_seg"]
