"""Training: two phases (head on a frozen backbone, then the top blocks), early stopping, best checkpoint.

>>> from sonocad.train import fit
>>> metrics = fit("Dataset_BUSI_with_GT", "runs/busi", classes=["benign", "malignant"], seed=0)  # doctest: +SKIP
>>> metrics["auc"], metrics["auc_ci"]                                                           # doctest: +SKIP
"""
from __future__ import annotations

import copy
import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .config import RunInfo, TrainConfig
from .data import discover, load_many, resolve_classes, stratified_group_split, undersample
from .data.augment import augment_batch
from .errors import SonocadError
from .evaluate import score_predictions, write_evaluation
from .infer import InputPipeline, Precision, resolve_precision, run_batches
from .io import atomic_write_text, ensure_writable_dir
from .models import (Classifier, count_parameters, create_model, freeze_batchnorm, input_config,
                     save_model, set_trainable)
from .metrics import binary_metrics, choose_thresholds, multiclass_metrics


@dataclass
class Split:
    """One part of the data, decoded: uint8 images (N, S, S), class indices, and their samples."""

    images: np.ndarray
    y: np.ndarray
    samples: list

    def take(self, idx) -> "Split":
        return Split(self.images[idx], self.y[idx], [self.samples[i] for i in idx])


@dataclass
class TrainingData:
    classes: list[str]
    positive: str | None
    train: Split
    val: Split
    test: Split | None
    bad: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def prepare_data(data, cfg: TrainConfig, img_size: int, test_data=None, samples=None) -> TrainingData:
    """Discover (unless `samples` are given), decode once, and split the data: test part, then
    validation part, both stratified and grouped. Every image is decoded here, so a bad file stops
    the run before any training."""
    samples = samples if samples is not None else discover(data, cfg.classes)
    classes, positive = resolve_classes(samples, cfg.classes, cfg.positive)
    test_samples = discover(test_data, classes) if test_data else None

    def decode(smps, what):
        imgs, good, bad = load_many([s.path for s in smps], img_size, cfg.resize, cfg.skip_bad)
        smps = [smps[i] for i in good]
        if not smps:
            raise SonocadError(f"no readable images left in the {what} data")
        y = np.asarray([classes.index(s.label) for s in smps])
        return Split(imgs, y, smps), bad

    full, bad = decode(samples, "training")
    for c in range(len(classes)):
        if (full.y == c).sum() < 3:
            raise SonocadError(f"class {classes[c]!r} has {(full.y == c).sum()} usable image(s); "
                               "at least 3 are needed (train, validation, test)")
    groups = [s.group for s in full.samples]
    if test_samples is None:
        rest, held = stratified_group_split(full.y, groups, cfg.test_size, cfg.seed, "test")
        test, full = full.take(held), full.take(rest)
    else:
        test, bad_test = decode(test_samples, "test")
        bad += bad_test
    tr, va = stratified_group_split(full.y, [s.group for s in full.samples], cfg.val_size, cfg.seed + 1,
                                    "validation")
    train, val = full.take(tr), full.take(va)
    if cfg.balance == "undersample":
        train = train.take(undersample(train.y, cfg.seed))
    summary = {
        "source": [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data),
        "test_source": str(test_data) if test_data else "held-out part of the training data",
        **{f"n_{name}": {c: int((part.y == i).sum()) for i, c in enumerate(classes)}
           for name, part in (("train", train), ("val", val), ("test", test))},
        "grouped_by": "group column / patient ids" if any(s.group for s in samples) else "image (no groups known)",
        "skipped_bad_images": bad,
    }
    return TrainingData(classes, positive, train, val, test, bad, summary)


def offline_augment(split: Split, copies: int, seed: int) -> Split:
    """The notebook's offline augmentation: `copies` fixed transformed versions of every image, added."""
    if copies <= 0:
        return split
    gen = torch.Generator().manual_seed(seed + 7919)
    base = torch.from_numpy(split.images).unsqueeze(1).float() / 255
    extra = [(augment_batch(base, gen) * 255).round().to(torch.uint8).squeeze(1).numpy() for _ in range(copies)]
    return Split(np.concatenate([split.images, *extra]), np.tile(split.y, copies + 1), split.samples * (copies + 1))


