"""The two causal verdicts of the CapImagine paper (arXiv 2602.22766): input -> latent and latent -> answer.

input_latent ("strong perturbations of the input barely move the latent tokens")
    Rows ``latent_r2`` (from ``latentprobe.stats.latent_effect.latent_r2``, written by ``intervene`` into
    latent_change): per input edit, the placebo-corrected share of the latents' spread that the edit moves,
    R2 = (mean ||t - c||^2 - floor) / (spread - floor), the spread taken among instances that share everything
    but the edited input, with a paired BCa interval over instances; ~1 = the latents follow the input as far as
    another instance's input moves them, ~0 = they ignore it. Where the latents do not vary beyond the noise
    floor the row is ``latent_relative_change`` instead (the placebo-corrected squared change over the latents'
    squared size: "no spread beyond noise: collapsed"), with 1 - cosine beside it as the paper's view. The rows
    of all latent steps together (squared distances add) decide; per-step rows are shown. Only **information**
    edits decide (image swap, question swap: inputs of other real instances); blank, noise and mask inputs are
    judged alike and reported in the ``disruption`` column. Margin ``Margins.latent_r2`` (relative change:
    ``Margins.relative_change``). A text mediator's span is judged the same way (``mediator_r2`` rows).

latent_answer ("strong perturbations of the latent tokens barely move the answer")
    Primary outcome: answer change (rate of answers that differ from the clean answer), with exact
    Clopper-Pearson intervals (instances as units when they have several seeds or donors), minus the placebo
    edit's rate where one was run. Only **information** edits decide (``patch``: another instance's latents;
    the NIE of ``image-swap`` / ``question-swap``; a text mediator's ``text-swap``); disruption edits (noise,
    constants, zero, dropped or shuffled steps, the NIE of blank/noised/masked images, shuffled or truncated
    text) are judged alike and reported beside. `connected` needs some row's lower bound above the margin
    (minimum effect; see ``decision``); `disconnect` needs every row inside the margin, and where NIE rows were
    measured, under BOTH mediator definitions: ``fed_back`` (the fed-back latent vectors) and ``all_layers``
    (the latent positions' states at every layer, so what the latent positions read from the image in upper
    layers counts as latent reasoning too). The verdict says which definition decided. Secondary outcomes
    (accuracy change, gold-answer probability, KL, NIE on correctness) are shown, not decided on.
"""

from __future__ import annotations

import math

import pandas as pd

from ..stats.effects import CHANGE_OUTCOME, applied_only
from .base import NOT_MEASURED, Verdict
from .decision import CONNECTED, DISCONNECT, INCONCLUSIVE_WORD, _fmt, _fmt_count, decide_family, row_stats, rows_frame
from .margins import Margins
from .tidy import tidy_effects

INFORMATION, DISRUPTION = "information", "disruption"
# Interventions whose edited value is one the model computed for another real instance.
INFORMATION_KINDS = frozenset({"patch", "image-swap", "question-swap", "text-swap", "oracle-other"})
PLACEBO = "placebo"
INPUT_LATENT_METRICS = ("latent_r2", "latent_relative_change", "mediator_r2", "mediator_relative_change")
# The latents' own oracle target: a sufficiency reference (no change is expected whether or not the latents
# matter), so it joins neither family. No-latent, markers-only, dummy, noise-norm and mean-step are disruption.
REFERENCE, REFERENCE_KINDS = "reference", frozenset({"oracle"})
PRIMARY_ANSWER_METRIC = "flip_rate"
PRIMARY_NIE = f"NIE_{CHANGE_OUTCOME}"
FALLBACK_NIE = "NIE_correct"  # for effects tables written before answer_changed existed
SECONDARY_ANSWER_METRICS = ("accuracy_change", "gold_prob_change", "kl_clean_to_intervened")
FED_BACK, ALL_LAYERS = "fed_back", "all_layers"

METHOD = ("exact Clopper-Pearson intervals for answer-change rates (instances as units), BCa bootstrap for means, "
          "each minus its placebo; disconnect = whole interval inside the margin, every row (intersection-union); "
          "connected = some row's one-sided lower bound above the margin (minimum effect, Bonferroni over rows)")
