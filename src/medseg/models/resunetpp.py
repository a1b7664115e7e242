"""ResUNet++ (Jha et al. 2019, IEEE ISM): residual units, squeeze-and-excitation, ASPP and attention.

Follows the authors' reference implementation (DebeshJha/ResUNetPlusPlus): a residual stem, three
stride-2 pre-activation residual units each followed by squeeze-and-excitation (r = 8), an ASPP bridge
(dilations 6/12/18 plus a plain 3×3, summed, then 1×1), and a decoder whose every level applies the
paper's attention block (encoder feature → BN-ReLU-conv-maxpool, decoder feature → BN-ReLU-conv, sum,
BN-ReLU-conv, multiply with the decoder feature) before nearest upsampling, concatenation and a
residual unit; a final ASPP and 1×1 classifier. Widths 16/32/64/128/256 as in the paper. Neither
MONAI nor segmentation_models_pytorch ships it. Works in 2D and 3D; inputs divisible by 8.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.models import MODELS
from medseg.models.blocks import SqueezeExcite, check_dims, check_input, conv, max_pool, norm


def _bn_relu_conv(d: int, cin: int, cout: int, nk: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(norm(nk, d, cin), nn.ReLU(inplace=True), conv(d, cin, cout, 3, stride))


class ResidualUnit(nn.Module):
    """Pre-activation residual unit with a 1×1 projected shortcut, then squeeze-and-excitation."""

    def __init__(self, d: int, cin: int, cout: int, stride: int, nk: str, stem: bool = False):
        super().__init__()
        if stem:  # the stem has no pre-activation on the raw input
            self.body = nn.Sequential(conv(d, cin, cout, 3, stride), norm(nk, d, cout), nn.ReLU(inplace=True), conv(d, cout, cout, 3))
        else:
            self.body = nn.Sequential(_bn_relu_conv(d, cin, cout, nk, stride), _bn_relu_conv(d, cout, cout, nk))
        self.short = nn.Sequential(conv(d, cin, cout, 1, stride), norm(nk, d, cout))
        self.se = SqueezeExcite(d, cout, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.body(x) + self.short(x))


class SumASPP(nn.Module):
    """The paper's ASPP: parallel 3×3 convolutions (dilation 6, 12, 18 and 1) with BN, summed, then 1×1."""

    def __init__(self, d: int, cin: int, cout: int, nk: str, rates: Sequence[int] = (6, 12, 18, 1)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(conv(d, cin, cout, 3, dilation=r), norm(nk, d, cout)) for r in rates)
        self.proj = conv(d, cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for b in self.branches[1:]:
            y = y + b(x)
        return self.proj(y)


class ResUNetPPAttention(nn.Module):
    """Attention of the encoder feature g (2× finer) on the decoder feature x, at x's resolution."""

    def __init__(self, d: int, c_enc: int, c_dec: int, nk: str):
        super().__init__()
        self.g = nn.Sequential(_bn_relu_conv(d, c_enc, c_dec, nk), max_pool(d))
        self.x = _bn_relu_conv(d, c_dec, c_dec, nk)
        self.gc = _bn_relu_conv(d, c_dec, c_dec, nk)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.gc(self.g(g) + self.x(x)) * x


@MODELS.register("resunetpp")
class ResUNetPP(nn.Module):
    name = "resunetpp"
    paper = "Jha et al. 2019, ResUNet++ (IEEE ISM)"
    dims = (2, 3)
    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2,
                 features: Sequence[int] = (16, 32, 64, 128, 256), norm: str = "batch"):
        super().__init__()
        check_dims(self.name, spatial_dims, self.dims)
        f = tuple(int(v) for v in features)
        if len(f) != 5 or min(f) < 1:
            raise MedsegError(f"resunetpp features must be 5 positive widths (stem, 3 encoder levels, bridge), got {features}")
        self.spatial_dims = d = spatial_dims
        self.in_channels = in_channels
        self.required_divisor = 8
        self.enc = nn.ModuleList([
            ResidualUnit(d, in_channels, f[0], 1, norm, stem=True),
            ResidualUnit(d, f[0], f[1], 2, norm),
            ResidualUnit(d, f[1], f[2], 2, norm),
            ResidualUnit(d, f[2], f[3], 2, norm),
        ])
        self.bridge = SumASPP(d, f[3], f[4], norm)
        # decoder level i: attention(enc[i], x) -> up -> cat enc[i] -> residual unit to width f[i+1]
        dec_in = [f[4], f[3], f[2]]
        self.attn = nn.ModuleList(ResUNetPPAttention(d, f[2 - i], dec_in[i], norm) for i in range(3))
        self.dec = nn.ModuleList(ResidualUnit(d, dec_in[i] + f[2 - i], f[3 - i], 1, norm) for i in range(3))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.out_aspp = SumASPP(d, f[1], f[0], norm)
        self.head = conv(d, f[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.spatial_dims, self.required_divisor, self.name, self.in_channels)
        skips = []
        for unit in self.enc:
            x = unit(x)
            skips.append(x)
        y = self.bridge(skips.pop())
        for i in range(3):
            enc = skips[2 - i]
            y = self.dec[i](torch.cat([self.up(self.attn[i](enc, y)), enc], 1))
        return self.head(self.out_aspp(y))
