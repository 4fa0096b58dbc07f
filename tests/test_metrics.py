"""Tests for sonocad.evaluation.metrics against hand computations, textbook values and an
independent O(n^2) DeLong implementation written from the 1988 definition."""

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import brier_score_loss, roc_auc_score

from sonocad.evaluation.metrics import (
    binary_metrics,
    bootstrap_auc_ci,
    calibration,
    delong_auc_ci,
    delong_test,
    fit_temperature,
    multiclass_metrics,
    wilson_ci,
)
from sonocad.evaluation.operating import choose_thresholds

Z95 = stats.norm.ppf(0.975)


# ---------------------------------------------------------------------------
# reference DeLong (DeLong, DeLong & Clarke-Pearson 1988), deliberately naive


def _psi(x, y):
    return 1.0 if x > y else (0.5 if x == y else 0.0)


def slow_delong(y, *score_vectors):
    """AUCs and their covariance matrix from structural components V10, V01."""
    y = np.asarray(y)
    k = len(score_vectors)
    v10s, v01s, aucs = [], [], []
    for s in score_vectors:
        s = np.asarray(s, dtype=float)
        xs, ys = s[y == 1], s[y == 0]
        m, n = len(xs), len(ys)
        psi = np.array([[_psi(x, yy) for yy in ys] for x in xs])  # (m, n)
        aucs.append(psi.sum() / (m * n))
        v10s.append(psi.mean(axis=1))  # V10(X_i) = 1/n sum_j psi(X_i, Y_j)
        v01s.append(psi.mean(axis=0))  # V01(Y_j) = 1/m sum_i psi(X_i, Y_j)
    m, n = len(v10s[0]), len(v01s[0])
    s10 = np.empty((k, k))
    s01 = np.empty((k, k))
    for r in range(k):
        for c in range(k):
            s10[r, c] = np.sum((v10s[r] - aucs[r]) * (v10s[c] - aucs[c])) / (m - 1)
            s01[r, c] = np.sum((v01s[r] - aucs[r]) * (v01s[c] - aucs[c])) / (n - 1)
    return np.array(aucs), s10 / m + s01 / n


