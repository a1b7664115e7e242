"""ONNX export: sidecar contents, onnxruntime/PyTorch agreement through the same pipeline, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from test_inference import _models, make_bundle, write_lgg  # noqa: F401  (_models: autouse model shim)

from medseg.errors import MedsegError


def test_export_writes_onnx_and_sidecar(tmp_path):
    from medseg.inference.export import export_onnx

    bp = make_bundle(tmp_path / "model.pt", postprocess={"thresholds": [0.5], "presence": [0.3], "min_size": 7,
                                                         "largest_cc": True})
    out = export_onnx(bp, tmp_path / "m.onnx")
    assert out.is_file()
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["format"] == "medseg.pipeline/1"
    assert side["classes"] == ["tumor"] and side["class_kind"] == "multiclass"
    assert side["channels"] == ["pre-contrast", "FLAIR", "post-contrast"]
    assert side["normalization"] == {"mode": "zscore_case"}
    assert side["input"]["mode"] == "2d" and side["input"]["divisor"] == 2
    assert side["postprocess"] == {"thresholds": [0.5], "presence": [0.3], "min_size": 7, "largest_cc": True,
                                  "components": None}
    assert side["tta"] == {"flips": [[-1], [-2]]}
    assert side["onnx"]["opset"] == 17 and side["onnx"]["input"] == "input"
    import onnx

    m = onnx.load(str(out))
    assert m.opset_import[0].version == 17
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and isinstance(dims[2], str) and isinstance(dims[3], str)  # dynamic axes


@pytest.mark.parametrize("tta", [False, True])
def test_onnx_and_torch_agree_through_the_pipeline(tmp_path, tta):
    from medseg import Segmenter
    from medseg.inference.export import export_onnx

    bp = make_bundle(tmp_path / "model.pt", features=(4, 8, 16))
    export_onnx(bp, tmp_path / "m.onnx")
    image = np.random.default_rng(0).integers(0, 255, (6, 3, 44, 52), dtype=np.uint8)  # not /4: pad + crop
    t = Segmenter.load(bp, tta=tta).predict(image, probabilities=True)
    o = Segmenter.load(tmp_path / "m.onnx", tta=tta)
    assert o.backend == "onnx"
    p = o.predict(image, probabilities=True)
    assert (p.mask == t.mask).mean() >= 0.999
    np.testing.assert_allclose(p.prob.astype(np.float32), t.prob.astype(np.float32), atol=1e-3)  # fp16 storage
    # the float32 probabilities of one batch agree to 1e-4
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 40)).astype(np.float32)
    seg_t = Segmenter.load(bp, tta=tta)
    np.testing.assert_allclose(o.probabilities(x), seg_t.probabilities(x), atol=1e-4)


@pytest.mark.slow  # torch.export takes seconds
def test_dynamo_exporter_also_works(tmp_path):
    from medseg import Segmenter
    from medseg.inference.export import export_onnx

    bp = make_bundle(tmp_path / "model.pt")
    export_onnx(bp, tmp_path / "d.onnx", dynamo=True)
    assert json.loads((tmp_path / "d.json").read_text())["onnx"]["exporter"] == "dynamo"
    x = np.random.default_rng(2).standard_normal((3, 3, 36, 28)).astype(np.float32)
    np.testing.assert_allclose(Segmenter.load(tmp_path / "d.onnx", tta=False).probabilities(x),
                               Segmenter.load(bp, tta=False).probabilities(x), atol=1e-4)


def test_predict_runs_onnx_file_and_writes_same_masks(tmp_path):
    from medseg.inference.export import export_onnx
    from medseg.inference.predict import predict

    bp = make_bundle(tmp_path / "model.pt")
    export_onnx(bp, tmp_path / "m.onnx")
    data = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 4})
    predict(bp, data, tmp_path / "pt", tta=False)
    predict(tmp_path / "m.onnx", data, tmp_path / "ox", tta=False)
    a = np.stack([tifffile.imread(p) for p in sorted((tmp_path / "pt").rglob("*_mask.tif"))])
    b = np.stack([tifffile.imread(p) for p in sorted((tmp_path / "ox").rglob("*_mask.tif"))])
    assert a.shape == b.shape == (4, 40, 44)
    assert (a == b).mean() >= 0.999


def test_onnx_backend_from_bundle(tmp_path):
    from medseg import Segmenter

    bp = make_bundle(tmp_path / "model.pt")
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    seg = Segmenter.load(bp, tta=False, backend="onnx")
    assert seg.backend == "onnx"
    np.testing.assert_allclose(seg.probabilities(x), Segmenter.load(bp, tta=False).probabilities(x), atol=1e-4)


def test_export_bad_inputs(tmp_path):
    from medseg import Segmenter
    from medseg.inference.export import export_onnx

    bp = make_bundle(tmp_path / "model.pt")
    with pytest.raises(MedsegError, match="the output must be a .onnx file"):
        export_onnx(bp, tmp_path / "m.pt")
    (tmp_path / "lonely.onnx").write_bytes(b"")
    with pytest.raises(MedsegError, match="pre/post-processing description lonely.json is missing"):
        Segmenter.load(tmp_path / "lonely.onnx")
    # a sidecar missing a field: the typed description names the file and the field
    (tmp_path / "lonely.json").write_text(json.dumps({"format": "medseg.pipeline/1", "name": "x", "classes": ["a"],
                                                      "class_kind": "multiclass", "channels": ["c"], "input": {}}))
    with pytest.raises(MedsegError, match="not a valid medseg pipeline description: arch: Field required") as e:
        Segmenter.load(tmp_path / "lonely.onnx")
    assert e.value.path == str(tmp_path / "lonely.json")
    # a complete sidecar beside a file that is no ONNX graph
    (tmp_path / "lonely.json").write_text(json.dumps({
        "format": "medseg.pipeline/1", "name": "x", "classes": ["a"], "class_kind": "multiclass", "channels": ["c"],
        "arch": {"name": "unet", "in_channels": 1, "out_channels": 2}, "input": {"mode": "2d"},
        "normalization": {"mode": "zscore_case"}}))
    with pytest.raises(MedsegError, match="cannot load ONNX model") as e:
        Segmenter.load(tmp_path / "lonely.onnx")
    assert e.value.path == str(tmp_path / "lonely.onnx")


def test_cli_export_and_predict(tmp_path):
    from typer.testing import CliRunner

    from medseg.cli import app

    bp = make_bundle(tmp_path / "model.pt")
    data = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 2})
    r = CliRunner().invoke(app, ["export", str(bp), str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    assert "exported" in r.output and (tmp_path / "m.json").is_file()
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "m.onnx"), str(data), str(tmp_path / "out"), "--no-tta"])
    assert r.exit_code == 0, r.output
    assert "predicted 1 case, 2 slices" in r.output and "slices/s" in r.output
    assert (tmp_path / "out" / "TCGA_AA_0001_20000101" / "TCGA_AA_0001_20000101_1_mask.tif").is_file()


def test_cli_postprocess_flags_and_errors(tmp_path):
    from typer.testing import CliRunner

    from medseg.cli import app

    bp = make_bundle(tmp_path / "model.pt")
    data = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 2})
    r = CliRunner().invoke(app, ["predict", str(bp), str(data), str(tmp_path / "out"), "--no-tta",
                                 "--presence", "1.01"])
    assert r.exit_code == 1 and "--presence must be in [0, 1], got 1.01" in str(r.exception)  # refused, not emptied
    assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(app, ["predict", str(bp), str(data), str(tmp_path / "out"), "--no-tta",
                                 "--presence", "1"])
    assert r.exit_code == 0, r.output
    for f in (tmp_path / "out").rglob("*_mask.tif"):
        assert not tifffile.imread(f).any()  # no probability exceeds 1: every slice zeroed
    from medseg.cli import main
    import sys

    old = sys.argv
    sys.argv = ["medseg", "predict", "lgg-unt", str(data), str(tmp_path / "o2")]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = old
    assert e.value.code == 2


def test_cli_tta_flips_and_export_fold(tmp_path):
    from typer.testing import CliRunner

    from medseg import Segmenter
    from medseg.cli import app
    from medseg.inference.predict import parse_flips

    assert parse_flips("-1; -2;-1,-2") == [[-1], [-2], [-1, -2]]
    for bad in ("1", "-1,-1", "x", "-4"):
        with pytest.raises(MedsegError, match=f"bad TTA flip '{bad}'"):
            parse_flips(bad)
    bp = make_bundle(tmp_path / "model.pt")
    with pytest.raises(MedsegError, match=r"TTA flip \[-3\] is not a group of spatial axes of this 2D model"):
        Segmenter.load(bp, tta=[[-3]])
    data = write_lgg(tmp_path / "kaggle_3m", {"TCGA_AA_0001_20000101": 2})
    r = CliRunner().invoke(app, ["predict", str(bp), str(data), str(tmp_path / "out"), "--tta-flips", "-1,-2"])
    assert r.exit_code == 0, r.output
    assert "tta x2" in r.output.replace("\n", " ")  # identity + one flip group
    img = np.stack([tifffile.imread(data / "TCGA_AA_0001_20000101" / f"TCGA_AA_0001_20000101_{i}.tif")
                    for i in (1, 2)]).transpose(0, 3, 1, 2)
    want = Segmenter.load(bp, tta=[[-1, -2]]).predict(img).mask[:, 0] * 255
    got = np.stack([tifffile.imread(tmp_path / "out" / "TCGA_AA_0001_20000101" / f"TCGA_AA_0001_20000101_{i}_mask.tif")
                    for i in (1, 2)])
    np.testing.assert_array_equal(got, want)
    r = CliRunner().invoke(app, ["predict", str(bp), str(data), str(tmp_path / "o2"), "--no-tta", "--tta-flips", "-1"])
    assert isinstance(r.exception, MedsegError) and "contradict" in str(r.exception)
    # export picks a fold of a k-fold run
    run = tmp_path / "run"
    for k in range(2):
        make_bundle(run / f"fold_{k}" / "model.pt", seed=k)
    r = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "f1.onnx"), "--folds", "1"])
    assert r.exit_code == 0, r.output
    x = np.random.default_rng(0).integers(0, 255, (2, 3, 32, 32), dtype=np.uint8)
    np.testing.assert_allclose(
        Segmenter.load(tmp_path / "f1.onnx", tta=False).predict(x, probabilities=True).prob.astype(np.float32),
        Segmenter.load(run / "fold_1" / "model.pt", tta=False).predict(x, probabilities=True).prob.astype(np.float32),
        atol=2e-3)


_SWIN_KW = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}


def _swin_bundle(path):
    import torch

    from medseg.bundle import save_bundle
    from medseg.models import create_model

    torch.manual_seed(0)
    m = create_model("swin_unetr", 1, 2, spatial_dims=2, **_SWIN_KW).eval()
    return save_bundle({"arch": {"name": "swin_unetr", "in_channels": 1, "out_channels": 2, "spatial_dims": 2,
                                 "kwargs": _SWIN_KW},
                        "state_dict": m.state_dict(), "classes": ["a"], "class_kind": "multiclass", "channels": ["gray"],
                        "input": {"mode": "2d", "size": [64, 64]}, "normalization": {"mode": "zscore_case"}}, path)


class _Said:
    def __init__(self):
        self.lines = []

    def print(self, text):
        self.lines.append(str(text))


@pytest.mark.slow  # three exports of a (tiny) Swin UNETR: ~6 s
def test_swin_unetr_exports_for_its_size_and_the_pipeline_windows_other_sizes(tmp_path, monkeypatch):
    """MONAI's Swin UNETR freezes its attention mask at the traced size: export it for one size, record the
    size in the sidecar, and run other sizes on windows of it -- the same masks as PyTorch on the same windows."""
    import onnx

    import medseg.inference.export as exp
    from medseg import Segmenter
    from medseg.bundle import build_model, load_bundle
    from medseg.inference.backends import torch_backend

    bp = _swin_bundle(tmp_path / "swin.pt")
    module = build_model(load_bundle(bp))
    said = _Said()
    exp.export_onnx(bp, tmp_path / "s.onnx", console=said)
    side = json.loads((tmp_path / "s.json").read_text())
    assert side["input"]["fixed_size"] == [64, 64] and side["onnx"]["fixed_size"] == [64, 64]
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(tmp_path / "s.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 64, 64]
    assert "exported for input size [64, 64]" in said.lines[0]
    # at the export size, logits agree (batch 3: the batch axis stays dynamic)
    x = np.random.default_rng(0).standard_normal((3, 1, 64, 64)).astype(np.float32)
    assert exp.logit_difference(module, tmp_path / "s.onnx", list(x.shape)) < 1e-4
    # through the predict pipeline at other sizes (larger: windows; smaller: padded to one window)
    onnx_seg = Segmenter.load(tmp_path / "s.onnx", tta=False)
    torch_seg = Segmenter(onnx_seg.spec, [torch_backend(module)], tta=False)
    for shape in ((3, 1, 80, 112), (1, 1, 40, 50)):
        image = np.random.default_rng(1).normal(100, 20, shape).astype(np.float32)
        o, t = onnx_seg.predict(image, probabilities=True), torch_seg.predict(image, probabilities=True)
        assert o.mask.shape == (shape[0], 1, *shape[2:])
        np.testing.assert_allclose(o.prob.astype(np.float32), t.prob.astype(np.float32), atol=1e-3)
        assert (o.mask == t.mask).mean() >= 0.999 and 0 < t.mask.mean() < 1
    # the check catches a dynamic-axes graph of this network: wrong (or failing) at another size ...
    spec = onnx_seg.spec.model_copy(deep=True)
    spec.input.fixed_size = None
    exp.export_module(module, spec, tmp_path / "dyn.onnx")
    assert exp.logit_difference(module, tmp_path / "dyn.onnx", [2, 1, 64, 64]) < 1e-4
    assert exp.logit_difference(module, tmp_path / "dyn.onnx", [2, 1, 96, 128]) > 1e-3
    # ... so even without the known-architecture list, export_onnx re-exports it for one size
    import medseg.inference.onnx_graph as graph

    monkeypatch.setattr(graph, "FIXED_SIZE_ARCHS", set())
    said = _Said()
    exp.export_onnx(bp, tmp_path / "auto.onnx", console=said)
    assert json.loads((tmp_path / "auto.json").read_text())["input"]["fixed_size"] == [64, 64]
    assert "valid for one input size only (differs at [96, 128]): exported for [64, 64]" in said.lines[0]
    # the onnx backend straight from the bundle takes the same route
    monkeypatch.setattr(graph, "FIXED_SIZE_ARCHS", {"swin_unetr"})
    ob = Segmenter.load(bp, tta=False, backend="onnx")
    assert ob.spec.input.fixed_size == [64, 64]
    image = np.random.default_rng(2).normal(100, 20, (2, 1, 96, 70)).astype(np.float32)
    np.testing.assert_allclose(_probs(ob, image), _probs(torch_seg, image), atol=1e-3)


def _probs(seg, image):
    return seg.predict(image, probabilities=True).prob.astype(np.float32)


def test_export_size_option(tmp_path):
    from typer.testing import CliRunner

    from medseg import Segmenter
    from medseg.cli import app
    from medseg.inference.export import parse_size

    bp = make_bundle(tmp_path / "model.pt", features=(4, 8))
    r = CliRunner().invoke(app, ["export", str(bp), str(tmp_path / "f.onnx"), "--size", "32,48"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "f.json").read_text())["input"]["fixed_size"] == [32, 48]
    image = np.random.default_rng(3).integers(0, 255, (2, 3, 40, 60), dtype=np.uint8)
    o = Segmenter.load(tmp_path / "f.onnx", tta=False)
    from medseg.bundle import build_model, load_bundle
    from medseg.inference.backends import torch_backend

    t = Segmenter(o.spec, [torch_backend(build_model(load_bundle(bp)))], tta=False)
    np.testing.assert_allclose(_probs(o, image), _probs(t, image), atol=1e-3)
    for bad, msg in (("32", "bad --size '32'"), ("a,b", "bad --size 'a,b'")):
        with pytest.raises(MedsegError, match=msg):
            parse_size(bad)
    r = CliRunner().invoke(app, ["export", str(bp), str(tmp_path / "g.onnx"), "--size", "33,48"])
    assert isinstance(r.exception, MedsegError) and "each side must be a multiple of 2" in str(r.exception)
    r = CliRunner().invoke(app, ["export", str(bp), str(tmp_path / "g.onnx"), "--size", "8,32,32"])
    assert "--size needs 2 values for this 2D model" in str(r.exception)
    assert not (tmp_path / "g.onnx").exists()


def test_mask_agreement_by_hand():
    from medseg.inference.quantize import mask_agreement

    a = np.zeros((1, 2, 2, 2), np.float32)
    a[0, 1, 0, 0] = 1.0  # class 1 wins one pixel of four
    b = a.copy()
    b[0, 1, 1, 1] = 2.0  # ... and another one here
    assert mask_agreement([a], [b], "multiclass", None) == 0.75
    # multilabel: probability 0.6 is in at threshold 0.5, out at 0.7 (logit(0.6) = 0.405)
    x = np.full((1, 1, 1, 2), np.log(0.6 / 0.4), np.float32)
    y = np.full_like(x, -5.0)
    assert mask_agreement([x], [y], "multilabel", [0.5]) == 0.0
    assert mask_agreement([x], [y], "multilabel", [0.7]) == 1.0
    # one softmax class with a tuned threshold: p1 = sigmoid(x1 - x0); 0.4 and 0.2 both lose the argmax,
    # but a threshold of 0.3 puts the first pixel in and leaves the second out
    u = np.zeros((1, 2, 1, 2), np.float32)
    u[0, 1] = np.log(0.4 / 0.6), np.log(0.2 / 0.8)
    v = np.full_like(u, 0.0)
    v[0, 1] = -5.0
    assert mask_agreement([u], [v], "multiclass", None) == 1.0
    assert mask_agreement([u], [v], "multiclass", [0.5]) == 1.0
    assert mask_agreement([u], [v], "multiclass", [0.3]) == 0.5


@pytest.fixture(scope="module")
def lgg_prepared(tmp_path_factory):
    from conftest import FIXTURES
    from medseg.data.prepare import prepare

    return prepare("lgg", FIXTURES / "lgg_tiny" / "kaggle_3m", tmp_path_factory.mktemp("q") / "p", workers=1)


def test_int8_export_is_calibrated_checked_and_runs_in_the_pipeline(tmp_path, lgg_prepared):
    import onnx

    from medseg import Segmenter
    from medseg.data.prepared import PreparedDataset
    from medseg.inference.export import export_onnx

    # flip TTA on by default: calibration still sees each slice once
    bp = make_bundle(tmp_path / "model.pt", features=(4, 8, 16), tta={"enabled": True, "flips": [[-1], [-2]]})
    out = export_onnx(bp, tmp_path / "q.onnx", int8=lgg_prepared, calibration_slices=4, min_agreement=0.9)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    rec = json.loads((tmp_path / "q.json").read_text())["onnx"]["int8"]
    # 8 slices in 2 cases: the first case (4 slices) calibrates, the other checks
    assert rec["calibration_slices"] == 4 and rec["checked_slices"] == 4 and rec["held_out"]
    assert 0.9 <= rec["mask_agreement"] <= 1.0
    ds = PreparedDataset.open(lgg_prepared)
    image = np.asarray(ds.image(ds.cases[0].id))
    t = Segmenter.load(bp, tta=False).predict(image, probabilities=True)
    q = Segmenter.load(out, tta=False).predict(image, probabilities=True)
    assert (q.mask == t.mask).mean() >= 0.9
    assert np.abs(q.prob.astype(np.float32) - t.prob.astype(np.float32)).max() > 0  # really quantized


def test_int8_export_refuses_below_the_agreement_and_writes_nothing(tmp_path, lgg_prepared):
    from medseg.inference.export import export_onnx

    bp = make_bundle(tmp_path / "model.pt", features=(4, 8, 16))
    with pytest.raises(MedsegError, match="agree with PyTorch's on only"):
        export_onnx(bp, tmp_path / "q.onnx", int8=lgg_prepared, calibration_slices=4, min_agreement=1.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    one = make_bundle(tmp_path / "gray.pt", features=(4, 8, 16), channels=("T1",))
    with pytest.raises(MedsegError, match="calibration data has 3 channels"):
        export_onnx(one, tmp_path / "g.onnx", int8=lgg_prepared)
    with pytest.raises(MedsegError, match="prepared dataset not found"):
        export_onnx(bp, tmp_path / "m.onnx", int8=tmp_path / "nowhere")
    assert not (tmp_path / "g.onnx").exists() and not (tmp_path / "m.onnx").exists()


def test_pipeline_inputs_are_distinct_slices_with_their_logits(tmp_path, lgg_prepared):
    import torch

    from medseg import Segmenter
    from medseg.inference.quantize import pipeline_inputs

    bp = make_bundle(tmp_path / "model.pt", features=(4, 8, 16), tta={"enabled": True, "flips": [[-1], [-2]]})
    seg = Segmenter.load(bp)
    assert seg.flips  # TTA on for prediction ...
    got = pipeline_inputs(seg, lgg_prepared, 8)
    x = np.concatenate([a for a, _ in got])
    assert len(x) == 8 and seg.flips  # ... off while capturing, and restored
    for i in range(8):  # eight different slices, no flipped copy among them
        for j in range(8):
            assert not np.allclose(x[i], x[j][..., ::-1]) and not np.allclose(x[i], x[j][..., ::-1, :])
            assert i == j or not np.allclose(x[i], x[j])
    with torch.inference_mode():
        ref = seg.models[0](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.concatenate([y for _, y in got]), ref, atol=1e-4)


def test_backends_refuse_a_device_that_is_not_there():
    """The device seam: a CUDA device on a machine without one is a one-line error, never a traceback."""
    import torch

    from medseg.errors import MedsegError
    from medseg.machine import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MedsegError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(MedsegError, match="PyTorch sees no CUDA GPU here"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(MedsegError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
