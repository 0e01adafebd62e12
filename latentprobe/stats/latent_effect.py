"""Input -> latent (and input -> text mediator) effect sizes in squared distances, with a noise floor.

Pure numpy/scipy; nothing here runs a model. The question is "do the latents react to the input?". For one
edit (e.g. an image swap) and N instances with clean latents c_i, edited latents t_i and, where a placebo run
exists, placebo latents p_i (the clean input re-decoded in the edited run's exact batch layout and code path):

* **move**   d_i = ||t_i - c_i||^2, how far the edit moves instance i's latents;
* **floor**  f_i = ||p_i - c_i||^2, how far they move when nothing is edited (numerical noise: exactly 0 on a
  deterministic CPU run in float32, not on a GPU in bf16). Without a placebo the floor is taken as 0 and the
  result says so;
* **spread** s_i = mean over the instances j that share everything with i *but the edited input* (same question
  for an image edit, same image for a question edit) of ||c_j - c_i||^2: how far another instance's input moves
  the latents. Where no instance shares the rest, a donor's distance (text mediators) or, last, the distance to
  every other instance is used, and the result names which (``spread_source``); the last one mixes in what the
  other inputs change, so R2 then understates how far the latents follow the edited input.

The effect size is the placebo-corrected share of that spread which the edit moves:

    R2 = (mean d - mean f) / (mean s - mean f)

Squared distances add over independent noise, so both the move and the spread carry the noise floor once
(E||t - c||^2 = true move + floor), and subtracting it leaves an unbiased numerator and denominator; R2 ~ 1 when
the latents follow the input as far as another instance's input moves them, ~0 when they ignore it. Its interval
is a BCa bootstrap over instances (``scipy.stats.bootstrap``): each resample recomputes the numerator and the
pairwise spread of the instances it drew (a pair of two copies of one instance is left out), because the spread
is a U-statistic whose per-instance averages share pairs.

**No spread beyond noise.** When the latents of instances with different inputs differ by no more than the
floor (the lower bound of mean(s - f) is not above 0) the ratio is noise over noise. The result is then marked
``collapsed`` and its deciding estimate is the placebo-corrected *relative* change (mean d - mean f) /
mean ||c||^2 (for unit vectors 2 (1 - cos)), beside the paper's own view, mean 1 - cos(t_i, c_i).

A representational check sits beside it: centred linear CKA (Kornblith et al. 2019) between the latents and the
image-token states of the same instances, with a permutation p-value (rows of one side permuted).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import LatentProbeError

SPREAD_SOURCES = ("shared rest", "donor", "all instances")
# Relative size below which a spread or move is floating-point rounding, not a difference between instances.
_NUMERICAL_ZERO = 1e-10


def _matrix(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim > 2:  # (N, steps, D): the steps of one instance form one vector, squared distances add up
        array = array.reshape(len(array), -1)
    if array.ndim != 2:
        raise LatentProbeError(f"{name} has shape {array.shape}", "pass one state vector (or steps x dim) per instance")
    return array


def squared_distances(first, second) -> np.ndarray:
    """Per-instance ||first_i - second_i||^2 (NaN where either side has a NaN).

    >>> squared_distances([[0.0, 0.0], [1.0, 1.0]], [[3.0, 4.0], [1.0, 1.0]]).tolist()
    [25.0, 0.0]
    """
    a, b = _matrix(first, "first"), _matrix(second, "second")
    if a.shape != b.shape:
        raise LatentProbeError(f"states of shapes {a.shape} and {b.shape} cannot be compared",
                               "pass the clean and edited states of the same instances, steps and layer")
    return ((a - b) ** 2).sum(axis=1)


def _pairs(clean, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise squared distances (n, n) and the mask of pairs that count for the spread (same group, i != j)."""
    c = _matrix(clean, "clean")
    n = len(c)
    norms = (c ** 2).sum(axis=1)
    pairwise = np.clip(norms[:, None] + norms[None, :] - 2 * c @ c.T, 0.0, None)
    if groups is None:
        same = np.ones((n, n), dtype=bool)
    else:
        keys = np.asarray([str(g) for g in groups])
        if len(keys) != n:
            raise LatentProbeError(f"{len(keys)} group keys for {n} instances", "pass one group key per instance")
        same = keys[:, None] == keys[None, :]
    np.fill_diagonal(same, False)
    return pairwise, same


