"""Static int8 quantization of an exported ONNX network (``medseg export ... --int8 PREPARED``).

onnxruntime's QDQ format: per-channel signed int8 weights, unsigned int8 activations with min-max
ranges. The ranges are calibrated on the very inputs the pipeline feeds the network (normalised,
resized, 2.5D-stacked slices of a prepared dataset, captured from ``Segmenter``), and the quantized
network is checked against the float one on other slices of the same dataset: the share of pixels whose
mask (argmax, or per-class threshold) is unchanged. Below ``min_agreement`` nothing is written.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.prepared import PreparedDataset
from medseg.errors import MedsegError


def pipeline_inputs(seg: Any, prepared: str | Path, slices: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``slices`` (network input, PyTorch logits) batches that ``seg`` builds and computes from the
    cases of a prepared dataset, cases taken in a seeded random order, tumour-bearing and empty slices
    alike; TTA off, so every batch is a distinct slice."""

    root = Path(prepared)
    if not root.exists():
        raise MedsegError("calibration data: prepared dataset not found", root)
    ds = PreparedDataset.open(root)
    if len(ds.channels) != len(seg.channels):
        raise MedsegError(f"calibration data has {len(ds.channels)} channels ({', '.join(ds.channels)}), the model "
                          f"{len(seg.channels)} ({', '.join(seg.channels)})", root)
    captured: list[tuple[np.ndarray, np.ndarray]] = []
    net, flips = seg.nets[0], seg.flips

    def record(x: np.ndarray) -> np.ndarray:
        y = net(x)
        captured.append((np.array(x, np.float32, copy=True), y))
        return y

    seg.nets[0], seg.flips = record, []
    try:
        ids = [c.id for c in ds.cases]
        random.Random(seed).shuffle(ids)
        for cid in ids:
            if sum(len(x) for x, _ in captured) >= slices:
                break
            seg.predict(np.asarray(ds.image(cid)))
    finally:
        seg.nets[0], seg.flips = net, flips
    out, n = [], 0
    for x, y in captured:
        if n >= slices:
            break
        out.append((x[: slices - n], y[: slices - n]))
        n += len(out[-1][0])
    return out


def quantize_int8(src: Path, dst: Path, calibration: list[np.ndarray], input_name: str = "input") -> Path:
    """Write the int8 (QDQ) version of the float ONNX model ``src`` to ``dst``."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {input_name: x}

    with tempfile.TemporaryDirectory(prefix="medseg-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # ONNX shape inference + graph clean-up, as onnxruntime advises; its symbolic shape inference
        # gives up on graphs with dynamic spatial axes (and leaves a temp file in the working folder)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return dst


def mask_agreement(ref: list[np.ndarray], got: list[np.ndarray], class_kind: str, thresholds: list[float] | None) -> float:
    """Share of pixels whose mask is the same from two lists of logits, decided as ``Segmenter`` decides
    (multiclass: argmax, or for one class its tuned threshold; multilabel: each class's threshold)."""
    same = total = 0
    for a, b in zip(ref, got, strict=True):
        if class_kind == "multiclass" and a.shape[1] == 2:
            # softmax p1 > t  <=>  x1 - x0 > logit(t)
            t = float((thresholds or [0.5])[0])
            cut = np.log(t / (1 - t))
            eq = (a[:, 1] - a[:, 0] > cut) == (b[:, 1] - b[:, 0] > cut)
        elif class_kind == "multiclass":
            eq = a.argmax(1) == b.argmax(1)
        else:
            th = np.asarray(thresholds or [0.5] * a.shape[1], np.float64)
            cut = np.log(th / (1 - th)).reshape(1, -1, *([1] * (a.ndim - 2)))  # sigmoid(x) > t  <=>  x > logit(t)
            eq = (a > cut) == (b > cut)
        same += int(eq.sum())
        total += eq.size
    return same / max(total, 1)
