"""``medseg export MODEL OUTPUT.onnx``: the network as ONNX plus a JSON sidecar of its pipeline.

The ONNX graph holds only the network (input ``input[b, c, h, w]`` or ``[b, c, d, h, w]`` float32 ->
``logits``), with dynamic batch and spatial axes where the traced graph is valid at every size.
Everything around it (normalisation, 2.5D context, divisor/resize, classes, class kind, thresholds,
post-processing, TTA flips) lives in ``OUTPUT.json`` (``medseg.inference.pipeline.pipeline_spec``), so
``Segmenter.load("model.onnx")`` runs the very same pipeline with onnxruntime as with PyTorch.

Some networks compute shapes in Python from the input size, which tracing freezes: MONAI's Swin UNETR
builds its shifted-window attention mask that way, so a dynamic-axes export gives wrong logits (or
reshape errors) at any size but the export's. Such networks are exported for one spatial size
(``input.fixed_size`` in the sidecar; dynamic batch only) and the pipeline runs them on Gaussian-weighted
sliding windows of that size (MONAI pads smaller slices). Every export is checked against PyTorch at
the export size and, for dynamic graphs, at another size; a dynamic graph that fails the second check
is re-exported for a fixed size.

The TorchScript-based exporter (``dynamo=False``) is the default: on MONAI's UNet it exports in a fraction
of a second and its graph runs as fast under onnxruntime; ``dynamo=True`` (torch.export) also works for
convolutional models and is tested, but takes seconds and upgrades the opset to 18 (it does not fix Swin
UNETR: torch.export refuses its size-dependent mask with dynamic shapes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.backends import onnx_backend
from medseg.inference.onnx_graph import check_sizes, export_module, fixed_size_for
from medseg.inference.postprocess import thresholds_for
from medseg.inference.quantize import mask_agreement, pipeline_inputs, quantize_int8
from medseg.inference.segmenter import Segmenter

_TOLERANCE = 1e-3  # largest logit difference, relative to the logits' range


def parse_size(text: str) -> list[int]:
    """``"256,256"`` -> ``[256, 256]`` (``medseg export --size``)."""
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (2, 3) or any(v < 1 for v in vals):
        raise MedsegError(f"bad --size {text!r}: expected H,W (or D,H,W for 3D models), e.g. 256,256")
    return vals


def logit_difference(module: Any, onnx_path: Path, shape: list[int]) -> float:
    """Largest |onnxruntime - PyTorch| logit difference on a random input, relative to the logits' range
    (inf when onnxruntime cannot run the input at all, e.g. a graph frozen at another size)."""
    import torch

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with torch.inference_mode():
        ref = module(torch.from_numpy(x)).numpy()
    try:
        got = onnx_backend(onnx_path)(x)
    except MedsegError:
        raise
    except Exception:  # onnxruntime's shape errors: the graph does not take this size
        return float("inf")
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(ref - got).max() / max(1.0, np.abs(ref).max()))


def _newest_opset(dynamo: bool) -> int:
    try:
        from torch.onnx import _constants as c

        return int(c.ONNX_MAX_OPSET if dynamo else c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):  # a private module: the newest opset the exporter has long written
        return 20


def export_onnx(
    model: str | Path,
    output: str | Path,
    opset: int = 17,
    console: Any = None,
    folds: str = "best",
    dynamo: bool = False,
    size: list[int] | None = None,
    int8: str | Path | None = None,
    calibration_slices: int = 64,
    min_agreement: float = 0.999,
    overwrite: bool = False,
    unfinished: bool = False,
) -> Path:
    """Export ``model`` (run dir, bundle or shipped name) to ``output`` (.onnx) and ``output.json``.

    ``size`` exports for one spatial size (else see ``fixed_size_for``). Checks the export with
    onnxruntime against PyTorch (``check_sizes``) and reports the largest logit difference.
    ``int8`` (a prepared dataset) then quantizes the network to int8, calibrated on
    ``calibration_slices`` of its slices and checked on as many others (:mod:`medseg.inference.quantize`):
    the masks must agree with PyTorch's on ``min_agreement`` of the pixels, else nothing is written.
    """

    import os

    final = Path(output)
    if final.suffix != ".onnx":
        raise MedsegError("the output must be a .onnx file", final)
    if opset < 13:
        raise MedsegError(f"opset {opset} is too old; use 17 or newer")
    newest = _newest_opset(dynamo)
    if opset > newest:
        raise MedsegError(f"opset {opset} is newer than this PyTorch's ONNX exporter writes (at most {newest})")
    for f in (final, final.with_suffix(".json")):
        if f.exists() and not overwrite:
            raise MedsegError("already exists; pass --overwrite to replace it", f)
        if f.is_dir():
            raise MedsegError("is a folder, not a file", f)
    seg = Segmenter.load(model, folds=folds, backend="torch", unfinished=unfinished)
    # written under temporary names beside the target and renamed at the end: a failed or interrupted
    # export leaves the previous files as they were
    output = final.with_name(f".{final.stem}.tmp-{os.getpid()}.onnx")
    try:
        return _export(seg, model, final, output, opset, console, size, int8, calibration_slices, min_agreement, dynamo)
    finally:
        output.unlink(missing_ok=True)
        output.with_suffix(".json").unlink(missing_ok=True)


def _export(seg: Any, model: Any, final: Path, output: Path, opset: int, console: Any, size: list[int] | None,
            int8: str | Path | None, calibration_slices: int, min_agreement: float, dynamo: bool) -> Path:
    import os

    if len(seg.models) != 1:
        raise MedsegError("export one model and one fold at a time (an ensemble is several ONNX files)", str(model))
    module = seg.models[0]
    spec = seg.spec.model_copy(deep=True)
    spec.input.fixed_size = None
    fixed = fixed_size_for(spec, size)
    if fixed:
        spec.input.fixed_size = fixed
    export_module(module, spec, output, opset=opset, dynamo=dynamo)
    diffs = {tuple(s): logit_difference(module, output, s) for s in check_sizes(spec)}
    first = next(iter(diffs))
    note = ""
    if not fixed and diffs[first] <= _TOLERANCE and max(diffs.values()) > _TOLERANCE:
        # valid at the export size only: a size-dependent graph; export it for one size instead
        bad = next(s for s, v in diffs.items() if v > _TOLERANCE)
        fixed = spec.input.fixed_size = fixed_size_for(spec, force=True)
        export_module(module, spec, output, opset=opset, dynamo=dynamo)
        diffs = {tuple(s): logit_difference(module, output, s) for s in check_sizes(spec)}
        note = (f"; its graph is valid for one input size only (differs at {list(bad[2:])}): exported for "
                f"{fixed}, the pipeline runs windows of that size")
    elif fixed:
        note = f"; exported for input size {fixed} (the pipeline runs windows of that size)"
    diff = max(diffs.values())
    spec.onnx = {"file": final.name, "input": "input", "output": "logits", "opset": opset,
                    "exporter": "dynamo" if dynamo else "torchscript", "fixed_size": fixed}
    if diff > _TOLERANCE:
        where = ", ".join(f"{list(s[2:])}: {v:.3g}" for s, v in diffs.items())
        raise MedsegError(f"onnxruntime output differs from PyTorch (relative logit difference at {where}); "
                          "nothing written", final)
    if int8 is not None:
        spec.onnx["int8"] = _quantize(seg, output, Path(int8), calibration_slices, min_agreement)
        note += (f"; int8 masks agree with PyTorch's on {100 * spec.onnx['int8']['mask_agreement']:.3f}% of "
                 f"the pixels of {spec.onnx['int8']['checked_slices']} held-out slices")
    tmp_sidecar = output.with_suffix(".json")
    tmp_sidecar.write_text(json.dumps(spec.model_dump(mode="json"), indent=2, default=_jsonable) + "\n")
    sidecar = final.with_suffix(".json")
    os.replace(output, final)
    os.replace(tmp_sidecar, sidecar)
    if console is not None:
        console.print(f"[green]exported[/] {seg.name} -> {final} (+ {sidecar.name}); "
                      f"onnxruntime vs PyTorch max logit difference {diff:.1e} (relative){note}")
    return final


def _quantize(seg: Any, output: Path, prepared: Path, slices: int, min_agreement: float) -> dict[str, Any]:
    """Replace the float ``output`` by its int8 version; returns the sidecar's ``onnx.int8`` record."""
    import os

    if slices < 1:
        raise MedsegError(f"calibration slices must be at least 1, got {slices}")
    inputs = pipeline_inputs(seg, prepared, 2 * slices)
    calib, check, n = [], [], 0
    for x, y in inputs:  # cases come in a seeded random order: the first ones calibrate, the rest check
        (calib if n < slices else check).append((x, y))
        n += len(x)
    held_out = bool(check)
    check = check or calib
    tmp = output.with_name(output.stem + f".int8-tmp-{os.getpid()}.onnx")
    try:
        quantize_int8(output, tmp, [x for x, _ in calib], input_name="input")
        q = onnx_backend(tmp)
        agree = mask_agreement([y for _, y in check], [q(x) for x, _ in check], seg.class_kind,
                               thresholds_for(seg.spec.postprocess, len(seg.classes)))
        if agree < min_agreement:
            raise MedsegError(f"int8 masks agree with PyTorch's on only {100 * agree:.3f}% of the pixels (needed "
                              f"{100 * min_agreement:.1f}%); nothing written: export without --int8", output)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return {"format": "QDQ, per-channel int8 weights, uint8 activations (min-max)", "calibration": str(prepared),
            "calibration_slices": sum(len(x) for x, _ in calib), "checked_slices": sum(len(x) for x, _ in check),
            "held_out": held_out, "mask_agreement": agree}


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
