"""Operating points: thresholds on the positive class's probability chosen on labelled data, the figures they
were chosen at, and for the sensitivity target a promise that holds on new cases with stated confidence.

The sensitivity target is met with a margin. A threshold at the k-th lowest of n positive scores detects the
other n - k + 1; the sensitivity it gives on new cases from the same population is then at least the one-sided
Clopper-Pearson bound of (n - k + 1) / n with the stated confidence, without further assumptions (order
statistics). `choose_thresholds` takes the largest threshold whose bound reaches the target. With few positives
no threshold can promise the target (all n detected promise only (1 - confidence) ** (1 / n): 0.905 for 30
cancers, 0.95 needs 59). Then the threshold is the normal prediction bound of the positives' logits (the
threshold a new positive falls below with probability 1 - target, were the logits normal: mean - t(target,
n - 1) * sd * sqrt(1 + 1/n)), or the lowest positive score where that is lower: every positive seen is detected,
and the figures say what that promises. The lowest score alone gives new cases about n / (n + 1) on average,
0.93 for 13 cancers; docs/calibration.md compares the rules on two sites.

>>> import numpy as np
>>> y = np.array([0, 0, 1, 1, 0, 1])
>>> p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
>>> round(choose_thresholds(y, p)["high_sensitivity"], 3)       # 3 cancers: below the lowest, 0.35
0.02
>>> round(point_figures(y, p, choose_thresholds(y, p))["high_sensitivity"]["promised_sensitivity"], 3)
0.368
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats
from scipy.special import expit, logit
from sklearn.metrics import roc_curve

from ..errors import SonocadWarning
from .metrics import binary_metrics

TARGET_SENSITIVITY = 0.95
CONFIDENCE = 0.95
_NAN = float("nan")


def sensitivity_bound(detected: int, positives: int, confidence: float = CONFIDENCE) -> float:
    """One-sided lower `confidence` bound (Clopper-Pearson) of a sensitivity seen as detected / positives."""
    if positives <= 0:
        return _NAN
    if detected <= 0:
        return 0.0
    return float(stats.beta.ppf(1 - confidence, detected, positives - detected + 1))


def promise_check(detected: int, positives: int, promised: float) -> dict:
    """Whether evaluated positives show a promised sensitivity kept: ``promise_kept`` when the observed sensitivity
    reaches it; ``promise_p``, the exact one-sided binomial probability of detecting this few or fewer were the
    true sensitivity the promised one (below 0.05 these data refute the promise; above, a miss of the point
    estimate is within what so few positives show by chance). Without positive cases there is nothing to check:
    both are None.

    >>> promise_check(36, 42, 0.883)["promise_kept"], round(promise_check(36, 42, 0.883)["promise_p"], 2)
    (False, 0.37)
    """
    if positives <= 0 or not np.isfinite(promised):
        return {"promised_sensitivity": promised, "promise_kept": None, "promise_p": None}
    return {"promised_sensitivity": promised, "promise_kept": bool(detected >= promised * positives - 1e-9),
            "promise_p": float(stats.binom.cdf(detected, positives, promised))}


def positives_needed(target: float = TARGET_SENSITIVITY, confidence: float = CONFIDENCE) -> int | None:
    """The fewest positive cases on which a threshold can promise `target` (all of them detected); None for a
    target of 1, which no number of cases can promise."""
    if target >= 1:
        return None
    return max(1, math.ceil(math.log(1 - confidence) / math.log(target)))


def choose_thresholds(y, prob, target_sensitivity: float = TARGET_SENSITIVITY,
                      confidence: float | None = CONFIDENCE) -> dict:
    """Operating points chosen on labelled data (positive when ``prob >= t``).

    Returns ``{"default": 0.5, "youden": t, "high_sensitivity": t}``: ``youden`` maximises sensitivity +
    specificity - 1 (largest such threshold on ties); ``high_sensitivity`` is the largest threshold whose
    sensitivity keeps ``target_sensitivity`` with ``confidence`` (see the module), or, when these data cannot
    promise it, the normal prediction bound (`normal_bound`, at most the lowest positive score).
    ``confidence=None`` drops the margin: the largest threshold whose sensitivity on these data reaches the
    target (optimistic on new cases). nan without both classes."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(prob, dtype=float)
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], not {target_sensitivity}")
    out = {"default": 0.5, "youden": _NAN, "high_sensitivity": _NAN}
    if y.all() or not y.any():
        return out
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]        # drop the leading "nothing is positive" point
    out["youden"] = float(thr[int(np.argmax(tpr - fpr))])
    if confidence is None:
        out["high_sensitivity"] = float(thr[int(np.argmax(tpr >= target_sensitivity - 1e-12))])
        return out
    scores = np.sort(p[y])[::-1]                     # candidate thresholds: the positive scores, largest first
    detected = np.searchsorted(-scores, -scores, side="right")      # positives at or above each
    bounds = stats.beta.ppf(1 - confidence, detected, len(scores) - detected + 1)   # sensitivity_bound, vectorised
    ok = np.flatnonzero(bounds >= target_sensitivity - 1e-12)
    out["high_sensitivity"] = float(scores[ok[0]] if len(ok) else normal_bound(scores, target_sensitivity))
    return out


