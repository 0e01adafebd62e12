"""The step x step influence map (arXiv 2602.08783, "Dynamics Within Latent CoT"): intervene at latent step i,
let the later steps be recomputed, and measure how far each latent step j moves and whether the answer changes.

Pure functions on the per-instance rows a run writes (`latentprobe.where.step_influence`), one row per instance x
source step i (``source_step`` = -1 for the placebo: the same decode path with an edit that changes nothing) x
target (a latent step j, or ``answer``):

* latent targets: per instance, ``value`` = ||z_j(edit at i) - z_j(clean)||^2 / S_j, where S_j is the clean
  latents' mean squared distance between two different instances at step j (the yardstick of the input -> latent
  verdict, `latentprobe.stats.latent_effect`). The map reads the same effect size as that verdict: the
  placebo-corrected share of the spread the edit moves, R2 = (mean value - mean placebo) / (1 - mean placebo),
  with the placebo (the same decode path with an edit that changes nothing; exactly 0 on CPU in float32, not in
  bf16) as the floor. R2 ~ 0: step j did not move; ~1: it moved as far as another instance's latent sits. The
  interval is a paired bootstrap over instances of that ratio, S_j held at its full-sample value.
* ``answer``: whether the parsed answer differs from the clean one (0/1), minus nothing (the placebo's rate is
  reported beside it).

`influence_map` gives one row per (source step, target): the mean with a paired bootstrap interval (latent
targets) or the exact Clopper-Pearson interval (answer), ``n`` and the placebo's mean. The K x (K + 1) map
reads rows i, columns j = 0..K-1 then the answer; cells j < i are causal zeros (a check), j = i the edit's size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from .effects import check_bootstrap, exact_rate, paired_bootstrap

INFLUENCE_ROW_COLUMNS = ["subject", "instance_id", "kind", "source_step", "target", "value", "applied"]
INFLUENCE_COLUMNS = ["subject", "kind", "source_step", "target", "metric", "estimate", "ci_low", "ci_high", "n",
                     "placebo", "interval"]
ANSWER = "answer"


def relative_sq_change(clean: np.ndarray, edited: np.ndarray, spread: float) -> float:
    """||edited - clean||^2 / spread (NaN when either is missing or the spread is 0)."""
    if clean is None or edited is None or not np.isfinite(spread) or spread <= 0:
        return float("nan")
    return float(np.sum((np.asarray(edited, float) - np.asarray(clean, float)) ** 2) / spread)


def step_spread(latents: list[np.ndarray], n_steps: int) -> np.ndarray:
    """(n_steps,) mean squared distance between the clean latents of two different instances at each step,
    2 n / (n - 1) times their mean squared distance to the step's mean (NaN with < 2 instances).

    >>> step_spread([np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])], 1)   # one pair, 25 apart squared
    array([25.])
    """
    out = np.full(n_steps, np.nan)
    for j in range(n_steps):
        at = np.stack([x[j] for x in latents if len(x) > j]) if any(len(x) > j for x in latents) else None
        if at is not None and len(at) >= 2:
            n = len(at)
            out[j] = float(np.mean(np.sum((at - at.mean(axis=0)) ** 2, axis=1))) * 2 * n / (n - 1)
    return out


def _placebo_corrected_r2(pairs: np.ndarray) -> float:
    """(mean value - mean placebo) / (1 - mean placebo) over rows of (value, placebo); NaN without spread
    beyond the floor."""
    move, floor = pairs[:, 0].mean(), pairs[:, 1].mean()
    return float((move - floor) / (1.0 - floor)) if floor < 1.0 else float("nan")


def influence_map(rows: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """The K x (K + 1) map (`INFLUENCE_COLUMNS`) from per-instance rows (`INFLUENCE_ROW_COLUMNS`)."""
    check_bootstrap(n_boot, alpha)
    missing = [c for c in INFLUENCE_ROW_COLUMNS if c not in rows.columns]
    if missing:
        raise LatentProbeError(f"influence rows lack {', '.join(missing)}", "pass the rows step_influence wrote")
    out = []
    for (subject, kind), group in rows.groupby(["subject", "kind"], sort=True):
        group = group[group.applied.astype(bool)]
        placebo = group[group.source_step == -1].set_index(["instance_id", "target"]).value
        for (source, target), cell in group[group.source_step >= 0].groupby(["source_step", "target"], sort=True):
            values = cell.set_index("instance_id").value.astype(float)
            floor = placebo.reindex([(i, target) for i in values.index]).to_numpy(float)
            if target == ANSWER:
                rate = exact_rate(values.dropna().to_numpy(), alpha)
                out.append(dict(subject=subject, kind=kind, source_step=int(source), target=target,
                                metric="answer_change", estimate=rate["estimate"], ci_low=rate["ci_low"],
                                ci_high=rate["ci_high"], n=rate["n"], placebo=float(np.nanmean(floor))
                                if np.isfinite(floor).any() else np.nan, interval="exact"))
                continue
            pairs = np.column_stack([values.to_numpy(float), np.nan_to_num(floor, nan=0.0)])
            est, low, high = paired_bootstrap(pairs, _placebo_corrected_r2, n_boot=n_boot, seed=seed, alpha=alpha)
            out.append(dict(subject=subject, kind=kind, source_step=int(source), target=target,
                            metric="latent_r2", estimate=est, ci_low=low, ci_high=high,
                            n=int(np.isfinite(pairs[:, 0]).sum()),
                            placebo=float(np.nanmean(floor)) if np.isfinite(floor).any() else np.nan,
                            interval="paired bootstrap"))
    return pd.DataFrame(out, columns=INFLUENCE_COLUMNS)


def map_matrix(table: pd.DataFrame, subject: str, kind: str | None = None) -> tuple[np.ndarray, list, list]:
    """The map of one subject as a (K, K + 1) array of estimates, with its row and column labels."""
    part = table[table.subject == subject]
    if kind is not None:
        part = part[part.kind == kind]
    if part.empty:
        raise LatentProbeError(f"no influence rows for {subject}", "run step-influence on that subject first")
    sources = sorted(part.source_step.unique())
    steps = sorted(int(t) for t in part.target.unique() if t != ANSWER)
    columns = [*steps, ANSWER]
    matrix = np.full((len(sources), len(columns)), np.nan)
    for row in part.itertuples():
        target = row.target if row.target == ANSWER else int(row.target)
        matrix[sources.index(row.source_step), columns.index(target)] = row.estimate
    return matrix, sources, columns
