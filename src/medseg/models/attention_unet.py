"""Attention U-Net (Oktay et al. 2018, MIDL): a U-Net whose skip connections pass additive attention gates.

The gate follows the paper (Fig. 2): the skip features x are projected by a stride-2 convolution
(W_x) to the resolution of the gating signal g (the coarser decoder feature, 1×1 W_g), summed,
ReLU, a 1×1 ψ and a sigmoid give one coefficient per voxel, which is resampled back to x's size and
multiplies x; a 1×1 convolution with normalisation (W) follows. As in the authors' reference code
(ozan-oktay/Attention-Gated-Networks, ``unet_grid_attention``) the full-resolution skip is not gated:
the gates sit on the coarser skips, where the gating signal carries context. Everything else (widths, depth,
normalisation, residual units, deep supervision, which the paper also uses) is shared with
:class:`medseg.models.unet.UNet`. Written here rather than wrapping MONAI's ``AttentionUnet``
because MONAI's gates run at the skip resolution after upsampling g and its encoder uses strided
convolutions instead of the paper's pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models import MODELS
from medseg.models.blocks import conv, norm
from medseg.models.unet import UNet


class AttentionGate(nn.Module):
    def __init__(self, dims: int, c_skip: int, c_gate: int, c_inter: int, norm_kind: str = "batch"):
        super().__init__()
        self.dims = dims
        self.theta_x = (nn.Conv2d if dims == 2 else nn.Conv3d)(c_skip, c_inter, 2, stride=2, bias=False)
        self.phi_g = conv(dims, c_gate, c_inter, k=1)
        self.psi = conv(dims, c_inter, 1, k=1)
        self.out = nn.Sequential(conv(dims, c_skip, c_skip, k=1, bias=norm_kind == "none"), norm(norm_kind, dims, c_skip))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.psi(F.relu(self.theta_x(x) + self.phi_g(g))))
        a = F.interpolate(a, size=x.shape[2:], mode="bilinear" if self.dims == 2 else "trilinear", align_corners=False)
        return self.out(x * a)


class NoGate(nn.Module):
    """The full-resolution skip passes unchanged (keeps ``gates[i]`` aligned with the skip levels)."""

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x


@MODELS.register("attention_unet")
class AttentionUNet(UNet):
    """U-Net with an attention gate on every skip connection; same keyword arguments as ``unet``."""

    name = "attention_unet"
    paper = "Oktay et al. 2018, Attention U-Net (MIDL)"
    dims = (2, 3)
    channels_last = True
    accepts_encoder = False  # the gates are sized for the built-in encoder's widths

    def _make_gates(self, feats: tuple[int, ...], norm_kind: str) -> nn.ModuleList:
        return nn.ModuleList(
            [NoGate()] + [AttentionGate(self.spatial_dims, feats[i], feats[i + 1], max(feats[i] // 2, 1), norm_kind)
                          for i in range(1, len(feats) - 1)]
        )

