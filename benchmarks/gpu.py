"""Does medseg keep the accelerator busy? Training and prediction speed beside the network's own speed.

    .venv/bin/python benchmarks/gpu.py [--lgg tests/fixtures/lgg/kaggle_3m] [--fold-minutes 0] [--out FILE]

On whatever device is present (a CUDA GPU, else the CPU at CPU scale), in one run:
  - model only: training steps (forward, backward, AdamW) of the LGG recipe's U-Net and of MONAI's UNet
    (the peer, as in benchmarks/models.py) on random batches already on the device; precision as
    ``train.precision: auto`` picks it (bf16 autocast on GPUs), channels_last on CUDA;
  - end to end: ``medseg train configs/lgg_unet.yaml`` (one member) with the same network, batch and
    precision on the LGG patients under ``--lgg`` (prepared first), img/s the median of the epochs after
    the first (start-up and the first epoch's one-off costs excluded), with batches cut on the device
    (``data.on_device: auto``) and, for comparison, with loader processes (``on_device: false``); and the
    same for the MONAI peer;
  - predict: ``medseg predict lgg-unet`` with flip TTA (x3) over the ``--lgg`` folder, slices/s of the
    command with the model already loaded (median of 3);
  - GPU utilisation sampled by nvidia-smi every 100 ms during each phase (median), where there is one;
  - ``--fold-minutes N``: fold 0 of the LGG recipe trained for N minutes on the device, its validation Dice.
Prints a table and writes JSON (default benchmarks/results/gpu.json, or gpu_<device>.json on a GPU).
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "lgg_unet.yaml"
PEER = "monai_unet_peer"


class Utilisation:
    """nvidia-smi's GPU utilisation (%) sampled every 100 ms between start() and stop()."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[int] = []

    def __enter__(self) -> "Utilisation":
        if self.enabled:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100", "-i", "0"], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line.strip()))

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.proc.terminate()
            self.proc.wait()

    @property
    def median(self) -> float | None:
        return float(statistics.median(self.samples)) if self.samples else None


def register_peer() -> None:
    """MONAI's UNet as a medseg model, so that ``medseg train`` runs it as it runs its own networks."""
    import torch

    from medseg.models import MODELS

    if PEER in MODELS:
        return

    @MODELS.register(PEER)
    class MonaiUNet(torch.nn.Module):
        paper = "MONAI UNet (peer)"
        dims = (2,)
        channels_last = False

        def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2):
            super().__init__()
            from monai.networks.nets import UNet

            self.net = UNet(spatial_dims, in_channels, out_channels, (32, 64, 128, 256, 512), (2, 2, 2, 2), num_res_units=2)
            self.required_divisor = 16
            self.spatial_dims = spatial_dims

        def forward(self, x):
            return self.net(x)


def recipe_network() -> tuple[str, dict]:
    import yaml

    m = yaml.safe_load(RECIPE.read_text())["model"]
    return m["name"], dict(m.get("kwargs") or {})


