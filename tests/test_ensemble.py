"""Weighted ensembles of different models (issue 8: 2.5D + 3D fusion): Segmenter.load([...], weights=...),
`medseg predict a,b --weights`, agreement checks."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from test_inference import _models, make_bundle, write_lgg  # noqa: F401  (_models: autouse model shim)

from medseg.errors import MedsegError


def _prob(seg, image) -> np.ndarray:
    return seg.predict(image, probabilities=True).prob.astype(np.float32)


def test_weighted_mean_of_2d_and_2p5d_models(tmp_path):
    """Each member runs with its own input mode; the ensemble's probabilities are the weighted mean."""
    from medseg import Segmenter

    a = make_bundle(tmp_path / "a.pt", seed=1)
    b = make_bundle(tmp_path / "b.pt", seed=2, input={"mode": "2.5d", "context": 1, "stride": 1, "size": [32, 32]})
    image = np.random.default_rng(0).integers(0, 255, (5, 3, 36, 44), dtype=np.uint8)
    pa, pb = _prob(Segmenter.load(a, tta=False), image), _prob(Segmenter.load(b, tta=False), image)
    ens = Segmenter.load([a, b], weights=[0.6, 0.4], tta=False)
    assert ens.is_ensemble and ens.weights == pytest.approx([0.6, 0.4])
    pred = ens.predict(image, probabilities=True)
    manual = 0.6 * pa + 0.4 * pb
    np.testing.assert_allclose(pred.prob.astype(np.float32), manual, atol=2e-3)  # fp16 storage
    assert np.abs(pa - pb).max() > 0.1  # the two models really differ
    # multiclass decision on the mean: foreground where the mean's class-1 probability beats background
    sure = np.abs(manual[:, 0] - 0.5) > 2e-3
    np.testing.assert_array_equal(pred.mask[:, 0][sure], (manual[:, 0] > 0.5)[sure])
    # weights are normalised; a comma-separated string is the same as a list
    same = Segmenter.load(f"{a},{b}", weights=[3, 2], tta=False).predict(image, probabilities=True)
    np.testing.assert_array_equal(same.prob, pred.prob)
    # equal weights by default
    np.testing.assert_allclose(_prob(Segmenter.load([a, b], tta=False), image), (pa + pb) / 2, atol=2e-3)


def test_2d_and_3d_multilabel_ensemble_streams_slabs(tmp_path, monkeypatch):
    """A 2D and a 3D model (different windows): slab-streamed ranges give the manual weighted mean, and the
    first model's thresholds decide after averaging."""
    import medseg.inference.segmenter as segmod
    from medseg import Segmenter

    classes = ("a", "b")
    a = make_bundle(tmp_path / "2d.pt", channels=["mri"], classes=classes, class_kind="multilabel", seed=3,
                    postprocess={"thresholds": [0.5, 0.51]})
    b = make_bundle(tmp_path / "3d.pt", channels=["mri"], classes=classes, class_kind="multilabel", seed=4,
                    spatial_dims=3, input={"mode": "3d", "size": [8, 16, 16]})
    c = make_bundle(tmp_path / "3d_b.pt", channels=["mri"], classes=classes, class_kind="multilabel", seed=5,
                    spatial_dims=3, input={"mode": "3d", "size": [4, 16, 16]})
    image = np.random.default_rng(1).normal(100, 20, (37, 1, 16, 20)).astype(np.float32)
    pa, pb, pc = (_prob(Segmenter.load(m, tta=False), image) for m in (a, b, c))
    manual = 0.3 * pa + 0.5 * pb + 0.2 * pc
    monkeypatch.setattr(segmod, "SLAB_BYTES", 4 * (1 + 2 + 1 + 2) * 16 * 20 * 10)  # ~10 slices a range
    used = []
    real = segmod.z_slabs
    monkeypatch.setattr(segmod, "z_slabs", lambda *args: used.append(real(*args)) or used[-1])
    ens = Segmenter.load([a, b, c], weights=[0.3, 0.5, 0.2], tta=False)
    pred = ens.predict(image, probabilities=True)
    assert len(used[0]) >= 3  # really streamed in several ranges
    np.testing.assert_allclose(pred.prob.astype(np.float32), manual, atol=2e-3)
    thr = np.array([0.5, 0.51])[None, :, None, None]
    sure = np.abs(manual - thr) > 2e-3
    np.testing.assert_array_equal(pred.mask[sure], (manual > thr)[sure])
    assert 0 < pred.mask[:, 1].mean() < (manual[:, 1] > 0.5).mean()  # class b at 0.51, not 0.5


