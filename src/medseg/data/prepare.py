"""The ``prepare`` stage: native layout -> prepared dataset (see ``prepared.py``).

    from medseg.data.prepare import prepare
    prepare("lgg", "kaggle_3m", "prepared/lgg")

Cases are read in worker processes that write their arrays straight to disk and return only
statistics, so the parent never holds more than a case per worker.
"""
from __future__ import annotations

import json
import math
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.atomic import atomic_write_text
from medseg.data.formats import CaseSpec, DatasetSpec, get_reader
from medseg.data.prepared import CaseRecord, PreparedWriter, case_filename, done_path
from medseg.data.resample import needs_resampling, resample, shape_for, target_spacing
from medseg.data.splits import group_splits, make_splits, own_split, warn_shared_patients
from medseg.errors import MedsegError, MedsegWarning, warn
from medseg.machine import die_with

_SAMPLES_PER_CASE = 20_000
_PERCENTILES = (0.5, 1.0, 5.0, 50.0, 95.0, 99.0, 99.5)


@dataclass
class _CaseResult:
    record: CaseRecord
    intensity_sample: np.ndarray  # [c, n] float32
    intensity_min: np.ndarray  # [c] exact, over every voxel
    intensity_max: np.ndarray  # [c]
    class_voxels: np.ndarray  # [k] int64
    class_slices: np.ndarray  # [k] int64
    voxels: int
    slices: int
    warnings: list[str] = field(default_factory=list)


def _process_case(fmt: str, options: dict[str, Any], spec: DatasetSpec, case: CaseSpec, tmp: str) -> _CaseResult:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MedsegWarning)
        result = _read_case(fmt, options, spec, case, tmp)
    # warnings raised in a worker process travel back with the result and are shown by the parent
    result.warnings = [str(w.message) for w in caught if issubclass(w.category, MedsegWarning)]
    writer_root = Path(tmp)
    np.save(writer_root / case_filename(case.id, "sample"), result.intensity_sample)
    done = {"record": asdict(result.record), "min": result.intensity_min.tolist(), "max": result.intensity_max.tolist(),
            "class_voxels": result.class_voxels.tolist(), "class_slices": result.class_slices.tolist(),
            "voxels": result.voxels, "slices": result.slices, "warnings": result.warnings}
    atomic_write_text(done_path(writer_root, case.id), json.dumps(done))  # last: the case is complete
    return result


def _resumed(root: Path, done: dict[str, Any]) -> _CaseResult:
    sample = np.load(root / case_filename(done["record"]["id"], "sample"))
    r = _CaseResult(CaseRecord(**done["record"]), sample, np.array(done["min"]), np.array(done["max"]),
                    np.array(done["class_voxels"], np.int64), np.array(done["class_slices"], np.int64),
                    int(done["voxels"]), int(done["slices"]))
    r.warnings = list(done.get("warnings") or [])
    return r


def _read_case(fmt: str, options: dict[str, Any], spec: DatasetSpec, case: CaseSpec, tmp: str) -> _CaseResult:
    reader = get_reader(fmt, **options)
    data = reader.read(spec, case)
    where = case.sources.get("image", case.id)
    if data.image.shape[1] != len(spec.channels):
        raise MedsegError(f"case {case.id!r} has {data.image.shape[1]} channels, the data set "
                          f"{len(spec.channels)} ({', '.join(spec.channels)})", where)
    writer_root = Path(tmp)
    img_rel = case_filename(case.id, "img")
    np.save(writer_root / img_rel, np.ascontiguousarray(data.image))
    seg_rel = None
    k = len(spec.classes)
    z = data.image.shape[0]
    class_voxels = np.zeros(k, np.int64)
    class_slices = np.zeros(k, np.int64)
    foreground = fg_slices = None
    if data.mask is not None:
        if data.mask.shape[1] != k:
            raise MedsegError(f"mask has {data.mask.shape[1]} class channels, expected {k}", case.id)
        mask = np.ascontiguousarray(data.mask, dtype=np.uint8)
        seg_rel = case_filename(case.id, "seg")
        np.save(writer_root / seg_rel, mask)
        per_slice = mask.reshape(z, k, -1).sum(axis=2)  # [z, k]
        class_voxels = per_slice.sum(axis=0).astype(np.int64)
        class_slices = (per_slice > 0).sum(axis=0).astype(np.int64)
        vox = z * mask.shape[2] * mask.shape[3]
        foreground = [float(v) / vox for v in class_voxels]
        fg_slices = [np.flatnonzero(per_slice[:, j]).tolist() for j in range(k)]
    # crc32, not hash(): str hashes are salted per process, which made fingerprints differ run to run
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    # sample voxel positions (z, y, x) and gather all channels there: no transposed copy of the case
    zc, cc, hc, wc = data.image.shape
    n_vox = zc * hc * wc
    n = min(_SAMPLES_PER_CASE, n_vox)
    flat_idx = rng.choice(n_vox, size=n, replace=False) if n < n_vox else np.arange(n_vox)
    zi, yi, xi = np.unravel_index(flat_idx, (zc, hc, wc))
    sample = np.asarray(data.image[zi, :, yi, xi].T, dtype=np.float32)  # [c, n]
    sources = [str(v) for v in case.sources.values() if isinstance(v, (str, Path))]
    rec = CaseRecord(
        id=case.id,
        patient=case.patient,
        shape=list(data.image.shape),
        spacing=[float(s) for s in data.spacing],
        image=img_rel,
        mask=seg_rel,
        dtype=str(data.image.dtype),
        sources=sources,
        foreground=foreground,
        fg_slices=fg_slices,
        affine=None if data.affine is None else np.asarray(data.affine, float).tolist(),
        slices=data.slices,
        meta=data.meta,
    )
    lo = data.image.min(axis=(0, 2, 3)).astype(np.float64)
    hi = data.image.max(axis=(0, 2, 3)).astype(np.float64)
    return _CaseResult(rec, sample, lo, hi, class_voxels, class_slices, z * data.image.shape[2] * data.image.shape[3], z)


