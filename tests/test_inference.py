"""Inference: Segmenter (API), predict (CLI function), TTA, ensembling, geometry round trips, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from conftest import FIXTURES

import medseg.models
from medseg.errors import MedsegError
from medseg.bundle import save_bundle

LGG_CHANNELS = ["pre-contrast", "FLAIR", "post-contrast"]
_REAL_CREATE = medseg.models.create_model


# ----------------------------------------------------------------------------- model shim and bundles
class _Symmetric(nn.Module):
    """Flip-equivariant by construction: the mean of g over the group of horizontal/vertical flips."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.required_divisor = inner.required_divisor

    def forward(self, x):
        out = 0
        for dims in ([], [-1], [-2], [-1, -2]):
            xi = torch.flip(x, dims) if dims else x
            y = self.inner(xi)
            out = out + (torch.flip(y, dims) if dims else y)
        return out / 4


def _unet(in_ch: int, out_ch: int, spatial_dims: int, **kw) -> nn.Module:
    return _REAL_CREATE("unet", in_ch, out_ch, spatial_dims=spatial_dims, **kw)


def create_model_shim(name, in_channels, out_channels, spatial_dims=2, **kw):
    """medseg.models.create_model plus one test-only architecture, ``test-symmetric``."""
    if name == "test-symmetric":
        return _Symmetric(_unet(in_channels, out_channels, spatial_dims, **kw))
    return _REAL_CREATE(name, in_channels, out_channels, spatial_dims=spatial_dims, **kw)


@pytest.fixture(autouse=True)
def _models(monkeypatch):
    monkeypatch.setattr(medseg.models, "create_model", create_model_shim)


def make_bundle(
    path: Path,
    *,
    arch: str = "unet",
    features=(4, 8),
    channels=LGG_CHANNELS,
    classes=("tumor",),
    class_kind: str = "multiclass",
    input: dict | None = None,
    postprocess: dict | None = None,
    tta: dict | None = None,
    seed: int = 0,
    spatial_dims: int = 2,
    scale: float = 20.0,
) -> Path:
    """A random-weight bundle; ``scale`` sharpens the classifier so masks are not all one class."""
    torch.manual_seed(seed)
    inp = input or {"mode": "2d", "context": 0, "stride": 1, "size": [32, 32]}
    ctx = int(inp.get("context", 0)) if inp.get("mode") == "2.5d" else 0
    in_ch = len(channels) * (2 * ctx + 1)
    out_ch = len(classes) + 1 if class_kind == "multiclass" else len(classes)
    kw = {"features": list(features)}
    model = create_model_shim(arch, in_ch, out_ch, spatial_dims=spatial_dims, **kw).eval()
    with torch.no_grad():
        names = [n for n, p in model.named_parameters() if p.dim() > 1]
        params = dict(model.named_parameters())
        params[names[-1]].mul_(scale)  # the classifier
        bias = params.get(names[-1].rsplit(".", 1)[0] + ".bias")
        if bias is not None:  # centre every output's logits on a probe input: masks of both classes
            probe = torch.randn(2, in_ch, *([32] * spatial_dims), generator=torch.Generator().manual_seed(seed))
            med = model(probe).transpose(0, 1).reshape(out_ch, -1).median(dim=1).values
            bias.sub_(med)
    bundle = {
        "arch": {"name": arch, "in_channels": in_ch, "out_channels": out_ch, "spatial_dims": spatial_dims, "kwargs": kw},
        "state_dict": model.state_dict(),
        "classes": list(classes),
        "class_kind": class_kind,
        "channels": list(channels),
        "input": inp,
        "normalization": {"mode": "zscore_case"},
        "postprocess": postprocess or {"thresholds": [0.5] * len(classes), "presence": None, "min_size": 0, "largest_cc": False},
        "tta": tta or {"flips": [[-1], [-2]]},
        "meta": {"fold": 0},
    }
    return save_bundle(bundle, path)


def write_lgg(root: Path, cases: dict[str, int], size=(40, 44), seed=0) -> Path:
    """A kaggle_3m-style folder of images only: ``cases`` maps case id -> number of slices."""
    rng = np.random.default_rng(seed)
    for case, n in cases.items():
        d = root / case
        d.mkdir(parents=True)
        yy, xx = np.mgrid[: size[0], : size[1]]
        for i in range(1, n + 1):
            img = (rng.random((*size, 3)) * 60).astype(np.uint8)
            blob = (yy - size[0] / 2) ** 2 + (xx - size[1] / 2 - i) ** 2 < 60
            img[blob] += 150
            tifffile.imwrite(d / f"{case}_{i}.tif", img)
    return root


def _reference_probs(bundle_path: Path, image: np.ndarray) -> np.ndarray:
    """Softmax probabilities straight from the module, with normalisation and padding done by hand."""
    from medseg.bundle import build_model, load_bundle

    b = load_bundle(bundle_path)
    model = build_model(b)
    x = image.astype(np.float64)
    mean = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).mean(1)
    std = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).std(1)
    x = ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    h, w = x.shape[-2:]
    d = model.required_divisor
    x = np.pad(x, ((0, 0), (0, 0), (0, -h % d), (0, -w % d)))
    with torch.no_grad():
        logits = model(torch.from_numpy(x))[..., :h, :w]
    return torch.softmax(logits, 1).numpy()


