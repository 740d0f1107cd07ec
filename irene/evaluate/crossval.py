"""Leave-one-model-out cross-validation: train on all models but one, predict the left-out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from irene.data.forest import Forest
from irene.data.tree import ERROR_COLUMNS, NODE_TYPES
from irene.errors import NonFiniteResultError, SettingsError
from irene.evaluate.metrics import errors_by_node_type
from irene.predictors.base import Predictor, clone
from irene.tables import Table

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class CrossValidationResult:
    """``grid`` (a :class:`~irene.tables.Table`) and ``table`` (the same as a pandas frame,
    built when first asked for): one row per left-out model and an ``overall`` row (unweighted
    mean of the rows, as the reference does; every row has every column, so nothing is
    skipped), columns ml / module / model in % error.
    ``predicted_j``: out-of-fold prediction of every node of the forest."""

    grid: Table
    predicted_j: np.ndarray
    fold_models: dict[str, object] = field(repr=False)

    @cached_property
    def table(self) -> pd.DataFrame:
        return self.grid.to_frame()

    def overall(self) -> dict[str, float]:
        """The ``overall`` row: column name → mean % error."""
        return dict(zip(self.grid.columns, self.grid.rows[-1], strict=True))


def fold_table(rows: dict[str, dict[str, float]]) -> Table:
    """The table of per-fold errors: the node types in :data:`ERROR_COLUMNS` order (a fold
    without a type: NaN), then ``overall``, the unweighted mean (NaN if any fold's is)."""
    columns = [t for t in ERROR_COLUMNS if any(t in r for r in rows.values())]
    cells = [[float(r.get(c, np.nan)) for c in columns] for r in rows.values()]
    # each column summed as one contiguous array (pairwise, as pandas' column mean sums it)
    by_column = np.ascontiguousarray(np.asarray(cells, dtype=np.float64).reshape(-1, len(columns)).T)
    overall = by_column.sum(axis=1) / by_column.shape[1] if cells else np.full(len(columns), np.nan)
    return Table(index_names=["left_out_model"],
                 labels=[[name] for name in [*rows, "overall"]], columns=columns,
                 rows=[*cells, [float(v) for v in overall]])


def fit_folds(forest: Forest, predictor: Predictor, train_masks: list[np.ndarray]
              ) -> list[Predictor] | None:
    """The fitted folds of ``predictor`` (one per mask of ``forest``'s trees), trained together
    by the predictor's ``fit_folds`` (e.g. :meth:`IreneModel.fit_folds`); ``None`` when it
    has none: the caller fits ``clone(predictor)`` fold by fold."""
    together = getattr(predictor, "fit_folds", None)
    return None if together is None else together(forest, train_masks)


def fold_errors(name: str, test: Forest, predicted_j: np.ndarray, scored: list[str]
                ) -> dict[str, float]:
    """A fold's % errors per node type (:func:`errors_by_node_type`).

    Raises:
        NonFiniteResultError: a NaN or infinite prediction, or a node type of ``scored``
            the fold has no measured node of (its error would be NaN), naming the fold.
    """
    try:
        errors = errors_by_node_type(test, predicted_j)
    except NonFiniteResultError as error:
        raise NonFiniteResultError(f"fold {name!r} (left out): {error}") from None
    absent = [t for t in scored if t not in errors]
    if absent:
        raise NonFiniteResultError(f"fold {name!r} (left out): no measured {absent} node to "
                                   "score; its error would be NaN")
    return errors


def leave_one_model_out(forest: Forest, predictor: Predictor, *,
                        show_progress: bool = True,
                        on_fold: Callable[[str, dict[str, float], object], None] | None = None,
                        together: bool = False) -> CrossValidationResult:
    """Cross-validate ``predictor`` leaving one model out at a time, in the data's model
    order; every fold fits a fresh ``clone`` of it (``predictor`` stays unfitted).

    ``together``: train the folds together when the predictor can (:func:`fit_folds`):
    much faster with many models, equal to the fold-by-fold fits to rounding only, which
    IrEne's end-to-end training amplifies (on device 2 the table moves in its second
    decimal; docs/performance.md), hence off by default.

    Raises:
        SettingsError: fewer than two models.
        NonFiniteResultError: a fold predicted a NaN or infinite energy, or lacks a node type
            the others score (the message names the fold); never averaged away.
    """
    names = np.asarray(forest.model_names, dtype=object)
    node_names = forest.node_model_names()
    predicted = np.full(forest.num_nodes, np.nan)
    rows, fitted = {}, {}
    folds = list(dict.fromkeys(forest.model_names))
    if len(folds) < 2:
        raise SettingsError(f"leave-one-model-out needs at least two models, got {folds} "
                            "(data.models=null or a list of two or more)")
    scored = [str(NODE_TYPES[c]) for c in sorted(set(forest.node_type[~np.isnan(forest.gold_j)]))]
    fitted_together = (fit_folds(forest, predictor, [names != left_out for left_out in folds])
                       if together else None)
    for i, left_out in enumerate(tqdm(folds, desc="cross-validation", unit="fold",
                                      disable=not show_progress)):
        test = forest.subset(names == left_out)
        fitted_fold = (fitted_together[i] if fitted_together is not None
                       else clone(predictor).fit(forest.subset(names != left_out)))
        fold_pred = fitted_fold.predict(test)
        rows[left_out] = fold_errors(left_out, test, fold_pred, scored)
        predicted[node_names == left_out] = fold_pred
        fitted[left_out] = fitted_fold
        if on_fold is not None:
            on_fold(left_out, rows[left_out], fitted_fold)
    return CrossValidationResult(grid=fold_table(rows), predicted_j=predicted, fold_models=fitted)


# ----------------------------------------------------------------------- repeated over seeds
@dataclass
class SeededCrossValidationResult:
    """Leave-one-model-out repeated over seeds.

    ``folds``: one row per (seed, left-out model), columns ``seed``, ``left_out_model`` and the
    % error per node type; ``seed`` is ``None`` when the predictor does not use a seed (it was
    fit once: :meth:`Predictor.uses_seed`). ``seeds``: the seeds that were fit.
    ``predicted_j``: out-of-fold predictions of the first seed."""

    folds: pd.DataFrame
    seeds: list[int]
    seed_dependent: bool
    predicted_j: np.ndarray

    @property
    def num_seeds(self) -> int:
        """How many times each fold was fit."""
        return max(len(self.seeds), 1)

    def per_seed(self) -> pd.DataFrame:
        """The ``overall`` row of each seed (unweighted mean over the left-out models)."""
        levels = [c for c in ERROR_COLUMNS if c in self.folds.columns]
        return self.folds.groupby("seed", sort=False, dropna=False)[levels].mean()

    def table(self) -> pd.DataFrame:
        """One row per left-out model and ``overall``: the mean over seeds of each node type's
        % error, then its sample standard deviation over seeds (``<type>_sd``; 0 when the
        predictor does not use a seed, NaN with a single seed)."""
        import pandas as pd

        levels = [c for c in ERROR_COLUMNS if c in self.folds.columns]
        rows = {}
        groups = [(m, g[levels]) for m, g in self.folds.groupby("left_out_model", sort=False)]
        for name, values in [*groups, ("overall", self.per_seed())]:
            sd = (values.std(ddof=1) if self.seed_dependent
                  else pd.Series(0.0, index=levels))
            rows[name] = {**values.mean().to_dict(), **{f"{c}_sd": sd[c] for c in levels}}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "left_out_model"
        return table


def _fit_fold(forest: Forest, predictor: Predictor, left_out: str, seeds: list[int],
              threads: int) -> list[tuple[dict[str, float], np.ndarray]]:
    """Errors and predictions of one left-out model, one pair per seed (one pair when
    ``seeds`` is empty: the predictor as it is)."""
    if threads:  # a worker process next to others: one thread each
        from irene.threads import limit_threads

        limit_threads(threads)
    names = np.asarray(forest.model_names, dtype=object)
    train, test = forest.subset(names != left_out), forest.subset(names == left_out)
    fitted = predictor.fit_seeds(train, seeds) if seeds else [clone(predictor).fit(train)]
    out = []
    for model in fitted:
        pred = model.predict(test)
        out.append((errors_by_node_type(test, pred), pred))
    return out


def seeded_leave_one_model_out(forest: Forest, predictor: Predictor, seeds: list[int], *,
                               n_jobs: int = 1,
                               on_fold: Callable[[int | None, str, dict[str, float]], None]
                               | None = None) -> SeededCrossValidationResult:
    """:func:`leave_one_model_out` once per seed, the seed set as the predictor's ``seed``
    hyperparameter (``clone(predictor).set_params(seed=s)``, see :meth:`Predictor.fit_seeds`).

    A predictor whose result does not depend on a seed (:meth:`Predictor.uses_seed` is false)
    is fit once per fold, not ``len(seeds)`` identical times. Folds run in ``n_jobs``
    processes (1: in this one; -1: one per core), each with one thread; results do not
    depend on ``n_jobs``. ``on_fold(seed, left_out, errors)`` runs in this process, in
    (fold, seed) order, as folds finish.
    """
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: {seeds} repeats a seed")
    seed_dependent = predictor.uses_seed()
    fitted_seeds = [int(s) for s in seeds] if seed_dependent else []
    folds = list(dict.fromkeys(forest.model_names))
    if len(folds) < 2:
        raise ValueError(f"leave-one-model-out needs at least two models, got {folds}")
    threads = 1 if n_jobs != 1 else 0
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_fit_fold)(forest, predictor, left_out, fitted_seeds, threads) for left_out in folds)
    node_names = forest.node_model_names()
    predicted = np.full(forest.num_nodes, np.nan)
    records: dict[tuple[int, int], dict] = {}
    for j, (left_out, per_seed) in enumerate(zip(folds, results, strict=True)):
        for i, (seed, (errors, _)) in enumerate(zip(fitted_seeds or [None], per_seed, strict=True)):
            records[i, j] = {"seed": seed, "left_out_model": left_out, **errors}
            if on_fold is not None:
                on_fold(seed, left_out, errors)
        predicted[node_names == left_out] = per_seed[0][1]
    import pandas as pd

    frame = pd.DataFrame.from_records([records[key] for key in sorted(records)])  # seed-major
    return SeededCrossValidationResult(folds=frame, seeds=fitted_seeds,
                                       seed_dependent=seed_dependent, predicted_j=predicted)


