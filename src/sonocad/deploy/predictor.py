"""A finished model, loaded with the preprocessing it was trained with: the layer that evaluate, predict,
the shortcut check and cross-validation (and later explain, serve, export) all use.

A run directory (config.json + model.safetensors), or a `sonocad cv` folder whose fold models become one
ensemble (mean probability), loads into a Predictor. It owns the run's preprocessing: decoding with the
run's resize mode and overlay cleaning, the input normalisation, the test-time views and the precision.

>>> from sonocad.deploy.predictor import Predictor
>>> p = Predictor.load("runs/busi")                       # doctest: +SKIP
>>> p.predict_proba(["scan.png"])                         # doctest: +SKIP
array([[0.91, 0.09]], dtype=float32)
>>> p.predict(["scan.png"])                               # doctest: +SKIP
['benign']
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..config import RunInfo
from ..data import load_many
from ..errors import SonocadError
from ..io.rundir import kind, read_finished
from ..models.classifier import Classifier, fold_batchnorm, trained_model
from ..models.infer import InputPipeline, resolve_precision, run_batches
from ..zoo import resolve

# what the fold models of an ensemble must share
PREPROCESSING = ("model", "resize", "clean_overlays", "tta", "tta_zooms")


def load_run(run: str | Path, precision: str = "auto") -> tuple[RunInfo, Classifier, InputPipeline]:
    """The run's config, its trained model (eval mode, BatchNorm folded for inference) and the
    matching input pipeline."""
    info, model = trained_model(run)
    prec = resolve_precision(precision)
    model = model.to(prec.device).eval()
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return info, fold_batchnorm(model), InputPipeline(info.mean, info.std, prec)


def cv_fold_dirs(run: Path) -> list[Path]:
    """The fold runs of a `sonocad cv` folder (those of its repeats too), in order; empty for any other folder."""
    return [f.parent for f in sorted(run.glob("fold-*/config.json")) + sorted(run.glob("repeat-*/fold-*/config.json"))]


def check_folds_agree(run: str | Path, infos: list[RunInfo], consequence: str, also: tuple[str, ...] = ()) -> None:
    """Refuse fold models that differ in classes, input size or preprocessing (and the config fields `also`)."""
    first = infos[0]
    for info in infos[1:]:
        if info.classes != first.classes or info.img_size != first.img_size or any(
                getattr(info.config, k) != getattr(first.config, k) for k in (*PREPROCESSING, *also)):
            raise SonocadError(f"{run}: fold models differ in classes or preprocessing; {consequence}")


def predict_images(model: Classifier, pipeline: InputPipeline, images: np.ndarray, tta: bool,
                   batch_size: int = 64, zooms=()) -> np.ndarray:
    """Class probabilities (N, num_classes) of one model for uint8 images (N, S, S); with `tta`, from
    logits averaged over the mirror image and `zooms` (see infer.tta_views)."""
    model = fold_batchnorm(model)
    logits = run_batches(model, images, pipeline, batch_size=batch_size, tta=tta, zooms=zooms)
    if len(images) == 0:
        return np.zeros((0, max(2, model.num_outputs)), np.float32)
    return model.probabilities(torch.from_numpy(logits)).numpy()


class Predictor:
    """A trained run, or the ensemble of a cross-validation's fold models (mean probability), with the
    preprocessing they were trained with."""

    def __init__(self, info: RunInfo, members: list[tuple[Classifier, InputPipeline]]):
        self.info, self.members = info, members

    @classmethod
    def load(cls, run: str | Path, precision: str = "auto") -> "Predictor":
        """A run directory, or a `sonocad cv` directory whose fold models become one ensemble."""
        run = resolve(run)
        if (run / "config.json").is_file() or not run.is_dir():
            info, model, pipeline = load_run(run, precision)
            return cls(info, [(model, pipeline)])
        folds = cv_fold_dirs(run)
        if not folds:
            raise SonocadError(f"{run}: no config.json (nor cross-validation folds); is this a sonocad run "
                               "directory?")
        if kind(run) != "cv":
            raise SonocadError(f"{run}: cross-validation in progress or interrupted ({len(folds)} fold(s) so far); "
                               "run the same sonocad cv command again to finish it")
        loaded = [load_run(f, precision) for f in folds]
        check_folds_agree(run, [i for i, _, _ in loaded], "cannot ensemble them")
        first = loaded[0][0]
        chosen = pooled_points(run)
        if chosen:           # chosen on the pooled out-of-fold predictions (cv of this version)
            thresholds = chosen.pop("thresholds")
        else:                # older cv folders: the folds' thresholds, averaged
            names = set.intersection(*(set(i.thresholds or {}) for i, _, _ in loaded))
            thresholds = {n: float(np.mean([i.thresholds[n] for i, _, _ in loaded])) for n in sorted(names)}
        info = RunInfo(first.config, first.classes, first.positive, first.img_size, first.mean, first.std,
                       {"ensemble_of": [str(f) for f in folds]}, thresholds or {"default": 0.5},
                       chosen or {}, version=first.version)
        return cls(info, [(m, p) for _, m, p in loaded])

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def threshold(self) -> float:
        """The default operating point on the positive class's probability (binary runs)."""
        return (self.info.thresholds or {}).get("default", 0.5)

    def decode(self, paths: list[str], skip_bad: bool = False) -> tuple[np.ndarray, list[int], list[str]]:
        """Decode image files as the run was trained: (uint8 images (N, S, S), indices of the good files,
        one-line problems of the bad ones). Without `skip_bad` a bad file raises SonocadError."""
        cfg = self.info.config
        return load_many([str(p) for p in paths], self.info.img_size, cfg.resize, skip_bad,
                         clean_overlays=cfg.clean_overlays)

    def decode_samples(self, samples: list, skip_bad: bool = False) -> tuple[np.ndarray, list, np.ndarray, list[str]]:
        """Decode labelled samples: (images, the samples kept, their class indices, problems)."""
        images, good, bad = self.decode([s.path for s in samples], skip_bad)
        if not good and samples:
            raise SonocadError(f"none of the {len(samples)} images could be read (first: {bad[0]})")
        kept = [samples[i] for i in good]
        return images, kept, np.asarray([self.classes.index(s.label) for s in kept], int), bad

    def predict_proba(self, images, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, C), columns in `classes` order, for decoded uint8 images (N, S, S) or a
        list of image paths (decoded with the run's preprocessing)."""
        if not isinstance(images, np.ndarray):
            images = self.decode(list(images))[0]
        cfg = self.info.config
        return np.mean([predict_images(m, p, images, cfg.tta, batch_size, cfg.tta_zooms) for m, p in self.members],
                       axis=0)

    def decide(self, probs: np.ndarray) -> list[str]:
        """The predicted class of each row of probabilities: the positive class at or above the run's
        default threshold (binary), else the most probable class."""
        if self.info.binary:
            return [self.classes[int(p[1] >= self.threshold)] for p in probs]
        return [self.classes[int(np.argmax(p))] for p in probs]

    def predict(self, images, batch_size: int = 64) -> list[str]:
        """The predicted class of each image (see decide)."""
        return self.decide(self.predict_proba(images, batch_size))


def pooled_points(run: Path) -> dict | None:
    """The operating points a finished cv chose on its pooled out-of-fold predictions, if it recorded them."""
    data = read_finished(run, ["metrics.json"]).get("metrics.json")
    points = json.loads(data).get("ensemble_operating_points") if data else None
    return dict(points) if isinstance(points, dict) and isinstance(points.get("thresholds"), dict) else None


def load_predictor(run: str | Path, precision: str = "auto") -> Predictor:
    """Predictor.load: a run directory, or a `sonocad cv` folder as an ensemble."""
    return Predictor.load(run, precision)
