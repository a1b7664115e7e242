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


def test_auto_class_weights_reach_the_ce_term():
    fp = {"classes": {"a": {"voxel_fraction": 0.04}, "b": {"voxel_fraction": 0.01}}}
    torch.manual_seed(1)
    target = torch.zeros(2, 2, 6, 6)
    target[:, 0, :2] = 1
    target[:, 1, 4:] = 1
    logits = torch.randn(2, 3, 6, 6)
    loss = build_loss(LossConfig(terms=[{"name": "ce"}], class_weights="auto"), "multiclass", ["a", "b"], fp)
    w = torch.tensor(class_weights_from_fingerprint(fp, ["a", "b"], "multiclass"))
    expect = torch.nn.functional.cross_entropy(logits, labelmap(target)[:, 0].long(), weight=w)
    assert float(loss(logits, target)) == pytest.approx(float(expect), rel=1e-6)
    with pytest.raises(MedsegError, match="needs class frequencies"):
        build_loss(LossConfig(terms=[{"name": "ce"}], class_weights="auto"), "multiclass", ["a", "b"], {})


def test_weighted_combination_of_multiclass_focal_and_tversky():
    target = torch.zeros(1, 2, 8, 8)
    target[:, 0, :3] = 1
    target[:, 1, 5:] = 1
    perfect = _perfect_logits(labelmap(target)[:, 0].long(), 3)
    cfg = LossConfig(terms=[{"name": "focal", "weight": 0.5}, {"name": "tversky", "weight": 2.0, "kwargs": {"alpha": 0.3, "beta": 0.7}}],
                     class_weights=[0.5, 1.0, 2.0])
    combo = build_loss(cfg, "multiclass", ["a", "b"])
    assert combo.names == ["focal", "tversky"] and combo.weights == [0.5, 2.0]
    assert float(combo(perfect, target)) < 1e-4
    # a uniform prediction: Tversky index of a 1/3 probability everywhere, by hand
    flat = torch.zeros(1, 3, 8, 8)
    tv = build_loss(LossConfig(terms=[{"name": "tversky", "kwargs": {"alpha": 0.3, "beta": 0.7}}]), "multiclass", ["a", "b"])
    onehot = torch.cat([1 - target.sum(1, keepdim=True), target], 1)
    p = 1 / 3
    tp, fp_, fn = (p * onehot).sum((0, 2, 3)), (p * (1 - onehot)).sum((0, 2, 3)), ((1 - p) * onehot).sum((0, 2, 3))
    expect = float((1 - tp / (tp + 0.3 * fp_ + 0.7 * fn)).mean())
    assert float(tv(flat, target)) == pytest.approx(expect, rel=1e-4)


def test_a_registered_loss_is_found_by_name_from_the_config():
    """Losses are found through a registry, as models are: a new term is one decorated factory."""
    import torch

    from medseg.config import LossConfig, LossTerm
    from medseg.losses import LOSSES, build_loss

    class _L1(torch.nn.Module):
        def forward(self, logits, target):
            return (torch.sigmoid(logits) - target.float()).abs().mean()

    @LOSSES.register("test_l1")
    def _l1(multilabel, weight, kwargs):
        return [("test_l1", _L1())]

    try:
        loss = build_loss(LossConfig(terms=[LossTerm(name="test_l1", weight=2.0), LossTerm(name="dice")]),
                          "multilabel", ["a"])
        assert loss.names == ["test_l1", "dice"] and loss.weights == [2.0, 1.0]
        logits = torch.full((1, 1, 4, 4), 0.0)
        target = torch.ones(1, 1, 4, 4)
        expected = 2.0 * 0.5 + float(loss.terms[1](logits, target))
        assert float(loss(logits, target)) == pytest.approx(expected)
    finally:
        LOSSES._entries.pop("test_l1")
    with pytest.raises(Exception, match="unknown loss 'dcie'.*did you mean 'dice'"):
        LossTerm(name="dcie")