INPUT_METHOD = ("placebo-corrected R2 in squared distances, spread among instances sharing the rest of the input, "
                "paired BCa bootstrap over instances; disconnect = every information edit's interval below the "
                "margin; connected = some lower bound above it (Bonferroni over rows)")


def intervention_kind(name: str) -> str:
    """``noise(scale=3,...)`` -> ``noise``."""
    return str(name).split("(")[0]


def is_placebo(intervention: str) -> bool:
    """Whether an intervention is a placebo (the noise floor: the clean input or latents through the edit path).

    >>> is_placebo("placebo(steps=all)"), is_placebo("image-placebo"), is_placebo("patch")
    (True, True, False)
    """
    return PLACEBO in str(intervention)


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
    """Input -> latent (or -> text mediator): `disconnect` if every information edit's placebo-corrected R2 (all
    latent steps together) has its interval below the margin; `connected` if some edit's lower bound is above it;
    else `inconclusive`. Disruption edits are reported, never deciding (see the module docstring)."""
    margin = margins.latent_r2
    rule = (f"on information edits (image swap, question swap), placebo-corrected R2 of the latents' squared change "
            f"(all steps; spread among instances sharing the rest of the input): disconnect if every "
            f"{1 - margins.alpha:.0%} interval is below {margin:g}, connected if some one-sided lower bound is above "
            f"{margin:g}; where the latents have no spread beyond noise, the relative squared change against "
            f"{margins.relative_change:g}. Disruption edits (blank, noise, mask) are reported, never deciding")
    tidy = tidy_effects(applied_only(effects)) if effects is not None and len(effects) else pd.DataFrame()
    rows = tidy[(tidy.subject == subject) & (tidy.target == "input") & tidy.metric_base.isin(INPUT_LATENT_METRICS)] \
        if len(tidy) else tidy
    if rows.empty:
        edited = len(tidy) and ((tidy.subject == subject) & (tidy.target == "input")).any()
        why = ("its input edits ran but measured no latents and no text mediator: a subject without either (a plain "
               "model) has nothing between input and answer to measure, and a table from a latentprobe older than "
               "the placebo-corrected R2 has no latent_r2 rows" if edited else "no input edit ran for this subject")
        return Verdict(subject, "input_latent", NOT_MEASURED, rule=rule, margin=margin, evidence=why)
    rows = rows[~rows.intervention.map(is_placebo)]
    pooled = rows[rows.step.isna()] if rows.step.isna().any() else rows
    by_role = {}
    for role in (INFORMATION, DISRUPTION):
        chosen = pooled[pooled.intervention.map(edit_role) == role]
        stats = [row_stats(r, margins, _label(r)) for _, r in chosen.iterrows()]
        for s_, (_, r) in zip(stats, chosen.iterrows()):
            s_.extra = {"role": role, "target": r.target, "intervention": r.intervention,
                        **{k: r[k] for k in ("floor", "spread", "spread_source", "one_minus_cosine", "collapsed")
                           if k in r.index}}
        by_role[role] = (stats, decide_family(stats, margins) if stats else None)
    disruption = by_role[DISRUPTION][1]
    disruption_text = (f"{disruption.verdict} ({disruption.deciding.text()})" if disruption and disruption.deciding
                       else "no disruption edit was run")
    information = by_role[INFORMATION][1]
    cka = _cka_text(tidy, subject)
    if information is None:
        verdict = Verdict(subject, "input_latent", INCONCLUSIVE_WORD, rule=rule, margin=margin, method=INPUT_METHOD,
                          evidence=("no information edit (image swap, question swap) was run: blank or noisy inputs "
                                    f"alone do not show that the latents follow the input. Disruption: "
                                    f"{disruption_text}{cka}"))
        verdict.details = {"disruption": disruption.verdict if disruption else "",
                           "rows": rows_frame(by_role[DISRUPTION][0], subject=subject, finding="input_latent")}
        return verdict
    verdict = _verdict(subject, "input_latent", information, rule, margin, margins, by_role[DISRUPTION][0])
    verdict.method = INPUT_METHOD
    deciding = information.deciding
    verdict.evidence = _input_sentence(information, margins) + f". Disruption (reported, not deciding): " \
        f"{disruption_text}{cka}"
    verdict.details["disruption"] = disruption.verdict if disruption else ""
    verdict.details["effect_size"] = "placebo-corrected R2" if deciding.metric.endswith("r2") else \
        "relative squared change (no spread beyond noise: collapsed)"
    verdict.details["yardstick"] = str(deciding.extra.get("spread_source", ""))
    verdict.details["placebo"] = deciding.extra.get("floor")
    return verdict


