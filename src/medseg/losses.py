"""Segmentation losses on MONAI's implementations, one weighted sum per config; terms are found by name
in ``LOSSES`` (``@LOSSES.register("name")`` adds one, as models do).

Targets are always per-class binary channels ``[b, k, *spatial]`` (the prepared format). The head
decides the activation: multiclass heads have k+1 outputs (softmax, background channel 0) and get a
label map; multilabel heads have k outputs (sigmoid) and get the channels as they are.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from medseg.errors import MedsegError
from medseg.registry import Registry


def labelmap(target: torch.Tensor) -> torch.Tensor:
    """Per-class binary channels [b, k, ...] (exclusive) -> label map [b, 1, ...] (0 = background)."""
    k = target.shape[1]
    idx = torch.arange(1, k + 1, device=target.device, dtype=target.dtype).view(1, k, *([1] * (target.ndim - 2)))
    return (target * idx).amax(dim=1, keepdim=True)


def class_weights_from_fingerprint(fingerprint: dict[str, Any], classes: list[str], class_kind: str) -> list[float]:
    """Inverse square root of each class's voxel frequency, normalised to mean 1 (background first for
    multiclass). The square root keeps tiny classes from dominating (plain inverse frequency makes
    1%-foreground tasks unstable)."""
    fr = [max(float(fingerprint["classes"][c]["voxel_fraction"]), 1e-6) for c in classes]
    if class_kind == "multiclass":
        fr = [max(1.0 - sum(fr), 1e-6)] + fr
    w = [f ** -0.5 for f in fr]
    m = sum(w) / len(w)
    return [x / m for x in w]


class _CE(nn.Module):
    """Weighted cross-entropy (multiclass) or BCE (multilabel) on logits."""

    def __init__(self, multilabel: bool, weight: list[float] | None):
        super().__init__()
        self.multilabel = multilabel
        self.register_buffer("weight", None if weight is None else torch.tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
            if self.weight is not None:
                loss = loss * self.weight.view(1, -1, *([1] * (loss.ndim - 2)))
            return loss.mean()
        return F.cross_entropy(logits, labelmap(target)[:, 0].long(), weight=self.weight)


class _MonaiTerm(nn.Module):
    def __init__(self, loss: nn.Module, multilabel: bool):
        super().__init__()
        self.loss = loss
        self.multilabel = multilabel

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.float() if self.multilabel else labelmap(target)
        return self.loss(logits, t)


# A loss factory takes (multilabel, class weights or None, the term's kwargs) and returns the named
# modules it adds (a composite such as dice_ce adds two, logged separately).
LossFactory = Callable[[bool, Optional[list], dict], list]
LOSSES: Registry[LossFactory] = Registry("loss", [])  # the built-ins register below, on import


def _activation(multilabel: bool) -> dict[str, Any]:
    return {"sigmoid": True} if multilabel else {"softmax": True, "to_onehot_y": True}


@LOSSES.register("dice")
def _dice(multilabel: bool, weight: list | None, kwargs: dict) -> list:
    from monai.losses import DiceLoss

    # batch=True: Dice over the whole batch, stable when a sample has no foreground (nnU-Net's choice)
    kw = {"batch": True, "smooth_nr": 1e-5, "smooth_dr": 1e-5, **_activation(multilabel), **kwargs}
    return [("dice", _MonaiTerm(DiceLoss(**kw), multilabel))]


@LOSSES.register("ce")
def _ce(multilabel: bool, weight: list | None, kwargs: dict) -> list:
    return [("ce", _CE(multilabel, weight))]


@LOSSES.register("bce")
def _bce(multilabel: bool, weight: list | None, kwargs: dict) -> list:
    if not multilabel:
        raise MedsegError("loss 'bce' is for multilabel tasks; use 'ce' for multiclass")
    return [("bce", _CE(multilabel, weight))]


@LOSSES.register("dice_ce")
def _dice_ce(multilabel: bool, weight: list | None, kwargs: dict) -> list:
    return _dice(multilabel, None, kwargs) + _ce(multilabel, weight, {})


@LOSSES.register("dice_bce")
def _dice_bce(multilabel: bool, weight: list | None, kwargs: dict) -> list:
    if not multilabel:
        raise MedsegError("loss 'dice_bce' is for multilabel tasks; use 'dice_ce' for multiclass")
    return _dice(multilabel, None, kwargs) + _bce(multilabel, weight, {})


@LOSSES.register("tversky")
def _tversky(multilabel: bool, weight: list | None, kwargs: dict) -> list:
    from monai.losses import TverskyLoss

    return [("tversky", _MonaiTerm(TverskyLoss(**{**_activation(multilabel), "batch": True, **kwargs}), multilabel))]


@LOSSES.register("focal")
def _focal(multilabel: bool, weight: list | None, kwargs: dict) -> list:
    from monai.losses import FocalLoss

    kw = {"gamma": 2.0, **kwargs}
    if not multilabel:
        kw.setdefault("to_onehot_y", True)
        kw.setdefault("use_softmax", True)
    if weight is not None:
        kw.setdefault("weight", weight)
    return [("focal", _MonaiTerm(FocalLoss(**kw), multilabel))]


class CombinedLoss(nn.Module):
    """sum_i w_i * term_i(logits, target); ``parts`` keeps the last value of each term for logging."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]):
        super().__init__()
        self.names = [n for n, _, _ in terms]
        self.weights = [w for _, w, _ in terms]
        self.terms = nn.ModuleList([m for _, _, m in terms])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        for w, m in zip(self.weights, self.terms):
            total = total + w * m(logits.float(), target)
        return total


def build_loss(loss_cfg: Any, class_kind: str, classes: list[str], fingerprint: dict[str, Any] | None = None) -> CombinedLoss:
    """From a ``LossConfig``: terms with weights; ``dice_ce``/``dice_bce`` expand to Dice + (B)CE."""
    multilabel = class_kind == "multilabel"
    n_out = len(classes) if multilabel else len(classes) + 1
    weight = None
    if loss_cfg.class_weights == "auto":
        if not fingerprint or "classes" not in fingerprint:
            raise MedsegError("class_weights 'auto' needs class frequencies in the dataset fingerprint")
        weight = class_weights_from_fingerprint(fingerprint, classes, class_kind)
    elif loss_cfg.class_weights is not None:
        weight = list(loss_cfg.class_weights)
        if len(weight) != n_out:
            raise MedsegError(
                f"loss.class_weights has {len(weight)} values; this {class_kind} task needs {n_out}"
                + (" (background first)" if not multilabel else "")
            )
    terms: list[tuple[str, float, nn.Module]] = []
    for i, t in enumerate(loss_cfg.terms):
        where = f"loss.terms[{i}] ({t.name}, kwargs {dict(t.kwargs)})"
        try:
            made = LOSSES.get(t.name)(multilabel, weight, dict(t.kwargs))
            # a wrongly typed kwarg fails only when the loss is computed: compute it once on a tiny batch
            logits, target = torch.zeros(1, n_out, 4, 4), torch.zeros(1, len(classes), 4, 4, dtype=torch.uint8)
            for _, m in made:
                m(logits, target)
        except MedsegError:
            raise
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            text = " ".join(str(e).split()) or type(e).__name__
            raise MedsegError(f"{where}: {text[:300]}") from None
        terms += [(name, t.weight, m) for name, m in made]
    return CombinedLoss(terms)
