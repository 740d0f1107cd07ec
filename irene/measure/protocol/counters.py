"""The counters of a measurement: read together, their update periods probed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from irene.measure.meters.base import EnergyMeter, MeterUnavailableError

Clock = Callable[[], float]


def no_sync() -> None:
    """Synchronise nothing (CPU execution is synchronous)."""


def device_sync(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return no_sync


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
