"""Tests written against mutations that once passed every test (issue 12):

1. IrEne+'s inner cross-validation also training on the held-out model;
2. IrEne+ picking the worst leaf candidate instead of the best;
3. the measured Δtime / Δgpu-energy columns of IrEne+'s unattributed term set to zero;
4. ``IreneModel`` fitting on all 14 features under ``features=model_specs``.

Each test states the behaviour, so that any code that breaks it fails, not only the mutant
that was tried (``scripts/mutation.py`` runs mutmut over the predictors and metrics).
"""

from __future__ import annotations

import numpy as np
import pytest

from irene.data.forest import ALL_FEATURES, FEATURE_SETS, build_forest, children_sum, compose
from irene.predictors.irene import IreneModel
from irene.predictors.irene_plus import IrenePlusPredictor, _distinct
from irene.predictors.leaves import LogPolyRegressor, measured

CANDIDATES = {"leaf_degrees": [1, 2], "leaf_alphas": [1e-4, 1e-1], "leaf_spaces": ["log", "linear"]}


def _leave_one_model_out(x, y, groups, count, space, degree, alpha):
    """Mean relative error over held-out models, each fit on the other models only."""
    errors = []
    for held in dict.fromkeys(groups):
        train, test = groups != held, groups == held
        model = LogPolyRegressor.fit(x[train], y[train], degree=degree, alpha=alpha,
                                     sample_weight=count[train], space=space)
        errors.append(np.average(np.abs(model.predict(x[test]) / y[test] - 1.0),
                                 weights=count[test]))
    return 100.0 * float(np.mean(errors))


@pytest.fixture(scope="module")
def plus_static(small_trees):
    forest = build_forest(small_trees)
    return forest, IrenePlusPredictor(feature_sets=["model_specs"], **CANDIDATES).fit(forest)


def test_inner_selection_scores_each_candidate_on_models_it_did_not_train_on(plus_static):
    """The leaf error IrEne+ reports for a primitive type is the leave-one-model-out error of
    the chosen candidate, fit without the held-out model (mutation 1 lowers it)."""
    forest, model = plus_static
    x = forest.matrix(model.features_)
    leaves = forest.is_leaf & measured(forest)
    checked = 0
    for op in ("linear", "matmul", "layernorm", "softmax"):
        rows = np.flatnonzero(leaves & (forest.op_type == op))
        x_op, y_op, groups, count = _distinct(x[rows], forest.gold_j[rows],
                                              forest.node_model_names()[rows])
        chosen = model.leaf_models_[op]
        expected = _leave_one_model_out(x_op, y_op, groups, count, chosen.space, chosen.degree,
                                        chosen.alpha)
        assert model.leaf_cv_error_pct_[op] == pytest.approx(expected, rel=1e-9), op
        in_sample = LogPolyRegressor.fit(x_op, y_op, degree=chosen.degree, alpha=chosen.alpha,
                                         sample_weight=count, space=chosen.space)
        in_sample_error = 100 * np.average(np.abs(in_sample.predict(x_op) / y_op - 1), weights=count)
        assert expected > in_sample_error  # held-out error is the harder number
        checked += 1
    assert checked == 4


def test_inner_selection_picks_the_candidate_with_the_least_held_out_error(plus_static):
    """Every other candidate scores at least as badly as the chosen one (mutation 2 picks the
    worst)."""
    forest, model = plus_static
    x = forest.matrix(model.features_)
    leaves = forest.is_leaf & measured(forest)
    spread = []
    for op in ("linear", "matmul", "softmax"):
        rows = np.flatnonzero(leaves & (forest.op_type == op))
        x_op, y_op, groups, count = _distinct(x[rows], forest.gold_j[rows],
                                              forest.node_model_names()[rows])
        scores = {c: _leave_one_model_out(x_op, y_op, groups, count, *c)
                  for c in model._candidates()}
        chosen = model.leaf_models_[op]
        best = min(scores.values())
        assert scores[(chosen.space, chosen.degree, chosen.alpha)] == pytest.approx(best, rel=1e-9)
        spread.append(max(scores.values()) / best)
    assert max(spread) > 1.5  # the candidates differ: choosing matters on this data