# ----------------------------------------------------------------------------- the Python API
def test_segmenter_predict_array_matches_module(tmp_path):
    from medseg import Segmenter

    bp = make_bundle(tmp_path / "model.pt")
    image = np.random.default_rng(1).integers(0, 255, (5, 3, 36, 44), dtype=np.uint8)  # 36x44: not /2^k
    seg = Segmenter.load(bp, tta=False)
    pred = seg.predict(image, probabilities=True)
    ref = _reference_probs(bp, image)
    assert pred.mask.shape == (5, 1, 36, 44) and pred.mask.dtype == np.uint8
    assert pred.prob.shape == (5, 1, 36, 44) and pred.prob.dtype == np.float16
    np.testing.assert_allclose(pred.prob.astype(np.float32), ref[:, 1:], atol=1e-3)
    np.testing.assert_array_equal(pred.mask[:, 0], (ref.argmax(1) == 1).astype(np.uint8))
    assert 0 < pred.mask.mean() < 1  # a non-trivial mask, so the comparison means something
    # a single [c, h, w] slice gives the same as slice 0 of a stack of one
    one = seg.predict(image[0])
    assert one.mask.shape == (1, 1, 36, 44)


def test_segmenter_predict_path_and_batches(tmp_path):
    from medseg import Segmenter

    bp = make_bundle(tmp_path / "model.pt")
    data = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 5})
    seg = Segmenter.load(bp, tta=False, batch_size=2)  # 5 slices in batches 2, 2, 1
    pred = seg.predict(data / "TCGA_AA_0001_20000101")
    imgs = np.stack([tifffile.imread(data / "TCGA_AA_0001_20000101" / f"TCGA_AA_0001_20000101_{i}.tif")
                     for i in range(1, 6)]).transpose(0, 3, 1, 2)
    whole = Segmenter.load(bp, tta=False, batch_size=8).predict(imgs)
    np.testing.assert_array_equal(pred.mask, whole.mask)