def to_logits(prob) -> np.ndarray:
    """Logits of probabilities, clipped where float32 probabilities saturate (a 1.0 counts as about 16, not 28)."""
    return logit(np.clip(np.asarray(prob, dtype=float), 1e-7, 1 - 1e-7))


def normal_bound(positive_probs, target: float = TARGET_SENSITIVITY) -> float:
    """The probability below which a new positive falls with probability 1 - `target` were the positives'
    logits normal (a one-sided prediction bound from their mean and sd, Student's t), or the lowest positive
    probability where that is lower; the lowest one for fewer than 3 positives or a target of 1.

    >>> round(normal_bound([0.6, 0.7, 0.8, 0.9, 0.95]), 3)
    0.303
    """
    p = np.asarray(positive_probs, dtype=float)
    lowest = float(p.min())
    if len(p) < 3 or target >= 1:
        return lowest
    z = to_logits(p)
    bound = z.mean() - stats.t.ppf(target, len(z) - 1) * z.std(ddof=1) * math.sqrt(1 + 1 / len(z))
    return min(lowest, float(expit(bound)))


def point_figures(y, prob, thresholds: dict, target_sensitivity: float = TARGET_SENSITIVITY,
                  confidence: float = CONFIDENCE) -> dict:
    """Each operating point's figures on the data it was chosen on: threshold, sensitivity and specificity
    with 95% Wilson intervals, numbers of cases; the sensitivity point adds what it promises on new cases
    (``promised_sensitivity``, the one-sided bound) and whether that reaches the target."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(prob, dtype=float)
    out = {}
    for name, t in thresholds.items():
        if t is None or not np.isfinite(t):
            continue
        m = binary_metrics(y, p, threshold=t, ci=None)
        out[name] = {k: m[k] for k in ("threshold", "sensitivity", "sensitivity_ci", "specificity",
                                       "specificity_ci", "n_pos", "n_neg")}
        if name == "high_sensitivity":
            promised = sensitivity_bound(int((p[y] >= t).sum()), int(y.sum()), confidence)
            kept = bool(promised >= target_sensitivity - 1e-12)
            rule = ("clopper-pearson bound" if kept else "lowest positive score" if t >= p[y].min()
                    else "normal prediction bound")
            out[name].update(target_sensitivity=target_sensitivity, confidence=confidence,
                             promised_sensitivity=promised, target_promised=kept, rule=rule,
                             positives_needed=positives_needed(target_sensitivity, confidence))
    return out


def promise_warning(figures: dict, data: str = "the choosing data") -> str | None:
    """One line when the sensitivity point cannot promise its target on these data (too few positives)."""
    hs = figures.get("high_sensitivity")
    if not hs or hs["target_promised"]:
        return None
    return (f"{data}: only {hs['n_pos']} positive cases; the high-sensitivity point (threshold "
            f"{hs['threshold']:.4f}, at or below the lowest of them) promises sensitivity >= "
            f"{hs['promised_sensitivity']:.3f} with {hs['confidence']:.0%} confidence, not "
            f"{hs['target_sensitivity']:.2f}; {hs['positives_needed']} positives are needed for that")


def choose_operating_points(info, y, prob, data: str, target_sensitivity: float = TARGET_SENSITIVITY) -> dict:
    """Choose a binary run's operating points on labelled data (`data` names them) and record them in its
    RunInfo, with their figures on those data; warns (SonocadWarning) when the sensitivity target cannot be
    promised. Returns the figures."""
    info.thresholds = choose_thresholds(y, prob, target_sensitivity)
    figures = point_figures(y, prob, info.thresholds, target_sensitivity)
    info.operating_points = {"chosen_on": data, **figures}
    line = promise_warning(figures, data)
    if line:
        warnings.warn(line, SonocadWarning, stacklevel=2)
    return figures


def fold_operating_points(y: np.ndarray, prob: np.ndarray, thresholds: list[dict]) -> dict:
    """Pooled out-of-fold sensitivity/specificity (Wilson CIs) where every sample is called positive or
    not at its own fold's operating point, chosen on that fold's validation data: what each fold model
    would have said, at the threshold it would have shipped with."""
    names = sorted(set.intersection(*(set(t) for t in thresholds))) if thresholds else []
    out = {}
    for name in names:
        t = np.asarray([th[name] for th in thresholds], float)
        if not np.isfinite(t).all():
            continue
        m = binary_metrics(y == 1, (prob >= t).astype(float), threshold=0.5, ci=None)
        out[name] = {k: m[k] for k in ("sensitivity", "sensitivity_ci", "specificity", "specificity_ci",
                                       "ppv", "npv", "balanced_accuracy", "confusion_matrix")}
        out[name]["fold_thresholds"] = sorted({float(v) for v in t})
    return out
