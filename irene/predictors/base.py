"""What every predictor is: a scikit-learn estimator over a :class:`~irene.data.forest.Forest`.

The contract (scikit-learn's): ``__init__`` stores its hyperparameters under their own names
and does nothing else, so ``get_params``, ``set_params`` and ``clone`` work; ``fit(forest)``
validates them, learns, stores the learned state in attributes ending in ``_`` and returns
``self``; ``predict(forest)`` returns one energy in joules per node, in forest order.

The base implements that contract itself rather than inheriting ``sklearn.base.BaseEstimator``:
importing ``sklearn.base`` pulls in scipy and costs about 2 s per process, more than a tenth of
a cross-validation. :func:`clone` here and ``sklearn.base.clone`` give equal copies (tested).

This base adds what is the same for every predictor: declarative range checks of the
hyperparameters (:meth:`Predictor.validate_params`, one-line messages with the valid range),
the "not fitted" check, and one save layout: a single ``predictor.json`` holding the class,
the hyperparameters and the learned state as plain JSON (nothing is pickled), read back by
:func:`load`.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from irene import __version__
from irene.data.forest import ALL_FEATURES, Forest, feature_list
from irene.data.io import atomic_write_json
from irene.errors import InputError, MissingInputError, SettingsError

FORMAT_VERSION = 2
STATE_FILE = "predictor.json"


class NotFittedError(RuntimeError):
    """``predict`` or ``save`` before ``fit`` (or ``load``)."""


class NotApplicableError(SettingsError):
    """A predictor cannot run with the selected features (e.g. physics on static features)."""


# ---------------------------------------------------------------------- parameter checks
@dataclass(frozen=True)
class Range:
    """A number in ``[low, high]`` (``low_open``: strictly above ``low``)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def check(self, value: Any) -> str | None:
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or (self.kind is int and not float(value).is_integer())):
            return f"must be {'an integer' if self.kind is int else 'a number'}"
        if not math.isfinite(value):
            return "must be finite"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and value > self.high
        return f"must be in {self.describe()}" if below or above else None

    def describe(self) -> str:
        def number(value: float) -> str:
            return str(int(value)) if self.kind is int else f"{value:g}"

        left = "(" if self.low_open else "["
        low = "-inf" if self.low is None else number(self.low)
        high = "inf" if self.high is None else number(self.high)
        return f"{left}{low}, {high}]"


@dataclass(frozen=True)
class OneOf:
    """One of ``values``."""

    values: tuple

    def check(self, value: Any) -> str | None:
        return None if value in self.values else f"choose from {list(self.values)}"


@dataclass(frozen=True)
class Each:
    """A non-empty list whose every item passes ``item``."""

    item: Range | OneOf

    def check(self, value: Any) -> str | None:
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) == 0:
            return "must be a non-empty list"
        for entry in value:
            problem = self.item.check(entry)
            if problem:
                return f"item {entry!r} {problem}"
        return None


Check = Range | OneOf | Each | Callable[[Any], "str | None"]


def require_features(feature_sets: Sequence[str], needed: Sequence[str], predictor: str) -> None:
    """Raise :class:`NotApplicableError` if ``needed`` features are not in ``feature_sets``."""
    available = feature_list(list(feature_sets))
    missing = [name for name in needed if name not in available]
    if missing:
        raise NotApplicableError(
            f"predictor {predictor!r} needs the features {missing}, which the selected feature "
            f"sets {list(feature_sets)} do not provide (they give {available}); choose "
            "features=both or features=resource_utilization, or another predictor")


def feature_sets_check(value: Any) -> str | None:
    try:
        feature_list(list(value))
    except (ValueError, TypeError) as error:
        return str(error)
    return None


