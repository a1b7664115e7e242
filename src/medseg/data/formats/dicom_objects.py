"""What a planning system's export holds, told apart: image slices, label objects (RTSTRUCT, SEG) and
everything else (plans, doses, portal images, registrations, key objects, reports, scouts); which
image series each label object belongs to, by the references the standard allows; and where a series'
slices lie in patient space.

    reason = not_an_image(ds)                 # None for a slice of an image series, else why it is skipped
    uid = referenced_series(ds, path, series) # the series a structure set or SEG labels
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError, warn
from medseg.text import plural

LABEL_MODALITIES = ("SEG", "RTSTRUCT")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Slice steps may differ from the median by this fraction (rounding in the scanner's positions) before
# the series counts as uneven: an affine with one step would place the other slices wrongly.
_STEP_TOLERANCE = 0.1
# objects beside the images in an export that hold no image series: skipped, named in one warning
NOT_IMAGES = {
    "RTPLAN": "a treatment plan", "RTDOSE": "a dose grid", "RTIMAGE": "a portal or simulator image",
    "RTRECORD": "a treatment record", "REG": "a registration", "KO": "a key object selection",
    "PR": "a presentation state", "SR": "a structured report", "DOC": "a document", "PLAN": "a plan",
    "RAW": "raw data", "FID": "fiducials", "RWV": "real-world value map", "ECG": "a waveform",
}


def not_an_image(ds: Any) -> str | None:
    """Why ``ds`` (a header) is no slice of an image series medseg reads, or None when it is one."""
    modality = str(getattr(ds, "Modality", "") or "")
    if modality in NOT_IMAGES:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        return f"{modality}, {NOT_IMAGES[modality]}" + (", multi-frame" if frames > 1 else "")
    if getattr(ds, "SeriesInstanceUID", None) is None or "Rows" not in ds:
        return "no image pixels (not an image slice)"
    image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
    if "LOCALIZER" in image_type:
        return f"{modality or 'image'} scout (ImageType LOCALIZER)"
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        return f"{modality or 'image'} multi-frame image (enhanced multi-frame series are not read; export it as single-frame slices)"
    missing = missing_place(ds)
    if missing:
        return f"{modality or 'image'} slice without {', '.join(missing)} (no place in patient space)"
    return None


def missing_place(ds: Any) -> list[str]:
    """The tags a slice lacks to have a place in patient space."""
    return [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if t not in ds]


def series_info(items: list[tuple[Path, Any]]) -> dict[str, Any]:
    """What label objects are matched against: a series' frame of reference and SOP instances."""
    first = items[0][1]
    return {"frame": str(getattr(first, "FrameOfReferenceUID", "") or ""),
            "instances": {str(getattr(ds, "SOPInstanceUID", "")) for _, ds in items},
            "name": str(getattr(first, "SeriesDescription", "") or first.SeriesInstanceUID)}


def _struct_series(ds: Any) -> list[str]:
    """Series UIDs a structure set names: RTReferencedSeriesSequence under every frame of reference item
    (the study level is Type 3: it may be absent)."""
    out = []
    for fr in getattr(ds, "ReferencedFrameOfReferenceSequence", None) or []:
        for st in getattr(fr, "RTReferencedStudySequence", None) or []:
            for se in getattr(st, "RTReferencedSeriesSequence", None) or []:
                if getattr(se, "SeriesInstanceUID", None):
                    out.append(str(se.SeriesInstanceUID))
    return out


def _struct_instances(ds: Any) -> set[str]:
    """SOP instances the contours (and the series references) point at."""
    out = set()
    for rc in getattr(ds, "ROIContourSequence", None) or []:
        for c in getattr(rc, "ContourSequence", None) or []:
            for ref in getattr(c, "ContourImageSequence", None) or []:
                out.add(str(ref.ReferencedSOPInstanceUID))
    return out


