"""Settings that name nothing real are refused in one line, even where they would change nothing."""

from __future__ import annotations

import pytest

from irene import predictors
from irene.data.forest import build_forest
from irene.errors import SettingsError
from irene.predictors.static import predict_with_policy


@pytest.fixture(scope="module")
def fitted(small_trees):
    forest = build_forest(small_trees[:6])
    return predictors.IrenePlusPredictor(feature_sets=["model_specs"], leaf_degrees=[1]).fit(
        forest), forest


@pytest.mark.parametrize("policy", ["../../x", "NoSuchOp", "/etc/passwd"])
def test_unseen_op_that_is_no_known_primitive_is_refused_even_with_nothing_unseen(fitted, policy):
    predictor, forest = fitted  # the training forest itself: no primitive type is unseen
    with pytest.raises(SettingsError, match=r"is not a primitive type the predictor knows"):
        predict_with_policy(predictor, forest, policy)


@pytest.mark.parametrize("policy", [None, "error", "ERROR", "linear", "LayerNorm"])
def test_valid_unseen_op_policies_predict(fitted, policy):
    predictor, forest = fitted
    predicted, fallback = predict_with_policy(predictor, forest, policy)
    assert predicted.shape == (forest.num_nodes,) and not fallback.any()
