"""Which contours need a human look: for every case and structure, signals of doubt and a predicted Dice.

    pred, rows = predict_quality(seg, image)     # rows: one dict per structure
    rows[0]["predicted_dice"], rows[0]["review"]

The signals (``structure_signals``), each from the prediction alone:
- ``disagreement``: 1 - the mean Dice between each single view (every member network of every fold,
  under every TTA flip, decided on its own) and the final mask;
- ``entropy``: the mean binary entropy (bits) of the averaged probability inside the final mask;
- ``volume_z``: the mask's log-volume against the training cases' (z-score; ``-inf`` never: an empty
  mask is log 0 = far below a structure that is always present);
- ``components``: connected components of the decision before post-processing (3D over the case's
  slices): a largest-component rule leaves one in the final mask, however many the network drew;
- ``intensity_z``: the mean |z| of the case's body intensity percentiles (5, 50, 95 per channel)
  against the training cases'.

A bundle's ``quality`` block holds the training reference (``reference``) and the mapping from
signals to Dice (``Calibration``), fitted on out-of-fold predictions by ``medseg calibrate``. Without
one, ``predicted_dice`` is the views' agreement (1 - disagreement) and ``calibrated`` is false.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import MedsegError

QUALITY_FORMAT = "medseg.quality/1"
SIGNALS = ("disagreement", "entropy", "volume_z", "components", "intensity_z")
PERCENTILES = (5.0, 50.0, 95.0)
REVIEW_BELOW = 0.7  # a contour under this Dice is a failure: the review flag's default
_SAMPLE = 400_000


# ------------------------------------------------------------------------------------------ views
def views(seg: Any) -> list[tuple[float, Any]]:
    """``(weight, view)``: every single network of ``seg`` (each member of a members bundle, each fold, each
    model of an ensemble) under every TTA flip, as a ``Segmenter`` of its own; the weighted mean of the
    views' probabilities is ``seg``'s."""
    import copy

    from medseg.inference.backends import torch_backend
    from medseg.models.member_mean import MemberMean

    out: list[tuple[float, Any]] = []
    for m, wm in zip(seg.members, seg.weights):
        nets = getattr(m, "_view_nets", None)
        if nets is None:  # built once per loaded model: a backend copies its network
            nets = []
            for i, net in enumerate(m.nets):
                mod = m.models[i] if m.backend == "torch" and i < len(m.models) else None
                if isinstance(mod, MemberMean):  # a members bundle: its networks are views too
                    nets += [torch_backend(n, m.device) for n in mod.nets]
                else:
                    nets.append(net)
            m._view_nets = nets
        flips = [None, *m.flips]
        for net in nets:
            for f in flips:
                v = copy.copy(m)
                v.nets, v._only_flip = [net], (f,)
                v.members, v.weights = [v], [1.0]
                out.append((wm / (len(nets) * len(flips)), v))
    return out


def ensure_views(seg: Any) -> bool:
    """A model of one network without TTA has one view and nothing to disagree with: give it its flip TTA
    (the model's flips, else width and height). True when it did; ``predict --quality`` and ``calibrate``
    both apply it, so a calibration sees the views the prediction will have."""
    if len(views(seg)) > 1:
        return False
    for m in seg.members:
        m.flips = m._flips(True)
    seg.flips = seg.members[0].flips
    return len(views(seg)) > 1


def predict_views(seg: Any, image: np.ndarray, spatial_dims: int, overrides: dict[str, Any] | None = None,
                  where: Any = None, spacing: Sequence[float] | None = None):
    """``(Prediction, views[v, z, k, h, w] uint8, prob[z, k, h, w] float16)``: the model's prediction,
    made as ``Segmenter.predict`` makes it (the weighted mean of every view's probabilities, decided and
    cleaned up), with each view's own raw decision and the class probabilities kept."""
    from medseg.data.normalize import stats_for
    from medseg.inference.pipeline import Prediction
    from medseg.inference.postprocess import check_config, decide_slices, merge_config, postprocess, thresholds_for
    from medseg.inference.windows import DECIDE_SLICES, on_grid

    image = np.asarray(image) if not isinstance(image, np.memmap) else image
    if image.ndim != 4:
        raise MedsegError(f"expected an image [z, c, h, w], got shape {image.shape}", where)
    seg._check_channels(image, where)
    vs = views(seg)
    k = len(seg.classes)
    z, _, h, w = image.shape
    out = int(seg.spec.arch.out_channels)
    pp = merge_config(seg.spec.postprocess, overrides)
    check_config(pp, seg.classes)
    thr = thresholds_for(pp, k)
    acc = np.zeros((z, out, h, w), np.float32)
    vmasks = np.zeros((len(vs), z, k, h, w), np.uint8)
    stats: dict[tuple[int, str], Any] = {}

    def chunks(view: Any):
        def run(im: np.ndarray):  # the views of one model share its normalisation: computed once per grid
            key = (id(im), repr(view.spec.normalization))
            if key not in stats:
                stats[key] = stats_for(im, view.spec.normalization)
            for lo, hi in view._ranges(im.shape):
                yield from view._range_prob(im, stats[key], lo, hi)
        return run

    for i, (wt, view) in enumerate(vs):
        for idx, p in on_grid(chunks(view), image, spacing, view.spec.input.spacing,
                              where=None if where is None else str(where)):
            acc[idx] += np.float32(wt) * p
            decide_view(p, idx, thr, seg.class_kind, vmasks[i])
    mask = np.zeros((z, k, h, w), np.uint8)
    prob = np.zeros((z, k, h, w), np.float16)
    slice_max = np.zeros((z, k), np.float32)
    for s in range(0, z, DECIDE_SLICES):
        e = min(z, s + DECIDE_SLICES)
        decide_slices(acc[s:e], np.arange(s, e), thr, seg.class_kind, mask, prob, slice_max)
    del acc
    volume = spatial_dims == 3 or pp.get("components") == "volume" or z > 1
    # components as the network drew them: after a largest-component rule the final mask has one
    raw = [count_components(mask[:, j], volume) for j in range(k)]
    postprocess(mask, slice_max, pp, spatial_dims)
    pred = Prediction(mask=mask, prob=prob, classes=list(seg.classes), class_kind=seg.class_kind)
    pred.raw_components = raw  # type: ignore[attr-defined]
    return pred, vmasks, prob


def decide_view(p: np.ndarray, idx: np.ndarray, thr: Sequence[float], class_kind: str, out: np.ndarray) -> None:
    """A view's raw decision of slices ``idx`` (as ``decide_slices`` decides, without its per-slice maxima)."""
    k = out.shape[1]
    if class_kind == "multiclass" and k == 1:
        np.greater(p[:, 1], thr[0], out=out[idx[0]: idx[-1] + 1, 0], casting="unsafe")
    elif class_kind == "multiclass":
        am = p.argmax(axis=1)
        for j in range(k):
            out[idx, j] = am == j + 1
    else:
        for j in range(k):
            out[idx, j] = p[:, j] > thr[j]


# ------------------------------------------------------------------------------------------ signals
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; 1 when both are empty (they agree)."""
    a = a.astype(bool, copy=False)
    b = b.astype(bool, copy=False)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a class-versus-rest probability (0 when certain, 1 at 0.5)."""
    p = np.clip(np.asarray(p, np.float32), 1e-6, 1 - 1e-6)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def count_components(mask: np.ndarray, volume: bool) -> int:
    """Connected components of ``mask[z, h, w]``: in 3D (face connectivity) or summed over slices."""
    from scipy import ndimage

    if not mask.any():
        return 0
    if volume:
        return int(ndimage.label(mask)[1])
    return int(sum(ndimage.label(m)[1] for m in mask if m.any()))


def voxel_volume(spacing: Sequence[float] | None) -> tuple[float, str]:
    """(volume of one voxel, unit): millilitres when the layout stores a voxel size, else voxels."""
    if spacing is None:
        return 1.0, "voxels"
    return float(np.prod([float(s) for s in spacing])) / 1000.0, "ml"


def intensity_percentiles(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[c, 3]``: each channel's 5th, 50th and 95th percentile over the body (voxels above the channel's
    minimum, as the body z-score takes them), from a fixed subsample."""
    z, c = image.shape[:2]
    per = int(np.prod(image.shape[2:]))
    rng = np.random.default_rng(seed)
    zs = np.arange(z) if z * per <= _SAMPLE else np.sort(rng.choice(z, size=max(1, _SAMPLE // per), replace=False))
    flat = np.asarray(image[zs], np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
    out = np.zeros((c, len(PERCENTILES)))
    for j, r in enumerate(flat):
        body = r[r > r.min()]
        out[j] = np.percentile(body if body.size else r, PERCENTILES)
    return out


def structure_signals(mask: np.ndarray, views: np.ndarray, prob: np.ndarray, *, components: int,
                      voxel: float, reference: dict[str, Any] | None, cls: str, intensity_z: float | None) -> dict[str, Any]:
    """The signals of one structure: ``mask[z, h, w]`` the final mask, ``views[v, z, h, w]`` each view's
    raw decision, ``prob[z, h, w]`` the averaged probability, ``components`` those of the decision before
    post-processing (see the module's docstring)."""
    m = mask.astype(bool)
    n = int(m.sum())
    agree = float(np.mean([dice(v, m) for v in views])) if len(views) else 1.0
    ent = float(binary_entropy(prob[m]).mean()) if n else 0.0
    vol = n * voxel
    vz = None
    ref = (reference or {}).get("classes", {}).get(cls)
    if ref is not None:
        vz = (float(np.log1p(vol)) - ref["log_mean"]) / max(ref["log_std"], 1e-3)
    return {"disagreement": 1.0 - agree, "entropy": ent, "volume": vol, "volume_z": vz,
            "components": int(components), "intensity_z": intensity_z}


def case_intensity_z(image: np.ndarray, reference: dict[str, Any] | None) -> float | None:
    """The mean |z| of the case's body percentiles against the training cases' (None without a reference)."""
    it = (reference or {}).get("intensity")
    if not it:
        return None
    q = intensity_percentiles(image)
    mean, std = np.asarray(it["mean"]), np.maximum(np.asarray(it["std"]), 1e-6)
    if mean.shape != q.shape:
        return None
    return float(np.abs((q - mean) / std).mean())


def build_reference(masks_and_images: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float] | None]],
                    classes: Sequence[str]) -> dict[str, Any]:
    """The training distribution the signals are measured against: per class the mean and spread of
    log(1 + volume) over the cases that hold it and the share of cases that do, and per channel the
    mean and spread of the cases' body percentiles. Items: ``(image[z, c, h, w], mask[z, k, h, w], spacing)``
    (spacing None: volumes in voxels)."""
    if not masks_and_images:
        raise MedsegError("no training cases to describe")
    vols: list[list[float]] = [[] for _ in classes]
    qs, unit = [], "voxels"
    for image, mask, spacing in masks_and_images:
        voxel, unit = voxel_volume(spacing)
        for j in range(len(classes)):
            vols[j].append(float(np.count_nonzero(mask[:, j])) * voxel)
        qs.append(intensity_percentiles(image))
    out: dict[str, Any] = {"unit": unit, "cases": len(masks_and_images), "classes": {}}
    for c, v in zip(classes, vols):
        v = np.asarray(v)
        present = v[v > 0]
        logs = np.log1p(present) if present.size else np.zeros(1)
        out["classes"][c] = {"log_mean": float(logs.mean()), "log_std": float(max(logs.std(), 0.1)),
                             "present": float((v > 0).mean())}
    q = np.stack(qs)
    out["intensity"] = {"percentiles": list(PERCENTILES), "mean": q.mean(0).tolist(),
                        "std": np.maximum(q.std(0), 1e-3 * (np.abs(q.mean(0)) + 1)).tolist()}
    return out


