"""What the predictors promise beyond their accuracy: the paper's defaults, the range checks,
the training history, persistence, and the options of the baselines. Written against the
mutants that survived ``scripts/mutation.py``."""

from __future__ import annotations

import numpy as np
import pytest

from irene import predictors
from irene.data.forest import ALL_FEATURES, build_forest, children_sum, compose, feature_list
from irene.errors import SettingsError
from irene.predictors.base import Each, OneOf, Range
from irene.predictors.baselines import FlatPredictor
from irene.predictors.irene import IreneModel, LinearWeighting
from irene.predictors.irene_plus import IrenePlusPredictor
from irene.predictors.leaves import (
    LogPolyRegressor,
    Standardizer,
    fit_leaf_regressors,
    polynomial_expand,
)
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

    torch.manual_seed(13370)  # the reference: torch's own initialisation
    initial = torch.nn.Linear(xt.shape[1], 1)
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


def test_exact_one_weights_are_ones_whatever_the_parameters():
    weighting = LinearWeighting(np.full(2, 5.0), 3.0, "exact_one", 10.0)
    ones = weighting(np.ones((3, 2)))
    assert ones.dtype == np.float64 and ones.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("seed", [0, 1, 7, 13370, 2**31, 2**32 - 1])
@pytest.mark.parametrize("num_features", [1, 3, 16, 17, 84, 969])
def test_initial_weighting_is_torchs_initialisation_bit_for_bit(seed, num_features):
    import torch

    torch.manual_seed(seed)
    reference = torch.nn.Linear(num_features, 1)
    ours = LinearWeighting.initial(num_features, "close_to_one", 10.0, seed)
    np.testing.assert_array_equal(ours.weight, reference.weight.detach().numpy().ravel())
    assert ours.bias == reference.bias.detach().numpy()[0]


def test_weights_are_torchs_float32_forward_pass(small_trees):
    import torch

    from irene.predictors.irene_torch import WeightingModel

    x = np.random.default_rng(3).normal(size=(500, 84))
    for weighting in ("close_to_one", "free"):
        ours = LinearWeighting.initial(84, weighting, 10.0, 5)
        ours = ours.with_theta(ours.theta * 40)  # far from w ≈ 1: tanh's curve matters
        with torch.no_grad():
            reference = WeightingModel.from_weighting(ours)(torch.from_numpy(x).float())
        reference = reference.double().numpy()
        # float32 sums in another order: equal to a few float32 roundings of the largest term
        np.testing.assert_allclose(ours(x), reference, rtol=1e-5,
                                   atol=1e-6 * np.abs(reference).max())


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


# ------------------------------------------------------------------------------ IrEne+
def _power_law_leaves(forest):
    """Leaf energies an exact power law of FLOP (a log-space degree-1 fit recovers them), every
    inner node the plain sum of its leaves."""
    flops = forest.features[:, ALL_FEATURES.index("flops")]
    leaf = np.exp(0.5 * np.log1p(flops) - 3.0)
    forest.gold_j = compose(forest, np.where(forest.is_leaf, leaf, 0.0))
    return forest


EXACT_LEAVES = dict(feature_sets=["model_specs"], leaf_degrees=[1], leaf_alphas=[0.0],
                    leaf_spaces=["log"], inner_ridge=0.0, nonnegative=False)


def test_an_unmeasured_child_counts_as_the_sum_of_its_predicted_leaves(small_trees):
    forest = _power_law_leaves(build_forest(small_trees))
    modules = np.flatnonzero(forest.node_type == 1)
    forest.gold_j[modules[::3]] = np.nan  # a third of the modules were not measured
    model = IrenePlusPredictor(**EXACT_LEAVES, refit_iterations=0).fit(forest)
    np.testing.assert_allclose(model.child_weights_, 1.0, atol=1e-8)
    np.testing.assert_allclose(model.residual_coef_, 0.0, atol=1e-8)


