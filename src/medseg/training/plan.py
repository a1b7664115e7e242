"""A training configuration from a prepared data set's fingerprint, every choice with its reason.

    p = plan("prepared/lgg", minutes=30, device="cpu")
    write_plan(p, "plan.yaml")          # a config ``medseg train plan.yaml`` runs; comments say why

The rules (each stated in the written plan beside the value it produced):
- mode: 2D for layouts of independent slices; for volumes, 2.5D when the slices lie at least 3x further
  apart than the pixels within a slice (nnU-Net's anisotropy threshold), else 3D;
- size: whole slices on a GPU (random 512 crops above that); on a CPU whole slices resized to at most
  128 px a side (the LGG recipe's measured trade: 4x cheaper than 256, Dice kept), but never so far that
  a class is thinner than ``THIN_PX`` (``slices_2d``); 3D patches the median volume, capped by a voxel
  budget per device;
- depth: poolings until the coarsest map is 4-8 voxels a side; widths from 8 (CPU 2D), 16 (CPU 3D) or 32
  (GPU), doubling;
- normalisation: per-case z-score unless a channel looks like CT (0.5th percentile below -200: Hounsfield
  units have a meaning, so the data set's clipped statistics are used);
- foreground oversampling 0.5 when the rarest class is in under 10% of the slices, else nnU-Net's 1/3;
- loss: Dice + cross-entropy for exclusive labels, Dice + BCE for overlapping ones;
- flips only along axes where every class's foreground is centred (mirror-symmetric anatomy), TTA the same;
- channel fill when some cases hold a channel identical to another (a missing sequence filled in).
The voxel grid is ``prepare``'s (``data/resample.py``): volumes off the target spacing are stored resampled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medseg.atomic import atomic_write_text
from medseg.data.prepared import PreparedDataset
from medseg.errors import MedsegError, warn
from medseg.machine import cpu_cores, resolve_device
from medseg.training.plan_sample import centres_of, filled_channels, thickness_of

ANISOTROPY = 3.0  # slice distance / pixel size from which 3D kernels see unlike distances (nnU-Net's rule)
CT_FLOOR = -200.0  # a 0.5th percentile below this: Hounsfield units
VOXELS_3D = {"cpu": 48**3, "cuda": 128**3}
THIN_PX = 4.0  # no class thinner than this on the network's grid: a pixel's resize error is 1/4 of it
CENTRED = 0.1  # a class's mean foreground position within this of the middle: mirror-symmetric


@dataclass
class Plan:
    config: dict[str, Any]
    why: dict[str, str] = field(default_factory=dict)  # dotted key -> the fingerprint value and the rule
    fingerprint: dict[str, Any] = field(default_factory=dict)


def _check(ds: PreparedDataset, root: Path) -> None:
    fp = ds.fingerprint
    if len(ds.cases) < 2 or len(ds.patients) < 2:
        raise MedsegError(f"{len(ds.patients)} patient(s): a plan needs at least 2, one to train on and one to "
                          "validate on", root)
    classes = fp.get("classes") or {}
    if not any((c.get("voxel_fraction") or 0) > 0 for c in classes.values()):
        raise MedsegError("no case holds any foreground: there is nothing to learn", root)
    for name, st in (fp.get("intensity") or {}).items():
        if st.get("std", 0) == 0 or st.get("min") == st.get("max"):
            raise MedsegError(f"channel {name!r} is constant ({st.get('min')}) in every case", root)
    shapes = {tuple(c.shape[1:2]) for c in ds.cases}
    if len(shapes) > 1:
        raise MedsegError(f"cases have different channel counts ({sorted(s[0] for s in shapes)})", root)
    absent = [c for c, v in classes.items() if not (v.get("voxel_fraction") or 0) > 0]
    if absent:
        warn(f"class(es) {', '.join(absent)} appear in no case: the network cannot learn them", root)


def _round_to(v: float, d: int) -> int:
    return max(d, int(math.ceil(v / d)) * d)


def patch_3d(size: list[float], budget: int) -> tuple[list[int], int, int, float]:
    """3D patch, poolings, batch and scale for a median volume ``size`` (z, y, x) and a voxel budget.

    The patch is the volume (scaled down to the budget) rounded *down* to a multiple of 2^poolings, so
    that random crops still shift the anatomy; the batch keeps about two budgets of voxels per step."""
    scale = min(1.0, (budget / float(np.prod(size))) ** (1 / 3))
    depth = max(1, min(max(0, min(5, int(math.log2(max(1.0, s * scale) / 4)))) for s in size))
    d = 2**depth
    patch = [max(d, int(s * scale + 1e-6) // d * d) for s in size]  # 47.999... from the cube root is 48
    batch = int(min(8, max(2, 2 * budget // int(np.prod(patch)))))
    return patch, depth, batch, scale


def slices_2d(data: dict, why: dict, h: float, w: float, dev: str, classes: list[str], thick: np.ndarray) -> int:
    """Slice size, resize and batch for 2D / 2.5D (into ``data`` and ``why``); returns the poolings.

    On a CPU slices are resized to at most 128 px a side, unless that leaves a class thinner than
    ``THIN_PX``: then they are resized only as far as that class allows, and where even that is above 128
    px (or is native), the network trains on random 128 px crops at native resolution and predicts whole
    slices. The pixels per step stay those of the LGG recipe (16 slices of 128 x 128)."""
    cap = 128 if dev == "cpu" else 512
    scale = base = min(1.0, cap / max(h, w))
    finite = np.isfinite(thick)
    j = int(np.nanargmin(np.where(finite, thick, np.inf))) if finite.any() else -1
    need = min(1.0, THIN_PX / thick[j]) if j >= 0 else 0.0
    thin = dev == "cpu" and need > scale
    crop = thin and max(h, w) * need > cap * 1.5  # a resize this large costs more than crops at native size
    if thin and not crop:
        scale = need
    depth = max(1, min(6, int(math.log2(max(4.0, (cap if crop else min(h, w) * scale)) / 4))))
    d = 2**depth
    size = [_round_to(h * scale, d), _round_to(w * scale, d)]
    thin_note = (f"; resized by {base:.2f} the thinnest class, {classes[j]} ({thick[j]:.1f} px thick at native size), "
                 f"would be {thick[j] * base:.1f} px, below {THIN_PX:g}" if thin else "")
    if crop:
        data["size"] = [min(cap, _round_to(h, d)), min(cap, _round_to(w, d))]
        why["data.size"] = (f"median slice {int(h)}x{int(w)}: random {cap}x{cap} crops at native resolution, whole "
                            f"slices predicted" + thin_note + f" ({THIN_PX:g} px take scale {THIN_PX / thick[j]:.2f}: "
                            + ("more than native size)" if need >= 1 else f"{max(h, w) * need:.0f} px, over {cap * 1.5:g})"))
        size = data["size"]
    elif dev == "cpu" or max(h, w) <= cap:
        data["size"], data["resize"] = size, True
        why["data.size"] = (f"median slice {int(h)}x{int(w)}"
                            + (f" resized to {size[0]}x{size[1]}" + thin_note + " px, so resized only as far as it "
                               f"keeps {THIN_PX:g} px" if thin else
                               f" resized to at most {cap} px a side (on a CPU: 4x cheaper than 256, Dice kept on LGG, "
                               "docs/lgg.md)" if scale < 1 else " used whole")
                            + f", a multiple of {d} for {depth} poolings; predictions are resized back")
    else:
        data["size"] = [cap, cap]
        why["data.size"] = f"median slice {int(h)}x{int(w)} above {cap}: random {cap}x{cap} crops"
    pixels = size[0] * size[1]
    bs = (int(min(16, max(4, 16 * 128 * 128 // pixels))) if dev == "cpu"
          else int(min(64, max(8, 64 * 128 * 128 // pixels))))
    data["batch_size"] = bs
    why["data.batch_size"] = (f"{bs} slices: the LGG recipe's CPU batch of 16 at 128x128, as pixels per step (4 to 16)"
                              if dev == "cpu" else f"{bs}: 64 at 128x128, scaled by the pixels per slice, 8 to 64")
    return depth


def plan(prepared: str | Path, minutes: float = 30.0, device: str = "auto", gpu_memory: float | None = None) -> Plan:
    """A complete training config for the prepared data set at ``prepared`` (see the module docstring).
    ``device="cuda"`` with ``gpu_memory`` (GiB) plans for a GPU this machine need not have (a plan written
    on a laptop, trained on a cluster): the batch then comes from an estimate instead of a measurement."""
    root = Path(prepared)
    ds = PreparedDataset.open(root)
    _check(ds, root)
    fp = ds.fingerprint
    if gpu_memory is not None and not (gpu_memory > 0 and np.isfinite(gpu_memory)):
        raise MedsegError(f"--gpu-memory must be the card's memory in GiB (e.g. 80), got {gpu_memory}")
    elsewhere = device == "cuda" and gpu_memory is not None and not _cuda_visible()
    if device == "cuda" and gpu_memory is None and not _cuda_visible():
        raise MedsegError("planning for a GPU on a machine without one needs the card's memory: --gpu-memory GiB "
                          "(e.g. 80 for an H100)")
    dev = "cuda" if elsewhere or resolve_device(device).startswith("cuda") else "cpu"
    why: dict[str, str] = {}
    sp = [float(v) for v in np.median([c.spacing for c in ds.cases], axis=0)]  # (z, y, x)
    shape = [float(v) for v in np.median([c.shape for c in ds.cases], axis=0)]  # (z, c, h, w)
    h, w = shape[2], shape[3]
    inplane = min(sp[1], sp[2])
    aniso = sp[0] / inplane if inplane > 0 else 1.0
    data: dict[str, Any] = {"prepared": str(root.resolve())}
    if ds.spatial_dims == 2:
        mode = "2d"
        why["data.mode"] = "the layout stores independent 2D slices (no trustworthy distance between them)"
    elif aniso >= ANISOTROPY:
        mode = "2.5d"
        why["data.mode"] = (f"slices {sp[0]:.3g} mm apart vs {inplane:.3g} mm pixels: anisotropy {aniso:.1f} >= "
                            f"{ANISOTROPY:g}, so 2D kernels with 2 neighbouring slices each side as context")
    else:
        mode = "3d"
        why["data.mode"] = f"volumes with anisotropy {aniso:.1f} < {ANISOTROPY:g} (spacing {sp}): 3D kernels"
    data["mode"] = mode
    if mode == "2.5d":
        data["context"] = 2

    if mode == "3d":
        budget = VOXELS_3D[dev]
        size = [shape[0], h, w]
        data["size"], depth, data["batch_size"], scale = patch_3d(size, budget)
        d = 2**depth
        why["data.size"] = (f"the median volume {int(size[0])}x{int(h)}x{int(w)}"
                            + (f" scaled by {scale:.2f} to the {dev} budget of {budget} voxels" if scale < 1 else "")
                            + f", rounded down to a multiple of {d} (the network's {depth} poolings): random "
                            "crops then move the anatomy inside the patch")
        why["data.batch_size"] = (f"{data['batch_size']}: twice the {budget}-voxel budget per step, in patches of "
                                  "this size (2 to 8; measured on hippocampus, docs/planning.md)")
    else:
        depth = slices_2d(data, why, h, w, dev, ds.classes, thickness_of(ds))
    channels = ds.channels
    ct = [c for c in channels if float(fp["intensity"][c]["percentiles"]["0.5"]) < CT_FLOOR]
    data["normalization"] = "dataset" if ct else "zscore_case"
    why["data.normalization"] = (f"channel(s) {', '.join(ct)} reach below {CT_FLOOR:g} (Hounsfield units): clipped "
                                 "to the data set's 0.5-99.5 percentiles, its mean and std" if ct else
                                 "no channel looks like CT: each case z-scored on its own (MRI has no absolute scale)")
    classes = fp.get("classes") or {}
    rare = min((v.get("slice_fraction") or 0.0) for v in classes.values())
    data["fg_oversample"] = 0.5 if rare < 0.1 else 0.33
    why["data.fg_oversample"] = (f"the rarest class is in {rare:.1%} of the slices"
                                 + (" (< 10%): half the samples centred on foreground" if rare < 0.1 else
                                    ": nnU-Net's 1/3 of the samples centred on foreground"))

    # 8 suffices in 2D on a CPU (the LGG recipe); 3D kernels mix 27 neighbours and need 16 (the 3D recipe)
    base = 32 if dev == "cuda" else (16 if mode == "3d" else 8)
    widths = [base * 2**i for i in range(depth + 1)]
    widths = [min(v, 320 if mode == "3d" else 512) for v in widths]
    # LeakyReLU: the output layer reading a few non-negative ReLU features can starve a class for good
    # (hippocampus 2.5D: posterior Dice 0 for 20 epochs with ReLU, 0.78 with LeakyReLU; docs/planning.md)
    model = {"name": "unet", "kwargs": {"features": widths, "act": "leakyrelu"}}
    small = data["batch_size"] <= 4
    if small:
        model["kwargs"]["norm"] = "instance"
    why["model"] = (f"U-Net, {depth} poolings (coarsest map {int(min(data['size']) / 2**depth)} voxels a side), "
                    f"widths from {widths[0]} ({'a GPU' if dev == 'cuda' else 'a CPU, ' + mode}) doubling, capped at {widths[-1]}; "
                    "LeakyReLU (nnU-Net's): with ReLU a rare class can die (docs/planning.md)"
                    + (f"; instance norm: batch statistics of {data['batch_size']} patches are noise (nnU-Net's choice)" if small else ""))
    if dev == "cuda":
        in_ch = len(ds.channels) * ((2 * data["context"] + 1) if mode == "2.5d" else 1)
        out_ch = len(ds.classes) + (0 if ds.class_kind == "multilabel" else 1)
        bs, note = (gpu_batch_estimate(model["kwargs"], 3 if mode == "3d" else 2, in_ch, out_ch, data["size"],
                                       data["batch_size"], gpu_memory) if elsewhere else
                    gpu_batch(model["kwargs"], 3 if mode == "3d" else 2, in_ch, out_ch, data["size"], data["batch_size"],
                              memory=gpu_memory))
        data["batch_size"] = bs
        why["data.batch_size"] = note
    multilabel = ds.class_kind == "multilabel"
    loss = {"terms": [{"name": "dice_bce" if multilabel else "dice_ce", "weight": 1.0}]}
    why["loss"] = ("labels overlap: per-class sigmoid, Dice + BCE" if multilabel
                   else "exclusive labels: softmax, Dice + cross-entropy")

    centres = centres_of(ds)
    axes = []  # spatial axes of a slice: 0 height (y), 1 width (x)
    for a, name in ((0, "height"), (1, "width")):
        c = centres[:, a]
        ok = bool(np.all(np.isfinite(c)) and np.all(np.abs(c - 0.5) <= CENTRED))
        if ok:
            axes.append(a)
        why[f"augment.flip.{name}"] = (f"foreground centred along the {name} (mean position "
                                       f"{', '.join(f'{v:.2f}' for v in c)}): " +
                                       ("mirror-symmetric, flipped" if ok else f"off-centre by more than {CENTRED}, not flipped"))
    nd = 3 if mode == "3d" else 2
    aug: dict[str, Any] = {"flip": 0.5 if axes else 0.0}
    filled, seen, source = filled_channels(ds)
    if filled and filled == seen:
        # every case alike (a grey image stored as RGB): no case-to-case variation for the augmentation to teach
        why["augment.channel_fill"] = (f"every one of the {seen} cases looked at holds a channel identical to "
                                       "another (one image stored in several channels?): no case differs, so no fill")
    elif filled:
        aug["channel_fill"], aug["channel_fill_source"] = 0.2, source
        why["augment.channel_fill"] = (
            f"{filled} of {len(ds.cases)} cases hold a channel identical to another (a missing sequence filled "
            f"in): other channels replaced by channel {source} ({channels[source]}, the one most often shared; "
            "ties to the lower index) with probability 0.2 (the LGG recipe's measured value, docs/lgg.md)")
    if axes:
        aug["flip_axes"] = [a + (1 if nd == 3 else 0) for a in axes]
    inference: dict[str, Any] = {"tta": bool(axes)}
    if axes:
        inference["tta_flips"] = [[-2 + a] for a in axes]  # -2 height, -1 width
    why["inference.tta"] = "flips of the axes trained with flips" if axes else "no axis is flipped in training: no flip TTA"

    cores = cpu_cores()
    members = 2 if dev == "cpu" and mode != "3d" and 2 <= cores <= 4 else 1
    train = {"max_minutes": float(minutes), "epochs": 10000, "steps_per_epoch": 100, "val_every": 10000,
             "clip": 1.0, "seed": 0, "members": members}
    why["train"] = (f"{minutes:g} minutes of wall clock, the learning rate annealed over the clock; validated once, "
                    "on the final model" + (f"; 2 networks side by side, one per core ({cores} cores), averaged"
                                            if members == 2 else ""))
    config = {"data": data, "model": model, "loss": loss, "augment": aug,
              "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.0001},
              "schedule": {"name": "cosine", "warmup_epochs": 1, "by": "time"},
              "train": train, "inference": inference}
    why["optim"] = "AdamW 2e-3 with a 1-epoch warm-up and cosine decay (the shipped recipes)"
    return Plan(config, why, {"spacing": sp, "shape": shape, "anisotropy": aniso,
                              "device": f"cuda ({gpu_memory:g} GiB, planned without it)" if elsewhere else dev,
                              "grid": _grid(ds, root)})


def _grid(ds: PreparedDataset, root: Path) -> str:
    """What ``prepare`` did about voxel sizes, for the plan's header; a warning when volumes of different
    spacings were kept as read."""
    if ds.spatial_dims != 3 or not ds.info.get("spacing_known", True):
        return "slices used at their own pixel grid (resized to the planned size)"
    target = ds.fingerprint.get("target_spacing")
    if target:
        moved = sum(c.native is not None for c in ds.cases)
        return (f"{moved} of {len(ds.cases)} volumes resampled in prepare to {target} mm (the median spacing, its "
                "10th percentile along a coarse axis of few slices); predictions go back to each input's grid")
    spacings = np.array([c.spacing for c in ds.cases])
    if np.any(spacings.max(axis=0) > spacings.min(axis=0) * 1.02):
        warn("the volumes' spacings differ (prepared with --spacing native): the network sees each at its own "
             "voxel size; `medseg prepare --spacing auto` resamples them to one", root)
        return "volumes kept at their own spacings (--spacing native)"
    return f"every volume at {spacings[0].tolist()} mm: no resampling"


def fit_batch(peak_a: int, peak_b: int, a: int, b: int, budget: int, cap: int) -> int:
    """The largest batch (at most ``cap``, at least 1) whose training step fits ``budget`` bytes, from
    the peak memory of two measured steps at batches ``a`` < ``b``: peak = fixed + batch x per sample."""
    per = max(1.0, (peak_b - peak_a) / (b - a))
    fixed = peak_a - a * per
    return int(max(1, min(cap, (budget - fixed) // per)))


def _cuda_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def step_bytes_estimate(kwargs: dict, nd: int, in_ch: int, out_ch: int, size: list[int], batch: int) -> int:
    """Bytes of a bf16 training step of this U-Net, without a GPU: the tensors autograd saves for the
    backward pass, counted on PyTorch's meta device (shapes, no data) in fp32 and taken at 0.6 of that
    (under bf16 autocast convolutions save half-size inputs, normalisations full-size), plus fp32 weights,
    gradients and AdamW's two moments."""
    import torch

    from medseg.models import create_model

    model = create_model("unet", in_ch, out_ch, spatial_dims=nd, **kwargs).to("meta")
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.empty(batch, in_ch, *size, device="meta"))
    weights = sum(p.numel() for p in model.parameters()) * 4
    return int(0.6 * saved[0] + 4 * weights)


