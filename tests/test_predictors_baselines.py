"""Baseline predictors: physics, flat, sum_of_children (irene/predictors/baselines.py)."""

from __future__ import annotations

import numpy as np
import pytest

from irene import predictors
from irene.data.forest import ALL_FEATURES, build_forest, compose
from irene.evaluate.crossval import leave_one_model_out
from irene.predictors.baselines import (
    FlatPredictor,
    LogPolyRegressor,
    PhysicsPredictor,
    SumOfChildrenPredictor,
)
from tests.conftest import make_tree

FULL: dict = {}
STATIC = {"feature_sets": ["model_specs"]}


def _physics_forest(a: float, b: float):
    """Toy trees whose every energy is exactly a·gpu_energy_mean + b·times_mean."""
    rng = np.random.default_rng(0)
    forest = build_forest([make_tree(model=f"m{i}", scale=s)
                           for i, s in enumerate(rng.uniform(0.5, 4.0, size=6))])
    g = rng.uniform(0.1, 2.0, forest.num_nodes)
    t = rng.uniform(1e-3, 1e-2, forest.num_nodes)
    forest.features[:, ALL_FEATURES.index("gpu_energy_mean")] = g
    forest.features[:, ALL_FEATURES.index("times_mean")] = t
    forest.gold_j = a * g + b * t
    return forest


def test_physics_recovers_both_parameters():
    forest = _physics_forest(a=1.3, b=55.0)
    model = PhysicsPredictor(**FULL).fit(forest)
    np.testing.assert_allclose(model.coef_["all"], [1.3, 55.0], rtol=1e-8)
    np.testing.assert_allclose(model.predict(forest), forest.gold_j, rtol=1e-8)
    by_type = PhysicsPredictor(**FULL, by_node_type=True).fit(forest)
    np.testing.assert_allclose(by_type.predict(forest), forest.gold_j, rtol=1e-8)


def test_physics_refuses_static_features(small_trees):
    with pytest.raises(ValueError, match="needs the features.*gpu_energy_mean"):
        PhysicsPredictor(**STATIC).fit(build_forest(small_trees))


def test_physics_is_accurate_on_device_data(small_trees):
    forest = build_forest(small_trees)
    result = leave_one_model_out(forest, PhysicsPredictor(**FULL), show_progress=False)
    assert result.table.loc["overall"].max() < 2.0, result.table


def test_sum_of_children_predicts_exact_sums(small_trees):
    forest = build_forest(small_trees)
    pred = SumOfChildrenPredictor(**STATIC).fit(forest).predict(forest)
    sums = np.bincount(forest.parent[forest.parent >= 0], weights=pred[forest.parent >= 0],
                       minlength=forest.num_nodes)
    inner = ~forest.is_leaf
    np.testing.assert_allclose(pred[inner], sums[inner], rtol=1e-12)


def test_sum_of_children_equals_irene_strategy_none(small_trees):
    from irene.predictors.irene import IreneModel

    forest = build_forest(small_trees)
    reference = IreneModel(feature_sets=["model_specs"], training_strategy="none",
                           show_progress=False).fit(forest).predict(forest)  # float32 sums
    np.testing.assert_allclose(SumOfChildrenPredictor(**STATIC).fit(forest).predict(forest),
                               reference, rtol=1e-5)


def test_compose_weighted_sums_with_own_terms():
    forest = build_forest([make_tree()])  # pre-order: root, block, linear, matmul, norm
    own = np.array([0.5, 0.25, 1.0, 2.0, 4.0])
    weight = np.array([1.0, 2.0, 3.0, 1.0, 0.5])
    # block = 0.25 + 3·1 + 1·2 = 5.25; root = 0.5 + 2·5.25 + 0.5·4 = 13
    np.testing.assert_allclose(compose(forest, own, weight), [13.0, 5.25, 1.0, 2.0, 4.0])


def test_flat_uses_only_its_own_features_and_ignores_the_tree(small_trees):
    forest = build_forest(small_trees)
    model = FlatPredictor(**STATIC).fit(forest)
    assert "gpu_energy_mean" not in model.features_
    pred = model.predict(forest)
    # changing a child's features must not change its parent's prediction
    other = build_forest(small_trees)
    flops = ALL_FEATURES.index("flops")
    leaf = int(np.flatnonzero(other.is_leaf & (other.features[:, flops] > 0))[0])
    other.features[leaf, ALL_FEATURES.index("flops")] *= 10
    changed = model.predict(other)
    assert changed[leaf] != pred[leaf]
    np.testing.assert_array_equal(changed[other.parent[leaf]], pred[other.parent[leaf]])


@pytest.mark.parametrize("space", ["log", "linear"])
def test_log_poly_regressor_recovers_its_law(space):
    rng = np.random.default_rng(1)
    x = rng.uniform(1.0, 1000.0, size=(200, 2))
    if space == "log":  # a power law in log1p(x)
        y = 0.01 * np.exp(0.7 * np.log1p(x[:, 0]) + 0.2 * np.log1p(x[:, 1]))
    else:
        y = 0.003 * x[:, 0] + 0.02 * x[:, 1] + 0.5
    model = LogPolyRegressor.fit(x, y, degree=1, alpha=0.0, space=space)
    np.testing.assert_allclose(model.predict(x), y, rtol=1e-8)
    again = LogPolyRegressor.from_dict(model.to_dict())
    np.testing.assert_array_equal(again.predict(x), model.predict(x))


@pytest.mark.parametrize(("name", "config"), [("physics", FULL), ("flat", STATIC),
                                              ("flat", FULL), ("sum_of_children", STATIC)])
def test_save_load_round_trip_through_the_registry(small_trees, tmp_path, name, config):
    forest = build_forest(small_trees)
    model = predictors.classes()[name](**config).fit(forest)
    model.save(tmp_path / name)
    assert not list((tmp_path / name).glob("*.pkl"))
    loaded = predictors.load(tmp_path / name)
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.predict(forest), model.predict(forest))
    pred, fallback = loaded.predict(forest, return_fallback=True)
    assert pred.shape == fallback.shape == (forest.num_nodes,) and not fallback.any()


def test_estimator_contract_params_clone_and_unknown_ones():
    from sklearn.base import clone

    model = predictors.classes()["flat"](**STATIC, space="log", degree=2)
    assert (model.space, model.degree) == ("log", 2)
    assert model.get_params()["space"] == "log"
    copy = clone(model).set_params(degree=3)
    assert (copy.degree, model.degree) == (3, 2)
    with pytest.raises(TypeError, match="colour"):
        predictors.classes()["flat"](colour="red")
    with pytest.raises(ValueError, match=r"predictor.space='cubic': choose from"):
        predictors.classes()["flat"](space="cubic").validate_params()


@pytest.mark.parametrize("cls", [PhysicsPredictor, FlatPredictor, SumOfChildrenPredictor])
def test_unfitted_predictors_fail_clearly(small_trees, cls):
    with pytest.raises(RuntimeError, match="not fitted"):
        cls(**FULL).predict(build_forest(small_trees))
