"""Platt scaling: a model's logits mapped to probabilities that fit a site's labels, shift and spread both.

>>> slope, intercept = fit_platt([0, 0, 1, 1, 0, 1], [-2.0, -0.5, 0.3, 2.5, 0.1, 1.0])
>>> round(slope, 2) > 0
True
"""
from __future__ import annotations

import numpy as np
from scipy import optimize


def fit_platt(y, logits) -> tuple[float, float]:
    """(slope, intercept) of sigmoid(slope * logit + intercept) fitted to the labels `y` by maximum likelihood
    with Platt's (1999) smoothed targets, (n+ + 1) / (n+ + 2) for positives and 1 / (n- + 2) for negatives,
    which keep the slope finite when the classes are separated. The slope is kept positive (a model's order is
    never reversed). Needs both classes."""
    y = np.asarray(y).astype(bool)
    z = np.asarray(logits, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        raise ValueError("fit_platt needs both classes")
    target = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def nll(params: np.ndarray) -> tuple[float, np.ndarray]:
        s = params[0] * z + params[1]
        p = 1 / (1 + np.exp(-s))
        grad_s = (p - target) / len(z)
        return float(np.mean(np.logaddexp(0.0, s) - target * s)), np.array([grad_s @ z, grad_s.sum()])

    res = optimize.minimize(nll, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                            bounds=[(1e-3, None), (None, None)])
    return float(res.x[0]), float(res.x[1])


def platt_nll(y, logits, slope: float, intercept: float) -> float:
    """Mean negative log-likelihood of the labels under sigmoid(slope * logit + intercept)."""
    y = np.asarray(y).astype(float)
    s = slope * np.asarray(logits, dtype=float) + intercept
    return float(np.mean(np.logaddexp(0.0, s) - y * s))
