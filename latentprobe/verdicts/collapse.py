"""The collapse verdict: do the latent tokens of different instances collapse onto (nearly) one vector?

It reads the ``collapse_ratio`` rows of the similarity table (:func:`latentprobe.stats.similarity.similarity_table`,
computed by :func:`latentprobe.stats.collapse_spread.collapse_rows`): per latent step, the latents' centred,
whitened spread per direction in their own (cross-fitted) subspace over that of a single image token of the same
instances and layer (1 = the latents vary as much as an image token where they vary at all; 0 = every instance has
the same latent). The rule, at one pre-specified step:

- **no spread beyond noise** (a ``noise_excess`` row, from a placebo floor, whose lower bound is not above 0):
  ``collapsed`` whatever the ratio says -- the latents of different instances differ by no more than re-running
  the same instance does;
- the yardstick itself does not vary (its centred spread below 1% of its squared size, or an undefined ratio):
  ``inconclusive`` -- nothing can be collapsed *relative to* a yardstick that is itself collapsed;
- ``collapsed``: the whole interval of the ratio lies below ``margin``;
- ``not collapsed``: the whole interval lies above ``margin`` -- against a single-token yardstick only: the mean
  of many image tokens varies less than one token, so a ratio against it is inflated and may support
  ``collapsed`` (a conservative direction) but not ``not collapsed``;
- otherwise ``inconclusive``; ``not measured`` without collapse rows (tables made before issue 18).

The step judged is the deepest latent step that at least half of the instances reach (the paper says collapse
grows with the step). The effective dimension (participation ratio), the first-to-last spread trend (progressive
collapse) and the raw cosine (the paper's view) are reported beside, never deciding.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from ..stats.collapse_spread import POOLED, SINGLE_TOKEN, YARDSTICK_MIN_RELATIVE_SPREAD
from .base import INCONCLUSIVE, NOT_MEASURED, Verdict
from .decision import _fmt

COLLAPSED, NOT_COLLAPSED = "collapsed", "not collapsed"
NEEDED_COLUMNS = {"subject", "statistic", "representation", "reference", "step", "estimate", "ci_low", "ci_high",
                  "n", "confidence"}
METHOD = ("centred states whitened by the layer's pooled token covariance (Ledoit-Wolf); spread per direction in the "
          "latents' cross-fitted principal subspace over a single image token's; paired BCa bootstrap over instances; "
          "placebo noise floor")


def _check_arguments(margin: float, alpha: float) -> None:
    if not (np.isfinite(margin) and margin > 0):
        raise LatentProbeError(f"margin={margin} is not a positive finite number",
                               "use a collapse ratio threshold such as 0.1 (latents vary 10x less than an image token)")
    if not (np.isfinite(alpha) and 0 < alpha < 0.5):
        raise LatentProbeError(f"alpha={alpha} is not in (0, 0.5)", "use e.g. alpha=0.05")


def _judged_step(rows: pd.DataFrame, step: int | None):
    rows = rows[np.isfinite(rows.estimate.astype(float)) | rows.estimate.isna()]
    if rows.empty:
        return None
    if step is not None:
        chosen = rows[rows.step == step]
        if chosen.empty:
            raise LatentProbeError(f"no collapse_ratio row at latent step {step}",
                                   f"choose one of steps {sorted(rows.step.unique().tolist())}")
        return chosen.iloc[0]
    well_populated = rows[rows.n >= rows.n.max() / 2]
    return well_populated.sort_values("step").iloc[-1]


def _one(similarity: pd.DataFrame, statistic: str, step=None, **match):
    rows = similarity[similarity.statistic == statistic]
    if step is not None:
        rows = rows[rows.step == step]
    for key, value in match.items():
        rows = rows[rows[key] == value]
    return None if rows.empty else rows.iloc[0]


def verdict_collapse(similarity: pd.DataFrame | None, subject: str, *, margin: float = 0.1, alpha: float = 0.05,
                     baseline: str | None = None, step: int | None = None) -> Verdict:
    """Decide ``collapse`` for one subject from its similarity table (see the module docstring for the rule).

    ``baseline`` picks the yardstick (default: the first single-token yardstick, else a pooled one); ``step`` the
    latent step judged (default: the deepest step half of the instances reach). Returns a `Verdict` whose
    estimate and interval are the collapse ratio's, with the deciding numbers in one sentence as evidence.

    >>> import numpy as np
    >>> from latentprobe.stats.similarity import similarity_table
    >>> rng = np.random.default_rng(0)
    >>> latents = rng.normal(size=16) + 1e-3 * rng.normal(size=(30, 3, 16))   # all instances at one point
    >>> table = similarity_table(latents, {}, "toy", n_boot=200, single_tokens={"image_token": rng.normal(size=(30, 16))})
    >>> verdict_collapse(table, "toy").verdict
    'collapsed'
    """
    _check_arguments(margin, alpha)
    rule = (f"collapsed if the latents' spread has no excess over the placebo noise floor, or if the collapse ratio "
            f"(whitened per-direction spread of a latent step over a single image token's) has its interval below "
            f"{margin:g}; not collapsed if above {margin:g} against a single token; else inconclusive")
    if similarity is None or similarity.empty or "subject" not in similarity.columns:
        return Verdict(subject, "collapse", NOT_MEASURED, rule="no similarity table")
    missing = NEEDED_COLUMNS - set(similarity.columns)
    if missing:
        return Verdict(subject, "collapse", NOT_MEASURED, rule=f"the similarity table lacks {sorted(missing)}")
    mine = similarity[similarity.subject == subject]
    rows = mine[(mine.statistic == "collapse_ratio") & (mine.representation == "latent")]
    if rows.empty:
        why = ("no latent states of this subject in the similarity table (a subject without latent tokens, such as a "
               "text mediator or a plain model)" if mine.empty else
               "no collapse_ratio rows (a similarity table from a latentprobe older than the collapse ratio)")
        return Verdict(subject, "collapse", NOT_MEASURED, rule=rule, evidence=why)
    kind = rows.yardstick if "yardstick" in rows.columns else pd.Series(SINGLE_TOKEN, index=rows.index)
    available = list(dict.fromkeys(rows.reference))
    if baseline is None:
        singles = list(dict.fromkeys(rows.reference[kind == SINGLE_TOKEN]))
        baseline = (singles or available)[0]
    elif baseline not in available:
        raise LatentProbeError(f"no collapse_ratio rows against baseline {baseline!r} for {subject}",
                               f"choose one of {available}")
    chosen = rows[rows.reference == baseline]
    judged = _judged_step(chosen, step)
    pooled = str(judged.get("yardstick", SINGLE_TOKEN)) == POOLED
    confidence = float(judged.confidence)
    if 1 - confidence > 2 * alpha + 1e-12:
        raise LatentProbeError(f"the similarity table's intervals are {confidence:.0%} intervals, too narrow for "
                               f"alpha={alpha}", f"rebuild it with confidence >= {1 - 2 * alpha:.2f}")
    at = int(judged.step)
    estimate, low, high, n = (float(judged.estimate), float(judged.ci_low), float(judged.ci_high), int(judged.n))
    noise = _one(mine, "noise_excess", at)
    pr = _one(mine, "participation_ratio", at)
    trend = _one(mine, "spread_trend")
    cosine = _one(mine[mine.representation == "latent"], "cosine", at, centring="raw") \
        if "centring" in mine.columns else None
    beside = []
    if pr is not None:
        beside.append(f"participation ratio {_fmt(pr.estimate)}")
    if trend is not None:
        beside.append(f"spread at step {int(trend.step)} over {trend.reference}: {_fmt(trend.estimate)} "
                      f"[{_fmt(trend.ci_low)}, {_fmt(trend.ci_high)}]"
                      + (" (progressive: contracts)" if trend.ci_high < 1 else ""))
    if cosine is not None:
        beside.append(f"raw cosine between instances {_fmt(cosine.estimate)} (the paper's view)")
    noise_text = ("no placebo floor (floor 0)" if noise is None else
                  f"spread over the placebo floor {_fmt(noise.estimate)}, lower bound {_fmt(noise.ci_low)}")
    yard = f"{baseline} ({'mean of many tokens: conservative, can only show collapse' if pooled else 'single token'})"
    whitened = judged.get("whitened")
    how = "whitened" if whitened is True or whitened == 1.0 else "centred (too few pooled tokens to whiten)"
    sentence = (f"latent step {at} varies {_fmt(estimate)} [{_fmt(low)}, {_fmt(high)}] as much as {yard} per "
                f"direction ({how}, n={n}); {noise_text}" + ("; " + "; ".join(beside) if beside else ""))
    # the floor itself is in the noise_excess row only as the spread's excess over it; the sentence gives both
    details = {"baseline": baseline, "step": at, "placebo": None,
               "effect_size": "collapse ratio (whitened per-direction spread, latents / single token)",
               "yardstick": yard,
               "per_step": {int(r.step): (float(r.estimate), float(r.ci_low), float(r.ci_high))
                            for r in chosen.sort_values("step").itertuples()}}
    common = dict(rule=rule, margin=margin, estimate=estimate, ci_low=low, ci_high=high, n=n, method=METHOD,
                  details=details)
    if noise is not None and not (noise.ci_low > 0):
        return Verdict(subject, "collapse", COLLAPSED, evidence="no spread beyond noise: " + sentence, **common)
    relative = judged.get("yardstick_relative_spread")
    if (relative is not None and pd.notna(relative) and relative < YARDSTICK_MIN_RELATIVE_SPREAD) \
            or not np.isfinite(estimate):
        return Verdict(subject, "collapse", INCONCLUSIVE,
                       evidence=f"the yardstick {baseline} does not vary across instances (relative spread "
                                f"{_fmt(relative)} < {YARDSTICK_MIN_RELATIVE_SPREAD:g}): nothing to be collapsed "
                                f"against; " + sentence, **common)
    if not (np.isfinite(low) and np.isfinite(high)):
        return Verdict(subject, "collapse", INCONCLUSIVE, evidence=sentence + "; no interval (too few instances)",
                       **common)
    half_width = (high - low) / 2
    common["detectable_effect"] = half_width
    if high < margin:
        return Verdict(subject, "collapse", COLLAPSED, evidence=sentence + f"; upper bound < margin {margin:g}",
                       **common)
    if low > margin and not pooled:
        return Verdict(subject, "collapse", NOT_COLLAPSED, evidence=sentence + f"; lower bound > margin {margin:g}",
                       **common)
    distance = abs(estimate - margin)
    common["needed_n"] = int(np.ceil(n * (half_width / distance) ** 2)) if distance > 0 and not pooled else None
    reason = ("; above the margin, but a pooled yardstick cannot show that the latents are not collapsed (record "
              "single image tokens)" if pooled and low > margin else f"; the interval contains the margin {margin:g}")
    return Verdict(subject, "collapse", INCONCLUSIVE, evidence=sentence + reason, **common)
