"""What a training run starts from: the model (ImageNet weights, or a trained run's with --init), with or without
the lesion-mask decoder, on the right device; the seed; enough disk space.

>>> model = build_model(cfg, n_classes=2, precision=resolve_precision())        # doctest: +SKIP
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import RunInfo, TrainConfig
from ..errors import OptionError, SonocadWarning
from ..io.rundir import check_finished
from ..models.classifier import Classifier, create_model, trained_model
from ..models.infer import Precision
from ..zoo import resolve, shipped_version


def build_model(cfg: TrainConfig, n_classes: int, precision: Precision, classes: list[str] | None = None,
                mask_head: bool = False) -> Classifier:
    """The configured backbone + head (from ImageNet, or from the run `cfg.init`, whose head is kept when it
    was trained on the same `classes`), with the lesion-mask decoder when `mask_head`, on the precision's
    device and memory layout."""
    n_out = 1 if n_classes == 2 else n_classes
    if cfg.init:
        model = init_model(cfg, n_classes, classes, mask_head)
    else:
        model = create_model(cfg.model, n_out, cfg.pretrained, cfg.weights, cfg.hidden, cfg.dropout, mask_head)
    model = model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def init_model(cfg: TrainConfig, n_classes: int, classes: list[str] | None, mask_head: bool = False) -> Classifier:
    """A model to fine-tune from the trained run `cfg.init`: its backbone (BatchNorm statistics included), its
    head when it was trained on the same classes in the same order, its mask decoder when it has one;
    temperature back to 1. `model.from_init` lists the state-dict prefixes that came from the init."""
    info, source = trained_model(cfg.init)
    if info.config.model != cfg.model:
        raise OptionError("init", f"{cfg.init} is a {info.config.model} model; train it with --model "
                          f"{info.config.model}, not {cfg.model}")
    model = Classifier(source.backbone, 1 if n_classes == 2 else n_classes, cfg.hidden, cfg.dropout, mask_head)
    model.from_init = ["backbone."]       # the parts holding the init's weights (Trainer averages them back in)
    if classes is not None and info.classes == list(classes) and info.config.hidden == cfg.hidden:
        model.head.load_state_dict(source.head.state_dict())
        model.from_init.append("head.")
    if mask_head and source.mask_head is not None:
        model.mask_head.load_state_dict(source.mask_head.state_dict())
        model.from_init.append("mask_head.")
    differ = [f"{k} {getattr(info.config, k)!r}" for k in ("resize", "clean_overlays")
              if getattr(info.config, k) != getattr(cfg, k)]
    if differ:
        warnings.warn(SonocadWarning(f"--init {cfg.init} was trained with {', '.join(differ)}; this run "
                                     "prepares its images otherwise"))
    return model


def init_record(run: str) -> dict:
    """What a run fine-tuned or adapted from the run `run` records of it: the name given, the SHA-256 of its
    weights as its run.json commits them, the sonocad version that trained it and, for a shipped model, which
    version (`bus-base@1`)."""
    path = resolve(run)
    files = check_finished(path) if (path / "config.json").is_file() else {}
    version = RunInfo.load(path / "config.json").version if (path / "config.json").is_file() else None
    return {"name": str(run), "weights_sha256": files.get("model.safetensors"), "sonocad_version": version,
            "zoo_version": shipped_version(path)}


def check_disk_space(out: Path, n_parameters: int) -> None:
    """Refuse to start when the output folder's disk cannot hold the run's files (model, checkpoints)."""
    need = 6 * 4 * n_parameters + 50 * 2**20
    free = shutil.disk_usage(out).free
    if free < need:
        raise OptionError("out", f"{out}: only {free / 2**20:.0f} MiB free on its disk, a run needs about "
                          f"{need / 2**20:.0f} MiB")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
