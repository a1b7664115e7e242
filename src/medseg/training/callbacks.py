"""Run-directory writers: metrics.csv, progress.png and a one-line summary per epoch.

The rows live in the callback's state, which Lightning stores in every checkpoint, so after a kill
and ``--resume`` the CSV is rewritten from the checkpoint: rows of epochs that the checkpoint does
not contain (written after it, before the kill) disappear instead of appearing twice.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from medseg.atomic import atomic_path, atomic_write_text


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (Linux VmHWM), MB; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class RunLog(pl.Callback):
    def __init__(self, fold_dir: Path, classes: list[str], console: Any = None, prefix: str = ""):
        self.fold_dir = Path(fold_dir)
        self.prefix = prefix  # before each printed line (a member's name)
        self.classes = list(classes)
        self.columns = ["epoch", "step", "train_loss", "val_loss", *[f"val_dice_{c}" for c in classes], "val_dice_mean",
                        "lr", "images_per_s", "seconds", "peak_rss_mb"]
        self.rows: list[dict[str, Any]] = []
        self.console = console
        self._t0 = time.perf_counter()

    @property
    def state_key(self) -> str:
        return "RunLog"

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state.get("rows", []))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.rows:
            self._write()  # after a resume: drop rows that the checkpoint does not know

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        validated = "val_dice_mean" in m and pl_module.last_scores and trainer.current_epoch == getattr(pl_module, "_val_epoch", -1)
        row: dict[str, Any] = {
            "epoch": trainer.current_epoch + 1,
            "step": trainer.global_step,
            "train_loss": float(m["train_loss_epoch"]) if "train_loss_epoch" in m else None,
            "lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
            "images_per_s": round(pl_module.images_per_s(), 3),
            "seconds": round(time.perf_counter() - self._t0, 3),
            "peak_rss_mb": peak_rss_mb(),
        }
        if validated:
            row.update(pl_module.last_scores)
        self.rows.append(row)
        if trainer.is_global_zero:
            self._write()
            self._plot()
            if self.console is not None:
                # through the live progress bar's console, so that the line lands above the bar, not in it;
                # soft_wrap: one line per epoch even when the console is narrower than the line
                bar = next((c for c in trainer.callbacks if type(c).__name__ == "RichProgressBar"), None)
                con = bar.progress.console if bar is not None and getattr(bar, "progress", None) is not None else self.console
                con.print(self.summary(row, epoch_label(trainer, row["epoch"])), highlight=False, soft_wrap=True)

    def summary(self, row: dict[str, Any], epoch: str) -> str:
        s = f"{self.prefix}{epoch} loss {_fmt(row['train_loss'])}"
        if row.get("val_dice_mean") is not None:
            per = " ".join(f"{c} {row[f'val_dice_{c}']:.3f}" for c in self.classes)
            s += f" | val loss {_fmt(row['val_loss'])} dice {row['val_dice_mean']:.4f} ({per})"
        s += f" | lr {_fmt(row['lr'])} | {row['images_per_s']:.1f} img/s | {row['seconds']:.1f} s"
        return s

    def _write(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _fmt(r.get(k)) for k in self.columns})
        atomic_write_text(self.fold_dir / "metrics.csv", buf.getvalue())

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        ep = [r["epoch"] for r in self.rows]
        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
        # markers everywhere: a one-epoch run must still show its points
        ax[0].plot(ep, [r.get("train_loss") for r in self.rows], ".-", label="train")
        vr = [r for r in self.rows if r.get("val_loss") is not None]
        ax[0].plot([r["epoch"] for r in vr], [r["val_loss"] for r in vr], "o-", label="validation")
        ax[0].set_title("loss")
        ax[0].legend()
        for c in self.classes:
            ax[1].plot([r["epoch"] for r in vr], [r[f"val_dice_{c}"] for r in vr], "o-", label=c)
        ax[1].plot([r["epoch"] for r in vr], [r["val_dice_mean"] for r in vr], "k.--", label="mean")
        ax[1].set_title("validation Dice per patient")
        ax[1].set_ylim(0, 1)
        ax[1].legend()
        ax[2].plot(ep, [r.get("lr") for r in self.rows], ".-")
        ax[2].set_title("learning rate")
        from matplotlib.ticker import MaxNLocator

        for a in ax:
            a.set_xlabel("epoch")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        with atomic_path(self.fold_dir / "progress.png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)


class ValidationScores(pl.Callback):
    """Scores the validation epoch (``SegModule.score_validation``) while the weights being validated
    (EMA's average, when on) are still in the module; must come before ``EMAWeightAveraging``."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.score_validation()


class ValidationSchedule(pl.Callback):
    """Validate every ``every`` epochs and always after the last epoch (so a run always ends with a
    scored bundle), by setting the trainer's validation interval before each epoch."""

    def __init__(self, every: int):
        self.every = every

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = trainer.current_epoch + 1
        due = e % self.every == 0 or (trainer.max_epochs is not None and e >= trainer.max_epochs)
        trainer.check_val_every_n_epoch = 1 if due else 10**9


class TimeBudget(pl.Callback):
    """``train.max_minutes``: stop after the step that spends the budget, validating once more so that
    the run still ends with a scored bundle (Lightning's ``max_time`` would skip that validation).
    Elapsed time is kept in checkpoints, so ``--resume`` spends only what is left; ``fraction()``
    drives the LR schedule when ``schedule.by`` is ``time``."""

    def __init__(self, minutes: float):
        self.budget = minutes * 60.0
        self.offset = 0.0
        self.t0: float | None = None

    def elapsed(self) -> float:
        return self.offset + (time.monotonic() - self.t0 if self.t0 is not None else 0.0)

    def fraction(self) -> float:
        return min(1.0, self.elapsed() / self.budget)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.strategy.broadcast(self.elapsed() >= self.budget):
            trainer.should_stop = True
            trainer.check_val_every_n_epoch = 1  # the epoch loop validates before it stops

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.offset = float(state_dict.get("elapsed_s", 0.0))


def epoch_label(trainer: pl.Trainer, epoch: int) -> str:
    """``epoch 3/100``, or ``epoch 3 (2-min budget)`` when a clock, not the epoch count, ends the run."""
    clock = next((c for c in trainer.callbacks if isinstance(c, TimeBudget)), None)
    if clock is not None:
        return f"epoch {epoch} ({clock.budget / 60:g}-min budget)"
    return f"epoch {epoch}/{trainer.max_epochs}"


def progress_bar() -> pl.Callback:
    """Lightning's rich bar (bar, elapsed • remaining, it/s), labelled like the summary lines: epochs
    counted from 1, and the metrics shown as ``loss``, ``img/s``, ``val dice``."""
    from lightning.pytorch.callbacks import RichProgressBar

    class _Bar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            d = epoch_label(self.trainer, current_epoch + 1)
            return f"{d:{len(self.validation_description)}}"

        def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            m = super().get_metrics(trainer, pl_module)
            names = {"train_loss_step": "loss", "img_s": "img/s", "val_dice_mean": "val dice"}
            return {names[k]: v for k, v in m.items() if k in names}

    return _Bar()


def atomic_checkpoint_io() -> Any:
    """Lightning's checkpoint writer with a same-folder temp file + ``os.replace``.

    Lightning's own "atomic" save goes through an fsspec transaction whose temp file lives in the system
    temp folder; when that is another filesystem than the run dir, the commit is a copy, and a SIGKILL
    during it leaves a truncated ``last.ckpt``. A rename within one folder cannot be half done."""
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class _AtomicIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if storage_options is not None or "://" in str(path):
                return super().save_checkpoint(checkpoint, path, storage_options)
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())

    return _AtomicIO()
