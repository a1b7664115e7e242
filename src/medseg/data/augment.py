"""Vectorised batch augmentation in torch, applied identically to image and mask.

One ``affine_grid`` + ``grid_sample`` per batch does flips, rotation, scaling and a smooth random
displacement (grid/elastic distortion) for every sample at once, then channel filling and intensity
transforms (gamma, contrast, a bias field, lower resolution, blur, noise: what differs between scanners)
act on the image only. It runs in the training step on the batch
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


def bias_field(image: torch.Tensor, p: float, magnitude: float, g: torch.Generator) -> torch.Tensor:
    """Each sample, with probability ``p``, times a smooth positive field: exp of a 3-point-per-axis
    normal grid (std ``magnitude``) interpolated over the image, applied above the sample's minimum (the
    images are z-scored; the field scales the signal, not the offset)."""
    b, nd = image.shape[0], image.ndim - 2
    on = _p(b, p, g)
    if not bool(on.any()):
        return image
    coarse = torch.randn(b, 1, *([3] * nd), generator=g) * magnitude * on.view(b, *([1] * (nd + 1)))
    mode = "bicubic" if nd == 2 else "trilinear"
    field = F.interpolate(to_device(coarse, image.device), size=image.shape[2:], mode=mode, align_corners=True).exp()
    lo = image.amin(dim=tuple(range(1, image.ndim)), keepdim=True)
    return (image - lo) * field.to(image.dtype) + lo


def blur(image: torch.Tensor, p: float, sigma: list[float], g: torch.Generator) -> torch.Tensor:
    """Each sample, with probability ``p``, smoothed in-plane by a Gaussian of a random sigma (pixels):
    one separable grouped convolution for the whole batch (an identity kernel for the others)."""
    b, c = image.shape[:2]
    on = _p(b, p, g)
    if not bool(on.any()):
        return image
    s = torch.where(on, _u(b, sigma[0], sigma[1], g), torch.zeros(b))
    r = int(math.ceil(3 * max(sigma[1], 1e-3)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t.view(1, -1) / s.clamp_min(1e-3).view(-1, 1)) ** 2)
    k = torch.where(on.view(-1, 1), k, (t == 0).float().view(1, -1))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0).to(image.device, image.dtype)  # [b*c, 2r+1]
    x = image.reshape(1, b * c, *image.shape[2:])
    h, w = x.shape[-2:]
    lead = x.shape[2:-2]
    x = x.reshape(1, b * c, -1, h, w) if lead else x.unsqueeze(2)  # [1, bc, d, h, w]
    kk = k.view(b * c, 1, 1, 1, -1)
    x = F.conv3d(F.pad(x, (r, r, 0, 0, 0, 0), mode="replicate"), kk, groups=b * c)
    x = F.conv3d(F.pad(x, (0, 0, r, r, 0, 0), mode="replicate"), kk.transpose(-1, -2), groups=b * c)
    return x.reshape(image.shape)


def lowres(image: torch.Tensor, p: float, factor: list[float], g: torch.Generator) -> torch.Tensor:
    """Each sample, with probability ``p``, resampled in-plane to a grid ``factor`` times coarser (nearest)
    and back (linear): the look of a scan acquired at a lower resolution."""
    b, nd = image.shape[0], image.ndim - 2
    on = _p(b, p, g)
    f = _u(b, factor[0], factor[1], g)
    if not bool(on.any()):
        return image
    out = image.clone()
    h, w = image.shape[-2:]
    mode = "bilinear" if nd == 2 else "trilinear"
    for i in torch.nonzero(on).flatten().tolist():
        x = image[i : i + 1]
        small = [*x.shape[2:-2], max(1, round(h / float(f[i]))), max(1, round(w / float(f[i])))]
        x = F.interpolate(F.interpolate(x, size=small, mode="nearest"), size=image.shape[2:], mode=mode,
                          align_corners=False)
        out[i : i + 1] = x
    return out


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
    if cfg.bias_field > 0:
        image = bias_field(image, cfg.bias_field, cfg.bias_field_magnitude, g)
    if cfg.lowres > 0:
        image = lowres(image, cfg.lowres, cfg.lowres_factor, g)
    if cfg.blur > 0:
        image = blur(image, cfg.blur, cfg.blur_sigma, g)
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
