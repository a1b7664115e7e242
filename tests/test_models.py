"""Model zoo: shapes, gradients, learning, ONNX round trip, channels_last, registry errors."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from medseg.errors import MedsegError
from medseg.models import MODELS, create_model, model_info

SMALL = {
    "unet": dict(features=(4, 8, 16)),
    "attention_unet": dict(features=(4, 8, 16)),
    "resunetpp": dict(features=(4, 8, 8, 16, 16)),
    "deeplabv3plus": dict(encoder_depth=18, encoder_base=8, aspp_channels=16, decoder_channels=16),
    "swin_unetr": dict(feature_size=12, depths=(1, 1, 1, 1)),
}
NAMES = sorted(SMALL)


def test_every_registered_model_is_tested():
    assert MODELS.names() == NAMES


def test_import_has_no_side_effects():
    code = "import sys, medseg.models; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cin,cout", [(1, 1), (5, 4)])
def test_shapes_2d(name, cin, cout):
    m = create_model(name, cin, cout, **SMALL[name]).eval()
    with torch.no_grad():
        assert m(torch.randn(2, cin, 64, 64)).shape == (2, cout, 64, 64)


@pytest.mark.parametrize("name", ["unet", "attention_unet", "resunetpp"])
def test_shapes_3d(name):
    m = create_model(name, 3, 2, spatial_dims=3, **SMALL[name]).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 16, 24, 32)).shape == (1, 2, 16, 24, 32)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    m = create_model(name, 3, 2, **SMALL[name]).train()
    (m(torch.randn(2, 3, 64, 64)) ** 2).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("name", NAMES)
def test_training_lowers_loss(name):
    torch.manual_seed(0)
    m = create_model(name, 1, 1, **SMALL[name]).train()
    x = torch.randn(4, 1, 64, 64)
    y = (x > 0.5).float()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_matches(name):
    torch.manual_seed(0)
    m = create_model(name, 3, 2, **SMALL[name]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        m = m.to(memory_format=torch.channels_last)
        out = m(x.contiguous(memory_format=torch.channels_last))
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_onnx_round_trip(name):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = create_model(name, 3, 2, **SMALL[name]).eval()
    x = torch.randn(1, 3, 64, 64)
    if name == "swin_unetr":  # its shifted-window masks are traced per size: the dynamo exporter handles it
        data = torch.onnx.export(m, (x,), dynamo=True, opset_version=18).model_proto.SerializeToString()
    else:
        f = io.BytesIO()
        torch.onnx.export(m, (x,), f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
        data = f.getvalue()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert abs(out - ref).max() < 1e-4


def test_deep_supervision_only_in_training():
    m = create_model("unet", 1, 3, features=(4, 8, 16, 32), deep_supervision=True)
    outs = m.train()(torch.randn(1, 1, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 3, 32, 32)] * 3
    assert m.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_unknown_model_name():
    with pytest.raises(MedsegError) as e:
        create_model("unte", 1, 1)
    assert str(e.value) == (
        "unknown model 'unte'; known: attention_unet, deeplabv3plus, resunetpp, swin_unetr, unet (did you mean 'unet'?)"
    )


def test_impossible_configurations():
    with pytest.raises(MedsegError, match="model 'deeplabv3plus' supports spatial_dims 2, not 3"):
        create_model("deeplabv3plus", 1, 1, spatial_dims=3)
    with pytest.raises(MedsegError, match="in_channels must be a positive integer, got 0"):
        create_model("unet", 0, 1)
    with pytest.raises(MedsegError, match="unexpected keyword argument 'widths'"):
        create_model("unet", 1, 1, widths=(1, 2))
    with pytest.raises(MedsegError, match="output_stride must be 8 or 16, got 32"):
        create_model("deeplabv3plus", 1, 1, output_stride=32)


def test_input_not_divisible_is_a_clear_error():
    m = create_model("unet", 1, 1, features=(4, 8, 16, 32)).eval()
    with pytest.raises(ValueError) as e:
        m(torch.randn(1, 1, 64, 60))
    assert str(e.value) == "unet needs spatial sizes divisible by 8, got (64, 60) (60 is not); pad or crop the input"
    assert isinstance(e.value, MedsegError)
    with pytest.raises(ValueError, match=r"unet expects a 4-d input"):
        m(torch.randn(1, 64, 64))


def test_model_info():
    assert model_info("unet", features=(4, 8, 16))["required_divisor"] == 4
    assert model_info("unet")["required_divisor"] == 16
    info = model_info("deeplabv3plus", output_stride=8, encoder_depth=18)
    assert info["required_divisor"] == 8 and info["dims"] == (2,)
    assert model_info("swin_unetr", feature_size=12)["required_divisor"] == 32


def test_unet_has_no_graph_breaks():
    m = create_model("unet", 1, 1, features=(4, 8, 16)).eval()
    explained = torch._dynamo.explain(m)(torch.randn(1, 1, 32, 32))
    assert explained.graph_break_count == 0


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEDSEG_SLOW") != "1", reason="torch.compile costs 30-70 s here; set MEDSEG_SLOW=1")
def test_unet_compiles():
    m = create_model("unet", 1, 2, features=(4, 8, 16)).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert (torch.compile(m, fullgraph=True)(x) - m(x)).abs().max().item() < 1e-4