def _tied_data(seed, n=120, prevalence=0.4, decimals=1):
    """Two correlated scores, rounded so there are many ties within and across classes."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    latent = rng.normal(size=n) + 1.0 * y
    a = np.round(latent + rng.normal(scale=0.7, size=n), decimals)
    b = np.round(latent + 0.5 * rng.normal(scale=1.2, size=n) - 0.4 * y, decimals)
    return y, a, b


# ---------------------------------------------------------------------------
# DeLong


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_delong_matches_slow_reference(seed):
    y, a, _ = _tied_data(seed)
    aucs, cov = slow_delong(y, a)
    auc, lo, hi = delong_auc_ci(y, a)
    assert auc == pytest.approx(aucs[0], abs=1e-12)
    assert auc == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    se = math.sqrt(cov[0, 0])
    assert lo == pytest.approx(max(0.0, aucs[0] - Z95 * se), abs=1e-10)
    assert hi == pytest.approx(min(1.0, aucs[0] + Z95 * se), abs=1e-10)


def test_delong_ci_level():
    y, a, _ = _tied_data(5)
    aucs, cov = slow_delong(y, a)
    z90 = stats.norm.ppf(0.95)
    _, lo, hi = delong_auc_ci(y, a, alpha=0.90)
    assert (hi - lo) / 2 == pytest.approx(z90 * math.sqrt(cov[0, 0]), abs=1e-10)


@pytest.mark.parametrize("seed", [0, 7, 11])
def test_delong_paired_test_matches_slow_reference(seed):
    y, a, b = _tied_data(seed, n=150)
    aucs, cov = slow_delong(y, a, b)
    res = delong_test(y, a, b)
    z = (aucs[0] - aucs[1]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert res["auc_a"] == pytest.approx(aucs[0], abs=1e-12)
    assert res["auc_b"] == pytest.approx(aucs[1], abs=1e-12)
    assert res["diff"] == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    assert res["z"] == pytest.approx(z, rel=1e-9)
    assert res["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)
    swapped = delong_test(y, b, a)
    assert swapped["z"] == pytest.approx(-res["z"], rel=1e-12)
    assert swapped["p_value"] == pytest.approx(res["p_value"], rel=1e-12)


def test_delong_test_identical_predictors():
    y, a, _ = _tied_data(3)
    res = delong_test(y, a, a)
    assert res["diff"] == 0.0 and res["z"] == 0.0 and res["p_value"] == 1.0


def test_hanley_mcneil_1982_rating_example():
    # Hanley & McNeil (1982), Radiology 143:29-36, Table 1: 5-point CT ratings of
    # 58 normal and 51 abnormal cases; published area 0.893.
    neg, pos = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    y = np.r_[np.zeros(sum(neg)), np.ones(sum(pos))]
    s = np.r_[np.repeat(np.arange(1, 6), neg), np.repeat(np.arange(1, 6), pos)]
    auc, lo, hi = delong_auc_ci(y, s)
    assert round(auc, 3) == 0.893
    aucs, cov = slow_delong(y, s)
    assert (hi - lo) / 2 == pytest.approx(Z95 * math.sqrt(cov[0, 0]), abs=1e-12)


def test_delong_edge_cases():
    assert all(math.isnan(v) for v in delong_auc_ci([1, 1, 1], [0.1, 0.5, 0.9]))
    # perfect separation: zero variance, CI collapses to the point
    assert delong_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 1.0, 1.0)
    # one positive: AUC defined, variance (needs >= 2 per class) not
    auc, lo, hi = delong_auc_ci([0, 0, 0, 1], [0.1, 0.6, 0.3, 0.5])
    assert auc == pytest.approx(2 / 3) and math.isnan(lo) and math.isnan(hi)
    # CI clipped to [0, 1]
    _, lo, hi = delong_auc_ci([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.45, 0.4, 0.8, 0.9])
    assert 0.0 <= lo <= hi == 1.0
    with pytest.raises(ValueError):
        delong_auc_ci([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError):
        delong_auc_ci([0, 2, 1], [0.1, 0.2, 0.3])


# ---------------------------------------------------------------------------
# bootstrap


def test_bootstrap_close_to_delong_and_reproducible():
    rng = np.random.default_rng(42)
    y = (rng.random(400) < 0.35).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=400) + 1.3 * y)))
    auc, lo, hi = bootstrap_auc_ci(y, p, n_boot=1000, seed=3)
    d_auc, d_lo, d_hi = delong_auc_ci(y, p)
    assert auc == pytest.approx(d_auc, abs=1e-12)
    assert lo < auc < hi
    assert lo == pytest.approx(d_lo, abs=0.02)
    assert hi == pytest.approx(d_hi, abs=0.02)
    assert bootstrap_auc_ci(y, p, n_boot=1000, seed=3) == (auc, lo, hi)
    assert bootstrap_auc_ci(y, p, n_boot=1000, seed=4) != (auc, lo, hi)


def test_bootstrap_stratified_with_rare_positives():
    # with 2 positives in 200, an unstratified resample would often have none
    y = np.zeros(200, dtype=int)
    y[:2] = 1
    p = np.linspace(0, 1, 200)[::-1]
    auc, lo, hi = bootstrap_auc_ci(y, p, n_boot=200)
    assert auc == lo == hi == 1.0
    assert all(math.isnan(v) for v in bootstrap_auc_ci(np.zeros(10), np.linspace(0, 1, 10)))


# ---------------------------------------------------------------------------
# Wilson


def _wilson_closed_form(x, n, alpha):
    z = stats.norm.ppf(1 - (1 - alpha) / 2)
    p = x / n
    centre = (2 * n * p + z**2) / (2 * (n + z**2))
    half = z * math.sqrt(z**2 + 4 * n * p * (1 - p)) / (2 * (n + z**2))
    return centre - half, centre + half


def test_wilson_textbook_values():
    # Newcombe (1998), Stat Med 17:857, Table I: 81/263 -> 0.2553 to 0.3662
    lo, hi = wilson_ci(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = wilson_ci(10, 10)
    assert round(lo, 4) == 0.7225 and hi == 1.0
    # Newcombe Table I: 15/148 -> 0.0624 to 0.1605
    lo, hi = wilson_ci(15, 148)
    assert (round(lo, 4), round(hi, 4)) == (0.0624, 0.1605)


@pytest.mark.parametrize("x,n,alpha", [(3, 7, 0.95), (50, 100, 0.9), (1, 29, 0.99), (17, 40, 0.8)])
def test_wilson_closed_form(x, n, alpha):
    assert wilson_ci(x, n, alpha) == pytest.approx(_wilson_closed_form(x, n, alpha), abs=1e-12)


def test_wilson_edge_cases():
    assert all(math.isnan(v) for v in wilson_ci(0, 0))
    with pytest.raises(ValueError):
        wilson_ci(5, 3)


# ---------------------------------------------------------------------------
# thresholds


def test_choose_thresholds_hand_example():
    neg = [0.05, 0.1, 0.2, 0.3, 0.4, 0.45]
    pos = [0.35, 0.6, 0.7, 0.8, 0.9]
    y = np.r_[np.zeros(6), np.ones(5)]
    p = np.r_[neg, pos]
    # J at t=0.6: 4/5 - 0 = 0.8;  t=0.35: 1 - 2/6 = 0.667;  t=0.7: 3/5 = 0.6
    t = choose_thresholds(y, p, confidence=None)       # no margin: the target on these data
    assert t == {"default": 0.5, "youden": 0.6, "high_sensitivity": 0.35}
    assert choose_thresholds(y, p, target_sensitivity=0.8, confidence=None)["high_sensitivity"] == 0.6
    # exactly reaching the target counts (3/5 = 0.6 at t = 0.7)
    assert choose_thresholds(y, p, target_sensitivity=0.6, confidence=None)["high_sensitivity"] == 0.7
    for target in (0.6, 0.8, 0.95):
        th = choose_thresholds(y, p, target_sensitivity=target, confidence=None)["high_sensitivity"]
        assert binary_metrics(y, p, threshold=th, ci=None)["sensitivity"] >= target
    one_class = choose_thresholds(np.ones(4), [0.1, 0.2, 0.3, 0.4])
    assert one_class["default"] == 0.5 and math.isnan(one_class["youden"])


# ---------------------------------------------------------------------------
# calibration


def test_calibration_hand_example():
    cal = calibration([0, 1, 1, 1], [0.1, 0.15, 0.8, 0.9], n_bins=2)
    # bin [0, .5): conf .125, acc .5;  bin [.5, 1]: conf .85, acc 1
    assert cal["ece"] == pytest.approx(0.5 * 0.375 + 0.5 * 0.15)
    assert cal["brier"] == pytest.approx((0.01 + 0.7225 + 0.04 + 0.01) / 4)
    assert cal["bin_edges"] == [0.0, 0.5, 1.0]
    assert cal["bin_count"] == [2, 2]
    assert cal["bin_confidence"] == pytest.approx([0.125, 0.85])
    assert cal["bin_accuracy"] == pytest.approx([0.5, 1.0])


def test_calibration_bin_boundaries_and_empty_bins():
    cal = calibration([0, 1, 1], [0.0, 0.5, 1.0], n_bins=4)
    assert cal["bin_count"] == [1, 0, 1, 1]  # 0.5 opens bin 3, 1.0 closes the last
    assert math.isnan(cal["bin_confidence"][1]) and math.isnan(cal["bin_accuracy"][1])
    assert cal["ece"] == pytest.approx(0.5 / 3)  # only the 0.5 -> 1 case is off


def test_calibration_perfectly_calibrated_vs_not():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    cal = calibration(y, p)
    assert cal["ece"] < 0.02
    assert cal["brier"] == pytest.approx(brier_score_loss(y, p))
    assert sum(cal["bin_count"]) == 20000
    overconfident = np.clip(0.5 + 1.6 * (p - 0.5), 0, 1)
    assert calibration(y, overconfident)["ece"] > 0.05


# ---------------------------------------------------------------------------
# binary_metrics

EXPECTED_KEYS = {
    "auc", "auc_ci", "auc_ci_method", "accuracy", "balanced_accuracy", "sensitivity", "sensitivity_ci",
    "specificity", "specificity_ci", "ppv", "npv", "prevalence", "threshold", "n", "n_pos", "n_neg",
    "confusion_matrix", "sens_at_spec90", "spec_at_sens95", "brier", "ece",
}  # fmt: skip


def _assert_plain(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str)
            _assert_plain(v)
    elif isinstance(obj, list):
        for v in obj:
            _assert_plain(v)
    else:
        assert obj is None or type(obj) in (float, int, str), type(obj)


def test_binary_metrics_hand_example():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [0.9, 0.6, 0.4, 0.2, 0.55, 0.1, 0.3, 0.8]
    m = binary_metrics(y, p)  # predictions at 0.5: 1 1 0 0 1 0 0 1
    assert set(m) == EXPECTED_KEYS
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy"):
        assert m[key] == pytest.approx(0.75)
    assert m["sensitivity_ci"] == pytest.approx(list(wilson_ci(3, 4)))
    assert m["specificity_ci"] == pytest.approx(list(wilson_ci(3, 4)))
    assert (m["n"], m["n_pos"], m["n_neg"], m["prevalence"]) == (8, 4, 4, 0.5)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))  # 15/16
    assert m["auc_ci_method"] == "delong"
    # spec >= 0.9 needs t > 0.55 -> positives .9, .8, .6 -> 3/4
    assert m["sens_at_spec90"] == pytest.approx(0.75)
    # sens >= 0.95 needs t <= 0.4 -> only negative .55 called positive -> 3/4
    assert m["spec_at_sens95"] == pytest.approx(0.75)
    assert m["brier"] == pytest.approx(np.mean((np.array(p) - np.array(y)) ** 2))
    assert m["threshold"] == 0.5
    _assert_plain(m)
    json.dumps(m)

    m2 = binary_metrics(y, p, threshold=0.35)
    assert m2["confusion_matrix"] == [[3, 1], [0, 4]]  # only negative 0.55 is >= 0.35
    assert m2["sensitivity"] == 1.0 and m2["specificity"] == 0.75


def test_binary_metrics_single_class_and_bootstrap():
    m = binary_metrics(np.zeros(6, dtype=int), np.linspace(0, 1, 6))
    assert math.isnan(m["auc"]) and all(math.isnan(v) for v in m["auc_ci"])
    assert math.isnan(m["sensitivity"]) and math.isnan(m["balanced_accuracy"])
    assert m["specificity"] == 0.5 and m["n_pos"] == 0
    _assert_plain(m)
    json.loads(json.dumps(m, allow_nan=True))

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    mb = binary_metrics(y, p, ci="bootstrap", n_boot=300, seed=0)
    assert mb["auc_ci_method"] == "bootstrap"
    assert mb["auc_ci"][0] < mb["auc"] < mb["auc_ci"][1]
    _assert_plain(mb)
    mn = binary_metrics(y, p, ci=None)
    assert mn["auc"] == pytest.approx(mb["auc"]) and math.isnan(mn["auc_ci"][0])
    with pytest.raises(ValueError):
        binary_metrics(y, p * 2)  # not probabilities
    with pytest.raises(ValueError):
        binary_metrics(y, p, ci="wald")


# ---------------------------------------------------------------------------
# temperature


def test_fit_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(scale=2.0, size=50000)
    y = (rng.random(50000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    assert fit_temperature(y, 2.0 * true_logit) == pytest.approx(2.0, abs=0.1)
    assert fit_temperature(y, true_logit) == pytest.approx(1.0, abs=0.05)
    assert fit_temperature(y, 0.5 * true_logit) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError):
        fit_temperature(np.ones(5), np.arange(5.0))


# ---------------------------------------------------------------------------
# multiclass


def test_multiclass_metrics():
    classes = ["benign", "malignant", "normal"]
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    probs = np.array([
        [0.7, 0.2, 0.1],
        [0.5, 0.4, 0.1],
        [0.2, 0.7, 0.1],  # benign called malignant
        [0.1, 0.8, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.1, 0.8],
        [0.2, 0.1, 0.7],
        [0.5, 0.1, 0.4],  # normal called benign
    ])  # fmt: skip
    m = multiclass_metrics(y, probs, classes)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["per_class"]["benign"]["sensitivity"] == pytest.approx(2 / 3)
    assert m["per_class"]["malignant"]["n"] == 2
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["n"] == 8
    _assert_plain(m)

    # a class absent from y_true: macro AUC undefined, no exception
    m2 = multiclass_metrics(y[y != 2], probs[y != 2], classes)
    assert math.isnan(m2["auc"]) and m2["per_class"]["normal"]["n"] == 0
    json.dumps(m2)
    with pytest.raises(ValueError):
        multiclass_metrics(y, probs[:, :2], classes)


def test_report_roc_points_are_sklearns_roc_curve():
    """The report's bootstrap band uses its own ROC (hundreds per report): the same points as sklearn's, ties
    and collinear runs included."""
    from sklearn.metrics import roc_curve

    from sonocad.evaluation.report import roc_points

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 120))
        y = np.r_[0, 1, rng.integers(0, 2, n)]
        prob = np.round(rng.random(len(y)), int(rng.integers(1, 4)))      # few decimals: many ties
        fpr, tpr, _ = roc_curve(y, prob)
        ours = roc_points(y, prob)
        assert np.array_equal(ours[0], fpr) and np.array_equal(ours[1], tpr), trial
