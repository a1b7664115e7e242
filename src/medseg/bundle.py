"""The model bundle: everything needed to run a trained model, in one ``model.pt`` file.

Training writes it (``save_bundle``), inference and export read it (``load_bundle``); shipped models
are bundles too. It holds no Lightning or pickle of code, only tensors and plain data::

    {"format": "medseg.bundle/1",
     "arch": {"name", "in_channels", "out_channels", "spatial_dims", "kwargs"},
     "state_dict": {...},                      # fp32, or fp16 for shipped weights
     "members": [{...}, ...],                  # optional: further weights of the same network (seeds
                                               # trained side by side, ``train.members``); one model
                                               # that averages every member's probabilities
     "classes": [...], "class_kind": "multiclass" | "multilabel", "channels": [...],
     "input": {"mode": "2d" | "2.5d" | "3d", "context": k, "stride": s, "size": [h, w] | [d, h, w]},
     "normalization": {"mode": ..., ...},       # see medseg.data.normalize
     "postprocess": {"thresholds": [...], "presence": [...], "min_size": 0, "largest_cc": False,
                     "components": None},
     "tta": {"flips": [[-1], [-2]]},
     "quality": {"reference": {...}, "calibration": {...}, ...},   # optional: ``medseg calibrate``
     "meta": {...}}                             # fold, scores, config, dataset fingerprint ...

Multiclass heads have ``len(classes) + 1`` outputs (channel 0 = background, softmax); multilabel
heads have ``len(classes)`` outputs (sigmoid).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medseg.atomic import atomic_path
from medseg.errors import MedsegError
from medseg.models.member_mean import MemberMean
from medseg.rundir import RunDir

BUNDLE_FORMAT = "medseg.bundle/1"
PIPELINE_FORMAT = "medseg.pipeline/1"


class InputSpec(BaseModel):
    """How slices or volumes reach the network."""

    model_config = ConfigDict(extra="allow")
    mode: Literal["2d", "2.5d", "3d"] = "2d"
    context: int = 0  # 2.5D: slices on each side
    stride: int = 1  # 2.5D: distance between them
    size: Optional[list[int]] = None  # the training size ([h, w] or a 3D patch [d, h, w])
    resize: bool = False  # 2D: resize slices to ``size`` and the probabilities back
    divisor: int = 32  # the network's input sizes must be multiples of this
    overlap: float = 0.5  # sliding windows
    fixed_size: Optional[list[int]] = None  # an ONNX graph valid for this one spatial size
    spacing: Optional[list[float]] = None  # volumes go to this (z, y, x) mm grid first, probabilities come back


class ArchSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    in_channels: int
    out_channels: int
    spatial_dims: int = 2
    kwargs: dict[str, Any] = Field(default_factory=dict)


class PipelineSpec(BaseModel):
    """A model's pipeline apart from its weights: what ``model.pt`` says about inputs, classes,
    normalisation, decision and TTA, and what an ONNX file's sidecar JSON holds (``model_dump``)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["medseg.pipeline/1"] = PIPELINE_FORMAT
    name: str
    arch: ArchSpec
    classes: list[str]
    class_kind: Literal["multiclass", "multilabel"]
    channels: list[str]
    input: InputSpec
    normalization: dict[str, Any]
    postprocess: dict[str, Any] = Field(default_factory=dict)
    tta: dict[str, Any] = Field(default_factory=dict)
    onnx: Optional[dict[str, Any]] = None  # the exported graph (sidecars only)
    quality: Optional[dict[str, Any]] = None  # training reference and calibration (medseg.inference.quality)

    @classmethod
    def read(cls, doc: Any, where: str | Path) -> PipelineSpec:
        """Validate a sidecar's (or a bundle's) description; one line naming the file and field otherwise."""
        try:
            return cls.model_validate(doc)
        except ValidationError as e:
            err = e.errors()[0]
            raise MedsegError(f"not a valid medseg pipeline description: {'.'.join(map(str, err['loc']))}: "
                              f"{err['msg']}", where) from None
