"""Model zoo: shapes, gradients, learning, ONNX round trip, channels_last, registry errors."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import types

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
@pytest.mark.parametrize("cin,cout", [(1, 1), (5, 3)])
def test_shapes_2d(name, cin, cout):
    m = create_model(name, cin, cout, **SMALL[name]).eval()
    with torch.no_grad():
        assert m(torch.randn(2, cin, 64, 64)).shape == (2, cout, 64, 64)


@pytest.mark.parametrize("name", ["unet", "attention_unet", "resunetpp"])
def test_shapes_3d(name):
    m = create_model(name, 3, 5, spatial_dims=3, **SMALL[name]).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 16, 24, 32)).shape == (1, 5, 16, 24, 32)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    m = create_model(name, 3, 2, **SMALL[name]).train()
    (m(torch.randn(2, 3, 64, 64)) ** 2).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("name", ["unet", "attention_unet"])
def test_gradient_reaches_every_parameter_with_residual_units_and_deep_supervision(name):
    torch.manual_seed(0)
    m = create_model(name, 3, 2, features=(4, 8, 16, 16), residual=True, deep_supervision=True).train()
    outs = m(torch.randn(2, 3, 32, 32))
    sum((o**2).mean() for o in outs).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    assert any(".skip." in n for n, _ in m.named_parameters())  # the 1×1 projections of the residual units


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
    """Opset 17 export with dynamic batch and spatial axes (as ``medseg export`` does), run at another size.

    Swin UNETR is exported at a fixed size: MONAI computes its shifted-window attention mask in Python
    from the input size, so a traced graph holds the mask of the export size only.
    """
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = create_model(name, 3, 2, **SMALL[name]).eval()
    x = torch.randn(1, 3, 64, 64)
    dynamic = name != "swin_unetr"
    axes = {0: "b", 2: "h", 3: "w"}
    f = io.BytesIO()
    torch.onnx.export(m, (x,), f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": axes, "y": axes} if dynamic else None)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    x2 = torch.randn(2, 3, 96, 128) if dynamic else x
    out = sess.run(None, {"x": x2.numpy()})[0]
    with torch.no_grad():
        ref = m(x2).numpy()
    assert out.shape == ref.shape
    assert abs(out - ref).max() < 1e-4


def test_attention_gates_on_the_coarser_skips():
    """Oktay et al.'s reference: gates on every skip but the full-resolution one; a gate scales its skip by (0, 1)."""
    torch.manual_seed(0)
    m = create_model("attention_unet", 1, 1, features=(4, 8, 16, 32)).eval()
    assert [type(g).__name__ for g in m.gates] == ["NoGate", "AttentionGate", "AttentionGate"]
    gate = m.gates[1]
    x, g = torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        a = torch.sigmoid(gate.psi(torch.relu(gate.theta_x(x) + gate.phi_g(g))))
        assert a.shape == (2, 1, 8, 8) and 0 < a.min() and a.max() < 1
        up = torch.nn.functional.interpolate(a, size=(16, 16), mode="bilinear", align_corners=False)
        assert torch.allclose(gate(x, g), gate.out(x * up))


