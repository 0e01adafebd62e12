"""The collapse statistic: do the latents of different instances vary as much as a single image token does, in
the directions where they vary at all? Invariant to a shared offset, fair to low-dimensional latents, judged
against the noise floor. Pure numpy/scipy/scikit-learn; nothing here runs a model.

For one latent step with per-instance latents x_i (N, D), single image tokens y_i (one token per instance, the
same layer) and a pool of token states of that layer:

1. **Centre** each set on its own mean across instances: a vector shared by every instance (a bias, a
   massive-activation direction) is removed and counts for nothing; raw cosines, which it dominates, stay only as
   the paper's view.
2. **Whiten** by the layer's pooled token covariance (Ledoit-Wolf shrinkage, ``sklearn.covariance``; the pool is
   the token states given -- the layer's image tokens, or the yardstick's own tokens when no pool is given, never
   the latents, whose own tiny directions would otherwise be blown up to unit variance; with fewer than 2 x D
   pooled states the covariance cannot be estimated and the states are only centred, which the result records
   as ``whitened=False``), so a direction in which *all* tokens vary a lot (an anisotropic hidden space) does
   not dominate, and a unit of spread means the same in every direction. Every yardstick of a step is measured
   in the pool's one whitening, so the latents' subspaces (step 3) are fitted once for all of them.
3. **Compare per direction, in the latents' own subspace, cross-fitted.** Latents that vary fully in a 16-d
   subspace of a 3584-d space are not collapsed: they hold instance-specific information in those 16 dimensions.
   The instances are split in two halves (seeded); the top principal directions of one half's whitened latents
   (as many as their participation ratio) are found, and the *other* half's latents and single tokens are
   projected on them; then the halves swap. The **collapse ratio** is mean ||P x_i||^2 / mean ||P y_i||^2: 1 when
   the latents vary as much as an image token in the directions where they vary, ~0 when they all sit at one
   point. Cross-fitting keeps it honest: directions picked on the same instances would capture all of their
   noise and read as spread. The interval is a BCa bootstrap over instances (``scipy.stats.bootstrap``) that
   refits the subspaces in every resample, so it is not conditional on them: directions found on few instances
   miss part of the latents' subspace and bias the ratio towards 0 (towards `collapsed`) at small n.
4. **Yardstick: a single token.** A latent is one token; the mean of T image tokens varies about T times less
   across instances than one token does, so comparing with it inflates the ratio towards "not collapsed".
   ``yardstick`` names what was used; a pooled yardstick may only support `collapsed` (a conservative direction).
5. **Noise floor.** With placebo distances f_i (the latent re-decoded through the edit machinery, squared
   distance to the clean latent), latents whose mean squared distance to other instances does not exceed the
   floor (lower bound of mean(s_i - f_i) not above 0) have **no spread beyond noise**: collapsed whatever the
   ratio says.
6. **Effective dimension**: the participation ratio (sum lambda)^2 / sum lambda^2 of the centred latent
   covariance (1 = one direction, D = isotropic).
7. **Trend**: the whitened centred spread of the last latent step over that of the first, per instance paired,
   with its BCa interval (< 1 throughout: the latents contract with the steps, the paper's "progressive" claim).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from ..errors import LatentProbeError
from .instance_bootstrap import resample_counts
from .latent_effect import group_spread
from .parallel import map_in_threads

_NUMERICAL_ZERO = 1e-10


def _rows(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise LatentProbeError(f"{name} has shape {array.shape}, expected (instances, hidden size)",
                               "pass one state vector per instance")
    if not np.isfinite(array).all():
        raise LatentProbeError(f"{name} has NaN or infinite values", "pass only the instances that have the step")
    return array


def whitening_matrix(pool) -> np.ndarray:
    """W with W' C W = I for the Ledoit-Wolf estimate C of the pool's covariance (rows = token states).

    >>> rng = np.random.default_rng(0); pool = rng.normal(size=(500, 3)) * [1.0, 10.0, 100.0]
    >>> white = (pool - pool.mean(0)) @ whitening_matrix(pool)   # shrinkage keeps some of the anisotropy
    >>> bool(pool.std(0).max() / pool.std(0).min() > 50 > white.std(0).max() / white.std(0).min())
    True
    """
    from sklearn.covariance import LedoitWolf

    pool = _rows(pool, "token pool")
    if len(pool) < 2:
        raise LatentProbeError("the token pool has fewer than 2 states", "pass the layer's image-token states")
    covariance = LedoitWolf().fit(pool).covariance_
    values, vectors = np.linalg.eigh(covariance)
    floor = max(float(values.max()) * 1e-12, 1e-300)
    return vectors / np.sqrt(np.clip(values, floor, None))


def whitening_or_identity(pool) -> tuple[np.ndarray, bool]:
    """``whitening_matrix(pool)`` when the pool has at least twice as many states as dimensions, else the identity
    (and False): a covariance estimated from fewer states than dimensions whitens its own few directions away
    and leaves every other direction at the shrinkage target, which distorts the per-direction comparison
    (measured: isotropic latents read 1.8 instead of 1 against 40 tokens in 256 dimensions)."""
    pool = _rows(pool, "token pool")
    if len(pool) < 2 * pool.shape[1]:
        return np.eye(pool.shape[1]), False
    return whitening_matrix(pool), True


def participation_ratio(states) -> float:
    """(sum of eigenvalues)^2 / sum of squared eigenvalues of the centred covariance (effective dimension).

    >>> rng = np.random.default_rng(0)
    >>> round(participation_ratio(np.outer(rng.normal(size=50), [1.0, 2.0, 3.0])), 3)
    1.0
    """
    x = _rows(states, "states")
    x = x - x.mean(axis=0)
    gram = x @ x.T
    trace, squares = float(np.trace(gram)), float((gram * gram).sum())
    return trace ** 2 / squares if squares > 0 else math.nan


def _paired_ratio(numerator, denominator, alpha, n_boot, seed) -> tuple[float, float]:
    if len(numerator) < 3:
        return math.nan, math.nan

    def ratio(x, y, axis=-1):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.mean(x, axis=axis) / np.mean(y, axis=axis)

    return _bca((numerator, denominator), ratio, alpha, n_boot, seed, paired=True)


def _bca(data: tuple, statistic, alpha: float, n_boot: int, seed: int, outputs: int | None = None,
         **options):
    """``scipy.stats.bootstrap``'s BCa interval of a vectorised ``statistic``; the percentile interval of the finite
    draws where BCa's acceleration is undefined (a degenerate jackknife). A statistic of ``outputs`` values (its
    first axis) gets an interval each, as an (outputs, 2) array, from the same resamples; otherwise (low, high)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.bootstrap(data, statistic, vectorized=True, n_resamples=n_boot, confidence_level=1 - alpha,
                                 method="BCa", rng=np.random.default_rng(seed), **options)
    lows, highs = (np.atleast_1d(np.asarray(v, dtype=float)) for v in result.confidence_interval)
    draws = np.asarray(result.bootstrap_distribution, dtype=float).reshape(len(lows), -1)
    intervals = np.stack([lows, highs], axis=1)
    for row, (low, high) in enumerate(intervals):
        finite = draws[row][np.isfinite(draws[row])]
        if not (math.isfinite(low) and math.isfinite(high)) and len(finite):
            intervals[row] = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    if outputs is None:
        return float(intervals[0, 0]), float(intervals[0, 1])
    return intervals