def make_loss(y: np.ndarray, n_classes: int, balance: str) -> nn.Module:
    """Class-weighted BCE (binary, one logit) or cross-entropy; unweighted unless balance='weighted'."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    if n_classes == 2:
        pos_weight = torch.tensor(counts[0] / max(counts[1], 1)) if balance == "weighted" else None
        bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        return _BinaryLoss(bce)
    weight = torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight if balance == "weighted" else None)


class _BinaryLoss(nn.Module):
    def __init__(self, bce: nn.Module):
        super().__init__()
        self.bce = bce

    def forward(self, logits, y):
        return self.bce(logits[:, 0].float(), y.float())


def make_optimizer(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def _val_scores(logits: np.ndarray, y: np.ndarray, loss_fn, n_classes: int) -> dict:
    t = torch.from_numpy(logits).float()
    loss = float(loss_fn(t, torch.from_numpy(y)))
    if n_classes == 2:
        m = binary_metrics(y, torch.sigmoid(t[:, 0]).numpy(), ci=None)
    else:
        m = multiclass_metrics(y, torch.softmax(t, 1).numpy(), [str(i) for i in range(n_classes)])
    return {"val_loss": loss, "val_auc": m["auc"], "val_accuracy": m["accuracy"]}


class EarlyStopping:
    """Keeps the best state (lowest validation loss) and says when `patience` epochs brought nothing."""

    def __init__(self, patience: int):
        self.patience, self.best, self.bad_epochs, self.state = patience, math.inf, 0, None

    def update(self, val_loss: float, model: nn.Module) -> bool:
        """Record an epoch; True when this epoch is the best so far."""
        if val_loss < self.best - 1e-6:
            self.best, self.bad_epochs = val_loss, 0
            self.state = copy.deepcopy(model.state_dict())
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs > self.patience


class Trainer:
    """Runs the phases for one model and one TrainingData, writing the log as it goes."""

    def __init__(self, model: Classifier, data: TrainingData, cfg: TrainConfig, precision: Precision,
                 pipeline: InputPipeline, out: Path, progress: bool = True):
        self.model, self.data, self.cfg, self.precision = model, data, cfg, precision
        self.pipeline, self.out, self.progress = pipeline, out, progress
        self.n_classes = len(data.classes)
        self.loss_fn = make_loss(data.train.y, self.n_classes, cfg.balance)
        self.log: list[dict] = []
        self.stopper = EarlyStopping(cfg.patience)
        self.train = offline_augment(data.train, cfg.offline_augment, cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def _log_epoch(self, row: dict) -> None:
        self.log.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(row))
        writer.writeheader()
        writer.writerows(self.log)
        atomic_write_text(self.out / "log.csv", buf.getvalue())

    def _batches(self, n: int):
        order = torch.randperm(n, generator=self.gen).numpy()
        bs = self.cfg.batch_size
        # drop a trailing batch of 1: BatchNorm cannot train on it
        return [order[i:i + bs] for i in range(0, n, bs) if len(order[i:i + bs]) > 1 or n == 1]

    def phase_head(self) -> float:
        """Phase 1: the head on a frozen backbone; backbone features computed once when cached."""
        cfg, model = self.cfg, self.model
        set_trainable(model, 0)
        start = time.perf_counter()
        if cfg.head_epochs == 0:
            return 0.0
        model.eval()
        y = torch.from_numpy(self.train.y)
        if cfg.cache_features:
            f_train = self._cached_features(y)
            y = y.repeat(len(f_train) // len(y))
            f_val = torch.from_numpy(run_batches(model.forward_features, self.data.val.images, self.pipeline))
        head = model.head.to(torch.float32)
        opt = make_optimizer(head.parameters(), cfg, cfg.head_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.head_epochs)
        bar = tqdm(range(cfg.head_epochs), desc="phase 1 (head)", disable=not self.progress, unit="epoch")
        for epoch in bar:
            t0 = time.perf_counter()
            head.train()
            losses = []
            for idx in self._batches(len(y)):
                if cfg.cache_features:
                    logits = head(f_train[idx].to(self.precision.device))
                else:
                    x = self.pipeline(self.train.images[idx], self.gen if cfg.augment else None)
                    with self.precision.autocast():
                        logits = model(x)
                loss = self.loss_fn(logits, y[idx].to(logits.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            lr = opt.param_groups[0]["lr"]
            sched.step()
            head.eval()
            if cfg.cache_features:
                with torch.no_grad():
                    val_logits = head(f_val.to(self.precision.device)).float().cpu().numpy()
            else:
                val_logits = run_batches(model, self.data.val.images, self.pipeline)
            if self._end_epoch("head", epoch, losses, val_logits, lr, t0, bar):
                break
        return time.perf_counter() - start

    def _cached_features(self, y: torch.Tensor) -> torch.Tensor:
        """Backbone features of the training images, computed once: the images as they are, plus
        `feature_views` augmented views of each when augmentation is on, so the head learns on the
        same kind of inputs that phase 2 will show it."""
        images = self.train.images
        views = [torch.from_numpy(run_batches(self.model.forward_features, images, self.pipeline))]
        for _ in range(self.cfg.feature_views if self.cfg.augment else 0):
            feats = []
            for i in range(0, len(images), 64):
                x = self.pipeline(images[i:i + 64], self.gen)
                with torch.no_grad(), self.precision.autocast():
                    feats.append(self.model.forward_features(x).float().cpu())
            views.append(torch.cat(feats))
        return torch.cat(views)

    def phase_finetune(self) -> float:
        """Phase 2: the top `unfreeze` blocks and the head, with augmentation, at a lower learning rate."""
        cfg, model = self.cfg, self.model
        if cfg.unfreeze == "0" or cfg.finetune_epochs == 0:
            return 0.0
        start = time.perf_counter()
        if self.stopper.state is not None:
            model.load_state_dict(self.stopper.state)
        counts = set_trainable(model, cfg.unfreeze)
        self.stopper.bad_epochs = 0
        opt = make_optimizer(model.parameters(), cfg, cfg.finetune_lr)
        batches_per_epoch = len(self._batches(len(self.train.y)))
        total = max(1, cfg.finetune_epochs * batches_per_epoch)
        warmup = min(batches_per_epoch, total // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
        y = torch.from_numpy(self.train.y)
        bar = tqdm(range(cfg.finetune_epochs), desc=f"phase 2 (top {cfg.unfreeze} blocks, "
                   f"{counts['trainable']:,} params)", disable=not self.progress, unit="epoch")
        for epoch in bar:
            t0 = time.perf_counter()
            model.train()
            freeze_batchnorm(model)
            losses = []
            batches = self._batches(len(y))
            for idx in tqdm(batches, leave=False, disable=not self.progress, unit="batch"):
                x = self.pipeline(self.train.images[idx], self.gen if cfg.augment else None)
                with self.precision.autocast():
                    logits = model(x)
                loss = self.loss_fn(logits, y[idx].to(logits.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            model.eval()
            val_logits = run_batches(model, self.data.val.images, self.pipeline)
            if self._end_epoch("finetune", epoch, losses, val_logits, opt.param_groups[0]["lr"], t0, bar):
                break
        return time.perf_counter() - start

    def _end_epoch(self, phase, epoch, losses, val_logits, lr, t0, bar) -> bool:
        scores = _val_scores(val_logits, self.data.val.y, self.loss_fn, self.n_classes)
        improved = self.stopper.update(scores["val_loss"], self.model)
        if improved:
            save_model(self.model, self.out / "model.safetensors")
        row = {"phase": phase, "epoch": epoch + 1, "loss": float(np.mean(losses)), **scores, "lr": lr,
               "seconds": time.perf_counter() - t0, "best": int(improved)}
        self._log_epoch(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_loss=f"{scores['val_loss']:.3f}",
                        val_auc=f"{scores['val_auc']:.3f}")
        return self.stopper.should_stop


def fit(data, out, cfg: TrainConfig | None = None, test_data=None, progress: bool = True,
        **overrides) -> dict:
    """Train a classifier on `data` and evaluate it on a held-out test part (or `test_data`).

    `data`: a class-folder dataset, a CSV manifest, or a list of them. Writes the run directory
    `out` (config.json, model.safetensors, log.csv, metrics.json, predictions.csv, plots/, report.html)
    and returns the test metrics."""
    cfg = (cfg or TrainConfig.from_recipe(overrides.pop("recipe", "default"), **overrides)).validate()
    out = ensure_writable_dir(out)
    img_size, mean, std = input_config(cfg.model, cfg.img_size)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    samples = discover(data, cfg.classes)
    classes, _ = resolve_classes(samples, cfg.classes, cfg.positive)
    precision = resolve_precision(cfg.precision)
    # the model (and its weights) before decoding: missing weights fail in seconds, not minutes
    n_out = 1 if len(classes) == 2 else len(classes)
    model = create_model(cfg.model, n_out, cfg.pretrained, cfg.weights, cfg.hidden, cfg.dropout)
    data_ = prepare_data(data, cfg, img_size, test_data, samples)
    t_data = time.perf_counter() - t_start
    model = model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    info = RunInfo(cfg, data_.classes, data_.positive, img_size, mean, std, data_.summary, version=__version__)
    info.save(out / "config.json")
    pipeline = InputPipeline(mean, std, precision)
    trainer = Trainer(model, data_, cfg, precision, pipeline, out, progress)
    t_head = trainer.phase_head()
    t_finetune = trainer.phase_finetune()
    if trainer.stopper.state is None:   # no epoch ran: keep the initial model
        save_model(model, out / "model.safetensors")
    else:
        model.load_state_dict(trainer.stopper.state)
    model.eval()

    val_prob = predict_probs(model, data_.val.images, pipeline, cfg.tta)
    test_prob = predict_probs(model, data_.test.images, pipeline, cfg.tta)
    if len(data_.classes) == 2:
        info.thresholds = choose_thresholds(data_.val.y, val_prob[:, 1])
    info.save(out / "config.json")
    t_total = time.perf_counter() - t_start
    metrics = score_predictions(data_.test.y, test_prob, info)
    metrics["timing_seconds"] = {"data": round(t_data, 1), "phase1_head": round(t_head, 1),
                                 "phase2_finetune": round(t_finetune, 1), "total": round(t_total, 1)}
    metrics["precision"] = precision.name
    metrics["parameters"] = count_parameters(model)
    metrics["data"] = data_.summary
    write_evaluation(out, metrics, data_.test.samples, data_.test.y, test_prob, info, trainer.log)
    return metrics


def predict_probs(model: Classifier, images: np.ndarray, pipeline: InputPipeline, tta: bool) -> np.ndarray:
    logits = run_batches(model, images, pipeline, tta=tta)
    return model.probabilities(torch.from_numpy(logits)).numpy()
