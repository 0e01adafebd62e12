"""The collapse statistic and verdict on the issue's toy cases, against direct numpy, and by simulation."""

import numpy as np
import pandas as pd
import pytest

from latentprobe.errors import LatentProbeError
from latentprobe.stats.similarity import relative_spread, similarity_table, spread_rows
from latentprobe.verdicts.base import NOT_MEASURED
from latentprobe.verdicts.collapse import verdict_collapse

N, D = 40, 32


def anisotropic_states(rng, n=N, offset=3.0):
    """Hidden-state-like vectors: a large shared direction plus instance variation (raw cosine ~0.9)."""
    return offset * np.ones(D) + rng.normal(size=(n, D))


def raw_cosine(x):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    return (sims.sum() - len(x)) / (len(x) * (len(x) - 1))


def baselines(rng, n=N):
    return {"image_mean": anisotropic_states(rng, n), "prompt_last": anisotropic_states(rng, n, offset=2.0)}


def decide(latents, rng, **kwargs):
    # issue 18: the verdict reads the collapse ratio against a single image token (the image_mean baseline is a
    # pooled, conservative yardstick that can only show collapse)
    table = similarity_table(latents, baselines(rng, len(latents)), "toy", n_boot=300,
                             single_tokens={"image_token": anisotropic_states(rng, len(latents))})
    return verdict_collapse(table, "toy", **kwargs), table


def test_relative_spread_matches_direct_numpy_and_one_minus_cosine():
    rng = np.random.default_rng(0)
    x = anisotropic_states(rng)
    direct = np.var(x, axis=0, ddof=1).sum() / np.mean((x**2).sum(axis=1))
    assert relative_spread(x) == pytest.approx(direct)
    units = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert relative_spread(units) == pytest.approx(1 - raw_cosine(units))
    assert relative_spread(7.0 * x @ np.linalg.qr(rng.normal(size=(D, D)))[0]) == pytest.approx(direct)


def test_all_latents_within_a_third_of_a_percent_of_one_point_are_collapsed():
    rng = np.random.default_rng(1)
    point = rng.normal(size=D)
    noise = rng.normal(size=(N, 4, D))
    noise *= 0.003 * np.linalg.norm(point) / np.linalg.norm(noise, axis=2, keepdims=True) * rng.uniform(size=(N, 4, 1))
    verdict, table = decide(point + noise, rng)
    cosine = table[(table.statistic == "cosine") & (table.centring == "raw") & (table.representation == "latent")]
    assert (cosine.estimate > 0.9999).all()
    assert verdict.verdict == "collapsed" and verdict.ci_high < 1e-3


def test_each_step_collapsed_to_its_own_point_is_collapsed():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(1, 4, D)) * np.array([1.0, 5.0, 0.2, 3.0])[None, :, None]
    latents = points * (1 + 0.003 * rng.uniform(-1, 1, size=(N, 4, 1))) + 1e-4 * rng.normal(size=(N, 4, D))
    verdict, table = decide(latents, rng)
    ratios = table[table.statistic == "spread_ratio"]
    assert (ratios.ci_high < 0.01).all()  # every step, against both baselines
    assert verdict.verdict == "collapsed"


def test_isotropic_random_latents_are_not_collapsed():
    rng = np.random.default_rng(3)
    verdict, _ = decide(rng.normal(size=(N, 4, D)), rng)
    assert verdict.verdict == "not collapsed" and verdict.ci_low > 0.5  # per direction as varied as a token


def test_anisotropy_alone_is_not_collapse_and_the_threshold_is_reachable_past_a_high_baseline_cosine():
    rng = np.random.default_rng(4)
    # Latents with the same shared direction as the baselines: raw cosine ~0.9, yet as varied as the image tokens.
    as_varied = np.stack([anisotropic_states(rng) for _ in range(3)], axis=1)
    verdict, table = decide(as_varied, rng)
    assert verdict.verdict == "not collapsed"
    assert table[(table.statistic == "cosine") & (table.representation == "latent")
                 & (table.centring == "raw")].estimate.min() > 0.85
    # Baseline raw cosine ~0.9; latents at raw cosine ~0.999 (10x less spread than the baseline would need 0.99):
    # the rule "baseline cosine + 0.1" could never be met, the spread ratio is.
    tight = 3.0 * np.ones(D) + 0.03 * rng.normal(size=(N, 3, D))
    verdict, table = decide(tight, rng)
    assert verdict.verdict == "collapsed" and verdict.estimate < 0.01


