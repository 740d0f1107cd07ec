"""Leave-one-model-out cross-validation: train on all models but one, predict the left-out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import clone
from tqdm.auto import tqdm

from irene.data.forest import Forest
from irene.data.tree import ERROR_COLUMNS, NODE_TYPES
from irene.errors import NonFiniteResultError, SettingsError
from irene.evaluate.metrics import errors_by_node_type
from irene.predictors.base import Predictor


@dataclass
class CrossValidationResult:
    """``table``: one row per left-out model and an ``overall`` row (unweighted mean of the
    rows, as the reference does; every row has every column, so nothing is skipped),
    columns ml / module / model in % error.
    ``predicted_j``: out-of-fold prediction of every node of the forest."""

    table: pd.DataFrame
    predicted_j: np.ndarray
    fold_models: dict[str, object]


def leave_one_model_out(forest: Forest, predictor: Predictor, *,
                        show_progress: bool = True,
                        on_fold: Callable[[str, dict[str, float], object], None] | None = None,
                        ) -> CrossValidationResult:
    """Cross-validate ``predictor`` leaving one model out at a time, in the data's model
    order; every fold fits a fresh ``sklearn.base.clone`` of it (``predictor`` stays unfitted).

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
    for left_out in tqdm(folds, desc="cross-validation", unit="fold", disable=not show_progress):
        train, test = forest.subset(names != left_out), forest.subset(names == left_out)
        fitted_fold = clone(predictor).fit(train)
        fold_pred = fitted_fold.predict(test)
        try:
            rows[left_out] = errors_by_node_type(test, fold_pred)
        except NonFiniteResultError as error:
            raise NonFiniteResultError(f"fold {left_out!r} (left out): {error}") from None
        absent = [t for t in scored if t not in rows[left_out]]
        if absent:
            raise NonFiniteResultError(f"fold {left_out!r} (left out): no measured {absent} "
                                       "node to score; its error would be NaN")
        predicted[node_names == left_out] = fold_pred
        fitted[left_out] = fitted_fold
        if on_fold is not None:
            on_fold(left_out, rows[left_out], fitted_fold)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table[[t for t in ERROR_COLUMNS if t in table.columns]]
    table.loc["overall"] = table.mean(axis=0, skipna=False)
    table.index.name = "left_out_model"
    return CrossValidationResult(table=table, predicted_j=predicted, fold_models=fitted)
