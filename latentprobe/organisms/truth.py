"""The organisms' built-in truth as a matrix (organism x finding -> the verdict the construction fixes), and its
comparison with the verdicts a run decided.

Only findings an organism's architecture or training loss fixes are entered (``OrganismRecipe.truth``, with the
reason in ``truth_why``); what an organism learned freely is left blank and never asserted. Together the entries
exhibit every finding in both directions (`both_directions` checks it)."""

from __future__ import annotations

from typing import Iterable

import pandas as pd

from .recipes import ORGANISMS

FINDINGS = ("input_latent", "latent_answer", "collapse", "visual_info")
# The two verdicts of each finding that must both appear among the organisms' truths.
DIRECTIONS = {"input_latent": ("connected", "disconnect"), "latent_answer": ("connected", "disconnect"),
              "collapse": ("collapsed", "not collapsed"), "visual_info": ("informative", "limited")}


def _recipe(name: str):
    """The image or text organism recipe of ``name`` (with or without ``organism-``)."""
    from .text_recipes import TEXT_ORGANISMS

    short = str(name).removeprefix("organism-")
    return ORGANISMS[short] if short in ORGANISMS else TEXT_ORGANISMS[short]


def expected_matrix(names: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per (subject, finding) an organism's construction fixes: subject, finding, expected, why.
    ``names`` may hold image and text organisms (default: the image organisms; the text ones are
    `latentprobe.organisms.text_recipes.TEXT_ORGANISMS`)."""
    rows = []
    for name in names if names is not None else ORGANISMS:
        recipe = _recipe(name)
        for finding in FINDINGS:
            if finding in recipe.truth:
                rows.append({"subject": recipe.subject_name, "finding": finding, "expected": recipe.truth[finding],
                             "why": recipe.truth_why})
    return pd.DataFrame(rows, columns=["subject", "finding", "expected", "why"])


def both_directions(matrix: pd.DataFrame) -> dict[str, bool]:
    """Per finding: whether both of its verdicts (`DIRECTIONS`) are expected of some organism in ``matrix``."""
    return {f: set(DIRECTIONS[f]) <= set(matrix.loc[matrix.finding == f, "expected"]) for f in FINDINGS}


def compare_with_truth(verdicts: pd.DataFrame, names: Iterable[str] | None = None) -> pd.DataFrame:
    """The expected matrix joined with ``verdicts`` (a verdicts.csv table: subject, finding, verdict):
    subject, finding, expected, decided, match (a finding the run did not decide reads ``missing``)."""
    expected = expected_matrix(names)
    decided = verdicts[["subject", "finding", "verdict"]].rename(columns={"verdict": "decided"})
    table = expected.merge(decided, on=["subject", "finding"], how="left")
    table["decided"] = table["decided"].fillna("missing")
    table["match"] = table["expected"] == table["decided"]
    return table[["subject", "finding", "expected", "decided", "match"]]