def test_tta_invariance_on_flip_equivariant_model(tmp_path):
    from medseg import Segmenter

    bp = make_bundle(tmp_path / "sym.pt", arch="test-symmetric")
    image = np.random.default_rng(2).integers(0, 255, (3, 3, 32, 40), dtype=np.uint8)
    plain = Segmenter.load(bp, tta=False).predict(image, probabilities=True)
    flipped = Segmenter.load(bp, tta=[[-1], [-2], [-1, -2]]).predict(image, probabilities=True)
    np.testing.assert_allclose(plain.prob.astype(np.float32), flipped.prob.astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(plain.mask, flipped.mask)


def test_tta_is_mean_of_flipped_predictions(tmp_path):
    from medseg import Segmenter

    bp = make_bundle(tmp_path / "model.pt")
    image = np.random.default_rng(3).integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    seg = Segmenter.load(bp, tta=True)  # the bundle's flips: [[-1], [-2]]
    assert seg.flips == [[-1], [-2]]
    got = seg.predict(image, probabilities=True).prob.astype(np.float32)
    ref = _reference_probs(bp, image)
    ref_w = _reference_probs(bp, image[..., ::-1].copy())[..., ::-1]
    ref_h = _reference_probs(bp, image[..., ::-1, :].copy())[..., ::-1, :]
    expected = (ref + ref_w + ref_h)[:, 1:] / 3
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert np.abs(expected - ref[:, 1:]).max() > 1e-2  # the flips really change something here


def test_ensemble_is_mean_of_fold_probabilities(tmp_path):
    from medseg import Segmenter

    run = tmp_path / "run"
    for k in range(3):
        make_bundle(run / f"fold_{k}" / "model.pt", seed=k)
    image = np.random.default_rng(4).integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    folds = [Segmenter.load(run / f"fold_{k}" / "model.pt", tta=False).predict(image, probabilities=True)
             for k in range(3)]
    ens = Segmenter.load(run, folds="all", tta=False)
    assert len(ens.nets) == 3
    got = ens.predict(image, probabilities=True).prob.astype(np.float32)
    expected = np.mean([f.prob.astype(np.float32) for f in folds], axis=0)
    np.testing.assert_allclose(got, expected, atol=2e-3)
    # folds="0,2" picks two; "best" with a cv_summary picks the best-scoring fold
    assert len(Segmenter.load(run, folds="0,2").nets) == 2
    # the summary as `medseg train --fold all` writes it
    from medseg.training.run import _cv_summary

    rows = {str(k): {"val_dice_tumor": d, "val_dice_mean": d} for k, d in enumerate([0.5, 0.9, 0.7])}
    (run / "cv_summary.json").write_text(json.dumps(_cv_summary(rows, ["tumor"])))
    best = Segmenter.load(run, folds="best", tta=False).predict(image, probabilities=True)
    np.testing.assert_array_equal(best.prob, folds[1].prob)
    with pytest.raises(MedsegError, match=r"fold\(s\) \[7\] not trained; available: \[0, 1, 2\]"):
        Segmenter.load(run, folds="7")


def test_multilabel_thresholds_and_overrides(tmp_path):
    from medseg import Segmenter

    bp = make_bundle(tmp_path / "ml.pt", classes=("a", "b"), class_kind="multilabel",
                     postprocess={"thresholds": [0.5, 0.9]})
    image = np.random.default_rng(5).integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    seg = Segmenter.load(bp, tta=False)
    pred = seg.predict(image, probabilities=True)
    p = pred.prob.astype(np.float32)
    ok = np.abs(p - np.array([0.5, 0.9])[None, :, None, None]) > 2e-3  # away from fp16 rounding at the cut
    np.testing.assert_array_equal(pred.mask[:, 0][ok[:, 0]], (p[:, 0] > 0.5)[ok[:, 0]])
    np.testing.assert_array_equal(pred.mask[:, 1][ok[:, 1]], (p[:, 1] > 0.9)[ok[:, 1]])
    low = seg.predict(image, postprocess_overrides={"thresholds": [0.1, 0.1]})
    assert low.mask.sum() >= pred.mask.sum()
    assert (low.mask >= pred.mask).all()


def test_resize_mode_returns_input_size(tmp_path):
    from medseg import Segmenter

    bp = make_bundle(tmp_path / "r.pt", input={"mode": "2d", "size": [32, 32], "resize": True})
    image = np.random.default_rng(6).integers(0, 255, (2, 3, 50, 70), dtype=np.uint8)
    pred = Segmenter.load(bp, tta=False).predict(image, probabilities=True)
    assert pred.mask.shape == (2, 1, 50, 70)
    # same as: resize to 32x32 by hand, run, resize the probabilities back
    import torch.nn.functional as F
    from medseg.bundle import build_model, load_bundle

    model = build_model(load_bundle(bp))
    x = image.astype(np.float64)
    m = x.transpose(1, 0, 2, 3).reshape(3, -1).mean(1)
    s = x.transpose(1, 0, 2, 3).reshape(3, -1).std(1)
    x = torch.from_numpy(((x - m[None, :, None, None]) / s[None, :, None, None]).astype(np.float32))
    with torch.no_grad():
        p = torch.softmax(model(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)), 1)
        p = F.interpolate(p, size=(50, 70), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(pred.prob.astype(np.float32), p[:, 1:], atol=1e-3)


def test_2p5d_context_stack(tmp_path):
    """2.5D: the input of slice z is slices z-s..z+s (clamped), offset-major channels."""
    from medseg import Segmenter
    from medseg.bundle import build_model, load_bundle

    bp = make_bundle(tmp_path / "c.pt", input={"mode": "2.5d", "context": 1, "stride": 2, "size": [32, 32]})
    image = np.random.default_rng(7).integers(0, 255, (4, 3, 32, 32), dtype=np.uint8)
    pred = Segmenter.load(bp, tta=False, batch_size=3).predict(image, probabilities=True)
    model = build_model(load_bundle(bp))
    x = image.astype(np.float64)
    m = x.transpose(1, 0, 2, 3).reshape(3, -1).mean(1)
    s = x.transpose(1, 0, 2, 3).reshape(3, -1).std(1)
    x = ((x - m[None, :, None, None]) / s[None, :, None, None]).astype(np.float32)
    for z, (a, b) in enumerate([(0, 2), (0, 3), (0, 3), (1, 3)]):  # clamp(z-2), clamp(z+2)
        stack = np.concatenate([x[a], x[z], x[b]])[None]
        with torch.no_grad():
            p = torch.softmax(model(torch.from_numpy(stack)), 1).numpy()
        np.testing.assert_allclose(pred.prob[z, 0].astype(np.float32), p[0, 1], atol=1e-3)


def test_3d_sliding_window_gaussian(tmp_path):
    from medseg import Segmenter

    bp = make_bundle(tmp_path / "3d.pt", channels=["mri"], spatial_dims=3,
                     input={"mode": "3d", "size": [16, 16, 16]}, classes=("a", "b"))
    image = np.random.default_rng(8).normal(100, 20, (20, 1, 24, 18)).astype(np.float32)
    seg = Segmenter.load(bp, tta=False)
    pred = seg.predict(image, probabilities=True)
    assert pred.mask.shape == (20, 2, 24, 18)
    assert pred.mask.sum(1).max() <= 1  # multiclass: exclusive
    # a volume of exactly one window: Gaussian weights cancel out, so it is the module's softmax
    from medseg.bundle import build_model, load_bundle

    model = build_model(load_bundle(bp))
    cube = image[:16, :, :16, :16]
    one = seg.predict(cube, probabilities=True)
    x = (cube - cube.mean()) / cube.std()
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(x.transpose(1, 0, 2, 3)[None].astype(np.float32))), 1)[0].numpy()
    np.testing.assert_allclose(one.prob.astype(np.float32), p[1:].transpose(1, 0, 2, 3), atol=1e-3)
    np.testing.assert_array_equal(one.mask[:, 0], p.argmax(0) == 1)
    assert 0 < one.mask.mean() < 1


