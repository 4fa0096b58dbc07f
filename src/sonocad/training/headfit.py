"""The top of a classifier fine-tuned on frozen backbone activations computed once, for several schedules in one
pass: what `sonocad adapt` trains inside each cross-fitting fold and then on all local scans.

The classifier is cut in two at `depth`: the bottom (frozen) runs once per view of every image; the tail (the
backbone's top `depth` blocks, its pooling and the head) trains on what the bottom gave. Depth 0 trains the head
alone on pooled features; depth 2, on an EfficientNet, also its last stage and conv_head (the two blocks that
phase 2 of training unfreezes by default).

>>> tail = Tail(model, depth=2)
>>> feats = view_features(model, tail, images, pipeline, cfg, seed=0)                   # doctest: +SKIP
>>> states = train_tail(tail, feats.train[:, idx], y[idx], [0, 5, 20], cfg, seed=0)      # doctest: +SKIP
>>> logits = tail_logits(tail, feats.score)           # (N,) averaged over the test-time views  # doctest: +SKIP
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..errors import OptionError
from ..models.classifier import Classifier, fold_batchnorm, freeze_batchnorm
from ..models.infer import InputPipeline, Precision, tta_views
from .optim import make_loss, make_optimizer


class Tail(nn.Module):
    """The part of `model` that fine-tunes: its backbone's top `depth` blocks (copies), pooling, and the head.
    `bottom` is the frozen rest (shared with `model`, BatchNorm folded), from the input to the cut."""

    def __init__(self, model: Classifier, depth: int = 0):
        super().__init__()
        b = model.backbone
        if depth:
            if not all(hasattr(b, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")):
                raise OptionError("blocks", f"fine-tuning below the head needs an EfficientNet backbone, not "
                                  f"{b.__class__.__name__}; use 0 (the head alone)")
            if not 0 < depth <= 1 + len(b.blocks):
                raise OptionError("blocks", f"must be between 0 and {1 + len(b.blocks)}, not {depth}")
        self.depth = depth
        stages = len(b.blocks) - max(0, depth - 1)
        self.names = ([f"blocks.{i}" for i in range(stages, len(b.blocks))] + ["conv_head", "bn2"]) if depth else []
        self.top = nn.ModuleList(copy.deepcopy(b.get_submodule(n)) for n in self.names)
        self.pool = copy.deepcopy(b.global_pool) if depth else nn.Identity()
        self.head = copy.deepcopy(model.head)
        self.bottom = fold_batchnorm(nn.Sequential(b.conv_stem, b.bn1, *b.blocks[:stages]) if depth else b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.top:
            x = m(x)
        return self.head(self.pool(x))

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The state of what trains (top blocks and head), as `train_tail` returns it."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("bottom.")}

    def with_state(self, state: dict[str, torch.Tensor]) -> "Tail":
        """A copy holding `state` (of trained_state), its bottom shared with this one."""
        bottom = self._modules.pop("bottom")
        try:
            out = copy.deepcopy(self)
        finally:
            self.bottom = bottom
        out.bottom = bottom
        out.load_state_dict(state, strict=False)
        return out

    def write_into(self, model: Classifier) -> None:
        """Copy the tail's top blocks and head into `model` (the classifier it was cut from)."""
        for name, module in zip(self.names, self.top):
            model.backbone.get_submodule(name).load_state_dict(module.state_dict())
        model.head.load_state_dict(self.head.state_dict())


@dataclass
class ViewFeatures:
    """What the bottom gives for N images: `train` (V, N, ...), the image as it is and V - 1 augmented views
    (what the tail learns on); `score` (T, N, ...), the run's test-time views (what its predictions average)."""

    train: torch.Tensor
    score: torch.Tensor

    def take(self, idx) -> "ViewFeatures":
        return ViewFeatures(self.train[:, idx], self.score[:, idx])


