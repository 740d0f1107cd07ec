"""Steady state: the whole model runs in windows until its power and time per call settle."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from irene.measure.protocol.counters import Clock, MeterSet, no_sync
from irene.measure.protocol.windows import _aligned_windows, _chunk_s, _Poller, _seconds_per_call, _window_s
from irene.measure.settings import ProtocolSettings


@dataclass
class SettleReport:
    """How the device was brought to a steady state before the first node.

    Attributes:
        settled: whether the last three windows agreed within the tolerance.
        seconds: time spent.
        windows: windows run.
        power_w: power of the last window (``None`` without a meter).
        time_per_call_s: time per call of the last window.
    """

    settled: bool
    seconds: float
    windows: int
    power_w: float | None
    time_per_call_s: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(vars(self))


def _relative_range(values: list[float]) -> float:
    mean = statistics.fmean(values)
    return (max(values) - min(values)) / mean if mean else 0.0


def settle(fn: Callable[[], object], meters: MeterSet, settings: ProtocolSettings, *,
           sync: Callable[[], None] = no_sync, clock: Clock = time.perf_counter) -> SettleReport:
    """Run ``fn`` (the whole model) in windows until power and time per call settle.

    Settled: at least ``settle_min_s`` spent and the last three windows' power and time per
    call within ``settle_tolerance`` (relative range). Gives up after ``settle_max_s``.
    """
    if settings.settle_min_s <= 0:
        return SettleReport(True, 0.0, 0, None, None)
    start_s = clock()
    chunk_s = _chunk_s(settings, meters)
    per_call_s = _seconds_per_call(fn, chunk_s, settings.max_repeats, sync, clock)
    chunk = max(1, round(chunk_s / per_call_s))
    window_s = _window_s(settings, meters.tick_s or 0.0, chunk * per_call_s)
    poller = _Poller(fn, chunk, meters, sync, clock)
    powers: list[float] = []
    times: list[float] = []
    while True:
        window = _aligned_windows(poller, 1, window_s)[0]
        times.append(window.busy_s / window.calls)
        if meters.measures_energy and window.duration_s > 0:
            powers.append(window.counter_j / window.duration_s)  # the device's, reads included
        elapsed = clock() - start_s
        stable = len(times) >= 3 and _relative_range(times[-3:]) <= settings.settle_tolerance and (
            not powers or _relative_range(powers[-3:]) <= settings.settle_tolerance)
        if (elapsed >= settings.settle_min_s and stable) or elapsed >= settings.settle_max_s:
            return SettleReport(bool(stable), elapsed, len(times), powers[-1] if powers else None, times[-1])
