"""The study report: per-subject verdicts on the paper's four findings, as Markdown and self-contained HTML.

Pure rendering: the decisions come from :mod:`latentprobe.verdicts` (rules, margins, multiplicity), this
module only lays them out. The report is built once as a list of blocks (headings, paragraphs, tables,
figures) and rendered twice, so the Markdown and the HTML always say the same thing. The HTML embeds every
image as a base64 data URI and its CSS inline: it makes no request when opened.

Every verdict is printed with its rule, margin, the deciding estimate and interval, n, the smallest effect
the run could detect and the n that would have been needed; a plain-words section explains the rules.
A finding whose inputs are missing is reported as "not measured", never guessed.
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from ..fileio import atomic_write_text
from ..stats.probes import best_probe_rows, skipped_probes
from ..verdicts import (EFFECT_COLUMNS, FINDINGS, INCONCLUSIVE, NOT_MEASURED, VOCABULARY, Margins, evidence_rows,
                       judge, tidy_effects, verdict_table)

__all__ = ["FINDINGS", "FINDING_TITLES", "EFFECT_COLUMNS", "Margins", "tidy_effects", "write_report"]

VERDICT_WORDS = tuple(dict.fromkeys(word for words in VOCABULARY.values() for word in words))
FINDING_TITLES = {
    "input_latent": "Input-latent disconnect",
    "latent_answer": "Latent-answer disconnect",
    "collapse": "Collapse of latent tokens",
    "visual_info": "Limited visual information in latent tokens",
}
FINDING_CLAIMS = {
    "input_latent": "Strong perturbations of the input (image swap, noise, blanking) barely move the latent tokens.",
    "latent_answer": "Strong perturbations of the latent tokens (noise, a constant, extreme values, patching) "
                     "barely move the answer.",
    "collapse": "Latent tokens of different instances are highly similar, and more so at later latent steps.",
    "visual_info": "Linear probes read little visual information from the latent tokens.",
}
# What the paper's null word and its opposite mean for each finding, in the report's words.
FINDING_WORDS = {
    "input_latent": "disconnect = the paper's null claim holds; connected = the input measurably moves the latents",
    "latent_answer": "disconnect = the paper's null claim holds; connected = the latents carry information to the "
                     "answer",
    "collapse": "collapsed = the paper's claim holds; not collapsed = the latents stay as different as baselines",
    "visual_info": "limited = the paper's claim holds; informative = probes read the image from the latents",
}
EFFECT_TARGETS = ("input", "latent", "text")


# ------------------------------------------------------------------------------------------ formatting


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if math.isinf(value):
        return "unreachable"
    if value != 0 and abs(value) < 0.001:
        return f"{value:.2g}"
    return f"{value:.3f}"


def _count(value) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value))) or value is pd.NA:
        return "n/a"
    return "unreachable" if isinstance(value, float) and math.isinf(value) else str(int(value))


def _interval(estimate, low, high) -> str:
    return f"{_number(estimate)} [{_number(low)}, {_number(high)}]"


def _step_text(step) -> str:
    return "" if pd.isna(step) else f" step {int(step)}"


def _subject_names(subjects, *tables) -> list[str]:
    names = [str(s.get("name")) for s in (subjects or []) if s.get("name") is not None]
    for table in tables:
        if table is not None and "subject" in table.columns:
            names += sorted(str(s) for s in table.subject.dropna().unique())
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------- blocks


@dataclass
class _Heading:
    level: int
    text: str


@dataclass
class _Paragraph:
    text: str
    label: str = ""  # a bold lead-in such as "Rule"


@dataclass
class _Bullets:
    items: list[str]


@dataclass
class _Table:
    frame: pd.DataFrame
    caption: str = ""


@dataclass
class _Figure:
    path: Path
    caption: str


@dataclass
class _VerdictLine:
    subject: str
    verdict: str
    evidence: str


def _effects_display(rows: pd.DataFrame) -> pd.DataFrame:
    mediator = rows["mediator"].fillna("").astype(str) if "mediator" in rows.columns else pd.Series("", index=rows.index)
    counts = rows["k"] if "k" in rows.columns else pd.Series(np.nan, index=rows.index)
    method = rows["interval"].fillna("").astype(str) if "interval" in rows.columns else pd.Series("", index=rows.index)
    return pd.DataFrame({
        "subject": rows.subject.astype(str),
        "target": rows.target.astype(str),
        "intervention": rows.intervention.astype(str),
        "metric": rows.metric_base.astype(str),
        "mediator": mediator.to_numpy(),
        "step": [("" if pd.isna(s) else str(int(s))) for s in rows.step],
        "estimate [95% CI]": [_interval(e, lo, hi) for e, lo, hi in zip(rows.estimate, rows.ci_low, rows.ci_high)],
        "k / n": [(f"{int(k)}/{_number(n)}" if pd.notna(k) else _number(n)) for k, n in zip(counts, rows.n)],
        "interval": method.to_numpy(),
    })


def _verdict_display(table: pd.DataFrame) -> pd.DataFrame:
    """The verdicts with their evidence columns, one line per subject x finding."""
    return pd.DataFrame({
        "subject": table.subject.astype(str),
        "finding": table.finding.astype(str),
        "verdict": table.verdict.astype(str),
        "margin": [_number(v) for v in table.margin],
        "estimate [CI]": [_interval(e, lo, hi) if e is not None and pd.notna(e) else "n/a"
                          for e, lo, hi in zip(table.estimate, table.ci_low, table.ci_high)],
        "n": [_count(v) for v in table.n],
        "detectable effect": [_number(v) for v in table.detectable_effect],
        "needed n": [_count(v) for v in table.needed_n],
        "disruption": table.disruption.fillna("").astype(str),
    })


def _evidence_rows_display(rows: pd.DataFrame) -> pd.DataFrame:
    role = rows["role"].fillna("").astype(str) if "role" in rows.columns else pd.Series("", index=rows.index)
    return pd.DataFrame({
        "subject": rows.subject.astype(str),
        "role": role.to_numpy(),
        "row": rows.row.astype(str),
        "estimate [CI]": [_interval(e, lo, hi) for e, lo, hi in zip(rows.estimate, rows.ci_low, rows.ci_high)],
        "k / n": [(f"{int(k)}/{int(n)}" if pd.notna(k) else str(int(n))) for k, n in zip(rows.k, rows.n)],
        "margin": [_number(v) for v in rows.margin],
        "Holm p": [_number(v) for v in rows.p_holm],
        "row decision": rows.row_decision.astype(str),
        "detectable effect": [_number(v) for v in rows.detectable_effect],
    })


def _similarity_display(rows: pd.DataFrame) -> pd.DataFrame:
    """The collapse table: the spread ratio the verdict reads first, then the raw cosine view."""
    layer = {"layer": rows.layer.astype(str)} if "layer" in rows.columns else {}
    statistic = rows.statistic.astype(str) if "statistic" in rows.columns else pd.Series("cosine", index=rows.index)
    reference = rows.reference.fillna("").astype(str) if "reference" in rows.columns else ""
    value = rows.estimate if "estimate" in rows.columns else rows.mean_similarity
    return pd.DataFrame({
        "subject": rows.subject.astype(str),
        **layer,
        "representation": rows.representation.astype(str),
        "statistic": statistic,
        "vs": reference,
        "centring": rows.centring.astype(str) if "centring" in rows.columns else "",
        "step": [("" if pd.isna(s) or s < 0 else str(int(s))) for s in rows.step],
        "estimate [95% CI]": [_interval(m, lo, hi) for m, lo, hi in zip(value, rows.ci_low, rows.ci_high)],
        "n": [_number(n) for n in rows.n],
    })


def _probe_display(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "subject": rows.subject.astype(str),
        "attribute": rows.attribute.astype(str),
        "representation": rows.representation.astype(str),
        "layer": [str(int(v)) for v in rows.layer],
        "step": [("" if pd.isna(s) or s < 0 else str(int(s))) for s in rows.step],
        "metric": rows.metric.astype(str),
        "score ± std": [f"{_number(m)} ± {_number(s)}" for m, s in zip(rows.score, rows.score_std)],
        "control ± std": [f"{_number(m)} ± {_number(s)}" for m, s in zip(rows.control_score, rows.control_std)],
        "selectivity": [_number(v) for v in rows.selectivity],
        "chance": [_number(v) for v in rows.chance],
        "n": [_number(v) for v in rows.n],
    })


INPUT_LATENT_METRICS = ("change_ratio", "cosine", "mediator_text_similarity")
LATENT_ANSWER_METRICS = ("accuracy_change", "flip_rate", "gold_prob_change", "kl_clean_to_intervened")


def _finding_measurements(finding: str, effects, similarity, probes) -> list:
    """The tables of numbers behind one finding, or a "not measured" paragraph."""
    if finding in ("input_latent", "latent_answer"):
        if effects is None or effects.empty:
            return [_Paragraph("no effects summary was given.", "Not measured")]
        tidy = tidy_effects(effects)
        # Only the metrics a reader needs for this finding; every metric is in the appendix.
        if finding == "input_latent":
            rows = tidy[(tidy.target == "input") & tidy.metric_base.isin(INPUT_LATENT_METRICS)]
            what = ("input interventions: how far each latent step moves (change_ratio drives the verdict; "
                    "all metrics in the appendix)")
        else:
            answer_rows = tidy.target.isin(["latent", "text"]) & tidy.metric_base.isin(LATENT_ANSWER_METRICS)
            mediation_rows = tidy.mediation_effect.isin(["TE", "NDE", "NIE"])
            rows = tidy[answer_rows | mediation_rows]
            what = ("latent / text-mediator interventions and mediation effects (TE, NDE, NIE) per outcome and "
                    "mediator definition; all metrics in the appendix")
        if rows.empty:
            return [_Paragraph(f"the effects summary has no rows for this finding ({what}).", "Not measured")]
        order = ["subject", "target", "intervention", "metric_base", "step"]
        return [_Table(_effects_display(rows.sort_values(order, na_position="first")), what)]
    if finding == "collapse":
        if similarity is None or similarity.empty:
            return [_Paragraph("no similarity table was given.", "Not measured")]
        return [_Table(_similarity_display(similarity), "inter-instance cosine similarity (step blank = baseline)")]
    if probes is None or probes.empty:
        return [_Paragraph("no probe table was given.", "Not measured")]
    best = best_probe_rows(probes)
    if best.empty:
        return [_Paragraph("every probe was skipped; see the appendix for the reasons.", "Not measured")]
    note = ("best layer/step per representation by selectivity (selecting the best of many cells is optimistic, "
            "which favours the latents)")
    return [_Table(_probe_display(best), note)]


def _figure_blocks(paths: Iterable) -> list:
    blocks = []
    for path in paths:
        path = Path(path)
        blocks.append(_Figure(path, path.stem.replace("_", " ")))
    return blocks


def _key_value_table(mapping: Mapping) -> pd.DataFrame:
    return pd.DataFrame({"field": [str(k) for k in mapping], "value": [str(v) for v in mapping.values()]})


def reading_guide(margins: Margins) -> list[tuple[str, list[str]]]:
    """The decision rules and every metric in plain words, with the margins in force (printed in the report)."""
    alpha, level = margins.alpha, f"{1 - margins.alpha:.0%}"
    return [
        ("What is tested", [
            "The paper under test is CapImagine (arXiv 2602.22766). It argues that the latent visual tokens of Monet, "
            "LVR and Mirage are decoration, with four claims: the input barely moves the latents (input-latent "
            "disconnect), the latents barely move the answer (latent-answer disconnect), the latents of different "
            "instances collapse onto each other, and linear probes read little visual information from them.",
            "Three of these are null claims: they say an effect is absent. A run that simply fails to find an effect "
            "is no evidence of absence: a small or noisy run fails to find anything. So a null is affirmed only by an "
            "equivalence test: the effect's whole confidence interval must lie inside a stated margin of "
            "negligible effects (Schuirmann's two one-sided tests, TOST). An interval that contains 0 but reaches "
            "beyond the margin is inconclusive, and the report says how many instances would decide it.",
        ]),
        ("The words", [f"{FINDING_TITLES[f]}: {FINDING_WORDS[f]}; inconclusive = the data cannot tell; not measured "
                       "= the run has no input for this finding." for f in FINDINGS]),
        ("Decision rules", [
            f"Every interval is two-sided {level}. Rates of answer changes use exact Clopper-Pearson binomial "
            "intervals (0 changes in n instances still give an upper bound near 3.7/n, never [0, 0]); means of "
            "signed or continuous outcomes use a paired bootstrap over instances.",
            f"disconnect (the null): EVERY row the verdict combines is equivalent, its interval inside (-margin, "
            f"margin). Requiring every row is an intersection-union test: each row's test at level {alpha:g} makes the "
            "joint claim level {:g}, so no multiplicity correction is needed (and none is applied); one wide row is "
            "enough to withhold the claim.".format(alpha),
            f"connected (the effect): SOME row differs from 0 in the direction of an effect, with p-values adjusted "
            f"by Holm's step-down method over the rows the verdict combines (family-wise error {alpha:g}). Without "
            "the adjustment, six rows with no effect would give a false 'connected' about a quarter of the time.",
            "A row that is both equivalent and different from 0 (a real but tiny effect) counts as equivalent: an "
            "effect shown to be smaller than the margin is negligible by the margin's definition.",
            "Anything else is inconclusive, printed with the n that would have been needed (exact binomial "
            f"computation for rates, statsmodels' t-test power for means, at power {margins.power:g}) and the "
            "smallest effect the run could have detected at that power.",
            f"Margins in force: {margins.describe()}. Change them with latentprobe.verdicts.Margins "
            "(or `latentprobe plan RUN_DIR --margin M` to plan a run).",
        ]),
        ("Latent -> answer: information versus disruption", [
            "The latent-answer verdict is decided on information edits only: values the model itself computed for "
            "another real input (patch: another instance's latents; the natural indirect effect of an image or "
            "question swap; text-swap for a text mediator). Such values stay on the model's distribution, so an "
            "answer that moves under them shows that the latents carry the input's information.",
            "Disruption edits (Gaussian noise, a constant or zero latent, dropped or shuffled steps, latents made "
            "from blank, noised or masked images, shuffled or truncated text) put the model off its distribution: "
            "a model can break under them although its latents carry nothing (the Mirage organism does). They are "
            "judged with the same rule and printed beside the verdict as 'disruption', never deciding it.",
            "The primary outcome is answer change (did the answer differ from the clean answer); accuracy change, "
            "gold-answer probability and KL are secondary and shown, not decided on: accuracy can stay flat while "
            "30% of answers change in both directions.",
        ]),
        ("Metrics", [
            "flip_rate: share of instances whose parsed answer differs from the clean answer (unparsable on one side "
            "only counts as a change).",
            "answer_changed: the same answer-change indicator used as a mediation outcome; TE/NDE/NIE on it are rates "
            "of changed answers.",
            "TE = Y(x1) - Y(x0): the whole effect of the input edit x0 -> x1 on outcome Y. NDE = Y(x1, Z(x0)) - "
            "Y(x0, Z(x0)): the edit with the mediator Z held at its clean value (direct route). NIE = Y(x0, Z(x1)) - "
            "Y(x0, Z(x0)): the clean input with the mediator taken from the edited run (route through Z). "
            "interaction = TE - NDE - NIE.",
            "Mediator definitions: fed_back = the fed-back latent vectors (layer 0 at the latent positions), the "
            "definition that decides; in a multi-layer model the latent positions still read the image in upper "
            "layers, and that route then counts as direct. all_layers = the latent positions' states at every "
            "layer taken from the other run (the full mediator): NDE is then only what the answer reads from the "
            "image and prompt positions themselves.",
            "accuracy_change: accuracy under the edit minus clean accuracy. gold_prob_change: change in the "
            "probability of the gold answer at the answer slot (renormalised over the options). "
            "kl_clean_to_intervened: KL(clean || edited) over the answer options, in nats.",
            "change_ratio: for one input edit and latent step, the mean relative L2 distance between the clean and "
            "the edited latent, divided by the mean relative L2 distance between different instances' clean "
            "latents at that step. 0 = the latent did not move; 1 = it moved as far as swapping in another "
            "instance's latent. Being a distance it is never below 0, so 'connected' for input_latent means the "
            "latents move measurably and not provably less than the margin.",
            "Collapse: relative spread RS = (variance across instances) / (mean squared norm) of one latent step's "
            "vectors, 0 when every instance has the same vector, about 1 for independent isotropic vectors; the "
            "verdict reads the spread ratio RS(latent step) / RS(image tokens of the same instances) with a paired "
            "bootstrap interval: collapsed if the interval lies below the margin, not collapsed if above. Raw "
            "cosine between instances (the paper's measure, inflated by a direction all hidden states share) is "
            "shown as a view only.",
            "Probes (visual information): ridge probes per layer x latent step, folds split by instance and "
            "balanced for real and control labels; selectivity = score minus the score on a Hewitt & Liang control "
            "task whose random labels are assigned per type (image identity by default), so memorising types is "
            "caught; the best cell is chosen inside the training folds (nested), and each probe has a permutation "
            "p-value (Holm across attributes in the verdict).",
        ]),
    ]


def report_verdicts(subjects, effects, similarity, probes, margins: Margins = Margins()) -> list:
    """The verdicts a report shows: every subject named in ``subjects`` or in one of the tables."""
    return judge(_subject_names(subjects, effects, similarity, probes), effects, similarity, probes, margins)


def _build_blocks(title, subjects, data, effects, similarity, probes, figures, margins, judged=None) -> list:
    if judged is None:
        judged = report_verdicts(subjects, effects, similarity, probes, margins)
    subject_names = list(dict.fromkeys(v.subject for v in judged))
    verdicts = verdict_table(judged)
    rows = evidence_rows(judged)
    figures = {key: list(paths) for key, paths in (figures or {}).items()}

    blocks: list = [_Heading(1, title)]
    blocks.append(_Heading(2, "Subjects"))
    if subjects:
        blocks.append(_Table(pd.DataFrame([{k: str(v) for k, v in s.items()} for s in subjects])))
    else:
        blocks.append(_Paragraph("no subject descriptions were given.", "Not measured"))
    blocks.append(_Heading(2, "Data"))
    blocks.append(_Table(_key_value_table(data)) if data else _Paragraph("no data description was given.", "Not measured"))

    blocks.append(_Heading(2, "Verdicts"))
    if subject_names:
        summary = verdicts.pivot(index="subject", columns="finding", values="verdict").reindex(subject_names)
        summary = summary[list(FINDINGS)].rename(columns=FINDING_TITLES).reset_index()
        blocks.append(_Table(summary))
        blocks.append(_Table(_verdict_display(verdicts), "each verdict with the numbers it was decided on "
                             "(estimate [CI] of the deciding row; needed n when inconclusive)"))
    else:
        blocks.append(_Paragraph("no subject appears in any input.", "Not measured"))
    blocks.append(_Heading(2, "How to read the verdicts"))
    for heading, items in reading_guide(margins):
        blocks.append(_Heading(3, heading))
        blocks.append(_Bullets(items))

    for number, finding in enumerate(FINDINGS, start=1):
        blocks.append(_Heading(2, f"Finding {number}: {FINDING_TITLES[finding]}"))
        blocks.append(_Paragraph(FINDING_CLAIMS[finding], "Claim (paper)"))
        these = verdicts[verdicts.finding == finding]
        rule = next((r for r in these.rule if r), "")
        if rule:
            blocks.append(_Paragraph(rule, "Rule"))
        for row in these.itertuples():
            blocks.append(_VerdictLine(row.subject, row.verdict, row.evidence))
        if len(rows) and finding in set(rows.finding):
            blocks.append(_Heading(3, "Rows behind the verdict"))
            blocks.append(_Table(_evidence_rows_display(rows[rows.finding == finding]),
                                 "each row's decision: equivalent (inside the margin), effect (differs from 0 after "
                                 "Holm) or undecided"))
        blocks.append(_Heading(3, "Measurements"))
        blocks.extend(_finding_measurements(finding, effects, similarity, probes))
        blocks.append(_Heading(3, "Figures"))
        paths = figures.pop(finding, [])
        blocks.extend(_figure_blocks(paths) or [_Paragraph("none was given for this finding.", "No figure")])

    if figures:
        blocks.append(_Heading(2, "Other figures"))
        for key, paths in figures.items():
            blocks.append(_Paragraph(str(key), "Group"))
            blocks.extend(_figure_blocks(paths))

    blocks.append(_Heading(2, "Appendix"))
    if effects is not None and not effects.empty:
        blocks.append(_Heading(3, "All effects"))
        blocks.append(_Table(_effects_display(tidy_effects(effects))))
    if probes is not None:
        skipped = skipped_probes(probes)
        if not skipped.empty:
            blocks.append(_Heading(3, "Skipped probes"))
            columns = [c for c in ("subject", "attribute", "representation", "layer", "step", "skipped_reason")
                       if c in skipped.columns]
            blocks.append(_Table(skipped[columns].astype(str).reset_index(drop=True)))
    return blocks


# ------------------------------------------------------------------------------------------ rendering


def _markdown_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _render_markdown(blocks: list, out_dir: Path) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, _Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, _Paragraph):
            lines += [(f"**{block.label}:** " if block.label else "") + block.text, ""]
        elif isinstance(block, _VerdictLine):
            lines += [f"- **{block.subject}: {block.verdict}.** {block.evidence}"]
            lines += [""]
        elif isinstance(block, _Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, _Table):
            if block.caption:
                lines += [f"*{block.caption}*", ""]
            header = [_markdown_cell(c) for c in block.frame.columns]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            for row in block.frame.itertuples(index=False):
                lines.append("| " + " | ".join(_markdown_cell(v) for v in row) + " |")
            lines.append("")
        elif isinstance(block, _Figure):
            if block.path.exists():
                relative = Path(os.path.relpath(block.path.resolve(), out_dir.resolve())).as_posix()
                lines += [f"![{block.caption}]({relative})", ""]
            else:
                lines += [f"*figure missing: {block.path}*", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .9em; }
th, td { border: 1px solid #bbb; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } caption { caption-side: top; text-align: left; font-style: italic; padding: .3em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; }
.verdict { font-weight: 600; padding: .05em .45em; border-radius: .3em; }
.verdict-disconnect, .verdict-collapsed, .verdict-limited { background: #cfe3f5; }
.verdict-connected, .verdict-not-collapsed, .verdict-informative { background: #f8d9b5; }
.verdict-inconclusive { background: #e6e6e6; } .verdict-not-measured { background: #fff; border: 1px dashed #999; }
"""

