"""Operating points with a margin: the high-sensitivity threshold keeps the sensitivity it promises on new cases."""
import math

import numpy as np
import pytest
from scipy import stats

from sonocad.evaluation.operating import (
    choose_thresholds,
    normal_bound,
    point_figures,
    positives_needed,
    promise_check,
    promise_warning,
    sensitivity_bound,
)
from sonocad.runtime.console import promise_verdict


def test_bound_is_clopper_pearson():
    assert sensitivity_bound(30, 30) == pytest.approx(0.05 ** (1 / 30))          # all detected: alpha^(1/n)
    assert sensitivity_bound(27, 30) == pytest.approx(stats.beta.ppf(0.05, 27, 4))
    assert sensitivity_bound(0, 10) == 0.0 and math.isnan(sensitivity_bound(0, 0))
    assert positives_needed(0.95, 0.95) == 59 and sensitivity_bound(59, 59) >= 0.95 > sensitivity_bound(58, 58)
    assert positives_needed(1.0) is None


def test_many_positives_promise_the_target_few_do_not():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300), np.ones(300)]
    p = np.r_[rng.beta(2, 5, 300), rng.beta(5, 2, 300)]
    t = choose_thresholds(y, p)
    fig = point_figures(y, p, t)["high_sensitivity"]
    assert fig["target_promised"] and fig["promised_sensitivity"] >= 0.95 and promise_warning({"high_sensitivity": fig}) is None
    # with a margin the threshold is lower (more cases called positive) than the bare target's
    assert t["high_sensitivity"] < choose_thresholds(y, p, confidence=None)["high_sensitivity"]
    assert fig["sensitivity"] > 0.95
    few = point_figures(y[:320], p[:320], choose_thresholds(y[:320], p[:320]))["high_sensitivity"]  # 300 + 20
    lowest = p[:320][y[:320] == 1].min()
    assert not few["target_promised"] and few["threshold"] == normal_bound(p[300:320]) <= lowest
    # these 20 scores are left-skewed: the normal bound lies above the lowest, which is taken
    assert few["threshold"] == lowest and few["rule"] == "lowest positive score" and fig["rule"] == "clopper-pearson bound"
    spread = np.r_[np.zeros(4), np.ones(5)], np.r_[np.full(4, 0.1), 0.6, 0.7, 0.8, 0.9, 0.95]
    assert point_figures(*spread, choose_thresholds(*spread))["high_sensitivity"]["rule"] == "normal prediction bound"
    tight = np.r_[np.zeros(5), np.ones(5)], np.r_[np.full(5, 0.1), np.full(5, 0.8)]      # no spread: the lowest
    assert point_figures(*tight, choose_thresholds(*tight))["high_sensitivity"]["rule"] == "lowest positive score"
    assert few["sensitivity"] == 1.0 and few["promised_sensitivity"] == pytest.approx(0.05 ** (1 / 20))
    line = promise_warning({"high_sensitivity": few}, "the local set")
    assert line.startswith("the local set: only 20 positive cases;") and "59 positives are needed" in line


def test_promise_holds_on_new_cases_and_the_bare_target_does_not():
    """Positive logits ~ N(0, 1): a threshold t gives true sensitivity 1 - Phi(logit t). Over many choosing sets the
    promise must hold at least 95% of the time; the bare target reaches 0.95 about half the time."""
    rng = np.random.default_rng(1)
    kept, bare_kept = [], []
    for _ in range(1000):
        y = np.r_[np.zeros(40), np.ones(120)]
        p = 1 / (1 + np.exp(-np.r_[rng.normal(-2, 1, 40), rng.normal(0, 1, 120)]))
        t = choose_thresholds(y, p)["high_sensitivity"]
        promised = sensitivity_bound(int((p[40:] >= t).sum()), 120)
        kept.append(stats.norm.sf(np.log(t / (1 - t))) >= promised)
        bare = choose_thresholds(y, p, confidence=None)["high_sensitivity"]
        bare_kept.append(stats.norm.sf(np.log(bare / (1 - bare))) >= 0.95)
    assert np.mean(kept) >= 0.93         # exactly 0.95 in theory; sd 0.007 over 1000 sets
    assert np.mean(bare_kept) < 0.6


def test_few_positives_normal_bound_gives_the_target_on_average_the_lowest_score_does_not():
    """13 positives (a local set of 40): were their logits normal, the threshold gives new positives the target on
    average; the lowest positive score alone gives n / (n + 1) = 0.93."""
    rng = np.random.default_rng(2)
    chosen, lowest = [], []
    for _ in range(2000):
        z = rng.normal(0, 1, 13)
        y, p = np.r_[np.zeros(27), np.ones(13)], 1 / (1 + np.exp(-np.r_[rng.normal(-2, 1, 27), z]))
        t = choose_thresholds(y, p)["high_sensitivity"]
        assert t <= p[27:].min()
        chosen.append(stats.norm.sf(np.log(t / (1 - t))))
        lowest.append(stats.norm.sf(z.min()))
    assert np.mean(chosen) >= 0.945 and np.mean(lowest) < 0.935       # 0.95 and 0.929 in theory; sd 0.002
    assert normal_bound([0.2, 0.9]) == 0.2 and normal_bound([0.5, 0.6, 0.7], target=1.0) == 0.5
    # Student's t with n - 1 degrees of freedom, sample sd, the new case's own spread: sqrt(1 + 1/n)
    assert normal_bound([0.6, 0.7, 0.8, 0.9, 0.95]) == pytest.approx(0.30258, abs=1e-5)
    assert normal_bound([0.7, 0.7, 0.7]) == 0.7                                    # no spread: the lowest
    # a saturated float32 probability (1.0) counts as a logit of about 16, not 28
    assert normal_bound([1.0] + [0.9] * 6 + [0.6] * 6) > 0.003               # 3e-5 at a logit of 28


def test_one_class_gives_no_points():
    t = choose_thresholds(np.zeros(5), np.linspace(0, 1, 5))
    assert math.isnan(t["high_sensitivity"]) and point_figures(np.zeros(5), np.linspace(0, 1, 5), t).keys() == {"default"}


def test_a_miss_of_the_promise_is_told_from_a_refutation():
    """BUSI's test part, default run seed 0: 36 of 42 cancers against a promise of 0.883 (the 24-cancer bound) is a
    miss that so few test cancers show by chance; the notebook-era point, 33 of 42 against 0.95, refutes it."""
    kept = promise_check(38, 42, 0.8827)
    assert kept["promise_kept"] and promise_verdict(kept) == "kept"
    miss = promise_check(36, 42, 0.8827)
    assert not miss["promise_kept"] and miss["promise_p"] == pytest.approx(stats.binom.cdf(36, 42, 0.8827))
    assert promise_verdict(miss).startswith("NOT kept (a miss within chance: p = 0.37")
    refuted = promise_check(33, 42, 0.95)
    assert refuted["promise_p"] < 0.01 and promise_verdict(refuted).startswith("NOT kept (refuted")
    assert promise_check(42, 42, 1.0)["promise_kept"]                                # exactly met counts as kept
    none = promise_check(0, 0, 0.9)                                 # an evaluation set without cancers
    assert none["promise_kept"] is None and none["promise_p"] is None
    assert promise_verdict(none) == "not checkable (no positive cases)"