def _fingerprint(spec: DatasetSpec, results: list[_CaseResult]) -> dict[str, Any]:
    samples = np.concatenate([r.intensity_sample for r in results], axis=1)
    lo = np.min([r.intensity_min for r in results], axis=0)
    hi = np.max([r.intensity_max for r in results], axis=0)
    spacings = np.array([r.record.spacing for r in results])
    shapes = np.array([r.record.shape for r in results])
    fp: dict[str, Any] = {
        "intensity": {
            name: {
                "mean": float(samples[c].mean()),
                "std": float(samples[c].std()),
                "min": float(lo[c]),  # exact; mean, std and percentiles come from a per-case sample
                "max": float(hi[c]),
                "percentiles": {str(p): float(v) for p, v in zip(_PERCENTILES, np.percentile(samples[c], _PERCENTILES))},
            }
            for c, name in enumerate(spec.channels)
        },
        "spacing": {
            "median": np.median(spacings, axis=0).tolist(),
            "min": spacings.min(axis=0).tolist(),
            "max": spacings.max(axis=0).tolist(),
        },
        "shape": {
            "median": np.median(shapes, axis=0).tolist(),
            "min": shapes.min(axis=0).tolist(),
            "max": shapes.max(axis=0).tolist(),
        },
        "n_cases": len(results),
        "n_patients": len({r.record.patient for r in results}),
        "n_slices": int(sum(r.slices for r in results)),
    }
    if spec.has_masks:
        voxels = sum(r.voxels for r in results)
        cv = np.sum([r.class_voxels for r in results], axis=0)
        cs = np.sum([r.class_slices for r in results], axis=0)
        cc = np.sum([r.class_voxels > 0 for r in results], axis=0)
        fp["classes"] = {
            name: {
                "voxel_fraction": float(cv[j]) / voxels,
                "slice_fraction": float(cs[j]) / fp["n_slices"],
                "case_fraction": float(cc[j]) / len(results),
            }
            for j, name in enumerate(spec.classes)
        }
    return fp