def _frames(ds: Any) -> set[str]:
    frames = {str(f.FrameOfReferenceUID) for f in getattr(ds, "ReferencedFrameOfReferenceSequence", None) or []
              if getattr(f, "FrameOfReferenceUID", None)}
    if getattr(ds, "FrameOfReferenceUID", None):
        frames.add(str(ds.FrameOfReferenceUID))
    return frames


def referenced_series(ds: Any, path: Path, series: dict[str, dict[str, Any]]) -> str:
    """The image series (its UID, a key of ``series``: ``series_info`` per UID) that a structure set or SEG
    labels: the series it names (every frame of reference item, not only the first), else the series
    holding the instances its contours (or frames) reference, else the only series in its frame of
    reference. Ambiguity or no match is an error naming the candidates."""
    kind = str(getattr(ds, "Modality", ""))
    if kind == "SEG":
        named = [str(r.SeriesInstanceUID) for r in getattr(ds, "ReferencedSeriesSequence", None) or []]
        instances = {str(i.ReferencedSOPInstanceUID) for r in getattr(ds, "ReferencedSeriesSequence", None) or []
                     for i in getattr(r, "ReferencedInstanceSequence", None) or []}
    else:
        named, instances = _struct_series(ds), _struct_instances(ds)
    here = [u for u in dict.fromkeys(named) if u in series]
    if len(here) > 1 and instances:  # a registered image's series named too: the contours decide
        here = [u for u in here if series[u]["instances"] & instances] or here
    elif not here and instances:
        here = [u for u, s in series.items() if s["instances"] & instances]
        if len(here) == 1 and named:
            warn(f"{kind} names series {', '.join(named)}, which is not here, but its references point at instances of "
                 f"series {series[here[0]]['name']!r}: labelled that one", path)
    elif not here and not named:  # the references are Type 3: the frame of reference is what is left
        frames = _frames(ds)
        here = [u for u, s in series.items() if s["frame"] and s["frame"] in frames]
        if not here:
            raise MedsegError(f"{kind} names no series and no instances, and no image series here is in its frame of "
                              f"reference {', '.join(sorted(frames)) or '(none)'}", path)
    if len(here) == 1:
        return here[0]
    if not here:
        what = f"series {', '.join(named)}" if named else f"{len(instances)} instances"
        raise MedsegError(f"{kind} references {what}, which is not among the image series found", path)
    names = ", ".join(f"{series[u]['name']!r} ({u})" for u in here)
    raise MedsegError(f"{kind} could label any of {len(here)} series: {names}; keep one series of that frame of "
                      "reference in the folder, or name it in the structure set's RTReferencedSeriesSequence", path)




def label_names(ds: Any, path: Path, mapped: bool) -> tuple[list[str], list[str]]:
    """(names that can be classes, notes for the one warning) of a structure set's ROIs or a SEG's
    segments: point ROIs left out; a name two ROIs share merged into one class when ``mapped`` (option
    rois) names it, else refused (which of the two is meant cannot be guessed)."""
    from collections import Counter

    from medseg.data.formats.dicom_rtstruct import point_rois

    if str(getattr(ds, "Modality", "")) == "SEG":
        return [str(x.SegmentLabel) for x in getattr(ds, "SegmentSequence", None) or []], []
    points = point_rois(ds)
    rois = [(int(r.ROINumber), str(r.ROIName)) for r in getattr(ds, "StructureSetROISequence", None) or []
            if int(r.ROINumber) not in points]
    notes = [f"{path.name}: point or line ROI {n!r} (no area)" for n in points.values()]
    for name, k in Counter(n for _, n in rois).items():
        if k > 1:
            numbers = " and ".join(str(i) for i, n in rois if n == name)
            if not mapped:
                raise MedsegError(f"ROIs {numbers} are both named {name!r}: which is the class cannot be told; name the "
                                  f"classes with -o rois=class:{name} to merge them", path)
            notes.append(f"{path.name}: ROIs {numbers} are both named {name!r}, merged")
    return [n for _, n in rois], notes


