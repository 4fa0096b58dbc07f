"""Shortcut check: how much do predictions change when overlays are removed, or the lesion is masked out?

A model that still separates benign from malignant with the lesion hidden is reading something else
(annotations, the site's presets, surrounding anatomy). Posterior shadowing and enhancement lie outside
the lesion mask and are legitimate cues, so "lesion masked" AUC far above 0.5 is a warning, not proof.

>>> from sonocad.shortcut import shortcut_check
>>> shortcut_check("runs/busi", "BUSBRA")["lesion_masked"]["auc"]   # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .data import discover
from .data.images import load_gray, remove_overlays, to_square
from .errors import SonocadError
from .evaluate import load_predictor
from .metrics import delong_auc_ci


def lesion_mask(mask_paths: tuple[str, ...], size: int, resize: str) -> np.ndarray:
    """Union of a sample's lesion masks, resized like its image, as a boolean (size, size) array."""
    out = np.zeros((size, size), bool)
    for p in mask_paths:
        m = load_gray(p)
        out |= to_square(m, size, resize, resample=Image.NEAREST) > 127
    return out


def mask_out(image: np.ndarray, mask: np.ndarray, margin: int = 4, sigma: float = 12.0) -> np.ndarray:
    """Replace the (dilated) lesion by a smooth fill from the tissue around it (normalised convolution)."""
    m = ndimage.binary_dilation(mask, iterations=margin) if mask.any() else mask
    keep = (~m).astype(np.float32)
    num = ndimage.gaussian_filter(image.astype(np.float32) * keep, sigma)
    den = ndimage.gaussian_filter(keep, sigma)
    fill = np.where(den > 1e-3, num / np.maximum(den, 1e-3), float(image[~m].mean()) if (~m).any() else 0.0)
    return np.where(m, fill, image).astype(np.uint8)


def shortcut_check(run: str | Path, data, max_images: int | None = None) -> dict:
    """AUC and mean absolute change of the positive-class probability for three versions of every image
    that has a lesion mask: as it is, with overlays removed, and with the lesion masked out."""
    predictor = load_predictor(run)
    info = predictor.info
    if len(info.classes) != 2:
        raise SonocadError("the shortcut check needs a binary run")
    samples = [s for s in discover(data, info.classes, allow_missing_classes=True) if s.masks]
    if not samples:
        raise SonocadError(f"{data}: no lesion masks found; the shortcut check needs them")
    samples = samples[:max_images] if max_images else samples
    size, resize = info.img_size, info.config.resize
    versions = {"original": [], "overlays_removed": [], "lesion_masked": []}
    for s in samples:
        gray = load_gray(s.path)
        if info.config.clean_overlays:
            gray = remove_overlays(gray)
        img = to_square(gray, size, resize)
        versions["original"].append(img)
        versions["overlays_removed"].append(img if info.config.clean_overlays
                                            else to_square(remove_overlays(gray), size, resize))
        versions["lesion_masked"].append(mask_out(img, lesion_mask(s.masks, size, resize)))
    y = np.asarray([info.classes.index(s.label) for s in samples])
    probs = {k: predictor.predict(np.stack(v))[:, 1] for k, v in versions.items()}
    result = {"n": len(samples), "data": str(data)}
    for k, p in probs.items():
        auc, lo, hi = delong_auc_ci(y, p)
        result[k] = {"auc": auc, "auc_ci": [lo, hi],
                     "mean_abs_change": float(np.mean(np.abs(p - probs["original"])))}
    return result
