"""DICOM RT Structure Sets (RTSTRUCT): the contours radiotherapy planning systems read, written from masks
and rasterised back onto the referenced series.

    write_rtstruct(source_files, mask, classes, out_path, algorithm="lgg-unet")
    mask = read_rtstruct(path, source_files, classes)        # [z, k, h, w] uint8, source order

Writing: per slice and class, the closed planar contours of the mask at level 0.5 (contourpy's marching
squares on the mask padded by one pixel, so contours close at the image border), in patient coordinates
from each slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing, each referencing its
slice's SOP instance. The contour runs half-way between the pixel centres inside and outside, so filling
it again selects exactly the pixel centres inside: the round trip is exact except for structures thinner
than a pixel's diagonal. Reading fills each contour's pixel centres with the even-odd rule (an inner
contour is a hole) and refuses contours off their slice's plane, outside the image or crossing themselves; a ROI without
contours reads as empty, with a warning.
"""
from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_path
from medseg.errors import MedsegError, warn
from medseg.text import plural

RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired), the referenced-study class used by RTSTRUCTs
COLOURS = [[230, 25, 75], [60, 180, 75], [67, 99, 216], [245, 130, 49], [145, 30, 180], [66, 212, 244]]
PLANE_TOLERANCE = 0.5  # mm off a slice's plane before a contour point belongs to no slice


def _geometry(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    return ipp, iop[:3], iop[3:], dr, dc


def slice_contours(m: np.ndarray) -> list[np.ndarray]:
    """Closed contours [n, 2] (row, column) of a 2D 0/1 mask at level 0.5."""
    import contourpy

    pad = np.pad(m.astype(np.float64), 1)
    gen = contourpy.contour_generator(z=pad, line_type=contourpy.LineType.Separate)
    out = []
    for line in gen.lines(0.5):
        pts = np.asarray(line)[:, ::-1] - 1.0  # (x, y) = (column, row) in padded indices -> (row, column)
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]  # DICOM closes a CLOSED_PLANAR contour implicitly
        if len(pts) >= 3:
            out.append(pts)
    return out


def crossing_loops(pts: np.ndarray) -> float | None:
    """None for a closed polygon [n, 2] that does not cross (or touch) itself; else the area (in the
    points' units squared) of the largest loop its crossings cut off: of every face of its arrangement but
    the largest (0 for a contour that runs back along itself). GEOS's sweep: O(n log n) time and O(n)
    memory, for contours of any length."""
    import shapely

    ring = np.vstack([pts, pts[:1]])
    line = shapely.LineString(ring)
    if shapely.is_simple(line):
        return None
    faces = shapely.get_parts(shapely.polygonize(shapely.get_parts(shapely.union_all(line))))
    areas = sorted((float(f.area) for f in faces), reverse=True)
    return areas[1] if len(areas) > 1 else 0.0


def fill_contour(pts: np.ndarray, h: int, w: int) -> tuple[slice, slice, np.ndarray] | None:
    """The pixel centres inside a closed polygon [n, 2] (row, column) by the even-odd rule, on its bounding
    box: (rows, columns, bool mask), None when no centre is inside. A scan line per pixel row: each edge
    that crosses it (half-open in the row, so a vertex on the line counts once) toggles every centre to
    the right of the crossing; the same centres as a point-in-polygon test of each centre."""
    r, c = pts[:, 0], pts[:, 1]
    r2, c2 = np.roll(r, -1), np.roll(c, -1)
    r0, r1 = max(0, int(np.ceil(r.min()))), min(h - 1, int(np.floor(r.max())))
    c0, c1 = max(0, int(np.ceil(c.min()))), min(w - 1, int(np.floor(c.max())))
    if r0 > r1 or c0 > c1:
        return None
    rows = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
    lo, hi = np.minimum(r, r2)[None], np.maximum(r, r2)[None]
    row_i, edge = np.nonzero((rows >= lo) & (rows < hi))
    t = (rows[row_i, 0] - r[edge]) / (r2[edge] - r[edge])  # never 0/0: a horizontal edge crosses no row
    x = c[edge] + t * (c2[edge] - c[edge])
    start = np.clip(np.floor(x).astype(np.int64) + 1 - c0, 0, c1 - c0 + 1)  # first centre right of the crossing
    toggles = np.zeros((r1 - r0 + 1, c1 - c0 + 2), np.int32)
    np.add.at(toggles, (row_i, start), 1)
    inside = (np.cumsum(toggles, axis=1)[:, :-1] & 1).astype(bool)
    return slice(r0, r1 + 1), slice(c0, c1 + 1), inside


