"""The head fine-tuned on frozen backbone features computed once, for several schedules in one pass: what
`sonocad adapt` trains inside each cross-fitting fold and then on all local scans.

>>> feats = view_features(model, images, pipeline, cfg, seed=0)                 # doctest: +SKIP
>>> states = train_head(model.head, feats.train[:, idx], y[idx], [0, 5, 20], cfg, seed=0)   # doctest: +SKIP
>>> logits = head_logits(model.head, feats.score)        # (N,) averaged over the test-time views  # doctest: +SKIP
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..models.classifier import Classifier, fold_batchnorm
from ..models.infer import InputPipeline, tta_views
from .optim import make_loss, make_optimizer


@dataclass
class ViewFeatures:
    """Pooled backbone features of N images: `train` (V, N, D), the image as it is and V - 1 augmented views
    (what the head learns on); `score` (T, N, D), the run's test-time views (what its predictions average)."""

    train: torch.Tensor
    score: torch.Tensor

    def take(self, idx) -> "ViewFeatures":
        return ViewFeatures(self.train[:, idx], self.score[:, idx])


@torch.no_grad()
def view_features(model: Classifier, images: np.ndarray, pipeline: InputPipeline, cfg: TrainConfig, seed: int,
                  batch_size: int = 64) -> ViewFeatures:
    """Features of `images` (uint8 (N, S, S)) through `model`'s frozen backbone: the views of `cfg`'s test-time
    augmentation, and `cfg.feature_views` augmented views drawn with `seed` (as phase 1 of training draws them)."""
    backbone = fold_batchnorm(model.backbone)
    gen = torch.Generator().manual_seed(seed)

    def features(**view) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            x = pipeline(images[i:i + batch_size], **view)      # outside autocast, as infer.run_batches
            with pipeline.precision.autocast():
                out.append(backbone(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, model.backbone.num_features)

    views = tta_views(cfg.tta, cfg.tta_zooms)
    score = torch.stack([features(zoom=zoom, flip=flip) for zoom, flip in views])
    plain = score[views.index((1.0, False))]
    augmented = [features(gen=gen) for _ in range(cfg.feature_views if cfg.augment else 0)]
    return ViewFeatures(torch.stack([plain, *augmented]), score)


def train_head(head: nn.Module, train: torch.Tensor, y: np.ndarray, epochs: list[int], cfg: TrainConfig,
               seed: int, lr: float | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """A copy of `head` trained on every view of the N images (`train`: (V, N, D)) with the class-weighted loss
    of `cfg.balance`, cfg's optimiser at the constant rate `lr` (default cfg.head_lr), batches of
    cfg.batch_size; its state dict after each number of epochs in `epochs` (0: `head` as it is)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # steps this small only wait on each other across threads (10x slower on 2)
    try:
        return _train_head(head, train, y, epochs, cfg, seed, lr)
    finally:
        torch.set_num_threads(threads)


def _train_head(head: nn.Module, train: torch.Tensor, y: np.ndarray, epochs: list[int], cfg: TrainConfig,
                seed: int, lr: float | None) -> dict[int, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)                  # dropout
    gen = torch.Generator().manual_seed(seed)
    head = copy.deepcopy(head).float().cpu()
    v, n = train.shape[:2]
    x = train.reshape(v * n, -1)
    labels = torch.from_numpy(np.tile(np.asarray(y), v))
    loss_fn = make_loss(np.asarray(y), 2, cfg.balance)
    opt = make_optimizer(head.parameters(), cfg, cfg.head_lr if lr is None else lr)
    states = {}
    for epoch in range(max(epochs, default=0) + 1):
        if epoch in epochs:
            states[epoch] = {k: t.detach().clone() for k, t in head.state_dict().items()}
        if epoch == max(epochs):
            break
        head.train()
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(head(x[idx]), labels[idx]).backward()
            opt.step()
    return states


def averaged(state: dict[str, torch.Tensor], init: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """WiSE-FT on a head: each tensor (1 - share) * fine-tuned + share * init (as optim.average_with_init)."""
    return {k: torch.lerp(v, init[k].to(v), share) if v.is_floating_point() else v for k, v in state.items()}


@torch.no_grad()
def head_logits(head: nn.Module, score: torch.Tensor) -> np.ndarray:
    """The binary head's logit of each image averaged over its views (`score`: (T, N, D) -> (N,)), as
    infer.run_batches averages a model's over the test-time views."""
    head = head.float().cpu().eval()
    t, n = score.shape[:2]
    return head(score.reshape(t * n, -1)).view(t, n, -1).mean(0)[:, 0].numpy().astype(float)


def with_state(head: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `head` holding `state`."""
    out = copy.deepcopy(head).float().cpu()
    out.load_state_dict(state)
    return out


def fold_platt(head: nn.Sequential, slope: float, intercept: float) -> None:
    """Platt scaling folded into the head's output layer: its logit z becomes slope * z + intercept, which
    the test-time average (a mean of logits) keeps exactly."""
    last = head[-1]
    with torch.no_grad():
        last.weight.mul_(slope)
        last.bias.mul_(slope).add_(intercept)
