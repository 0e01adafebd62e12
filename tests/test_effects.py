"""Statistics of the causal analysis, checked against hand computations and simulation."""

import numpy as np
import pandas as pd
import pytest

from latentprobe.stats.effects import (answer_change_metrics, answer_flipped, kl_divergence, latent_change_metrics,
                                 mean_difference, mediation_effects, paired_bootstrap, summarize)
from latentprobe.errors import LatentProbeError


def by_metric(table: pd.DataFrame) -> pd.DataFrame:
    return table.set_index("metric")


# ------------------------------------------------------------------------------------------------ mediation

MEDIATION_TABLE = pd.DataFrame({
    "instance_id": ["a", "b", "c", "d", "e"],
    "y_x0_z0": [0.9, 0.8, 0.6, 0.7, 1.0],
    "y_x1_z1": [0.3, 0.8, 0.2, 0.7, 0.5],
    "y_x0_z1": [0.9, 0.4, 0.6, 0.3, 1.0],
    "y_x1_z0": [0.5, 0.8, 0.6, 0.7, 0.4],
})


def test_mediation_effects_equal_a_hand_computation():
    # By hand, per instance a..e:
    #   TE  = y_x1_z1 - y_x0_z0 = -0.6,  0.0, -0.4,  0.0, -0.5  -> mean -1.5 / 5 = -0.30
    #   NDE = y_x1_z0 - y_x0_z0 = -0.4,  0.0,  0.0,  0.0, -0.6  -> mean -1.0 / 5 = -0.20
    #   NIE = y_x0_z1 - y_x0_z0 =  0.0, -0.4,  0.0, -0.4,  0.0  -> mean -0.8 / 5 = -0.16
    #   interaction = TE - NDE - NIE = -0.30 + 0.20 + 0.16       =  0.06
    table = by_metric(mediation_effects(MEDIATION_TABLE, "gold_prob", seed=0, n_boot=500))
    assert list(table.index) == ["TE", "NDE", "NIE", "interaction"]
    assert table["estimate"].to_numpy() == pytest.approx([-0.30, -0.20, -0.16, 0.06])
    assert (table["n"] == 5).all() and (table["outcome"] == "gold_prob").all()
    assert (table["ci_low"] <= table["estimate"]).all() and (table["estimate"] <= table["ci_high"]).all()


def test_mediation_resamples_instances_jointly_for_all_effects():
    # Issue 18: BCa intervals (was percentile). All four effects come from one and the same set of resampled
    # instances: the intervals equal those of the four per-instance columns bootstrapped together.
    from latentprobe.stats.intervals import bca_mean_intervals

    table = by_metric(mediation_effects(MEDIATION_TABLE, "y", seed=7, n_boot=300))
    y = MEDIATION_TABLE
    columns = {"TE": y.y_x1_z1 - y.y_x0_z0, "NDE": y.y_x1_z0 - y.y_x0_z0, "NIE": y.y_x0_z1 - y.y_x0_z0}
    columns["interaction"] = columns["TE"] - columns["NDE"] - columns["NIE"]
    low, high = bca_mean_intervals(np.column_stack(list(columns.values())), 0.05, 300, 7)
    for j, effect in enumerate(columns):
        assert (table.loc[effect, "ci_low"], table.loc[effect, "ci_high"]) == pytest.approx((low[j], high[j]))


def test_mediation_drops_incomplete_instances_and_reads_prefixed_outcomes():
    df = pd.DataFrame({
        "instance_id": ["a", "b", "c"],
        "correct_x0_z0": [True, True, True], "correct_x1_z1": [False, True, None],
        "correct_x0_z1": [True, False, True], "correct_x1_z0": [False, True, True],
    })
    table = by_metric(mediation_effects(df, "correct", seed=0, n_boot=200))
    assert (table["n"] == 2).all()
    assert table.loc["TE", "estimate"] == pytest.approx(-0.5)
    with pytest.raises(LatentProbeError, match="outcome columns"):
        mediation_effects(df.drop(columns="correct_x1_z0"), "correct", seed=0)


# -------------------------------------------------------------------------------------------- the bootstrap

