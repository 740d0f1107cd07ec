"""Metrics (irene/evaluate/metrics.py) and the cross-validation table, on numbers worked out by
hand: % error per node, per node type, per model, per primitive; NaN is never averaged away."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from irene.data.forest import build_forest
from irene.errors import InputError, NonFiniteResultError
from irene.evaluate.crossval import leave_one_model_out
from irene.evaluate.metrics import (
    align_predictions,
    error_tables,
    errors_by_node_type,
    node_errors,
    percentage_errors,
)
from irene.predictors.base import Predictor
from tests.conftest import make_tree

# make_tree's pre-order: root (3.0 J), block (2.0), linear (1.0), matmul (0.5), norm (0.25)
GOLD = np.array([3.0, 2.0, 1.0, 0.5, 0.25])


def test_percentage_error_is_relative_to_the_measurement():
    np.testing.assert_array_equal(percentage_errors(np.array([2.0, 4.0, 0.5]),
                                                    np.array([1.0, 5.0, 0.5])), [50.0, 25.0, 0.0])


def test_node_errors_and_means_per_node_type():
    forest = build_forest([make_tree()])
    predicted = np.array([3.3, 1.0, 1.1, 0.25, 0.3])
    frame = node_errors(forest, predicted)
    assert frame["node_type"].tolist() == ["model", "module", "ml", "ml", "ml"]
    assert frame["instance_type"].tolist() == ["ToyModel", "Block", "Linear", "MatMul", "LayerNorm"]
    np.testing.assert_allclose(frame["error_pct"], [10.0, 50.0, 10.0, 50.0, 20.0])
    errors = errors_by_node_type(forest, predicted)
    assert list(errors) == ["ml", "module", "model"]
    assert errors == pytest.approx({"ml": (10.0 + 50.0 + 20.0) / 3, "module": 50.0, "model": 10.0})


def test_unmeasured_nodes_are_not_scored():
    tree = make_tree()
    tree["frontend_tree"]["child_nodes_obj"][0].pop("ground_truth_energy")  # the block
    forest = build_forest([tree])
    frame = node_errors(forest, np.array([3.0, 99.0, 1.0, 0.5, 0.25]))
    assert len(frame) == 4 and "module" not in set(frame["node_type"])
    assert errors_by_node_type(forest, np.array([3.0, 99.0, 1.0, 0.5, 0.25])) == {
        "ml": 0.0, "model": 0.0}


def test_error_tables_by_model_and_primitive():
    forest = build_forest([make_tree("a"), make_tree("b", scale=2.0)])
    predicted = np.concatenate([GOLD * [1.1, 1.0, 1.0, 1.0, 1.0],
                                2 * GOLD * [1.0, 0.8, 1.0, 1.2, 1.0]])
    tables = error_tables(forest, predicted)
    by_type = tables["by_node_type"]
    assert list(by_type.index) == ["ml", "module", "model"]
    assert by_type["count"].tolist() == [6, 2, 2]
    np.testing.assert_allclose(by_type["mean"], [20.0 / 6, 10.0, 5.0])
    by_model = tables["by_model"]
    assert list(by_model.index) == ["a", "b"] and list(by_model.columns) == ["ml", "module", "model"]
    np.testing.assert_allclose(by_model.loc["b"], [20.0 / 3, 20.0, 0.0])
    by_op = tables["by_primitive"]
    np.testing.assert_allclose(by_op.loc["MatMul", "mean"], 10.0)
    assert by_op.loc["Linear", "count"] == 2


def test_align_predictions_by_id_and_names_the_missing():
    trees = [make_tree("a"), make_tree("b")]
    predicted = [make_tree("b"), make_tree("a")]  # another order
    for tree, scale in zip(predicted, (2.0, 1.0), strict=True):
        stack = [tree["frontend_tree"]]
        while stack:
            node = stack.pop()
            node["predicted_energy"] = scale * node["ground_truth_energy"]
            stack.extend(node["child_nodes_obj"])
    forest, values = align_predictions(trees, predicted, "p.jsonl")
    np.testing.assert_allclose(values, np.concatenate([GOLD, 2 * GOLD]))
    predicted[0]["frontend_tree"].pop("predicted_energy")
    with pytest.raises(InputError) as error:
        align_predictions(trees, predicted, "p.jsonl")
    assert str(error.value) == ("p.jsonl: field 'predicted_energy': missing for 1 nodes, e.g. id "
                                "'b/2x4/root'")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_prediction_fails_naming_the_node(bad):
    forest = build_forest([make_tree()])
    predicted = GOLD.copy()
    predicted[3] = bad
    with pytest.raises(NonFiniteResultError) as error:
        errors_by_node_type(forest, predicted)
    assert str(error.value).startswith(
        f"1 of 5 predicted energies are not finite, e.g. node 'toy/2x4/root.block.matmul_0': {bad!r}")


def test_a_mean_that_overflows_fails():
    forest = build_forest([make_tree()])
    with pytest.raises(NonFiniteResultError) as error:
        errors_by_node_type(forest, np.array([3.0, 2.0, 1e307, 1e307, 0.25]))
    assert str(error.value) == ("the mean % error of ml nodes is inf: predictions too large "
                                "to compare")


class _Scripted(Predictor):
    """Predicts gold × a factor per model; NaN for the model named ``broken``."""

    def __init__(self, broken: str = "", factors: dict | None = None):
        self.broken = broken
        self.factors = factors

    def fit(self, forest):
        self.fitted_ = True
        return self

    def predict(self, forest):
        factor = np.array([(self.factors or {}).get(m, 1.0) for m in forest.node_model_names()])
        pred = np.nan_to_num(forest.gold_j, nan=1.0) * factor
        return np.where(forest.node_model_names() == self.broken, np.nan, pred)


def test_overall_is_the_plain_mean_of_the_folds():
    forest = build_forest([make_tree("a"), make_tree("b"), make_tree("c")])
    result = leave_one_model_out(forest, _Scripted(factors={"a": 1.1, "b": 1.3, "c": 0.4}),
                                 show_progress=False)
    table = result.table
    assert list(table.index) == ["a", "b", "c", "overall"]
    np.testing.assert_allclose(table["model"], [10.0, 30.0, 60.0, 100.0 / 3])
    np.testing.assert_allclose(table.loc["overall"], table.iloc[:3].mean())


def test_a_fold_with_nan_fails_naming_the_fold_instead_of_vanishing_from_the_mean():
    forest = build_forest([make_tree("a"), make_tree("b"), make_tree("c")])
    with pytest.raises(NonFiniteResultError) as error:
        leave_one_model_out(forest, _Scripted(broken="b"), show_progress=False)
    assert str(error.value).startswith("fold 'b' (left out): 5 of 5 predicted energies are "
                                       "not finite, e.g. node 'b/2x4/root': nan")


def test_a_fold_without_a_scored_node_type_fails():
    plain = make_tree("b")
    for child in plain["frontend_tree"]["child_nodes_obj"][0]["child_nodes_obj"]:
        child.pop("ground_truth_energy")
    plain["frontend_tree"]["child_nodes_obj"][1].pop("ground_truth_energy")  # no measured ml
    forest = build_forest([make_tree("a"), plain])
    with pytest.raises(NonFiniteResultError, match=r"^fold 'b' \(left out\): no measured \['ml'\]"):
        leave_one_model_out(forest, _Scripted(), show_progress=False)


def test_overall_of_a_table_with_a_missing_value_is_missing():
    """The rule the table relies on: pandas' default mean skips NaN, ours does not."""
    table = pd.DataFrame({"ml": [1.0, np.nan]})
    assert np.isnan(table.mean(axis=0, skipna=False)["ml"]) and table.mean()["ml"] == 1.0


def test_means_per_node_type_agree_with_pandas_on_the_device(device_forest):
    """errors_by_node_type sums exactly (math.fsum); pandas' grouped mean agrees to 1e-12."""
    rng = np.random.default_rng(3)
    predicted = device_forest.gold_j * rng.lognormal(0.0, 0.3, device_forest.num_nodes)
    predicted = np.where(np.isnan(predicted), 1.0, predicted)
    ours = errors_by_node_type(device_forest, predicted)
    theirs = node_errors(device_forest, predicted).groupby("node_type")["error_pct"].mean()
    assert set(ours) == set(theirs.index)
    for node_type, value in ours.items():
        assert value == pytest.approx(theirs[node_type], rel=1e-12)
