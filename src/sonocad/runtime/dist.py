"""Distributed training with PyTorch's own engine: a process group from torchrun's environment (NCCL on CUDA, gloo
on CPU), the rank's share of each batch, and the few things ranks must agree on.

Launched by `torchrun --nproc_per_node N -m sonocad train ...` (or `sonocad train --devices N`, which runs that).
Outside torchrun every function here is the one-process identity: rank 0 of a world of 1.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import SonocadError


def launched() -> bool:
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun describes (once); on CUDA each rank takes the GPU of its local rank."""
    if launched() and not dist.is_initialized():
        if torch.cuda.is_available():
            local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= gpus:
                raise SonocadError(f"process {local} of this machine has no GPU of its own ({gpus} here): start at "
                                   f"most {gpus} per machine (--devices / --nproc-per-node)")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the only process that writes a run's files."""
    return rank() == 0


def backend() -> str | None:
    return dist.get_backend() if active() else None


def record() -> dict:
    """What a run's config.json says about how it was trained: {} in one process."""
    return {"world_size": world_size(), "backend": backend()} if active() else {}


def broadcast(obj):
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """`module` in DistributedDataParallel (gradients averaged over ranks), or itself in one process. A fresh
    wrapper per phase: the parameters that train change between phases."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    # frozen BatchNorm: the buffers never change, so they are synced once, at the start, not at every step
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def shard(batch):
    """This rank's part of a global batch of indices drawn with a seed shared by all ranks: equal parts, in rank
    order (a full global batch of world_size x B gives each rank B)."""
    import numpy as np

    return np.array_split(batch, world_size())[rank()] if active() else batch


class TrainingForward(torch.nn.Module):
    """What one training step runs through DistributedDataParallel: the classifier's logits, and with `masks`
    its lesion-mask logits too (DDP averages the gradients of what its wrapped forward returns)."""

    def __init__(self, model: torch.nn.Module, masks: bool):
        super().__init__()
        self.model, self.masks = model, masks

    def forward(self, x: torch.Tensor):
        return self.model.forward_with_mask(x) if self.masks else (self.model(x), None)
