"""IrEne+: a tree predictor designed from the diagnostics (``predictor=irene_plus``).

The measured data show (see :mod:`irene.evaluate.diagnostics`) that a parent is often 1.1-1.5× the
sum of its measured children — work no child accounts for (attention masking and scaling,
residual adds, GELU written as a plain function, the pooler's slicing) — and that this
excess follows the *kind* of children and the parent's *own* data movement, not the module's
class name (``BertSelfAttention``, ``RobertaSelfAttention`` and DistilBERT's
``MultiHeadSelfAttention`` do the same work under different names). IrEne's weights
``1 ± 1/τ`` cannot reach those ratios. IrEne+ changes three things and keeps the tree:

1. **Leaves**: one regressor per primitive type, ridge regression of ``log(energy)`` on a
   polynomial of ``log1p`` features (power laws in FLOP and bytes; least squares in log space
   is least squares on relative error). The polynomial degree and ridge strength of each
   primitive type are chosen by leave-one-model-out cross-validation *inside* the training
   models. A primitive type never seen in training gets an op-agnostic regressor over all
   leaves (and is marked as a fallback).
2. **Inner nodes**: ``energy = Σ_children w[kind(child)]·energy(child) + unattributed``,
   with one weight per kind of child (each primitive type, and "module" for a module
   child) and an explicit, readable **unattributed** term
   ``u = c0 + Σ_k c_k·Δx_k``, where ``Δx_k = x_k(node) − Σ_children x_k(child)`` is the
   node's own work that no child accounts for (FLOP and bytes; with measured features also
   run time and GPU energy). Weights and coefficients are fit by bounded least squares on
   relative error, first on measured children ("stepwise"), then refit on the composed
   predictions of the children so that training sees what prediction will see.
3. **Loss** on relative error everywhere (every node counts by its % error).

Every node still gets an energy, and :meth:`IrenePlusPredictor.explain` gives each inner
node's weighted children and unattributed part in joules. Everything is arrays: fitting
the whole model on device 1 takes well under a second per fold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from irene.data.forest import (
    ALL_FEATURE_SETS,
    ALL_FEATURES,
    Forest,
    children_sum,
    compose,
    feature_list,
    origin,
    origin_rows,
    shared_cache,
)
from irene.data.tree import NODE_TYPES
from irene.errors import InputError, TooFewTreesError
from irene.predictors.base import Each, OneOf, Predictor, Range
from irene.predictors.leaves import (
    LogPolyRegressor,
    Standardizer,
    log_features,
    measured,
    polynomial_expand,
    polynomial_powers,
    polynomial_transform,
    predict_leaf_groups,
    relative_lstsq,
)

if TYPE_CHECKING:
    import pandas as pd

MODULE_CHILD = "module"  # the kind of a child that is a module (not a primitive)
# additive features whose parent-minus-children difference is the parent's own, unattributed work
EXTRA_FEATURES = ("flops", "mem_bytes", "times_mean", "gpu_energy_mean")
MAX_FEATURES_FOR_CUBIC = 8  # degree 3 of more features has too many terms for small op types
# inner selection from per-model sums when every held-out fit has this many rows per coefficient
SUMS_ROWS_PER_TERM = 20
# candidates whose held-out errors agree to this relative difference are tied (rounding)
SELECTION_TIE = 1e-10
# fewer measured trees are refused: fitted on one tree, IrEne+ predicted other models' roots
# on the H200 up to 3.8x off (2 to 4 trees: within 2.3x; tests/test_few_trees.py)
MIN_TREES = 2


class IrenePlusPredictor(Predictor):
    """IrEne with learned unattributed work, weights per kind of child and log-space leaves.

    Args:
        feature_sets: the inputs (only those are used).
        leaf_degrees: candidate polynomial degrees of the log-space leaf regressors. Default:
            power laws only; degrees 2-3 score the same in cross-validation on the published
            models but extrapolate wildly to models outside their range (docs/predict.md).
        leaf_alphas: candidate ridge strengths (per sample, on standardized log features).
        leaf_spaces: candidate spaces of the leaf regressors: ``log`` (power laws) and
            ``linear`` (sums of measured parts).
        inner_ridge: pull of the child weights towards 1 and of the unattributed
            coefficients towards 0 (on the relative-error scale).
        nonnegative: child weights and the coefficients of unattributed FLOP and bytes are
            ≥ 0 (the constant and measured-time terms stay free).
        refit_iterations: refits of the inner model on composed child predictions.
        fallback: use an op-agnostic leaf regressor for unseen primitive types (else error).
        select_by_cv: choose each leaf regressor's degree and ridge strength by
            leave-one-model-out inside the training models (else the first candidates).
    """

    name = "irene_plus"
    constraints = {
        "leaf_degrees": Each(Range(int, 1, 3)),
        "leaf_alphas": Each(Range(float, 0, 1e6)),
        "leaf_spaces": Each(OneOf(("log", "linear"))),
        "inner_ridge": Range(float, 0, 1e6),
        "refit_iterations": Range(int, 0, 100),
    }

    def __init__(self, feature_sets: list[str] = ALL_FEATURE_SETS,
                 leaf_degrees: list[int] = (1,), leaf_alphas: list[float] = (1e-6, 1e-4, 1e-2),
                 leaf_spaces: list[str] = ("log", "linear"), inner_ridge: float = 1e-3,
                 nonnegative: bool = True, refit_iterations: int = 2, fallback: bool = True,
                 select_by_cv: bool = True):
        self.feature_sets = feature_sets
        self.leaf_degrees = leaf_degrees
        self.leaf_alphas = leaf_alphas
        self.leaf_spaces = leaf_spaces
        self.inner_ridge = inner_ridge
        self.nonnegative = nonnegative
        self.refit_iterations = refit_iterations
        self.fallback = fallback
        self.select_by_cv = select_by_cv

    # ------------------------------------------------------------------------ fitting
    def fit(self, forest: Forest) -> IrenePlusPredictor:
        self.validate_params()
        trees = len(np.unique(forest.tree_index[measured(forest)]))
        if 0 < trees < MIN_TREES:  # one configuration cannot tell how energy grows with size
            raise TooFewTreesError(f"IrEne+ needs measured trees of at least {MIN_TREES} "
                                   f"configurations to fit; got {trees}")
        self.features_ = feature_list(list(self.feature_sets))
        self.extra_features_ = [f for f in EXTRA_FEATURES if f in self.features_]
        x = forest.matrix(self.features_)
        self._fit_leaves(forest, x)
        leaf_pred, _ = self._predict_leaves(forest, x)
        self._fit_inner(forest, leaf_pred)
        return self

    def _candidates(self) -> list[tuple[str, int, float]]:
        """(space, degree, alpha) of every leaf regressor to choose from; the linear space
        only with degree 1 (a sum of measured parts needs no curvature)."""
        degrees = [int(d) for d in self.leaf_degrees
                   if int(d) < 3 or len(self.features_) <= MAX_FEATURES_FOR_CUBIC]
        degrees = degrees or [min(int(d) for d in self.leaf_degrees)]
        out = []
        for space in self.leaf_spaces:
            for d in degrees if space == "log" else [1]:
                out.extend((space, d, float(a)) for a in self.leaf_alphas)
        return out

    def _fit_leaves(self, forest: Forest, x: np.ndarray) -> None:
        leaves = forest.is_leaf & measured(forest)
        if not leaves.any():
            raise InputError("no measured leaf (ml) nodes to fit the leaf regressors on")
        self.leaf_models_: dict[str, LogPolyRegressor] = {}
        self.leaf_cv_error_pct_: dict[str, float] = {}
        for op in sorted(set(forest.op_type[leaves])):
            x_op, y_op, group_op, count, code = _leaf_rows(forest, self.features_, op,
                                                           with_codes=True)
            (space, degree, alpha), error = self._select(
                x_op, y_op, group_op, count,
                sums=lambda space, degree, op=op: _LeafSums.of(forest, self.features_, op, space,
                                                               degree), codes=code)
            self.leaf_models_[op] = LogPolyRegressor.fit(x_op, y_op, degree=degree, alpha=alpha,
                                                         sample_weight=count, space=space)
            self.leaf_cv_error_pct_[op] = error
        # op-agnostic regressor (log space: it must span decades) for unseen primitive types
        x_all, y_all, _, count = _leaf_rows(forest, self.features_, None)
        self.global_leaf_model_ = LogPolyRegressor.fit(
            x_all, y_all, degree=min(2, max(int(d) for d in self.leaf_degrees)),
            alpha=float(min(self.leaf_alphas)), sample_weight=count, space="log")

    def _select(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, count: np.ndarray,
                sums: Callable[[str, int], _LeafSums] | None = None,
                codes: np.ndarray | None = None) -> tuple[tuple[str, int, float], float]:
        """Space, degree and ridge strength by leave-one-model-out inside the training models
        (mean % error over the held-out models, each node counted as often as it occurs).

        Every held-out fit is the ridge regression of :class:`LogPolyRegressor` on the other
        models. With ``sums`` (``sums(space, degree)``: the data set's :class:`_LeafSums`,
        computed once and shared by every fold cut from it) and at least
        ``SUMS_ROWS_PER_TERM`` rows per coefficient in every held-out fit, it is solved from
        the sums per model and the held-out model's rows are predicted from their expansion in
        the sums' standardisation (:meth:`_LeafSums.held_out_errors`): the same fit and
        errors to rounding (tested), in time that does not grow with the other models'
        rows. Otherwise (few rows, where small ridges are ill-conditioned and rounding could
        change the choice; or no ``sums``) each held-out fit is fit on the rows. Errors equal
        to ``SELECTION_TIE`` (relative) are a tie, won by the earlier candidate.
        The chosen regressor is then fit on the rows. ``codes``: an integer per row, equal
        where ``groups`` are (found from ``groups`` when not given).
        """
        candidates = self._candidates()
        held_rows = _rows_by_model(groups, codes)  # in the order the models first occur
        models = list(held_rows)
        if not self.select_by_cv or len(models) < 2 or len(candidates) == 1:
            return candidates[0], float("nan")
        errors = np.zeros(len(candidates))
        by_form: dict[tuple[str, int], list[int]] = {}
        for i, (space, degree, _) in enumerate(candidates):
            by_form.setdefault((space, degree), []).append(i)
        fewest = len(x) - max(len(rows) for rows in held_rows.values())  # rows of a held-out fit
        for (space, degree), indices in by_form.items():
            width = len(polynomial_powers(x.shape[1], max(degree, 1)))
            if sums is None or fewest < SUMS_ROWS_PER_TERM * width:
                self._select_direct(x, y, count, held_rows, space, degree, indices, errors)
                continue
            alphas = [candidates[i][2] for i in indices]
            form = sums(space, degree)
            if not form.holds(models, {name: len(rows) for name, rows in held_rows.items()}):
                self._select_direct(x, y, count, held_rows, space, degree, indices, errors)
                continue
            for held_errors in form.held_out_errors(models, alphas):
                errors[indices] += held_errors
        # the first candidate within rounding of the least error: a tie (two forms that fit
        # alike) goes to the earlier, simpler candidate whichever path computed the errors
        best = int(np.flatnonzero(errors <= errors.min() * (1.0 + SELECTION_TIE))[0])
        return candidates[best], float(100.0 * errors[best] / len(models))

    def _select_direct(self, x: np.ndarray, y: np.ndarray, count: np.ndarray,
                       held_rows: dict[str, np.ndarray], space: str, degree: int,
                       indices: list[int], errors: np.ndarray) -> None:
        """The held-out errors of candidates ``indices`` (one space and degree) added to
        ``errors``, each held-out fit a :meth:`LogPolyRegressor.fit` on the other rows."""
        candidates = self._candidates()
        everything = np.arange(len(x))
        for test in held_rows.values():
            train = np.setdiff1d(everything, test)
            for i in indices:
                model = LogPolyRegressor.fit(x[train], y[train], degree=degree,
                                             alpha=candidates[i][2], sample_weight=count[train],
                                             space=space)
                error = np.abs(model.predict(x[test]) / y[test] - 1.0)
                errors[i] += np.average(error, weights=count[test])

    def _residual_design(self, forest: Forest) -> np.ndarray:
        """Columns of the unattributed term: 1, then Δx_k = x_k(node) − Σ_children x_k(child)
        (per node, the same in every forest that holds its tree: computed once per data set)."""
        columns = [np.ones(forest.num_nodes)]  # constant per call (launch overhead)
        if self.extra_features_:
            _check_features(forest, self.extra_features_)  # a missing value is an error here
            columns.extend(_own_work(forest, self.extra_features_).T)
        return np.column_stack(columns)

    def _fit_inner(self, forest: Forest, leaf_pred: np.ndarray) -> None:
        targets = ~forest.is_leaf & measured(forest)
        names, code = _node_kinds(forest)
        self.child_kinds_ = [str(names[c]) for c in np.unique(code[forest.parent >= 0])]
        self.residual_terms_ = ["constant_j"] + [f"extra_{f}" for f in self.extra_features_]
        k = len(self.child_kinds_)
        lower = np.full(k + len(self.residual_terms_), -np.inf)
        if self.nonnegative:
            lower[:k] = 0.0
            for j, name in enumerate(self.extra_features_):
                if name in ("flops", "mem_bytes"):
                    lower[k + 1 + j] = 0.0
        prior = np.concatenate([np.ones(k), np.zeros(len(self.residual_terms_))])
        if not targets.any():  # no measured inner node: the plain sum
            self.child_weights_ = np.ones(k)
            self.residual_coef_ = np.zeros(len(self.residual_terms_))
            self.history_ = []
            return
        # stepwise first (measured children), then on the composed predictions
        # (an unmeasured child counts by the plain sum of its predicted leaves)
        child_values = np.where(measured(forest), forest.gold_j,
                                compose(forest, np.where(forest.is_leaf, leaf_pred, 0.0)))
        design = _InnerDesign(forest, targets, code, names, self.child_kinds_,
                              self._residual_design(forest))
        gold = forest.gold_j[design.rows]
        self.history_ = []
        for iteration in range(self.refit_iterations + 1):
            columns = design.columns(child_values)
            # residual columns rescaled to unit relative size, so one ridge strength fits all
            scale = np.ones(columns.shape[1])
            col_size = np.median(np.abs(columns[:, k:]) / gold[:, None], axis=0)
            scale[k:] = np.divide(1.0, col_size, out=np.ones_like(col_size),
                                  where=col_size > 0)
            coef = _bounded_relative_lstsq(columns * scale, gold, lower=lower,
                                           ridge=self.inner_ridge, prior=prior) * scale
            self.child_weights_, self.residual_coef_ = coef[:k], coef[k:]
            pred = self._compose(forest, leaf_pred, design.residual)
            self.history_.append(float(np.mean(np.abs(pred[design.rows] / gold - 1))))
            if iteration < self.refit_iterations:
                child_values = pred

    # --------------------------------------------------------------------- prediction
    def _predict_leaves(self, forest: Forest, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _predict_leaves(forest, x, self.leaf_models_,
                              lambda op: self.global_leaf_model_ if self.fallback else None,
                              "set fallback=true to use the op-agnostic regressor")

    def _weights_and_residual(self, forest: Forest, residual_design: np.ndarray | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
        """Each node's weight in its parent's sum and each inner node's unattributed term
        (``residual_design``: :meth:`_residual_design` of ``forest``, when already built)."""
        names, code = _node_kinds(forest)
        position = {name: j for j, name in enumerate(names)}
        table = np.ones(len(names))  # weight per kind of child; a kind not fitted keeps 1
        for kind, weight in zip(self.child_kinds_, self.child_weights_, strict=True):
            if kind in position:
                table[position[kind]] = weight
        weights = table[code]
        if residual_design is None:
            residual_design = self._residual_design(forest)
        residual = np.where(forest.is_leaf, 0.0, residual_design @ self.residual_coef_)
        return weights, residual

    def _compose(self, forest: Forest, leaf_pred: np.ndarray,
                 residual_design: np.ndarray | None = None) -> np.ndarray:
        weights, residual = self._weights_and_residual(forest, residual_design)
        return compose(forest, np.where(forest.is_leaf, leaf_pred, residual), weights)

    def predict(self, forest: Forest, *, return_fallback: bool = False):
        """Predicted energy (J) of every node of ``forest``, in forest order."""
        self.check_fitted()
        leaf_pred, fallback = self._predict_leaves(forest, forest.matrix(self.features_))
        pred = self._compose(forest, leaf_pred)
        return (pred, fallback) if return_fallback else pred

    def explain(self, forest: Forest) -> pd.DataFrame:
        """Every node's energy and, for inner nodes, where it comes from.

        Returns:
            One row per node, in forest order: ``id``, ``model_name``, ``node_type``,
            ``instance_type``, ``predicted_j``, ``weight_in_parent``, ``children_sum_j``
            (Σ predicted children), ``weighted_children_j`` (Σ weight·child),
            ``residual_j`` (the explicit unattributed term), ``unattributed_j``
            (predicted − Σ children: all the energy no child accounts for), ``gold_j``.
            For inner nodes ``predicted_j = weighted_children_j + residual_j``
            ``= children_sum_j + unattributed_j``; leaves have zeros in the child columns.
        """
        import pandas as pd

        self.check_fitted()
        leaf_pred, fallback = self._predict_leaves(forest, forest.matrix(self.features_))
        weights, residual = self._weights_and_residual(forest)
        pred = compose(forest, np.where(forest.is_leaf, leaf_pred, residual), weights)
        children = children_sum(forest, pred)
        weighted = children_sum(forest, weights * pred)
        inner = ~forest.is_leaf
        return pd.DataFrame({
            "id": forest.ids,
            "model_name": forest.node_model_names(),
            "node_type": np.asarray([str(t) for t in NODE_TYPES], dtype=object)[forest.node_type],
            "instance_type": forest.instance_type,
            "predicted_j": pred,
            "weight_in_parent": np.where(forest.parent >= 0, weights, np.nan),
            "children_sum_j": np.where(inner, children, 0.0),
            "weighted_children_j": np.where(inner, weighted, 0.0),
            "residual_j": np.where(inner, residual, 0.0),
            "unattributed_j": np.where(inner, pred - children, 0.0),
            "fallback": fallback,
            "gold_j": forest.gold_j,
        })

    def parameters(self) -> pd.DataFrame:
        """The inner model's learned numbers: one weight per kind of child, then the
        coefficients of the unattributed term (J, J/MFLOP, J/MiB, J/s, J/J)."""
        import pandas as pd

        self.check_fitted()
        names = [f"weight[{k}]" for k in self.child_kinds_] + list(self.residual_terms_)
        return pd.DataFrame({"value": np.concatenate([self.child_weights_, self.residual_coef_])},
                            index=pd.Index(names, name="parameter"))

    # -------------------------------------------------------------------- persistence
    def _get_state(self) -> dict:
        return {
            "features": self.features_, "extra_features": self.extra_features_,
            "leaf_models": {op: m.to_dict() for op, m in self.leaf_models_.items()},
            "leaf_cv_error_pct": self.leaf_cv_error_pct_,
            "global_leaf_model": self.global_leaf_model_.to_dict(),
            "child_kinds": list(self.child_kinds_), "child_weights": self.child_weights_,
            "residual_terms": list(self.residual_terms_), "residual_coef": self.residual_coef_,
            "history": self.history_,
        }

    def _set_state(self, state: dict) -> None:
        self.features_ = list(state["features"])
        self.extra_features_ = list(state["extra_features"])
        self.leaf_models_ = {op: LogPolyRegressor.from_dict(s)
                             for op, s in state["leaf_models"].items()}
        self.leaf_cv_error_pct_ = {op: float("nan") if v is None else v
                                   for op, v in state["leaf_cv_error_pct"].items()}
        self.global_leaf_model_ = LogPolyRegressor.from_dict(state["global_leaf_model"])
        self.child_kinds_ = list(state["child_kinds"])
        self.child_weights_ = np.asarray(state["child_weights"], dtype=np.float64)
        self.residual_terms_ = list(state["residual_terms"])
        self.residual_coef_ = np.asarray(state["residual_coef"], dtype=np.float64)
        self.history_ = list(state["history"])


def _distinct(x: np.ndarray, energy_j: np.ndarray, groups: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (row, energy, model) triples and how often each occurs.

    Identical layers were measured once and the value copied, so most leaf rows repeat; a
    fit weighted by the counts equals the fit on all rows, and is many times faster.

    The triples are sorted by row, energy, then the model's rank among the sorted model
    names, each one taken at its first occurrence: what ``np.unique(key, axis=0,
    return_index=True)`` gives (a stable sort comparing the columns in turn), from one
    ``np.lexsort`` of the columns, several times faster than sorting the rows as records.
    """
    codes = np.unique(groups, return_inverse=True)[1].ravel()
    key = np.column_stack([x, energy_j, codes])
    order = np.lexsort(key.T[::-1])  # the last key sorts first: column 0 leads
    ranked = key[order]
    new = np.ones(len(ranked), dtype=bool)
    new[1:] = np.any(ranked[1:] != ranked[:-1], axis=1)
    starts = np.flatnonzero(new)
    first = order[starts]
    counts = np.diff(np.append(starts, len(ranked)))
    return x[first], energy_j[first], groups[first], counts.astype(np.float64)


