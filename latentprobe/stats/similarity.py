"""Similarity of latent tokens across instances (the paper's "collapse" analysis).

Pure functions on numpy arrays: nothing here loads a model or reads the trace store.

Shapes used throughout:

- ``latents``: ``(N, S, D)`` -- N instances, S latent steps (0 = first latent step), D hidden size.
  An instance that stopped latent mode early has all-NaN rows for the steps it does not have.
- ``states``: ``(N, D)`` -- one non-latent reference state per instance (e.g. the mean image-token
  state, or the last prompt-token state) used as a baseline.

**What the verdict reads (issue 18).** ``collapse_ratio`` rows from :mod:`latentprobe.stats.collapse_spread`:
centred, whitened spread per direction in the latents' cross-fitted subspace against a *single* image token,
judged against a placebo noise floor, with the participation ratio and the first-to-last spread trend beside.
The relative spread and spread ratio below are kept as views: the review of issue 18 showed that a shared offset
drives them to 0 with no change of information and that a mean-of-tokens baseline shrinks with the token count.

**The former collapse statistic.** "Collapse" means the latent tokens of different instances
are nearly the same vector: they vary little across instances *compared with their size*. For one latent step
(or one baseline) with per-instance vectors x_1..x_n we measure the **relative spread**

    RS = [ 1/(n-1) * sum_i ||x_i - mean(x)||^2 ]  /  [ 1/n * sum_i ||x_i||^2 ]

the total variance across instances over the mean squared norm, which equals
``1 - mean_{i != j} <x_i, x_j> / mean_i ||x_i||^2``. It is 0 when every instance has the same
vector, about 1 for independent isotropic vectors, unchanged by scaling or rotating all vectors, and computed
per step around that step's own mean, so a step whose instances all sit at one point reads 0 wherever that
point is (centring on one mean pooled over steps measured where each step's mean sits instead). For unit
vectors RS = 1 - (mean cosine between different instances) exactly, so it is the raw-cosine measure of the
paper, generalised to vectors of unequal norm.

Raw hidden states share a large common direction (anisotropy), which makes RS small (and raw cosine high) for
*any* token. RS is therefore compared with the same statistic on non-latent states of the same instances at
the same layer (the mean image-token state; the last prompt token): the **spread ratio**
``RS(latent step) / RS(baseline)`` is 1 when the latents vary across instances as much as the image tokens do,
and near 0 when they collapse. Its interval is a paired bootstrap over instances (``scipy.stats.bootstrap``,
BCa; the same resampled instances for numerator and denominator; a resample never pairs an
instance with its own copy, which would look perfectly collapsed, so near 0 a lower bound can dip slightly
below 0). Any ratio in [0, inf) is reachable, so a
threshold such as 0.1 can always be met or missed by data (a rule on raw cosine "baseline + margin" could need
a cosine above 1). :func:`latentprobe.verdicts.collapse.verdict_collapse` decides on this ratio.

**Views kept for the paper's figure.** ``cosine`` rows hold the mean pairwise cosine between instances per step
(the paper's heatmaps), raw and "centred" on one common mean of all latent vectors. The centred view is kept
only for comparison with earlier runs: it mixes in where each step's mean lies and no verdict reads it.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from .collapse_spread import collapse_rows
from .instance_bootstrap import bootstrap_interval_from_counts

CENTRINGS = ("raw", "centred")
BASELINE_STEP = -1  # the ``step`` value of baseline rows, which have no latent step
DEFAULT_BOOTSTRAPS = 1000
DEFAULT_CONFIDENCE = 0.95
STATISTICS = ("cosine", "relative_spread", "spread_ratio")

# The tidy similarity table (one subject per call of similarity_table; concatenate subjects):
#   subject         the subject's name
#   statistic       "cosine" (mean cosine between different instances: the paper's view), "relative_spread"
#                   (RS, see the module docstring) or "spread_ratio" (RS of a latent step / RS of `reference`)
#   representation  "latent" or a baseline name ("image_mean", "prompt_last")
#   reference       for spread_ratio rows, the baseline in the denominator; "" otherwise
#   centring        "raw" or "centred" for cosine rows; "" for the spread rows (they centre per step)
#   step            latent step (0 = first); -1 for baseline rows
#   estimate, ci_low, ci_high   the statistic and its bootstrap interval over instances
#   n               instances behind the estimate; confidence, n_boot, seed: how the interval was made
#   mean_similarity alias of `estimate` on cosine rows (NaN elsewhere), for readers of the earlier schema
SIMILARITY_COLUMNS = [
    "subject", "statistic", "representation", "reference", "centring", "step", "estimate", "ci_low", "ci_high",
    "n", "confidence", "n_boot", "seed", "mean_similarity", "yardstick", "whitened", "dimensions",
    "yardstick_relative_spread",
]


# ---------------------------------------------------------------------------------------------- helpers


def _as_float_array(values, ndim: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise LatentProbeError(
            f"{name} has shape {array.shape}, expected {ndim} dimensions",
            "pass (N, D) for states or (N, S, D) for latents",
        )
    if np.isinf(array).any():
        raise LatentProbeError(f"{name} contains infinite values", "check the recorded states for overflow")
    return array


def _missing_rows(array: np.ndarray, name: str) -> np.ndarray:
    """Boolean mask over the leading axes: True where a whole vector is NaN (a step the instance lacks)."""
    nan = np.isnan(array)
    missing = nan.all(axis=-1)
    partial = nan.any(axis=-1) & ~missing
    if partial.any():
        where = tuple(int(i) for i in np.argwhere(partial)[0])
        raise LatentProbeError(
            f"{name} has a vector that is only partly NaN at index {where}",
            "mark a missing step by making its whole vector NaN; a partly NaN vector is a recording bug",
        )
    return missing


def _check_mean(mean, dim: int) -> np.ndarray:
    mean = np.asarray(mean, dtype=np.float64)
    if mean.shape != (dim,):
        raise LatentProbeError(f"mean has shape {mean.shape}, expected ({dim},)", "pass one vector of the hidden size")
    if not np.isfinite(mean).all():
        raise LatentProbeError("mean contains NaN or infinite values", "compute it with np.nanmean over present vectors")
    return mean


def _unit_vectors(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero or NaN rows become NaN (their cosine is undefined)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = x / norms
    unit[np.broadcast_to(~(norms > 0), unit.shape)] = np.nan
    return unit


def common_latent_mean(latents) -> np.ndarray:
    """The mean of every present latent vector (all instances, all steps): the default centring origin.

    >>> import numpy as np
    >>> common_latent_mean(np.array([[[1.0, 0.0], [np.nan, np.nan]], [[3.0, 2.0], [2.0, 1.0]]]))
    array([2., 1.])
    """
    latents = _as_float_array(latents, 3, "latents")
    present = ~_missing_rows(latents, "latents")
    if not present.any():
        raise LatentProbeError("latents has no present vector (all NaN)", "check that latent steps were recorded")
    return latents[present].mean(axis=0)


# ---------------------------------------------------------------------------------------- similarities


def cosine_matrix(x, centre: bool = False, mean=None) -> np.ndarray:
    """Pairwise cosine similarity of the rows of ``x`` (N, D) -> (N, N).

    With ``centre=True`` the ``mean`` vector (default: the mean of the rows of ``x``) is subtracted first.
    Rows that are NaN or zero (after centring) give NaN rows and columns.

    >>> import numpy as np
    >>> cosine_matrix(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])).round(3).tolist()
    [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    """
    x = _as_float_array(x, 2, "x")
    if centre:
        present = ~_missing_rows(x, "x")
        if mean is None:
            if not present.any():
                raise LatentProbeError("x has no present row to take a mean of", "pass at least one non-NaN vector")
            mean = x[present].mean(axis=0)
        x = x - _check_mean(mean, x.shape[1])
    unit = _unit_vectors(x)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def inter_instance_similarity(latents, centre: bool = False, mean=None) -> np.ndarray:
    """Cosine similarity between instances at each latent step: (N, S, D) -> (S, N, N).

    Centring uses ``mean`` if given, else the common mean of all latent vectors (see the module docstring).
    Entries involving an instance that lacks a step are NaN.

    >>> import numpy as np
    >>> latents = np.array([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]]])
    >>> inter_instance_similarity(latents)[:, 0, 1].round(3).tolist()   # step 0 orthogonal, step 1 identical
    [0.0, 1.0]
    """
    latents = _as_float_array(latents, 3, "latents")
    _missing_rows(latents, "latents")
    if centre:
        origin = common_latent_mean(latents) if mean is None else _check_mean(mean, latents.shape[2])
        latents = latents - origin
    unit = _unit_vectors(latents)  # (N, S, D)
    return np.clip(np.einsum("isd,jsd->sij", unit, unit), -1.0, 1.0)


def intra_instance_similarity(latents, centre: bool = False, mean=None) -> np.ndarray:
    """Step-by-step cosine similarity within each instance, averaged over instances: (N, S, D) -> (S, S).

    Entry (s, t) is the mean over the instances that have both steps; NaN where none has both.
    Centring uses the same common mean as :func:`inter_instance_similarity`.

    >>> import numpy as np
    >>> latents = np.array([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]])
    >>> intra_instance_similarity(latents).round(3).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    latents = _as_float_array(latents, 3, "latents")
    _missing_rows(latents, "latents")
    if centre:
        origin = common_latent_mean(latents) if mean is None else _check_mean(mean, latents.shape[2])
        latents = latents - origin
    unit = _unit_vectors(latents)
    per_instance = np.clip(np.einsum("nsd,ntd->nst", unit, unit), -1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" for steps nobody reached
        return np.nanmean(per_instance, axis=0)


# ------------------------------------------------------------------------------ off-diagonal statistics


def _offdiagonal_mean_with_ci(
    similarity: np.ndarray, n_boot: int, confidence: float, rng: np.random.Generator
) -> tuple[float, float, float, int]:
    """Mean of the off-diagonal entries of one (N, N) matrix, with a bootstrap over instances.

    Instances with an undefined similarity (NaN row) are left out. A bootstrap draw resamples instances
    with replacement; pairs of two copies of the same instance are excluded, since their similarity of 1
    says nothing about different instances. Draw weights make this one matrix product per draw.
    """
    valid = ~np.isnan(similarity).all(axis=1)
    similarity = similarity[np.ix_(valid, valid)]
    n = similarity.shape[0]
    if n < 2:
        return np.nan, np.nan, np.nan, n
    off_diagonal = np.nan_to_num(similarity.copy())
    np.fill_diagonal(off_diagonal, 0.0)
    estimate = off_diagonal.sum() / (n * (n - 1))
    if n_boot <= 0:
        return float(estimate), np.nan, np.nan, n
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # (B, n)
    pair_sums = np.einsum("bi,bi->b", counts @ off_diagonal, counts)
    pair_counts = n * n - (counts**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = np.where(pair_counts > 0, pair_sums / pair_counts, np.nan)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.nanpercentile(draws, [tail, 100.0 - tail])
    return float(estimate), float(low), float(high), n


def _check_bootstrap_args(n_boot: int, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise LatentProbeError(f"confidence={confidence} is not between 0 and 1", "use e.g. 0.95")
    if n_boot < 0:
        raise LatentProbeError(f"n_boot={n_boot} is negative", "use e.g. 1000, or 0 for no interval")


def offdiagonal_mean_by_step(
    latents,
    centre: bool = False,
    mean=None,
    n_boot: int = DEFAULT_BOOTSTRAPS,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean cosine similarity between different instances at each latent step, with a bootstrap interval.

    Returns one row per step: ``step, mean_similarity, ci_low, ci_high, n_instances`` (instances that
    have the step). The interval is a percentile bootstrap over instances, seeded by ``seed``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> latents = rng.normal(size=(20, 3, 16)) + np.array([0.0, 1.0, 5.0])[None, :, None]
    >>> table = offdiagonal_mean_by_step(latents, n_boot=200)
    >>> bool(table.mean_similarity.is_monotonic_increasing), table.n_instances.tolist()
    (True, [20, 20, 20])
    """
    _check_bootstrap_args(n_boot, confidence)
    matrices = inter_instance_similarity(latents, centre=centre, mean=mean)
    rng = np.random.default_rng(seed)
    rows = []
    for step, matrix in enumerate(matrices):
        estimate, low, high, n = _offdiagonal_mean_with_ci(matrix, n_boot, confidence, rng)
        rows.append({"step": step, "mean_similarity": estimate, "ci_low": low, "ci_high": high, "n_instances": n})
    return pd.DataFrame(rows, columns=["step", "mean_similarity", "ci_low", "ci_high", "n_instances"])


def baseline_similarity(
    states,
    centre: bool = False,
    mean=None,
    n_boot: int = DEFAULT_BOOTSTRAPS,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean cosine similarity between instances for a non-latent reference state (N, D).

    Returns a one-row DataFrame ``mean_similarity, ci_low, ci_high, n_instances``. When centring, pass the
    same ``mean`` as for the latents: centring a set on its own mean makes this statistic about
    ``-1/(N-1)`` by construction (see the module docstring), so ``centre=True`` without a mean is refused.

    >>> import numpy as np
    >>> states = np.tile([1.0, 2.0, 3.0], (5, 1))
    >>> baseline_similarity(states, n_boot=50).mean_similarity.round(3).tolist()
    [1.0]
    """
    _check_bootstrap_args(n_boot, confidence)
    states = _as_float_array(states, 2, "states")
    if centre and mean is None:
        raise LatentProbeError(
            "baseline_similarity(centre=True) needs the common mean",
            "pass mean=common_latent_mean(latents) (or a layer-wide mean) so all representations share one origin",
        )
    matrix = cosine_matrix(states, centre=centre, mean=mean)
    estimate, low, high, n = _offdiagonal_mean_with_ci(matrix, n_boot, confidence, np.random.default_rng(seed))
    return pd.DataFrame([{"mean_similarity": estimate, "ci_low": low, "ci_high": high, "n_instances": n}])


# -------------------------------------------------------------------------- the collapse statistic


def _present_states(states, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of an (N, D) array that are present (not NaN), and the mask of them."""
    states = _as_float_array(states, 2, name)
    present = ~_missing_rows(states, name)
    return states[present], present


def relative_spread(states) -> float:
    """Relative spread of per-instance vectors (N, D): total variance across instances / mean squared norm.

    Equivalently 1 - (mean inner product between different instances) / (mean squared norm). 0 when all
    vectors are equal, about 1 for independent isotropic vectors; scale- and rotation-free. NaN rows
    (instances without this step) are left out; NaN when fewer than 2 remain or every vector is zero.
    See the module docstring for why this is the collapse statistic.

    >>> import numpy as np
    >>> float(relative_spread(np.tile([3.0, 4.0], (5, 1))))
    0.0
    >>> units = np.eye(4)   # orthogonal unit vectors: mean cosine 0, so RS = 1 - 0
    >>> round(float(relative_spread(units)), 6)
    1.0
    """
    x, _ = _present_states(states, "states")
    n = len(x)
    if n < 2:
        return np.nan
    mean_square_norm = float((x**2).sum(axis=1).mean())
    if mean_square_norm == 0:
        return np.nan
    total_variance = float(((x - x.mean(axis=0)) ** 2).sum() / (n - 1))
    return total_variance / mean_square_norm


def _relative_spread_from_counts(counts: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """RS of resampled sets given as instance counts (B, n) and the Gram matrix (n, n) of the vectors.

    RS = 1 - (mean inner product over pairs of *different* instances) / (mean squared norm). A resample that
    draws an instance twice does not pair it with its own copy: such a pair would look perfectly collapsed
    and bias the bootstrap towards collapse (the plain plug-in variance of a resample drops by about 1/n).
    With all counts 1 this is exactly ``relative_spread``. One matrix product per batch.
    """
    m = counts.sum(axis=1)
    diagonal = np.diag(gram)
    pair_sums = ((counts @ gram) * counts).sum(axis=1) - (counts**2) @ diagonal  # c' G c per row, through BLAS
    pair_counts = m**2 - (counts**2).sum(axis=1)
    square_norms = counts @ diagonal / m
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = 1.0 - (pair_sums / pair_counts) / square_norms
        return np.where((pair_counts > 0) & (square_norms > 0), spread, np.nan)


def spread_rows(
    latents,
    baselines: Mapping[str, np.ndarray] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAPS,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """The collapse statistic: relative spread per latent step and per baseline, and their ratios.

    Returns rows ``statistic, representation, reference, step, estimate, ci_low, ci_high, n`` with
    statistic "relative_spread" (one row per latent step, one per baseline) and "spread_ratio" (one row per
    latent step and baseline: RS of the step's latents / RS of the baseline, over the instances that have
    both). Intervals: BCa bootstrap over instances, paired for ratios; each row's resampling is seeded from
    ``seed`` and the row's position, so rows are reproducible on their own.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> point = rng.normal(size=8)
    >>> latents = point + 1e-3 * rng.normal(size=(20, 2, 8))        # every instance at one point
    >>> rows = spread_rows(latents, {"image_mean": rng.normal(size=(20, 8))}, n_boot=200)
    >>> ratio = rows[rows.statistic == "spread_ratio"]
    >>> bool((ratio.ci_high < 0.01).all()), ratio.step.tolist()
    (True, [0, 1])
    """
    _check_bootstrap_args(n_boot, confidence)
    latents = _as_float_array(latents, 3, "latents")
    missing = _missing_rows(latents, "latents")  # (N, S)
    baselines = _checked_baselines(baselines, latents)
    rows = []

    def add(statistic, representation, reference, step, vectors_by_side, present):
        index = np.flatnonzero(present)
        grams = [v[index] @ v[index].T for v in vectors_by_side]
        n = len(index)
        if len(grams) == 1:
            of_counts = lambda c: _relative_spread_from_counts(c, grams[0])  # noqa: E731
        else:
            of_counts = lambda c: (_relative_spread_from_counts(c, grams[0])  # noqa: E731
                                   / _relative_spread_from_counts(c, grams[1]))
        with np.errstate(invalid="ignore", divide="ignore"):
            estimate = float(of_counts(np.ones((1, n)))[0]) if n >= 2 else np.nan
        low, high = (np.nan, np.nan) if not np.isfinite(estimate) else bootstrap_interval_from_counts(
            of_counts, n, n_boot, confidence, seed + len(rows))
        rows.append({"statistic": statistic, "representation": representation, "reference": reference,
                     "step": step, "estimate": estimate, "ci_low": low, "ci_high": high, "n": n})

    for step in range(latents.shape[1]):
        add("relative_spread", "latent", "", step, [latents[:, step]], ~missing[:, step])
    for name, states in baselines.items():
        add("relative_spread", name, "", BASELINE_STEP, [states], ~_missing_rows(states, name))
    for name, states in baselines.items():
        for step in range(latents.shape[1]):
            both = ~missing[:, step] & ~_missing_rows(states, name)
            add("spread_ratio", "latent", name, step, [latents[:, step], states], both)
    return pd.DataFrame(rows, columns=["statistic", "representation", "reference", "step", "estimate", "ci_low",
                                       "ci_high", "n"])


def _checked_baselines(baselines, latents: np.ndarray) -> dict[str, np.ndarray]:
    checked = {}
    for name, states in dict(baselines or {}).items():
        states = _as_float_array(states, 2, f"baseline {name!r}")
        if states.shape[1] != latents.shape[2]:
            raise LatentProbeError(
                f"baseline {name!r} has hidden size {states.shape[1]}, latents have {latents.shape[2]}",
                "record the baseline states at the same layer as the latents",
            )
        if states.shape[0] != latents.shape[0]:
            raise LatentProbeError(
                f"baseline {name!r} has {states.shape[0]} instances, latents have {latents.shape[0]}",
                "pass one baseline state per instance, in the same order as the latents",
            )
        checked[name] = states
    return checked


def similarity_table(
    latents,
    baselines: Mapping[str, np.ndarray] | None,
    subject: str,
    seed: int = 0,
    mean=None,
    n_boot: int = DEFAULT_BOOTSTRAPS,
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    single_tokens: Mapping[str, np.ndarray] | None = None,
    token_pool=None,
    floor=None,
) -> pd.DataFrame:
    """The tidy similarity table of one subject: the collapse statistic and the cosine views.

    Issue 18: ``single_tokens`` maps a name ("image_token") to (N, D) single image-token states of the same
    instances and layer (the fair yardstick), ``token_pool`` (M, D) the layer's token states for whitening, and
    ``floor`` (N, S) or (N,) the placebo's squared distances; they give the ``collapse_ratio``,
    ``participation_ratio``, ``noise_excess`` and ``spread_trend`` rows the verdict reads
    (:func:`latentprobe.stats.collapse_spread.collapse_rows`). A given ``image_mean`` baseline is also used as a
    (pooled, conservative) yardstick.

    Columns: :data:`SIMILARITY_COLUMNS` (see the comment above it). Rows: ``relative_spread`` per latent step
    and per baseline, ``spread_ratio`` per latent step and baseline (what the collapse verdict reads), and the
    ``cosine`` view: mean cosine between instances per latent step and per baseline, raw and centred. The
    centred cosine rows subtract ONE common mean from every representation: ``mean`` if given, else the mean of
    ALL this subject's latent vectors (kept for comparison with earlier runs; see the module docstring).
    ``baselines`` maps a name ("image_mean", "prompt_last") to (N, D) states of the same instances and layer.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> latents = rng.normal(size=(8, 2, 4))
    >>> table = similarity_table(latents, {"prompt_last": rng.normal(size=(8, 4))}, "tiny", n_boot=50)
    >>> table.groupby("statistic").size().to_dict()
    {'cosine': 6, 'relative_spread': 3, 'spread_ratio': 2}
    """
    latents = _as_float_array(latents, 3, "latents")
    origin = common_latent_mean(latents) if mean is None else _check_mean(mean, latents.shape[2])
    baselines = _checked_baselines(baselines, latents)

    frames = [spread_rows(latents, baselines, n_boot, confidence, seed).assign(centring="")]
    yardsticks = {name: _as_float_array(states, 2, f"single token {name!r}")
                  for name, states in dict(single_tokens or {}).items()}
    pooled = [name for name in baselines if name == "image_mean"]
    yardsticks.update({name: baselines[name] for name in pooled})
    if yardsticks or floor is not None:
        frames.append(pd.DataFrame(collapse_rows(latents, yardsticks, pooled=pooled, pool=token_pool, floor=floor,
                                                 n_boot=n_boot, confidence=confidence, seed=seed)).assign(centring=""))
    for offset, centring in enumerate(CENTRINGS):
        centre = centring == "centred"
        # A distinct seed per block keeps each block's bootstrap reproducible on its own.
        per_step = offdiagonal_mean_by_step(latents, centre, origin, n_boot, confidence, seed + offset)
        frames.append(per_step.assign(representation="latent", centring=centring))
        for index, (name, states) in enumerate(baselines.items(), start=1):
            row = baseline_similarity(states, centre, origin, n_boot, confidence, seed + offset + 10 * index)
            frames.append(row.assign(representation=name, centring=centring, step=BASELINE_STEP))
    collapse = frames[1] if len(frames) > 1 and "yardstick" in frames[1].columns else None
    views = frames[2:] if collapse is not None else frames[1:]
    cosine = pd.concat(views, ignore_index=True).rename(columns={"n_instances": "n", "mean_similarity": "estimate"})
    cosine = cosine.assign(statistic="cosine", reference="")
    table = pd.concat([frames[0]] + ([collapse] if collapse is not None else []) + [cosine], ignore_index=True)
    for column in ("yardstick", "whitened", "dimensions", "yardstick_relative_spread"):
        if column not in table.columns:
            table[column] = np.nan
    table["subject"] = subject
    table["step"] = table["step"].astype(int)
    table["n"] = table["n"].astype(int)
    table["confidence"] = confidence
    table["n_boot"] = n_boot
    table["seed"] = seed
    table["mean_similarity"] = table.estimate.where(table.statistic == "cosine")
    return table[SIMILARITY_COLUMNS]