def _input_sentence(family, margins: Margins) -> str:
    r = family.deciding
    what = "R2" if r.metric.endswith("r2") else "relative squared change"
    floor = r.extra.get("floor")
    floor_text = "no placebo run (floor 0)" if floor is None or pd.isna(floor) else f"placebo floor {_fmt(floor)}"
    collapsed = "; no spread beyond noise: collapsed, 1 - cos " + _fmt(r.extra.get("one_minus_cosine")) \
        if bool(r.extra.get("collapsed")) else ""
    bound = {DISCONNECT: f"upper bound {_fmt(r.ci_high)} < margin {_fmt(r.margin)}",
             CONNECTED: f"one-sided lower bound {_fmt(r.connect_bound)} > margin {_fmt(r.margin)}",
             INCONCLUSIVE_WORD: f"interval [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] reaches the margin {_fmt(r.margin)}"}
    return (f"{r.extra.get('intervention', r.label)} moves the latents {what} {_fmt(r.estimate)} of the spread "
            f"between instances ({r.extra.get('spread_source', '')}; n={r.n}; {floor_text}{collapsed}); "
            f"{bound[family.verdict]} ({family.reason})")


def _cka_text(tidy: pd.DataFrame, subject: str) -> str:
    if not len(tidy):
        return ""
    rows = tidy[(tidy.subject == subject) & (tidy.metric_base == "cka_image")]
    if rows.empty:
        return ""
    r = rows.iloc[0]
    p = r.get("p_value")
    return (f". Representational check (reported): linear CKA of clean latents with image-token states "
            f"{_fmt(r.estimate)}" + ("" if p is None or pd.isna(p) else f", permutation p={_fmt(p)}"))


def verdict_latent_answer(effects: pd.DataFrame | None, subject: str, margins: Margins = Margins()) -> Verdict:
    """Latent -> answer, decided on information edits' answer-change rates (see the module docstring)."""
    margin = margins.answer_change
    rule = (f"on information edits (patch, oracle-other, image-swap/question-swap NIE under both mediator definitions, text-swap), "
            f"answer-change rate minus its placebo: disconnect if every {1 - margins.alpha:.0%} exact interval is "
            f"below {margin:g}, connected if some one-sided lower bound (Bonferroni over rows) is above {margin:g}, "
            "else inconclusive. Disruption edits (noise, constants, zero, drop, shuffle, synthetic inputs) are "
            "judged alike and reported beside, never deciding")
    tidy = tidy_effects(applied_only(effects)) if effects is not None and len(effects) else pd.DataFrame()
    if len(tidy):
        tidy = tidy[tidy.subject == subject].copy()
    if tidy.empty:
        return Verdict(subject, "latent_answer", NOT_MEASURED, rule=rule, margin=margin,
                       evidence="no latent, text or mediation rows")
    tidy["mediator_definition"] = _mediator_of(tidy)
    tidy["role"] = tidy.intervention.map(edit_role)
    placebo_mask = tidy.intervention.map(is_placebo)
    placebos, tidy = tidy[placebo_mask], tidy[~placebo_mask]
    primary = _primary_rows(tidy)
    if primary.empty:
        return Verdict(subject, "latent_answer", NOT_MEASURED, rule=rule, margin=margin,
                       evidence="no flip_rate (latent/text target) or NIE rows")
    by_role = {}
    for role in (INFORMATION, DISRUPTION):
        chosen = primary[primary.role == role]
        stats = []
        for _, r in chosen.iterrows():
            s_ = row_stats(r, margins, _label(r), placebo=_placebo_for(r, placebos))
            s_.extra = {"role": role, "target": r.target, "intervention": r.intervention,
                        "mediator": r.mediator_definition if r.mediation_effect else ""}
            stats.append(s_)
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
    text = tidy.target.eq("text").any() or tidy.mediator_definition.eq("text").any()
    mediator_note, decided_by = _both_mediators(by_role[INFORMATION][0], information, text)
    if information.verdict == DISCONNECT and mediator_note:  # the all_layers definition was not measured
        information.verdict = INCONCLUSIVE_WORD
        information.reason = f"{information.reason}, but {mediator_note}"
    verdict = _verdict(subject, "latent_answer", information, rule, margin, margins, by_role[DISRUPTION][0])
    verdict.evidence = _answer_sentence(information, margins, decided_by)
    verdict.evidence += f". Disruption (reported, not deciding): {disruption_text}"
    if secondary:
        verdict.evidence += f". Secondary: {secondary}"
    verdict.details["disruption"] = disruption.verdict if disruption else ""
    verdict.details["mediator"] = decided_by
    deciding = information.deciding
    verdict.details["placebo"] = deciding.placebo if deciding is not None and deciding.has_placebo else None
    verdict.details["effect_size"] = "answer-change rate minus placebo" if deciding is not None and \
        deciding.is_rate else "mean change minus placebo"
    verdict.details["yardstick"] = f"margin {margin:g} of answers"
    return verdict


