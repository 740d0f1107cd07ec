"""The IrEne tree model: transforms, hand-written gradients, aggregation, persistence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from irene import predictors
from irene.data.forest import build_forest, compose, feature_list
from irene.predictors.irene import STRATEGIES, WEIGHTINGS, IreneModel
from irene.predictors.leaves import LinearLeafRegressor, Standardizer, fit_leaf_regressors, polynomial_expand
from irene.predictors.treegrad import tree_indices, tree_loss_and_grad
from tests.conftest import make_tree


def test_polynomial_expand_matches_sklearn():
    from sklearn.preprocessing import PolynomialFeatures

    x = np.random.default_rng(0).normal(size=(50, 5))
    np.testing.assert_allclose(polynomial_expand(x, 3), PolynomialFeatures(3).fit_transform(x))


def test_standardizer_matches_sklearn_including_constant_columns():
    from sklearn.preprocessing import StandardScaler

    x = np.random.default_rng(1).normal(size=(40, 4))
    x[:, 2] = 7.0
    ours = Standardizer.fit(x).transform(x)
    np.testing.assert_allclose(ours, StandardScaler().fit_transform(x), atol=1e-12)


def test_leaf_regressor_recovers_a_linear_law():
    rng = np.random.default_rng(2)
    x = rng.uniform(1, 10, size=(200, 3))
    y = 0.5 * x[:, 0] - 0.2 * x[:, 2] + 3.0
    reg = LinearLeafRegressor.fit(x, y)
    np.testing.assert_allclose(reg.predict(x), y, atol=1e-9)
    again = LinearLeafRegressor.from_dict(reg.to_dict())
    np.testing.assert_array_equal(again.predict(x), reg.predict(x))


@pytest.mark.parametrize(("n", "k", "weighted"), [(60, 3, False), (60, 3, True), (200, 6, True),
                                                (5, 8, False), (1, 2, False)])
def test_leaf_regressor_equals_sklearn_linear_regression(n, k, weighted):
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(n + k)
    x = rng.lognormal(size=(n, k))
    if k > 3:
        x[:, 2] = 2 * x[:, 1]  # rank-deficient: the 1e-6 singular-value cut-off matters
    x[:, 0] = 3.0  # a constant column
    y = rng.lognormal(size=n)
    weight = 1 / y**2 if weighted else None
    ours = LinearLeafRegressor.fit(x, y, sample_weight=weight)
    z = Standardizer.fit(x).transform(x)
    reference = LinearRegression().fit(z, y, sample_weight=weight)
    np.testing.assert_allclose(ours.coef_, reference.coef_, rtol=1e-9, atol=1e-12)
    assert ours.intercept_ == pytest.approx(reference.intercept_, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(ours.predict(x), reference.predict(z), rtol=1e-9)


def test_aggregate_weighted_sums_level_by_level():
    forest = build_forest([make_tree()])  # pre-order: root, block, linear, matmul, norm
    leaf = np.array([0.0, 0.0, 1.0, 0.5, 0.25])
    weights = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    values = compose(forest, leaf, weights)
    block = 3 * 1.0 + 4 * 0.5
    assert values[1].item() == pytest.approx(block)
    assert values[0].item() == pytest.approx(2 * block + 5 * 0.25)


@pytest.mark.parametrize(("strategy", "weighting"),
                         [(s, w) for s in ("end2end", "stepwise", "unstructured")
                          for w in ("close_to_one", "free")])
def test_numpy_gradient_equals_autograd(small_trees, strategy, weighting):
    forest = build_forest(small_trees[:3])
    config = dict(training_strategy=strategy, weighting=weighting, show_progress=False)
    model = IreneModel(**config)
    model.features_ = feature_list(model.feature_sets)
    x = forest.matrix(model.features_)
    model.leaf_models_ = fit_leaf_regressors(forest, x)
    leaf = model._predict_leaves(forest, x)[0]
    model.node_scaler_ = Standardizer.fit(x)
    xt = model._transform(x)
    torch.manual_seed(0)
    from irene.predictors.irene_torch import WeightingModel, tree_loss

    module = WeightingModel(xt.shape[1], weighting, 10.0).double()
    with torch.no_grad():
        module.linear.weight.mul_(3.0)  # away from w ≈ 1 so every term matters
    theta = np.append(module.linear.weight.detach().numpy().ravel(),
                      module.linear.bias.detach().numpy())
    gold = np.nan_to_num(forest.gold_j)
    tree = tree_indices(forest)[1]
    rows = slice(tree.start, tree.stop)
    loss, grad = tree_loss_and_grad(theta, xt[rows], leaf[rows], gold[rows], tree,
                                    strategy=strategy, weighting=weighting, tanh_scalar=10.0,
                                    normalize=True)
    loss_t = tree_loss(module, strategy, True, tree, torch.from_numpy(xt[rows]),
                       torch.from_numpy(leaf[rows]), torch.from_numpy(gold[rows]))
    loss_t.backward()
    grad_t = np.append(module.linear.weight.grad.numpy().ravel(),
                       module.linear.bias.grad.numpy())
    assert loss == pytest.approx(loss_t.item(), rel=1e-9)
    np.testing.assert_allclose(grad, grad_t, rtol=1e-7, atol=1e-12)
    assert np.abs(grad).max() > 0


def test_none_strategy_is_the_exact_sum_of_children(small_trees):
    forest = build_forest(small_trees)
    model = IreneModel(training_strategy="none", show_progress=False).fit(forest)
    pred = model.predict(forest)
    sums = np.bincount(forest.parent[forest.parent >= 0], weights=pred[forest.parent >= 0],
                       minlength=forest.num_nodes)
    inner = ~forest.is_leaf
    np.testing.assert_allclose(pred[inner], sums[inner], rtol=1e-6)


@pytest.mark.parametrize(("strategy", "weighting"), list(itertools.product(STRATEGIES, WEIGHTINGS)))
def test_every_strategy_and_weighting_runs(small_trees, strategy, weighting):
    forest = build_forest(small_trees)
    config = dict(training_strategy=strategy, weighting=weighting, epochs=2,
                         show_progress=False)
    pred = IreneModel(**config).fit(forest).predict(forest)
    assert pred.shape == (forest.num_nodes,) and np.isfinite(pred).all()


@pytest.mark.parametrize("feature_sets", [["model_specs"], ["resource_utilization"],
                                          ["model_specs", "resource_utilization"]])
def test_every_feature_set_runs_and_uses_only_its_features(small_trees, feature_sets):
    forest = build_forest(small_trees)
    model = IreneModel(feature_sets=feature_sets, epochs=1, show_progress=False)
    model.fit(forest)
    assert model.features_ == feature_list(feature_sets)
    if feature_sets == ["model_specs"]:
        assert "gpu_energy_mean" not in model.features_
    assert np.isfinite(model.predict(forest)).all()


def test_training_reduces_the_loss(small_trees):
    forest = build_forest(small_trees)
    model = IreneModel(epochs=8, show_progress=False).fit(forest)
    assert model.history_[-1] < model.history_[0]


def test_save_load_gives_identical_predictions(small_trees, tmp_path):
    forest = build_forest(small_trees)
    model = IreneModel(epochs=2, show_progress=False).fit(forest)
    model.save(tmp_path / "m")
    loaded = predictors.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict(forest), model.predict(forest))
    assert not list((tmp_path / "m").glob("*.pkl"))
    listed = {k: list(v) if isinstance(v, tuple) else v for k, v in model.get_params().items()}
    assert isinstance(loaded, IreneModel) and loaded.get_params() == listed


def test_unseen_primitive_policy(small_trees):
    forest = build_forest(small_trees)
    model = IreneModel(epochs=1, show_progress=False).fit(forest)
    strange = make_tree()
    strange["frontend_tree"]["child_nodes_obj"][1]["instance_type"] = "FancyNorm"
    target = build_forest([strange])
    with pytest.raises(ValueError, match="'fancynorm'.*never seen"):
        model.predict(target)
    model.unseen_op = "layernorm"
    pred, fallback = model.predict(target, return_fallback=True)
    assert fallback.sum() == 1 and np.isfinite(pred).all()


def test_unfitted_and_bad_options_fail_clearly(small_trees):
    with pytest.raises(RuntimeError, match="not fitted"):
        IreneModel().predict(build_forest(small_trees))
    with pytest.raises(ValueError, match="choose from"):
        IreneModel(weighting="nearly_one").fit(build_forest(small_trees))
