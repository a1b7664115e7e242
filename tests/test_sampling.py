from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import AugmentConfig, DataConfig
from medseg.data.augment import augment_batch
from medseg.data.sampling import EpochSampler, TrainSamples, ValCases, context_indices, window
from medseg.training.synthetic import make_synthetic


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("s") / "syn", n_patients=4, slices=5, size=24)


def test_context_indices_clamp_at_edges():
    assert context_indices(0, 5, 2, 1).tolist() == [0, 0, 0, 1, 2]
    assert context_indices(4, 5, 1, 2).tolist() == [2, 4, 4]


def test_window_pads_outside_the_array():
    a = np.arange(12).reshape(3, 4)
    w = window(a, (0, 1), (-1, 2), (3, 3))
    assert w.tolist() == [[0, 0, 0], [2, 3, 0], [6, 7, 0]]


def test_samples_are_a_pure_function_of_the_index(syn):
    cfg = DataConfig(prepared=str(syn), size=[16, 16])
    a = TrainSamples(str(syn), ["case00", "case01"], cfg, seed=3, norm={"mode": "zscore_case"})
    b = TrainSamples(str(syn), ["case00", "case01"], cfg, seed=3, norm={"mode": "zscore_case"})
    x1, y1 = a[17]
    x2, y2 = b[17]
    assert x1.shape == (1, 16, 16) and y1.shape == (2, 16, 16) and y1.dtype == torch.uint8
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(a[18][0], x1)


def test_full_foreground_oversampling_always_shows_foreground(syn):
    cfg = DataConfig(prepared=str(syn), size=[8, 8], fg_oversample=1.0)
    s = TrainSamples(str(syn), ["case00", "case01", "case02"], cfg, seed=0, norm={"mode": "zscore_case"})
    assert all(int(s[i][1].sum()) > 0 for i in range(20))
    cfg0 = DataConfig(prepared=str(syn), size=[8, 8], fg_oversample=0.0)
    s0 = TrainSamples(str(syn), ["case00", "case01", "case02"], cfg0, seed=0, norm={"mode": "zscore_case"})
    assert sum(int(s0[i][1].sum()) > 0 for i in range(40)) < 40


def test_25d_stacks_and_3d_patches(syn):
    cfg = DataConfig(prepared=str(syn), mode="2.5d", context=2, stride=1, size=[24, 24])
    s = TrainSamples(str(syn), ["case00"], cfg, seed=0, norm={"mode": "zscore_case"})
    x, y = s[0]
    assert x.shape == (5, 24, 24) and y.shape == (2, 24, 24)
    v = ValCases(str(syn), ["case00"], cfg, {"mode": "zscore_case"})[0]
    assert v["image"].shape == (5, 5, 24, 24)
    # slice 0 of the stack: context i-2, i-1 clamp to slice 0, so channels 0..2 are equal
    assert torch.equal(v["image"][0, 0], v["image"][0, 2]) and not torch.equal(v["image"][0, 2], v["image"][0, 3])
    c3 = DataConfig(prepared=str(syn), mode="3d", size=[4, 16, 16], fg_oversample=1.0)
    x, y = TrainSamples(str(syn), ["case00"], c3, seed=0, norm={"mode": "zscore_case"})[1]
    assert x.shape == (1, 4, 16, 16) and y.shape == (2, 4, 16, 16) and int(y.sum()) > 0


def test_sampler_gives_ranks_disjoint_indices_per_epoch():
    r0, r1 = EpochSampler(3, rank=0, world=2), EpochSampler(3, rank=1, world=2)
    assert list(r0) == [0, 2, 4] and list(r1) == [1, 3, 5]
    r0.set_epoch(2)
    assert list(r0) == [12, 14, 16]


def test_flip_augmentation_moves_image_and_mask_together():
    cfg = AugmentConfig(flip=1.0, flip_axes=[1], rotate=0, scale=0, gamma=0, contrast=0, noise=0)
    img = torch.arange(2 * 16.0).view(1, 1, 2, 16).repeat(2, 1, 1, 1)
    msk = torch.zeros(2, 1, 2, 16, dtype=torch.uint8)
    msk[..., :3] = 1
    xi, mi = augment_batch(img, msk, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(xi, img.flip(-1), atol=1e-4)
    assert torch.equal(mi, msk.flip(-1))


def test_random_augmentation_keeps_masks_binary_and_is_seeded():
    cfg = AugmentConfig(flip=0.5, rotate=1.0, scale=1.0, elastic=1.0, gamma=1.0, contrast=1.0, noise=1.0)
    img = torch.randn(4, 2, 32, 32)
    msk = (torch.rand(4, 3, 32, 32) > 0.7).to(torch.uint8)
    a = augment_batch(img, msk, cfg, torch.Generator().manual_seed(5))
    b = augment_batch(img, msk, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(a[1].unique().tolist()) <= {0, 1} and a[1].dtype == torch.uint8
    assert not torch.equal(a[0], img)
    off = augment_batch(img, msk, AugmentConfig(enabled=False), torch.Generator())
    assert off[0] is img and off[1] is msk
    a3 = augment_batch(torch.randn(2, 1, 8, 16, 16), torch.ones(2, 1, 8, 16, 16, dtype=torch.uint8), cfg, torch.Generator())
    assert a3[0].shape == (2, 1, 8, 16, 16)


def test_25d_training_stack_is_the_validation_stack_of_its_slice(syn):
    # whole slices, no oversampling: each training item must be one row of the validation (= inference) input
    cfg = DataConfig(prepared=str(syn), mode="2.5d", context=1, stride=2, fg_oversample=0.0)
    s = TrainSamples(str(syn), ["case01"], cfg, seed=0, norm={"mode": "zscore_case"})
    v = ValCases(str(syn), ["case01"], cfg, {"mode": "zscore_case"})[0]
    assert v["image"].shape == (5, 3, 24, 24)
    seen = set()
    for g in range(12):
        x, y = s[g]
        hits = [z for z in range(5) if torch.equal(x, v["image"][z])]
        assert len(hits) == 1, g
        assert torch.equal(y, v["mask"][hits[0]])
        seen.add(hits[0])
    assert len(seen) > 1
    # stack of slice 1 at stride 2: slices -1 (clamped to 0), 1, 3
    raw = v["image"][1]
    assert torch.equal(raw[0], v["image"][0, 1]) and torch.equal(raw[2], v["image"][3, 1])


@pytest.mark.parametrize("shape", [(4, 1, 32, 32), (2, 1, 8, 16, 16)])
def test_spatial_augmentation_moves_image_and_mask_identically(shape):
    # image = mask: after rotation, scaling, flips and grid distortion through the same grid,
    # thresholding the image must give exactly the augmented mask
    cfg = AugmentConfig(flip=0.5, rotate=1.0, scale=1.0, elastic=1.0, elastic_magnitude=0.05, gamma=0, contrast=0, noise=0)
    msk = torch.zeros(shape, dtype=torch.uint8)
    msk[..., 4:12, 3:9] = 1
    msk[..., 20:, 10:] = 1
    xi, mi = augment_batch(msk.float(), msk, cfg, torch.Generator().manual_seed(3))
    assert torch.equal((xi > 0.5).to(torch.uint8), mi)
    assert not torch.equal(mi, msk) and int(mi.sum()) > 0
