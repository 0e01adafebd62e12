"""The effects summary as the verdicts read it: schema check, metric base name, latent step, mediation effect."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..errors import LatentProbeError

EFFECT_COLUMNS = ["subject", "target", "intervention", "metric", "estimate", "ci_low", "ci_high", "n"]
_METRIC_STEP = re.compile(r"^(?P<base>.+?)@step(?P<step>-?\d+)$")
# Mediation metrics come per outcome from ``effects.mediation_effects``: NIE, NIE_correct, NIE_gold_prob, ...
_MEDIATION = re.compile(r"^(?P<effect>TE|NDE|NIE|interaction)(?:_.+)?$")


def tidy_effects(effects: pd.DataFrame) -> pd.DataFrame:
    """Check the effects summary schema and add ``metric_base``, ``step`` and ``mediation_effect``.

    A step is read from a ``step`` column when present, else from a ``@stepK`` metric suffix.
    ``mediation_effect`` is "TE", "NDE", "NIE" or "interaction" for those metrics whatever their outcome
    suffix (``NIE_correct`` -> "NIE"), and empty for the others. Rows without an estimate are dropped (a
    metric that was not measured is no evidence either way).

    >>> import pandas as pd
    >>> effects = pd.DataFrame({"subject": ["tiny"], "target": ["input"], "intervention": ["blank"],
    ...     "metric": ["change_ratio@step3"], "estimate": [0.1], "ci_low": [0.0], "ci_high": [0.2], "n": [9]})
    >>> tidy_effects(effects)[["metric_base", "step"]].values.tolist()
    [['change_ratio', 3.0]]
    """
    missing = [column for column in EFFECT_COLUMNS if column not in effects.columns]
    if missing:
        raise LatentProbeError(
            f"the effects summary lacks columns {missing}", f"give it the columns {', '.join(EFFECT_COLUMNS)}"
        )
    tidy = effects.reset_index(drop=True)  # concatenated summaries repeat index labels; rows are picked by label
    parsed = tidy.metric.astype(str).str.extract(_METRIC_STEP)
    tidy["metric_base"] = parsed["base"].fillna(tidy.metric.astype(str))
    suffix_step = pd.to_numeric(parsed["step"], errors="coerce")
    given_step = pd.to_numeric(tidy["step"], errors="coerce") if "step" in tidy.columns else suffix_step * np.nan
    tidy["step"] = given_step.fillna(suffix_step).astype(float)
    tidy["mediation_effect"] = tidy.metric_base.str.extract(_MEDIATION)["effect"].fillna("").astype(str)
    for column in ("estimate", "ci_low", "ci_high"):
        tidy[column] = pd.to_numeric(tidy[column], errors="coerce").astype(float)
    return tidy[tidy.estimate.notna()].reset_index(drop=True)
