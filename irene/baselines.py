"""Baseline predictors that keep the tree models honest, and the array helpers they share.

* :class:`PhysicsPredictor` (``physics``): every node, leaf or not, is
  ``energy_j ≈ a·gpu_energy_mean + b·times_mean`` — total energy is the GPU's own counter plus
  the rest of the system's power times the run time. Two numbers, fit on relative error.
  Needs the ``resource_utilization`` features (it measures; it does not predict from specs).
* :class:`FlatPredictor` (``flat``): one regression per node type over the node's own
  features, no tree (the paper's "unstructured" baseline).
* :class:`SumOfChildrenPredictor` (``sum_of_children``): the paper's per-primitive linear
  leaf regressors, and every inner node the plain sum of its children (``strategy=none``).

All follow the predictor protocol of :mod:`irene.predictors` and the scikit-learn estimator
contract (``__init__`` stores, ``fit`` returns self, learned state ends in ``_``). State is
saved as plain JSON; nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from irene import __version__
from irene.forest import Forest, compose, feature_list, predict_leaves
from irene.io import atomic_write_json
from irene.model import IreneConfig, fit_leaf_regressors
from irene.transforms import LinearLeafRegressor, Standardizer, polynomial_expand

FORMAT_VERSION = 1
NODE_TYPE_NAMES = ("model", "module", "ml")  # index = Forest.node_type code


# ------------------------------------------------------------------------------ array helpers
def subtree_leaf_sum(forest: Forest, leaf_values: np.ndarray) -> np.ndarray:
    """Σ of ``leaf_values`` over every node's leaf descendants (a leaf: its own value)."""
    return compose(forest, np.where(forest.is_leaf, leaf_values, 0.0))


def log_features(x: np.ndarray) -> np.ndarray:
    """``log1p`` of non-negative features: FLOP, bytes and sizes span decades (0 stays 0)."""
    return np.log1p(np.maximum(x, 0.0))


class NotApplicableError(ValueError):
    """A predictor cannot run with the selected features (e.g. physics on static features)."""


def require_features(feature_sets: list[str], needed: tuple[str, ...], predictor: str) -> None:
    """Raise a clear error if ``needed`` features are not in the selected feature sets."""
    available = feature_list(feature_sets)
    missing = [name for name in needed if name not in available]
    if missing:
        raise NotApplicableError(
            f"predictor {predictor!r} needs the features {missing}, which the selected feature "
            f"sets {list(feature_sets)} do not provide (they give {available}); choose "
            "features=both or features=resource_utilization, or another predictor")


def relative_lstsq(design: np.ndarray, target_j: np.ndarray, *, lower: np.ndarray | None = None,
                   ridge: float = 0.0, prior: np.ndarray | None = None) -> np.ndarray:
    """Least squares on relative error: minimise Σ ((design·c − y)/y)² + ridge·|c − prior|².

    Args:
        design: n×k design matrix.
        target_j: n positive targets.
        lower: k lower bounds (``-inf`` for free); ``None``: unconstrained.
        ridge: strength of the pull towards ``prior`` (0: none).
        prior: k values the ridge term pulls towards (default 0).

    Returns:
        The k coefficients.
    """
    scale = 1.0 / target_j
    a = design * scale[:, None]
    b = target_j * scale
    if ridge > 0:
        k = design.shape[1]
        a = np.vstack([a, np.sqrt(ridge) * np.eye(k)])
        b = np.concatenate([b, np.sqrt(ridge) * (np.zeros(k) if prior is None else prior)])
    if lower is None or np.all(np.isneginf(lower)):
        return np.linalg.lstsq(a, b, rcond=None)[0]
    from scipy.optimize import lsq_linear

    return lsq_linear(a, b, bounds=(lower, np.full(len(lower), np.inf)), method="bvls").x


