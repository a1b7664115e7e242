"""Training one fold (or one member) with Lightning: precision, loaders, callbacks, checkpoints, the bundle."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from medseg.bundle import safe_load, save_bundle
from medseg.config import ExperimentConfig, config_dict
from medseg.data.resident import resident_bytes
from medseg.data.sampling import EpochSampler, TrainSamples, ValCases
from medseg.errors import MedsegError, with_path
from medseg.machine import check_gpus, cpu_has_bf16_units, gpu_free_bytes, loader_workers
from medseg.rundir import RunDir
from medseg.scores import score_named
from medseg.training.callbacks import (RunLog,
    TimeBudget,
    ValidationSchedule,
    ValidationScores,
    atomic_checkpoint_io,
    progress_bar)
from medseg.training.module import SegModule
from medseg.training.task import Task, selection_metric
from medseg.training.warm_start import warm_start_weights


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training; the message says where the last checkpoint is and how to go on."""

def _rank() -> int:
    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if k in os.environ:
            try:
                return int(os.environ[k])
            except ValueError:
                pass
    return 0

def precision_for(cfg: ExperimentConfig, accelerator: str) -> str:
    """``auto``: bf16 autocast where the hardware has bf16 units (GPUs that support it; CPUs with AMX),
    fp16 on other GPUs, fp32 on other CPUs."""
    p = cfg.train.precision
    if accelerator == "gpu":
        import torch

        if p == "bf16-mixed" and not torch.cuda.is_bf16_supported():
            raise MedsegError(f"train.precision bf16-mixed: {torch.cuda.get_device_name()} has no bf16 "
                              "(use --set train.precision=auto, which picks 16-mixed here)")
        if p == "auto":
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if p != "auto":
        return "32-true" if p == "32" else p
    return "bf16-mixed" if cpu_has_bf16_units() else "32-true"

class _Indices:
    """A dataset of its own indices: with ``DeviceBatches`` the loader only hands out which samples to cut."""

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, g: int) -> int:
        return g


def on_device(cfg: ExperimentConfig, samples: TrainSamples, accel: str) -> bool:
    """Whether training batches are cut on the GPU from a resident copy of the training cases."""
    want = cfg.data.on_device
    if want is not True and accel == "cpu":
        return False
    if want != "auto":
        return bool(want)
    return resident_bytes(samples) < gpu_free_bytes("cuda") // 4


def make_loaders(cfg: ExperimentConfig, root: str, train_ids: list[str], val_ids: list[str], task: Task, accel: str):
    """(train loader, validation loader, the training samples when batches are cut on the device else None)."""
    from torch.utils.data import DataLoader

    bs = cfg.data.batch_size
    samples = TrainSamples(root, train_ids, cfg.data, cfg.train.seed, task.norm)
    sampler = EpochSampler(cfg.train.steps_per_epoch * bs)
    if on_device(cfg, samples, accel):
        train = DataLoader(_Indices(), batch_size=bs, sampler=sampler, num_workers=0, drop_last=True)
    else:
        w = loader_workers(cfg.data.workers, accel)
        train = DataLoader(samples, batch_size=bs, sampler=sampler, num_workers=w, drop_last=True,
                           persistent_workers=w > 0, pin_memory=accel == "gpu", prefetch_factor=4 if w else None)
        samples = None
    val = DataLoader(ValCases(root, val_ids, cfg.data, task.norm), batch_size=None, num_workers=0, pin_memory=accel == "gpu")
    return train, val, samples

def bundle_for(module: Any, cfg: ExperimentConfig, task: Task, fold: int, epoch: int, scores: dict[str, float]) -> dict[str, Any]:
    import torch

    nd = task.spatial_dims
    k = len(task.classes)
    sd = {n: t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous().clone()
          for n, t in module.model.state_dict().items()}
    pp = cfg.postprocess
    th = pp.thresholds or ([0.5] * k if task.class_kind == "multilabel" else None)
    for key, v in (("thresholds", pp.thresholds), ("presence", pp.presence)):
        if isinstance(v, list) and len(v) != k:  # a per-class list must match the dataset's classes
            raise MedsegError(f"postprocess.{key} has {len(v)} values but the dataset has {k} classes "
                              f"({', '.join(task.classes)})")
    inf = cfg.inference
    flips = inf.tta_flips or ([[-1], [-2]] if nd == 2 else [[-1], [-2], [-3]])
    return {
        "arch": {"name": cfg.model.name, "in_channels": task.in_channels, "out_channels": task.out_channels,
                 "spatial_dims": nd, "kwargs": dict(cfg.model.kwargs)},
        "state_dict": sd,
        "classes": task.classes,
        "class_kind": task.class_kind,
        "channels": task.channels,
        "input": {"mode": cfg.data.mode, "context": cfg.data.context, "stride": cfg.data.stride,
                  "size": cfg.data.size, "resize": cfg.data.resize, "divisor": module.divisor,
                  "overlap": inf.overlap, "spacing": task.fingerprint.get("target_spacing")},
        "normalization": task.norm,
        "postprocess": {"thresholds": th, "presence": pp.presence, "min_size": pp.min_size,
                        "largest_cc": pp.largest_cc, "components": pp.components},
        "tta": {"enabled": inf.tta, "flips": flips},
        "meta": {"fold": fold, "epoch": epoch, "scores": scores, "config": config_dict(cfg),
                 "fingerprint": task.fingerprint, "dataset": cfg.data.prepared,
                 "precision": getattr(module, "precision_used", None)},
    }

