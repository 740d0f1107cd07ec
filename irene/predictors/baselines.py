"""Baseline predictors that keep the tree models honest.

* :class:`PhysicsPredictor` (``physics``): every node, leaf or not, is
  ``energy_j ≈ a·gpu_energy_mean + b·times_mean`` — total energy is the GPU's own counter plus
  the rest of the system's power times the run time. Two numbers, fit on relative error.
  Needs the ``resource_utilization`` features (it measures; it does not predict from specs).
* :class:`FlatPredictor` (``flat``): one regression per node type over the node's own
  features, no tree (the paper's "unstructured" baseline).
* :class:`SumOfChildrenPredictor` (``sum_of_children``): the paper's per-primitive linear
  leaf regressors, and every inner node the plain sum of its children (``strategy=none``).

All are :class:`~irene.predictors.base.Predictor` estimators: hyperparameters are
constructor arguments, learned state ends in ``_`` and is saved as plain JSON.
"""

from __future__ import annotations

import numpy as np

from irene.data.forest import ALL_FEATURE_SETS, Forest, compose, feature_list
from irene.data.tree import NODE_TYPES
from irene.errors import InputError
from irene.predictors.base import OneOf, Predictor, Range, require_features
from irene.predictors.leaves import (
    LinearLeafRegressor,
    LogPolyRegressor,
    fit_leaf_regressors,
    measured,
    polynomial_expand,
    predict_leaves,
    relative_lstsq,
)


def _no_fallback(forest: Forest, pred: np.ndarray, return_fallback: bool):
    return (pred, np.zeros(forest.num_nodes, dtype=bool)) if return_fallback else pred


# -------------------------------------------------------------------------------- physics
class PhysicsPredictor(Predictor):
    """``energy_j = a·gpu_energy_mean + b·times_mean`` on every node (two parameters).

    ``a`` scales the GPU's own energy counter to the whole machine's, ``b`` is the rest of
    the system's power in watts. Fit by least squares on relative error (weights 1/energy²).

    Args:
        feature_sets: must include ``resource_utilization`` (the predictor reads measured
            values; it does not predict from specs).
        by_node_type: one (a, b) per node type (model, module, ml) instead of one overall.
    """

    name = "physics"
    inputs = ("gpu_energy_mean", "times_mean")

    def __init__(self, feature_sets: list[str] = ALL_FEATURE_SETS, by_node_type: bool = False):
        self.feature_sets = feature_sets
        self.by_node_type = by_node_type

    def fit(self, forest: Forest) -> PhysicsPredictor:
        self.validate_params()
        require_features(self.feature_sets, self.inputs, self.name)
        x = forest.matrix(self.inputs)
        rows = measured(forest)
        groups = NODE_TYPES if self.by_node_type else ("all",)
        self.coef_ = {}
        for code, group in enumerate(groups):
            mask = rows & ((forest.node_type == code) if self.by_node_type else True)
            if not mask.any():
                mask = rows  # no node of this type to fit on: share the overall fit
            self.coef_[str(group)] = relative_lstsq(x[mask], forest.gold_j[mask])
        return self

    def predict(self, forest: Forest, *, return_fallback: bool = False):
        """Energy (J) of every node: a·gpu_energy_mean + b·times_mean."""
        self.check_fitted()
        x = forest.matrix(self.inputs)
        if self.by_node_type:
            coef = np.stack([self.coef_[str(NODE_TYPES[c])] for c in forest.node_type])
        else:
            coef = np.broadcast_to(self.coef_["all"], x.shape)
        return _no_fallback(forest, np.sum(x * coef, axis=1), return_fallback)

    def _get_state(self) -> dict:
        return {"coef": self.coef_, "inputs": list(self.inputs)}

    def _set_state(self, state: dict) -> None:
        self.coef_ = {k: np.asarray(v) for k, v in state["coef"].items()}


