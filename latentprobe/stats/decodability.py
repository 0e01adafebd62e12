"""The decodability gap (arXiv 2606.05753, "Cosine Misleads", its PRISM diagnostic): is the answer decodable from
the states *at* the latent steps, or only from the states *after* the latent phase?

Pure functions on arrays. Probes are `latentprobe.stats.probes`' standardised ridge probes, with the same grouped
outer folds (no instance on both sides) and the same inner cross-validation for the strength, so the numbers
match a `probe` run on the same cells. The label is the gold option (classification).

* One row per cell (``position`` ``latent`` at step k, or ``after`` at answer-region position j; ``layer`` L):
  out-of-fold accuracy with its exact Clopper-Pearson interval (over instances) beside the majority-class chance.
* One ``nested`` row per latent step and per after position: the best layer, chosen inside each training fold
  by inner-CV accuracy (no optimism from picking the best test score). A position is *decodable* when that row's
  one-sided exact binomial test against chance, Holm-adjusted over the nested rows (``p_holm``), is below
  ``alpha`` (the cell rows get their own Holm family); ``first_decodable`` names the earliest such position.
* The gap: nested-best over every latent cell ("at") vs nested-best over every after cell ("after"), both chosen
  inside the training folds, compared on the same out-of-fold instances: ``gap`` = accuracy(after) -
  accuracy(at) with a paired bootstrap interval over instances. A gap near 0 with "at" decodable: the latents
  hold the answer; a large gap with "at" at chance: the answer appears only after them (the study finds this
  predicts little reliance on the latents).

Columns (`DECODABILITY_COLUMNS`): ``subject, position, step, layer, selection, accuracy, ci_low, ci_high, n,
chance, p_value, p_holm, decodable, selected_layers``; the gap table (`GAP_COLUMNS`): ``subject, at_accuracy, after_accuracy, gap,
gap_ci_low, gap_ci_high, n, chance, at_decodable, after_decodable, first_decodable, at_cells, after_cells``.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from scipy.stats import binomtest
from statsmodels.stats.multitest import multipletests

from .effects import exact_rate, mean_difference, paired_bootstrap
from .probes import DEFAULT_ALPHAS, DEFAULT_INNER_SPLITS, _cross_validate, _grouped_splits, _majority_chance

DECODABILITY_COLUMNS = ["subject", "position", "step", "layer", "selection", "accuracy", "ci_low", "ci_high", "n",
                        "chance", "p_value", "p_holm", "decodable", "selected_layers"]
GAP_COLUMNS = ["subject", "at_accuracy", "after_accuracy", "gap", "gap_ci_low", "gap_ci_high", "n", "chance",
               "at_decodable", "after_decodable", "first_decodable", "at_cells", "after_cells"]
POSITIONS = ("latent", "after")


def decodability(features: Mapping[tuple[str, int, int], np.ndarray], labels, groups, *, subject: str = "",
                 n_splits: int = 5, inner_splits: int = DEFAULT_INNER_SPLITS, alphas=DEFAULT_ALPHAS, seed: int = 0,
                 n_boot: int = 2000, alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cells table and gap table (see the module docstring).

    ``features`` maps ``(position, step, layer)`` -- position "latent" (step = latent step k) or "after" (step =
    index j of the answer-region position) -- to an (n, D) array, one row per instance; ``labels`` the gold option
    index of each instance, ``groups`` its id. Both positions must be present."""
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    keys = sorted(features, key=lambda k: (POSITIONS.index(k[0]) if k[0] in POSITIONS else 9, k[1], k[2]))
    bad = [k for k in keys if k[0] not in POSITIONS]
    if bad:
        raise LatentProbeError(f"unknown decodability position(s) {sorted({k[0] for k in bad})}",
                               "use 'latent' (at the latent steps) and 'after' (after the latent phase)")
    for position in POSITIONS:
        if not any(k[0] == position for k in keys):
            raise LatentProbeError(f"no '{position}' states to probe",
                                   "trace with answer states (--answer-states) and a subject that enters latent mode")
    n = len(labels)
    if len(groups) != n or any(np.asarray(features[k]).shape[0] != n for k in keys):
        raise LatentProbeError("features, labels and groups must have one row per instance",
                               "pass arrays of the same length")
    if any(not np.isfinite(np.asarray(features[k], dtype=float)).all() for k in keys):
        raise LatentProbeError("some states are missing (NaN): not every instance reached every probed cell",
                               "probe only the steps every instance has")
    if len(np.unique(groups)) != n:
        raise LatentProbeError("decodability expects one row per instance", "pass each instance once")
    classes, targets = np.unique(labels.astype(str), return_inverse=True)
    if len(classes) < 2:
        raise LatentProbeError("the gold answers have a single class: nothing to decode", "use more instances")
    n_splits = min(n_splits, n)
    folds = _grouped_splits(targets, groups, n_splits, "classification", seed)
    inner = [_grouped_splits(targets[train], groups[train], min(inner_splits, len(train)), "classification", seed)
             for train, _ in folds]
    predictions, inner_best, _ = _cross_validate({k: np.asarray(features[k], dtype=np.float64) for k in keys}, keys,
                                                 targets[:, None], groups, folds, inner, alphas, "classification")
    correct = (predictions[:, :, 0] == targets[None, :]).astype(float)  # (cells, n)
    inner_best = inner_best[:, :, 0]  # (folds, cells)
    chance = _majority_chance(targets, folds)
    rows = []
    for c, (position, step, layer) in enumerate(keys):
        rows.append(_cell_row(subject, position, step, layer, "cell", correct[c], chance, ""))
    nested_by_position = {}
    for position in POSITIONS:
        for step in sorted({k[1] for k in keys if k[0] == position}):
            members = [c for c, k in enumerate(keys) if k[0] == position and k[1] == step]
            per_instance, chosen = _nested(correct, inner_best, folds, members, n)
            layers = Counter(keys[c][2] for c in chosen)
            row = _cell_row(subject, position, step, layers.most_common(1)[0][0], "nested", per_instance, chance,
                            ", ".join(f"{layer} x{count}" for layer, count in sorted(layers.items())))
            rows.append(row)
            nested_by_position[(position, step)] = row
    cells = pd.DataFrame(rows, columns=DECODABILITY_COLUMNS)
    for selection in ("cell", "nested"):  # Holm over each family of rows: "decodable" somewhere is a union claim
        chosen = cells.selection == selection
        cells.loc[chosen, "p_holm"] = multipletests(cells.loc[chosen, "p_value"].to_numpy(float), method="holm")[1]
    cells["decodable"] = cells.p_holm < alpha
    for key in nested_by_position:
        nested_by_position[key] = cells[(cells.selection == "nested") & (cells.position == key[0])
                                        & (cells.step == key[1])].iloc[0]
    family = {}
    for position in POSITIONS:
        members = [c for c, k in enumerate(keys) if k[0] == position]
        family[position] = _nested(correct, inner_best, folds, members, n)
    at, after = family["latent"][0], family["after"][0]
    gap, low, high = paired_bootstrap(np.column_stack([at, after]), mean_difference, n_boot=n_boot, seed=seed,
                                      alpha=alpha)
    first = next((f"{position}[{step}]" for (position, step), row in nested_by_position.items() if row["decodable"]),
                 "none")
    at_rate, after_rate = exact_rate(at, alpha), exact_rate(after, alpha)
    describe = lambda position: "; ".join(sorted({f"{keys[c][0]}[{keys[c][1]}].layer[{keys[c][2]}]"  # noqa: E731
                                                  for c in family[position][1]}))
    gap_table = pd.DataFrame([dict(
        subject=subject, at_accuracy=float(at.mean()), after_accuracy=float(after.mean()), gap=gap, gap_ci_low=low,
        gap_ci_high=high, n=n, chance=chance, at_decodable=_above(at_rate, chance, alpha),
        after_decodable=_above(after_rate, chance, alpha), first_decodable=first,
        at_cells=describe("latent"), after_cells=describe("after"))], columns=GAP_COLUMNS)
    return cells, gap_table


