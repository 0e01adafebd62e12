"""Similarity of latent tokens: agreement with direct numpy, the centring rule, bootstrap and bad input."""

import numpy as np
import pandas as pd
import pytest

from latentprobe.errors import LatentProbeError
from latentprobe.stats.similarity import (
    SIMILARITY_COLUMNS,
    baseline_similarity,
    common_latent_mean,
    cosine_matrix,
    inter_instance_similarity,
    intra_instance_similarity,
    offdiagonal_mean_by_step,
    relative_spread,
    similarity_table,
)


def direct_cosine(x):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit @ unit.T


def offdiagonal_mean(matrix):
    n = len(matrix)
    return (matrix.sum() - np.trace(matrix)) / (n * (n - 1))


@pytest.fixture
def latents():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(12, 4, 16)) + rng.normal(size=16)  # a shared direction, as in real models
    values[:3, 3] = np.nan  # three instances stopped after three latent steps
    return values


def test_cosine_matrix_equals_direct_numpy():
    x = np.random.default_rng(1).normal(size=(7, 5))
    np.testing.assert_allclose(cosine_matrix(x), direct_cosine(x), atol=1e-12)
    np.testing.assert_allclose(cosine_matrix(x, centre=True), direct_cosine(x - x.mean(0)), atol=1e-12)
    mean = np.arange(5.0)
    np.testing.assert_allclose(cosine_matrix(x, centre=True, mean=mean), direct_cosine(x - mean), atol=1e-12)


def test_identical_vectors_have_similarity_one_and_orthogonal_zero():
    identical = np.tile([0.3, -2.0, 5.0], (4, 1))
    np.testing.assert_allclose(cosine_matrix(identical), np.ones((4, 4)))
    orthogonal = np.eye(4) * np.array([1.0, 2.0, 3.0, 4.0])[:, None]
    np.testing.assert_allclose(cosine_matrix(orthogonal), np.eye(4), atol=1e-12)


def test_zero_or_missing_vectors_give_nan_not_a_crash():
    x = np.array([[1.0, 0.0], [0.0, 0.0], [np.nan, np.nan]])
    matrix = cosine_matrix(x)
    assert matrix[0, 0] == 1.0
    assert np.isnan(matrix[1]).all() and np.isnan(matrix[2]).all()


def test_inter_instance_matches_per_step_cosine(latents):
    matrices = inter_instance_similarity(latents)
    assert matrices.shape == (4, 12, 12)
    for step in range(3):
        np.testing.assert_allclose(matrices[step], direct_cosine(latents[:, step]), atol=1e-12)
    assert np.isnan(matrices[3, 0]).all() and not np.isnan(matrices[3, 5, 6])


def test_centring_uses_the_common_mean_of_all_latent_vectors(latents):
    origin = np.nanmean(latents.reshape(-1, 16), axis=0)
    np.testing.assert_allclose(common_latent_mean(latents), origin)
    matrices = inter_instance_similarity(latents, centre=True)
    np.testing.assert_allclose(matrices[1], direct_cosine(latents[:, 1] - origin), atol=1e-12)


def test_centring_removes_a_shared_direction():
    rng = np.random.default_rng(2)
    latents = 50.0 * np.ones(32) + rng.normal(size=(30, 2, 32))
    raw = offdiagonal_mean_by_step(latents, n_boot=0)
    centred = offdiagonal_mean_by_step(latents, centre=True, n_boot=0)
    assert (raw.mean_similarity > 0.99).all()
    assert (centred.mean_similarity.abs() < 0.1).all()


def test_offdiagonal_mean_matches_direct_numpy_and_counts_instances(latents):
    table = offdiagonal_mean_by_step(latents, n_boot=300, seed=3)
    assert table.columns.tolist() == ["step", "mean_similarity", "ci_low", "ci_high", "n_instances"]
    assert table.n_instances.tolist() == [12, 12, 12, 9]
    for step in range(3):
        assert table.mean_similarity[step] == pytest.approx(offdiagonal_mean(direct_cosine(latents[:, step])))
    assert table.mean_similarity[3] == pytest.approx(offdiagonal_mean(direct_cosine(latents[3:, 3])))
    assert (table.ci_low <= table.mean_similarity).all() and (table.mean_similarity <= table.ci_high).all()
    pd.testing.assert_frame_equal(table, offdiagonal_mean_by_step(latents, n_boot=300, seed=3))


