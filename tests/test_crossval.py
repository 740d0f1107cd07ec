"""Leave-one-model-out on device 1 reproduces the reference IrEne table."""

from __future__ import annotations

import numpy as np
import pytest

from irene.evaluate.crossval import leave_one_model_out
from irene.predictors.base import Predictor
from irene.predictors.irene import IreneModel

# The reference implementation's published report (its README): ml, module, model % error.
REFERENCE_OVERALL = {"ml": 0.70, "module": 10.12, "model": 6.74}


def test_irene_reproduces_the_reference_within_tolerance(device_forest):
    result = leave_one_model_out(device_forest, IreneModel(show_progress=False),
                                 show_progress=False)
    table = result.table
    assert list(table.columns) == ["ml", "module", "model"]
    assert table.index[-1] == "overall" and len(table) == 7
    for level, reference in REFERENCE_OVERALL.items():
        assert abs(table.loc["overall", level] - reference) <= 1.5, (level, table)
    np.testing.assert_allclose(table.loc["overall"], table.iloc[:-1].mean())
    assert not np.isnan(result.predicted_j).any()


def test_folds_never_train_on_the_left_out_model(device_forest):
    seen = []

    class Spy(Predictor):
        def fit(self, forest):
            seen.append(set(forest.model_names))
            return self

        def predict(self, forest):
            return np.nan_to_num(forest.gold_j, nan=1.0)

    result = leave_one_model_out(device_forest, Spy(), show_progress=False)
    models = set(device_forest.model_names)
    assert [models - s for s in seen] == [{m} for m in dict.fromkeys(device_forest.model_names)]
    assert result.table.to_numpy().max() == pytest.approx(0.0)