def group_spread(clean, groups=None) -> tuple[np.ndarray, str]:
    """Per instance, the mean squared distance of its clean state to the clean states of the OTHER instances of
    its group (NaN where it has no partner), and which spread that is. ``groups=None``: every other instance.

    >>> spread, source = group_spread([[0.0], [2.0], [5.0]], groups=["q1", "q1", "q2"])
    >>> spread.tolist()[:2], source
    ([4.0, 4.0], 'shared rest')
    """
    pairwise, same = _pairs(clean, groups)
    source = SPREAD_SOURCES[2] if groups is None else SPREAD_SOURCES[0]
    counts = same.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.where(counts > 0, (pairwise * same).sum(axis=1) / counts, np.nan)
    return spread, source


def _ratio_interval(numerator: np.ndarray, denominator: np.ndarray, alpha: float, n_boot: int,
                    seed: int) -> tuple[float, float]:
    """Paired BCa interval of mean(numerator) / mean(denominator) over instances (scipy.stats.bootstrap)."""
    if len(numerator) < 3 or n_boot < 1:
        return math.nan, math.nan

    def ratio(x, y, axis=-1):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.mean(x, axis=axis) / np.mean(y, axis=axis)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate (constant) resamples are handled below
        result = stats.bootstrap((numerator, denominator), ratio, paired=True, vectorized=True, n_resamples=n_boot,
                                 confidence_level=1 - alpha, method="BCa", rng=np.random.default_rng(seed))
    low, high = (float(v) for v in result.confidence_interval)
    if not (math.isfinite(low) and math.isfinite(high)):
        draws = result.bootstrap_distribution
        draws = draws[np.isfinite(draws)]
        if len(draws) and np.ptp(draws) == 0:
            return float(draws[0]), float(draws[0])
        if len(draws):  # BCa undefined (e.g. every resample on one side of the estimate): percentile instead
            return tuple(float(v) for v in np.quantile(draws, [alpha / 2, 1 - alpha / 2]))
    return low, high


def _pairwise_r2_interval(move: np.ndarray, floor: np.ndarray, pairwise: np.ndarray, same: np.ndarray, alpha: float,
                          n_boot: int, seed: int) -> tuple[float, float]:
    """BCa interval of (mean d - mean f) / (pairwise spread - mean f), resampling instances and recomputing the
    pairwise spread inside each resample (pairs of two copies of one instance left out). The spread is a
    U-statistic: its per-instance averages share pairs, and bootstrapping them as if independent understates its
    variance (measured: false `disconnect` 8% at an R2 equal to the margin, against 2.5%)."""
    from .instance_bootstrap import bootstrap_interval_from_counts

    weights = np.where(same, pairwise, 0.0)
    mask = same.astype(float)

    def statistic(counts):
        total = counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            spread = np.einsum("bi,ij,bj->b", counts, weights, counts) / np.einsum("bi,ij,bj->b", counts, mask, counts)
            return (counts @ (move - floor) / total) / (spread - counts @ floor / total)

    return bootstrap_interval_from_counts(statistic, len(move), n_boot, 1 - alpha, seed)


def _mean_interval(values: np.ndarray, alpha: float, n_boot: int, seed: int) -> tuple[float, float]:
    return _ratio_interval(values, np.ones_like(values), alpha, n_boot, seed)


