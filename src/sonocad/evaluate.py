"""Evaluation and prediction with a finished run directory (config.json + model.safetensors).

>>> from sonocad.evaluate import evaluate_run, predict_paths
>>> m = evaluate_run("runs/busi", "BUSBRA", "runs/busi-on-busbra")   # doctest: +SKIP
>>> predict_paths("runs/busi", ["scan.png"])                           # doctest: +SKIP
[{'path': 'scan.png', 'prob_benign': 0.91, 'prob_malignant': 0.09, 'predicted': 'benign'}]
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from .config import RunInfo
from .data import discover, load_many
from .data.discover import MASK_RE
from .data.images import IMAGE_SUFFIXES
from .errors import SonocadError
from .infer import InputPipeline, resolve_precision, run_batches
from .io import atomic_write_text, ensure_writable_dir
from .metrics import binary_metrics, multiclass_metrics
from .models import Classifier, create_model, fold_batchnorm, read_state_dict


def load_run(run: str | Path, precision: str = "auto") -> tuple[RunInfo, Classifier, InputPipeline]:
    """The run's config, its trained model (eval mode, BatchNorm folded for inference) and the
    matching input pipeline."""
    run = Path(run)
    if not run.is_dir():
        raise SonocadError(f"{run}: run directory not found")
    info = RunInfo.load(run / "config.json")
    cfg = info.config
    n_out = 1 if len(info.classes) == 2 else len(info.classes)
    model = create_model(cfg.model, n_out, pretrained=False, hidden=cfg.hidden, dropout=cfg.dropout)
    state = read_state_dict(run / "model.safetensors")
    state.setdefault("temperature", torch.ones(()))    # runs saved before temperature scaling existed
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise SonocadError(f"{run / 'model.safetensors'}: weights do not fit the model in config.json "
                           f"({cfg.model}); the file is damaged or from another run") from None
    prec = resolve_precision(precision)
    model = model.to(prec.device).eval()
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return info, fold_batchnorm(model), InputPipeline(info.mean, info.std, prec)


class Predictor:
    """A trained run, or the ensemble of a cross-validation's fold models (mean probability), with the
    preprocessing they were trained with. `predict(images)` gives class probabilities (N, C)."""

    def __init__(self, info: RunInfo, members: list[tuple[Classifier, InputPipeline]]):
        self.info, self.members = info, members

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        cfg = self.info.config
        return np.mean([predict_images(m, p, images, cfg.tta, batch_size, cfg.tta_zooms) for m, p in self.members],
                       axis=0)


PREPROCESSING = ("model", "resize", "clean_overlays", "tta", "tta_zooms")


def load_predictor(run: str | Path, precision: str = "auto") -> Predictor:
    """A run directory, or a `sonocad cv` directory whose fold models become one ensemble."""
    run = Path(run)
    if (run / "config.json").is_file() or not run.is_dir():
        info, model, pipeline = load_run(run, precision)
        return Predictor(info, [(model, pipeline)])
    folds = sorted(run.glob("fold-*/config.json")) + sorted(run.glob("repeat-*/fold-*/config.json"))
    if not folds:
        raise SonocadError(f"{run}: no config.json (nor cross-validation folds); is this a sonocad run directory?")
    loaded = [load_run(f.parent, precision) for f in folds]
    first = loaded[0][0]
    for info, _, _ in loaded[1:]:
        if info.classes != first.classes or info.img_size != first.img_size or any(
                getattr(info.config, k) != getattr(first.config, k) for k in PREPROCESSING):
            raise SonocadError(f"{run}: fold models differ in classes or preprocessing; cannot ensemble them")
    names = set.intersection(*(set(i.thresholds or {}) for i, _, _ in loaded))
    thresholds = {n: float(np.mean([i.thresholds[n] for i, _, _ in loaded])) for n in sorted(names)}
    info = RunInfo(first.config, first.classes, first.positive, first.img_size, first.mean, first.std,
                   {"ensemble_of": [str(f.parent) for f in folds]}, thresholds or {"default": 0.5},
                   version=first.version)
    return Predictor(info, [(m, p) for _, m, p in loaded])


def predict_images(model: Classifier, pipeline: InputPipeline, images: np.ndarray, tta: bool,
                   batch_size: int = 64, zooms=()) -> np.ndarray:
    """Class probabilities (N, num_classes) for uint8 images (N, S, S); with `tta`, from logits averaged
    over the mirror image and `zooms` (see infer.tta_views)."""
    model = fold_batchnorm(model)
    logits = run_batches(model, images, pipeline, batch_size=batch_size, tta=tta, zooms=zooms)
    if len(images) == 0:
        return np.zeros((0, max(2, model.num_outputs)), np.float32)
    return model.probabilities(torch.from_numpy(logits)).numpy()


def score_predictions(y: np.ndarray, probs: np.ndarray, info: RunInfo) -> dict:
    """Metrics of predicted probabilities against true class indices, at the run's operating points."""
    classes = info.classes
    n_per_class = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    if len(classes) == 2:
        thresholds = info.thresholds or {"default": 0.5}
        m = binary_metrics(y == 1, probs[:, 1], threshold=thresholds.get("default", 0.5),
                           ci=getattr(info.config, "ci", "delong"), seed=info.config.seed)
        m["operating_points"] = {}
        for name, t in thresholds.items():
            if t is None or not np.isfinite(t):
                continue
            op = binary_metrics(y == 1, probs[:, 1], threshold=t, ci=None)
            m["operating_points"][name] = {k: op[k] for k in (
                "threshold", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "ppv", "npv",
                "balanced_accuracy", "accuracy", "confusion_matrix")}
        m["thresholds_chosen_on"] = "validation data of the training run (never on the evaluated data)"
    else:
        m = multiclass_metrics(y, probs, classes)
    m.update(classes=classes, positive=info.positive, n_per_class=n_per_class)
    return m


