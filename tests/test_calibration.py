"""Calibration by simulation: under a true null `connected` comes in at most alpha of runs; with a true effect
at twice the margin `disconnect` comes in at most alpha of runs. Small simulations here, larger under -m slow.

A rate measured in S simulated runs has a Monte Carlo standard error of sqrt(0.05 x 0.95 / S); the tests allow
two of them above 5%, so a rule that truly holds its level passes and one that breaks it (the old percentile
bootstrap p-values gave 9.6% for six null rows at n = 20) fails.
"""

import math

import pytest

from latentprobe.verdicts.simulation import (family_verdict_rates, latent_answer_effects, mean_family, rate_family,
                                    true_nie_correct, verdict_rates)


def _limit(n_sims: int, level: float = 0.05) -> float:
    return level + 2 * math.sqrt(level * (1 - level) / n_sims)


@pytest.mark.parametrize("n", [20, 80])
def test_rates_under_the_null_are_never_connected_and_decide_once_n_suffices(n):
    rates = family_verdict_rates(lambda rng, m: rate_family(rng, n=n, rates=(0.0, 0.0, 0.0), margins=m),
                                 n_sims=100, seed=0)
    assert rates["connected"] == 0
    assert rates["disconnect"] == (1.0 if n >= 72 else 0.0)  # 0/n has upper bound < 0.05 from n = 72 on


@pytest.mark.parametrize("n", [20, 80, 200])
def test_rates_at_twice_the_margin_are_not_called_disconnect(n):
    rates = family_verdict_rates(lambda rng, m: rate_family(rng, n=n, rates=(0.10,), margins=m), n_sims=100, seed=1)
    assert rates["disconnect"] <= 0.05


def test_six_null_mean_rows_are_connected_at_most_five_percent_of_the_time():
    """Was a false effect in 54/200 runs without multiplicity control."""
    n_sims = 150
    rates = family_verdict_rates(lambda rng, m: mean_family(rng, n=20, effects=(0.0,) * 6, margins=m, n_boot=200),
                                 n_sims=n_sims, seed=2)
    assert rates["connected"] <= _limit(n_sims)


@pytest.mark.parametrize("effect", [0.10, -0.10])
def test_means_at_twice_the_margin_are_not_called_disconnect(effect):
    rates = family_verdict_rates(lambda rng, m: mean_family(rng, n=20, effects=(effect,), margins=m, n_boot=200),
                                 n_sims=100, seed=3)
    assert rates["disconnect"] <= 0.05


def test_end_to_end_a_true_nie_of_minus_point_two_at_n_20_is_never_a_disconnect():
    """Through summarize and verdict_latent_answer; was "disconnect supported" in 83 of 200 runs."""
    flip = 0.2 / 0.8667
    assert true_nie_correct(flip, 0.9) == pytest.approx(-0.2, abs=1e-3)
    for with_changed in (True, False):
        rates = verdict_rates(lambda rng: latent_answer_effects(rng, n=20, flip_rate=flip, n_boot=100,
                                                                with_answer_changed=with_changed),
                              n_sims=8, seed=4)
        assert rates["disconnect"] == 0


def test_end_to_end_answers_changing_both_ways_are_not_a_disconnect():
    """30% of answers change, correctness moves both ways (true NIE_correct 0): was "supported" in 193/200."""
    assert true_nie_correct(0.3, 0.25) == pytest.approx(0.0)
    rates = verdict_rates(lambda rng: latent_answer_effects(rng, n=20, flip_rate=0.3, clean_accuracy=0.25, n_boot=100),
                          n_sims=12, seed=5)
    # issue 18: `connected` now needs the rate's lower bound above the margin (0.05), which 3 of 20 changed
    # answers do not give: about 11% of runs stay inconclusive at n = 20 (binomial), never disconnect
    assert rates["disconnect"] == 0 and rates["connected"] >= 0.75


