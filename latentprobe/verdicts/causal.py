"""The two causal verdicts of the CapImagine paper (arXiv 2602.22766): input -> latent and latent -> answer.

input_latent ("strong perturbations of the input barely move the latent tokens")
    Family: every input intervention x latent step, metric ``change_ratio`` (how far the latents move, as a
    share of the distance between different instances' latents; 0 = not at all, 1 = as far as another
    instance). Margin ``Margins.change_ratio``.

latent_answer ("strong perturbations of the latent tokens barely move the answer")
    Primary outcome: answer change (rate of answers that differ from the clean answer), with exact
    Clopper-Pearson intervals. The family that decides holds the **information** edits only: edits that
    put in a value the model itself computed for another real input (``patch``: another instance's latents;
    the NIE of ``image-swap`` / ``question-swap``: the latents the model made for the swapped input; a text
    mediator's ``text-swap``). **Disruption** edits (noise, constants, zero, dropped or shuffled steps, the
    NIE of blank/noised/masked images, shuffled or truncated text) put the model off its distribution: an
    answer that breaks under them shows fragility, not that the latents carry the input's information, so
    they are judged separately and reported beside the verdict (``disruption``), never deciding it.
    Mediator definition of the NIE rows: ``fed_back`` (the fed-back latent vectors, layer 0 at the latent
    positions; what the latent positions read from the image in upper layers counts as direct). The
    ``all_layers`` variant (the latent positions' states at every layer) is reported beside it.
    Secondary outcomes (accuracy change, gold-answer probability, KL, NIE on correctness) are shown, not
    decided on: deciding on several outcomes would be another multiplicity, and a correctness change of 0
    hides answers that change both ways.
"""

from __future__ import annotations

import math

import pandas as pd

from ..stats.effects import CHANGE_OUTCOME, applied_only
from .base import NOT_MEASURED, Verdict
from .decision import CONNECTED, DISCONNECT, INCONCLUSIVE_WORD, decide_family, row_stats, rows_frame
from .margins import Margins
from .tidy import tidy_effects

INFORMATION, DISRUPTION = "information", "disruption"
# Interventions whose edited value is one the model computed for another real instance.
INFORMATION_KINDS = frozenset({"patch", "image-swap", "question-swap", "text-swap", "oracle-other"})
# The latents' own oracle target: a sufficiency reference (no change is expected whether or not the latents
# matter), so it joins neither family. No-latent, markers-only, dummy, noise-norm and mean-step are disruption.
REFERENCE, REFERENCE_KINDS = "reference", frozenset({"oracle"})
PRIMARY_ANSWER_METRIC = "flip_rate"
PRIMARY_NIE = f"NIE_{CHANGE_OUTCOME}"
FALLBACK_NIE = "NIE_correct"  # for effects tables written before answer_changed existed
SECONDARY_ANSWER_METRICS = ("accuracy_change", "gold_prob_change", "kl_clean_to_intervened")
FED_BACK, ALL_LAYERS = "fed_back", "all_layers"

METHOD = ("exact Clopper-Pearson intervals for answer-change rates, paired bootstrap for means; equivalence = "
          "whole interval inside the margin, every row (intersection-union, no correction needed); effect = "
          "Holm-adjusted p < alpha over the family")


def intervention_kind(name: str) -> str:
    """``noise(scale=3,...)`` -> ``noise``."""
    return str(name).split("(")[0]


def edit_role(intervention: str) -> str:
    """``information`` for resample/interchange edits (values from another real instance, or another instance's
    oracle latents), ``reference`` for an instance's own oracle latents, else ``disruption``.

    >>> edit_role("patch(steps=all,sem=recompute)"), edit_role("noise(scale=3,rel=std,steps=all,sem=recompute)")
    ('information', 'disruption')
    """
    kind = intervention_kind(intervention)
    if kind in REFERENCE_KINDS:
        return REFERENCE
    return INFORMATION if kind in INFORMATION_KINDS else DISRUPTION


