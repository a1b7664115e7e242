"""The ``prepare`` stage: native layout -> prepared dataset (see ``prepared.py``).

    from medseg.data.prepare import prepare
    prepare("lgg", "kaggle_3m", "prepared/lgg")

Cases are read in worker processes that write their arrays straight to disk and return only
statistics, so the parent never holds more than a case per worker.
"""
from __future__ import annotations

import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.formats import CaseSpec, DatasetSpec, get_reader
from medseg.data.prepared import CaseRecord, PreparedWriter
from medseg.data.splits import make_splits
from medseg.errors import MedsegError

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


def _process_case(fmt: str, options: dict[str, Any], spec: DatasetSpec, case: CaseSpec, tmp: str) -> _CaseResult:
    reader = get_reader(fmt, **options)
    data = reader.load(spec, case)
    data.check(case.sources.get("image", case.id))
    writer_root = Path(tmp)
    from medseg.data.prepared import case_filename

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
) -> Path:
    """Read ``input`` with the ``fmt`` reader and write a prepared dataset to ``output``.

    ``split``: "auto" keeps the dataset's own train/valid split when its reader reports one (a
    Roboflow export), else makes ``folds`` patient-level folds; "kfold" always makes the folds."""
    if split not in ("auto", "kfold"):
        raise MedsegError(f"--split must be 'auto' or 'kfold', got {split!r}")
    options = dict(options or {})
    reader = get_reader(fmt, **options)
    root = Path(input)
    if not root.exists():
        raise MedsegError("input does not exist", root)
    spec = reader.scan(root, require_masks=require_masks)
    if not spec.cases:
        raise MedsegError(f"no cases found for format {fmt!r}", root)
    ids = [c.id for c in spec.cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise MedsegError(f"duplicate case ids {dup}", root)
    writer = PreparedWriter(output, overwrite=overwrite)
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    t0 = time.perf_counter()
    results: dict[str, _CaseResult] = {}
    try:
        bar = _progress(progress, len(spec.cases), f"prepare {fmt}")
        with bar:
            task = bar.add_task(f"prepare {fmt}", total=len(spec.cases)) if progress else None
            if workers <= 1:
                for case in spec.cases:
                    results[case.id] = _process_case(fmt, options, spec, case, str(writer.tmp))
                    if progress:
                        bar.advance(task)
            else:
                # forkserver, not fork: forking a process whose other threads hold locks (torch,
                # onnxruntime, a test runner) deadlocks the children; seen in the test suite
                import multiprocessing

                with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
                    futs = {pool.submit(_process_case, fmt, options, spec, c, str(writer.tmp)): c.id for c in spec.cases}
                    from concurrent.futures import as_completed

                    for fut in as_completed(futs):
                        results[futs[fut]] = fut.result()
                        if progress:
                            bar.advance(task)
        ordered = [results[c.id] for c in spec.cases]
        fp = _fingerprint(spec, ordered)
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
            "meta": spec.meta,
            "fingerprint": fp,
            "cases": [r.record for r in ordered],
        }
        splits = None
        n_patients = len({c.patient for c in spec.cases})
        own = own_split(spec.cases) if split == "auto" else None
        if spec.has_masks and own is not None:
            splits = own
        elif spec.has_masks and n_patients >= 2:
            splits = make_splits(
                ids,
                [c.patient for c in spec.cases],
                [r.record.has_foreground for r in ordered],
                k=min(folds, n_patients),
                seed=seed,
            )
        return writer.finish(info, splits)
    except BaseException:
        writer.abort()
        raise


_TRAIN, _VAL = ("train",), ("valid", "val", "validation")


def own_split(cases: list[Any]) -> dict | None:
    """``splits.json`` with one fold, the dataset's own train/valid split, when the reader reported one
    with both sides non-empty (test cases are in neither side) and no patient on both sides."""
    train = [c.id for c in cases if (c.split or "").lower() in _TRAIN]
    val = [c.id for c in cases if (c.split or "").lower() in _VAL]
    if not train or not val:
        return None
    by_id = {c.id: c.patient for c in cases}
    shared = sorted({by_id[i] for i in train} & {by_id[i] for i in val})
    if shared:
        raise MedsegError(f"the dataset's own split has patient {shared[0]!r} on both sides "
                          f"(train and valid); use --split kfold for patient-level folds")
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.split or "none"] = counts.get(c.split or "none", 0) + 1
    return {"k": 1, "seed": None, "grouped_by": "the dataset's own split", "source_split": counts,
            "folds": [{"train": train, "val": val}]}


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