def test_selection_finds_the_law_the_data_follow():
    """A sum of measured parts is linear, a power law is log: the selection must tell."""
    rng = np.random.default_rng(7)
    x = rng.uniform(1.0, 1000.0, size=(90, 2))
    groups = np.repeat(np.array(["a", "b", "c"], dtype=object), 30)
    count = np.ones(90)
    model = IrenePlusPredictor(feature_sets=["model_specs"], leaf_degrees=[1, 2],
                               leaf_alphas=[0.0, 1e-1], leaf_spaces=["log", "linear"])
    model.features_ = ["flops", "mem_bytes"]
    linear_law = 0.002 * x[:, 0] + 0.05 * x[:, 1] + 0.3
    (space, _, _), error = model._select(x, linear_law, groups, count)
    assert space == "linear" and error < 1.0
    power_law = 1e-3 * x[:, 0] ** 0.8 * x[:, 1] ** 0.3
    (space, degree, _), error = model._select(x, power_law, groups, count)
    assert space == "log" and error < 1.0


def test_measured_unattributed_time_and_energy_are_learned(small_trees):
    """With measured features the unattributed term reads Δtimes_mean and Δgpu_energy_mean:
    energies built from known coefficients of those differences are recovered (mutation 3
    zeroes the two columns)."""
    forest = build_forest(small_trees)
    own = {}
    for name in ("flops", "mem_bytes", "times_mean", "gpu_energy_mean"):
        column = forest.features[:, ALL_FEATURES.index(name)]
        own[name] = column - children_sum(forest, column)
    truth = {"constant_j": 0.002, "extra_flops": 0.0, "extra_mem_bytes": 0.0,
             "extra_times_mean": 35.0, "extra_gpu_energy_mean": 0.6}
    residual = (truth["constant_j"] + truth["extra_times_mean"] * own["times_mean"]
                + truth["extra_gpu_energy_mean"] * own["gpu_energy_mean"])
    forest.gold_j = compose(forest, np.where(forest.is_leaf, forest.gold_j, residual))
    assert (forest.gold_j > 0).all()
    model = IrenePlusPredictor(inner_ridge=0.0, refit_iterations=0, nonnegative=False,
                               leaf_degrees=[1], leaf_alphas=[1e-4]).fit(forest)
    assert model.residual_terms_ == list(truth)
    np.testing.assert_allclose(model.residual_coef_, list(truth.values()), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(model.child_weights_, 1.0, rtol=1e-6)
    inner = ~forest.is_leaf
    explained = model.explain(forest)
    np.testing.assert_allclose(explained["residual_j"][inner], residual[inner], rtol=1e-6,
                               atol=1e-12)


@pytest.mark.parametrize("strategy", ["end2end", "stepwise"])
def test_static_irene_never_reads_measured_features(small_trees, strategy):
    """Under features=model_specs every fitted number and every prediction is the same
    whatever the measured features say (mutation 4 fits on all 14 features)."""
    forest = build_forest(small_trees)
    scrambled = build_forest(small_trees)
    rng = np.random.default_rng(3)
    for name in FEATURE_SETS["resource_utilization"]:
        column = ALL_FEATURES.index(name)
        scrambled.features[:, column] = rng.permutation(scrambled.features[:, column]) * 3.0
    config = dict(feature_sets=["model_specs"], training_strategy=strategy, epochs=2,
                  show_progress=False)
    a, b = IreneModel(**config).fit(forest), IreneModel(**config).fit(scrambled)
    assert a.features_ == b.features_ == ["num_parameters", "input_size", "batch_size",
                                          "seq_len", "flops", "mem_bytes"]
    state_a, state_b = a._get_state(), b._get_state()
    assert len(state_a["weighting_weight"]) == 84  # cubic terms of 6 features
    assert state_a == state_b
    np.testing.assert_array_equal(a.predict(forest), b.predict(scrambled))
    blind = build_forest(small_trees)
    for name in FEATURE_SETS["resource_utilization"]:
        blind.features[:, ALL_FEATURES.index(name)] = np.nan  # a traced, unmeasured model
    np.testing.assert_array_equal(a.predict(blind), a.predict(forest))
    # and the measured features do change a model that is allowed to read them
    full = dict(config, feature_sets=["model_specs", "resource_utilization"])
    assert not np.array_equal(IreneModel(**full).fit(forest).predict(forest),
                              IreneModel(**full).fit(scrambled).predict(scrambled))