# ------------------------------------------------------------- folds over several devices
CV_GROUPS = ("model", "device")  # what a fold leaves out (crossvalidate's cv_group)


def cv_folds(forest: Forest, group: str = "model") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The folds of a cross-validation that leaves out one ``group`` at a time, each
    ``(name, train, test)`` with tree masks, in the data's order:

    * ``model``: one fold per model on each device (named by :meth:`Forest.fold_names`: the
      model's name on one device's data, ``<device>:<model>`` on several). The fold tests the
      model's trees on that device and trains on the trees of every *other* model on every
      device: the left-out model's trees on the other devices stay out of training too, since
      they share its structure and static features (a predictor would meet the left-out
      model in training). On one device's data these are :func:`leave_one_model_out`'s folds.
    * ``device``: one fold per device, trained on the other devices' trees.

    Raises:
        SettingsError: an unknown ``group``, or fewer than two folds.
    """
    if group not in CV_GROUPS:
        raise SettingsError(f"cv_group={group!r}: choose from {list(CV_GROUPS)}")
    if group == "device":
        labels = np.asarray(forest.devices or [], dtype=object)
        names = forest.device_names()
        if len(names) < 2:
            raise SettingsError(f"cv_group=device: leave-one-device-out needs at least two "
                                f"devices, the data set has {names} (data.devices=[device_1,"
                                "device_2], or a trees file of several devices)")
        return [(name, labels != name, labels == name) for name in names]
    fold_names = np.asarray(forest.fold_names(), dtype=object)
    models = np.asarray(forest.model_names, dtype=object)
    names = list(dict.fromkeys(fold_names))
    if len(names) < 2:
        raise SettingsError(f"leave-one-model-out needs at least two models, got {names} "
                            "(data.models=null or a list of two or more)")
    first = {name: i for i, name in reversed(list(enumerate(fold_names)))}
    return [(name, models != models[first[name]], fold_names == name) for name in names]


def cross_validate(forest: Forest, predictor: Predictor, group: str = "model", *,
                   show_progress: bool = True,
                   on_fold: Callable[[str, dict[str, float], object], None] | None = None,
                   together: bool = False) -> CrossValidationResult:
    """Cross-validate ``predictor`` over the folds of :func:`cv_folds`. One device's data
    grouped by model is :func:`leave_one_model_out` itself (the same table, bit for bit);
    otherwise every distinct training set is fitted once (a fresh ``clone``; the folds of one
    model on several devices share theirs). The table's rows are the folds and ``overall``
    (their unweighted mean), its label column ``left_out_model`` or ``left_out_device``.

    Raises:
        SettingsError: see :func:`cv_folds`; ``together`` on several devices or by device.
        NonFiniteResultError: as :func:`leave_one_model_out`, naming the fold.
    """
    if group == "model" and len(forest.device_names()) < 2:
        return leave_one_model_out(forest, predictor, show_progress=show_progress,
                                   on_fold=on_fold, together=together)
    if together:
        raise SettingsError("cv_together=true trains the folds of one device's "
                            "leave-one-model-out together; it does not apply to cv_group="
                            f"{group} on {'+'.join(forest.device_names())}")
    folds = cv_folds(forest, group)
    predicted = np.full(forest.num_nodes, np.nan)
    rows, fitted, by_train = {}, {}, {}
    scored = [str(NODE_TYPES[c]) for c in sorted(set(forest.node_type[~np.isnan(forest.gold_j)]))]
    for name, train, test_trees in tqdm(folds, desc="cross-validation", unit="fold",
                                        disable=not show_progress):
        key = train.tobytes()
        if key not in by_train:
            by_train[key] = clone(predictor).fit(forest.subset(train))
        test = forest.subset(test_trees)
        fold_pred = by_train[key].predict(test)
        rows[name] = fold_errors(name, test, fold_pred, scored)
        predicted[test_trees[forest.tree_index]] = fold_pred
        fitted[name] = by_train[key]
        if on_fold is not None:
            on_fold(name, rows[name], by_train[key])
    grid = fold_table(rows)
    if group == "device":
        grid = Table(index_names=["left_out_device"], labels=grid.labels, columns=grid.columns,
                     rows=grid.rows)
    return CrossValidationResult(grid=grid, predicted_j=predicted, fold_models=fitted)