def prepare(
    fmt: str,
    input: str | Path,
    output: str | Path,
    *,
    options: dict[str, Any] | None = None,
    folds: int = 5,
    seed: int = 0,
    split: str = "auto",
    overwrite: bool = False,
    workers: int | None = None,
    require_masks: bool = True,
    progress: bool = False,
    spacing: str = "auto",
    group_regex: str | None = None,
) -> Path:
    """Read ``input`` with the ``fmt`` reader and write a prepared dataset to ``output``.

    ``split``: "auto" keeps the dataset's own train/valid split when its reader reports one (a
    Roboflow export), else makes ``folds`` patient-level folds; "kfold" always makes the folds; "group"
    makes one fold per group of patients, the first capture group of ``group_regex`` in the patient id.
    ``spacing`` (volumes only): "auto" resamples the cases whose spacing differs from the target spacing
    (``resample.target_spacing``) to it, "native" keeps every case as read, "Z,Y,X" sets the target (mm)."""
    if workers is not None and workers < 1:
        raise MedsegError(f"--workers must be 1 or more, got {workers}")
    if split not in ("auto", "kfold", "group"):
        raise MedsegError(f"--split must be 'auto', 'kfold' or 'group', got {split!r}")
    if (split == "group") != (group_regex is not None):
        raise MedsegError("--split group and --group-regex go together (the regex names each patient's group)")
    options = dict(options or {})
    reader = get_reader(fmt, **options)
    root = Path(input)
    if not root.exists():
        raise MedsegError("input does not exist", root)
    spec = reader.survey(root, require_masks=require_masks)
    if not spec.cases:
        raise MedsegError(f"no cases found for format {fmt!r}", root)
    ids = [c.id for c in spec.cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise MedsegError(f"duplicate case ids {dup}", root)
    _check_names(spec, root)
    warn_shared_patients(spec)
    spacing_arg = _spacing_arg(spacing, spec.spatial_dims, root)
    try:
        by_group = group_splits(ids, [c.patient for c in spec.cases], group_regex) if split == "group" else None
    except MedsegError as e:
        raise MedsegError(e.problem, root) from None
    key = {"format": fmt, "input": str(root.resolve()), "options": options, "masks": require_masks,
           "cases": len(spec.cases), "version": 1, "spacing": spacing}
    writer = PreparedWriter(output, overwrite=overwrite, key=key)
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    t0 = time.perf_counter()
    results: dict[str, _CaseResult] = {}
    known = set(ids)
    for cid, done in writer.done().items():
        if cid in known:
            try:
                results[cid] = _resumed(writer.tmp, done)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # read again below
    todo = [c for c in spec.cases if c.id not in results]
    if results:
        warn(f"resuming an interrupted prepare: {len(results)} of {len(spec.cases)} cases already written", writer.tmp)
    try:
        bar = _progress(progress, len(spec.cases), f"prepare {fmt}")
        with bar:
            task = bar.add_task(f"prepare {fmt}", total=len(spec.cases), completed=len(results)) if progress else None
            if workers <= 1 or len(todo) <= 1:
                for case in todo:
                    results[case.id] = _process_case(fmt, options, spec, case, str(writer.tmp))
                    if progress:
                        bar.advance(task)
            else:
                # forkserver, not fork: forking a process whose other threads hold locks (torch,
                # onnxruntime, a test runner) deadlocks the children; seen in the test suite
                import multiprocessing
                from concurrent.futures import as_completed

                with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"),
                                         initializer=die_with, initargs=(os.getpid(),)) as pool:
                    futs = {pool.submit(_process_case, fmt, options, spec, c, str(writer.tmp)): c.id for c in todo}
                    try:
                        for fut in as_completed(futs):
                            results[futs[fut]] = fut.result()
                            if progress:
                                bar.advance(task)
                    except BaseException:
                        for f in futs:
                            f.cancel()
                        raise
        for c in spec.cases:
            for w in results[c.id].warnings:
                warn(w)
        ordered = [results[c.id] for c in spec.cases]
        fp = _fingerprint(spec, ordered)  # of the source, before any resampling
        target = _target(spacing_arg, spec, ordered, reader.has_spacing)
        if target is not None:
            fp["target_spacing"] = target
            _resample_cases(ordered, writer.tmp, target)
        fp["prepare_seconds"] = round(time.perf_counter() - t0, 3)
        info = {
            "name": Path(output).name,
            "source_format": fmt,
            "source": str(root.resolve()),
            "reader_options": options,
            "channels": spec.channels,
            "classes": spec.classes,
            "class_kind": spec.class_kind,
            "spatial_dims": spec.spatial_dims,
            "has_masks": spec.has_masks,
            "spacing_known": bool(reader.has_spacing),
            "meta": spec.meta,
            "fingerprint": fp,
            "cases": [r.record for r in ordered],
        }
        splits = None
        n_patients = len({c.patient for c in spec.cases})
        own = own_split(spec.cases) if split == "auto" else None
        if spec.has_masks and by_group is not None:
            splits = by_group
        elif spec.has_masks and own is not None:
            splits = own
        elif spec.has_masks and n_patients >= 2:
            if folds > n_patients:
                warn(f"{folds} folds asked for but the data set has {n_patients} patients: made {n_patients} folds")
            splits = make_splits(
                ids,
                [c.patient for c in spec.cases],
                [r.record.has_foreground for r in ordered],
                k=min(folds, n_patients),
                seed=seed,
            )
        elif spec.has_masks:  # one patient: nothing to validate on, but --fold full trains on it
            warn(f"the data set has one patient ({spec.cases[0].patient}): no validation folds; train it with --fold full")
            splits = {"k": 0, "seed": seed, "grouped_by": "patient", "folds": []}
        return writer.finish(info, splits)
    except KeyboardInterrupt:
        # kept: the next run with the same input resumes from the cases written so far
        raise
    except BaseException:
        writer.abort()
        raise


