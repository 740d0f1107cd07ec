"""The ``aligned`` protocol: windows that open and close at counter updates.

A node runs in chunks of about ``chunk_s`` of calls with a device synchronise and a counter
read after each chunk. A window opens at a counter update and closes at the update that ends
its ``window_ticks`` ticks; the calls between the two updates are counted (interpolated within
the chunk that saw the update), so the window's energy is exact to the counter's resolution.
Windows are contiguous: one update closes a window and opens the next.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from irene.measure.meters.base import MeterUnavailableError
from irene.measure.protocol.counters import Clock, MeterSet
from irene.measure.sampler import Probe, UtilisationSampler
from irene.measure.settings import ProtocolSettings


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

    values: list[float]  # every counter's value as read
    time_s: float = 0.0  # estimated instant of the update
    calls: float = 0.0  # calls completed by then
    busy_s: float = 0.0  # busy seconds by then
    low_s: float = 0.0
    high_s: float = 0.0
    t0: float = 0.0
    t1: float = 0.0
    calls0: float = 0.0
    busy0: float = 0.0
    chunk: int = 0

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
        boundary = _Boundary(values, low_s=low, high_s=self.read_s, t0=t0, t1=t1, calls0=prev_calls,
                             busy0=prev_busy, chunk=self.chunk)
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
        return _Boundary(self.values, time_s=self.read_s, calls=self.calls, busy_s=self.busy_s)


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
