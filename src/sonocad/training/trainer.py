"""The training loop: phase 1 (the head on a frozen backbone, early stopping) and phase 2 (the top blocks,
with a moving average of their weights), a checkpoint after every epoch, resumable after a kill.

>>> trainer = Trainer(model, train, val, n_classes=2, cfg=cfg, precision=precision,
...                   pipeline=pipeline, out="runs/x")                          # doctest: +SKIP
>>> model = trainer.run()                                                        # doctest: +SKIP
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.cache import DiskImages
from ..errors import SonocadError
from ..evaluation.metrics import binary_metrics, multiclass_metrics
from ..io.files import atomic_path, atomic_write_text
from ..models.classifier import Classifier, fold_batchnorm, freeze_batchnorm, save_model, set_trainable
from ..models.infer import InputPipeline, Precision, run_batches
from ..models.maskhead import mask_loss
from ..runtime import dist
from .optim import (average_with_init, init_snapshot, make_loss, make_optimizer, optimizer_step, warmup_cosine,
                     weight_average)
from .prepare import Split, offline_augment


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


class _BatchSet(torch.utils.data.Dataset):
    """Batch k of an epoch read from the on-disk image cache (and its masks), for a DataLoader's workers."""

    def __init__(self, train: Split, batches: list, masks: bool):
        self.train, self.batches, self.masks = train, batches, masks

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        idx = self.batches[k]
        masks = np.asarray(self.train.masks[idx]) if self.masks else None
        return idx, np.asarray(self.train.images[idx]), masks


def read_batches(train: Split, batches: list, masks: bool, workers: int = 2):
    """(indices, uint8 images, masks or None) of each batch: sliced from memory, or read ahead from the on-disk
    cache by `workers` DataLoader processes while the model trains on the batch before."""
    if not isinstance(train.images, DiskImages):
        return ((idx, train.images[idx], train.masks[idx] if masks else None) for idx in batches)
    loader = torch.utils.data.DataLoader(_BatchSet(train, batches, masks), batch_size=None, num_workers=workers,
                                         prefetch_factor=2, collate_fn=lambda item: item,
                                         generator=torch.Generator().manual_seed(0))   # leaves the global RNG (dropout) alone
    return iter(loader)


