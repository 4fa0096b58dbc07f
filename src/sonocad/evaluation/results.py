"""Scoring predictions at a run's operating points, and writing them: metrics.json, the predictions CSV,
plots and report.html. Shared by train, evaluate and cv.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from ..config import RunInfo
from ..io.files import atomic_write_text
from .metrics import binary_metrics, multiclass_metrics
from .operating import promise_check
from .report import write_report


def data_source(data) -> str | list[str]:
    """How a result names the data it was measured on: a folder or manifest, or a list of them."""
    return [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data)


def score_predictions(y: np.ndarray, probs: np.ndarray, info: RunInfo) -> dict:
    """Metrics of predicted probabilities against true class indices, at the run's operating points."""
    classes = info.classes
    n_per_class = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    if info.binary:
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
            promised = (info.operating_points.get(name) or {}).get("promised_sensitivity")
            if promised is not None:      # the sensitivity it was chosen to keep, and whether these data show it kept
                tp = op["confusion_matrix"][1][1]
                m["operating_points"][name].update(promise_check(tp, int((y == 1).sum()), promised))
        m["thresholds_chosen_on"] = ((info.operating_points or {}).get("chosen_on")
                                     or "validation data of the training run") + " (never on the evaluated data)"
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
    out = Path(out)
    extra_columns = extra_columns or {}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    buf = io.StringIO()
    w = csv.writer(buf)
    binary = info.binary
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
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    return [r["path"] for r in rows], np.asarray([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