@pytest.mark.parametrize("name", ["unet", "attention_unet"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_deep_supervision_only_in_training(name, spatial_dims):
    m = create_model(name, 1, 3, spatial_dims, features=(4, 8, 16, 32), deep_supervision=True)
    size = (16,) * spatial_dims
    outs = m.train()(torch.randn(2, 1, *size))
    assert isinstance(outs, list) and [tuple(o.shape) for o in outs] == [(2, 3, *size)] * 3
    assert m.eval()(torch.randn(2, 1, *size)).shape == (2, 3, *size)


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
    with pytest.raises(MedsegError, match="encoder_depth must be one of \\[18, 34, 50\\], got 101"):
        create_model("deeplabv3plus", 1, 1, encoder_depth=101)
    with pytest.raises(MedsegError, match="unknown normalisation 'layer'; known: batch, instance, group, none"):
        create_model("unet", 1, 1, norm="layer")
    with pytest.raises(MedsegError, match="U-Net depth must be at least 2, got 1"):
        create_model("unet", 1, 1, depth=1)
    with pytest.raises(MedsegError, match="encoder must be 'tu-<timm model name>'"):
        create_model("unet", 1, 1, encoder="resnet34")
    with pytest.raises(MedsegError, match="'attention_unet' does not take a timm encoder"):
        create_model("attention_unet", 1, 1, encoder="tu-resnet34")
    with pytest.raises(MedsegError, match="unknown activation 'gelu'; choose relu or leakyrelu"):
        create_model("unet", 1, 1, act="gelu")


def test_leaky_relu_passes_a_gradient_below_zero():
    from torch import nn

    relu = create_model("unet", 1, 2, base=4, depth=2)
    leaky = create_model("unet", 1, 2, base=4, depth=2, act="leakyrelu")
    assert any(isinstance(m, nn.ReLU) for m in relu.modules())
    acts = [m for m in leaky.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert acts and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01 for m in acts)
    # the same weights: outputs differ only through the negative side of the activation
    leaky.load_state_dict(relu.state_dict())
    x = torch.randn(2, 1, 16, 16)
    assert not torch.allclose(relu(x), leaky(x))


@pytest.mark.parametrize("name", NAMES)
def test_classes_built_directly_check_dims(name):
    cls = MODELS.get(name)
    with pytest.raises(MedsegError, match=f"model '{name}' supports spatial_dims"):
        cls(1, 1, spatial_dims=1)


def test_input_not_divisible_is_a_clear_error():
    m = create_model("unet", 1, 1, features=(4, 8, 16, 32)).eval()
    with pytest.raises(ValueError) as e:
        m(torch.randn(1, 1, 64, 60))
    assert str(e.value) == "unet needs spatial sizes divisible by 8, got (64, 60) (60 is not); pad or crop the input"
    assert isinstance(e.value, MedsegError)
    with pytest.raises(ValueError, match=r"unet expects a 4-d input"):
        m(torch.randn(1, 64, 64))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_caught_before_the_forward_pass(name):
    """Every model names the problem itself (the divisor, the channel count) instead of failing deep inside."""
    m = create_model(name, 3, 2, **SMALL[name]).eval()
    div = m.required_divisor
    assert 62 % div != 0
    with pytest.raises(MedsegError) as e:
        m(torch.randn(1, 3, 64, 62))
    assert str(e.value) == f"{name} needs spatial sizes divisible by {div}, got (64, 62) (62 is not); pad or crop the input"
    with pytest.raises(MedsegError) as e:
        m(torch.randn(1, 4, 64, 64))
    assert str(e.value) == f"{name} was built for 3 input channel(s), got 4 (shape (1, 4, 64, 64))"


def test_deeplabv3plus_batch_of_one_in_training_is_a_clear_error():
    m = create_model("deeplabv3plus", 1, 1, **SMALL["deeplabv3plus"]).train()
    with pytest.raises(MedsegError, match="deeplabv3plus needs a batch of at least 2 in training, got 1"):
        m(torch.randn(1, 1, 32, 32))
    assert m.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)


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
@pytest.mark.skipif(os.environ.get("MEDSEG_SLOW") != "1", reason="dynamo tracing of every model takes ~20 s; set MEDSEG_SLOW=1")
@pytest.mark.parametrize("name", NAMES)
def test_no_graph_breaks(name):
    m = create_model(name, 3, 2, **SMALL[name]).eval()
    explained = torch._dynamo.explain(m)(torch.randn(1, 3, 64, 64))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


def test_gflops_by_hand():
    from medseg.models.table import count_params, gflops

    # features (4, 8), 1 -> 1 channel, 8×8 input; multiply-accumulates per layer:
    # enc 3×3 1->4 and 4->4 at 8×8: 64·4·9·(1+4); enc 3×3 4->8 and 8->8 at 4×4: 16·8·9·(4+8);
    # up 2×2 stride-2 8->4 from 4×4: 16·8·4·4; dec 3×3 8->4 and 4->4 at 8×8: 64·4·9·(8+4); head 64·4
    macs = 64 * 4 * 9 * 5 + 16 * 8 * 9 * 12 + 16 * 8 * 4 * 4 + 64 * 4 * 9 * 12 + 64 * 4
    m = create_model("unet", 1, 1, features=(4, 8))
    assert gflops(m, in_channels=1, size=8) * 1e9 == 2 * macs
    # convs before BatchNorm carry no bias; the transposed conv and the head do
    weights = 9 * 1 * 4 + 9 * 4 * 4 + 9 * 4 * 8 + 9 * 8 * 8 + 8 * 4 * 2 * 2 + 9 * 8 * 4 + 9 * 4 * 4 + 4 * 1
    biases = 4 + 1
    batchnorm = 2 * (4 + 4 + 8 + 8 + 4 + 4)
    assert count_params(m) == weights + biases + batchnorm


def test_model_table_row():
    from medseg.models.table import model_row

    r = model_row("unet", size=64, budget_s=0.01, features=(4, 8, 16))
    assert r["name"] == "unet" and r["dims"] == "2D/3D" and r["divisor"] == 4
    assert r["paper"].startswith("Ronneberger") and r["forward_img_s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEDSEG_SLOW") != "1", reason="torch.compile costs 30-70 s here; set MEDSEG_SLOW=1")
