"""A simulated energy counter that updates in ticks, like NVML's (every 100 ms on an H200).

Two uses:

* :class:`SimulatedMeter` (``measure/meter=simulated``): real time, a noisy constant power;
  the stage, the tests and the overhead benchmark run end to end without hardware. Its
  energies describe the simulation, never the machine, and the trees say ``simulated``.
* :class:`SimulatedDevice`: a virtual clock, a callable of known duration and power and a
  ticking counter, on which the real protocol code runs in milliseconds. The per-call energy
  is known exactly, so the protocol's error is measured, not guessed
  (``scripts/simulate_protocol.py``).

The counter integrates the power continuously but *publishes* the integral only at ticks,
rounded down to ``resolution_j``: a read between two ticks returns the value of the last one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator

from irene.measure.meters.base import EnergyMeter
from irene.measure.settings import SimulatedMeterSettings

#: ``regular``: an update every ``tick_s`` exactly; ``h200``: the NVML timing measured on the
#: H200 so far (:func:`h200_gaps_s`).
TICK_TIMINGS = ("regular", "h200")


def h200_gaps_s(tick_s: float, rng: random.Random) -> Iterator[float]:
    """Gaps between counter updates like the H200's NVML energy counter under load: a median
    gap of ``tick_s`` (100 ms), none shorter than 0.3 ``tick_s`` (30 ms) nor longer than 1.25
    ``tick_s`` (125 ms).

    Half the updates land on the lattice ``k·tick_s``, the other half up to a quarter tick
    late (so the long-run rate stays one per ``tick_s``), and one gap in ten is split by an
    extra update at least 0.3 ``tick_s`` from either end.
    """
    last = 0.0
    k = 1
    while True:
        update = k * tick_s + (rng.uniform(0.0, 0.25 * tick_s) if rng.random() < 0.5 else 0.0)
        shortest = 0.3 * tick_s
        if rng.random() < 0.1 and update - last >= 2 * shortest:
            extra = last + rng.uniform(shortest, update - last - shortest)
            yield extra - last
            last = extra
        yield update - last
        last = update
        k += 1


class TickCounter:
    """Energy integral of a piecewise-constant, noisy power, published at ticks.

    Args:
        settings: tick period, noise, resolution and seed.
        start_s: the clock's value at creation.
        tick_timing: ``regular`` or ``h200`` (irregular gaps, :func:`h200_gaps_s`).
    """

    def __init__(self, settings: SimulatedMeterSettings, start_s: float, *,
                 tick_timing: str = "regular") -> None:
        if tick_timing not in TICK_TIMINGS:
            raise ValueError(f"tick_timing: must be one of {', '.join(TICK_TIMINGS)}, got {tick_timing!r}")
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.time_s = start_s
        self.energy_j = 0.0  # the true integral
        self.published_j = 0.0  # the integral at the last tick
        self.factor = 1.0
        self.next_noise_s = start_s
        tick = settings.tick_s
        self.next_tick_s = start_s + (self.rng.uniform(0.0, tick) if tick > 0 else math.inf)
        self.updates_s: list[float] = []  # when the counter published (the h200 timing's test)
        self._gaps = h200_gaps_s(tick, random.Random(settings.seed + 2)) \
            if tick_timing == "h200" and tick > 0 else None

    def advance(self, until_s: float, power_w: float) -> None:
        """Integrate ``power_w`` (times the noise) from the last time to ``until_s``."""
        s = self.settings
        while self.time_s < until_s:
            if self.time_s >= self.next_noise_s:
                self.factor = max(0.0, 1.0 + s.noise * self.rng.gauss(0.0, 1.0))
                self.next_noise_s += s.noise_interval_s
            end = min(until_s, self.next_noise_s, self.next_tick_s)
            self.energy_j += power_w * self.factor * (end - self.time_s)
            self.time_s = end
            if self.time_s >= self.next_tick_s:
                self.published_j = self.energy_j
                self.updates_s.append(self.time_s)
                self.next_tick_s += next(self._gaps) if self._gaps is not None else s.tick_s

    def value_j(self) -> float:
        """What a read returns: the last published integral, at the counter's resolution."""
        value = self.published_j if self.settings.tick_s > 0 else self.energy_j
        res = self.settings.resolution_j
        return math.floor(value / res) * res if res > 0 else value