def test_percentile_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(123)
    true_mean, repetitions = 3.0, 200
    covered = 0
    for repetition in range(repetitions):
        sample = rng.normal(true_mean, 2.0, size=60)
        _, low, high = paired_bootstrap(sample, n_boot=1000, seed=repetition)
        covered += low <= true_mean <= high
    assert 0.90 <= covered / repetitions <= 0.99


def test_paired_columns_share_one_resample():
    # Columns vary by ~1e9 across instances but their difference is exactly 2: resampling rows jointly leaves
    # no spread at all, whereas resampling the columns separately would give an interval wider than 1e8.
    rng = np.random.default_rng(0)
    clean = rng.integers(-10**9, 10**9, size=40).astype(float)
    pairs = np.column_stack([clean, clean + 2.0])
    estimate, low, high = paired_bootstrap(pairs, statistic=mean_difference, n_boot=500, seed=1)
    assert (estimate, low, high) == (2.0, 2.0, 2.0)


def test_bootstrap_is_reproducible_and_handles_edge_cases():
    values = np.random.default_rng(5).exponential(size=30)
    assert paired_bootstrap(values, seed=3) == paired_bootstrap(values, seed=3)
    assert paired_bootstrap(values, seed=3) != paired_bootstrap(values, seed=4)
    assert paired_bootstrap(values, statistic=lambda v: np.mean(v), n_boot=200, seed=2) == pytest.approx(
        paired_bootstrap(values, n_boot=200, seed=2))  # fast path and general loop draw the same resamples
    assert paired_bootstrap(np.array([1.0, np.nan, 3.0]), n_boot=100)[0] == 2.0
    assert all(np.isnan(paired_bootstrap(np.array([]), n_boot=100)))
    with pytest.raises(LatentProbeError, match="bootstrap method"):
        paired_bootstrap(values, method="studentized")


def test_bca_interval_is_sensible_on_skewed_data():
    values = np.random.default_rng(11).exponential(scale=2.0, size=80)
    estimate, low, high = paired_bootstrap(values, n_boot=2000, seed=0, method="bca")
    _, percentile_low, percentile_high = paired_bootstrap(values, n_boot=2000, seed=0)
    assert low < estimate < high
    # Right-skewed data: BCa shifts the interval to the right of the percentile one.
    assert low >= percentile_low and high >= percentile_high
    assert high - low == pytest.approx(percentile_high - percentile_low, rel=0.25)


# ------------------------------------------------------------------------------------------- answer change

def answer_rows() -> pd.DataFrame:
    return pd.DataFrame({
        "instance_id": ["a", "b", "c", "d"],
        "clean_correct": [True, True, False, True],
        "intervened_correct": [True, False, False, False],
        "clean_parsed": ["A", "B", None, "C"],
        "intervened_parsed": ["a", "C", None, None],
        "clean_gold_prob": [0.9, 0.8, 0.1, np.nan],
        "intervened_gold_prob": [0.8, 0.2, 0.1, 0.5],
        "clean_answer_probs": [[0.5, 0.5], [1.0, 0.0], None, [0.25, 0.75]],
        "intervened_answer_probs": [[0.5, 0.5], [0.5, 0.5], [0.3, 0.7], [0.25, 0.75]],
    })


def test_answer_change_metrics_equal_a_hand_computation():
    table = by_metric(answer_change_metrics(answer_rows(), seed=0, n_boot=300))
    expected = {
        "accuracy_clean": (0.75, 4),
        "accuracy_intervened": (0.25, 4),
        "accuracy_change": (-0.5, 4),
        # a: "A" vs "a" same; b: B -> C flip; c: unparsable both sides, no flip; d: C -> unparsable, flip
        "flip_rate": (0.5, 4),
        # d has no clean gold probability: (-0.1 - 0.6 + 0.0) / 3
        "gold_prob_change": (-0.7 / 3, 3),
        # c has no clean distribution; b: KL([1, 0] || [.5, .5]) = log 2 (up to the epsilon smoothing)
        "kl_clean_to_intervened": (np.log(2) / 3, 3),
        "unparsable_rate_clean": (0.25, 4),
        "unparsable_rate_intervened": (0.5, 4),
    }
    for metric, (estimate, n) in expected.items():
        assert table.loc[metric, "estimate"] == pytest.approx(estimate, abs=1e-4), metric
        assert table.loc[metric, "n"] == n, metric
        assert table.loc[metric, "ci_low"] - 1e-4 <= estimate <= table.loc[metric, "ci_high"] + 1e-4, metric


