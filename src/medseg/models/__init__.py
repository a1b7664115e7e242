"""The model zoo: ``create_model(name, in_channels, out_channels, spatial_dims=2, **kwargs)``.

Every registered class answers the same questions as class attributes (timm style): ``paper``,
``dims`` (supported spatial dims), ``channels_last`` (the memory format measured faster on this CPU
with ``benchmarks/models.py``) and, per instance, ``required_divisor``. Architectures live in one
module each and are imported on the first registry lookup, so ``import medseg.models`` imports no torch.
"""
from __future__ import annotations

from typing import Any

from medseg.errors import MedsegError
from medseg.registry import Registry

MODELS: Registry[Any] = Registry(
    "model",
    [
        "medseg.models.unet",
        "medseg.models.attention_unet",
        "medseg.models.resunetpp",
        "medseg.models.deeplabv3plus",
        "medseg.models.swin_unetr",
    ],
)

DEFAULT_MODEL = "unet"


def create_model(name: str, in_channels: int, out_channels: int, spatial_dims: int = 2, **kwargs: Any):
    """A freshly initialised network; forward returns logits ``[b, out_channels, *spatial]``."""
    cls = MODELS.get(name)
    for what, v in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MedsegError(f"model {name!r}: {what} must be a positive integer, got {v!r}")
    if spatial_dims not in cls.dims:
        raise MedsegError(
            f"model {name!r} supports spatial_dims {' or '.join(map(str, cls.dims))}, not {spatial_dims!r}"
        )
    try:
        return cls(in_channels, out_channels, spatial_dims=spatial_dims, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # a misspelt or wrongly typed model.kwargs entry
        text = " ".join(str(e).split()).replace(f"{cls.__name__}.__init__() ", "") or type(e).__name__
        raise MedsegError(f"model {name!r} with kwargs {kwargs}: {text[:300]}") from None


def model_info(name: str, spatial_dims: int = 2, **kwargs: Any) -> dict[str, Any]:
    """Paper, supported dims, required input divisor (for these kwargs) and channels_last preference."""
    cls = MODELS.get(name)
    model = create_model(name, 1, 1, spatial_dims=spatial_dims, **kwargs)
    return {
        "name": name,
        "paper": cls.paper,
        "dims": tuple(cls.dims),
        "required_divisor": int(model.required_divisor),
        "channels_last": bool(cls.channels_last),
    }


__all__ = ["MODELS", "DEFAULT_MODEL", "create_model", "model_info"]
