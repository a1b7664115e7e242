"""``medseg models``: name, paper, dims, parameters, GFLOPs and a quick forward speed per model."""
from __future__ import annotations

import time
from typing import Any


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model, in_channels: int = 3, size: int = 256, spatial_dims: int = 2) -> float:
    """Forward GFLOPs (multiply and add counted separately) for one image, via FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, in_channels, *([size] * spatial_dims))
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def forward_images_per_s(model, in_channels: int = 3, size: int = 256, batch: int = 2,
                         budget_s: float = 0.5, channels_last: bool = False) -> float:
    """Eval-mode forward throughput: one warm-up, then as many batches as fit in ``budget_s`` (at least one)."""
    import torch

    x = torch.randn(batch, in_channels, size, size)
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        n, t0 = 0, time.perf_counter()
        while True:
            model(x)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= budget_s:
                return n * batch / dt


def model_row(name: str, size: int = 256, in_channels: int = 3, out_channels: int = 2, batch: int = 2,
              budget_s: float = 0.5, **kwargs: Any) -> dict[str, Any]:
    from medseg.models import MODELS, create_model

    cls = MODELS.get(name)
    model = create_model(name, in_channels, out_channels, **kwargs)
    return {
        "name": name,
        "paper": cls.paper,
        "dims": "/".join(f"{d}D" for d in cls.dims),
        "params": count_params(model),
        "gflops": gflops(model, in_channels, size),
        "forward_img_s": forward_images_per_s(model, in_channels, size, batch, budget_s, cls.channels_last),
        "divisor": int(model.required_divisor),
    }


def print_model_table(console, size: int = 256, budget_s: float = 0.5) -> list[dict[str, Any]]:
    from rich.table import Table

    from medseg.models import DEFAULT_MODEL, MODELS

    t = Table(title=f"models (GFLOPs per image and forward images/s at {size}×{size}, 3 input channels, batch 2, this machine)")
    for col in ("name", "paper", "dims", "params", "GFLOPs", "forward img/s", "divisor"):
        t.add_column(col, justify="right" if col in ("params", "GFLOPs", "forward img/s", "divisor") else "left")
    rows = []
    for name in MODELS.names():
        r = model_row(name, size=size, budget_s=budget_s)
        rows.append(r)
        label = f"{name} (default)" if name == DEFAULT_MODEL else name
        t.add_row(label, r["paper"], r["dims"], f"{r['params'] / 1e6:.1f} M", f"{r['gflops']:.1f}",
                  f"{r['forward_img_s']:.1f}", str(r["divisor"]))
    console.print(t)
    return rows
