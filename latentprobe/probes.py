"""Linear probes for what latent tokens encode, with a control task (Hewitt & Liang 2019).

Pure functions on numpy arrays: nothing here loads a model or reads the trace store.

One probe per (layer, step): standardise, then logistic regression (classification) or ridge regression
(regression), with the regularisation strength chosen by an inner cross-validation that is also grouped
by instance (RidgeCV's leave-one-out would put rows of one instance on both sides; LogisticRegressionCV
accepts grouped splits but costs ~50x a plain fit on probe-sized data). Outer folds are split by
instance (``groups``) so no instance, and none of its several rows (e.g. several interventions), is on both
sides of a split. The control task gives each instance a random label from the same label distribution;
a probe that scores well on it is memorising, so ``selectivity = score - control_score`` is what counts.

Result columns (one row per (layer, step)):

``layer, step, task, metric`` -- metric is "accuracy" (classification) or "r2" (regression);
``score, score_std`` -- mean and std over outer folds; ``control_score, control_std`` -- the same on the
control task; ``selectivity``; ``chance`` -- accuracy of always predicting the training fold's majority
class, on the test fold (mean over folds), or 0 for R^2; ``n, n_groups, n_classes, n_splits``;
``regularisation`` -- the most often chosen C (classification) or alpha (regression);
``convergence_warnings`` -- solver warnings seen; ``control_mode, seed``; ``skipped_reason`` -- empty when
the probe ran, else why it did not (the numbers are then NaN).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Mapping

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from .errors import LatentProbeError

TASKS = ("classification", "regression")
CONTROL_MODES = ("group", "shuffle")
REPRESENTATIONS = ("latent", "image_mean", "prompt_last", "random_init")
NO_STEP = -1  # the ``step`` key of representations without a latent step (image_mean, prompt_last)
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0)
DEFAULT_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
DEFAULT_INNER_SPLITS = 3

PROBE_COLUMNS = [
    "layer", "step", "task", "metric", "score", "score_std", "control_score", "control_std", "selectivity",
    "chance", "n", "n_groups", "n_classes", "n_splits", "regularisation", "convergence_warnings",
    "control_mode", "seed", "skipped_reason",
]
TAG_COLUMNS = ["subject", "representation", "attribute"]


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


# ----------------------------------------------------------------------------------- folds and control


def _splitter(task: str, n_splits: int, seed: int):
    # Stratifying keeps every class in every training fold where the data allow it; both honour groups.
    if task == "classification":
        return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def instance_folds(labels, groups, n_splits: int = 5, task: str = "classification", seed: int = 0):
    """Outer (train, test) index splits by instance: no group is on both sides of any split.

    Classification uses ``StratifiedGroupKFold`` (a GroupKFold that also balances classes), regression
    ``GroupKFold``; both shuffled with ``seed``.

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
    splitter = _splitter(task, n_splits, seed)
    if task == "classification" and np.unique(labels, return_counts=True)[1].max() < n_splits:
        # Stratification is impossible when every class has fewer members than folds (scikit-learn raises);
        # plain GroupKFold still keeps every instance on one side.
        splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members than n_splits"
        return [(train, test) for train, test in splitter.split(np.zeros(len(labels)), labels, groups)]


def control_labels(labels, groups, task: str = "classification", seed: int = 0, mode: str = "group"):
    """Control-task labels and the mode actually used: ``(labels, mode)``.

    ``mode="group"``: when every instance has one label, the instance-level labels are permuted among the
    instances, so each instance gets a random label from the same distribution (Hewitt & Liang's control
    task at the level of our unit, the instance). When labels vary within an instance this falls back to
    ``"shuffle"``: a seeded permutation of all rows' labels.

    >>> import numpy as np
    >>> shuffled, used = control_labels(["a", "a", "b", "b", "c", "c"], [0, 0, 1, 1, 2, 2], seed=1)
    >>> used, sorted(shuffled.tolist()) == ["a", "a", "b", "b", "c", "c"], bool(shuffled[0] == shuffled[1])
    ('group', True, True)
    """
    _check_task(task)
    if mode not in CONTROL_MODES:
        raise LatentProbeError(f"unknown control mode {mode!r}", f"use one of {', '.join(CONTROL_MODES)}")
    labels, groups = _check_labels_and_groups(labels, groups, task)
    rng = np.random.default_rng(seed)
    if mode == "group":
        group_ids, row_group = np.unique(groups, return_inverse=True)
        first_row = np.array([np.flatnonzero(row_group == g)[0] for g in range(len(group_ids))])
        group_label = labels[first_row]
        if np.array_equal(group_label[row_group], labels):
            return group_label[rng.permutation(len(group_ids))][row_group], "group"
    return labels[rng.permutation(len(labels))], "shuffle"