def _top_directions(whitened: np.ndarray) -> np.ndarray:
    centred = whitened - whitened.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    energy = singular ** 2
    if energy.sum() <= 0:
        return vt[:1]
    k = int(max(1, min(len(energy), round(energy.sum() ** 2 / (energy ** 2).sum()))))
    return vt[:k]


def collapse_ratio(latents, tokens, pool=None, *, seed: int = 0, alpha: float = 0.05, n_boot: int = 1000) -> dict:
    """Per-direction whitened spread of the latents over that of single tokens, in the latents' cross-fitted
    subspace (see the module docstring). Returns ``estimate, ci_low, ci_high, n, dimensions`` (directions used,
    mean over the two halves), ``full_ratio`` (the whitened total-spread ratio, no subspace) and
    ``yardstick_spread`` (the tokens' whitened spread per direction; ~0 means the yardstick itself does not vary).

    >>> rng = np.random.default_rng(0)
    >>> tokens = rng.normal(size=(40, 12)); offset = 50 * rng.normal(size=12)
    >>> diverse = offset + rng.normal(size=(40, 12))
    >>> round(collapse_ratio(diverse, tokens, n_boot=200)["estimate"], 1) > 0.5
    True
    """
    return collapse_ratios(latents, {"tokens": tokens}, pool, seed=seed, alpha=alpha, n_boot=n_boot)["tokens"]