# ------------------------------------------------------------------------------------------ calibration
def features(row: dict[str, Any]) -> np.ndarray:
    """The regression's inputs from a row of signals: missing signals count as typical (0)."""
    vz = row.get("volume_z")
    iz = row.get("intensity_z")
    return np.array([
        float(row["disagreement"]),
        float(row["entropy"]),
        float(np.clip(vz, -6.0, 6.0)) if vz is not None else 0.0,  # too small and too large differ in risk
        min(abs(float(vz)), 6.0) if vz is not None else 0.0,
        1.0 if row.get("volume", 0) == 0 else 0.0,
        float(np.log1p(max(int(row["components"]) - 1, 0))),
        min(float(iz), 6.0) if iz is not None else 0.0,
    ])


FEATURES = ("disagreement", "entropy", "volume_z", "|volume_z|", "empty", "log(extra components)", "intensity_z")


@dataclass
class Calibration:
    """Predicted Dice = clip(intercept + coef . standardised features, 0, 1): ridge regression fitted on
    out-of-fold (signals, real Dice) pairs. Small data (tens of cases) needs the shrinkage."""

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    alpha: float = 1.0
    cases: int = 0

    @classmethod
    def fit(cls, rows: Sequence[dict[str, Any]], dice: Sequence[float], alpha: float = 1.0) -> "Calibration":
        if len(rows) < 3:
            raise MedsegError(f"{len(rows)} out-of-fold cases: too few to calibrate a quality estimate (3 at least)")
        x = np.stack([features(r) for r in rows])
        y = np.asarray(dice, np.float64)
        mean = x.mean(0)
        scale = x.std(0)
        scale[scale < 1e-9] = 1.0
        xs = (x - mean) / scale
        a = xs.T @ xs + alpha * np.eye(xs.shape[1])
        coef = np.linalg.solve(a, xs.T @ (y - y.mean()))
        return cls(mean.tolist(), scale.tolist(), coef.tolist(), float(y.mean()), alpha, len(rows))

    def predict(self, row: dict[str, Any]) -> float:
        x = (features(row) - np.asarray(self.mean)) / np.asarray(self.scale)
        return float(np.clip(self.intercept + x @ np.asarray(self.coef), 0.0, 1.0))

    def to_dict(self) -> dict[str, Any]:
        return {"model": "ridge", "features": list(FEATURES), "mean": self.mean, "scale": self.scale,
                "coef": self.coef, "intercept": self.intercept, "alpha": self.alpha, "cases": self.cases}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        if d.get("model") != "ridge" or list(d.get("features") or []) != list(FEATURES):
            raise MedsegError("the bundle's quality calibration is of another version: run medseg calibrate again")
        return cls(d["mean"], d["scale"], d["coef"], d["intercept"], d.get("alpha", 1.0), d.get("cases", 0))


