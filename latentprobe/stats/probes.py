"""Linear probes for what latent tokens encode, done by the book (Hewitt & Liang 2019), with p-values.

Pure functions on numpy arrays: nothing here loads a model or reads the trace store.

**The probe.** Standardise (statistics of the training part only), then ridge regression: one-vs-rest on
+-1 targets with the arg-max taken for classification (scikit-learn's ``RidgeClassifier``), plain ``Ridge`` for
regression. The strength ``alpha`` is chosen by an inner cross-validation inside each outer training part. A
ridge probe has a closed form (one SVD of the training part serves every strength and every label vector),
which is what makes the permutation test of the *whole* procedure below affordable.

**Folds.** Outer and inner folds keep instances apart (``groups``: no instance on both sides) and are
stratified on the pair (real label, control label), so both tasks see balanced folds
(``StratifiedGroupKFold``; plain ``GroupKFold`` for regression or when the classes are too small).

**Control task.** Hewitt & Liang's control gives each *type* a label; a type is a property of the input a probe
could memorise (the image, the question template). The labels are a *permutation of the real labels over the
types* (each type's own label, shuffled among the types), so the control task has the real task's class counts and
the same chance level: labels drawn independently per type gave the control a random class balance, and a probe on
uninformative states then scored the control's majority share (selectivity -0.11 to -0.15 on pure noise with 16
recurring images, a whole margin in the direction of "limited"; issue 18).
Types recur across instances, so types do cross folds: a probe that memorises types scores high on the control
and its selectivity = score - control_score drops. With ``types`` = the instances themselves (the default here;
:func:`latentprobe.report.build.probe_study` passes image identity or the question) the control cannot be learned
across folds and sits near chance.

**Choosing the best cell honestly.** Besides one row per (layer, step) cell, each call returns a ``nested`` row:
in every outer fold the cell with the best inner-CV selectivity is chosen *on the training part* and scored on
the test part. Its score estimates what "take the best layer x step" achieves, without the optimism of picking
the maximum of many test scores, so representations with different numbers of cells (latents: layers x steps;
image tokens: layers) are compared like with like.

**Permutation p-values.** The real labels are permuted across instances within each outer test fold (so each
fold keeps its class counts, as the real labels' balanced folds do; ``n_permutations`` times, seeded) and the
whole procedure, inner strength choice and cell choice included, is rerun; the p-value of a row is
``(1 + #{permuted score >= score}) / (1 + n_permutations)`` (as ``sklearn.model_selection.permutation_test_score``).

**Intervals.** ``selectivity_ci_low/high``: BCa bootstrap over instances of the out-of-fold selectivity (real
and control predictions of the same instances resampled together); conditional on the fitted probes, and a
diagnostic only. The verdict reads ``score_excess`` (score - chance: accuracy over the training folds' majority
share, or R^2 over 0) with an **unconditional** interval ``score_excess_ci_low/high``: the whole nested procedure
is repeated over ``repeats`` seeded re-splits of the instances (repeated grouped CV; the probes are refitted every
time), and the fold scores are combined with the corrected resampled t interval of Nadeau & Bengio (2003), whose
variance term (1/J + n_test/n_train) accounts for the overlap of training sets, which a plain t over folds ignores.
``capacity`` states the probe ("ridge probe, n instances, d features, best of c cells").

Result columns (one row per cell, plus one ``nested`` row per call):

``layer, step`` -- the cell (for the nested row: the cell chosen most often); ``selection`` -- "cell" or
"nested"; ``selected_cells`` -- for the nested row, "layer/step x folds" of the chosen cells; ``task, metric``
-- "accuracy" or "r2"; ``score, score_std`` -- out-of-fold score and its std over outer folds; ``control_score,
control_std``; ``selectivity`` = score - control_score with ``selectivity_ci_low, selectivity_ci_high``;
``p_value, n_permutations`` -- permutation test of the score against chance; ``chance`` -- accuracy of the
training folds' majority class (0 for R^2); ``n, n_groups, n_classes, n_splits, inner_splits``;
``regularisation`` -- the alpha chosen most often; ``control_type, n_types`` -- what the control memorises and
how many distinct values it has; ``confidence, seed``; ``skipped_reason`` -- empty when the probe ran;
``score_excess, score_excess_ci_low, score_excess_ci_high, repeats, capacity`` -- on the nested row (see
Intervals).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Mapping

import numpy as np
import pandas as pd
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from ..errors import LatentProbeError
from .instance_bootstrap import bootstrap_interval_from_counts
from .parallel import map_in_threads, one_blas_thread

TASKS = ("classification", "regression")
REPRESENTATIONS = ("latent", "image_tokens", "image_mean", "prompt_last", "random_init")
# the ``step`` key of representations without a latent step (image_tokens, image_mean, prompt_last)
NO_STEP = -1
DEFAULT_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
DEFAULT_INNER_SPLITS = 3
DEFAULT_PERMUTATIONS = 199
DEFAULT_BOOTSTRAPS = 1000
DEFAULT_CONFIDENCE = 0.95
SELECTIONS = ("cell", "nested")

PROBE_COLUMNS = [
    "layer", "step", "selection", "selected_cells", "task", "metric", "score", "score_std", "control_score",
    "control_std", "selectivity", "selectivity_ci_low", "selectivity_ci_high", "p_value", "n_permutations",
    "chance", "n", "n_groups", "n_classes", "n_splits", "inner_splits", "regularisation", "control_type",
    "n_types", "confidence", "seed", "skipped_reason", "score_excess", "score_excess_ci_low",
    "score_excess_ci_high", "repeats", "capacity",
]
DEFAULT_REPEATS = 3
TAG_COLUMNS = ["subject", "representation", "attribute"]

# Target columns of one cross-validation pass: the real labels, the control labels, then the permutations.
REAL, CONTROL, FIRST_PERMUTATION = 0, 1, 2


# ------------------------------------------------------------------------------------- input checking


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise LatentProbeError(f"unknown probe task {task!r}", f"use one of {', '.join(TASKS)}")


def _check_labels_and_groups(labels, groups, task: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.ndim != 1 or groups.ndim != 1:
        raise LatentProbeError(
            f"labels and groups must be 1-D, got shapes {labels.shape} and {groups.shape}",
            "pass one label and one instance id per row",
        )
    if len(labels) != len(groups):
        raise LatentProbeError(
            f"labels has {len(labels)} rows but groups has {len(groups)}",
            "pass one instance id (group) for every labelled row",
        )
    if pd.isna(labels).any():
        raise LatentProbeError(
            f"labels has {int(pd.isna(labels).sum())} missing values",
            "drop the rows whose attribute is unknown before probing",
        )
    if pd.isna(groups).any():
        raise LatentProbeError("groups has missing instance ids", "give every row the id of its instance")
    if task == "regression":
        try:
            labels = labels.astype(np.float64)
        except (TypeError, ValueError):
            raise LatentProbeError(
                "regression labels are not numeric", "use task='classification' for categorical attributes"
            ) from None
        if not np.isfinite(labels).all():
            raise LatentProbeError("regression labels contain infinite values", "drop or clip those rows")
    return labels, groups


def _check_types(types, groups: np.ndarray) -> np.ndarray:
    if types is None:
        return groups
    types = np.asarray(types)
    if types.shape != groups.shape:
        raise LatentProbeError(f"types has shape {types.shape}, groups {groups.shape}",
                               "pass one type (e.g. image id or question template) per row")
    if pd.isna(types).any():
        raise LatentProbeError("types has missing values", "give every row a type (its image id, its question...)")
    per_group = pd.Series(types).groupby(pd.Series(groups)).nunique()
    if (per_group > 1).any():
        raise LatentProbeError(f"instance {per_group.idxmax()!r} has several types",
                               "a type is a property of the input, one per instance")
    return types


def _check_features(features: Mapping, n_rows: int) -> dict[tuple[int, int], np.ndarray]:
    if not features:
        raise LatentProbeError("no features to probe", "pass a dict {(layer, step): array of shape (N, D)}")
    checked = {}
    for key, values in features.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise LatentProbeError(
                f"feature key {key!r} is not a (layer, step) pair",
                f"key features by (layer, step); use step={NO_STEP} for states without a latent step",
            )
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 2:
            raise LatentProbeError(f"features{key} has shape {array.shape}, expected (N, D)", "stack one vector per row")
        if array.shape[0] != n_rows:
            raise LatentProbeError(
                f"features{key} has {array.shape[0]} rows but there are {n_rows} labels",
                "give the features and labels the same rows in the same order",
            )
        checked[(int(key[0]), int(key[1]))] = array
    return checked


def _check_numbers(n_splits, inner_splits, alphas, n_permutations, n_boot, confidence) -> tuple[float, ...]:
    if n_splits < 2:
        raise LatentProbeError(f"n_splits={n_splits} is below 2", "use at least 2 outer folds (5 is the default)")
    if inner_splits < 2:
        raise LatentProbeError(f"inner_splits={inner_splits} is below 2", "use at least 2 inner folds (3 is the default)")
    alphas = tuple(float(a) for a in alphas)
    if not alphas or not all(np.isfinite(a) and a > 0 for a in alphas):
        raise LatentProbeError(f"ridge strengths {alphas} must be positive finite numbers", "use e.g. (1, 10, 100)")
    if n_permutations < 0:
        raise LatentProbeError(f"n_permutations={n_permutations} is negative", "use e.g. 199, or 0 for no p-value")
    if n_boot < 0:
        raise LatentProbeError(f"n_boot={n_boot} is negative", "use e.g. 1000, or 0 for no interval")
    if not 0 < confidence < 1:
        raise LatentProbeError(f"confidence={confidence} is not between 0 and 1", "use e.g. 0.95")
    return alphas


# ----------------------------------------------------------------------------------- folds and control


def _strata(labels, control) -> np.ndarray:
    if control is None:
        return np.asarray(labels).astype(str)
    return np.char.add(np.char.add(np.asarray(labels).astype(str), "|"), np.asarray(control).astype(str))


def _grouped_splits(labels, groups, n_splits: int, task: str, seed: int, control=None) -> list:
    """Grouped splits, stratified on (label, control) where possible, else on the label, else unstratified.
    Every representation of an attribute asks for the same folds: they are made once (scikit-learn's
    StratifiedGroupKFold is slow enough to dominate a probe study otherwise) and copied out."""
    key = (tuple(np.asarray(labels).astype(str)), tuple(np.asarray(groups).astype(str)), int(n_splits), task,
           int(seed), None if control is None else tuple(np.asarray(control).astype(str)))
    return [(train.copy(), test.copy()) for train, test in _cached_splits(key, labels, groups, control)]


_SPLIT_CACHE: dict = {}


def _cached_splits(key, labels, groups, control) -> list:
    if key not in _SPLIT_CACHE:
        if len(_SPLIT_CACHE) > 256:
            _SPLIT_CACHE.clear()
        _SPLIT_CACHE[key] = _make_grouped_splits(labels, groups, key[2], key[3], key[4], control)
    return _SPLIT_CACHE[key]


def _make_grouped_splits(labels, groups, n_splits: int, task: str, seed: int, control=None) -> list:
    index = np.zeros(len(labels))
    if task == "classification":
        for strata in ([_strata(labels, control)] if control is not None else []) + [_strata(labels, None)]:
            if np.unique(strata, return_counts=True)[1].max() < n_splits:
                continue  # scikit-learn refuses when every stratum is smaller than the number of folds
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members"
                splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                return list(splitter.split(index, strata, groups))
    return list(GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(index, labels, groups))


def instance_folds(labels, groups, n_splits: int = 5, task: str = "classification", seed: int = 0, control=None):
    """Outer (train, test) index splits by instance: no group is on both sides of any split.

    Classification stratifies on the pair (label, control label) when ``control`` is given, so both tasks are
    balanced across folds (``StratifiedGroupKFold``); with strata too small for that, on the label alone, then
    plain ``GroupKFold``. Regression uses ``GroupKFold``. All shuffled with ``seed``.

    >>> import numpy as np
    >>> folds = instance_folds([0, 1] * 6, np.repeat(np.arange(6), 2), n_splits=3)
    >>> len(folds), sorted(int(i) for _, test in folds for i in test) == list(range(12))
    (3, True)
    """
    _check_task(task)
    labels, groups = _check_labels_and_groups(labels, groups, task)
    n_groups = len(np.unique(groups))
    if not 2 <= n_splits <= n_groups:
        raise LatentProbeError(
            f"cannot make {n_splits} folds from {n_groups} distinct instances",
            "use 2 <= n_splits <= the number of instances",
        )
    return _grouped_splits(labels, groups, n_splits, task, seed, control)


def control_labels(labels, types, task: str = "classification", seed: int = 0) -> np.ndarray:
    """Hewitt & Liang control labels as a permutation of the real labels over the types.

    Each type's own label (that of its first row) is shuffled among the types, and every row of a type gets its
    type's shuffled label: a probe that can tell types apart can learn the control wherever a type appears on both
    sides of a split, and the control's class counts over types equal the real ones, so both tasks have the same
    chance level. Seeded by ``seed``.

    >>> import numpy as np
    >>> control = control_labels(["a", "b", "c", "a", "b", "c"], types=[0, 1, 2, 0, 1, 2], seed=1)
    >>> bool(control[0] == control[3] and control[1] == control[4]), sorted(control[:3].tolist())
    (True, ['a', 'b', 'c'])
    """
    _check_task(task)
    labels = np.asarray(labels)
    types = np.asarray(types)
    if types.shape != labels.shape:
        raise LatentProbeError(f"types has shape {types.shape}, labels {labels.shape}", "pass one type per row")
    type_ids, row_type = np.unique(types.astype(str), return_inverse=True)
    first_row = np.zeros(len(type_ids), dtype=int)
    first_row[row_type[::-1]] = np.arange(len(labels))[::-1]
    rng = np.random.default_rng([seed, 1])
    shuffled = labels[first_row][rng.permutation(len(type_ids))]
    return shuffled[row_type]


def corrected_repeated_cv_interval(fold_scores, n_train: float, n_test: float,
                                   confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of J fold scores from repeated K-fold CV and its corrected resampled t interval (Nadeau & Bengio
    2003): variance (1/J + n_test/n_train) x the fold scores' variance, t with J - 1 degrees of freedom.

    >>> mean, low, high = corrected_repeated_cv_interval([0.1, 0.2, 0.3, 0.2], 30, 10)
    >>> round(mean, 3), round(high - mean, 3) == round(mean - low, 3)
    (0.2, True)
    """
    from scipy.stats import t as student

    scores = np.asarray(fold_scores, dtype=float)
    scores = scores[np.isfinite(scores)]
    if len(scores) < 2:
        return (float(scores.mean()) if len(scores) else np.nan), np.nan, np.nan
    mean = float(scores.mean())
    variance = (1 / len(scores) + n_test / n_train) * float(scores.var(ddof=1))
    half = float(student.ppf(1 - (1 - confidence) / 2, len(scores) - 1) * np.sqrt(variance))
    return mean, mean - half, mean + half