def collapse_ratios(latents, yardsticks, pool=None, *, seed: int = 0, alpha: float = 0.05,
                    n_boot: int = 1000) -> dict[str, dict]:
    """`collapse_ratio` of the same latents against each of several ``yardsticks`` ({name: (N, D) states of the
    same instances}), as {name: result}. With a ``pool`` every yardstick is measured in the pool's whitening, so the
    latents' subspaces are fitted once for all of them (the fits are most of the cost): each result equals
    `collapse_ratio` against that yardstick alone. Without a pool each yardstick whitens by its own states.

    >>> rng = np.random.default_rng(0); latents = rng.normal(size=(30, 6))
    >>> both = collapse_ratios(latents, {"a": rng.normal(size=(30, 6)), "b": 3 * rng.normal(size=(30, 6))},
    ...                        rng.normal(size=(200, 6)), n_boot=100)
    >>> bool(both["b"]["estimate"] < both["a"]["estimate"] / 4)
    True
    """
    x = _rows(latents, "latents")
    ys = {name: _rows(states, f"yardstick {name!r}") for name, states in dict(yardsticks).items()}
    for name, y in ys.items():
        if x.shape != y.shape:
            raise LatentProbeError(f"latents {x.shape} and tokens {y.shape} differ in shape",
                                   "pass one single-token state per instance, at the latents' layer")
    n = len(x)
    if n < 4:
        return {name: dict(estimate=math.nan, ci_low=math.nan, ci_high=math.nan, n=n, dimensions=math.nan,
                           full_ratio=math.nan, yardstick_spread=math.nan, whitened=False) for name in ys}
    if pool is None:  # each yardstick is its own whitening pool
        groups = [([name], whitening_or_identity(y)) for name, y in ys.items()]
    else:
        # The pool is token states only: the latents' own (possibly tiny) directions must not set the whitening,
        # or their noise would be blown up to unit variance.
        groups = [(list(ys), whitening_or_identity(_rows(pool, "token pool")))]
    results = {}
    for names, (w, whitened) in groups:
        measured = _collapse_in_whitening(x, [ys[name] for name in names], w, seed, alpha, n_boot)
        for name, result in zip(names, measured):
            results[name] = {**result, "whitened": whitened}
    return {name: results[name] for name in ys}


