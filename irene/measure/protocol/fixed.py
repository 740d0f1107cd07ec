"""The ``fixed`` protocol: windows of at least ``min_window_s`` of calibrated repeats, read
at arbitrary times, so each read can be up to one counter tick stale."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from irene.measure.protocol.counters import Clock, MeterSet
from irene.measure.protocol.windows import NodeMeasurement, Window, _timed
from irene.measure.sampler import Probe, UtilisationSampler
from irene.measure.settings import ProtocolSettings


def calibrate_repeats(fn: Callable[[], object], settings: ProtocolSettings, sync: Callable[[], None],
                      clock: Clock = time.perf_counter) -> int:
    """``fixed``: calls per window so that a window lasts at least ``min_window_s``.

    Times ever larger batches of calls until they take 1% of the window (at least 10 ms),
    then extrapolates with 10% headroom.
    """
    calls, probe_s = 1, max(0.01, settings.min_window_s / 100)
    elapsed = _timed(fn, calls, sync, clock)
    while elapsed < probe_s and calls < settings.max_repeats:
        calls *= 4
        elapsed = _timed(fn, calls, sync, clock)
    per_call_s = max(elapsed / calls, 1e-9)
    return max(1, min(settings.max_repeats, math.ceil(1.1 * settings.min_window_s / per_call_s)))


def _measure_fixed(fn: Callable[[], object], meters: MeterSet, settings: ProtocolSettings, *,
                   sync: Callable[[], None], clock: Clock, probes: list[Probe] | None) -> NodeMeasurement:
    start_s = clock()
    for _ in range(settings.warmup):
        fn()
    repeats = calibrate_repeats(fn, settings, sync, clock)
    sampler = UtilisationSampler(probes, settings.sample_interval_s)
    windows: list[Window] = []
    while len(windows) < settings.windows:
        sampler.start()
        sync()
        v0 = meters.read()
        t0 = clock()
        for _ in range(repeats):
            fn()
        sync()
        elapsed = clock() - t0
        v1 = meters.read()
        sampler.stop()
        if elapsed < settings.min_window_s and repeats < settings.max_repeats:
            # Too short for the counter: lengthen and redo this window.
            repeats = min(settings.max_repeats,
                          math.ceil(repeats * 1.1 * settings.min_window_s / max(elapsed, 1e-9)))
            continue
        windows.append(Window(repeats, meters.truth_j(v1) - meters.truth_j(v0),
                              meters.gpu_j(v1) - meters.gpu_j(v0), elapsed, elapsed))
    return NodeMeasurement.from_windows(windows, energy=meters.measures_energy, gpu=meters.gpu_feature,
                                        utilisation=sampler.means(), measuring_s=clock() - start_s)