def latent_r2(clean, edited, *, placebo=None, groups=None, donor=None, alpha: float = 0.05, n_boot: int = 2000,
              seed: int = 0) -> dict:
    """The placebo-corrected share of the latents' spread that an edit moves (see the module docstring).

    Parameters
    ----------
    clean, edited : array (N, D) or (N, steps, D)
        Clean and edited states of the same instances (several steps are one vector: squared distances add).
    placebo : array like ``clean``, optional
        The clean input re-decoded through the edited run's code path; its distance to ``clean`` is the floor.
    groups : sequence, optional
        Per instance, a key of everything but the edited input (the question for an image edit); the spread is
        taken within groups. Instances without a partner are left out.
    donor : array like ``clean``, optional
        Per instance, the clean states of the instance whose input was swapped in (used when ``groups`` is None).
    alpha, n_boot, seed
        Level, resamples and seed of the BCa intervals.

    Returns
    -------
    dict
        ``estimate, ci_low, ci_high`` (R2, or the relative change when ``collapsed``), ``statistic`` ("r2" or
        "relative_change"), ``r2``, ``move``, ``floor``, ``spread`` (means of d, f, s), ``excess_spread_low``
        (lower bound of mean(s - f)), ``collapsed``, ``relative_change`` and its interval,
        ``one_minus_cosine``, ``n``, ``spread_source``, ``placebo`` (whether a placebo was given).

    >>> rng = np.random.default_rng(0)
    >>> clean = rng.normal(size=(30, 8)); follows = clean[rng.permutation(30)]
    >>> round(latent_r2(clean, clean, n_boot=200)["estimate"], 6), latent_r2(clean, follows, n_boot=200)["r2"] > 0.7
    (0.0, True)
    """
    check_level(alpha, n_boot)
    c, t = _matrix(clean, "clean"), _matrix(edited, "edited")
    move = squared_distances(c, t)
    floor = squared_distances(c, _matrix(placebo, "placebo")) if placebo is not None else np.zeros(len(c))
    pairs = None
    if groups is not None or donor is None:
        spread, source = group_spread(c, groups)
        pairs = _pairs(c, groups)
    else:
        spread, source = squared_distances(c, _matrix(donor, "donor")), SPREAD_SOURCES[1]
    size = (c ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (c * t).sum(axis=1) / np.sqrt(size * (t ** 2).sum(axis=1))
    usable = np.isfinite(move) & np.isfinite(floor) & np.isfinite(spread)
    n = int(usable.sum())
    out = dict(n=n, spread_source=source, placebo=placebo is not None, statistic="r2", collapsed=False)
    if n < 2:
        return {**out, **dict.fromkeys(("estimate", "ci_low", "ci_high", "r2", "move", "floor", "spread",
                                        "excess_spread_low", "relative_change", "relative_change_low",
                                        "relative_change_high", "one_minus_cosine"), math.nan)}
    d, f, s, z = move[usable], floor[usable], spread[usable], size[usable]
    mean_size = float(z.mean())
    excess_low = _mean_interval(s - f, alpha, n_boot, seed)[0] if placebo is not None else math.nan
    numerically_flat = not float(s.mean()) > _NUMERICAL_ZERO * max(mean_size, 1e-300)
    beyond_noise = (not numerically_flat) and (placebo is None or excess_low > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = float((d.mean() - f.mean()) / (s.mean() - f.mean())) if beyond_noise else math.nan
        relative = float((d.mean() - f.mean()) / mean_size) if mean_size > 0 else math.nan
    rel_low, rel_high = (_ratio_interval(d - f, z, alpha, n_boot, seed + 1) if mean_size > 0 else (math.nan,) * 2)
    out.update(move=float(d.mean()), floor=float(f.mean()), spread=float(s.mean()), excess_spread_low=excess_low,
               relative_change=relative, relative_change_low=rel_low, relative_change_high=rel_high,
               one_minus_cosine=float(np.nanmean(1 - cosine[usable])) if np.isfinite(cosine[usable]).any()
               else math.nan, r2=r2)
    if beyond_noise:
        if pairs is not None:
            keep = np.flatnonzero(usable)
            low, high = _pairwise_r2_interval(d, f, pairs[0][np.ix_(keep, keep)], pairs[1][np.ix_(keep, keep)], alpha,
                                              n_boot, seed)
        else:  # a donor's distance per instance: independent across instances
            low, high = _ratio_interval(d - f, s - f, alpha, n_boot, seed)
        out.update(estimate=r2, ci_low=low, ci_high=high)
    else:
        out.update(statistic="relative_change", collapsed=True, estimate=relative, ci_low=rel_low, ci_high=rel_high)
    return out


def mediator_r2(clean, edited, donor, placebo=None, *, alpha: float = 0.05, n_boot: int = 2000,
                seed: int = 0) -> dict:
    """Input -> text mediator: ``latent_r2`` on per-instance states of the imagined span (e.g. the span's
    mean-pooled hidden states), with each instance's donor (the instance whose input was swapped in) as the
    yardstick: R2 ~ 1 when the span changes as far as the donor's own span differs, ~0 when it ignores the edit.

    >>> rng = np.random.default_rng(1)
    >>> clean = rng.normal(size=(20, 6)); donor = np.roll(clean, 1, axis=0)
    >>> round(mediator_r2(clean, donor, donor, n_boot=200)["estimate"], 6)
    1.0
    """
    return latent_r2(clean, edited, placebo=placebo, donor=donor, alpha=alpha, n_boot=n_boot, seed=seed)


def token_edit_distance(first, second) -> int:
    """Levenshtein distance between two token sequences (the imagined text under the clean and edited input).

    >>> token_edit_distance([1, 2, 3], [1, 3]), token_edit_distance("abc", "abc")
    (1, 0)
    """
    a, b = list(first), list(second)
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def linear_cka(first, second) -> float:
    """Centred linear CKA between two sets of per-instance states (N, D1) and (N, D2) (Kornblith et al. 2019):
    ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) on column-centred X, Y. 1 for states that are a rotation and scaling of
    each other; invariant to a shared offset.

    >>> x = np.random.default_rng(0).normal(size=(10, 3))
    >>> round(linear_cka(x, 2 * x + 5), 6)
    1.0
    """
    x, y = _matrix(first, "first"), _matrix(second, "second")
    if len(x) != len(y):
        raise LatentProbeError(f"CKA needs the same instances on both sides, got {len(x)} and {len(y)}",
                               "pass the two representations of the same instances, in the same order")
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    gx, gy = x @ x.T, y @ y.T  # Gram form: cheap when D is large and N small
    denominator = np.sqrt((gx * gx).sum() * (gy * gy).sum())
    return float((gx * gy).sum() / denominator) if denominator > 0 else math.nan


def cka_test(first, second, *, n_permutations: int = 999, seed: int = 0) -> tuple[float, float]:
    """Linear CKA and its permutation p-value (instances of one side shuffled):
    (1 + #{permuted >= observed}) / (1 + n_permutations).

    >>> rng = np.random.default_rng(0); x = rng.normal(size=(20, 4))
    >>> cka, p = cka_test(x, x @ rng.normal(size=(4, 4)), n_permutations=99)
    >>> bool(cka > 0.5), float(p)
    (True, 0.01)
    """
    x, y = _matrix(first, "first"), _matrix(second, "second")
    observed = linear_cka(x, y)
    if not math.isfinite(observed) or n_permutations < 1:
        return observed, math.nan
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    gx, gy = x @ x.T, y @ y.T
    scale = np.sqrt((gx * gx).sum() * (gy * gy).sum())
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(n_permutations):
        order = rng.permutation(len(x))
        exceed += (gx * gy[np.ix_(order, order)]).sum() / scale >= observed - 1e-12
    return observed, float((1 + exceed) / (1 + n_permutations))


def check_level(alpha, n_boot) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
        raise LatentProbeError(f"alpha={alpha!r} is not in (0, 0.5)", "use e.g. alpha=0.05")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise LatentProbeError(f"n_boot={n_boot!r} is not a whole number >= 1", "use e.g. n_boot=2000")


# ------------------------------------------------------------------------------ the table `intervene` writes

R2_COLUMNS = ["step", "metric", "estimate", "ci_low", "ci_high", "n", "k", "p_value", "interval", "confidence",
              "move", "floor", "spread", "spread_source", "excess_spread_low", "one_minus_cosine", "collapsed",
              "placebo"]


def _present(array: np.ndarray) -> np.ndarray:
    return ~np.isnan(array).any(axis=-1)


def input_latent_rows(clean, edited, *, placebo=None, groups=None, prefix: str = "latent", alpha: float = 0.05,
                      n_boot: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The input -> latent rows of one edit: ``latent_r2`` (or ``latent_relative_change`` where the latents have
    no spread beyond noise) per latent step and for all steps together (``step`` NaN: the steps every instance
    has, squared distances summed), and the per-instance squared distances behind them.

    ``clean``, ``edited``, ``placebo``: (N, S, D) with all-NaN vectors where an instance lacks a step; ``groups``
    as in ``latent_r2``. Returns (rows with columns ``R2_COLUMNS``, per-instance table ``instance, step,
    move, floor, spread``).

    >>> rng = np.random.default_rng(0); clean = rng.normal(size=(12, 2, 4))
    >>> rows, per_instance = input_latent_rows(clean, clean[::-1], n_boot=100)
    >>> rows.metric.tolist(), len(per_instance)
    (['latent_r2', 'latent_r2', 'latent_r2'], 24)
    """
    c, t = np.asarray(clean, dtype=float), np.asarray(edited, dtype=float)
    if c.ndim != 3 or c.shape != t.shape:
        raise LatentProbeError(f"clean {c.shape} and edited {t.shape} are not two (instances, steps, dim) arrays "
                               "of one shape", "NaN-pad missing steps so both have the same shape")
    p = None if placebo is None else np.asarray(placebo, dtype=float)
    ok = _present(c) & _present(t) & (_present(p) if p is not None else True)
    rows, per_instance = [], []
    common = [s for s in range(c.shape[1]) if ok[:, s].all()]
    plans = [(s, ok[:, s], [s]) for s in range(c.shape[1])]
    if common:
        plans.append((math.nan, np.ones(len(c), dtype=bool), common))
    for step, keep, steps in plans:
        if keep.sum() < 2:
            continue
        idx = np.flatnonzero(keep)
        pick = lambda a: a[np.ix_(idx, steps)].reshape(len(idx), -1)  # noqa: E731
        result = latent_r2(pick(c), pick(t), placebo=None if p is None else pick(p),
                           groups=None if groups is None else np.asarray(groups)[idx], alpha=alpha, n_boot=n_boot,
                           seed=seed)
        metric = f"{prefix}_r2" if result["statistic"] == "r2" else f"{prefix}_relative_change"
        rows.append({"step": step, "metric": metric, "estimate": result["estimate"], "ci_low": result["ci_low"],
                     "ci_high": result["ci_high"], "n": result["n"], "k": math.nan, "p_value": math.nan,
                     "interval": "paired BCa bootstrap", "confidence": 1 - alpha, "move": result["move"],
                     # NaN, not 0, when no placebo ran: the verdict then says the floor was taken as 0
                     "floor": result["floor"] if result["placebo"] else math.nan, "spread": result["spread"],
                     "spread_source": result["spread_source"],
                     "excess_spread_low": result["excess_spread_low"],
                     "one_minus_cosine": result["one_minus_cosine"], "collapsed": result["collapsed"],
                     "placebo": result["placebo"]})
        if not (isinstance(step, float) and math.isnan(step)):
            move = squared_distances(pick(c), pick(t))
            floor = squared_distances(pick(c), pick(p)) if p is not None else np.zeros(len(idx))
            spread, _ = group_spread(pick(c), None if groups is None else np.asarray(groups)[idx])
            per_instance += [{"instance": int(i), "step": step, "move": m, "floor": f, "spread": s}
                             for i, m, f, s in zip(idx, move, floor, spread)]
    return (pd.DataFrame(rows, columns=R2_COLUMNS),
            pd.DataFrame(per_instance, columns=["instance", "step", "move", "floor", "spread"]))