# ----------------------------------------------------------------------------------- flat
class FlatPredictor(Predictor):
    """One regression per node type over the node's own features; no tree.

    The paper's "unstructured" baseline: an inner node ignores its children. By default a
    linear regression on the raw features fit on relative error (rows weighted by
    1/energy²); ``space="log"`` is a power law (``log energy`` linear in ``log1p``
    features).

    Args:
        feature_sets: the inputs.
        space: ``"linear"`` or ``"log"``.
        degree: polynomial degree of the (log) features (1: plain linear).
        alpha: ridge strength (log space only).
        group_by: ``"node_type"`` (one regression each for model, module, ml) or ``"none"``
            (one regression for every node, node type as a one-hot input).
    """

    name = "flat"
    constraints = {"space": OneOf(("linear", "log")), "degree": Range(int, 1, 4),
                   "alpha": Range(float, 0, 1e6), "group_by": OneOf(("node_type", "none"))}

    def __init__(self, feature_sets: list[str] = ALL_FEATURE_SETS, space: str = "linear",
                 degree: int = 1, alpha: float = 1e-3, group_by: str = "node_type"):
        self.feature_sets = feature_sets
        self.space = space
        self.degree = degree
        self.alpha = alpha
        self.group_by = group_by

    def _inputs(self, forest: Forest) -> np.ndarray:
        x = forest.matrix(self.features_)
        if self.group_by == "none":  # node type as inputs (1/0 survive log1p as constants)
            x = np.column_stack([x] + [(forest.node_type == c).astype(float)
                                       for c in range(len(NODE_TYPES))])
        return x

    def _groups(self, forest: Forest) -> dict[str, np.ndarray]:
        if self.group_by == "none":
            return {"all": np.ones(forest.num_nodes, dtype=bool)}
        return {str(name): forest.node_type == code for code, name in enumerate(NODE_TYPES)}

    def fit(self, forest: Forest) -> FlatPredictor:
        self.validate_params()
        self.features_ = feature_list(list(self.feature_sets))
        x, rows = self._inputs(forest), measured(forest)
        self.models_ = {}
        for group, mask in self._groups(forest).items():
            mask = mask & rows
            if not mask.any():
                continue
            if self.space == "log":
                self.models_[group] = LogPolyRegressor.fit(x[mask], forest.gold_j[mask],
                                                           degree=self.degree, alpha=self.alpha)
            else:
                xp = x[mask] if self.degree <= 1 else polynomial_expand(x[mask], self.degree)[:, 1:]
                self.models_[group] = LinearLeafRegressor.fit(
                    xp, forest.gold_j[mask], sample_weight=1.0 / forest.gold_j[mask] ** 2)
        if not self.models_:
            raise InputError("no measured node to fit the flat regression on")
        return self

    def predict(self, forest: Forest, *, return_fallback: bool = False):
        """Energy (J) of every node from its own features."""
        self.check_fitted()
        x = self._inputs(forest)
        pred = np.full(forest.num_nodes, np.nan)
        for group, mask in self._groups(forest).items():
            if not mask.any():
                continue
            model = self.models_.get(group)
            if model is None:
                raise InputError(f"no regression for node type {group!r}: none was in training")
            if self.space == "log":
                pred[mask] = model.predict(x[mask])
            else:
                xp = x[mask] if self.degree <= 1 else polynomial_expand(x[mask], self.degree)[:, 1:]
                pred[mask] = model.predict(xp)
        return _no_fallback(forest, pred, return_fallback)

    def _get_state(self) -> dict:
        return {"features": self.features_,
                "models": {k: m.to_dict() for k, m in self.models_.items()}}

    def _set_state(self, state: dict) -> None:
        self.features_ = list(state["features"])
        kind = LogPolyRegressor if self.space == "log" else LinearLeafRegressor
        self.models_ = {k: kind.from_dict(v) for k, v in state["models"].items()}


# ------------------------------------------------------------------------- sum of children
class SumOfChildrenPredictor(Predictor):
    """Leaves from one linear regressor per primitive type (the paper's), every inner node
    the plain sum of its children's predictions: no weights, no unattributed work.

    Args:
        feature_sets: the leaf regressors' inputs.
        unseen_op: a primitive type never seen in training: ``error``, or a known type whose
            regressor is used instead (as :class:`~irene.predictors.irene.IreneModel`).
    """

    name = "sum_of_children"

    def __init__(self, feature_sets: list[str] = ALL_FEATURE_SETS, unseen_op: str = "error"):
        self.feature_sets = feature_sets
        self.unseen_op = unseen_op

    def fit(self, forest: Forest) -> SumOfChildrenPredictor:
        self.validate_params()
        self.features_ = feature_list(list(self.feature_sets))
        x = forest.matrix(self.features_)
        self.leaf_models_ = fit_leaf_regressors(forest, x)
        return self

    def predict(self, forest: Forest, *, return_fallback: bool = False):
        """Leaf regressions, then plain sums up the tree."""
        self.check_fitted()
        x = forest.matrix(self.features_)
        leaf_pred, fallback = predict_leaves(
            forest, x, self.leaf_models_, lambda op: self.leaf_models_.get(self.unseen_op),
            "set unseen_op to one of those to use its regressor instead")
        pred = compose(forest, np.where(forest.is_leaf, leaf_pred, 0.0))
        return (pred, fallback) if return_fallback else pred

    def _get_state(self) -> dict:
        return {"features": self.features_,
                "leaf_models": {k: m.to_dict() for k, m in self.leaf_models_.items()}}

    def _set_state(self, state: dict) -> None:
        self.features_ = list(state["features"])
        self.leaf_models_ = {k: LinearLeafRegressor.from_dict(v)
                             for k, v in state["leaf_models"].items()}


__all__ = ("FlatPredictor", "PhysicsPredictor", "SumOfChildrenPredictor")
