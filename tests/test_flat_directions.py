"""LogPolyRegressor is flat beyond its training rows along the directions they hardly varied
in (irene.predictors.leaves.FlatDirections): collinear features cannot make a wild power law."""

from __future__ import annotations

import numpy as np
import pytest

from irene.data.forest import build_forest
from irene.data.tree import read_trees
from irene.predictors.leaves import (
    FLAT_DIRECTION_SHARE,
    FLAT_MARGIN,
    FlatDirections,
    LogPolyRegressor,
)
from irene.transfer import static_predictor

from .conftest import H200_TREES


def _collinear(n: int = 40, seed: int = 0):
    """Rows whose second and third features are exact multiples of the first (one direction),
    the fourth independent; the energy a power law of the first and the fourth."""
    rng = np.random.default_rng(seed)
    size = np.exp(rng.uniform(2, 9, n))
    other = np.exp(rng.uniform(0, 3, n))
    x = np.column_stack([size, 4 * size, 2 * size + 0.0, other])
    energy = 1e-6 * size ** 0.8 * other ** 0.3 * np.exp(rng.normal(0, 0.05, n))
    return x, energy


@pytest.mark.parametrize("space", ["log", "linear"])
def test_rows_inside_the_training_reach_predict_as_the_plain_fit(space):
    x, y = _collinear()
    model = LogPolyRegressor.fit(x, y, degree=1, alpha=1e-6, space=space)
    assert model.flat_ is not None and len(model.flat_.directions) >= 2
    plain = model.expand(x) @ model.coef_
    plain = plain if space == "linear" else np.exp(plain)
    assert model.predict(x).tobytes() == plain.tobytes()  # clamping moved no training row


@pytest.mark.parametrize("space", ["log", "linear"])
def test_beyond_the_training_rows_a_flat_direction_does_not_change_the_prediction(space):
    """Rows moved far along a direction the training rows hardly varied in (bytes against
    FLOP in another convention) get the same prediction however far they go; the ridge
    coefficients alone (log space: log1p makes the collinearity inexact) would not."""
    x, y = _collinear()
    model = LogPolyRegressor.fit(x, y, degree=1, alpha=1e-6, space=space)
    expanded = model.expand(x[:5])  # degree 1: the bias, then the standardized features

    def moved(direction, t):
        return model.predict(x[:5], expanded=expanded + t * np.r_[0.0, direction])

    flat = model.flat_
    for direction, low, high in zip(flat.directions, flat.low, flat.high, strict=True):
        near, far = moved(direction, 0.5), moved(direction, 30.0)
        np.testing.assert_allclose(far, near, rtol=1e-12)
        # however far the row goes, it moves at most FLAT_MARGIN widths of the training
        # interval beyond it: the prediction changes by at most that much of the slope
        reach = (1 + 2 * FLAT_MARGIN) * (high - low) * abs(direction @ model.coef_[1:])
        base = model.predict(x[:5])
        change = np.log(near / base) if space == "log" else near - base
        assert np.all(np.abs(change) <= reach + 1e-12)
    if space == "log":  # without the clamp: another power law
        along = np.r_[0.0, model.flat_.directions[-1]]
        plain = [(expanded + t * along) @ model.coef_ for t in (0.5, 30.0)]
        assert np.all(np.abs(plain[1] - plain[0]) > 0.05)
    changed = x[:5].copy()
    changed[:, 3] *= 2.0  # the independent feature still moves the prediction
    assert np.any(np.abs(model.predict(changed) / model.predict(x[:5]) - 1) > 0.05)


def test_flat_directions_of_rows_that_vary_in_every_direction_are_none():
    rng = np.random.default_rng(1)
    x = np.exp(rng.uniform(0, 5, (50, 3)))
    model = LogPolyRegressor.fit(x, np.exp(rng.normal(size=50)), degree=1, alpha=1e-6)
    assert model.flat_ is None


def test_the_share_decides_which_directions_are_flat():
    rng = np.random.default_rng(2)
    z = np.column_stack([np.ones(200), rng.normal(size=200), rng.normal(size=200)])
    z[:, 2] = z[:, 1] + 1e-3 * z[:, 2]  # spread 1e-3 / sqrt(2) of the main direction's
    flat = FlatDirections.of(z, np.ones(200))
    assert flat is not None and len(flat.directions) == 1
    np.testing.assert_allclose(np.abs(flat.directions[0]), np.sqrt(0.5), rtol=1e-3)
    assert FlatDirections.of(z, np.ones(200), share=1e-4) is None
    assert FLAT_DIRECTION_SHARE > 1e-3 / np.sqrt(2)


def test_save_and_load_keep_the_flat_directions_and_old_states_still_load():
    x, y = _collinear()
    model = LogPolyRegressor.fit(x, y, degree=2, alpha=1e-4)
    state = model.to_dict()
    again = LogPolyRegressor.from_dict(state)
    off = x[:5] * np.array([1.0, 10.0, 0.1, 1.0])
    assert again.predict(off).tobytes() == model.predict(off).tobytes()
    old = {k: v for k, v in state.items() if k != "flat"}  # saved before flat_ existed
    loaded = LogPolyRegressor.from_dict(old)
    assert loaded.flat_ is None
    assert loaded.predict(x).tobytes() == model.predict(x).tobytes()


def test_device_1_layernorm_is_not_a_wild_power_law_on_the_h200(device_trees):
    """Device 1's LayerNorm rows all have hidden size 768: its static IrEne+ once predicted
    the H200's LayerNorm nodes (another convention's bytes, hidden sizes up to 1024) 5,625x
    off. Now every H200 LayerNorm node is within 10x (the devices differ by about 4x)."""
    source = static_predictor().fit(build_forest(device_trees))
    h200 = build_forest(read_trees(H200_TREES))
    rows = h200.is_leaf & (h200.op_type == "layernorm")
    assert rows.sum() >= 8
    ratio = np.asarray(source.predict(h200))[rows] / h200.gold_j[rows]
    assert np.all(np.maximum(ratio, 1 / ratio) < 10), ratio


@pytest.mark.slow
@pytest.mark.parametrize("feature_sets", [["model_specs"], ["model_specs", "resource_utilization"]])
def test_device_1_cross_validation_is_the_same_to_the_bit_with_and_without_flat_directions(
        device_forest, feature_sets, monkeypatch):
    """A left-out published model stays within the margin: device 1's tables cannot change."""
    from irene.evaluate.crossval import leave_one_model_out
    from irene.predictors.irene_plus import IrenePlusPredictor

    with_flat = leave_one_model_out(device_forest, IrenePlusPredictor(feature_sets=feature_sets),
                                    show_progress=False).predicted_j
    monkeypatch.setattr(FlatDirections, "of", classmethod(lambda cls, *a, **k: None))
    without = leave_one_model_out(device_forest, IrenePlusPredictor(feature_sets=feature_sets),
                                  show_progress=False).predicted_j
    assert with_flat.tobytes() == without.tobytes()
