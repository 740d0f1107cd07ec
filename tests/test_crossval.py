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


def _pandas_fold_table(rows):
    """The table as it was built with pandas (the main job no longer imports it)."""
    import pandas as pd

    from irene.data.tree import ERROR_COLUMNS

    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table[[t for t in ERROR_COLUMNS if t in table.columns]]
    table.loc["overall"] = table.mean(axis=0, skipna=False)
    table.index.name = "left_out_model"
    return table


def test_the_fold_table_is_the_one_pandas_builds_bit_for_bit(tmp_path):
    import numpy as np
    import pandas as pd

    from irene.data.tree import ERROR_COLUMNS
    from irene.evaluate.crossval import fold_table
    from irene.tables import Table, write_table

    rng = np.random.default_rng(7)
    for case in range(300):
        rows = {f"model {i}, v{case}": {t: float(rng.lognormal(2, 2)) for t in ERROR_COLUMNS
                                        if rng.random() > 0.1}
                for i in range(int(rng.integers(2, 30)))}
        expected, table = _pandas_fold_table(rows), fold_table(rows)
        pd.testing.assert_frame_equal(table.to_frame(), expected, check_exact=True)
        assert table.to_csv() == expected.to_csv(float_format="%.4f")
    ours = write_table(table, tmp_path / "table", "t")
    theirs = write_table(Table.from_frame(expected), tmp_path / "frame", "t")
    assert [p.read_bytes() for p in ours] == [p.read_bytes() for p in theirs]
