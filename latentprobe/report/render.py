"""The study report: the verdict matrix first, then one section per finding, then the appendix.

Pure layout: the decisions come from :mod:`latentprobe.verdicts` (rules, margins, multiplicity), the drawing from
:mod:`latentprobe.report.figures`, the rendering from :mod:`latentprobe.report.html`. The first screen holds the
question, the verdict matrix (subjects x findings, headed by plain questions), a colour legend and, in every
cell, the verdict's deciding evidence in words. Each finding's section shows its verdicts with the figure that
decided them right below; subjects, data, run provenance, the rules in full and every table go to the appendix.
A finding whose inputs are missing is reported as "not measured", never guessed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from ..fileio import atomic_write_text
from ..stats.probes import best_probe_rows, skipped_probes
from ..verdicts import (EFFECT_COLUMNS, FINDINGS, NOT_MEASURED, VOCABULARY, Margins, evidence_rows, judge,
                        tidy_effects, verdict_table)
from .blocks import (Bullets, Contents, Figure, Heading, Legend, Paragraph, Table, VerdictLine, VerdictMatrix)
from .html import render_html, render_markdown

__all__ = ["FINDINGS", "FINDING_TITLES", "EFFECT_COLUMNS", "Margins", "tidy_effects", "write_report",
           "reading_guide", "report_verdicts", "QUESTION"]

VERDICT_WORDS = tuple(dict.fromkeys(word for words in VOCABULARY.values() for word in words))
QUESTION = ("Do the latent visual tokens carry the image's information to the answer, or are they decoration? "
            "Each cell answers one of the four claims of the paper under test (CapImagine, arXiv 2602.22766) for "
            "one subject; a null is affirmed only when its whole 95% interval lies inside a stated margin.")
# The plain question each finding answers (the matrix's column headers and the sections' titles).
FINDING_TITLES = {
    "input_latent": "Do the latents react to the input?",
    "latent_answer": "Does the answer depend on the latents?",
    "collapse": "Do the latents collapse across instances?",
    "visual_info": "Can probes read the image from the latents?",
}
FINDING_CLAIMS = {
    "input_latent": "Strong perturbations of the input (image swap, noise, blanking) barely move the latent tokens "
                    "(input-latent disconnect).",
    "latent_answer": "Strong perturbations of the latent tokens (noise, a constant, extreme values, patching) "
                     "barely move the answer (latent-answer disconnect).",
    "collapse": "Latent tokens of different instances are highly similar, and more so at later latent steps.",
    "visual_info": "Linear probes read little visual information from the latent tokens.",
}
FINDING_WORDS = {
    "input_latent": "disconnect = the paper's null claim holds; connected = the input measurably moves the latents",
    "latent_answer": "disconnect = the paper's null claim holds; connected = the latents carry information to the "
                     "answer",
    "collapse": "collapsed = the paper's claim holds; not collapsed = the latents stay as different as baselines",
    "visual_info": "limited = the paper's claim holds; informative = probes read the image from the latents",
}
LEGEND = [
    ("verdict-disconnect", "disconnect · collapsed · limited", "the paper's claim holds (shown inside the margin)"),
    ("verdict-connected", "connected · not collapsed · informative", "an effect is shown: the claim fails here"),
    ("verdict-inconclusive", "inconclusive", "the data cannot tell (the appendix gives the n that would decide)"),
    ("verdict-not-measured", "not measured", "no run given measured it"),
]


# ------------------------------------------------------------------------------------------ formatting


def _number(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if math.isinf(value):
        return "unreachable"
    if value != 0 and abs(value) < 0.001:
        return f"{value:.2g}"
    return f"{value:.3g}" if abs(value) >= 10 else f"{value:.3f}"


def _count(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "unreachable" if isinstance(value, float) and math.isinf(value) else str(int(value))


def _interval(estimate, low, high) -> str:
    return f"{_number(estimate)} [{_number(low)}, {_number(high)}]"


def _subject_names(subjects, *tables) -> list[str]:
    names = [str(s.get("name")) for s in (subjects or []) if s.get("name") is not None]
    for table in tables:
        if table is not None and "subject" in table.columns:
            names += sorted(str(s) for s in table.subject.dropna().unique())
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------- tables


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
        "finding": rows.finding.astype(str) if "finding" in rows.columns else "",
        "role": role.to_numpy(),
        "row": rows.row.astype(str),
        "estimate [CI]": [_interval(e, lo, hi) for e, lo, hi in zip(rows.estimate, rows.ci_low, rows.ci_high)],
        "k / n": [(f"{int(k)}/{int(n)}" if pd.notna(k) else _count(n)) for k, n in zip(rows.k, rows.n)],
        "margin": [_number(v) for v in rows.margin],
        "Holm p": [_number(v) for v in rows.p_holm],
        "row decision": rows.row_decision.astype(str),
        "detectable effect": [_number(v) for v in rows.detectable_effect],
    })


def _similarity_display(rows: pd.DataFrame) -> pd.DataFrame:
    """The spread ratios the collapse verdict reads (latent step vs a baseline's spread, per step)."""
    value = rows.estimate if "estimate" in rows.columns else rows.mean_similarity
    return pd.DataFrame({
        "subject": rows.subject.astype(str),
        "vs": rows.reference.fillna("").astype(str) if "reference" in rows.columns else "",
        "step": [("" if pd.isna(s) or s < 0 else str(int(s))) for s in rows.step],
        "spread ratio [95% CI]": [_interval(m, lo, hi) for m, lo, hi in zip(value, rows.ci_low, rows.ci_high)],
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


INPUT_LATENT_METRICS = ("change_ratio",)
LATENT_ANSWER_METRICS = ("flip_rate",)


def _finding_measurements(finding: str, effects, similarity, probes) -> list:
    """The deciding numbers behind one finding (every metric is in the appendix), or a "not measured" line."""
    if finding in ("input_latent", "latent_answer"):
        if effects is None or effects.empty:
            return [Paragraph("no intervention run was given.", "Not measured")]
        tidy = tidy_effects(effects)
        if finding == "input_latent":
            rows = tidy[(tidy.target == "input") & tidy.metric_base.isin(INPUT_LATENT_METRICS)]
            what = "how far each latent step moves under each input edit (change_ratio; 0 = not at all)"
        else:
            answer_rows = tidy.target.isin(["latent", "text"]) & tidy.metric_base.isin(LATENT_ANSWER_METRICS)
            mediation_rows = tidy.mediation_effect.isin(["NDE", "NIE"]) & tidy.metric_base.str.contains("correct")
            rows = tidy[answer_rows | mediation_rows]
            what = ("answer-change rates under latent / text edits, and NIE / NDE on correctness per mediator "
                    "definition (every metric in the appendix)")
        if rows.empty:
            return [Paragraph(f"the intervention runs have no rows for this finding ({what}).", "Not measured")]
        order = ["subject", "target", "intervention", "metric_base", "step"]
        return [Table(_effects_display(rows.sort_values(order, na_position="first")), what)]
    if finding == "collapse":
        if similarity is None or similarity.empty:
            return [Paragraph("no trace with latent steps was given.", "Not measured")]
        rows = similarity
        if "statistic" in rows.columns:
            rows = rows[(rows.statistic == "spread_ratio") & (rows.representation == "latent")]
        if rows.empty:
            return []
        return [Table(_similarity_display(rows), "the spread ratio per latent step (1 = as varied as the baseline's "
                                                 "states, 0 = every instance has the same latent); the cosine views "
                                                 "are in similarity.csv")]
    if probes is None or probes.empty:
        return [Paragraph("no probe was run (pass --labels).", "Not measured")]
    best = best_probe_rows(probes)
    if best.empty:
        return [Paragraph("every probe was skipped; see the appendix for the reasons.", "Not measured")]
    note = ("best layer/step per representation, chosen inside the training folds; selectivity = score - control")
    return [Table(_probe_display(best), note)]


def _as_figures(items: Iterable) -> list[Figure]:
    """Figure blocks from paths, (path, caption) pairs or Figure blocks; one per figure (PNG and SVG twins once)."""
    made, seen = [], set()
    for item in items or []:
        if isinstance(item, Figure):
            path, caption = Path(item.path), item.caption
        elif isinstance(item, (tuple, list)):
            path, caption = Path(item[0]), str(item[1])
        else:
            path, caption = Path(item), ""
        stem = path.with_suffix("")
        if stem in seen:
            continue
        seen.add(stem)
        made.append(Figure(path, caption or _caption_from_name(path)))
    return made


def _caption_from_name(path: Path) -> str:
    """A readable caption for a figure given without one (the file name in words, never bare)."""
    words = path.stem.replace("_", " ").replace("-", " ")
    return f"Figure: {words}."


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
        ("The words", [f"{FINDING_TITLES[f]} {FINDING_WORDS[f]}; inconclusive = the data cannot tell; not measured "
                       "= the run has no input for this finding." for f in FINDINGS]),
        ("Decision rules", [
            f"Every interval is two-sided {level}. Rates of answer changes use exact Clopper-Pearson binomial "
            "intervals (0 changes in n instances still give an upper bound near 3.7/n, never [0, 0]); means of "
            "signed or continuous outcomes use a paired bootstrap over instances.",
            f"disconnect (the null): EVERY row the verdict combines is equivalent, its interval inside (-margin, "
            f"margin). Requiring every row is an intersection-union test: each row's test at level {alpha:g} makes the "
            f"joint claim level {alpha:g}, so no multiplicity correction is needed (and none is applied); one wide row "
            "is enough to withhold the claim.",
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


def _cell_evidence(row) -> str:
    """The sentence a matrix cell shows: the verdict's own evidence (its rule when it has none), with the
    disruption verdict where one was judged apart."""
    text = str(row.evidence or "").strip() or str(row.rule or "").strip()
    disruption = str(row.disruption or "").strip() if isinstance(row.disruption, str) else ""
    if disruption and disruption != NOT_MEASURED:
        text += f" (disruption edits: {disruption})"
    return text


def first_sentence(text: str, limit: int = 180) -> str:
    """The deciding part of an evidence string for a matrix cell: its first sentence, at most ``limit``
    characters (cut at a word, marked with an ellipsis); the whole string is in the finding's section."""
    text = " ".join(str(text).split())
    cut = text.find(". ")
    sentence = text if cut < 0 else text[:cut + 1]
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"
    return sentence


def _key_value_table(mapping: Mapping) -> pd.DataFrame:
    return pd.DataFrame({"field": [str(k) for k in mapping], "value": [str(v) for v in mapping.values()]})


def _build_blocks(title, subjects, data, effects, similarity, probes, figures, margins, judged=None,
                  sections=None, provenance=None) -> list:
    if judged is None:
        judged = report_verdicts(subjects, effects, similarity, probes, margins)
    subject_names = list(dict.fromkeys(v.subject for v in judged))
    verdicts = verdict_table(judged)
    rows = evidence_rows(judged)
    figures = {key: list(paths) for key, paths in (figures or {}).items()}
    appendix_figures = _as_figures(figures.pop("appendix", []))
    sections = list(sections or [])

    contents = [(f, f"{n}. {FINDING_TITLES[f]}") for n, f in enumerate(FINDINGS, start=1)]
    if sections:
        contents.append(("where-and-when", "Where and when"))
    contents.append(("appendix", "Appendix"))
    blocks: list = [Heading(1, title), Paragraph(QUESTION, "Question"), Legend(LEGEND)]
    if subject_names:
        matrix = VerdictMatrix(subject_names, list(FINDINGS), dict(FINDING_TITLES))
        for row in verdicts.itertuples():
            matrix.cells[(row.subject, row.finding)] = (row.verdict, first_sentence(_cell_evidence(row)))
        blocks.append(matrix)
    else:
        blocks.append(Paragraph("no subject appears in any input.", "Not measured"))
    blocks.append(Contents(contents))

    for number, finding in enumerate(FINDINGS, start=1):
        blocks.append(Heading(2, f"Finding {number}: {FINDING_TITLES[finding]}", anchor=finding))
        blocks.append(Paragraph(FINDING_CLAIMS[finding], "The paper's claim"))
        these = verdicts[verdicts.finding == finding]
        for row in these.itertuples():
            blocks.append(VerdictLine(row.subject, row.verdict, _cell_evidence(row)))
        blocks.extend(_as_figures(figures.pop(finding, [])))
        rule = next((r for r in these.rule if r), "")
        if rule:
            blocks.append(Paragraph(rule, "Rule"))
        blocks.extend(_finding_measurements(finding, effects, similarity, probes))

    for extra in figures.values():  # figures of a key no section owns: shown in the appendix, not lost
        appendix_figures += _as_figures(extra)
    if sections:
        blocks.append(Heading(2, "Where and when", anchor="where-and-when"))
        blocks.extend(sections)

    blocks.append(Heading(2, "Appendix", anchor="appendix"))
    if subject_names:
        blocks.append(Heading(3, "Each verdict with its numbers"))
        blocks.append(Table(_verdict_display(verdicts), "estimate [CI] of the deciding row, its margin, n, the "
                            "smallest effect the run could detect and the n needed when inconclusive"))
    if len(rows):
        blocks.append(Heading(3, "Rows behind each verdict"))
        blocks.append(Table(_evidence_rows_display(rows), "each row's decision: equivalent (inside the margin), "
                            "effect (differs from 0 after Holm) or undecided"))
    blocks.append(Heading(3, "How to read the verdicts"))
    for heading, items in reading_guide(margins):
        blocks.append(Paragraph(heading, ""))
        blocks.append(Bullets(items))
    blocks.append(Heading(3, "Subjects"))
    if subjects:
        blocks.append(Table(pd.DataFrame([{k: str(v) for k, v in s.items()} for s in subjects])))
    else:
        blocks.append(Paragraph("no subject descriptions were given.", "Not measured"))
    blocks.append(Heading(3, "Data and runs"))
    if data:
        blocks.append(Table(_key_value_table(data)))
    if provenance is not None and len(provenance):
        blocks.append(Table(provenance, "every run folder given to the report: what it holds (paths relative to "
                            "the report folder)"))
    if not data and (provenance is None or not len(provenance)):
        blocks.append(Paragraph("no data description was given.", "Not measured"))
    if effects is not None and not effects.empty:
        blocks.append(Heading(3, "All effects"))
        blocks.append(Table(_effects_display(tidy_effects(effects))))
    if probes is not None:
        skipped = skipped_probes(probes)
        if not skipped.empty:
            blocks.append(Heading(3, "Skipped probes"))
            columns = [c for c in ("subject", "attribute", "representation", "layer", "step", "skipped_reason")
                       if c in skipped.columns]
            blocks.append(Table(skipped[columns].astype(str).reset_index(drop=True)))
    if appendix_figures:
        blocks.append(Heading(3, "More figures"))
        blocks.extend(appendix_figures)
    return blocks


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
    sections: Sequence | None = None,
    provenance: pd.DataFrame | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.md`` and a self-contained ``<out_dir>/<name>.html``; return both paths.

    ``subjects``: dicts with at least ``name`` (e.g. ``checkpoint``, ``protocol``); ``data``: a dict shown as
    a table; ``effects``: the effects summary (columns ``EFFECT_COLUMNS``, optional ``step``);
    ``similarity``: ``similarity_table`` output (several subjects concatenated); ``probes``: ``probe_table``
    outputs concatenated; ``figures``: ``{finding: [path or (path, caption)]}`` with finding in ``FINDINGS``
    (shown under its verdicts; the key ``appendix`` and any other key go to the appendix). ``sections``: blocks
    of the "Where and when" section (`latentprobe.report.where_sections`); ``provenance``: one row per run folder.
    Any input may be None: its sections then say "not measured". ``judged``: the verdicts of ``report_verdicts``
    on the same inputs, when the caller has them already (they are judged here if not).

    >>> import tempfile
    >>> md, page = write_report(tempfile.mkdtemp(), subjects=[{"name": "tiny", "checkpoint": "random"}])
    >>> "Finding 3: Do the latents collapse across instances?" in md.read_text(), page.suffix
    (True, '.html')
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for table, what in ((effects, "effects"), (similarity, "similarity"), (probes, "probes")):
        if table is not None and not isinstance(table, pd.DataFrame):
            raise LatentProbeError(f"{what} is a {type(table).__name__}, not a DataFrame", "pass a pandas DataFrame")
    blocks = _build_blocks(title, subjects, data, effects, similarity, probes, figures, margins, judged,
                           sections, provenance)
    md_path = atomic_write_text(out_dir / f"{name}.md", render_markdown(blocks, out_dir))
    html_path = atomic_write_text(out_dir / f"{name}.html", render_html(blocks, title, VERDICT_WORDS))
    return md_path, html_path
