"""The measurement protocol: every node of a traced forward pass, re-run in isolation.

Two protocols (``ProtocolSettings.protocol``):

* ``aligned`` (default): the meter's update period ("tick") is probed once; a node runs in
  chunks of about ``chunk_s`` of calls with a device synchronise and a counter read after
  each chunk. A window opens at a counter update and closes at the update that ends its
  ``window_ticks`` ticks; the calls between the two updates are counted (interpolated within
  the chunk that saw the update), so the window's energy is exact to the counter's resolution
  and the per-call energy is exact up to where in one chunk the update fell. Windows are
  contiguous: one update closes a window and opens the next. The per-call energy of a node
  is the windows' total energy over their total calls.
* ``fixed``: the former protocol: windows of at least ``min_window_s`` of calibrated repeats,
  read at arbitrary times, so each read can be up to one tick stale.

Around the nodes (:func:`measure_nodes`): the device is first brought to a steady state by
running the whole model until its power and time per call settle; the root is measured
first and again last, and a change beyond ``drift_threshold`` is drift (flagged, and with
``drift_action: remeasure`` every node is measured once more); a node whose window spread
exceeds ``spread_threshold`` is re-measured. A machine without a meter gets times and
utilisation only: ``ground_truth_energy`` stays absent.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from irene.measure.meters.base import EnergyMeter, MeterUnavailableError
from irene.measure.sampler import Probe, UtilisationSampler
from irene.measure.settings import ProtocolSettings
from irene.measure.trace import Trace, TraceNode

__all__ = [
    "MeterSet",
    "NodeMeasurement",
    "ProtocolSettings",
    "TraceMeasurement",
    "device_sync",
    "measure_callable",
    "measure_nodes",
    "measure_trace",
    "probe_tick_s",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
ProgressCallback = Callable[[int, int, str], None]


def no_sync() -> None:
    """Synchronise nothing (CPU execution is synchronous)."""


def device_sync(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return no_sync


# ------------------------------------------------------------------------------------ meters
class MeterSet:
    """The counters read at every window boundary, each exactly once per read.

    Args:
        meter: the ground-truth meter (its parts are summed); a meter with
            ``measures_energy = False`` gives no ground truth.
        gpu_meter: a GPU counter whose energy becomes the ``gpu_energy_mean`` feature. When it
            is the sole ground-truth counter it would *be* the target, so it is not recorded.

    Attributes:
        ground_truth_names: names of the summed ground-truth counters.
        gpu_feature: whether ``gpu_energy_mean`` is recorded.
        tick_s: update period of the slowest counter (set by :meth:`probe`), 0 if continuous.
    """

    def __init__(self, meter: EnergyMeter, gpu_meter: EnergyMeter | None = None) -> None:
        self.meter = meter
        ground_truth = meter.parts() if meter.measures_energy else []
        if gpu_meter is not None and len(ground_truth) == 1 and ground_truth[0] is gpu_meter:
            gpu_meter = None  # the GPU counter is the target itself: never a feature
        self.gpu_feature = gpu_meter is not None
        self.meters: list[EnergyMeter] = []
        for candidate in [*ground_truth, *([gpu_meter] if gpu_meter is not None else [])]:
            if all(candidate is not m for m in self.meters):
                self.meters.append(candidate)
        self._truth = [self._index(m) for m in ground_truth]
        self._gpu = self._index(gpu_meter) if gpu_meter is not None else None
        self.ground_truth_names = [m.name for m in ground_truth]
        self.tick_s: float | None = None
        self.tick_index: int | None = None
        self.read_s = 0.0  # seconds per read of every counter (set by probe)
        self.ticks_s: dict[str, float] = {}

    def _index(self, meter: EnergyMeter) -> int:
        return next(i for i, m in enumerate(self.meters) if m is meter)

    @property
    def gpu_name(self) -> str | None:
        """Name of the counter recorded as ``gpu_energy_mean`` (``None``: not recorded)."""
        return self.meters[self._gpu].name if self._gpu is not None else None

    @property
    def measures_energy(self) -> bool:
        """Whether a ground truth is measured."""
        return bool(self._truth)

    def read(self) -> list[float]:
        """One read of every counter, joules."""
        return [m.read_energy_j() for m in self.meters]

    def truth_j(self, values: list[float]) -> float:
        """The ground-truth energy in a read."""
        return sum(values[i] for i in self._truth)

    def gpu_j(self, values: list[float]) -> float:
        """The GPU feature counter in a read (0 when not recorded)."""
        return values[self._gpu] if self._gpu is not None else 0.0

    def probe(self, clock: Clock = time.perf_counter, tick_s: float | None = None) -> float:
        """Find every counter's update period; windows align to the slowest counter.

        Args:
            clock: seconds.
            tick_s: a known period (skips probing; used for every counter).

        Returns:
            The slowest counter's period in seconds (0 when there is no counter).
        """
        if not self.meters:
            self.tick_s, self.tick_index, self.read_s = 0.0, None, 0.0
            return 0.0
        if tick_s is None:
            probed = [_probe(m, clock) for m in self.meters]
        else:
            probed = [(tick_s, _read_cost_s(m, clock)) for m in self.meters]
        periods = [period for period, _ in probed]
        self.read_s = sum(cost for _, cost in probed)
        self.ticks_s = {m.name: p for m, p in zip(self.meters, periods, strict=True)}
        self.tick_index = max(range(len(periods)), key=periods.__getitem__)
        self.tick_s = periods[self.tick_index]
        return self.tick_s

    def device_state(self) -> dict[str, float | str]:
        """Temperature, clocks, throttle reasons... of every counter's device."""
        state: dict[str, float | str] = {}
        for meter in self.meters:
            state.update(meter.device_state())
        return state


