"""Benchmark ``prepare`` on the real LGG set and random slice reads from the prepared dataset.

    .venv/bin/python benchmarks/prepare.py [--runs 3] [--workers N] [--reads 1000]

Prints a table and writes benchmarks/results/prepare.json: slices/s (median of --runs), peak RSS, the
size of the largest case's image + mask arrays (prepare should hold about one case per worker), and
the median time to read a random 2D slice (image + mask) from the prepared dataset. Peak RSS comes from
``resource.getrusage`` (parent: RUSAGE_SELF; workers: RUSAGE_CHILDREN, the largest finished child).
Check it runs with tiny arguments: ``--src tests/fixtures/lgg_tiny/kaggle_3m --runs 1 --reads 20
--out /tmp/prepare.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: kilobytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", type=Path, default=SHARED / "lgg" / "kaggle_3m")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="default: prepare's (min(CPU count, 4))")
    ap.add_argument("--reads", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prepare.json")
    args = ap.parse_args()
    if not args.src.is_dir():
        sys.exit(f"error: {args.src}: LGG data not found (set MEDSEG_SHARED_DATA)")

    from rich.console import Console
    from rich.table import Table

    from medseg.data.prepare import prepare
    from medseg.data.prepared import PreparedDataset

    workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, 4)
    tmp = Path(tempfile.mkdtemp(prefix="medseg-bench-"))
    try:
        times, n_slices = [], 0
        for run in range(args.runs):
            out = tmp / f"lgg{run}"
            t0 = time.perf_counter()
            prepare("lgg", args.src, out, workers=workers)
            times.append(time.perf_counter() - t0)
            n_slices = PreparedDataset.open(out).fingerprint["n_slices"]
            if run:
                shutil.rmtree(out)
        # taken before the read test: memory-mapped pages it touches would count as RSS
        rss_parent, rss_worker = _rss_mb(resource.RUSAGE_SELF), _rss_mb(resource.RUSAGE_CHILDREN)
        ds = PreparedDataset.open(tmp / "lgg0")
        # random 2D slice reads (image + mask), memmaps opened once as a DataLoader worker would
        rng = np.random.default_rng(0)
        for i in range(len(ds)):
            ds.image(i), ds.mask(i)
        lat = []
        for _ in range(args.reads):
            i = int(rng.integers(len(ds)))
            z = int(rng.integers(ds.cases[i].shape[0]))
            t0 = time.perf_counter()
            img = np.array(ds.image(i)[z])
            msk = np.array(ds.mask(i)[z])
            lat.append(time.perf_counter() - t0)
        assert img.shape == (3, 256, 256) and msk.shape == (1, 256, 256)
        disk = sum(f.stat().st_size for f in (tmp / "lgg0").rglob("*") if f.is_file())
        # what "one case's arrays" weighs: compare with the peak RSS of a worker (or of the parent at --workers 1)
        largest = max(
            int(np.prod(c.shape)) * np.dtype(c.dtype).itemsize + int(np.prod(c.shape)) // c.shape[1] * len(ds.classes)
            for c in ds.cases
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median(times)
    res = {
        "dataset": str(args.src),
        "cases": len(ds),
        "patients": len(ds.patients),
        "slices": n_slices,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # the machine is shared: timings vary
        "machine": platform.platform(),
        "python": platform.python_version(),
        "prepare_seconds_runs": [round(t, 3) for t in times],
        "prepare_seconds_median": round(med, 3),
        "slices_per_second_median": round(n_slices / med, 1),
        "peak_rss_parent_mb": round(rss_parent, 1),
        "peak_rss_worker_mb": round(rss_worker, 1),
        "prepared_size_mb": round(disk / 1e6, 1),
        "largest_case_arrays_mb": round(largest / 2**20, 1),
        "slice_read_reads": args.reads,
        "slice_read_median_ms": round(1e3 * statistics.median(lat), 4),
        "slice_read_p95_ms": round(1e3 * float(np.percentile(lat, 95)), 4),
        "slice_read_under_1ms": statistics.median(lat) < 1e-3,
    }
    t = Table(title="prepare benchmark (LGG kaggle_3m)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in res.items():
        if k not in ("dataset", "machine"):
            t.add_row(k, str(v))
    Console().print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
