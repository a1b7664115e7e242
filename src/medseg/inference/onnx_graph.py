"""The network as an ONNX graph: which input sizes its traced graph is valid for, and writing it.

Some networks compute shapes in Python from the input size, which tracing freezes (MONAI's Swin UNETR
builds its shifted-window attention mask that way): those are exported for one spatial size
(``input.fixed_size``) and run on windows of it. Used by ``medseg export`` and by the segmenter's ONNX
backend, which exports on the fly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.errors import MedsegError

# architectures whose traced graph is valid for the export's spatial size only (see the module docstring)
FIXED_SIZE_ARCHS = {"swin_unetr"}
_DEFAULT_SIDE = 256


def fixed_size_for(spec: Any, size: list[int] | None = None, force: bool = False) -> list[int] | None:
    """The one spatial size to export the network for, or None for dynamic spatial axes.

    ``size`` (``--size``) asks for a fixed size; otherwise only ``FIXED_SIZE_ARCHS`` (or ``force``) get
    one: the training size (``input.size``), else 256 per side, rounded up to the network's divisor.
    """
    inp = spec.input
    nsp = 3 if inp.mode == "3d" else 2
    d = int(inp.divisor)
    if size is not None:
        if len(size) != nsp:
            raise MedsegError(f"--size needs {nsp} values for this {nsp}D model, got {size}")
        if inp.mode != "3d" and any(s % d for s in size):
            raise MedsegError(f"--size {size}: each side must be a multiple of {d} for this network")
        if inp.mode == "3d" and [int(s) for s in inp.size] != list(size):
            raise MedsegError(f"--size {size}: a 3D model runs on windows of its patch size {inp.size}")
        return [int(s) for s in size]
    if not force and spec.arch.name not in FIXED_SIZE_ARCHS:
        return None
    if inp.mode == "3d":
        return [int(s) for s in inp.size]  # sliding windows of the patch size: the net sees no other
    side = [int(s) for s in (inp.size or [_DEFAULT_SIDE, _DEFAULT_SIDE])[-2:]]
    return [-(-s // d) * d for s in side]


def _dummy_shape(spec: Any) -> list[int]:
    inp = spec.input
    c = spec.arch.in_channels
    if inp.fixed_size:
        return [1, c, *[int(s) for s in inp.fixed_size]]
    if inp.mode == "3d":
        return [1, c, *[int(s) for s in inp.size]]
    side = max(2 * int(inp.divisor), 64)
    size = inp.size or [side, side]
    return [1, c, *[int(s) for s in size[-2:]]]


def export_module(model: Any, spec: Any, path: Path, opset: int = 17, dynamo: bool = False) -> Path:
    """Write ``model`` (a torch module in eval mode) as ONNX: dynamic batch axis, and dynamic spatial
    axes unless ``spec.input.fixed_size`` is set."""
    import warnings

    import torch

    shape = _dummy_shape(spec)
    fixed = bool(spec.input.fixed_size)
    x = torch.randn(*shape)
    nsp = 0 if fixed else len(shape) - 2
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


def check_sizes(spec: Any) -> list[list[int]]:
    """Input shapes to compare onnxruntime with PyTorch on: batch 2 at the export size, and for a dynamic
    2D graph another size too (a multiple of the divisor)."""
    shape = _dummy_shape(spec)
    shapes = [[2, *shape[1:]]]
    if not spec.input.fixed_size and spec.input.mode != "3d":
        d = int(spec.input.divisor)
        shapes.append([2, shape[1], shape[2] + d, shape[3] + 2 * d])
    return shapes