def _above(rate: dict, chance: float, alpha: float) -> bool:
    p = binomtest(int(rate["k"]), int(rate["n"]), min(max(chance, 1e-9), 1 - 1e-9), alternative="greater").pvalue
    return bool(p < alpha)


def _nested(correct, inner_best, folds, members, n) -> tuple[np.ndarray, list[int]]:
    """Per-instance out-of-fold correctness of the cell chosen among ``members`` inside each training fold."""
    out = np.full(n, np.nan)
    chosen = []
    for f, (_, test) in enumerate(folds):
        best = members[int(np.argmax(inner_best[f, members]))]
        chosen.append(best)
        out[test] = correct[best, test]
    return out, chosen


def _cell_row(subject, position, step, layer, selection, per_instance, chance, selected) -> dict:
    rate = exact_rate(per_instance)
    # one-sided exact binomial test of the out-of-fold accuracy against chance (rows treated as independent, as a
    # cross-validated accuracy usually is; the probe module's permutation test is the stricter check)
    p_value = binomtest(int(rate["k"]), int(rate["n"]), min(max(chance, 1e-9), 1 - 1e-9), alternative="greater").pvalue
    return dict(subject=subject, position=position, step=int(step), layer=int(layer), selection=selection,
                accuracy=rate["estimate"], ci_low=rate["ci_low"], ci_high=rate["ci_high"], n=rate["n"],
                chance=chance, p_value=float(p_value), p_holm=np.nan, decodable=False, selected_layers=selected)
