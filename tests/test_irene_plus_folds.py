"""IrEne+'s fast paths equal the computations they replace (issue 20, item 7): the inner
model's design built once per fit from the edges into its rows, its bounded least squares
solved on the triangle of its rows, and the data set's distinct leaf rows."""

from __future__ import annotations

import numpy as np
import pytest

from irene.data.forest import children_sum
from irene.predictors.irene_plus import (
    IrenePlusPredictor,
    _bounded_relative_lstsq,
    _distinct,
    _InnerDesign,
    _node_kinds,
    _others,
    _predict_leaves,
    _rows_by_model,
    _solve_like_lstsq,
    _triangle,
)
from irene.predictors.leaves import measured, predict_leaves, relative_lstsq


def test_inner_design_equals_a_children_sum_per_kind(small_forest):
    """The design's kind columns are the same floats as Σ children of each kind computed over
    the whole forest, and its residual columns are the rows' own."""
    forest = small_forest
    model = IrenePlusPredictor(feature_sets=["model_specs"])
    model.features_ = ["num_parameters", "input_size", "batch_size", "seq_len", "flops",
                       "mem_bytes"]
    model.extra_features_ = ["flops", "mem_bytes"]
    names, code = _node_kinds(forest)
    kinds = [str(names[c]) for c in np.unique(code[forest.parent >= 0])]
    targets = ~forest.is_leaf & measured(forest)
    residual = model._residual_design(forest)
    design = _InnerDesign(forest, targets, code, names, kinds, residual)
    values = np.random.default_rng(0).lognormal(size=forest.num_nodes)
    position = {str(name): j for j, name in enumerate(names)}
    expected = np.column_stack(
        [children_sum(forest, np.where(code == position[k], values, 0.0)) for k in kinds]
        + [residual])[targets]
    assert np.array_equal(design.columns(values), expected)
    assert len(kinds) >= 5 and targets.sum() > 100


@pytest.mark.parametrize("seed", range(6))
def test_bounded_least_squares_on_the_triangle_equals_the_rows(seed):
    """Random relative-error problems whose bounds bind: the triangle's solution is the rows'
    to 1e-10, and some coefficients sit on their bound."""
    rng = np.random.default_rng(seed)
    n, k = 400, 7
    design = rng.lognormal(size=(n, k))
    truth = rng.normal(1.0, 0.3, size=k)
    truth[:2] = -0.4  # two columns that want a negative weight, bounded at 0
    target = np.abs(design @ truth + 3.0 * rng.lognormal(size=n)) + 0.1
    lower = np.zeros(k)
    lower[k - 1] = -np.inf
    prior = np.concatenate([np.ones(k - 2), np.zeros(2)])
    for ridge in (1e-3, 1e-1):
        fast = _bounded_relative_lstsq(design, target, lower=lower, ridge=ridge, prior=prior)
        slow = relative_lstsq(design, target, lower=lower, ridge=ridge, prior=prior)
        np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-12)
        assert np.all(fast >= lower)
    assert np.any(fast[:k - 1] == 0.0)


