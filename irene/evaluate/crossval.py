"""Leave-one-model-out cross-validation: train on all models but one, predict the left-out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import clone
from tqdm.auto import tqdm

from irene.data.forest import Forest
from irene.data.tree import ERROR_COLUMNS
from irene.evaluate.metrics import errors_by_node_type
from irene.predictors.base import Predictor


@dataclass
class CrossValidationResult:
    """``table``: one row per left-out model and an ``overall`` row (unweighted mean of the
    rows, as the reference does), columns ml / module / model in % error.
    ``predicted_j``: out-of-fold prediction of every node of the forest."""

    table: pd.DataFrame
    predicted_j: np.ndarray
    fold_models: dict[str, object]


def leave_one_model_out(forest: Forest, predictor: Predictor, *,
                        show_progress: bool = True,
                        on_fold: Callable[[str, dict[str, float], object], None] | None = None,
                        ) -> CrossValidationResult:
    """Cross-validate ``predictor`` leaving one model out at a time, in the data's model
    order; every fold fits a fresh ``sklearn.base.clone`` of it (``predictor`` stays unfitted)."""
    names = np.asarray(forest.model_names, dtype=object)
    node_names = forest.node_model_names()
    predicted = np.full(forest.num_nodes, np.nan)
    rows, fitted = {}, {}
    folds = list(dict.fromkeys(forest.model_names))
    if len(folds) < 2:
        raise ValueError(f"leave-one-model-out needs at least two models, got {folds}")
    for left_out in tqdm(folds, desc="cross-validation", unit="fold", disable=not show_progress):
        train, test = forest.subset(names != left_out), forest.subset(names == left_out)
        fitted_fold = clone(predictor).fit(train)
        fold_pred = fitted_fold.predict(test)
        predicted[node_names == left_out] = fold_pred
        rows[left_out] = errors_by_node_type(test, fold_pred)
        fitted[left_out] = fitted_fold
        if on_fold is not None:
            on_fold(left_out, rows[left_out], fitted_fold)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table[[t for t in ERROR_COLUMNS if t in table.columns]]
    table.loc["overall"] = table.mean(axis=0)
    table.index.name = "left_out_model"
    return CrossValidationResult(table=table, predicted_j=predicted, fold_models=fitted)
