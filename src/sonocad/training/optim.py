"""Losses, optimisers, the phase-2 learning-rate schedule, the weights' moving average and their average with
the --init run's."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import TrainConfig


def make_loss(y: np.ndarray, n_classes: int, balance: str) -> nn.Module:
    """Class-weighted BCE (binary, one logit) or cross-entropy; unweighted unless balance='weighted'.
    Logits are taken in fp32 whatever precision produced them (bf16 logits and fp32 class weights do not mix)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    if n_classes == 2:
        pos_weight = torch.tensor(counts[0] / max(counts[1], 1)) if balance == "weighted" else None
        return _Fp32Loss(nn.BCEWithLogitsLoss(pos_weight=pos_weight), binary=True)
    weight = torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    return _Fp32Loss(nn.CrossEntropyLoss(weight=weight if balance == "weighted" else None), binary=False)


class _Fp32Loss(nn.Module):
    def __init__(self, loss: nn.Module, binary: bool):
        super().__init__()
        self.loss, self.binary = loss, binary

    def forward(self, logits, y):
        self.loss.to(logits.device)         # class weights follow the logits (CPU validation, GPU training)
        if self.binary:
            return self.loss(logits[:, 0].float(), y.float())
        return self.loss(logits.float(), y.long())


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, scaler: torch.amp.GradScaler, sched=None) -> float:
    """One optimisation step on a batch's loss, through `scaler` (loss scaling in fp16, a pass-through
    otherwise); `sched` steps too when given (phase 2 schedules per batch, phase 1 per epoch). Returns the loss."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    if sched is not None:
        sched.step()
    return loss.item()


def make_optimizer(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def weight_average(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> AveragedModel | None:
    """Phase 2's exponential moving average of `model`'s weights over cfg.ema_epochs epochs (None when 0):
    call `.update_parameters(model)` after every step; `.module` is the averaged model."""
    if cfg.ema_epochs <= 0:
        return None
    # single epochs' weights swing with the last few batches; their moving average is steadier
    decay = 1.0 - 1.0 / max(1.0, cfg.ema_epochs * steps_per_epoch)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: linear warm-up over `warmup` steps (factor (k+1)/(warmup+1) at step k), then cosine
    annealing to 0 at step `total`."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cosine = CosineAnnealingLR(opt, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    ramp = LinearLR(opt, start_factor=1 / (warmup + 1), end_factor=warmup / (warmup + 1),
                    total_iters=max(1, warmup - 1))
    return SequentialLR(opt, [ramp, cosine], milestones=[warmup])


def init_snapshot(model: nn.Module, share: float) -> dict[str, torch.Tensor]:
    """--keep-init: copies of the weights and BatchNorm statistics that came from --init (the state-dict prefixes
    in `model.from_init`), to average back in after fine-tuning; empty when `share` is 0."""
    parts = tuple(getattr(model, "from_init", ()))
    if not (share and parts):
        return {}
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.startswith(parts) and v.is_floating_point()}


def average_with_init(model: nn.Module, init_state: dict[str, torch.Tensor], share: float) -> None:
    """WiSE-FT (Wortsman et al., 2022): each weight of `init_state` becomes (1 - share) * fine-tuned + share * init;
    the parts trained from scratch (a new head) stay as trained."""
    if init_state:
        state = model.state_dict()
        model.load_state_dict({**state, **{k: torch.lerp(state[k], v.to(state[k].device), share)
                                           for k, v in init_state.items()}})
