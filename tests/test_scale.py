"""Work that does not depend on the fold is done once per data set, and gives what each fold
computed on its own: the polynomial expansion (same floats, in row blocks), the trees' index
arrays, IrEne+'s distinct leaf rows and its inner selection from per-model sums."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import replace

import numpy as np
import pytest

from irene.data.forest import build_forest, origin, origin_rows, shared_cache
from irene.evaluate.crossval import leave_one_model_out
from irene.predictors import irene as irene_module
from irene.predictors import treegrad
from irene.predictors.irene import IreneModel, TreeFeatures
from irene.predictors.irene_plus import (
    IrenePlusPredictor,
    _distinct_leaves,
    _leaf_rows,
    _LeafSums,
)
from irene.predictors.leaves import (
    EXPAND_ROWS,
    polynomial_expand,
    polynomial_powers,
    polynomial_transform,
)


def _expand_column_by_column(x: np.ndarray, degree: int) -> np.ndarray:
    """The expansion as it was written before: one column at a time."""
    terms = polynomial_powers(x.shape[1], degree)
    out = np.empty((len(x), len(terms)), dtype=x.dtype)
    position = {(): 0}
    out[:, 0] = 1.0
    for i, term in enumerate(terms[1:], start=1):
        out[:, i] = out[:, position[term[:-1]]] * x[:, term[-1]]
        position[term] = i
    return out


def _copies(trees: list[dict], copies: int, sigma: float = 0.05, seed: int = 0) -> list[dict]:
    """Every model ``copies`` times under new names, energies × exp(N(0, sigma²)) per node
    (sigma 0: exact copies, whose leaf rows repeat across models)."""
    rng = random.Random(seed)
    out = []
    for c in range(copies):
        for tree in trees:
            tree = copy.deepcopy(tree)
            tree["model_name"] = f"{tree['model_name']}-{c}"
            stack = [tree["frontend_tree"]]
            while stack:
                node = stack.pop()
                node["id"] = f"{c}/{node['id']}"
                if node.get("ground_truth_energy") is not None and sigma:
                    node["ground_truth_energy"] *= math.exp(rng.gauss(0.0, sigma))
                stack.extend(node["child_nodes_obj"])
            out.append(tree)
    return out


@pytest.fixture(scope="module")
def many_models(small_trees):
    """18 models: device 1's six, three times, energies perturbed."""
    return build_forest(_copies(small_trees, 3))


def _fresh(forest):
    """The same arrays with no origin and a cache of their own: what a fold computed alone."""
    return replace(forest)


# ----------------------------------------------------------------------------- expansion
@pytest.mark.parametrize("rows", [0, 1, EXPAND_ROWS - 1, EXPAND_ROWS, EXPAND_ROWS + 1, 1300])
def test_polynomial_expand_gives_the_same_floats_in_row_blocks(rows):
    rng = np.random.default_rng(rows)
    for features in (1, 4, 14):
        x = rng.standard_normal((rows, features)) * rng.uniform(1e-3, 1e6, features)
        x[rng.random(x.shape) < 0.05] = -0.0
        for degree in (1, 2, 3):
            got, expected = polynomial_expand(x, degree), _expand_column_by_column(x, degree)
            assert got.shape == expected.shape and got.tobytes() == expected.tobytes()
            assert got.flags.c_contiguous


