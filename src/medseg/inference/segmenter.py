"""``Segmenter``: load a trained model (bundle, run directory, ONNX file or shipped name) and segment arrays.

    seg = Segmenter.load("runs/lgg")              # best fold; folds="all" ensembles every fold
    pred = seg.predict("kaggle_3m/TCGA_CS_4941_19960909")   # .mask uint8 [z, k, h, w], .prob float16
    ens = Segmenter.load(["runs/uw_25d", "runs/uw_3d"], weights=[0.6, 0.4])  # an Ensemble

The pipeline, the same for every backend and device (``backends``): normalise -> slice batches or 3D
sliding windows (``windows``) -> softmax / sigmoid -> mean over flips and folds -> decision -> clean-up.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.bundle import PipelineSpec, build_model, bundle_from_checkpoint, load_bundle, resolve_model, split_models
from medseg.data.formats import FORMATS, get_reader, guess_format
from medseg.data.formats.base import case_path
from medseg.data.normalize import apply, stats_for
from medseg.errors import MedsegError
from medseg.inference.backends import TorchNet, activate, onnx_backend, torch_backend
from medseg.inference.onnx_graph import export_module, fixed_size_for
from medseg.inference.pipeline import Prediction, _check_compatible, model_divisor, pipeline_spec
from medseg.inference.postprocess import check_config, decide_slices, merge_config, postprocess, thresholds_for
from medseg.inference.windows import (DECIDE_SLICES, SLAB_BYTES, on_grid, resize, slab_for, sliding_windows,
                                     z_slabs)

DEFAULT_FLIPS: list[list[int]] = [[-1], [-2]]


# ----------------------------------------------------------------------------------------- segmenter
class Segmenter:
    """A loaded model (one or several folds) with its pre- and post-processing (``Ensemble``: several)."""

    def __init__(
        self,
        spec: PipelineSpec,
        nets: list[Callable[[np.ndarray], np.ndarray]],
        tta: bool | Sequence[Sequence[int]] | None = None,
        backend: str = "torch",
        batch_size: int = 8,
        models: list[Any] | None = None,
        device: str = "cpu",
    ):
        self.spec = spec
        self.nets = nets
        self.backend = backend
        self.device = device
        self.batch_size = batch_size
        self.models = models or []  # the torch modules (for export)
        self.name = spec.name
        self.classes: list[str] = spec.classes
        self.class_kind: str = spec.class_kind
        self.channels: list[str] = spec.channels
        self.flips = self._flips(tta)
        self.members: list[Segmenter] = [self]  # an Ensemble holds several
        self.weights: list[float] = [1.0]

    @classmethod
    def ensemble(cls, members: Sequence["Segmenter"], weights: Sequence[float] | None = None,
                 where: Sequence[str | Path] | None = None) -> "Segmenter":
        """The weighted mean of the probabilities of several models (e.g. a 2.5D and a 3D model).

        Each member keeps its own input mode, normalisation, TTA and folds; the members must agree on
        classes, class kind and input channels. Thresholds and post-processing are the first member's.
        """
        members = list(members)
        where = list(where) if where is not None else [m.name for m in members]
        if not members:
            raise MedsegError("an ensemble needs at least one model")
        w = [1.0] * len(members) if weights is None else [float(v) for v in weights]
        if len(w) != len(members):
            raise MedsegError(f"{len(w)} weight{'s' if len(w) != 1 else ''} for {len(members)} models: "
                              "give one weight per model")
        if any(not np.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
            raise MedsegError(f"ensemble weights must be non-negative with a positive sum, got {w}")
        ref = members[0]
        for m, loc in zip(members[1:], where[1:]):
            for key, what in (("class_kind", "class kinds"), ("classes", "classes"), ("channels", "input channels")):
                if getattr(m.spec, key) != getattr(ref.spec, key):
                    raise MedsegError(f"cannot ensemble {m.name} with {ref.name}: {what} differ "
                                      f"({getattr(m.spec, key)} vs {getattr(ref.spec, key)})", loc)
        if len(members) == 1:
            return members[0]
        total = sum(w)
        return Ensemble(members, [v / total for v in w])

    def _flips(self, tta: bool | Sequence[Sequence[int]] | None) -> list[list[int]]:
        cfg = self.spec.tta or {}
        if tta is None:
            tta = bool(cfg.get("enabled", False))
        if tta is True:
            return [list(f) for f in (cfg.get("flips") or DEFAULT_FLIPS)]
        if tta is False:
            return []
        flips = [[int(a) for a in f] for f in tta]
        nsp = 3 if self.spec.input.mode == "3d" else 2  # the network's spatial axes: -1 .. -nsp
        bad = [f for f in flips if not f or any(not -nsp <= a <= -1 for a in f)]
        if bad:
            raise MedsegError(f"TTA flip {bad[0]} is not a group of spatial axes of this {nsp}D model "
                              f"(use {', '.join(str(-i) for i in range(1, nsp + 1))})")
        return flips

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model: str | Path | Sequence[str | Path],
        folds: str | Sequence[int] = "best",
        tta: bool | Sequence[Sequence[int]] | None = None,
        backend: str = "auto",
        threads: int | None = None,
        batch_size: int = 8,
        weights: Sequence[float] | None = None,
        device: str = "cpu",
        unfinished: bool = False,
    ) -> "Segmenter":
        """Load ``model``: a shipped name, a run directory, a ``model.pt`` bundle, a training checkpoint
        (``fold_K/checkpoints/*.ckpt``, read with its fold's ``model.pt``) or an ``.onnx`` file.

        Several models (a list, or one string ``"runs/a,runs/b"``) make a weighted ensemble: the mean
        of their probabilities with ``weights`` (default equal; normalised to sum 1), each model with its
        own input mode, normalisation and ``folds``.
        ``folds``: "best" (one fold), "all" (mean of every fold's probabilities) or fold indices.
        ``tta``: None (the model's default), True (the model's flips, else flips of both image axes),
        False, or a list of axis lists such as ``[[-1], [-2], [-1, -2]]``.
        ``backend``: "auto" (onnxruntime for .onnx files, else PyTorch), "torch" or "onnx".
        ``device``: "cpu", "cuda", "cuda:N" or "auto" (a GPU when PyTorch sees one).
        ``unfinished``: use a fold whose training did not finish (its best epoch so far), with a warning.
        """
        names = split_models(model)
        if len(names) > 1 or weights is not None:
            members = [cls.load(m, folds, tta, backend, threads, batch_size, device=device, unfinished=unfinished)
                       for m in names]
            return cls.ensemble(members, weights, where=names)
        model = names[0]
        if backend not in ("auto", "torch", "onnx"):
            raise MedsegError(f"unknown backend {backend!r} (auto, torch or onnx)")
        name, files = resolve_model(model, folds, unfinished)
        if files[0].suffix == ".onnx":
            if backend == "torch":
                raise MedsegError("an .onnx file runs with the onnx backend only", files[0])
            return cls._load_onnx(files[0], tta, threads, batch_size, device)
        bundles = [bundle_from_checkpoint(f) if f.suffix == ".ckpt" else load_bundle(f) for f in files]
        _check_compatible(bundles, files)
        models = [build_model(b) for b in bundles]
        spec = pipeline_spec(bundles[0], model_divisor(models[0], bundles[0]["arch"]), name)
        if backend == "onnx":
            import tempfile

            fixed = fixed_size_for(spec)
            if fixed:
                spec.input.fixed_size = fixed
            nets = []
            with tempfile.TemporaryDirectory(prefix="medseg-onnx-") as d:  # a session keeps its graph in memory
                for i, m in enumerate(models):
                    export_module(m, spec, Path(d) / f"fold{i}.onnx")
                    nets.append(onnx_backend(Path(d) / f"fold{i}.onnx", threads, device))
            return cls(spec, nets, tta, "onnx", batch_size, models, device)
        if threads:
            import torch

            torch.set_num_threads(threads)
        return cls(spec, [torch_backend(m, device) for m in models], tta, "torch", batch_size, models, device)

    @classmethod
    def _load_onnx(cls, path: Path, tta: Any, threads: int | None, batch_size: int, device: str = "cpu") -> "Segmenter":
        side = path.with_suffix(".json")
        if not side.is_file():
            raise MedsegError(f"the ONNX model's pre/post-processing description {side.name} is missing "
                              "(write both with `medseg export`)", side)
        try:
            doc = json.loads(side.read_text())
        except ValueError as e:
            raise MedsegError(f"cannot read the ONNX sidecar JSON ({e})", side) from None
        if not isinstance(doc, dict) or doc.get("format") != "medseg.pipeline/1":
            raise MedsegError(f"not a medseg ONNX sidecar (format {doc.get('format') if isinstance(doc, dict) else None!r})",
                              side)
        spec = PipelineSpec.read(doc, side)
        want_out = len(spec.classes) + (spec.class_kind == "multiclass")
        if spec.arch.out_channels != want_out or spec.arch.in_channels != len(spec.channels):
            raise MedsegError(f"the sidecar is inconsistent: {len(spec.channels)} channels and {len(spec.classes)} "
                              f"{spec.class_kind} classes need a network of {len(spec.channels)} -> {want_out} "
                              f"channels, it says {spec.arch.in_channels} -> {spec.arch.out_channels}", side)
        net = onnx_backend(path, threads, device, channels=(spec.arch.in_channels, spec.arch.out_channels), where=side)
        return cls(spec, [net], tta, "onnx", batch_size, device=device)

    # ------------------------------------------------------------------ prediction
    @property
    def in_channels(self) -> int:
        return len(self.channels)

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    def _check_channels(self, image: np.ndarray, where: str | Path | None) -> None:
        c = image.shape[1]
        if c != self.in_channels:
            names = ", ".join(self.channels)
            raise MedsegError(
                f"model {self.name} expects {self.in_channels} channel{'s' if self.in_channels != 1 else ''} "
                f"({names}); the input has {c}",
                where,
                hint=f"give images with the model's {self.in_channels} channels in that order "
                f"(e.g. convert or stack the sequences), or use a model trained on {c}-channel data",
            )

    def predict(
        self,
        x: np.ndarray | str | Path,
        probabilities: bool = True,
        spatial_dims: int | None = None,
        postprocess_overrides: dict[str, Any] | None = None,
        where: str | Path | None = None,
        fmt: str | None = None,
        spacing: Sequence[float] | None = None,
    ) -> Prediction:
        """Segment ``x``: an array ``[z, c, h, w]`` or ``[c, h, w]``, or a path a reader can read.
        The result holds ``.mask`` and, unless ``probabilities=False`` (to save memory), ``.prob``.

        A path is read with the reader ``fmt`` (guessed if absent); a path holding several cases returns
        the first case's prediction (use ``medseg predict`` or ``predict_cases`` for all).
        ``spatial_dims`` picks 2D (per slice) or 3D (per volume) post-processing; default: 3 for 3D
        models (or an ensemble with one), else 2. ``spacing`` (z, y, x mm): a model trained on resampled
        volumes sees the array on its own grid, and the probabilities come back to the array's.
        """
        if isinstance(x, (str, Path)):
            preds = list(self.predict_cases(x, probabilities=probabilities, fmt=fmt,
                                            postprocess_overrides=postprocess_overrides))
            return preds[0][1]
        image = np.asarray(x) if not isinstance(x, np.memmap) else x
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise MedsegError(f"expected an image [z, c, h, w] or [c, h, w], got shape {image.shape}", where)
        self._check_channels(image, where)
        if image.dtype.kind == "f" and not np.isfinite(image).all():  # arrays given through the Python API
            raise MedsegError(f"{int((~np.isfinite(image)).sum())} non-finite voxels (NaN or Inf) in the image", where)
        if spatial_dims is None:
            spatial_dims = 3 if any(m.spec.input.mode == "3d" for m in self.members) else 2
        k = len(self.classes)
        z, _, h, w = image.shape
        mask = np.zeros((z, k, h, w), np.uint8)
        prob = np.zeros((z, k, h, w), np.float16) if probabilities else None
        slice_max = np.zeros((z, k), np.float32)
        pp = merge_config(self.spec.postprocess, postprocess_overrides)
        check_config(pp, self.classes)
        thr = thresholds_for(pp, k)
        for idx, p in on_grid(self._chunks, image, spacing, self.spec.input.spacing, where=None if where is None else str(where)):
            decide_slices(p, idx, thr, self.class_kind, mask, prob, slice_max)
        postprocess(mask, slice_max, pp, spatial_dims)
        return Prediction(mask=mask, prob=prob, classes=list(self.classes), class_kind=self.class_kind)

    def predict_cases(
        self,
        path: str | Path,
        probabilities: bool = True,
        fmt: str | None = None,
        postprocess_overrides: dict[str, Any] | None = None,
    ):
        """Yield ``(case_id, Prediction)`` for every case a reader finds under ``path``."""

        path = Path(path)
        fmt = fmt or guess_format(path)
        reader = get_reader(fmt, **FORMATS.get(fmt).options_for_model(len(self.channels)))
        spec = reader.survey(path, require_masks=False)
        for case in spec.cases:
            data = reader.read(spec, case)
            yield case.id, self.predict(data.image, probabilities, spec.spatial_dims, postprocess_overrides,
                                        where=case_path(case, spec),
                                        spacing=data.spacing if reader.has_spacing else None)

    # ------------------------------------------------------------------ internals
    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Mean softmax/sigmoid over folds and flips of a normalised batch ``x[b, c, *spatial]``."""
        if self.is_ensemble:
            raise MedsegError("an ensemble's members take differently shaped inputs: call probabilities() on "
                              "each of seg.members")
        kind, flips = self.class_kind, self._views_flips()
        if self._on_gpu():  # flips and folds as one batch, activations and the mean computed there
            return self.nets[0].mean_probs(self.nets, x, flips, kind)
        acc = None
        n = 0
        for net in self.nets:  # one view at a time: on a CPU the activations stay in cache
            for flip in flips:
                p = activate(net(x if flip is None else np.ascontiguousarray(np.flip(x, flip))), kind)
                if flip is not None:
                    p = np.flip(p, flip)
                acc = p.copy() if acc is None else np.add(acc, p, out=acc)
                n += 1
        return acc / n

    def _views_flips(self) -> list[Any]:  # None: no flip; a single view (``quality.views``) has one
        only = getattr(self, "_only_flip", None)
        return list(only) if only is not None else [None, *self.flips]

    def _on_gpu(self) -> bool:
        return self.device != "cpu" and all(isinstance(n, TorchNet) for n in self.nets)

    def _chunks(self, image: np.ndarray):
        """Yield ``(slice indices, probabilities[b, out, h, w] float32)`` covering the case in order: a model
        streams its own way (2D batches, 3D slabs); ``Ensemble`` overrides this."""

        stats = stats_for(image, self.spec.normalization)
        for lo, hi in self._ranges(image.shape):
            yield from self._range_prob(image, stats, lo, hi)

    def _batch(self, h: int, w: int) -> int:
        # CPU: at most batch_size slices and about as many pixels as 8 slices of 256x256, so large slices
        # (512x512 CT) keep activations in cache; a GPU takes 8x that
        scale = 1 if self.device == "cpu" else 8
        return max(1, min(self.batch_size * scale, (scale * 8 * 256 * 256) // (h * w)))

    def _ranges(self, shape: tuple[int, ...], extra_per_voxel: int = 0) -> list[tuple[int, int]]:
        """This model's natural z ranges: the whole case (2D, batched inside) or its 3D slabs' kept ranges."""
        z, c, h, w = shape
        if self.spec.input.mode != "3d":
            return [(0, z)]
        inp = self.spec.input
        roi_z, overlap = int(inp.size[0]), float(inp.overlap)
        # bytes per voxel of a slab, float32: our input, MONAI's padded copy of it, its output sum, count
        # map and the final sum / count, plus the Gaussian weights (measured peak ~ this, not c + out + 1)
        per_voxel = 4 * (2 * c + 2 * int(self.spec.arch.out_channels) + 2) + extra_per_voxel
        return [(lo, hi) for _, _, lo, hi in z_slabs(z, h * w, roi_z, overlap, SLAB_BYTES // per_voxel)]

    def _range_prob(self, image, stats, lo: int, hi: int):
        """Yield ``(idx, p[b, out, h, w])`` for slices ``lo..hi-1`` (2D batches or one 3D slab)."""
        mean, std, clip = stats
        if self.spec.input.mode == "3d":
            yield from self._slab_prob(image, mean, std, clip, lo, hi)
            return
        bs = self._batch(*image.shape[2:])
        for start in range(lo, hi, bs):
            idx = np.arange(start, min(hi, start + bs))
            yield idx, self._slices_prob(image, idx, mean, std, clip)

    def _slices_prob(self, image, idx, mean, std, clip) -> np.ndarray:
        """Per-class probabilities [b, out, h, w] of slices ``idx`` (2D or 2.5D)."""

        inp = self.spec.input
        z = image.shape[0]
        if inp.mode == "2.5d":
            ctx, stride = int(inp.context), int(inp.stride)
            offsets = np.arange(-ctx, ctx + 1) * stride
            zz = np.clip(idx[:, None] + offsets[None], 0, z - 1)  # clamped edges, as in training
            x = apply(image[zz.ravel()], mean, std, clip, channel_axis=1)
            x = x.reshape(len(idx), -1, *x.shape[2:])  # [b, (2k+1)*c, h, w], offset-major
        else:
            x = apply(image[idx], mean, std, clip, channel_axis=1)
        h, w = x.shape[-2:]
        if inp.resize and inp.size:
            size = tuple(int(s) for s in inp.size[-2:])
            if self._on_gpu() and not inp.fixed_size:  # both resizes on the GPU too
                same = (h, w) == size
                return self.nets[0].mean_probs(self.nets, x, self._views_flips(), self.class_kind,
                                               None if same else size, None if same else (h, w))
            p = self._net2d(resize(x, size)) if (h, w) != size else self._net2d(x)
            return resize(p, (h, w)) if (h, w) != size else p
        if inp.fixed_size:  # windows of the network's one size (MONAI pads smaller slices)
            return self._net2d(x)
        d = int(inp.divisor)
        ph, pw = -h % d, -w % d
        if ph or pw:  # zeros = the normalised mean; cropped off afterwards
            x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)))
        p = self.probabilities(x)
        return p[..., :h, :w]

    def _net2d(self, x: np.ndarray) -> np.ndarray:
        """Probabilities of a 2D batch; a network exported for one spatial size (``input.fixed_size``,
        e.g. Swin UNETR in ONNX) sees Gaussian-weighted sliding windows of that size instead."""
        fixed = self.spec.input.fixed_size
        if not fixed or tuple(x.shape[-2:]) == tuple(int(s) for s in fixed[-2:]):
            return self.probabilities(x)
        return sliding_windows(x, [int(s) for s in fixed[-2:]], self.probabilities, self.batch_size,
                               float(self.spec.input.overlap))

    def _slab_prob(self, image, mean, std, clip, lo: int, hi: int):
        """Gaussian-weighted sliding windows (MONAI) on the slab around slices ``lo..hi-1``
        (``slab_for``), yielding the kept slices' probabilities in small chunks: only one slab's float32
        input and probabilities exist at a time, whatever the volume's depth."""

        inp = self.spec.input
        roi = [int(s) for s in inp.size]
        overlap = float(inp.overlap)
        z, _, h, w = image.shape
        a, b = slab_for(lo, hi, z, roi[0], overlap)

        x = np.empty((image.shape[1], b - a, h, w), np.float32)  # [c, z, h, w], filled in chunks
        for s in range(a, b, DECIDE_SLICES):
            e = min(b, s + DECIDE_SLICES)
            x[:, s - a:e - a] = apply(image[s:e], mean, std, clip, channel_axis=1).transpose(1, 0, 2, 3)
        p = sliding_windows(x[None], roi, self.probabilities, 2, overlap)[0]  # [out, slab z, h, w]
        del x
        for s in range(lo, hi, DECIDE_SLICES):  # small chunks: argmax/reshape copies stay small
            e = min(hi, s + DECIDE_SLICES)
            yield np.arange(s, e), p[:, s - a:e - a].transpose(1, 0, 2, 3)


class Ensemble(Segmenter):
    """The weighted mean of several models' probabilities (e.g. a 2.5D and a 3D model), made by
    ``Segmenter.ensemble`` or ``Segmenter.load([...])``: each member keeps its own input mode,
    normalisation, TTA and folds; the decision and post-processing are the first member's."""

    def __init__(self, members: Sequence[Segmenter], weights: Sequence[float]):
        ref = members[0]
        grids = {tuple(m.spec.input.spacing or ()) for m in members}
        if len(grids) > 1:
            raise MedsegError(f"the members were trained at different voxel spacings {sorted(grids)}: an ensemble "
                              "averages probabilities on one grid")
        # the first member's description (decision and post-processing); members keep their own inputs
        self.spec = ref.spec.model_copy(update={"name": "+".join(m.name for m in members)})
        self.name = self.spec.name
        self.classes, self.class_kind, self.channels = ref.classes, ref.class_kind, ref.channels
        self.nets = [n for m in members for n in m.nets]
        self.models = [mod for m in members for mod in m.models]
        self.backend = "+".join(dict.fromkeys(m.backend for m in members))
        self.device = "+".join(dict.fromkeys(m.device for m in members))
        self.batch_size = min(m.batch_size for m in members)
        self.flips = ref.flips
        self.members = list(members)
        self.weights = list(weights)

    def _chunks(self, image: np.ndarray):
        """Walk z ranges (the slabs of the first 3D member, else slice batches), add each member's
        weighted probabilities of the range, then hand the mean on: float32 never exists for more than
        a range."""

        z, _, h, w = image.shape
        stats = [stats_for(image, m.spec.normalization) for m in self.members]
        out = int(self.spec.arch.out_channels)
        three = [m for m in self.members if m.spec.input.mode == "3d"]
        if three:  # the accumulator costs another 4 bytes per output channel and voxel
            ranges = three[0]._ranges(image.shape, extra_per_voxel=4 * out)
        else:
            bs = min(m._batch(h, w) for m in self.members)
            ranges = [(s, min(z, s + bs)) for s in range(0, z, bs)]
        for lo, hi in ranges:
            acc = np.zeros((hi - lo, out, h, w), np.float32)
            for m, st, wt in zip(self.members, stats, self.weights):
                if wt == 0:
                    continue
                for idx, p in m._range_prob(image, st, lo, hi):
                    acc[idx[0] - lo: idx[-1] + 1 - lo] += np.float32(wt) * p
            for s in range(lo, hi, DECIDE_SLICES):
                e = min(hi, s + DECIDE_SLICES)
                yield np.arange(s, e), acc[s - lo:e - lo]