def write_rtstruct(source_files: Sequence[str | Path], mask: np.ndarray, classes: Sequence[str], out: str | Path,
                   algorithm: str = "medseg", notes: Sequence[str] | None = None) -> Path:
    """``mask[z, k, h, w]`` (z in the order of ``source_files``) as one RTSTRUCT at ``out``: one ROI per class;
    ``notes`` (one per class, e.g. the quality estimate's review line) go into each ROI's description and
    observation description."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in source_files]
    if len(sources) != mask.shape[0]:
        raise MedsegError(f"mask has {mask.shape[0]} slices, the series {len(sources)}", Path(source_files[0]).parent)
    first = sources[0]
    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_CLASS, meta.MediaStorageSOPInstanceUID
    for tag in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, tag, getattr(first, tag, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.OperatorsName = generate_uid(), 9002, ""
    ds.SeriesDescription = f"{algorithm} contours"[:64]
    ds.Manufacturer, ds.ManufacturerModelName = "medseg", algorithm[:64]
    ds.InstanceNumber = 1
    ds.StructureSetLabel = algorithm[:16]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.StructureSetDate, ds.StructureSetTime
    frame = str(first.FrameOfReferenceUID)
    ds.FrameOfReferenceUID = frame  # the Frame of Reference module: the source series' frame
    ds.PositionReferenceIndicator = getattr(first, "PositionReferenceIndicator", "")

    def image_ref(s) -> Dataset:
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = s.SOPClassUID, s.SOPInstanceUID
        return r

    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = Seq([image_ref(s) for s in sources])
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = STUDY_COMPONENT, first.StudyInstanceUID
    study.RTReferencedSeriesSequence = Seq([series])
    for_ref = Dataset()
    for_ref.FrameOfReferenceUID = frame
    for_ref.RTReferencedStudySequence = Seq([study])
    ds.ReferencedFrameOfReferenceSequence = Seq([for_ref])
    rois, contours, observations = [], [], []
    for j, name in enumerate(classes):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = j + 1, frame, str(name)[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        if notes:
            roi.ROIDescription = str(notes[j])[:64]
        rois.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = j + 1
        rc.ROIDisplayColor = COLOURS[j % len(COLOURS)]
        items = []
        for z, s in enumerate(sources):
            if not mask[z, j].any():
                continue
            ipp, xr, yc, dr, dc = _geometry(s)
            for pts in slice_contours(mask[z, j]):
                xyz = ipp[None] + pts[:, 1:2] * dc * xr[None] + pts[:, 0:1] * dr * yc[None]
                c = Dataset()
                c.ContourImageSequence = Seq([image_ref(s)])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(xyz)
                c.ContourData = [f"{v:.4f}" for v in xyz.ravel()]
                items.append(c)
        if items:
            rc.ContourSequence = Seq(items)
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = j + 1, j + 1
        obs.RTROIInterpretedType, obs.ROIInterpreter = "ORGAN", ""
        if notes:
            obs.ROIObservationDescription = str(notes[j])[:64]
        observations.append(obs)
    ds.StructureSetROISequence = Seq(rois)
    ds.ROIContourSequence = Seq(contours)
    ds.RTROIObservationsSequence = Seq(observations)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pydicom.dcmwrite(str(tmp), ds, enforce_file_format=True)
    return out


def point_rois(ds) -> dict[int, str]:
    """{ROI number: name} of the ROIs that enclose no area: points (an isocentre, a marker) and lines, i.e.
    every contour POINT or OPEN_PLANAR / OPEN_NONPLANAR, or interpreted as MARKER / ISOCENTER /
    REGISTRATION. They are no class."""
    names = {int(r.ROINumber): str(r.ROIName) for r in getattr(ds, "StructureSetROISequence", [])}
    out = {}
    for o in getattr(ds, "RTROIObservationsSequence", []) or []:
        if str(getattr(o, "RTROIInterpretedType", "")).upper() in ("MARKER", "ISOCENTER", "REGISTRATION"):
            n = int(o.ReferencedROINumber)
            out[n] = names.get(n, str(n))
    for rc in getattr(ds, "ROIContourSequence", []) or []:
        items = list(getattr(rc, "ContourSequence", []) or [])
        if items and all(str(getattr(c, "ContourGeometricType", "")) in NO_AREA for c in items):
            n = int(rc.ReferencedROINumber)
            out[n] = names.get(n, str(n))
    return out


NO_AREA = ("POINT", "OPEN_PLANAR", "OPEN_NONPLANAR")  # contour types that enclose nothing
CROSSING_TOLERANCE = 0.5  # pixels' area: loops of a self-crossing contour up to this are filled even-odd, warned


def read_rtstruct(path: str | Path, source_files: Sequence[str | Path], classes: Sequence[str],
                  names: dict[str, str] | None = None, crossing_tolerance: float = CROSSING_TOLERANCE) -> np.ndarray:
    """The RTSTRUCT's ROIs named like ``classes`` (or mapped through ``names``, ROI name -> class, which
    skips the ROIs it lacks) rasterised onto the series, ``[z, k, h, w]`` uint8; ROIs mapped to one class
    are merged. POINT ROIs are skipped; a contour that crosses itself is filled by the even-odd rule when
    its loops are at most ``crossing_tolerance`` pixels' area (with a warning), else refused."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(str(path))
        frames = {str(f.FrameOfReferenceUID) for f in ds.ReferencedFrameOfReferenceSequence}
        rois = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    except Exception as e:
        raise MedsegError(f"not a readable RTSTRUCT ({type(e).__name__}: {e})", path) from None
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in source_files]
    if str(sources[0].FrameOfReferenceUID) not in frames:
        raise MedsegError(f"references frame of reference {sorted(frames)[0]}, the series is in "
                          f"{sources[0].FrameOfReferenceUID}", path)
    points = point_rois(ds)
    index = {c: j for j, c in enumerate(classes)}
    target = {n: (names.get(r) if names is not None else r) for n, r in rois.items() if n not in points}
    unknown = [rois[n] for n, c in target.items() if c is not None and c not in index]
    if unknown:
        raise MedsegError(f"ROI {unknown[0]!r} matches no class ({', '.join(classes)})", path)
    h, w = int(sources[0].Rows), int(sources[0].Columns)
    geo = [_geometry(s) for s in sources]
    uid_z = {str(s.SOPInstanceUID): z for z, s in enumerate(sources)}
    out = np.zeros((len(sources), len(classes), h, w), np.uint8)
    crossed: list[str] = []
    open_lines: list[str] = []
    for rc in ds.ROIContourSequence:
        number = int(rc.ReferencedROINumber)
        name = rois.get(number)
        if target.get(number) is None:
            continue  # a ROI the class mapping leaves out, or a point
        items = list(getattr(rc, "ContourSequence", []) or [])
        if not items:  # an empty structure (a prediction that found none): read as empty, said
            warn(f"ROI {name!r} has no contours: read as empty", path)
            continue
        j = index[target[number]]
        filled = np.zeros((len(sources), h, w), np.uint8)
        for c in items:
            kind = str(getattr(c, "ContourGeometricType", "CLOSED_PLANAR"))
            if kind in NO_AREA:  # a point or a line beside the ROI's areas encloses nothing
                open_lines.append(f"{name} ({kind})")
                continue
            if kind != "CLOSED_PLANAR":
                raise MedsegError(f"ROI {name!r}: a contour of type {kind!r} is not one DICOM defines", path)
            xyz = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
            if len(xyz) < 3:
                raise MedsegError(f"ROI {name!r}: a contour of {len(xyz)} point(s) encloses no area", path)
            if not np.isfinite(xyz).all():
                raise MedsegError(f"ROI {name!r}: a contour has a coordinate that is NaN or infinite", path)
            ref = getattr(c, "ContourImageSequence", None)
            if ref:
                z = uid_z.get(str(ref[0].ReferencedSOPInstanceUID))
                if z is None:
                    raise MedsegError(f"ROI {name!r}: a contour references instance {ref[0].ReferencedSOPInstanceUID}, "
                                      "not in the series", path)
            else:  # no reference: the slice whose plane holds the points
                dists = [abs(float((xyz[0] - g[0]) @ np.cross(g[1], g[2]))) for g in geo]
                z = int(np.argmin(dists))
            ipp, xr, yc, dr, dc = geo[z]
            d = xyz - ipp[None]
            off = np.abs(d @ np.cross(xr, yc))
            if off.max() > PLANE_TOLERANCE:
                raise MedsegError(f"ROI {name!r}: a contour lies {off.max():.2f} mm off slice {z + 1}'s plane", path)
            pts = np.stack([d @ yc / dr, d @ xr / dc], 1)  # (row, column)
            eps = 0.01  # pixels: the file's 4 decimals of mm; a mask touching the border has contours at -0.5 exactly
            if pts.min() < -0.5 - eps or pts[:, 0].max() > h - 0.5 + eps or pts[:, 1].max() > w - 0.5 + eps:
                raise MedsegError(f"ROI {name!r}: a contour on slice {z + 1} runs outside the image", path)
            loop = crossing_loops(pts)
            if loop is not None and loop > crossing_tolerance:
                raise MedsegError(f"ROI {name!r}: a contour on slice {z + 1} crosses itself, cutting off a loop of "
                                  f"{loop:.2f} pixels' area (tolerance {crossing_tolerance:g}: option crossing_tolerance)",
                                  path)
            if loop is not None:
                crossed.append(f"{name} slice {z + 1}")
            f = fill_contour(pts, h, w)
            if f is not None:
                filled[z, f[0], f[1]] ^= f[2]  # even-odd: a contour inside another is a hole
        out[:, j] |= filled
    if open_lines:
        warn(f"{plural(len(open_lines), 'contour')} that enclose no area skipped: {', '.join(sorted(set(open_lines)))}", path)
    if crossed:
        warn(f"{plural(len(crossed), 'contour')} cross themselves in loops under {crossing_tolerance:g} pixels' area, "
             f"filled by the even-odd rule: {', '.join(crossed[:5])}{' ...' if len(crossed) > 5 else ''}", path)
    return out


__all__ = ["write_rtstruct", "read_rtstruct", "slice_contours", "crossing_loops", "fill_contour"]
