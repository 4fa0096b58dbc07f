"""`sonocad evaluate`, `predict` and `compare`: a finished run (or a cv folder as an ensemble) on new data.

>>> from sonocad.evaluate import evaluate_run, predict_paths
>>> m = evaluate_run("runs/busi", "BUSBRA", "runs/busi-on-busbra")   # doctest: +SKIP
>>> predict_paths("runs/busi", ["scan.png"])                           # doctest: +SKIP
[{'path': 'scan.png', 'prob_benign': 0.91, 'prob_malignant': 0.09, 'predicted': 'benign'}]
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .data import discover
from .data.dicom import frame_refs
from .data.discover import image_files
from .errors import SonocadError, SonocadWarning
from .io import ensure_writable_dir
from .rundir import RunLock, finish, prepare_output, refuse_writing_into_runs, remove, swap_in
from .metrics import delong_test
from .predictor import Predictor
from .results import score_predictions, write_evaluation


def _source(data) -> str | list[str]:
    return [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data)


def evaluate_run(run: str | Path, data, out: str | Path, skip_bad: bool = False,
                 precision: str = "auto", shortcut: bool = False) -> dict:
    """Evaluate a trained run on another dataset, using the run's classes and ignoring other classes.
    `shortcut=True` adds the shortcut check (overlays removed, lesion masked out) on images with masks."""
    refuse_writing_into_runs(out, [run], "out")
    with RunLock(out) as lock:
        out = lock.run
        # always built beside and swapped in: a kill leaves the earlier evaluation, or none, never half of one
        work = ensure_writable_dir(prepare_output(out, allowed_kind="evaluate", in_place=False))
        try:
            metrics = _evaluate(run, data, work, skip_bad, precision, shortcut)
            finish(work, ["metrics.json", "predictions.csv", "report.html"], kind="evaluate")
        except BaseException:
            remove(work)
            raise
        swap_in(work, out)
    return metrics


def _evaluate(run, data, out: Path, skip_bad: bool, precision: str, shortcut: bool) -> dict:
    predictor = Predictor.load(run, precision)
    info = predictor.info
    samples = discover(data, info.classes, allow_missing_classes=True, frames=info.config.frames)
    images, samples, y, bad = predictor.decode_samples(samples, skip_bad)
    missing = [c for i, c in enumerate(info.classes) if not (y == i).any()]
    if missing:
        warnings.warn(SonocadWarning(f"{data}: no images of {', '.join(missing)}: AUC and the figures that need "
                                     "every class are undefined (n/a); sensitivity or specificity alone remain"))
    probs = predictor.predict_proba(images)
    metrics = score_predictions(y, probs, info)
    metrics["data"] = {"source": _source(data), "run": str(run), "skipped_bad_images": bad}
    sections = []
    if shortcut:
        from .shortcut import shortcut_check, shortcut_section

        metrics["shortcut_check"] = shortcut_check(predictor, data, skip_bad=skip_bad)
        sections.append(shortcut_section(metrics["shortcut_check"]))
    write_evaluation(out, metrics, samples, y, probs, info, title=f"sonocad evaluation of {run} on {data}",
                     extra_sections=sections)
    return metrics


def predict_paths(run: str | Path, inputs: list[str | Path], skip_bad: bool = False,
                  precision: str = "auto", batch_size: int = 64) -> list[dict]:
    """Per-image class probabilities and predicted class for image files and folders (rows in input order;
    with `skip_bad`, an unreadable image gives a row with its `error` instead)."""
    predictor = Predictor.load(run, precision)
    files = [ref for f in image_files(inputs) for ref in frame_refs(str(f), predictor.info.config.frames)]
    rows = []
    # decode in chunks so a folder of thousands of images never sits in memory at once
    for start in range(0, len(files), 512):
        chunk = [str(f) for f in files[start:start + 512]]
        images, good, bad = predictor.decode(chunk, skip_bad)
        probs = predictor.predict_proba(images, batch_size)
        for i, p, pred in zip(good, probs, predictor.decide(probs)):
            rows.append({"path": chunk[i], **{f"prob_{c}": float(v) for c, v in zip(predictor.classes, p)},
                         "predicted": pred})
        for problem in bad:
            rows.append({"path": problem.split(": ")[0], "error": problem})
    return rows


def compare_runs(run_a: str | Path, run_b: str | Path, data, skip_bad: bool = False,
                 precision: str = "auto") -> dict:
    """Paired DeLong test of two binary runs' AUCs on the same images of `data`."""
    probs, seen = [], []
    for run in (run_a, run_b):
        predictor = Predictor.load(run, precision)
        if not predictor.info.binary:
            raise SonocadError(f"{run}: compare needs binary runs; this one has classes "
                               f"{', '.join(predictor.classes)}")
        samples = discover(data, predictor.classes, allow_missing_classes=True, frames=predictor.info.config.frames)
        images, samples, y, _ = predictor.decode_samples(samples, skip_bad)
        seen.append(([s.path for s in samples], y))
        probs.append(predictor.predict_proba(images)[:, 1])
    (paths_a, y_a), (paths_b, y_b) = seen
    if paths_a != paths_b or not np.array_equal(y_a, y_b):
        raise SonocadError(f"{run_a} and {run_b} see different images or classes in {data}; "
                           "compare needs the same binary task")
    result = delong_test(y_a, probs[0], probs[1])
    return {"run_a": str(run_a), "run_b": str(run_b), "data": str(data), "n": int(len(y_a)), **result}
