"""Feature transforms with a plain, versionable state (no pickles): standardization,
polynomial expansion and per-primitive linear leaf regressors."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations_with_replacement

import numpy as np


@dataclass
class Standardizer:
    """``(x - mean_) / scale_``, constant columns left unscaled (as scikit-learn does)."""

    mean_: np.ndarray
    scale_: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        # sklearn's rule: a (near-)zero variance column keeps scale 1
        eps = 10 * np.finfo(np.float64).eps
        scale = np.where(scale < eps * np.maximum(np.abs(mean), 1.0), 1.0, scale)
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
    terms: list[tuple[int, ...]] = [()]
    for d in range(1, degree + 1):
        terms.extend(combinations_with_replacement(range(num_features), d))
    return terms


def polynomial_expand(x: np.ndarray, degree: int) -> np.ndarray:
    """All monomials of the columns of ``x`` up to ``degree``, bias column included.

    Equal to ``sklearn.preprocessing.PolynomialFeatures(degree).fit_transform(x)``; each
    degree-k column is one product of a degree-(k-1) column with one input column.
    """
    n, f = x.shape
    terms = polynomial_powers(f, degree)
    out = np.empty((n, len(terms)), dtype=x.dtype)
    position = {(): 0}
    out[:, 0] = 1.0
    for i, term in enumerate(terms[1:], start=1):
        out[:, i] = out[:, position[term[:-1]]] * x[:, term[-1]]
        position[term] = i
    return out


@dataclass
class LinearLeafRegressor:
    """Standardize, then ordinary least squares: the paper's per-primitive leaf model."""

    scaler: Standardizer
    coef_: np.ndarray
    intercept_: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None
            ) -> LinearLeafRegressor:
        from sklearn.linear_model import LinearRegression

        scaler = Standardizer.fit(x)
        reg = LinearRegression().fit(scaler.transform(x), y, sample_weight=sample_weight)
        return cls(scaler=scaler, coef_=np.asarray(reg.coef_, dtype=np.float64),
                   intercept_=float(reg.intercept_))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.scaler.transform(x) @ self.coef_ + self.intercept_

    def to_dict(self) -> dict:
        return {"scaler": self.scaler.to_dict(), "coef": self.coef_.tolist(),
                "intercept": self.intercept_}

    @classmethod
    def from_dict(cls, state: dict) -> LinearLeafRegressor:
        return cls(scaler=Standardizer.from_dict(state["scaler"]),
                   coef_=np.asarray(state["coef"]), intercept_=float(state["intercept"]))
