"""One node: measured with the chosen protocol, re-measured while its spread is high."""

from __future__ import annotations

import time
from collections.abc import Callable

from irene.measure.meters.base import EnergyMeter
from irene.measure.protocol.counters import Clock, MeterSet, no_sync
from irene.measure.protocol.fixed import _measure_fixed
from irene.measure.protocol.windows import NodeMeasurement, _measure_aligned
from irene.measure.sampler import Probe
from irene.measure.settings import ProtocolSettings


def _measure_node(fn: Callable[[], object], meters: MeterSet, settings: ProtocolSettings, *,
                  sync: Callable[[], None], clock: Clock, probes: list[Probe] | None) -> NodeMeasurement:
    """One node, re-measured (keeping the tightest) while its spread exceeds the threshold."""
    measure = _measure_fixed if settings.protocol == "fixed" else _measure_aligned
    best: NodeMeasurement | None = None
    spent = 0.0
    for attempt in range(1, settings.max_remeasure + 2):
        current = measure(fn, meters, settings, sync=sync, clock=clock, probes=probes)
        spent += current.measuring_s
        if best is None or current.spread < best.spread:
            best = current
        best.attempts = attempt
        if current.spread <= settings.spread_threshold:
            break
    assert best is not None
    best.measuring_s = spent
    return best


def measure_callable(
    fn: Callable[[], object],
    meter: EnergyMeter,
    settings: ProtocolSettings,
    *,
    sync: Callable[[], None] = no_sync,
    gpu_meter: EnergyMeter | None = None,
    probes: list[Probe] | None = None,
    clock: Clock = time.perf_counter,
) -> NodeMeasurement:
    """Measure one callable (probing the counter's period first unless ``settings.tick_s``).

    Args:
        fn: the call to measure (a node re-run on its captured inputs).
        meter: ground-truth meter; a meter with ``measures_energy = False`` gives no energy.
        settings: protocol settings.
        sync: waits for queued device work; called before every counter read.
        gpu_meter: optional GPU counter whose energy becomes ``gpu_energy_mean`` (not when it
            is the ground-truth meter itself).
        probes: extra utilisation probes (e.g. NVML utilisation and clocks).
        clock: seconds (a simulated device passes its virtual clock).

    Returns:
        Per-call time, energy (if measured), its spread and mean utilisation.
    """
    meters = MeterSet(meter, gpu_meter)
    if settings.protocol == "aligned":
        meters.probe(clock, settings.tick_s)
    return _measure_node(fn, meters, settings, sync=sync, clock=clock, probes=probes)