def test_unet_compiles():
    m = create_model("unet", 1, 2, features=(4, 8, 16)).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert (torch.compile(m, fullgraph=True)(x) - m(x)).abs().max().item() < 1e-4


# --- optional timm encoders (encoder="tu-<name>") ---------------------------------------------------
# timm is not installed here (and must not be: it pulls torchvision). The adapter is exercised with a
# stand-in module answering timm's ``features_only`` contract (feature_info widths and strides, a list of
# maps); a test against the real timm runs where it is installed.


class _FeatureInfo:
    def __init__(self, channels: list[int], reductions: list[int]):
        self._c, self._r = channels, reductions

    def channels(self) -> list[int]:
        return list(self._c)

    def reduction(self) -> list[int]:
        return list(self._r)


class _PyramidBackbone(torch.nn.Module):
    """Five 3×3 conv stages, stride 2 each until ``output_stride`` is reached (then stride 1, like dilation)."""

    def __init__(self, in_chans: int, output_stride: int = 32):
        super().__init__()
        widths, reds, r, cin = [8, 12, 16, 20, 24], [], 1, in_chans
        self.stages = torch.nn.ModuleList()
        for c in widths:
            stride = 2 if r * 2 <= output_stride else 1
            r *= stride
            self.stages.append(torch.nn.Sequential(torch.nn.Conv2d(cin, c, 3, stride, 1), torch.nn.ReLU()))
            reds.append(r)
            cin = c
        self.feature_info = _FeatureInfo(widths, reds)

    def forward(self, x):
        outs = []
        for s in self.stages:
            x = s(x)
            outs.append(x)
        return outs


@pytest.fixture
def timm_calls(monkeypatch):
    calls = []

    def create_model(name, features_only=False, in_chans=3, pretrained=False, output_stride=32):
        calls.append({"name": name, "features_only": features_only, "in_chans": in_chans, "output_stride": output_stride})
        if name != "pyramid":
            raise RuntimeError(f"Unknown model ({name})")
        return _PyramidBackbone(in_chans, output_stride)

    mod = types.ModuleType("timm")
    mod.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", mod)
    return calls


def test_unet_with_timm_encoder(timm_calls):
    torch.manual_seed(0)
    m = create_model("unet", 5, 3, encoder="tu-pyramid").train()
    assert timm_calls == [{"name": "pyramid", "features_only": True, "in_chans": 5, "output_stride": 32}]
    assert m.required_divisor == 32
    out = m(torch.randn(2, 5, 64, 96))
    assert out.shape == (2, 3, 64, 96)
    (out**2).mean().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    with pytest.raises(MedsegError, match="divisible by 32"):
        m(torch.randn(2, 5, 64, 80))
    with pytest.raises(MedsegError, match="with a timm encoder is 2D, without deep supervision"):
        create_model("unet", 1, 1, encoder="tu-pyramid", deep_supervision=True)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplabv3plus_with_timm_encoder(timm_calls, output_stride):
    m = create_model("deeplabv3plus", 1, 2, encoder="tu-pyramid", output_stride=output_stride,
                     aspp_channels=8, decoder_channels=8).eval()
    assert timm_calls[0]["output_stride"] == output_stride
    assert m.encoder.low_index == 1 and m.required_divisor == output_stride
    with torch.no_grad():
        assert m(torch.randn(1, 1, 32, 48)).shape == (1, 2, 32, 48)


def test_timm_encoder_errors(timm_calls, monkeypatch):
    with pytest.raises(MedsegError, match="timm could not build encoder 'nonet'.*Unknown model \\(nonet\\)"):
        create_model("unet", 1, 1, encoder="tu-nonet")
    monkeypatch.setitem(sys.modules, "timm", None)  # what an absent or broken timm looks like to ``import``
    with pytest.raises(MedsegError, match="encoder 'tu-resnet34' needs timm, which could not be imported"):
        create_model("deeplabv3plus", 1, 1, encoder="tu-resnet34")


def test_real_timm_encoders():
    pytest.importorskip("timm")
    with torch.no_grad():
        assert create_model("unet", 3, 2, encoder="tu-resnet18").eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
        m = create_model("deeplabv3plus", 3, 2, encoder="tu-resnet18", output_stride=8).eval()
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