@dataclass
class _LeafSums:
    """Per model, the sums the ridge regression of one primitive type needs, over the model's
    distinct leaf rows, in one reference standardisation (the whole data set's):
    ``gram`` Σ w·z·zᵀ and ``rhs`` Σ w·z·target of the expanded rows z, ``weight`` Σ w, and
    for the standardizer ``count``, ``total``, ``squares`` (Σ 1, Σ u, Σ u² of the reference
    coordinates) and ``low``/``high`` (the raw minimum and maximum, which tell a constant
    column exactly). Any set of models is then one sum and one change of standardisation
    (:func:`polynomial_transform`) away from its normal equations. The rows themselves are
    kept grouped by model (``starts``: each model's first row) for the held-out errors:
    ``expanded`` (z before any division by the energy), ``energy`` and ``row_weight``.
    """

    space: str
    degree: int
    models: dict[str, int]
    reference: Standardizer
    gram: np.ndarray
    rhs: np.ndarray
    weight: np.ndarray
    count: np.ndarray
    total: np.ndarray
    squares: np.ndarray
    low: np.ndarray
    high: np.ndarray
    starts: np.ndarray
    expanded: np.ndarray
    energy: np.ndarray
    row_weight: np.ndarray

    @classmethod
    def of(cls, forest: Forest, features: list[str], op: str, space: str, degree: int
           ) -> _LeafSums:
        """The sums of ``op``'s leaves per model of the data set ``forest`` was cut from
        (computed once per data set, :func:`~irene.data.forest.shared_cache`), when
        ``forest`` holds every tree of each of its models there (the folds of a
        leave-one-model-out); else the sums of ``forest``'s own rows."""
        root = origin(forest)[0]
        if not _whole_models(forest, root):  # some trees of a model: its own rows
            return cls.from_rows(*_distinct_leaves(forest, features, op), space, degree)
        cache = shared_cache(forest).setdefault("irene_plus_leaf_sums", {})
        key = (tuple(features), op, space, degree)
        if key not in cache:
            cache[key] = cls.from_rows(*_data_set_leaves(forest, features, op)[:4], space, degree)
        return cache[key]

    @classmethod
    def from_rows(cls, x: np.ndarray, y: np.ndarray, groups: np.ndarray, weight: np.ndarray,
                  space: str, degree: int) -> _LeafSums:
        """The sums of distinct rows ``x`` (raw features), energies ``y``, models ``groups``
        and row weights ``weight``."""
        inputs = log_features(x) if space == "log" else x
        reference = Standardizer.fit(inputs)
        u = reference.transform(inputs)
        expanded = polynomial_expand(u, max(degree, 1))
        if space == "log":
            z, target = expanded, np.log(y)
        else:  # relative error: each row divided by its energy, the target 1
            z, target = expanded / y[:, None], np.ones(len(expanded))
        models = {name: i for i, name in enumerate(dict.fromkeys(groups))}
        code = np.asarray([models[g] for g in groups], dtype=np.int64)
        order = np.argsort(code, kind="stable")  # each model's rows, in their order
        starts = np.searchsorted(code[order], np.arange(len(models) + 1))
        k, width, f = len(models), z.shape[1], u.shape[1]
        out = cls(space=space, degree=degree, models=models, reference=reference,
                  gram=np.zeros((k, width, width)), rhs=np.zeros((k, width)), weight=np.zeros(k),
                  count=np.zeros(k), total=np.zeros((k, f)), squares=np.zeros((k, f)),
                  low=np.zeros((k, f)), high=np.zeros((k, f)), starts=starts,
                  expanded=expanded[order], energy=y[order], row_weight=weight[order])
        for i in range(k):
            mine = order[starts[i]:starts[i + 1]]
            zw = z[mine] * weight[mine, None]
            out.gram[i] = zw.T @ z[mine]
            out.rhs[i] = zw.T @ target[mine]
            out.weight[i] = weight[mine].sum()
            out.count[i] = len(mine)
            out.total[i] = u[mine].sum(axis=0)
            out.squares[i] = (u[mine] ** 2).sum(axis=0)
            out.low[i] = inputs[mine].min(axis=0)
            out.high[i] = inputs[mine].max(axis=0)
        return out

    def holds(self, models: list[str], rows: dict[str, int]) -> bool:
        """Whether the sums hold each of ``models`` with ``rows[model]`` rows (the rows a
        selection holds out)."""
        return all(m in self.models and self.starts[self.models[m] + 1]
                   - self.starts[self.models[m]] == rows[m] for m in models)

    def held_out_errors(self, models: list[str], alphas: list[float]):
        """For every model of ``models`` held out in turn, the mean relative error on its rows
        (weighted by ``row_weight``) of the fit of the others (:meth:`leave_one_out`), per
        ridge strength. The rows are predicted from their expansion in the reference
        standardisation: the fit's coefficients moved there by the same change of
        standardisation (``z_held = change·z_reference``), so no row is expanded per fold."""
        change, coef = self._leave_one_out(models, alphas)[2:]
        for j, held in enumerate(models):
            i = self.models[held]
            rows = slice(self.starts[i], self.starts[i + 1])
            z = self.expanded[rows] @ (np.swapaxes(change[j], 0, 1) @ coef[j].T)
            pred = z if self.space == "linear" else np.exp(np.clip(z, -50.0, 50.0))
            error = np.abs(pred / self.energy[rows, None] - 1.0)
            weight = self.row_weight[rows]
            yield weight @ error / weight.sum()

    def leave_one_out(self, models: list[str], alphas: list[float]
                      ) -> tuple[list[Standardizer], np.ndarray]:
        """For every model of ``models`` held out, the fit of the others: its standardizer and
        the coefficients of each ridge strength (``coef[held, alpha]``), as
        :meth:`LogPolyRegressor.fit` solves them (normal equations, least squares), all
        held-out models at once."""
        raw_mean, raw_scale, _, coef = self._leave_one_out(models, alphas)
        return [Standardizer(mean_=mean, scale_=scale)
                for mean, scale in zip(raw_mean, raw_scale, strict=True)], coef

    def _leave_one_out(self, models: list[str], alphas: list[float]) -> tuple[np.ndarray, ...]:
        """:meth:`leave_one_out`'s standardizers (means, scales), the changes of
        standardisation from the reference to each and the coefficients."""
        index = np.asarray([self.models[m] for m in models])
        keep = lambda total, part: total.sum(axis=0)[None] - part  # noqa: E731
        gram = keep(self.gram[index], self.gram[index])
        rhs = keep(self.rhs[index], self.rhs[index])
        weight = keep(self.weight[index], self.weight[index])
        n = keep(self.count[index], self.count[index])
        mean = keep(self.total[index], self.total[index]) / n[:, None]
        variance = np.maximum(keep(self.squares[index], self.squares[index]) / n[:, None]
                              - mean**2, 0.0)
        constant = _others(np.minimum, self.low[index]) == _others(np.maximum, self.high[index])
        ref_mean, ref_scale = self.reference.mean_, self.reference.scale_
        raw_mean = ref_mean + ref_scale * mean
        raw_scale = np.where(constant, 0.0, ref_scale * np.sqrt(variance))
        # Standardizer's rule: a (near-)zero variance column keeps scale 1
        eps = 10 * np.finfo(np.float64).eps
        raw_scale = np.where(raw_scale < eps * np.maximum(np.abs(raw_mean), 1.0), 1.0, raw_scale)
        change = polynomial_transform(mean, raw_scale / ref_scale, max(self.degree, 1))
        gram = change @ gram @ np.swapaxes(change, 1, 2)
        rhs = np.einsum("hij,hj->hi", change, rhs)
        free = np.eye(gram.shape[1])
        free[0, 0] = 0.0  # never shrink the intercept
        system = np.stack([gram + (alpha * weight)[:, None, None] * free for alpha in alphas],
                          axis=1)
        coef = _solve_like_lstsq(system, np.broadcast_to(rhs[:, None], system.shape[:-1]))
        return raw_mean, raw_scale, change, coef