def test_z_slabs_see_the_windows_of_one_pass():
    """Every kept slice of every slab is covered by exactly the windows of a whole-volume pass."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from medseg.inference.windows import z_slabs

    def starts(size, roi, ov):
        return [s[0].start for s in dense_patch_slices((size,), (roi,), _get_scan_interval((size,), (roi,), 1, (ov,)))]

    rng = np.random.default_rng(0)
    multi = 0
    for _ in range(400):
        roi, depth = int(rng.integers(2, 20)), int(rng.integers(1, 120))
        ov, budget = float(rng.choice([0.0, 0.25, 0.5, 0.75])), int(rng.integers(1, 150))
        slabs = z_slabs(depth, 1, roi, ov, budget)
        assert [z for _, _, lo, hi in slabs for z in range(lo, hi)] == list(range(depth))
        if len(slabs) == 1 or depth < roi:
            continue
        multi += 1
        whole = starts(depth, roi, ov)
        for a, b, lo, hi in slabs:
            assert 0 <= a <= lo < hi <= b <= depth and b - a >= roi
            mine = [a + s for s in starts(b - a, roi, ov)]
            for z in range(lo, hi):
                assert [s for s in mine if s <= z < s + roi] == [s for s in whole if s <= z < s + roi]
    assert multi > 100
    # the SLAB_BYTES note: 512 x 512 x 200, 1 input + 3 output channels (20 bytes a voxel), 32-slice windows
    assert z_slabs(200, 512 * 512, 32, 0.5, 768 * 2**20 // 20) == [(0, 112, 0, 80), (48, 192, 80, 160), (128, 200, 160, 200)]


def test_3d_slabs_equal_one_pass(tmp_path, monkeypatch):
    import medseg.inference.segmenter as segmod
    from medseg import Segmenter

    bp = make_bundle(tmp_path / "3d.pt", channels=["mri"], spatial_dims=3,
                     input={"mode": "3d", "size": [8, 16, 16]}, classes=("a", "b"))
    image = np.random.default_rng(9).normal(100, 20, (37, 1, 16, 20)).astype(np.float32)
    seg = Segmenter.load(bp, tta=False)
    whole = seg.predict(image, probabilities=True)
    used = []
    real = segmod.z_slabs
    monkeypatch.setattr(segmod, "z_slabs", lambda *a: used.append(real(*a)) or used[-1])
    monkeypatch.setattr(segmod, "SLAB_BYTES", 4 * (1 + 3 + 1) * 16 * 20 * 10)  # 10 slices per slab
    slabbed = seg.predict(image, probabilities=True)
    assert len(used[0]) >= 3  # really streamed
    np.testing.assert_allclose(slabbed.prob.astype(np.float32), whole.prob.astype(np.float32), atol=1e-3)
    assert (slabbed.mask == whole.mask).mean() > 0.999 and 0 < whole.mask.mean() < 1


def test_lightning_checkpoint_as_model(tmp_path):
    """RUN/fold_K/checkpoints/*.ckpt: the checkpoint's weights with the fold's model.pt description."""
    from medseg import Segmenter
    from medseg.bundle import load_bundle

    fold = tmp_path / "run" / "fold_0"
    make_bundle(fold / "model.pt", seed=0)
    other = load_bundle(make_bundle(tmp_path / "other.pt", seed=5))  # same architecture, other weights
    (fold / "checkpoints").mkdir()
    ck = fold / "checkpoints" / "last.ckpt"
    torch.save({"epoch": 7, "state_dict": {f"model.{k}": v for k, v in other["state_dict"].items()}}, ck)
    image = np.random.default_rng(4).integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    seg = Segmenter.load(ck, tta=False)
    assert seg.name == "fold_0/last"
    got = seg.predict(image, probabilities=True).prob
    np.testing.assert_array_equal(got, Segmenter.load(tmp_path / "other.pt", tta=False).predict(image, probabilities=True).prob)
    assert not np.array_equal(got, Segmenter.load(fold / "model.pt", tta=False).predict(image, probabilities=True).prob)
    torch.save({"epoch": 1, "state_dict": {"net.w": torch.zeros(1)}}, ck)
    with pytest.raises(MedsegError, match=r"not a medseg training checkpoint \(no model\.\* weights") as e:
        Segmenter.load(ck)
    assert e.value.path == str(ck)
    (fold / "model.pt").unlink()
    with pytest.raises(MedsegError, match="a Lightning checkpoint needs its fold's model.pt"):
        Segmenter.load(ck)


# ----------------------------------------------------------------------------- the CLI function
def test_predict_lgg_writes_masks_mirroring_input(tmp_path):
    from medseg.inference.predict import predict

    bp = make_bundle(tmp_path / "model.pt")
    data = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 3, "TCGA_BB_0002_20000101": 12})
    out = tmp_path / "out"
    files = predict(bp, data, out, tta=False, console=None)
    assert len(files) == 15
    for case, n in (("TCGA_AA_0001_20000101", 3), ("TCGA_BB_0002_20000101", 12)):
        for i in range(1, n + 1):
            m = tifffile.imread(out / case / f"{case}_{i}_mask.tif")
            assert m.shape == (40, 44) and m.dtype == np.uint8
            assert set(np.unique(m)) <= {0, 255}
    # same masks as the API
    from medseg import Segmenter

    img = np.stack([tifffile.imread(data / "TCGA_BB_0002_20000101" / f"TCGA_BB_0002_20000101_{i}.tif")
                    for i in range(1, 13)]).transpose(0, 3, 1, 2)
    api = Segmenter.load(bp, tta=False).predict(img).mask
    cli = np.stack([tifffile.imread(out / "TCGA_BB_0002_20000101" / f"TCGA_BB_0002_20000101_{i}_mask.tif")
                    for i in range(1, 13)])
    np.testing.assert_array_equal(cli, api[:, 0] * 255)


def test_predict_refuses_nonempty_output_and_overwrite_keeps_user_files(tmp_path):
    from medseg.inference.predict import predict

    bp = make_bundle(tmp_path / "model.pt")
    data = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 2})
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MedsegError, match="output folder already holds files") as e:
        predict(bp, data, out)
    assert e.value.path == str(out) and "--overwrite" in str(e.value)
    predict(bp, data, out, overwrite=True, tta=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "TCGA_AA_0001_20000101" / "TCGA_AA_0001_20000101_2_mask.tif").is_file()


def test_predict_save_probabilities(tmp_path):
    from medseg.inference.predict import predict

    bp = make_bundle(tmp_path / "model.pt")
    data = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 2})
    predict(bp, data, tmp_path / "out", save_probabilities=True, tta=False)
    p = tifffile.imread(tmp_path / "out" / "TCGA_AA_0001_20000101" / "TCGA_AA_0001_20000101_1_prob.tif")
    m = tifffile.imread(tmp_path / "out" / "TCGA_AA_0001_20000101" / "TCGA_AA_0001_20000101_1_mask.tif")
    assert p.dtype == np.float16 and p.shape[-2:] == (40, 44)
    p = p.reshape(40, 44).astype(np.float32)
    sure = np.abs(p - 0.5) > 1e-3  # fp16 rounds values next to the cut
    np.testing.assert_array_equal((p > 0.5)[sure], (m == 255)[sure])


def test_predict_real_lgg_fixture(tmp_path):
    from medseg.inference.predict import predict

    src = FIXTURES / "lgg_tiny" / "kaggle_3m"
    if not src.is_dir():
        pytest.skip("tests/fixtures/lgg_tiny is missing")
    bp = make_bundle(tmp_path / "model.pt")
    out = tmp_path / "out"
    predict(bp, src, out, tta=False)
    for img in src.glob("*/*.tif"):
        if img.name.endswith("_mask.tif"):
            continue
        m = tifffile.imread(out / img.parent.name / (img.stem + "_mask.tif"))
        assert m.shape == tifffile.imread(img).shape[:2] and m.dtype == np.uint8


