"""Speed of every registered model beside MONAI's UNet (32…512, 2 residual units) measured in the same run.

Prints forward and training-step images/s with and without channels_last, parameters and peak memory
(RSS high-water mark of a child process per model), and writes benchmarks/results/models.json.
``--precision 32,bf16`` measures each model again under bf16 autocast (what ``train.precision: auto``
picks on CPUs with AMX), the ratio to fp32 printed per model.
Step times are the minimum over ``--iters`` (robust to other processes on a shared machine).
Usage: python benchmarks/models.py [--batch 8] [--size 256] [--iters 3] [--threads 2] [--models unet,...] [--precision 32,bf16]
                                  [--variant unet features="(8,16,32,64,128,256)" norm=instance ...]
``--variant NAME KEY=VALUE...`` (repeatable) adds a configuration of a registered model, to compare
candidate defaults in the same run as the peer.
"""
from __future__ import annotations

import argparse
import ast
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

PEER = "monai_unet_peer"


def _build(name: str, kwargs: dict):
    if name == PEER:
        from monai.networks.nets import UNet

        return UNet(2, 3, 2, (32, 64, 128, 256, 512), (2, 2, 2, 2), num_res_units=2)
    from medseg.models import create_model

    return create_model(name, 3, 2, **kwargs)


def _variant(words: list[str]) -> tuple[str, str, dict]:
    """``["unet", "features=(8,16)", "norm=instance"]`` -> (label, name, kwargs); values are Python literals or strings."""
    name, kwargs = words[0], {}
    for w in words[1:]:
        key, sep, value = w.partition("=")
        if not sep:
            raise SystemExit(f"--variant {name}: expected KEY=VALUE, got {w!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    label = name + ("[" + ",".join(f"{k}={v}" for k, v in kwargs.items()).replace(" ", "") + "]" if kwargs else "")
    return label, name, kwargs


def _measure(label: str, name: str, kwargs: dict, batch: int, size: int, iters: int, threads: int,
             precision: str = "32") -> dict:
    import torch

    torch.set_num_threads(threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {"name": label, "model": name, "kwargs": kwargs, "precision": precision}
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    for cl in (False, True):
        torch.manual_seed(0)
        m = _build(name, kwargs)
        res["params"] = sum(p.numel() for p in m.parameters())
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 2, (batch, 2, size, size)).float()
        if cl:
            m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        m.eval()
        with torch.no_grad(), autocast():
            m(x)
            ts = []
            for _ in range(iters):
                t = time.perf_counter(); m(x); ts.append(time.perf_counter() - t)
        res[f"forward_img_s{'_cl' if cl else ''}"] = batch / min(ts)
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        ts = []
        for i in range(iters + 1):
            t = time.perf_counter()
            opt.zero_grad()
            with autocast():
                out = m(x)
            torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y).backward()
            opt.step()
            if i:
                ts.append(time.perf_counter() - t)
        res[f"train_img_s{'_cl' if cl else ''}"] = batch / min(ts)
    res["peak_mem_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=None, help="comma-separated (default: all registered)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "models.json")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                    help="also measure this configuration of a registered model (repeatable)")
    ap.add_argument("--precision", default="32", help="comma-separated: 32, bf16 (bf16 autocast)")
    a = ap.parse_args()
    precisions = a.precision.split(",")
    if not set(precisions) <= {"32", "bf16"}:
        raise SystemExit(f"--precision: expected 32 and/or bf16, got {a.precision!r}")
    from medseg.models import MODELS

    runs = [(PEER, PEER, {})] + [(n, n, {}) for n in (a.models.split(",") if a.models else MODELS.names())]
    runs += [_variant(v) for v in a.variant]
    ctx = mp.get_context("spawn")
    rows = []
    for (label, name, kwargs), prec in ((r, p) for r in runs for p in precisions):
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(_measure, (label, name, kwargs, a.batch, a.size, a.iters, a.threads, prec)))
        r = rows[-1]
        label = label if prec == "32" else f"{label}@bf16"
        r["name"] = label
        print(f"{label:18s} {r['params'] / 1e6:6.2f} M  fwd {r['forward_img_s']:6.2f} / cl {r['forward_img_s_cl']:6.2f}  "
              f"train {r['train_img_s']:6.2f} / cl {r['train_img_s_cl']:6.2f} img/s  peak {r['peak_mem_mb']:7.0f} MB", flush=True)
    best = lambda r: max(r["train_img_s"], r["train_img_s_cl"])  # noqa: E731
    print("train images/s / peer's at the same precision (best memory format each; the default unet's target is >= 1.2x):")
    for r in rows:
        peer = next(p for p in rows if p["model"] == PEER and p["precision"] == r["precision"])
        r["train_ratio_vs_peer"] = best(r) / best(peer)
        print(f"  {r['name']:18s} {r['train_ratio_vs_peer']:5.2f}x")
    if len(precisions) > 1:
        print("train images/s, bf16 autocast / fp32 (best memory format each):")
        for r in rows:
            if r["precision"] == "bf16":
                fp32 = next(p for p in rows if p["kwargs"] == r["kwargs"] and p["model"] == r["model"] and p["precision"] == "32")
                r["train_ratio_bf16_vs_fp32"] = best(r) / best(fp32)
                print(f"  {r['name']:18s} {r['train_ratio_bf16_vs_fp32']:5.2f}x")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                                 "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
