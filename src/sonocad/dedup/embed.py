"""CNN embeddings for the duplicate search: sonocad's backbone with its ImageNet weights, built once per
process, fed through sonocad's own input pipeline (the backbone's mean and std, its precision)."""
from __future__ import annotations

import numpy as np

from ..errors import SonocadError
from .settings import DEFAULT, DedupSettings

_BACKBONES: dict = {}   # model name -> (model, InputPipeline)


def backbone(name: str):
    """(model, input pipeline) of timm backbone `name` with its ImageNet weights, built once per process
    at the precision `resolve_precision("auto")` picks (bf16 autocast + channels_last on bf16-capable CPUs)."""
    if name not in _BACKBONES:
        import torch

        from ..models.classifier import create_model, input_config
        from ..models.infer import InputPipeline, resolve_precision

        prec = resolve_precision("auto")
        with torch.random.fork_rng(devices=[]):   # random inits (its unused head) must not move the caller's RNG
            _, mean, std = input_config(name)
            model = create_model(name, 1).eval().to(prec.device)
        if prec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        _BACKBONES[name] = (model, InputPipeline(mean, std, prec))
    return _BACKBONES[name]


def embed_images(squares: np.ndarray, settings: DedupSettings = DEFAULT, batch_size: int = 32,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised embeddings of square uint8 gray images (N, S, S) by `settings.embed_model`: the
    backbone's pooled features (N, F) and the average-pooled output of stage `settings.mid_block` (N, C)."""
    import torch
    import torch.nn.functional as F

    model, pipeline = backbone(settings.embed_model)
    blocks = getattr(model.backbone, "blocks", None)
    if blocks is None:
        raise SonocadError("embed_model must have its stages in .blocks (EfficientNet-like), "
                           f"got {settings.embed_model!r}")
    if settings.mid_block >= len(blocks):
        raise SonocadError(f"mid_block must be below {len(blocks)} (the stages of {settings.embed_model}), "
                           f"got {settings.mid_block}")
    out, mid = [], []
    hook = blocks[settings.mid_block].register_forward_hook(
        lambda m, i, o: mid.append(o.float().mean((2, 3)).cpu()))
    starts = range(0, len(squares), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="embed", leave=False)
    try:
        with torch.no_grad():
            for i in starts:
                x = pipeline(squares[i:i + batch_size])
                with pipeline.precision.autocast():
                    out.append(model.forward_features(x).float().cpu())
    finally:
        hook.remove()
    if not out:
        return np.zeros((0, model.backbone.num_features), np.float32), np.zeros((0, 1), np.float32)
    return F.normalize(torch.cat(out), dim=-1).numpy(), F.normalize(torch.cat(mid), dim=-1).numpy()