def _fmt(v: float) -> str:
    return f"{v:.6f}"


def write_evaluation(out: Path, metrics: dict, samples, y: np.ndarray, probs: np.ndarray, info: RunInfo,
                     log: list[dict] | None = None, title: str = "sonocad run", *,
                     extra_columns: dict[str, list] | None = None, extra_sections: list[str] | None = None,
                     predictions_name: str = "predictions.csv") -> None:
    """metrics.json, the predictions CSV (path, label, group, [extra columns], prob...), plots/*.png and
    report.html in `out`."""
    from .report import write_report

    out = Path(out)
    extra_columns = extra_columns or {}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    buf = io.StringIO()
    w = csv.writer(buf)
    binary = len(info.classes) == 2
    w.writerow(["path", "label", "group", *extra_columns, *(["prob"] if binary else []),
                *[f"prob_{c}" for c in info.classes], "predicted"])
    threshold = (info.thresholds or {}).get("default", 0.5)
    for i, (s, yi, p) in enumerate(zip(samples, y, probs)):
        pred = info.classes[int(p[1] >= threshold)] if binary else info.classes[int(np.argmax(p))]
        w.writerow([s.path, info.classes[yi], s.group or "", *(col[i] for col in extra_columns.values()),
                    *([_fmt(p[1])] if binary else []), *map(_fmt, p), pred])
    atomic_write_text(out / predictions_name, buf.getvalue())
    write_report(out, metrics, y, probs, info, log, title, extra_sections)


