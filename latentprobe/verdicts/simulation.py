"""Calibration of the verdicts by simulation: how often each rule says what, when the truth is known.

Each simulation draws per-instance outcomes from a stated truth, summarises them with the real statistics
(``effects.summarize``: exact binomial rates, paired bootstrap means, p-values) and decides with the real
rules (``verdicts.verdict_latent_answer`` / ``verdicts.decide_family``), so what is calibrated is exactly
what a run would print. Nothing here runs a model.

Two truths are checked (see ``tests/test_calibration.py``):

* under a true null (no effect in any row), `connected` should come in at most alpha of runs;
* with a true effect at twice the margin, `disconnect` should come in at most alpha of runs.

Two levels: ``family_verdict_rates`` draws a family of rows and decides it with ``decide_family`` (the real
interval and p-value code of ``effects`` on numpy arrays: fast, thousands of runs per second); and
``verdict_rates`` runs the whole path, tables included (``summarize`` then the verdict function: slower).

>>> rates = family_verdict_rates(lambda rng, m: rate_family(rng, n=80, rates=(0.0, 0.0), margins=m),
...                              n_sims=50, seed=0)
>>> rates["connected"], rates["disconnect"]
(0.0, 1.0)
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np
import pandas as pd

from ..stats.effects import _bootstrap_column_means, _percentile_interval, mean_p_value, summarize
from ..errors import LatentProbeError
from . import Margins, decide_family, verdict_input_latent, verdict_latent_answer
from .decision import RowStats, mean_row, rate_row

SUBJECT = "simulated"
WORDS = ("disconnect", "connected", "inconclusive", "not measured")


def latent_answer_effects(rng: np.random.Generator, *, n: int, flip_rate: float = 0.0, clean_accuracy: float = 0.9,
                          n_options: int = 4, n_information: int = 1, with_answer_changed: bool = True,
                          n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """The effects summary of a simulated run with ``n_information`` image-swap interventions.

    Per instance and intervention the clean answer is correct with probability ``clean_accuracy``; under the
    treated run's latents Z(x1) it changes with probability ``flip_rate``, to another of ``n_options``
    options drawn at random (so a correct answer becomes wrong, a wrong one becomes correct with probability
    1 / (n_options - 1)). The true NIE on correctness is then flip_rate x ((1 - accuracy) / (options - 1) -
    accuracy): zero at accuracy 1 / options although answers change. With ``with_answer_changed=False`` the
    table carries only NIE on correctness, as tables written before answer change was recorded.
    """
    if not 0 <= flip_rate <= 1 or not 0 <= clean_accuracy <= 1 or n_options < 2 or n < 2:
        raise LatentProbeError(f"flip_rate={flip_rate}, clean_accuracy={clean_accuracy}, n_options={n_options}, "
                               f"n={n} is not a possible simulation",
                               "use rates in [0, 1], at least 2 options and at least 2 instances")
    frames = []
    for j in range(n_information):
        correct = (rng.random(n) < clean_accuracy).astype(float)
        changed = rng.random(n) < flip_rate
        becomes_correct = (correct == 0) & (rng.random(n) < 1 / (n_options - 1))
        treated = np.where(changed, becomes_correct.astype(float), correct)
        rows = pd.DataFrame({"subject": SUBJECT, "target": "input", "intervention": f"image-swap(seed={j})",
                             "instance_id": [f"i{k}" for k in range(n)],
                             "correct_x0_z0": correct, "correct_x1_z1": correct,
                             "correct_x1_z0": correct, "correct_x0_z1": treated})
        if with_answer_changed:
            rows = rows.assign(answer_changed_x0_z0=0.0, answer_changed_x1_z1=0.0, answer_changed_x1_z0=0.0,
                               answer_changed_x0_z1=changed.astype(float))
        frames.append(rows)
    return summarize(pd.concat(frames, ignore_index=True), seed=seed, n_boot=n_boot)


def true_nie_correct(flip_rate: float, clean_accuracy: float, n_options: int = 4) -> float:
    """The NIE on correctness that ``latent_answer_effects`` simulates."""
    return flip_rate * ((1 - clean_accuracy) / (n_options - 1) - clean_accuracy)


def mean_effects(rng: np.random.Generator, *, n: int, effects: tuple[float, ...], sd: float = 0.2,
                 metric: str = "NIE_gold_prob", n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """The effects summary of a run with one row per entry of ``effects``: per-instance outcome differences
    drawn from Normal(effect, sd) and summarised by the paired bootstrap (a continuous mediation outcome such
    as the gold-answer probability)."""
    outcome = metric.split("_", 1)[1]
    frames = []
    for j, effect in enumerate(effects):
        diff = rng.normal(effect, sd, n)
        frames.append(pd.DataFrame({"subject": SUBJECT, "target": "input", "intervention": f"image-swap(seed={j})",
                                    "instance_id": [f"i{k}" for k in range(n)], f"{outcome}_x0_z0": 0.0,
                                    f"{outcome}_x1_z1": 0.0, f"{outcome}_x1_z0": 0.0, f"{outcome}_x0_z1": diff}))
    return summarize(pd.concat(frames, ignore_index=True), seed=seed, n_boot=n_boot)


def rate_family(rng: np.random.Generator, *, n: int, rates: tuple[float, ...], margins: Margins = Margins(),
                metric: str = "flip_rate") -> list[RowStats]:
    """One simulated family of answer-change rates: k ~ Binomial(n, rate) per row."""
    return [rate_row(f"row {j}", metric, int(rng.binomial(n, rate)), n, margins) for j, rate in enumerate(rates)]


def mean_family(rng: np.random.Generator, *, n: int, effects: tuple[float, ...], sd: float = 0.2,
                margins: Margins = Margins(), metric: str = "NIE_gold_prob", n_boot: int = 500) -> list[RowStats]:
    """One simulated family of means: per-instance values ~ Normal(effect, sd), summarised as ``summarize``
    does (paired bootstrap interval, the same resamples for all rows; t-test p-values)."""
    values = np.column_stack([rng.normal(effect, sd, n) for effect in effects])
    estimate, replicates = _bootstrap_column_means(values, n_boot, int(rng.integers(2 ** 31)))
    low, high = _percentile_interval(replicates, margins.alpha)
    p_values = mean_p_value(values)
    return [mean_row(f"row {j}", metric, estimate[j], low[j], high[j], n, p_values[j], margins)
            for j in range(len(effects))]


def family_verdict_rates(make_family: Callable[[np.random.Generator, Margins], list[RowStats]], *, n_sims: int = 1000,
                         seed: int = 0, margins: Margins = Margins()) -> dict[str, float]:
    """Share of ``n_sims`` simulated families that ``decide_family`` calls each word."""
    if isinstance(n_sims, bool) or not isinstance(n_sims, int) or n_sims < 1:
        raise LatentProbeError(f"n_sims={n_sims!r} is not a positive whole number", "e.g. n_sims=1000")
    rng = np.random.default_rng(seed)
    counts = Counter(decide_family(make_family(rng, margins), margins, plan=False).verdict for _ in range(n_sims))
    return {word: counts.get(word, 0) / n_sims for word in WORDS}


def verdict_rates(make_effects: Callable[[np.random.Generator], pd.DataFrame], *, n_sims: int = 200, seed: int = 0,
                  margins: Margins = Margins(), finding: str = "latent_answer") -> dict[str, float]:
    """Share of ``n_sims`` simulated runs that get each verdict word.

    ``make_effects(rng)`` returns one run's effects summary for subject ``SUBJECT``; ``finding`` is
    ``latent_answer`` or ``input_latent``.
    """
    if isinstance(n_sims, bool) or not isinstance(n_sims, int) or n_sims < 1:
        raise LatentProbeError(f"n_sims={n_sims!r} is not a positive whole number", "e.g. n_sims=200")
    judge = {"latent_answer": verdict_latent_answer, "input_latent": verdict_input_latent}.get(finding)
    if judge is None:
        raise LatentProbeError(f"no simulation for finding {finding!r}", "use latent_answer or input_latent")
    rng = np.random.default_rng(seed)
    counts = Counter(judge(make_effects(rng), SUBJECT, margins).verdict for _ in range(n_sims))
    return {word: counts.get(word, 0) / n_sims for word in WORDS}