# ----------------------------------------------------------------------------- bad inputs
def test_unknown_model_name_lists_shipped():
    from medseg import Segmenter

    with pytest.raises(MedsegError, match=r"unknown model 'lgg-unt'.*\(shipped: lgg-unet\)"):
        Segmenter.load("lgg-unt")


def test_missing_model_file_and_bad_bundle(tmp_path):
    from medseg import Segmenter

    with pytest.raises(MedsegError, match="model file or folder not found") as e:
        Segmenter.load(tmp_path / "nope.pt")
    assert e.value.path == str(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MedsegError, match="cannot read model bundle: damaged, or not a medseg model.pt") as e:
        Segmenter.load(bad)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)  # not torch's page of advice
    torch.save({"w": torch.zeros(1000)}, bad)
    bad.write_bytes(bad.read_bytes()[:-200])  # cut short, as by a full disk
    with pytest.raises(MedsegError, match=r"cannot read model bundle: damaged, or not a medseg model.pt \((RuntimeError|OSError): ") as e:
        Segmenter.load(bad)
    assert "\n" not in str(e.value)
    (tmp_path / "emptyrun").mkdir()
    with pytest.raises(MedsegError, match=r"no trained model in this run directory"):
        Segmenter.load(tmp_path / "emptyrun")


def test_channel_mismatch_says_what_and_how(tmp_path):
    from medseg import Segmenter

    bp = make_bundle(tmp_path / "lgg-test.pt")
    seg = Segmenter.load(bp, tta=False)
    with pytest.raises(MedsegError) as e:
        seg.predict(np.zeros((1, 1, 32, 32), np.uint8), where="scan.png")
    assert e.value.path == "scan.png"
    assert e.value.problem == "model lgg-test expects 3 channels (pre-contrast, FLAIR, post-contrast); the input has 1"
    assert "stack the sequences" in str(e.value) and "1-channel data" in str(e.value)


def test_unreadable_image_names_the_file(tmp_path):
    from medseg.inference.predict import predict

    bp = make_bundle(tmp_path / "model.pt")
    data = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 2})
    broken = data / "TCGA_AA_0001_20000101" / "TCGA_AA_0001_20000101_2.tif"
    broken.write_bytes(b"this is not a TIFF file")
    with pytest.raises(MedsegError, match="cannot read TIFF") as e:
        predict(bp, data, tmp_path / "out")
    assert e.value.path == str(broken)


def test_guess_format(tmp_path):
    from medseg.data.formats import guess_format

    lgg = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 1})
    assert guess_format(lgg) == "lgg"
    assert guess_format(lgg / "TCGA_AA_0001_20000101") == "lgg"
    (tmp_path / "nii").mkdir()
    (tmp_path / "nii" / "a.nii.gz").write_bytes(b"")
    assert guess_format(tmp_path / "nii") == "nifti"
    assert guess_format(tmp_path / "nii" / "a.nii.gz") == "nifti"
    (tmp_path / "uw" / "train" / "case1" / "case1_day0" / "scans").mkdir(parents=True)
    assert guess_format(tmp_path / "uw") == "uwmgi"
    (tmp_path / "png").mkdir()
    (tmp_path / "png" / "x.png").write_bytes(b"")
    assert guess_format(tmp_path / "png") == "folder"
    if (FIXTURES / "dicom" / "series").is_dir():
        assert guess_format(FIXTURES / "dicom" / "series") == "dicom"
    with pytest.raises(MedsegError, match="no such file or folder"):
        guess_format(tmp_path / "missing")
    (tmp_path / "both" / "images").mkdir(parents=True)  # an explicit images/ layout wins over slice-like names
    (tmp_path / "both" / "images" / "x_1.tif").write_bytes(b"")
    assert guess_format(tmp_path / "both") == "folder"


# ----------------------------------------------------------------------------- geometry round trips
def _mri_bundle(path: Path) -> Path:
    return make_bundle(path, channels=["MRI"], classes=("anterior", "posterior"))