def read_predictions(path: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """(paths, probabilities (N, C)) back from a predictions CSV written by write_evaluation."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["path"] for r in rows], np.asarray([[float(r[f"prob_{c}"]) for c in classes] for r in rows])


def evaluate_run(run: str | Path, data, out: str | Path, skip_bad: bool = False,
                 precision: str = "auto", shortcut: bool = False) -> dict:
    """Evaluate a trained run on another dataset, using the run's classes and ignoring other classes.
    `shortcut=True` adds the shortcut check (overlays removed, lesion masked out) on images with masks."""
    out = ensure_writable_dir(out)
    predictor = load_predictor(run, precision)
    info = predictor.info
    samples = discover(data, info.classes, allow_missing_classes=True)
    images, good, bad = load_many([s.path for s in samples], info.img_size, info.config.resize, skip_bad,
                                  clean_overlays=info.config.clean_overlays)
    samples = [samples[i] for i in good]
    y = np.asarray([info.classes.index(s.label) for s in samples])
    probs = predictor.predict(images)
    metrics = score_predictions(y, probs, info)
    metrics["data"] = {"source": str(data) if not isinstance(data, (list, tuple)) else [str(d) for d in data],
                       "run": str(run), "skipped_bad_images": bad}
    sections = []
    if shortcut:
        from .report import html_table
        from .shortcut import VERSIONS, shortcut_check

        sc = metrics["shortcut_check"] = shortcut_check(run, data, predictor=predictor)
        rows = [[k.replace("_", " "), VERSIONS[k], sc[k]["auc"], sc[k]["auc_ci"], sc[k]["mean_abs_change"]]
                for k in VERSIONS]
        sections.append(f"<h2>Shortcut check</h2><p>{sc['n']} images with lesion masks, predicted as they are, "
                        "with overlays painted over, and with the lesion hidden. A model that still separates "
                        "the classes with the lesion and its outline hidden (box textured) reads something "
                        "other than the lesion: annotations, the site's presets, surrounding anatomy. "
                        "Posterior shadowing and enhancement lie below the box and are legitimate cues, so "
                        "an AUC above 0.5 there is a warning, not proof.</p>"
                        + html_table(["images", "how", "AUC", "AUC 95% CI", "mean |change| of P(positive)"], rows))
    write_evaluation(out, metrics, samples, y, probs, info, title=f"sonocad evaluation of {run} on {data}",
                     extra_sections=sections)
    return metrics


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Image paths from files and folders (searched recursively, lesion masks left out)."""
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not MASK_RE.match(f.stem) and not f.name.startswith("."))
            if not found:
                raise SonocadError(f"{p}: no images in this folder")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise SonocadError(f"{p}: no such file or folder")
    return files


def predict_paths(run: str | Path, inputs: list[str | Path], skip_bad: bool = False,
                  precision: str = "auto", batch_size: int = 64) -> list[dict]:
    """Per-image class probabilities and predicted class for image files and folders."""
    predictor = load_predictor(run, precision)
    info = predictor.info
    files = image_files(inputs)
    rows = []
    threshold = (info.thresholds or {}).get("default", 0.5)
    # decode in chunks so a folder of thousands of images never sits in memory at once
    for start in range(0, len(files), 512):
        chunk = [str(f) for f in files[start:start + 512]]
        images, good, bad = load_many(chunk, info.img_size, info.config.resize, skip_bad,
                                      clean_overlays=info.config.clean_overlays)
        probs = predictor.predict(images, batch_size)
        for i, p in zip(good, probs):
            pred = (info.classes[int(p[1] >= threshold)] if len(info.classes) == 2
                    else info.classes[int(np.argmax(p))])
            rows.append({"path": chunk[i], **{f"prob_{c}": float(v) for c, v in zip(info.classes, p)},
                         "predicted": pred})
        for problem in bad:
            rows.append({"path": problem.split(": ")[0], "error": problem})
    return rows


def compare_runs(run_a: str | Path, run_b: str | Path, data, skip_bad: bool = False,
                 precision: str = "auto") -> dict:
    """Paired DeLong test of two binary runs' AUCs on the same images of `data`."""
    from .metrics import delong_test

    probs, ys = [], []
    for run in (run_a, run_b):
        predictor = load_predictor(run, precision)
        info = predictor.info
        if len(info.classes) != 2:
            raise SonocadError(f"{run}: compare needs binary runs; this one has classes {', '.join(info.classes)}")
        samples = discover(data, info.classes, allow_missing_classes=True)
        images, good, _ = load_many([s.path for s in samples], info.img_size, info.config.resize, skip_bad,
                                    clean_overlays=info.config.clean_overlays)
        samples = [samples[i] for i in good]
        ys.append(({s.path for s in samples}, np.asarray([info.classes.index(s.label) for s in samples])))
        probs.append(predictor.predict(images)[:, 1])
        if len(ys) == 2 and (ys[0][0] != ys[1][0] or not np.array_equal(ys[0][1], ys[1][1])):
            raise SonocadError(f"{run_a} and {run_b} see different images or classes in {data}; "
                               "compare needs the same binary task")
    result = delong_test(ys[0][1], probs[0], probs[1])
    return {"run_a": str(run_a), "run_b": str(run_b), "data": str(data), "n": int(len(ys[0][1])), **result}
