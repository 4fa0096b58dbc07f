"""Training: two phases (head on a frozen backbone with early stopping, then the top blocks with a moving
average of their weights), resumable after a kill.

>>> from sonocad.train import fit
>>> metrics = fit("Dataset_BUSI_with_GT", "runs/busi", classes=["benign", "malignant"], seed=0)  # doctest: +SKIP
>>> metrics["auc"], metrics["auc_ci"]                                                           # doctest: +SKIP
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import __version__
from .config import RunInfo, TrainConfig
from .data import discover, load_many, resolve_classes, stratified_group_split, undersample
from .data.split import group_ids
from .data.augment import augment_batch
from .errors import SonocadError
from .evaluate import predict_images, score_predictions, write_evaluation
from .infer import InputPipeline, Precision, resolve_precision, run_batches
from .io import atomic_path, atomic_write_text, ensure_writable_dir
from .metrics import binary_metrics, choose_thresholds, multiclass_metrics
from .models import (Classifier, count_parameters, create_model, fold_batchnorm, freeze_batchnorm, input_config,
                     save_model, set_trainable)


@dataclass
class Split:
    """Part of the data, decoded: uint8 images (N, S, S), class indices, and their samples."""

    images: np.ndarray
    y: np.ndarray
    samples: list
    groups: np.ndarray | None = None   # what must stay together in any split (see with_duplicate_groups)

    def take(self, idx) -> "Split":
        return Split(self.images[idx], self.y[idx], [self.samples[i] for i in idx],
                     None if self.groups is None else self.groups[idx])

    def split_groups(self) -> list:
        return list(self.groups) if self.groups is not None else split_groups(self.samples)


def decode_split(samples, classes: list[str], cfg: TrainConfig, img_size: int, what: str) -> tuple[Split, list[str]]:
    """Decode every image once (a bad one stops the run here, before training, unless skip_bad)."""
    images, good, bad = load_many([s.path for s in samples], img_size, cfg.resize, cfg.skip_bad,
                                  clean_overlays=cfg.clean_overlays)
    samples = [samples[i] for i in good]
    if not samples:
        raise SonocadError(f"no readable images left in the {what} data")
    y = np.asarray([classes.index(s.label) for s in samples])
    if what == "training":
        for c, name in enumerate(classes):
            if (y == c).sum() < 3:
                raise SonocadError(f"class {name!r} has {(y == c).sum()} usable image(s); at least 3 are "
                                   "needed (train, validation, test)")
    return Split(images, y, samples), bad


def split_groups(samples) -> list[str | None]:
    """What must stay together in a split: the sample's group (patient, lesion, duplicate set) within
    its site."""
    return [f"{s.site}/{s.group}" if s.group is not None else None for s in samples]


def with_duplicate_groups(split: Split, cfg: TrainConfig, progress: bool = False) -> tuple[Split, int]:
    """`split` with its groups set: each sample's own group (patient, lesion) merged with the duplicate
    sets that sonocad dedup finds (when cfg.dedup), so copies of one scan never cross a split.
    Returns the split and the number of duplicate sets found."""
    groups = split_groups(split.samples)
    n_dup = 0
    if cfg.dedup:
        dup_group, n_dup = cached_duplicates([s.path for s in split.samples], progress)
        groups = merge_groups(groups, dup_group)
    return Split(split.images, split.y, split.samples, group_ids(groups)), n_dup


def cached_duplicates(paths: list[str], progress: bool = False) -> tuple[list[str], int]:
    """sonocad dedup's group of every path and the number of duplicate sets, cached on disk (in
    $SONOCAD_CACHE, default ~/.cache/sonocad) under the files' names, sizes and modification times,
    so repeated runs on one dataset do not search it again."""
    import hashlib
    import os

    from .data import dedup

    settings = [dedup.THRESHOLDS, dedup.THUMB, dedup.CENTRAL, dedup.VIEW, dedup.SCALES.tolist()]
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    key = hashlib.sha256(json.dumps([str(settings), stats]).encode()).hexdigest()[:32]
    cache = Path(os.environ.get("SONOCAD_CACHE", Path.home() / ".cache" / "sonocad")) / "dedup" / f"{key}.json"
    try:
        found = json.loads(cache.read_text())
        return found["group"], found["n_groups"]
    except (OSError, ValueError, KeyError):
        pass
    res = dedup.find_duplicates(paths, progress=progress)
    try:
        atomic_write_text(cache, json.dumps({"group": res.group, "n_groups": len(res.groups)}))
    except OSError:
        pass   # an unwritable cache only costs time
    return res.group, len(res.groups)


def merge_groups(*groupings: list) -> list[int]:
    """Connected components of samples linked by sharing a (non-None) group in any grouping."""
    n = len(groupings[0])
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for grouping in groupings:
        first: dict = {}
        for i, g in enumerate(grouping):
            if g is None:
                continue
            if g in first:
                parent[find(i)] = find(first[g])
            else:
                first[g] = i
    return [find(i) for i in range(n)]


def split_train_val(full: Split, cfg: TrainConfig) -> tuple[Split, Split]:
    """Stratified, grouped validation part; undersampling (if asked) applies to the training part only."""
    tr, va = stratified_group_split(full.y, full.split_groups(), cfg.val_size, cfg.seed + 1, "validation")
    train, val = full.take(tr), full.take(va)
    if cfg.balance == "undersample":
        train = train.take(undersample(train.y, cfg.seed))
    return train, val


def data_summary(data, test_data, classes, train: Split, val: Split, test: Split, bad: list[str]) -> dict:
    groups = [s.group for s in train.samples + val.samples + test.samples]
    return {
        "source": [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data),
        "test_source": str(test_data) if test_data else "held-out part of the training data",
        **{f"n_{name}": {c: int((part.y == i).sum()) for i, c in enumerate(classes)}
           for name, part in (("train", train), ("val", val), ("test", test))},
        "grouped_by": "group column / patient ids" if any(groups) else "image (no groups known)",
        "skipped_bad_images": bad,
    }


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

    def update(self, val_loss: float, model: nn.Module, keep_last: bool = False) -> bool:
        """Record an epoch; True when this epoch is the best so far. The state kept is the best epoch's,
        or with `keep_last` this epoch's whatever its loss."""
        improved = val_loss < self.best - 1e-6
        if improved:
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        if improved or keep_last:
            self.state = copy.deepcopy(model.state_dict())
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs > self.patience


