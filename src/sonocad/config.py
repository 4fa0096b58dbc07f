"""One typed config with every training knob; recipes are named presets of it.

>>> cfg = TrainConfig.from_recipe("notebook", seed=1)
>>> cfg.model, cfg.batch_size, cfg.optimizer
('inception_v3', 8, 'adagrad')
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SonocadError

DEFAULT_MODEL = "tf_efficientnet_lite0"


@dataclass
class TrainConfig:
    """Everything that decides what a training run does. Saved as RUN/config.json."""

    recipe: str = "default"
    # model
    model: str = DEFAULT_MODEL
    pretrained: bool = True
    weights: str | None = None          # local checkpoint instead of the packaged / hub weights
    img_size: int | None = None         # None: the backbone's pretrained input size
    resize: str = "pad"                 # pad (keep aspect ratio, letterbox) | stretch (the notebook's)
    clean_overlays: bool = True         # paint over bright calipers, text and markers before resizing
    hidden: int = 256
    dropout: float = 0.3
    # data
    classes: list[str] | None = None
    positive: str | None = None
    balance: str = "weighted"           # weighted | undersample | none
    augment: bool = True                # on-the-fly ultrasound augmentation in phase 2
    offline_augment: int = 0            # N fixed transformed copies per training image (the notebook used 7)
    dedup: bool = True                  # find duplicate images and keep each set on one side of every split
    val_size: float = 0.15
    test_size: float = 0.2
    skip_bad: bool = False
    # phase 1: frozen backbone, head only
    head_epochs: int = 60
    head_lr: float = 3e-4
    # phase 2: top blocks unfrozen
    unfreeze: str = "2"                 # number of top blocks, or "all", or "0" to skip phase 2
    finetune_epochs: int = 12
    finetune_lr: float = 2e-4
    # optimisation
    optimizer: str = "adamw"            # adamw | adagrad | sgd
    weight_decay: float = 1e-4
    batch_size: int = 32
    patience: int = 4
    ema_epochs: float = 2.0             # phase 2 runs its full schedule and keeps an exponential moving
                                        # average of the weights over this many epochs; 0 = the raw weights
                                        # of the epoch with the best validation loss (early stopping)
    cache_features: bool = True         # phase 1 trains the head on backbone features computed once
    feature_views: int = 4              # augmented views per training image among the cached features
    tta: bool = True                    # average the prediction with its horizontal flip ...
    tta_zooms: list[float] = field(default_factory=lambda: [0.87, 1.15])   # ... and with these zooms (+ flips)
    temperature_scaling: bool = False   # fit a temperature on validation data (binary), saved with the model
    ci: str = "delong"                  # AUC confidence interval: delong | bootstrap (stratified)
    precision: str = "auto"             # auto | fp32 | bf16 | fp16
    threads: int = 0                    # torch threads; 0 = leave torch's default
    seed: int = 0

    def validate(self) -> "TrainConfig":
        """Check option values; raise SonocadError naming the first impossible one."""
        def bad(opt: str, why: str):
            raise SonocadError(f"--{opt.replace('_', '-')}: {why}")

        if self.resize not in ("pad", "stretch"):
            bad("resize", f"must be pad or stretch, not {self.resize!r}")
        if self.balance not in ("weighted", "undersample", "none"):
            bad("balance", f"must be weighted, undersample or none, not {self.balance!r}")
        if self.optimizer not in ("adamw", "adagrad", "sgd"):
            bad("optimizer", f"must be adamw, adagrad or sgd, not {self.optimizer!r}")
        if self.ci not in ("delong", "bootstrap"):
            bad("ci", f"must be delong or bootstrap, not {self.ci!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            bad("precision", f"must be auto, fp32, bf16 or fp16, not {self.precision!r}")
        if self.unfreeze != "all" and not (str(self.unfreeze).isdigit()):
            bad("unfreeze", f"must be a number of blocks or 'all', not {self.unfreeze!r}")
        self.unfreeze = str(self.unfreeze)
        if self.img_size is not None and self.img_size < 32:
            bad("img_size", f"must be at least 32 px, not {self.img_size}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), not {self.dropout}")
        if not 0.0 < self.val_size < 0.5:
            bad("val_size", f"must be between 0 and 0.5, not {self.val_size}")
        if not 0.0 < self.test_size < 0.5:
            bad("test_size", f"must be between 0 and 0.5, not {self.test_size}")
        for name in ("batch_size", "hidden"):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, not {getattr(self, name)}")
        for name in ("head_epochs", "finetune_epochs", "offline_augment", "patience", "threads", "feature_views"):
            if getattr(self, name) < 0:
                bad(name, f"must not be negative, not {getattr(self, name)}")
        if not 0.0 <= self.ema_epochs <= 1000:
            bad("ema_epochs", f"must be between 0 (off) and 1000, not {self.ema_epochs}")
        for name in ("head_lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                bad(name, f"must be positive, not {getattr(self, name)}")
        if any(not 0.5 <= z <= 2.0 for z in self.tta_zooms):
            bad("tta_zooms", f"each zoom must be between 0.5 and 2, not {' '.join(map(str, self.tta_zooms))}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            bad("classes", f"names repeat: {' '.join(self.classes)}")
        if self.classes is not None and len(self.classes) < 2:
            bad("classes", "need at least two classes to train a classifier")
        return self

    @classmethod
    def from_recipe(cls, recipe: str = "default", **overrides: Any) -> "TrainConfig":
        """A recipe's preset with `overrides` (None values are ignored) applied on top."""
        if recipe not in RECIPES:
            raise SonocadError(f"--recipe: unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        values = {**RECIPES[recipe], "recipe": recipe}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SonocadError(f"unknown config option(s): {', '.join(sorted(unknown))}")
        return cls(**values).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# what runs saved before an option existed did, where that differs from the option's default now
BEFORE_OPTION = {"tta_zooms": [], "ema_epochs": 0.0}


RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # The notebook this project grew from: InceptionV3 at 224 px, batch 8, Adagrad, undersampling,
    # 7 offline augmentations, frozen phase then top 2 inception blocks, images stretched to square.
    "notebook": dict(
        model="inception_v3", img_size=224, resize="stretch", batch_size=8, optimizer="adagrad",
        head_lr=1e-2, finetune_lr=1e-3, balance="undersample", offline_augment=7, augment=False,
        unfreeze="2", head_epochs=30, finetune_epochs=15, patience=5, tta=False, tta_zooms=[], clean_overlays=False,
        ema_epochs=0,
    ),
}


@dataclass
class RunInfo:
    """What a finished run records beside its config: classes, positive class, data, input geometry."""

    config: TrainConfig
    classes: list[str]
    positive: str | None
    img_size: int
    mean: list[float]
    std: list[float]
    data: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    temperature: float = 1.0
    version: str = ""

    def save(self, path: Path) -> None:
        from .io import atomic_write_text

        d = dataclasses.asdict(self)
        atomic_write_text(path, json.dumps(d, indent=2))

    @classmethod
    def load(cls, path: Path) -> "RunInfo":
        try:
            d = json.loads(Path(path).read_text())
            d["config"] = TrainConfig.from_dict({**BEFORE_OPTION, **d["config"]})
            return cls(**d)
        except FileNotFoundError:
            raise SonocadError(f"{path}: no config.json; is this a sonocad run directory?") from None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise SonocadError(f"{path}: not a valid sonocad config ({e.__class__.__name__})") from None
