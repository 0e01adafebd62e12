"""The collapse verdict: do the latent tokens of different instances collapse onto (nearly) one vector?

It reads the ``spread_ratio`` rows of the similarity table (:func:`latentprobe.stats.similarity.similarity_table`,
columns :data:`latentprobe.stats.similarity.SIMILARITY_COLUMNS`): per latent step, the relative spread of the latents
across instances divided by the relative spread of a non-latent baseline of the same instances (1 = the
latents vary as much as the image tokens; 0 = every instance has the same latent). The rule, at one
pre-specified step and baseline:

- ``collapsed``: the whole interval of the ratio lies below ``margin`` (the latents vary across instances less
  than ``margin`` times as much as the baseline does);
- ``not collapsed``: the whole interval lies above ``margin``;
- ``inconclusive``: the interval contains ``margin`` (or the baseline itself does not vary);
- ``not measured``: no table, or no spread_ratio rows for the subject.

The step judged is the deepest latent step that at least half of the instances in latent mode reach (the
paper says collapse grows with the step; "half" keeps a step reached by a few instances from deciding). The
baseline is the mean image-token state (the input the latents are meant to carry), else the last prompt token.
Both can be chosen. One step and one baseline are fixed in advance, so one interval decides: no multiplicity.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from .base import INCONCLUSIVE, NOT_MEASURED, Verdict

COLLAPSED, NOT_COLLAPSED = "collapsed", "not collapsed"
DEFAULT_BASELINES = ("image_mean", "prompt_last")  # the first one present is used
NEEDED_COLUMNS = {"subject", "statistic", "representation", "reference", "step", "estimate", "ci_low", "ci_high",
                  "n", "confidence"}


def _check_arguments(margin: float, alpha: float) -> None:
    if not (np.isfinite(margin) and margin > 0):
        raise LatentProbeError(f"margin={margin} is not a positive finite number",
                               "use a spread ratio threshold such as 0.1 (latents vary 10x less than the baseline)")
    if not (np.isfinite(alpha) and 0 < alpha < 0.5):
        raise LatentProbeError(f"alpha={alpha} is not in (0, 0.5)", "use e.g. alpha=0.05")


def _judged_step(latent_rows: pd.DataFrame, step: int | None) -> pd.Series | None:
    rows = latent_rows[np.isfinite(latent_rows.estimate.astype(float))]
    if rows.empty:
        return None
    if step is not None:
        chosen = rows[rows.step == step]
        if chosen.empty:
            raise LatentProbeError(f"no spread_ratio row at latent step {step}",
                                   f"choose one of steps {sorted(rows.step.unique().tolist())}")
        return chosen.iloc[0]
    well_populated = rows[rows.n >= rows.n.max() / 2]
    return well_populated.sort_values("step").iloc[-1]


def verdict_collapse(similarity: pd.DataFrame | None, subject: str, *, margin: float = 0.1, alpha: float = 0.05,
                     baseline: str | None = None, step: int | None = None) -> Verdict:
    """Decide ``collapse`` for one subject from its similarity table (see the module docstring for the rule).

    Parameters
    ----------
    similarity : DataFrame or None
        :func:`latentprobe.stats.similarity.similarity_table` output (several subjects may be concatenated).
    subject : str
        The subject to judge.
    margin : float
        Threshold on the spread ratio (latent relative spread / baseline relative spread), default 0.1.
    alpha : float
        Error rate of each one-sided claim. The table's two-sided intervals (``confidence`` column) must be at
        least ``1 - 2 * alpha`` wide; the default 95% intervals give one-sided errors of 2.5% <= 5%.
    baseline : str, optional
        The reference representation; default the first of "image_mean", "prompt_last" in the table.
    step : int, optional
        The latent step judged; default the deepest step that half of the latent-mode instances reach.

    Returns
    -------
    Verdict
        ``collapsed`` | ``not collapsed`` | ``inconclusive`` | ``not measured``, with the ratio and its interval
        as estimate, the interval's half-width as ``detectable_effect`` (how close to the margin the ratio may
        lie and still be decided) and, when inconclusive, the instances needed at that width.

    Examples
    --------
    >>> import numpy as np
    >>> from latentprobe.stats.similarity import similarity_table
    >>> rng = np.random.default_rng(0)
    >>> latents = rng.normal(size=16) + 1e-3 * rng.normal(size=(30, 3, 16))   # all instances at one point
    >>> table = similarity_table(latents, {"image_mean": rng.normal(size=(30, 16))}, "toy", n_boot=200)
    >>> verdict_collapse(table, "toy").verdict
    'collapsed'
    """
    _check_arguments(margin, alpha)
    if similarity is None or similarity.empty or "subject" not in similarity.columns:
        return Verdict(subject, "collapse", NOT_MEASURED, rule="no similarity table")
    missing = NEEDED_COLUMNS - set(similarity.columns)
    if missing:
        return Verdict(subject, "collapse", NOT_MEASURED,
                       rule=f"the similarity table lacks {sorted(missing)} (made before the spread statistic?)")
    rows = similarity[(similarity.subject == subject) & (similarity.statistic == "spread_ratio")
                      & (similarity.representation == "latent")]
    if rows.empty:
        return Verdict(subject, "collapse", NOT_MEASURED, rule="no spread_ratio rows for this subject")
    available = list(dict.fromkeys(rows.reference))
    if baseline is None:
        baseline = next((b for b in DEFAULT_BASELINES if b in available), available[0])
    elif baseline not in available:
        raise LatentProbeError(f"no spread_ratio rows against baseline {baseline!r} for {subject}",
                               f"choose one of {available}")
    judged = _judged_step(rows[rows.reference == baseline], step)
    if judged is None:  # the baseline does not vary at all (or no step has two instances)
        return Verdict(subject, "collapse", INCONCLUSIVE,
                       rule=f"the spread ratio against {baseline} is undefined at every step",
                       evidence=f"the {baseline} states do not vary across instances, or too few instances")
    confidence = float(judged.confidence)
    if 1 - confidence > 2 * alpha + 1e-12:
        raise LatentProbeError(
            f"the similarity table's intervals are {confidence:.0%} intervals, too narrow for alpha={alpha}",
            f"rebuild it with confidence >= {1 - 2 * alpha:.2f}")
    estimate, low, high, n = (float(judged.estimate), float(judged.ci_low), float(judged.ci_high), int(judged.n))
    rule = (f"latent relative spread / {baseline} relative spread at latent step {int(judged.step)}: collapsed "
            f"if its whole {confidence:.0%} interval is below {margin:g}, not collapsed if above {margin:g}, "
            "else inconclusive")
    per_step = rows[rows.reference == baseline].sort_values("step")
    details = {"baseline": baseline, "step": int(judged.step),
               "per_step": {int(r.step): (float(r.estimate), float(r.ci_low), float(r.ci_high))
                            for r in per_step.itertuples()},
               "other_baselines": {b: float(rows[(rows.reference == b) & (rows.step == judged.step)].estimate.iloc[0])
                                   for b in available if b != baseline
                                   and len(rows[(rows.reference == b) & (rows.step == judged.step)])}}
    evidence = (f"spread ratio vs {baseline} at step {int(judged.step)}: {estimate:.3g} [{low:.3g}, {high:.3g}] "
                f"(n={n}); by step: " + ", ".join(f"{s}: {v[0]:.3g}" for s, v in details["per_step"].items()))
    common = dict(rule=rule, margin=margin, estimate=estimate, ci_low=low, ci_high=high, n=n,
                  method=f"BCa bootstrap over instances ({confidence:.0%}), paired for the ratio; one pre-specified "
                         "step and baseline", evidence=evidence, details=details)
    if not (np.isfinite(low) and np.isfinite(high)):
        common["evidence"] = evidence + "; no interval (fewer than 3 instances, or no bootstrap)"
        return Verdict(subject, "collapse", INCONCLUSIVE, **common)
    half_width = (high - low) / 2
    common["detectable_effect"] = half_width
    if high < margin:
        return Verdict(subject, "collapse", COLLAPSED, **common)
    if low > margin:
        return Verdict(subject, "collapse", NOT_COLLAPSED, **common)
    distance = abs(estimate - margin)
    # Interval width shrinks as 1/sqrt(n): the n at which the half-width would equal the distance to the margin.
    common["needed_n"] = int(np.ceil(n * (half_width / distance) ** 2)) if distance > 0 else None
    return Verdict(subject, "collapse", INCONCLUSIVE, **common)
