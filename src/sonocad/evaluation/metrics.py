"""Evaluation metrics for lesion classifiers: pure functions on numpy arrays.

Binary tasks use ``y_true`` in {0, 1} (1 = positive class, e.g. malignant) and
``prob`` = predicted probability (or any score, for the AUC-only functions) of
the positive class. A case is called positive when ``prob >= threshold``.

Every dict returned holds plain Python floats/ints/lists, so it can be written
with ``json.dumps``; values that are undefined for the data (e.g. AUC when only
one class is present) are ``nan`` rather than an exception.

Example::

    >>> import numpy as np
    >>> from sonocad.evaluation.metrics import binary_metrics
    >>> y = np.array([0, 0, 1, 1, 0, 1])
    >>> p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    >>> round(binary_metrics(y, p)["auc"], 3)
    0.889
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

__all__ = [
    "binary_metrics",
    "bootstrap_auc_ci",
    "calibration",
    "delong_auc_ci",
    "delong_test",
    "fit_temperature",
    "multiclass_metrics",
    "wilson_ci",
]

_NAN = float("nan")

# Bounds (on T) for the temperature search; a T at a bound means the data
# (e.g. perfectly separated validation scores) do not pin T down.
_T_MIN, _T_MAX = 1e-2, 1e2


# --- input checks ---

def _binary_inputs(y_true, prob, *, probability: bool = False) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=float)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"y_true and prob must be 1-D, got shapes {y.shape} and {p.shape}")
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true and prob differ in length ({y.shape[0]} vs {p.shape[0]})")
    if y.size == 0:
        raise ValueError("no samples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if not np.isfinite(p).all():
        raise ValueError("prob contains NaN or infinite values")
    if probability and ((p < 0).any() or (p > 1).any()):
        raise ValueError("prob must lie in [0, 1]")
    return y.astype(np.int64), p


def _z(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha (confidence level) must be in (0, 1), got {alpha}")
    return float(stats.norm.ppf(0.5 + alpha / 2))


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else _NAN


# --- DeLong ---

def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014) for k score vectors (k, n) at once.

    Returns (auc (k,), V10 (k, m) for positives, V01 (k, n_neg) for negatives).
    Midranks handle ties exactly like the Heaviside kernel psi (0.5 for ties).
    """
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return auc, v10, v01


