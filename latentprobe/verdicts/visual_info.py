"""The visual-information verdict: can linear probes read the image's attributes from the latent tokens?

It reads the ``nested`` rows of the probe table (:func:`latentprobe.stats.probes.probe_table`): per attribute and
representation, the best layer x step chosen inside the training folds and scored on held-out instances, with
``score_excess`` (score - chance: accuracy over the training folds' majority share, or R^2), its **unconditional**
interval ``score_excess_ci_low/high`` (the whole procedure refitted over repeated grouped CV, corrected resampled t),
the permutation ``p_value`` of the score against chance and the probe's ``capacity``. The rule, with ``margin`` on
the score-over-chance scale (accuracy points, or R^2):

- an attribute is **informative** when the latents' score-over-chance interval lies above ``margin`` *and* its
  permutation p-value, Holm-adjusted over the subject's attributes, is below ``alpha``;
- an attribute is **limited** when the latents' interval lies below ``margin`` (a probe of the stated capacity
  reads at most ``margin`` above chance: positive evidence of little information, not merely a low estimate)
  *and* the image-token baseline's interval lies above ``margin`` (the same probe reads the attribute from the
  image states of the same instances, so it could have found it). The baseline is the image tokens pooled onto a
  coarse spatial grid (:mod:`latentprobe.stats.image_readout`) when the trace kept every image token, else their
  mean; the mean of all tokens dilutes a local attribute (one cell's colour) until nothing reads it;
- otherwise the attribute is **inconclusive**.

Selectivity (score - the Hewitt & Liang control score, the control's labels now a permutation of the real
labels over types so both tasks share one chance level) is reported as a diagnostic column: it compares probe
expressivity and is no evidence of absence (latents that *are* the image identity get selectivity ~0 against an
image-identity control although they determine every image attribute). Tables made before issue 18 (no
``score_excess`` columns) are judged by the former selectivity rule, and the verdict says so.

The subject is ``informative`` if any attribute is, ``limited`` if every attribute is (intersection-union),
otherwise ``inconclusive``; ``not measured`` without nested latent rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from .base import INCONCLUSIVE, NOT_MEASURED, Verdict
from .decision import _fmt, holm as holm_adjust

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
    return rows[ran & rows.score.notna()].drop_duplicates("attribute").set_index("attribute") \
        if "score" in rows.columns else \
        rows[ran & rows.selectivity.notna()].drop_duplicates("attribute").set_index("attribute")


def _interval(row) -> str:
    return f"{row.selectivity:.3f} [{row.selectivity_ci_low:.3f}, {row.selectivity_ci_high:.3f}]"


def _score_columns(rows: pd.DataFrame) -> tuple[str, str, str, bool]:
    """The columns the rule reads: score over chance with its unconditional interval, or (tables made before
    issue 18) the selectivity with its conditional one."""
    if {"score_excess", "score_excess_ci_low", "score_excess_ci_high"} <= set(rows.columns) \
            and rows.score_excess_ci_low.notna().any():
        return "score_excess", "score_excess_ci_low", "score_excess_ci_high", True
    return "selectivity", "selectivity_ci_low", "selectivity_ci_high", False


def verdict_visual_info(probes: pd.DataFrame | None, subject: str, *, margin: float = 0.1, alpha: float = 0.05,
                        baseline: str = "auto") -> Verdict:
    """Decide ``visual_info`` for one subject from its probe table (see the module docstring for the rule).

    Parameters
    ----------
    probes : DataFrame or None
        Concatenated :func:`latentprobe.probes.probe_table` outputs (several subjects and attributes).
    subject : str
    margin : float
        Selectivity margin, default 0.1.
    alpha : float
        Family-wise error rate over the subject's attributes (Holm) for ``informative``; the tables'
        two-sided intervals must be at least ``1 - 2 * alpha`` wide (95% intervals: 2.5% per side).
    baseline : str
        The representation that shows an attribute is readable at all. "auto" (default): the image tokens on a
        coarse spatial grid (``image_tokens``) when the table has them, else the mean image-token state
        (``image_mean``), whose average dilutes a local attribute such as one cell's colour.

    Returns
    -------
    Verdict
        ``limited`` | ``informative`` | ``inconclusive`` | ``not measured``; the deciding attribute's latent
        selectivity as estimate and interval, the interval's half-width as ``detectable_effect``, and per
        attribute details (selectivity, interval, raw and Holm p-values, baseline selectivity, verdict).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from latentprobe.probes import probe_table
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
    if baseline == "auto":  # fixed before looking at any score: the grid when it was probed, else the mean
        baseline = "image_tokens" if not _nested_rows(probes, subject, "image_tokens").empty else "image_mean"
    reference = _nested_rows(probes, subject, baseline)
    value, low_col, high_col, unconditional = _score_columns(latent)
    p_values = latent.p_value.to_numpy(dtype=float)
    testable = np.isfinite(p_values)
    holm = np.full(len(p_values), np.nan)
    if testable.any():
        holm[testable] = holm_adjust(p_values[testable], alpha)[1]

    per_attribute = {}
    for (attribute, row), adjusted in zip(latent.iterrows(), holm):
        base = reference.loc[attribute] if attribute in reference.index else None
        base_low = None if base is None or low_col not in base.index or pd.isna(base[low_col]) else float(base[low_col])
        readable = base_low is not None and base_low > margin
        low, high = float(row[low_col]), float(row[high_col])
        if low > margin and adjusted < alpha:
            word = INFORMATIVE
        elif high < margin and readable:
            word = LIMITED
        else:
            word = INCONCLUSIVE
        per_attribute[attribute] = {
            "verdict": word, "estimate": float(row[value]), "ci_low": low, "ci_high": high,
            "selectivity": float(row.selectivity) if pd.notna(row.get("selectivity")) else np.nan,
            "p_value": float(row.p_value), "p_holm": float(adjusted),
            "n": int(row.n), "cell": f"{int(row.layer)}/{int(row.step)}" if "layer" in row else "",
            "capacity": str(row.get("capacity") or "a ridge probe"),
            "baseline_estimate": None if base is None else float(base[value]),
            "baseline_ci_low": base_low,
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
    if verdict == INCONCLUSIVE and half_width and np.isfinite(chosen["estimate"]):
        distance = abs(chosen["estimate"] - margin)
        needed_n = int(np.ceil(chosen["n"] * (half_width / distance) ** 2)) if distance > 0 else None
    what = "score over chance" if unconditional else \
        "selectivity (a probe table from a latentprobe older than the score over chance)"
    rule = (f"per attribute, informative if the latents' {what} (best layer x step chosen inside the training "
            f"folds) has its {confidence:.0%} interval above {margin:g} and its permutation p-value, Holm-adjusted "
            f"over {len(per_attribute)} attribute(s), below {alpha:g}; limited if the interval is below {margin:g} "
            f"while the {baseline} interval is above {margin:g} (the attribute is readable from the image); "
            "subject informative if any attribute is, limited if all are, else inconclusive")
    evidence = "; ".join(
        f"{a}: latent {what.split(' (')[0]} {_fmt(v['estimate'])} [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}] "
        f"(p={_fmt(v['p_value'])}, Holm {_fmt(v['p_holm'])}), {baseline} "
        + ("not measured" if v["baseline_estimate"] is None else
           f"{_fmt(v['baseline_estimate'])} (lower bound {_fmt(v['baseline_ci_low'])})")
        + f", selectivity {_fmt(v['selectivity'])} (diagnostic) -> {v['verdict']}" for a, v in per_attribute.items())
    # the per-attribute results first: the report's matrix shows the evidence's opening words
    evidence = evidence + f". Probe: {chosen['capacity']}; margin {margin:g} over chance."
    interval_method = ("repeated grouped CV, corrected resampled t (Nadeau & Bengio), unconditional" if unconditional
                       else f"BCa bootstrap over instances ({confidence:.0%}), conditional on the fitted probes")
    return Verdict(subject, "visual_info", verdict, rule=rule, margin=margin, estimate=chosen["estimate"],
                   ci_low=chosen["ci_low"], ci_high=chosen["ci_high"], n=chosen["n"], detectable_effect=half_width,
                   needed_n=needed_n,
                   method=f"nested CV; {interval_method}; permutation test "
                          f"({int(latent.n_permutations.iloc[0]) if 'n_permutations' in latent else '?'} "
                          "permutations) with Holm over attributes",
                   evidence=evidence, details={"attributes": per_attribute, "deciding_attribute": deciding,
                                               "baseline": baseline,
                                               "effect_size": what, "yardstick": f"{baseline} probe, chance level",
                                               "placebo": None})