def _placebo_for(row, placebos: pd.DataFrame):
    """The placebo row matching an effect row (same target, metric and mediator definition; the largest if
    several), or None."""
    if placebos.empty:
        return None
    match = placebos[(placebos.target == row.target) & (placebos.metric_base == row.metric_base)
                     & (placebos.mediator_definition == row.mediator_definition)]
    if match.empty:
        return None
    return match.sort_values("estimate").iloc[-1]


def _both_mediators(stats, family, text: bool) -> tuple[str, str]:
    """(what is missing for a disconnect, which mediator definition decided)."""
    if text:
        return "", "text"
    nie = [s for s in stats if s.extra.get("mediator")]
    if family.verdict == CONNECTED:
        return "", family.deciding.extra.get("mediator") or "patch (fed-back latents)"
    if not nie:
        return "", FED_BACK
    interventions = {s.extra["intervention"] for s in nie}
    missing = sorted(i for i in interventions
                     if not any(s.extra["intervention"] == i and s.extra["mediator"] == ALL_LAYERS for s in nie))
    if missing:
        return (f"the all_layers mediator (what the latent positions read in upper layers) was not measured for "
                f"{', '.join(missing)}", FED_BACK)
    return "", f"{FED_BACK}+{ALL_LAYERS}"


def _answer_sentence(family, margins: Margins, decided_by: str) -> str:
    r = family.deciding
    if r is None:
        return family.reason
    what = r.extra.get("intervention", r.label)
    if r.extra.get("mediator"):
        what = f"{what} (NIE, {r.extra['mediator']} mediator)"
    level = f"{1 - margins.alpha:.0%}"
    if r.is_rate:
        lead = f"{_fmt_count(r.k)} of {r.n} answers changed under {what}"
    else:
        lead = f"{what} changed {r.metric} by {_fmt(r.estimate)} (n={r.n})"
    floor = (f", placebo {_fmt(r.placebo)} subtracted" if r.has_placebo else "; no placebo run (floor 0)")
    if family.verdict == DISCONNECT:
        tail = (f"; {level} upper bound {_fmt(r.ci_high)} < margin {_fmt(r.margin)} (widest of {len(family.rows)} "
                f"row(s), mediator {decided_by})")
    elif family.verdict == CONNECTED:
        tail = f"; one-sided lower bound {_fmt(r.connect_bound)} > margin {_fmt(r.margin)}"
    else:
        tail = f"; {level} interval [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] reaches the margin {_fmt(r.margin)}"
    return f"{lead}{floor}{tail} ({family.reason})"


def _primary_rows(tidy: pd.DataFrame) -> pd.DataFrame:
    """Answer-change rates of latent/text edits, and NIE on answer change (both mediator definitions) of input
    edits; NIE on correctness stands in for an input intervention recorded without answer_changed."""
    edits = tidy[tidy.target.isin(["latent", "text"]) & (tidy.metric_base == PRIMARY_ANSWER_METRIC)]
    inputs = tidy[tidy.target == "input"]
    changed = inputs[inputs.metric_base == PRIMARY_NIE]
    with_changed = set(zip(changed.intervention, changed.mediator_definition))
    fallback = inputs[(inputs.metric_base == FALLBACK_NIE)
                      & ~pd.Series(list(zip(inputs.intervention, inputs.mediator_definition)), index=inputs.index,
                                   dtype=object).isin(with_changed)]
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