def test_nonnegative_bounds_the_unattributed_flop_and_byte_terms(small_trees):
    forest = _power_law_leaves(build_forest(small_trees))
    own_flops = forest.features[:, ALL_FEATURES.index("flops")]
    delta = own_flops - children_sum(forest, own_flops)
    inner = ~forest.is_leaf
    rate = 0.2 * np.min(forest.gold_j[inner] / np.maximum(np.abs(delta[inner]), 1e-9))
    residual = np.where(inner, -rate * np.abs(delta) * np.sign(delta), 0.0)  # negative per FLOP
    forest.gold_j = compose(forest, np.where(forest.is_leaf, forest.gold_j, residual))
    assert (forest.gold_j > 0).all()
    free = IrenePlusPredictor(**EXACT_LEAVES, refit_iterations=0).fit(forest)
    bounded = IrenePlusPredictor(**dict(EXACT_LEAVES, nonnegative=True), refit_iterations=0).fit(forest)
    terms = list(free.residual_terms_)
    assert free.residual_coef_[terms.index("extra_flops")] < 0
    for name in ("extra_flops", "extra_mem_bytes"):
        assert bounded.residual_coef_[terms.index(name)] >= 0, name
    assert (bounded.child_weights_ >= 0).all()
    assert bounded.residual_coef_[terms.index("constant_j")] != 0  # the constant stays free


def test_the_inner_ridge_does_not_depend_on_feature_units(small_trees):
    """Unattributed columns are rescaled to unit relative size before the ridge: counting FLOP
    in other units scales the coefficient, not the predictions."""
    base = build_forest(small_trees)
    scaled = build_forest(small_trees)
    scaled.features[:, ALL_FEATURES.index("flops")] *= 1000.0
    leaf_pred = np.where(base.is_leaf, base.gold_j, 0.0)
    fitted = []
    for forest in (base, scaled):
        model = IrenePlusPredictor(feature_sets=["model_specs"], inner_ridge=0.1, refit_iterations=0)
        model.features_, model.extra_features_ = feature_list(["model_specs"]), ["flops", "mem_bytes"]
        model._fit_inner(forest, leaf_pred)
        fitted.append((model, model._compose(forest, leaf_pred)))
    (a, pred_a), (b, pred_b) = fitted
    np.testing.assert_allclose(pred_b, pred_a, rtol=1e-8)
    flops = a.residual_terms_.index("extra_flops")
    assert b.residual_coef_[flops] == pytest.approx(a.residual_coef_[flops] / 1000.0, rel=1e-6)


def test_cubic_leaves_only_with_few_features(small_trees):
    forest = build_forest(small_trees[:6])
    static = IrenePlusPredictor(feature_sets=["model_specs"], leaf_degrees=[1, 3])
    static.features_ = feature_list(["model_specs"])
    full = IrenePlusPredictor(leaf_degrees=[1, 3])
    full.features_ = feature_list(["model_specs", "resource_utilization"])
    assert {d for _, d, _ in static._candidates()} == {1, 3}
    assert {d for _, d, _ in full._candidates()} == {1}  # 14 features: no cubic terms
    assert forest.num_trees == 6


