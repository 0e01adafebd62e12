"""Linear probes by the book: per-type control, grouped folds balanced for both tasks, nested best-cell choice,
permutation p-values; scikit-learn as the oracle for the probe, the nested strength choice and the p-value."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.linear_model import Ridge, RidgeClassifier
from sklearn.metrics import accuracy_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from latentprobe.errors import LatentProbeError
from latentprobe.stats.probes import (PROBE_COLUMNS, _grouped_splits, _permuted_labels, best_probe_rows, control_labels,
                                instance_folds, probe_table, ridge_predictions, run_probes)

FAST = dict(alphas=(1.0, 100.0), n_splits=4, n_permutations=49, n_boot=300)  # small grids keep the suite quick


def planted(n_instances=80, dim=10, strength=3.0, seed=0, rows_per_instance=1):
    """States where a binary attribute is written along one direction (and noise states without it)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.permutation(np.arange(n_instances) % 2), rows_per_instance)
    groups = np.repeat(np.arange(n_instances), rows_per_instance)
    noise = rng.normal(size=(len(labels), dim))
    signal = noise.copy()
    signal[:, 0] += strength * (2 * labels - 1)
    return signal, noise, labels, groups


def nested(table):
    return table[table.selection == "nested"].iloc[0]


# ------------------------------------------------------------------------------------- scikit-learn oracles


@pytest.mark.parametrize("n_classes", [2, 4])
def test_closed_form_probe_equals_scikit_learn(n_classes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 12)) * rng.uniform(0.1, 5, size=12) + 3.0
    x[:, 3] = 1.0  # a constant feature, left unscaled as StandardScaler does
    y = rng.integers(0, n_classes, size=50)
    train, test = np.arange(35), np.arange(35, 50)
    alphas = (0.1, 10.0, 1000.0)
    ours = ridge_predictions(x[train], x[test], np.stack([y[train], y[train][::-1]], axis=1), alphas, "classification")
    for a, alpha in enumerate(alphas):
        for column, target in enumerate((y[train], y[train][::-1])):
            reference = make_pipeline(StandardScaler(), RidgeClassifier(alpha=alpha)).fit(x[train], target)
            np.testing.assert_array_equal(ours[a, :, column], reference.predict(x[test]))
    values = rng.normal(size=50)
    ours = ridge_predictions(x[train], x[test], values[train, None], alphas, "regression")
    for a, alpha in enumerate(alphas):
        reference = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x[train], values[train])
        np.testing.assert_allclose(ours[a, :, 0], reference.predict(x[test]), atol=1e-9)


def test_cell_score_equals_grid_search_inside_each_outer_fold():
    """The nested strength choice is GridSearchCV (grouped inner folds) refitted on each outer training part."""
    signal, _, labels, groups = planted(n_instances=60, strength=0.8, seed=3)
    alphas = (0.1, 10.0, 1000.0)
    table = run_probes({(0, 0): signal}, labels, groups, n_splits=4, inner_splits=3, alphas=alphas, seed=2,
                       n_permutations=0, n_boot=0)
    control = control_labels(labels, groups, seed=2)
    predicted = np.empty_like(labels)
    for train, test in instance_folds(labels, groups, n_splits=4, seed=2, control=control):
        inner = _grouped_splits(labels[train], groups[train], 3, "classification", 2, control[train])
        search = GridSearchCV(make_pipeline(StandardScaler(), RidgeClassifier()),
                              {"ridgeclassifier__alpha": alphas}, cv=inner, scoring="accuracy")
        predicted[test] = search.fit(signal[train], labels[train]).predict(signal[test])
    assert table.iloc[0].score == pytest.approx(accuracy_score(labels, predicted))


