"""`sonocad evaluate`, `predict` and `compare`: a finished run (or a cv folder as an ensemble) on new data.

>>> from sonocad.workflows.evaluate import evaluate_run, predict_paths
>>> m = evaluate_run("runs/busi", "BUSBRA", "runs/busi-on-busbra")   # doctest: +SKIP
>>> predict_paths("runs/busi", ["scan.png"])                           # doctest: +SKIP
[{'path': 'scan.png', 'prob_benign': 0.91, 'prob_malignant': 0.09, 'predicted': 'benign'}]
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from ..analysis.explain import PICTURE, explanation_metrics, picture_name, write_pictures
from ..analysis.segment import has_mask_head, segmentation_report, write_masks
from ..config import RunInfo
from ..data import discover
from ..data.dicom import frame_refs
from ..data.discover import image_files
from ..deploy.export import load_onnx
from ..deploy.predictor import Predictor, cv_fold_dirs, pooled_points
from ..errors import OptionError, SonocadError, SonocadWarning
from ..evaluation.metrics import delong_test
from ..evaluation.reader import (
    reader_column,
    reader_scores,
    reader_section,
    score_reader,
)
from ..evaluation.results import data_source, score_predictions, write_evaluation
from ..io.files import ensure_writable_dir, refuse_foreign_files
from ..io.rundir import RunLock, finish, prepare_output, refuse_writing_into_runs, remove, swap_in
from ..zoo import resolve


def load(run: str | Path, precision: str = "auto", engine: str = "auto") -> Predictor:
    """A run directory or cv folder (PyTorch), a shipped model's name, or a file written by `sonocad export`
    (ONNX Runtime)."""
    run = resolve(run)
    onnx_file = str(run).endswith(".onnx")
    if engine not in ("auto", "torch", "onnx"):
        raise OptionError("engine", f"must be auto, torch or onnx, not {engine!r}")
    if engine == "onnx" and not onnx_file:
        raise OptionError("engine", f"onnx runs a file written by sonocad export (RUN.onnx), not {run}; export it "
                          f"first: sonocad export {run} --out model.onnx")
    if onnx_file:
        if engine == "torch":
            raise OptionError("engine", f"{run} is an ONNX file: it runs with the onnx engine")
        if not Path(run).is_file():
            raise SonocadError(f"{run}: no such ONNX file")
        return load_onnx(run)
    return Predictor.load(run, precision)


def evaluate_run(run: str | Path, data, out: str | Path, skip_bad: bool = False,
                 precision: str = "auto", shortcut: bool = False, engine: str = "auto",
                 reader_score: str | None = None, reader_threshold: float = 4.0) -> dict:
    """Evaluate a trained run on another dataset, using the run's classes and ignoring other classes.
    `shortcut=True` adds the shortcut check (overlays removed, lesion masked out) on images with masks.
    `reader_score`: a manifest column of the readers' scores (BI-RADS), compared with the model on the same
    images (sonocad.evaluation.reader; BUS-BRA's BI-RADS by default where the data carry it, "none" to leave it out)."""
    if not math.isfinite(reader_threshold):
        raise OptionError("reader_threshold", f"must be a number, not {reader_threshold}")
    refuse_writing_into_runs(out, [run, data], "out")
    with RunLock(out) as lock:
        out = lock.run
        # always built beside and swapped in: a kill leaves the earlier evaluation, or none, never half of one
        work = ensure_writable_dir(prepare_output(out, allowed_kind="evaluate", in_place=False))
        try:
            metrics = _evaluate(run, data, work, skip_bad, precision, shortcut, engine, reader_score, reader_threshold)
            finish(work, ["metrics.json", "predictions.csv", "report.html"], kind="evaluate")
        except BaseException:
            remove(work)
            raise
        swap_in(work, out)
    return metrics


def _evaluate(run, data, out: Path, skip_bad: bool, precision: str, shortcut: bool, engine: str,
              reader_score: str | None, reader_threshold: float) -> dict:
    predictor = load(run, precision, engine)
    info = predictor.info
    samples = discover(data, info.classes, allow_missing_classes=True, frames=info.config.frames)
    column = reader_column(samples, reader_score) if info.binary else None
    if column:
        reader_scores(samples, column)          # a bad column fails before the images are decoded
    images, samples, y, bad = predictor.decode_samples(samples, skip_bad)
    missing = [c for i, c in enumerate(info.classes) if not (y == i).any()]
    if missing:
        warnings.warn(SonocadWarning(f"{data}: no images of {', '.join(missing)}: AUC and the figures that need "
                                     "every class are undefined (n/a); sensitivity or specificity alone remain"))
    probs = predictor.predict_proba(images)
    metrics = score_predictions(y, probs, info)
    metrics["data"] = {"source": data_source(data), "run": str(run), "skipped_bad_images": bad}
    notice = info.site_notice(str(run))
    if notice:
        metrics["site_notice"] = notice
    with_masks = [i for i, s in enumerate(samples) if s.masks]
    if with_masks and hasattr(predictor.members[0][0], "backbone"):       # where the model looked, against the lesion masks the data ship
        metrics["explanation"] = explanation_metrics(predictor, images[with_masks], [samples[i] for i in with_masks],
                                                     y[with_masks])
    extra = {}
    if column:
        scores = reader_scores(samples, column)
        metrics["reader"] = score_reader(y, probs[:, 1], scores, column, reader_threshold)
        extra[f"reader_{column}"] = [f"{v:g}" for v in scores]
    sections = [reader_section(metrics["reader"])] if column else []
    sections.append(segmentation_report(predictor, metrics, images, samples, y, extra))
    if shortcut:
        from ..analysis.shortcut import shortcut_check, shortcut_section

        metrics["shortcut_check"] = shortcut_check(predictor, data, skip_bad=skip_bad)
        sections.append(shortcut_section(metrics["shortcut_check"]))
    write_evaluation(out, metrics, samples, y, probs, info, title=f"sonocad evaluation of {run} on {data}",
                     extra_columns=extra, extra_sections=[s for s in sections if s])
    return metrics


def site_notice(run: str | Path, engine: str = "auto") -> str | None:
    """The run's one line saying its thresholds were chosen at another site (RunInfo.site_notice), or None."""
    if engine == "onnx" or str(run).endswith(".onnx"):
        return load(run, "auto", engine).info.site_notice(str(run))
    path = resolve(run)
    folders = [path] if (path / "config.json").is_file() else cv_fold_dirs(path)
    if not folders:
        return None
    info = RunInfo.load(folders[0] / "config.json")
    if folders != [path]:       # a cv folder: its thresholds are the ensemble's (Predictor.load), not fold 1's
        info.operating_points = pooled_points(path) or {}
    return info.site_notice(str(run))


def predict_paths(run: str | Path, inputs: list[str | Path], skip_bad: bool = False,
                  precision: str = "auto", batch_size: int = 64, heatmaps: str | Path | None = None,
                  engine: str = "auto", masks: str | Path | None = None) -> list[dict]:
    """Per-image class probabilities and predicted class for image files and folders (rows in input order;
    with `skip_bad`, an unreadable image gives a row with its `error` instead). With `heatmaps`, also a
    Grad-CAM picture of each image in that folder (one more forward pass per image; its name in the row).
    With `masks`, each image's predicted lesion mask as a PNG of the scan's size in that folder (models
    trained with the mask head). `engine`: "onnx" (or a .onnx file as `run`) runs a model written by sonocad
    export with ONNX Runtime."""
    predictor = load(run, precision, engine)
    if heatmaps is not None and not hasattr(predictor.members[0][0], "backbone"):
        raise OptionError("heatmaps", "Grad-CAM needs the PyTorch model: give the run directory, not an ONNX file")
    if masks is not None and not has_mask_head(predictor):
        raise OptionError("masks", f"{run} has no lesion-mask head (trained without masks or with --seg-weight 0, "
                          "or an ONNX file)")
    if heatmaps is not None and masks is not None and Path(heatmaps).resolve() == Path(masks).resolve():
        raise OptionError("masks", f"{masks} is the --heatmaps folder too: a scan's mask and its heatmap share a "
                          "file name; give two folders")
    for name, folder in (("heatmaps", heatmaps), ("masks", masks)):
        if folder is not None:
            refuse_writing_into_runs(folder, [run, list(inputs)], name)
            refuse_foreign_files(folder, name, PICTURE.fullmatch, "pictures sonocad wrote")
    heatmaps = ensure_writable_dir(heatmaps, "heatmaps") if heatmaps is not None else None
    masks = ensure_writable_dir(masks, "masks") if masks is not None else None
    files = [ref for f in image_files(inputs) for ref in frame_refs(str(f), predictor.info.config.frames)]
    rows = []
    # decode in chunks so a folder of thousands of images never sits in memory at once
    for start in range(0, len(files), 512):
        chunk = [str(f) for f in files[start:start + 512]]
        images, good, bad = predictor.decode(chunk, skip_bad)
        probs = predictor.predict_proba(images, batch_size)
        pictures = (write_pictures(predictor, [chunk[i] for i in good], images, heatmaps, start=len(rows),
                                   with_masks=False, probs=probs, scale=1) if heatmaps is not None else [{}] * len(good))
        names = [picture_name(len(rows) + k, chunk[i]) for k, i in enumerate(good)]
        if masks is not None:
            write_masks(predictor, [chunk[i] for i in good], images, masks, names)
        for i, p, pred, pic, name in zip(good, probs, predictor.decide(probs), pictures, names):
            rows.append({"path": chunk[i], **{f"prob_{c}": float(v) for c, v in zip(predictor.classes, p)},
                         "predicted": pred, **({"heatmap": pic["heatmap"]} if pic else {}),
                         **({"mask": name} if masks is not None else {})})
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
    if len(np.unique(y_a)) < 2:
        raise SonocadError(f"{data}: compare needs images of both classes (an AUC needs them); found "
                           f"{len(y_a)} of one")
    result = delong_test(y_a, probs[0], probs[1])
    return {"run_a": str(run_a), "run_b": str(run_b), "data": str(data), "n": int(len(y_a)), **result}


def explain_paths(run: str | Path, inputs: list[str | Path], out: str | Path, target: str = "default",
                  skip_bad: bool = False, precision: str = "auto") -> list[dict]:
    """A heatmap picture of each image of `inputs` (files and folders) in folder `out`: Grad-CAM over the scan,
    the probability, the decision at the run's operating point, and the lesion outline where a mask lies beside
    the image (`<image>_mask.png`); `out/explanations.csv` lists them with the agreement with the mask.
    `target`: the class explained: binary runs "positive" (default) or "other" (or a class name); multi-class
    runs a class name, or each image's predicted class (default)."""
    import csv
    import io

    from ..io.files import atomic_write_text

    predictor = Predictor.load(run, precision)
    refuse_writing_into_runs(out, [run, list(inputs)], "out")
    refuse_foreign_files(out, "out", lambda n: PICTURE.fullmatch(n) or n == "explanations.csv",
                         "pictures and the explanations.csv sonocad explain wrote")
    out = ensure_writable_dir(out)
    classes = predictor.classes
    if target == "default":
        target = "positive" if predictor.info.binary else "predicted"
    elif predictor.info.binary and target in classes:
        target = "positive" if target == classes[1] else "other"
    elif not predictor.info.binary and target in classes:
        target = classes.index(target)
    elif target not in (("positive", "other") if predictor.info.binary else ("predicted",)):
        raise OptionError("target", f"{target!r} is not one of the classes {', '.join(classes)}")
    files = [ref for f in image_files(inputs) for ref in frame_refs(str(f), predictor.info.config.frames)]
    rows = []
    for start in range(0, len(files), 64):
        chunk = [str(f) for f in files[start:start + 64]]
        images, good, bad = predictor.decode(chunk, skip_bad)
        probs = predictor.predict_proba(images)
        pics = write_pictures(predictor, [chunk[i] for i in good], images, out, start=len(rows), target=target,
                              probs=probs)
        for pic, p, pred in zip(pics, probs, predictor.decide(probs)):
            rows.append({**pic, **{f"prob_{c}": float(v) for c, v in zip(classes, p)}, "predicted": pred})
        rows += [{"path": problem.split(": ")[0], "error": problem} for problem in bad]
    fields = ["path", "heatmap", *[f"prob_{c}" for c in classes], "predicted", "pointing_hit", "energy_in_mask"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(r for r in rows if "error" not in r)
    atomic_write_text(out / "explanations.csv", buf.getvalue())
    return rows
