from __future__ import annotations

import math

import pytest
import torch

from medseg.config import LossConfig
from medseg.errors import MedsegError
from medseg.losses import build_loss, class_weights_from_fingerprint, labelmap


def test_labelmap_from_exclusive_channels():
    t = torch.zeros(1, 2, 2, 2)
    t[0, 0, 0, 0] = 1
    t[0, 1, 1, 1] = 1
    assert labelmap(t)[0, 0].tolist() == [[1, 0], [0, 2]]


def test_auto_class_weights_inverse_sqrt_frequency():
    fp = {"classes": {"a": {"voxel_fraction": 0.04}, "b": {"voxel_fraction": 0.01}}}
    w = class_weights_from_fingerprint(fp, ["a", "b"], "multilabel")
    # 1/sqrt(.04)=5, 1/sqrt(.01)=10 -> mean 7.5
    assert w == pytest.approx([5 / 7.5, 10 / 7.5])
    w = class_weights_from_fingerprint(fp, ["a", "b"], "multiclass")
    raw = [0.95 ** -0.5, 5.0, 10.0]
    m = sum(raw) / 3
    assert w == pytest.approx([r / m for r in raw])


def _perfect_logits(target_lab: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(target_lab, n).movedim(-1, 1).float() * 40 - 20


def test_dice_ce_is_dice_plus_ce_and_vanishes_on_a_perfect_prediction():
    torch.manual_seed(0)
    target = torch.zeros(2, 2, 8, 8)
    target[:, 0, :4] = 1
    target[:, 1, 6:] = 1
    combo = build_loss(LossConfig(terms=[{"name": "dice_ce", "weight": 2.0}]), "multiclass", ["a", "b"])
    assert combo.names == ["dice", "ce"] and combo.weights == [2.0, 2.0]
    logits = torch.randn(2, 3, 8, 8)
    dice = build_loss(LossConfig(terms=[{"name": "dice"}]), "multiclass", ["a", "b"])
    ce = build_loss(LossConfig(terms=[{"name": "ce"}]), "multiclass", ["a", "b"])
    assert float(combo(logits, target)) == pytest.approx(2 * float(dice(logits, target)) + 2 * float(ce(logits, target)), rel=1e-5)
    # plain CE against torch
    assert float(ce(logits, target)) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labelmap(target)[:, 0].long())), rel=1e-6)
    perfect = _perfect_logits(labelmap(target)[:, 0].long(), 3)
    assert float(combo(perfect, target)) < 1e-4


def test_multilabel_bce_with_class_weights_matches_hand_computation():
    logits = torch.tensor([[[[0.0]], [[2.0]]]])  # [1, 2, 1, 1]
    target = torch.tensor([[[[1.0]], [[0.0]]]])
    loss = build_loss(LossConfig(terms=[{"name": "bce"}], class_weights=[1.0, 3.0]), "multilabel", ["a", "b"])
    expect = (math.log(2) + 3 * (2 + math.log1p(math.exp(-2)))) / 2
    assert float(loss(logits, target)) == pytest.approx(expect, rel=1e-6)


def test_focal_and_tversky_run_and_order_predictions():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    good = target * 20 - 10
    bad = -good
    for name in ("focal", "tversky", "dice_bce"):
        loss = build_loss(LossConfig(terms=[{"name": name}]), "multilabel", ["x"])
        assert float(loss(good, target)) < float(loss(bad, target))


def test_bad_combinations_are_clear_errors():
    with pytest.raises(MedsegError, match="'bce' is for multilabel"):
        build_loss(LossConfig(terms=[{"name": "bce"}]), "multiclass", ["a"])
    with pytest.raises(MedsegError, match="class_weights has 1 values; this multiclass task needs 2"):
        build_loss(LossConfig(terms=[{"name": "ce"}], class_weights=[1.0]), "multiclass", ["a"])
