from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import AugmentConfig, DataConfig
from medseg.data.augment import augment_batch, fill_channels
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


def test_channel_fill_copies_the_source_channel_in_every_slice_of_a_stack():
    # 2 samples, 2.5D stacks of 2 slices x 3 modalities: channel value = 10 * slice + modality
    img = (torch.tensor([0.0, 1, 2, 10, 11, 12]).view(1, 6, 1, 1) + torch.zeros(2, 6, 4, 4))
    always = fill_channels(img, 1.0, 1, 3, torch.Generator())
    assert always[:, :, 0, 0].tolist() == [[1, 1, 1, 11, 11, 11]] * 2
    assert torch.equal(fill_channels(img, 0.0, 1, 3, torch.Generator()), img)
    # at p = 0.5 some channels are filled, and a filled modality is filled in both slices
    many = fill_channels(img.repeat(20, 1, 1, 1), 0.5, 1, 3, torch.Generator().manual_seed(0))[:, :, 0, 0]
    filled = many != img[:1, :, 0, 0]
    assert torch.equal(filled[:, :3], filled[:, 3:]) and not filled[:, 1].any()
    assert 0.25 < filled[:, [0, 2]].float().mean() < 0.75
    cfg = AugmentConfig(flip=0, rotate=0, scale=0, gamma=0, contrast=0, noise=0, channel_fill=1.0, channel_fill_source=2)
    x, _ = augment_batch(img, torch.zeros(2, 1, 4, 4, dtype=torch.uint8), cfg, torch.Generator(), modalities=3)
    assert x[0, :, 0, 0].tolist() == [2, 2, 2, 12, 12, 12]


def test_contrast_scales_channels_together_or_each_on_its_own():
    img = torch.randn(6, 3, 16, 16)
    msk = torch.zeros(6, 1, 16, 16, dtype=torch.uint8)
    ratios = {}
    for per_channel in (False, True):
        cfg = AugmentConfig(flip=0, rotate=0, scale=0, gamma=0, noise=0, contrast=1.0, contrast_range=[0.5, 1.5],
                            intensity_per_channel=per_channel)
        x, _ = augment_batch(img, msk, cfg, torch.Generator().manual_seed(3))
        ratios[per_channel] = x.std(dim=(2, 3)) / img.std(dim=(2, 3))  # [b, c]: the contrast factor
    spread = {k: (r.amax(1) - r.amin(1)).max().item() for k, r in ratios.items()}
    assert spread[False] < 1e-4  # one factor per sample
    assert spread[True] > 0.05  # one per channel
    assert ((ratios[True] > 0.5 - 1e-4) & (ratios[True] < 1.5 + 1e-4)).all()


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


def test_scanner_augmentations_bias_field_blur_lowres():
    import torch

    from medseg.data.augment import bias_field, blur, lowres

    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    x = torch.randn(4, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    # off, or a field of magnitude 0: the image as it was
    assert torch.equal(bias_field(x, 0.0, 0.3, g()), x) and torch.allclose(bias_field(x, 1.0, 0.0, g()), x, atol=1e-5)
    y = bias_field(x, 1.0, 0.3, g())
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    ratio = (y - lo) / (x - lo).clamp_min(1e-3)
    big = (x - lo) > 0.5  # where the ratio is well defined
    assert torch.allclose(y.amin(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)), atol=1e-5)  # the minimum stays put
    assert bool((ratio[big] > 0).all()) and float(ratio[big].max() / ratio[big].min()) > 1.05  # a real field
    assert float((ratio[..., 1:] - ratio[..., :-1])[big[..., 1:] & big[..., :-1]].abs().mean()) < 0.02  # smooth
    # blur of a point: a normalised Gaussian whose spread lies in the sigma range; p=0 leaves it alone
    d = torch.zeros(3, 1, 31, 31)
    d[:, :, 15, 15] = 1.0
    assert torch.equal(blur(d, 0.0, [0.5, 1.5], g()), d)
    b = blur(d, 1.0, [0.5, 1.5], g())
    assert torch.allclose(b.sum(dim=(2, 3)), torch.ones(3, 1), atol=1e-5)
    t = torch.arange(31.0) - 15
    var_x = (b[:, 0] * t.view(1, 1, -1) ** 2).sum(dim=(1, 2))
    assert bool(((var_x > 0.5**2 - 0.05) & (var_x < 1.5**2 + 0.05)).all()), var_x
    assert torch.allclose(b, b.transpose(-1, -2), atol=1e-6)  # the same sigma along both axes
    # lower resolution: factor 1 is the identity; a 4x coarser grid removes most pixel noise, keeps the mean
    assert torch.allclose(lowres(x, 1.0, [1.0, 1.0], g()), x, atol=1e-6)
    c = lowres(x, 1.0, [4.0, 4.0], g())
    # linear interpolation between independent picks keeps about (2/3)^2 of their variance, more at the
    # borders: 0.41-0.59 of it over 200 noise images
    assert float(c.var()) < 0.65 * float(x.var()) and abs(float(c.mean() - x.mean())) < 0.15  # 512 nearest picks
    # 3D batches: the same transforms, shapes kept
    v = torch.randn(2, 1, 6, 16, 16)
    for f in (lambda a: bias_field(a, 1.0, 0.3, g()), lambda a: blur(a, 1.0, [1.0, 1.0], g()),
              lambda a: lowres(a, 1.0, [2.0, 2.0], g())):
        assert f(v).shape == v.shape


def test_scanner_augmentations_from_the_config_leave_masks_alone():
    import torch

    from medseg.config import AugmentConfig
    from medseg.data.augment import augment_batch

    cfg = AugmentConfig(flip=0, rotate=0, scale=0, gamma=0, contrast=0, noise=0, bias_field=1.0, blur=1.0, lowres=1.0)
    x, m = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).to(torch.uint8)
    y, m2 = augment_batch(x, m, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(m2, m) and not torch.allclose(y, x)
    off = AugmentConfig(flip=0, rotate=0, scale=0, gamma=0, contrast=0, noise=0)
    assert torch.equal(augment_batch(x, m, off, torch.Generator().manual_seed(0))[0], x)


def test_zscore_body_ignores_the_background():
    from medseg.data.normalize import apply, stats_for

    body = np.array([2.0, 4.0, 6.0, 8.0])  # mean 5, std sqrt(5)
    small = np.zeros((1, 1, 4, 4), np.float32)
    small[0, 0, 0] = body
    large = np.zeros((1, 1, 16, 16), np.float32)  # the same body in a wider field of view
    large[0, 0, 0, :4] = body
    for img in (small, large):
        mean, std, clip = stats_for(img, {"mode": "zscore_body"})
        assert clip is None and mean[0] == pytest.approx(5.0) and std[0] == pytest.approx(np.sqrt(5.0))
    # the per-case z-score moves with the amount of background; the body's does not
    assert stats_for(small, {"mode": "zscore_case"})[0][0] != pytest.approx(stats_for(large, {"mode": "zscore_case"})[0][0])
    np.testing.assert_allclose(apply(large[..., 0, :4], *stats_for(large, {"mode": "zscore_body"}), channel_axis=1)[0, 0],
                               (body - 5) / np.sqrt(5), rtol=1e-6)
    const = np.full((1, 1, 4, 4), 3.0, np.float32)  # nothing above the minimum: all voxels
    assert stats_for(const, {"mode": "zscore_body"})[0][0] == pytest.approx(3.0)