_REQUIRED = ("arch", "state_dict", "classes", "class_kind", "channels", "input", "normalization")


def save_bundle(bundle: dict[str, Any], path: str | Path, half: bool = False) -> Path:
    """Write atomically; ``half`` stores float tensors as fp16 (shipped weights)."""
    import torch

    missing = [k for k in _REQUIRED if k not in bundle]
    if missing:
        raise ValueError(f"bundle lacks {missing}")
    b = dict(bundle, format=BUNDLE_FORMAT)
    # a diverged network is not a model (NaN only: a running variance past fp16's range is inf in shipped
    # weights, and the network still computes with it)
    for sd in [b["state_dict"], *(b.get("members") or [])]:
        bad = next((k for k, t in sd.items() if t.is_floating_point() and bool(torch.isnan(t).any())), None)
        if bad is not None:
            raise MedsegError(f"the network's weights hold NaN ({bad}): training diverged; not written", path)
    if half:
        b["state_dict"] = _cast(b["state_dict"], torch.float16)
        if b.get("members"):
            b["members"] = [_cast(sd, torch.float16) for sd in b["members"]]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(b, tmp)
    return path


def set_bundle_field(path: str | Path, key: str, value: Any) -> Path:
    """Replace one plain-data field of a bundle in place (atomically), its tensors untouched."""
    import torch

    if key in ("state_dict", "members", "format"):
        raise ValueError(f"{key} is not a plain-data field")
    b = safe_load(path, "model bundle: damaged, or not a medseg model.pt")
    if not isinstance(b, dict) or b.get("format") != BUNDLE_FORMAT:
        raise MedsegError("not a medseg model bundle", path)
    b[key] = value
    with atomic_path(Path(path)) as tmp:
        torch.save(b, tmp)
    return Path(path)


def safe_load(path: str | Path, what: str) -> Any:
    """``torch.load`` with ``weights_only=True`` (a crafted pickle runs no code) and one line naming the
    file on failure: torch's page of advice about weights_only does not apply to a damaged file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e).strip()
        why = type(e).__name__
        if text.startswith("Weights only load failed"):
            why += ": it holds objects other than tensors and plain data, refused unloaded"
        elif text:
            why += f": {text.splitlines()[0].split('. ')[0][:120]}"
        raise MedsegError(f"cannot read {what} ({why})", path) from None


def load_bundle(path: str | Path) -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise MedsegError("model bundle not found", path)
    b = safe_load(path, "model bundle: damaged, or not a medseg model.pt")
    if not isinstance(b, dict) or b.get("format") != BUNDLE_FORMAT:
        raise MedsegError(f"not a medseg model bundle (format {b.get('format') if isinstance(b, dict) else None!r})", path)
    missing = [k for k in _REQUIRED if k not in b]
    if missing:
        raise MedsegError(f"model bundle has no {', '.join(missing)}", path)
    # the pipeline fields are the sidecar's: the same typed description checks both
    PipelineSpec.read({"name": path.stem, **{k: b[k] for k in ("arch", "classes", "class_kind", "channels", "input",
                                                                 "normalization")}}, path)
    b["state_dict"] = _cast(b["state_dict"], torch.float32)
    if b.get("members"):
        b["members"] = [_cast(sd, torch.float32) for sd in b["members"]]
    return b


def _cast(sd: dict[str, Any], dtype: Any) -> dict[str, Any]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def bundle_from_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of a run (``RUN/fold_K/checkpoints/{best,last}.ckpt``) as a bundle.

    The checkpoint holds the network's weights (``state_dict`` with the LightningModule's ``model.``
    prefix; EMA's average when EMA is on); the architecture, classes and pre/post-processing come from
    the same fold's ``model.pt``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise MedsegError("checkpoint not found", path)
    fold = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    ref = fold / "model.pt"
    if not ref.is_file():
        raise MedsegError(f"a Lightning checkpoint needs its fold's model.pt (architecture, classes, "
                          f"normalisation), expected {ref}", path)
    bundle = load_bundle(ref)
    ck = safe_load(path, "checkpoint: damaged, or not a Lightning checkpoint")
    sd = ck.get("state_dict") if isinstance(ck, dict) else None
    weights = {k[len("model."):]: v for k, v in (sd or {}).items() if k.startswith("model.")}
    if not weights:
        raise MedsegError("not a medseg training checkpoint (no model.* weights in its state_dict)", path)
    bundle["state_dict"] = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    bundle["meta"] = {**(bundle.get("meta") or {}), "checkpoint": str(path), "epoch": ck.get("epoch")}
    return bundle


def build_model(bundle: dict[str, Any]):
    """The bundle's network with its weights, in eval mode; with ``members``, one module averaging
    the members' probabilities (``MemberMean``)."""
    from medseg.models import create_model

    a = bundle["arch"]
    nets = []
    for sd in [bundle["state_dict"], *(bundle.get("members") or [])]:
        model = create_model(a["name"], a["in_channels"], a["out_channels"], spatial_dims=a["spatial_dims"], **a.get("kwargs", {}))
        model.load_state_dict(sd)
        nets.append(model.eval())
    if len(nets) == 1:
        return nets[0]

    return MemberMean(nets, bundle["class_kind"]).eval()