def probe_tick_s(meter: EnergyMeter, clock: Clock = time.perf_counter, *, updates: int = 5,
                 timeout_s: float = 3.0) -> float:
    """The counter's update period: the median interval between observed value changes.

    Reads the counter in a tight loop until it has changed ``updates`` times.

    Raises:
        MeterUnavailableError: when the counter changes fewer than twice within ``timeout_s``.
    """
    return _probe(meter, clock, updates, timeout_s)[0]


def _probe(meter: EnergyMeter, clock: Clock, updates: int = 5, timeout_s: float = 3.0
           ) -> tuple[float, float]:
    """(update period, seconds per read) of a counter."""
    start = clock()
    last = meter.read_energy_j()
    reads = 1
    changed_at: list[float] = []
    now = start
    while len(changed_at) < updates:
        value = meter.read_energy_j()
        reads += 1
        now = clock()
        if value != last:
            changed_at.append(now)
            last = value
        if now - start > timeout_s:
            break
    if len(changed_at) < 2:
        raise MeterUnavailableError(f"the {meter.name} energy counter did not update within {timeout_s} s "
                                    "(its period could not be probed; set measure.tick_s to skip probing)")
    period = statistics.median(b - a for a, b in zip(changed_at, changed_at[1:], strict=False))
    return period, (now - start) / reads


def _read_cost_s(meter: EnergyMeter, clock: Clock, reads: int = 20) -> float:
    start = clock()
    for _ in range(reads):
        meter.read_energy_j()
    return (clock() - start) / reads


# ------------------------------------------------------------------------------- one node
@dataclass
class Window:
    """One energy window: totals, not per call.

    Attributes:
        calls: calls that ran in the window (fractional at aligned boundaries).
        energy_j: ground-truth energy of the calls, joules: the counter's energy over the
            window times the share of the window spent in calls (the rest is counter reads).
        gpu_j: the same for the GPU-feature counter, joules (0 when not recorded).
        busy_s: seconds spent in calls (without counter reads).
        duration_s: seconds from the opening to the closing boundary.
        counter_j: the ground-truth counter's energy over the whole window, joules.
    """

    calls: float
    energy_j: float
    gpu_j: float
    busy_s: float
    duration_s: float
    counter_j: float = 0.0


