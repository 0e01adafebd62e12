"""Intervals and tests over instances that hold their level on the hard cases: several seeds per instance, skewed
and rare-event outcomes, few instances. Pure numpy/scipy.

* **Rates of events with several seeds (or donors) per instance** -- ``cluster_rate``. An instance is the unit
  (its seeds share its input and are correlated), so each instance contributes the *fraction* of its seeds
  whose answer changed, and the exact Clopper-Pearson interval is taken on k = the sum of those fractions out of
  n = the number of instances (beta quantiles accept a fractional k). This is the design-effect correction at
  its largest value (design effect = seeds per instance, intra-instance correlation 1): it never claims more
  information than the instances hold, it equals the ordinary exact interval with one seed per instance, and
  both bounds grow with every changed answer (one more changed answer never moves a verdict towards
  `disconnect`: ``tests/test_intervals.py``). Its coverage on beta-binomial clusters is checked by simulation
  (``latentprobe.verdicts.simulation``). A percentile bootstrap of a few nonzero fractions is never used.
* **Means** -- ``bca_mean_intervals``: bias-corrected and accelerated bootstrap intervals of column means, the
  acceleration from the closed-form jackknife of a mean (equal to ``scipy.stats.bootstrap(method="BCa")``,
  checked in the tests; vectorised so calibration can run thousands of simulated runs).
* **p-values for "the mean is 0"** -- ``sign_flip_p_values``: the sign-flip permutation test (exact for a
  distribution symmetric about 0 whatever its tails, unlike the t-test on skewed outcomes), Monte Carlo with
  ``n_permutations`` flips, ``(1 + #{|flipped mean| >= |mean|}) / (1 + n_permutations)``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from scipy.special import ndtr, ndtri
from scipy.stats import beta

from ..errors import LatentProbeError


def fractional_clopper_pearson(k: float, n: float, alpha: float) -> tuple[float, float]:
    """Clopper-Pearson (1 - alpha) interval from beta quantiles, for a whole or fractional count k of n.

    >>> [round(v, 3) for v in fractional_clopper_pearson(0, 20, 0.05)]
    [0.0, 0.168]
    """
    if n <= 0:
        return math.nan, math.nan
    k = min(max(float(k), 0.0), float(n))
    low = 0.0 if k <= 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k >= n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def per_instance_fractions(events, instance_ids=None) -> np.ndarray:
    """Per instance (sorted by id), the fraction of its rows with an event; NaN rows dropped.

    >>> per_instance_fractions([1, 0, 0, 0], ["a", "a", "b", "b"]).tolist()
    [0.5, 0.0]
    """
    values = np.asarray(events, dtype=float)
    keep = ~np.isnan(values)
    if not np.isin(values[keep], (0.0, 1.0)).all():
        raise LatentProbeError("a rate needs 0/1 events per row", "pass 1 where the answer changed, else 0")
    if instance_ids is None:
        return values[keep]
    ids = np.asarray(instance_ids)[keep]
    order, inverse = np.unique(ids.astype(str), return_inverse=True)
    sums = np.bincount(inverse, weights=values[keep], minlength=len(order))
    return sums / np.bincount(inverse, minlength=len(order))


def cluster_rate(fractions, alpha: float = 0.05) -> dict:
    """Rate of events over instances from per-instance event fractions, with the cluster-aware exact interval of
    the module docstring. Returns ``estimate, ci_low, ci_high, n (instances), k (sum of fractions), p_value
    ("the rate is 0": 1 when no event, else 0), interval``.

    >>> row = cluster_rate([0.5, 0.0, 0.0, 1.0])
    >>> row["k"], row["n"], row["interval"]
    (1.5, 4, 'clopper-pearson (instances as units)')
    """
    fractions = np.asarray(fractions, dtype=float)
    fractions = fractions[~np.isnan(fractions)]
    n, k = len(fractions), float(fractions.sum())
    whole = bool(np.isin(fractions, (0.0, 1.0)).all())
    name = "clopper-pearson" if whole else "clopper-pearson (instances as units)"
    if n == 0:
        return dict(estimate=math.nan, ci_low=math.nan, ci_high=math.nan, n=0, k=0.0, p_value=math.nan, interval=name)
    low, high = fractional_clopper_pearson(k, n, alpha)
    return dict(estimate=k / n, ci_low=low, ci_high=high, n=n, k=k, p_value=1.0 if k == 0 else 0.0, interval=name)


def rate_bound(k: float, n: float, one_sided_alpha: float, side: str) -> float:
    """One-sided exact bound of a (fractional) rate: the lower (``side="low"``) or upper bound at level
    1 - one_sided_alpha (the matching end of the two-sided 1 - 2 x one_sided_alpha interval)."""
    low, high = fractional_clopper_pearson(k, n, 2 * one_sided_alpha)
    return low if side == "low" else high


def _resample_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, columns) bootstrap means of an (n, columns) matrix without NaN, via multinomial counts."""
    n = len(values)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    return counts @ values / n


