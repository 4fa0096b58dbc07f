"""The radiologists' reference on the same images: a reader score (BI-RADS category, or any number a
manifest gives) against the model, with a paired DeLong test.

BUS-BRA's release records each image's BI-RADS category, and `sonocad evaluate` uses it by itself there;
a manifest names its column with `--reader-score COLUMN`. Categories 4a, 4b and 4c read as 4.1, 4.2, 4.3.
The readers' operating point is the score at or above `threshold` (BI-RADS 4: biopsy recommended).

>>> import numpy as np
>>> y = np.array([0, 0, 1, 1])
>>> round(score_reader(y, np.array([.1, .6, .4, .9]), np.array([2, 3, 4, 5]), "birads")["auc"], 3)
1.0
"""
from __future__ import annotations

import re

import numpy as np
from sklearn.metrics import roc_curve

from ..errors import OptionError
from .metrics import binary_metrics, delong_auc_ci, delong_test
from .report import html_table

AUTOMATIC = "birads"          # the column the BUS-BRA layout carries
_CATEGORY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([abc]?)\s*", re.IGNORECASE)


def reader_column(samples: list, asked: str | None) -> str | None:
    """The reader-score column to use: `asked` ("none": no reader), else BI-RADS where every sample has it."""
    if asked is not None:
        return None if asked.lower() == "none" else asked
    return AUTOMATIC if samples and all(s.column(AUTOMATIC) for s in samples) else None


def reader_scores(samples: list, column: str) -> np.ndarray:
    """The column's values as numbers; one line naming the image for a missing or unreadable value."""
    values = []
    for s in samples:
        text = s.column(column)
        if text is None:
            known = ", ".join(k for k, _ in s.columns) or "none"
            raise OptionError("reader_score", f"the data have no column {column!r} (other columns: {known})")
        m = _CATEGORY.fullmatch(text)
        if not m:
            raise OptionError("reader_score", f"{s.path}: {column} is {text!r}, not a number or a BI-RADS "
                              "category (2, 3, 4a, 4b, 4c, 5)")
        values.append(float(m[1]) + {"": 0.0, "a": 0.1, "b": 0.2, "c": 0.3}[m[2].lower()])
    return np.asarray(values)


def score_reader(y: np.ndarray, prob: np.ndarray, scores: np.ndarray, column: str, threshold: float = 4.0) -> dict:
    """The readers' AUC (DeLong CI) beside the model's on the same images, the paired DeLong test of the
    difference, the readers' operating point (score >= threshold) and the model's sensitivity at the readers'
    specificity; the readers' ROC points for the report."""
    y = np.asarray(y).astype(int)
    auc, lo, hi = delong_auc_ci(y, scores)
    test = delong_test(y, prob, scores)
    op = binary_metrics(y, (scores >= threshold).astype(float), threshold=0.5, ci=None)
    fpr, tpr, _ = roc_curve(y, prob)
    at_spec = tpr[(1 - fpr) >= op["specificity"] - 1e-12].max() if np.isfinite(op["specificity"]) else float("nan")
    rf, rt, _ = roc_curve(y, scores)
    return {"column": column, "n": int(len(y)), "auc": auc, "auc_ci": [lo, hi], "model_auc": test["auc_a"],
            "model_minus_reader": test["diff"], "z": test["z"], "p_value": test["p_value"],
            "operating_point": {"rule": f"{column} >= {threshold:g}", **{k: op[k] for k in (
                "sensitivity", "sensitivity_ci", "specificity", "specificity_ci")}},
            "model_sensitivity_at_reader_specificity": float(at_spec),
            "roc": {"fpr": [float(v) for v in rf], "tpr": [float(v) for v in rt]}}


def reader_section(r: dict) -> str:
    """The report's section: readers beside the model on the same images."""
    o = r["operating_point"]
    rows = [["model", r["n"], r["model_auc"], "", "", f"{r['model_sensitivity_at_reader_specificity']:.3f} at the "
             "readers' specificity"],
            [f"readers ({r['column']})", r["n"], r["auc"], r["auc_ci"], o["rule"],
             f"sensitivity {o['sensitivity']:.3f}, specificity {o['specificity']:.3f}"]]
    return (f"<h2>Readers on the same images</h2><p>Model minus readers: AUC {r['model_minus_reader']:+.3f}, paired "
            f"DeLong z={r['z']:.2f}, p={r['p_value']:.3g}. The readers' ROC curve and operating point are drawn on "
            "the ROC plot.</p>" + html_table(["", "n", "AUC", "95% CI", "operating point", "figures"], rows))