def test_an_interval_across_the_margin_is_inconclusive_and_says_what_n_would_decide():
    rng = np.random.default_rng(5)
    n = 12
    base = anisotropic_states(rng, n)
    scale = np.sqrt(0.1)  # latents vary sqrt(0.1) as much per dimension: spread ratio ~0.1 = the margin
    latents = (3.0 * np.ones(D) + scale * rng.normal(size=(n, 2, D)))
    table = similarity_table(latents, {"image_mean": base}, "toy", n_boot=300, single_tokens={"image_token": base})
    verdict = verdict_collapse(table, "toy", margin=float(table[(table.statistic == "collapse_ratio")
                                                                & (table.reference == "image_token")
                                                                & (table.step == 1)].estimate.iloc[0]))
    assert verdict.verdict == "inconclusive"
    assert verdict.ci_low < verdict.margin < verdict.ci_high


def test_the_judged_step_and_baseline_can_be_chosen_and_default_to_the_deepest_well_populated_step():
    rng = np.random.default_rng(6)
    latents = rng.normal(size=(N, 3, D))
    latents[:, 1] = 0.01 * latents[:, 1] + rng.normal(size=D)  # step 1 collapses
    latents[: N - 4, 2] = np.nan  # only 4 instances reach step 2: not judged by default
    _, table = decide(latents, rng)
    default = verdict_collapse(table, "toy")
    assert default.details["step"] == 1 and default.verdict == "collapsed"
    assert default.details["baseline"] == "image_token"  # a single token first (issue 18)
    assert verdict_collapse(table, "toy", step=0).verdict == "not collapsed"
    assert verdict_collapse(table, "toy", baseline="image_mean").details["baseline"] == "image_mean"
    with pytest.raises(LatentProbeError, match="baseline"):
        verdict_collapse(table, "toy", baseline="nonsense")


def test_missing_tables_are_not_measured_and_bad_arguments_are_errors():
    assert verdict_collapse(None, "s").verdict == NOT_MEASURED
    assert verdict_collapse(pd.DataFrame(), "s").verdict == NOT_MEASURED
    rng = np.random.default_rng(7)
    _, table = decide(rng.normal(size=(10, 2, D)), rng)
    assert verdict_collapse(table, "another subject").verdict == NOT_MEASURED
    assert verdict_collapse(table.drop(columns=["statistic"]), "toy").verdict == NOT_MEASURED
    for bad in (dict(margin=0.0), dict(margin=np.nan), dict(alpha=0.0), dict(alpha=np.inf)):
        with pytest.raises(LatentProbeError):
            verdict_collapse(table, "toy", **bad)
    with pytest.raises(LatentProbeError, match="too narrow"):
        verdict_collapse(table.assign(confidence=0.5), "toy")


def test_calibration_a_spread_ratio_twice_the_margin_is_rarely_called_collapsed():
    """True spread ratio 0.2 (twice the margin): 'collapsed' <= 5%, and the interval covers the truth."""
    # Population RS of offset mu + isotropic noise of variance s^2: D s^2 / (||mu||^2 + D s^2) = s^2 / (3 + s^2)
    # with ||mu||^2 = 3D. Baseline s^2 = 1 (RS 1/4); latents s^2 = 0.6/3.8 give RS 0.05: a ratio of 0.2.
    rng = np.random.default_rng(8)
    offset = np.sqrt(3.0) * np.ones(D)
    called, covered = 0, 0
    for _ in range(20):
        base = offset + rng.normal(size=(30, D))
        latents = offset + np.sqrt(0.6 / 3.8) * rng.normal(size=(30, 1, D))
        rows = spread_rows(latents, {"image_mean": base}, n_boot=200, seed=int(rng.integers(1000)))
        ratio = rows[rows.statistic == "spread_ratio"].iloc[0]
        called += ratio.ci_high < 0.1
        covered += ratio.ci_low <= 0.2 <= ratio.ci_high
    assert called == 0
    assert covered >= 16  # a 95% interval covers the true ratio in most runs


def test_spread_rows_pair_instances_and_check_baselines():
    rng = np.random.default_rng(9)
    latents = rng.normal(size=(10, 2, 4))
    latents[:3, 1] = np.nan
    rows = spread_rows(latents, {"image_mean": rng.normal(size=(10, 4))}, n_boot=0)
    assert rows[rows.statistic == "spread_ratio"].n.tolist() == [10, 7]
    assert rows.ci_low.isna().all()  # n_boot=0: no interval
    with pytest.raises(LatentProbeError, match="instances"):
        spread_rows(latents, {"image_mean": rng.normal(size=(9, 4))})
