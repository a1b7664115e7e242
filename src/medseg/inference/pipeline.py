"""A model's pipeline, described apart from any backend: what a bundle says about its input, classes,
normalisation, decision and TTA (``pipeline_spec``; the ONNX sidecar is this description), and the
checks that several bundles can run as one model."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.bundle import PipelineSpec, bundle_from_checkpoint, load_bundle, resolve_model, split_models
from medseg.errors import MedsegError
from medseg.inference.postprocess import merge_config
from medseg.models import model_info


@dataclass
class Prediction:
    """A case's segmentation: ``mask[z, k, h, w]`` uint8 0/1 and optional ``prob[z, k, h, w]`` float16."""

    mask: np.ndarray
    prob: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    class_kind: str = "multiclass"


def model_channels(model: Any, folds: str | Sequence[int] = "best") -> int | None:
    """How many image channels ``model`` (or an ensemble's first member) takes, from its bundle or ONNX
    sidecar without building the network; None when it cannot be told (loading it will say why)."""
    try:
        import warnings

        with warnings.catch_warnings():  # a peek: loading the model warns, once
            warnings.simplefilter("ignore")
            _, files = resolve_model(split_models(model)[0], folds, unfinished=True)
        f = files[0]
        if f.suffix == ".onnx":
            return len(json.loads(f.with_suffix(".json").read_text())["channels"])

        b = bundle_from_checkpoint(f) if f.suffix == ".ckpt" else load_bundle(f)
        return len(b["channels"])
    except (MedsegError, OSError, ValueError, KeyError, TypeError):
        return None


def pipeline_spec(bundle: dict[str, Any], divisor: int, name: str) -> PipelineSpec:
    """The backend-independent description of a bundle's pre- and post-processing (the ONNX sidecar)."""
    inp = dict(bundle["input"])
    inp["divisor"] = int(inp.get("divisor") or divisor)
    return PipelineSpec.read({"name": name, "arch": bundle["arch"], "classes": list(bundle["classes"]),
                              "class_kind": bundle["class_kind"], "channels": list(bundle["channels"]),
                              "input": inp, "normalization": bundle["normalization"],
                              "postprocess": merge_config(bundle.get("postprocess"), None),
                              "tta": dict(bundle.get("tta") or {}), "quality": bundle.get("quality")}, name)


def model_divisor(model: Any, arch: dict[str, Any]) -> int:
    """The input-size divisor the network needs (``required_divisor`` per the models contract)."""
    d = getattr(model, "required_divisor", None)
    if d is None:
        try:
            d = model_info(arch["name"], spatial_dims=arch.get("spatial_dims", 2), **arch.get("kwargs", {}))[
                "required_divisor"]
        except Exception:  # an older models module: fall back to a safe power of two
            d = None
    return int(d or 32)


def _check_compatible(bundles: list[dict[str, Any]], files: list[Path]) -> None:
    """Folds of an ensemble must agree on what goes in and comes out."""
    ref = bundles[0]
    for b, f in zip(bundles[1:], files[1:]):
        for key in ("classes", "class_kind", "channels", "input"):
            if b[key] != ref[key]:
                raise MedsegError(f"fold differs from {files[0]} in {key!r}: cannot ensemble", f)