def test_bootstrap_never_pairs_an_instance_with_its_own_copy():
    # Orthogonal instances: any self-pair would push the resampled mean above 0.
    latents = np.eye(6)[:, None, :]
    table = offdiagonal_mean_by_step(latents, n_boot=200)
    assert table.mean_similarity[0] == pytest.approx(0.0)
    assert table.ci_low[0] == pytest.approx(0.0) and table.ci_high[0] == pytest.approx(0.0)


def test_intra_instance_is_the_nan_aware_mean_over_instances(latents):
    matrix = intra_instance_similarity(latents)
    per_instance = np.stack([cosine_matrix(latents[i]) for i in range(len(latents))])
    np.testing.assert_allclose(matrix, np.nanmean(per_instance, axis=0), atol=1e-12)
    np.testing.assert_allclose(np.diag(matrix), 1.0)


def test_baseline_similarity_and_its_centring_rule():
    states = np.random.default_rng(4).normal(size=(10, 8))
    row = baseline_similarity(states, n_boot=100)
    assert row.mean_similarity[0] == pytest.approx(offdiagonal_mean(direct_cosine(states)))
    with pytest.raises(LatentProbeError, match="common mean"):
        baseline_similarity(states, centre=True)
    mean = states.mean(0) + 1.0
    centred = baseline_similarity(states, centre=True, mean=mean, n_boot=0)
    assert centred.mean_similarity[0] == pytest.approx(offdiagonal_mean(direct_cosine(states - mean)))


def test_similarity_table_is_tidy_and_centres_everything_on_one_mean(latents):
    rng = np.random.default_rng(5)
    baselines = {"image_mean": rng.normal(size=(12, 16)), "prompt_last": rng.normal(size=(12, 16))}
    table = similarity_table(latents, baselines, "tiny", seed=0, n_boot=100)
    assert table.columns.tolist() == SIMILARITY_COLUMNS
    cosine = table[table.statistic == "cosine"]
    assert len(cosine) == 2 * (4 + 2)
    assert set(cosine.centring) == {"raw", "centred"}
    assert (table[table.representation != "latent"].step == -1).all()
    origin = common_latent_mean(latents)
    centred_prompt = cosine[(cosine.representation == "prompt_last") & (cosine.centring == "centred")].iloc[0]
    assert centred_prompt.estimate == pytest.approx(
        offdiagonal_mean(direct_cosine(baselines["prompt_last"] - origin))
    )
    assert (cosine.mean_similarity == cosine.estimate).all() and table[table.statistic != "cosine"].mean_similarity.isna().all()
    spread = table[table.statistic == "relative_spread"]
    assert len(spread) == 4 + 2 and set(spread.centring) == {""}
    ratios = table[table.statistic == "spread_ratio"]
    assert len(ratios) == 2 * 4 and set(ratios.reference) == {"image_mean", "prompt_last"}
    step1 = ratios[(ratios.reference == "prompt_last") & (ratios.step == 1)].iloc[0]
    assert step1.estimate == pytest.approx(relative_spread(latents[:, 1]) / relative_spread(baselines["prompt_last"]))
    assert step1.ci_low <= step1.estimate <= step1.ci_high
    pd.testing.assert_frame_equal(table, similarity_table(latents, baselines, "tiny", seed=0, n_boot=100))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: cosine_matrix(np.ones(3)), "2 dimensions"),
        (lambda: inter_instance_similarity(np.ones((2, 3))), "3 dimensions"),
        (lambda: inter_instance_similarity(np.array([[[1.0, np.nan]]])), "partly NaN"),
        (lambda: cosine_matrix(np.array([[np.inf, 1.0]])), "infinite"),
        (lambda: cosine_matrix(np.ones((2, 3)), centre=True, mean=np.ones(2)), "mean has shape"),
        (lambda: similarity_table(np.ones((2, 1, 3)), {"prompt_last": np.ones((2, 4))}, "s"), "hidden size"),
        (lambda: common_latent_mean(np.full((2, 1, 3), np.nan)), "no present vector"),
        (lambda: offdiagonal_mean_by_step(np.ones((2, 1, 3)), confidence=1.5), "confidence"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(LatentProbeError, match=message):
        call()
