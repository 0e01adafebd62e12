"""Statistics of the causal analysis: paired bootstrap, mediation effects, answer change and latent change.

Pure numpy/pandas; nothing here runs a model. Every estimate is a mean over INSTANCES with a paired bootstrap
interval that resamples instances (never rows of one instance separately), and every function takes a seed.
Within one call all metrics share the same resamples, so their intervals are jointly consistent
(TE, NDE, NIE and the interaction are computed on the same bootstrap draws).

Tidy result schema (the contract ``report`` and the figures consume), as returned by ``summarize``:

============== ======= ================================================================================
column         type    meaning
============== ======= ================================================================================
subject        str     the model (one column per entry of ``group_cols``; these three by default)
target         str     what the intervention edited (e.g. "latent", "input", "text"); may be None
intervention   str     the intervention's name, as recorded in the traces
metric         str     see below
estimate       float   mean over instances; NaN when n == 0
ci_low         float   lower end of the (1 - alpha) interval (95% by default; see ``interval``)
ci_high        float   upper end
n              int     number of instances the estimate rests on (instances with a value for it)
k              float   for a rate of events (answer changes): how many of the n instances changed; else NaN
p_value        float   two-sided p-value for "the effect is 0": exact binomial for rates, a sign-flip permutation
                       test over instances for means (see ``stats.intervals.sign_flip_p_values``), bootstrap for the
                       latent change_ratio
interval       str     "clopper-pearson" (exact binomial, for rates of 0/1 events), "clopper-pearson (instances as
                       units)" (several seeds or donors per instance, see ``stats.intervals.cluster_rate``) or
                       "BCa bootstrap" (means)
mediator       str     for mediation metrics: "fed_back" (the fed-back latent vectors) or "all_layers" (the
                       latent positions' states at every layer); empty for the other metrics
============== ======= ================================================================================

Rates of events (``flip_rate`` and the mediation effects on ``answer_changed``, whose clean value is 0 by
definition) get exact Clopper-Pearson intervals: zero changes in n instances still give an honest upper bound
(about 3.7/n at 95%), where a bootstrap of zeros would give [0, 0]. With several seeds or donors per instance the
instance stays the unit (``stats.intervals.cluster_rate``), never a percentile bootstrap of a few nonzero
fractions. Means of continuous or signed outcomes (accuracy change, gold probability, NIE on correctness) get BCa
bootstrap intervals over instances (the same resamples for every column of a group) and sign-flip permutation
p-values, which hold their level on skewed, rare-event outcomes where the t-test does not (issue 18).

Metric names:

- answer change (``answer_change_metrics``): ``accuracy_clean``, ``accuracy_intervened``, ``accuracy_change``,
  ``flip_rate``, ``gold_prob_change``, ``kl_clean_to_intervened``, ``unparsable_rate_clean``,
  ``unparsable_rate_intervened``;
- mediation (``mediation_effects``), per outcome Y: ``TE_<outcome>``, ``NDE_<outcome>``, ``NIE_<outcome>``,
  ``interaction_<outcome>`` (e.g. ``NIE_correct``; ``NIE_y`` for the unprefixed ``y_*`` columns); no interaction
  row for ``answer_changed``, where TE, NDE and NIE are rates of changed answers and do not add up.

``mediation_effects``, ``answer_change_metrics`` and ``latent_change_metrics`` return the same
``metric, estimate, ci_low, ci_high, n`` columns (plus ``outcome`` or ``step``), so their outputs concatenate.
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from ..errors import LatentProbeError

RESULT_COLUMNS = ("metric", "estimate", "ci_low", "ci_high", "n", "k", "p_value", "interval")
BOOTSTRAP, EXACT = "BCa bootstrap", "clopper-pearson"
# Metrics that are rates of 0/1 events per instance: exact binomial intervals when every instance is 0 or 1.
RATE_METRICS = ("flip_rate",)
# The mediation outcome "answer changed from the clean answer": 0 in the clean run by definition, so its
# TE/NDE/NIE are rates of changed answers (the primary latent -> answer outcome).
CHANGE_OUTCOME = "answer_changed"
# Outcome columns for the full mediator (latent states at every layer) end with this suffix.
ALL_LAYERS_SUFFIX = "_all_layers"
MEDIATION_SUFFIXES = ("x0_z0", "x1_z1", "x0_z1", "x1_z0")
ANSWER_COLUMNS = ("clean_correct", "intervened_correct", "clean_parsed", "intervened_parsed")
DEFAULT_KL_EPSILON = 1e-6

# Bound the resampled block (replicates x instances x columns) so memory stays small for large runs.
_MAX_BLOCK_ELEMENTS = 4_000_000


# ----------------------------------------------------------------------------------------- bootstrap core

def _resample_index_blocks(n_instances: int, n_boot: int, seed: int, width: int = 1) -> Iterator[np.ndarray]:
    """Blocks of bootstrap index rows, shape (block, n_instances); the same seed gives the same draws."""
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, _MAX_BLOCK_ELEMENTS // max(1, n_instances * width)))
    for start in range(0, n_boot, block):
        yield rng.integers(0, n_instances, size=(min(block, n_boot - start), n_instances))


def _bootstrap_column_means(values: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Column means of an (instances, metrics) matrix and their bootstrap replicates (n_boot, metrics).

    NaN marks "no value for this instance"; each replicate averages the values its resampled instances have, so all
    columns share one resample of instances even when they are missing for different instances.
    """
    present = ~np.isnan(values)
    filled = np.where(present, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = filled.sum(axis=0) / present.sum(axis=0)
        if len(values) == 0:
            return estimate, np.full((n_boot, values.shape[1]), np.nan)
        replicates = [filled[index].sum(axis=1) / present[index].sum(axis=1)
                      for index in _resample_index_blocks(len(values), n_boot, seed, values.shape[1])]
    return estimate, np.concatenate(replicates)


def _percentile_interval(replicates: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-column percentile interval, ignoring replicates that had no value (NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is a legitimate "not measured"
        low, high = np.nanquantile(replicates, [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


def _bootstrap_p_value(replicates: np.ndarray, null: float = 0.0) -> np.ndarray:
    """Per-column two-sided bootstrap p-value for "the statistic equals ``null``": the smallest alpha whose
    percentile interval excludes it, 2 x min(share of replicates <= null, share >= null), floored at
    1 / (replicates + 1) so no p-value is exactly 0. NaN for a column without replicates."""
    valid = ~np.isnan(replicates)
    count = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = (np.where(valid, replicates <= null, False).sum(axis=0) + 1) / (count + 1)
        above = (np.where(valid, replicates >= null, False).sum(axis=0) + 1) / (count + 1)
        p = np.minimum(1.0, 2 * np.minimum(below, above))
    return np.where(count > 0, p, np.nan)


def mean_p_value(values: np.ndarray) -> np.ndarray:
    """Per-column two-sided p-value for "the mean is 0" from a one-sample t-test over instances (NaN = no value).

    Why not the bootstrap's own p-value: at n = 20 the percentile bootstrap is too narrow (it ignores the
    t-distribution's heavier tails and the (n-1)/n variance shrinkage); measured by simulation, its p < 0.05
    came in 6.9% of runs under a true null for one row and 9.6% for six Holm-adjusted rows, against the 5% a
    test promises. The t-test holds its level (``tests/test_calibration.py``). A column whose values are all
    equal gives p = 1 when they are 0 and p = 0 otherwise; a column with fewer than 2 values gives NaN.
    """
    from scipy.stats import ttest_1samp

    values = np.atleast_2d(np.asarray(values, dtype=float).T).T
    out = np.full(values.shape[1], np.nan)
    for j in range(values.shape[1]):
        column = values[:, j][~np.isnan(values[:, j])]
        if len(column) < 2:  # one value tests nothing
            continue
        if np.ptp(column) == 0:
            out[j] = 1.0 if column[0] == 0 else 0.0
        else:
            out[j] = float(ttest_1samp(column, 0.0).pvalue)
    return out


def exact_rate(events, alpha: float = 0.05) -> dict:
    """Rate of 0/1 events with its exact (Clopper-Pearson) two-sided (1 - alpha) interval.

    Returns ``estimate, ci_low, ci_high, n, k, p_value, interval``. ``p_value`` tests "the rate is 0": a single
    event is impossible under it, so it is 1 when k = 0 and 0 otherwise. NaN rows of ``events`` are dropped.

    >>> row = exact_rate(np.zeros(20))
    >>> round(row["ci_high"], 3), row["k"], row["n"]
    (0.168, 0, 20)
    """
    from scipy.stats import binomtest

    values = np.asarray(events, dtype=float)
    values = values[~np.isnan(values)]
    if not np.isin(values, (0.0, 1.0)).all():
        raise LatentProbeError("exact_rate needs 0/1 events per instance", "pass one 0 or 1 per instance")
    n, k = len(values), int(values.sum())
    if n == 0:
        return dict(estimate=np.nan, ci_low=np.nan, ci_high=np.nan, n=0, k=0, p_value=np.nan, interval=EXACT)
    interval = binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
    return dict(estimate=k / n, ci_low=float(interval.low), ci_high=float(interval.high), n=n, k=k,
                p_value=1.0 if k == 0 else 0.0, interval=EXACT)


def _bca_interval(values: np.ndarray, statistic: Callable, estimate: float, replicates: np.ndarray,
                  alpha: float) -> tuple[float, float]:
    """Bias-corrected and accelerated interval (Efron 1987): percentiles shifted by bias z0 and skew a."""
    normal = NormalDist()
    below = np.mean(replicates < estimate) + 0.5 * np.mean(replicates == estimate)
    if below <= 0 or below >= 1:  # degenerate bootstrap distribution: the bias correction is undefined
        return _scalar_percentiles(replicates, alpha)
    bias = normal.inv_cdf(below)
    jackknife = np.array([statistic(np.delete(values, i, axis=0)) for i in range(len(values))], dtype=float)
    spread = jackknife.mean() - jackknife
    denominator = 6.0 * np.sum(spread ** 2) ** 1.5
    acceleration = np.sum(spread ** 3) / denominator if denominator > 0 else 0.0
    levels = []
    for tail in (alpha / 2, 1 - alpha / 2):
        z = bias + normal.inv_cdf(tail)
        levels.append(normal.cdf(bias + z / (1 - acceleration * z)))
    low, high = np.quantile(replicates, levels)
    return float(low), float(high)


def _scalar_percentiles(replicates: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _complete_rows(values_by_instance) -> np.ndarray:
    values = np.asarray(values_by_instance, dtype=float)
    if values.ndim not in (1, 2):
        raise LatentProbeError(f"paired_bootstrap expects one value or one row of values per instance, "
                               f"got an array of shape {values.shape}", "pass an (instances,) or (instances, k) array")
    missing = np.isnan(values) if values.ndim == 1 else np.isnan(values).any(axis=1)
    return values[~missing]


def _replicate_statistic(values: np.ndarray, statistic: Callable, n_boot: int, seed: int) -> np.ndarray:
    width = 1 if values.ndim == 1 else values.shape[1]
    blocks = _resample_index_blocks(len(values), n_boot, seed, width)
    if statistic in (np.mean, np.nanmean, np.median, np.nanmedian) and values.ndim == 1:
        # Vectorised fast path, drawing exactly the resamples the general loop would.
        return np.concatenate([statistic(values[index], axis=1) for index in blocks])
    return np.array([statistic(values[row]) for index in blocks for row in index], dtype=float)


def mean_difference(pairs: np.ndarray) -> float:
    """Mean of column 1 minus column 0 of an (instances, 2) array: the usual paired statistic.

    >>> mean_difference(np.array([[1.0, 3.0], [2.0, 2.0]]))
    1.0
    """
    return float(np.mean(pairs[:, 1] - pairs[:, 0]))


def check_bootstrap(n_boot, alpha: float = 0.05) -> None:
    """Refuse a resample count that is not a whole number >= 1 or an alpha outside (0, 1), before any work."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise LatentProbeError(f"the bootstrap needs a whole number of resamples >= 1, got {n_boot!r}",
                               "pass e.g. n_boot=2000")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise LatentProbeError(f"alpha must be in (0, 1), got {alpha!r}", "pass e.g. alpha=0.05 for 95% intervals")


def paired_bootstrap(values_by_instance, statistic: Callable = np.mean, n_boot: int = 2000, seed: int = 0,
                     alpha: float = 0.05, method: str = "percentile") -> tuple[float, float, float]:
    """Estimate and (1 - alpha) bootstrap interval of ``statistic``, resampling instances.

    ``values_by_instance`` holds one value, or one row of paired values (e.g. clean and intervened), per instance;
    whole rows are resampled together, so columns stay paired. ``statistic`` maps such an array to a number.
    Rows containing NaN are dropped first. ``method`` is "percentile" or "bca" (bias-corrected and accelerated;
    costs one extra statistic call per instance). Returns ``(estimate, low, high)``; NaNs when no rows are left.

    >>> rng = np.random.default_rng(0)
    >>> clean = rng.normal(scale=1000, size=50); intervened = clean + 0.5
    >>> estimate, low, high = paired_bootstrap(np.column_stack([clean, intervened]), mean_difference, n_boot=200)
    >>> round(estimate, 9), round(high - low, 9)  # paired: the spread cancels
    (0.5, 0.0)
    """
    if method not in ("percentile", "bca"):
        raise LatentProbeError(f"unknown bootstrap method {method!r}", "use 'percentile' or 'bca'")
    check_bootstrap(n_boot, alpha)
    values = _complete_rows(values_by_instance)
    if len(values) == 0:
        return (float("nan"),) * 3
    estimate = float(statistic(values))
    replicates = _replicate_statistic(values, statistic, n_boot, seed)
    if method == "bca":
        low, high = _bca_interval(values, statistic, estimate, replicates, alpha)
    else:
        low, high = _scalar_percentiles(replicates, alpha)
    return estimate, low, high


def _summarise_matrix(per_instance: pd.DataFrame, n_boot: int, seed: int, alpha: float) -> pd.DataFrame:
    """One result row per column of an (instances, metrics) frame, all from one joint bootstrap."""
    from .intervals import bca_mean_intervals, sign_flip_p_values

    check_bootstrap(n_boot, alpha)
    values = per_instance.to_numpy(dtype=float)
    present = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = np.where(present, values, 0.0).sum(axis=0) / present.sum(axis=0)
    low, high = bca_mean_intervals(values, alpha, n_boot, seed)
    counts = present.sum(axis=0)
    # two instances: BCa is undefined (fewer than 3 values); keep the percentile interval there
    few = (counts == 2)
    if few.any():
        _, replicates = _bootstrap_column_means(values[:, few], n_boot, seed)
        low[few], high[few] = _percentile_interval(replicates, alpha)
    return _result_frame(per_instance.columns, estimate, low, high, counts,
                         p_value=sign_flip_p_values(values, max(n_boot, 200), seed))


def _result_frame(metrics, estimate, low, high, n, p_value=None) -> pd.DataFrame:
    frame = pd.DataFrame({"metric": list(metrics), "estimate": estimate, "ci_low": low, "ci_high": high,
                          "n": np.asarray(n, dtype=int), "k": np.nan,
                          "p_value": np.nan if p_value is None else p_value, "interval": BOOTSTRAP})
    # Interval endpoints are NaN wherever the estimate is: no instance, no interval.
    frame.loc[frame["n"] == 0, ["estimate", "ci_low", "ci_high", "p_value"]] = np.nan
    return frame


def _use_exact_rates(frame: pd.DataFrame, per_instance: pd.DataFrame, metrics, alpha: float) -> pd.DataFrame:
    """Replace the bootstrap rows of rate metrics by exact ones: Clopper-Pearson where every instance is 0 or 1,
    the cluster-aware exact interval (instances as units, ``stats.intervals.cluster_rate``) where several seeds of
    an instance were averaged to a fraction."""
    from .intervals import cluster_rate

    frame = frame.copy()
    for metric in metrics:
        if metric not in per_instance.columns:
            continue
        values = per_instance[metric].to_numpy(dtype=float)
        values = values[~np.isnan(values)]
        if len(values) == 0 or ((values < 0) | (values > 1)).any():
            continue
        row = exact_rate(values, alpha) if np.isin(values, (0.0, 1.0)).all() else cluster_rate(values, alpha)
        where = frame.index[frame.metric == metric]
        for column, value in row.items():
            frame.loc[where, column] = value
    return frame


def _mean_per_instance(per_row: pd.DataFrame, instance_ids: pd.Series | None) -> pd.DataFrame:
    """Average rows of the same instance (e.g. several noise seeds), so the bootstrap unit is the instance."""
    if instance_ids is None:
        return per_row.reset_index(drop=True)
    return per_row.groupby(instance_ids.to_numpy(), sort=True).mean().reset_index(drop=True)


def _as_float(column: pd.Series) -> pd.Series:
    return pd.to_numeric(column, errors="coerce").astype(float)


def _require_columns(df: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [name for name in columns if name not in df.columns]
    if missing:
        raise LatentProbeError(f"{where}: missing column(s) {', '.join(missing)}",
                               f"pass a frame with {', '.join(columns)} (see latentprobe.stats.effects docs)")


# ------------------------------------------------------------------------------------------------- mediation

def _mediation_columns(df: pd.DataFrame, outcome: str) -> dict[str, str]:
    """The four potential-outcome columns: ``<outcome>_x0_z0``... when present, else ``y_x0_z0``..."""
    for prefix in (outcome, "y"):
        columns = {suffix: f"{prefix}_{suffix}" for suffix in MEDIATION_SUFFIXES}
        if all(name in df.columns for name in columns.values()):
            return columns
    raise LatentProbeError(f"mediation_effects: no complete set of outcome columns for {outcome!r}",
                           f"pass columns y_x0_z0, y_x1_z1, y_x0_z1, y_x1_z0 (or {outcome}_x0_z0, ...)")


def mediation_effects(df: pd.DataFrame, outcome: str, seed: int, n_boot: int = 2000,
                      alpha: float = 0.05) -> pd.DataFrame:
    """Total, natural direct and natural indirect effects of an intervention, with paired bootstrap intervals.

    ``df`` has one row per instance: ``instance_id`` and the outcome Y under four runs,

    - ``y_x0_z0`` = Y(x0, Z(x0)): clean input, its own latents;
    - ``y_x1_z1`` = Y(x1) = Y(x1, Z(x1)): treated input, its own latents;
    - ``y_x0_z1`` = Y(x0, Z(x1)): clean input, latents taken from the treated run;
    - ``y_x1_z0`` = Y(x1, Z(x0)): treated input, latents pinned to the clean run's.

    (Columns ``<outcome>_x0_z0``, ... are used instead when present, so one frame can carry several outcomes.)
    Y is any per-instance number: correctness (bools become 0/1), gold-answer probability, answer change.

    Effects (means over instances): TE = Y(x1) - Y(x0); NDE = Y(x1, Z(x0)) - Y(x0, Z(x0));
    NIE = Y(x0, Z(x1)) - Y(x0, Z(x0)). TE = NDE + NIE holds only when input and latents do not interact, so the
    ``interaction`` row reports TE - (NDE + NIE); a large one means the two paths cannot be read separately.

    Instances missing any of the four outcomes are dropped, so all four effects rest on the same instances; rows
    sharing an ``instance_id`` are averaged. All effects are bootstrapped from the same resampled instances.
    Returns columns ``outcome, metric, estimate, ci_low, ci_high, n, k, p_value, interval`` with metric TE, NDE,
    NIE, interaction (exact binomial rows for the ``answer_changed`` outcome, see the module docstring).

    >>> df = pd.DataFrame({"instance_id": ["a", "b"], "y_x0_z0": [1, 1], "y_x1_z1": [0, 1],
    ...                    "y_x0_z1": [1, 0], "y_x1_z0": [0, 1]})
    >>> mediation_effects(df, "correct", seed=0, n_boot=100)[["metric", "estimate"]].to_dict("list")
    {'metric': ['TE', 'NDE', 'NIE', 'interaction'], 'estimate': [-0.5, -0.5, -0.5, 0.5]}
    """
    columns = _mediation_columns(df, outcome)
    y = pd.DataFrame({suffix: _as_float(df[name]) for suffix, name in columns.items()})
    complete = y.notna().all(axis=1).to_numpy()
    y = y[complete]
    clean = y["x0_z0"]
    effects = pd.DataFrame({
        "TE": y["x1_z1"] - clean,
        "NDE": y["x1_z0"] - clean,
        "NIE": y["x0_z1"] - clean,
    })
    change = outcome.removesuffix(ALL_LAYERS_SUFFIX) == CHANGE_OUTCOME and bool((clean == 0).all())
    if not change:  # answer change is a rate of events on each path: TE - (NDE + NIE) means nothing there
        effects["interaction"] = effects["TE"] - effects["NDE"] - effects["NIE"]
    instance_ids = df["instance_id"][complete] if "instance_id" in df.columns else None
    per_instance = _mean_per_instance(effects, instance_ids)
    result = _summarise_matrix(per_instance, n_boot, seed, alpha)
    if change:
        # Y(x0, Z(x0)) is the clean answer itself: each effect is a rate of changed answers.
        result = _use_exact_rates(result, per_instance, ("TE", "NDE", "NIE"), alpha)
    result.insert(0, "outcome", outcome)
    return result


# --------------------------------------------------------------------------------------------- answer change

def _is_missing(answer) -> bool:
    """An unparsable answer: None, NaN or pd.NA (parquet and pandas turn None into the latter two)."""
    return answer is None or (not isinstance(answer, str) and bool(pd.isna(answer)))


def answer_flipped(clean_answer, intervened_answer) -> bool:
    """Whether the parsed answer changed under the intervention.

    Compared after stripping and case-folding; pass canonical answers (``ParsedAnswer.canonical``) so that "B"
    and the text of option B count as the same answer. Unparsable on both sides is no flip (nothing was answered
    either way); unparsable on one side only is a flip (the model stopped or started answering).

    >>> answer_flipped("B", "b "), answer_flipped("B", None), answer_flipped(None, None)
    (False, True, False)
    """
    clean_missing, intervened_missing = _is_missing(clean_answer), _is_missing(intervened_answer)
    if clean_missing or intervened_missing:
        return clean_missing != intervened_missing
    return str(clean_answer).strip().casefold() != str(intervened_answer).strip().casefold()


def kl_divergence(clean_probs, intervened_probs, epsilon: float = DEFAULT_KL_EPSILON) -> float:
    """KL(clean || intervened) in nats between two distributions over the same answer candidates.

    ``epsilon`` is added to every probability and both vectors are renormalised: a candidate the intervened run
    gives probability 0 then costs a large finite amount (about p * log(p / epsilon)) instead of infinity, and
    probabilities over a subset of the vocabulary (the option letters) become distributions over that subset.
    NaN when either side is missing.

    >>> round(kl_divergence([0.5, 0.5], [0.5, 0.5]), 6), round(kl_divergence([1.0, 0.0], [0.5, 0.5]), 3)
    (0.0, 0.693)
    """
    if clean_probs is None or intervened_probs is None:
        return float("nan")
    clean, intervened = np.asarray(clean_probs, dtype=float), np.asarray(intervened_probs, dtype=float)
    if clean.ndim == 0 or intervened.ndim == 0:  # a NaN scalar standing in for a missing sequence
        return float("nan")
    if clean.shape != intervened.shape:
        raise LatentProbeError(f"answer probabilities over different candidates: {clean.shape} vs {intervened.shape}",
                               "record clean and intervened probabilities over the same answer candidates")
    if np.isnan(clean).any() or np.isnan(intervened).any():
        return float("nan")
    clean = (clean + epsilon) / (clean + epsilon).sum()
    intervened = (intervened + epsilon) / (intervened + epsilon).sum()
    return float(np.sum(clean * np.log(clean / intervened)))


def _answer_change_per_row(df: pd.DataFrame, epsilon: float) -> pd.DataFrame:
    clean_correct, intervened_correct = _as_float(df["clean_correct"]), _as_float(df["intervened_correct"])
    per_row = pd.DataFrame({
        "accuracy_clean": clean_correct,
        "accuracy_intervened": intervened_correct,
        "accuracy_change": intervened_correct - clean_correct,
        "flip_rate": [float(answer_flipped(a, b)) for a, b in zip(df["clean_parsed"], df["intervened_parsed"])],
        "gold_prob_change": _optional_difference(df, "clean_gold_prob", "intervened_gold_prob"),
        "kl_clean_to_intervened": _optional_kl(df, epsilon),
        "unparsable_rate_clean": [float(_is_missing(a)) for a in df["clean_parsed"]],
        "unparsable_rate_intervened": [float(_is_missing(a)) for a in df["intervened_parsed"]],
    }, index=df.index)
    return per_row


def _optional_difference(df: pd.DataFrame, clean: str, intervened: str) -> pd.Series:
    if clean not in df.columns or intervened not in df.columns:
        return pd.Series(np.nan, index=df.index)  # not recorded: reported with n = 0
    return _as_float(df[intervened]) - _as_float(df[clean])


# The only list-valued columns of the per-row table the summaries read (the answer distributions of the KL).
ANSWER_PROBABILITY_COLUMNS = ("clean_answer_probs", "intervened_answer_probs")


def _optional_kl(df: pd.DataFrame, epsilon: float) -> pd.Series:
    if any(column not in df.columns for column in ANSWER_PROBABILITY_COLUMNS):
        return pd.Series(np.nan, index=df.index)
    pairs = zip(*(df[column] for column in ANSWER_PROBABILITY_COLUMNS))
    return pd.Series([kl_divergence(p, q, epsilon) for p, q in pairs], index=df.index)


def answer_change_metrics(df: pd.DataFrame, seed: int, n_boot: int = 2000, alpha: float = 0.05,
                          epsilon: float = DEFAULT_KL_EPSILON) -> pd.DataFrame:
    """How an intervention changes the answers: accuracy, flips, gold probability, KL, unparsable rates.

    ``df`` has one row per instance (x intervention seed) of ONE intervention, with ``clean_correct``,
    ``intervened_correct`` (bool), ``clean_parsed``, ``intervened_parsed`` (canonical answer or None when
    unparsable) and optionally ``clean_gold_prob``, ``intervened_gold_prob`` (float, NaN allowed) and
    ``clean_answer_probs``, ``intervened_answer_probs`` (probabilities over the answer candidates, or None).
    Rows sharing an ``instance_id`` are averaged first, so the bootstrap resamples instances.

    Metrics: ``accuracy_clean``, ``accuracy_intervened``, ``accuracy_change`` (intervened - clean), ``flip_rate``
    (see ``answer_flipped``: unparsable on one side only is a flip), ``gold_prob_change`` (intervened - clean),
    ``kl_clean_to_intervened`` (see ``kl_divergence`` for the epsilon smoothing), ``unparsable_rate_clean``,
    ``unparsable_rate_intervened``. Unparsable answers count as not correct in the accuracies. A metric whose
    inputs were not recorded has n = 0 and NaN estimate. Returns ``metric, estimate, ci_low, ci_high, n``.

    >>> df = pd.DataFrame({"instance_id": ["a", "b"], "clean_correct": [True, True],
    ...                    "intervened_correct": [True, False], "clean_parsed": ["A", "B"],
    ...                    "intervened_parsed": ["A", None]})
    >>> answer_change_metrics(df, seed=0, n_boot=100).set_index("metric").loc["flip_rate", "estimate"]
    np.float64(0.5)
    """
    _require_columns(df, ANSWER_COLUMNS, "answer_change_metrics")
    per_row = _answer_change_per_row(df, epsilon)
    instance_ids = df["instance_id"] if "instance_id" in df.columns else None
    per_instance = _mean_per_instance(per_row, instance_ids)
    return _use_exact_rates(_summarise_matrix(per_instance, n_boot, seed, alpha), per_instance, RATE_METRICS,
                            alpha)


# --------------------------------------------------------------------------------------------- latent change

LATENT_METRICS = ("cosine", "relative_l2", "inter_instance_relative_l2", "inter_instance_cosine", "change_ratio")


def _rowwise_cosine(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(first * second, axis=-1) / (np.linalg.norm(first, axis=-1) * np.linalg.norm(second, axis=-1))


def _relative_l2(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(reference, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, np.linalg.norm(reference - other, axis=-1) / norms, np.nan)


def _inter_instance_spread(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per instance: mean relative L2 to, and mean cosine with, every OTHER instance's latent (m, D) -> (m,), (m,)."""
    count = len(latents)
    if count < 2:
        return np.full(count, np.nan), np.full(count, np.nan)
    norms = np.linalg.norm(latents, axis=1)
    gram = latents @ latents.T
    distances = np.sqrt(np.clip(norms[:, None] ** 2 + norms[None, :] ** 2 - 2 * gram, 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(norms[:, None] > 0, distances / norms[:, None], np.nan)
        cosine = gram / (norms[:, None] * norms[None, :])
    return _mean_over_other_instances(relative), _mean_over_other_instances(cosine)


def _mean_over_other_instances(pairwise: np.ndarray) -> np.ndarray:
    """Row means of a pairwise matrix without the diagonal (an instance compared with itself) or NaN entries."""
    off_diagonal = np.where(~np.eye(len(pairwise), dtype=bool), pairwise, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row with no valid partner is NaN, as it should be
        return np.nanmean(off_diagonal, axis=1)


def _latent_step_per_instance(clean: np.ndarray, intervened: np.ndarray, present: np.ndarray) -> pd.DataFrame:
    """Per-instance values at one step (NaN where the instance lacks the step), columns as the bootstrap needs."""
    count = len(clean)
    clean_ok = present & np.isfinite(clean).all(axis=1)
    both_ok = clean_ok & np.isfinite(intervened).all(axis=1)
    per_instance = pd.DataFrame(np.nan, index=range(count), columns=[
        "cosine", "relative_l2", "inter_instance_relative_l2", "inter_instance_cosine", "baseline_for_ratio"])
    per_instance.loc[both_ok, "cosine"] = _rowwise_cosine(clean[both_ok], intervened[both_ok])
    per_instance.loc[both_ok, "relative_l2"] = _relative_l2(clean[both_ok], intervened[both_ok])
    spread_l2, spread_cosine = _inter_instance_spread(clean[clean_ok])
    per_instance.loc[clean_ok, "inter_instance_relative_l2"] = spread_l2
    per_instance.loc[clean_ok, "inter_instance_cosine"] = spread_cosine
    # The ratio compares numerator and denominator over the same instances (those with both latents).
    per_instance["baseline_for_ratio"] = per_instance["inter_instance_relative_l2"].where(both_ok)
    return per_instance


def _latent_step_rows(per_instance: pd.DataFrame, n_boot: int, seed: int, alpha: float) -> pd.DataFrame:
    values = per_instance.to_numpy(dtype=float)
    estimate, replicates = _bootstrap_column_means(values, n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio, ratio_replicates = estimate[1] / estimate[4], replicates[:, 1] / replicates[:, 4]
    estimate = np.append(estimate[:4], ratio)
    low, high = _percentile_interval(np.column_stack([replicates[:, :4], ratio_replicates]), alpha)
    counts = (~np.isnan(values)).sum(axis=0)
    n = np.append(counts[:4], min(counts[1], counts[4]))
    p_value = _bootstrap_p_value(np.column_stack([replicates[:, :4], ratio_replicates]))
    return _result_frame(LATENT_METRICS, estimate, low, high, n, p_value=p_value)


def latent_change_metrics(clean, intervened, step_mask=None, seed: int = 0, n_boot: int = 2000,
                          alpha: float = 0.05) -> pd.DataFrame:
    """How far an intervention moves the latent vectors, per latent step, relative to inter-instance spread.

    ``clean`` and ``intervened`` are float arrays (N instances, S latent steps, D) with NaN where an instance has
    no such step; ``step_mask`` (N, S), True where the step exists, can exclude more. Per step:

    - ``cosine``: mean cos(clean_i, intervened_i);
    - ``relative_l2``: mean ||clean_i - intervened_i|| / ||clean_i||;
    - ``inter_instance_relative_l2`` / ``inter_instance_cosine``: mean relative L2 / cosine between DIFFERENT
      instances' clean latents at that step (for each i, averaged over j != i);
    - ``change_ratio``: mean ``relative_l2`` / mean ``inter_instance_relative_l2`` over the instances having both.
      Near 0: the intervention barely moves the latents; near 1: it moves them as far as swapping in a different
      instance. This is what "negligible change" means here, rather than a threshold on raw distances.

    Intervals resample instances (jointly for all metrics at a step); the inter-instance baseline of each instance
    is computed once on all instances, not recomputed within a resample (duplicated instances would otherwise
    count as zero-distance pairs). Cosines are raw (not mean-centred). Returns ``step, metric, estimate, ci_low,
    ci_high, n``.

    >>> latents = np.random.default_rng(0).normal(size=(20, 2, 8))
    >>> table = latent_change_metrics(latents, latents, n_boot=50)
    >>> table.query("metric == 'change_ratio'")["estimate"].tolist()
    [0.0, 0.0]
    """
    clean, intervened = np.asarray(clean, dtype=float), np.asarray(intervened, dtype=float)
    if clean.ndim != 3 or clean.shape != intervened.shape:
        raise LatentProbeError(f"latent_change_metrics: expected two (instances, steps, dim) arrays of one shape, "
                               f"got {clean.shape} and {intervened.shape}",
                               "stack latents per instance and step, NaN-padding missing steps")
    present = np.ones(clean.shape[:2], dtype=bool) if step_mask is None else np.asarray(step_mask, dtype=bool)
    if present.shape != clean.shape[:2]:
        raise LatentProbeError(f"latent_change_metrics: step_mask has shape {present.shape}, "
                               f"expected {clean.shape[:2]}", "pass one boolean per instance and latent step")
    frames = []
    for step in range(clean.shape[1]):
        per_instance = _latent_step_per_instance(clean[:, step], intervened[:, step], present[:, step])
        rows = _latent_step_rows(per_instance, n_boot, seed, alpha)
        rows.insert(0, "step", step)
        frames.append(rows)
    if not frames:
        return pd.DataFrame(columns=["step", *RESULT_COLUMNS, "confidence"])
    return pd.concat(frames, ignore_index=True).assign(confidence=1 - alpha)


# -------------------------------------------------------------------------------------------------- summary

def _mediation_outcomes(columns: Sequence[str]) -> list[str]:
    """Outcome prefixes P for which all four P_x0_z0, P_x1_z1, P_x0_z1, P_x1_z0 columns exist."""
    suffix = "_" + MEDIATION_SUFFIXES[0]
    prefixes = [name[: -len(suffix)] for name in columns if name.endswith(suffix)]
    return [p for p in prefixes if all(f"{p}_{s}" in columns for s in MEDIATION_SUFFIXES)]


def _summarize_group(rows: pd.DataFrame, seed: int, n_boot: int, alpha: float) -> pd.DataFrame:
    frames = []
    if all(name in rows.columns for name in ANSWER_COLUMNS):
        frames.append(answer_change_metrics(rows, seed=seed, n_boot=n_boot, alpha=alpha))
    for outcome in _mediation_outcomes(list(rows.columns)):
        effects = mediation_effects(rows, outcome, seed=seed, n_boot=n_boot, alpha=alpha)
        full = outcome.endswith(ALL_LAYERS_SUFFIX)
        effects["metric"] = effects["metric"] + "_" + outcome.removesuffix(ALL_LAYERS_SUFFIX)
        effects["mediator"] = "all_layers" if full else "fed_back"
        frames.append(effects.drop(columns="outcome"))
    table = pd.concat(frames, ignore_index=True)
    if "mediator" not in table.columns:
        table["mediator"] = ""
    table["mediator"] = table["mediator"].fillna("")
    return table


def applied_only(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows whose edit was applied: an edit the decoder could not apply (e.g. the instance never entered
    latent mode) is not a measurement. A missing value counts as applied; the strings "False"/"0" (a column
    read back from text) count as not applied.

    >>> applied_only(pd.DataFrame({"applied": [True, False, None, "False", "True"]})).index.tolist()
    [0, 2, 4]
    """
    if "applied" not in frame.columns:
        return frame
    return frame[applied_mask(frame)]


def applied_mask(frame: pd.DataFrame) -> pd.Series:
    """Per row, whether its edit was made (see `applied_only`; a frame without the column: every row)."""
    if "applied" not in frame.columns:
        return pd.Series(True, index=frame.index)
    return frame["applied"].map(lambda v: True if v is None or (isinstance(v, float) and math.isnan(v))
                                else str(v).strip().lower() not in ("false", "0", "0.0", "no")).astype(bool)


def summarize(rows: pd.DataFrame, group_cols: Sequence[str] = ("subject", "target", "intervention"),
              seed: int = 0, n_boot: int = 2000, alpha: float = 0.05) -> pd.DataFrame:
    """The tidy long table of the module docstring: one row per group x metric.

    ``rows`` has one row per instance (x intervention x seed), the ``group_cols`` and the columns of
    ``answer_change_metrics`` and/or mediation outcome columns (``y_x0_z0``, ... or ``<outcome>_x0_z0``, ...).
    Each group is summarised with the same ``seed``. Missing group values (e.g. no target) stay as NaN/None.

    >>> rows = pd.DataFrame({"subject": "tiny", "target": "latent", "intervention": "noise",
    ...                      "instance_id": ["a", "b"], "clean_correct": [True, False],
    ...                      "intervened_correct": [False, False], "clean_parsed": ["A", "B"],
    ...                      "intervened_parsed": ["C", "B"]})
    >>> table = summarize(rows, n_boot=100)
    >>> list(table.columns)
    ['subject', 'target', 'intervention', 'metric', 'estimate', 'ci_low', 'ci_high', 'n', 'k', 'p_value', 'interval', 'mediator', 'confidence']
    >>> table.set_index("metric").loc["accuracy_change", "estimate"]
    np.float64(-0.5)
    """
    group_cols = list(group_cols)
    _require_columns(rows, group_cols, "summarize")
    rows = applied_only(rows)
    has_answers = all(name in rows.columns for name in ANSWER_COLUMNS)
    if not has_answers and not _mediation_outcomes(list(rows.columns)):
        raise LatentProbeError("summarize: rows carry neither answer columns nor mediation outcome columns",
                               f"add {', '.join(ANSWER_COLUMNS)} and/or y_x0_z0, y_x1_z1, y_x0_z1, y_x1_z0")
    frames = []
    for key, group in rows.groupby(group_cols, dropna=False, sort=True):
        summary = _summarize_group(group, seed, n_boot, alpha)
        for name, value in zip(group_cols, key):
            summary[name] = value
        frames.append(summary)
    if not frames:
        return pd.DataFrame(columns=[*group_cols, *RESULT_COLUMNS, "mediator", "confidence"])
    table = pd.concat(frames, ignore_index=True)[[*group_cols, *RESULT_COLUMNS, "mediator"]]
    return table.assign(confidence=1 - alpha)  # the level of every interval, which the verdicts must know


def interval_text(estimate: float, low: float, high: float, n, digits: int = 3, signed: bool = True) -> str:
    """``+0.412 [+0.210, +0.600]`` -- or ``+1.000 (n = 1: no interval)`` where one instance (or a bootstrap of
    identical values) gives a zero-width or missing interval, as the verdicts treat it: no evidence of spread.

    >>> interval_text(1.0, 1.0, 1.0, 1)
    '+1.000 (n = 1: no interval)'
    >>> interval_text(0.25, 0.1, 0.4, 12, digits=2, signed=False)
    '0.25 [0.10, 0.40]'
    """
    sign = "+" if signed else ""
    value = f"{estimate:{sign}.{digits}f}"
    count = None if n is None or (isinstance(n, float) and math.isnan(n)) else int(n)
    no_width = not (math.isfinite(low) and math.isfinite(high)) or low == high
    if (count is not None and count < 2) or no_width:
        return f"{value} (n = {count if count is not None else '?'}: no interval)"
    return f"{value} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"