def test_polynomial_transform_is_a_change_of_standardisation():
    rng = np.random.default_rng(3)
    for features, degree in ((1, 1), (14, 1), (3, 2), (6, 3)):
        u = rng.standard_normal((40, features))
        shift = rng.standard_normal((5, features))
        scale = rng.uniform(0.3, 3.0, (5, features))
        change = polynomial_transform(shift, scale, degree)
        for h in range(5):
            direct = polynomial_expand((u - shift[h]) / scale[h], degree)
            np.testing.assert_allclose(polynomial_expand(u, degree) @ change[h].T, direct,
                                       rtol=1e-12, atol=1e-12)
            assert np.array_equal(polynomial_transform(shift[h], scale[h], degree), change[h])


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_tree_blocks_are_the_rows_of_the_whole_expansion(degree, monkeypatch):
    rng = np.random.default_rng(degree)
    z = rng.standard_normal((2600, 14))
    z[rng.random(z.shape) < 0.03] = -0.0
    whole = polynomial_expand(z, degree) if degree > 1 else z
    bounds = [0, 1, 150, 151, 300, 300 + TreeFeatures.BLOCK_ROWS + 1, 1500, 2600]
    for held_rows in (2600, 0, 1000):  # all expanded once, none, the first 1000 rows
        monkeypatch.setattr(TreeFeatures, "WHOLE_BYTES", held_rows * whole.shape[1] * 8)
        features = TreeFeatures(z, degree)
        assert features.shape == whole.shape
        for a, b in zip(bounds, bounds[1:], strict=False):
            block = features[a:b]
            assert block.flags.c_contiguous and block.tobytes() == whole[a:b].tobytes(), (a, b)