def test_rows_of_one_instance_are_averaged_before_resampling():
    rows = answer_rows().iloc[[0, 1]]
    repeated = pd.concat([rows, rows.iloc[[1]]], ignore_index=True)  # instance b run with two noise seeds
    repeated.loc[2, "intervened_correct"] = True
    table = by_metric(answer_change_metrics(repeated, seed=0, n_boot=200))
    assert table.loc["accuracy_intervened", "estimate"] == pytest.approx((1.0 + 0.5) / 2)
    assert table.loc["accuracy_intervened", "n"] == 2


def test_unrecorded_metrics_have_no_instances_and_missing_answers_are_rejected():
    rows = answer_rows().drop(columns=["clean_gold_prob", "clean_answer_probs"])
    table = by_metric(answer_change_metrics(rows, seed=0, n_boot=100))
    assert table.loc["gold_prob_change", "n"] == 0 and np.isnan(table.loc["gold_prob_change", "estimate"])
    with pytest.raises(LatentProbeError, match="intervened_parsed"):
        answer_change_metrics(rows.drop(columns="intervened_parsed"), seed=0)


def test_flip_and_kl_rules():
    assert not answer_flipped(np.nan, None) and answer_flipped(pd.NA, "B") and not answer_flipped("B", "b")
    assert kl_divergence([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0)
    assert np.isfinite(kl_divergence([0.5, 0.5], [1.0, 0.0]))  # epsilon keeps a zero probability finite
    assert np.isnan(kl_divergence(None, [0.5, 0.5]))
    with pytest.raises(LatentProbeError, match="same answer candidates"):
        kl_divergence([0.5, 0.5], [0.2, 0.3, 0.5])


# ------------------------------------------------------------------------------------------- latent change

def latent_batch(seed: int = 0, instances: int = 40, steps: int = 3, dim: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(instances, steps, dim))


def test_identical_latents_do_not_change():
    clean = latent_batch()
    table = latent_change_metrics(clean, clean.copy(), seed=0, n_boot=200)
    for metric, value in {"cosine": 1.0, "relative_l2": 0.0, "change_ratio": 0.0}.items():
        rows = table[table["metric"] == metric]
        assert rows["estimate"].to_numpy() == pytest.approx([value] * 3, abs=1e-12)
        assert rows["ci_high"].to_numpy() - rows["ci_low"].to_numpy() == pytest.approx([0.0] * 3, abs=1e-12)
    assert set(table.columns) == {"step", "metric", "estimate", "ci_low", "ci_high", "n", "k", "p_value", "interval",
                                  "confidence"}


def test_swapping_in_another_instance_gives_change_ratio_near_one():
    clean = latent_batch(instances=60)
    swapped = np.roll(clean, 1, axis=0)  # every instance gets its neighbour's latents
    table = latent_change_metrics(clean, swapped, seed=0, n_boot=200)
    ratio = table[table["metric"] == "change_ratio"]
    assert ratio["estimate"].to_numpy() == pytest.approx([1.0] * 3, abs=0.1)
    assert (ratio["ci_low"] < 1.0).all() and (ratio["ci_high"] > 1.0).all()
    spread = table[table["metric"] == "inter_instance_cosine"]["estimate"]
    assert spread.abs().max() < 0.1  # independent gaussian latents are near-orthogonal


def test_small_noise_gives_a_small_ratio():
    clean = latent_batch()
    noisy = clean + 0.05 * np.random.default_rng(1).normal(size=clean.shape)
    ratio = latent_change_metrics(clean, noisy, seed=0, n_boot=100).query("metric == 'change_ratio'")
    assert ((ratio["estimate"] > 0.01) & (ratio["estimate"] < 0.1)).all()


def test_missing_steps_are_left_out():
    clean = latent_batch(instances=10, steps=3)
    intervened = clean + 0.1
    clean[0, 1] = np.nan            # instance 0 never reached step 1
    intervened[1, 1] = np.nan       # instance 1 stopped earlier under the intervention
    clean[:, 2] = np.nan            # nobody reached step 2
    mask = np.ones((10, 3), dtype=bool)
    mask[2, 0] = False              # excluded by the caller
    table = latent_change_metrics(clean, intervened, step_mask=mask, seed=0, n_boot=100)
    n = table.pivot(index="step", columns="metric", values="n")
    assert n.loc[0, "cosine"] == 9 and n.loc[0, "inter_instance_relative_l2"] == 9
    assert n.loc[1, "cosine"] == 8 and n.loc[1, "inter_instance_relative_l2"] == 9
    assert (n.loc[2] == 0).all()
    assert table[table["step"] == 2][["estimate", "ci_low", "ci_high"]].isna().all().all()
    assert table[table["step"] < 2]["estimate"].notna().all()
    with pytest.raises(LatentProbeError, match="step_mask"):
        latent_change_metrics(clean, intervened, step_mask=mask[:, :2])


# ---------------------------------------------------------------------------------------------- summarize

def test_summarize_produces_the_tidy_contract():
    rows = answer_rows().assign(subject="tiny", target="latent", intervention="noise")
    other = answer_rows().assign(subject="tiny", target=None, intervention="blank_image")
    both = pd.concat([rows, other], ignore_index=True)
    both["correct_x0_z0"] = both["clean_correct"]
    both["correct_x1_z1"] = both["intervened_correct"]
    both["correct_x0_z1"] = both["clean_correct"]
    both["correct_x1_z0"] = both["intervened_correct"]
    table = summarize(both, seed=0, n_boot=100)
    assert list(table.columns) == ["subject", "target", "intervention", "metric", "estimate", "ci_low", "ci_high",
                                   "n", "k", "p_value", "interval", "mediator", "confidence"]
    assert (table["confidence"] == 0.95).all()
    assert set(table["intervention"]) == {"noise", "blank_image"}
    assert table[table["intervention"] == "blank_image"]["target"].isna().all()
    noise = table[table["intervention"] == "noise"].set_index("metric")
    assert noise.loc["accuracy_change", "estimate"] == pytest.approx(-0.5)
    assert noise.loc["TE_correct", "estimate"] == pytest.approx(-0.5)
    assert noise.loc["NIE_correct", "estimate"] == pytest.approx(0.0)
    assert summarize(both, seed=0, n_boot=100).equals(table)


def test_summarize_explains_what_is_missing():
    with pytest.raises(LatentProbeError, match="subject"):
        summarize(answer_rows(), n_boot=10)
    with pytest.raises(LatentProbeError, match="neither"):
        summarize(pd.DataFrame({"subject": ["s"], "target": ["t"], "intervention": ["i"]}), n_boot=10)


# ------------------------------------------------------------------------------------- exact rates, p-values

def test_zero_flips_get_the_exact_clopper_pearson_upper_bound_not_zero():
    """0 of 20 answers changed: the bootstrap of zeros said [0, 0]; the exact 95% upper bound is 0.168."""
    from scipy.stats import binomtest

    rows = pd.DataFrame({"instance_id": [f"i{k}" for k in range(20)], "clean_correct": True,
                         "intervened_correct": True, "clean_parsed": "A", "intervened_parsed": "A"})
    table = answer_change_metrics(rows, seed=0, n_boot=200).set_index("metric")
    flip = table.loc["flip_rate"]
    assert flip.estimate == 0 and flip.ci_low == 0 and flip.k == 0 and flip.n == 20
    assert flip.ci_high == pytest.approx(0.16843347, abs=1e-6)
    assert flip.interval == "clopper-pearson" and flip.p_value == 1.0
    rows.loc[:2, "intervened_parsed"] = "B"  # 3 of 20
    flip = answer_change_metrics(rows, seed=0, n_boot=200).set_index("metric").loc["flip_rate"]
    oracle = binomtest(3, 20).proportion_ci(method="exact")
    assert (flip.k, flip.ci_low, flip.ci_high) == (3, pytest.approx(oracle.low), pytest.approx(oracle.high))
    # The other metrics keep the bootstrap (BCa since issue 18).
    assert table.loc["accuracy_change", "interval"] == "BCa bootstrap"


def test_fractional_flips_of_averaged_seeds_get_the_cluster_exact_interval():
    """Issue 18: several seeds per instance keep the instance as the unit (was a percentile bootstrap of a few
    nonzero fractions, which affirmed `disconnect` at twice the margin in 16% of runs at n = 12)."""
    from scipy.stats import beta

    rows = pd.DataFrame({"instance_id": ["a", "a", "b", "b"], "clean_correct": True, "intervened_correct": True,
                         "clean_parsed": "A", "intervened_parsed": ["A", "B", "A", "A"]})
    flip = answer_change_metrics(rows, seed=0, n_boot=200).set_index("metric").loc["flip_rate"]
    assert flip.interval == "clopper-pearson (instances as units)" and flip.estimate == pytest.approx(0.25)
    assert (flip.k, flip.n) == (0.5, 2) and flip.ci_high == pytest.approx(beta.ppf(0.975, 1.5, 1.5))


def test_answer_changed_mediation_effects_are_exact_rates():
    from scipy.stats import binomtest

    n = 30
    changed_x0_z1 = (np.arange(n) < 6).astype(float)  # NIE: 6 of 30 answers change with the treated latents
    df = pd.DataFrame({"instance_id": [f"i{k}" for k in range(n)], "answer_changed_x0_z0": 0.0,
                       "answer_changed_x1_z1": 1.0, "answer_changed_x0_z1": changed_x0_z1,
                       "answer_changed_x1_z0": 0.0})
    table = mediation_effects(df, "answer_changed", seed=0, n_boot=200).set_index("metric")
    oracle = binomtest(6, n).proportion_ci(method="exact")
    assert table.loc["NIE", "k"] == 6 and table.loc["NIE", "ci_high"] == pytest.approx(oracle.high)
    assert table.loc["NDE", "ci_high"] == pytest.approx(binomtest(0, n).proportion_ci(method="exact").high)
    assert "interaction" not in table.index  # issue 18: rates of changed answers do not add up


def test_summary_p_values_agree_with_the_interval_and_a_t_test():
    rng = np.random.default_rng(3)
    far = pd.DataFrame({"y": rng.normal(1.0, 1.0, 60)})
    near = pd.DataFrame({"y": rng.normal(0.0, 1.0, 60)})
    from latentprobe.stats.effects import _summarise_matrix

    far_row, near_row = _summarise_matrix(far, 2000, 0, 0.05).iloc[0], _summarise_matrix(near, 2000, 0, 0.05).iloc[0]
    from scipy.stats import ttest_1samp

    # issue 18: a sign-flip permutation p-value (holds its level on skewed outcomes); on normal data it agrees
    # with the t-test up to Monte Carlo error
    assert near_row.p_value == pytest.approx(ttest_1samp(near.y, 0).pvalue, abs=0.05)
    assert far_row.p_value < 0.01 and far_row.ci_low > 0
    assert near_row.p_value > 0.05 and near_row.ci_low < 0 < near_row.ci_high
    zeros = _summarise_matrix(pd.DataFrame({"y": np.zeros(10)}), 200, 0, 0.05).iloc[0]
    assert zeros.p_value == 1.0


def test_unapplied_rows_are_left_out_of_summaries():
    rows = answer_rows().assign(subject="tiny", target="latent", intervention="noise")
    rows["applied"] = [True] * (len(rows) - 1) + [False]
    table = summarize(rows, seed=0, n_boot=50).set_index("metric")
    assert table.loc["flip_rate", "n"] == rows.instance_id[rows.applied].nunique()


def test_bootstrap_p_value_is_the_level_at_which_the_interval_excludes_the_null():
    from latentprobe.stats.effects import _bootstrap_p_value

    replicates = np.column_stack([np.linspace(-1, 3, 1001), np.zeros(1001), np.full(1001, np.nan)])
    p = _bootstrap_p_value(replicates)
    assert p[0] == pytest.approx(2 * 252 / 1002, abs=1e-9)  # 251 replicates <= 0, plus one
    assert p[1] == 1.0 and np.isnan(p[2])


@pytest.mark.parametrize("n_boot", [0, -5, 2.5, float("nan"), True])
def test_bootstrap_refuses_a_resample_count_that_is_not_a_whole_number_above_zero(n_boot):
    from latentprobe.stats.effects import paired_bootstrap
    from latentprobe.errors import LatentProbeError

    with pytest.raises(LatentProbeError, match="resamples"):
        paired_bootstrap(np.arange(10.0), n_boot=n_boot)
