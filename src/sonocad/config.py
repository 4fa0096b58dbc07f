"""One typed config with every training knob; recipes are named presets of it.

Each field is declared once: its default, its help text and its allowed values (field metadata) make
both the checks in `validate` and the command-line options (`sonocad train --help`).

>>> cfg = TrainConfig.from_recipe("notebook", seed=1)
>>> cfg.model, cfg.batch_size, cfg.optimizer
('inception_v3', 8, 'adagrad')
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OptionError, SonocadError

DEFAULT_MODEL = "tf_efficientnet_lite0"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
APPEARANCES = ("standard", "scanner")    # of the training augmentation (data.augment)
MAX_IMG_SIZE = 1024     # decoded images and activations grow with its square: 1024 px is far past any gain
MAX_SEED = 2**32 - 1    # numpy's seeds are 32-bit
# whole-number options: (name, lowest, highest); the highest values are far past any use, and keep a typo
# from allocating until the machine runs out of memory
LIMITS = (("batch_size", 1, 4096), ("hidden", 1, 16384), ("head_epochs", 0, 10000), ("finetune_epochs", 0, 10000),
          ("offline_augment", 0, 64), ("patience", 0, 10000), ("threads", 0, 1024), ("feature_views", 0, 64))


def option(default: Any = None, help: str = "", *, choices: tuple | None = None, metavar: str | None = None,
           cli: bool = True, default_factory=None):
    """A config field with its help text and allowed values (read by validate and the CLI)."""
    meta = {"help": help, "choices": choices, "metavar": metavar, "cli": cli}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that decides what a training run does. Saved as RUN/config.json."""

    recipe: str = option("default", "named preset the other options override (default: default)")
    # model
    model: str = option(DEFAULT_MODEL, f"timm backbone (default {DEFAULT_MODEL})")
    pretrained: bool = option(True, "start from ImageNet weights (--no-pretrained: random weights)")
    weights: str | None = option(None, "local backbone checkpoint (.safetensors or state dict) instead of the "
                                 "packaged or hub weights", metavar="PATH")
    init: str | None = option(None, "start from a trained run's weights (a run directory, or a shipped model: "
                              "bus-base) instead of ImageNet's", metavar="RUN")
    keep_init: float | None = option(None, "with --init: the final weights keep this share of the init's, averaged "
                                     "with the fine-tuned ones (WiSE-FT); default 0.5 with --init, 0: the fine-tuned "
                                     "weights alone", metavar="SHARE")
    img_size: int | None = option(None, "input size in px (default: the backbone's pretrained size)")
    resize: str = option("pad", "pad: keep the aspect ratio (letterbox); stretch: the notebook's square resize",
                         choices=("pad", "stretch"))
    clean_overlays: bool = option(True, "paint over near-white calipers, text and markers before resizing")
    seg_weight: float = option(1.0, "weight of the lesion-mask loss (Dice + BCE on images with a mask) beside the "
                               "classification loss; a mask decoder is trained when the training data have masks "
                               "(0: no mask head)")
    hidden: int = option(256, "units of the head's hidden dense layer")
    dropout: float = option(0.3, "dropout before the head's output layer")
    # data
    classes: list[str] | None = option(None, "classes to use, in order (e.g. benign malignant)")
    positive: str | None = option(None, "positive class of a binary task (default: malignant when present)")
    balance: str = option("weighted", "class balance: weighted loss, undersample the training part, or none",
                          choices=("weighted", "undersample", "none"))
    augment: bool = option(True, "on-the-fly ultrasound augmentation in phase 2")
    appearance: str = option("scanner", "intensity augmentation: scanner (default): a random gain curve over "
                             "depth, dynamic-range changes, speckle grain and resolution loss, as other scanners "
                             "show, on top of standard (gain, contrast, gamma, depth ramp, speckle, blur)",
                             choices=APPEARANCES)
    offline_augment: int = option(0, "N fixed transformed copies per training image (the notebook used 7)",
                                  metavar="N")
    dedup: bool = option(True, "find duplicate images and keep each set on one side of every split")
    val_size: float = option(0.15, "validation fraction of what is not held out for testing")
    test_size: float = option(0.2, "held-out test fraction (when no separate test data is given)")
    skip_bad: bool = option(False, "leave out unreadable images, with a warning")
    image_cache: str = option("auto", "where the decoded images are kept: memory, or a file on disk read a batch at "
                              "a time (built once, reused; $SONOCAD_CACHE/images); auto: disk above 2 GiB",
                              choices=("auto", "memory", "disk"))
    frames: str = option("first", "frames of a multi-frame DICOM file (cine loop) to use: the first, the middle one, "
                         "or all (each a sample; a file's frames never cross a split)", choices=("first", "middle", "all"))
    # phase 1: frozen backbone, head only
    head_epochs: int = option(60, "phase 1 (head on the frozen backbone): most epochs, early stopping")
    head_lr: float = option(3e-4, "phase 1 learning rate")
    # phase 2: top blocks unfrozen
    unfreeze: str = option("2", "top blocks to fine-tune in phase 2: a number or 'all' (0 skips phase 2)")
    finetune_epochs: int = option(12, "phase 2 epochs")
    finetune_lr: float = option(2e-4, "phase 2 peak learning rate (warm-up, then cosine)")
    # optimisation
    optimizer: str = option("adamw", "optimiser", choices=("adamw", "adagrad", "sgd"))
    weight_decay: float = option(1e-4, "weight decay of the optimiser")
    batch_size: int = option(32, "images per batch")
    patience: int = option(4, "epochs without a better validation loss before early stopping")
    ema_epochs: float = option(2.0, "phase 2 keeps a moving average of the weights over about E epochs and runs "
                               "its full schedule (0: the epoch with the best validation loss, early stopping)",
                               metavar="E")
    cache_features: bool = option(True, "phase 1 trains the head on backbone features computed once")
    feature_views: int = option(4, "augmented views per training image among phase 1's cached features")
    tta: bool = option(True, "test-time augmentation: average the prediction over mirrored and zoomed views")
    tta_zooms: list[float] = option(help="test-time zooms averaged besides the image as it is, each also mirrored "
                                    "(default 0.87 1.15; none given: the mirror image only)", metavar="Z",
                                    default_factory=lambda: [0.87, 1.15])
    temperature_scaling: bool = option(False, "calibrate probabilities with a temperature fitted on validation "
                                       "data (binary), saved with the model")
    ci: str = option("delong", "AUC confidence interval method", choices=("delong", "bootstrap"))
    precision: str = option("auto", "auto: bf16 autocast on CPUs with native bf16, else fp32", choices=PRECISIONS)
    threads: int = option(0, "torch threads (0: torch's default)")
    seed: int = option(0, "random seed: the same seed on the same machine gives the same numbers")

    def validate(self) -> "TrainConfig":
        """Check option values; raise OptionError naming the first impossible one."""
        def bad(name: str, why: str):
            raise OptionError(name, why)

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, f"must be {', '.join(choices[:-1])} or {choices[-1]}, not {getattr(self, f.name)!r}")
        if self.recipe not in RECIPES:
            bad("recipe", f"unknown recipe {self.recipe!r}; known: {', '.join(RECIPES)}")
        if self.init is not None and self.weights is not None:
            bad("init", "starts from a trained run's weights; it cannot be combined with --weights")
        if self.keep_init is None:
            self.keep_init = DEFAULT_KEEP_INIT if self.init else 0.0
        share = self.keep_init
        if isinstance(share, bool) or not (isinstance(share, (int, float)) and 0 <= share < 1):
            bad("keep_init", f"must be a share in [0, 1), not {self.keep_init!r}")
        self.keep_init = float(self.keep_init)
        if self.keep_init and not self.init:
            bad("keep_init", "averages the fine-tuned weights with the --init run's; give --init, or leave it out")
        if self.unfreeze != "all" and not (str(self.unfreeze).isdigit()):
            bad("unfreeze", f"must be a number of blocks or 'all', not {self.unfreeze!r}")
        self.unfreeze = str(self.unfreeze)
        if self.img_size is not None and not 32 <= self.img_size <= MAX_IMG_SIZE:
            bad("img_size", f"must be between 32 and {MAX_IMG_SIZE} px, not {self.img_size}")
        if not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"must be between 0 and {MAX_SEED}, not {self.seed}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), not {self.dropout}")
        for name in ("val_size", "test_size"):
            if not 0.0 < getattr(self, name) < 0.5:
                bad(name, f"must be between 0 and 0.5, not {getattr(self, name)}")
        for name, low, high in LIMITS:
            if not low <= getattr(self, name) <= high:
                bad(name, f"must be between {low} and {high}, not {getattr(self, name)}")
        if len(self.tta_zooms) > 8:
            bad("tta_zooms", f"at most 8 zooms (each costs two more views), not {len(self.tta_zooms)}")
        if not 0.0 <= self.ema_epochs <= 1000:
            bad("ema_epochs", f"must be between 0 (off) and 1000, not {self.ema_epochs}")
        for name in ("head_lr", "finetune_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                bad(name, f"must be a positive number, not {getattr(self, name)}")
        if not (0 <= self.seg_weight <= 100 and math.isfinite(self.seg_weight)):
            bad("seg_weight", f"must be between 0 (no mask head) and 100, not {self.seg_weight}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad("weight_decay", f"must be a number of at least 0, not {self.weight_decay}")
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
            raise OptionError("recipe", f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
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
        """A config from saved values (unknown keys ignored), each checked against its field's type."""
        hints = typing.get_type_hints(cls)
        values = {k: v for k, v in d.items() if k in hints}
        for k, v in values.items():
            if not _has_type(v, hints[k]):
                raise OptionError(k, f"{v!r} is not of type {_type_name(hints[k])}")
        return cls(**values)


def _has_type(v, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(v, a) for a in args)
    if origin is list:
        return isinstance(v, list) and all(_has_type(x, args[0]) for x in v)
    if hint is type(None):
        return v is None
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, hint)


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


# what runs saved before an option existed did, where that differs from the option's default now
BEFORE_OPTION = {"tta_zooms": [], "ema_epochs": 0.0, "seg_weight": 0.0, "appearance": "standard", "keep_init": 0.0}
# the init's share of the final weights when fine-tuning from --init (docs/calibration.md: chosen on the selection
# parts of leave-one-site-out, confirmed on new seeds)
DEFAULT_KEEP_INIT = 0.5


RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # The notebook this project grew from: InceptionV3 at 224 px, batch 8, Adagrad, undersampling,
    # 7 offline augmentations, frozen phase then top 2 inception blocks, images stretched to square.
    "notebook": dict(
        model="inception_v3", img_size=224, resize="stretch", batch_size=8, optimizer="adagrad",
        head_lr=1e-2, finetune_lr=1e-3, balance="undersample", offline_augment=7, augment=False,
        unfreeze="2", head_epochs=30, finetune_epochs=15, patience=5, tta=False, tta_zooms=[], clean_overlays=False,
        ema_epochs=0, appearance="standard",
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
    # each operating point's figures on the data it was chosen on (operating.point_figures), and those data
    operating_points: dict = field(default_factory=dict)
    temperature: float = 1.0
    version: str = ""
    mask_head: bool = False     # the model has the lesion-mask decoder (trained on masks, seg_weight > 0)
    distributed: dict = field(default_factory=dict)     # {world_size, backend} of a run trained by several processes

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def site_notice(self, run: str) -> str | None:
        """One line for a binary run whose thresholds were chosen at the site it was trained on rather than
        on labelled scans of the site it is used at (neither calibrated nor adapted there): where they were
        chosen, and the command that chooses them at a new hospital. None for the others."""
        if not self.binary or self.data.get("calibrated_from") or self.data.get("adapted_from"):
            return None
        chosen = (self.operating_points or {}).get("chosen_on") or "validation data of the training run"
        base = "RUN" if run.endswith(".onnx") else run          # adapt needs the run an ONNX file came from
        return (f"the thresholds of {run} were chosen on {chosen} at the site it was trained on and may not hold "
                f"at another hospital: sonocad adapt {base} LOCAL_SCANS --out NEW_RUN chooses them on that "
                "hospital's own labelled scans" + (" (RUN: the run it was exported from)" if base != run else ""))

    def save(self, path: Path) -> None:
        from .io.files import atomic_write_text

        d = dataclasses.asdict(self)
        atomic_write_text(path, json.dumps(d, indent=2))

    @classmethod
    def load(cls, path: Path) -> "RunInfo":
        """A run's config.json, every field checked: a damaged or hand-edited file gives one line naming
        the field, never a run with impossible settings."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise SonocadError(f"{path}: no config.json; is this a sonocad run directory?") from None
        except OSError as e:
            raise SonocadError(f"{path}: cannot read ({e.strerror or e})") from None
        return cls.loads(data, path)

    @classmethod
    def loads(cls, data: bytes, path: Path) -> "RunInfo":
        """RunInfo.load from the bytes of `path`."""
        try:
            d = json.loads(data)
            d["config"] = TrainConfig.from_dict({**BEFORE_OPTION, **d["config"]}).validate()
            info = cls(**d)
        except OptionError as e:
            raise SonocadError(f"{path}: {e}") from None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise SonocadError(f"{path}: not a valid sonocad config ({e.__class__.__name__})") from None
        problem = info._problem()
        if problem:
            raise SonocadError(f"{path}: {problem}")
        return info

    def _problem(self) -> str | None:
        def numbers(v, n=None):
            return isinstance(v, list) and (n is None or len(v) == n) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)

        if not (isinstance(self.classes, list) and len(self.classes) >= 2
                and all(isinstance(c, str) for c in self.classes) and len(set(self.classes)) == len(self.classes)):
            return f"classes: need two or more distinct names, not {self.classes!r}"
        if self.positive is not None and self.positive not in self.classes:
            return f"positive: {self.positive!r} is not one of the classes"
        if not (isinstance(self.img_size, int) and 32 <= self.img_size <= MAX_IMG_SIZE):
            return f"img_size: must be a whole number between 32 and {MAX_IMG_SIZE}, not {self.img_size!r}"
        if not (numbers(self.mean, 3) and numbers(self.std, 3) and all(s > 0 for s in self.std)):
            return f"mean, std: need three numbers each (std positive), not {self.mean!r}, {self.std!r}"
        if not (isinstance(self.thresholds, dict) and all(
                t is None or (isinstance(t, (int, float)) and not isinstance(t, bool)) for t in self.thresholds.values())):
            return f"thresholds: need numbers, not {self.thresholds!r}"      # None / NaN: no such point
        if any(t is not None and math.isfinite(t) and not 0 <= t <= 1 for t in self.thresholds.values()) or (
                "default" in self.thresholds and not math.isfinite(self.thresholds["default"] or math.nan)):
            return f"thresholds: probabilities between 0 and 1 (the default one given), not {self.thresholds!r}"
        if not (isinstance(self.operating_points, dict)
                and all(isinstance(v, (dict, str)) for v in self.operating_points.values())):
            return "operating_points: need a table of figures per operating point"
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            return f"temperature: must be a positive number, not {self.temperature!r}"
        if not isinstance(self.mask_head, bool):
            return f"mask_head: must be true or false, not {self.mask_head!r}"
        return None
