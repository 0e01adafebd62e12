"""The verdicts stage: one calibrated decision per finding and subject, with the margins, the simulations that
calibrate the rules (`simulation`) and power planning (`planning`).

Imports `latentprobe.stats` and the shared utilities only: nothing that runs a model, nothing that renders.

>>> all_verdicts(["tiny"]).verdict.tolist()
['not measured', 'not measured', 'not measured', 'not measured']
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from .base import FINDINGS, INCONCLUSIVE, NOT_MEASURED, VOCABULARY, Verdict
from .causal import edit_role, is_placebo, verdict_input_latent, verdict_latent_answer
from .decision import clopper_pearson, decide_family, needed_n_rate_equivalence
from .margins import Margins
from .tidy import EFFECT_COLUMNS, tidy_effects

from .collapse import verdict_collapse
from .visual_info import verdict_visual_info

__all__ = ["FINDINGS", "INCONCLUSIVE", "NOT_MEASURED", "VOCABULARY", "VERDICT_COLUMNS", "Margins", "Verdict",
           "all_verdicts", "clopper_pearson", "decide_family", "edit_role", "evidence_rows", "is_placebo",
           "judge", "needed_n_rate_equivalence", "tidy_effects", "verdict_collapse", "verdict_input_latent",
           "verdict_latent_answer", "verdict_visual_info", "EFFECT_COLUMNS"]

# verdicts.csv: the decision, then its evidence.
VERDICT_COLUMNS = ["subject", "finding", "verdict", "rule", "margin", "estimate", "ci_low", "ci_high", "n",
                   "detectable_effect", "needed_n", "ruled_out_beyond", "mediator", "disruption", "method",
                   "evidence", "placebo", "effect_size", "yardstick"]
# The evidence columns added in issue 18: the noise floor subtracted (NaN: no placebo run), what the estimate
# measures, and what it is measured against.
EVIDENCE_COLUMNS = ("placebo", "effect_size", "yardstick")


def judge(subjects: Sequence[str], effects: pd.DataFrame | None = None, similarity: pd.DataFrame | None = None,
          probes: pd.DataFrame | None = None, margins: Margins = Margins()) -> list[Verdict]:
    """Every subject's `Verdict` on every finding, in FINDINGS order."""
    if not isinstance(margins, Margins):
        from ..errors import LatentProbeError

        raise LatentProbeError(f"margins is a {type(margins).__name__}", "pass a latentprobe.verdicts.Margins")
    judges = {
        "input_latent": lambda s: verdict_input_latent(effects, s, margins),
        "latent_answer": lambda s: verdict_latent_answer(effects, s, margins),
        "collapse": lambda s: verdict_collapse(similarity, s, margin=margins.collapse, alpha=margins.alpha),
        "visual_info": lambda s: verdict_visual_info(probes, s, margin=margins.visual_info, alpha=margins.alpha),
    }
    return [judges[finding](subject) for subject in subjects for finding in FINDINGS]


def verdict_table(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """The verdicts as the table written to verdicts.csv (columns ``VERDICT_COLUMNS``)."""
    records = []
    for v in verdicts:
        details = v.details or {}
        row = v.row()
        row["ruled_out_beyond"] = details.get("ruled_out_beyond")
        row["mediator"] = details.get("mediator", "")
        row["disruption"] = details.get("disruption", "")
        placebo = details.get("placebo")
        row["placebo"] = float(placebo) if isinstance(placebo, (int, float)) and placebo == placebo else None
        row["effect_size"] = details.get("effect_size", "")
        row["yardstick"] = details.get("yardstick", "")
        records.append(row)
    return pd.DataFrame(records, columns=VERDICT_COLUMNS)


def all_verdicts(subjects: Sequence[str], effects: pd.DataFrame | None = None, similarity: pd.DataFrame | None = None,
                 probes: pd.DataFrame | None = None, margins: Margins = Margins()) -> pd.DataFrame:
    """Every subject's verdict on every finding, as a table with columns ``VERDICT_COLUMNS``."""
    return verdict_table(judge(subjects, effects, similarity, probes, margins))


def evidence_rows(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """Every row each verdict combined, with its own decision (equivalent / effect / undecided), Holm p-value
    and planning numbers: the per-row view behind verdicts.csv."""
    frames = [v.details["rows"] for v in verdicts if isinstance((v.details or {}).get("rows"), pd.DataFrame)
              and len(v.details["rows"])]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
