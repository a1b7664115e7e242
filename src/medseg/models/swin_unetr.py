"""Swin UNETR (Hatamizadeh et al. 2022, BrainLes @ MICCAI 2021): MONAI's implementation, 2D or 3D.

A Swin Transformer encoder (shifted-window self-attention, patch size 2, four stages with patch
merging) feeding a convolutional U-Net-style decoder through residual skip blocks: the attention-based
model to compare with the convolutional ones on the same data. Inputs must be divisible by 32
(patch 2 × four 2× merges). The wrapper only validates the input and fixes the 2D/3D signature.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.models import MODELS
from medseg.models.blocks import InputSizeError, check_dims, check_input


def _size_checked_by_wrapper(spatial_shape: Sequence[int]) -> None:
    """Replaces MONAI's numpy-based size check (a torch.compile graph break); ``check_input`` does it."""


@MODELS.register("swin_unetr")
class SwinUNETR(nn.Module):
    name = "swin_unetr"
    paper = "Hatamizadeh et al. 2022, Swin UNETR (BrainLes, MICCAI 2021)"
    dims = (2, 3)
    channels_last = True  # measured 2.03 vs 1.84 train img/s (benchmarks/models.py)

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2, feature_size: int = 24,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, norm_name: str = "instance", use_v2: bool = False, dropout_path_rate: float = 0.0):
        super().__init__()
        from monai.networks.nets import SwinUNETR as _Swin

        check_dims(self.name, spatial_dims, self.dims)
        if feature_size % 12 != 0:
            raise MedsegError(f"swin_unetr feature_size must be a multiple of 12, got {feature_size}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.required_divisor = 32
        self.net = _Swin(in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims,
                         feature_size=feature_size, depths=tuple(depths), num_heads=tuple(num_heads),
                         window_size=window_size, norm_name=norm_name, use_v2=use_v2,
                         dropout_path_rate=dropout_path_rate)
        self.net._check_input_size = _size_checked_by_wrapper  # a module-level function, so the model still pickles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.spatial_dims, self.required_divisor, self.name, self.in_channels)
        if self.training and not torch.jit.is_tracing() and min(x.shape[2:]) < 64:
            # the deepest stage is 1/32 of the input; instance norm needs more than one element there
            raise InputSizeError(f"swin_unetr needs spatial sizes of at least 64 in training, got {tuple(x.shape[2:])}")
        return self.net(x)