def _replace_val_predictions(fold_dir: Path, store: dict[str, dict[str, Any]]) -> None:
    """``fold_dir/val_predictions/<case>.npz`` (prob, mask) for {case id: arrays}: written to a fresh
    folder that replaces the old one whole."""
    import numpy as np

    tmp = fold_dir / f"val_predictions.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for cid, v in store.items():
            f = tmp / RunDir.val_prediction(fold_dir, cid).name
            try:
                np.savez_compressed(f, prob=v["prob"], mask=v["mask"])
            except OSError as e:  # a full disk: name the file, leave no half folder
                raise with_path(e, f) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = fold_dir / "val_predictions"
    old = fold_dir / f"val_predictions.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

def _on_best_writer(cfg: ExperimentConfig, task: Task, fold: int, fold_dir: Path):
    def write(module: Any) -> None:
        scores = dict(module.last_scores)
        save_bundle(bundle_for(module, cfg, task, fold, module.current_epoch + 1, scores), fold_dir / "model.pt")
        _replace_val_predictions(fold_dir, module.val_store)

    return write

def fit_fold(cfg: ExperimentConfig, task: Task, ds: Any, fold: int | str, fold_dir: Path, resume: bool,
             console: Any = None, extra_callbacks: list[Any] | None = None, label: str | None = None, member: int = 0):
    """Train one fold (or ``"full"``: every case, no validation, the final weights kept); returns
    (trainer, module). ``label`` (a member's name) prefixes every printed line; ``member`` picks the
    ``train.init`` network a member starts from."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    import logging
    import warnings

    # Lightning's banner lines (GPU available, tips) drown the per-epoch summary
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # every --resume
    warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")  # --fold full
    full = fold == "full"
    train_ids, val_ids = ([c.id for c in ds.cases], []) if full else ds.fold(fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = fold_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    if ckpt_path:
        check_checkpoint(last)
    if resume and _rank() == 0:
        # leftovers of a run killed while writing (each file is written to a temp name, then renamed)
        for p in [*fold_dir.glob("*.tmp-*"), *ckpt_dir.glob("*.tmp-*"), *fold_dir.glob("val_predictions.old-*")]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    accel = cfg.train.accelerator
    if accel == "auto":
        accel = "gpu" if torch.cuda.is_available() else "cpu"
    module = SegModule(cfg, task)
    module.precision_used = precision_for(cfg, accel)  # recorded in the bundle: "auto" depends on the machine
    if cfg.train.init and ckpt_path is None:  # a resumed run restores its own weights
        module.model.load_state_dict(warm_start_weights(cfg, task, ds, fold, member))
    if console is not None and _rank() == 0:
        console.print(f"{label or f'fold {fold}'}: {accel}, {module.precision_used} precision", highlight=False)
        if module.precision_used != "bf16-mixed" and accel == "gpu" and cfg.train.precision == "auto":
            console.print("warning: this GPU has no bf16: training in fp16 mixed precision with loss scaling", highlight=False)
    module.on_best = _on_best_writer(cfg, task, fold, fold_dir)
    monitor = selection_metric(task)
    runlog = RunLog(fold_dir, task.classes, console, prefix=f"{label}: " if label else "")
    score = score_named(task.score)
    if score is not None:  # the data set's own score in metrics.csv, after val_dice_mean
        i = runlog.columns.index("val_dice_mean") + 1
        runlog.columns[i:i] = score.columns()
    callbacks: list[Any] = [ValidationScores(), ValidationSchedule(cfg.train.val_every), runlog]
    if cfg.train.max_minutes:
        callbacks.append(TimeBudget(cfg.train.max_minutes))
    # best at validation end; last at every train epoch end, after it, so that last.ckpt holds the
    # updated best-tracking state (written to a temp file, then renamed: see atomic_checkpoint_io)
    if not full:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max",
                                         save_top_k=1, enable_version_counter=False, save_on_train_epoch_end=False))
    callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                                     every_n_epochs=1, enable_version_counter=False, save_on_train_epoch_end=True))
    if cfg.train.early_stopping is not None and not full:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=cfg.train.early_stopping.patience,
                                       min_delta=cfg.train.early_stopping.min_delta, check_on_train_epoch_end=False))
    if cfg.train.ema is not None:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=cfg.train.ema))
    interactive = console is not None and getattr(console, "is_terminal", False)
    if interactive:
        callbacks.append(progress_bar())
    callbacks += extra_callbacks or []
    det = cfg.train.deterministic
    det = (accel == "cpu") if det == "auto" else (det if accel == "cpu" or not det else "warn")
    world_devices = cfg.train.devices
    if accel == "gpu":
        check_gpus(world_devices)
    trainer = pl.Trainer(
        default_root_dir=str(fold_dir),
        accelerator=accel,
        devices=world_devices,
        num_nodes=cfg.train.num_nodes,
        strategy=cfg.train.strategy,
        precision=module.precision_used,
        max_epochs=cfg.train.epochs,
        limit_train_batches=cfg.train.steps_per_epoch,
        check_val_every_n_epoch=1,  # ValidationSchedule decides per epoch
        num_sanity_val_steps=0,
        gradient_clip_val=cfg.train.clip,
        accumulate_grad_batches=cfg.train.accumulate,
        deterministic=det,
        benchmark=accel == "gpu" and not det,  # cuDNN's autotuner: the fastest convolution for each shape
        use_distributed_sampler=False,
        # flush_secs bounds the wait at Ctrl-C: a KeyboardInterrupt landing in the event writer's queue can
        # lose its wake-up, and Lightning's teardown then joins the writer until its next flush (default 120 s)
        logger=TensorBoardLogger(save_dir=str(fold_dir), name="tb", version="", default_hp_metric=False, flush_secs=5),
        callbacks=callbacks,
        plugins=[atomic_checkpoint_io()],
        enable_progress_bar=interactive,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(50, cfg.train.steps_per_epoch // 10)),
    )
    train_dl, val_dl, module.resident_samples = make_loaders(cfg, cfg.data.prepared, train_ids, val_ids, task, accel)
    try:
        trainer.fit(module, train_dl, None if full else val_dl, ckpt_path=ckpt_path)
    except torch.cuda.OutOfMemoryError:
        bs = cfg.data.batch_size
        raise MedsegError(f"out of GPU memory training {cfg.model.name} at batch size {bs}"
                          + (f", patch {'x'.join(map(str, cfg.data.size))}" if cfg.data.size else "")
                          + f": use a smaller batch (--set data.batch_size={max(1, bs // 2)}) or patch; "
                          f"resume from the last checkpoint with --resume", fold_dir) from None
    except SystemExit:
        # Lightning turns Ctrl-C into a graceful teardown then sys.exit(1); say what is left and how to go on
        if not trainer.interrupted:
            raise
        import signal

        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning left Ctrl-C ignored
        except ValueError:  # not the main thread
            pass
        where = f"{last} (end of epoch {_ckpt_epoch(last)})" if last.is_file() else "no checkpoint yet (nothing to resume)"
        raise TrainingInterrupted(f"interrupted; last checkpoint: {where}; continue with --resume") from None
    if full and trainer.global_rank == 0:  # no validation picks a best epoch: keep the final weights
        save_bundle(bundle_for(module, cfg, task, "full", trainer.current_epoch, {}), fold_dir / "model.pt")
    return trainer, module

def _ckpt_epoch(path: Path) -> int | None:
    """The epoch a checkpoint ends (for messages); loaded with weights_only, so a crafted file runs nothing."""
    try:
        return int(safe_load(path, "checkpoint")["epoch"]) + 1
    except (MedsegError, KeyError, TypeError, ValueError):
        return None

def check_checkpoint(path: Path) -> None:
    """Before resuming: the checkpoint must load as plain data with the keys Lightning restores."""
    ck = safe_load(path, "checkpoint to resume from: damaged, truncated or not a medseg checkpoint")
    if not isinstance(ck, dict) or "state_dict" not in ck or "epoch" not in ck:
        raise MedsegError("checkpoint to resume from has no state_dict/epoch: not a Lightning checkpoint", path)