def _collapse_in_whitening(x, ys, w, seed: int, alpha: float, n_boot: int) -> list[dict]:
    n = len(x)
    wx = (x - x.mean(axis=0)) @ w
    wys = [(y - y.mean(axis=0)) @ w for y in ys]
    # Every direction the cross-fit can pick lies in the span of the latents' rows: work in that basis (r <= n
    # coordinates instead of D), which changes no projection and makes the refitted bootstrap cheap.
    _, singular, basis = np.linalg.svd(wx, full_matrices=False)
    basis = basis[singular > singular.max(initial=0.0) * 1e-12] if singular.max(initial=0.0) > 0 else basis[:1]
    wx, wys_in_span = wx @ basis.T, [wy @ basis.T for wy in wys]
    order = np.random.default_rng([seed, 7]).permutation(n)
    halves = (order[: n // 2], order[n // 2:])
    ratios, dims = _cross_fitted_ratios(wx, wys_in_span, np.ones((1, n)), halves)
    estimates = ratios[:, 0]
    finite = np.isfinite(estimates)
    intervals = np.full((len(ys), 2), math.nan)
    if finite.any():  # the interval of a yardstick whose estimate is not finite stays NaN
        kept = [wy for wy, keep in zip(wys_in_span, finite) if keep]
        intervals[finite] = _refitted_interval(wx, kept, halves, seed, alpha, n_boot)
    results = []
    for wy, estimate, (low, high) in zip(wys, estimates, intervals):
        with np.errstate(invalid="ignore", divide="ignore"):
            full = float((wx ** 2).sum() / (wy ** 2).sum()) if (wy ** 2).sum() > 0 else math.nan
        results.append(dict(estimate=float(estimate), ci_low=float(low), ci_high=float(high), n=n,
                            dimensions=float(dims[0]), full_ratio=full,
                            yardstick_spread=float((wy ** 2).sum(axis=1).mean() / x.shape[1])))
    return results


def _weighted_centred(states: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, N, r): each row of ``states`` minus the weighted mean of resample b, times sqrt(its weight there)."""
    total = weights.sum(axis=1, keepdims=True)
    mean = (weights @ states) / np.where(total > 0, total, 1.0)
    return np.sqrt(weights)[:, :, None] * (states[None] - mean[:, None, :])


def _principal_directions(centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies (B, K), descending, and principal directions (B, K, r) of a batch of centred (B, m, r) blocks, from
    the eigendecomposition of the smaller Gram matrix (several times faster than a batched SVD, the same
    directions up to sign)."""
    m, r = centred.shape[1:]
    transposed = centred.transpose(0, 2, 1)
    if r <= m:
        energy, vectors = np.linalg.eigh(transposed @ centred)
        return np.clip(energy[:, ::-1], 0, None), vectors[:, :, ::-1].transpose(0, 2, 1)
    energy, vectors = np.linalg.eigh(centred @ transposed)
    energy, vectors = np.clip(energy[:, ::-1], 0, None), vectors[:, :, ::-1]
    # a direction without energy (the centred block's rank is below m) carries nothing: leave it 0, never 0/0
    real = energy > energy[:, :1] * 1e-12
    scale = np.where(real, 1.0 / np.sqrt(np.where(real, energy, 1.0)), 0.0)
    return np.where(real, energy, 0.0), (vectors.transpose(0, 2, 1) @ centred) * scale[:, :, None]


def _fitted_directions(states: np.ndarray, weights: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``weights`` (U, m) over the fitted half's ``states`` (m, r): how many top principal
    directions its weighted centred states have (their participation ratio, rounded, at least 1), (U,), and those
    directions, (U, K, r) with K the largest such count (rows beyond a row's own count are 0).

    Only an instance with weight > 0 adds a row to the centred block, so each block holds just those rows (a
    bootstrap resample draws about 63% of the instances): rows are sorted by that count and decomposed in chunks
    padded to the chunk's largest count, which shrinks the eigendecompositions' side from min(m, r) to
    min(drawn, r) without changing any direction (a padded row has weight 0, so it is all 0)."""
    counts = (weights > 0).sum(axis=1)
    order = np.argsort(counts, kind="stable")

    def one_chunk(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = max(int(counts[rows].max()), 1)
        # each row's drawn instances first (stable, so in index order), then weight-0 instances as padding
        picked = np.argsort(weights[rows] <= 0, axis=1, kind="stable")[:, :size]
        w = np.take_along_axis(weights[rows], picked, axis=1)
        total = w.sum(axis=1, keepdims=True)
        mean = np.einsum("bm,bmr->br", w, states[picked]) / np.where(total > 0, total, 1.0)
        centred = np.sqrt(w)[:, :, None] * (states[picked] - mean[:, None, :])
        energy, vt = _principal_directions(centred)
        with np.errstate(invalid="ignore", divide="ignore"):
            k = np.round(energy.sum(axis=1) ** 2 / (energy ** 2).sum(axis=1))
        return np.clip(np.nan_to_num(k, nan=1.0), 1, energy.shape[1]).astype(int), vt

    parts = map_in_threads(one_chunk, [order[i:i + chunk] for i in range(0, len(order), chunk)])
    k = np.empty(len(weights), dtype=int)
    for rows, (part_k, _) in zip((order[i:i + chunk] for i in range(0, len(order), chunk)), parts):
        k[rows] = part_k
    most = int(k.max(initial=1))
    directions = np.zeros((len(weights), most, states.shape[1]))
    for rows, (part_k, vt) in zip((order[i:i + chunk] for i in range(0, len(order), chunk)), parts):
        width = min(most, vt.shape[1])
        directions[rows, :width] = vt[:, :width] * (np.arange(width)[None, :] < part_k[:, None])[:, :, None]
    return k, directions


def _cross_fitted_ratios(wx: np.ndarray, wys: list, weights: np.ndarray, halves, chunk: int = 64):
    """The cross-fitted ratio against each yardstick of ``wys`` for each row of instance ``weights`` (B, N): 1 for
    the full sample, bootstrap counts for a resample, 0 for a left-out instance. An instance stays in its half in
    every resample, so a repeated instance never helps find the directions it is measured on. Per half the top
    principal directions of the weighted fitted half of the latents (as many as their participation ratio) are
    found, and the other half's weighted spread of latents and of each yardstick along them is summed; a ratio is
    latents over yardstick. Returns the ratios (Y, B) and the mean number of directions used (B,).

    The fits depend on the latents only, so every yardstick is measured on the same directions, found once; rows
    that weigh the fitted half alike share them too: a jackknife sample that leaves out an instance of the other
    half fits this half exactly as the full sample does."""
    numerator, used = np.zeros(len(weights)), np.zeros(len(weights))
    denominators = np.zeros((len(wys), len(weights)))
    for fit, held in (halves, halves[::-1]):
        distinct, which = np.unique(weights[:, fit], axis=0, return_inverse=True)
        k, directions = _fitted_directions(wx[fit], distinct, chunk)
        k, directions = k[which.reshape(-1)], directions[which.reshape(-1)]

        def one_chunk(start: int) -> np.ndarray:
            w, vt = weights[start:start + chunk, held], directions[start:start + chunk]
            keep = np.arange(vt.shape[1])[None, :] < k[start:start + chunk, None]
            spread = []
            for states in [wx, *wys]:
                along = _weighted_centred(states[held], w) @ vt.transpose(0, 2, 1)  # (B, held, directions)
                spread.append(((along ** 2).sum(axis=1) * keep).sum(axis=1) / k[start:start + chunk])
            return np.stack(spread)

        # chunks are independent (the products release the GIL): side by side, same result in any order
        parts = map_in_threads(one_chunk, range(0, len(weights), chunk))
        if parts:
            spreads = np.concatenate(parts, axis=1)
            numerator += spreads[0]
            denominators += spreads[1:]
        used += k / 2
    if not len(weights):
        return np.full((len(wys), 0), math.nan), np.full(0, math.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominators > 0, numerator[None, :] / denominators, math.nan), used


def _refitted_interval(wx, wys, halves, seed: int, alpha: float, n_boot: int) -> np.ndarray:
    """BCa intervals over instances, (Y, 2) for the yardsticks ``wys``, with the subspaces refitted in every
    resample (and every jackknife sample): unconditional on the fitted directions, whose error at small n biases
    the ratio towards 0 (directions found on a few instances miss part of the latents' subspace) -- a bias BCa's
    correction sees. The yardsticks share the resamples (one seed), as each would alone."""
    n = len(wx)

    def ratio(rows, axis=-1):
        rows = np.asarray(rows, dtype=int)
        ratios = _cross_fitted_ratios(wx, wys, resample_counts(rows, n), halves)[0]
        return ratios.reshape((len(wys),) + rows.shape[:-1])

    return _bca((np.arange(n),), ratio, alpha, n_boot, seed, outputs=len(wys))


def spread_beyond_noise(latents, floor, *, alpha: float = 0.05, n_boot: int = 1000, seed: int = 0) -> dict:
    """Whether the latents of different instances differ by more than the noise floor: per instance s_i (mean
    squared distance to the other instances) against f_i (placebo squared distance). Returns ``spread, floor,
    excess_low`` (BCa lower bound of mean(s - f)) and ``beyond_noise``.

    >>> rng = np.random.default_rng(0); point = rng.normal(size=8)
    >>> latents = point + 0.01 * rng.normal(size=(30, 8)); floor = np.full(30, 2 * 8 * 0.01 ** 2)
    >>> spread_beyond_noise(latents, floor, n_boot=200)["beyond_noise"]
    False
    """
    x = _rows(latents, "latents")
    f = np.asarray(floor, dtype=float)
    if f.shape != (len(x),):
        raise LatentProbeError(f"floor has shape {f.shape}, expected ({len(x)},)", "pass one placebo distance per instance")
    s, _ = group_spread(x)
    keep = np.isfinite(s) & np.isfinite(f)
    s, f = s[keep], f[keep]
    size = float((x ** 2).sum(axis=1).mean())
    if len(s) < 3:
        return dict(spread=float(np.mean(s)) if len(s) else math.nan, floor=float(np.mean(f)) if len(f) else math.nan,
                    excess_low=math.nan, beyond_noise=False)
    low, _ = _paired_ratio(s - f, np.ones_like(s), alpha, n_boot, seed)
    flat = not float(s.mean()) > _NUMERICAL_ZERO * max(size, 1e-300)
    return dict(spread=float(s.mean()), floor=float(f.mean()), excess_low=low,
                beyond_noise=bool((not flat) and low > 0))


def spread_trend(first, last, pool, *, alpha: float = 0.05, n_boot: int = 1000, seed: int = 0) -> dict:
    """Whitened centred spread of the last latent step over the first, paired per instance, with its BCa
    interval: < 1 throughout means the latents contract across steps (progressive collapse).

    >>> rng = np.random.default_rng(0); first = rng.normal(size=(30, 6))
    >>> trend = spread_trend(first, 0.1 * first + 3.0, rng.normal(size=(60, 6)), n_boot=200)
    >>> bool(trend["ci_high"] < 1)
    True
    """
    a, b = _rows(first, "first step"), _rows(last, "last step")
    if a.shape != b.shape:
        raise LatentProbeError("the first and last steps have different shapes", "pass the same instances for both")
    w, _ = whitening_or_identity(_rows(pool, "token pool"))
    sa = (((a - a.mean(axis=0)) @ w) ** 2).sum(axis=1)
    sb = (((b - b.mean(axis=0)) @ w) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = float(sb.mean() / sa.mean()) if sa.mean() > 0 else math.nan
    low, high = _paired_ratio(sb, sa, alpha, n_boot, seed) if math.isfinite(estimate) else (math.nan, math.nan)
    return dict(estimate=estimate, ci_low=low, ci_high=high, n=len(a))


# ------------------------------------------------------------------------------------ the table the verdict reads

# Columns of the rows ``collapse_rows`` adds to the similarity table (beside its common columns).
COLLAPSE_STATISTICS = ("collapse_ratio", "participation_ratio", "noise_excess", "spread_trend")
SINGLE_TOKEN, POOLED = "single token", "pooled"
# A yardstick whose centred spread is below this share of its squared size does not vary across instances.
YARDSTICK_MIN_RELATIVE_SPREAD = 0.01


def _relative_spread(x: np.ndarray) -> float:
    size = float((x ** 2).sum(axis=1).mean())
    return float(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean() / size) if size > 0 else math.nan


def collapse_rows(latents, yardsticks, *, pooled=(), pool=None, floor=None, n_boot: int = 1000,
                  confidence: float = 0.95, seed: int = 0) -> list[dict]:
    """The collapse rows of one subject: per latent step and yardstick the ``collapse_ratio``, per step the
    ``participation_ratio`` and (with a floor) the ``noise_excess``, and the first-to-last ``spread_trend``.

    ``latents`` (N, S, D) with all-NaN vectors for missing steps; ``yardsticks`` maps a name to (N, D) states of
    the same instances and layer; names in ``pooled`` are means over many tokens (a conservative yardstick);
    ``pool`` (M, D) the layer's token states for whitening; ``floor`` (N, S) or (N,) placebo squared distances.
    Each row: ``statistic, representation, reference, step, estimate, ci_low, ci_high, n, yardstick, whitened,
    dimensions, yardstick_relative_spread``.
    """
    alpha = 1 - confidence
    latents = np.asarray(latents, dtype=np.float64)
    if latents.ndim != 3:
        raise LatentProbeError(f"latents has shape {latents.shape}", "pass (instances, steps, hidden size)")
    present = ~np.isnan(latents).all(axis=2)
    rows = []
    base = dict(yardstick="", whitened=math.nan, dimensions=math.nan, yardstick_relative_spread=math.nan)
    floor = None if floor is None else np.asarray(floor, dtype=float)
    for step in range(latents.shape[1]):
        have = present[:, step]
        x = latents[have, step]
        if len(x) >= 2:
            rows.append({**base, "statistic": "participation_ratio", "representation": "latent", "reference": "",
                         "step": step, "estimate": participation_ratio(x), "ci_low": math.nan, "ci_high": math.nan,
                         "n": len(x)})
        if floor is not None and len(x) >= 3:
            f = floor[have, step] if floor.ndim == 2 else floor[have]
            noise = spread_beyond_noise(x, f, alpha=alpha, n_boot=n_boot, seed=seed + step)
            rows.append({**base, "statistic": "noise_excess", "representation": "latent", "reference": "placebo",
                         "step": step, "estimate": noise["spread"] - noise["floor"], "ci_low": noise["excess_low"],
                         "ci_high": math.nan, "n": len(x)})
        ys = {name: _rows(states, f"yardstick {name!r}")[have] for name, states in dict(yardsticks).items()}
        results = collapse_ratios(x, ys, pool, seed=seed + step, alpha=alpha, n_boot=n_boot) if ys else {}
        for name, result in results.items():
            rows.append({"statistic": "collapse_ratio", "representation": "latent", "reference": name, "step": step,
                         "estimate": result["estimate"], "ci_low": result["ci_low"], "ci_high": result["ci_high"],
                         "n": result["n"], "yardstick": POOLED if name in pooled else SINGLE_TOKEN,
                         "whitened": result["whitened"], "dimensions": result["dimensions"],
                         "yardstick_relative_spread": _relative_spread(ys[name])})
    steps = [s for s in range(latents.shape[1]) if present[:, s].sum() >= 4]
    if len(steps) >= 2:
        first, last = steps[0], steps[-1]
        both = present[:, first] & present[:, last]
        if both.sum() >= 4:
            reference = pool if pool is not None else np.vstack([np.asarray(v, dtype=float)[both]
                                                                 for v in dict(yardsticks).values()] or
                                                                [latents[both, first]])
            trend = spread_trend(latents[both, first], latents[both, last], reference, alpha=alpha, n_boot=n_boot,
                                 seed=seed)
            rows.append({**base, "statistic": "spread_trend", "representation": "latent", "reference": f"step {first}",
                         "step": last, "estimate": trend["estimate"], "ci_low": trend["ci_low"],
                         "ci_high": trend["ci_high"], "n": trend["n"]})
    return rows