@dataclass
class LogPolyRegressor:
    """Ridge regression on a polynomial of standardized features, in one of two spaces.

    * ``space="log"``: ``log(energy)`` on ``log1p`` features. Least squares in log space is
      least squares on relative error (for small errors), a power law
      ``energy ∝ flops^α·bytes^β`` is linear in it, and the polynomial adds curvature (fixed
      launch overhead at small sizes, saturation at large ones).
    * ``space="linear"``: ``energy`` on raw features, each row weighted by 1/energy² (relative
      error): the right form when energy is a sum of measured parts, e.g.
      ``a·gpu_energy_mean + b·times_mean``.
    """

    degree: int
    alpha: float
    scaler: Standardizer
    coef_: np.ndarray
    space: str = "log"

    @classmethod
    def fit(cls, x: np.ndarray, energy_j: np.ndarray, *, degree: int = 2, alpha: float = 1e-3,
            sample_weight: np.ndarray | None = None, space: str = "log") -> LogPolyRegressor:
        """Fit on rows ``x`` (raw features) and positive energies ``energy_j``."""
        if space not in ("log", "linear"):
            raise ValueError(f"space {space!r}: choose from ['log', 'linear']")
        inputs = log_features(x) if space == "log" else x
        scaler = Standardizer.fit(inputs)
        z = polynomial_expand(scaler.transform(inputs), max(degree, 1))
        weight = np.ones(len(z)) if sample_weight is None else np.asarray(sample_weight, float)
        if space == "log":
            target = np.log(energy_j)
        else:  # relative error: divide each row by its energy, the target becomes 1
            z = z / energy_j[:, None]
            target = np.ones(len(z))
        zw = z * weight[:, None]
        # alpha per unit of sample weight, so its meaning does not change with the data size
        penalty = alpha * weight.sum() * np.eye(z.shape[1])
        penalty[0, 0] = 0.0  # never shrink the intercept
        coef = np.linalg.lstsq(zw.T @ z + penalty, zw.T @ target, rcond=None)[0]
        return cls(degree=degree, alpha=alpha, scaler=scaler, coef_=coef, space=space)

    def predict(self, x: np.ndarray) -> np.ndarray:
        inputs = log_features(x) if self.space == "log" else x
        z = polynomial_expand(self.scaler.transform(inputs), max(self.degree, 1)) @ self.coef_
        if self.space == "linear":
            return z
        # clip the exponent: a polynomial far outside its data must not overflow
        return np.exp(np.clip(z, -50.0, 50.0))

    def to_dict(self) -> dict:
        return {"space": self.space, "degree": self.degree, "alpha": self.alpha,
                "scaler": self.scaler.to_dict(), "coef": self.coef_.tolist()}

    @classmethod
    def from_dict(cls, state: dict) -> LogPolyRegressor:
        return cls(degree=int(state["degree"]), alpha=float(state["alpha"]),
                   scaler=Standardizer.from_dict(state["scaler"]), coef_=np.asarray(state["coef"]),
                   space=state.get("space", "log"))


def measured(forest: Forest) -> np.ndarray:
    """Mask of nodes with a positive measured energy (the fit targets)."""
    return ~np.isnan(forest.gold_j) & (np.nan_to_num(forest.gold_j) > 0)