def model_only(name: str, kwargs: dict, batch: int, size: int, device: str, precision: str, steps: int, warmup: int) -> float:
    """Training images/s of the network alone on random batches on ``device``."""
    import torch

    from medseg.models import create_model

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as medseg train sets it on a GPU
    model = create_model(name, 3, 2, **kwargs).to(device)
    cl = device == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch, size, size), device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = precision == "bf16-mixed"

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def end_to_end(prepared: Path, work: Path, label: str, overrides: dict[str, str]) -> dict:
    """``medseg train`` of the LGG recipe with ``overrides``: median img/s of the epochs after the first."""
    from medseg.training.run import train

    out = work / label
    cfg = {"data.prepared": str(prepared), "train.members": "1", "train.max_minutes": "null",
           "schedule.by": "steps", "train.val_every": "1000", **overrides}
    t0 = time.perf_counter()
    train(RECIPE, fold="0", overrides=cfg, out=out)
    wall = time.perf_counter() - t0
    rows = list(csv.DictReader((out / "fold_0" / "metrics.csv").open()))
    rates = [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
    later = rates[1:] or rates
    return {"img_s": round(statistics.median(later), 1), "epochs_img_s": [round(r, 1) for r in rates],
            "wall_s": round(wall, 1), "val_dice": float(rows[-1]["val_dice_mean"]) if rows[-1].get("val_dice_mean") else None}


def predict_rate(lgg: Path, device: str, runs: int) -> dict:
    from medseg.inference.predict import predict
    from medseg.inference.segmenter import Segmenter

    t0 = time.perf_counter()
    seg = Segmenter.load("lgg-unet", tta=True, device=device)
    load = time.perf_counter() - t0
    times, slices = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(runs + 1):  # the first run warms up (cuDNN's algorithm search, the page cache)
            out = Path(tmp) / f"out{r}"
            t = time.perf_counter()
            predict(seg, lgg, out, progress=False)
            if r:
                times.append(time.perf_counter() - t)
        from medseg.data.formats import get_reader

        reader = get_reader("lgg")
        spec = reader.scan(lgg, require_masks=False)
        slices = sum(reader.slice_count(spec, c) for c in spec.cases)
    med = statistics.median(times)
    return {"slices": slices, "tta": 1 + len(seg.flips), "load_s": round(load, 2), "runs_s": [round(t, 3) for t in times],
            "slices_per_s": round(slices / med, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lgg", type=Path, default=ROOT / "tests" / "fixtures" / "lgg" / "kaggle_3m")
    ap.add_argument("--fold-minutes", type=float, default=0.0)
    ap.add_argument("--quick", action="store_true", help="a few steps of each (the test suite's run)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    import torch

    from medseg.data.prepare import prepare
    from medseg.machine import cpu_has_bf16_units

    register_peer()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    gpu = torch.cuda.get_device_name(0) if cuda else None
    precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if cuda else \
        ("bf16-mixed" if cpu_has_bf16_units() else "32-true")
    if cuda and not a.quick:
        batch, steps, warmup, epochs, spe = 64, 60, 15, 6, 100
    else:  # CPU scale: the recipe's own batch, seconds per phase
        batch, steps, warmup, epochs, spe = 16, 3 if a.quick else 10, 1, 2 if a.quick else 3, 3 if a.quick else 20
    size = 128
    name, kwargs = recipe_network()
    work = Path(tempfile.mkdtemp(prefix="medseg-gpu-bench-"))
    try:
        prepared = work / "prepared"
        t0 = time.perf_counter()
        prepare("lgg", a.lgg, prepared, progress=False)
        prepare_s = time.perf_counter() - t0
        rows = []
        common = {"data.batch_size": str(batch), "train.epochs": str(epochs), "train.steps_per_epoch": str(spe),
                  "train.precision": {"bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed", "32-true": "32"}[precision]}
        for label, net, kw in (("lgg recipe unet", name, kwargs), ("monai unet (peer)", PEER, {})):
            with Utilisation(cuda) as u:
                alone = model_only(net, kw, batch, size, device, precision, steps, warmup)
            row = {"network": label, "model_only_img_s": round(alone, 1), "model_only_gpu_util": u.median}
            model_over = {"model.name": net, "model.kwargs": json.dumps(kw)}
            variants = [("on_device", {"data.on_device": "auto"})]
            if cuda:
                variants.append(("loader", {"data.on_device": "false", "data.workers": "auto"}))
            for tag, over in variants:
                try:
                    with Utilisation(cuda) as u:
                        e2e = end_to_end(prepared, work, f"{net}-{tag}", {**common, **model_over, **over})
                    row[f"train_{tag}"] = {**e2e, "gpu_util": u.median, "vs_model_only": round(e2e["img_s"] / alone, 3)}
                except Exception as e:  # one failed phase must not lose the others' figures
                    if a.quick:
                        raise
                    row[f"train_{tag}"] = {"error": f"{type(e).__name__}: {e}", "img_s": float("nan"), "vs_model_only": float("nan"),
                                           "gpu_util": None}
            rows.append(row)
        with Utilisation(cuda) as u:
            pred = predict_rate(a.lgg, device, 1 if a.quick else 3)
        pred["gpu_util"] = u.median
        fold = None
        if a.fold_minutes > 0:
            with Utilisation(cuda) as u:
                fold = end_to_end(prepared, work, "fold", {"train.max_minutes": str(a.fold_minutes), "schedule.by": "time", "train.epochs": "100000",
                                                           "train.val_every": "1000", "data.batch_size": str(batch)})
            fold.update({"minutes": a.fold_minutes, "batch": batch, "gpu_util": u.median})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    from medseg.data.formats import get_reader

    reader = get_reader("lgg")
    patients = len(reader.scan(a.lgg, require_masks=False).cases)
    try:
        lgg_shown = str(a.lgg.resolve().relative_to(ROOT))
    except ValueError:
        lgg_shown = f"{a.lgg.name} ({patients} patients)"
    res = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
           "device": gpu or f"cpu ({torch.get_num_threads()} threads)", "precision": precision, "batch": batch,
           "size": size, "lgg": lgg_shown, "patients": patients, "prepare_s": round(prepare_s, 1),
           "training": rows, "predict": pred, "fold": fold}
    print(f"\n{res['device']}, {precision}, batch {batch} at {size}x{size}, {patients} LGG patients")
    print(f"{'network':<20}{'model only':>12}{'train (auto)':>16}{'ratio':>8}{'train (loader)':>16}{'ratio':>8}{'GPU %':>7}")
    for r in rows:
        d, l = r["train_on_device"], r.get("train_loader")
        print(f"{r['network']:<20}{r['model_only_img_s']:>12.0f}{d['img_s']:>16.0f}{d['vs_model_only']:>8.2f}"
              f"{(l['img_s'] if l else float('nan')):>16.0f}{(l['vs_model_only'] if l else float('nan')):>8.2f}"
              f"{(d['gpu_util'] if d['gpu_util'] is not None else float('nan')):>7.0f}")
    print(f"predict lgg-unet (TTA x{pred['tta']}): {pred['slices_per_s']:.0f} slices/s over {pred['slices']} slices"
          + (f", GPU {pred['gpu_util']:.0f}%" if pred["gpu_util"] is not None else ""))
    if fold:
        print(f"LGG fold 0, {fold['minutes']} min: val Dice {fold['val_dice']}, {fold['img_s']:.0f} img/s")
    out = a.out or ROOT / "benchmarks" / "results" / ("gpu.json" if not cuda else f"gpu_{gpu.split()[-1].lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
