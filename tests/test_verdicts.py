"""Verdict rules: equivalence (TOST-style), intersection-union for disconnect, Holm for connected, information vs
disruption edits, margins, planning numbers, and the failure cases reported in issue 9."""

import math

import numpy as np
import pandas as pd
import pytest

from latentprobe.errors import LatentProbeError
from latentprobe.verdicts import (VERDICT_COLUMNS, VOCABULARY, Margins, all_verdicts, clopper_pearson, edit_role,
                                  needed_n_rate_equivalence, verdict_input_latent, verdict_latent_answer)
from latentprobe.verdicts import verdict_table
from latentprobe.verdicts.decision import holm, mean_row, rate_row, decide_family


def effect(subject, target, intervention, metric, estimate, low, high, n=80, **extra):
    return dict(subject=subject, target=target, intervention=intervention, metric=metric, estimate=estimate,
                ci_low=low, ci_high=high, n=n, **extra)


def rate(subject, target, intervention, metric, k, n, **extra):
    low, high = clopper_pearson(k, n, 0.05)
    return effect(subject, target, intervention, metric, k / n, low, high, n, k=k, interval="clopper-pearson", **extra)


# ------------------------------------------------------------------------------------------------- pieces

def test_clopper_pearson_equals_scipy_binomtest():
    from scipy.stats import binomtest

    for n in (1, 7, 20, 80):
        for k in sorted({0, 1, n // 3, n - 1, n}):
            oracle = binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
            assert clopper_pearson(k, n, 0.1) == (pytest.approx(oracle.low, abs=1e-10),
                                                  pytest.approx(oracle.high, abs=1e-10))


def test_holm_equals_statsmodels():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(0)
    for size in (1, 3, 8):  # few cases: multipletests runs a full garbage collection per call (about 1 s here)
        p = rng.random(size) ** 3
        p[-1] = p[0]  # ties
        reject, adjusted = holm(p, 0.05)
        oracle = multipletests(p, alpha=0.05, method="holm")
        assert (reject == oracle[0]).all() and np.allclose(adjusted, oracle[1])


def test_needed_n_for_zero_events_is_the_exact_bound_and_grows_with_the_rate():
    assert needed_n_rate_equivalence(0.0, 0.05, 0.05, 0.8) == 72  # 1 - 0.025^(1/72) < 0.05 <= 1 - 0.025^(1/71)
    assert 1 - 0.025 ** (1 / 72) < 0.05 <= 1 - 0.025 ** (1 / 71)
    n = needed_n_rate_equivalence(0.01, 0.05, 0.05, 0.8)
    assert 72 < n < 1000
    # oracle: at that n, simulated runs with true rate 0.01 reach an upper bound < 0.05 about 80% of the time
    rng = np.random.default_rng(0)
    hits = np.mean([clopper_pearson(k, n, 0.05)[1] < 0.05 for k in rng.binomial(n, 0.01, 400)])
    assert hits >= 0.74
    assert math.isinf(needed_n_rate_equivalence(0.06, 0.05, 0.05, 0.8))


@pytest.mark.parametrize("bad", [dict(answer_change=0), dict(answer_change=-0.1), dict(answer_change=float("nan")),
                                 dict(alpha=0), dict(alpha=0.7), dict(power=1.0), dict(change_ratio=float("inf")),
                                 dict(correctness=1.5), dict(kl="0.1"),
                                 dict(visual_info=1.0), dict(gold_prob=float("-inf"))])
def test_margins_refuse_impossible_values(bad):
    with pytest.raises(LatentProbeError):
        Margins(**bad)


def test_margins_map_metrics_to_their_margin():
    margins = Margins(answer_change=0.02, correctness=0.07, gold_prob=0.03, change_ratio=0.3)
    assert margins.for_metric("flip_rate") == 0.02 and margins.for_metric("NIE_answer_changed") == 0.02
    assert margins.for_metric("NIE_correct") == 0.07 and margins.for_metric("accuracy_change") == 0.07
    assert margins.for_metric("NDE_gold_prob") == 0.03 and margins.for_metric("change_ratio@step2") == 0.3
    with pytest.raises(LatentProbeError):
        margins.for_metric("latent_cosine")


def test_edit_roles():
    assert edit_role("patch(steps=all,sem=recompute)") == edit_role("image-swap") == edit_role("text-swap") == \
        "information"
    for name in ("noise(scale=3,rel=std,steps=all,sem=recompute)", "constant(value=mean,steps=all,sem=pin)",
                 "zero(steps=0,sem=recompute)", "drop(keep=0)", "shuffle", "image-blank(colour=gray)",
                 "image-noise(level=0.5)", "text-shuffle"):
        assert edit_role(name) == "disruption", name


# ---------------------------------------------------------------------------------------------- decisions

def test_equivalence_needs_the_whole_interval_inside_the_margin():
    margins = Margins()
    inside = mean_row("a", "NIE_gold_prob", 0.01, -0.03, 0.04, 80, 0.5, margins)
    straddles = mean_row("b", "NIE_gold_prob", 0.01, -0.03, 0.06, 80, 0.5, margins)
    assert decide_family([inside], margins).verdict == "disconnect"
    assert decide_family([straddles], margins).verdict == "inconclusive"
    # intersection-union: one undecided row keeps the family from disconnect
    assert decide_family([inside, straddles], margins).verdict == "inconclusive"


def test_connected_needs_a_lower_bound_above_the_margin_after_bonferroni():
    """Issue 18: `connected` is a minimum-effect test (the effect is larger than negligible), not "nonzero"."""
    margins = Margins()
    nonzero = mean_row("a", "NIE_gold_prob", 0.1, 0.01, 0.2, 80, 0.02, margins)  # differs from 0, not from 0.05
    decision = decide_family([nonzero], margins)
    assert decision.verdict == "inconclusive" and "nonzero but below the margin" in decision.reason
    large = mean_row("a", "NIE_gold_prob", 0.2, 0.12, 0.28, 80, 0.001, margins)
    assert decide_family([large], margins).verdict == "connected"
    # among five null rows the bound is taken at alpha / 6 (Bonferroni): 0.2 - 0.08 x z(1 - 0.05/6)/z(0.975)
    nulls = [mean_row(f"n{j}", "NIE_gold_prob", 0.0, -0.2, 0.2, 80, 0.9, margins) for j in range(5)]
    decision = decide_family([large, *nulls], margins)
    from scipy.stats import norm

    assert decision.rows[0].connect_bound == pytest.approx(0.2 - 0.08 * norm.ppf(1 - 0.05 / 6) / norm.ppf(0.975))
    assert decision.verdict == "connected"
    barely = mean_row("b", "NIE_gold_prob", 0.12, 0.06, 0.18, 80, 0.001, margins)
    assert decide_family([barely], margins).verdict == "connected"
    assert decide_family([barely, *nulls], margins).verdict == "inconclusive"


def test_a_tiny_effect_inside_the_margin_is_a_disconnect():
    margins = Margins()
    tiny = rate_row("a", "flip_rate", 3, 3000, margins)  # nonzero, but the interval is far below 0.05
    decision = decide_family([tiny], margins)
    assert decision.verdict == "disconnect" and "nonzero but below the margin" in decision.reason


def test_a_negligible_true_rate_is_never_connected_and_the_placebo_is_subtracted():
    """Issue 18: 1 of 80 changed answers (or a true rate of 0.01) was `connected` under "the rate is 0"."""
    margins = Margins()
    assert decide_family([rate_row("a", "flip_rate", 1, 80, margins)], margins).verdict == "inconclusive"
    assert decide_family([rate_row("a", "flip_rate", 2, 200, margins)], margins).verdict != "connected"
    # 20 of 80 changed under the edit, 18 of 80 under the placebo (GPU noise): not an effect beyond noise
    noisy = rate_row("a", "flip_rate", 20, 80, margins, placebo_k=18, placebo_n=80)
    assert noisy.estimate == pytest.approx(0.025) and decide_family([noisy], margins).verdict == "inconclusive"
    assert decide_family([rate_row("a", "flip_rate", 20, 80, margins)], margins).verdict == "connected"


# ----------------------------------------------------------------------------------- issue 9 failure cases

def test_nie_interval_reaching_past_the_margin_without_flip_rows_is_not_a_disconnect():
    """Was "supported" (an .all() over the empty set of flip rows)."""
    table = pd.DataFrame([effect("s", "input", "image-swap", "NIE_correct", -0.30, -0.65, 0.02, n=20)])
    verdict = verdict_latent_answer(table, "s")
    assert verdict.verdict == "inconclusive"
    assert verdict.needed_n is not None and verdict.needed_n > 20


def test_zero_of_twenty_flips_is_inconclusive_with_the_exact_bound_and_the_needed_n():
    table = pd.DataFrame([rate("s", "latent", "patch(steps=all,sem=recompute)", "flip_rate", 0, 20)])
    verdict = verdict_latent_answer(table, "s")
    assert verdict.verdict == "inconclusive"
    assert verdict.ci_high == pytest.approx(0.1684, abs=1e-4) and verdict.n == 20
    assert verdict.needed_n == 72
    # 80 instances without a change: the exact bound 0.045 is inside the margin
    table = pd.DataFrame([rate("s", "latent", "patch(steps=all,sem=recompute)", "flip_rate", 0, 80)])
    assert verdict_latent_answer(table, "s").verdict == "disconnect"


def test_answers_changing_both_ways_are_connected_although_accuracy_is_flat():
    """30% of answers change, correctness moves both ways (mean ~0): was "supported" in 193/200."""
    table = pd.DataFrame([
        rate("s", "input", "image-swap", "NIE_answer_changed", 24, 80, mediator="fed_back"),
        effect("s", "input", "image-swap", "NIE_correct", 0.0, -0.1, 0.1, mediator="fed_back"),
        effect("s", "latent", "patch(steps=all,sem=recompute)", "accuracy_change", 0.0, -0.04, 0.04),
    ])
    verdict = verdict_latent_answer(table, "s")
    assert verdict.verdict == "connected" and verdict.estimate == pytest.approx(0.3)


def test_mirage_like_subject_is_disrupted_but_not_connected():
    """NIE 0 and patching moves nothing, yet noise and constants break it: disconnect, disruption reported."""
    table = pd.DataFrame([
        rate("mirage", "latent", "patch(steps=all,sem=recompute)", "flip_rate", 0, 80),
        rate("mirage", "input", "image-swap", "NIE_answer_changed", 0, 80, mediator="fed_back"),
        rate("mirage", "latent", "noise(scale=3,rel=std,steps=all,sem=recompute)", "flip_rate", 37, 80),
        rate("mirage", "latent", "constant(value=mean,steps=all,sem=recompute)", "flip_rate", 65, 80),
    ])
    # issue 18: a disconnect needs the all_layers mediator inside the margin too
    undecided = verdict_latent_answer(table, "mirage")
    assert undecided.verdict == "inconclusive" and "all_layers mediator" in undecided.evidence
    table = pd.concat([table, pd.DataFrame([rate("mirage", "input", "image-swap", "NIE_answer_changed", 0, 80,
                                                 mediator="all_layers")])], ignore_index=True)
    verdict = verdict_latent_answer(table, "mirage")
    assert verdict.verdict == "disconnect" and verdict.details["mediator"] == "fed_back+all_layers"
    assert verdict.details["disruption"] == "connected" and "Disruption" in verdict.evidence
    assert verdict.evidence.startswith("0 of 80 answers changed under")
    # with only the disruption edits, the information claim is undecided, never connected
    only_disruption = verdict_latent_answer(table[table.intervention.str.startswith(("noise", "constant"))], "mirage")
    assert only_disruption.verdict == "inconclusive" and "information edit" in only_disruption.evidence


def test_disconnect_needs_both_mediator_definitions_and_says_which_decided():
    """Issue 18: the paper's latent reasoning includes what the latent positions read in upper layers: a
    fed_back NIE of 0 with an all_layers NIE of 30/80 is `connected` through the all_layers definition."""
    table = pd.DataFrame([
        rate("s", "input", "image-swap", "NIE_answer_changed", 0, 80, mediator="fed_back"),
        rate("s", "input", "image-swap", "NIE_answer_changed", 30, 80, mediator="all_layers"),
    ])
    verdict = verdict_latent_answer(table, "s")
    assert verdict.verdict == "connected" and verdict.details["mediator"] == "all_layers"
    assert "all_layers" in verdict.evidence


def test_no_interaction_row_for_answer_change_and_placebo_rows_are_floors():
    from latentprobe.effects import mediation_effects

    n = 40
    df = pd.DataFrame({"instance_id": [f"i{k}" for k in range(n)], "answer_changed_x0_z0": 0.0,
                       "answer_changed_x1_z1": 1.0, "answer_changed_x0_z1": (np.arange(n) < 4).astype(float),
                       "answer_changed_x1_z0": 0.0})
    assert "interaction" not in set(mediation_effects(df, "answer_changed", seed=0, n_boot=50).metric)
    table = pd.DataFrame([rate("s", "latent", "patch", "flip_rate", 30, 80),
                          rate("s", "latent", "placebo(steps=all)", "flip_rate", 28, 80)])
    verdict = verdict_latent_answer(table, "s")
    assert verdict.verdict == "inconclusive" and "placebo 0.350 subtracted" in verdict.evidence
    assert verdict_table([verdict]).placebo.iloc[0] == pytest.approx(0.35)


def test_unapplied_rows_are_not_evidence():
    table = pd.DataFrame([
        rate("s", "latent", "patch(steps=all,sem=recompute)", "flip_rate", 0, 80, applied=True),
        rate("s", "latent", "patch(steps=0,sem=recompute)", "flip_rate", 40, 80, applied=False),
    ])
    assert verdict_latent_answer(table, "s").verdict == "disconnect"
    # read back from text, the flag is a string: "False" must still mean not applied
    assert verdict_latent_answer(table.assign(applied=table.applied.map(str)), "s").verdict == "disconnect"


def test_input_latent_decides_on_the_pooled_r2_of_information_edits_only():
    """Issue 18: the old change_ratio rows decide nothing; pooled R2 rows (step NaN) of image/question swaps do,
    and a blank image (a disruption edit, 6-88x the spread in the review) is reported, never deciding."""
    old = [effect("s", "input", "image-swap", "change_ratio@step0", 0.05, 0.03, 0.08, p_value=0.0)]
    assert verdict_input_latent(pd.DataFrame(old), "s").verdict == "not measured"
    rows = [effect("s", "input", "image-swap", "latent_r2", 0.05, -0.02, 0.12, step=float("nan"), n=40),
            effect("s", "input", "image-swap", "latent_r2", 0.9, 0.8, 1.0, step=0, n=40),
            effect("s", "input", "image-blank", "latent_r2", 5.0, 4.0, 6.0, step=float("nan"), n=40)]
    verdict = verdict_input_latent(pd.DataFrame(rows), "s")
    assert verdict.verdict == "disconnect" and verdict.details["disruption"] == "connected"
    assert verdict_input_latent(pd.DataFrame(rows), "s", Margins(latent_r2=0.1)).verdict == "inconclusive"


def test_all_verdicts_table_has_the_vocabulary_and_evidence_columns():
    table = pd.DataFrame([rate("s", "latent", "patch(steps=all,sem=recompute)", "flip_rate", 0, 12)])
    verdicts = all_verdicts(["s", "other"], effects=table)
    assert list(verdicts.columns) == VERDICT_COLUMNS
    assert list(verdicts.columns[:3]) == ["subject", "finding", "verdict"]
    for row in verdicts.itertuples():
        assert row.verdict in VOCABULARY[row.finding]
    shortcut = verdicts.set_index(["subject", "finding"]).loc[("s", "latent_answer")]
    assert shortcut.verdict == "inconclusive" and shortcut.needed_n == 72 and shortcut.margin == 0.05
    assert set(verdicts[verdicts.subject == "other"].verdict) == {"not measured"}


def test_a_row_without_interval_or_p_value_is_no_evidence_of_an_effect():
    row = mean_row("x", "NIE_gold_prob", 0.3, math.nan, math.nan, 2, math.nan, Margins())
    assert math.isnan(row.p_value)
    assert decide_family([row], Margins()).verdict == "inconclusive"


def test_a_stored_interval_is_used_at_the_verdicts_alpha():
    from latentprobe.verdicts.decision import row_stats

    # a 95% interval inside the margin 0.05, which a 99% verdict must not read as its own
    stored = pd.Series(dict(metric="NIE_gold_prob", estimate=0.0, ci_low=-0.04, ci_high=0.04, n=100, p_value=1.0,
                            interval="percentile bootstrap", confidence=0.95))
    assert row_stats(stored, Margins(), "x").equivalent
    strict = row_stats(stored, Margins(alpha=0.01), "x")
    assert not strict.equivalent and strict.ci_high == pytest.approx(0.04 * 2.5758 / 1.95996, rel=1e-4)
    assert not row_stats(stored.drop("confidence"), Margins(alpha=0.01), "x").equivalent  # no column: 95%
    at_99 = stored.copy()
    at_99["confidence"] = 0.99
    assert row_stats(at_99, Margins(alpha=0.01), "x").ci_high == 0.04


def test_a_mean_of_one_instance_decides_nothing():
    from latentprobe.stats.effects import mean_p_value

    assert math.isnan(mean_p_value(np.array([[0.3]]))[0])
    for value in (0.3, 0.01):  # zero-width interval from one instance: neither an effect nor inside the margin
        row = mean_row("x", "NIE_gold_prob", value, value, value, 1, 0.0, Margins())
        assert decide_family([row], Margins()).verdict == "inconclusive"



def test_input_latent_not_measured_says_why_in_the_users_words():
    """A plain model's input edits ran but measured no mediator; a subject with no input edit is another case;
    neither message may point at the project's issue numbers."""
    from latentprobe.verdicts.causal import verdict_input_latent

    effects = pd.DataFrame({"subject": ["plain"], "target": ["input"], "intervention": ["image-swap"],
                            "metric": ["flip_rate"], "estimate": [0.1], "ci_low": [0.0], "ci_high": [0.2], "n": [80]})
    ran = verdict_input_latent(effects, "plain")
    absent = verdict_input_latent(effects, "someone-else")
    assert ran.verdict == absent.verdict == "not measured"
    assert "plain model" in ran.evidence and absent.evidence == "no input edit ran for this subject"
    assert "issue" not in ran.evidence + absent.evidence