def test_irene_training_expands_a_large_forest_one_tree_at_a_time(small_trees, monkeypatch):
    forest = build_forest(small_trees)
    expanded = []
    original = irene_module.polynomial_expand

    def recording(x, degree):
        expanded.append(len(x))
        return original(x, degree)

    monkeypatch.setattr(irene_module, "polynomial_expand", recording)
    model = IreneModel(epochs=1, show_progress=False).fit(forest)
    assert expanded == [forest.num_nodes]  # small: expanded once, sliced per tree
    expanded.clear()
    monkeypatch.setattr(TreeFeatures, "WHOLE_BYTES", 1_000_000)  # less than this forest's
    again = IreneModel(epochs=1, show_progress=False).fit(forest)
    # the rows that fit expanded once, the others one tree's block at a time (reused buffers)
    assert expanded == [1_000_000 // (680 * 8)] and expanded[0] < forest.num_nodes
    assert again.weighting_.weight.tobytes() == model.weighting_.weight.tobytes()
    expanded.clear()
    again.predict(forest)
    assert expanded == [forest.num_nodes]  # prediction: the forest it predicts, once


# ------------------------------------------------------------------------- forest origin
def test_a_subset_knows_its_data_set_and_rows(many_models):
    names = np.asarray(many_models.model_names, dtype=object)
    train = many_models.subset(names != names[0])
    inner = train.subset(np.arange(train.num_trees) % 3 == 1)
    for part in (train, inner):
        root, trees = origin(part)
        assert root is many_models
        assert [root.model_names[t] for t in trees] == part.model_names
        rows = origin_rows(part)
        assert np.array_equal(root.features[rows], part.features, equal_nan=True)
        assert [root.ids[r] for r in rows] == part.ids
        assert shared_cache(part) is shared_cache(many_models)
    alone = _fresh(train)
    assert origin(alone)[0] is alone and shared_cache(alone) is not shared_cache(many_models)


# ------------------------------------------------------------------------------- IrEne
def test_tree_index_arrays_are_computed_once_per_data_set(small_trees, monkeypatch):
    forest = build_forest(small_trees)
    computed = []
    original = treegrad._tree_indices

    def counting(source, trees):
        computed.extend(trees)
        return original(source, trees)

    monkeypatch.setattr(treegrad, "_tree_indices", counting)
    leave_one_model_out(forest, IreneModel(epochs=1, show_progress=False), show_progress=False)
    assert sorted(computed) == list(range(forest.num_trees))  # each tree once, for 6 folds


def test_irene_folds_with_shared_work_equal_folds_computed_alone(small_trees):
    forest = build_forest(small_trees)
    names = np.asarray(forest.model_names, dtype=object)
    predictor = IreneModel(epochs=2, show_progress=False)
    shared = leave_one_model_out(forest, predictor, show_progress=False)
    for left_out in dict.fromkeys(forest.model_names):
        alone = IreneModel(epochs=2, show_progress=False).fit(_fresh(forest.subset(names != left_out)))
        pred = alone.predict(_fresh(forest.subset(names == left_out)))
        assert pred.tobytes() == shared.predicted_j[forest.node_model_names() == left_out].tobytes()


# ------------------------------------------------------------------------------ IrEne+
def test_distinct_leaf_rows_of_whole_models_are_cut_from_the_data_set(small_trees):
    """Exact copies repeat every leaf row across models: the order among equal rows (by the
    model's rank) must still be the fold's own."""
    forest = build_forest(_copies(small_trees, 2, sigma=0.0) + _copies(small_trees, 1, seed=1))
    names = np.asarray(forest.model_names, dtype=object)
    models = list(dict.fromkeys(forest.model_names))
    features = IrenePlusPredictor().fit(forest).features_
    for left_out in (models[0], models[5], models[-1]):
        train = forest.subset(names != left_out)
        for op in (None, "linear", "softmax"):
            cut, own = _leaf_rows(train, features, op), _distinct_leaves(_fresh(train), features, op)
            for a, b in zip(cut, own, strict=True):
                assert a.tobytes() == b.tobytes() if a.dtype != object else list(a) == list(b)


def test_inner_selection_from_sums_equals_held_out_fits_on_the_rows(many_models):
    model = IrenePlusPredictor(feature_sets=["model_specs"], leaf_degrees=[1, 2],
                               leaf_alphas=[1e-6, 1e-2, 1.0])
    model.features_ = IrenePlusPredictor(feature_sets=["model_specs"]).fit(many_models).features_
    used = 0
    for op in ("linear", "matmul", "layernorm"):
        x, y, groups, count = _distinct_leaves(many_models, model.features_, op)
        sums = {}

        def from_sums(space, degree, x=x, y=y, groups=groups, count=count, sums=sums):
            sums[space, degree] = _LeafSums.from_rows(x, y, groups, count, space, degree)
            return sums[space, degree]

        chosen, error = model._select(x, y, groups, count, sums=from_sums)
        direct, direct_error = model._select(x, y, groups, count)
        assert chosen == direct and error == pytest.approx(direct_error, rel=1e-9), op
        used += len(sums)
    assert used >= 3  # the sums path ran (every held-out fit had enough rows)


def test_irene_plus_data_set_sums_are_computed_once(many_models, monkeypatch):
    computed = []
    original = _LeafSums.from_rows.__func__

    def counting(cls, x, y, groups, weight, space, degree):
        computed.append((len(x), space, degree))
        return original(cls, x, y, groups, weight, space, degree)

    monkeypatch.setattr(_LeafSums, "from_rows", classmethod(counting))
    folds = leave_one_model_out(many_models, IrenePlusPredictor(), show_progress=False)
    ops = len(set(many_models.op_type[many_models.is_leaf]))
    # per primitive type and form (the defaults: log and linear space, degree 1), not per fold
    assert 0 < len(computed) <= ops * 2
    assert len(folds.fold_models) == 18
    # and the folds equal folds fit alone, to rounding (their sums are their own rows')
    names = np.asarray(many_models.model_names, dtype=object)
    for left_out in list(dict.fromkeys(many_models.model_names))[::6]:
        alone = IrenePlusPredictor().fit(_fresh(many_models.subset(names != left_out)))
        fold = folds.fold_models[left_out]
        assert {op: (m.space, m.degree, m.alpha) for op, m in alone.leaf_models_.items()} == \
            {op: (m.space, m.degree, m.alpha) for op, m in fold.leaf_models_.items()}
        test = many_models.subset(names == left_out)
        np.testing.assert_allclose(fold.predict(test), alone.predict(test), rtol=1e-9)
