"""``medseg inspect``: a summary table of a prepared dataset and an optional overlay PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.prepared import PreparedDataset


def _rng(values: list[list[float]] | list[list[int]], fmt: str) -> str:
    a = np.asarray(values, float)
    lo, hi = a.min(axis=0), a.max(axis=0)
    parts = [(fmt.format(x) if x == y else f"{fmt.format(x)}-{fmt.format(y)}") for x, y in zip(lo, hi)]
    return " x ".join(parts)


def summary(ds: PreparedDataset) -> list[tuple[str, str]]:
    """(row name, value) pairs shown by ``inspect``; also used by tests."""
    fp: dict[str, Any] = ds.fingerprint
    rows: list[tuple[str, str]] = [
        ("cases", str(len(ds))),
        ("patients", str(len(ds.patients))),
        ("slices", str(sum(c.shape[0] for c in ds.cases))),
        ("spatial dims", f"{ds.spatial_dims}D"),
        ("channels", ", ".join(ds.channels)),
        ("classes", ", ".join(ds.classes) + f" ({ds.class_kind})" if ds.classes else "none (images only)"),
    ]
    for name, cls in (fp.get("classes") or {}).items():
        rows.append(
            (
                f"class {name}",
                f"voxels {100 * cls['voxel_fraction']:.3f}%, slices {100 * cls['slice_fraction']:.1f}%, "
                f"cases {100 * cls['case_fraction']:.1f}%",
            )
        )
    for name, st in (fp.get("intensity") or {}).items():
        p = st["percentiles"]
        rows.append(
            (
                f"intensity {name}",
                f"range {st['min']:.4g}..{st['max']:.4g}, p0.5..p99.5 {p['0.5']:.4g}..{p['99.5']:.4g} "
                f"(mean {st['mean']:.4g}, std {st['std']:.4g})",
            )
        )
    rows.append(("spacing (z, y, x) mm", _rng([c.spacing for c in ds.cases], "{:.3g}")))
    rows.append(("shape (z, c, h, w)", _rng([c.shape for c in ds.cases], "{:.0f}")))
    if (ds.root / "splits.json").is_file():
        folds = ds.splits()["folds"]
        rows.append(("folds (val cases)", ", ".join(str(len(f["val"])) for f in folds)))
    else:
        rows.append(("folds (val cases)", "no splits.json"))
    return rows


def inspect_dataset(path: str | Path, overlay: Path | None = None, console=None) -> list[tuple[str, str]]:
    """Print the summary table of the prepared dataset at ``path``; write an overlay PNG if asked."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    ds = PreparedDataset.open(path)
    ds.verify()
    rows = summary(ds)
    t = Table(title=Path(path).name)
    t.add_column("what")
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    if overlay is not None:
        out = write_overlay(ds, Path(overlay))
        console.print(f"overlay -> {out}")
    return rows


def top_slices(ds: PreparedDataset, n: int = 4) -> list[tuple[int, int, int]]:
    """(foreground voxels, case index, slice) to show: the slice with the most foreground of each of the
    ``n`` cases with the largest such slice (a sample across cases, not one case's neighbouring
    slices), topped up with the next-best slices when fewer than ``n`` cases have foreground."""
    per_case: list[list[tuple[int, int, int]]] = []
    for i, c in enumerate(ds.cases):
        if c.mask is None or not c.has_foreground:
            continue
        cand = sorted({z for per in (c.fg_slices or []) for z in per})
        m = ds.mask(i)
        per_case.append(sorted(((int(m[z].sum()), i, z) for z in cand), key=lambda t: (-t[0], t[2])))
    order = lambda t: (-t[0], t[1], t[2])  # noqa: E731
    best = sorted((s[0] for s in per_case), key=order)[:n]
    if len(best) < n:
        best += sorted((t for s in per_case for t in s[1:]), key=order)[: n - len(best)]
    if not best:  # no foreground at all: the middle slice of the first cases
        best = [(0, i, ds.cases[i].shape[0] // 2) for i in range(min(n, len(ds)))]
    return best


def write_overlay(ds: PreparedDataset, out: Path, n: int = 4) -> Path:
    """A PNG of the slices with the most foreground: first image channel, one contour colour per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    picks = top_slices(ds, n)
    colors = plt.get_cmap("tab10").colors
    # FLAIR shows LGG tumours best; otherwise the first channel
    ch = next((j for j, n in enumerate(ds.channels) if n.lower() == "flair"), 0)
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.6), squeeze=False)
    for ax, (_, i, z) in zip(axes[0], picks):
        c = ds.cases[i]
        img = np.asarray(ds.image(i)[z, ch], np.float32)
        lo, hi = np.percentile(img, [0.5, 99.5])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        if c.mask is not None:
            m = np.asarray(ds.mask(i)[z])
            for j in range(m.shape[0]):
                if m[j].any():
                    ax.contour(m[j], levels=[0.5], colors=[colors[j % len(colors)]], linewidths=1.0)
        name = c.slices[z] if c.slices else str(z)
        ax.set_title(c.id if c.shape[0] == 1 else f"{c.id}\nslice {name}", fontsize=8)
        ax.axis("off")
    handles = [Line2D([0], [0], color=colors[j % len(colors)], label=k) for j, k in enumerate(ds.classes)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
