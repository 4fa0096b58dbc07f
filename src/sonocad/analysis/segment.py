"""Lesion masks from a model trained with the mask head (lesion-aware training): prediction, Dice against the
masks the data ship, mask files at the scans' own size, and the report's outlines.

>>> from sonocad.deploy.predictor import Predictor
>>> from sonocad.analysis.segment import predict_masks
>>> p = Predictor.load("runs/busi")                                      # doctest: +SKIP
>>> prob = predict_masks(p, p.decode(["scan.png"])[0])                   # (1, S, S) P(lesion) per pixel  # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np

from ..data.images import from_square, image_size, load_mask
from ..errors import SonocadError
from ..evaluation.metrics import bootstrap_mean_ci
from ..models.infer import run_batches
from ..models.maskhead import dice_scores

THRESHOLD = 0.5      # a pixel is lesion at P(lesion) >= 0.5


def has_mask_head(predictor) -> bool:
    """True when the predictor's model (any member of an ensemble) predicts lesion masks."""
    return any(getattr(m, "mask_head", None) is not None for m, _ in predictor.members)


def predict_masks(predictor, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """P(lesion) of every pixel (N, S, S) for decoded uint8 images (N, S, S): the image as it is (no test-time
    views), averaged over the members that have a mask head."""
    members = [(m, p) for m, p in predictor.members if getattr(m, "mask_head", None) is not None]
    if not members:
        raise SonocadError("this model has no lesion-mask head (it was trained without masks, or with "
                           "--seg-weight 0)")
    if not len(images):
        return np.zeros((0, *images.shape[1:]), np.float32)
    return np.mean([run_batches(m.mask_probability, images, p, batch_size) for m, p in members], axis=0)


def true_masks(samples: list, size: int, resize: str) -> tuple[np.ndarray, list[int]]:
    """(bool masks (K, S, S), indices of the K samples whose masks could be read) for samples with masks."""
    masks, kept = [], []
    for i, s in enumerate(samples):
        if not s.masks:
            continue
        try:
            masks.append(load_mask(s.masks, s.path, size, resize))
            kept.append(i)
        except SonocadError:
            continue        # a mask that does not fit its image says nothing about the model
    return (np.stack(masks) if masks else np.zeros((0, size, size), bool)), kept


def segmentation_metrics(prob: np.ndarray, masks: np.ndarray, y: np.ndarray | None = None,
                         classes: list[str] | None = None) -> tuple[dict, np.ndarray]:
    """({dice_mean, dice_ci (bootstrap 95%), dice_median, n, per class}, per-image Dice) of predicted lesion
    probabilities (N, S, S) against true masks (N, S, S), at P(lesion) >= 0.5, at the model's input size."""
    dice = dice_scores(prob >= THRESHOLD, masks)
    out = {"dice_mean": float(dice.mean()) if len(dice) else float("nan"), "dice_ci": bootstrap_mean_ci(dice),
           "dice_median": float(np.median(dice)) if len(dice) else float("nan"), "n": int(len(dice)),
           "threshold": THRESHOLD, "measured": "Dice of the predicted mask (P(lesion) >= 0.5) with the data's mask, "
                                              "per image at the model's input size, then averaged"}
    if y is not None and classes:
        out["per_class"] = {c: {"dice_mean": float(dice[y == k].mean()), "n": int((y == k).sum())}
                            for k, c in enumerate(classes) if (y == k).any()}
    return out, dice


def write_masks(predictor, paths: list[str], images: np.ndarray, out, names: list[str]) -> None:
    """Each image's predicted lesion mask as a black-and-white PNG of the scan's own size, named `names`."""
    from pathlib import Path

    from PIL import Image

    from ..io.files import atomic_path

    prob = predict_masks(predictor, images)
    resize = predictor.info.config.resize
    for path, p, name in zip(paths, prob, names):
        mask = from_square(p, image_size(path), resize)
        with atomic_path(Path(out) / name, fsync=False) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, "PNG")


def _panel(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    from scipy import ndimage

    rgb = np.repeat(image[..., None], 3, -1).copy()
    width = max(1, image.shape[0] // 112)
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width) if mask.any() else mask
    rgb[edge] = colour
    return rgb


def outline_picture(image: np.ndarray, prob: np.ndarray):
    """The scan (uint8 (S, S)) with the predicted lesion's outline drawn in red (P(lesion) >= 0.5), as an RGB
    PIL image; the scan alone where no pixel reaches it."""
    from PIL import Image

    return Image.fromarray(_panel(image, prob >= THRESHOLD, (230, 0, 0)))


def outlines_section(images: np.ndarray, masks: np.ndarray, prob: np.ndarray, dice: np.ndarray, labels: list[str],
                     limit: int = 8) -> str:
    """The report's pictures: for `limit` images spread from the lowest to the highest Dice, the scan with the
    true lesion outline (green) beside the same scan with the predicted one (red)."""
    import base64
    import html
    import io

    from PIL import Image

    if not len(dice):
        return ""
    order = np.argsort(dice, kind="stable")
    shown = order[np.unique(np.linspace(0, len(order) - 1, min(limit, len(order))).round().astype(int))]
    tiles = []
    for i in shown:
        pair = np.concatenate([_panel(images[i], masks[i], (0, 200, 0)), np.full((images.shape[1], 4, 3), 255, np.uint8),
                               _panel(images[i], prob[i] >= THRESHOLD, (230, 0, 0))], axis=1)
        buf = io.BytesIO()
        Image.fromarray(pair).save(buf, "PNG")
        data = base64.b64encode(buf.getvalue()).decode()
        tiles.append(f'<figure style="display:inline-block;margin:4px"><img src="data:image/png;base64,{data}" '
                     f'alt="lesion outlines"><figcaption style="font-size:75%">{html.escape(labels[i])}: Dice '
                     f"{dice[i]:.2f}</figcaption></figure>")
    return ("<h2>Lesion masks</h2><p>Left: the lesion outline the data give (green); right: the one the model "
            f"predicts (red, P(lesion) &ge; {THRESHOLD}). {len(shown)} images from the lowest to the highest Dice, "
            f"of {len(dice)} with masks. Mean Dice {dice.mean():.3f}.</p>" + "".join(tiles))


def segmentation_report(predictor, metrics: dict, images, samples: list, y, columns: dict | None = None) -> str:
    """Adds metrics["segmentation"] (Dice of the predicted lesion masks on the samples with masks) when the model
    has a mask head, and each sample's Dice to `columns["lesion_dice"]` (empty where no mask is known); returns
    the report's section of outlines ("" otherwise)."""
    if not has_mask_head(predictor):
        return ""
    masks, kept = true_masks(samples, images.shape[-1], predictor.info.config.resize)
    if not kept:
        return ""
    prob = predict_masks(predictor, images[kept])
    metrics["segmentation"], dice = segmentation_metrics(prob, masks, y[kept], predictor.classes)
    if columns is not None:
        per_sample = dict(zip(kept, dice))
        columns["lesion_dice"] = [f"{per_sample[i]:.4f}" if i in per_sample else "" for i in range(len(samples))]
    return outlines_section(images[kept], masks, prob, dice, [f"{samples[i].label} {samples[i].path}" for i in kept])