def _n_batches(n: int, batch_size: int, world: int = 1) -> int:
    """Steps per epoch: global batches of world x batch_size images; a trailing one is kept when every rank gets
    at least two images of it (one image makes a noisy step)."""
    if batch_size == 1:
        return n // world
    full, rest = divmod(n, batch_size * world)
    return full + (1 if rest >= 2 * world or n == 1 else 0)


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
        self.train = offline_augment(train, cfg.offline_augment, cfg.seed, cfg.appearance)
        self.log: list[dict] = []
        self.stopper = EarlyStopping(cfg.patience)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.phase, self.epoch = "head", 0
        self.ckpt_dir = self.out / "checkpoints"
        self._pending: dict | None = None     # optimiser/scheduler state to restore on resume
        self.seconds = {"head": 0.0, "finetune": 0.0}
        self.ema: AveragedModel | None = None   # phase 2's moving average of the weights
        self.init_state = init_snapshot(model, cfg.keep_init)    # taken before a resume restores any weights
        self.scaler = precision.grad_scaler()
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
            "gen": self.gen.get_state(), "torch_rng": self.precision.rng_state(), "scaler": self.scaler.state_dict(),
            "log": json.dumps(self.log), "seconds": json.dumps(self.seconds),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if dist.is_main():
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
        self.precision.set_rng_state(state["torch_rng"])
        if state.get("scaler"):             # fp16 training's loss scale (checkpoints before it have none)
            self.scaler.load_state_dict(state["scaler"])
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
        average_with_init(self.model, self.init_state, self.cfg.keep_init)
        if dist.is_main():
            save_model(self.model, self.out / "model.safetensors")
        return self.model.eval()

    def _timed(self, phase: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        self.seconds[phase] += time.perf_counter() - t0

    def _batches(self, n: int):
        """This rank's part of each batch of an epoch: one permutation drawn with the seed all ranks share."""
        order = torch.randperm(n, generator=self.gen).numpy()
        step = self.cfg.batch_size * dist.world_size()
        batches = [order[i:i + step] for i in range(0, n, step)][:_n_batches(n, self.cfg.batch_size, dist.world_size())]
        return [dist.shard(b) for b in batches]

    def _augment_gen(self) -> torch.Generator | None:
        """The generator of the training augmentation: the shared one in one process; with several ranks each
        draws its own views, from a seed of (seed, rank, phase, epoch), and its own dropout masks likewise, so
        a resumed run (whose checkpoint holds rank 0's generators only) draws them again."""
        if not dist.active():
            return self.gen if self.cfg.augment else None
        torch.manual_seed(self._rank_seed("dropout"))
        return torch.Generator().manual_seed(self._rank_seed("augment")) if self.cfg.augment else None

    def _rank_seed(self, what: str) -> int:
        key = f"{self.cfg.seed}/{dist.rank()}/{self.phase}/{self.epoch}/{what}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    def _cached_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features computed once: the training images as they are plus `feature_views`
        augmented views of each (when augmentation is on), so the head learns on the same kind of inputs
        that phase 2 shows it; and the validation images. Kept on disk for --resume."""
        path = self.ckpt_dir / "features.pt"
        if self.epoch > 0 and path.is_file():
            try:
                f = torch.load(path, map_location="cpu", weights_only=True)
                f_train, f_val = f["train"], f["val"]
                ok = len(f_train) % len(self.train.y) == 0 and len(f_val) == len(self.val.y)
            except Exception as e:
                raise SonocadError(f"{path}: damaged or unsafe feature cache ({e.__class__.__name__})") from None
            if not ok:
                raise SonocadError(f"{path}: feature cache of other data ({len(f_train)} training rows for "
                                   f"{len(self.train.y)} images); start a new run")
            return f_train, f_val
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
        if dist.is_main():
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
        # features of images kept on disk would fill the memory the disk cache saves: computed on the fly instead
        cached = cfg.cache_features and not isinstance(self.train.images, DiskImages)
        if cached:
            f_train, f_val = self._cached_features()
            y = y.repeat(len(f_train) // len(y))
        head = model.head
        opt = make_optimizer(head.parameters(), cfg, cfg.head_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.head_epochs)
        self._resume_into(opt, sched)
        bar = tqdm(range(self.epoch, cfg.head_epochs), desc="phase 1 (head)", disable=not self.progress,
                   unit="epoch")
        net = dist.wrap(head if cached else model)
        for _ in bar:
            if self.stopper.should_stop:
                break
            t0 = time.perf_counter()
            head.train()
            losses, aug = [], self._augment_gen()
            for idx in self._batches(len(y)):
                if cached:
                    logits = net(f_train[idx].to(self.precision.device))
                else:
                    x = self.pipeline(self.train.images[idx], aug)
                    with self.precision.autocast():
                        logits = net(x)
                losses.append(optimizer_step(opt, self._loss(logits, y[idx]), self.scaler))
            lr = opt.param_groups[0]["lr"]
            sched.step()
            head.eval()
            if cached:
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
        per_epoch = _n_batches(len(self.train.y), cfg.batch_size, dist.world_size())
        total = max(1, cfg.finetune_epochs * per_epoch)
        warmup = min(per_epoch, total // 10)
        sched = warmup_cosine(opt, warmup, total)
        self.ema = weight_average(model, cfg, per_epoch)
        with_masks = model.mask_head is not None and self.train.masks is not None
        net = dist.wrap(dist.TrainingForward(model, with_masks))     # a fresh wrapper: other parameters train now
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
            aug = self._augment_gen()
            batches = self._batches(len(y))
            for idx, images, masks in tqdm(read_batches(self.train, batches, with_masks), total=len(batches),
                                           leave=False, disable=not self.progress, unit="batch"):
                loss = self._batch_loss(net, images, masks, self.train.known, idx, y[idx], aug)
                losses.append(optimizer_step(opt, loss, self.scaler, sched))
                if self.ema is not None:
                    self.ema.update_parameters(model)
            model.eval()
            val_logits = run_batches(scored.eval(), self.val.images, self.pipeline)
            self._end_epoch(losses, val_logits, opt.param_groups[0]["lr"], t0, bar, opt, sched, scored)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, y.to(logits.device))

    def _batch_loss(self, net: nn.Module, images, masks, known, idx: np.ndarray, y: torch.Tensor, gen) -> torch.Tensor:
        """Phase 2's loss on one batch (uint8 images, their masks or None; rows `idx` of the training part) through
        `net` (a dist.TrainingForward): classification, plus cfg.seg_weight x the lesion-mask loss on the images
        whose mask is known."""
        if masks is None:
            x = self.pipeline(images, gen)
            with self.precision.autocast():
                return self._loss(net(x)[0], y)
        x, masks = self.pipeline.with_masks(images, masks, gen)
        with self.precision.autocast():
            logits, mask_logits = net(x)
        known = torch.from_numpy(known[idx]).to(masks.device)
        return self._loss(logits, y) + self.cfg.seg_weight * mask_loss(mask_logits, masks, known)

    def _end_epoch(self, losses, val_logits, lr, t0, bar, opt, sched, scored: nn.Module | None = None) -> None:
        if not (np.isfinite(val_logits).all() and np.isfinite(losses).all()):      # phase: head or finetune
            raise SonocadError(f"training diverged in the {self.phase} phase (the loss is no longer a finite "
                               f"number); lower its learning rate, --{self.phase}-lr")
        # every rank validates the same weights on the same images; rank 0's figures decide, so all agree
        scores = dist.broadcast(_val_scores(val_logits, self.val.y, self.loss_fn, self.n_classes))
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
        if dist.is_main():
            atomic_write_text(self.out / "log.csv", buf.getvalue())
        self._checkpoint(opt, sched)
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_loss=f"{scores['val_loss']:.3f}",
                        val_auc=f"{scores['val_auc']:.3f}")