def test_permutation_p_value_equals_a_scikit_learn_recount():
    """With one strength, the p-value is (1 + #{CV score on permuted labels >= score}) / (1 + P), every CV score
    recomputed by scikit-learn on the same folds and the same permutations."""
    signal, _, labels, groups = planted(n_instances=40, strength=0.4, seed=4)
    table = run_probes({(0, 0): signal}, labels, groups, n_splits=4, alphas=(10.0,), seed=1, n_permutations=39,
                       n_boot=0)
    folds = instance_folds(labels, groups, n_splits=4, seed=1, control=control_labels(labels, groups, seed=1))
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=10.0))

    def cv_accuracy(y):
        predicted = np.empty_like(y)
        for train, test in folds:
            predicted[test] = probe.fit(signal[train], y[train]).predict(signal[test])
        return accuracy_score(y, predicted)

    observed = cv_accuracy(labels)
    null = np.array([cv_accuracy(y) for y in _permuted_labels(labels, groups, 39, seed=1, folds=folds)])
    assert table.iloc[0].score == pytest.approx(observed)
    assert table.iloc[0].p_value == pytest.approx((1 + np.sum(null >= observed)) / 40)


# ------------------------------------------------------------------------------------------ the cases


def memorisable(n_types=12, per_type=5, seed=0):
    """States that identify a type (e.g. an image shown in several instances); the attribute is a function of it."""
    rng = np.random.default_rng(seed)
    types = np.repeat(np.arange(n_types), per_type)
    states = (3.0 * rng.normal(size=(n_types, 16)))[types] + 0.3 * rng.normal(size=(len(types), 16))
    attribute = (np.arange(n_types) % 4)[types]
    return states, attribute, types


def test_a_probe_that_memorises_types_has_no_selectivity_under_the_per_type_control():
    states, attribute, types = memorisable()
    groups = np.arange(len(types))
    per_type = run_probes({(0, 0): states}, attribute, groups, types=types, control_type="image", **FAST)
    row = nested(per_type)
    assert row.score == pytest.approx(1.0) and row.control_score == pytest.approx(1.0)
    assert row.selectivity == pytest.approx(0.0) and row.selectivity_ci_high <= 0.05
    assert row.control_type == "image" and row.n_types == 12
    # A control drawn per instance cannot be learned across folds, so it credits memorisation as information.
    per_instance = nested(run_probes({(0, 0): states}, attribute, groups, **FAST))
    assert per_instance.control_type == "instance" and per_instance.selectivity > 0.5


def test_folds_are_balanced_for_the_control_labels_too():
    states, attribute, types = memorisable(n_types=12, per_type=8)
    control = control_labels(attribute, types, seed=0)
    folds = instance_folds(attribute, np.arange(len(types)), n_splits=4, seed=0, control=control)
    overall = pd.Series(control).value_counts(normalize=True)
    for _, test in folds:
        share = pd.Series(control[test]).value_counts(normalize=True).reindex(overall.index, fill_value=0)
        assert (share - overall).abs().max() < 0.1


def test_pure_noise_best_cell_has_no_selectivity_and_uniform_p_values():
    selectivities, p_values = [], []
    for seed in range(24):
        rng = np.random.default_rng(100 + seed)
        features = {(layer, step): rng.normal(size=(48, 12)) for layer in range(3) for step in range(4)}
        labels = rng.permutation(np.arange(48) % 4)
        row = nested(run_probes(features, labels, np.arange(48), n_splits=4, alphas=(1.0, 100.0), seed=seed,
                                n_permutations=39, n_boot=0, repeats=1))  # repeats: the score_excess interval
        selectivities.append(row.selectivity)
        p_values.append(row.p_value)
    assert abs(np.mean(selectivities)) < 0.05  # the old best-of-12 cells gave +0.17
    assert stats.kstest(p_values, "uniform").pvalue > 0.01
    assert np.mean(np.array(p_values) < 0.05) <= 0.15


def test_a_planted_attribute_is_found_in_its_cell():
    signal, noise, labels, groups = planted(strength=2.0)
    features = {(layer, step): noise + np.random.default_rng(layer * 4 + step).normal(size=noise.shape)
                for layer in range(2) for step in range(3)}
    features[(1, 2)] = signal
    table = run_probes(features, labels, groups, seed=0, **FAST)
    assert table.columns.tolist() == PROBE_COLUMNS
    row = nested(table)
    assert (row.layer, row.step) == (1, 2) and row.selected_cells == "1/2 x4"
    assert row.score > 0.8 and row.selectivity_ci_low > 0.2 and row.p_value == pytest.approx(1 / 50)
    cell = table[(table.selection == "cell") & (table.step == 0)].iloc[0]
    assert abs(cell.score - cell.chance) < 0.2 and cell.p_value > 0.05


