"""Target spacing: the rule, resampling round trips, ``prepare --spacing`` and predictions on each input's
own grid."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medseg.cli import app
from medseg.data.prepared import PreparedDataset
from medseg.data.resample import needs_resampling, resample, shape_for, target_spacing
from medseg.errors import MedsegError, MedsegWarning

runner = CliRunner()


def test_target_spacing_rule():
    # isotropic data of varied resolution: the median per axis
    assert target_spacing([[1, 1, 1], [1.5, 1.5, 1.5], [2, 2, 2]], [[50, 50, 50]] * 3) == [1.5, 1.5, 1.5]
    # few thick slices (median 5 mm, 20 slices against 200 pixels): the 10th percentile, 3 + 0.3 * 2
    thick = [[3, 1, 1], [5, 1, 1], [5, 1, 1], [5, 1, 1]]
    assert target_spacing(thick, [[20, 200, 200]] * 4) == pytest.approx([3.6, 1, 1])
    # as thick but many slices (100 * 3 >= 200): the median stays
    assert target_spacing(thick, [[100, 200, 200]] * 4) == [5, 1, 1]
    # never finer than the in-plane spacing
    assert target_spacing([[0.5, 1, 1], [5, 1, 1], [5, 1, 1], [5, 1, 1]], [[20, 200, 200]] * 4)[0] >= 1
    assert not needs_resampling([1.01, 1, 1], [1, 1, 1]) and needs_resampling([1.05, 1, 1], [1, 1, 1])
    assert shape_for([10, 2, 16, 15], [2, 1, 0.5], [1, 1, 1]) == (20, 16, 8)  # 7.5 rounds to 8


def _sphere(shape, centre, r, spacing=(1, 1, 1)) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    return ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= r**2


def test_resample_round_trip_masks_and_images():
    # two exclusive classes, halves of a sphere, at 3 mm slices; to 1 mm and back
    s = _sphere((12, 40, 40), (18, 20, 20), 12, (3, 1, 1))
    mask = np.zeros((12, 2, 40, 40), np.uint8)
    mask[:, 0] = s & (np.arange(40) < 20)[None, None, :]
    mask[:, 1] = s & (np.arange(40) >= 20)[None, None, :]
    fine = resample(mask, shape_for(mask.shape, (3, 1, 1), (1, 1, 1)), mask=True)
    assert fine.shape == (36, 2, 40, 40) and fine.dtype == np.uint8
    assert fine.sum(axis=1).max() == 1  # exclusive labels stay exclusive
    truth = _sphere((36, 40, 40), (18, 20, 20), 12)
    assert 2 * (fine.any(1) & truth).sum() / (fine.any(1).sum() + truth.sum()) > 0.95  # 3 mm truth is coarse
    back = resample(fine, (12, 40, 40), mask=True)
    for j in range(2):
        a, b = back[:, j].astype(bool), mask[:, j].astype(bool)
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97
    # integer images keep their dtype, rounded; a linear ramp along z stays linear
    ramp = np.broadcast_to(np.arange(12, dtype=np.int16)[:, None, None, None] * 30, (12, 1, 4, 4)).copy()
    up = resample(ramp, (24, 4, 4))
    assert up.dtype == np.int16
    np.testing.assert_array_equal(up[2:-2:2, 0, 0, 0], (np.arange(1, 11) * 30 - 8))  # centres at z - 0.25
    assert resample(ramp, (12, 4, 4)) is ramp  # on its grid already: untouched


def _nifti_set(root: Path, zooms: dict[str, tuple[float, float, float]], depth: dict[str, int]) -> Path:
    """MSD-style imagesTr/labelsTr: each case a ball of label 1 (and label 2 on one side) in a 16 x 16 x z
    volume, zooms (x, y, z) in mm, the ball 6 mm across whatever the spacing."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for cid, zm in zooms.items():
        nz = depth[cid]
        b = _sphere((nz, 16, 16), (nz * zm[2] / 2, 8, 8), 6, (zm[2], zm[1], zm[0]))  # (z, y, x)
        lab = b.astype(np.uint8) + (b & (np.arange(16) >= 8)[None, None, :]).astype(np.uint8)
        img = (rng.normal(100, 10, b.shape) + 80 * b).astype(np.int16)
        aff = np.diag([*zm, 1.0])
        for sub, arr in (("imagesTr", img), ("labelsTr", lab)):
            nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0), aff), root / sub / f"{cid}.nii.gz")
    return root


def _mixed(tmp_path: Path) -> Path:
    zooms = {"c1": (1, 1, 2), "c2": (1, 1, 2), "c3": (1, 1, 2), "c4": (1, 1, 1)}
    return _nifti_set(tmp_path / "src", zooms, {"c1": 10, "c2": 10, "c3": 10, "c4": 20})