class SimulatedMeter(EnergyMeter):
    """A ticking counter of a constant, noisy power in real time (``measure/meter=simulated``).

    Args:
        settings: tick period, power, noise, resolution, seed.
        clock: seconds; ``time.perf_counter`` by default.
        **fields: the fields of :class:`SimulatedMeterSettings` one by one, instead of
            ``settings`` (how ``conf/measure/meter/simulated.yaml`` builds it).
    """

    name = "simulated"

    def __init__(self, settings: SimulatedMeterSettings | None = None,
                 clock: Callable[[], float] = time.perf_counter, **fields: object) -> None:
        if settings is not None and fields:
            raise TypeError("SimulatedMeter takes settings or its fields, not both")
        self.settings = (settings or SimulatedMeterSettings(**fields)).validate()
        self.clock = clock
        self.counter = TickCounter(self.settings, clock(), tick_timing=self.settings.tick_timing)

    @property
    def period_s(self) -> float:
        """The simulated tick period, known exactly (0: a continuous counter)."""
        return self.settings.tick_s

    @classmethod
    def available(cls, **kwargs: object) -> bool:
        """Always usable."""
        return True

    def read_energy_j(self) -> float:
        """The simulated counter's value, in joules."""
        self.counter.advance(self.clock(), self.settings.power_w)
        return self.counter.value_j()

    def describe(self) -> dict[str, str]:
        """Meter and its simulated parameters."""
        s = self.settings
        return {"meter": self.name, "simulated_tick_s": str(s.tick_s), "simulated_power_w": str(s.power_w),
                "simulated_noise": str(s.noise), "simulated_tick_timing": s.tick_timing}


class _VirtualMeter(EnergyMeter):
    name = "simulated"

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device

    @classmethod
    def available(cls, **kwargs: object) -> bool:
        return True

    def read_energy_j(self) -> float:
        device = self.device
        device.reads += 1
        # a read costs time, spent at the gap power (the device idles between calls)
        device.advance(device.read_s, device.gap_power_w)
        return device.counter.value_j()


class SimulatedDevice:
    """A device on a virtual clock: calls of known cost, a ticking energy counter.

    Args:
        counter: the counter's tick period, noise, resolution and seed (``power_w`` unused).
        call_s: mean duration of one call, seconds.
        busy_power_w: power while a call runs, watts.
        call_jitter: relative standard deviation of a call's duration.
        read_s: duration of one counter read (including the device synchronise), seconds.
        gap_power_w: power during reads, watts (default: ``busy_power_w``).
        start_s: the virtual clock's start.
        tick_timing: the counter's update timing, ``regular`` or ``h200`` (:func:`h200_gaps_s`).

    Attributes:
        meter: the device's counter as an :class:`EnergyMeter`.
        calls: calls run so far.
        reads: counter reads so far.
    """

    def __init__(self, counter: SimulatedMeterSettings, call_s: float, busy_power_w: float, *,
                 call_jitter: float = 0.0, read_s: float = 20e-6, gap_power_w: float | None = None,
                 start_s: float = 1000.0, tick_timing: str = "regular") -> None:
        self.call_s = call_s
        self.busy_power_w = busy_power_w
        self.call_jitter = call_jitter
        self.read_s = read_s
        self.gap_power_w = busy_power_w if gap_power_w is None else gap_power_w
        self.time_s = start_s
        self.counter = TickCounter(counter, start_s, tick_timing=tick_timing)
        self.rng = random.Random(counter.seed + 1)
        self.calls = 0
        self.reads = 0
        self.meter = _VirtualMeter(self)

    @property
    def energy_per_call_j(self) -> float:
        """The truth: expected energy of one call, joules."""
        return self.busy_power_w * self.call_s

    def clock(self) -> float:
        """The virtual time, seconds."""
        return self.time_s

    def advance(self, seconds: float, power_w: float) -> None:
        """Let ``seconds`` pass at ``power_w``."""
        self.time_s += seconds
        self.counter.advance(self.time_s, power_w)

    def call(self) -> None:
        """One call of the simulated workload."""
        duration = self.call_s
        if self.call_jitter:
            duration *= max(0.0, 1.0 + self.call_jitter * self.rng.gauss(0.0, 1.0))
        self.calls += 1
        self.advance(duration, self.busy_power_w)