def _permuted_labels(labels, groups, n_permutations: int, seed: int, folds=None) -> np.ndarray:
    """(P, n) permutations of the labels across instances (whole instances when labels are constant in each).

    With ``folds``, instances are permuted only among the instances of the same outer test fold, so every
    permuted labelling has the same class counts per fold as the real one. The folds were balanced on the real
    labels; a free permutation would give the null runs unbalanced folds (which score below chance) and make
    the p-values too small.
    """
    rng = np.random.default_rng([seed, 2])
    group_ids, row_group = np.unique(groups, return_inverse=True)
    first_row = np.zeros(len(group_ids), dtype=int)
    first_row[row_group[::-1]] = np.arange(len(groups))[::-1]
    group_label = labels[first_row]
    by_group = np.array_equal(group_label[row_group], labels)
    units = len(group_ids) if by_group else len(labels)
    blocks = [np.arange(units)]
    if folds is not None:
        fold_of = np.zeros(len(labels), dtype=int)
        for f, (_, test) in enumerate(folds):
            fold_of[test] = f
        unit_fold = fold_of[first_row] if by_group else fold_of
        blocks = [np.flatnonzero(unit_fold == f) for f in range(len(folds))]
    out = np.empty((n_permutations, len(labels)), dtype=labels.dtype)
    for p in range(n_permutations):
        order = np.arange(units)
        for block in blocks:
            order[block] = block[rng.permutation(len(block))]
        out[p] = group_label[order][row_group] if by_group else labels[order]
    return out


