"""Vectorised batch augmentation in torch, applied identically to image and mask.

One ``affine_grid`` + ``grid_sample`` per batch does flips, rotation, scaling and a smooth random
displacement (grid/elastic distortion) for every sample at once, then channel filling and intensity
transforms (gamma, contrast, noise) act on the image only. It runs in the training step on the batch
(on the GPU when there is one), so loader workers only slice memmaps. Measured against per-sample
MONAI dictionary transforms in ``benchmarks/loader.py`` (see docs/training.md).

All randomness comes from the ``torch.Generator`` passed in (seeded per step by the trainer), so a
resumed run augments exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from medseg.machine import to_device


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _p(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def spatial_matrix(b: int, nd: int, cfg: Any, g: torch.Generator) -> tuple[torch.Tensor, bool]:
    """[b, nd, nd+1] affine (output -> input coordinates, grid order x, y[, z]) and whether any
    sample moves. Rotation is in-plane (the last two axes) for 3D too: slices are often anisotropic."""
    A = torch.eye(nd).repeat(b, 1, 1)
    moved = False
    if cfg.rotate > 0:
        on = _p(b, cfg.rotate, g)
        ang = _u(b, -cfg.rotate_degrees, cfg.rotate_degrees, g) * math.pi / 180 * on
        c, s = torch.cos(ang), torch.sin(ang)
        R = torch.eye(nd).repeat(b, 1, 1)
        R[:, 0, 0], R[:, 0, 1], R[:, 1, 0], R[:, 1, 1] = c, -s, s, c
        A = A @ R
        moved |= bool(on.any())
    if cfg.scale > 0:
        on = _p(b, cfg.scale, g)
        s = torch.where(on, _u(b, cfg.scale_range[0], cfg.scale_range[1], g), torch.ones(b))
        A = A / s.view(b, 1, 1)  # zoom in by s: sample a smaller input region
        moved |= bool(on.any())
    if cfg.flip > 0:
        # spatial axis a (0 = first spatial axis) is grid coordinate nd-1-a
        axes = cfg.flip_axes if cfg.flip_axes is not None else ([nd - 2, nd - 1] if nd == 3 else list(range(nd)))
        sign = torch.ones(b, nd)
        for a in axes:
            on = _p(b, cfg.flip, g)
            sign[:, nd - 1 - a] = torch.where(on, -1.0, 1.0)
            moved |= bool(on.any())
        A = A * sign.view(b, 1, nd)
    return torch.cat([A, torch.zeros(b, nd, 1)], dim=2), moved


def fill_channels(image: torch.Tensor, p: float, source: int, modalities: int, g: torch.Generator) -> torch.Tensor:
    """Each sample's channels other than ``source`` replaced by ``source`` with probability ``p`` each.
    ``image`` [b, s * modalities, *spatial] (2.5D stacks are slice-major: each slice's modalities
    together); the same channels are replaced in every slice of a sample's stack."""
    b, c = image.shape[:2]
    on = _p(b * modalities, p, g).view(b, modalities)
    on[:, source] = False
    if not bool(on.any()):
        return image
    x = image.reshape(b, c // modalities, modalities, *image.shape[2:])
    keep = ~to_device(on, image.device).view(b, 1, modalities, *([1] * (image.ndim - 2)))
    return torch.where(keep, x, x[:, :, source : source + 1]).reshape(image.shape)


def augment_batch(image: torch.Tensor, mask: torch.Tensor, cfg: Any, g: torch.Generator,
                  modalities: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` float [b, c, *spatial], ``mask`` [b, k, *spatial] 0/1 -> augmented (mask same dtype).
    ``modalities``: channels per slice in a 2.5D stack (default: all ``c``), for ``channel_fill``."""
    if not cfg.enabled:
        return image, mask
    b, nd = image.shape[0], image.ndim - 2
    dev = image.device
    theta, moved = spatial_matrix(b, nd, cfg, g)
    disp = None
    if cfg.elastic > 0:
        on = _p(b, cfg.elastic, g)
        if bool(on.any()):
            n = cfg.elastic_grid
            coarse = torch.randn(b, nd, *([n] * nd), generator=g) * cfg.elastic_magnitude * on.view(b, *([1] * (nd + 1)))
            mode = "bicubic" if nd == 2 else "trilinear"
            disp = F.interpolate(to_device(coarse, dev), size=image.shape[2:], mode=mode, align_corners=True)
            disp = disp.movedim(1, -1)  # [b, *spatial, nd]
            moved = True
    if moved:
        grid = F.affine_grid(to_device(theta, dev).to(image.dtype), list(image.shape), align_corners=False)
        if disp is not None:
            grid = grid + disp.to(grid.dtype)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        m = F.grid_sample(mask.float(), grid.to(torch.float32), mode="bilinear", padding_mode="zeros", align_corners=False)
        mask = (m > 0.5).to(mask.dtype)
    if cfg.channel_fill > 0:
        image = fill_channels(image, cfg.channel_fill, cfg.channel_fill_source, modalities or image.shape[1], g)
    red = tuple(range(2, image.ndim))
    # one factor per sample, or per sample and channel
    n, view = (b * image.shape[1], (b, image.shape[1], *([1] * nd))) if cfg.intensity_per_channel else (b, (b, *([1] * (nd + 1))))
    if cfg.gamma > 0:
        on = _p(n, cfg.gamma, g)
        if bool(on.any()):
            gam = to_device(torch.where(on, _u(n, cfg.gamma_range[0], cfg.gamma_range[1], g), torch.ones(n)), dev).to(image.dtype)
            lo = image.amin(dim=red, keepdim=True)
            rng = (image.amax(dim=red, keepdim=True) - lo).clamp_min(1e-6)
            image = ((image - lo) / rng).clamp(0, 1).pow(gam.view(view)) * rng + lo
    if cfg.contrast > 0:
        on = _p(n, cfg.contrast, g)
        if bool(on.any()):
            c = to_device(torch.where(on, _u(n, cfg.contrast_range[0], cfg.contrast_range[1], g), torch.ones(n)), dev).to(image.dtype)
            mu = image.mean(dim=red, keepdim=True)
            image = (image - mu) * c.view(view) + mu
    if cfg.noise > 0:
        on = _p(b, cfg.noise, g)
        if bool(on.any()):
            if dev.type == "cpu":
                noise = torch.randn(image.shape, generator=g).to(dtype=image.dtype)
            else:  # drawn where the batch is (a host draw and copy would bound a GPU's speed), seeded from g
                gd = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
                noise = torch.randn(image.shape, generator=gd, device=dev, dtype=image.dtype)
            image = image + noise * (cfg.noise_std * to_device(on, dev).to(image.dtype)).view(b, *([1] * (nd + 1)))
    return image, mask
