"""``medseg export MODEL OUTPUT.onnx``: the network as ONNX plus a JSON sidecar of its pipeline.

The ONNX graph holds only the network (input ``input[b, c, h, w]`` or ``[b, c, d, h, w]`` float32 with
dynamic batch and spatial axes -> ``logits``). Everything around it (normalisation, 2.5D context,
divisor/resize, classes, class kind, thresholds, post-processing, TTA flips) lives in ``OUTPUT.json``
(``medseg.inference.segmenter.pipeline_spec``), so ``Segmenter.load("model.onnx")`` runs the very same
pipeline with onnxruntime as with PyTorch.

The TorchScript-based exporter (``dynamo=False``) is the default: on MONAI's UNet it exports in a fraction
of a second and its graph runs as fast under onnxruntime; ``dynamo=True`` (torch.export) also works and is
tested, but takes seconds and upgrades the opset to 18.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError


def _dummy_shape(spec: dict[str, Any]) -> list[int]:
    inp = spec["input"]
    c = spec["arch"]["in_channels"]
    if inp["mode"] == "3d":
        return [1, c, *[int(s) for s in inp["size"]]]
    side = max(2 * int(inp["divisor"]), 64)
    size = inp.get("size") or [side, side]
    return [1, c, *[int(s) for s in size[-2:]]]


def export_module(model: Any, spec: dict[str, Any], path: Path, opset: int = 17, dynamo: bool = False) -> Path:
    """Write ``model`` (a torch module in eval mode) as ONNX with dynamic batch and spatial axes."""
    import warnings

    import torch

    shape = _dummy_shape(spec)
    x = torch.randn(*shape)
    nsp = len(shape) - 2
    axes = {0: "batch", **{2 + i: f"s{i}" for i in range(nsp)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim("batch"), **{2 + i: torch.export.Dim.AUTO for i in range(nsp)}}
            torch.onnx.export(model, (x,), str(path), opset_version=max(opset, 18), input_names=["input"],
                              output_names=["logits"], dynamo=True, dynamic_shapes=(dims,), verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamo=False,
                              dynamic_axes={"input": axes, "logits": axes})
    return path


def export_onnx(
    model: str | Path,
    output: str | Path,
    opset: int = 17,
    console: Any = None,
    folds: str = "best",
    dynamo: bool = False,
) -> Path:
    """Export ``model`` (run dir, bundle or shipped name) to ``output`` (.onnx) and ``output.json``.

    Checks the export with onnxruntime on a random input and reports the largest logit difference.
    """
    import torch

    from medseg.inference.segmenter import Segmenter, _onnx_net

    output = Path(output)
    if output.suffix != ".onnx":
        raise MedsegError("the output must be a .onnx file", output)
    if opset < 13:
        raise MedsegError(f"opset {opset} is too old; use 17 or newer")
    seg = Segmenter.load(model, folds=folds, backend="torch")
    if len(seg.models) != 1:
        raise MedsegError("export one fold at a time (an ensemble is several ONNX files)", str(model))
    spec = dict(seg.spec)
    export_module(seg.models[0], spec, output, opset=opset, dynamo=dynamo)
    spec["onnx"] = {"file": output.name, "input": "input", "output": "logits", "opset": opset,
                    "exporter": "dynamo" if dynamo else "torchscript"}
    sidecar = output.with_suffix(".json")
    sidecar.write_text(json.dumps(spec, indent=2, default=_jsonable) + "\n")

    # verify: onnxruntime and PyTorch logits agree on a random input of another size than the dummy's
    d = int(spec["input"]["divisor"])
    shape = list(_dummy_shape(spec))
    shape[0] = 2
    if spec["input"]["mode"] != "3d":
        shape[-1] += d
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with torch.inference_mode():
        ref = seg.models[0](torch.from_numpy(x)).numpy()
    got = _onnx_net(output, None)(x)
    diff = float(np.abs(ref - got).max() / max(1.0, np.abs(ref).max()))  # relative to the logits' range
    if console is not None:
        console.print(f"[green]exported[/] {seg.name} -> {output} (+ {sidecar.name}); "
                      f"onnxruntime vs PyTorch max logit difference {diff:.1e} (relative)")
    if diff > 1e-3:
        raise MedsegError(f"onnxruntime output differs from PyTorch by {diff:.3g} (relative)", output)
    return output


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
