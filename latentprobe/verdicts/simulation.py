"""Calibration of the verdicts by simulation: how often each rule says what, when the truth is known.

Each simulation draws per-instance outcomes from a stated truth, summarises them with the real statistics
(``effects.summarize``: exact binomial rates, paired bootstrap means, p-values) and decides with the real
rules (``verdicts.verdict_latent_answer`` / ``verdicts.decide_family``), so what is calibrated is exactly
what a run would print. Nothing here runs a model.

Two truths are checked (see ``tests/test_calibration.py``):

* under a true null (no effect in any row, or one smaller than the margin), `connected` should come in at most
  alpha of runs;
* with a true effect at twice the margin, `disconnect` should come in at most alpha of runs (2.5% at the margin).

Issue 18 adds the hard cases (``scenarios``): skewed rare-event outcomes, several seeds per instance, GPU
batch-layout noise against a placebo, anisotropic and offset geometry for input_latent and collapse, and the
control-task imbalance for visual_info; ``analyses/calibration.py`` prints every rule's error rate under each.

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

import math

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from ..stats.effects import summarize
from .causal import verdict_input_latent, verdict_latent_answer
from .decision import RowStats, decide_family, mean_row, rate_row
from .margins import Margins

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
    does (BCa intervals, the same resamples for all rows; sign-flip p-values)."""
    from ..stats.intervals import bca_mean_intervals, sign_flip_p_values

    values = np.column_stack([rng.normal(effect, sd, n) for effect in effects])
    seed = int(rng.integers(2 ** 31))
    low, high = bca_mean_intervals(values, margins.alpha, n_boot, seed)
    p_values = sign_flip_p_values(values, 200, seed)
    return [mean_row(f"row {j}", metric, float(values[:, j].mean()), low[j], high[j], n, p_values[j], margins)
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


# ------------------------------------------------------------------------------------ issue 18: the hard cases

def skewed_values(rng: np.random.Generator, n: int, mean: float, *, rare: float = 0.1, jump: float = 0.3) -> np.ndarray:
    """Per-instance changes with rare large jumps (as gold-probability NIEs have): with probability ``rare`` a
    change of about ``jump`` (exponential), else a small negative drift that balances them (-0.033 with the
    defaults: inside the margin), shifted so the true mean is ``mean``. Skewness ~6: a t-test of "the mean is 0"
    rejects whenever a sample happens to hold no jump."""
    big = rng.random(n) < rare
    values = np.where(big, rng.exponential(jump, n), rng.normal(-rare * jump / (1 - rare), 0.01, n))
    return values + mean


def skewed_mean_family(rng: np.random.Generator, *, n: int, effects: tuple[float, ...], margins: Margins = Margins(),
                       metric: str = "NIE_gold_prob", n_boot: int = 400, rare: float = 0.1) -> list[RowStats]:
    """A family of means of skewed, rare-event per-instance changes, summarised as ``summarize`` does (BCa
    intervals over instances, sign-flip p-values)."""
    from ..stats.intervals import bca_mean_intervals, sign_flip_p_values

    values = np.column_stack([skewed_values(rng, n, effect, rare=rare) for effect in effects])
    seed = int(rng.integers(2 ** 31))
    low, high = bca_mean_intervals(values, margins.alpha, n_boot, seed)
    p_values = sign_flip_p_values(values, 200, seed)
    return [mean_row(f"row {j}", metric, float(values[:, j].mean()), low[j], high[j], n, p_values[j], margins)
            for j in range(len(effects))]


def clustered_rate_family(rng: np.random.Generator, *, n: int, seeds: int, rate: float, icc: float = 0.5,
                          margins: Margins = Margins(), placebo_rate: float | None = None,
                          metric: str = "flip_rate") -> list[RowStats]:
    """One row of an answer-change rate with ``seeds`` seeds (or donors) per instance: per instance a change
    probability from a beta distribution with mean ``rate`` and intra-instance correlation ``icc`` (beta-binomial),
    summarised as ``summarize`` does (per-instance fractions, instances as units). With ``placebo_rate`` a placebo
    run's events (one seed per instance) are subtracted as the noise floor."""
    from ..stats.intervals import cluster_rate

    if rate <= 0:
        probabilities = np.zeros(n)
    elif icc <= 0:
        probabilities = np.full(n, rate)
    else:
        strength = (1 - icc) / icc
        probabilities = rng.beta(rate * strength, (1 - rate) * strength, n)
    fractions = rng.binomial(seeds, probabilities) / seeds
    row = cluster_rate(fractions, margins.alpha)
    placebo_k = placebo_n = None
    if placebo_rate is not None:
        placebo_k, placebo_n = float(rng.binomial(n, placebo_rate)), n
    return [rate_row("row 0", metric, row["k"], n, margins, placebo_k, placebo_n)]


def noisy_rate_family(rng: np.random.Generator, *, n: int, true_rate: float, noise_rate: float,
                      margins: Margins = Margins()) -> list[RowStats]:
    """Batch-layout noise on a GPU: every run flips an answer with probability ``noise_rate`` by itself, so the
    edit's observed rate is about true_rate + noise_rate; the placebo run (same code path, nothing edited) sees
    the noise alone and is subtracted."""
    changed = (rng.random(n) < true_rate) | (rng.random(n) < noise_rate)
    placebo = rng.random(n) < noise_rate
    return [rate_row("row 0", "flip_rate", int(changed.sum()), n, margins, int(placebo.sum()), n)]


def input_latent_geometry(rng: np.random.Generator, *, n_questions: int = 4, per_question: int = 10, dim: int = 32,
                          follow: float = 1.0, question_scale: float = 10.0, image_scale: float = 1.0,
                          noise: float = 0.0, offset: float = 0.0, anisotropy: float = 1.0,
                          other: float = 0.0) -> dict:
    """Clean, image-swapped and placebo latents of a simulated subject whose latents are
    question_scale * q + follow * image_scale * image + other * u + offset + noise, the image swapped for another
    image of the same question's instances (the issue's case: the question explains most of the variance).
    ``follow`` 0: the latents ignore the image; ``other``: an instance-specific part the swap does not move (so
    the true R2 = (follow image_scale)^2 / ((follow image_scale)^2 + other^2)). ``anisotropy`` > 1 stretches the
    first coordinates (an anisotropic hidden space); ``offset`` adds one shared vector (a bias). ``noise`` is
    run-to-run noise (batch-layout bf16 kernels) on every run, the placebo included. Returns clean, edited,
    placebo, groups and the true R2."""
    n = n_questions * per_question
    question = np.repeat(np.arange(n_questions), per_question)
    scales = np.geomspace(anisotropy, 1.0, dim)
    q_vectors = rng.normal(size=(n_questions, dim)) * question_scale
    images = rng.normal(size=(n, dim)) * image_scale
    shift = offset * np.ones(dim)
    donor = np.array([question[i] * per_question + (i % per_question + 1) % per_question for i in range(n)])
    own = other * rng.normal(size=(n, dim))

    def run(image_rows):
        return (q_vectors[question] + follow * images[image_rows] + own + shift
                + noise * rng.normal(size=(n, dim))) * scales

    clean, edited, placebo = run(np.arange(n)), run(donor), run(np.arange(n))
    moved = (follow * image_scale) ** 2
    true_r2 = moved / (moved + other ** 2) if moved + other ** 2 > 0 else math.nan
    return dict(clean=clean, edited=edited, placebo=placebo, groups=question, true_r2=true_r2)


def input_latent_decision(rng: np.random.Generator, margins: Margins = Margins(), n_boot: int = 300, **geometry) -> str:
    """The input_latent row decision (`disconnect`/`connected`/`inconclusive`) of one simulated image swap, through
    the real statistic (``stats.latent_effect.latent_r2``) and the real family rule (``decide_family``)."""
    from ..stats.latent_effect import latent_r2

    data = input_latent_geometry(rng, **geometry)
    result = latent_r2(data["clean"], data["edited"], placebo=data["placebo"], groups=data["groups"],
                       alpha=margins.alpha, n_boot=n_boot, seed=int(rng.integers(2 ** 31)))
    metric = "latent_r2" if result["statistic"] == "r2" else "latent_relative_change"
    row = mean_row("image-swap", metric, result["estimate"], result["ci_low"], result["ci_high"], result["n"],
                   math.nan, margins, "paired BCa bootstrap")
    return decide_family([row], margins, plan=False).verdict


def collapse_geometry(rng: np.random.Generator, *, n: int = 40, dim: int = 32, ratio: float = 1.0,
                      subspace: int | None = None, offset: float = 0.0, tokens_per_image: int = 16) -> dict:
    """Latents whose per-direction spread is ``ratio`` times a single image token's, in a ``subspace``-dimensional
    subspace (None: every direction), plus a shared ``offset``; image tokens isotropic with unit variance."""
    k = dim if subspace is None else subspace
    basis = np.linalg.qr(rng.normal(size=(dim, k)))[0] if k < dim else np.eye(dim)
    latents = offset * rng.normal(size=dim) + np.sqrt(ratio) * rng.normal(size=(n, k)) @ basis.T
    tokens = rng.normal(size=(n, tokens_per_image, dim))
    return dict(latents=latents, token=tokens[:, 0], pool=tokens.reshape(-1, dim))


def collapse_decision(rng: np.random.Generator, margin: float = 0.1, n_boot: int = 300, **geometry) -> str:
    """The collapse verdict of one simulated subject (one latent step), through ``similarity_table`` and
    ``verdict_collapse``."""
    from ..stats.similarity import similarity_table
    from .collapse import verdict_collapse

    data = collapse_geometry(rng, **geometry)
    table = similarity_table(data["latents"][:, None, :], {}, SUBJECT, n_boot=n_boot, seed=int(rng.integers(2 ** 31)),
                             single_tokens={"image_token": data["token"]}, token_pool=data["pool"])
    return verdict_collapse(table, SUBJECT, margin=margin).verdict


def visual_info_decision(rng: np.random.Generator, *, n: int = 96, strength: float = 0.0, n_images: int | None = None,
                         identity: bool = False, margin: float = 0.1, repeats: int = 3) -> str:
    """The visual_info verdict of one simulated subject with one binary attribute. ``strength``: how far the
    latents' first coordinate moves with the attribute (0: uninformative); ``n_images``: recurring images (the
    control types; None: every instance its own); ``identity``: the latents ARE the image identity (one random
    vector per image), so they determine every image attribute. The image-token baseline reads the attribute
    clearly. Runs the real probe procedure (``stats.probes.probe_table``) and ``verdict_visual_info``."""
    from ..stats.probes import probe_table
    from .visual_info import verdict_visual_info

    images = np.arange(n) % n_images if n_images else np.arange(n)
    kinds = n_images or n
    image_labels = rng.permutation(np.arange(kinds) % 2)
    labels = image_labels[images]
    direction = 2 * labels - 1
    if identity:
        latent = rng.normal(size=(kinds, 8))[images] + 0.1 * rng.normal(size=(n, 8))
    else:
        latent = rng.normal(size=(n, 8))
        latent[:, 0] += strength * direction
    image = rng.normal(size=(n, 8))
    image[:, 0] += 3.0 * direction
    common = dict(subject=SUBJECT, attribute="colour", n_splits=4, alphas=(1.0, 100.0), n_permutations=49, n_boot=0,
                  seed=int(rng.integers(2 ** 31)), types=images, repeats=repeats)
    table = pd.concat([probe_table({(0, 0): latent}, labels, np.arange(n), representation="latent", **common),
                       probe_table({(0, -1): image}, labels, np.arange(n), representation="image_mean", **common)],
                      ignore_index=True)
    return verdict_visual_info(table, SUBJECT, margin=margin).verdict


def word_rates(decide: Callable[[np.random.Generator], str], *, n_sims: int, seed: int = 0) -> dict[str, float]:
    """Share of ``n_sims`` simulated runs that ``decide(rng)`` gives each word."""
    if isinstance(n_sims, bool) or not isinstance(n_sims, int) or n_sims < 1:
        raise LatentProbeError(f"n_sims={n_sims!r} is not a positive whole number", "e.g. n_sims=200")
    rng = np.random.default_rng(seed)
    counts = Counter(decide(rng) for _ in range(n_sims))
    return {word: count / n_sims for word, count in sorted(counts.items())}


def monte_carlo_limit(level: float, n_sims: int, z: float = 2.0) -> float:
    """``level`` plus ``z`` Monte Carlo standard errors of a rate estimated from ``n_sims`` runs."""
    return level + z * math.sqrt(level * (1 - level) / n_sims)


# Scenarios whose error rate is known to exceed its target (measured with analyses/calibration.py and reported in
# the README), with the level the fast tests hold them to so that a regression beyond it is still caught. BCa
# intervals of a mean of rare large jumps (skewness ~6) under-cover at n = 40: a sample that happens to hold few
# jumps looks like a mean below the margin; no bootstrap interval knows about jumps it has not seen.
KNOWN_SHORTFALL = {"skewed, at the margin (0.05), n=40": 0.2, "normal, at the margin (0.05), sd 0.05, n=80": 0.06}


# Every rule x scenario of the calibration table: (rule, scenario, error word, target, how to decide one run).
def scenarios(fast: bool = False) -> list[tuple[str, str, str, float, Callable[[np.random.Generator], str]]]:
    """The calibration scenarios of issue 18 (``analyses/calibration.py`` prints their error rates; the tests
    run them small). Each: rule, scenario, the error word, its target rate, and ``decide(rng) -> word``."""
    m = Margins()
    fam = lambda make: (lambda rng: decide_family(make(rng), m, plan=False).verdict)  # noqa: E731
    boot = 200 if fast else 400
    out = [
        ("latent_answer", "null, n=80, no placebo (CPU)", "connected", 0.05,
         fam(lambda rng: rate_family(rng, n=80, rates=(0.0, 0.0), margins=m))),
        ("latent_answer", "negligible true rate 0.01, n=200", "connected", 0.05,
         fam(lambda rng: rate_family(rng, n=200, rates=(0.01,), margins=m))),
        ("latent_answer", "GPU batch noise 0.03, no true effect, placebo, n=80", "connected", 0.05,
         fam(lambda rng: noisy_rate_family(rng, n=80, true_rate=0.0, noise_rate=0.03, margins=m))),
        ("latent_answer", "rate 2x margin (0.10), n=80", "disconnect", 0.05,
         fam(lambda rng: rate_family(rng, n=80, rates=(0.10,), margins=m))),
        ("latent_answer", "rate at the margin (0.05), n=200", "disconnect", 0.025,
         fam(lambda rng: rate_family(rng, n=200, rates=(0.05,), margins=m))),
        ("latent_answer", "4 seeds/instance, icc 0.5, rate 0.10, n=12", "disconnect", 0.05,
         fam(lambda rng: clustered_rate_family(rng, n=12, seeds=4, rate=0.10, margins=m))),
        ("latent_answer", "4 seeds/instance, icc 0.5, rate 0.10, n=80", "disconnect", 0.05,
         fam(lambda rng: clustered_rate_family(rng, n=80, seeds=4, rate=0.10, margins=m))),
        ("latent_answer", "4 seeds/instance, icc 0.5, rate at the margin (0.05), n=80", "disconnect", 0.025,
         fam(lambda rng: clustered_rate_family(rng, n=80, seeds=4, rate=0.05, margins=m))),
        ("latent_answer", "4 seeds/instance, null, n=12", "connected", 0.05,
         fam(lambda rng: clustered_rate_family(rng, n=12, seeds=4, rate=0.0, margins=m))),
        ("mediation mean", "skewed rare-event null, n=12", "connected", 0.05,
         fam(lambda rng: skewed_mean_family(rng, n=12, effects=(0.0,), margins=m, n_boot=boot))),
        ("mediation mean", "skewed rare-event null, 6 rows, n=20", "connected", 0.05,
         fam(lambda rng: skewed_mean_family(rng, n=20, effects=(0.0,) * 6, margins=m, n_boot=boot))),
        ("mediation mean", "skewed, 2x margin (0.10), n=20", "disconnect", 0.05,
         fam(lambda rng: skewed_mean_family(rng, n=20, effects=(0.10,), margins=m, n_boot=boot))),
        ("mediation mean", "normal, 2x margin (0.10), n=20", "disconnect", 0.05,
         fam(lambda rng: mean_family(rng, n=20, effects=(0.10,), margins=m, n_boot=boot))),
        ("mediation mean", "normal null, 6 rows, n=20", "connected", 0.05,
         fam(lambda rng: mean_family(rng, n=20, effects=(0.0,) * 6, sd=0.1, margins=m, n_boot=boot))),
        ("mediation mean", "skewed, at the margin (0.05), n=40", "disconnect", 0.025,
         fam(lambda rng: skewed_mean_family(rng, n=40, effects=(0.05,), margins=m, n_boot=boot))),
        ("mediation mean", "normal, at the margin (0.05), sd 0.05, n=80", "disconnect", 0.025,
         fam(lambda rng: mean_family(rng, n=80, effects=(0.05,), sd=0.05, margins=m, n_boot=boot))),
        ("input_latent", "ignores image, collapsed cluster, noise = spread", "connected", 0.05,
         lambda rng: input_latent_decision(rng, m, boot, follow=0.0, question_scale=10.0, image_scale=0.01,
                                           noise=0.01, offset=20.0)),
        ("input_latent", "follows image fully, question 99% of variance", "disconnect", 0.05,
         lambda rng: input_latent_decision(rng, m, boot, follow=1.0, question_scale=10.0)),
        ("input_latent", "R2 2x margin (0.4), anisotropic + offset, noise", "disconnect", 0.05,
         lambda rng: input_latent_decision(rng, m, boot, follow=1.0, other=math.sqrt(1.5), anisotropy=10.0,
                                           offset=30.0, noise=0.2)),
        ("input_latent", "R2 at the margin (0.2), noise", "disconnect", 0.025,
         lambda rng: input_latent_decision(rng, m, boot, follow=1.0, other=2.0, noise=0.2)),
        ("input_latent", "ignores image, anisotropic + offset, noise", "connected", 0.05,
         lambda rng: input_latent_decision(rng, m, boot, follow=0.0, other=1.0, anisotropy=10.0, offset=30.0,
                                           noise=0.2)),
        ("collapse", "not collapsed: 16-d subspace + offset (raw cos ~0.95)", "collapsed", 0.05,
         lambda rng: collapse_decision(rng, n_boot=boot, subspace=16, offset=8.0)),
        ("collapse", "ratio 2x margin (0.2), offset", "collapsed", 0.05,
         lambda rng: collapse_decision(rng, n_boot=boot, ratio=0.2, offset=8.0)),
        ("collapse", "ratio at the margin (0.1), offset", "collapsed", 0.025,
         lambda rng: collapse_decision(rng, n_boot=boot, ratio=0.1, offset=8.0)),
        ("collapse", "isotropic, as varied as a token", "collapsed", 0.05,
         lambda rng: collapse_decision(rng, n_boot=boot, ratio=1.0)),
        ("visual_info", "weakly informative latents (strength 0.5)", "limited", 0.05,
         lambda rng: visual_info_decision(rng, strength=0.5, repeats=2 if fast else 3)),
        ("visual_info", "latents = image identity, 16 recurring images", "limited", 0.05,
         lambda rng: visual_info_decision(rng, identity=True, n_images=16, repeats=2 if fast else 3)),
        ("visual_info", "noise latents, 16 recurring images (control imbalance)", "informative", 0.05,
         lambda rng: visual_info_decision(rng, strength=0.0, n_images=16, repeats=2 if fast else 3)),
    ]
    return out
