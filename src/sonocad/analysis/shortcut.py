"""Shortcut check: how much do predictions change when overlays are removed, or the lesion is masked out?

A model that still separates benign from malignant with the lesion hidden is reading something else
(annotations, the site's presets, surrounding anatomy). Posterior shadowing and enhancement lie outside
the lesion mask and are legitimate cues, so "lesion masked" AUC far above 0.5 is a warning, not proof.

>>> from sonocad.analysis.shortcut import shortcut_check
>>> shortcut_check(Predictor.load("runs/busi"), "BUSBRA")["lesion_masked"]["auc"]   # doctest: +SKIP
"""
from __future__ import annotations


import numpy as np
from scipy import ndimage

from ..data import discover
from ..data.images import load_gray, load_mask, remove_overlays, to_square
from ..deploy.predictor import Predictor
from ..errors import SonocadError
from ..evaluation.metrics import delong_auc_ci
from ..evaluation.report import html_table


def mask_out(image: np.ndarray, mask: np.ndarray, margin: int = 4, sigma: float = 12.0) -> np.ndarray:
    """Replace the (dilated) lesion by a smooth fill from the tissue around it (normalised convolution)."""
    m = ndimage.binary_dilation(mask, iterations=margin) if mask.any() and margin > 0 else mask
    keep = (~m).astype(np.float32)
    num = ndimage.gaussian_filter(image.astype(np.float32) * keep, sigma)
    den = ndimage.gaussian_filter(keep, sigma)
    fill = np.where(den > 1e-3, num / np.maximum(den, 1e-3), float(image[~m].mean()) if (~m).any() else 0.0)
    return np.where(m, fill, image).astype(np.uint8)


