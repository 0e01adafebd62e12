"""Issue 18: equal chance levels for the control task, the unconditional interval, and the rule on score over
chance (selectivity a diagnostic)."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from latentprobe.stats.probes import control_labels, corrected_repeated_cv_interval
from latentprobe.verdicts.visual_info import verdict_visual_info


def test_control_labels_are_a_permutation_of_the_real_labels_over_types():
    rng = np.random.default_rng(0)
    types = np.repeat(np.arange(16), 6)  # 16 recurring images, 6 questions each
    labels = np.repeat(rng.permutation(np.arange(16) % 4), 6)
    for seed in range(20):
        control = control_labels(labels, types, seed=seed)
        assert Counter(control) == Counter(labels)  # same class counts, so the same chance level
        assert all(len(set(control[types == t])) == 1 for t in range(16))  # one label per type


def test_corrected_resampled_t_interval_against_a_hand_computation():
    scores = np.array([0.1, 0.25, 0.05, 0.2, 0.15, 0.3])
    mean, low, high = corrected_repeated_cv_interval(scores, n_train=0.75, n_test=0.25, confidence=0.95)
    half = stats.t.ppf(0.975, 5) * np.sqrt((1 / 6 + 0.25 / 0.75) * scores.var(ddof=1))
    assert (mean, low, high) == pytest.approx((scores.mean(), scores.mean() - half, scores.mean() + half))


def _row(representation, attribute, excess, low, high, p=0.01, selectivity=0.0):
    return dict(subject="s", representation=representation, attribute=attribute, selection="nested", layer=0,
                step=0, score=0.5 + excess, selectivity=selectivity, selectivity_ci_low=selectivity - 0.05,
                selectivity_ci_high=selectivity + 0.05, p_value=p, n=200, confidence=0.95, n_permutations=99,
                skipped_reason="", score_excess=excess, score_excess_ci_low=low, score_excess_ci_high=high,
                capacity="ridge probe on 200 instances")


def test_limited_rests_on_the_score_over_chance_not_on_selectivity():
    # latents that ARE the image identity: selectivity ~0 against an image control, yet the score is far above
    # chance -- informative, never limited
    identity = pd.DataFrame([_row("latent", "colour", 0.4, 0.3, 0.5, selectivity=0.0),
                             _row("image_mean", "colour", 0.45, 0.4, 0.5)])
    assert verdict_visual_info(identity, "s").verdict == "informative"
    limited = pd.DataFrame([_row("latent", "colour", 0.01, -0.04, 0.06, p=0.4, selectivity=0.3),
                            _row("image_mean", "colour", 0.45, 0.4, 0.5)])
    verdict = verdict_visual_info(limited, "s")
    assert verdict.verdict == "limited" and "ridge probe on 200 instances" in verdict.evidence
    unreadable = limited.assign(score_excess_ci_low=[-0.04, 0.05])  # the image baseline not shown readable
    assert verdict_visual_info(unreadable, "s").verdict == "inconclusive"


def test_the_image_token_grid_is_the_witness_when_it_was_probed():
    # The mean of all image tokens does not show the attribute readable; the pooled grid does: `limited` rests on
    # the grid (chosen before looking at any score: the grid whenever the table has it).
    rows = pd.DataFrame([_row("latent", "colour", 0.01, -0.04, 0.06, p=0.4),
                         _row("image_mean", "colour", 0.1, 0.02, 0.18),
                         _row("image_tokens", "colour", 0.45, 0.4, 0.5)])
    verdict = verdict_visual_info(rows, "s")
    assert verdict.verdict == "limited" and verdict.details["baseline"] == "image_tokens"
    assert "image_tokens 0.450 (lower bound 0.400)" in verdict.evidence
    # a table without the grid falls back to the mean, which does not show the attribute readable here
    without_grid = rows[rows.representation != "image_tokens"]
    assert verdict_visual_info(without_grid, "s").verdict == "inconclusive"
    # asking for the mean explicitly is honoured
    assert verdict_visual_info(rows, "s", baseline="image_mean").verdict == "inconclusive"


def test_a_local_attribute_hidden_by_the_token_mean_is_read_from_the_pooled_grid():
    # One corner cell's colour; the other cells vary at random, so the mean over tokens blurs it into noise while
    # the grid keeps the corner as its own block of features.
    from latentprobe.stats.image_readout import pooled_image_tokens
    from latentprobe.stats.probes import probe_table

    rng = np.random.default_rng(3)
    n, side, width = 120, 8, 6
    colour = rng.integers(0, 3, n)
    palette = rng.normal(size=(3, width))
    tokens = rng.normal(scale=2.0, size=(n, side, side, width))
    tokens[:, :2, :2] = palette[colour][:, None, None] + rng.normal(scale=0.3, size=(n, 2, 2, width))
    flat = tokens.reshape(n, side * side, width)
    grid, how = pooled_image_tokens(list(flat))
    assert how == "image tokens pooled onto a 4 x 4 grid (16 cells)" and grid.shape == (n, 16 * width)
    common = dict(subject="s", attribute="colour", n_splits=4, seed=0, n_permutations=49, Cs=(1.0,))
    by_grid = probe_table({(0, -1): grid}, colour, np.arange(n), representation="image_tokens", **common)
    by_mean = probe_table({(0, -1): flat.mean(1)}, colour, np.arange(n), representation="image_mean", **common)
    nested = lambda t: t[t.selection == "nested"].iloc[0]  # noqa: E731
    assert nested(by_grid).score_excess_ci_low > 0.3
    assert nested(by_mean).score_excess < nested(by_grid).score_excess - 0.2
