"""What the predictors promise beyond their accuracy: the paper's defaults, the range checks,
the training history, persistence, and the options of the baselines. Written against the
mutants that survived ``scripts/mutation.py``."""

from __future__ import annotations

import numpy as np
import pytest

from irene import predictors
from irene.data.forest import build_forest, feature_list
from irene.errors import SettingsError
from irene.predictors.base import Each, OneOf, Range
from irene.predictors.baselines import FlatPredictor
from irene.predictors.irene import IreneModel, WeightingModel
from irene.predictors.leaves import Standardizer, fit_leaf_regressors, polynomial_expand
from irene.predictors.treegrad import tree_indices, tree_loss_and_grad


# ------------------------------------------------------------------------------ checks
@pytest.mark.parametrize(("check", "value", "problem"), [
    (Range(float, 0, 1.0, low_open=True), 0.0, "must be in (0, 1]"),
    (Range(float, 0, 1.0, low_open=True), 1e-12, None),
    (Range(float, 0, 1.0, low_open=True), 1.0, None),
    (Range(float, 0, 1.0, low_open=True), 1.0000001, "must be in (0, 1]"),
    (Range(float, 0, 1.0), 0.0, None),
    (Range(float, 0, 1.0), -1e-300, "must be in [0, 1]"),
    (Range(int, 1, 10), 2.5, "must be an integer"),
    (Range(int, 1, 10), 3.0, None),
    (Range(int, 1, 10), True, "must be an integer"),
    (Range(float, 0, None), "3", "must be a number"),
    (Range(float, 0, None), float("nan"), "must be finite"),
    (Range(float, None, None), float("-inf"), "must be finite"),
    (Range(int, 0, 2**32 - 1), 2**32, "must be in [0, 4294967295]"),
    (OneOf(("a", "b")), "c", "choose from ['a', 'b']"),
    (Each(Range(int, 1, 3)), [1, 4], "item 4 must be in [1, 3]"),
    (Each(Range(int, 1, 3)), [], "must be a non-empty list"),
    (Each(OneOf(("x",))), "x", "must be a non-empty list"),
])
def test_checks_say_what_is_allowed(check, value, problem):
    assert check.check(value) == problem


def test_validate_params_names_the_first_bad_hyperparameter():
    with pytest.raises(SettingsError) as error:
        IreneModel(lr=0.0, epochs=0).validate_params()
    assert str(error.value) == "predictor.epochs=0: must be in [1, 100000]"  # declaration order
    IreneModel(lr=1.0, epochs=1, tanh_scalar=1e-9, polynomial_degree=0).validate_params()


def test_irene_defaults_are_the_papers():
    assert IreneModel().get_params() == {
        "feature_sets": ("model_specs", "resource_utilization"), "training_strategy": "end2end",
        "weighting": "close_to_one", "standardize_features": True, "polynomial_degree": 3,
        "tanh_scalar": 10.0, "normalize_loss_scale": True, "epochs": 8, "lr": 1e-3,
        "seed": 13370, "unseen_op": "error", "engine": "numpy", "show_progress": True}


# ---------------------------------------------------------------------------- training
def test_history_is_the_mean_loss_per_tree_of_each_epoch(small_trees):
    forest = build_forest(small_trees[:1])  # one tree: the first epoch's loss is computable
    model = IreneModel(epochs=1, show_progress=False).fit(forest)
    assert len(model.history_) == 1  # one epoch trains (epochs=1 is not "no training")
    x = forest.matrix(feature_list(["model_specs", "resource_utilization"]))
    leaf = model._predict_leaves(forest, x)[0]
    xt = polynomial_expand(Standardizer.fit(x).transform(x), 3)
    import torch

    torch.manual_seed(13370)
    initial = WeightingModel(xt.shape[1], "close_to_one", 10.0).linear
    theta = np.concatenate([initial.weight.detach().numpy().ravel(),
                            initial.bias.detach().numpy()]).astype(np.float64)
    loss, _ = tree_loss_and_grad(theta, xt, leaf, np.nan_to_num(forest.gold_j), tree_indices(forest)[0],
                                 strategy="end2end", weighting="close_to_one", tanh_scalar=10.0,
                                 normalize=True)
    assert model.history_[0] == pytest.approx(loss, rel=1e-12)


def test_torch_engine_trains_like_the_numpy_engine(small_trees):
    forest = build_forest(small_trees[:4])
    common = dict(epochs=2, show_progress=False)
    numpy_model = IreneModel(**common).fit(forest)
    torch_model = IreneModel(engine="torch", **common).fit(forest)
    np.testing.assert_allclose(torch_model.history_, numpy_model.history_, rtol=1e-3)
    np.testing.assert_allclose(torch_model.predict(forest), numpy_model.predict(forest), rtol=1e-3)


def test_no_progress_bar_when_asked(small_trees, capfd):
    IreneModel(epochs=2, show_progress=False).fit(build_forest(small_trees[:2]))
    assert capfd.readouterr().err == ""


def test_exact_one_weights_have_the_input_dtype():
    x = np.ones((3, 2))
    import torch

    ones = WeightingModel(2, "exact_one", 10.0)(torch.from_numpy(x))
    assert ones.dtype == torch.float64 and ones.tolist() == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- persistence
def test_save_creates_folders_overwrites_and_keeps_the_history(small_trees, tmp_path):
    forest = build_forest(small_trees[:3])
    model = IreneModel(epochs=2, show_progress=False).fit(forest)
    target = tmp_path / "a" / "b" / "model"
    model.save(target)
    model.save(target)  # saving again into the same folder is fine
    loaded = predictors.load(target)
    assert loaded.history_ == model.history_ and len(loaded.history_) == 2
    np.testing.assert_array_equal(loaded.predict(forest), model.predict(forest))


# ------------------------------------------------------------------------ flat baseline
@pytest.mark.parametrize("space", ["linear", "log"])
def test_flat_grouping_and_degree_change_the_model(small_trees, tmp_path, space):
    forest = build_forest(small_trees)
    config = dict(feature_sets=["model_specs"], space=space)
    by_type = FlatPredictor(**config).fit(forest)
    pooled = FlatPredictor(**config, group_by="none").fit(forest)
    assert set(by_type.models_) == {"model", "module", "ml"} and set(pooled.models_) == {"all"}
    assert not np.allclose(by_type.predict(forest), pooled.predict(forest))
    for model in (by_type, pooled, FlatPredictor(**config, degree=2).fit(forest)):
        model.save(tmp_path / f"{space}-{model.group_by}-{model.degree}")
        loaded = predictors.load(tmp_path / f"{space}-{model.group_by}-{model.degree}")
        assert type(loaded.models_["all" if model.group_by == "none" else "ml"]) is type(
            model.models_["all" if model.group_by == "none" else "ml"])
        np.testing.assert_array_equal(loaded.predict(forest), model.predict(forest))


def test_flat_linear_degree_one_reads_the_raw_features(small_trees):
    forest = build_forest(small_trees)
    linear = FlatPredictor(feature_sets=["model_specs"]).fit(forest)
    assert len(linear.models_["ml"].coef_) == len(feature_list(["model_specs"]))
    quadratic = FlatPredictor(feature_sets=["model_specs"], degree=2).fit(forest)
    assert len(quadratic.models_["ml"].coef_) == 27  # 6 + 21 terms, no bias column


def test_leaf_regressors_fit_every_measured_primitive(small_trees):
    forest = build_forest(small_trees)
    models = fit_leaf_regressors(forest, forest.matrix(feature_list(["model_specs"])))
    assert set(models) == set(forest.op_type[forest.is_leaf])
