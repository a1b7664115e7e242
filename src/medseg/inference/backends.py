"""Inference backends: a network as a function ``logits = net(x)`` on float32 numpy batches
``x[b, c, *spatial]``, run by PyTorch or onnxruntime on a device.

    net = torch_backend(model, device="cpu")     # or "cuda", "cuda:1", "auto"
    net = onnx_backend(Path("model.onnx"), device="cpu")

Everything around the network (normalisation, windows, TTA, ensembling, decisions) is the segmenter's
and identical for every backend, so backends only have to agree on logits.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError

Net = Callable[[np.ndarray], np.ndarray]


def cpu_cores() -> int:
    """The cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_device(device: str = "cpu") -> str:
    """``auto`` -> ``cuda`` when PyTorch sees a GPU, else ``cpu``; ``cuda[:N]`` checked to exist."""
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        raise MedsegError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise MedsegError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here (use --device cpu)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise MedsegError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def torch_backend(model: Any, device: str = "cpu") -> Net:
    """``model`` (eval mode) as a numpy-in, numpy-out function on ``device``."""
    import torch

    device = resolve_device(device)
    # a copy, so the module kept for export stays in the default layout (MemberMean answers for its members)
    # channels_last where a model measured faster with it on CPU, and always on CUDA (2D only)
    cl = (bool(getattr(model, "channels_last", False)) or device != "cpu") and getattr(model, "spatial_dims", 2) == 2
    if cl or device != "cpu":
        import copy

        model = copy.deepcopy(model).to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)

    # bf16 autocast on GPUs that have it: the speed of mixed precision, logits returned as float32
    bf16 = device != "cpu" and torch.cuda.is_bf16_supported()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            t = torch.from_numpy(x).to(device, non_blocking=True)
            if cl:
                t = t.contiguous(memory_format=torch.channels_last)
            y = model(t)
            if isinstance(y, (list, tuple)):  # deep supervision: the full-resolution head
                y = y[0]
            return y.float().contiguous().cpu().numpy()

    return run


def onnx_backend(path: Path, threads: int | None = None, device: str = "cpu") -> Net:
    """An ONNX file run by onnxruntime: the CPU provider, or CUDA's when ``device`` asks for a GPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or cpu_cores()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[Any] = ["CPUExecutionProvider"]
    if device != "cpu":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MedsegError(f"device {device!r}: this onnxruntime has no CUDA execution provider "
                              "(install onnxruntime-gpu, or use --device cpu)")
        index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:
        raise MedsegError(f"cannot load ONNX model ({type(e).__name__}: {e})", path) from None
    in_name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {in_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


def activate(logits: np.ndarray, class_kind: str) -> np.ndarray:
    """Softmax over classes (multiclass) or sigmoid per class (multilabel)."""
    if class_kind == "multiclass":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


__all__ = ["Net", "torch_backend", "onnx_backend", "activate", "resolve_device", "cpu_cores"]
