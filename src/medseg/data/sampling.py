"""Training samples from a prepared dataset: 2D slices, 2.5D stacks, 3D patches, with foreground
oversampling; and whole validation cases.

Every training sample is a pure function of ``(seed, global index)``: the sampler hands out global
indices ``epoch * n_total + rank + world * i``, and ``__getitem__`` seeds its own generator from
them. So a run is reproducible whatever the number of loader workers, resuming at epoch e draws the
very samples an uninterrupted run would have drawn, and DDP ranks draw disjoint samples with no
DistributedSampler (Lightning's ``use_distributed_sampler=False``).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.data import normalize
from medseg.data.prepared import PreparedDataset

_MAX_FG_POSITIONS = 20_000


def context_indices(z: int, n_slices: int, context: int, stride: int) -> np.ndarray:
    """Slices z-k*s .. z+k*s (2.5D), clamped at the volume's edges."""
    offs = np.arange(-context, context + 1) * stride
    return np.clip(z + offs, 0, n_slices - 1)


def window(arr: np.ndarray, axes: Sequence[int], starts: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``arr`` cut to ``size`` along ``axes`` from ``starts`` (may be negative or run past the end:
    zero padding). Reads only the window from a memmap."""
    src = [slice(None)] * arr.ndim
    dst = [slice(None)] * arr.ndim
    shape = list(arr.shape)
    for ax, s, t in zip(axes, starts, size):
        n = arr.shape[ax]
        a, b = max(s, 0), min(s + t, n)
        src[ax] = slice(a, max(a, b))
        dst[ax] = slice(a - s, a - s + max(0, b - a))
        shape[ax] = t
    out = np.zeros(shape, dtype=arr.dtype) if isinstance(arr, np.ndarray) else arr.new_zeros(shape)  # numpy or torch
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _start(rng: np.random.Generator, n: int, t: int, center: int | None) -> int:
    lo, hi = min(0, n - t), max(0, n - t)
    if center is None:
        return int(rng.integers(lo, hi + 1))
    jitter = int(rng.integers(-(t // 4), t // 4 + 1)) if t >= 4 else 0
    return int(np.clip(center - t // 2 + jitter, lo, hi))


@dataclass(frozen=True)
class Draw:
    """One training sample's source: case ``case`` (index in the prepared dataset); 2D/2.5D: image
    slices ``slices`` and mask slice ``z``; ``starts``: the window's first voxel along the spatial axes
    ((y, x), or (z, y, x) in 3D), or None for whole slices."""

    case: int
    slices: list[int]
    z: int
    starts: tuple[int, ...] | None


class _CaseCache:
    """Per-case normalisation stats and foreground positions, computed once per process."""

    def __init__(self, ds: PreparedDataset, norm: dict[str, Any]):
        self.ds = ds
        self.norm = norm
        self._stats: dict[int, tuple] = {}
        self._fg: dict[tuple[int, int], np.ndarray] = {}

    def stats(self, i: int) -> tuple:
        hit = self._stats.get(i)
        if hit is None:
            hit = self._stats[i] = normalize.stats_for(self.ds.image(i), self.norm)
        return hit

    def fg_positions(self, i: int, cls: int) -> np.ndarray:
        """[n, 3] (z, y, x) voxels of class ``cls`` (subsampled), for 3D foreground patches."""
        hit = self._fg.get((i, cls))
        if hit is None:
            m = self.ds.mask(i)
            zs = self.ds.cases[i].fg_slices[cls] if self.ds.cases[i].fg_slices else range(m.shape[0])
            pos = [np.concatenate([np.full((len(p), 1), z), p], 1) for z in zs if len(p := np.argwhere(m[z, cls]))]
            hit = np.concatenate(pos) if pos else np.zeros((0, 3), np.int64)
            if len(hit) > _MAX_FG_POSITIONS:
                hit = hit[np.random.default_rng(i).choice(len(hit), _MAX_FG_POSITIONS, replace=False)]
            self._fg[(i, cls)] = hit
        return hit


def norm_config(ds: PreparedDataset, mode: str) -> dict[str, Any]:
    """The bundle's ``normalization`` entry for a prepared dataset."""
    if mode == "dataset":
        return normalize.dataset_norm(ds.fingerprint, ds.channels)
    return {"mode": mode}


class TrainSamples:
    """Map-style torch dataset of random training samples (see module docstring).

    Item: ``(image float32 [C', *size], mask uint8 [k, *size])`` with C' = channels * (2*context+1)
    in 2.5D (slice-major: all channels of slice i-k first).
    """

    def __init__(self, root: str, case_ids: Sequence[str], data_cfg: Any, seed: int, norm: dict[str, Any]):
        self.root = str(root)
        self.case_ids = list(case_ids)
        self.cfg = data_cfg
        self.seed = int(seed)
        self.norm = norm
        self._ds: PreparedDataset | None = None
        self._cache: _CaseCache | None = None
        ds = self.dataset
        self.case_index = [ds.index(c) for c in self.case_ids]
        self.fg_cases = [j for j, i in enumerate(self.case_index) if ds.cases[i].has_foreground]

    @property
    def dataset(self) -> PreparedDataset:
        # opened lazily so that the object pickles cheaply into loader workers
        if self._ds is None:
            self._ds = PreparedDataset.open(self.root)
            self._cache = _CaseCache(self._ds, self.norm)
        return self._ds

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ds": None, "_cache": None}

    def __len__(self) -> int:  # global indices are unbounded; the sampler decides
        return 2**62

    def draw(self, g: int) -> Draw:
        """Where sample ``g`` comes from: a pure function of ``(seed, g)``."""
        rng = np.random.default_rng([self.seed, int(g)])
        ds = self.dataset
        fg = self.fg_cases and rng.random() < self.cfg.fg_oversample
        j = self.fg_cases[rng.integers(len(self.fg_cases))] if fg else int(rng.integers(len(self.case_index)))
        i = self.case_index[j]
        rec = ds.cases[i]
        cls = None
        if fg:
            present = [c for c, f in enumerate(rec.foreground or []) if f > 0]
            cls = present[int(rng.integers(len(present)))]
        if self.cfg.mode == "3d":
            center = None
            if cls is not None:
                pos = self._cache.fg_positions(i, cls)
                center = pos[rng.integers(len(pos))] if len(pos) else None
            dims = (rec.shape[0], rec.shape[2], rec.shape[3])
            cs = [None] * 3 if center is None else [int(c) for c in center]
            return Draw(i, [], 0, tuple(_start(rng, n, t, c) for n, t, c in zip(dims, self.cfg.size, cs)))
        # 2D / 2.5D
        z = int(rng.choice(rec.fg_slices[cls])) if cls is not None else int(rng.integers(rec.shape[0]))
        zs = context_indices(z, rec.shape[0], self.cfg.context, self.cfg.stride) if self.cfg.mode == "2.5d" else [z]
        size = self.cfg.size
        if size is None or self.cfg.resize:
            return Draw(i, [int(k) for k in zs], z, None)
        center = None
        if cls is not None:
            yx = np.argwhere(ds.mask(i)[z, cls])
            center = yx[rng.integers(len(yx))] if len(yx) else None
        sy = _start(rng, rec.shape[2], size[0], None if center is None else int(center[0]))
        sx = _start(rng, rec.shape[3], size[1], None if center is None else int(center[1]))
        return Draw(i, [int(k) for k in zs], z, (sy, sx))

    def __getitem__(self, g: int):
        import torch

        d = self.draw(g)
        ds = self.dataset
        img, msk = ds.image(d.case), ds.mask(d.case)
        mean, std, clip = self._cache.stats(d.case)
        size = self.cfg.size
        if self.cfg.mode == "3d":
            x = window(img, (0, 2, 3), d.starts, size)  # [d, c, h, w]
            y = window(msk, (0, 2, 3), d.starts, size)
            x = normalize.apply(x, mean, std, clip, channel_axis=1).transpose(1, 0, 2, 3)
            y = y.transpose(1, 0, 2, 3)
            return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        if d.starts is None:
            x = np.asarray(img[d.slices])
            y = np.array(msk[d.z])  # a copy: a memmap view is read-only, which torch warns about
        else:
            x = window(img[d.slices], (2, 3), d.starts, size)
            y = window(msk[d.z], (1, 2), d.starts, size)
        x = normalize.apply(x, mean, std, clip, channel_axis=1)
        x = x.reshape(-1, *x.shape[2:])
        xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        if size is not None and self.cfg.resize and tuple(xt.shape[-2:]) != tuple(size):
            xt, yt = resize_pair(xt[None], yt[None], size)
            xt, yt = xt[0], yt[0]
        return xt, yt


def resize_pair(x, y, size: Sequence[int]):
    """Images [b, c, h, w] bilinearly, masks [b, k, h, w] by thresholding their bilinear resize at 0.5."""
    import torch
    from torch.nn import functional as F

    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    y = (F.interpolate(y.float(), size=tuple(size), mode="bilinear", align_corners=False) > 0.5).to(torch.uint8)
    return x, y


class EpochSampler:
    """Yields this rank's global sample indices of the current epoch (``set_epoch`` is called by
    Lightning's fit loop at each epoch start, also after a resume)."""

    def __init__(self, per_rank: int, rank: int | None = None, world: int | None = None):
        self.per_rank = per_rank
        self.epoch = 0
        self._rank, self._world = rank, world
        self.last_rank_world: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _dist(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank, self._world or 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[int]:
        rank, world = self._dist()
        self.last_rank_world = (rank, world)
        base = self.epoch * self.per_rank * world
        return iter(base + rank + world * i for i in range(self.per_rank))

    def __len__(self) -> int:
        return self.per_rank


class ValCases:
    """Whole validation cases, one item per case: ``{"id", "index", "image", "mask"}`` with image
    [z, C', h, w] (2D/2.5D, normalised) or [C, d, h, w] (3D), mask [z, k, h, w] uint8."""

    def __init__(self, root: str, case_ids: Sequence[str], data_cfg: Any, norm: dict[str, Any]):
        self.root = str(root)
        self.case_ids = list(case_ids)
        self.cfg = data_cfg
        self.norm = norm
        self._ds: PreparedDataset | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ds": None}

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, n: int) -> dict[str, Any]:
        import torch

        if self._ds is None:
            self._ds = PreparedDataset.open(self.root)
        ds = self._ds
        i = ds.index(self.case_ids[n])
        img = np.asarray(ds.image(i))
        mean, std, clip = normalize.stats_for(img, self.norm)
        x = normalize.apply(img, mean, std, clip, channel_axis=1)  # [z, c, h, w]
        z = x.shape[0]
        if self.cfg.mode == "2.5d":
            idx = np.stack([context_indices(k, z, self.cfg.context, self.cfg.stride) for k in range(z)])  # [z, 2k+1]
            x = x[idx].reshape(z, -1, *x.shape[2:])
        elif self.cfg.mode == "3d":
            x = x.transpose(1, 0, 2, 3)
        return {"id": self.case_ids[n], "index": i, "image": torch.from_numpy(np.ascontiguousarray(x)),
                "mask": torch.from_numpy(np.asarray(ds.mask(i)).copy())}


def in_channels(n_channels: int, data_cfg: Any) -> int:
    return n_channels * (2 * data_cfg.context + 1) if data_cfg.mode == "2.5d" else n_channels
