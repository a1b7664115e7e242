"""Building blocks shared by the architectures: dimension-generic conv/norm/act, SE, ASPP, input checks.

Everything here works for ``spatial_dims`` 2 and 3 and exports to ONNX (no data-dependent control flow).
"""
from __future__ import annotations

import torch
from torch import nn

from medseg.errors import MedsegError

NORMS = ("batch", "instance", "group", "none")


class InputSizeError(MedsegError, ValueError):
    """An input whose spatial size the network cannot take (not divisible by its stride, wrong rank)."""


def conv(dims: int, cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, bias: bool = True,
         groups: int = 1) -> nn.Module:
    cls = nn.Conv2d if dims == 2 else nn.Conv3d
    return cls(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=bias, groups=groups)


def conv_transpose(dims: int, cin: int, cout: int, factor: int = 2) -> nn.Module:
    cls = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
    return cls(cin, cout, factor, stride=factor)


def norm(kind: str, dims: int, ch: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(ch)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(ch, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, ch) if ch % min(8, ch) == 0 else 1, ch)
    if kind == "none":
        return nn.Identity()
    raise MedsegError(f"unknown normalisation {kind!r}; known: {', '.join(NORMS)}")


def max_pool(dims: int, k: int = 2) -> nn.Module:
    return (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(k)


def check_dims(name: str, spatial_dims: int, supported: tuple[int, ...]) -> None:
    """The same check as ``create_model``, for classes constructed directly."""
    if spatial_dims not in supported:
        raise MedsegError(
            f"model {name!r} supports spatial_dims {' or '.join(map(str, supported))}, not {spatial_dims}"
        )


def check_input(x: torch.Tensor, spatial_dims: int, divisor: int, name: str, in_channels: int | None = None) -> None:
    """Cheap Python-int check of the input shape: a clear error instead of a mismatch deep inside.

    Skipped while tracing/exporting (shapes may be symbolic there); under torch.compile the shapes are
    static ints, so the comparison only adds a guard, not a graph break.
    """
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        return
    if x.dim() != spatial_dims + 2:
        raise InputSizeError(
            f"{name} expects a {spatial_dims + 2}-d input [batch, channels, {'d, h, w' if spatial_dims == 3 else 'h, w'}], "
            f"got shape {tuple(x.shape)}"
        )
    if in_channels is not None and x.shape[1] != in_channels:
        raise InputSizeError(f"{name} was built for {in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    for s in x.shape[2:]:
        if s % divisor != 0:
            raise InputSizeError(
                f"{name} needs spatial sizes divisible by {divisor}, got {tuple(x.shape[2:])} "
                f"({s} is not); pad or crop the input"
            )


def activation(kind: str) -> nn.Module:
    """``relu`` or ``leakyrelu`` (slope 0.01, nnU-Net's: a unit pushed below zero for every input still
    passes a gradient, so it can come back)."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    raise MedsegError(f"unknown activation {kind!r}; choose relu or leakyrelu")


class ConvNormAct(nn.Sequential):
    def __init__(self, dims: int, cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1,
                 norm_kind: str = "batch", act: bool = True, act_kind: str = "relu"):
        layers = [conv(dims, cin, cout, k, stride, dilation, bias=norm_kind == "none"), norm(norm_kind, dims, cout)]
        if act:
            layers.append(activation(act_kind))
        super().__init__(*layers)


class DoubleConv(nn.Module):
    """Two 3×3 conv-norm-ReLU (Ronneberger's unit); ``residual`` adds a (1×1-projected) identity path."""

    def __init__(self, dims: int, cin: int, cout: int, norm_kind: str = "batch", residual: bool = False,
                 act_kind: str = "relu"):
        super().__init__()
        self.c1 = ConvNormAct(dims, cin, cout, norm_kind=norm_kind, act_kind=act_kind)
        self.c2 = ConvNormAct(dims, cout, cout, norm_kind=norm_kind, act=not residual, act_kind=act_kind)
        self.residual = residual
        if residual:
            self.skip = nn.Identity() if cin == cout else ConvNormAct(dims, cin, cout, k=1, norm_kind=norm_kind, act=False)
            self.act = activation(act_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(self.c1(x))
        if self.residual:
            y = self.act(y + self.skip(x))
        return y


class SqueezeExcite(nn.Module):
    """Hu et al. 2018: channel re-weighting from globally pooled features (reduction r)."""

    def __init__(self, dims: int, ch: int, r: int = 8):
        super().__init__()
        hidden = max(ch // r, 4)
        self.dims = dims
        self.fc = nn.Sequential(conv(dims, ch, hidden, 1), nn.ReLU(inplace=True), conv(dims, hidden, ch, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=tuple(range(2, 2 + self.dims)), keepdim=True)
        return x * self.fc(s)
