"""The visual-information verdict: can linear probes read the image's attributes from the latent tokens?

It reads the ``nested`` rows of the probe table (:func:`latentprobe.stats.probes.probe_table`, columns
``subject, representation, attribute`` + :data:`latentprobe.stats.probes.PROBE_COLUMNS`): per attribute and
representation, the best layer x step chosen inside the training folds and scored on held-out instances, with
``selectivity`` (score - Hewitt & Liang control score), its interval ``selectivity_ci_low/high`` and the
permutation ``p_value`` of the score against chance. The rule, with ``margin`` on the selectivity scale
(accuracy points, or R^2):

- an attribute is **informative** when the latent selectivity interval lies above ``margin`` *and* its
  permutation p-value, Holm-adjusted over the subject's attributes (``decision.holm``, equal to statsmodels'
  ``multipletests``), is below ``alpha``;
- an attribute is **limited** when the latent selectivity interval lies below ``margin`` (the latents hold at
  most ``margin`` beyond what memorising the control's types gives: positive evidence of little information,
  not merely a low estimate) *and* the image-token baseline's interval lies above ``margin`` (the attribute is
  readable from the image states of the same instances with the same probe, so the probe could have found it);
- otherwise the attribute is **inconclusive**.

The subject is ``informative`` if any attribute is, ``limited`` if every attribute is (each is a one-sided
claim at level ``alpha``, so requiring all of them keeps the level: an intersection-union test), otherwise
``inconclusive``; ``not measured`` without nested latent rows. Both representations are nested selections, so
the latents' many cells (layers x steps) and the image tokens' few (layers) compete on equal terms.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from .base import INCONCLUSIVE, NOT_MEASURED, Verdict
from .decision import holm as holm_adjust

LIMITED, INFORMATIVE = "limited", "informative"
NEEDED_COLUMNS = {"subject", "representation", "attribute", "selection", "selectivity", "selectivity_ci_low",
                  "selectivity_ci_high", "p_value", "n", "confidence"}


def _check_arguments(margin: float, alpha: float) -> None:
    if not (np.isfinite(margin) and 0 < margin < 1):
        raise LatentProbeError(f"margin={margin} is not a finite number in (0, 1): selectivity, a difference of "
                               "accuracies, never exceeds 1, so no interval could lie above it",
                               "use a selectivity margin such as 0.1 (10 accuracy points above the control)")
    if not (np.isfinite(alpha) and 0 < alpha < 0.5):
        raise LatentProbeError(f"alpha={alpha} is not in (0, 0.5)", "use e.g. alpha=0.05")


def _nested_rows(probes: pd.DataFrame, subject: str, representation: str) -> pd.DataFrame:
    rows = probes[(probes.subject == subject) & (probes.representation == representation)
                  & (probes.selection == "nested")]
    ran = rows.skipped_reason.fillna("").astype(str) == "" if "skipped_reason" in rows.columns else True
    return rows[ran & rows.selectivity.notna()].drop_duplicates("attribute").set_index("attribute")


def _interval(row) -> str:
    return f"{row.selectivity:.3f} [{row.selectivity_ci_low:.3f}, {row.selectivity_ci_high:.3f}]"


def verdict_visual_info(probes: pd.DataFrame | None, subject: str, *, margin: float = 0.1, alpha: float = 0.05,
                        baseline: str = "image_mean") -> Verdict:
    """Decide ``visual_info`` for one subject from its probe table (see the module docstring for the rule).

    Parameters
    ----------
    probes : DataFrame or None
        Concatenated :func:`latentprobe.stats.probes.probe_table` outputs (several subjects and attributes).
    subject : str
    margin : float
        Selectivity margin, default 0.1.
    alpha : float
        Family-wise error rate over the subject's attributes (Holm) for ``informative``; the tables'
        two-sided intervals must be at least ``1 - 2 * alpha`` wide (95% intervals: 2.5% per side).
    baseline : str
        The representation that shows an attribute is readable at all, default the mean image-token state.

    Returns
    -------
    Verdict
        ``limited`` | ``informative`` | ``inconclusive`` | ``not measured``; the deciding attribute's latent
        selectivity as estimate and interval, the interval's half-width as ``detectable_effect``, and per
        attribute details (selectivity, interval, raw and Holm p-values, baseline selectivity, verdict).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from latentprobe.stats.probes import probe_table
    >>> rng = np.random.default_rng(0)
    >>> labels = np.arange(60) % 2
    >>> states = rng.normal(size=(60, 6)); states[:, 0] += 3 * (2 * labels - 1)
    >>> table = pd.concat([probe_table({(0, s): states for s in range(2)}, labels, np.arange(60), subject="s",
    ...                                representation=r, attribute="colour", n_splits=3, n_permutations=99)
    ...                    for r in ("latent", "image_mean")])
    >>> verdict_visual_info(table, "s").verdict
    'informative'
    """
    _check_arguments(margin, alpha)
    if probes is None or probes.empty:
        return Verdict(subject, "visual_info", NOT_MEASURED, rule="no probe table")
    missing = NEEDED_COLUMNS - set(probes.columns)
    if missing:
        return Verdict(subject, "visual_info", NOT_MEASURED,
                       rule=f"the probe table lacks {sorted(missing)} (made before nested probes?)")
    latent = _nested_rows(probes, subject, "latent")
    if latent.empty:
        return Verdict(subject, "visual_info", NOT_MEASURED, rule="no latent probe that ran for this subject")
    confidence = float(latent.confidence.min())
    if 1 - confidence > 2 * alpha + 1e-12:
        raise LatentProbeError(f"the probe intervals are {confidence:.0%} intervals, too narrow for alpha={alpha}",
                               f"rebuild the probe table with confidence >= {1 - 2 * alpha:.2f}")
    reference = _nested_rows(probes, subject, baseline)
    p_values = latent.p_value.to_numpy(dtype=float)
    testable = np.isfinite(p_values)
    holm = np.full(len(p_values), np.nan)
    if testable.any():
        holm[testable] = holm_adjust(p_values[testable], alpha)[1]

    per_attribute = {}
    for (attribute, row), adjusted in zip(latent.iterrows(), holm):
        base = reference.loc[attribute] if attribute in reference.index else None
        readable = base is not None and base.selectivity_ci_low > margin
        if row.selectivity_ci_low > margin and adjusted < alpha:
            word = INFORMATIVE
        elif row.selectivity_ci_high < margin and readable:
            word = LIMITED
        else:
            word = INCONCLUSIVE
        per_attribute[attribute] = {
            "verdict": word, "selectivity": float(row.selectivity), "ci_low": float(row.selectivity_ci_low),
            "ci_high": float(row.selectivity_ci_high), "p_value": float(row.p_value), "p_holm": float(adjusted),
            "n": int(row.n), "cell": f"{int(row.layer)}/{int(row.step)}" if "layer" in row else "",
            "baseline_selectivity": None if base is None else float(base.selectivity),
            "baseline_ci_low": None if base is None else float(base.selectivity_ci_low),
        }
    words = [a["verdict"] for a in per_attribute.values()]
    if INFORMATIVE in words:
        verdict = INFORMATIVE
        deciding = min((a for a in per_attribute if per_attribute[a]["verdict"] == INFORMATIVE),
                       key=lambda a: per_attribute[a]["p_holm"])
    elif all(w == LIMITED for w in words):
        verdict = LIMITED
        deciding = max(per_attribute, key=lambda a: per_attribute[a]["ci_high"])  # the weakest evidence
    else:
        verdict = INCONCLUSIVE
        deciding = next(a for a in per_attribute if per_attribute[a]["verdict"] == INCONCLUSIVE)
    chosen = per_attribute[deciding]
    half_width = (chosen["ci_high"] - chosen["ci_low"]) / 2 if np.isfinite(chosen["ci_high"] - chosen["ci_low"]) \
        else None
    needed_n = None
    if verdict == INCONCLUSIVE and half_width and np.isfinite(chosen["selectivity"]):
        distance = abs(chosen["selectivity"] - margin)
        needed_n = int(np.ceil(chosen["n"] * (half_width / distance) ** 2)) if distance > 0 else None
    rule = (f"per attribute, informative if the latent selectivity (best layer x step chosen inside the training "
            f"folds) has its {confidence:.0%} interval above {margin:g} and its permutation p-value, Holm-adjusted "
            f"over {len(per_attribute)} attribute(s), below {alpha:g}; limited if the interval is below {margin:g} "
            f"while the {baseline} interval is above {margin:g} (the attribute is readable from the image); "
            "subject informative if any attribute is, limited if all are, else inconclusive")
    evidence = "; ".join(
        f"{a}: latent {v['selectivity']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}] p={v['p_value']:.3g} "
        f"(Holm {v['p_holm']:.3g}), {baseline} "
        + ("not measured" if v["baseline_selectivity"] is None else f"{v['baseline_selectivity']:.3f}")
        + f" -> {v['verdict']}" for a, v in per_attribute.items())
    return Verdict(subject, "visual_info", verdict, rule=rule, margin=margin, estimate=chosen["selectivity"],
                   ci_low=chosen["ci_low"], ci_high=chosen["ci_high"], n=chosen["n"], detectable_effect=half_width,
                   needed_n=needed_n,
                   method=f"nested CV; BCa bootstrap over instances ({confidence:.0%}); permutation test "
                          f"({int(latent.n_permutations.iloc[0]) if 'n_permutations' in latent else '?'} "
                          "permutations) with Holm over attributes",
                   evidence=evidence, details={"attributes": per_attribute, "deciding_attribute": deciding,
                                               "baseline": baseline})