def test_mismatched_models_give_clear_errors(tmp_path):
    from medseg import Segmenter

    a = make_bundle(tmp_path / "a.pt", classes=("tumor",))
    other_classes = make_bundle(tmp_path / "b.pt", classes=("edema",))
    with pytest.raises(MedsegError) as e:
        Segmenter.load([a, other_classes])
    assert e.value.problem == "cannot ensemble b with a: classes differ (['edema'] vs ['tumor'])"
    assert e.value.path == str(other_classes)
    ml = make_bundle(tmp_path / "ml.pt", classes=("tumor",), class_kind="multilabel")
    with pytest.raises(MedsegError, match=r"cannot ensemble ml with a: class kinds differ \(multilabel vs multiclass\)"):
        Segmenter.load([a, ml])
    gray = make_bundle(tmp_path / "gray.pt", channels=["gray"])
    with pytest.raises(MedsegError, match=r"input channels differ \(\['gray'\] vs \['pre-contrast', 'FLAIR', 'post-contrast'\]\)"):
        Segmenter.load(f"{a},{gray}")
    b2 = make_bundle(tmp_path / "b2.pt", seed=1)
    with pytest.raises(MedsegError, match="3 weights for 2 models: give one weight per model"):
        Segmenter.load([a, b2], weights=[1, 1, 1])
    with pytest.raises(MedsegError, match="ensemble weights must be non-negative with a positive sum"):
        Segmenter.load([a, b2], weights=[1, -1])
    with pytest.raises(MedsegError, match="empty model name"):
        Segmenter.load(f"{a},")
    with pytest.raises(MedsegError, match="model file or folder not found") as e:
        Segmenter.load(f"{a},{tmp_path / 'missing.pt'}")
    assert e.value.path == str(tmp_path / "missing.pt")


def test_cli_predict_weighted_ensemble_with_onnx_member(tmp_path):
    from typer.testing import CliRunner

    from medseg import Segmenter
    from medseg.cli import app
    from medseg.inference.export import export_onnx

    a = make_bundle(tmp_path / "a.pt", seed=1)
    b = make_bundle(tmp_path / "b.pt", seed=2, input={"mode": "2.5d", "context": 1, "stride": 2, "size": [32, 32]})
    export_onnx(a, tmp_path / "a.onnx")
    data = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 4})
    r = CliRunner().invoke(app, ["predict", f"{tmp_path / 'a.onnx'},{b}", str(data), str(tmp_path / "out"),
                                 "--weights", "0.7,0.3", "--no-tta"])
    assert r.exit_code == 0, r.output
    text = r.output.replace("\n", " ")
    assert "a+b (onnx+torch, 2 folds, weights 0.7,0.3" in text
    case = "TCGA_AA_0001_20000101"
    img = np.stack([tifffile.imread(data / case / f"{case}_{i}.tif") for i in range(1, 5)]).transpose(0, 3, 1, 2)
    want = Segmenter.load([a, b], weights=[0.7, 0.3], tta=False).predict(img).mask[:, 0] * 255
    got = np.stack([tifffile.imread(tmp_path / "out" / case / f"{case}_{i}_mask.tif") for i in range(1, 5)])
    assert (got == want).mean() >= 0.999  # onnxruntime vs PyTorch: equal up to float rounding
    r = CliRunner().invoke(app, ["predict", f"{a},{b}", str(data), str(tmp_path / "o2"), "--weights", "0.7,x"])
    assert isinstance(r.exception, MedsegError) and "bad --weights '0.7,x'" in str(r.exception)


def test_slab_for_any_range_sees_the_windows_of_one_pass():
    """An ensemble's 3D members follow another member's z ranges: for ANY kept range, the slab's windows
    covering each kept slice are exactly the whole-volume pass's."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from medseg.inference.windows import slab_for

    def starts(size, roi, ov):
        return [s[0].start for s in dense_patch_slices((size,), (roi,), _get_scan_interval((size,), (roi,), 1, (ov,)))]

    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(400):
        roi, depth = int(rng.integers(2, 20)), int(rng.integers(2, 120))
        ov = float(rng.choice([0.0, 0.25, 0.5, 0.75]))
        lo = int(rng.integers(0, depth))
        hi = int(rng.integers(lo + 1, depth + 1))
        a, b = slab_for(lo, hi, depth, roi, ov)
        assert 0 <= a <= lo < hi <= b <= depth
        if depth < roi:
            assert (a, b) == (0, depth)
            continue
        assert b - a >= roi
        whole = starts(depth, roi, ov)
        mine = [a + s for s in starts(b - a, roi, ov)]
        for z in range(lo, hi):
            assert [s for s in mine if s <= z < s + roi] == [s for s in whole if s <= z < s + roi]
        checked += 1
    assert checked > 300