# ---------------------------------------------------------------------------------------- the probes


def _linear_model(task: str, strength: float, seed: int, max_iter: int):
    if task == "classification":
        return LogisticRegression(C=strength, max_iter=max_iter, random_state=seed)
    return Ridge(alpha=strength, random_state=seed)


def _probe_pipeline(task: str, strength: float, seed: int, max_iter: int) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("probe", _linear_model(task, strength, seed, max_iter))])


def _inner_splits(labels, groups, task: str, inner_splits: int, seed: int) -> list:
    """Inner (train, validation) splits that can be fitted: grouped, and two classes in each training part."""
    n_splits = min(inner_splits, len(np.unique(groups)))
    if n_splits < 2:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        splitter = _splitter(task, n_splits, seed)
        if task == "classification" and np.unique(labels, return_counts=True)[1].max() < n_splits:
            splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)  # as instance_folds does
        splits = list(splitter.split(np.zeros(len(labels)), labels, groups))
    if task == "classification":
        splits = [(train, test) for train, test in splits if len(np.unique(labels[train])) >= 2]
    return splits


def _validation_score(task: str, truth, predicted) -> float:
    # Negative squared error rather than R^2 for regression: R^2 is undefined on a one-row validation part.
    if task == "classification":
        return float(np.mean(truth == predicted))
    return -float(np.mean((truth - predicted) ** 2))