def test_inner_fit_equals_the_fit_on_the_rows(small_forest, monkeypatch):
    """The whole inner model (every refit) fitted on the triangle equals it fitted on the rows."""
    import irene.predictors.irene_plus as plus

    fast = IrenePlusPredictor().fit(small_forest)
    monkeypatch.setattr(plus, "_bounded_relative_lstsq",
                        lambda design, target, **kw: relative_lstsq(design, target, **kw))
    slow = IrenePlusPredictor().fit(small_forest)
    np.testing.assert_allclose(fast.child_weights_, slow.child_weights_, rtol=1e-10)
    np.testing.assert_allclose(fast.residual_coef_, slow.residual_coef_, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(fast.predict(small_forest), slow.predict(small_forest), rtol=1e-10)


@pytest.mark.parametrize("noise", [1e-1, 1e-3, 1e-9])
def test_triangle_solves_least_squares_like_householder(noise):
    """R of :func:`_triangle` gives the least-squares solution of the rows to 1e-10 relative
    (two nearly collinear columns); where Cholesky QR would be inaccurate (1e-9) it is
    Householder's."""
    rng = np.random.default_rng(1)
    n, k = 3000, 6
    a = rng.lognormal(size=(n, k))
    a[:, 3] = a[:, 2] + noise * rng.normal(size=n)
    b = a @ rng.normal(size=k) + rng.normal(size=n)
    rows = np.column_stack([a, b])
    triangle = _triangle(rows)
    if noise < 1e-5:  # Householder's own triangle
        assert np.array_equal(triangle, np.linalg.qr(rows, mode="r"))
        return
    assert np.allclose(triangle, np.triu(triangle))
    fast = np.linalg.solve(triangle[:k, :k], triangle[:k, k])
    exact = np.linalg.solve(np.linalg.qr(a, mode="r"), np.linalg.qr(a)[0].T @ b)
    np.testing.assert_allclose(fast, exact, rtol=1e-10, atol=1e-10 * np.abs(exact).max())


def test_stacked_solve_equals_lstsq_and_falls_back_on_singular_systems():
    """Well-conditioned systems: lstsq's solution to rounding; a singular one (the ridge
    strength 0 of a rank-deficient Gram matrix): lstsq's minimum-norm solution exactly."""
    rng = np.random.default_rng(2)
    w = 5
    rows = rng.normal(size=(4, 3, 40, w))
    rows[1, 2, :, 4] = rows[1, 2, :, 3]  # a repeated column: singular Gram matrix
    system = np.einsum("...ni,...nj->...ij", rows, rows)
    rhs = rng.normal(size=(4, 3, w))
    out = _solve_like_lstsq(system, rhs)
    for i in range(4):
        for j in range(3):
            expected = np.linalg.lstsq(system[i, j], rhs[i, j], rcond=None)[0]
            if (i, j) == (1, 2):
                assert np.array_equal(out[i, j], expected)
            else:
                np.testing.assert_allclose(out[i, j], expected, rtol=1e-10, atol=1e-12)


def test_others_equals_reducing_the_rows_left_after_deleting_each():
    values = np.random.default_rng(3).normal(size=(7, 4))
    for reduce, name in ((np.minimum, "min"), (np.maximum, "max")):
        expected = np.stack([getattr(np.delete(values, j, axis=0), name)(axis=0)
                             for j in range(len(values))])
        assert np.array_equal(_others(reduce, values), expected)
        assert np.array_equal(_others(reduce, values[:2]), values[:2][::-1])


def test_leaf_predictions_by_code_equal_predict_leaves(small_forest):
    """The same values and fallback marks as :func:`predict_leaves`, in a fold cut from the
    data set and with a primitive type unseen in training (the op-agnostic fallback)."""
    names = np.asarray(small_forest.model_names, dtype=object)
    fold = small_forest.subset(names != small_forest.model_names[0])
    model = IrenePlusPredictor(feature_sets=["model_specs"]).fit(fold)
    models = {op: m for op, m in model.leaf_models_.items() if op != "softmax"}
    for forest in (small_forest, fold):
        x = forest.matrix(model.features_)
        args = (forest, x, models, lambda op: model.global_leaf_model_, "hint")
        pred, fallback = _predict_leaves(*args)
        expected, expected_fallback = predict_leaves(*args)
        assert pred.tobytes() == expected.tobytes()
        assert np.array_equal(fallback, expected_fallback) and fallback.any()
    with pytest.raises(Exception, match="softmax.*never seen in training.*hint"):
        _predict_leaves(fold, fold.matrix(model.features_), models, lambda op: None, "hint")


def _distinct_by_records(x, energy_j, groups):
    """:func:`_distinct` as it was written before: ``np.unique`` of the rows as records."""
    codes = np.unique(groups, return_inverse=True)[1]
    key = np.column_stack([x, energy_j, codes])
    _, first, counts = np.unique(key, axis=0, return_index=True, return_counts=True)
    return x[first], energy_j[first], groups[first], counts.astype(np.float64)


def test_distinct_rows_equal_unique_of_the_rows_as_records(device_forest):
    """Repeated rows, rows equal but for the energy or the model, negative and zero values:
    the same rows, order, models and counts as ``np.unique(axis=0)``."""
    rng = np.random.default_rng(4)
    x = rng.integers(-2, 3, size=(500, 3)).astype(float)
    energy = rng.integers(1, 3, size=500).astype(float)
    groups = rng.choice(np.array(["b", "a", "c"], dtype=object), size=500)
    forest = device_forest
    rows = np.flatnonzero(forest.is_leaf & measured(forest))
    published = (forest.matrix(["flops", "mem_bytes", "batch_size"], rows), forest.gold_j[rows],
                 forest.node_model_names()[rows])
    for args in ((x, energy, groups), published):
        got, expected = _distinct(*args), _distinct_by_records(*args)
        assert len(got[0]) < len(args[0])  # rows did repeat
        for a, b in zip(got, expected, strict=True):
            assert a.tobytes() == b.tobytes() if a.dtype != object else list(a) == list(b)


def test_rows_by_model_in_the_order_models_first_occur():
    groups = np.random.default_rng(5).choice(np.array(["m3", "m1", "m2"], dtype=object), 200)
    expected = {name: np.flatnonzero(groups == name) for name in dict.fromkeys(groups)}
    for codes in (None, np.unique(groups, return_inverse=True)[1] * 7 + 2):
        got = _rows_by_model(groups, codes)
        assert list(got) == list(expected)
        assert all(np.array_equal(got[name], rows) for name, rows in expected.items())