def test_nifti_round_trip_keeps_affine_header_and_orientation(tmp_path):
    import nibabel as nib

    from medseg import Segmenter
    from medseg.inference.predict import predict

    rng = np.random.default_rng(9)
    data = rng.normal(300, 80, (20, 26, 6)).astype(np.int16)  # NIfTI (x, y, z), not a cube
    affine = np.array([[0.0, -0.9, 0.1, 12.0], [1.1, 0.0, 0.0, -30.0], [0.0, 0.05, 2.5, 7.5], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 2)
    (tmp_path / "in").mkdir()
    nib.save(img, str(tmp_path / "in" / "scan.nii.gz"))
    bp = _mri_bundle(tmp_path / "m.pt")
    predict(bp, tmp_path / "in" / "scan.nii.gz", tmp_path / "out", tta=False)
    out = nib.load(str(tmp_path / "out" / "scan.nii.gz"))
    assert out.shape == (20, 26, 6)
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    lab = np.asarray(out.dataobj)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 2}
    # orientation: the label at NIfTI (x, y, z) is the prediction for our (z, y, x)
    pred = Segmenter.load(bp, tta=False).predict(data.transpose(2, 1, 0)[:, None], spatial_dims=3)
    expected = (pred.mask[:, 0] * 1 + pred.mask[:, 1] * 2).transpose(2, 1, 0)
    np.testing.assert_array_equal(lab, expected)
    assert 0 < (lab > 0).mean() < 1


def test_nifti_dataset_folder(tmp_path):
    import nibabel as nib

    from medseg.inference.predict import predict

    src = FIXTURES / "nifti"
    if not (src / "imagesTr").is_dir():
        pytest.skip("tests/fixtures/nifti is missing")
    predict(_mri_bundle(tmp_path / "m.pt"), src, tmp_path / "out", tta=False)
    for f in sorted((src / "imagesTr").glob("*.nii.gz")):
        a, b = nib.load(str(f)), nib.load(str(tmp_path / "out" / f.name))
        assert b.shape == a.shape[:3]
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)


def test_dicom_series_to_nifti_in_series_geometry(tmp_path):
    import nibabel as nib

    from medseg import Segmenter
    from medseg.inference.predict import predict

    series = FIXTURES / "dicom" / "series"
    if not series.is_dir():
        pytest.skip("tests/fixtures/dicom is missing")
    bp = _mri_bundle(tmp_path / "m.pt")
    files = predict(bp, series, tmp_path / "out", tta=False)
    assert [f.name for f in files] == ["hippo_t1.nii.gz"]
    out = nib.load(str(files[0]))
    src = nib.load(str(FIXTURES / "dicom" / "source.nii.gz"))  # the same voxels and geometry, as NIfTI
    assert out.shape == src.shape[:3]
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-3)
    vol = np.asarray(src.dataobj, np.float32).transpose(2, 1, 0)[:, None]
    pred = Segmenter.load(bp, tta=False).predict(vol, spatial_dims=3)
    expected = (pred.mask[:, 0] + 2 * pred.mask[:, 1]).transpose(2, 1, 0)
    lab = np.asarray(out.dataobj)
    assert (lab == expected).mean() > 0.999  # rescaled int16 vs float voxels: same up to rounding
    assert 0 < (lab > 0).mean() < 1


def test_dicom_folder_with_two_series_predicts_each(tmp_path):
    import nibabel as nib
    import pydicom

    from medseg.inference.predict import predict

    series = FIXTURES / "dicom" / "series"
    if not series.is_dir():
        pytest.skip("tests/fixtures/dicom is missing")
    for sub, uid in (("a", None), ("b", "1.2.826.0.1.3680043.8.498.999")):
        (tmp_path / "in" / sub).mkdir(parents=True)
        for f in sorted(series.glob("*.dcm")):
            ds = pydicom.dcmread(f)
            if uid:
                ds.SeriesInstanceUID = uid
                ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
            ds.save_as(tmp_path / "in" / sub / f.name)
    files = predict(_mri_bundle(tmp_path / "m.pt"), tmp_path / "in", tmp_path / "out", tta=False)
    assert len(files) == 2 and len({f.name for f in files}) == 2
    a, b = (np.asarray(nib.load(str(f)).dataobj) for f in files)
    np.testing.assert_array_equal(a, b)  # same pixels in both series


def test_uwmgi_test_layout_writes_submission(tmp_path):
    from PIL import Image

    from medseg import Segmenter
    from medseg.data import rle
    from medseg.inference.predict import predict

    rng = np.random.default_rng(10)
    scans = tmp_path / "test" / "case7" / "case7_day3" / "scans"
    scans.mkdir(parents=True)
    vol = rng.integers(0, 4000, (3, 36, 40)).astype(np.uint16)  # 3 slices, H=36, W=40
    for i in range(3):
        Image.fromarray(vol[i]).save(scans / f"slice_{i + 1:04d}_40_36_1.50_1.50.png")
    bp = make_bundle(tmp_path / "uw.pt", channels=["MRI"], classes=("large_bowel", "small_bowel", "stomach"),
                     class_kind="multilabel")
    out = tmp_path / "out"
    predict(bp, tmp_path, out, tta=False)
    lines = (out / "submission.csv").read_text().splitlines()
    assert lines[0] == "id,class,predicted" and len(lines) == 1 + 3 * 3
    assert lines[1].startswith("case7_day3_slice_0001,large_bowel,")
    pred = Segmenter.load(bp, tta=False).predict(vol[:, None])
    for line in lines[1:]:
        sid, cls, code = line.split(",")
        z = int(sid.rsplit("_", 1)[1]) - 1
        k = ["large_bowel", "small_bowel", "stomach"].index(cls)
        np.testing.assert_array_equal(rle.decode(code, (36, 40), "C"), pred.mask[z, k])
    assert pred.mask.any()
    # --overwrite replaces the submission instead of appending to it
    predict(bp, tmp_path, out, tta=False, overwrite=True)
    assert len((out / "submission.csv").read_text().splitlines()) == 1 + 3 * 3