# ------------------------------------------------------------------------- finding a model
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Shipped models: name -> bundle file under src/medseg/weights/ (the weights themselves ship separately).
SHIPPED: dict[str, str] = {"lgg-unet": "lgg-unet.pt"}


def resolve_model(model: str | Path, folds: str | Sequence[int] = "best",
                  unfinished: bool = False) -> tuple[str, list[Path]]:
    """(display name, files): bundle ``model.pt`` files, or a single ``.onnx`` file. A fold whose training
    did not finish is refused, or with ``unfinished`` warned about (``RunDir.check_finished``)."""
    text = str(model)
    p = Path(model).expanduser()
    if p.is_dir():
        return p.name if p.name not in ("", ".") else text, RunDir(p).bundles(folds, unfinished)
    if p.is_file():
        if p.name == "model.pt":
            RunDir.check_finished([p], unfinished)
        if p.suffix == ".ckpt":  # RUN/fold_K/checkpoints/last.ckpt -> "fold_K/last"
            fold = p.parent.parent if p.parent.name == "checkpoints" else p.parent
            return f"{fold.name}/{p.stem}", [p]
        return p.stem if p.suffix == ".onnx" else (p.parent.name if p.name == "model.pt" else p.stem), [p]
    if text in SHIPPED:
        w = WEIGHTS_DIR / SHIPPED[text]
        if not w.is_file():
            raise MedsegError(f"shipped model {text!r} is not installed (its weights are missing)", w)
        return text, [w]
    if text.endswith((".pt", ".onnx", ".pth", ".ckpt")) or "/" in text:
        raise MedsegError("model file or folder not found", p)
    raise MedsegError(
        f"unknown model {text!r}: not a run directory, model file or .onnx file, and not a shipped model "
        f"(shipped: {', '.join(sorted(SHIPPED))})"
    )


def split_models(model: str | Path | Sequence[str | Path]) -> list[str | Path]:
    """``"runs/a,runs/b"`` or ``["runs/a", "runs/b"]`` -> the models of an ensemble (a path that exists
    with a comma in its name stays whole)."""
    if isinstance(model, (list, tuple)):
        if not model:
            raise MedsegError("no model given")
        return list(model)
    text = str(model)
    if "," in text and not Path(text).expanduser().exists():
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise MedsegError(f"empty model name in {text!r} (models are separated by commas)")
        return parts
    return [model]