def _label(row) -> str:
    step = "" if pd.isna(row.step) else f" step {int(row.step)}"
    metric = row.metric_base
    return f"{row.intervention}{step} {metric}"


def _mediator_of(rows: pd.DataFrame) -> pd.Series:
    if "mediator" not in rows.columns:
        return pd.Series(FED_BACK, index=rows.index)
    return rows["mediator"].fillna("").replace("", FED_BACK).astype(str)


def verdict_input_latent(effects: pd.DataFrame | None, subject: str, margins: Margins = Margins()) -> Verdict:
    """Input -> latent: `disconnect` if every input intervention x step ``change_ratio`` interval is below the
    margin; `connected` if some row moves the latents (Holm-adjusted); else `inconclusive`."""
    margin = margins.change_ratio
    rule = (f"disconnect if every input intervention x latent step change_ratio has its {1 - margins.alpha:.0%} "
            f"interval below {margin:g}; connected if some row differs from 0 after Holm (alpha {margins.alpha:g}); "
            "else inconclusive")
    tidy = tidy_effects(applied_only(effects)) if effects is not None and len(effects) else pd.DataFrame()
    rows = tidy[(tidy.subject == subject) & (tidy.target == "input") & (tidy.metric_base == "change_ratio")] \
        if len(tidy) else tidy
    if rows.empty:
        return Verdict(subject, "input_latent", NOT_MEASURED, rule=rule, margin=margin,
                       evidence="no change_ratio rows for input interventions")
    stats = [row_stats(r, margins, _label(r)) for _, r in rows.iterrows()]
    family = decide_family(stats, margins)
    return _verdict(subject, "input_latent", family, rule, margin, margins, [])


def verdict_latent_answer(effects: pd.DataFrame | None, subject: str, margins: Margins = Margins()) -> Verdict:
    """Latent -> answer, decided on information edits' answer-change rates (see the module docstring)."""
    margin = margins.answer_change
    rule = (f"on information edits (patch, oracle-other, image-swap/question-swap NIE, text-swap), disconnect if "
            f"every answer-change "
            f"rate has its {1 - margins.alpha:.0%} exact interval below {margin:g}; connected if some rate differs "
            f"from 0 after Holm (alpha {margins.alpha:g}); else inconclusive. Disruption edits (noise, constants, "
            "zero, drop, shuffle, synthetic inputs) are judged alike and reported beside, never deciding")
    tidy = tidy_effects(applied_only(effects)) if effects is not None and len(effects) else pd.DataFrame()
    if len(tidy):
        tidy = tidy[tidy.subject == subject].copy()
    if tidy.empty:
        return Verdict(subject, "latent_answer", NOT_MEASURED, rule=rule, margin=margin,
                       evidence="no latent, text or mediation rows")
    tidy["mediator_definition"] = _mediator_of(tidy)
    tidy["role"] = tidy.intervention.map(edit_role)
    primary = _primary_rows(tidy)
    if primary.empty:
        return Verdict(subject, "latent_answer", NOT_MEASURED, rule=rule, margin=margin,
                       evidence="no flip_rate (latent/text target) or NIE rows")
    by_role = {}
    for role in (INFORMATION, DISRUPTION):
        chosen = primary[primary.role == role]
        stats = [row_stats(r, margins, _label(r)) for _, r in chosen.iterrows()]
        for s, (_, r) in zip(stats, chosen.iterrows()):
            s.extra = {"role": role, "target": r.target, "intervention": r.intervention,
                       "mediator": r.mediator_definition if r.mediation_effect else ""}
        by_role[role] = (stats, decide_family(stats, margins) if stats else None)
    disruption = by_role[DISRUPTION][1]
    disruption_text = (f"{disruption.verdict}: {disruption.deciding.text()} ({disruption.reason})"
                       if disruption and disruption.deciding else "no disruption edit was run")
    secondary = _secondary_text(tidy)
    information = by_role[INFORMATION][1]
    if information is None:
        verdict = Verdict(subject, "latent_answer", INCONCLUSIVE_WORD, rule=rule, margin=margin, method=METHOD,
                          evidence=("no information edit was run (patch, oracle-other, image-swap NIE, text-swap): "
                                    "off-distribution "
                                    f"edits alone cannot show what the latents carry. Disruption: {disruption_text}"))
        verdict.details = {"disruption": disruption.verdict if disruption else "", "mediator": FED_BACK,
                           "rows": rows_frame(by_role[DISRUPTION][0], subject=subject, finding="latent_answer")}
        return verdict
    verdict = _verdict(subject, "latent_answer", information, rule, margin, margins, by_role[DISRUPTION][0])
    verdict.evidence += f". Disruption (reported, not deciding): {disruption_text}"
    if secondary:
        verdict.evidence += f". Secondary: {secondary}"
    verdict.details["disruption"] = disruption.verdict if disruption else ""
    text = tidy.target.eq("text").any() or tidy.mediator_definition.eq("text").any()
    verdict.details["mediator"] = "text" if text else FED_BACK
    return verdict