def test_png_folder_round_trip_and_channel_mismatch(tmp_path):
    from PIL import Image

    from medseg import Segmenter
    from medseg.inference.predict import predict

    rng = np.random.default_rng(11)
    (tmp_path / "pngs" / "images").mkdir(parents=True)  # the folder reader's layout: ROOT/images/
    imgs = {"scan_a": rng.integers(0, 255, (30, 50), dtype=np.uint8), "scan_b": rng.integers(0, 255, (41, 27), dtype=np.uint8)}
    for stem, a in imgs.items():
        Image.fromarray(a).save(tmp_path / "pngs" / "images" / f"{stem}.png")
    # a 1-channel PNG for a 3-channel LGG model: say so, and how to fix it
    with pytest.raises(MedsegError) as e:
        predict(make_bundle(tmp_path / "lgg-test.pt"), tmp_path / "pngs", tmp_path / "bad")
    assert "model lgg-test expects 3 channels (pre-contrast, FLAIR, post-contrast); the input has 1" in str(e.value)
    assert e.value.path.endswith(".png")
    bp = make_bundle(tmp_path / "gray.pt", channels=["gray"])
    predict(bp, tmp_path / "pngs", tmp_path / "out", tta=False)
    seg = Segmenter.load(bp, tta=False)
    for stem, a in imgs.items():
        m = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{stem}.png"))
        assert m.shape == a.shape and m.dtype == np.uint8  # same size and stem as the input
        np.testing.assert_array_equal(m, seg.predict(a[None, None]).mask[0, 0] * 255)


def _flat_images(folder: Path, rng) -> dict[str, np.ndarray]:
    """Grey images of several sizes and formats straight in ``folder`` (no images/ subfolder)."""
    from PIL import Image

    folder.mkdir(parents=True)
    imgs = {"scan_a": rng.integers(0, 255, (30, 50), dtype=np.uint8), "scan_b": rng.integers(0, 255, (41, 27), dtype=np.uint8),
            "scan_c": rng.integers(0, 255, (33, 33), dtype=np.uint8)}
    for (stem, a), ext in zip(imgs.items(), (".png", ".jpg", ".bmp")):
        Image.fromarray(a).save(folder / f"{stem}{ext}")
    imgs["scan_b"] = np.asarray(Image.open(folder / "scan_b.jpg"))  # what JPEG compression left
    tifffile.imwrite(folder / "scan_d.tif", rng.integers(0, 4000, (20, 24)).astype(np.uint16))  # 16-bit
    imgs["scan_d"] = tifffile.imread(folder / "scan_d.tif")
    (folder / "notes.txt").write_text("not an image")
    return imgs


@pytest.mark.parametrize("classes", [("tumor",), ("a", "b")])
def test_predict_flat_image_folder_and_single_file(tmp_path, classes):
    """Issue 6: a plain folder of images (no images/ subfolder) and a single image file give PNG masks
    with the same stems and sizes: 0/255 for one class, label values 0..k for several."""
    from PIL import Image

    from medseg import Segmenter
    from medseg.inference.predict import predict

    imgs = _flat_images(tmp_path / "flat", np.random.default_rng(12))
    bp = make_bundle(tmp_path / "gray.pt", channels=["gray"], classes=classes)
    files = predict(bp, tmp_path / "flat", tmp_path / "out", tta=False)
    assert sorted(f.name for f in files) == [f"{s}.png" for s in sorted(imgs)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f.name for f in files)  # OUT/<stem>.png
    seg = Segmenter.load(bp, tta=False)
    for stem, a in imgs.items():
        m = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))
        assert m.shape == a.shape and m.dtype == np.uint8
        mk = seg.predict(a[None, None]).mask[0]
        want = mk[0] * 255 if len(classes) == 1 else (mk * np.arange(1, len(classes) + 1)[:, None, None]).max(0)
        np.testing.assert_array_equal(m, want)
        assert 0 < (m > 0).mean() < 1
    # one image file: its mask, same stem and size, straight in OUT
    files = predict(bp, tmp_path / "flat" / "scan_b.jpg", tmp_path / "one", tta=False, save_probabilities=True)
    assert [f.relative_to(tmp_path / "one").as_posix() for f in files] == ["scan_b.png", "probabilities/scan_b.npy"]
    np.testing.assert_array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(tmp_path / "out" / "scan_b.png")))
    assert np.load(files[1]).shape == (len(classes), 41, 27)
    # the Python API reads a single file too
    np.testing.assert_array_equal(seg.predict(tmp_path / "flat" / "scan_a.png").mask, seg.predict(imgs["scan_a"][None, None]).mask)


def test_predict_flat_folder_bad_inputs(tmp_path):
    from medseg.inference.predict import predict

    rng = np.random.default_rng(13)
    imgs = _flat_images(tmp_path / "flat", rng)
    bp = make_bundle(tmp_path / "gray.pt", channels=["gray"])
    # output = input: masks named like the images would replace them, even with --overwrite
    with pytest.raises(MedsegError, match="the output folder is the input folder") as e:
        predict(bp, tmp_path / "flat", tmp_path / "flat", overwrite=True)
    assert e.value.path == str(tmp_path / "flat")
    with pytest.raises(MedsegError, match="the output folder is the input folder"):
        predict(bp, tmp_path / "flat" / "scan_a.png", tmp_path / "flat", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == [
        "notes.txt", "scan_a.png", "scan_b.jpg", "scan_c.bmp", "scan_d.tif"]
    # an empty folder, a non-image file, an unreadable image
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedsegError, match="no images .* in the folder and no images/ subfolder") as e:
        predict(bp, tmp_path / "empty", tmp_path / "o1")
    assert e.value.path == str(tmp_path / "empty")
    with pytest.raises(MedsegError, match=r"not an image file \(.png"):
        predict(bp, tmp_path / "flat" / "notes.txt", tmp_path / "o2", fmt="folder")
    (tmp_path / "flat" / "scan_e.png").write_bytes(b"not a png")
    with pytest.raises(MedsegError, match="cannot read image") as e:
        predict(bp, tmp_path / "flat", tmp_path / "o3")
    assert e.value.path == str(tmp_path / "flat" / "scan_e.png")
    # a 3-channel model on grey images: say so, naming the file
    with pytest.raises(MedsegError, match="expects 3 channels .* the input has 1") as e:
        predict(make_bundle(tmp_path / "lgg.pt"), tmp_path / "flat" / "scan_a.png", tmp_path / "o4")
    assert e.value.path == str(tmp_path / "flat" / "scan_a.png")


