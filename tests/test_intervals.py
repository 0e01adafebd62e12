"""Issue 18: cluster-aware exact rates, BCa means and sign-flip p-values, each against an independent oracle."""

import itertools

import numpy as np
import pytest
from scipy import stats

from latentprobe.stats.intervals import (bca_mean_intervals, cluster_rate, fractional_clopper_pearson,
                                         per_instance_fractions, sign_flip_p_values)
from latentprobe.verdicts import Margins
from latentprobe.verdicts.decision import decide_family, rate_row


def test_fractional_clopper_pearson_equals_scipy_for_whole_counts():
    for n in (1, 12, 80):
        for k in sorted({0, 1, n // 2, n}):
            oracle = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
            assert fractional_clopper_pearson(k, n, 0.05) == (pytest.approx(oracle.low, abs=1e-10),
                                                              pytest.approx(oracle.high, abs=1e-10))


def test_several_seeds_per_instance_count_each_instance_once():
    fractions = per_instance_fractions([1, 1, 1, 1, 0, 0, 0, 0], ["a"] * 4 + ["b"] * 4)
    assert fractions.tolist() == [1.0, 0.0]
    row = cluster_rate(fractions)
    assert row["n"] == 2 and row["k"] == 1.0  # 4 events, but one instance: the design effect at its largest
    assert row["ci_high"] == pytest.approx(stats.binomtest(1, 2).proportion_ci(method="exact").high)


def test_evidence_is_monotone_one_more_changed_answer_never_moves_towards_disconnect():
    """Every way of adding one changed answer to 12 instances x 4 seeds raises both bounds, and the verdict never
    moves from connected/inconclusive towards disconnect (was: a percentile bootstrap could)."""
    order = {"connected": 2, "inconclusive": 1, "disconnect": 0}
    rng = np.random.default_rng(0)
    margins = Margins(answer_change=0.2)
    for _ in range(30):
        events = (rng.random((12, 4)) < rng.choice([0.0, 0.05, 0.3])).astype(float)
        before = cluster_rate(events.mean(axis=1))
        word = decide_family([rate_row("r", "flip_rate", before["k"], 12, margins)], margins, plan=False).verdict
        for i, j in zip(*np.nonzero(events == 0)):
            more = events.copy()
            more[i, j] = 1
            after = cluster_rate(more.mean(axis=1))
            assert after["ci_high"] >= before["ci_high"] and after["ci_low"] >= before["ci_low"]
            again = decide_family([rate_row("r", "flip_rate", after["k"], 12, margins)], margins, plan=False).verdict
            assert order[again] >= order[word]


def test_cluster_interval_covers_beta_binomial_rates():
    rng = np.random.default_rng(1)
    misses = 0
    for _ in range(1000):
        p = rng.beta(0.1 * 2, 0.9 * 2, 12)  # intra-instance correlation 1/3
        low, high = fractional_clopper_pearson((rng.binomial(4, p) / 4).sum(), 12, 0.05)
        misses += not (low <= 0.1 <= high)
    assert misses / 1000 <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 1000)


def test_bca_means_agree_with_scipy_bootstrap():
    rng = np.random.default_rng(2)
    values = rng.exponential(size=(30, 2))
    low, high = bca_mean_intervals(values, 0.05, n_boot=20000, seed=0)
    for j in range(2):
        oracle = stats.bootstrap((values[:, j],), np.mean, method="BCa", n_resamples=20000,
                                 rng=np.random.default_rng(1)).confidence_interval
        assert low[j] == pytest.approx(oracle.low, abs=0.04) and high[j] == pytest.approx(oracle.high, abs=0.04)


def test_sign_flip_p_value_equals_full_enumeration():
    values = np.array([0.3, -0.1, 0.5, 0.2, 0.05, -0.2, 0.4, 0.1])
    exact = np.mean([abs(np.mean(np.array(signs) * values)) >= abs(values.mean()) - 1e-12
                     for signs in itertools.product((-1, 1), repeat=len(values))])
    assert sign_flip_p_values(values[:, None], n_permutations=20000, seed=0)[0] == pytest.approx(exact, abs=0.01)
