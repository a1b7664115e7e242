"""Optional timm encoders (``encoder="tu-<timm name>"``, as in segmentation_models_pytorch) for U-Net and DeepLabV3+.

timm is not a dependency: it is imported only when such an encoder is asked for, and any failure to
import it (missing, or broken by an incompatible torchvision) becomes a clear :class:`MedsegError`.
The encoder is timm's ``features_only`` network; its ``feature_info`` gives each feature's width and
stride, which the decoders are built from.
"""
from __future__ import annotations

import torch
from torch import nn

from medseg.errors import MedsegError

PREFIX = "tu-"


def timm_name(encoder: str | None, model: str) -> str | None:
    """``"tu-resnet34"`` -> ``"resnet34"``; ``None`` -> ``None`` (the built-in encoder)."""
    if encoder is None:
        return None
    if not isinstance(encoder, str) or not encoder.startswith(PREFIX) or len(encoder) == len(PREFIX):
        raise MedsegError(f"model {model!r}: encoder must be 'tu-<timm model name>' (e.g. 'tu-resnet34'), got {encoder!r}")
    return encoder[len(PREFIX):]


class TimmEncoder(nn.Module):
    """timm ``features_only`` backbone; forward returns its feature maps, finest first."""

    def __init__(self, name: str, in_channels: int, output_stride: int | None = None, pretrained: bool = False):
        super().__init__()
        try:
            import timm
        except Exception as e:  # not only ImportError: a timm/torchvision mismatch fails in other ways
            raise MedsegError(
                f"encoder 'tu-{name}' needs timm, which could not be imported ({type(e).__name__}: {e}); "
                "install timm or leave encoder unset for the built-in encoder"
            ) from None
        kwargs: dict = {"features_only": True, "in_chans": in_channels, "pretrained": pretrained}
        if output_stride is not None:
            kwargs["output_stride"] = output_stride
        try:
            self.body = timm.create_model(name, **kwargs)
        except Exception as e:
            raise MedsegError(f"timm could not build encoder {name!r} with {kwargs}: {e}") from None
        self.channels = [int(c) for c in self.body.feature_info.channels()]
        self.reductions = [int(r) for r in self.body.feature_info.reduction()]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))
