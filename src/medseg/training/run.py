"""``medseg train``: validate everything, then train one fold or all folds with Lightning.

The run directory's layout is ``medseg.rundir.RunDir``'s: training writes through it, and every later
stage reads through it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from medseg.atomic import atomic_write_text
from medseg.config import ExperimentConfig, config_dict, dump_config, load_config
from medseg.errors import MedsegError
from medseg.bundle import safe_load
from medseg.rundir import RunDir
from medseg.scores import score_for, score_named

# keys that may change between a run and its --resume (extending training, another machine)
RESUMABLE_KEYS = {"train.epochs", "data.workers", "train.devices", "train.num_nodes", "train.accelerator", "train.strategy"}


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


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_task(cfg: ExperimentConfig, config_path: Path | None) -> tuple[Any, dict[str, Any]]:
    """Open the prepared dataset and check it against the config; returns (dataset, task info)."""
    from medseg.data.prepared import PreparedDataset
    from medseg.data.sampling import in_channels, norm_config
    from medseg.models import MODELS, create_model

    root = Path(cfg.data.prepared)
    if not root.exists():
        raise MedsegError(f"data.prepared: prepared dataset not found: {root}", config_path)
    ds = PreparedDataset.open(root)
    ds.verify()  # a missing or truncated array fails now, naming the file, not inside a loader worker
    if cfg.data.classes is not None and list(cfg.data.classes) != ds.classes:
        raise MedsegError(f"data.classes {cfg.data.classes} do not match the prepared dataset's classes {ds.classes} ({root})", config_path)
    if cfg.data.class_kind != "auto" and cfg.data.class_kind != ds.class_kind:
        raise MedsegError(f"data.class_kind {cfg.data.class_kind!r} does not match the prepared dataset's {ds.class_kind!r} ({root})", config_path)
    if not ds.info.get("has_masks", True) or any(c.mask is None for c in ds.cases):
        raise MedsegError("the prepared dataset has no masks (prepared with --images-only); cannot train on it", root)
    if cfg.data.mode == "3d" and all(c.shape[0] == 1 for c in ds.cases):
        raise MedsegError("data.mode 3d needs volumes; this prepared dataset holds single 2D images", config_path)
    if cfg.data.size is None and cfg.data.mode != "3d" and len({tuple(c.shape[2:]) for c in ds.cases}) > 1:
        raise MedsegError("cases differ in size: set data.size (training crop) so that slices can be batched", config_path)
    if cfg.augment.channel_fill > 0 and cfg.augment.channel_fill_source >= len(ds.channels):
        raise MedsegError(f"augment.channel_fill_source is {cfg.augment.channel_fill_source}, but the dataset has "
                          f"{len(ds.channels)} channels ({', '.join(ds.channels)}): give 0-{len(ds.channels) - 1}", config_path)
    try:
        MODELS.get(cfg.model.name)
    except MedsegError as e:
        raise MedsegError(f"model.name: {e.problem}", config_path, hint=e.hint) from None
    multilabel = ds.class_kind == "multilabel"
    task = {
        "classes": ds.classes,
        "class_kind": ds.class_kind,
        "channels": ds.channels,
        "in_channels": in_channels(len(ds.channels), cfg.data),
        "out_channels": len(ds.classes) if multilabel else len(ds.classes) + 1,
        "spatial_dims": 3 if cfg.data.mode == "3d" else 2,
        "norm": norm_config(ds, cfg.data.normalization),
        "fingerprint": ds.fingerprint,
        "patients": {c.id: c.patient for c in ds.cases},
        "score": task_score_name(ds),
    }
    try:
        m = create_model(cfg.model.name, task["in_channels"], task["out_channels"], spatial_dims=task["spatial_dims"], **cfg.model.kwargs)
    except MedsegError as e:
        raise MedsegError(f"model: {e.problem}", config_path) from None
    except TypeError as e:
        raise MedsegError(f"model.kwargs: {e}", config_path) from None
    div = int(getattr(m, "required_divisor", 1))
    if cfg.data.size is not None and any(s % div for s in cfg.data.size[-2:] if cfg.data.mode != "3d") :
        raise MedsegError(f"data.size {cfg.data.size} must be divisible by {div} for model {cfg.model.name!r}", config_path)
    if cfg.data.mode == "3d" and any(s % div for s in cfg.data.size):
        raise MedsegError(f"data.size {cfg.data.size} must be divisible by {div} for model {cfg.model.name!r}", config_path)
    if cfg.data.size is None and any(s % div for s in ds.cases[0].shape[2:]):
        raise MedsegError(f"slices are {ds.cases[0].shape[2]}x{ds.cases[0].shape[3]}, not divisible by {div} for model "
                          f"{cfg.model.name!r}: set data.size (a crop, or with data.resize a resize)", config_path)
    from medseg.losses import build_loss

    try:
        build_loss(cfg.loss, ds.class_kind, ds.classes, ds.fingerprint)
    except MedsegError as e:
        raise MedsegError(f"loss: {e.problem}", config_path) from None
    return ds, task


def task_score_name(ds: Any) -> str | None:
    """The data-set score (``medseg.scores``) of a prepared data set, if its data brings one: validation
    then adds it per case and selects the best model by it."""
    score = score_for(ds.info.get("source_format"), ds.classes)
    return None if score is None else score.name


def _folds(ds: Any, fold: str | int, config_path: Path | None) -> list[int]:
    try:
        n = len(ds.splits()["folds"])
    except MedsegError:
        raise MedsegError("the prepared dataset has no splits.json (fewer than 2 patients?)", ds.root) from None
    if str(fold) == "all":
        return list(range(n))
    if str(fold) == "full":
        return ["full"]
    try:
        k = int(fold)
    except ValueError:
        raise MedsegError(f"--fold must be an index, 'all' or 'full', got {fold!r}", config_path) from None
    if not 0 <= k < n:
        raise MedsegError(f"fold {k} is out of range: the prepared dataset has folds 0..{n - 1}", ds.root)
    return [k]


def _check_resume(cfg: ExperimentConfig, run: Path) -> None:
    saved_path = RunDir(run).config_path
    if not saved_path.is_file():
        raise MedsegError("--resume: no run here (config.yaml is missing)", run)
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = _flatten(config_dict(cfg))
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k))
    if diff:
        k = diff[0]
        raise MedsegError(
            f"--resume: the config differs from this run's config.yaml at {k!r} ({saved.get(k)!r} in the run, "
            f"{now.get(k)!r} now); only {', '.join(sorted(RESUMABLE_KEYS))} may change",
            saved_path,
        )


def cpu_has_bf16_units() -> bool:
    """True on CPUs with AMX tiles (Intel Xeon 4th generation and later), where oneDNN's bf16 convolutions
    train the LGG U-Net about 1.6x faster than fp32 (``benchmarks/models.py --precision 32,bf16``);
    elsewhere bf16 autocast is emulated, 10-40x slower."""
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # a private torch API: absent means no
        return False


def precision_for(cfg: ExperimentConfig, accelerator: str) -> str:
    """``auto``: bf16 autocast where the hardware has bf16 units (GPUs that support it; CPUs with AMX),
    fp16 on other GPUs, fp32 on other CPUs."""
    p = cfg.train.precision
    if p != "auto":
        return "32-true" if p == "32" else p
    if accelerator == "gpu":
        import torch

        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16_units() else "32-true"


def make_loaders(cfg: ExperimentConfig, root: str, train_ids: list[str], val_ids: list[str], task: dict[str, Any], world: int):
    from torch.utils.data import DataLoader

    from medseg.data.sampling import EpochSampler, TrainSamples, ValCases

    bs = cfg.data.batch_size
    samples = TrainSamples(root, train_ids, cfg.data, cfg.train.seed, task["norm"])
    sampler = EpochSampler(cfg.train.steps_per_epoch * bs)
    w = cfg.data.workers
    train = DataLoader(samples, batch_size=bs, sampler=sampler, num_workers=w, drop_last=True,
                       persistent_workers=False, pin_memory=False, prefetch_factor=4 if w else None)
    val = DataLoader(ValCases(root, val_ids, cfg.data, task["norm"]), batch_size=None, num_workers=0)
    return train, val


def bundle_for(module: Any, cfg: ExperimentConfig, task: dict[str, Any], fold: int, epoch: int, scores: dict[str, float]) -> dict[str, Any]:
    import torch

    nd = task["spatial_dims"]
    k = len(task["classes"])
    sd = {n: t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous().clone()
          for n, t in module.model.state_dict().items()}
    pp = cfg.postprocess
    th = pp.thresholds or ([0.5] * k if task["class_kind"] == "multilabel" else None)
    for key, v in (("thresholds", pp.thresholds), ("presence", pp.presence)):
        if isinstance(v, list) and len(v) != k:  # a per-class list must match the dataset's classes
            raise MedsegError(f"postprocess.{key} has {len(v)} values but the dataset has {k} classes "
                              f"({', '.join(task['classes'])})")
    inf = cfg.inference
    flips = inf.tta_flips or ([[-1], [-2]] if nd == 2 else [[-1], [-2], [-3]])
    return {
        "arch": {"name": cfg.model.name, "in_channels": task["in_channels"], "out_channels": task["out_channels"],
                 "spatial_dims": nd, "kwargs": dict(cfg.model.kwargs)},
        "state_dict": sd,
        "classes": task["classes"],
        "class_kind": task["class_kind"],
        "channels": task["channels"],
        "input": {"mode": cfg.data.mode, "context": cfg.data.context, "stride": cfg.data.stride,
                  "size": cfg.data.size, "resize": cfg.data.resize, "divisor": module.divisor,
                  "overlap": inf.overlap},
        "normalization": task["norm"],
        "postprocess": {"thresholds": th, "presence": pp.presence, "min_size": pp.min_size,
                        "largest_cc": pp.largest_cc, "components": pp.components},
        "tta": {"enabled": inf.tta, "flips": flips},
        "meta": {"fold": fold, "epoch": epoch, "scores": scores, "config": config_dict(cfg),
                 "fingerprint": task["fingerprint"], "dataset": cfg.data.prepared,
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
    for cid, v in store.items():
        np.savez_compressed(tmp / RunDir.val_prediction(fold_dir, cid).name, prob=v["prob"], mask=v["mask"])
    final = fold_dir / "val_predictions"
    old = fold_dir / f"val_predictions.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _on_best_writer(cfg: ExperimentConfig, task: dict[str, Any], fold: int, fold_dir: Path):
    from medseg.bundle import save_bundle

    def write(module: Any) -> None:
        scores = dict(module.last_scores)
        save_bundle(bundle_for(module, cfg, task, fold, module.current_epoch + 1, scores), fold_dir / "model.pt")
        _replace_val_predictions(fold_dir, module.val_store)

    return write


def fit_fold(cfg: ExperimentConfig, task: dict[str, Any], ds: Any, fold: int | str, fold_dir: Path, resume: bool,
             console: Any = None, extra_callbacks: list[Any] | None = None, label: str | None = None, member: int = 0):
    """Train one fold (or ``"full"``: every case, no validation, the final weights kept); returns
    (trainer, module). ``label`` (a member's name) prefixes every printed line; ``member`` picks the
    ``train.init`` network a member starts from."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from medseg.training.callbacks import RunLog, TimeBudget, ValidationSchedule, ValidationScores, atomic_checkpoint_io
    from medseg.training.module import SegModule, selection_metric

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
        from medseg.training.warm_start import warm_start_weights

        module.model.load_state_dict(warm_start_weights(cfg, task, ds, fold, member))
    if console is not None and _rank() == 0:
        console.print(f"{label or f'fold {fold}'}: {accel}, {module.precision_used} precision", highlight=False)
    module.on_best = _on_best_writer(cfg, task, fold, fold_dir)
    monitor = selection_metric(task)
    runlog = RunLog(fold_dir, task["classes"], console, prefix=f"{label}: " if label else "")
    score = score_named(task.get("score"))
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
        from medseg.training.callbacks import progress_bar

        callbacks.append(progress_bar())
    callbacks += extra_callbacks or []
    world_devices = cfg.train.devices
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
        deterministic=cfg.train.deterministic if accel == "cpu" else ("warn" if cfg.train.deterministic else False),
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
    train_dl, val_dl = make_loaders(cfg, cfg.data.prepared, train_ids, val_ids, task, trainer.world_size)
    try:
        trainer.fit(module, train_dl, None if full else val_dl, ckpt_path=ckpt_path)
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
        from medseg.bundle import save_bundle

        save_bundle(bundle_for(module, cfg, task, "full", trainer.current_epoch, {}), fold_dir / "model.pt")
    return trainer, module


def fit_members(cfg: ExperimentConfig, task: dict[str, Any], ds: Any, fold: int | str, fold_dir: Path, resume: bool,
                console: Any = None) -> dict[str, float]:
    """``train.members`` > 1: the fold's members (seeds seed, seed+1, ...) trained side by side, one
    process each with an equal share of the CPU threads, in ``fold_dir/member_i`` (each with its own
    config.yaml); then one bundle holding them all (``fold_dir/model.pt``) and the ensemble's
    validation predictions and scores."""
    import signal
    import subprocess
    import sys
    import time

    import torch

    n = cfg.train.members
    threads = max(1, torch.get_num_threads() // n)
    procs = []
    for i in range(n):
        mdir = RunDir.member_dir(fold_dir, i)
        mdir.mkdir(parents=True, exist_ok=True)
        mcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": cfg.train.seed + i, "members": 1})})
        atomic_write_text(mdir / "config.yaml", dump_config(mcfg))
        # a fresh interpreter (not fork: this process may hold torch threads; not multiprocessing's
        # spawn: it re-imports the caller's script)
        args = [str(mdir / "config.yaml"), str(fold), str(mdir), str(threads), f"fold {fold} member {i}",
                "1" if resume else "0", "1" if console is not None else "0", str(i)]
        # own session: a Ctrl-C reaches this process only, which passes it on once (below)
        procs.append(subprocess.Popen([sys.executable, "-c", "import sys; from medseg.training.run import _member_main; "
                                       "_member_main(sys.argv[1:])", *args], start_new_session=True))
    if console is not None:
        console.print(f"fold {fold}: {n} members side by side, {threads} thread{'s' if threads > 1 else ''} each",
                      highlight=False)

    def stop_all() -> None:  # SIGINT: each member checkpoints and exits as on Ctrl-C
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):  # one failed: the ensemble cannot be made
                stop_all()
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop_all()
        raise TrainingInterrupted(f"interrupted; the members' last checkpoints are in {fold_dir}/member_*/checkpoints; "
                                  "continue with --resume") from None
    codes = [p.returncode for p in procs]
    failed = sorted((c == 130, i) for i, c in enumerate(codes) if c != 0)  # the cause first, not a member stopped for it
    if failed:
        i = failed[0][1]
        raise MedsegError(f"member {i} of fold {fold} failed (exit code {codes[i]}; its error is printed above)",
                          RunDir.member_dir(fold_dir, i))
    return merge_members(cfg, task, ds, fold, fold_dir)


def _member_main(argv: list[str]) -> None:
    """The process of one member (``fit_members``): CONFIG FOLD MEMBER_DIR THREADS LABEL RESUME SHOW MEMBER."""
    import sys

    import torch

    config, fold, member_dir, threads, label, resume, show, member = argv
    torch.set_num_threads(int(threads))
    console = None
    if show == "1":  # plain lines, no live progress bar: several processes share the terminal
        from rich.console import Console

        console = Console(force_terminal=False, soft_wrap=True)
    try:
        cfg = load_config(config)
        ds, task = check_task(cfg, Path(config))
        fit_fold(cfg, task, ds, fold if fold == "full" else int(fold), Path(member_dir), resume == "1", console, label=label,
                 member=int(member))
    except TrainingInterrupted:
        sys.exit(130)
    except MedsegError as e:
        print(f"error: {label}: {e}", file=sys.stderr)
        sys.exit(2)


def merge_members(cfg: ExperimentConfig, task: dict[str, Any], ds: Any, fold: int | str, fold_dir: Path) -> dict[str, float]:
    """One bundle of the fold's trained members (member 0's, with the others' weights in ``members``)
    and, for a validated fold, the ensemble's validation predictions (the members' probabilities
    averaged, as inference averages them) and scores, which it returns."""
    import numpy as np
    import torch

    from medseg.bundle import load_bundle, save_bundle
    from medseg.training.module import dice_scores, overlap_counts, score_columns, to_masks

    members = [RunDir.member_dir(fold_dir, i) for i in range(cfg.train.members)]
    bundles = [load_bundle(m / "model.pt") for m in members]
    scores: dict[str, float] = {}
    if fold != "full":
        store: dict[str, dict[str, Any]] = {}
        stats: list[Any] = []
        score = score_named(task.get("score"))
        terms = np.zeros(4)
        for cid in ds.fold(fold)[1]:
            probs = []
            for m in members:
                with np.load(RunDir.val_prediction(m, cid)) as z:
                    probs.append(z["prob"].astype(np.float32))
            prob = np.mean(probs, axis=0)
            pred = to_masks(torch.from_numpy(prob), task["class_kind"], cfg.postprocess.thresholds)
            truth = torch.from_numpy(np.array(ds.mask(ds.index(cid))))  # a copy: the memory map is read-only
            stats.append((task["patients"][cid], *overlap_counts(pred, truth)))
            if score is not None:
                terms += score.case_terms(pred.numpy(), truth.numpy())
            store[cid] = {"prob": prob.astype(np.float16), "mask": pred.numpy()}
        scores = dice_scores(stats, task["classes"])
        if score is not None:
            scores.update(score_columns(score, terms))
        _replace_val_predictions(fold_dir, store)
    bundle = dict(bundles[0], members=[b["state_dict"] for b in bundles[1:]])
    bundle["meta"] = {**bundles[0]["meta"], "config": config_dict(cfg), "scores": scores,
                      "members": [{"seed": b["meta"]["config"]["train"]["seed"], "epoch": b["meta"]["epoch"],
                                   "scores": b["meta"]["scores"], "precision": b["meta"].get("precision")} for b in bundles]}
    save_bundle(bundle, fold_dir / "model.pt")
    return scores


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


def train(config_path: str | Path, fold: str | int = "0", overrides: dict[str, str] | None = None, out: str | Path | None = None,
          resume: bool = False, console: Any = None) -> dict[str, Any]:
    """Train fold ``fold`` (or ``"all"``) of ``config_path``; returns a summary {fold: scores}."""
    config_path = Path(config_path)
    cfg = load_config(config_path, overrides)
    ds, task = check_task(cfg, config_path)
    folds = _folds(ds, fold, config_path)
    run = Path(out) if out is not None else Path("runs") / config_path.stem
    rd = RunDir(run)
    if cfg.train.init and not resume:  # a wrong path or network fails now, not after the first fold
        from medseg.training.warm_start import warm_start_weights

        for k in folds:
            warm_start_weights(cfg, task, ds, k)
        if console is not None and not Path(cfg.train.init).is_dir() and any(k != "full" for k in folds):
            console.print(f"train.init: every fold starts from the same weights ({cfg.train.init}); if they were "
                          "trained on any of this dataset's patients, the validation scores are optimistic", highlight=False)
    if resume:
        _check_resume(cfg, run)
        for k in folds:  # a damaged or crafted checkpoint fails now, before anything in the run is rewritten
            for last in sorted(rd.fold_dir(k).glob("**/checkpoints/last.ckpt")):
                check_checkpoint(last)
    else:
        busy = [f for f in folds if any(rd.fold_dir(f).glob("**/checkpoints/last.ckpt"))]  # members' too
        if busy:
            raise MedsegError(f"fold {busy[0]} of this run directory already has checkpoints; pass --resume to continue it "
                              "or choose another --out", run)
    if _rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rd.config_path, dump_config(cfg))
        atomic_write_text(rd.splits_path, json.dumps(ds.splits(), indent=1))
    results: dict[str, Any] = {}
    for k in folds:
        fold_dir = rd.fold_dir(k)
        from medseg.training.module import selection_metric

        if cfg.train.members > 1:
            results[str(k)] = fit_members(cfg, task, ds, k, fold_dir, resume, console)
            if console is not None and results[str(k)]:
                console.print(f"fold {k}: the {cfg.train.members} members averaged: "
                              f"per-patient Dice {results[str(k)]['val_dice_mean']:.4f}", highlight=False)
        else:
            fit_fold(cfg, task, ds, k, fold_dir, resume, console)
            results[str(k)] = _best_scores(fold_dir, selection_metric(task))
    if str(fold) == "all" and _rank() == 0:
        summary = _cv_summary(results, task["classes"], selection_metric(task), task.get("score"))
        atomic_write_text(rd.cv_summary_path, json.dumps(summary, indent=1))
        if console is not None:
            console.print(f"cross-validation: mean per-patient Dice {summary['mean']['val_dice_mean']:.4f} "
                          f"± {summary['std']['val_dice_mean']:.4f} over {len(folds)} folds")
            key = f"val_{task.get('score')}_score"
            if key in summary["mean"]:
                console.print(f"cross-validation: mean {score_named(task['score']).label} {summary['mean'][key]:.4f} "
                              f"± {summary['std'][key]:.4f}")
    return results


def _best_scores(fold_dir: Path, metric: str = "val_dice_mean") -> dict[str, Any]:
    """The best epoch's row of metrics.csv (by ``metric``)."""
    import csv

    p = fold_dir / "metrics.csv"
    if not p.is_file():
        return {}
    rows = [r for r in csv.DictReader(p.open()) if r.get(metric)]
    if not rows:
        return {}
    best = max(rows, key=lambda r: float(r[metric]))
    return {k: (float(v) if v not in ("", None) else None) for k, v in best.items()}


def _cv_summary(results: dict[str, Any], classes: list[str], selected_by: str = "val_dice_mean",
                score: str | None = None) -> dict[str, Any]:
    import numpy as np

    keys = [f"val_dice_{c}" for c in classes] + ["val_dice_mean"] + ([f"val_{score}_score"] if score else [])
    vals = {k: [r[k] for r in results.values() if r.get(k) is not None] for k in keys}
    return {
        "selected_by": selected_by,
        "folds": results,
        "mean": {k: float(np.mean(v)) if v else math.nan for k, v in vals.items()},
        "std": {k: float(np.std(v)) if v else math.nan for k, v in vals.items()},
    }