@dataclass
class NodeMeasurement:
    """What was measured for one node (``None`` = not measured on this machine).

    Attributes:
        times_mean: seconds per call.
        ground_truth_energy: joules per call from the ground-truth meter.
        energy_std_j: standard deviation of the per-call energy across windows, joules.
        gpu_energy_mean: joules per call from a GPU counter that is not the ground truth.
        utilisation: mean ``cpu``, ``mem`` (percent) and, with a GPU, ``gpu``, ``gpu_mem``
            (percent), ``gpu_clk``, ``gpu_mem_clk`` (MHz).
        repeats: calls per window (the mean, for aligned windows).
        windows: the windows measured.
        measuring_s: seconds spent on this node (warm-up, calibration, alignment, windows).
        attempts: measurements taken (more than one: re-measured for its spread).
        chunk: calls between two counter reads (aligned; 0 for fixed windows).
    """

    times_mean: float
    ground_truth_energy: float | None
    energy_std_j: float | None
    gpu_energy_mean: float | None
    utilisation: dict[str, float]
    repeats: int
    windows: list[Window] = field(default_factory=list)
    measuring_s: float = 0.0
    attempts: int = 1
    chunk: int = 0

    @classmethod
    def from_windows(cls, windows: list[Window], *, energy: bool, gpu: bool,
                     utilisation: dict[str, float], measuring_s: float = 0.0) -> NodeMeasurement:
        """Pool windows: total energy over total calls (contiguous windows share boundaries)."""
        calls = sum(w.calls for w in windows)
        per_call = [w.energy_j / w.calls for w in windows]
        return cls(
            times_mean=sum(w.busy_s for w in windows) / calls,
            ground_truth_energy=sum(w.energy_j for w in windows) / calls if energy else None,
            energy_std_j=(statistics.stdev(per_call) if len(per_call) > 1 else 0.0) if energy else None,
            gpu_energy_mean=sum(w.gpu_j for w in windows) / calls if gpu else None,
            utilisation=utilisation,
            repeats=max(1, round(calls / len(windows))),
            windows=windows,
            measuring_s=measuring_s,
        )

    @property
    def spread(self) -> float:
        """Relative spread of the windows: std / mean of the per-call energy (of the time
        per call when no energy is measured); 0 with one window."""
        if len(self.windows) < 2:
            return 0.0
        if self.ground_truth_energy is not None:
            return (self.energy_std_j or 0.0) / self.ground_truth_energy if self.ground_truth_energy else 0.0
        per_call = [w.busy_s / w.calls for w in self.windows]
        return statistics.stdev(per_call) / statistics.fmean(per_call)

    def pooled_with(self, other: NodeMeasurement) -> NodeMeasurement:
        """This measurement and another of the same node as one (their windows pooled)."""
        utilisation = {k: (v + other.utilisation.get(k, v)) / 2 for k, v in self.utilisation.items()}
        pooled = NodeMeasurement.from_windows(
            [*self.windows, *other.windows], energy=self.ground_truth_energy is not None,
            gpu=self.gpu_energy_mean is not None, utilisation=utilisation,
            measuring_s=self.measuring_s + other.measuring_s)
        pooled.attempts = self.attempts + other.attempts
        return pooled

    def fields(self) -> dict[str, float]:
        """Node fields in the tree format; unmeasured ones are left out."""
        out = dict(self.utilisation)
        out["times_mean"] = self.times_mean
        for key in ("gpu_energy_mean", "ground_truth_energy", "energy_std_j"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def _timed(fn: Callable[[], object], calls: int, sync: Callable[[], None], clock: Clock) -> float:
    sync()
    start = clock()
    for _ in range(calls):
        fn()
    sync()
    return clock() - start


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


def _seconds_per_call(fn: Callable[[], object], target_s: float, max_calls: int,
                      sync: Callable[[], None], clock: Clock) -> float:
    """Time doubling batches of calls until one lasts ``target_s``; seconds per call."""
    calls = 1
    elapsed = _timed(fn, calls, sync, clock)
    while elapsed < target_s and calls < max_calls:
        calls = min(max_calls, calls * 2)
        elapsed = _timed(fn, calls, sync, clock)
    return max(elapsed / calls, 1e-9)


@dataclass
class _Boundary:
    """A counter update seen by a read: it fell in ``[low_s, high_s]``, during or around the
    chunk that ran from ``t0`` to ``t1`` after ``calls0`` calls and ``busy0`` busy seconds."""

    low_s: float
    high_s: float
    t0: float
    t1: float
    calls0: float
    busy0: float
    chunk: int
    values: list[float]
    time_s: float = 0.0  # estimated instant of the update
    calls: float = 0.0  # calls completed by then
    busy_s: float = 0.0  # busy seconds by then

    def place(self, when: float) -> _Boundary:
        """Put the update at ``when``: count the calls of the chunk that had run by then."""
        done = min(1.0, max(0.0, (when - self.t0) / (self.t1 - self.t0))) if self.t1 > self.t0 else 1.0
        self.time_s = when
        self.calls = self.calls0 + done * self.chunk
        self.busy_s = self.busy0 + done * (self.t1 - self.t0)
        return self


class _Poller:
    """Runs a callable in chunks and reads every counter after each chunk."""

    def __init__(self, fn: Callable[[], object], chunk: int, meters: MeterSet, sync: Callable[[], None],
                 clock: Clock) -> None:
        self.fn, self.chunk, self.meters, self.sync, self.clock = fn, chunk, meters, sync, clock
        self.calls, self.busy_s = 0, 0.0
        sync()
        before = clock()
        self.values = meters.read()
        self.read_s = (before + clock()) / 2  # when the last read saw the counters

    def step(self) -> tuple[bool, _Boundary]:
        """One chunk and one read: whether the slowest counter changed, and where its update
        may have fallen (meaningful only when it changed)."""
        fn, clock = self.fn, self.clock
        prev_read_s, prev_calls, prev_busy = self.read_s, self.calls, self.busy_s
        t0 = clock()
        for _ in range(self.chunk):
            fn()
        # synchronise before reading the counter, so the chunk's kernels have finished
        self.sync()
        t1 = clock()
        values = self.meters.read()
        t2 = clock()
        index = self.meters.tick_index
        changed = index is not None and values[index] != self.values[index]
        self.calls += self.chunk
        self.busy_s += t1 - t0
        self.values, self.read_s = values, (t1 + t2) / 2
        # The update fell after the previous read and no earlier than one period before this
        # read (a read returns the latest update's value); first guess: the middle.
        tick = self.meters.tick_s or 0.0
        low = max(prev_read_s, self.read_s - tick) if tick > 0 else prev_read_s
        boundary = _Boundary(low, self.read_s, t0, t1, prev_calls, prev_busy, self.chunk, values)
        return changed, boundary.place((low + self.read_s) / 2)

    def next_update(self, not_before: float, timeout_s: float) -> _Boundary:
        """Run chunks until the slowest counter updates at or after ``not_before``."""
        deadline = self.clock() + timeout_s
        while True:
            changed, boundary = self.step()
            if changed and boundary.time_s >= not_before:
                return boundary
            if self.clock() > deadline:
                raise MeterUnavailableError(
                    f"the energy counter stopped updating (no update in {timeout_s:.1f} s)")

    def boundary_now(self) -> _Boundary:
        """The current read as a boundary (for timed windows without a counter)."""
        now = self.read_s
        return _Boundary(now, now, now, now, self.calls, self.busy_s, 0, self.values, now, self.calls,
                         self.busy_s)


def _refine_on_lattice(boundaries: list[_Boundary], tick_s: float) -> bool:
    """Place every update on one lattice ``T0 + k·tick_s`` when all the intervals agree.

    A regular counter updates every ``tick_s``: each boundary's interval, shifted back by its
    whole number of ticks, bounds the same ``T0``, and their intersection is much narrower
    than one chunk. Intervals that do not intersect (an irregular counter) keep the middle of
    their own interval.

    Returns:
        Whether the boundaries were placed on the lattice.
    """
    if tick_s <= 0 or len(boundaries) < 2:
        return False
    first = boundaries[0].time_s
    ks = [round((b.time_s - first) / tick_s) for b in boundaries]
    low = max(b.low_s - k * tick_s for b, k in zip(boundaries, ks, strict=True))
    high = min(b.high_s - k * tick_s for b, k in zip(boundaries, ks, strict=True))
    if low > high:
        return False
    origin = (low + high) / 2
    for b, k in zip(boundaries, ks, strict=True):
        b.place(min(b.high_s, max(b.low_s, origin + k * tick_s)))
    return True


def _window(meters: MeterSet, a: _Boundary, b: _Boundary) -> Window:
    busy_s, duration_s = b.busy_s - a.busy_s, b.time_s - a.time_s
    # The counter ran through the reads between chunks too: the calls' energy is the
    # window's power times the time spent in calls (reads last microseconds, at the
    # device's current power).
    share = min(1.0, busy_s / duration_s) if duration_s > 0 else 1.0
    counter_j = meters.truth_j(b.values) - meters.truth_j(a.values)
    return Window(calls=b.calls - a.calls, energy_j=counter_j * share,
                  gpu_j=(meters.gpu_j(b.values) - meters.gpu_j(a.values)) * share, busy_s=busy_s,
                  duration_s=duration_s, counter_j=counter_j)


def _aligned_windows(poller: _Poller, count: int, window_s: float) -> list[Window]:
    """``count`` contiguous windows between counter updates (timed windows without a counter)."""
    meters, tick = poller.meters, poller.meters.tick_s or 0.0
    timeout_s = window_s + 20 * tick + 5.0
    if meters.tick_index is None:  # no counter: windows of busy time
        start, windows = poller.boundary_now(), []
        for _ in range(count):
            while poller.busy_s - start.busy_s < window_s:
                poller.step()
            end = poller.boundary_now()
            windows.append(_window(meters, start, end))
            start = end
        return windows
    boundaries = [poller.next_update(-math.inf, timeout_s)]  # opens just after an update
    for _ in range(count):
        boundaries.append(poller.next_update(boundaries[-1].time_s + window_s - tick / 2, timeout_s))
    _refine_on_lattice(boundaries, tick)
    return [_window(meters, a, b) for a, b in zip(boundaries, boundaries[1:], strict=False)]


#: Counter reads take at most this share of a chunk: a slow counter gets longer chunks.
MAX_READ_SHARE = 0.02


def _chunk_s(settings: ProtocolSettings, meters: MeterSet) -> float:
    return max(settings.chunk_s, meters.read_s / MAX_READ_SHARE)


def _window_s(settings: ProtocolSettings, tick_s: float, chunk_s: float) -> float:
    """Window length: whole ticks, at least ``min_window_s`` and ``window_ticks`` ticks, and
    ``min_chunks`` times a boundary's uncertainty (the shorter of a chunk and a tick)."""
    uncertainty_s = min(chunk_s, tick_s) if tick_s > 0 else 0.0
    window_s = max(settings.min_window_s, settings.window_ticks * tick_s, settings.min_chunks * uncertainty_s)
    if tick_s > 0:
        window_s = math.ceil(window_s / tick_s - 1e-6) * tick_s
    return window_s


def _measure_aligned(fn: Callable[[], object], meters: MeterSet, settings: ProtocolSettings, *,
                     sync: Callable[[], None], clock: Clock, probes: list[Probe] | None) -> NodeMeasurement:
    start_s = clock()
    for _ in range(settings.warmup):
        fn()
    chunk_s = _chunk_s(settings, meters)
    per_call_s = _seconds_per_call(fn, chunk_s, settings.max_repeats, sync, clock)
    chunk = max(1, min(settings.max_repeats, round(chunk_s / per_call_s)))
    window_s = _window_s(settings, meters.tick_s or 0.0, chunk * per_call_s)
    sampler = UtilisationSampler(probes, settings.sample_interval_s)
    sampler.start()
    try:
        windows = _aligned_windows(_Poller(fn, chunk, meters, sync, clock), settings.windows, window_s)
    finally:
        sampler.stop()
    result = NodeMeasurement.from_windows(windows, energy=meters.measures_energy, gpu=meters.gpu_feature,
                                          utilisation=sampler.means(), measuring_s=clock() - start_s)
    result.chunk = chunk
    return result


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


# --------------------------------------------------------------------------- steady state
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
            powers.append(window.energy_j / window.duration_s)
        elapsed = clock() - start_s
        stable = len(times) >= 3 and _relative_range(times[-3:]) <= settings.settle_tolerance and (
            not powers or _relative_range(powers[-3:]) <= settings.settle_tolerance)
        if (elapsed >= settings.settle_min_s and stable) or elapsed >= settings.settle_max_s:
            return SettleReport(bool(stable), elapsed, len(times), powers[-1] if powers else None, times[-1])


# -------------------------------------------------------------------------------- a trace
@dataclass
class TraceMeasurement:
    """Every node's fields and what happened while measuring them.

    Attributes:
        fields: measured node fields per scope, for :func:`irene.measure.trace.node_to_dict`.
        report: protocol, meters, tick, steady state, device states, drift, re-measured and
            flagged nodes, time spent: the record's ``measurement`` block.
    """

    fields: dict[str, dict]
    report: dict[str, Any]


def _representatives(trace: Trace, reuse: bool) -> list[TraceNode]:
    """The nodes to measure: the first (in tree order) of each signature, or all."""
    seen: set[str] = set()
    chosen = []
    for node in trace.nodes():
        if reuse and node.signature in seen:
            continue
        seen.add(node.signature)
        chosen.append(node)
    return chosen


def _value(m: NodeMeasurement) -> float:
    return m.ground_truth_energy if m.ground_truth_energy is not None else m.times_mean


def measure_nodes(
    trace: Trace,
    meter: EnergyMeter,
    settings: ProtocolSettings,
    *,
    sync: Callable[[], None] = no_sync,
    gpu_meter: EnergyMeter | None = None,
    probes: list[Probe] | None = None,
    clock: Clock = time.perf_counter,
    on_progress: ProgressCallback | None = None,
) -> TraceMeasurement:
    """Measure every node of a trace captured with ``capture_inputs=True``.

    Args:
        trace: the traced forward pass, with captured inputs.
        meter: ground-truth meter.
        settings: protocol settings.
        sync: device synchronise.
        gpu_meter: optional GPU counter for ``gpu_energy_mean``.
        probes: extra utilisation probes.
        clock: seconds.
        on_progress: called after every node as ``(done, total, scope)``.

    Returns:
        Node fields per scope and the measurement report.
    """
    start_s = clock()
    meters = MeterSet(meter, gpu_meter)
    tick_s = meters.probe(clock, settings.tick_s) if settings.protocol == "aligned" else None
    ids = {n.scope: trace.node_id(n) for n in trace.nodes()}
    root = trace.root
    others = [n for n in _representatives(trace, settings.reuse_identical) if n is not root]
    rng = random.Random(settings.order_seed)
    plan = {"total": len(others) + 2, "done": 0}

    def measure(node: TraceNode) -> NodeMeasurement:
        result = _measure_node(node.call, meters, settings, sync=sync, clock=clock, probes=probes)
        plan["done"] += 1
        if on_progress is not None:
            on_progress(plan["done"], plan["total"], node.scope)
        log.debug("%s: %.3g s/call x %d, spread %.2f%%", node.scope, result.times_mean, result.repeats,
                  100 * result.spread)
        return result

    def one_pass() -> dict[str, NodeMeasurement]:
        order = list(others)
        if settings.shuffle:
            rng.shuffle(order)  # drift then hits random nodes, not one depth or one layer
        return {node.scope: measure(node) for node in order}

    with torch.no_grad():
        state_before = meters.device_state()
        settled = settle(root.call, meters, settings, sync=sync, clock=clock)
        state_start = meters.device_state()
        root_first = measure(root)
        results = one_pass()
        root_last = measure(root)
        drift_first = _value(root_last) / _value(root_first) - 1
        drift, passes, moved = drift_first, 1, []
        if abs(drift_first) > settings.drift_threshold and settings.drift_action == "remeasure":
            log.warning("drift: the root moved %+.1f%% between the first and the last node; "
                        "measuring every node once more", 100 * drift_first)
            plan["total"] += len(others) + 1
            again = one_pass()
            root_again = measure(root)
            moved = [ids[s] for s, m in again.items()
                     if abs(_value(m) / _value(results[s]) - 1) > settings.drift_threshold]
            results, passes = again, 2
            drift = _value(root_again) / _value(root_last) - 1
            root_final = root_last.pooled_with(root_again)
        else:
            root_final = root_first.pooled_with(root_last)
        state_end = meters.device_state()
    results[root.scope] = root_final
    if abs(drift) > settings.drift_threshold:
        log.warning("drift: the root moved %+.1f%% during the measurement (flagged in the record)",
                    100 * drift)

    fields: dict[str, dict] = {}
    by_signature = {n.signature: n.scope for n in [root, *others]}
    for node in trace.nodes():
        if node.scope in results:
            fields[node.scope] = results[node.scope].fields()
        else:
            source = by_signature[node.signature]
            fields[node.scope] = {**fields.get(source, results[source].fields()),
                                  "measurement_reused_from": ids[source]}
    spreads = {s: m.spread for s, m in results.items()}
    report: dict[str, Any] = {
        "protocol": settings.protocol,
        "meter": meter.name,
        "ground_truth_meter": "+".join(meters.ground_truth_names) or "none",
        "gpu_energy_mean_meter": meters.gpu_name,
        "tick_s": tick_s,
        "ticks_s": meters.ticks_s,
        "windows": settings.windows,
        "settle": settled.as_dict(),
        "state_before": state_before,
        "state_start": state_start,
        "state_end": state_end,
        "drift": drift,
        "drift_first_pass": drift_first,
        "drift_flagged": abs(drift) > settings.drift_threshold,
        "passes": passes,
        "moved": moved,
        "remeasured_for_spread": sorted(ids[s] for s, m in results.items() if m.attempts > 1),
        "high_spread": sorted(ids[s] for s, v in spreads.items() if v > settings.spread_threshold),
        "nodes_measured": len(results),
        "measurements": plan["done"],
        "seconds": clock() - start_s,
    }
    return TraceMeasurement(fields=fields, report=report)


def measure_trace(trace: Trace, meter: EnergyMeter, settings: ProtocolSettings, **kwargs: Any
                  ) -> dict[str, dict]:
    """The node fields of :func:`measure_nodes` (same arguments), without the report."""
    return measure_nodes(trace, meter, settings, **kwargs).fields
