"""Ultrasound-minded augmentation, applied to whole batches at once (one affine warp, a few tensor ops).

Geometry: horizontal flip (left/right breast), small rotation, zoom in/out and shifts that change the
field of view, slight aspect change. Never a vertical flip: depth runs top to bottom in B-mode.
Intensity: overall gain, contrast, gamma, a depth-dependent gain ramp (time-gain compensation),
multiplicative speckle-like noise and occasional blur.
Scanner-like appearance (`appearance="scanner"`, on top of the above): a smooth random gain curve over depth
(time-gain compensation set by hand), log-compression (dynamic range) changes, speckle grain of 1-4 px, and
a loss of axial and lateral resolution (down- and up-sampling), as another machine or preset would show.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ..config import APPEARANCES


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def augment_batch(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0, masks: torch.Tensor | None = None,
                  appearance: str = "standard"):
    """Randomly transform a float batch (B, C, H, W) with values in [0, 1]; returns a new batch. With `masks`
    (B, 1, H, W), returns (batch, masks moved by the same geometric transform); the random draws are the same
    either way. `appearance="scanner"` adds scanner-like intensity and resolution changes (masks unchanged)."""
    if appearance not in APPEARANCES:
        raise ValueError(f"appearance must be {' or '.join(APPEARANCES)}, not {appearance!r}")
    b, _, h, w = x.shape
    s = strength
    angle = _uniform(gen, b, -10 * s, 10 * s) * math.pi / 180
    zoom = torch.exp(_uniform(gen, b, math.log(1 - 0.2 * s), math.log(1 + 0.25 * s)))
    aspect = torch.exp(_uniform(gen, b, -0.1 * s, 0.1 * s))
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    tx, ty = _uniform(gen, b, -0.08 * s, 0.08 * s), _uniform(gen, b, -0.08 * s, 0.08 * s)
    sx, sy = flip / (zoom * aspect), aspect / zoom   # affine_grid maps output to input coordinates
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, tx], 1),
                         torch.stack([sin * sx, cos * sy, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks.to(x.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def per_sample(lo, hi):
        return _uniform(gen, b, lo, hi).view(b, 1, 1, 1).to(x.dtype)

    depth = torch.linspace(-0.5, 0.5, h, dtype=x.dtype).view(1, 1, h, 1)
    x = x * per_sample(1 - 0.25 * s, 1 + 0.3 * s) * (1 + per_sample(-0.4 * s, 0.4 * s) * depth)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * per_sample(1 - 0.25 * s, 1 + 0.3 * s) + mean
    x = x.clamp(0, 1) ** torch.exp(per_sample(-0.35 * s, 0.35 * s))
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x = x * (1 + per_sample(0, 0.15 * s) * noise)
    blur = torch.rand(b, generator=gen) < 0.3 * s
    if blur.any():
        sigma = float(_uniform(gen, 1, 0.4, 1.2))
        x[blur] = TF.gaussian_blur(x[blur], kernel_size=[5, 5], sigma=[sigma, sigma])
    if appearance == "scanner":
        x = scanner_appearance(x.clamp(0, 1), gen, s)
    return x.clamp(0, 1) if masks is None else (x.clamp(0, 1), masks)


def scanner_appearance(x: torch.Tensor, gen: torch.Generator, s: float = 1.0) -> torch.Tensor:
    """What another scanner or preset changes in a B-mode image, drawn per image: a smooth gain curve over
    depth (5 knots, +-35% each), the dynamic range of the log compression, speckle grain of 1-4 px and a
    resolution loss of up to 2.5x axially and laterally (in half the images)."""
    b, c, h, w = x.shape
    knots = torch.exp(_uniform(gen, b * 5, -0.35 * s, 0.35 * s)).view(b, 1, 5, 1).to(x.dtype)
    x = x * F.interpolate(knots, size=(h, 1), mode="bicubic", align_corners=True).clamp(min=0.3)
    t = _uniform(gen, b, -s, s).view(b, 1, 1, 1).to(x.dtype)          # dynamic range: < 0 expands, > 0 compresses
    a = torch.expm1(2.5 * t.abs()).clamp(min=1e-4)
    x = x.clamp(0, 1)
    x = torch.where(t > 0, torch.log1p(a * x) / torch.log1p(a), torch.expm1(torch.log1p(a) * x) / a)
    out = torch.empty_like(x)
    grains = torch.randint(1, 5, (b,), generator=gen)
    amps = _uniform(gen, b, 0, 0.25 * s)
    blur_y, blur_x = (torch.exp(_uniform(gen, b, 0, math.log(1 + 1.5 * s))) for _ in range(2))
    degrade = torch.rand(b, generator=gen) < 0.5
    for i in range(b):      # sizes differ per image
        g = int(grains[i])
        noise = torch.randn(1, c, -(-h // g), -(-w // g), generator=gen, dtype=x.dtype)
        noise = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False) if g > 1 else noise
        xi = x[i:i + 1] * (1 + float(amps[i]) * noise)
        if degrade[i]:
            small = (max(8, round(h / float(blur_y[i]))), max(8, round(w / float(blur_x[i]))))
            xi = F.interpolate(F.interpolate(xi, size=small, mode="area"), size=(h, w), mode="bilinear",
                               align_corners=False)
        out[i:i + 1] = xi
    return out
