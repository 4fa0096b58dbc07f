"""The lesion-mask decoder: a light FPN on three of the backbone's strides, and its loss (BCE + Dice on the
images whose mask is known, nothing on the others).

>>> decoder = MaskDecoder([40, 112, 320])              # channels at strides 8, 16, 32 (EfficientNet-Lite0)
>>> logits = decoder(feature_maps)                     # (N, 1, H/8, W/8)             # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class MaskDecoder(nn.Module):
    """Lateral 1x1 convolutions to `width` channels, top-down upsampling and addition (coarsest first), two 3x3
    convolutions, one output logit per pixel at the finest stride given. No BatchNorm: it trains on small
    batches and nothing needs folding for inference."""

    def __init__(self, channels: list[int], width: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = self.lateral[-1](feats[-1])
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            y = resize_bilinear(y, f.shape[-2:]) + lateral(f)
        return self.out(self.smooth(y))


def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` for (N, C, H, W), with a deterministic
    backward on CUDA: PyTorch's CUDA backward of that resize adds with atomics, so two trainings with the same
    seed differed; there it runs as two fp32 matrix products instead (the same weights, other rounding).
    Elsewhere it is `F.interpolate` itself, so CPU results are unchanged."""
    if x.device.type != "cuda":
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return bilinear_by_matmul(x, size)


def bilinear_by_matmul(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialiasing, as `F.interpolate`) as rows @ x @ columns, in fp32
    (returned in x's dtype)."""
    rows = _bilinear_weights(x.shape[-2], int(size[0]), x.device)
    cols = _bilinear_weights(x.shape[-1], int(size[1]), x.device)
    with torch.autocast(x.device.type, enabled=False):     # autocast would round the products to bf16
        return (rows @ x.float() @ cols.T).to(x.dtype)


def _bilinear_weights(n_in: int, n_out: int, device) -> torch.Tensor:
    """(n_out, n_in) fp32 matrix of PyTorch's bilinear weights along one axis (half-pixel centres, clamped to the
    edges): a tent around each output's source position. Built on `device`, so no host-to-GPU copy waits."""
    src = ((torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * (n_in / n_out) - 0.5).clamp(0, n_in - 1)
    taps = torch.arange(n_in, dtype=torch.float64, device=device)
    return (1 - (src[:, None] - taps).abs()).clamp(min=0).float()


def mask_loss(logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean of pixel BCE and soft Dice loss over the images whose mask is `known` (bool, (N,)); 0 when none is.
    `logits` (N, 1, h, w) are upsampled to the masks' size (N, H, W)."""
    if not bool(known.any()):
        return logits.sum() * 0.0       # keeps the graph (and DDP's gradient bookkeeping) whole
    logits = resize_bilinear(logits[known].float(), masks.shape[-2:])[:, 0]
    target = masks[known].float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
    return bce + dice.mean()


def dice_scores(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Dice of boolean masks, one per image ((N, H, W) each); 1 where both are empty."""
    a, b = np.asarray(predicted, bool), np.asarray(true, bool)
    inter = (a & b).sum((1, 2))
    total = a.sum((1, 2)) + b.sum((1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
