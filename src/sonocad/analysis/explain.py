"""Where the model looked: Grad-CAM heatmaps for every sonocad model, and how well they agree with lesion masks.

sonocad's head is global average pooling, dense, ReLU, dense. The gradient of a class score with respect to
the last feature map A is then the same at every position, so Grad-CAM has a closed form from one forward
pass: the channel weights are (w_k * 1[z > 0]) @ W1 / (h * w), z the hidden layer's input. Other heads go
through autograd (the feature map is made a leaf, so frozen layers do not matter).

>>> from sonocad.deploy.predictor import Predictor
>>> from sonocad.analysis.explain import heatmaps
>>> p = Predictor.load("runs/busi")                                   # doctest: +SKIP
>>> cams, probs = heatmaps(p, p.decode(["scan.png"])[0])              # doctest: +SKIP
"""
from __future__ import annotations

import functools
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SonocadError
from ..evaluation.metrics import bootstrap_mean_ci, wilson_ci
from ..models.infer import all_views, tta_views


def _closed_form_head(head: nn.Module) -> bool:
    """sonocad's head: Linear, ReLU, Dropout, Linear (the closed form applies)."""
    kinds = [type(m) for m in head] if isinstance(head, nn.Sequential) else []
    return kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]


def _targets(target, n_out: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output row, sign) of the score explained, per image. Binary models: "positive" (+logit), "other"
    (-logit), or "predicted" (the class called at probability 0.5). Multi-class models: a class index, one per
    image (a sequence), or "predicted" (each image's most probable class)."""
    n = len(logits)
    ones = torch.ones(n)
    if n_out == 1:
        if target not in ("positive", "other", "predicted"):
            raise SonocadError(f"a binary model explains 'positive' or 'other', not {target!r}")
        sign = torch.where(logits[:, 0].cpu() >= 0, 1.0, -1.0) if target == "predicted" else ones * (
            -1.0 if target == "other" else 1.0)
        return torch.zeros(n, dtype=torch.long), sign
    if target == "predicted":
        return logits.argmax(1).cpu(), ones
    rows = torch.as_tensor(target, dtype=torch.long).expand(n) if np.ndim(target) == 0 else torch.as_tensor(target)
    if rows.numel() != n or (rows < 0).any() or (rows >= n_out).any():
        raise SonocadError(f"a model of {n_out} classes explains class indices 0..{n_out - 1}, not {target!r}")
    return rows.long(), ones


@torch.no_grad()
def _closed_form_weights(model, feats: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM's channel weights (N, channels) for sonocad's head, and the logits, from fp32 feature maps."""
    pooled = model.backbone.forward_head(feats, pre_logits=True)
    lin1, lin2 = model.head[0], model.head[3]
    z = lin1(pooled)
    logits = lin2(torch.relu(z))
    rows, sign = _targets(target, model.num_outputs, logits)
    gate = (z > 0).float() * lin2.weight.float()[rows.to(z.device)] * sign.to(z.device)[:, None]
    return gate @ lin1.weight.float() / (feats.shape[2] * feats.shape[3]), logits


def gradcam(model, x: torch.Tensor, target="positive", method: str = "auto",
            autocast=None, relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps (N, h, w) on the last feature map, and the logits (N, outputs), for a batch `x`.
    `target`: see _targets. `method`: "closed" (sonocad's head), "autograd", or "auto" (closed where it
    applies). `relu=False` keeps the negative evidence (the map before Grad-CAM's ReLU)."""
    import contextlib

    backbone, head = model.backbone, model.head
    closed = method == "closed" or (method == "auto" and _closed_form_head(head))
    if closed and not _closed_form_head(head):
        raise SonocadError("the closed form needs sonocad's head (pooling, dense, ReLU, dense)")
    with torch.no_grad(), (autocast or contextlib.nullcontext()):
        feats = backbone.forward_features(x)
    feats = feats.float()
    if closed:
        alpha, logits = _closed_form_weights(model, feats, target)
    else:
        feats = feats.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head(backbone.forward_head(feats, pre_logits=True))
            rows, sign = _targets(target, model.num_outputs, logits.detach())
            score = sign.to(logits.device) * logits.gather(1, rows.to(logits.device)[:, None])[:, 0]
            grad, = torch.autograd.grad(score.sum(), feats)
        alpha = grad.mean((2, 3))
        logits = logits.detach()
    cam = (alpha[:, :, None, None] * feats.detach()).sum(1)
    return (torch.relu(cam) if relu else cam), logits


def heatmaps(predictor, images: np.ndarray, target="positive", batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps of a run's model(s) for uint8 images (N, S, S), upsampled to S x S and scaled to
    [0, 1] per image (an ensemble averages its members' maps), and the class probabilities of the same single
    view (N, C). One forward pass per image and member."""
    size = images.shape[-1] if len(images) else 0
    maps, probs = [], []
    for model, pipeline in predictor.members:
        m_maps, m_probs = [], []
        for i in range(0, len(images), batch_size):
            x = pipeline(images[i:i + batch_size])
            cam, logits = gradcam(model, x, target, autocast=pipeline.precision.autocast())
            m_maps.append(_upsample(cam, size))
            m_probs.append(model.probabilities(logits.cpu()))
        maps.append(torch.cat(m_maps) if m_maps else torch.zeros(0, size, size))
        probs.append(torch.cat(m_probs) if m_probs else torch.zeros(0, 2))
    return _members_mean(maps), torch.stack(probs).mean(0).numpy()


def _upsample(cam: torch.Tensor, size: int) -> torch.Tensor:
    """Maps (N, h, w) bilinearly to (N, size, size), on the CPU."""
    return F.interpolate(cam[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0].cpu()


def _members_mean(maps: list[torch.Tensor]) -> np.ndarray:
    """The members' maps averaged, then scaled to [0, 1] per image."""
    cams = torch.stack(maps).mean(0).numpy()
    top = cams.reshape(len(cams), -1).max(1) if len(cams) else np.zeros(0)
    return (cams / np.maximum(top, 1e-12)[:, None, None]).astype(np.float32)


def explained_views(predictor, images: np.ndarray, target="positive") -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps of the plain view, class probabilities over the run's test-time views) for a few uint8
    images, as heatmaps() and predict_proba() give them, but from one forward pass per member: every view in
    one batch, the heatmap from the plain view's feature maps (sonocad's head; other heads take two passes)."""
    cfg = predictor.info.config
    if not all(_closed_form_head(m.head) for m, _ in predictor.members):
        return heatmaps(predictor, images, target)[0], predictor.predict_proba(images)
    views = tta_views(cfg.tta, cfg.tta_zooms)      # the plain view comes first
    n, size = len(images), images.shape[-1]
    maps, probs = [], []
    for model, pipeline in predictor.members:
        x = all_views(pipeline, images, views)
        with torch.no_grad(), pipeline.precision.autocast():
            feats = model.backbone.forward_features(x)
            logits = model.head(model.backbone.forward_head(feats, pre_logits=True)).float()   # = model(x)
        plain = feats[:n].float()
        alpha, _ = _closed_form_weights(model, plain, target)
        cam = torch.relu((alpha[:, :, None, None] * plain).sum(1))
        maps.append(_upsample(cam, size))
        probs.append(model.probabilities(logits.cpu().view(len(views), n, -1).mean(0)))
    return _members_mean(maps), torch.stack(probs).mean(0).numpy()


# --- agreement with the lesion --------------------------------------------------------------------------------

def pointing_tolerance(size: int) -> int:
    """The pointing game's tolerance: 15 px at 224 px (Zhang et al., 2018), scaled with the input size."""
    return max(1, round(15 * size / 224))


def lesion_agreement(cams: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: pointing-game hit (the map's maximum within the tolerance of the mask), energy inside the
    mask (its share of the map's sum), and the chance level of each (a uniformly random point; a uniform map)."""
    from scipy import ndimage

    n, size = len(cams), cams.shape[-1] if len(cams) else 0
    tol = pointing_tolerance(size)
    disk = np.hypot(*np.mgrid[-tol:tol + 1, -tol:tol + 1]) <= tol
    out = {k: np.zeros(n) for k in ("hit", "energy", "chance_hit", "chance_energy")}
    for i, (cam, mask) in enumerate(zip(cams, masks)):
        near = ndimage.binary_dilation(mask, structure=disk)
        y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
        out["hit"][i] = float(near[y, x])
        out["energy"][i] = float(cam[mask].sum() / max(cam.sum(), 1e-12))
        out["chance_hit"][i] = float(near.mean())
        out["chance_energy"][i] = float(mask.mean())
    return out


def summarize_agreement(per_image: dict[str, np.ndarray], y: np.ndarray, classes: list[str], size: int) -> dict:
    """Pointing game (Wilson 95% CI) and energy in the mask (bootstrap 95% CI), with their chance levels,
    overall and per class."""
    def block(idx):
        hits = per_image["hit"][idx]
        n = int(len(idx))
        return {"n": n,
                "pointing_game": float(hits.mean()) if n else float("nan"),
                "pointing_game_ci": list(wilson_ci(int(hits.sum()), n)),
                "pointing_game_chance": float(per_image["chance_hit"][idx].mean()) if n else float("nan"),
                "energy_in_mask": float(per_image["energy"][idx].mean()) if n else float("nan"),
                "energy_in_mask_ci": bootstrap_mean_ci(per_image["energy"][idx]),
                "energy_in_mask_chance": float(per_image["chance_energy"][idx].mean()) if n else float("nan")}

    out = {"method": "Grad-CAM of the class each image is called (probability 0.5 for binary models), on the "
                     "last feature map, upsampled to the input",
           "input_size": size, "pointing_tolerance_px": pointing_tolerance(size), **block(np.arange(len(y)))}
    out["per_class"] = {c: block(np.flatnonzero(y == k)) for k, c in enumerate(classes) if (y == k).any()}
    return out


def randomize_top(model: nn.Module, blocks: int = 2, seed: int = 0) -> nn.Module:
    """A copy of `model` with its head and top `blocks` backbone blocks re-initialised: the model
    randomisation test of Adebayo et al. (NeurIPS 2018). Explanations that do not change are not explaining
    the trained model."""
    import copy

    from ..models.classifier import backbone_blocks

    rnd = copy.deepcopy(model)
    torch.manual_seed(seed)
    names = {n for block in backbone_blocks(rnd.backbone)[-blocks:] for n in block} if blocks else set()
    with torch.no_grad():
        for name, p in rnd.backbone.named_parameters():     # in the model's order: the same draws every time
            if name in names:
                p.copy_(torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0))
        for m in rnd.head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return rnd


# --- pictures -------------------------------------------------------------------------------------------------

def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary pixels of a boolean mask."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=width) if mask.any() else mask


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render(image: np.ndarray, cam: np.ndarray, caption: str, mask: np.ndarray | None = None,
           scale: int = 2, alpha: float = 0.45):
    """A PIL picture: the scan as the model saw it with the heatmap over it (jet colours), the lesion outline
    (green) where a mask is known, and a caption line below."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    gray = np.repeat(image[..., None].astype(np.float32), 3, -1)
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255
    rgb = (1 - alpha * cam[..., None]) * gray + alpha * cam[..., None] * heat
    if mask is not None and mask.any():
        rgb[outline(mask, max(1, image.shape[0] // 112))] = (0, 255, 0)
    pic = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if scale != 1:
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
    font = _font(max(10, pic.width // 28))
    bar = max(18, pic.width // 14)
    canvas = Image.new("RGB", (pic.width, pic.height + bar), (255, 255, 255))
    canvas.paste(pic, (0, 0))
    ImageDraw.Draw(canvas).text((4, pic.height + 2), caption, fill=(0, 0, 0), font=font)
    return canvas


def caption(predictor, p: np.ndarray) -> str:
    """P(positive) and the decision at the run's default operating point (or the most probable class)."""
    info = predictor.info
    if info.binary:
        decision = predictor.decide(p[None])[0]
        return f"P({info.classes[1]}) = {p[1]:.3f}: {decision} at threshold {predictor.threshold:.2f}"
    k = int(np.argmax(p))
    return f"{info.classes[k]} (P = {p[k]:.3f})"


def default_target(predictor) -> str:
    """What a picture explains unless asked otherwise: the positive class (binary), the class each image is
    called (multi-class)."""
    return "positive" if predictor.info.binary else "predicted"


def gallery_section(predictor, images: np.ndarray, y: np.ndarray, probs: np.ndarray, samples: list,
                    limit: int = 8) -> str:
    """The report's gallery of the test part: the most confident true positives and negatives, and every
    false negative and false positive (up to `limit` each), with their heatmaps and lesion outlines."""
    import base64
    import html
    import io

    from ..data.images import load_mask

    if not predictor.info.binary or not len(y):
        return ""
    p = probs[:, 1]
    called = p >= predictor.threshold
    groups = [("false negatives", np.flatnonzero((y == 1) & ~called), p, False),
              ("false positives", np.flatnonzero((y == 0) & called), p, True),
              ("most confident true positives", np.flatnonzero((y == 1) & called), p, True),
              ("most confident true negatives", np.flatnonzero((y == 0) & ~called), p, False)]
    parts = []
    for title, idx, score, descending in groups:
        idx = idx[np.argsort(-score[idx] if descending else score[idx], kind="stable")]
        shown = idx[:limit if "false" in title else min(4, limit)]
        if not len(shown):
            continue
        cams, _ = heatmaps(predictor, images[shown])
        tiles = []
        for k, i in enumerate(shown):
            s = samples[i]
            try:
                mask = load_mask(s.masks, s.path, images.shape[-1], predictor.info.config.resize) if s.masks else None
            except SonocadError:
                mask = None
            buf = io.BytesIO()
            render(images[i], cams[k], caption(predictor, probs[i]), mask, scale=1).save(buf, "PNG")
            data = base64.b64encode(buf.getvalue()).decode()
            tiles.append(f'<figure style="display:inline-block;margin:4px"><img src="data:image/png;base64,{data}" '
                         f'alt="heatmap"><figcaption style="font-size:75%">{html.escape(str(s.path))}</figcaption>'
                         "</figure>")
        more = f" (first {len(shown)} of {len(idx)})" if len(idx) > len(shown) else f" ({len(idx)})"
        parts.append(f"<h3>{title}{more}</h3>" + "".join(tiles))
    return ("<h2>Where the model looked (test part)</h2><p>Grad-CAM of the positive class over the scan as the "
            "model saw it; green: the lesion outline where a mask is known. A heatmap shows what moved the score, "
            "not why; it is no proof that the model reads the lesion.</p>" + "".join(parts))


def explanation_metrics(predictor, images: np.ndarray, samples: list, y: np.ndarray) -> dict:
    """Agreement of the heatmaps with the lesion masks of `samples` (those with masks), overall and per class."""
    from ..data.images import load_mask

    size, resize = images.shape[-1], predictor.info.config.resize
    masks = np.stack([load_mask(s.masks, s.path, size, resize) for s in samples])
    cams, _ = heatmaps(predictor, images, "predicted")     # the evidence for what the model said
    return summarize_agreement(lesion_agreement(cams, masks), y, predictor.classes, size)


def sibling_masks(path: str) -> tuple[str, ...]:
    """Lesion masks stored beside an image the BUSI way (`<image>_mask.png`, `<image>_mask_1.png`, ...) or the
    BUS-BRA way (`Images/bus_X.png` and `Masks/mask_X.png`)."""
    import glob
    from pathlib import Path

    from ..data.discover import MASK_RE

    p = Path(path)
    if not p.is_file():
        return ()
    busbra = p.parent.parent / "Masks" / f"{p.stem.replace('bus_', 'mask_', 1)}{p.suffix}"
    if p.parent.name == "Images" and p.stem.startswith("bus_") and busbra.is_file():
        return (str(busbra),)
    found = []
    for m in p.parent.glob(f"{glob.escape(p.stem)}_mask*"):
        hit = MASK_RE.match(m.stem)
        if hit and hit["stem"] == p.stem and m.is_file():
            found.append(str(m))
    return tuple(sorted(found))


PICTURE = re.compile(r"\d{5,}_.*\.png")      # what picture_name gives


def picture_name(index: int, path: str) -> str:
    """A file name for the picture of input `index`: its number (inputs may share names) and its stem."""
    from pathlib import Path

    stem = re.sub(r"[^\w.-]+", "_", Path(str(path).replace("#frame=", "_frame")).stem)[:80]
    return f"{index:05d}_{stem}.png"


def write_pictures(predictor, paths: list[str], images: np.ndarray, out, start: int = 0, target=None,
                   with_masks: bool = True, probs: np.ndarray | None = None, scale: int = 2) -> list[dict]:
    """Heatmap pictures of decoded images into folder `out` (one forward pass each); returns a row per image:
    path, picture, the single-view probabilities, and the agreement with the lesion where a mask is beside it."""
    from pathlib import Path

    from ..data.images import load_mask
    from ..io.files import atomic_path

    cams, single_view = heatmaps(predictor, images, target or default_target(predictor))
    probs = single_view if probs is None else probs       # the caption shows the prediction as made (all views)
    rows = []
    for k, (path, image, cam, p) in enumerate(zip(paths, images, cams, probs)):
        masks = sibling_masks(path) if with_masks else ()
        mask = load_mask(masks, path, image.shape[-1], predictor.info.config.resize) if masks else None
        name = picture_name(start + k, path)
        with atomic_path(Path(out) / name, fsync=False) as tmp:     # a picture, not a run's file
            render(image, cam, caption(predictor, p), mask, scale).save(tmp, "PNG", compress_level=1)
        row = {"path": path, "heatmap": name}
        if mask is not None:
            agree = lesion_agreement(cam[None], mask[None])
            row.update(pointing_hit=int(agree["hit"][0]), energy_in_mask=float(agree["energy"][0]))
        rows.append(row)
    return rows
