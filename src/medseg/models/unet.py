"""U-Net (Ronneberger, Fischer & Brox 2015), 2D and 3D, the default medseg model.

Faithful to the paper's shape: per level two 3×3 convolutions, 2× max-pooling down, 2× transposed
convolution up, skip connections concatenated, a 1×1 classifier. Configurable depth, base width,
normalisation (batch / instance / group / none), optional residual units (Kerfoot/Zhang style) and
optional deep supervision (auxiliary 1×1 heads on the coarser decoder levels, upsampled to the input
size; returned only in training mode, main output first).

Default widths were chosen for CPU cost (measured with ``benchmarks/models.py`` on the 2-core project
machine, batch 8, 256×256, MONAI's UNet 32…512 with 2 residual units as the peer in the same run):
widths 8/24/64/128/256 (5 levels), BatchNorm, ReLU, no residual units, 1.9 M parameters.
Full-resolution convolutions dominate CPU cost, so the full-resolution stage is narrow (8) and the
capacity sits in the coarse levels where pixels are few. Measured train images/s vs the peer (noisy:
the machine was shared): 8/24/64/128/256 1.28× and 1.98×; plain 16…256 0.89×; 12…384 (6 levels,
4.4 M) 0.77–1.41×. ``base``/``depth`` give the classic doubling widths instead.

``encoder="tu-<name>"`` (2D, needs timm) swaps the encoder for a timm ``features_only`` backbone with a
segmentation_models_pytorch-style decoder (nearest 2× up, concatenated skip, two conv-norm-ReLU; widths
256, 128, 64, 32, 16 from the deepest), see :mod:`medseg.models.timm_encoder`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models import MODELS
from medseg.errors import MedsegError
from medseg.models.blocks import DoubleConv, check_dims, check_input, conv, conv_transpose, max_pool
from medseg.models.timm_encoder import TimmEncoder, timm_name

DEFAULT_FEATURES = (8, 24, 64, 128, 256)


def _features(features: Sequence[int] | None, base: int | None, depth: int | None) -> tuple[int, ...]:
    if features is None and base is None and depth is None:
        features = DEFAULT_FEATURES
    if features is None:
        base, depth = base or 16, depth or 5
        if depth < 2:
            raise MedsegError(f"U-Net depth must be at least 2, got {depth}")
        features = tuple(base * 2**i for i in range(depth))
    features = tuple(int(f) for f in features)
    if len(features) < 2 or min(features) < 1:
        raise MedsegError(f"U-Net features must be at least two positive widths, got {features}")
    return features


@MODELS.register("unet")
class UNet(nn.Module):
    """``features`` (widths per level, full resolution first) overrides ``base``/``depth``; ``act``: relu
    (Ronneberger's) or leakyrelu (nnU-Net's)."""

    name = "unet"
    paper = "Ronneberger et al. 2015, U-Net (MICCAI)"
    dims = (2, 3)
    channels_last = True
    accepts_encoder = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        features: Sequence[int] | None = None,
        base: int | None = None,
        depth: int | None = None,
        norm: str = "batch",
        residual: bool = False,
        deep_supervision: bool = False,
        ds_levels: int = 2,
        encoder: str | None = None,
        encoder_pretrained: bool = False,
        act: str = "relu",
    ):
        super().__init__()
        check_dims(self.name, spatial_dims, self.dims)
        self.in_channels = in_channels
        self.encoder: TimmEncoder | None = None
        tname = timm_name(encoder, self.name)
        if tname is not None:
            if not self.accepts_encoder:
                raise MedsegError(f"model {self.name!r} does not take a timm encoder; use 'unet' or 'deeplabv3plus'")
            if spatial_dims != 2 or deep_supervision or any(v is not None for v in (features, base, depth)):
                raise MedsegError(
                    f"model {self.name!r} with a timm encoder is 2D, without deep supervision, and takes no "
                    "features/base/depth (those describe the built-in encoder)"
                )
            self._build_timm(tname, in_channels, out_channels, norm, residual, encoder_pretrained)
            return
        feats = _features(features, base, depth)
        self.spatial_dims = d = spatial_dims
        self.features = feats
        self.required_divisor = 2 ** (len(feats) - 1)
        self.deep_supervision = deep_supervision
        self.enc = nn.ModuleList()
        cin = in_channels
        for f in feats:
            self.enc.append(DoubleConv(d, cin, f, norm, residual, act))
            cin = f
        self.pool = max_pool(d)
        self.ups = nn.ModuleList(conv_transpose(d, feats[i + 1], feats[i]) for i in range(len(feats) - 1))
        self.gates = self._make_gates(feats, norm)
        self.dec = nn.ModuleList(DoubleConv(d, 2 * feats[i], feats[i], norm, residual, act) for i in range(len(feats) - 1))
        self.head = conv(d, feats[0], out_channels, 1)
        n_aux = min(ds_levels, len(feats) - 2) if deep_supervision else 0
        self.aux_heads = nn.ModuleList(conv(d, feats[i], out_channels, 1) for i in range(1, 1 + n_aux))

    def _make_gates(self, feats: tuple[int, ...], norm: str) -> nn.ModuleList | None:
        return None  # AttentionUNet puts additive attention gates on the skips

    def _build_timm(self, tname: str, cin: int, cout: int, norm: str, residual: bool, pretrained: bool) -> None:
        self.spatial_dims = 2
        self.deep_supervision = False
        self.encoder = TimmEncoder(tname, cin, pretrained=pretrained)
        ch, red = self.encoder.channels, self.encoder.reductions
        if red[0] & (red[0] - 1):
            raise MedsegError(f"timm encoder {tname!r}: finest feature stride {red[0]} is not a power of two")
        self.required_divisor = max(red)
        self.features = tuple(ch)
        # one block per skip (deepest first), then 2× steps without a skip down to full resolution
        n_skip, n_extra = len(ch) - 1, red[0].bit_length() - 1
        widths = [max(16, 256 >> k) for k in range(n_skip + n_extra)]
        self.dec = nn.ModuleList()
        c = ch[-1]
        for k, w in enumerate(widths):
            self.dec.append(DoubleConv(2, c + (ch[n_skip - 1 - k] if k < n_skip else 0), w, norm, residual))
            c = w
        self.head = conv(2, c, cout, 1)
        self.aux_heads = nn.ModuleList()

    def _forward_timm(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y, n_skip = feats[-1], len(feats) - 1
        for k, block in enumerate(self.dec):
            if k < n_skip:
                skip = feats[n_skip - 1 - k]
                y = block(torch.cat([F.interpolate(y, size=skip.shape[2:], mode="nearest"), skip], 1))
            else:
                y = block(F.interpolate(y, scale_factor=2.0, mode="nearest"))
        return self.head(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(x, self.spatial_dims, self.required_divisor, self.name, self.in_channels)
        if self.encoder is not None:
            return self._forward_timm(x)
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        y = skips.pop()
        decoded: list[torch.Tensor] = []
        for i in range(len(self.dec) - 1, -1, -1):
            skip = skips[i]
            if self.gates is not None:
                skip = self.gates[i](skip, y)
            y = self.dec[i](torch.cat([self.ups[i](y), skip], 1))
            decoded.append(y)
        out = self.head(y)
        if self.deep_supervision and self.training:
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            aux = [
                F.interpolate(h(decoded[-1 - lvl]), scale_factor=2**lvl, mode=mode, align_corners=False)
                for lvl, h in enumerate(self.aux_heads, start=1)
            ]
            return [out, *aux]
        return out