def gpu_batch_estimate(kwargs: dict, nd: int, in_ch: int, out_ch: int, size: list[int], start: int,
                       memory_gib: float, share: float = 0.6) -> tuple[int, str]:
    """``gpu_batch`` for a GPU this machine does not have: the step's memory estimated
    (``step_bytes_estimate``) at batches 2 and 4 instead of measured, against ``share`` of ``memory_gib``."""
    peaks = [step_bytes_estimate(kwargs, nd, in_ch, out_ch, size, b) for b in (2, 4)]
    cap = max(start, 8) if nd == 3 else start
    budget = int(share * memory_gib * 2**30)
    bs = fit_batch(peaks[0], peaks[1], 2, 4, budget, cap)
    return bs, (f"{bs}: estimated without a GPU, {peaks[0] / 2**20:.0f} / {peaks[1] / 2**20:.0f} MiB for a bf16 step "
                f"at 2 / 4 (saved activations counted on the meta device); {share:.0%} of {memory_gib:g} GiB fits {bs} "
                f"(capped at {cap}); on the GPU itself, `medseg plan --device cuda` measures it")


def gpu_batch(kwargs: dict, nd: int, in_ch: int, out_ch: int, size: list[int], start: int,
              share: float = 0.6, memory: float | None = None) -> tuple[int, str]:
    """The batch a training step of this U-Net fits in ``share`` of the GPU's free memory, measured:
    two bf16 steps (forward, backward, AdamW) at batches 2 and 4, extrapolated linearly. The rule's
    cap stays the batch the size rule gave (``start``, or 8 patches in 3D): beyond it, steps get longer
    without more updates."""
    import torch

    from medseg.machine import gpu_free_bytes
    from medseg.models import create_model

    dev = torch.device("cuda")
    model = create_model("unet", in_ch, out_ch, spatial_dims=nd, **kwargs).to(dev)
    opt = torch.optim.AdamW(model.parameters())
    peaks = []
    for b in (2, 4):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        x = torch.randn(b, in_ch, *size, device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        del x, loss
    del model, opt
    torch.cuda.empty_cache()
    free = gpu_free_bytes("cuda")
    if memory is not None:  # a smaller card than this one is planned for
        free = min(free, int(memory * 2**30))
    cap = max(start, 8) if nd == 3 else start
    bs = fit_batch(peaks[0], peaks[1], 2, 4, int(share * free), cap)
    return bs, (f"{bs}: measured {peaks[0] / 2**20:.0f} / {peaks[1] / 2**20:.0f} MiB for a step at 2 / 4, "
                f"{share:.0%} of the {free / 2**30:.1f} GiB free fits {bs} (capped at {cap})")


def render(p: Plan) -> str:
    """The plan as YAML, each section preceded by comments giving its reasons."""
    lines = ["# medseg plan: every value below follows from the data set's fingerprint by a stated rule.",
             f"# fingerprint: median spacing {p.fingerprint['spacing']} mm, median shape "
             f"{[int(v) for v in p.fingerprint['shape']]} (z, c, h, w), anisotropy {p.fingerprint['anisotropy']:.2f}, "
             f"planned for {p.fingerprint['device']}",
             f"# voxel grid: {p.fingerprint['grid']}"]
    for section, value in p.config.items():
        for key, reason in p.why.items():
            if key == section or key.startswith(section + "."):
                lines.append(f"# {key}: {reason}")
        lines.append(yaml.safe_dump({section: value}, sort_keys=False, default_flow_style=None).rstrip())
    return "\n".join(lines) + "\n"


def write_plan(p: Plan, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # --out runs/x/plan.yaml makes runs/x, as train's --out does
    atomic_write_text(out, render(p))
    return out


__all__ = ["Plan", "fit_batch", "gpu_batch", "gpu_batch_estimate", "plan", "render", "step_bytes_estimate", "write_plan"]
