"""The visual-information verdict: positive evidence for 'limited', Holm over attributes for 'informative'."""

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from latentprobe.errors import LatentProbeError
from latentprobe.stats.probes import probe_table
from latentprobe.verdicts.base import NOT_MEASURED
from latentprobe.verdicts.visual_info import verdict_visual_info

FAST = dict(n_splits=4, alphas=(1.0, 100.0), n_permutations=49, n_boot=400)


def study(latent_strength, image_strength, n=200, seed=0, attributes=("colour",)):
    rng = np.random.default_rng(seed)
    tables = []
    for index, attribute in enumerate(attributes):
        labels = rng.permutation(np.arange(n) % 2)
        direction = 2 * labels - 1
        latent = {(layer, step): rng.normal(size=(n, 8)) for layer in range(2) for step in range(3)}
        latent[(1, 2)][:, 0] += latent_strength * direction
        image = {(layer, -1): rng.normal(size=(n, 8)) for layer in range(2)}
        image[(1, -1)][:, 0] += image_strength * direction
        for representation, features in (("latent", latent), ("image_mean", image)):
            tables.append(probe_table(features, labels, np.arange(n), subject="s", representation=representation,
                                      attribute=attribute, seed=seed + index, **FAST))
    return pd.concat(tables, ignore_index=True)


def test_latents_that_carry_the_attribute_are_informative():
    verdict = verdict_visual_info(study(latent_strength=3.0, image_strength=3.0), "s")
    assert verdict.verdict == "informative" and verdict.ci_low > 0.1
    assert verdict.details["attributes"]["colour"]["cell"] == "1/2"


def test_limited_needs_a_tight_interval_and_a_readable_image_baseline():
    verdict = verdict_visual_info(study(latent_strength=0.0, image_strength=3.0, n=400), "s")
    assert verdict.verdict == "limited" and verdict.ci_high < 0.1
    # The same null latents, but the image tokens cannot be read either: nothing shows the probe could work.
    unreadable = verdict_visual_info(study(latent_strength=0.0, image_strength=0.0, n=400), "s")
    assert unreadable.verdict == "inconclusive"
    # A low estimate from few instances is not evidence of little information.
    small = verdict_visual_info(study(latent_strength=0.0, image_strength=3.0, n=40), "s")
    assert small.verdict == "inconclusive" and small.ci_high > 0.1 and small.needed_n > 40


def test_noise_latents_are_never_called_informative():
    for seed in range(4):
        assert verdict_visual_info(study(0.0, 3.0, n=60, seed=seed), "s").verdict != "informative"


def nested_row(attribute, selectivity, low, high, p, representation="latent"):
    return {"subject": "s", "representation": representation, "attribute": attribute, "selection": "nested",
            "layer": 0, "step": 0, "selectivity": selectivity, "selectivity_ci_low": low, "selectivity_ci_high": high,
            "p_value": p, "n": 100, "n_permutations": 199, "confidence": 0.95, "skipped_reason": ""}


def test_informative_needs_the_holm_adjusted_p_value():
    p_values = [0.03, 0.04]
    rows = [nested_row(a, 0.3, 0.15, 0.45, p) for a, p in zip("ab", p_values)]
    rows += [nested_row(a, 0.5, 0.4, 0.6, 0.005, "image_mean") for a in "ab"]
    verdict = verdict_visual_info(pd.DataFrame(rows), "s")
    holm = multipletests(p_values, method="holm")[1]
    assert [verdict.details["attributes"][a]["p_holm"] for a in "ab"] == pytest.approx(holm)
    assert (holm >= 0.05).all() and verdict.verdict == "inconclusive"
    rows[0]["p_value"] = 0.01  # Holm: 0.02 and 0.04, both below 0.05
    assert verdict_visual_info(pd.DataFrame(rows), "s").verdict == "informative"
    # One informative attribute makes the subject informative, whatever the others say.
    rows[1].update(selectivity=0.0, selectivity_ci_low=-0.05, selectivity_ci_high=0.05)
    assert verdict_visual_info(pd.DataFrame(rows), "s").verdict == "informative"


def test_missing_tables_are_not_measured_and_bad_arguments_are_errors():
    assert verdict_visual_info(None, "s").verdict == NOT_MEASURED
    rows = pd.DataFrame([nested_row("a", 0.0, -0.05, 0.05, 0.5)])
    assert verdict_visual_info(rows, "other").verdict == NOT_MEASURED
    assert verdict_visual_info(rows.drop(columns=["selection"]), "s").verdict == NOT_MEASURED
    assert verdict_visual_info(rows.assign(representation="image_mean"), "s").verdict == NOT_MEASURED
    for bad in (dict(margin=-0.1), dict(margin=np.inf), dict(margin=1.0), dict(margin=np.nan), dict(alpha=0.7)):
        with pytest.raises(LatentProbeError):
            verdict_visual_info(rows, "s", **bad)
    with pytest.raises(LatentProbeError, match="too narrow"):
        verdict_visual_info(rows.assign(confidence=0.6), "s")
