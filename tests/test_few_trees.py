"""IrEne+ fitted on one to four of the H200 trees (datasets/h200: eight models, one shape
each) either refuses in one line or predicts the root of every other H200 tree within a
factor of 3 (issue 19, item 6)."""

from __future__ import annotations

import warnings
from itertools import combinations

import numpy as np
import pytest

from irene.data.forest import build_forest
from irene.data.tree import read_trees
from irene.errors import TooFewTreesError
from irene.measure.leakage import LeakedTargetError, check_no_leaked_target
from irene.predictors.irene_plus import MIN_TREES, IrenePlusPredictor
from irene.transfer import static_predictor

from .conftest import H200_TREES

MAX_ROOT_RATIO = 3.0


@pytest.fixture(scope="module")
def h200():
    trees = read_trees(H200_TREES)
    return trees, build_forest(trees)


def _root_ratios(predictor, forest, chosen: tuple[int, ...]) -> np.ndarray:
    """pred / gold of the roots of the trees not in ``chosen``, fitted on ``chosen``."""
    train = np.zeros(forest.num_trees, dtype=bool)
    train[list(chosen)] = True
    predictor.fit(forest.subset(train))
    test = forest.subset(~train)
    pred = np.asarray(predictor.predict(test))[test.offsets[:-1]]
    return pred / test.gold_j[test.offsets[:-1]]


def test_static_irene_plus_refuses_one_tree_and_stays_within_3x_on_two_to_four(h200):
    _, forest = h200
    assert forest.num_trees == 8 and len(set(forest.model_names)) == 8
    worst = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero (or any other) warning on the way
        for k in range(1, 5):
            for chosen in combinations(range(forest.num_trees), k):
                if k < MIN_TREES:
                    with pytest.raises(TooFewTreesError) as error:
                        _root_ratios(static_predictor(), forest, chosen)
                    message = str(error.value)
                    assert "\n" not in message
                    assert message == (f"IrEne+ needs measured trees of at least {MIN_TREES} "
                                       f"configurations to fit; got {k}")
                    continue
                ratio = _root_ratios(static_predictor(), forest, chosen)
                assert np.all(ratio > 0), chosen
                worst[chosen] = float(np.max(np.maximum(ratio, 1.0 / ratio)))
    assert len(worst) == 28 + 56 + 70  # every subset of 2, 3 and 4 trees was fitted
    assert max(worst.values()) < MAX_ROOT_RATIO, max(worst, key=worst.get)


def test_default_irene_plus_is_refused_on_the_h200_trees(h200):
    """The default IrEne+ reads gpu_energy_mean, which on these trees is the target itself (one
    meter): the leakage rule refuses its feature sets on them, and one tree is too few."""
    trees, forest = h200
    with pytest.raises(LeakedTargetError) as error:
        check_no_leaked_target(trees, IrenePlusPredictor().feature_sets, H200_TREES)
    assert "\n" not in str(error.value) and "gpu_energy_mean" in str(error.value)
    check_no_leaked_target(trees, ["model_specs"], H200_TREES)  # the static features pass
    for tree in range(forest.num_trees):
        with pytest.raises(TooFewTreesError):
            _root_ratios(IrenePlusPredictor(), forest, (tree,))


def test_a_data_set_without_measured_nodes_keeps_its_own_error(h200):
    _, forest = h200
    from dataclasses import replace

    empty = replace(forest, gold_j=np.full(forest.num_nodes, np.nan))
    with pytest.raises(ValueError, match="no measured leaf") as error:
        static_predictor().fit(empty)
    assert not isinstance(error.value, TooFewTreesError)
