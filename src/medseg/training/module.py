"""The LightningModule: model + loss + batch augmentation + whole-case validation with per-patient Dice
(and, on UW-Madison data, the competition score per case-day, which then selects the best model)."""
from __future__ import annotations

import math
import random
import time
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
from torch.nn import functional as F

from medseg.config import ExperimentConfig
from medseg.data.augment import augment_batch
from medseg.errors import MedsegError, warn
from medseg.losses import build_loss
from medseg.scores import score_named
from medseg.training.callbacks import TimeBudget
from medseg.training.task import Task, selection_metric


def score_columns(score: Any, terms: np.ndarray) -> dict[str, float]:
    """``{val_<name>_<part>: value}`` of a data-set score's summed terms."""
    res = score.result(terms)
    return {f"val_{score.name}_{p}": float(res[p]) for p in score.parts}


def lr_lambda(cfg: ExperimentConfig, progress: Callable[[], float] | None = None):
    """Per-optimizer-step multiplier: linear warm-up, then cosine or poly decay to ``min_lr_ratio``,
    over the steps or, given ``progress`` (the fraction of the time budget spent), over the clock."""
    steps = max(1, cfg.train.steps_per_epoch // cfg.train.accumulate)
    total = max(1, cfg.train.epochs * steps)
    warm = int(cfg.schedule.warmup_epochs * steps)
    lo = cfg.schedule.min_lr_ratio
    name = cfg.schedule.name

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if name == "constant":
            return 1.0
        t = progress() if progress is not None else min(1.0, (step - warm) / max(1, total - warm))
        if name == "cosine":
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
        return lo + (1 - lo) * (1 - t) ** cfg.schedule.power

    return f


def to_masks(prob: torch.Tensor, class_kind: str, thresholds: list[float] | None) -> torch.Tensor:
    """Probabilities [n, out, ...] -> per-class binary channels [n, k, ...] uint8."""
    if class_kind == "multilabel":
        k = prob.shape[1]
        th = torch.tensor(thresholds or [0.5] * k, device=prob.device).view(1, k, *([1] * (prob.ndim - 2)))
        return (prob > th).to(torch.uint8)
    lab = prob.argmax(dim=1)
    k = prob.shape[1] - 1
    return torch.stack([(lab == j + 1) for j in range(k)], dim=1).to(torch.uint8)


def overlap_counts(pred: torch.Tensor, truth: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class, over a case's slices [z, k, h, w]: (intersection, predicted, true) voxel counts."""
    red = (0, 2, 3)
    return ((pred.bool() & truth.bool()).sum(dim=red).cpu().numpy(), pred.sum(dim=red, dtype=torch.int64).cpu().numpy(),
            truth.sum(dim=red, dtype=torch.int64).cpu().numpy())


def patient_dice(stats: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """[patients, k] Dice over each patient's whole volume(s), from (patient, intersection, predicted,
    true) voxel counts per class and case; NaN where truth and prediction are both empty (skipped in
    the means, as in the literature)."""
    per: dict[str, list[np.ndarray]] = {}
    for p, i, ps, ts in stats:
        acc = per.setdefault(p, [np.zeros_like(i), np.zeros_like(ps), np.zeros_like(ts)])
        acc[0] += i
        acc[1] += ps
        acc[2] += ts
    rows = []
    for i, ps, ts in per.values():
        den = (ps + ts).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            rows.append(np.where(den > 0, 2 * i / den, np.nan))
    return np.array(rows).reshape(len(rows), -1)


def dice_scores(stats: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], classes: list[str]) -> dict[str, float]:
    """``val_dice_<class>`` (mean per-patient Dice) and ``val_dice_mean`` (their mean)."""
    d = patient_dice(stats)
    with np.errstate(all="ignore"):
        per_class = np.nanmean(d, axis=0) if len(d) else np.full(len(classes), np.nan)
    scores = {f"val_dice_{c}": float(np.nan_to_num(v)) for c, v in zip(classes, per_class)}
    scores["val_dice_mean"] = float(np.mean([scores[f"val_dice_{c}"] for c in classes]))
    return scores


class SegModule(pl.LightningModule):
    def __init__(self, cfg: ExperimentConfig, task: Task):
        super().__init__()
        from medseg.models import create_model

        self.cfg = cfg
        self.task = task
        self.multilabel = task.class_kind == "multilabel"
        nd = 3 if cfg.data.mode == "3d" else 2
        self.nd = nd
        self.model = create_model(cfg.model.name, task.in_channels, task.out_channels, spatial_dims=nd, **cfg.model.kwargs)
        self.divisor = int(getattr(self.model, "required_divisor", 1))
        cl = cfg.train.channels_last
        self.channels_last = nd == 2 and (bool(getattr(type(self.model), "channels_last", True)) if cl == "auto" else bool(cl))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss = build_loss(cfg.loss, task.class_kind, task.classes, task.fingerprint)
        self.task_score = score_named(task.score)
        self.select = selection_metric(task)
        self.best_score = -math.inf
        self.last_scores: dict[str, float] = {}
        self.val_store: dict[str, dict[str, np.ndarray]] = {}
        self._val_stats: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self._val_losses: list[float] = []
        self._score_terms = np.zeros(4)  # the data set's own score: running sums of its terms
        self._t0 = 0.0
        self._val_epoch = -1
        self._images = 0
        self.on_best = None  # callable(module) set by the runner: writes the bundle and predictions
        self.resident_samples = None  # set by the runner when batches are cut on the device (data/resident.py)
        self._device_batches = None

    def setup(self, stage: str) -> None:
        # channels_last on CUDA whatever the CPU measurement says: 3.7x the training speed of the default
        # U-Net at 256x256 on an H200 (cuDNN's NHWC kernels); before the optimizer sees the parameters
        if (self.nd == 2 and not self.channels_last and self.cfg.train.channels_last == "auto"
                and self.trainer.strategy.root_device.type == "cuda"):
            self.channels_last = True
            self.model = self.model.to(memory_format=torch.channels_last)

    # --- training -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _loss(self, out, y: torch.Tensor) -> torch.Tensor:
        if isinstance(out, (list, tuple)):
            ws = self.cfg.loss.deep_supervision_weights or [0.5**i for i in range(len(out))]
            ws = ws[: len(out)]
            return sum(w * self.loss(o, y) for w, o in zip(ws, out)) / sum(ws)
        return self.loss(out, y)

    def _generator(self, batch_idx: int) -> torch.Generator:
        ss = np.random.SeedSequence([self.cfg.train.seed, self.current_epoch, batch_idx, self.global_rank])
        return torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))

    def on_train_epoch_start(self) -> None:
        self._t0 = time.perf_counter()
        self._images = 0

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        if self.resident_samples is not None and self.trainer.training:
            return batch  # sample indices: read on the host, so no step waits for the device to copy them back
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch, batch_idx: int):
        if self.resident_samples is not None:  # the loader handed out sample indices: cut them here
            if self._device_batches is None:
                from medseg.data.resident import DeviceBatches

                self._device_batches = DeviceBatches(self.resident_samples, self.device)
            batch = self._device_batches.batch(batch.tolist())
        x, y = batch
        with torch.no_grad():
            x, y = augment_batch(x, y, self.cfg.augment, self._generator(batch_idx), len(self.task.channels))
        loss = self._loss(self(x), y)
        # a non-finite loss poisons every weight it reaches: stop at once (a GPU checks when it logs, to
        # spare a synchronisation per step)
        if (x.device.type == "cpu" or batch_idx % 50 == 0) and not bool(torch.isfinite(loss)):
            raise MedsegError(f"the training loss is {float(loss)} at epoch {self.current_epoch + 1}, step "
                              f"{batch_idx + 1}: training diverged (non-finite inputs, or too high a learning rate "
                              "optim.lr); nothing from this epoch is kept", self.cfg.data.prepared)
        self._images += x.shape[0]
        dt = max(time.perf_counter() - self._t0, 1e-9)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        self.log("img_s", self._images * self.trainer.world_size / dt, on_step=True, on_epoch=False, prog_bar=True, sync_dist=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._t_last = time.perf_counter()  # so that validation time does not count as training time

    def images_per_s(self) -> float:
        dt = max(getattr(self, "_t_last", time.perf_counter()) - self._t0, 1e-9)
        return self._images * self.trainer.world_size / dt

    def configure_optimizers(self):
        o = self.cfg.optim
        if o.name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        progress = None
        if self.cfg.schedule.by == "time":
            progress = next(c for c in self.trainer.callbacks if isinstance(c, TimeBudget)).fraction
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg, progress))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- validation on whole cases ----------------------------------------------------------------
    @torch.no_grad()
    def predict_case(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of a whole case: image [z, C', h, w] (2D, batched by slices, padded to the model's
        divisor and cropped back) or [C, d, h, w] (3D, sliding window over the patch size). In the
        precision ``medseg predict`` runs the network in on this device (fp32 on a CPU, bf16 on a GPU that
        has it), whatever the training precision: the validation scores and the predictions ``medseg
        tune`` chooses on are what users get."""
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda and torch.cuda.is_bf16_supported()):
            return self._predict_case(image)

    def _predict_case(self, image: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.nd == 3:
            from monai.inferers import sliding_window_inference

            x = image[None].to(self.device)
            out = sliding_window_inference(x, tuple(cfg.data.size), self._val_batch(), lambda t: _main(self(t)), overlap=0.25)
            return out[0].float()
        h, w = image.shape[-2:]
        d = self.divisor
        ph, pw = (-h) % d, (-w) % d
        outs = []
        bs = self._val_batch()
        for s in range(0, image.shape[0], bs):
            x = image[s : s + bs].to(self.device, non_blocking=True)
            if cfg.data.size is not None and cfg.data.resize:
                x = F.interpolate(x, size=tuple(cfg.data.size), mode="bilinear", align_corners=False)
                o = F.interpolate(_main(self(x)).float(), size=(h, w), mode="bilinear", align_corners=False)
            else:
                if ph or pw:
                    x = F.pad(x, (0, pw, 0, ph))
                o = _main(self(x))[..., :h, :w]
            outs.append(o.float())
        return torch.cat(outs)

    def _val_batch(self) -> int:
        # 8x on a GPU, as ``medseg predict`` batches there: fewer, fuller launches
        return self.cfg.data.val_batch_size * (8 if self.device.type == "cuda" else 1)

    def on_validation_epoch_start(self) -> None:
        self._val_stats = []
        self._val_losses = []
        self._score_terms = np.zeros(4)
        self.val_store = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        logits = self.predict_case(batch["image"])
        mask = batch["mask"].to(self.device)  # [z, k, h, w]
        if self.nd == 3:
            logits = logits.movedim(1, 0)  # [out, d, h, w] -> [d, out, h, w]
        self._val_losses.append(float(self.loss(logits.movedim(0, 1)[None] if self.nd == 3 else logits,
                                                mask.movedim(0, 1)[None] if self.nd == 3 else mask)))
        prob = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)
        pred = to_masks(prob, self.task.class_kind, self.cfg.postprocess.thresholds)
        self._val_stats.append((self.task.patients[batch["id"]], *overlap_counts(pred, mask)))
        if self.task_score is not None:
            self._score_terms += self.task_score.case_terms(pred.cpu().numpy(), mask.cpu().numpy())
        if self.global_rank == 0:
            self.val_store[batch["id"]] = {"prob": prob.cpu().numpy().astype(np.float16), "mask": pred.cpu().numpy()}

    def score_validation(self) -> None:
        """Per-patient Dice, logging and the best-model write. Called by ``ValidationScores`` (a callback,
        listed before EMA's) rather than from this module's own ``on_validation_epoch_end``, which
        Lightning runs after every callback's: by then EMA has swapped the raw weights back and the
        bundle would not hold the weights that were scored."""
        if not self._val_stats:
            return
        scores = dice_scores(self._val_stats, self.task.classes)
        scores["val_loss"] = float(np.mean(self._val_losses))
        predicted = sum(st[2] for st in self._val_stats)
        true = sum(st[3] for st in self._val_stats)
        dead = [c for c, ps, ts in zip(self.task.classes, predicted, true) if ts > 0 and ps == 0]
        if dead and self.global_rank == 0:
            warn(f"epoch {self.current_epoch + 1}: class(es) {', '.join(dead)} present in the validation truth were "
                 f"never predicted (Dice 0): the network has not learnt {'them' if len(dead) > 1 else 'it'} yet")
        if self.task_score is not None:
            scores.update(score_columns(self.task_score, self._score_terms))
        self.last_scores = scores
        self._val_epoch = self.current_epoch
        for k, v in scores.items():
            self.log(k, v, prog_bar=k == "val_dice_mean", sync_dist=False, rank_zero_only=False)
        if scores[self.select] > self.best_score:
            self.best_score = scores[self.select]
            if self.on_best is not None and self.global_rank == 0:
                self.on_best(self)
        self.val_store = {}

    # --- checkpoint extras: best score and RNG states (exact resume) ---------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medseg"] = {
            "best_score": self.best_score,
            "rng": _rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("medseg", {})
        self.best_score = extra.get("best_score", -math.inf)
        if extra.get("rng"):
            _set_rng_state(extra["rng"])


def _main(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _rng_state() -> dict[str, Any]:
    # plain tensors/lists only: Lightning loads checkpoints with weights_only where torch allows
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    ver, internal, nxt = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [ver, list(internal), nxt]}


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    ver, internal, nxt = st["python"]
    random.setstate((ver, tuple(internal), nxt))