def test_one_training_model_takes_the_first_candidate(small_trees):
    """With one model there is nothing to hold out: no cross-validation (no statistics of
    empty folds), the first candidate, and NaN as its held-out error."""
    import warnings

    one = build_forest([t for t in small_trees if t["model_name"] == "gpt2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = IrenePlusPredictor(feature_sets=["model_specs"], **CANDIDATES_TWO).fit(one)
    assert all(np.isnan(v) for v in model.leaf_cv_error_pct_.values())
    first = model._candidates()[0]
    assert all((m.space, m.degree, m.alpha) == first for m in model.leaf_models_.values())
    assert model.global_leaf_model_.alpha == min(CANDIDATES_TWO["leaf_alphas"])
    assert model.global_leaf_model_.degree == 2 and model.global_leaf_model_.space == "log"


def test_explain_and_parameters_tables(small_trees):
    forest = build_forest(small_trees[:2])
    model = IrenePlusPredictor(feature_sets=["model_specs"], leaf_degrees=[1],
                               leaf_alphas=[1e-4]).fit(forest)
    parts = model.explain(forest)
    assert parts["weight_in_parent"].dtype == np.float64
    roots = forest.parent < 0
    assert parts["weight_in_parent"][roots].isna().all() and parts["weight_in_parent"][~roots].notna().all()
    table = model.parameters()
    assert table.index.name == "parameter" and list(table.columns) == ["value"]


# ------------------------------------------------------------------------------ leaves
def test_ridge_shrinks_the_coefficients_but_not_the_intercept():
    rng = np.random.default_rng(5)
    x = rng.uniform(1.0, 100.0, size=(60, 2))
    y = np.exp(0.7 * np.log1p(x[:, 0]) - 0.3 * np.log1p(x[:, 1]) + 1.0)
    norms = [np.linalg.norm(LogPolyRegressor.fit(x, y, degree=1, alpha=a).coef_[1:])
             for a in (0.0, 0.1, 10.0)]
    assert norms[0] > norms[1] > norms[2] > 0
    flat = LogPolyRegressor.fit(x, y, degree=1, alpha=1e9)
    assert flat.coef_[0] == pytest.approx(np.log(y).mean(), rel=1e-6)  # intercept kept


def test_a_saved_regressor_without_a_space_is_log_space():
    x = np.array([[1.0], [10.0], [100.0]])
    model = LogPolyRegressor.fit(x, np.array([1.0, 2.0, 4.0]), degree=1, alpha=0.0)
    state = model.to_dict()
    state.pop("space")  # written before the linear space existed
    np.testing.assert_array_equal(LogPolyRegressor.from_dict(state).predict(x), model.predict(x))


# ------------------------------------------------------------------------- static input
def test_traced_shapes_must_be_positive():
    from irene.predictors.static import trace_static

    for shape in [(0, 8), (2, 0), (-1, -1)]:
        with pytest.raises(SettingsError) as error:
            trace_static("tiny/bert", [shape])
        assert str(error.value) == f"batch_size and seq_len must be positive, got {shape}"


def test_zero_is_not_a_negative_energy():
    from irene.predictors.static import NEGATIVE_FIELD, mark_predictions
    from tests.conftest import make_tree

    trees = [make_tree()]
    forest = build_forest(trees)
    filled = mark_predictions(trees, forest, np.array([1.0, 0.0, -0.5, 0.5, 0.25]),
                              np.zeros(5, dtype=bool))
    marked = [NEGATIVE_FIELD in node for node in _nodes(filled[0])]
    assert marked == [False, False, True, False, False]


def _nodes(tree):
    from irene.data.tree import iter_nodes

    return list(iter_nodes(tree["frontend_tree"]))


CANDIDATES_TWO = {"leaf_degrees": [1, 2], "leaf_alphas": [1e-2, 1e-1]}  # not the 1e-3 default


# ------------------------------------------------------------ scikit-learn's estimator API
@pytest.mark.parametrize("cls", list(predictors.classes().values()), ids=lambda c: c.name)
def test_get_set_params_and_clone_follow_scikit_learn(cls):
    from sklearn.base import clone as sklearn_clone

    from irene.predictors.base import clone

    predictor = cls()
    params = predictor.get_params()
    assert set(params) == set(cls._param_names()) and params
    name = sorted(params)[0]
    for copy in (clone(predictor), sklearn_clone(predictor)):
        assert type(copy) is cls and copy is not predictor
        assert copy.get_params(deep=False).keys() == params.keys()
        assert all(np.array_equal(copy.get_params()[k], v) if isinstance(v, np.ndarray)
                   else copy.get_params()[k] == v for k, v in params.items())
    with pytest.raises(ValueError, match=f"invalid parameter 'nonsense' for {cls.__name__}"):
        predictor.set_params(nonsense=1)
    assert predictor.set_params(**{name: params[name]}) is predictor


def test_clone_copies_values_and_repr_names_what_differs_from_the_defaults():
    from irene.predictors.base import clone

    sets = ["model_specs"]
    predictor = IreneModel(feature_sets=sets, epochs=3)
    copy = clone(predictor)
    assert copy.feature_sets == sets and copy.feature_sets is not sets  # a deep copy
    assert not hasattr(copy, "weighting_")
    assert repr(predictor) == "IreneModel(epochs=3, feature_sets=['model_specs'])"
    assert repr(IreneModel()) == "IreneModel()"