def test_training_config_sets_predict_defaults_and_cli_overrides(tmp_path):
    """Issue 6: post-processing (incl. presence) and TTA chosen in the experiment config travel in the
    bundle that training writes (``bundle_for``); ``medseg predict`` uses them unless flags override."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from medseg import Segmenter
    from medseg.cli import app
    from medseg.config import parse_config
    from medseg.training.fit import bundle_for

    classes = ["a", "b"]
    raw_path = make_bundle(tmp_path / "raw.pt", channels=["gray"], classes=classes, class_kind="multilabel")
    from medseg.bundle import build_model, load_bundle

    raw = load_bundle(raw_path)
    model = build_model(raw)
    from medseg.training.task import Task

    task = Task(spatial_dims=2, classes=classes, class_kind="multilabel", in_channels=1, out_channels=2,
                channels=["gray"], norm={"mode": "zscore_case"}, fingerprint={})
    image = np.random.default_rng(14).integers(0, 255, (6, 1, 32, 36), dtype=np.uint8)
    flips = [[-1, -2]]
    plain = Segmenter.load(raw_path, tta=flips).predict(image, probabilities=True)
    smax = plain.prob.astype(np.float32).reshape(6, 2, -1).max(-1)
    # presence per class between the per-slice maxima, so that some slices lose the class and some keep it
    pres = [float(np.sort(smax[:, j])[2:4].mean()) for j in range(2)]

    def cfg_with(**sections):
        return parse_config({"data": {"prepared": "p", "size": [32, 32]}, "model": {"name": "unet", "kwargs": raw["arch"]["kwargs"]},
                             **sections})

    cfg = cfg_with(postprocess={"presence": pres, "min_size": 0}, inference={"tta": True, "tta_flips": flips})
    module = SimpleNamespace(model=model, divisor=2)
    b = bundle_for(module, cfg, task, fold=0, epoch=3, scores={})
    assert b["postprocess"] == {"thresholds": [0.5, 0.5], "presence": pres, "min_size": 0, "largest_cc": False,
                                "components": None}
    assert b["tta"] == {"enabled": True, "flips": flips} and b["input"]["overlap"] == 0.5
    save_bundle(b, tmp_path / "run" / "fold_0" / "model.pt")
    seg = Segmenter.load(tmp_path / "run")
    assert seg.flips == flips  # TTA on by default, the config's flips
    got = seg.predict(image, probabilities=True)
    np.testing.assert_array_equal(got.prob, plain.prob)
    keep = smax >= np.array(pres)[None]
    assert keep.any() and not keep.all()
    np.testing.assert_array_equal(got.mask, plain.mask * keep[:, :, None, None])
    # the defaults when the config says nothing: TTA off with in-plane flips, presence off
    b0 = bundle_for(module, cfg_with(), task, fold=0, epoch=3, scores={})
    assert b0["tta"] == {"enabled": False, "flips": [[-1], [-2]]} and b0["postprocess"]["presence"] is None
    # a per-class list of the wrong length is refused when the bundle is written
    with pytest.raises(MedsegError, match=r"postprocess.presence has 3 values but the dataset has 2 classes \(a, b\)"):
        bundle_for(module, cfg_with(postprocess={"presence": [0.1, 0.2, 0.3]}), task, fold=0, epoch=1, scores={})
    # CLI flags override the bundle: --presence 0 keeps every slice, --no-tta drops the flips
    from PIL import Image

    (tmp_path / "pngs").mkdir()
    for i, a in enumerate(image[:, 0]):
        Image.fromarray(a).save(tmp_path / "pngs" / f"s{i}.png")
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), str(tmp_path / "pngs"), str(tmp_path / "o1")])
    assert r.exit_code == 0, r.output
    assert "tta x2" in r.output.replace("\n", " ")

    def labels(mask):  # the folder writer's label map: a later class wins an overlap
        out = np.zeros(mask.shape[2:], np.uint8)
        for j in range(mask.shape[1]):
            out[mask[0, j] > 0] = j + 1
        return out

    for i in range(6):  # each PNG is its own case (normalised on its own)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o1" / f"s{i}.png")),
                                      labels(seg.predict(image[i:i + 1]).mask))
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), str(tmp_path / "pngs"), str(tmp_path / "o2"),
                                 "--presence", "0,0", "--no-tta"])
    assert r.exit_code == 0, r.output
    assert "tta off" in r.output
    nott = Segmenter.load(raw_path, tta=False)
    for i in range(6):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o2" / f"s{i}.png")),
                                      labels(nott.predict(image[i:i + 1]).mask))
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), str(tmp_path / "pngs"), str(tmp_path / "o3"),
                                 "--presence", "0.1,0.2,0.3"])
    assert isinstance(r.exception, MedsegError)
    assert r.exception.problem.startswith("3 presence values for 2 classes (a, b)")