# ------------------------------------------------------------------------------- the base
class Predictor:
    """Base of every predictor. Subclasses set :attr:`name` and :attr:`constraints` and
    implement ``fit``, ``predict``, ``_get_state`` and ``_set_state``."""

    #: short name, the same as its ``conf/predictor/<name>.yaml`` option
    name: ClassVar[str] = ""
    #: whether ``conf/predictor/`` can build it (a config schema is registered for it)
    configurable: ClassVar[bool] = True
    #: hyperparameter -> check; validated at the start of ``fit`` (stages call it at start-up)
    constraints: ClassVar[dict[str, Check]] = {"feature_sets": feature_sets_check}

    # ------------------------------------------------- scikit-learn's parameter API
    @classmethod
    def _param_names(cls) -> list[str]:
        """The constructor's arguments: the hyperparameters (no ``*args``/``**kwargs``)."""
        if cls.__init__ is object.__init__:  # no constructor of its own: no hyperparameters
            return []
        signature = inspect.signature(cls.__init__)
        names = []
        for name, parameter in signature.parameters.items():
            if name == "self":
                continue
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise TypeError(f"{cls.__name__}.__init__ takes *args/**kwargs; a predictor's "
                                "hyperparameters are named constructor arguments")
            names.append(name)
        return sorted(names)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The hyperparameters by name (``deep`` adds ``<name>__<sub>`` of nested
        estimators, as scikit-learn does)."""
        params = {}
        for name in self._param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                params.update({f"{name}__{k}": v for k, v in value.get_params().items()})
            params[name] = value
        return params

    def set_params(self, **params: Any) -> Predictor:
        """Set hyperparameters by name; an unknown name raises ``ValueError``."""
        valid = self._param_names()
        for key, value in params.items():
            name, _, sub = key.partition("__")
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}; "
                                 f"valid: {valid}")
            if sub:
                getattr(self, name).set_params(**{sub: value})
            else:
                setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {name: p.default for name, p in
                    inspect.signature(type(self).__init__).parameters.items()}
        changed = [f"{k}={v!r}" for k, v in self.get_params(deep=False).items()
                   if not _same(v, defaults.get(k, inspect.Parameter.empty))]
        return f"{type(self).__name__}({', '.join(changed)})"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass's own ``fit`` also keeps the ranges of the features it was fitted
        on (``ranges_``, :mod:`irene.predictors.ranges`), so predictions outside them are
        flagged whatever the predictor."""
        super().__init_subclass__(**kwargs)
        fit = cls.__dict__.get("fit")
        if fit is None or getattr(fit, "_keeps_ranges", False):
            return

        @functools.wraps(fit)
        def fit_keeping_ranges(self, forest, *args, **kw):
            fitted = fit(self, forest, *args, **kw)
            from irene.predictors.ranges import fit_ranges

            self.ranges_ = fit_ranges(forest, list(getattr(self, "features_", None)
                                                   or ALL_FEATURES))
            return fitted

        fit_keeping_ranges._keeps_ranges = True
        cls.fit = fit_keeping_ranges

    # ---------------------------------------------------------------- contract
    def fit(self, forest: Forest) -> Predictor:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, forest: Forest, *, return_fallback: bool = False):  # pragma: no cover
        raise NotImplementedError

    def validate_params(self) -> None:
        """Raise :class:`~irene.errors.SettingsError` (a ``ValueError``) naming the first
        hyperparameter out of its valid range."""
        checks: dict[str, Check] = {}
        for klass in reversed(type(self).__mro__):
            checks.update(getattr(klass, "constraints", {}) or {})
        params = self.get_params(deep=False)
        for key, check in checks.items():
            if key not in params:
                continue
            value = params[key]
            problem = check.check(value) if hasattr(check, "check") else check(value)
            if problem:
                raise SettingsError(f"predictor.{key}={value!r}: {problem}")

    # ------------------------------------------------------------------ seeds
    def uses_seed(self) -> bool:
        """Whether ``fit``'s result depends on a ``seed`` hyperparameter. False for a
        predictor without one, and for settings where the seed changes nothing (repeating
        such a fit over seeds would give identical results)."""
        return "seed" in self.get_params(deep=False)

    def fit_seeds(self, forest: Forest, seeds: Sequence[int]) -> list[Predictor]:
        """One fitted copy per seed: ``clone(self).set_params(seed=s).fit(forest)`` for each
        ``s``; ``self`` stays unfitted. A subclass may share the part of the fit that the seed
        does not touch, as long as each copy equals the one fitted on its own."""
        if not self.uses_seed():
            raise ValueError(f"predictor {self.name!r} does not use a seed: fit it once")
        return [clone(self).set_params(seed=int(seed)).fit(forest) for seed in seeds]

    def check_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless ``fit`` or ``load`` ran."""
        if not any(k.endswith("_") and not k.startswith("_") for k in vars(self)):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit() or load()")

    # ------------------------------------------------------------- persistence
    def _get_state(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """The learned state as JSON-able values."""
        raise NotImplementedError

    def _set_state(self, state: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write ``predictor.json`` (class, hyperparameters, learned state) into ``directory``."""
        self.check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cls = type(self)
        atomic_write_json(directory / STATE_FILE, {
            "format_version": FORMAT_VERSION, "irene_version": __version__, "predictor": cls.name,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "params": _jsonable(self.get_params(deep=False)), "state": _jsonable(self._get_state()),
            "ranges": getattr(self, "ranges_", None),
        })
        return directory


def clone(predictor: Predictor) -> Predictor:
    """An unfitted copy with deep copies of the same hyperparameters (``sklearn.base.clone``)."""
    params = {k: copy.deepcopy(v) for k, v in predictor.get_params(deep=False).items()}
    return type(predictor)(**params)


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default) if type(value) is type(default) else False
    except (TypeError, ValueError):
        return False


def load(directory: str | Path) -> Predictor:
    """The predictor saved in ``directory`` by :meth:`Predictor.save`.

    Raises:
        MissingInputError: no ``predictor.json`` there.
        InputError: the file is not a predictor this version wrote, naming the field.
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise MissingInputError(f"{path}: no saved predictor there (stage=train writes one)")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a predictor.json ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise InputError(f"{path}: field 'format_version': expected {FORMAT_VERSION}, got "
                         f"{version!r} (retrain with this version)")
    module, _, qualname = str(meta.get("class", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Predictor)):
        raise InputError(f"{path}: field 'class': {meta.get('class')!r} is not a predictor class")
    try:
        model = cls(**meta["params"])
        model.validate_params()
        model._set_state(meta["state"])
    except SettingsError as error:
        raise InputError(f"{path}: field 'params': {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path}: field 'state': unreadable ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if meta.get("ranges") is not None:  # older files have none: nothing is flagged
        try:
            model.ranges_ = _ranges(meta["ranges"])
        except (TypeError, ValueError, IndexError) as error:
            raise InputError(f"{path}: field 'ranges': unreadable ({error})") from None
    return model


def _ranges(value: Any) -> dict[str, dict[str, list[float]]]:
    """The saved feature ranges, checked: ``{kind: {feature: [low, high]}}``."""
    if not isinstance(value, dict):
        raise ValueError("ranges must be an object")
    out = {}
    for kind, features in value.items():
        if not isinstance(features, dict):
            raise ValueError(f"ranges of {kind!r} must be an object")
        out[str(kind)] = {str(name): [float(pair[0]), float(pair[1])]
                          for name, pair in features.items()}
    return out


def _jsonable(value: Any) -> Any:
    """numpy arrays and scalars, tuples and NaN as plain JSON (NaN -> null)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