# ------------------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
@pytest.mark.parametrize("n, rows", [(20, 1), (20, 6), (80, 6), (200, 3)])
def test_slow_null_means_connected_rate(n, rows):
    n_sims = 1000
    rates = family_verdict_rates(lambda rng, m: mean_family(rng, n=n, effects=(0.0,) * rows, margins=m),
                                 n_sims=n_sims, seed=10 + n + rows)
    assert rates["connected"] <= _limit(n_sims)


@pytest.mark.slow
@pytest.mark.parametrize("n", [20, 80, 200])
def test_slow_twice_the_margin_disconnect_rate(n):
    n_sims = 1000
    for effect in (0.10, -0.10):
        rates = family_verdict_rates(lambda rng, m: mean_family(rng, n=n, effects=(effect,), margins=m),
                                     n_sims=n_sims, seed=20 + n)
        assert rates["disconnect"] <= 0.05
    rates = family_verdict_rates(lambda rng, m: rate_family(rng, n=n, rates=(0.10,), margins=m), n_sims=n_sims,
                                 seed=30 + n)
    assert rates["disconnect"] <= 0.05


@pytest.mark.slow
def test_slow_end_to_end_fallback_six_nie_rows_with_no_mean_effect():
    """Tables without answer_changed: six NIE_correct rows whose true mean is 0 (answers change both ways)."""
    n_sims = 200
    rates = verdict_rates(lambda rng: latent_answer_effects(rng, n=20, flip_rate=0.3, clean_accuracy=0.25,
                                                            n_information=6, with_answer_changed=False, n_boot=200),
                          n_sims=n_sims, seed=6)
    assert rates["connected"] <= _limit(n_sims)


# ------------------------------------------------------------------------------ issue 18: the hard cases (fast)

from latentprobe.verdicts.simulation import KNOWN_SHORTFALL, monte_carlo_limit, scenarios, word_rates  # noqa: E402

FAST_SIMS = {"latent_answer": 200, "mediation mean": 60, "input_latent": 25, "collapse": 15, "visual_info": 4}
_SCENARIOS = scenarios(fast=True)


@pytest.mark.parametrize("index", range(len(_SCENARIOS)), ids=[f"{r}: {s}" for r, s, *_ in _SCENARIOS])
def test_every_rule_holds_its_error_rate_on_the_hard_cases(index):
    """Small runs of every scenario of analyses/calibration.py: the error word comes in at most its target plus
    two Monte Carlo standard errors (the large runs are under -m slow and in the README's table)."""
    rule, scenario, error, target, decide = _SCENARIOS[index]
    n_sims = FAST_SIMS[rule]
    rates = word_rates(decide, n_sims=n_sims, seed=100 + index)
    # a known shortfall (README, calibration table) is held to its measured level, not waved through
    assert rates.get(error, 0.0) <= monte_carlo_limit(KNOWN_SHORTFALL.get(scenario, target), n_sims), (scenario, rates)


def test_the_old_rules_failed_these_cases():
    """The scenarios are hard: a test of "the rate is 0" calls a negligible true rate 0.01 at n = 200
    `connected` in most runs, which the minimum-effect rule does not."""
    from scipy.stats import binom

    assert 1 - binom.pmf(0, 200, 0.01) > 0.8  # P(at least one changed answer): the old p = 0 rule's false rate


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_SCENARIOS)), ids=[f"{r}: {s}" for r, s, *_ in _SCENARIOS])
def test_slow_every_rule_holds_its_error_rate_on_the_hard_cases(index):
    rule, scenario, error, target, decide = _SCENARIOS[index]
    n_sims = 50 if rule == "visual_info" else 400
    rates = word_rates(decide, n_sims=n_sims, seed=500 + index)
    assert rates.get(error, 0.0) <= monte_carlo_limit(KNOWN_SHORTFALL.get(scenario, target), n_sims), (scenario, rates)
