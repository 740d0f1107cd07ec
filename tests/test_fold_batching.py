"""IreneModel.fit_folds trains the folds of a cross-validation together; each fold equals its
own fit to rounding."""

from __future__ import annotations

import numpy as np
import pytest

from irene.evaluate.crossval import leave_one_model_out
from irene.predictors.base import clone
from irene.predictors.irene import IreneModel
from irene.predictors.treegrad import (
    Adam,
    BatchedAdam,
    DistinctRows,
    batched_tree,
    batched_tree_loss_and_grad,
    tree_indices,
    tree_loss_and_grad,
)


def _masks(forest):
    names = np.asarray(forest.model_names, dtype=object)
    return names, [names != m for m in dict.fromkeys(forest.model_names)]


@pytest.mark.parametrize("params", [
    {},
    {"weighting": "free"},
    {"training_strategy": "unstructured"},
    {"training_strategy": "stepwise"},  # fold by fold
    {"engine": "numpy", "polynomial_degree": 1},  # fold by fold
])
def test_fit_folds_equals_one_fit_per_fold(small_forest, params):
    predictor = IreneModel(show_progress=False, **params)
    names, masks = _masks(small_forest)
    together = predictor.fit_folds(small_forest, masks)
    assert len(together) == len(masks)
    for mask, fitted in zip(masks, together, strict=True):
        alone = clone(predictor).fit(small_forest.subset(mask))
        test = small_forest.subset(~mask)
        np.testing.assert_allclose(fitted.predict(test), alone.predict(test), rtol=1e-6)
        np.testing.assert_allclose(fitted.history_, alone.history_, rtol=1e-9)
        np.testing.assert_allclose(fitted.weighting_.weight, alone.weighting_.weight,
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(fitted.node_scaler_.mean_, alone.node_scaler_.mean_,
                                   rtol=1e-13)
        assert sorted(fitted.leaf_models_) == sorted(alone.leaf_models_)
    assert predictor.fit_folds(small_forest, []) == []


def test_folds_of_other_shapes_train_only_on_their_trees(small_forest):
    """Masks need not be leave-one-model-out: any subsets of the trees, overlapping."""
    rng = np.random.default_rng(3)
    masks = [rng.random(small_forest.num_trees) < 0.6 for _ in range(3)]
    predictor = IreneModel(show_progress=False, epochs=2)
    together = predictor.fit_folds(small_forest, masks)
    for mask, fitted in zip(masks, together, strict=True):
        alone = clone(predictor).fit(small_forest.subset(mask))
        np.testing.assert_allclose(fitted.predict(small_forest), alone.predict(small_forest),
                                   rtol=1e-6)


def test_leave_one_model_out_together_gives_the_same_table(small_forest):
    calls = []

    class Spy(IreneModel):
        def fit_folds(self, forest, train_masks):
            calls.append(len(train_masks))
            return super().fit_folds(forest, train_masks)

    together = leave_one_model_out(small_forest, Spy(show_progress=False),
                                   show_progress=False, together=True)
    assert calls == [len(set(small_forest.model_names))]
    alone = leave_one_model_out(small_forest, Spy(show_progress=False), show_progress=False)
    assert len(calls) == 1  # fold by fold unless asked
    np.testing.assert_allclose(together.predicted_j, alone.predicted_j, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(together.grid.rows), np.asarray(alone.grid.rows),
                               rtol=1e-6)


def _tree_case(forest, rng, width, folds, x=None):
    """The largest tree of ``forest`` with random features (or ``x``), weights, biases and
    leaf predictions of ``folds`` columns, and its measured energies."""
    tree = max(tree_indices(forest), key=lambda t: t.stop - t.start)
    n = tree.stop - tree.start
    x = rng.standard_normal((n, width)) if x is None else x(n)
    weights, bias = rng.standard_normal((width, folds)) * 0.1, rng.standard_normal(folds) * 0.1
    leaf_pred = np.where(tree.is_leaf[:, None], rng.random((n, folds)), 0.0)
    gold = np.nan_to_num(forest.gold_j[tree.start:tree.stop], nan=0.0)
    return tree, x, weights, bias, leaf_pred, gold


@pytest.mark.parametrize("strategy", ["end2end", "stepwise", "unstructured"])
def test_batched_loss_and_gradient_are_the_per_column_ones(small_forest, strategy):
    rng = np.random.default_rng(0)
    folds = 3
    tree, x, weights, bias, leaf_pred, gold = _tree_case(small_forest, rng, 12, folds)
    loss, grad_w, grad_b = batched_tree_loss_and_grad(
        x, weights, bias, leaf_pred, gold, batched_tree(tree), strategy=strategy,
        weighting="close_to_one", tanh_scalar=10.0, normalize=True)
    for f in range(folds):
        one_loss, one_grad = tree_loss_and_grad(
            np.append(weights[:, f], bias[f]), x, leaf_pred[:, f], gold, tree,
            strategy=strategy, weighting="close_to_one", tanh_scalar=10.0, normalize=True)
        assert loss[f] == pytest.approx(one_loss, rel=1e-12)
        np.testing.assert_allclose(np.append(grad_w[:, f], grad_b[f]), one_grad, rtol=1e-10,
                                   atol=1e-14 * np.abs(one_grad).max())


@pytest.mark.parametrize("strategy", ["end2end", "stepwise", "unstructured"])
def test_distinct_rows_give_the_loss_and_gradient_of_every_row(small_forest, strategy):
    """A tree whose rows repeat (identical layers) computed on its distinct rows only."""
    rng = np.random.default_rng(2)
    patterns = rng.standard_normal((7, 9))
    # 7 distinct rows, repeated in a random order
    tree, x, weights, bias, leaf_pred, gold = _tree_case(
        small_forest, rng, 9, 4, x=lambda n: patterns[rng.integers(0, 7, n)])
    kept, distinct = DistinctRows.of(x)
    assert len(kept) == len(np.unique(x, axis=0)) <= 7
    assert list(kept) == sorted(kept) and kept[0] == 0  # first copies, in row order
    np.testing.assert_array_equal(x[kept][distinct.inverse], x)
    args = dict(strategy=strategy, weighting="close_to_one", tanh_scalar=10.0, normalize=True)
    every = batched_tree_loss_and_grad(x, weights, bias, leaf_pred, gold, batched_tree(tree),
                                       **args)
    fewer = batched_tree_loss_and_grad(x[kept], weights, bias, leaf_pred, gold,
                                       batched_tree(tree), distinct=distinct, **args)
    for a, b in zip(every, fewer, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14 * np.abs(a).max())


def test_batched_adam_is_one_adam_per_row():
    rng = np.random.default_rng(1)
    params = rng.standard_normal((3, 5))
    batched = BatchedAdam(params.copy(), lr=1e-2)
    singles = [Adam(row.copy(), lr=1e-2) for row in params]
    for step in range(40):
        active = np.array([(step + r) % 3 > 0 for r in range(3)])  # rows skip steps
        grads = rng.standard_normal((3, 5))
        batched.step(active, grads)
        for r in np.flatnonzero(active):
            singles[r].step(grads[r])
    for r, single in enumerate(singles):
        np.testing.assert_allclose(batched.params[r], single.params, rtol=1e-13)


def test_tree_moments_give_each_set_of_trees_its_standardizer():
    from irene.predictors.irene import _TreeMoments
    from irene.predictors.leaves import Standardizer

    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 40, 12)
    offsets = np.r_[0, np.cumsum(sizes)]
    x = rng.standard_normal((offsets[-1], 4)) * [1.0, 1e3, 1e-4, 1.0] + [0.0, 5e4, 1.0, 0.0]
    x[:, 3] = 0.3  # constant: 0.3 is not a binary fraction, its mean by a sum need not be 0.3
    tree = np.repeat(np.arange(len(sizes)), sizes)
    x[tree == 2, 0] = 7.0  # a column constant in one tree only
    moments = _TreeMoments(x, offsets)
    for mask in [np.ones(12, bool), rng.random(12) < 0.5, np.arange(12) == 2]:
        mask[0] |= not mask.any()
        rows = x[mask[tree]]
        combined, direct = moments.standardizer(mask), Standardizer.fit(rows)
        np.testing.assert_allclose(combined.mean_, direct.mean_, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(combined.scale_, direct.scale_, rtol=1e-9)
        assert combined.mean_[3] == 0.3 and combined.scale_[3] == 1.0
        assert np.all(combined.transform(rows)[:, 3] == 0.0)  # exactly 0, not a rounding residue
    alone = moments.standardizer(np.arange(12) == 2)
    assert alone.mean_[0] == 7.0 and alone.scale_[0] == 1.0


def test_folds_trained_in_two_threads_are_the_folds_trained_in_one(small_forest, monkeypatch):
    from threadpoolctl import threadpool_limits

    import irene.predictors.irene as irene_module

    names, masks = _masks(small_forest)
    model = IreneModel(epochs=2, show_progress=False)
    with threadpool_limits(limits=1, user_api="blas"):
        monkeypatch.setattr(irene_module, "MIN_FOLDS_PER_THREAD", 1)
        one = model._fit_folds(small_forest, masks, workers=1)
        two = model._fit_folds(small_forest, masks, workers=2)
    # the same arithmetic per fold; BLAS may round a product of fewer columns otherwise
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a.weighting_.weight, b.weighting_.weight, rtol=1e-6,
                                   atol=1e-9)
        np.testing.assert_allclose(a.history_, b.history_, rtol=1e-9)
        np.testing.assert_allclose(a.predict(small_forest), b.predict(small_forest), rtol=1e-9)
