"""Training batches cut on the accelerator, from a copy of the training cases kept in its memory.

    batches = DeviceBatches(samples, device)      # samples: a TrainSamples
    x, y = batches.batch(global_indices)          # the batch a DataLoader over `samples` would collate

A GPU trains a small 2D network at thousands of images per second; loader processes that read, normalise
and resize each slice on the CPU cannot keep up (``benchmarks/gpu.py``). When the training cases fit in
the GPU's memory, they are copied there once in their stored dtype, and each batch is cut, normalised and
resized there in a few batched operations. Which samples a batch holds (case, slices, window) is still
decided by ``TrainSamples.draw``, so the batches equal the loader's, on any device.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.data.sampling import TrainSamples, resize_pair, window
from medseg.machine import to_device

# stored dtypes torch cannot index or do arithmetic on everywhere: widened exactly
_WIDEN = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.float64): np.float32,
          np.dtype(np.int8): np.int16}


def resident_bytes(samples: TrainSamples) -> int:
    """Device memory the training cases of ``samples`` take when copied by ``DeviceBatches``."""
    ds = samples.dataset
    total = 0
    for i in sorted(set(samples.case_index)):
        rec = ds.cases[i]
        dt = np.dtype(_WIDEN.get(np.dtype(rec.dtype), rec.dtype))
        total += int(np.prod(rec.shape)) * dt.itemsize + rec.shape[0] * len(ds.classes) * rec.shape[2] * rec.shape[3]
    return total


class DeviceBatches:
    """The training cases of a ``TrainSamples`` on ``device``; ``batch(indices)`` returns ``(image float32
    [b, C', *size], mask uint8 [b, k, *size])`` there, equal to collating ``samples[g]`` for each index."""

    def __init__(self, samples: TrainSamples, device: Any):
        import torch

        self.samples = samples
        self.device = torch.device(device)
        ds = samples.dataset
        cases = sorted(set(samples.case_index))
        self.cfg = samples.cfg
        shapes = {tuple(ds.cases[i].shape[1:]) for i in cases}
        # one stacked tensor (a batch is then one gather) when every slice has the same shape and is used whole
        self.uniform = self.cfg.mode != "3d" and len(shapes) == 1 and (self.cfg.size is None or self.cfg.resize)
        stats = [samples._cache.stats(i) for i in cases]
        self.row = {i: r for r, i in enumerate(cases)}
        self.mean = torch.tensor(np.stack([m for m, _, _ in stats]), device=self.device)
        self.std = torch.tensor(np.stack([s for _, s, _ in stats]), device=self.device)
        clips = [c for _, _, c in stats]
        self.clip = None if clips[0] is None else torch.tensor(np.stack(clips), device=self.device)  # [cases, c, 2]

        def put(a: np.ndarray):
            a = np.asarray(a)
            return torch.from_numpy(np.array(a, dtype=_WIDEN.get(a.dtype, a.dtype))).to(self.device)  # a writable copy

        if self.uniform:
            self.offset = {}
            n = 0
            for i in cases:
                self.offset[i] = n
                n += ds.cases[i].shape[0]
            self.images = torch.cat([put(ds.image(i)) for i in cases])
            self.masks = torch.cat([put(ds.mask(i)) for i in cases])
        else:
            self.image = {i: put(ds.image(i)) for i in cases}
            self.mask = {i: put(ds.mask(i)) for i in cases}

    def _normalise(self, x, rows, channel_axis: int):
        """``x`` [b, ...] in its stored dtype -> float32, with each sample's case statistics (as ``normalize.apply``)."""
        import torch

        shape = [len(rows)] + [1] * (x.ndim - 1)
        shape[channel_axis] = -1
        r = to_device(torch.tensor(rows), self.device)
        x = x.to(torch.float32)
        if self.clip is not None:
            c = self.clip[r]
            x = x.clamp(min=c[..., 0].reshape(shape), max=c[..., 1].reshape(shape))
        return (x - self.mean[r].reshape(shape)) / self.std[r].reshape(shape)

    def batch(self, indices: Sequence[int]):
        import torch

        draws = [self.samples.draw(int(g)) for g in indices]
        rows = [self.row[d.case] for d in draws]
        size = self.cfg.size
        if self.uniform:
            sl = to_device(torch.tensor([[self.offset[d.case] + z for z in d.slices] for d in draws]), self.device)
            x = self._normalise(self.images[sl], rows, channel_axis=2)  # [b, s, c, h, w]
            x = x.reshape(x.shape[0], -1, *x.shape[3:])
            y = self.masks[to_device(torch.tensor([self.offset[d.case] + d.z for d in draws]), self.device)]
            if size is not None and tuple(x.shape[-2:]) != tuple(size):
                x, y = resize_pair(x, y, size)
            return x, y
        xs, ys = [], []
        for d, r in zip(draws, rows):
            img, msk = self.image[d.case], self.mask[d.case]
            if self.cfg.mode == "3d":
                x = window(img, (0, 2, 3), d.starts, size).movedim(1, 0)  # [c, d, h, w]
                y = window(msk, (0, 2, 3), d.starts, size).movedim(1, 0)
                x = self._normalise(x[None], [r], channel_axis=1)[0]
            else:
                sl = to_device(torch.tensor(d.slices), self.device)
                x = img[sl] if d.starts is None else window(img[sl], (2, 3), d.starts, size)
                y = msk[d.z] if d.starts is None else window(msk[d.z], (1, 2), d.starts, size)
                x = self._normalise(x[None], [r], channel_axis=2)[0]
                x = x.reshape(-1, *x.shape[2:])
                if size is not None and self.cfg.resize and tuple(x.shape[-2:]) != tuple(size):
                    x, y = (t[0] for t in resize_pair(x[None], y[None], size))
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)


__all__ = ["DeviceBatches", "resident_bytes"]