def _primary_rows(tidy: pd.DataFrame) -> pd.DataFrame:
    """Answer-change rates of latent/text edits, and NIE on answer change (fed-back mediator) of input edits;
    NIE on correctness stands in for an input intervention recorded without answer_changed."""
    edits = tidy[tidy.target.isin(["latent", "text"]) & (tidy.metric_base == PRIMARY_ANSWER_METRIC)]
    # the deciding definition: the fed-back vectors (or a text mediator's text), not the all-layers variant
    fed_back = tidy[(tidy.mediator_definition != ALL_LAYERS) & (tidy.target == "input")]
    changed = fed_back[fed_back.metric_base == PRIMARY_NIE]
    with_changed = set(changed.intervention)
    fallback = fed_back[(fed_back.metric_base == FALLBACK_NIE) & ~fed_back.intervention.isin(with_changed)]
    return pd.concat([edits, changed, fallback])


def _secondary_text(tidy: pd.DataFrame) -> str:
    parts = []
    full = tidy[(tidy.mediator_definition == ALL_LAYERS) & (tidy.metric_base.isin([PRIMARY_NIE, "NDE_" + CHANGE_OUTCOME]))]
    for _, r in full.iterrows():
        parts.append(f"{r.intervention} {r.metric_base} (all_layers mediator) {_interval(r)}")
    correctness = tidy[(tidy.mediator_definition != ALL_LAYERS) & (tidy.metric_base == "NIE_correct")]
    for _, r in correctness.iterrows():
        parts.append(f"{r.intervention} NIE_correct {_interval(r)}")
    return "; ".join(parts)


def _interval(r) -> str:
    from .decision import _fmt

    return f"{_fmt(r.estimate)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]"


def _verdict(subject, finding, family, rule, margin, margins, extra_rows) -> Verdict:
    deciding = family.deciding
    lead = {DISCONNECT: "widest row", CONNECTED: "strongest row", INCONCLUSIVE_WORD: "widest row"}[family.verdict]
    evidence = f"{family.reason}; {lead}: {deciding.text()}" if deciding else family.reason
    needed = family.needed_n
    verdict = Verdict(
        subject, finding, family.verdict, rule=rule, margin=margin,
        estimate=deciding.estimate if deciding else None,
        ci_low=deciding.ci_low if deciding else None, ci_high=deciding.ci_high if deciding else None,
        n=deciding.n if deciding else None,
        detectable_effect=None if math.isnan(family.detectable_effect) else float(family.detectable_effect),
        needed_n=None if math.isnan(needed) or math.isinf(needed) else int(needed),
        method=METHOD, evidence=evidence)
    rows = rows_frame(family.rows, subject=subject, finding=finding)
    if extra_rows:
        rows = pd.concat([rows, rows_frame(extra_rows, subject=subject, finding=finding)], ignore_index=True)
    verdict.details = {"rows": rows, "ruled_out_beyond": family.ruled_out_beyond,
                       "needed_n_unreachable": bool(math.isinf(needed))}
    return verdict