CHECKPOINT_KEYS = {"phase", "epoch", "model", "optimizer", "scheduler", "best_state", "best", "bad_epochs", "gen",
                   "torch_rng", "log", "seconds"}


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded without running code (weights_only); one-line error if damaged."""
    if not path.is_file():
        raise SonocadError(f"{path.parent.parent}: no checkpoint there to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
            raise ValueError("keys missing")
    except Exception as e:
        raise SonocadError(f"{path}: damaged or unsafe checkpoint ({e.__class__.__name__})") from None
    return state


def _n_batches(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or n == 1 else 0)


class Trainer:
    """Runs both phases for one model on one train/validation split, writing the log and a checkpoint
    after every epoch; `Trainer(..., resume=True)` continues from the last complete checkpoint and ends
    where an uninterrupted run ends."""

    def __init__(self, model: Classifier, train: Split, val: Split, n_classes: int, cfg: TrainConfig,
                 precision: Precision, pipeline: InputPipeline, out: Path, progress: bool = True,
                 resume: bool = False):
        self.model, self.val, self.cfg, self.precision = model, val, cfg, precision
        self.pipeline, self.out, self.progress = pipeline, Path(out), progress
        self.n_classes = n_classes
        self.loss_fn = make_loss(train.y, n_classes, cfg.balance)
        self.train = offline_augment(train, cfg.offline_augment, cfg.seed)
        self.log: list[dict] = []
        self.stopper = EarlyStopping(cfg.patience)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.phase, self.epoch = "head", 0
        self.ckpt_dir = self.out / "checkpoints"
        self._pending: dict | None = None     # optimiser/scheduler state to restore on resume
        self.seconds = {"head": 0.0, "finetune": 0.0}
        self.ema: AveragedModel | None = None   # phase 2's moving average of the weights
        if resume:
            self._restore()

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self, opt=None, sched=None) -> None:
        # in phase 1 only the head changes: checkpoint the head alone (kilobytes, not the whole model)
        keep = (lambda k: k.startswith("head.")) if self.phase == "head" else (lambda k: True)
        state = {
            "phase": self.phase, "epoch": self.epoch,
            "model": {k: v for k, v in self.model.state_dict().items() if keep(k)},
            "optimizer": opt.state_dict() if opt else {}, "scheduler": sched.state_dict() if sched else {},
            "best_state": {k: v for k, v in (self.stopper.state or {}).items() if keep(k)},
            "best": self.stopper.best, "bad_epochs": self.stopper.bad_epochs,
            "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "log": json.dumps(self.log), "seconds": json.dumps(self.seconds),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        with atomic_path(self.ckpt_dir / "last.pt") as tmp:
            torch.save(state, tmp)

    def _restore(self) -> None:
        path = self.ckpt_dir / "last.pt"
        state = read_checkpoint(path)
        initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        try:
            self.model.load_state_dict({**initial, **state["model"]})
        except Exception as e:
            raise SonocadError(f"{path}: checkpoint does not fit this model ({e.__class__.__name__})") from None
        self.phase, self.epoch = state["phase"], int(state["epoch"])
        self.stopper.state = {**initial, **state["best_state"]} if state["best_state"] else None
        self.stopper.best, self.stopper.bad_epochs = float(state["best"]), int(state["bad_epochs"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.log = json.loads(state["log"])
        self.seconds = json.loads(state["seconds"])
        self._pending = {"optimizer": state["optimizer"], "scheduler": state["scheduler"], "ema": state.get("ema")}

    def _resume_into(self, opt, sched) -> None:
        if self._pending and self._pending["optimizer"]:
            opt.load_state_dict(self._pending["optimizer"])
            sched.load_state_dict(self._pending["scheduler"])
            if self.ema is not None and self._pending["ema"] is not None:
                self.ema.load_state_dict(self._pending["ema"])
        self._pending = None

    # -- the phases -------------------------------------------------------------------------------
    def run(self) -> Classifier:
        """Train (or finish training) and return the model holding the best validation-loss weights."""
        if self.phase == "head":
            self._timed("head", self.phase_head)
            self.phase, self.epoch = "finetune", 0
        if self.phase == "finetune":
            self._timed("finetune", self.phase_finetune)
            self.phase = "done"
            self._checkpoint()
        if self.stopper.state is not None:   # else no epoch ran: the initial model is the result
            self.model.load_state_dict(self.stopper.state)
        save_model(self.model, self.out / "model.safetensors")
        return self.model.eval()

    def _timed(self, phase: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        self.seconds[phase] += time.perf_counter() - t0

    def _batches(self, n: int):
        order = torch.randperm(n, generator=self.gen).numpy()
        bs = self.cfg.batch_size
        # drop a trailing batch of 1: BatchNorm cannot train on it
        return [order[i:i + bs] for i in range(0, n, bs) if len(order[i:i + bs]) > 1 or n == 1]

    def _cached_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features computed once: the training images as they are plus `feature_views`
        augmented views of each (when augmentation is on), so the head learns on the same kind of inputs
        that phase 2 shows it; and the validation images. Kept on disk for --resume."""
        path = self.ckpt_dir / "features.pt"
        if self.epoch > 0 and path.is_file():
            f = torch.load(path, map_location="cpu", weights_only=True)
            return f["train"], f["val"]
        images = self.train.images
        backbone = fold_batchnorm(self.model.backbone)     # frozen in phase 1: fold it for speed
        views = [torch.from_numpy(run_batches(backbone, images, self.pipeline))]
        for _ in range(self.cfg.feature_views if self.cfg.augment else 0):
            feats = []
            for i in range(0, len(images), 64):
                x = self.pipeline(images[i:i + 64], self.gen)
                with torch.no_grad(), self.precision.autocast():
                    feats.append(backbone(x).float().cpu())
            views.append(torch.cat(feats))
        f_train = torch.cat(views)
        f_val = torch.from_numpy(run_batches(backbone, self.val.images, self.pipeline))
        with atomic_path(path) as tmp:
            torch.save({"train": f_train, "val": f_val}, tmp)
        return f_train, f_val

    def phase_head(self) -> None:
        """Phase 1: the head on a frozen backbone; backbone features computed once when cached."""
        cfg, model = self.cfg, self.model
        set_trainable(model, 0)
        if cfg.head_epochs == 0:
            return
        model.eval()
        y = torch.from_numpy(self.train.y)
        if cfg.cache_features:
            f_train, f_val = self._cached_features()
            y = y.repeat(len(f_train) // len(y))
        head = model.head
        opt = make_optimizer(head.parameters(), cfg, cfg.head_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.head_epochs)
        self._resume_into(opt, sched)
        bar = tqdm(range(self.epoch, cfg.head_epochs), desc="phase 1 (head)", disable=not self.progress,
                   unit="epoch")
        for _ in bar:
            if self.stopper.should_stop:
                break
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
                losses.append(self._step(opt, logits, y[idx]))
            lr = opt.param_groups[0]["lr"]
            sched.step()
            head.eval()
            if cfg.cache_features:
                with torch.no_grad():
                    val_logits = head(f_val.to(self.precision.device)).float().cpu().numpy()
            else:
                val_logits = run_batches(model, self.val.images, self.pipeline)
            self._end_epoch(losses, val_logits, lr, t0, bar, opt, sched)

    def phase_finetune(self) -> None:
        """Phase 2: the top `unfreeze` blocks and the head, with augmentation, at a lower learning rate. With
        cfg.ema_epochs the weights' moving average is validated each epoch and kept at the end."""
        cfg, model = self.cfg, self.model
        if cfg.unfreeze == "0" or cfg.finetune_epochs == 0:
            return
        if self.epoch == 0:           # a fresh phase 2 starts from phase 1's best weights
            if self.stopper.state is not None:
                model.load_state_dict(self.stopper.state)
            # phase 2 keeps its own best epoch: comparing with phase 1's best on a small, noisy
            # validation set would stop fine-tuning before its warm-up is over
            self.stopper.bad_epochs, self.stopper.best = 0, math.inf
        counts = set_trainable(model, cfg.unfreeze)
        opt = make_optimizer(model.parameters(), cfg, cfg.finetune_lr)
        per_epoch = _n_batches(len(self.train.y), cfg.batch_size)
        total = max(1, cfg.finetune_epochs * per_epoch)
        warmup = min(per_epoch, total // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(_warmup_cosine, warmup=warmup, total=total))
        self.ema = weight_average(model, cfg, per_epoch)
        self._resume_into(opt, sched)
        scored = self.ema.module if self.ema is not None else model
        y = torch.from_numpy(self.train.y)
        bar = tqdm(range(self.epoch, cfg.finetune_epochs), desc=f"phase 2 (top {cfg.unfreeze} blocks, "
                   f"{counts['trainable']:,} params)", disable=not self.progress, unit="epoch")
        for _ in bar:
            if self.stopper.should_stop and self.ema is None:
                break
            t0 = time.perf_counter()
            model.train()
            freeze_batchnorm(model)
            losses = []
            for idx in tqdm(self._batches(len(y)), leave=False, disable=not self.progress, unit="batch"):
                x = self.pipeline(self.train.images[idx], self.gen if cfg.augment else None)
                with self.precision.autocast():
                    logits = model(x)
                losses.append(self._step(opt, logits, y[idx], sched))
                if self.ema is not None:
                    self.ema.update_parameters(model)
            model.eval()
            val_logits = run_batches(scored.eval(), self.val.images, self.pipeline)
            self._end_epoch(losses, val_logits, opt.param_groups[0]["lr"], t0, bar, opt, sched, scored)

    def _step(self, opt, logits, y, sched=None) -> float:
        """One optimisation step on a batch's logits; returns its loss."""
        loss = self.loss_fn(logits, y.to(logits.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:   # phase 2 schedules per batch, phase 1 per epoch
            sched.step()
        return loss.item()

    def _end_epoch(self, losses, val_logits, lr, t0, bar, opt, sched, scored: nn.Module | None = None) -> None:
        scores = _val_scores(val_logits, self.val.y, self.loss_fn, self.n_classes)
        # with weight averaging phase 2 runs its full schedule and keeps the final average: picking an
        # epoch by the loss on a small validation set favours the early, barely fine-tuned ones
        improved = self.stopper.update(scores["val_loss"], scored if scored is not None else self.model,
                                       keep_last=self.ema is not None)
        self.epoch += 1
        row = {"phase": self.phase, "epoch": self.epoch, "loss": float(np.mean(losses)), **scores, "lr": lr,
               "seconds": round(time.perf_counter() - t0, 3), "best": int(improved)}
        self.log.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(row))
        writer.writeheader()
        writer.writerows(self.log)
        atomic_write_text(self.out / "log.csv", buf.getvalue())
        self._checkpoint(opt, sched)
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_loss=f"{scores['val_loss']:.3f}",
                        val_auc=f"{scores['val_auc']:.3f}")


def weight_average(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> AveragedModel | None:
    """Phase 2's exponential moving average of `model`'s weights over cfg.ema_epochs epochs (None when 0):
    call `.update_parameters(model)` after every step; `.module` is the averaged model."""
    if cfg.ema_epochs <= 0:
        return None
    # single epochs' weights swing with the last few batches; their moving average is steadier
    decay = 1.0 - 1.0 / max(1.0, cfg.ema_epochs * steps_per_epoch)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def build_model(cfg: TrainConfig, n_classes: int, precision: Precision) -> Classifier:
    """The configured backbone + head on the precision's device and memory layout."""
    n_out = 1 if n_classes == 2 else n_classes
    model = create_model(cfg.model, n_out, cfg.pretrained, cfg.weights, cfg.hidden, cfg.dropout)
    model = model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def check_disk_space(out: Path, model: nn.Module) -> None:
    """Refuse to start when the output folder's disk cannot hold the run's files."""
    need = 6 * 4 * sum(p.numel() for p in model.parameters()) + 50 * 2**20
    free = shutil.disk_usage(out).free
    if free < need:
        raise SonocadError(f"--out {out}: only {free / 2**20:.0f} MiB free on its disk, a run needs about "
                           f"{need / 2**20:.0f} MiB")


def train_and_evaluate(model: Classifier, info: RunInfo, train: Split, val: Split, test: Split, out: Path,
                       precision: Precision, progress: bool = True, resume: bool = False,
                       t_data: float = 0.0) -> dict:
    """Train `model` on train/val, pick operating points on val, evaluate on test and write the run
    directory. Returns the test metrics."""
    cfg = info.config
    info.save(out / "config.json")
    pipeline = InputPipeline(info.mean, info.std, precision)
    # seed again here: whatever ran before (a cached or a fresh duplicate search) must not change training
    seed_everything(cfg.seed)
    trainer = Trainer(model, train, val, len(info.classes), cfg, precision, pipeline, out, progress, resume)
    model = trainer.run()
    fast = fold_batchnorm(model)     # the same inference model that evaluate and predict load
    if cfg.temperature_scaling and len(info.classes) == 2:
        from .metrics import fit_temperature

        val_logits = run_batches(fast, val.images, pipeline, tta=cfg.tta, zooms=cfg.tta_zooms)[:, 0]
        info.temperature = fit_temperature(val.y, val_logits)
        model.temperature.fill_(info.temperature)
        fast.temperature.fill_(info.temperature)
        save_model(model, out / "model.safetensors")
    val_prob = predict_images(fast, pipeline, val.images, cfg.tta, zooms=cfg.tta_zooms)
    test_prob = predict_images(fast, pipeline, test.images, cfg.tta, zooms=cfg.tta_zooms)
    if len(info.classes) == 2:
        info.thresholds = choose_thresholds(val.y, val_prob[:, 1])
    info.save(out / "config.json")
    metrics = score_predictions(test.y, test_prob, info)
    metrics["timing_seconds"] = {"data": round(t_data, 1), "phase1_head": round(trainer.seconds["head"], 1),
                                 "phase2_finetune": round(trainer.seconds["finetune"], 1)}
    metrics["timing_seconds"]["total"] = round(sum(metrics["timing_seconds"].values()), 1)
    metrics["precision"] = precision.name
    metrics["parameters"] = count_parameters(model)
    metrics["data"] = info.data
    write_evaluation(out, metrics, test.samples, test.y, test_prob, info, trainer.log)
    return metrics


def fit(data, out, cfg: TrainConfig | None = None, test_data=None, progress: bool = True,
        resume: bool = False, **overrides) -> dict:
    """Train a classifier on `data` and evaluate it on a held-out test part (or `test_data`).

    `data`: a class-folder dataset, a CSV manifest, or a list of them (one per site). Writes the run
    directory `out` (config.json, model.safetensors, log.csv, metrics.json, predictions.csv, plots/,
    report.html, checkpoints/) and returns the test metrics. `resume=True` continues an interrupted
    run in `out` with the config it was started with."""
    out = Path(out)
    if resume:
        read_checkpoint(out / "checkpoints" / "last.pt")   # fail now, not after decoding the data
        cfg = RunInfo.load(out / "config.json").config
    cfg = (cfg or TrainConfig.from_recipe(overrides.pop("recipe", "default"), **overrides)).validate()
    out = ensure_writable_dir(out)
    img_size, mean, std = input_config(cfg.model, cfg.img_size)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    samples = discover(data, cfg.classes)
    classes, positive = resolve_classes(samples, cfg.classes, cfg.positive)
    precision = resolve_precision(cfg.precision)
    # the model (and its weights) before decoding: missing weights fail in seconds, not minutes
    model = build_model(cfg, len(classes), precision)
    check_disk_space(out, model)
    full, bad = decode_split(samples, classes, cfg, img_size, "training")
    full, n_dup = with_duplicate_groups(full, cfg, progress)
    if test_data:
        test, bad_test = decode_split(discover(test_data, classes), classes, cfg, img_size, "test")
        bad += bad_test
    else:
        rest, held = stratified_group_split(full.y, full.split_groups(), cfg.test_size, cfg.seed, "test")
        full, test = full.take(rest), full.take(held)
    train, val = split_train_val(full, cfg)
    summary = data_summary(data, test_data, classes, train, val, test, bad)
    summary["duplicate_sets_found"] = n_dup if cfg.dedup else "dedup off"
    info = RunInfo(cfg, classes, positive, img_size, mean, std, summary, version=__version__)
    return train_and_evaluate(model, info, train, val, test, out, precision, progress, resume,
                              time.perf_counter() - t0)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


