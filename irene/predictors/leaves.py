"""The numerical parts predictors share: feature transforms and regressors with a plain,
versionable state (no pickles), least squares on relative error, and the per-primitive leaf
fit and prediction."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations_with_replacement, product

import numpy as np

from irene.data.forest import Forest
from irene.errors import InputError


@dataclass
class Standardizer:
    """``(x - mean_) / scale_``, constant columns left unscaled (as scikit-learn does)."""

    mean_: np.ndarray
    scale_: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        return cls.from_moments(x.mean(axis=0), x.std(axis=0))

    @classmethod
    def from_moments(cls, mean: np.ndarray, std: np.ndarray) -> Standardizer:
        """The standardizer of columns with these means and standard deviations."""
        # sklearn's rule: a (near-)zero variance column keeps scale 1
        eps = 10 * np.finfo(np.float64).eps
        scale = np.where(std < eps * np.maximum(np.abs(mean), 1.0), 1.0, std)
        return cls(mean_=mean, scale_=scale)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) / self.scale_

    def to_dict(self) -> dict:
        return {"mean": self.mean_.tolist(), "scale": self.scale_.tolist()}

    @classmethod
    def from_dict(cls, state: dict) -> Standardizer:
        return cls(mean_=np.asarray(state["mean"]), scale_=np.asarray(state["scale"]))


def polynomial_powers(num_features: int, degree: int) -> list[tuple[int, ...]]:
    """Column index tuples of a polynomial expansion, in scikit-learn's output order
    (bias first, then degree 1, 2, ...; within a degree, combinations with replacement)."""
    return list(_powers(num_features, degree))


@lru_cache(maxsize=32)
def _powers(num_features: int, degree: int) -> tuple[tuple[int, ...], ...]:
    terms: list[tuple[int, ...]] = [()]
    for d in range(1, degree + 1):
        terms.extend(combinations_with_replacement(range(num_features), d))
    return tuple(terms)


@lru_cache(maxsize=32)
def expansion_plan(num_features: int, degree: int
                   ) -> tuple[int, list[tuple[slice, np.ndarray, np.ndarray]]]:
    """How :func:`polynomial_expand` builds its columns: the number of terms and, per degree,
    the output columns with the lower-degree column and the input column each one multiplies."""
    terms = _powers(num_features, degree)
    position = {(): 0}
    for i, term in enumerate(terms):
        position[term] = i
    plan = []
    for d in range(1, degree + 1):
        columns = [i for i, term in enumerate(terms) if len(term) == d]
        plan.append((slice(columns[0], columns[-1] + 1),
                     np.asarray([position[terms[i][:-1]] for i in columns]),
                     np.asarray([terms[i][-1] for i in columns])))
    return len(terms), plan


@lru_cache(maxsize=32)
def _shift_pattern(num_features: int, degree: int) -> tuple[np.ndarray, ...]:
    """The terms of :func:`polynomial_transform`: each monomial Π(u_i − a_i) expanded over
    the subsets of its factors; per term its row (monomial), column (the kept u factors),
    the features whose −a it takes and the features of the monomial (padded with
    ``num_features``, whose value is 1)."""
    terms = _powers(num_features, degree)
    position = {term: i for i, term in enumerate(terms)}
    rows, cols, taken, members = [], [], [], []
    for i, term in enumerate(terms):
        for keep in product((True, False), repeat=len(term)):
            rows.append(i)
            cols.append(position[tuple(f for f, k in zip(term, keep, strict=True) if k)])
            gone = [f for f, k in zip(term, keep, strict=True) if not k]
            taken.append(gone + [num_features] * (degree - len(gone)))
            members.append(list(term) + [num_features] * (degree - len(term)))
    return (np.asarray(rows), np.asarray(cols), np.asarray(taken).reshape(len(rows), degree),
            np.asarray(members).reshape(len(rows), degree))


def polynomial_transform(shift: np.ndarray, scale: np.ndarray, degree: int) -> np.ndarray:
    """The matrix T with ``polynomial_expand((u - shift) / scale)[r] = T @ polynomial_expand(u)[r]``
    for every row r (equal in exact arithmetic): a change of standardisation of expanded
    features is one linear map, so sums of expanded rows (Gram matrices) computed once in
    one standardisation serve every other. ``shift`` and ``scale`` of shape (..., F) give
    one T per leading index."""
    shift, scale = np.asarray(shift, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    lead, f = shift.shape[:-1], shift.shape[-1]
    rows, cols, taken, members = _shift_pattern(f, degree)
    ones = np.ones((*lead, 1))
    minus_shift = np.concatenate([-shift, ones], axis=-1)
    inverse_scale = np.concatenate([1.0 / scale, ones], axis=-1)
    values = minus_shift[..., taken].prod(axis=-1) * inverse_scale[..., members].prod(axis=-1)
    width = len(_powers(f, degree))
    out = np.zeros((*lead, width, width))
    np.add.at(out, (..., rows, cols), values)
    return out


EXPAND_ROWS = 512  # rows expanded at a time: the block and its transpose stay in cache


def polynomial_expand(x: np.ndarray, degree: int) -> np.ndarray:
    """All monomials of the columns of ``x`` up to ``degree``, bias column included.

    Equal to ``sklearn.preprocessing.PolynomialFeatures(degree).fit_transform(x)``; each
    degree-k column is one product of a degree-(k-1) column with one input column (the bias
    column 1.0 for degree 1), so every value is the same float whatever the block size.
    Rows are expanded in blocks, one array operation per degree and block, on the block's
    transpose (gathering whole rows is a copy; gathering columns of a wide array is not).
    """
    n, f = x.shape
    width, plan = expansion_plan(f, degree)
    out = np.empty((n, width), dtype=x.dtype)
    block = np.empty((width, min(n, EXPAND_ROWS)), dtype=x.dtype)
    for start in range(0, n, EXPAND_ROWS):
        rows = slice(start, min(n, start + EXPAND_ROWS))
        xt = np.ascontiguousarray(x[rows].T)
        bt = block[:, :xt.shape[1]]
        bt[0] = 1.0
        for columns, lower, factor in plan:
            np.multiply(bt[lower], xt[factor], out=bt[columns])
        out[rows] = bt.T
    return out


LSTSQ_RCOND = 1e-6  # scikit-learn's LinearRegression(tol=1e-6), the cut-off of its lstsq


@dataclass
class LinearLeafRegressor:
    """Standardize, then ordinary least squares: the paper's per-primitive leaf model."""

    scaler: Standardizer
    coef_: np.ndarray
    intercept_: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None
            ) -> LinearLeafRegressor:
        """Least squares with an intercept, as ``sklearn.linear_model.LinearRegression``
        computes it (centre by the weighted means, scale rows by √weight, SVD least squares
        with singular values below 1e-6 of the largest dropped); equal to it to rounding,
        without importing scikit-learn (tested)."""
        scaler = Standardizer.fit(x)
        z = scaler.transform(x)
        y = np.asarray(y, dtype=np.float64)
        if sample_weight is None:
            z_offset, y_offset = z.mean(axis=0), y.mean()
        else:
            weight = np.asarray(sample_weight, dtype=np.float64)
            z_offset = np.average(z, axis=0, weights=weight)
            y_offset = np.average(y, weights=weight)
        zc, yc = z - z_offset, y - y_offset
        if sample_weight is not None:
            root = np.sqrt(weight)
            zc, yc = zc * root[:, None], yc * root
        coef = np.linalg.lstsq(zc, yc, rcond=LSTSQ_RCOND)[0]
        return cls(scaler=scaler, coef_=coef, intercept_=float(y_offset - z_offset @ coef))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.scaler.transform(x) @ self.coef_ + self.intercept_

    def to_dict(self) -> dict:
        return {"scaler": self.scaler.to_dict(), "coef": self.coef_.tolist(),
                "intercept": self.intercept_}

    @classmethod
    def from_dict(cls, state: dict) -> LinearLeafRegressor:
        return cls(scaler=Standardizer.from_dict(state["scaler"]),
                   coef_=np.asarray(state["coef"]), intercept_=float(state["intercept"]))