def _spacing_arg(spacing: str, spatial_dims: int, root: Path) -> str | list[float]:
    """``--spacing`` checked before any case is read: "auto", "native" or [z, y, x] mm."""
    if spacing in ("auto", "native"):
        return spacing
    try:
        target = [float(v) for v in spacing.split(",")]
    except ValueError:
        target = []
    if len(target) != 3 or not all(math.isfinite(v) and v > 0 for v in target):
        raise MedsegError(f"--spacing {spacing!r}: expected 'auto', 'native' or three positive numbers Z,Y,X in mm",
                          root)
    if spatial_dims != 3:
        raise MedsegError(f"--spacing {spacing}: this layout stores independent 2D slices; only volumes are "
                          "resampled", root)
    return target


def _target(spacing: str | list[float], spec: DatasetSpec, results: list[_CaseResult],
            has_spacing: bool) -> list[float] | None:
    """The spacing the cases are stored at, or None to keep each as read (slice layouts, unknown voxel
    sizes, ``native``, or every case already at the target)."""
    if spacing == "native" or spec.spatial_dims != 3 or (spacing == "auto" and not has_spacing):
        return None
    target = spacing if isinstance(spacing, list) else target_spacing(
        [r.record.spacing for r in results], [[r.record.shape[0], *r.record.shape[2:]] for r in results])
    if not any(needs_resampling(r.record.spacing, target) for r in results):
        return None
    return target


def _resample_cases(results: list[_CaseResult], tmp: Path, target: list[float]) -> None:
    """Each case off the target spacing rewritten at it. New array names, then the record, then the old
    arrays go: a prepare killed half-way resumes with every case in one state or the other."""
    for r in results:
        rec = r.record
        if rec.native is not None or not needs_resampling(rec.spacing, target):
            continue
        size = shape_for(rec.shape, rec.spacing, target)
        where = rec.sources[0] if rec.sources else rec.id
        img = resample(np.load(tmp / rec.image, mmap_mode="r"), size, where=where)
        old = [rec.image, rec.mask]
        rec.native = {"shape": list(rec.shape), "spacing": list(rec.spacing)}
        rec.image = case_filename(rec.id, "img_resampled")
        np.save(tmp / rec.image, img)
        if rec.mask is not None:
            mask = resample(np.load(tmp / rec.mask, mmap_mode="r"), size, mask=True)
            rec.mask = case_filename(rec.id, "seg_resampled")
            np.save(tmp / rec.mask, mask)
            per_slice = mask.reshape(mask.shape[0], mask.shape[1], -1).sum(axis=2)
            rec.foreground = [float(v) / (per_slice.shape[0] * size[1] * size[2]) for v in per_slice.sum(axis=0)]
            rec.fg_slices = [np.flatnonzero(per_slice[:, j]).tolist() for j in range(per_slice.shape[1])]
        rec.shape = [size[0], img.shape[1], size[1], size[2]]
        rec.spacing = [float(v) for v in target]
        done = json.loads(done_path(tmp, rec.id).read_text())
        done["record"] = asdict(rec)
        atomic_write_text(done_path(tmp, rec.id), json.dumps(done))
        for rel in old:
            if rel is not None:
                (tmp / rel).unlink(missing_ok=True)




def _check_names(spec: DatasetSpec, root: Path) -> None:
    """Case ids and patient names end up in JSON and file names: bytes that are not UTF-8 (a folder
    named in another encoding) would fail there, far from their cause."""
    for c in spec.cases:
        for what, text in (("case id", c.id), ("patient", c.patient)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raw = os.fsencode(text)
                where = next((str(v) for v in c.sources.values() if isinstance(v, str)), str(root))
                raise MedsegError(f"{what} {raw!r} is not valid UTF-8 (a name in another encoding); rename it",
                                  os.fsencode(where).decode("utf-8", "replace")) from None


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _progress(enabled: bool, total: int, label: str):
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
