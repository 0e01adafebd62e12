"""TEMPORARY (until the collapse-and-probes rework lands): the previous collapse and visual-information rules,
ported to the new vocabulary and to the agreed signatures, so that every finding has a verdict on this branch.

They are replaced, through ``latentprobe.verdicts.all_verdicts``, by ``verdicts.collapse.verdict_collapse``
and ``verdicts.visual_info.verdict_visual_info`` as soon as those modules exist. Their known weaknesses
(centring on one pooled mean; probe controls that cannot detect memorisation) are issue 9 items 7 and 8.
"""

from __future__ import annotations

import pandas as pd

from ..probes import best_probe_rows
from .base import INCONCLUSIVE, NOT_MEASURED, Verdict
from .decision import _fmt

_CENTRING, _BASELINE, _VISUAL_BASELINE, _MIN_BASELINE_SELECTIVITY = "centred", "prompt_last", "image_mean", 0.05


def _interval(estimate, low, high) -> str:
    return f"{_fmt(estimate)} [{_fmt(low)}, {_fmt(high)}]"


def verdict_collapse(similarity: pd.DataFrame | None, subject: str, *, margin: float = 0.1,
                     alpha: float = 0.05) -> Verdict:
    """Interim: last-step centred latent similarity against the prompt_last baseline."""
    rule = (f"(interim rule) at the last latent step, collapsed if the centred latent similarity exceeds the "
            f"{_BASELINE} baseline by >= {margin:g} with its lower CI above the baseline's upper CI; not collapsed "
            f"if its upper CI is < baseline + {margin:g}; else inconclusive")
    method = "percentile bootstrap over instances (95%)"
    if similarity is None or similarity.empty:
        return Verdict(subject, "collapse", NOT_MEASURED, rule=rule, margin=margin, evidence="no similarity table")
    rows = similarity[(similarity.subject == subject) & (similarity.centring == _CENTRING)]
    if "layer" in rows.columns and rows.layer.notna().any():
        rows = rows[rows.layer == rows.layer.max()]
    latent = rows[(rows.representation == "latent") & rows.mean_similarity.notna() & (rows.n >= 2)]
    if latent.empty:
        return Verdict(subject, "collapse", NOT_MEASURED, rule=rule, margin=margin,
                       evidence=f"no {_CENTRING} latent similarity rows")
    last = latent.sort_values("step").iloc[-1]
    evidence = (f"{_CENTRING} latent similarity at last step {int(last.step)}: "
                f"{_interval(last.mean_similarity, last.ci_low, last.ci_high)} (n={int(last.n)})")
    common = dict(rule=rule, margin=margin, estimate=float(last.mean_similarity), ci_low=float(last.ci_low),
                  ci_high=float(last.ci_high), n=int(last.n), method=method)
    baseline = rows[rows.representation == _BASELINE]
    if baseline.empty:
        return Verdict(subject, "collapse", INCONCLUSIVE, evidence=evidence + f"; baseline {_BASELINE} not measured",
                       **common)
    base = baseline.iloc[0]
    evidence += f"; {_BASELINE}: {_interval(base.mean_similarity, base.ci_low, base.ci_high)}"
    if last.ci_high < base.mean_similarity + margin:
        word = "not collapsed"
    elif last.mean_similarity - base.mean_similarity >= margin and last.ci_low > base.ci_high:
        word = "collapsed"
    else:
        word = INCONCLUSIVE
    return Verdict(subject, "collapse", word, evidence=evidence, **common)


def verdict_visual_info(probes: pd.DataFrame | None, subject: str, *, margin: float = 0.1,
                        alpha: float = 0.05) -> Verdict:
    """Interim: best latent probe selectivity against the best image-token selectivity, per attribute."""
    rule = (f"(interim rule) per attribute, limited if the best latent selectivity is < the best {_VISUAL_BASELINE} "
            f"selectivity - {margin:g}; informative if it is >= the {_VISUAL_BASELINE} one; inconclusive otherwise or "
            f"if {_VISUAL_BASELINE} selectivity < {_MIN_BASELINE_SELECTIVITY:g}. limited if every attribute is, "
            "informative if any is")
    method = "cross-validated probe accuracy (folds by instance); no interval"
    if probes is None or probes.empty or not {"subject", "representation", "attribute"} <= set(probes.columns):
        return Verdict(subject, "visual_info", NOT_MEASURED, rule=rule, margin=margin,
                       evidence="no probe table with subject/representation/attribute")
    best = best_probe_rows(probes[probes.subject == subject])
    if best.empty or "latent" not in set(best.representation):
        return Verdict(subject, "visual_info", NOT_MEASURED, rule=rule, margin=margin, evidence="no latent probe that ran")
    words, parts = [], []
    for attribute, rows in best.groupby("attribute", sort=True):
        latent = rows[rows.representation == "latent"]
        if latent.empty:
            continue
        latent = latent.iloc[0]
        text = f"{attribute}: latent {_fmt(latent.selectivity)}"
        image = rows[rows.representation == _VISUAL_BASELINE]
        if image.empty:
            words.append(INCONCLUSIVE)
            parts.append(text + f" vs {_VISUAL_BASELINE} not measured")
            continue
        image_selectivity = float(image.iloc[0].selectivity)
        text += f" vs {_VISUAL_BASELINE} {_fmt(image_selectivity)}"
        if image_selectivity < _MIN_BASELINE_SELECTIVITY:
            words.append(INCONCLUSIVE)
        elif latent.selectivity < image_selectivity - margin:
            words.append("limited")
        elif latent.selectivity >= image_selectivity:
            words.append("informative")
        else:
            words.append(INCONCLUSIVE)
        parts.append(text)
    if not words:
        word = NOT_MEASURED
    elif "informative" in words:
        word = "informative"
    elif all(w == "limited" for w in words):
        word = "limited"
    else:
        word = INCONCLUSIVE
    return Verdict(subject, "visual_info", word, rule=rule, margin=margin, method=method,
                   evidence="best selectivity per attribute: " + "; ".join(parts))