# ---------------------------------------------------------------------------------------- the probe


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As scikit-learn's StandardScaler fitted on ``train``: zero-variance features are only centred."""
    mean = train.mean(axis=0)
    scale = train.std(axis=0)
    scale[scale == 0] = 1.0
    return (train - mean) / scale, (test - mean) / scale


def _thin_svd_projection(train: np.ndarray, test: np.ndarray):
    """``u, s`` of the thin SVD of ``train`` and ``test @ v`` (the test rows in the right singular basis). With
    more features than rows (pooled image tokens, 7B states) from the n x n Gram matrix's eigendecomposition:
    the same quantities for the nonzero singular values at a fraction of the cost of an SVD of the wide matrix."""
    if train.shape[1] <= train.shape[0]:
        u, s, vt = np.linalg.svd(train, full_matrices=False)
        return u, s, test @ vt.T
    energy, u = np.linalg.eigh(train @ train.T)
    keep = energy > max(float(energy.max(initial=0.0)), 0.0) * 1e-12
    u, s = u[:, keep][:, ::-1], np.sqrt(energy[keep])[::-1]
    return u, s, (test @ train.T) @ (u / s)


def ridge_predictions(x_train, x_test, targets, alphas, task: str) -> np.ndarray:
    """Test predictions of standardised ridge probes for many target vectors and strengths at once.

    ``targets``: (n_train, K) class indices (classification: one-vs-rest on +-1 targets, arg-max over classes,
    as ``RidgeClassifier``) or values (regression, as ``Ridge``), one column per label vector. One SVD of the
    standardised training part serves every column and strength. Returns (len(alphas), n_test, K): predicted
    class indices, or predicted values.
    """
    train, test = _standardise(np.asarray(x_train, dtype=np.float64), np.asarray(x_test, dtype=np.float64))
    u, s, projected = _thin_svd_projection(train, test)
    targets = np.asarray(targets)
    n_train, n_columns = targets.shape
    if task == "classification":
        n_classes = int(targets.max()) + 1
        y = np.where(targets[:, :, None] == np.arange(n_classes), 1.0, -1.0).reshape(n_train, -1)
    else:
        y = targets.astype(np.float64)
    offset = y.mean(axis=0)
    rotated = u.T @ (y - offset)  # (r, K * classes)
    out = []
    for alpha in alphas:
        predicted = offset + projected @ (rotated * (s / (s**2 + alpha))[:, None])
        if task == "classification":
            predicted = predicted.reshape(len(test), n_columns, -1).argmax(axis=2)
        out.append(predicted)
    return np.stack(out)