def test_prepare_resamples_cases_off_the_target(tmp_path: Path):
    src = _mixed(tmp_path)
    res = runner.invoke(app, ["prepare", "nifti", str(src), str(tmp_path / "p"), "--workers", "1", "--folds", "2"])
    assert res.exit_code == 0, res.output
    assert "resampled 1 of 4 cases to 2 x 1 x 1 mm" in res.output
    ds = PreparedDataset.open(tmp_path / "p")
    assert ds.fingerprint["target_spacing"] == [2.0, 1.0, 1.0]
    by = {c.id: c for c in ds.cases}
    assert by["c4"].native == {"shape": [20, 1, 16, 16], "spacing": [1.0, 1.0, 1.0]}
    assert by["c4"].shape == [10, 1, 16, 16] and by["c4"].spacing == [2.0, 1.0, 1.0]
    assert all(by[c].native is None and by[c].shape == [10, 1, 16, 16] for c in ("c1", "c2", "c3"))
    m4 = np.asarray(ds.mask("c4"))
    assert ds.image("c4").dtype == np.int16 and m4.shape == (10, 2, 16, 16)
    assert by["c4"].fg_slices == [np.flatnonzero(m4[:, j].any(axis=(1, 2))).tolist() for j in range(2)]
    assert by["c4"].foreground == pytest.approx(m4.mean(axis=(0, 2, 3)).tolist())
    # the same ball at the same spacing now: the resampled case matches a case read at 2 mm
    m1 = np.asarray(ds.mask("c1"))
    assert 2 * (m4 & m1).sum() / (m4.sum() + m1.sum()) > 0.9
    assert not list((tmp_path / "p" / "cases").glob("c4.img.npy"))  # the native arrays are gone
    # the plan states the grid
    res = runner.invoke(app, ["plan", str(tmp_path / "p"), "--device", "cpu", "--out", str(tmp_path / "plan.yaml")])
    assert res.exit_code == 0, res.output
    assert "1 of 4 volumes resampled in prepare to [2.0, 1.0, 1.0] mm" in (tmp_path / "plan.yaml").read_text()


def test_prepare_spacing_native_and_explicit(tmp_path: Path):
    src = _mixed(tmp_path)
    res = runner.invoke(app, ["prepare", "nifti", str(src), str(tmp_path / "n"), "--workers", "1", "--folds", "2",
                              "--spacing", "native"])
    assert res.exit_code == 0, res.output
    ds = PreparedDataset.open(tmp_path / "n")
    assert "target_spacing" not in ds.fingerprint and all(c.native is None for c in ds.cases)
    with pytest.warns(MedsegWarning, match=r"spacings differ \(prepared with --spacing native\)"):
        res = runner.invoke(app, ["plan", str(tmp_path / "n"), "--device", "cpu", "--out", str(tmp_path / "plan.yaml")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["prepare", "nifti", str(src), str(tmp_path / "e"), "--workers", "1", "--folds", "2",
                              "--spacing", "1,1,1"])
    assert res.exit_code == 0, res.output
    ds = PreparedDataset.open(tmp_path / "e")
    assert [c.shape[0] for c in ds.cases] == [20, 20, 20, 20]
    assert [c.native is not None for c in ds.cases] == [True, True, True, False]


@pytest.mark.parametrize("value", ["1,x,1", "1,1", "0,1,1", "-1,1,1", "nan,1,1"])
def test_prepare_spacing_refused(tmp_path: Path, value: str):
    from medseg.data.prepare import prepare

    src = _mixed(tmp_path)
    with pytest.raises(MedsegError, match="expected 'auto', 'native' or three positive numbers") as e:
        prepare("nifti", src, tmp_path / "p", spacing=value, workers=1)
    assert e.value.path == str(src)
    assert not (tmp_path / "p").exists()


def test_predict_on_the_model_grid_and_back(tmp_path: Path):
    from test_inference import make_bundle

    from medseg import Segmenter

    bp = make_bundle(tmp_path / "m.pt", channels=["image"], spatial_dims=3, classes=("a", "b"),
                     input={"mode": "3d", "size": [8, 16, 16], "spacing": [2.0, 1.0, 1.0]})
    seg = Segmenter.load(bp, tta=False)
    image = np.random.default_rng(1).normal(100, 20, (20, 1, 16, 16)).astype(np.float32)
    pred = seg.predict(image, spacing=(1.0, 1.0, 1.0))
    assert pred.mask.shape == (20, 2, 16, 16)
    # the reference: the network on the 2 mm grid, its probabilities brought back to 1 mm, then argmax
    p = np.concatenate([q for _, q in seg._chunks(resample(image, (10, 16, 16)))])
    back = resample(p, (20, 16, 16))
    am = back.argmax(axis=1)
    for j in range(2):
        np.testing.assert_array_equal(pred.mask[:, j], am == j + 1)
    assert 0 < pred.mask.mean() < 0.5
    # at the model's spacing (or with none given) nothing is resampled
    same = seg.predict(image[:10], spacing=(2.0, 1.0, 1.0)).mask
    np.testing.assert_array_equal(same, seg.predict(image[:10]).mask)


def test_predict_cli_writes_each_input_grid(tmp_path: Path):
    from test_inference import make_bundle

    src = _mixed(tmp_path)
    bp = make_bundle(tmp_path / "m.pt", channels=["image"], spatial_dims=3, classes=("a", "b"),
                     input={"mode": "3d", "size": [8, 16, 16], "spacing": [2.0, 1.0, 1.0]})
    res = runner.invoke(app, ["predict", str(bp), str(src / "imagesTr"), str(tmp_path / "out"), "--no-tta"])
    assert res.exit_code == 0, res.output
    for cid in ("c1", "c4"):
        out, ref = nib.load(tmp_path / "out" / f"{cid}.nii.gz"), nib.load(src / "imagesTr" / f"{cid}.nii.gz")
        assert out.shape == ref.shape
        np.testing.assert_allclose(out.affine, ref.affine)
    meta = json.loads(json.dumps(nib.load(tmp_path / "out" / "c4.nii.gz").header.get_zooms(), default=float))
    assert meta == [1.0, 1.0, 1.0]