def _choose_strength(x, y, groups, task, grid, inner_splits, seed, max_iter) -> float:
    """The regularisation strength with the best mean validation score over inner grouped splits.

    A plain loop instead of GridSearchCV/LogisticRegressionCV: on probe-sized data their per-fit overhead
    is several times the fit itself. The scaler is fitted on each inner training part, as in a Pipeline.
    Ties go to the first strength in ``grid``.
    """
    grid = list(grid)
    splits = _inner_splits(y, groups, task, inner_splits, seed)
    if len(grid) == 1 or not splits:
        return grid[len(grid) // 2]  # nothing to choose from, or too few instances to validate on
    totals = np.zeros(len(grid))
    for train, validation in splits:
        scaler = StandardScaler().fit(x[train])
        x_train, x_validation = scaler.transform(x[train]), scaler.transform(x[validation])
        for index, strength in enumerate(grid):
            model = _linear_model(task, strength, seed, max_iter).fit(x_train, y[train])
            totals[index] += _validation_score(task, y[validation], model.predict(x_validation))
    return grid[int(np.argmax(totals))]


def _fit_predict(x_train, y_train, g_train, x_test, task, grid, inner_splits, seed, max_iter):
    """Fit one probe (inner CV for its strength) and predict the test rows: (predictions, strength, warnings)."""
    if task == "classification" and len(np.unique(y_train)) < 2:
        # Only reachable with control labels (real labels are checked up front): the one class is the answer.
        return np.full(len(x_test), y_train[0]), np.nan, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        strength = _choose_strength(x_train, y_train, g_train, task, grid, inner_splits, seed, max_iter)
        fitted = _probe_pipeline(task, strength, seed, max_iter).fit(x_train, y_train)
    n_warnings = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return fitted.predict(x_test), float(strength), n_warnings


def _cross_validated(x, targets, groups, folds, *, task, grid, inner_splits, seed, max_iter):
    """Outer-fold test scores of one probe: (scores, chosen strengths, convergence warnings)."""
    scores, strengths, n_warnings = [], [], 0
    for train, test in folds:
        predicted, strength, caught = _fit_predict(
            x[train], targets[train], groups[train], x[test], task, grid, inner_splits, seed, max_iter
        )
        scores.append(_score(task, targets[test], predicted))
        strengths.append(strength)
        n_warnings += caught
    return scores, strengths, n_warnings


def _score(task: str, truth, predicted) -> float:
    if task == "classification":
        return float(accuracy_score(truth, predicted))
    if len(truth) < 2:
        return np.nan  # R^2 of one test row is undefined
    return float(r2_score(truth, predicted))


def _majority_chance(labels, folds) -> float:
    """Test accuracy of always predicting the training fold's majority class, averaged over folds."""
    scores = []
    for train, test in folds:
        values, counts = np.unique(labels[train], return_counts=True)
        scores.append(float(np.mean(labels[test] == values[np.argmax(counts)])))
    return float(np.mean(scores))


def _skip_row(layer, step, *, task, n, n_groups, n_classes, n_splits, seed, reason) -> dict:
    return {
        "layer": layer, "step": step, "task": task, "metric": "accuracy" if task == "classification" else "r2",
        "score": np.nan, "score_std": np.nan, "control_score": np.nan, "control_std": np.nan,
        "selectivity": np.nan, "chance": np.nan, "n": n, "n_groups": n_groups, "n_classes": n_classes,
        "n_splits": n_splits, "regularisation": np.nan, "convergence_warnings": 0, "control_mode": "",
        "seed": seed, "skipped_reason": reason,
    }


def run_probes(
    features: Mapping[tuple[int, int], np.ndarray],
    labels,
    groups,
    task: str = "classification",
    n_splits: int = 5,
    seed: int = 0,
    control: bool = True,
    *,
    control_mode: str = "group",
    inner_splits: int = DEFAULT_INNER_SPLITS,
    Cs=DEFAULT_CS,
    alphas=DEFAULT_ALPHAS,
    max_iter: int = 2000,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Probe every (layer, step) feature set for ``labels``; one result row per key (see module docstring).

    ``features`` maps ``(layer, step)`` to an (N, D) array whose rows match ``labels`` and ``groups``
    (instance ids). Bad global input (mismatched lengths, missing labels, unknown task) raises
    :class:`LatentProbeError`; a probe that cannot be run (one class, one instance, NaN features) gives a
    row with ``skipped_reason`` set. Fewer instances than ``n_splits`` reduces the folds, with a warning.
    ``Cs`` / ``alphas`` are the strengths the inner CV picks from; ``n_jobs`` probes keys in parallel (joblib).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = np.repeat([0, 1], 30)
    >>> states = rng.normal(size=(60, 8)); states[:, 0] += 3 * labels
    >>> table = run_probes({(0, 0): states}, labels, groups=np.arange(60), n_splits=3, Cs=(1.0,))
    >>> bool(table.score[0] > 0.9), bool(table.selectivity[0] > 0.3), table.skipped_reason[0]
    (True, True, '')
    """
    _check_task(task)
    labels, groups = _check_labels_and_groups(labels, groups, task)
    features = _check_features(features, len(labels))
    if n_splits < 2:
        raise LatentProbeError(f"n_splits={n_splits} is below 2", "use at least 2 outer folds (5 is the default)")
    n, n_groups = len(labels), len(np.unique(groups))
    n_classes = len(np.unique(labels)) if task == "classification" else 0
    keys = sorted(features)

    def skip_all(reason: str, splits: int) -> pd.DataFrame:
        rows = [
            _skip_row(layer, step, task=task, n=n, n_groups=n_groups, n_classes=n_classes, n_splits=splits,
                      seed=seed, reason=reason)
            for layer, step in keys
        ]
        return pd.DataFrame(rows, columns=PROBE_COLUMNS)

    if task == "classification" and n_classes < 2:
        return skip_all(f"labels have a single class ({labels[0]!r}): nothing to predict", n_splits)
    if task == "regression" and np.ptp(labels) == 0:
        return skip_all("regression target is constant: nothing to predict", n_splits)
    if n_groups < 2:
        return skip_all(f"only {n_groups} distinct instance: cannot split by instance", n_splits)
    if n_groups < n_splits:
        warnings.warn(
            f"only {n_groups} distinct instances for {n_splits} folds; using {n_groups} folds", stacklevel=2
        )
        n_splits = n_groups

    folds = instance_folds(labels, groups, n_splits, task, seed)
    if task == "classification" and any(len(np.unique(labels[train])) < 2 for train, _ in folds):
        return skip_all("a training fold holds a single class: too few instances per class for the folds", n_splits)
    control_targets, used_mode = (None, "") if not control else control_labels(labels, groups, task, seed, control_mode)
    chance = _majority_chance(labels, folds) if task == "classification" else 0.0

    settings = dict(task=task, grid=Cs if task == "classification" else alphas, inner_splits=inner_splits,
                    seed=seed, max_iter=max_iter)
    common = dict(task=task, n=n, n_groups=n_groups, n_classes=n_classes, n_splits=n_splits, seed=seed)

    def probe_key(layer: int, step: int) -> dict:
        # One BLAS thread: these are many small solves, where multi-threaded BLAS spends its time spinning
        # (measured ~10x more CPU on 2 cores); run keys in parallel with n_jobs instead.
        with threadpool_limits(limits=1):
            return probe_key_single_threaded(layer, step)

    def probe_key_single_threaded(layer: int, step: int) -> dict:
        x = features[(layer, step)]
        bad_rows = int((~np.isfinite(x)).any(axis=1).sum())
        if bad_rows:
            return _skip_row(layer, step, reason=f"features contain NaN or infinite values in {bad_rows} of {n} rows",
                             **common)
        scores, strengths, n_warnings = _cross_validated(x, labels, groups, folds, **settings)
        control_score = control_std = np.nan
        control_warnings = 0
        if control:
            control_scores, _, control_warnings = _cross_validated(x, control_targets, groups, folds, **settings)
            control_score, control_std = float(np.nanmean(control_scores)), float(np.nanstd(control_scores))
        score = float(np.nanmean(scores))
        return {
            "layer": layer, "step": step, "task": task, "metric": "accuracy" if task == "classification" else "r2",
            "score": score, "score_std": float(np.nanstd(scores)),
            "control_score": control_score, "control_std": control_std,
            "selectivity": score - control_score, "chance": chance, "n": n, "n_groups": n_groups,
            "n_classes": n_classes, "n_splits": n_splits,
            "regularisation": Counter(strengths).most_common(1)[0][0],
            "convergence_warnings": n_warnings + control_warnings,
            "control_mode": used_mode, "seed": seed, "skipped_reason": "",
        }

    if n_jobs in (None, 1):
        rows = [probe_key(layer, step) for layer, step in keys]
    else:  # every key is seeded on its own, so results do not depend on n_jobs
        rows = Parallel(n_jobs=n_jobs)(delayed(probe_key)(layer, step) for layer, step in keys)
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


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
    """For each (subject, attribute, representation), the probe row with the highest selectivity.

    Picking the best of many layers and steps is optimistic; the report says so next to these numbers.

    >>> import pandas as pd
    >>> table = pd.DataFrame({"representation": ["latent", "latent"], "selectivity": [0.1, 0.3], "layer": [0, 1]})
    >>> best_probe_rows(table).layer.tolist()
    [1]
    """
    ran = ran_probes(probes).dropna(subset=["selectivity"]).reset_index(drop=True)  # concatenated tables repeat index labels
    keys = [c for c in ("subject", "attribute", "representation") if c in ran.columns]
    if ran.empty:
        return ran
    best = ran.loc[ran.groupby(keys, sort=True).selectivity.idxmax()] if keys else ran.loc[[ran.selectivity.idxmax()]]
    return best.reset_index(drop=True)


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

    ``representation`` is one of "latent", "image_mean", "prompt_last" (key those by ``(layer, -1)``) or
    "random_init" (latents of a randomly initialised model). Concatenate the tables with ``pd.concat``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> table = probe_table({(1, -1): rng.normal(size=(12, 4))}, np.tile([0, 1], 6), np.arange(12),
    ...                     subject="tiny", representation="image_mean", attribute="colour", n_splits=3)
    >>> table[["subject", "representation", "attribute", "layer", "step"]].values.tolist()
    [['tiny', 'image_mean', 'colour', 1, -1]]
    """
    if representation not in REPRESENTATIONS:
        raise LatentProbeError(
            f"unknown representation {representation!r}", f"use one of {', '.join(REPRESENTATIONS)}"
        )
    results = run_probes(features, labels, groups, **run_kwargs)
    return tag_probe_results(results, subject=subject, representation=representation, attribute=attribute)