def bca_mean_intervals(values, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """BCa (1 - alpha) intervals of the column means of an (instances, columns) matrix; all columns share one
    resample of instances. NaN entries: that column is computed on its complete instances alone (its own
    resample). Columns with fewer than 3 values get NaN; a constant column gets its value.

    >>> lows, highs = bca_mean_intervals(np.arange(20.0)[:, None], n_boot=500)
    >>> bool(lows[0] < 9.5 < highs[0])
    True
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    lows, highs = np.full(values.shape[1], np.nan), np.full(values.shape[1], np.nan)
    complete = ~np.isnan(values).any(axis=1)
    rng_seed = np.random.SeedSequence(seed)
    groups = {}
    for j in range(values.shape[1]):
        present = ~np.isnan(values[:, j])
        key = "all" if (present == complete).all() else j
        groups.setdefault(key, (present, []))[1].append(j)
    for index, (key, (present, columns)) in enumerate(groups.items()):
        block = values[np.ix_(present, columns)]
        if len(block) < 3:
            continue
        rng = np.random.default_rng([seed, index])
        low, high = _bca_block(block, alpha, n_boot, rng)
        lows[columns], highs[columns] = low, high
    return lows, highs


def _bca_block(block: np.ndarray, alpha: float, n_boot: int, rng: np.random.Generator):
    n = len(block)
    estimate = block.mean(axis=0)
    draws = _resample_means(block, n_boot, rng)
    below = (draws < estimate).mean(axis=0) + 0.5 * (draws == estimate).mean(axis=0)
    # jackknife of a mean in closed form: leave-one-out means
    leave_one_out = (block.sum(axis=0) - block) / (n - 1)
    spread = leave_one_out.mean(axis=0) - leave_one_out
    with np.errstate(invalid="ignore", divide="ignore"):
        acceleration = (spread ** 3).sum(axis=0) / (6.0 * ((spread ** 2).sum(axis=0)) ** 1.5)
    acceleration = np.where(np.isfinite(acceleration), acceleration, 0.0)
    low, high = np.empty(block.shape[1]), np.empty(block.shape[1])
    for j in range(block.shape[1]):
        column = draws[:, j]
        if np.ptp(column) == 0:
            low[j] = high[j] = column[0]
            continue
        if not 0 < below[j] < 1:  # bias correction undefined: percentile interval
            low[j], high[j] = np.quantile(column, [alpha / 2, 1 - alpha / 2])
            continue
        bias = ndtri(below[j])
        levels = []
        for tail in (alpha / 2, 1 - alpha / 2):
            z = bias + ndtri(tail)
            levels.append(float(ndtr(bias + z / (1 - acceleration[j] * z))))
        low[j], high[j] = np.quantile(column, levels)
    return low, high


def sign_flip_p_values(values, n_permutations: int = 2000, seed: int = 0) -> np.ndarray:
    """Two-sided sign-flip permutation p-values for "the column mean is 0" (NaN entries left out per column;
    NaN for columns with fewer than 2 values; all-zero columns get 1).

    >>> float(sign_flip_p_values(np.zeros((5, 1)))[0]), bool(sign_flip_p_values(np.ones((12, 1)) + 0.1)[0] < 0.01)
    (1.0, True)
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    out = np.full(values.shape[1], np.nan)
    rng = np.random.default_rng(seed)
    for j in range(values.shape[1]):
        column = values[:, j][~np.isnan(values[:, j])]
        if len(column) < 2:
            continue
        if not np.any(column):
            out[j] = 1.0
            continue
        observed = abs(column.mean())
        signs = rng.choice((-1.0, 1.0), size=(n_permutations, len(column)))
        flipped = np.abs(signs @ column / len(column))
        out[j] = (1 + np.sum(flipped >= observed - 1e-12 * max(observed, 1.0))) / (1 + n_permutations)
    return out


def normal_quantile(p: float) -> float:
    return NormalDist().inv_cdf(p)
