"""A tiny synthetic prepared dataset (bright discs/squares on noise) for tests, benchmarks and demos."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.data.prepared import CaseRecord, PreparedWriter
from medseg.data.splits import make_splits


def make_synthetic(out: str | Path, *, n_patients: int = 6, slices: int = 4, size: int = 32, channels: int = 1,
                   class_kind: str = "multiclass", folds: int = 2, seed: int = 0, overwrite: bool = True) -> Path:
    """Multiclass: classes ``disc`` and ``square`` (exclusive). Multilabel: ``a`` and ``b``, two
    overlapping discs. Roughly half the slices hold foreground."""
    rng = np.random.default_rng(seed)
    w = PreparedWriter(out, overwrite=overwrite)
    classes = ["disc", "square"] if class_kind == "multiclass" else ["a", "b"]
    yy, xx = np.mgrid[:size, :size]
    recs, samples = [], []
    cv = np.zeros(2)
    for p in range(n_patients):
        img = rng.normal(0, 1, (slices, channels, size, size)).astype(np.float32) * 20 + 100
        mask = np.zeros((slices, 2, size, size), np.uint8)
        for z in range(slices):
            if (z + p) % 2:
                continue
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            r = size // 6
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if class_kind == "multiclass":
                sq = np.zeros_like(disc)
                sy, sx = rng.integers(0, size - r, 2)
                sq[sy : sy + r, sx : sx + r] = True
                sq &= ~disc
                mask[z, 0], mask[z, 1] = disc, sq
            else:
                other = (yy - cy - r // 2) ** 2 + (xx - cx) ** 2 <= r * r
                mask[z, 0], mask[z, 1] = disc, other
            img[z, :] += 80 * mask[z, 0] + 50 * mask[z, 1]
        cid = f"case{p:02d}"
        ir, sr = w.write_arrays(cid, img, mask)
        per = mask.reshape(slices, 2, -1).sum(2)
        cv += per.sum(0)
        recs.append(CaseRecord(id=cid, patient=f"p{p:02d}", shape=list(img.shape), spacing=[1.0, 1.0, 1.0], image=ir, mask=sr,
                               dtype="float32", foreground=[float(v) / mask[:, 0].size for v in per.sum(0)],
                               fg_slices=[np.flatnonzero(per[:, j]).tolist() for j in range(2)],
                               slices=[str(z) for z in range(slices)]))
        samples.append(img.transpose(1, 0, 2, 3).reshape(channels, -1))
    s = np.concatenate(samples, 1)
    ch = [f"c{i}" for i in range(channels)]
    vox = n_patients * slices * size * size
    fp = {
        "intensity": {c: {"mean": float(s[i].mean()), "std": float(s[i].std()), "min": float(s[i].min()), "max": float(s[i].max()),
                          "percentiles": {str(q): float(np.percentile(s[i], q)) for q in (0.5, 1.0, 5.0, 50.0, 95.0, 99.0, 99.5)}}
                      for i, c in enumerate(ch)},
        "classes": {c: {"voxel_fraction": float(cv[j]) / vox, "slice_fraction": 0.5, "case_fraction": 1.0} for j, c in enumerate(classes)},
        "n_cases": n_patients, "n_patients": n_patients, "n_slices": n_patients * slices,
    }
    info = {"name": Path(out).name, "source_format": "synthetic", "source": "", "reader_options": {}, "channels": ch,
            "classes": classes, "class_kind": class_kind, "spatial_dims": 3 if slices > 1 else 2, "has_masks": True,
            "meta": {}, "fingerprint": fp, "cases": recs}
    splits = make_splits([r.id for r in recs], [r.patient for r in recs], [True] * len(recs), k=folds, seed=seed)
    return w.finish(info, splits)