def _scores(task: str, truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per-column validation score: accuracy, or negative mean squared error (R^2 is undefined on one row)."""
    if task == "classification":
        return (truth == predicted).mean(axis=-2)
    return -((truth - predicted) ** 2).mean(axis=-2)


# ----------------------------------------------------------------------------------- cross-validation


def _cross_validate(features, cells, targets, groups, folds, inner_folds, alphas, task):
    """One pass of nested CV for every cell and every target column.

    Returns ``predictions`` (cells, n, K): each row's out-of-fold prediction with the strength chosen by inner
    CV (per fold, cell and column); ``inner_best`` (folds, cells, K): the best inner validation score;
    ``chosen_alpha`` (folds, cells, K).
    """
    n, n_columns = targets.shape
    dtype = np.int64 if task == "classification" else np.float64

    def one_cell(cell):
        """Every outer fold of one cell: its out-of-fold predictions, best inner scores and strengths."""
        x = features[cell]
        predicted = np.zeros((n, n_columns), dtype=dtype)
        best_scores = np.zeros((len(folds), n_columns))
        alphas_chosen = np.zeros((len(folds), n_columns))
        for f, ((train, test), inner) in enumerate(zip(folds, inner_folds)):
            if inner:
                validation = np.mean([
                    _scores(task, targets[train[v]][None], ridge_predictions(
                        x[train[t]], x[train[v]], targets[train[t]], alphas, task))
                    for t, v in inner
                ], axis=0)  # (alphas, K)
            else:  # too few instances to validate: the middle strength
                validation = np.zeros((len(alphas), n_columns))
                validation[len(alphas) // 2] = 1.0
            best = validation.argmax(axis=0)  # first best strength, as GridSearchCV
            best_scores[f] = validation[best, np.arange(n_columns)]
            alphas_chosen[f] = np.asarray(alphas)[best]
            outer = ridge_predictions(x[train], x[test], targets[train], alphas, task)  # (alphas, n_test, K)
            predicted[np.ix_(test, np.arange(n_columns))] = outer[best, :, np.arange(n_columns)].T
        return predicted, best_scores, alphas_chosen

    # cells are independent (their SVDs and products release the GIL): side by side, same result in any order
    parts = map_in_threads(one_cell, list(cells))
    predictions = np.stack([p[0] for p in parts]) if parts else np.zeros((0, n, n_columns), dtype=dtype)
    inner_best = np.stack([p[1] for p in parts], axis=1) if parts else np.zeros((len(folds), 0, n_columns))
    chosen_alpha = np.stack([p[2] for p in parts], axis=1) if parts else np.zeros((len(folds), 0, n_columns))
    return predictions, inner_best, chosen_alpha


def _pooled_score(task: str, truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Out-of-fold score of each column: accuracy, or R^2 of the pooled predictions."""
    if task == "classification":
        return (truth == predicted).mean(axis=0)
    return np.array([r2_score(truth[:, k], predicted[:, k]) for k in range(truth.shape[1])])


def _fold_std(task: str, truth, predicted, folds) -> float:
    scores = []
    for _, test in folds:
        if task == "classification":
            scores.append(float(np.mean(truth[test] == predicted[test])))
        elif len(test) >= 2:
            scores.append(float(r2_score(truth[test], predicted[test])))
    return float(np.std(scores)) if scores else np.nan


def _selectivity_interval(task, truth_real, pred_real, truth_control, pred_control, groups, n_boot, confidence,
                          seed) -> tuple[float, float]:
    """BCa interval of score - control score over instances (real and control of an instance resampled together)."""
    group_ids, row_group = np.unique(groups, return_inverse=True)
    size = np.bincount(row_group).astype(float)

    def per_group(values):
        return np.bincount(row_group, weights=np.asarray(values, dtype=np.float64), minlength=len(group_ids))

    if task == "classification":
        difference = per_group((truth_real == pred_real).astype(float) - (truth_control == pred_control))
        statistic = lambda counts: (counts @ difference) / (counts @ size)  # noqa: E731
    else:
        parts = [(per_group((t - p) ** 2), per_group(t), per_group(t**2))
                 for t, p in ((truth_real, pred_real), (truth_control, pred_control))]

        def r2(counts, sse, total, squares):
            m = counts @ size
            with np.errstate(invalid="ignore", divide="ignore"):
                return 1.0 - (counts @ sse) / (counts @ squares - (counts @ total) ** 2 / m)

        statistic = lambda counts: r2(counts, *parts[0]) - r2(counts, *parts[1])  # noqa: E731
    return bootstrap_interval_from_counts(statistic, len(group_ids), n_boot, confidence, seed)


def _p_value(observed: float, null: np.ndarray) -> float:
    if len(null) == 0 or not np.isfinite(observed):
        return np.nan
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


def _majority_chance(labels, folds) -> float:
    """Test accuracy of always predicting the training fold's majority class, averaged over folds."""
    scores = []
    for train, test in folds:
        values, counts = np.unique(labels[train], return_counts=True)
        scores.append(float(np.mean(labels[test] == values[np.argmax(counts)])))
    return float(np.mean(scores))


def _skip_row(layer, step, *, selection="cell", reason, **common) -> dict:
    row = {column: np.nan for column in PROBE_COLUMNS}
    row.update(common, layer=layer, step=step, selection=selection, selected_cells="", skipped_reason=reason)
    return row


def run_probes(
    features: Mapping[tuple[int, int], np.ndarray],
    labels,
    groups,
    task: str = "classification",
    n_splits: int = 5,
    seed: int = 0,
    control: bool = True,
    *,
    types=None,
    control_type: str | None = None,
    inner_splits: int = DEFAULT_INNER_SPLITS,
    alphas=DEFAULT_ALPHAS,
    Cs=None,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    n_boot: int = DEFAULT_BOOTSTRAPS,
    confidence: float = DEFAULT_CONFIDENCE,
    repeats: int = DEFAULT_REPEATS,
    _fold_excess_out: list | None = None,
) -> pd.DataFrame:
    """Probe every (layer, step) cell for ``labels``, plus the nested best-cell row (see the module docstring).

    Parameters
    ----------
    features : mapping
        ``(layer, step) -> (N, D)`` array whose rows match ``labels`` and ``groups``.
    labels, groups : array-like
        One label and one instance id per row; folds never split an instance.
    task : {"classification", "regression"}
    n_splits, inner_splits : int
        Outer folds (fewer instances than folds reduces them, with a warning) and inner folds.
    seed : int
        Seeds the folds, the control labels and the permutations (independent streams of one seed).
    control : bool
        Run the control task (selectivity); without it the nested row picks the cell by inner score.
    types : array-like, optional
        The control task's types, one per row (constant within an instance); default: the instances.
    control_type : str, optional
        The name of what ``types`` holds, recorded in the table (default "instance" or "custom").
    alphas : sequence of float
        Ridge strengths the inner CV chooses from. ``Cs`` (inverse strengths, alpha = 1/C) is accepted for
        callers written for the former logistic probe.
    n_permutations, n_boot, confidence : int, int, float
        Permutations for the p-values (0: none), bootstrap resamples and level of the selectivity intervals.
    repeats : int
        Seeded re-splits of the whole nested procedure behind the unconditional ``score_excess`` interval
        (1: the single split only, no interval).

    Bad global input raises :class:`LatentProbeError`; a probe that cannot be run (one class, one instance, NaN
    features) gives a row with ``skipped_reason`` set.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = np.repeat([0, 1], 30)
    >>> states = rng.normal(size=(60, 8)); states[:, 0] += 3 * labels
    >>> table = run_probes({(0, 0): states}, labels, groups=np.arange(60), n_splits=3, n_permutations=19)
    >>> nested = table[table.selection == "nested"].iloc[0]
    >>> bool(nested.score > 0.9), bool(nested.selectivity_ci_low > 0.2), float(nested.p_value)
    (True, True, 0.05)
    """
    _check_task(task)
    if Cs is not None:
        alphas = tuple(1.0 / float(c) if float(c) > 0 else np.nan for c in Cs)
    alphas = _check_numbers(n_splits, inner_splits, alphas, n_permutations, n_boot, confidence)
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise LatentProbeError(f"repeats={repeats!r} is not a whole number >= 1", "use e.g. repeats=5")
    labels, groups = _check_labels_and_groups(labels, groups, task)
    features = _check_features(features, len(labels))
    control_type = control_type or ("instance" if types is None else "custom")
    types = _check_types(types, groups)
    n, n_groups = len(labels), len(np.unique(groups))
    n_types = len(np.unique(types.astype(str)))
    n_classes = len(np.unique(labels)) if task == "classification" else 0
    keys = sorted(features)
    common = dict(task=task, metric="accuracy" if task == "classification" else "r2", n=n, n_groups=n_groups,
                  n_classes=n_classes, n_splits=n_splits, inner_splits=inner_splits,
                  n_permutations=n_permutations, control_type=control_type if control else "", n_types=n_types,
                  confidence=confidence, seed=seed, repeats=repeats)

    def skip_all(reason: str) -> pd.DataFrame:
        rows = [_skip_row(layer, step, reason=reason, **common) for layer, step in keys]
        rows.append(_skip_row(keys[0][0], keys[0][1], selection="nested", reason=reason, **common))
        return pd.DataFrame(rows, columns=PROBE_COLUMNS)

    if task == "classification" and n_classes < 2:
        return skip_all(f"labels have a single class ({labels[0]!r}): nothing to predict")
    if task == "regression" and np.ptp(labels) == 0:
        return skip_all("regression target is constant: nothing to predict")
    if n_groups < 2:
        return skip_all(f"only {n_groups} distinct instance: cannot split by instance")
    if n_groups < n_splits:
        warnings.warn(f"only {n_groups} distinct instances for {n_splits} folds; using {n_groups} folds",
                      stacklevel=2)
        n_splits = common["n_splits"] = n_groups

    control_values = control_labels(labels, types, task, seed) if control else None
    folds = _grouped_splits(labels, groups, n_splits, task, seed, control_values)
    if task == "classification" and any(len(np.unique(labels[train])) < 2 for train, _ in folds):
        return skip_all("a training fold holds a single class: too few instances per class for the folds")
    inner_folds = [
        _grouped_splits(labels[train], groups[train], min(inner_splits, len(np.unique(groups[train]))), task, seed,
                        None if control_values is None else control_values[train])
        if len(np.unique(groups[train])) >= 2 else []
        for train, _ in folds
    ]
    if task == "classification":
        classes, encoded = np.unique(labels, return_inverse=True)
        encode = lambda values: np.searchsorted(classes, values)  # noqa: E731
    else:
        encoded, encode = labels, (lambda values: np.asarray(values, dtype=np.float64))
    permuted = _permuted_labels(encoded, groups, n_permutations, seed, folds)
    columns = [encoded, encode(control_values) if control else encoded] + list(permuted)
    targets = np.stack(columns, axis=1)  # (n, K): real, control, permutations

    good = [key for key in keys if np.isfinite(features[key]).all()]
    rows_by_key = {key: _skip_row(*key, reason=f"features contain NaN or infinite values in "
                                               f"{int((~np.isfinite(features[key])).any(axis=1).sum())} of {n} rows",
                                  **common)
                   for key in keys if key not in good}
    chance = _majority_chance(labels, folds) if task == "classification" else 0.0
    if not good:
        rows = [rows_by_key[key] for key in keys]
        rows.append(_skip_row(keys[0][0], keys[0][1], selection="nested", reason="no cell has finite features",
                              **common))
        return pd.DataFrame(rows, columns=PROBE_COLUMNS)

    # One BLAS thread: these are many small products, where multi-threaded BLAS spends its time spinning
    # (measured 4.6x faster single-threaded on 2 busy cores).
    with one_blas_thread():
        predictions, inner_best, chosen_alpha = _cross_validate(features, good, targets, groups, folds,
                                                                inner_folds, alphas, task)

    def result_row(key, selection, predicted, alpha_counts, selected_cells=""):
        scores = _pooled_score(task, targets, predicted)
        score = float(scores[REAL])
        control_score = float(scores[CONTROL]) if control else np.nan
        if control:
            low, high = _selectivity_interval(task, targets[:, REAL], predicted[:, REAL], targets[:, CONTROL],
                                              predicted[:, CONTROL], groups, n_boot, confidence, seed)
        else:
            low = high = np.nan
        return {**common, "layer": key[0], "step": key[1], "selection": selection, "selected_cells": selected_cells,
                "score": score, "score_std": _fold_std(task, targets[:, REAL], predicted[:, REAL], folds),
                "control_score": control_score,
                "control_std": _fold_std(task, targets[:, CONTROL], predicted[:, CONTROL], folds) if control else np.nan,
                "selectivity": score - control_score, "selectivity_ci_low": low, "selectivity_ci_high": high,
                "p_value": _p_value(score, scores[FIRST_PERMUTATION:]), "chance": chance,
                "regularisation": alpha_counts.most_common(1)[0][0], "skipped_reason": ""}

    for c, key in enumerate(good):
        rows_by_key[key] = result_row(key, "cell", predictions[c], Counter(chosen_alpha[:, c, REAL].tolist()))

    # The nested best cell: chosen per fold on inner-CV selectivity (inner score alone without a control), for
    # the real labels and, in the same way, for every permutation, so the p-value includes the choice.
    criterion = inner_best - inner_best[:, :, [CONTROL]] if control else inner_best.copy()
    chosen = criterion.argmax(axis=1)  # (folds, K)
    nested = np.zeros_like(predictions[0])
    for f, (_, test) in enumerate(folds):
        for k in range(targets.shape[1]):
            source = chosen[f, REAL] if k == CONTROL else chosen[f, k]  # control scored on the real choice
            nested[test, k] = predictions[source, test, k]
    picked = Counter(good[chosen[f, REAL]] for f in range(len(folds)))
    modal = picked.most_common(1)[0][0]
    described = ", ".join(f"{layer}/{step} x{count}" for (layer, step), count in sorted(picked.items()))
    alphas_used = Counter(chosen_alpha[f, chosen[f, REAL], REAL] for f in range(len(folds)))
    rows = [rows_by_key[key] for key in keys]
    nested_row = result_row(modal, "nested", nested, alphas_used, described)
    fold_excess = _fold_excess(task, targets[:, REAL], nested[:, REAL], labels, folds)
    for r in range(1, repeats):  # the whole nested procedure again on a seeded re-split: refitted probes
        again = run_probes(features, labels, groups, task, n_splits, seed=seed + 7919 * r, control=control,
                           types=types, inner_splits=inner_splits, alphas=alphas, n_permutations=0, n_boot=0,
                           confidence=confidence, repeats=1, _fold_excess_out=fold_excess)
        del again
    train_share = (n_splits - 1) / n_splits
    excess, low, high = corrected_repeated_cv_interval(fold_excess, train_share, 1 - train_share, confidence)
    d = features[modal].shape[1]
    nested_row.update(score_excess=excess, score_excess_ci_low=low, score_excess_ci_high=high,
                      capacity=f"ridge probe (strength chosen by inner CV) on {n_groups} instances, {d} features, "
                               f"best of {len(good)} cell(s) chosen inside the training folds")
    if _fold_excess_out is not None:
        _fold_excess_out.extend(fold_excess)
    rows.append(nested_row)
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


def _fold_excess(task: str, truth, predicted, labels, folds) -> list[float]:
    """Per outer fold, the test score minus chance (the training fold's majority share; 0 for R^2)."""
    out = []
    for train, test in folds:
        if task == "classification":
            values, counts = np.unique(labels[train], return_counts=True)
            chance = float(np.mean(labels[test] == values[np.argmax(counts)]))
            out.append(float(np.mean(truth[test] == predicted[test])) - chance)
        elif len(test) >= 2:
            out.append(float(r2_score(truth[test], predicted[test])))
    return out


# --------------------------------------------------------------------------------------- tidy tables


def ran_probes(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a probe table whose probe ran (``skipped_reason`` empty or missing, e.g. after a CSV trip).

    >>> import pandas as pd
    >>> ran_probes(pd.DataFrame({"layer": [0, 1, 2], "skipped_reason": ["", None, "one class"]})).layer.tolist()
    [0, 1]
    """
    return table[_ran_mask(table)]


def skipped_probes(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a probe table whose probe was skipped, with the reason in ``skipped_reason``."""
    return table[~_ran_mask(table)]


def _ran_mask(table: pd.DataFrame) -> np.ndarray:
    if "skipped_reason" not in table.columns:
        return np.ones(len(table), dtype=bool)
    reason = table.skipped_reason
    return (reason.isna() | (reason.astype(object) == "")).to_numpy()


def best_probe_rows(probes: pd.DataFrame) -> pd.DataFrame:
    """For each (subject, attribute, representation), the honest "best layer x step" row.

    That is the ``nested`` row (best cell chosen inside the training folds) where the table has one; for tables
    without it (made before nested selection), the cell with the highest selectivity, which is optimistic.

    >>> import pandas as pd
    >>> table = pd.DataFrame({"representation": ["latent"] * 3, "selection": ["cell", "cell", "nested"],
    ...                       "selectivity": [0.1, 0.3, 0.2], "layer": [0, 1, 1]})
    >>> best_probe_rows(table).selectivity.tolist()
    [0.2]
    """
    ran = ran_probes(probes).reset_index(drop=True)  # concatenated tables repeat index labels
    keys = [c for c in ("subject", "attribute", "representation") if c in ran.columns]
    if "selection" in ran.columns:
        nested = ran[ran.selection == "nested"]
        if keys and len(nested):
            has_nested = ran.set_index(keys).index.isin(nested.set_index(keys).index)
            rest = ran[~has_nested & (ran.selection != "nested")]
        else:
            rest = ran if nested.empty else ran.iloc[0:0]
        ran = rest
    else:
        nested = ran.iloc[0:0]
    ran = ran.dropna(subset=["selectivity"])
    if ran.empty:
        best = ran
    else:
        best = ran.loc[ran.groupby(keys, sort=True).selectivity.idxmax()] if keys else ran.loc[[ran.selectivity.idxmax()]]
    combined = pd.concat([nested, best]) if len(nested) else best
    return combined.sort_values(keys).reset_index(drop=True) if keys else combined.reset_index(drop=True)


def tag_probe_results(results: pd.DataFrame, *, subject: str, representation: str, attribute: str) -> pd.DataFrame:
    """Prefix ``subject, representation, attribute`` columns so latents and baselines share one table.

    >>> import pandas as pd
    >>> tag_probe_results(pd.DataFrame({"layer": [3]}), subject="tiny", representation="latent",
    ...                   attribute="colour").columns.tolist()
    ['subject', 'representation', 'attribute', 'layer']
    """
    tagged = results.copy()
    for column, value in reversed(list(zip(TAG_COLUMNS, (subject, representation, attribute)))):
        tagged.insert(0, column, value)
    return tagged


def probe_table(
    features: Mapping[tuple[int, int], np.ndarray],
    labels,
    groups,
    *,
    subject: str,
    representation: str,
    attribute: str,
    **run_kwargs,
) -> pd.DataFrame:
    """:func:`run_probes` plus the ``subject, representation, attribute`` columns.

    ``representation`` is one of "latent", "image_tokens" (the pooled grid of
    :func:`latentprobe.stats.image_readout.pooled_image_tokens`), "image_mean", "prompt_last" (key those by
    ``(layer, -1)``) or
    "random_init" (latents of a randomly initialised model). Concatenate the tables with ``pd.concat``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> table = probe_table({(1, -1): rng.normal(size=(12, 4))}, np.tile([0, 1], 6), np.arange(12),
    ...                     subject="tiny", representation="image_mean", attribute="colour", n_splits=3)
    >>> table[["subject", "representation", "attribute", "layer", "step", "selection"]].values.tolist()
    [['tiny', 'image_mean', 'colour', 1, -1, 'cell'], ['tiny', 'image_mean', 'colour', 1, -1, 'nested']]
    """
    if representation not in REPRESENTATIONS:
        raise LatentProbeError(
            f"unknown representation {representation!r}", f"use one of {', '.join(REPRESENTATIONS)}"
        )
    results = run_probes(features, labels, groups, **run_kwargs)
    return tag_probe_results(results, subject=subject, representation=representation, attribute=attribute)