def test_regression_probe_reads_a_planted_number():
    rng = np.random.default_rng(1)
    target = rng.normal(size=60)
    states = rng.normal(size=(60, 8))
    states[:, 2] += 4.0 * target  # the best possible R^2 is 16/17
    row = nested(run_probes({(0, 0): states}, target, np.arange(60), task="regression", **FAST))
    assert row.metric == "r2" and row.chance == 0.0
    assert row.score > 0.7 and row.control_score < 0.2 and row.selectivity_ci_low > 0.4 and row.p_value < 0.05


def test_best_probe_rows_prefers_the_nested_row():
    signal, noise, labels, groups = planted(n_instances=40)
    table = probe_table({(0, 0): noise, (0, 1): noise[::-1], (0, 2): signal}, labels, groups, subject="s",
                        representation="latent", attribute="a", **FAST)
    best = best_probe_rows(table)
    assert len(best) == 1 and best.selection[0] == "nested"


# ------------------------------------------------------------------------------------------ folds and checks


def test_no_instance_is_on_both_sides_of_any_fold():
    _, _, labels, groups = planted(n_instances=30, rows_per_instance=3)
    for task in ("classification", "regression"):
        folds = instance_folds(labels, groups, n_splits=5, task=task, seed=7)
        assert len(folds) == 5
        tested = np.concatenate([test for _, test in folds])
        assert sorted(tested.tolist()) == list(range(len(labels)))  # each row tested exactly once
        for train, test in folds:
            assert not set(groups[train]) & set(groups[test])


def test_control_labels_follow_types_and_the_label_distribution():
    labels = np.array(["a"] * 30 + ["b"] * 10)
    types = np.arange(40) % 20
    control = control_labels(labels, types, seed=3)
    for t in range(20):
        assert len(set(control[types == t])) == 1
    assert set(control) <= {"a", "b"}
    np.testing.assert_array_equal(control, control_labels(labels, types, seed=3))
    with pytest.raises(LatentProbeError, match="several types"):
        run_probes({(0, 0): np.zeros((4, 2))}, [0, 1, 0, 1], [0, 0, 1, 1], types=[0, 1, 2, 2])


def test_same_seed_same_table():
    signal, _, labels, groups = planted(n_instances=40)
    first = run_probes({(0, 0): signal}, labels, groups, seed=5, **FAST)
    pd.testing.assert_frame_equal(first, run_probes({(0, 0): signal}, labels, groups, seed=5, **FAST))


def test_single_class_gives_skip_rows():
    signal, _, _, groups = planted(n_instances=20)
    table = run_probes({(0, 0): signal, (1, 0): signal}, np.zeros(20), groups, **FAST)
    assert len(table) == 3
    assert table.skipped_reason.str.contains("single class").all()
    assert table.score.isna().all()


def test_fewer_instances_than_folds_reduces_folds_or_skips():
    signal, _, labels, groups = planted(n_instances=3, rows_per_instance=4)
    with pytest.warns(UserWarning, match="using 3 folds"):
        table = run_probes({(0, 0): signal}, np.arange(12) % 2, groups, n_splits=5, alphas=(1.0,))
    assert table.n_splits[0] == 3 and table.skipped_reason[0] == ""
    one_instance = run_probes({(0, 0): signal}, np.arange(12) % 2, np.zeros(12), alphas=(1.0,))
    assert "1 distinct instance" in one_instance.skipped_reason[0]