def _tissue_residual(image: np.ndarray, hidden: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """Speckle texture for the `hidden` region: the image's fine detail (image minus its blur) copied
    from the nearest shift of that region that lies wholly on visible tissue, or on as much as possible."""
    img = image.astype(np.float32)
    detail = img - ndimage.gaussian_filter(img, sigma)
    ys, xs = np.nonzero(hidden)
    h, w = image.shape
    best, best_bad = (0, 0), None
    span_y, span_x = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    visible = ~hidden & (img > 8)          # not the lesion, not the black margin around the sector
    for step in (1, 2, 3):
        for dy, dx in ((step * span_y, 0), (-step * span_y, 0), (0, step * span_x), (0, -step * span_x),
                       (step * span_y, step * span_x), (-step * span_y, -step * span_x),
                       (step * span_y, -step * span_x), (-step * span_y, step * span_x)):
            ty, tx = ys + dy, xs + dx
            inside = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
            bad = int((~inside).sum() + (~visible[ty[inside], tx[inside]]).sum())
            if best_bad is None or bad < best_bad:
                best, best_bad = (dy, dx), bad
        if best_bad == 0:
            break
    out = np.zeros_like(img)
    ty, tx = np.clip(ys + best[0], 0, h - 1), np.clip(xs + best[1], 0, w - 1)
    out[ys, xs] = detail[ty, tx]
    return out


def fill_with_tissue(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Replace `region` by the smooth fill of `mask_out` plus speckle copied from nearby tissue, so that
    the hidden area looks like tissue: neither its outline nor its missing texture gives it away."""
    if not region.any():
        return image.copy()
    smooth = mask_out(image, region, margin=0).astype(np.float32)
    textured = smooth + _tissue_residual(image, region)
    return np.where(region, np.clip(textured, 0, 255), image).astype(np.uint8)


def lesion_box(mask: np.ndarray, margin: float = 0.25) -> np.ndarray:
    """The lesion's bounding box, enlarged by `margin` of its size on every side, as a boolean mask."""
    box = np.zeros_like(mask, bool)
    if not mask.any():
        return box
    ys, xs = np.nonzero(mask)
    my, mx = int(margin * np.ptp(ys)) + 1, int(margin * np.ptp(xs)) + 1
    box[max(ys.min() - my, 0):ys.max() + my + 1, max(xs.min() - mx, 0):xs.max() + mx + 1] = True
    return box


VERSIONS = {
    "original": "as it is",
    "overlays_removed": "bright overlays (calipers, text, markers) painted over",
    "lesion_masked": "lesion (dilated 4 px) filled smoothly from the tissue around it",
    "lesion_textured": "lesion (dilated 4 px) filled with tissue speckle copied from beside it",
    "box_textured": "a box 1.5x the lesion's size filled with tissue speckle: hides the outline too",
}


def _versions(predictor: Predictor, sample) -> dict[str, np.ndarray]:
    """The image of `sample` as the run sees it, and each altered version (VERSIONS)."""
    info = predictor.info
    size, resize = info.img_size, info.config.resize
    gray = load_gray(sample.path, working_size=True)
    if info.config.clean_overlays:
        gray = remove_overlays(gray)
    img = to_square(gray, size, resize)
    lesion = load_mask(sample.masks, sample.path, size, resize)
    dilated = ndimage.binary_dilation(lesion, iterations=4) if lesion.any() else lesion
    return {"original": img,
            "overlays_removed": img if info.config.clean_overlays else to_square(remove_overlays(gray), size, resize),
            "lesion_masked": mask_out(img, lesion),
            "lesion_textured": fill_with_tissue(img, dilated),
            "box_textured": fill_with_tissue(img, lesion_box(lesion))}


def shortcut_check(predictor: Predictor, data, max_images: int | None = None, skip_bad: bool = False) -> dict:
    """AUC and mean absolute change of the positive-class probability for each version (VERSIONS) of every
    image that has a lesion mask: as it is, with overlays removed, and with the lesion hidden three ways.
    With `skip_bad`, images or masks that cannot be read are left out (listed under `skipped_bad_images`)."""
    info = predictor.info
    if not info.binary:
        raise SonocadError("the shortcut check needs a binary run")
    samples = [s for s in discover(data, info.classes, allow_missing_classes=True) if s.masks]
    if not samples:
        raise SonocadError(f"{data}: no lesion masks found; the shortcut check needs them")
    samples = samples[:max_images] if max_images else samples
    versions: dict[str, list] = {k: [] for k in VERSIONS}
    kept, bad = [], []
    for s in samples:
        try:
            one = _versions(predictor, s)
        except SonocadError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
            continue
        kept.append(s)
        for k, v in one.items():
            versions[k].append(v)
    if not kept:
        raise SonocadError(f"{data}: none of the {len(samples)} images with masks could be read")
    y = np.asarray([info.classes.index(s.label) for s in kept])
    probs = {k: predictor.predict_proba(np.stack(v))[:, 1] for k, v in versions.items()}
    result = {"n": len(kept), "data": str(data), "skipped_bad_images": bad}
    for k, p in probs.items():
        auc, lo, hi = delong_auc_ci(y, p)
        result[k] = {"auc": auc, "auc_ci": [lo, hi],
                     "mean_abs_change": float(np.mean(np.abs(p - probs["original"])))}
    return result


def shortcut_section(sc: dict) -> str:
    """The report's HTML section for a shortcut_check result."""
    rows = [[k.replace("_", " "), VERSIONS[k], sc[k]["auc"], sc[k]["auc_ci"], sc[k]["mean_abs_change"]]
            for k in VERSIONS]
    return (f"<h2>Shortcut check</h2><p>{sc['n']} images with lesion masks, predicted as they are, with overlays "
            "painted over, and with the lesion hidden. A model that still separates the classes with the lesion "
            "and its outline hidden (box textured) reads something other than the lesion: annotations, the site's "
            "presets, surrounding anatomy. Posterior shadowing and enhancement lie below the box and are "
            "legitimate cues, so an AUC above 0.5 there is a warning, not proof.</p>"
            + html_table(["images", "how", "AUC", "AUC 95% CI", "mean |change| of P(positive)"], rows))
