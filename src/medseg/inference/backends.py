"""Inference backends: a network as a function ``logits = net(x)`` on float32 numpy batches
``x[b, c, *spatial]``, run by PyTorch or onnxruntime on a device.

    net = torch_backend(model, device="cpu")     # or "cuda", "cuda:1", "auto"
    net = onnx_backend(Path("model.onnx"), device="cpu")

Everything around the network (normalisation, windows, TTA, ensembling, decisions) is the segmenter's
and identical for every backend, so backends only have to agree on logits.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError, warn
from medseg.machine import cpu_cores, resolve_device

Net = Callable[[np.ndarray], np.ndarray]


class TorchNet:
    """A PyTorch network on a device: ``net(x)`` numpy logits; ``net.mean_probs(...)`` the whole 2D step
    (resize in, flips, activation, mean, resize out) on the device, so a GPU's host only normalises."""

    def __init__(self, model: Any, device: str):
        import torch

        self.device = device
        # a copy, so the module kept for export stays in the default layout (MemberMean answers for its members)
        # channels_last where a model measured faster with it on CPU, and always on CUDA (2D only)
        self.cl = (bool(getattr(model, "channels_last", False)) or device != "cpu") and getattr(model, "spatial_dims", 2) == 2
        if self.cl or device != "cpu":
            import copy

            model = copy.deepcopy(model).to(device)
            if self.cl:
                model = model.to(memory_format=torch.channels_last)
        self.model = model
        # bf16 autocast on GPUs that have it: the speed of mixed precision, logits returned as float32
        self.bf16 = device != "cpu" and torch.cuda.is_bf16_supported()
        self.limit: int | None = None  # the batch that fits, once the GPU ran out of memory

    def forward(self, t):
        """Logits (float32) of a tensor batch already on the device."""
        import torch

        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            if self.cl:
                t = t.contiguous(memory_format=torch.channels_last)
            y = self.model(t)
            if isinstance(y, (list, tuple)):  # deep supervision: the full-resolution head
                y = y[0]
            return y.float()

    def _split(self, fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        """``fn(x)``, in smaller batches when the GPU runs out of memory (the batch that fitted is kept)."""
        import torch

        n = self.limit
        if n is not None and len(x) > n:
            return np.concatenate([self._split(fn, x[i : i + n]) for i in range(0, len(x), n)])
        try:
            return fn(x)
        except torch.cuda.OutOfMemoryError:
            if len(x) == 1:
                raise MedsegError(f"out of GPU memory on {self.device} with a batch of one "
                                  f"{'x'.join(map(str, x.shape[2:]))} input: use --device cpu") from None
            self.limit = max(1, len(x) // 2)
            torch.cuda.empty_cache()
            warn(f"out of GPU memory on {self.device} at a batch of {len(x)}: predicting {self.limit} at a time")
            return self._split(fn, x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        return self._split(lambda b: self.forward(torch.from_numpy(b).to(self.device, non_blocking=True)).cpu().numpy(), x)

    def mean_probs(self, nets: list["TorchNet"], x: np.ndarray, flips: list[Any], class_kind: str,
                   in_size: tuple[int, int] | None = None, out_size: tuple[int, int] | None = None) -> np.ndarray:
        """Mean probabilities over ``nets`` (this one's device) and ``flips`` (None = no flip) of a normalised
        2D batch, each view resized to ``in_size`` first and the mean to ``out_size`` after (bilinear)."""

        def step(b: np.ndarray) -> np.ndarray:
            import torch
            from torch.nn import functional as F

            with torch.inference_mode():
                t = torch.from_numpy(b).to(self.device, non_blocking=True)
                if in_size is not None:
                    t = F.interpolate(t, size=in_size, mode="bilinear", align_corners=False)
                views = torch.cat([t if f is None else t.flip(f) for f in flips])
                acc = None
                for net in nets:
                    y = net.forward(views)
                    p = torch.softmax(y, dim=1) if class_kind == "multiclass" else torch.sigmoid(y)
                    for f, q in zip(flips, p.chunk(len(flips))):
                        q = q if f is None else q.flip(f)
                        acc = q.clone() if acc is None else acc.add_(q)
                acc /= len(nets) * len(flips)
                if out_size is not None:
                    acc = F.interpolate(acc, size=out_size, mode="bilinear", align_corners=False)
                return acc.cpu().numpy()

        return self._split(step, x)


def torch_backend(model: Any, device: str = "cpu") -> Net:
    """``model`` (eval mode) as a numpy-in, numpy-out function on ``device``."""
    return TorchNet(model, resolve_device(device))


def onnx_backend(path: Path, threads: int | None = None, device: str = "cpu",
                 channels: tuple[int, int] | None = None, where: Path | None = None) -> Net:
    """An ONNX file run by onnxruntime: the CPU provider, or CUDA's when ``device`` asks for a GPU.
    ``channels`` (in, out), from the sidecar ``where``, are checked against the graph's one input and
    its output before anything runs."""
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
    if channels is not None:
        check_graph(sess, channels, path, where or path)
    in_name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {in_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


def check_graph(sess: Any, channels: tuple[int, int], path: Path, sidecar: Path) -> None:
    """The graph takes one input ``[b, in, *spatial]`` and gives ``[b, out, *spatial]`` as the sidecar says
    (a sidecar of another model would decode its outputs as the wrong classes)."""
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1:
        raise MedsegError(f"the ONNX graph takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); a medseg "
                          "model takes one image batch", path)
    for what, arg, want in (("input", inputs[0], channels[0]), ("output", outputs[0], channels[1])):
        shape = list(arg.shape or [])
        if len(shape) not in (4, 5):
            raise MedsegError(f"the ONNX graph's {what} has shape {shape}; expected [batch, channels, *spatial]", path)
        if isinstance(shape[1], int) and shape[1] != want:
            raise MedsegError(f"the sidecar says the {what} has {want} channels, the ONNX graph {shape[1]}: the two "
                              "files belong to different models", sidecar)


def activate(logits: np.ndarray, class_kind: str) -> np.ndarray:
    """Softmax over classes (multiclass) or sigmoid per class (multilabel)."""
    if class_kind == "multiclass":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


__all__ = ["Net", "TorchNet", "torch_backend", "onnx_backend", "activate"]
