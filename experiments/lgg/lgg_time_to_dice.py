"""Time to accuracy on LGG: medseg's recipe vs MONAI's UNet with the plain tutorial recipe, same folds,
same wall-clock budget, same evaluation.

    .venv/bin/python experiments/lgg/lgg_time_to_dice.py [--prepared prepared/lgg] [--folds 0,1]
        [--budget 30] [--marks 5,10,15,20,25,30] [--parallel] [--config configs/lgg_unet.yaml]

For each fold, two trainings run for ``--budget`` minutes of wall clock each (data loading included,
evaluation excluded) and save their weights at every mark:
  - medseg: ``configs/lgg_unet.yaml`` through medseg's own engine (``medseg train``'s ``fit_fold``),
    with in-training validation switched off so that the budget is all training, and one of its
    ``train.members`` (a member's share of the machine with ``--parallel``: one thread);
  - peer: MONAI's ``UNet`` (channels 32..512, strides 2, 2 residual units, as in MONAI's tutorials),
    ``DiceLoss(softmax)``, Adam 1e-4, uniform slice sampling (no foreground oversampling), flips, the
    plain 2D slices at the same input size as the medseg recipe, batch 8.
Every snapshot is then scored the same way: each validation patient's every slice at its native
256x256, the mean per-patient 3D Dice (a patient without tumour scores 1 if the prediction is empty
too, else 0). ``--parallel`` runs the two trainings side by side with one thread each (half the wall
time, and a harder condition than 2 threads each); otherwise each runs alone with ``--threads``.
Prints a table (Dice at every mark, per fold and mean) and writes experiments/lgg/results/lgg_time_to_dice.json.

    .venv/bin/python experiments/lgg/lgg_time_to_dice.py --combine RESULT.json [RESULT.json ...] --out ALL.json

pools results of earlier runs (one fold a run, say) into one table and JSON, without training.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


# --- shared: snapshots and evaluation -------------------------------------------------------------
class Clock:
    """Wall-clock budget with marks; ``due()`` returns the marks (minutes) passed since the last call."""

    def __init__(self, marks: list[float], budget: float):
        self.marks = sorted(m for m in marks if m <= budget)
        self.budget = budget
        self.t0 = time.perf_counter()
        self.next = 0

    def minutes(self) -> float:
        return (time.perf_counter() - self.t0) / 60

    def due(self) -> list[float]:
        now, out = self.minutes(), []
        while self.next < len(self.marks) and now >= self.marks[self.next]:
            out.append(self.marks[self.next])
            self.next += 1
        return out

    def over(self) -> bool:
        return self.minutes() >= self.budget


def _save(model, out: Path, mark: float, info: dict) -> None:
    import torch

    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "mark": mark, **info}, out / f"snap_{mark:07.2f}.pt")


def evaluate_snapshot(net, prepared: str, val_ids: list[str], data: dict, head: str) -> dict[str, float]:
    """Per-patient Dice of ``net`` on whole validation cases, built by medseg's own validation reader
    (z-scored per case, with neighbouring slices as channels in 2.5D), so both trainings are scored alike."""
    import torch
    from torch.nn import functional as F

    from medseg.data.sampling import ValCases
    from medseg.evaluation.metrics import case_dice

    cases = ValCases(prepared, val_ids, argparse.Namespace(**data), {"mode": "zscore_case"})
    size = data["size"] if data.get("resize") else None
    net.eval()
    scores = {}
    with torch.no_grad():
        for n in range(len(cases)):
            case = cases[n]
            x = case["image"]
            h, w = x.shape[-2:]
            preds = []
            for s in range(0, x.shape[0], 16):
                xb = x[s : s + 16]
                if size is not None and tuple(size) != (h, w):
                    xb = F.interpolate(xb, size=tuple(size), mode="bilinear", align_corners=False)
                o = net(xb.contiguous(memory_format=torch.channels_last))
                o = o[0] if isinstance(o, (list, tuple)) else o
                o = F.interpolate(o.float(), size=(h, w), mode="bilinear", align_corners=False) if o.shape[-2:] != (h, w) else o
                preds.append((o.argmax(1) == 1) if head == "softmax" else (o[:, 0] > 0))
            pred = torch.cat(preds).numpy()
            scores[case["id"]] = case_dice(pred, case["mask"].numpy()[:, 0], empty="one")
    return scores


def _data_info(cfg) -> dict:
    d = cfg.data
    return {"mode": d.mode, "context": d.context, "stride": d.stride, "size": d.size, "resize": d.resize}


# --- the two trainings (each in its own process) --------------------------------------------------
def run_medseg(args, fold: int, out: Path) -> None:
    import lightning.pytorch as pl
    import torch

    from medseg.config import load_config
    from medseg.training.fit import fit_fold
    from medseg.training.task import check_task

    # one network: with --parallel it has one thread, as each of the recipe's train.members does
    overrides = {"data.prepared": args.prepared, "train.val_every": "1000000", "data.workers": "0", "train.members": "1"}
    cfg = load_config(ROOT / args.config, overrides)
    if cfg.schedule.by == "time":  # the recipe's schedule runs over this benchmark's budget
        cfg = load_config(ROOT / args.config, {**overrides, "train.max_minutes": str(args.budget)})
    ds, task = check_task(cfg, Path(args.config))
    clock = Clock(args.marks, args.budget)

    class Snapshots(pl.Callback):
        def on_train_start(self, trainer, module):
            clock.t0 = time.perf_counter()  # model built, data opened: the clock starts with training

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            for m in clock.due():
                _save(module.model, out, m, {})
            if clock.over():
                trainer.should_stop = True

        def on_train_end(self, trainer, module):
            # the recipe's schedule ended before the budget: it is its own result at the later marks
            done = clock.minutes()
            for m in clock.marks[clock.next:]:
                _save(module.model, out, m, {"finished_at_min": done})
            clock.next = len(clock.marks)

    fit_fold(cfg, task, ds, fold, out / "run", resume=False, extra_callbacks=[Snapshots()])
    info = {"data": _data_info(cfg), "arch": cfg.model.model_dump(), "head": "softmax",
            "in_channels": task["in_channels"], "out_channels": task["out_channels"]}
    (out / "info.json").write_text(json.dumps(info))


def run_peer(args, fold: int, out: Path) -> None:
    import torch
    from monai.losses import DiceLoss
    from monai.networks.nets import UNet
    from torch.utils.data import DataLoader

    from medseg.config import load_config
    from medseg.data.prepared import PreparedDataset
    from medseg.data.sampling import EpochSampler, TrainSamples

    cfg = load_config(ROOT / args.config, {"data.prepared": args.prepared, "data.fg_oversample": "0",
                                           "data.batch_size": "8", "data.mode": "2d", "data.context": "0"})
    ds = PreparedDataset.open(args.prepared)
    train_ids, _ = ds.fold(fold)
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2),
               num_res_units=2).to(memory_format=torch.channels_last)
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    samples = TrainSamples(args.prepared, train_ids, cfg.data, seed=0, norm={"mode": "zscore_case"})
    dl = DataLoader(samples, batch_size=8, sampler=EpochSampler(8 * 10**6), num_workers=0, drop_last=True)
    clock = Clock(args.marks, args.budget)
    g = torch.Generator().manual_seed(0)
    net.train()
    for x, y in dl:
        for ax in (2, 3):  # the tutorials' RandFlip
            f = torch.rand(x.shape[0], generator=g) < 0.5
            x[f], y[f] = x[f].flip(ax - 1), y[f].flip(ax - 1)
        out_ = net(x.contiguous(memory_format=torch.channels_last))
        loss = loss_fn(out_, y.long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for m in clock.due():
            _save(net, out, m, {})
        if clock.over():
            break
    info = {"data": _data_info(cfg), "head": "softmax", "peer": True}
    (out / "info.json").write_text(json.dumps(info))


def _build(info: dict):
    import torch

    if info.get("peer"):
        from monai.networks.nets import UNet

        return UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2),
                    num_res_units=2).to(memory_format=torch.channels_last)
    from medseg.models import create_model

    a = info["arch"]
    return create_model(a["name"], info["in_channels"], info["out_channels"], **a["kwargs"]).to(memory_format=torch.channels_last)


def score_dir(args, fold: int, out: Path) -> dict[str, float]:
    import torch

    from medseg.data.prepared import PreparedDataset

    info = json.loads((out / "info.json").read_text())
    _, val_ids = PreparedDataset.open(args.prepared).fold(fold)
    net = _build(info)
    res = {}
    for snap in sorted(out.glob("snap_*.pt")):
        s = torch.load(snap, map_location="cpu")
        net.load_state_dict(s["state_dict"])
        per = evaluate_snapshot(net, args.prepared, val_ids, info["data"], info["head"])
        res[f"{s['mark']:g}"] = float(np.mean(list(per.values())))
        res.setdefault("per_patient", {})[f"{s['mark']:g}"] = per
    return res


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.work) / f"{args.worker}_fold{args.fold}"
    out.mkdir(parents=True, exist_ok=True)
    (run_medseg if args.worker == "medseg" else run_peer)(args, args.fold, out)
    torch.set_num_threads(args.threads)
    (out / "scores.json").write_text(json.dumps(score_dir(args, args.fold, out)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepared", default=str(ROOT / "prepared" / "lgg"))
    ap.add_argument("--config", default="configs/lgg_unet.yaml")
    ap.add_argument("--folds", default="0,1")
    ap.add_argument("--budget", type=float, default=30.0, help="minutes per training")
    ap.add_argument("--marks", default="5,10,15,20,25,30")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", action="store_true", help="two trainings side by side, one thread each (medseg and "
                    "peer of a fold, or with --workers medseg two folds of medseg)")
    ap.add_argument("--workers", default="medseg,peer", help="which trainings to run: medseg,peer (default), medseg or peer")
    ap.add_argument("--work", default="/tmp/medseg_ttd")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "lgg" / "results" / "lgg_time_to_dice.json"))
    ap.add_argument("--worker", choices=["medseg", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--fold", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--combine", nargs="+", metavar="RESULT", help="pool earlier results into --out; no training")
    args = ap.parse_args()
    if args.combine:
        return combine(args.combine, args.out)
    args.marks = [float(m) for m in str(args.marks).split(",")] if isinstance(args.marks, str) else args.marks
    if args.worker:
        return worker(args)
    folds = [int(f) for f in args.folds.split(",")]
    base = [sys.executable, __file__, "--prepared", args.prepared, "--config", args.config, "--budget", str(args.budget),
            "--marks", ",".join(f"{m:g}" for m in args.marks), "--work", args.work]
    workers = [w for w in ("medseg", "peer") if w in args.workers.split(",")]
    if not workers:
        sys.exit("--workers: give medseg, peer or both")
    jobs = [(w, k) for k in folds for w in workers]
    env = dict(os.environ, OMP_NUM_THREADS="1" if args.parallel else str(args.threads))
    t0 = time.time()
    step = 2 if args.parallel else 1
    for n in range(0, len(jobs), step):
        procs = [subprocess.Popen(base + ["--worker", w, "--fold", str(k), "--threads", "1" if args.parallel else str(args.threads)],
                                  env=env) for w, k in jobs[n : n + step]]
        if any(p.wait() for p in procs):
            sys.exit("a training failed")
    rows = {w: {str(k): json.loads((Path(args.work) / f"{w}_fold{k}" / "scores.json").read_text()) for k in folds}
            for w in workers}
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "budget_min": args.budget,
              "parallel_one_thread_each": args.parallel, "threads": 1 if args.parallel else args.threads,
              "folds": folds, "config": args.config, "dice": rows, "wall_s": time.time() - t0}
    _write(summarise(result, [f"{m:g}" for m in args.marks if m <= args.budget]), args.out)


def summarise(result: dict, marks: list[str]) -> dict:
    """Print Dice at every mark (mean ± std over folds, and each fold) and add the summary to ``result``."""
    rows, folds = result["dice"], result["folds"]
    summary = {}
    print(f"{'minutes':>8} | " + " | ".join(f"{w} mean (per fold)" for w in rows))
    for m in marks:
        cells = []
        for w in rows:
            v = [rows[w][str(k)].get(m, float("nan")) for k in folds]
            summary.setdefault(w, {})[m] = {"mean": float(np.mean(v)), "std": float(np.std(v))}
            cells.append(f"{np.mean(v):.4f} ± {np.std(v):.4f} ({', '.join(f'{x:.3f}' for x in v)})")
        print(f"{m:>8} | " + " | ".join(cells))
    result["summary"] = summary
    if {"medseg", "peer"} <= set(rows):
        per_fold = all(rows["medseg"][str(k)].get(m, np.nan) > rows["peer"][str(k)].get(m, np.nan) for k in folds for m in marks)
        result["medseg_ahead_at_every_mark"] = all(summary["medseg"][m]["mean"] > summary["peer"][m]["mean"] for m in marks)
        result["medseg_ahead_at_every_mark_every_fold"] = per_fold
        print(f"medseg ahead at every mark: {result['medseg_ahead_at_every_mark']} (on every fold: {per_fold})")
    return result


def combine(paths: list[str], out: str) -> None:
    """Pool the folds of several results (each fold once, under the same conditions) into one result."""
    if Path(out).resolve() in {Path(p).resolve() for p in paths}:
        sys.exit(f"--combine: --out {out} is one of the results to pool; give another --out")
    parts = [_read_result(p) for p in paths]
    same = ("budget_min", "parallel_one_thread_each", "threads", "config")
    for key in same:
        if len({json.dumps(r.get(key)) for r in parts}) != 1:
            sys.exit(f"--combine: {key} differs ({', '.join(f'{p}: {r.get(key)}' for p, r in zip(paths, parts))})")
    rows: dict[str, dict] = {}
    for p, r in zip(paths, parts):
        for w, by_fold in r["dice"].items():
            for k, scores in by_fold.items():
                if k in rows.get(w, {}):
                    sys.exit(f"--combine: fold {k} of {w} appears twice (again in {p})")
                rows.setdefault(w, {})[k] = scores
    folds = sorted({int(k) for by_fold in rows.values() for k in by_fold})
    missing = [f"{w} fold {k}" for w in rows for k in folds if str(k) not in rows[w]]
    if missing:
        sys.exit(f"--combine: not every training has every fold ({', '.join(missing)})")
    marks = list(next(iter(parts[0]["summary"].values())))
    result = {"combined_from": paths, "machine": parts[0]["machine"], **{key: parts[0].get(key) for key in same},
              "folds": folds, "dice": rows, "wall_s": sum(r["wall_s"] for r in parts)}
    _write(summarise(result, marks), out)


def _read_result(path: str) -> dict:
    """One earlier result of this script, or an exit that names the file and what is wrong with it."""
    try:
        result = json.loads(Path(path).read_text())
    except OSError as e:
        sys.exit(f"--combine: cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        sys.exit(f"--combine: {path} is not valid JSON ({e})")
    lacking = [key for key in ("dice", "summary", "budget_min", "wall_s") if not isinstance(result, dict) or key not in result]
    if lacking:
        sys.exit(f"--combine: {path} is not a result of lgg_time_to_dice.py (no {', '.join(lacking)})")
    return result


def _write(result: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