def class_map(rois: str | None, found: list[str], root: Path) -> tuple[list[str], dict[str, str]]:
    """(classes, ROI or segment name -> class) from option ``rois`` (``class:Name|Other,...``) or, without it,
    every name found; a class none of whose names any case holds is an error listing the names there are."""
    if not rois:
        return sorted(set(found)), {n: n for n in found}
    classes, names = [], {}
    for part in rois.split(","):
        cls, sep, aliases = part.partition(":")
        if not cls.strip():
            raise MedsegError(f"option rois: {part!r} is not class:Name|Other")
        classes.append(cls.strip())
        wanted = [a.strip() for a in (aliases.split("|") if sep else [cls])]
        for a in wanted:
            names[a] = cls.strip()
        if not set(wanted) & set(found):
            raise MedsegError(f"option rois: class {cls.strip()!r} ({'|'.join(wanted)}) matches no ROI in any case; "
                              f"the names there are: {', '.join(sorted(set(found)))}", root)
    return classes, names


def skipped_line(root: Path, skipped: list[tuple[Path, str]]) -> str:
    """One warning's text naming what a DICOM folder holds that is not read, grouped by reason."""
    groups: dict[str, list[str]] = {}
    for f, why in skipped:
        try:
            name = str(Path(f).relative_to(root))
        except ValueError:
            name = str(f)
        groups.setdefault(why, []).append(name)
    parts = [f"{', '.join(v[:3])}{f' and {len(v) - 3} more' if len(v) > 3 else ''} ({why})" for why, v in groups.items()]
    n = len(skipped)
    return f"skipped {n} {'file that holds' if n == 1 else 'files that hold'} no image series to read: {'; '.join(parts)}"



def series_affine(first_pos: np.ndarray, last_pos: np.ndarray, n: int, row_cos: np.ndarray, col_cos: np.ndarray,
                  pixel_spacing: tuple[float, float], thickness: float) -> np.ndarray:
    """RAS affine of the NIfTI array (i = column, j = row, k = slice in sorted order)."""
    normal = np.cross(row_cos, col_cos)
    step = (last_pos - first_pos) / (n - 1) if n > 1 else normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = row_cos * pixel_spacing[1]  # along a row = increasing column index
    lps[:3, 1] = col_cos * pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = first_pos
    return _LPS_TO_RAS @ lps


def check_even(label: str, order: list[tuple[Path, Any]], dist: np.ndarray, step: float) -> None:
    """A missing slice (a step of about twice the others) or uneven steps are errors naming the series:
    one affine for the whole series would stretch the volume while ``spacing`` says otherwise."""
    if len(dist) < 3:
        return
    steps = np.diff(dist)
    off = np.flatnonzero(np.abs(steps - step) > _STEP_TOLERANCE * step)
    if not off.size:
        return
    i = int(off[0])
    n_missing = int(round(steps[i] / step)) - 1
    folder = Path(order[0][0]).parent
    if n_missing >= 1 and abs(steps[i] - (n_missing + 1) * step) <= _STEP_TOLERANCE * step:
        where = ", ".join(f"{dist[i] + (m + 1) * step:.2f}" for m in range(min(n_missing, 3)))
        raise MedsegError(f"series {label!r} is missing {plural(n_missing, 'slice')}: "
                          f"nothing at {where} mm along the slice normal, between {Path(order[i][0]).name} and "
                          f"{Path(order[i + 1][0]).name} (slice step {step:.3g} mm)", folder)
    raise MedsegError(f"series {label!r} has uneven slice steps ({steps.min():.3g} to {steps.max():.3g} mm, "
                      f"first between {Path(order[i][0]).name} and {Path(order[i + 1][0]).name}); "
                      "medseg reads evenly spaced series only", folder)

__all__ = ["LABEL_MODALITIES", "NOT_IMAGES", "check_even", "class_map", "label_names", "missing_place", "not_an_image",
           "referenced_series",
           "series_affine", "series_info", "skipped_line"]