# ---------------------------------------------------------------------------- persistence
def write_state(directory: str | Path, name: str, config: IreneConfig, options: dict[str, Any],
                state: dict[str, Any]) -> Path:
    """``config.json`` (predictor name, IrEne config, options) and ``state.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "config.json", {
        "format_version": FORMAT_VERSION, "irene_version": __version__, "predictor": name,
        "config": asdict(config), "options": options})
    atomic_write_json(directory / "state.json", state)
    return directory


def read_state(directory: str | Path, name: str) -> tuple[IreneConfig, dict[str, Any], dict]:
    """Read back what :func:`write_state` wrote, checking the predictor name and version."""
    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    if meta.get("predictor") != name:
        raise ValueError(f"{directory / 'config.json'}: field 'predictor': expected {name!r}, "
                         f"got {meta.get('predictor')!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / 'config.json'}: field 'format_version': expected "
                         f"{FORMAT_VERSION}, got {meta.get('format_version')!r}")
    state = json.loads((directory / "state.json").read_text())
    return IreneConfig(**meta["config"]), dict(meta.get("options") or {}), state


def _no_fallback(forest: Forest, pred: np.ndarray, return_fallback: bool):
    return (pred, np.zeros(forest.num_nodes, dtype=bool)) if return_fallback else pred


# -------------------------------------------------------------------------------- physics
class PhysicsPredictor:
    """``energy_j = a·gpu_energy_mean + b·times_mean`` on every node (two parameters).

    ``a`` scales the GPU's own energy counter to the whole machine's, ``b`` is the rest of
    the system's power in watts. Fit by least squares on relative error (weights 1/energy²).

    Args:
        config: shared IrEne settings; only ``feature_sets`` is used and it must include
            ``resource_utilization``.
        by_node_type: one (a, b) per node type (model, module, ml) instead of one overall.
    """

    name = "physics"
    inputs = ("gpu_energy_mean", "times_mean")

    def __init__(self, config: IreneConfig | None = None, by_node_type: bool = False):
        self.config = config or IreneConfig()
        self.by_node_type = by_node_type

    def fit(self, forest: Forest) -> PhysicsPredictor:
        require_features(self.config.feature_sets, self.inputs, self.name)
        x = forest.matrix(self.inputs)
        rows = measured(forest)
        groups = NODE_TYPE_NAMES if self.by_node_type else ("all",)
        self.coef_ = {}
        for code, group in enumerate(groups):
            mask = rows & ((forest.node_type == code) if self.by_node_type else True)
            if not mask.any():
                mask = rows  # no node of this type to fit on: share the overall fit
            self.coef_[group] = relative_lstsq(x[mask], forest.gold_j[mask])
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("this PhysicsPredictor is not fitted yet: call fit() or load()")

    def predict(self, forest: Forest, *, return_fallback: bool = False):
        """Energy (J) of every node: a·gpu_energy_mean + b·times_mean."""
        self._check_fitted()
        x = forest.matrix(self.inputs)
        if self.by_node_type:
            coef = np.stack([self.coef_[NODE_TYPE_NAMES[c]] for c in forest.node_type])
        else:
            coef = np.broadcast_to(self.coef_["all"], x.shape)
        return _no_fallback(forest, np.sum(x * coef, axis=1), return_fallback)

    def save(self, directory: str | Path) -> Path:
        self._check_fitted()
        return write_state(directory, self.name, self.config, {"by_node_type": self.by_node_type},
                           {"coef": {k: v.tolist() for k, v in self.coef_.items()},
                            "inputs": list(self.inputs)})

    @classmethod
    def load(cls, directory: str | Path) -> PhysicsPredictor:
        config, options, state = read_state(directory, cls.name)
        model = cls(config, **options)
        model.coef_ = {k: np.asarray(v) for k, v in state["coef"].items()}
        return model


# ----------------------------------------------------------------------------------- flat
class FlatPredictor:
    """One regression per node type over the node's own features; no tree.

    The paper's "unstructured" baseline: an inner node ignores its children. By default a
    linear regression on the raw features fit on relative error (rows weighted by
    1/energy²); ``space="log"`` is a power law (``log energy`` linear in ``log1p``
    features).

    Args:
        config: shared settings; ``feature_sets`` picks the inputs.
        space: ``"linear"`` or ``"log"``.
        degree: polynomial degree of the (log) features (1: plain linear).
        alpha: ridge strength (log space only).
        group_by: ``"node_type"`` (one regression each for model, module, ml) or ``"none"``
            (one regression for every node, node type as a one-hot input).
    """

    name = "flat"

    def __init__(self, config: IreneConfig | None = None, space: str = "linear", degree: int = 1,
                 alpha: float = 1e-3, group_by: str = "node_type"):
        self.config = config or IreneConfig()
        self.space = space
        self.degree = degree
        self.alpha = alpha
        self.group_by = group_by

    def _inputs(self, forest: Forest) -> np.ndarray:
        x = forest.matrix(self.features_)
        if self.group_by == "none":  # node type as inputs (1/0 survive log1p as constants)
            x = np.column_stack([x] + [(forest.node_type == c).astype(float) for c in range(3)])
        return x

    def _groups(self, forest: Forest) -> dict[str, np.ndarray]:
        if self.group_by == "none":
            return {"all": np.ones(forest.num_nodes, dtype=bool)}
        return {name: forest.node_type == code for code, name in enumerate(NODE_TYPE_NAMES)}

    def fit(self, forest: Forest) -> FlatPredictor:
        if self.space not in ("log", "linear"):
            raise ValueError(f"space {self.space!r}: choose from ['log', 'linear']")
        if self.group_by not in ("node_type", "none"):
            raise ValueError(f"group_by {self.group_by!r}: choose from ['node_type', 'none']")
        self.features_ = feature_list(self.config.feature_sets)
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
            raise ValueError("no measured node to fit the flat regression on")
        return self

    def predict(self, forest: Forest, *, return_fallback: bool = False):
        """Energy (J) of every node from its own features."""
        if not hasattr(self, "models_"):
            raise RuntimeError("this FlatPredictor is not fitted yet: call fit() or load()")
        x = self._inputs(forest)
        pred = np.full(forest.num_nodes, np.nan)
        for group, mask in self._groups(forest).items():
            if not mask.any():
                continue
            model = self.models_.get(group)
            if model is None:
                raise ValueError(f"no regression for node type {group!r}: none was in training")
            if self.space == "log":
                pred[mask] = model.predict(x[mask])
            else:
                xp = x[mask] if self.degree <= 1 else polynomial_expand(x[mask], self.degree)[:, 1:]
                pred[mask] = model.predict(xp)
        return _no_fallback(forest, pred, return_fallback)

    def save(self, directory: str | Path) -> Path:
        if not hasattr(self, "models_"):
            raise RuntimeError("this FlatPredictor is not fitted yet: call fit() or load()")
        options = {"space": self.space, "degree": self.degree, "alpha": self.alpha,
                   "group_by": self.group_by}
        return write_state(directory, self.name, self.config, options,
                           {"features": self.features_,
                            "models": {k: m.to_dict() for k, m in self.models_.items()}})

    @classmethod
    def load(cls, directory: str | Path) -> FlatPredictor:
        config, options, state = read_state(directory, cls.name)
        model = cls(config, **options)
        model.features_ = state["features"]
        kind = LogPolyRegressor if model.space == "log" else LinearLeafRegressor
        model.models_ = {k: kind.from_dict(v) for k, v in state["models"].items()}
        return model


# ------------------------------------------------------------------------- sum of children
class SumOfChildrenPredictor:
    """Leaves from one linear regressor per primitive type (the paper's), every inner node
    the plain sum of its children's predictions: no weights, no unattributed work.

    Args:
        config: shared settings; ``feature_sets`` picks the leaf inputs, ``unseen_op`` the
            policy for a primitive type never seen in training (as :class:`IreneModel`).
    """

    name = "sum_of_children"

    def __init__(self, config: IreneConfig | None = None):
        self.config = config or IreneConfig()

    def fit(self, forest: Forest) -> SumOfChildrenPredictor:
        self.features_ = feature_list(self.config.feature_sets)
        x = forest.matrix(self.features_)
        self.leaf_models_ = fit_leaf_regressors(forest, x)
        return self

    def predict(self, forest: Forest, *, return_fallback: bool = False):
        """Leaf regressions, then plain sums up the tree."""
        if not hasattr(self, "leaf_models_"):
            raise RuntimeError("this SumOfChildrenPredictor is not fitted yet: call fit() or load()")
        x = forest.matrix(self.features_)
        leaf_pred, fallback = predict_leaves(
            forest, x, self.leaf_models_, lambda op: self.leaf_models_.get(self.config.unseen_op),
            "set unseen_op to one of those to use its regressor instead")
        pred = compose(forest, np.where(forest.is_leaf, leaf_pred, 0.0))
        return (pred, fallback) if return_fallback else pred

    def save(self, directory: str | Path) -> Path:
        if not hasattr(self, "leaf_models_"):
            raise RuntimeError("this SumOfChildrenPredictor is not fitted yet: call fit() or load()")
        return write_state(directory, self.name, self.config, {},
                           {"features": self.features_,
                            "leaf_models": {k: m.to_dict() for k, m in self.leaf_models_.items()}})

    @classmethod
    def load(cls, directory: str | Path) -> SumOfChildrenPredictor:
        config, _, state = read_state(directory, cls.name)
        model = cls(config)
        model.features_ = state["features"]
        model.leaf_models_ = {k: LinearLeafRegressor.from_dict(v)
                              for k, v in state["leaf_models"].items()}
        return model
