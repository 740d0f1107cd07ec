"""IrEne+ (irene/predictors/irene_plus.py): readable unattributed work, static features only, round trips."""

from __future__ import annotations

import numpy as np
import pytest

from irene import predictors
from irene.data.forest import ALL_FEATURES, build_forest, compose, feature_list
from irene.evaluate.crossval import leave_one_model_out
from irene.predictors.baselines import SumOfChildrenPredictor
from irene.predictors.irene_plus import IrenePlusPredictor
from tests.conftest import make_tree

FULL: dict = {}
STATIC = {"feature_sets": ["model_specs"]}
FAST = {"leaf_degrees": [1, 2], "leaf_alphas": [1e-4]}


@pytest.fixture(scope="module")
def static_model(small_trees):
    return IrenePlusPredictor(**STATIC, **FAST).fit(build_forest(small_trees))


def test_explain_parts_add_up(small_trees, static_model):
    forest = build_forest(small_trees)
    parts = static_model.explain(forest)
    np.testing.assert_allclose(parts["predicted_j"], static_model.predict(forest), rtol=1e-12)
    inner = ~forest.is_leaf
    np.testing.assert_allclose(parts["predicted_j"][inner],
                               (parts["weighted_children_j"] + parts["residual_j"])[inner],
                               rtol=1e-10)
    np.testing.assert_allclose(parts["predicted_j"][inner],
                               (parts["children_sum_j"] + parts["unattributed_j"])[inner],
                               rtol=1e-10)
    leaves = parts[forest.is_leaf]
    assert (leaves[["children_sum_j", "unattributed_j", "residual_j"]] == 0).all().all()
    # the data's parents exceed their children: the model must say so, in joules
    attention = parts["instance_type"] == "BertSelfAttention"
    share = parts["unattributed_j"][attention] / parts["predicted_j"][attention]
    assert share.mean() > 0.08, share.describe()
    assert list(static_model.parameters().index)[-3:] == ["constant_j", "extra_flops",
                                                          "extra_mem_bytes"]


def test_static_model_uses_only_static_features(small_trees, static_model):
    assert static_model.features_ == feature_list(["model_specs"])
    assert static_model.extra_features_ == ["flops", "mem_bytes"]
    forest = build_forest(small_trees)
    blind = build_forest(small_trees)
    for name in ("cpu", "mem", "gpu", "gpu_mem", "gpu_clk", "gpu_mem_clk", "times_mean",
                 "gpu_energy_mean"):
        blind.features[:, ALL_FEATURES.index(name)] = np.nan  # unknowable without a run
    np.testing.assert_array_equal(static_model.predict(blind), static_model.predict(forest))


def test_full_model_uses_measured_unattributed_work(small_trees):
    model = IrenePlusPredictor(**FULL, **FAST).fit(build_forest(small_trees))
    assert model.extra_features_ == ["flops", "mem_bytes", "times_mean", "gpu_energy_mean"]


def test_recovers_known_child_weights_and_unattributed_terms(small_trees):
    forest = build_forest(small_trees)
    kinds = np.where(forest.is_leaf, forest.op_type, "module")
    truth = {"linear": 1.1, "matmul": 1.6, "softmax": 2.0, "module": 1.0}
    weight = np.array([truth.get(k, 1.2) for k in kinds])
    parent = forest.parent >= 0
    mem = forest.features[:, ALL_FEATURES.index("mem_bytes")]
    extra_mem = mem - np.bincount(forest.parent[parent], weights=mem[parent],
                                  minlength=forest.num_nodes)
    own = np.where(forest.is_leaf, forest.gold_j, 0.004 + 0.002 * extra_mem)
    forest.gold_j = compose(forest, own, weight)
    model = IrenePlusPredictor(**STATIC, inner_ridge=0.0, refit_iterations=0, nonnegative=False,
                               **FAST).fit(forest)
    learned = dict(zip(model.child_kinds_, model.child_weights_, strict=True))
    for kind, value in truth.items():
        assert learned[kind] == pytest.approx(value, rel=1e-6)
    np.testing.assert_allclose(model.residual_coef_, [0.004, 0.0, 0.002], atol=1e-8)


def test_beats_sum_of_children_and_stays_under_the_targets(small_trees):
    forest = build_forest(small_trees)
    plus = leave_one_model_out(forest, IrenePlusPredictor(**STATIC), show_progress=False)
    plain = leave_one_model_out(forest, SumOfChildrenPredictor(**STATIC),
                                show_progress=False)
    overall, baseline = plus.table.loc["overall"], plain.table.loc["overall"]
    assert overall["module"] < baseline["module"] / 2 and overall["model"] < baseline["model"] / 2
    assert overall["module"] < 8.0 and overall["model"] < 5.0, plus.table


@pytest.mark.parametrize("config", [STATIC, FULL], ids=["static", "full"])
def test_save_load_gives_identical_predictions(small_trees, tmp_path, config):
    forest = build_forest(small_trees)
    model = predictors.classes()["irene_plus"](**config, **FAST).fit(forest)
    model.save(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.pkl"))
    loaded = predictors.load(tmp_path / "m")
    assert isinstance(loaded, IrenePlusPredictor) and loaded.leaf_degrees == [1, 2]
    np.testing.assert_array_equal(loaded.predict(forest), model.predict(forest))
    np.testing.assert_array_equal(loaded.explain(forest)["unattributed_j"],
                                  model.explain(forest)["unattributed_j"])


def test_unseen_primitive_uses_the_op_agnostic_regressor(static_model):
    strange = make_tree()
    strange["frontend_tree"]["child_nodes_obj"][1]["instance_type"] = "FancyNorm"
    target = build_forest([strange])
    pred, fallback = static_model.predict(target, return_fallback=True)
    assert fallback.tolist() == [False, False, False, False, True]
    assert np.isfinite(pred).all() and (pred > 0).all()
    static_model.fallback = False
    try:
        with pytest.raises(ValueError, match="'fancynorm'.*never seen"):
            static_model.predict(target)
    finally:
        static_model.fallback = True


def test_leaf_hyperparameters_come_from_inner_cross_validation(static_model):
    errors = static_model.leaf_cv_error_pct_
    assert set(errors) == set(static_model.leaf_models_)
    assert all(np.isfinite(v) and v < 20 for v in errors.values()), errors


def test_bad_options_and_unfitted_fail_clearly(small_trees):
    forest = build_forest(small_trees)
    with pytest.raises(RuntimeError, match="not fitted"):
        IrenePlusPredictor(**STATIC).predict(forest)
    with pytest.raises(ValueError, match="leaf_spaces"):
        IrenePlusPredictor(**STATIC, leaf_spaces=["cubic"]).fit(forest)
    with pytest.raises(ValueError, match="leaf_degrees"):
        IrenePlusPredictor(**STATIC, leaf_degrees=[0]).fit(forest)
