"""``medseg models``: name, paper, dims, parameters, GFLOPs and a quick forward speed per model.

The speed is a quick estimate (batch 1, one warm-up pass, then passes for ``budget_s``) so that the
whole table takes seconds per model; ``benchmarks/models.py`` measures batch 8 forward and training
steps properly.
"""
from __future__ import annotations

import time
from typing import Any

from medseg.models import DEFAULT_MODEL, MODELS


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model, in_channels: int = 3, size: int = 256, spatial_dims: int = 2, channels_last: bool = False) -> float:
    """Forward GFLOPs (multiply and add counted separately) for one image, via FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, in_channels, *([size] * spatial_dims))
    if channels_last:  # same count; lets this pass double as the speed measurement's warm-up
        x = x.contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def forward_images_per_s(model, in_channels: int = 3, size: int = 256, batch: int = 1,
                         budget_s: float = 0.3, channels_last: bool = False, warmup: bool = True) -> float:
    """Eval-mode forward throughput: a warm-up pass, then as many batches as fit in ``budget_s`` (at least one)."""
    import torch

    x = torch.randn(batch, in_channels, size, size)
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        if warmup:
            model(x)
        n, t0 = 0, time.perf_counter()
        while True:
            model(x)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= budget_s:
                return n * batch / dt


def model_row(name: str, size: int = 256, in_channels: int = 3, out_channels: int = 2, batch: int = 1,
              budget_s: float = 0.3, **kwargs: Any) -> dict[str, Any]:
    """One table row; the GFLOPs pass (in the model's preferred memory format) is the speed warm-up."""
    import torch

    from medseg.models import MODELS, create_model

    cls = MODELS.get(name)
    model = create_model(name, in_channels, out_channels, **kwargs)
    if cls.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return {
        "name": name,
        "paper": cls.paper,
        "dims": "/".join(f"{d}D" for d in cls.dims),
        "params": count_params(model),
        "gflops": gflops(model, in_channels, size, channels_last=cls.channels_last),
        "forward_img_s": forward_images_per_s(model, in_channels, size, batch, budget_s, cls.channels_last,
                                              warmup=batch != 1),
        "divisor": int(model.required_divisor),
    }


def print_model_table(console, size: int = 256, budget_s: float = 0.3, benchmark: bool = False) -> list[dict[str, Any]]:
    """The registered models: name, paper, dims (and with ``benchmark`` parameters, GFLOPs and a quick
    forward speed, which builds and runs every model)."""
    from rich.table import Table

    if benchmark:
        title = (f"models at {size}×{size}, 3 input channels: GFLOPs per image; forward images/s on this machine, "
                 f"a quick estimate (batch 1, {budget_s:g} s per model; benchmarks/models.py measures properly)")
        cols = ("name", "paper", "dims", "params", "GFLOPs", "forward img/s", "divisor")
    else:
        title = "models (medseg models --benchmark adds parameters, GFLOPs and speed on this machine)"
        cols = ("name", "paper", "dims")
    t = Table(title=title)
    for col in cols:
        t.add_column(col, justify="right" if col in ("params", "GFLOPs", "forward img/s", "divisor") else "left")
    rows = []
    for name in MODELS.names():
        label = f"{name} (default)" if name == DEFAULT_MODEL else name
        if benchmark:
            r = model_row(name, size=size, budget_s=budget_s)
            t.add_row(label, r["paper"], r["dims"], f"{r['params'] / 1e6:.1f} M", f"{r['gflops']:.1f}",
                      f"{r['forward_img_s']:.1f}", str(r["divisor"]))
        else:
            cls = MODELS.get(name)
            r = {"name": name, "paper": cls.paper, "dims": "/".join(f"{d}D" for d in cls.dims)}
            t.add_row(label, r["paper"], r["dims"])
        rows.append(r)
    if not console.is_terminal and console.width < 130:
        # piped output defaults to 80 columns, which folds every paper name over several lines
        from rich.console import Console

        console = Console(file=console.file, width=130)
    console.print(t)
    return rows
