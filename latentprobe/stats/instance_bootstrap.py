"""Bootstrap intervals over instances for statistics of resampled instance *counts* (scipy.stats.bootstrap).

A resample of n instances is a vector of counts (how often each instance was drawn). Statistics that are
sums over instances (accuracies, differences of accuracies) or over pairs of instances (similarities, spreads)
are then one matrix product per batch of resamples, and statistics of two measurements of the same instances
(a ratio, a difference) resample both together: the bootstrap is paired.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from scipy import stats


def bootstrap_interval_from_counts(statistic_of_counts: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int,
                                   confidence: float, seed: int, method: str = "BCa") -> tuple[float, float]:
    """Interval of a statistic of resampled instances, with ``scipy.stats.bootstrap`` (BCa by default).

    ``statistic_of_counts`` maps counts of shape (B, n) to B values (all counts 1 = the sample itself). When
    every resample gives the same value (e.g. identical vectors, or a probe right on every instance) BCa is
    undefined and the interval is that value. Returns (NaN, NaN) for ``n_boot <= 0`` or fewer than 3 instances.

    >>> import numpy as np
    >>> values = np.arange(10.0)
    >>> low, high = bootstrap_interval_from_counts(lambda c: c @ values / c.sum(1), 10, 500, 0.95, seed=0)
    >>> bool(low < 4.5 < high)
    True
    """
    if n_boot <= 0 or n < 3:
        return np.nan, np.nan

    def statistic(indices, axis=-1):
        indices = np.asarray(indices)
        return statistic_of_counts(resample_counts(indices, n)).reshape(indices.shape[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning for constant resamples, handled below
        result = stats.bootstrap((np.arange(n),), statistic, n_resamples=n_boot, confidence_level=confidence,
                                 method=method, vectorized=True, batch=256, rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    draws = result.bootstrap_distribution
    if not (np.isfinite(low) and np.isfinite(high)) and np.isfinite(draws).all() and np.ptp(draws) == 0:
        low = high = float(draws[0])
    return float(low), float(high)


def resample_counts(indices, n: int) -> np.ndarray:
    """Resamples of instance indices (..., m), as scipy's bootstrap hands them to a statistic, as counts (R, n): how
    often each of the n instances was drawn in each of the R = prod(...) resamples.

    >>> resample_counts(np.array([[0, 0, 2], [1, 2, 2]]), 3).tolist()
    [[2.0, 0.0, 1.0], [0.0, 1.0, 2.0]]
    """
    indices = np.asarray(indices, dtype=int)
    flat = indices.reshape(-1, indices.shape[-1])
    counts = np.zeros((flat.shape[0], n))
    np.add.at(counts, (np.repeat(np.arange(flat.shape[0]), flat.shape[1]), flat.ravel()), 1.0)
    return counts
