"""The measurement protocol: every node of a traced forward pass, re-run in isolation.

For each node: a warm-up, a repeat count calibrated so that one window lasts at least
``min_window_s``, then ``windows`` windows whose energy (meter difference, after a device
synchronise) divided by the repeat count is the energy of one call. Time per call and
resource utilisation (sampled in a background thread) are recorded beside it. A machine
without a meter gets times and utilisation only: ``ground_truth_energy`` stays absent.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from irene.measure.meters.base import EnergyMeter
from irene.measure.sampler import Probe, UtilisationSampler
from irene.measure.trace import Trace

log = logging.getLogger(__name__)


@dataclass
class ProtocolSettings:
    """How each node is measured.

    Attributes:
        min_window_s: shortest energy window in seconds; repeats are calibrated to reach it.
        windows: number of windows per node; their spread is recorded.
        warmup: calls before calibration (allocator, kernel selection, caches).
        reuse_identical: nodes with the same type, input shapes and parameter shapes reuse
            the first one's measurement (as the published data did) and say so.
        sample_interval_s: seconds between utilisation samples.
        max_repeats: upper bound on calls per window.
    """

    min_window_s: float = 2.0
    windows: int = 3
    warmup: int = 3
    reuse_identical: bool = True
    sample_interval_s: float = 0.1
    max_repeats: int = 10_000_000


@dataclass
class NodeMeasurement:
    """What was measured for one node (``None`` = not measured on this machine).

    Attributes:
        times_mean: seconds per call.
        ground_truth_energy: joules per call from the main meter.
        energy_std_j: standard deviation of the per-call energy across windows, joules.
        gpu_energy_mean: joules per call from the GPU's NVML counter.
        utilisation: mean ``cpu``, ``mem`` (percent) and, with a GPU, ``gpu``, ``gpu_mem``
            (percent), ``gpu_clk``, ``gpu_mem_clk`` (MHz).
        repeats: calls per window.
    """

    times_mean: float
    ground_truth_energy: float | None
    energy_std_j: float | None
    gpu_energy_mean: float | None
    utilisation: dict[str, float]
    repeats: int

    def fields(self) -> dict[str, float]:
        """Node fields in the tree format; unmeasured ones are left out."""
        out = dict(self.utilisation)
        out["times_mean"] = self.times_mean
        for key in ("gpu_energy_mean", "ground_truth_energy", "energy_std_j"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def no_sync() -> None:
    """Synchronise nothing (CPU execution is synchronous)."""


def device_sync(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return no_sync


def _timed(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return time.perf_counter() - start


def calibrate_repeats(fn: Callable[[], object], settings: ProtocolSettings, sync: Callable[[], None]) -> int:
    """Calls per window so that a window lasts at least ``min_window_s``.

    Times ever larger batches of calls until they take 1% of the window (at least 10 ms),
    then extrapolates with 10% headroom.
    """
    calls, probe_s = 1, max(0.01, settings.min_window_s / 100)
    elapsed = _timed(fn, calls, sync)
    while elapsed < probe_s and calls < settings.max_repeats:
        calls *= 4
        elapsed = _timed(fn, calls, sync)
    per_call_s = max(elapsed / calls, 1e-9)
    return max(1, min(settings.max_repeats, math.ceil(1.1 * settings.min_window_s / per_call_s)))


def measure_callable(
    fn: Callable[[], object],
    meter: EnergyMeter,
    settings: ProtocolSettings,
    *,
    sync: Callable[[], None] = no_sync,
    gpu_meter: EnergyMeter | None = None,
    probes: list[Probe] | None = None,
) -> NodeMeasurement:
    """Measure one callable with the window protocol.

    Args:
        fn: the call to measure (a node re-run on its captured inputs).
        meter: ground-truth meter; a meter with ``measures_energy = False`` gives no energy.
        settings: protocol settings.
        sync: waits for queued device work; called before every clock and counter read.
        gpu_meter: optional NVML meter whose energy becomes ``gpu_energy_mean``.
        probes: extra utilisation probes (e.g. NVML utilisation and clocks).

    Returns:
        Per-call time, energy (if measured), its spread and mean utilisation.
    """
    for _ in range(settings.warmup):
        fn()
    repeats = calibrate_repeats(fn, settings, sync)
    sampler = UtilisationSampler(probes, settings.sample_interval_s)
    energies, gpu_energies, times = [], [], []
    while len(times) < settings.windows:
        sampler.start()
        sync()
        e0 = meter.read_energy_j() if meter.measures_energy else 0.0
        g0 = gpu_meter.read_energy_j() if gpu_meter is not None else 0.0
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        elapsed = time.perf_counter() - t0
        e1 = meter.read_energy_j() if meter.measures_energy else 0.0
        g1 = gpu_meter.read_energy_j() if gpu_meter is not None else 0.0
        sampler.stop()
        if elapsed < settings.min_window_s and repeats < settings.max_repeats:
            # Too short for the counter: lengthen and redo this window.
            repeats = min(
                settings.max_repeats, math.ceil(repeats * 1.1 * settings.min_window_s / max(elapsed, 1e-9))
            )
            continue
        times.append(elapsed / repeats)
        energies.append((e1 - e0) / repeats)
        gpu_energies.append((g1 - g0) / repeats)
    measured = meter.measures_energy
    return NodeMeasurement(
        times_mean=statistics.fmean(times),
        ground_truth_energy=statistics.fmean(energies) if measured else None,
        energy_std_j=(statistics.stdev(energies) if len(energies) > 1 else 0.0) if measured else None,
        gpu_energy_mean=statistics.fmean(gpu_energies) if gpu_meter is not None else None,
        utilisation=sampler.means(),
        repeats=repeats,
    )


def measure_trace(
    trace: Trace,
    meter: EnergyMeter,
    settings: ProtocolSettings,
    *,
    sync: Callable[[], None] = no_sync,
    gpu_meter: EnergyMeter | None = None,
    probes: list[Probe] | None = None,
) -> dict[str, dict]:
    """Measure every node of a trace captured with ``capture_inputs=True``.

    Args:
        trace: the traced forward pass, with captured inputs.
        meter: ground-truth meter.
        settings: protocol settings.
        sync: device synchronise.
        gpu_meter: optional NVML meter for ``gpu_energy_mean``.
        probes: extra utilisation probes.

    Returns:
        Measured node fields per scope, ready for :func:`irene.measure.trace.node_to_dict`.
    """
    results: dict[str, dict] = {}
    first_by_signature: dict[str, str] = {}
    nodes = trace.nodes()
    ids = {n.scope: trace.node_id(n) for n in nodes}
    with torch.no_grad():
        for index, node in enumerate(nodes):
            source = first_by_signature.get(node.signature)
            if settings.reuse_identical and source is not None:
                fields = {k: v for k, v in results[source].items() if k != "measurement_reused_from"}
                fields["measurement_reused_from"] = ids[source]
                results[node.scope] = fields
                continue
            measurement = measure_callable(
                node.call, meter, settings, sync=sync, gpu_meter=gpu_meter, probes=probes
            )
            results[node.scope] = measurement.fields()
            first_by_signature.setdefault(node.signature, node.scope)
            log.debug(
                "%d/%d %s: %.3g s/call x %d",
                index + 1,
                len(nodes),
                node.scope,
                measurement.times_mean,
                measurement.repeats,
            )
    return results