def _delong_cov(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    m, n = v10.shape[1], v01.shape[1]
    if m < 2 or n < 2:  # sample covariance needs two cases per class
        k = v10.shape[0]
        return np.full((k, k), np.nan)
    return np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < y.size


def delong_auc_ci(y_true, prob, alpha: float = 0.95) -> tuple[float, float, float]:
    """AUC with DeLong's asymptotic CI: ``(auc, lo, hi)``, CI clipped to [0, 1].

    All nan with a single class; CI nan with fewer than two cases of a class.
    """
    y, p = _binary_inputs(y_true, prob)
    z = _z(alpha)
    if not _both_classes(y):
        return _NAN, _NAN, _NAN
    auc, v10, v01 = _delong_components(y, p[None, :])
    a = float(auc[0])
    var = float(_delong_cov(v10, v01)[0, 0])
    if math.isnan(var):
        return a, _NAN, _NAN
    half = z * math.sqrt(max(var, 0.0))
    return a, max(0.0, a - half), min(1.0, a + half)


def delong_test(y_true, prob_a, prob_b) -> dict:
    """Paired two-sided DeLong test of AUC(a) == AUC(b) on the same cases.

    Returns ``{"auc_a", "auc_b", "diff", "z", "p_value"}`` with diff = auc_a - auc_b.
    """
    y, pa = _binary_inputs(y_true, prob_a)
    _, pb = _binary_inputs(y_true, prob_b)
    if not _both_classes(y):
        return {"auc_a": _NAN, "auc_b": _NAN, "diff": _NAN, "z": _NAN, "p_value": _NAN}
    auc, v10, v01 = _delong_components(y, np.stack([pa, pb]))
    s = _delong_cov(v10, v01)
    diff = float(auc[0] - auc[1])
    var = float(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    if math.isnan(var):
        z = p_value = _NAN
    elif var <= 1e-15:
        # Differences are identical across cases (e.g. the same predictor twice).
        z, p_value = (0.0, 1.0) if abs(diff) < 1e-12 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / math.sqrt(var)
        p_value = float(2 * stats.norm.sf(abs(z)))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "diff": diff, "z": float(z), "p_value": float(p_value)}


# --- bootstrap ---

def bootstrap_auc_ci(
    y_true, prob, n_boot: int = 2000, alpha: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """AUC with a stratified percentile bootstrap CI: ``(auc, lo, hi)``.

    Positives and negatives are resampled separately, so every replicate keeps
    the original class counts (and a defined AUC).
    """
    y, p = _binary_inputs(y_true, prob)
    _z(alpha)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not _both_classes(y):
        return _NAN, _NAN, _NAN
    pos, neg = p[y == 1], p[y == 0]
    m, n = pos.size, neg.size
    auc = float(_delong_components(y, p[None, :])[0][0])
    rng = np.random.default_rng(seed)
    # Chunked so memory stays ~(chunk x n_samples) regardless of n_boot.
    chunk = max(1, min(n_boot, 2_000_000 // (m + n)))
    aucs = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        sample = np.concatenate([pos[rng.integers(0, m, (b, m))], neg[rng.integers(0, n, (b, n))]], axis=1)
        ranks = stats.rankdata(sample, axis=1)
        aucs[start : start + b] = (ranks[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    lo, hi = np.quantile(aucs, [(1 - alpha) / 2, (1 + alpha) / 2])
    return auc, float(lo), float(hi)


# --- proportions ---

def bootstrap_mean_ci(v, seed: int = 0, n_boot: int = 2000, alpha: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of `v` (nan for fewer than 2 values)."""
    v = np.asarray(v, float)
    if len(v) < 2:
        return [float("nan")] * 2
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    return [float(q) for q in np.quantile(means, [(1 - alpha) / 2, (1 + alpha) / 2])]


def wilson_ci(successes: int, n: int, alpha: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; ``(nan, nan)`` when n == 0."""
    z = _z(alpha)
    successes, n = int(successes), int(n)
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return _NAN, _NAN
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


# --- binary summary ---

def _roc(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return roc_curve(y, p, drop_intermediate=False)


def _sens_at_spec(fpr, tpr, min_spec: float) -> float:
    ok = (1 - fpr) >= min_spec - 1e-12
    return float(tpr[ok].max()) if ok.any() else _NAN


def _spec_at_sens(fpr, tpr, min_sens: float) -> float:
    ok = tpr >= min_sens - 1e-12
    return float((1 - fpr[ok]).max()) if ok.any() else _NAN


def binary_metrics(
    y_true, prob, threshold: float = 0.5, ci: str | None = "delong", n_boot: int = 2000, seed: int = 0
) -> dict:
    """Threshold and ranking metrics for a binary classifier (JSON-serialisable dict).

    ``ci`` is "delong", "bootstrap" or None (no AUC CI). The confusion matrix is
    ``[[tn, fp], [fn, tp]]``; sensitivity/specificity CIs are Wilson 95%.
    """
    y, p = _binary_inputs(y_true, prob, probability=True)
    if ci not in ("delong", "bootstrap", None):
        raise ValueError(f"ci must be 'delong', 'bootstrap' or None, got {ci!r}")
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    n, n_pos = int(y.size), int(y.sum())
    n_neg = n - n_pos

    if ci == "bootstrap":
        auc, lo, hi = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed)
    elif ci == "delong":
        auc, lo, hi = delong_auc_ci(y, p)
    else:
        auc, lo, hi = delong_auc_ci(y, p)[0], _NAN, _NAN

    if _both_classes(y):
        fpr, tpr, _ = _roc(y, p)
        sens90, spec95 = _sens_at_spec(fpr, tpr, 0.90), _spec_at_sens(fpr, tpr, 0.95)
    else:
        sens90 = spec95 = _NAN

    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    cal = calibration(y, p)
    return {
        "auc": float(auc),
        "auc_ci": [float(lo), float(hi)],
        "auc_ci_method": ci,
        "accuracy": _ratio(tp + tn, n),
        "balanced_accuracy": (sens + spec) / 2,  # nan unless both classes present
        "sensitivity": sens,
        "sensitivity_ci": list(wilson_ci(tp, tp + fn)),
        "specificity": spec,
        "specificity_ci": list(wilson_ci(tn, tn + fp)),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "prevalence": _ratio(n_pos, n),
        "threshold": float(threshold),
        "n": n,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "sens_at_spec90": sens90,
        "spec_at_sens95": spec95,
        "brier": cal["brier"],
        "ece": cal["ece"],
    }


# --- calibration ---

def calibration(y_true, prob, n_bins: int = 10) -> dict:
    """Reliability data with ``n_bins`` equal-width bins on [0, 1].

    Bins are [lo, hi) except the last, which includes 1. ``bin_accuracy`` is the
    observed fraction of positives, ``bin_confidence`` the mean ``prob`` (nan for
    empty bins). ``ece = sum(count/n * |accuracy - confidence|)``; ``brier`` is
    the mean squared error of ``prob``.
    """
    y, p = _binary_inputs(y_true, prob, probability=True)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, sum_p / count, np.nan)
        acc = np.where(count > 0, sum_y / count, np.nan)
    ece = float(np.abs(sum_y - sum_p).sum() / y.size)  # == sum(count/n * |acc - conf|)
    return {
        "ece": ece,
        "brier": float(np.mean((p - y) ** 2)),
        "bin_edges": [float(e) for e in edges],
        "bin_confidence": [float(c) for c in conf],
        "bin_accuracy": [float(a) for a in acc],
        "bin_count": [int(c) for c in count],
    }


def fit_temperature(y_val, logit_val) -> float:
    """Temperature T > 0 minimising the NLL of ``sigmoid(logit / T)`` on validation data.

    Searched on log T within [0.01, 100]; a result at a bound means the data do
    not constrain T (e.g. perfectly separated classes). Needs both classes.
    """
    y, z = _binary_inputs(y_val, logit_val)
    if not _both_classes(y):
        raise ValueError("fit_temperature needs both classes in the validation data")
    if not np.any(z):
        return 1.0  # all-zero logits: NLL does not depend on T
    yf = y.astype(float)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        # log(1 + e^s) - y*s, computed stably
        return float(np.mean(np.logaddexp(0.0, s) - yf * s))

    res = optimize.minimize_scalar(
        nll, bounds=(math.log(_T_MIN), math.log(_T_MAX)), method="bounded", options={"xatol": 1e-6}
    )
    return float(math.exp(res.x))


# --- multiclass ---

def multiclass_metrics(y_true, probs, classes: list[str]) -> dict:
    """Metrics for a k-class classifier predicting ``argmax(probs)``.

    ``auc`` is the macro one-vs-rest AUC (nan unless every class has both
    positives and negatives); ``per_class`` maps each name to its sensitivity
    (recall), one-vs-rest AUC and number of true cases. ``balanced_accuracy``
    is the mean per-class sensitivity (nan if a class has no cases).
    """
    y = np.asarray(y_true)
    pr = np.asarray(probs, dtype=float)
    k = len(classes)
    if k < 2:
        raise ValueError("need at least two classes")
    if y.ndim != 1 or pr.ndim != 2 or pr.shape != (y.shape[0], k):
        raise ValueError(f"expected y_true (n,) and probs (n, {k}), got {y.shape} and {pr.shape}")
    if y.size == 0:
        raise ValueError("no samples")
    if not np.isfinite(pr).all():
        raise ValueError("probs contains NaN or infinite values")
    if not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)) or y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true must hold class indices in [0, {k - 1}]")
    y = y.astype(np.int64)
    pred = pr.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))

    per_class, sens, aucs = {}, [], []
    for c, name in enumerate(classes):
        n_c = int(cm[c].sum())
        s = _ratio(cm[c, c], n_c)
        yc = (y == c).astype(np.int64)
        a = float(roc_auc_score(yc, pr[:, c])) if _both_classes(yc) else _NAN
        per_class[str(name)] = {"sensitivity": s, "auc": a, "n": n_c}
        sens.append(s)
        aucs.append(a)
    return {
        "auc": float(np.mean(aucs)),
        "accuracy": float(np.trace(cm) / y.size),
        "balanced_accuracy": float(np.mean(sens)),
        "n": int(y.size),
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": per_class,
    }
