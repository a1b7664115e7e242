"""Does the data pipeline keep the model busy? Loader samples/s vs the default model's training images/s.

    .venv/bin/python benchmarks/loader.py [--prepared prepared/lgg] [--size 256] [--batches 20]

Measures, on the same batches (batch 8, 2D, LGG-like 3-channel 256x256 slices):
  - the loader alone (memmap read + per-case z-score + crop + fg oversampling) with 0, 1, 2 workers;
  - medseg's vectorised batch augmentation (flips, rotation, scale, grid distortion, gamma, contrast,
    noise: one grid_sample per batch) vs the equivalent per-sample MONAI dictionary transforms;
  - the default model's training step (forward + backward + AdamW) in images/s, 2 threads.
Without --prepared it writes an LGG-shaped synthetic dataset to a temp folder.
Prints a table and writes benchmarks/results/loader.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _loader_rate(prepared: str, ids: list[str], size: int, batch: int, batches: int, workers: int) -> float:
    from torch.utils.data import DataLoader

    from medseg.config import DataConfig
    from medseg.data.sampling import EpochSampler, TrainSamples

    cfg = DataConfig(prepared=prepared, size=[size, size], batch_size=batch, fg_oversample=0.5, workers=workers)
    ds = TrainSamples(prepared, ids, cfg, seed=0, norm={"mode": "zscore_case"})
    dl = DataLoader(ds, batch_size=batch, sampler=EpochSampler(batch * (batches + 2)), num_workers=workers,
                    prefetch_factor=4 if workers else None, drop_last=True)
    it = iter(dl)
    next(it), next(it)  # worker start-up and first per-case stats are one-off costs
    t0 = time.perf_counter()
    n = 0
    for x, _ in it:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def _augment_rates(size: int, batch: int, reps: int, channels: int) -> tuple[float, float]:
    from medseg.config import AugmentConfig
    from medseg.data.augment import augment_batch

    cfg = AugmentConfig(elastic=0.3)
    x = torch.randn(batch, channels, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.9).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    augment_batch(x, y, cfg, g)
    t0 = time.perf_counter()
    for _ in range(reps):
        augment_batch(x, y, cfg, g)
    ours = reps * batch / (time.perf_counter() - t0)

    from monai.transforms import (Compose, Rand2DElasticd, RandAdjustContrastd, RandAffined, RandFlipd,
                                  RandGaussianNoised, RandScaleIntensityd)

    keys = ["image", "label"]
    monai_t = Compose([
        RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandAffined(keys, prob=0.3, rotate_range=0.26, scale_range=0.15, mode=("bilinear", "nearest"), padding_mode="zeros"),
        Rand2DElasticd(keys, prob=0.3, spacing=(size // 4, size // 4), magnitude_range=(1, 3), mode=("bilinear", "nearest")),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        RandScaleIntensityd("image", prob=0.15, factors=0.25),
        RandGaussianNoised("image", prob=0.15, std=0.1),
    ])
    monai_t.set_random_state(0)
    items = [{"image": x[i], "label": y[i].float()} for i in range(batch)]
    for it in items:
        monai_t(it)
    t0 = time.perf_counter()
    for _ in range(max(1, reps // 2)):
        for it in items:
            monai_t(it)
    theirs = max(1, reps // 2) * batch / (time.perf_counter() - t0)
    return ours, theirs


def _train_rate(size: int, batch: int, steps: int, channels: int, name: str) -> float:
    from medseg.config import LossConfig
    from medseg.losses import build_loss
    from medseg.models import create_model

    torch.set_num_threads(2)
    m = create_model(name, channels, 2).to(memory_format=torch.channels_last).train()
    loss = build_loss(LossConfig(), "multiclass", ["tumor"])
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size) > 0.9).float()

    def step():
        opt.zero_grad()
        out = m(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss(out, y).backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepared", default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--model", default="unet")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "loader.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = None
    if a.prepared is None:
        from medseg.training.synthetic import make_synthetic

        tmp = tempfile.TemporaryDirectory()
        a.prepared = str(make_synthetic(Path(tmp.name) / "syn", n_patients=20, slices=24, size=a.size, channels=3))
        source = f"synthetic (20 cases x 24 slices, 3 x {a.size} x {a.size} float32)"
    else:
        source = a.prepared
    from medseg.data.prepared import PreparedDataset

    ds = PreparedDataset.open(a.prepared)
    ids = ds.fold(0)[0] if (Path(a.prepared) / "splits.json").exists() else [c.id for c in ds.cases]
    channels = len(ds.channels)
    res: dict = {"source": source, "size": a.size, "batch": a.batch, "machine": platform.processor() or platform.machine(),
                 "torch": torch.__version__, "loader_samples_per_s": {}}
    for w in (0, 1, 2):
        res["loader_samples_per_s"][str(w)] = round(_loader_rate(a.prepared, ids, a.size, a.batch, a.batches, w), 1)
    ours, monai = _augment_rates(a.size, a.batch, 10, channels)
    res["augment_samples_per_s"] = {"medseg_batch_torch": round(ours, 1), "monai_per_sample": round(monai, 1)}
    res["train_images_per_s"] = {a.model: round(_train_rate(a.size, a.batch, a.train_steps, channels, a.model), 2)}
    load0 = res["loader_samples_per_s"]["0"]
    # main-process pipeline: load + augment run serially before each step
    res["main_process_pipeline_samples_per_s"] = round(1 / (1 / load0 + 1 / ours), 1)
    res["ratio_pipeline_to_training"] = round(res["main_process_pipeline_samples_per_s"] / res["train_images_per_s"][a.model], 1)
    print(f"source: {source}  ({a.size}x{a.size}, batch {a.batch})")
    print(f"{'what':48s} {'samples/s':>10s}")
    for w, v in res["loader_samples_per_s"].items():
        print(f"{'loader alone, workers=' + w:48s} {v:10.1f}")
    print(f"{'augment, medseg vectorised batch (torch)':48s} {ours:10.1f}")
    print(f"{'augment, MONAI per-sample dict transforms':48s} {monai:10.1f}")
    print(f"{'loader + augment in the main process':48s} {res['main_process_pipeline_samples_per_s']:10.1f}")
    print(f"{'training, ' + a.model + ' (fwd+bwd+AdamW, 2 threads)':48s} {res['train_images_per_s'][a.model]:10.2f}")
    print(f"pipeline / training = {res['ratio_pipeline_to_training']}x (target >= 3x)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