def test_nan_features_skip_only_that_probe():
    signal, noise, labels, groups = planted(n_instances=40)
    broken = noise.copy()
    broken[5, 2] = np.nan
    table = run_probes({(0, 0): signal, (0, 1): broken}, labels, groups, **FAST)
    cells = table[table.selection == "cell"].set_index("step")
    assert cells.loc[0].skipped_reason == "" and cells.loc[0].score > 0.9
    assert "NaN" in cells.loc[1].skipped_reason and np.isnan(cells.loc[1].score)
    assert nested(table).step == 0


def test_constant_regression_target_is_skipped():
    states = np.random.default_rng(0).normal(size=(20, 3))
    table = run_probes({(0, 0): states}, np.ones(20), np.arange(20), task="regression", alphas=(1.0,))
    assert "constant" in table.skipped_reason[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(features={(0, 0): np.zeros((5, 2))}, labels=[0, 1] * 3, groups=range(6)), "5 rows"),
        (dict(features={(0, 0): np.zeros((6, 2))}, labels=[0, 1] * 3, groups=range(5)), "groups has 5"),
        (dict(features={(0, 0): np.zeros((6, 2))}, labels=[0, 1, None, 0, 1, 0], groups=range(6)), "missing"),
        (dict(features={}, labels=[0, 1], groups=[0, 1]), "no features"),
        (dict(features={0: np.zeros((2, 2))}, labels=[0, 1], groups=[0, 1]), "(layer, step)"),
        (dict(features={(0, 0): np.zeros(2)}, labels=[0, 1], groups=[0, 1]), "expected \\(N, D\\)"),
        (dict(features={(0, 0): np.zeros((2, 2))}, labels=[0, 1], groups=[0, 1], task="ranking"), "unknown probe task"),
        (dict(features={(0, 0): np.zeros((2, 2))}, labels=["a", "b"], groups=[0, 1], task="regression"), "not numeric"),
        (dict(features={(0, 0): np.zeros((2, 2))}, labels=[0, 1], groups=[0, 1], n_splits=1), "below 2"),
        (dict(features={(0, 0): np.zeros((2, 2))}, labels=[0, 1], groups=[0, 1], alphas=(0.0,)), "positive"),
        (dict(features={(0, 0): np.zeros((2, 2))}, labels=[0, 1], groups=[0, 1], alphas=(np.nan,)), "positive"),
        (dict(features={(0, 0): np.zeros((2, 2))}, labels=[0, 1], groups=[0, 1], n_permutations=-1), "negative"),
        (dict(features={(0, 0): np.zeros((2, 2))}, labels=[0, 1], groups=[0, 1], confidence=1.0), "confidence"),
        (dict(features={(0, 0): np.zeros((2, 2))}, labels=[0, 1], groups=[0, 1], types=[0]), "types has shape"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(LatentProbeError, match=message):
        run_probes(**kwargs)


def test_probe_table_tags_rows_and_checks_the_representation():
    signal, _, labels, groups = planted(n_instances=24)
    table = probe_table({(2, -1): signal}, labels, groups, subject="tiny", representation="image_mean",
                        attribute="colour", **FAST)
    assert table.columns.tolist()[:3] == ["subject", "representation", "attribute"]
    assert table[["subject", "representation", "attribute", "layer", "step", "selection"]].values.tolist() == [
        ["tiny", "image_mean", "colour", 2, -1, "cell"], ["tiny", "image_mean", "colour", 2, -1, "nested"]
    ]
    with pytest.raises(LatentProbeError, match="unknown representation"):
        probe_table({(2, -1): signal}, labels, groups, subject="tiny", representation="pixels", attribute="colour")


def test_permutations_keep_each_folds_class_counts_and_whole_instances():
    _, _, labels, groups = planted(n_instances=30, rows_per_instance=2)
    folds = instance_folds(labels, groups, n_splits=3, seed=0)
    permuted = _permuted_labels(labels, groups, 20, seed=0, folds=folds)
    assert not (permuted == labels).all(axis=1).all()
    for y in permuted:
        assert (y[::2] == y[1::2]).all()  # both rows of an instance keep one label
        for _, test in folds:
            assert sorted(y[test]) == sorted(labels[test])