def review_curve(predicted: Sequence[float], real: Sequence[float], below: float = REVIEW_BELOW,
                 shares: Sequence[float] = (0.1, 0.2, 0.3)) -> dict[str, Any]:
    """The share of failures (real Dice < ``below``) among the cases of lowest predicted Dice, reviewing
    the top 10 / 20 / 30 % (rounded up) by risk; ties broken by case order."""
    pred = np.asarray(predicted, np.float64)
    fail = np.asarray(real, np.float64) < below
    order = np.argsort(pred, kind="stable")
    out: dict[str, Any] = {"failures": int(fail.sum()), "cases": int(len(pred)), "below": below}
    for s in shares:
        n = int(np.ceil(s * len(pred)))
        out[f"caught_at_{int(round(s * 100))}"] = (float(fail[order[:n]].sum() / fail.sum()) if fail.any() else None)
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------ prediction
def quality_of(seg: Any) -> tuple[dict[str, Any] | None, Calibration | None]:
    """(reference, calibration) of a loaded model: the first of its members to carry a quality block."""
    for m in seg.members:
        q = getattr(m.spec, "quality", None)
        if q:
            cal = q.get("calibration")
            return q.get("reference"), Calibration.from_dict(cal) if cal else None
    return None, None


def predict_quality(seg: Any, image: np.ndarray, spatial_dims: int, overrides: dict[str, Any] | None = None,
                    where: Any = None, spacing: Sequence[float] | None = None, review_below: float = REVIEW_BELOW,
                    uncertainty: bool = False):
    """``(Prediction, rows, uncertainty[z, k, h, w] | None)``: the prediction, one row per structure
    (signals, ``predicted_dice``, ``calibrated``, ``review``) and, with ``uncertainty``, each voxel's share
    of views that disagree with the final mask."""
    reference, cal = quality_of(seg)
    pred, vm, prob = predict_views(seg, image, spatial_dims, overrides, where, spacing)
    voxel, unit = voxel_volume(spacing)
    if reference is not None and reference.get("unit") != unit:
        reference = {**reference, "classes": {}}  # volumes in other units cannot be compared
    iz = case_intensity_z(image, reference)
    rows = []
    for j, c in enumerate(pred.classes):
        r = structure_signals(pred.mask[:, j], vm[:, :, j], prob[:, j],
                              components=pred.raw_components[j], voxel=voxel, reference=reference,
                              cls=c, intensity_z=iz)
        r = {"structure": c, **r, "volume_unit": unit}
        if unit == "voxels":
            r["volume"] = int(r["volume"])
        r["predicted_dice"] = cal.predict(r) if cal is not None else 1.0 - r["disagreement"]
        r["calibrated"] = cal is not None
        r["review"] = bool(r["predicted_dice"] < review_below)
        rows.append(r)
    unc = None
    if uncertainty:
        unc = np.abs(vm.astype(np.float32).mean(0) - pred.mask).astype(np.float16)
    return pred, rows, unc