@torch.no_grad()
def view_features(tail: Tail, images: np.ndarray, pipeline: InputPipeline, cfg: TrainConfig, seed: int,
                  batch_size: int = 64) -> ViewFeatures:
    """The bottom's output for `images` (uint8 (N, S, S)): the views of `cfg`'s test-time augmentation, and
    `cfg.feature_views` augmented views drawn with `seed` (as phase 1 of training draws them). Feature maps are
    kept in bf16 where the model runs in bf16 (half the memory), otherwise in fp32."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.bfloat16 if tail.depth and pipeline.precision.dtype == torch.bfloat16 else torch.float32

    def features(**view) -> torch.Tensor:
        out = [torch.zeros(0)]
        for i in range(0, len(images), batch_size):
            x = pipeline(images[i:i + batch_size], **view)      # outside autocast, as infer.run_batches
            with pipeline.precision.autocast():
                out.append(tail.bottom(x).to(keep).cpu())
        return torch.cat(out[1:]) if len(out) > 1 else torch.zeros(0)

    views = tta_views(cfg.tta, cfg.tta_zooms)
    score = torch.stack([features(zoom=zoom, flip=flip) for zoom, flip in views])
    plain = score[views.index((1.0, False))]
    augmented = [features(gen=gen) for _ in range(cfg.feature_views if cfg.augment else 0)]
    return ViewFeatures(torch.stack([plain, *augmented]), score)


def train_tail(tail: Tail, train: torch.Tensor, y: np.ndarray, epochs: list[int], cfg: TrainConfig,
               seed: int, precision: Precision | None = None, lr: float | None = None) -> dict[int, dict]:
    """A copy of `tail` trained on every view of the N images (`train`: (V, N, ...)) with the class-weighted loss
    of `cfg.balance`, cfg's optimiser at the constant rate `lr` (default: cfg.head_lr for the head alone,
    cfg.finetune_lr with blocks), BatchNorm statistics frozen, batches of cfg.batch_size, under `precision`'s
    autocast (fp32 weights); its trained state after each number of epochs in `epochs` (0: as it is)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # steps this small wait on each other across threads (5-10x slower on 2 busy cores)
    try:
        return _train(tail, train, y, epochs, cfg, seed, precision,
                      (cfg.finetune_lr if tail.depth else cfg.head_lr) if lr is None else lr)
    finally:
        torch.set_num_threads(threads)


def _train(tail: Tail, train: torch.Tensor, y: np.ndarray, epochs: list[int], cfg: TrainConfig, seed: int,
           precision: Precision | None, lr: float) -> dict[int, dict[str, torch.Tensor]]:
    autocast = _cpu_autocast(precision)
    torch.manual_seed(seed)                  # dropout
    gen = torch.Generator().manual_seed(seed)
    net = tail.with_state(tail.trained_state()).float()
    v, n = train.shape[:2]
    x = train.reshape(v * n, *train.shape[2:])
    labels = torch.from_numpy(np.tile(np.asarray(y), v))
    loss_fn = make_loss(np.asarray(y), 2, cfg.balance)
    params = [p for m in (net.top, net.head) for p in m.parameters()]
    opt = make_optimizer(params, cfg, lr)
    states = {}
    for epoch in range(max(epochs, default=0) + 1):
        if epoch in epochs:
            states[epoch] = net.trained_state()
        if epoch == max(epochs):
            break
        net.train()
        freeze_batchnorm(net)
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits = net(x[idx].float())
            loss_fn(logits, labels[idx]).backward()
            opt.step()
    return states


def _cpu_autocast(precision: Precision | None):
    """`precision`'s autocast where the tail runs (on the CPU: the features are kept there), else none."""
    return precision.autocast if precision is not None and precision.device.type == "cpu" else nullcontext


def averaged(state: dict[str, torch.Tensor], init: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """WiSE-FT on a tail: each tensor (1 - share) * fine-tuned + share * init (as optim.average_with_init)."""
    return {k: torch.lerp(v, init[k].to(v), share) if v.is_floating_point() else v for k, v in state.items()}


@torch.no_grad()
def tail_logits(tail: Tail, score: torch.Tensor, precision: Precision | None = None,
                batch_size: int = 256) -> np.ndarray:
    """The binary tail's logit of each image averaged over its views (`score`: (T, N, ...) -> (N,)), as
    infer.run_batches averages a model's over the test-time views, under `precision`'s autocast."""
    autocast = _cpu_autocast(precision)
    tail.eval()
    t, n = score.shape[:2]
    out = [torch.zeros(t, 0)]
    for i in range(0, n, batch_size):
        part = score[:, i:i + batch_size]
        with autocast():
            logits = tail(part.reshape(-1, *score.shape[2:]).float()).float()
        out.append(logits.view(t, part.shape[1], -1)[..., 0])
    return torch.cat(out, 1).mean(0).numpy().astype(float)


def fold_platt(tail: Tail, slope: float, intercept: float) -> None:
    """Platt scaling folded into the head's output layer: its logit z becomes slope * z + intercept, which the
    test-time average (a mean of logits) keeps exactly."""
    last = tail.head[-1]
    with torch.no_grad():
        last.weight.mul_(slope)
        last.bias.mul_(slope).add_(intercept)
