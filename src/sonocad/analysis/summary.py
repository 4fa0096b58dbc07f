"""Parameter counts and a memory estimate, like the notebook's Keras memory helper but per phase."""
from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig
from ..models.classifier import create_model, input_config, set_trainable


def activation_elements(model: nn.Module, img_size: int) -> int:
    """Number of output elements of all leaf modules for one image (what training keeps for backward)."""
    total = 0

    def hook(_m, _inp, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, img_size, img_size))
    for h in handles:
        h.remove()
    return total


def model_summary(name: str, batch_size: int = 32, img_size: int | None = None, unfreeze: str = "2",
                  num_outputs: int = 1, hidden: int = 256) -> dict:
    """Trainable/frozen parameters in phase 1 and phase 2 and an estimate of memory per phase (bytes)."""
    # the options train has, checked as train checks them
    TrainConfig(model=name, batch_size=batch_size, img_size=img_size, unfreeze=str(unfreeze)).validate()
    size, _, _ = input_config(name, img_size)
    model = create_model(name, num_outputs, pretrained=False, hidden=hidden)
    acts = activation_elements(model, size)
    total = sum(p.numel() for p in model.parameters())
    phases = {}
    for phase, unf in (("phase1_frozen_backbone", 0), (f"phase2_top_{unfreeze}_blocks", unfreeze)):
        counts = set_trainable(model, unf)
        # weights + gradient and two AdamW moments per trainable weight, activations kept for backward
        weights = 4 * total + 3 * 4 * counts["trainable"]
        phases[phase] = {**counts, "weights_and_optimizer_bytes": weights,
                         "activation_bytes_fp32": 4 * acts * batch_size,
                         "activation_bytes_bf16": 2 * acts * batch_size,
                         "estimate_bytes_fp32": weights + 4 * acts * batch_size}
    return {"model": name, "img_size": size, "batch_size": batch_size, "parameters": total,
            "activation_elements_per_image": acts, "phases": phases}


def format_summary(s: dict) -> str:
    def gib(b):
        return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"

    lines = [f"model {s['model']}  input {s['img_size']}x{s['img_size']}  batch {s['batch_size']}  "
             f"parameters {s['parameters']:,}"]
    for phase, p in s["phases"].items():
        lines.append(f"{phase}: trainable {p['trainable']:,}  frozen {p['frozen']:,}  "
                     f"weights+optimizer {gib(p['weights_and_optimizer_bytes'])}  "
                     f"activations {gib(p['activation_bytes_fp32'])} fp32 / {gib(p['activation_bytes_bf16'])} bf16  "
                     f"estimate {gib(p['estimate_bytes_fp32'])} (fp32)")
    return "\n".join(lines)
