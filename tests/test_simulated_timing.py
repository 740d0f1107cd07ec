"""The simulated meter can tick as an H200's NVML counter does (measure.meter.tick_timing=h200)."""

from __future__ import annotations

import statistics

import pytest

from irene.errors import SettingsError
from irene.measure.meters.simulated import SimulatedMeter


def _update_gaps(timing: str, seconds: float = 30.0, step_s: float = 0.001) -> list[float]:
    now = [0.0]
    meter = SimulatedMeter(clock=lambda: now[0], tick_s=0.1, noise=0.0, resolution_j=0.0,
                           tick_timing=timing)
    changes, last = [], meter.read_energy_j()
    for i in range(1, int(seconds / step_s)):
        now[0] = i * step_s
        value = meter.read_energy_j()
        if value != last:
            changes.append(now[0])
            last = value
    return [b - a for a, b in zip(changes, changes[1:], strict=False)]


def test_h200_timing_has_the_measured_gaps_and_regular_timing_none():
    gaps = _update_gaps("h200")
    assert statistics.median(gaps) == pytest.approx(0.1, abs=0.01)
    assert min(gaps) >= 0.029 and max(gaps) <= 0.126
    assert max(gaps) - min(gaps) > 0.05  # irregular, not a lattice
    regular = _update_gaps("regular")
    assert max(regular) - min(regular) < 0.0025  # every 100 ms, to the read step


def test_an_unknown_tick_timing_is_one_line():
    with pytest.raises(SettingsError, match=r"measure.meter.tick_timing: must be regular or h200"):
        SimulatedMeter(tick_timing="poisson")
