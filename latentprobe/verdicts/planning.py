"""Power planning from a pilot run: per subject and finding, how many instances would reach a decision, and the
smallest effect the current run can already rule out.

Reads the effects tables a run wrote (``effects_summary`` / ``latent_change``); never runs a model. The
numbers come from the same rows and rules as the verdicts (``latentprobe.verdicts``):

* ``needed_n``: instances at which the verdict the estimates point to would be reached with probability
  ``Margins.power`` (the current n when the run already decides): exact binomial computation for
  answer-change rates (Clopper-Pearson bound below the margin), statsmodels' t-test power for means;
* ``needed_n_disconnect``: instances at which every row would be shown inside the margin if the true effects
  equal the current estimates (unreachable when some estimate is at or beyond the margin);
* ``ruled_out_beyond``: the smallest margin at which this run would already say `disconnect`: the largest
  |interval end| over the rows (effects beyond it are ruled out);
* ``detectable_effect``: the smallest effect the run would detect (`connected`) with probability ``power``.

Collapse and visual information are decided on similarity and probe statistics that have no such power model
here; their rows say so.
"""

from __future__ import annotations

import math

import pandas as pd

from . import FINDINGS, Margins, verdict_input_latent, verdict_latent_answer

PLAN_COLUMNS = ["subject", "finding", "verdict", "margin", "n", "needed_n", "needed_n_disconnect", "ruled_out_beyond",
                "detectable_effect", "note"]


def plan_table(effects: pd.DataFrame, margins: Margins = Margins()) -> pd.DataFrame:
    """The planning table (columns ``PLAN_COLUMNS``) for every subject in an effects summary."""
    rows = []
    for subject in sorted(effects.subject.dropna().astype(str).unique()):
        for finding, judge in (("input_latent", verdict_input_latent), ("latent_answer", verdict_latent_answer)):
            verdict = judge(effects, subject, margins)
            evidence = verdict.details.get("rows") if verdict.details else None
            deciding = evidence
            if isinstance(evidence, pd.DataFrame) and "role" in evidence.columns:
                deciding = evidence[evidence.role == "information"]
            if not isinstance(deciding, pd.DataFrame) or deciding.empty:
                rows.append(dict(subject=subject, finding=finding, verdict=verdict.verdict, margin=verdict.margin,
                                 note=verdict.evidence))
                continue
            decided = verdict.verdict in ("disconnect", "connected")
            needed = int(deciding.n.max()) if decided else verdict.needed_n
            equivalence = deciding.needed_n_equivalence.max()
            rows.append(dict(
                subject=subject, finding=finding, verdict=verdict.verdict, margin=verdict.margin,
                n=int(deciding.n.max()), needed_n=needed if needed is not None else math.inf,
                needed_n_disconnect=float(equivalence) if pd.notna(equivalence) else math.nan,
                ruled_out_beyond=float(verdict.details.get("ruled_out_beyond", math.nan)),
                detectable_effect=verdict.detectable_effect,
                note="decided" if decided else "inconclusive: needed_n aims at the decision the estimates point to"))
        for finding in FINDINGS:
            if finding not in ("input_latent", "latent_answer"):
                rows.append(dict(subject=subject, finding=finding, verdict="", note=(
                    "no power model: decided on similarity/probe statistics (run `latentprobe report`)")))
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def plan_lines(table: pd.DataFrame) -> list[str]:
    """The planning table as aligned text lines for a terminal."""
    def number(value, whole=False):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float) and math.isinf(value):
            return "unreachable"
        return str(int(value)) if whole else f"{value:.3f}"

    lines = [f"{'subject':<22} {'finding':<14} {'verdict':<13} {'n':>5} {'needed n':>11} {'n for disc.':>11} "
             f"{'rules out >':>11} {'detects >=':>10}"]
    for row in table.itertuples():
        if not row.verdict:
            continue
        lines.append(f"{row.subject:<22} {row.finding:<14} {row.verdict:<13} {number(row.n, True):>5} "
                     f"{number(row.needed_n, True):>11} {number(row.needed_n_disconnect, True):>11} "
                     f"{number(row.ruled_out_beyond):>11} {number(row.detectable_effect):>10}")
    return lines