def log_features(x: np.ndarray) -> np.ndarray:
    """``log1p`` of non-negative features: FLOP, bytes and sizes span decades (0 stays 0)."""
    return np.log1p(np.maximum(x, 0.0))


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


# a direction of the centred, standardized design is flat when the rows' spread along it is
# below this share of their spread along the main direction (singular values). Device 1's
# LayerNorm rows (hidden size 768 everywhere) have directions at 4.6e-4 (bytes against FLOP:
# fitted coefficient +14) and 2.8e-3 (input size against batch and sequence: the hidden size);
# 1e-2 also caught directions of measured features that predict left-out published models
# (device 1 crossvalidation, default features: ml 0.548 -> 0.572 %); docs/transfer.md
FLAT_DIRECTION_SHARE = 5e-3
# how far beyond the training rows' interval along a flat direction a row may still go, in
# widths of that interval: a left-out published model's rows stay within 3 widths (so device
# 1's cross-validations are unchanged to the bit), another GPU's convention lies hundreds of
# widths out (device 1's LayerNorm: the H200 rows at -0.65 against ±0.002); docs/transfer.md
FLAT_MARGIN = 3.0


@dataclass
class FlatDirections:
    """Directions of a regressor's expanded inputs along which its training rows hardly varied,
    and the interval of the rows' coordinates along each: beyond it the regressor is flat.

    A ridge fit with a small strength gives such directions any coefficients that cancel on
    the training rows: device 1's LayerNorm rows (hidden size 768 everywhere) make log bytes,
    log FLOP and log input size one direction up to offsets, and the fit puts +14 on a
    direction whose coordinates span ±0.002 there, which rows of another GPU's convention
    reach at −0.65 (a factor e⁹). Clamping a row's coordinates to the training interval keeps
    every prediction inside the training rows' reach unchanged (to the bit) and stops the
    extrapolation along what the rows never showed.

    Attributes:
        directions: m×w orthonormal rows (w: the expanded inputs without the bias column).
        centre: the rows' weighted mean of the expanded inputs (w).
        low, high: per direction, the least and largest coordinate of a training row.
    """

    directions: np.ndarray
    centre: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def of(cls, z: np.ndarray, weight: np.ndarray,
           share: float = FLAT_DIRECTION_SHARE) -> FlatDirections | None:
        """The flat directions of expanded rows ``z`` (bias column first) with row weights
        ``weight``: right singular vectors of the centred, √weight-scaled inputs whose singular
        value is below ``share`` of the largest (all of them when the rows are all equal;
        those beyond the rows' rank when there are fewer rows than inputs). None: no flat
        direction."""
        inputs = z[:, 1:]
        if inputs.shape[1] == 0:
            return None
        centre = np.average(inputs, axis=0, weights=weight)
        centred = inputs - centre
        # all w right singular vectors; the n×n left ones only where n < w (n×n for all the
        # leaf rows of a data set was most of a cross-validation's time: 515 s at 48 models)
        _, singular, vt = np.linalg.svd(centred * np.sqrt(weight)[:, None],
                                        full_matrices=len(centred) < centred.shape[1])
        values = np.zeros(len(vt))
        values[:len(singular)] = singular
        flat = values <= share * values[0] if values[0] > 0 else np.ones(len(vt), dtype=bool)
        if not flat.any():
            return None
        directions = vt[flat]
        coords = centred @ directions.T
        return cls(directions=directions, centre=centre, low=coords.min(axis=0),
                   high=coords.max(axis=0))

    def clamp(self, z: np.ndarray) -> np.ndarray:
        """Expanded rows ``z`` with their coordinates along the directions moved into the
        training interval widened by :data:`FLAT_MARGIN` of its width on either side (``z``
        itself when every row is inside it)."""
        coords = (z[:, 1:] - self.centre) @ self.directions.T
        reach = FLAT_MARGIN * (self.high - self.low)
        shift = np.clip(coords, self.low - reach, self.high + reach) - coords
        outside = np.any(shift != 0.0, axis=1)
        if not outside.any():
            return z
        out = z.copy()
        out[outside, 1:] += shift[outside] @ self.directions
        return out

    def to_dict(self) -> dict:
        return {"directions": self.directions.tolist(), "centre": self.centre.tolist(),
                "low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_dict(cls, state: dict) -> FlatDirections:
        directions = np.asarray(state["directions"], dtype=np.float64)
        return cls(directions=directions.reshape(-1, len(state["centre"])),
                   centre=np.asarray(state["centre"], dtype=np.float64),
                   low=np.asarray(state["low"], dtype=np.float64),
                   high=np.asarray(state["high"], dtype=np.float64))


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

    Along the directions of the expanded inputs that the training rows hardly varied in
    (:class:`FlatDirections`, ``flat_``), a row's coordinates are clamped to the training
    rows' interval before the polynomial is applied: the regressor does not extrapolate along
    what it never saw vary (a model saved before ``flat_`` existed loads with none).
    """

    degree: int
    alpha: float
    scaler: Standardizer
    coef_: np.ndarray
    space: str = "log"
    flat_: FlatDirections | None = None

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
        flat = FlatDirections.of(z, weight)
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
        return cls(degree=degree, alpha=alpha, scaler=scaler, coef_=coef, space=space,
                   flat_=flat)

    def expand(self, x: np.ndarray) -> np.ndarray:
        """The regression's inputs for rows ``x``: the polynomial of the standardized features
        (before clamping along the flat directions)."""
        inputs = log_features(x) if self.space == "log" else x
        return polynomial_expand(self.scaler.transform(inputs), max(self.degree, 1))

    def predict(self, x: np.ndarray, *, expanded: np.ndarray | None = None) -> np.ndarray:
        """Energy of rows ``x`` (``expanded``: their :meth:`expand`, when already computed by a
        regressor with the same scaler, space and degree; it is not changed)."""
        z = self.expand(x) if expanded is None else expanded
        if self.flat_ is not None:
            z = self.flat_.clamp(z)
        z = z @ self.coef_
        if self.space == "linear":
            return z
        # clip the exponent: a polynomial far outside its data must not overflow
        return np.exp(np.clip(z, -50.0, 50.0))

    def to_dict(self) -> dict:
        state = {"space": self.space, "degree": self.degree, "alpha": self.alpha,
                 "scaler": self.scaler.to_dict(), "coef": self.coef_.tolist()}
        if self.flat_ is not None:
            state["flat"] = self.flat_.to_dict()
        return state

    @classmethod
    def from_dict(cls, state: dict) -> LogPolyRegressor:
        flat = state.get("flat")
        return cls(degree=int(state["degree"]), alpha=float(state["alpha"]),
                   scaler=Standardizer.from_dict(state["scaler"]), coef_=np.asarray(state["coef"]),
                   space=state.get("space", "log"),
                   flat_=None if flat is None else FlatDirections.from_dict(flat))


def measured(forest: Forest) -> np.ndarray:
    """Mask of nodes with a positive measured energy (the fit targets)."""
    return ~np.isnan(forest.gold_j) & (np.nan_to_num(forest.gold_j) > 0)



def fit_leaf_regressors(forest: Forest, x: np.ndarray) -> dict[str, LinearLeafRegressor]:
    """The paper's leaf model: one standardized linear regression per primitive type, fit on
    the measured leaves of ``forest`` (feature rows ``x``)."""
    leaves = forest.is_leaf & ~np.isnan(forest.gold_j)
    models = {op: LinearLeafRegressor.fit(x[leaves & (forest.op_type == op)],
                                          forest.gold_j[leaves & (forest.op_type == op)])
              for op in sorted(set(forest.op_type[leaves]))}
    if not models:
        raise InputError("no measured leaf (ml) nodes to fit the leaf regressors on")
    return models


def predict_leaves(forest: Forest, x: np.ndarray, models: dict, unseen, hint: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-primitive regressions on the leaves of ``forest``.

    Args:
        forest: the trees; x: its feature rows.
        models: primitive type -> regressor with ``predict(x)``.
        unseen: primitive type -> the regressor to use for a type not in ``models`` (the
            leaf is then marked as a fallback), or None to refuse it.
        hint: how to allow an unseen type, appended to the error.

    Returns:
        Leaf predictions for every node (0 on inner nodes) and the mask of fallback leaves.
    """
    groups = ((op, forest.is_leaf & (forest.op_type == op))
              for op in sorted(set(forest.op_type[forest.is_leaf])))
    return predict_leaf_groups(forest, x, groups, models, unseen, hint)


def predict_leaf_groups(forest: Forest, x: np.ndarray, groups, models: dict, unseen, hint: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_leaves` over given ``(primitive type, row mask)`` groups (every leaf
    in one of them, the types in sorted order)."""
    pred = np.zeros(forest.num_nodes)
    fallback = np.zeros(forest.num_nodes, dtype=bool)
    for op, rows in groups:
        model = models.get(op)
        if model is None:
            model = unseen(op)
            if model is None:
                first = forest.ids[int(np.flatnonzero(rows)[0])]
                raise InputError(f"primitive type {op!r} (node {first!r}) was never seen in "
                                 f"training (known: {sorted(models)}); {hint}")
            fallback |= rows
        pred[rows] = model.predict(x[rows])
    return pred, fallback


