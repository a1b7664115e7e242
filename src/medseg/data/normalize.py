"""Intensity normalisation shared by training and inference (one definition, so they never drift).

Modes (the bundle's ``normalization.mode``):
- ``zscore_case``: per case and channel, (x - mean) / std over the case's voxels (nnU-Net's MRI default:
  MRI intensities have no absolute scale, so each scan is standardised on its own).
- ``zscore_body``: as ``zscore_case``, over the voxels above the channel's minimum only (the body, not
  the black around it), so a case's statistics do not depend on how much background its field of view
  holds (nnU-Net's ``use_mask_for_norm``); the background maps below the body's range.
- ``dataset``: clip to the fingerprint's 0.5/99.5 percentiles, then (x - mean) / std of the dataset
  (CT-like data with a meaningful scale).
"""
from __future__ import annotations

from typing import Any

import numpy as np

_SAMPLE = 200_000


def case_stats(image: np.ndarray, seed: int = 0, body: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of ``image[z, c, h, w]`` from a fixed subsample (cheap on memmaps); with
    ``body``, of the voxels above each channel's minimum (all of them if the channel is constant)."""
    z, c = image.shape[:2]
    per = image.shape[2] * image.shape[3]
    if z * per <= _SAMPLE:
        flat = np.asarray(image, dtype=np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
    else:
        rng = np.random.default_rng(seed)
        zs = np.sort(rng.choice(z, size=min(z, max(1, _SAMPLE // per)), replace=False))
        flat = np.asarray(image[zs], dtype=np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
    if body:
        rows = [r[r > r.min()] for r in flat]
        rows = [r if r.size else f for r, f in zip(rows, flat)]
        mean = np.array([r.mean() for r in rows])
        std = np.array([r.std() for r in rows])
    else:
        mean = flat.mean(axis=1)
        std = flat.std(axis=1)
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def stats_for(image: np.ndarray, norm: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mean, std, clip[c, 2] or None) to apply to any slice/patch of this case."""
    mode = norm.get("mode", "zscore_case")
    if mode in ("zscore_case", "zscore_body"):
        mean, std = case_stats(image, body=mode == "zscore_body")
        return mean, std, None
    if mode == "dataset":
        s = norm["stats"]
        clip = np.array([[p["0.5"], p["99.5"]] for p in s["percentiles"]], np.float32)
        return np.array(s["mean"], np.float32), np.maximum(np.array(s["std"], np.float32), 1e-6), clip
    raise ValueError(f"unknown normalization mode {mode!r}")


def apply(x: np.ndarray, mean: np.ndarray, std: np.ndarray, clip: np.ndarray | None, channel_axis: int) -> np.ndarray:
    """Normalise ``x`` (any layout; channels on ``channel_axis``) to float32."""
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    out = np.asarray(x, dtype=np.float32)
    if clip is not None:
        out = np.clip(out, clip[:, 0].reshape(shape), clip[:, 1].reshape(shape))
    return (out - mean.reshape(shape)) / std.reshape(shape)


def dataset_norm(fingerprint: dict[str, Any], channels: list[str]) -> dict[str, Any]:
    """The ``dataset`` mode's stats from a prepared dataset's fingerprint."""
    it = fingerprint["intensity"]
    return {
        "mode": "dataset",
        "stats": {
            "mean": [it[c]["mean"] for c in channels],
            "std": [it[c]["std"] for c in channels],
            "percentiles": [it[c]["percentiles"] for c in channels],
        },
    }