_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _embeddable_image(path: Path) -> Path | None:
    """The file to embed for a figure: its PNG twin when one exists (bounded size), else the file itself."""
    twin = path.with_suffix(".png")
    if twin.exists():
        return twin
    return path if path.exists() and path.suffix.lower() in _MIME else None


def _data_uri(path: Path) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:{_MIME[path.suffix.lower()]};base64,{encoded}"


def _verdict_class(verdict: str) -> str:
    return "verdict verdict-" + verdict.replace(" ", "-")


def _html_cell(value) -> str:
    text = html.escape(str(value))
    if str(value) in VERDICT_WORDS:  # the summary table: verdict words get the same badge as the verdict lines
        return f'<span class="{_verdict_class(str(value))}">{text}</span>'
    return text


def _render_html(blocks: list, title: str) -> str:
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    in_verdicts = False
    for block in blocks:
        if isinstance(block, _VerdictLine) and not in_verdicts:
            parts.append('<ul class="verdicts">')
            in_verdicts = True
        elif not isinstance(block, _VerdictLine) and in_verdicts:
            parts.append("</ul>")
            in_verdicts = False
        if isinstance(block, _Heading):
            parts.append(f"<h{block.level}>{escape(block.text)}</h{block.level}>")
        elif isinstance(block, _Paragraph):
            label = f"<strong>{escape(block.label)}:</strong> " if block.label else ""
            parts.append(f"<p>{label}{escape(block.text)}</p>")
        elif isinstance(block, _VerdictLine):
            parts.append(
                f'<li><strong>{escape(block.subject)}</strong>: <span class="{_verdict_class(block.verdict)}">'
                f"{escape(block.verdict)}</span> &mdash; {escape(block.evidence)}</li>"
            )
        elif isinstance(block, _Bullets):
            parts.append("<ul>" + "".join(f"<li>{escape(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, _Table):
            caption = f"<caption>{escape(block.caption)}</caption>" if block.caption else ""
            header = "".join(f"<th>{escape(str(c))}</th>" for c in block.frame.columns)
            body = "".join(
                "<tr>" + "".join(f"<td>{_html_cell(v)}</td>" for v in row) + "</tr>"
                for row in block.frame.itertuples(index=False)
            )
            parts.append(f"<table>{caption}<thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, _Figure):
            image = _embeddable_image(block.path)
            if image is None:
                parts.append(f"<p><em>figure missing: {escape(str(block.path))}</em></p>")
            else:
                parts.append(
                    f'<figure><img src="{_data_uri(image)}" alt="{escape(block.caption)}">'
                    f"<figcaption>{escape(block.caption)}</figcaption></figure>"
                )
    if in_verdicts:
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _drop_duplicate_formats(figures: Mapping[str, Sequence] | None) -> dict[str, list[Path]]:
    """``save_figure`` returns a PNG and an SVG of each figure; the report shows each figure once."""
    unique = {}
    for key, paths in (figures or {}).items():
        if isinstance(paths, (str, Path)):
            paths = [paths]
        seen, kept = set(), []
        for path in map(Path, paths):
            stem = path.with_suffix("")
            if stem not in seen:
                seen.add(stem)
                kept.append(path.with_suffix(".png") if path.with_suffix(".png").exists() else path)
        unique[key] = kept
    return unique


def write_report(
    out_dir,
    *,
    subjects: Sequence[Mapping] | None = None,
    data: Mapping | None = None,
    effects: pd.DataFrame | None = None,
    similarity: pd.DataFrame | None = None,
    probes: pd.DataFrame | None = None,
    figures: Mapping[str, Sequence] | None = None,
    margins: Margins = Margins(),
    title: str = "latentprobe report: is latent reasoning causal?",
    name: str = "report",
    judged: Sequence | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.md`` and a self-contained ``<out_dir>/<name>.html``; return both paths.

    ``subjects``: dicts with at least ``name`` (e.g. ``checkpoint``, ``protocol``); ``data``: a dict shown as
    a table; ``effects``: the effects summary (columns ``EFFECT_COLUMNS``, optional ``step``);
    ``similarity``: ``similarity_table`` output (several subjects concatenated); ``probes``: ``probe_table``
    outputs concatenated; ``figures``: ``{finding: [paths]}`` with finding in ``FINDINGS`` (other keys go to
    "Other figures"). Any input may be None: its sections then say "not measured". ``judged``: the verdicts
    of ``report_verdicts`` on the same inputs, when the caller has them already (they are judged here if not).

    >>> import tempfile
    >>> md, page = write_report(tempfile.mkdtemp(), subjects=[{"name": "tiny", "checkpoint": "random"}])
    >>> "Finding 3: Collapse of latent tokens" in md.read_text(), page.suffix
    (True, '.html')
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for table, what in ((effects, "effects"), (similarity, "similarity"), (probes, "probes")):
        if table is not None and not isinstance(table, pd.DataFrame):
            raise LatentProbeError(f"{what} is a {type(table).__name__}, not a DataFrame", "pass a pandas DataFrame")
    blocks = _build_blocks(title, subjects, data, effects, similarity, probes, _drop_duplicate_formats(figures),
                           margins, judged)
    md_path = atomic_write_text(out_dir / f"{name}.md", _render_markdown(blocks, out_dir))
    html_path = atomic_write_text(out_dir / f"{name}.html", _render_html(blocks, title))
    return md_path, html_path