def _whole_models(forest: Forest, root: Forest) -> bool:
    """Whether ``forest``, cut from ``root``, holds every tree of each of its models there."""
    if forest is root:
        return True
    counts = shared_cache(forest).get("trees_per_model")
    if counts is None:
        names, number = np.unique(np.asarray(root.model_names, dtype=object), return_counts=True)
        counts = shared_cache(forest)["trees_per_model"] = dict(zip(names, number, strict=True))
    names, number = np.unique(np.asarray(forest.model_names, dtype=object), return_counts=True)
    return all(counts[name] == n for name, n in zip(names, number, strict=True))


def _distinct_leaves(forest: Forest, features: list[str], op: str | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_distinct` of the measured leaves of primitive type ``op`` (None: every type)."""
    rows = forest.is_leaf & measured(forest)
    if op is not None:
        rows &= forest.op_type == op
    rows = np.flatnonzero(rows)
    return _distinct(forest.matrix(features, rows), forest.gold_j[rows],
                     forest.node_model_names()[rows])


def _rows_by_model(groups: np.ndarray, codes: np.ndarray | None = None
                   ) -> dict[str, np.ndarray]:
    """Each model of ``groups`` (in the order they first occur) and its rows (ascending), from
    ``codes`` (an integer per row, equal where ``groups`` are): one sort of integers rather
    than a comparison of every row's name per model."""
    if codes is None:
        codes = np.unique(groups, return_inverse=True)[1].ravel()
    order = np.argsort(codes, kind="stable")
    values, starts = np.unique(codes[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    firsts = order[starts]  # each model's first row
    return {groups[firsts[i]]: order[starts[i]:ends[i]] for i in np.argsort(firsts)}


def _leaf_rows(forest: Forest, features: list[str], op: str | None, *, with_codes: bool = False
               ) -> tuple[np.ndarray, ...]:
    """:func:`_distinct_leaves` of ``forest``, cut from the data set's when ``forest`` holds
    whole models of it (computed once per data set); ``with_codes``: also each row's model as
    an integer (its rank among the data set's sorted model names, None when not cut).

    The same rows in the same order: a distinct triple belongs to one model, and the order
    of :func:`_distinct` (by row, energy, then the model's rank among the sorted model names)
    is the same among any set of models.
    """
    root = origin(forest)[0]
    if not _whole_models(forest, root):
        own = _distinct_leaves(forest, features, op)
        return (*own, None) if with_codes else own
    x, y, groups, count, code, names = _data_set_leaves(forest, features, op)
    if forest is not root:
        present = set(forest.model_names)
        keep = np.asarray([name in present for name in names], dtype=bool)[code]
        x, y, groups, count, code = x[keep], y[keep], groups[keep], count[keep], code[keep]
    return (x, y, groups, count, code) if with_codes else (x, y, groups, count)


def _data_set_leaves(forest: Forest, features: list[str], op: str | None) -> tuple:
    """:func:`_distinct_leaves` of the data set ``forest`` was cut from, once per data set,
    with each row's model as its index among the sorted model names."""
    cache = shared_cache(forest).setdefault("irene_plus_distinct", {})
    key = (tuple(features), op)
    if key not in cache:
        root = origin(forest)[0]
        x, y, groups, count = _distinct_leaves(root, features, op)
        names = sorted(set(root.model_names))
        code = np.searchsorted(np.asarray(names, dtype=object), groups) if len(groups) else groups
        cache[key] = (x, y, groups, count, np.asarray(code, dtype=np.int64), names)
    return cache[key]


def _node_kinds(forest: Forest) -> tuple[np.ndarray, np.ndarray]:
    """The kinds of child (primitive types and "module", sorted) and each node's index there,
    computed once per data set."""
    cache = shared_cache(forest)
    if "irene_plus_kinds" not in cache:
        root = origin(forest)[0]
        kind = np.where(root.is_leaf, root.op_type, MODULE_CHILD).astype(object)
        names, code = np.unique(kind, return_inverse=True)
        cache["irene_plus_kinds"] = (names.astype(object), code.ravel())
    names, code = cache["irene_plus_kinds"]
    return names, code[origin_rows(forest)]


def _own_work(forest: Forest, features: list[str]) -> np.ndarray:
    """x_k(node) − Σ_children x_k(child) of every node for each of ``features``, computed once
    per data set (a node's children are in its tree)."""
    cache = shared_cache(forest).setdefault("irene_plus_own_work", {})
    key = tuple(features)
    if key not in cache:
        root = origin(forest)[0]
        own = root.features[:, [ALL_FEATURES.index(f) for f in features]]
        cache[key] = np.column_stack([own[:, j] - children_sum(root, own[:, j])
                                      for j in range(own.shape[1])])
    return cache[key][origin_rows(forest)]


def _check_features(forest: Forest, names: list[str]) -> None:
    """:meth:`Forest.matrix`'s error for a missing value of ``names`` in ``forest``, with the
    data set's columns looked at once: a forest cut from a data set that lacks none of them
    lacks none either."""
    cache = shared_cache(forest).setdefault("irene_plus_complete", {})
    key = tuple(names)
    if key not in cache:
        root = origin(forest)[0]
        cache[key] = not np.isnan(root.features[:, [ALL_FEATURES.index(f) for f in names]]).any()
    if not cache[key]:
        forest.matrix(names)


class _InnerDesign:
    """The rows the inner model is fit on (``rows``: the measured inner nodes of ``forest``)
    and their design: per kind of child (``child_kinds``), the sum over each row's children of
    that kind of a value, then the unattributed columns (``residual``: every node's, of
    :meth:`IrenePlusPredictor._residual_design`).

    The sums are one ``bincount`` over the edges into the rows, built once per fit and used by
    every refit: each sum adds the same children in the same order as a
    :func:`~irene.data.forest.children_sum` per kind over the whole forest (which adds 0 for
    the children of other kinds), so the columns are the same floats.
    """

    def __init__(self, forest: Forest, targets: np.ndarray, code: np.ndarray, names: np.ndarray,
                 child_kinds: list[str], residual: np.ndarray):
        self.rows = np.flatnonzero(targets)
        self.kinds = len(child_kinds)
        self.residual = residual
        self.residual_rows = residual[self.rows]
        position = np.full(forest.num_nodes, -1)
        position[self.rows] = np.arange(len(self.rows))
        child = np.flatnonzero(forest.parent >= 0)
        self.child = child[targets[forest.parent[child]]]
        index = {str(name): j for j, name in enumerate(names)}
        kind_of_code = np.full(len(names), -1)
        for j, kind in enumerate(child_kinds):
            kind_of_code[index[kind]] = j
        self.slot = position[forest.parent[self.child]] * self.kinds + kind_of_code[code[self.child]]

    def columns(self, values: np.ndarray) -> np.ndarray:
        """The design of ``rows`` with children's values ``values`` (every node's)."""
        sums = np.bincount(self.slot, weights=values[self.child],
                           minlength=len(self.rows) * self.kinds)
        return np.hstack([sums.reshape(len(self.rows), self.kinds), self.residual_rows])


def _bounded_relative_lstsq(design: np.ndarray, target_j: np.ndarray, *, lower: np.ndarray,
                            ridge: float, prior: np.ndarray) -> np.ndarray:
    """:func:`~irene.predictors.leaves.relative_lstsq` with bounds, solved on the triangle of
    its rows: with A, b its rows (ridge rows included) and ``[R c; 0 ρ]`` the R factor of the
    QR decomposition of ``[A b]``, ``‖A·x − b‖² = ‖R·x − c‖² + ρ²`` for every x, so the
    bounded least squares of the (k+1)×k system ``[R; 0]``, ``[c; ρ]`` has the same
    minimiser, the same cost and the same gradient at every step, without a pass over the n
    rows per step (R from :func:`_triangle`). Equal to the fit on the rows to rounding
    (tested). With no ridge rows (the rows may then be rank-deficient, where the cut-off of
    the rows' least squares matters), no bounds or fewer rows than columns:
    :func:`relative_lstsq` itself."""
    k = design.shape[1]
    if ridge <= 0 or np.all(np.isneginf(lower)) or len(design) <= k:
        return relative_lstsq(design, target_j, lower=lower, ridge=ridge, prior=prior)
    from scipy.optimize import lsq_linear

    scale = 1.0 / target_j
    rows = np.empty((len(design) + k, k + 1))
    np.multiply(design, scale[:, None], out=rows[:len(design), :k])
    rows[:len(design), k] = target_j * scale
    rows[len(design):, :k] = np.sqrt(ridge) * np.eye(k)
    rows[len(design):, k] = np.sqrt(ridge) * prior
    triangle = _triangle(rows)
    return lsq_linear(triangle[:, :k], triangle[:, k], bounds=(lower, np.full(k, np.inf)),
                      method="bvls").x


# Cholesky QR stands for Householder QR where the rows' condition number is below this
CHOLESKY_QR_CONDITION = 1e6


def _triangle(rows: np.ndarray) -> np.ndarray:
    """An upper triangle R with ``Rᵀ·R = rowsᵀ·rows`` (the R factor of a QR decomposition of
    ``rows``, to the signs of its rows), by Cholesky QR twice where ``rows`` are well
    conditioned: R₁ from the Cholesky factor of the Gram matrix, then the Cholesky factor R₂
    of the Gram matrix of ``rows·R₁⁻¹`` (orthonormal but for the first pass's rounding):
    R = R₂·R₁, accurate like Householder's (to about 1e-12 below a condition number of 1e4,
    tested) and three passes of matrix products over the rows instead of a Householder QR,
    which reads the tall rows once per column (25× slower here). Householder QR
    (``np.linalg.qr``) where the condition number exceeds ``CHOLESKY_QR_CONDITION``."""
    from scipy.linalg import solve_triangular

    try:
        first = np.linalg.cholesky(rows.T @ rows, upper=True)
        if np.linalg.cond(first) < CHOLESKY_QR_CONDITION:
            orthonormal = solve_triangular(first, rows.T, trans="T", lower=False).T
            return np.linalg.cholesky(orthonormal.T @ orthonormal, upper=True) @ first
    except np.linalg.LinAlgError:  # not positive definite in floating point: ill-conditioned
        pass
    return np.linalg.qr(rows, mode="r")


def _others(reduce: np.ufunc, values: np.ndarray) -> np.ndarray:
    """Per row j of ``values``, ``reduce`` (``np.minimum``, ``np.maximum``) over every other
    row, from running reductions from both ends (the same values as reducing the rows left
    after deleting row j: minimum and maximum are exact)."""
    prefix = reduce.accumulate(values, axis=0)
    suffix = reduce.accumulate(values[::-1], axis=0)[::-1]
    out = np.empty_like(values)
    out[0], out[-1] = suffix[1], prefix[-2]  # at least two rows (models)
    out[1:-1] = reduce(prefix[:-2], suffix[2:])
    return out


# a system is solved directly where its condition number is below this share of the
# reciprocal cut-off of lstsq (no singular value is near being cut off)
CONDITION_MARGIN = 1e-3


def _solve_like_lstsq(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``np.linalg.lstsq(system[i], rhs[i], rcond=None)[0]`` for every square system of the
    stack ``system`` (…×w×w; ``rhs`` …×w): one stacked ``np.linalg.solve`` where lstsq cuts
    off no singular value (condition number below ``CONDITION_MARGIN`` / (eps·w)), where the
    two are the same solution to rounding; lstsq one system at a time elsewhere."""
    width = system.shape[-1]
    flat_system = system.reshape(-1, width, width)
    flat_rhs = rhs.reshape(-1, width)
    out = np.empty_like(flat_rhs)
    with np.errstate(divide="ignore", invalid="ignore"):
        condition = np.linalg.cond(flat_system)
    direct = np.isfinite(condition) & (condition * np.finfo(np.float64).eps * width
                                       < CONDITION_MARGIN)
    if direct.any():
        out[direct] = np.linalg.solve(flat_system[direct], flat_rhs[direct][..., None])[..., 0]
    for i in np.flatnonzero(~direct):
        out[i] = np.linalg.lstsq(flat_system[i], flat_rhs[i], rcond=None)[0]
    return out.reshape(rhs.shape)


def _op_codes(forest: Forest) -> tuple[np.ndarray, np.ndarray]:
    """The sorted primitive types (``op_type``) of the data set ``forest`` was cut from and
    each node's index there, computed once per data set."""
    cache = shared_cache(forest)
    if "irene_plus_ops" not in cache:
        names, code = np.unique(origin(forest)[0].op_type, return_inverse=True)
        cache["irene_plus_ops"] = (names, code.ravel())
    names, code = cache["irene_plus_ops"]
    return names, code[origin_rows(forest)]


def _predict_leaves(forest: Forest, x: np.ndarray, models: dict, unseen, hint: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`irene.predictors.leaves.predict_leaves` (the same rows, regressors and values),
    with the nodes' primitive types compared as codes computed once per data set rather than
    as strings per fold."""
    ops, code = _op_codes(forest)
    code = np.where(forest.is_leaf, code, -1)
    groups = ((str(ops[c]), code == c) for c in np.unique(code[code >= 0]))  # sorted types
    return predict_leaf_groups(forest, x, groups, models, unseen, hint)
