"""The measurement protocol's decisions on scenarios of known truth (issue 21), on a virtual clock.

A :class:`Rig` is a device on a virtual clock: a workload whose power over time is given, and
energy counters (:class:`~irene.measure.meters.simulated.TickCounter`) that integrate their share
of that power and publish it at their own ticks. The true energy of every call is known, so
each test asserts what the protocol decided (settled when, which attempt kept, drift flagged,
which counter the windows follow) and the energy it recorded, within the protocol's stated
accuracy (docs/measure.md: the aligned protocol is exact up to power noise; each read of the
fixed protocol can be one tick stale). Each test prints one ``SCENARIO`` line (``pytest -s``):
the simulated truth, the recorded energy and the decision.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
from collections.abc import Callable

import pytest

from irene.measure.meters.base import EnergyMeter, MeterUnavailableError
from irene.measure.meters.combined import SumMeter
from irene.measure.meters.simulated import TickCounter, h200_gaps_s
from irene.measure.protocol import (
    MeterSet,
    NodeMeasurement,
    ProtocolSettings,
    Window,
    calibrate_repeats,
    measure_callable,
    measure_nodes,
    probe_tick_s,
    settle,
)
from irene.measure.protocol import node as node_module
from irene.measure.settings import SimulatedMeterSettings
from irene.measure.trace import Trace, TraceNode

READ_S = 20e-6  # one counter read, seconds (NVML-like)


def scenario(name: str, truth_j: float | None, recorded_j: float | None, decision: str) -> None:
    """One row of the scenario table (``pytest -s tests/test_protocol_scenarios.py``)."""
    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.6g}"

    error = "-" if not truth_j or recorded_j is None else f"{100 * (recorded_j / truth_j - 1):+.3f}%"
    print(f"\nSCENARIO | {name} | {show(truth_j)} | {show(recorded_j)} | {error} | {decision}")


class Rig:
    """A device on a virtual clock whose power is ``power_w(t)``; its counters integrate it.

    Args:
        call_s: duration of one call, seconds.
        power_w: watts at virtual time ``t`` (a number: constant).
        start_s: the clock's start.
    """

    def __init__(self, call_s: float, power_w: float | Callable[[float], float], start_s: float = 1000.0
                 ) -> None:
        self.call_s = call_s
        self.power_w = power_w if callable(power_w) else (lambda t, p=float(power_w): p)
        self.time_s = self.start_s = start_s
        self.counters: list[tuple[TickCounter, float]] = []
        self.read_s = READ_S  # virtual seconds one counter read takes
        self.call_j: list[float] = []  # the true energy of every call, in order
        self.call_end_s: list[float] = []

    def clock(self) -> float:
        return self.time_s

    def advance(self, seconds: float) -> float:
        """Let ``seconds`` pass at the power of their start; the energy spent, joules."""
        power = self.power_w(self.time_s)
        self.time_s += seconds
        for counter, share in self.counters:
            counter.advance(self.time_s, power * share)
        return power * seconds

    def call(self) -> None:
        """One call; its true energy is what the counters integrated (power noise included)."""
        before = sum(counter.energy_j for counter, _ in self.counters)
        spent = self.advance(self.call_s)
        after = sum(counter.energy_j for counter, _ in self.counters)
        self.call_j.append(after - before if self.counters else spent)
        self.call_end_s.append(self.time_s)

    def meter(self, name: str, tick_s: float, *, share: float = 1.0, seed: int = 0, timing: str = "regular",
              resolution_j: float = 0.0, noise: float = 0.0) -> RigMeter:
        """A counter of ``share`` of the power, publishing every ``tick_s`` (``timing``)."""
        settings = SimulatedMeterSettings(tick_s=tick_s, noise=noise, resolution_j=resolution_j, seed=seed)
        counter = TickCounter(settings, self.time_s, tick_timing=timing)
        self.counters.append((counter, share))
        return RigMeter(self, counter, name)

    def truth_between(self, start_s: float, end_s: float) -> float:
        """Mean true energy per call of the calls that ended in ``(start_s, end_s]``."""
        chosen = [j for j, t in zip(self.call_j, self.call_end_s, strict=True) if start_s < t <= end_s]
        return statistics.fmean(chosen)


class RigMeter(EnergyMeter):
    """One counter of a :class:`Rig`; a read costs :data:`READ_S` of virtual time."""

    name = "rig-counter"

    def __init__(self, rig: Rig, counter: TickCounter, name: str) -> None:
        self.rig, self.counter, self.name = rig, counter, name
        self.reads = 0

    @classmethod
    def available(cls, **kwargs: object) -> bool:
        return True

    def read_energy_j(self) -> float:
        self.reads += 1
        self.rig.advance(self.rig.read_s)
        return self.counter.value_j()

    def device_state(self) -> dict[str, float | str]:
        return {f"{self.name}_reads": float(self.reads)}


def quick(**overrides: object) -> ProtocolSettings:
    """Settings for one node on the virtual clock: no settling, no re-measurement."""
    base = dict(sample_interval_s=1.0, settle_min_s=0, max_remeasure=0, warmup=1)
    return ProtocolSettings(**{**base, **overrides}).validate()


# ---------------------------------------------------------------------------------- settling
def _settle(rig: Rig, meter: EnergyMeter, settings: ProtocolSettings):
    meters = MeterSet(meter)
    meters.probe(rig.clock, settings.tick_s)
    return settle(rig.call, meters, settings, clock=rig.clock)


def test_settling_ends_three_windows_after_a_power_ramp_levels_off():
    """150 W rising to 300 W over 3 s, then flat: the last three 0.2 s windows agree within 2 %
    only once the ramp is over, and the settle stops at the first window where they do."""
    ramp_s, start = 3.0, 1000.0

    def power(t: float) -> float:
        return 150.0 + 150.0 * min(1.0, (t - start) / ramp_s)

    rig = Rig(1e-3, power, start_s=start)
    meter = rig.meter("gpu", 0.1)
    settings = quick(settle_min_s=1.0, settle_max_s=30.0, settle_tolerance=0.02)
    report = _settle(rig, meter, settings)
    since_ramp = rig.clock() - (start + ramp_s)
    scenario("ramp 150->300 W over 3 s, then flat (settle)", 300.0, report.power_w,
             f"settled={report.settled} after {report.seconds:.2f} s, {report.windows} windows")
    assert report.settled
    assert report.power_w == pytest.approx(300.0, rel=1e-3)  # the last window: flat power
    assert report.time_per_call_s == pytest.approx(1e-3, rel=1e-3)
    # each settle window opens at the update after the last one closed: 0.2 s + one 0.1 s tick.
    # Ramping 3.3 % per window until 3 s; settled with the third window after the ramp
    assert 2 * 0.3 < since_ramp <= 3 * 0.3 + 0.01
    assert report.windows == pytest.approx(report.seconds / 0.3, abs=1.0)


def test_settling_on_a_flat_device_takes_settle_min_s_and_no_more():
    rig = Rig(1e-3, 250.0)
    meter = rig.meter("gpu", 0.1)
    report = _settle(rig, meter, quick(settle_min_s=1.0, settle_max_s=30.0))
    scenario("flat 250 W (settle_min_s 1 s)", 250.0, report.power_w,
             f"settled={report.settled} after {report.seconds:.2f} s, {report.windows} windows")
    assert report.settled and 1.0 <= report.seconds <= 1.0 + 0.3 + 0.01
    assert report.windows == 4  # 0.2 s windows, each after waiting for an update (0.3 s)
    assert report.power_w == pytest.approx(250.0, rel=1e-3)


def test_settling_gives_up_at_settle_max_s_and_says_so():
    """Power that keeps rising 10 % per second never settles: flagged after settle_max_s."""
    rig = Rig(1e-3, lambda t: 100.0 * math.exp(0.1 * (t - 1000.0)))
    meter = rig.meter("gpu", 0.1)
    report = _settle(rig, meter, quick(settle_min_s=0.5, settle_max_s=2.0))
    scenario("power rising 10 %/s (settle_max_s 2 s)", None, report.power_w,
             f"settled={report.settled} after {report.seconds:.2f} s")
    assert not report.settled and 2.0 <= report.seconds <= 2.0 + 0.2 + 0.05
    assert report.as_dict()["settled"] is False


def test_settling_waits_for_the_time_per_call_too():
    """Power flat, but calls slow down for 2 s (clock ramp): settled only once they level off."""
    rig = Rig(1e-3, 200.0)
    meter = rig.meter("gpu", 0.1)
    base = rig.call

    def call() -> None:
        rig.call_s = 1e-3 * (1.0 + 0.5 * min(1.0, (rig.time_s - 1000.0) / 2.0))
        base()

    rig.call = call
    settings = quick(settle_min_s=0.5, settle_max_s=30.0)
    meters = MeterSet(meter)
    meters.probe(rig.clock)
    report = settle(rig.call, meters, settings, clock=rig.clock)
    scenario("calls 1 -> 1.5 ms over 2 s, power flat (settle)", 1.5e-3, report.time_per_call_s,
             f"settled={report.settled} after {report.seconds:.2f} s")
    assert report.settled and report.seconds >= 2.0 - (meters.tick_s or 0)
    assert report.time_per_call_s == pytest.approx(1.5e-3, rel=1e-3)


def test_settling_without_a_meter_uses_time_only_and_settle_min_s_zero_skips_it():
    from irene.measure.meters import NullMeter

    rig = Rig(1e-3, 200.0)
    meters = MeterSet(NullMeter())
    meters.probe(rig.clock)
    report = settle(rig.call, meters, quick(settle_min_s=0.3, settle_max_s=5.0), clock=rig.clock)
    assert report.settled and report.power_w is None and report.time_per_call_s == pytest.approx(1e-3)
    assert report.windows == 3 and 0.6 <= report.seconds < 0.6 + 0.05  # 3 windows of 0.2 s
    skipped = settle(rig.call, meters, quick(settle_min_s=0), clock=rig.clock)
    assert (skipped.settled, skipped.seconds, skipped.windows, skipped.power_w) == (True, 0.0, 0, None)


# ----------------------------------------------------------------------- one node, one counter
def test_constant_power_is_exact_on_a_100ms_counter():
    rig = Rig(0.5e-3, 300.0)
    meter = rig.meter("gpu", 0.1, seed=3)
    result = measure_callable(rig.call, meter, quick(), clock=rig.clock)
    truth = 300.0 * 0.5e-3
    scenario("constant 300 W, 0.5 ms calls, 100 ms ticks", truth, result.ground_truth_energy,
             f"{len(result.windows)} windows of {result.windows[0].duration_s:.3f} s, chunk {result.chunk}")
    assert result.ground_truth_energy == pytest.approx(truth, rel=1e-6)
    assert result.times_mean == pytest.approx(0.5e-3, rel=1e-6)
    assert len(result.windows) == 3 and result.attempts == 1
    # contiguous windows of two ticks, on the counter's updates
    assert [w.duration_s for w in result.windows] == pytest.approx([0.2] * 3, abs=1e-9)
    assert result.chunk == 4  # chunk_s 2 ms of 0.5 ms calls
    assert result.repeats == round(0.2 * 2e-3 / (2e-3 + READ_S) / 0.5e-3)  # 396: reads excluded
    assert result.energy_std_j == pytest.approx(0.0, abs=1e-9) and result.spread == pytest.approx(0, abs=1e-9)
    # the calls' energy excludes the reads': the counter saw calls and reads at the same power
    for w in result.windows:
        assert w.energy_j == pytest.approx(w.counter_j * w.busy_s / w.duration_s, rel=1e-9)
        assert w.energy_j < w.counter_j


def test_windows_two_spread_is_the_two_windows_std_over_mean():
    """Power noise constant over 0.2 s: with windows=2 the two windows differ, the spread is
    |e1 - e2| / sqrt(2) / mean exactly, and the energy is the two windows' total."""
    rig = Rig(1e-3, 300.0)
    meter = rig.meter("gpu", 0.1, seed=1, noise=0.05)
    meter.counter.settings.noise_interval_s = 0.2
    result = measure_callable(rig.call, meter, quick(windows=2), clock=rig.clock)
    per_call = [w.energy_j / w.calls for w in result.windows]
    span_s = sum(w.duration_s for w in result.windows)
    truth = rig.truth_between(rig.clock() - span_s - 0.003, rig.clock())
    scenario("windows=2, power noise 5 % per 0.2 s", truth, result.ground_truth_energy,
             f"spread {100 * result.spread:.2f}% (two windows)")
    assert len(result.windows) == 2 and abs(per_call[0] / per_call[1] - 1) > 0.005
    expected_std = abs(per_call[0] - per_call[1]) / math.sqrt(2)
    assert result.energy_std_j == pytest.approx(expected_std, rel=1e-9)
    assert result.spread == pytest.approx(expected_std / result.ground_truth_energy, rel=1e-9)
    total = sum(w.energy_j for w in result.windows) / sum(w.calls for w in result.windows)
    assert result.ground_truth_energy == pytest.approx(total, rel=1e-12)
    assert result.ground_truth_energy == pytest.approx(truth, rel=0.01)


def test_a_slow_counter_gets_whole_long_ticks():
    """A counter updated every 0.5 s: windows of two ticks (1 s), still exact."""
    rig = Rig(2e-3, 120.0)
    meter = rig.meter("slow", 0.5, seed=2)
    result = measure_callable(rig.call, meter, quick(windows=2), clock=rig.clock)
    truth = 120.0 * 2e-3
    scenario("slow counter, 0.5 s ticks", truth, result.ground_truth_energy,
             f"windows {[round(w.duration_s, 3) for w in result.windows]} s")
    assert result.ground_truth_energy == pytest.approx(truth, rel=1e-6)
    assert [w.duration_s for w in result.windows] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert result.repeats == round(1.0 * 2e-3 / (2e-3 + READ_S) / 2e-3)  # 495: one call a chunk


def test_a_counter_that_updates_as_the_h200_does():
    """Irregular updates (median 100 ms, 30 to 125 ms gaps): the windows cannot sit on one
    lattice, each boundary is the middle of its chunk; within 1 % (the stated accuracy)."""
    errors = []
    for seed in range(4):
        rig = Rig(1e-3, 300.0)
        meter = rig.meter("gpu", 0.1, seed=seed, timing="h200")
        result = measure_callable(rig.call, meter, quick(), clock=rig.clock)
        errors.append(result.ground_truth_energy / (300.0 * 1e-3) - 1)
        assert result.times_mean == pytest.approx(1e-3, rel=1e-3)
        gaps = [b - a for a, b in zip(meter.counter.updates_s, meter.counter.updates_s[1:], strict=False)]
        assert min(gaps) >= 0.03 - 1e-9 and max(gaps) <= 0.125 + 1e-9
    scenario("H200-like irregular counter (4 seeds)", 0.3, 0.3 * (1 + max(errors, key=abs)),
             f"max |error| {100 * max(abs(e) for e in errors):.3f}%")
    assert max(abs(e) for e in errors) < 0.01


def test_h200_gaps_match_the_measured_timing():
    gaps = h200_gaps_s(0.1, random.Random(0))
    sample = [next(gaps) for _ in range(20_000)]
    assert statistics.median(sample) == pytest.approx(0.1, abs=1e-9)
    assert min(sample) >= 0.03 and min(sample) < 0.032
    assert max(sample) <= 0.125 and max(sample) > 0.123
    assert statistics.fmean(sample) == pytest.approx(0.1 * 0.9, rel=0.03)  # one gap in ten split
    with pytest.raises(ValueError, match="tick_timing"):
        TickCounter(SimulatedMeterSettings(), 0.0, tick_timing="h100")


def test_probe_of_a_counter_that_changed_once_refuses_to_guess():
    """A counter seen changing a single time has no period: a clear error, not a guess."""
    rig = Rig(1e-3, 300.0)
    meter = rig.meter("gpu", 10.0)  # one update in the probe's 3 s at most
    with pytest.raises(MeterUnavailableError, match="did not update within 3.0 s"):
        probe_tick_s(meter, rig.clock)
    rig2 = Rig(1e-3, 300.0)
    meter2 = rig2.meter("gpu", 0.1)
    start = rig2.clock()
    assert probe_tick_s(meter2, rig2.clock, updates=2) == pytest.approx(0.1, abs=1e-4)
    assert rig2.clock() - start < 0.35  # stops at the second change
    with pytest.raises(MeterUnavailableError):
        probe_tick_s(meter2, rig2.clock, updates=5, timeout_s=0.05)


# --------------------------------------------------------------------- two counters, summed
@pytest.mark.parametrize("gpu_first", [False, True])
def test_cpu_and_gpu_counters_with_different_ticks_are_summed(gpu_first):
    """CPU (RAPL-like, 1 ms ticks, 30 % of the power) + GPU (NVML-like, 100 ms, 70 %): windows
    follow the slower GPU counter, the truth is their sum, the GPU feature its 70 %."""
    rig = Rig(0.5e-3, 400.0)
    cpu = rig.meter("cpu", 0.001, share=0.3, seed=4)
    gpu = rig.meter("gpu", 0.1, share=0.7, seed=5)
    both = SumMeter([gpu, cpu] if gpu_first else [cpu, gpu])
    result = measure_callable(rig.call, both, quick(), gpu_meter=gpu, clock=rig.clock)
    truth = 400.0 * 0.5e-3
    scenario(f"CPU 1 ms + GPU 100 ms counters, summed ({'gpu' if gpu_first else 'cpu'} first)", truth,
             result.ground_truth_energy, f"windows follow the 100 ms counter; gpu feature "
             f"{result.gpu_energy_mean:.6g} J")
    assert result.ground_truth_energy == pytest.approx(truth, rel=1e-3)
    assert result.gpu_energy_mean == pytest.approx(0.7 * truth, rel=1e-3)
    assert [w.duration_s for w in result.windows] == pytest.approx([0.2] * 3, abs=1e-6)
    meters = MeterSet(both, gpu)
    assert meters.probe(rig.clock) == pytest.approx(0.1, abs=1e-4)
    assert meters.ticks_s == pytest.approx({"cpu": 0.001, "gpu": 0.1}, abs=1e-4)
    assert meters.meters[meters.tick_index] is gpu
    assert meters.ground_truth_names == (["gpu", "cpu"] if gpu_first else ["cpu", "gpu"])
    assert meters.read_s == pytest.approx(2 * READ_S, rel=0.01)  # both counters' reads


def test_a_given_tick_skips_probing_and_times_the_reads():
    rig = Rig(1e-3, 100.0)
    meters = MeterSet(SumMeter([rig.meter("a", 0.001), rig.meter("b", 0.05)]))
    start = rig.clock()
    assert meters.probe(rig.clock, tick_s=0.05) == 0.05
    assert meters.ticks_s == {"a": 0.05, "b": 0.05}
    assert meters.read_s == pytest.approx(2 * READ_S, rel=1e-6)
    assert rig.clock() - start == pytest.approx(40 * READ_S, rel=1e-6)  # 20 reads of each


def test_a_gpu_feature_counter_beside_a_cpu_ground_truth():
    """RAPL alone is the ground truth; the GPU counter is only the gpu_energy_mean feature."""
    rig = Rig(1e-3, 200.0)
    cpu = rig.meter("cpu", 0.001, share=0.25)
    gpu = rig.meter("gpu", 0.1, share=0.75, seed=7)
    result = measure_callable(rig.call, cpu, quick(), gpu_meter=gpu, clock=rig.clock)
    assert result.ground_truth_energy == pytest.approx(0.25 * 0.2, rel=1e-3)
    assert result.gpu_energy_mean == pytest.approx(0.75 * 0.2, rel=2e-3)
    assert result.fields()["gpu_energy_mean"] == result.gpu_energy_mean
    assert [w.duration_s for w in result.windows] == pytest.approx([0.2] * 3, abs=1e-6)


# -------------------------------------------------------------------------- fixed protocol
def test_fixed_protocol_with_calls_much_shorter_than_a_tick():
    """20 us calls, 50 ms windows on a 100 ms counter: each read is up to a tick stale, so a
    window sees 0 or 1 update; the recorded energy is off by at most a tick's energy per read."""
    rig = Rig(20e-6, 300.0)
    meter = rig.meter("gpu", 0.1, seed=1)
    settings = quick(protocol="fixed", min_window_s=0.05, windows=4)
    result = measure_callable(rig.call, meter, settings, clock=rig.clock)
    truth = 300.0 * 20e-6
    updates = [round(w.energy_j / (300.0 * 0.1)) for w in result.windows]
    scenario("fixed protocol, 20 us calls, 50 ms windows, 100 ms ticks", truth,
             result.ground_truth_energy, f"repeats {result.repeats}, updates seen per window {updates}")
    assert result.chunk == 0 and len(result.windows) == 4
    assert result.repeats == pytest.approx(math.ceil(1.1 * 0.05 / 20e-6), abs=1)
    for w in result.windows:
        assert w.calls == result.repeats and w.busy_s >= 0.05
        true_j = 300.0 * w.busy_s
        assert abs(w.energy_j - true_j) <= 300.0 * 0.1 + 1e-9  # stale by under one tick
        assert w.energy_j == pytest.approx(0.0, abs=1e-9) or w.energy_j == pytest.approx(30.0, abs=1e-6)
    assert sorted(set(updates)) == [0, 1]
    pooled = sum(w.energy_j for w in result.windows) / sum(w.calls for w in result.windows)
    assert result.ground_truth_energy == pytest.approx(pooled, rel=1e-12)


def test_fixed_protocol_redoes_a_window_that_came_out_too_short():
    """Calls get 4x faster after calibration: the first window is too short, so it is
    lengthened and redone; every kept window lasts at least min_window_s."""
    rig = Rig(1e-3, 100.0)
    meter = rig.meter("exact", 0.0)  # a continuous counter: the window energy is exact
    counter = {"n": 0}
    base = rig.call

    def call() -> None:
        counter["n"] += 1
        if counter["n"] == 40:  # after warm-up and calibration (1 + 4 + 16 calls... )
            rig.call_s = 0.25e-3
        base()

    settings = quick(protocol="fixed", min_window_s=0.05, windows=2, warmup=0)
    result = measure_callable(call, meter, settings, clock=rig.clock)
    scenario("fixed protocol, calls 4x faster after calibration", 100.0 * 0.25e-3, result.ground_truth_energy,
             f"repeats {result.repeats} (calibrated {math.ceil(1.1 * 0.05 / 1e-3)}), windows kept "
             f"{len(result.windows)}")
    assert len(result.windows) == 2
    assert all(w.busy_s >= 0.05 for w in result.windows)
    assert result.repeats > math.ceil(1.1 * 0.05 / 1e-3)  # lengthened
    # to min_window_s with its 10 % headroom at the calls' new speed, not more
    assert [w.busy_s for w in result.windows] == pytest.approx([1.1 * 0.05] * 2, rel=1e-6)
    assert result.ground_truth_energy == pytest.approx(100.0 * 0.25e-3, rel=1e-3)


def test_calibration_stops_at_max_repeats_and_at_one_percent_of_the_window():
    rig = Rig(1e-3, 100.0)
    settings = quick(protocol="fixed", min_window_s=2.0, max_repeats=50)
    assert calibrate_repeats(rig.call, settings, lambda: None, rig.clock) == 50
    rig2 = Rig(1e-3, 100.0)
    calls_before = len(rig2.call_j)
    fixed = quick(protocol="fixed", min_window_s=2.0)
    repeats = calibrate_repeats(rig2.call, fixed, lambda: None, rig2.clock)
    assert repeats == pytest.approx(math.ceil(1.1 * 2.0 / 1e-3), abs=1)
    # batches of 1, 4, 16, 64 calls: the last lasts 64 ms >= 1 % of 2 s (20 ms; 16 ms is not)
    assert len(rig2.call_j) - calls_before == 1 + 4 + 16 + 64


# ------------------------------------------------------------------ re-measurement, attempts
def _attempts(monkeypatch, rig: Rig, noise_by_attempt: list[float], meter: RigMeter):
    """Run each attempt of the aligned protocol with its own power noise; return them (and
    each one's own ``measuring_s`` in ``spent``, since the kept one is given the total)."""
    seen: list[NodeMeasurement] = []
    real = node_module._measure_aligned

    def measure(*args, **kwargs):
        meter.counter.settings.noise = noise_by_attempt[min(len(seen), len(noise_by_attempt) - 1)]
        start = rig.clock()
        result = real(*args, **kwargs)
        seen.append(result)
        spent.append(result.measuring_s)
        spans.append((start, rig.clock()))
        return result

    spent: list[float] = []
    spans: list[tuple[float, float]] = []
    measure.spent, measure.spans = spent, spans
    monkeypatch.setattr(node_module, "_measure_aligned", measure)
    return seen


def test_a_noisy_node_keeps_the_tightest_attempt(monkeypatch):
    """Three attempts, all above the threshold: the one with the smallest spread is kept,
    its count says 3 and the time spent is the three attempts'."""
    rig = Rig(1e-3, 300.0)
    meter = rig.meter("gpu", 0.1, seed=11, noise=0.0)
    meter.counter.settings.noise_interval_s = 0.2
    seen = _attempts(monkeypatch, rig, [0.3, 0.05, 0.3], meter)
    settings = quick(spread_threshold=0.001, max_remeasure=2)
    result = measure_callable(rig.call, meter, settings, clock=rig.clock)
    spreads = [m.spread for m in seen]
    kept = min(range(3), key=spreads.__getitem__)
    truth = rig.truth_between(*node_module._measure_aligned.spans[kept])
    scenario("noisy node, 3 attempts (noise 30 %, 5 %, 30 %)", truth, result.ground_truth_energy,
             f"kept attempt {kept + 1} of {result.attempts} "
             f"(spreads {[round(100 * s, 2) for s in spreads]} %)")
    assert len(seen) == 3 and result.attempts == 3
    assert result is seen[kept] and kept == 1
    assert result.measuring_s == pytest.approx(sum(node_module._measure_aligned.spent), rel=1e-12)
    assert result.ground_truth_energy == pytest.approx(truth, rel=0.01)


def test_remeasurement_stops_at_the_first_attempt_within_the_threshold(monkeypatch):
    rig = Rig(1e-3, 300.0)
    meter = rig.meter("gpu", 0.1, seed=12)
    meter.counter.settings.noise_interval_s = 0.2
    seen = _attempts(monkeypatch, rig, [0.3, 0.0, 0.0], meter)
    settings = quick(spread_threshold=0.01, max_remeasure=2)
    result = measure_callable(rig.call, meter, settings, clock=rig.clock)
    scenario("noisy first attempt, quiet second", 0.3, result.ground_truth_energy,
             f"kept attempt {seen.index(result) + 1} of {result.attempts}, spread {100 * result.spread:.3f}%")
    assert len(seen) == 2 and result.attempts == 2 and result is seen[1]
    assert seen[0].spread > 0.01 >= seen[1].spread
    assert result.ground_truth_energy == pytest.approx(0.3, rel=1e-6)
    assert result.measuring_s == pytest.approx(sum(node_module._measure_aligned.spent), rel=1e-12)


def test_a_spread_equal_to_the_threshold_is_not_remeasured(monkeypatch):
    rig = Rig(1e-3, 300.0)
    meter = rig.meter("gpu", 0.1, seed=13)
    meter.counter.settings.noise_interval_s = 0.2
    seen = _attempts(monkeypatch, rig, [0.2], meter)
    first = measure_callable(rig.call, meter, quick(spread_threshold=1.0), clock=rig.clock)
    assert len(seen) == 1 and first.spread > 0
    monkeypatch.undo()
    rig2 = Rig(1e-3, 300.0)
    meter2 = rig2.meter("gpu", 0.1, seed=13)
    meter2.counter.settings.noise_interval_s = 0.2
    seen2 = _attempts(monkeypatch, rig2, [0.2], meter2)
    again = measure_callable(rig2.call, meter2, quick(spread_threshold=first.spread, max_remeasure=2),
                             clock=rig2.clock)
    assert again.spread == first.spread and len(seen2) == 1 and again.attempts == 1


# ---------------------------------------------------------------------- whole traces, drift
def _trace(rig: Rig) -> Trace:
    """A root (3 ms) and four leaves (0.5, 1.5, 2.5, 3.5 ms) whose calls run on the rig."""

    def node(scope: str, parent: TraceNode | None, call_s: float) -> TraceNode:
        def call() -> None:
            rig.advance(call_s)

        level = 0 if parent is None else parent.level + 1
        made = TraceNode(scope, parent, level, "Fake", "model" if parent is None else "ml", func=call,
                         args=(), kwargs={}, signature=scope)
        if parent is not None:
            parent.children.append(made)
        return made

    root = node("root", None, 3e-3)
    for i in range(4):
        node(f"root.leaf_{i}", root, (0.5 + i) * 1e-3)
    return Trace("fake", 1, 1, root)


LEAF_S = {f"root.leaf_{i}": (0.5 + i) * 1e-3 for i in range(4)}


def _drift_run(factor: float, after: int, action: str, threshold: float = 0.03):
    """Power 200 W, times ``factor`` once ``after`` nodes are done (1: the root's first)."""
    state = {"power": 200.0}
    rig = Rig(1e-3, lambda t: state["power"])
    meter = rig.meter("gpu", 0.01)
    order: list[str] = []

    def on_progress(done: int, total: int, scope: str) -> None:
        order.append(scope)
        if done == after:
            state["power"] = 200.0 * factor

    settings = quick(min_window_s=0.02, windows=2, drift_action=action, drift_threshold=threshold)
    result = measure_nodes(_trace(rig), meter, settings, clock=rig.clock, on_progress=on_progress)
    return result, order


@pytest.mark.parametrize("action", ["flag", "remeasure"])
def test_throttling_halfway_is_drift(action):
    """Power halves after the root and two leaves (throttling): drift of -50 %. Flagged, the
    two leaves measured before keep full power; re-measured, every node is at half power and
    the two that moved are named."""
    result, order = _drift_run(0.5, 3, action)
    report, fields = result.report, result.fields
    before = order[1:3]
    after = [s for s in LEAF_S if s not in before]
    root_j = fields["root"]["ground_truth_energy"]
    scenario(f"throttling: power halves after 3 of 6 nodes ({action})", 100.0 * 3e-3, root_j,
             f"drift {100 * report['drift_first_pass']:+.1f}% flagged={report['drift_flagged']} "
             f"passes={report['passes']} moved={len(report['moved'])}")
    assert report["drift_first_pass"] == pytest.approx(-0.5, rel=1e-3)
    if action == "flag":
        assert report["drift_flagged"] and report["passes"] == 1 and report["moved"] == []
        for scope in before:
            assert fields[scope]["ground_truth_energy"] == pytest.approx(200.0 * LEAF_S[scope], rel=1e-3)
        for scope in after:
            assert fields[scope]["ground_truth_energy"] == pytest.approx(100.0 * LEAF_S[scope], rel=1e-3)
        assert root_j == pytest.approx(150.0 * 3e-3, rel=0.02)  # first and last pooled
        assert report["measurements"] == 6
    else:
        assert not report["drift_flagged"] and report["passes"] == 2
        assert report["drift"] == pytest.approx(0.0, abs=1e-3)
        assert sorted(report["moved"]) == sorted(f"fake/1x1/{s}" for s in before)
        for scope, call_s in LEAF_S.items():
            assert fields[scope]["ground_truth_energy"] == pytest.approx(100.0 * call_s, rel=1e-3)
        assert root_j == pytest.approx(100.0 * 3e-3, rel=1e-3)  # last and again: both throttled
        assert report["measurements"] == 11


def test_power_doubling_at_the_start_moves_every_node():
    result, order = _drift_run(2.0, 1, "remeasure")
    report = result.report
    scenario("power doubles after the root's first measurement (remeasure)", 400.0 * 3e-3,
             result.fields["root"]["ground_truth_energy"],
             f"drift first pass {100 * report['drift_first_pass']:+.1f}%, moved {len(report['moved'])}")
    assert report["drift_first_pass"] == pytest.approx(1.0, rel=1e-3)
    assert report["moved"] == []  # measured after the change both times
    assert result.fields["root"]["ground_truth_energy"] == pytest.approx(400.0 * 3e-3, rel=1e-3)


@pytest.mark.parametrize(("factor", "flagged"), [(1.02, False), (1.04, True), (0.98, False), (0.96, True)])
def test_drift_threshold_decides_the_flag(factor, flagged):
    """3 % threshold: a 2 % change (up or down) is not drift, 4 % is."""
    result, _ = _drift_run(factor, 1, "flag")
    report = result.report
    assert report["drift"] == pytest.approx(factor - 1, abs=1e-3)
    assert report["drift_flagged"] is flagged and report["passes"] == 1


def test_a_second_drift_after_remeasuring_is_still_flagged():
    """Power doubles after the root, then halves during the second pass: re-measured once,
    the second pass's own drift is flagged."""
    state = {"power": 200.0}
    rig = Rig(1e-3, lambda t: state["power"])
    meter = rig.meter("gpu", 0.01)

    def on_progress(done: int, total: int, scope: str) -> None:
        if done == 1:
            state["power"] = 400.0
        if done == 8:
            state["power"] = 300.0

    settings = quick(min_window_s=0.02, windows=2, drift_action="remeasure")
    report = measure_nodes(_trace(rig), meter, settings, clock=rig.clock, on_progress=on_progress).report
    assert report["passes"] == 2 and report["drift_flagged"]
    assert report["drift"] == pytest.approx(-0.25, rel=1e-3)
    assert report["drift_first_pass"] == pytest.approx(1.0, rel=1e-3)


def test_report_names_high_spread_and_remeasured_nodes(monkeypatch):
    """One leaf's power flickers between its windows: re-measured for its spread, and named
    as high-spread when every attempt stays above the threshold."""
    state = {"power": 200.0, "flicker": False}
    rig = Rig(1e-3, lambda t: state["power"] * (2.0 if state["flicker"] and int(t / 0.03) % 2 else 1.0))
    meter = rig.meter("gpu", 0.01)
    trace = _trace(rig)
    leaf = next(n for n in trace.nodes() if n.scope == "root.leaf_2")
    steady = leaf.func

    def flickering() -> None:
        state["flicker"] = True
        steady()
        state["flicker"] = False

    leaf.func = flickering
    settings = quick(min_window_s=0.02, windows=3, drift_action="flag", max_remeasure=1,
                     spread_threshold=0.02)
    result = measure_nodes(trace, meter, settings, clock=rig.clock)
    report = result.report
    assert report["remeasured_for_spread"] == ["fake/1x1/root.leaf_2"]
    assert report["high_spread"] == ["fake/1x1/root.leaf_2"]
    assert report["nodes_measured"] == 5 and report["measurements"] == 6  # attempts are not nodes
    assert result.fields["root.leaf_0"]["energy_std_j"] == pytest.approx(0.0, abs=1e-9)
    assert report["ticks_s"] == pytest.approx({"gpu": 0.01}, abs=1e-5)
    assert report["windows"] == 3 and report["protocol"] == "aligned"


def test_identical_nodes_share_one_measurement_on_the_virtual_clock():
    rig = Rig(1e-3, 200.0)
    meter = rig.meter("gpu", 0.01)
    trace = _trace(rig)
    for child in trace.root.children[2:]:
        child.signature = "same"
    settings = quick(min_window_s=0.02, windows=2, drift_action="flag")
    result = measure_nodes(trace, meter, settings, clock=rig.clock)
    fields = result.fields
    assert fields["root.leaf_3"]["measurement_reused_from"] == "fake/1x1/root.leaf_2"
    assert fields["root.leaf_3"]["ground_truth_energy"] == fields["root.leaf_2"]["ground_truth_energy"]
    assert "measurement_reused_from" not in fields["root.leaf_2"]
    assert result.report["nodes_measured"] == 4 and result.report["measurements"] == 5
    unshared = measure_nodes(trace, meter, quick(min_window_s=0.02, windows=2, drift_action="flag",
                                                 reuse_identical=False), clock=rig.clock)
    assert unshared.report["nodes_measured"] == 5
    assert unshared.fields["root.leaf_3"]["ground_truth_energy"] == pytest.approx(200.0 * 3.5e-3, rel=1e-3)


def test_order_is_shuffled_by_seed_and_root_is_first_and_last():
    def run(shuffle: bool, seed: int) -> list[str]:
        rig = Rig(1e-3, 200.0)
        meter = rig.meter("gpu", 0.01)
        order: list[str] = []
        settings = quick(min_window_s=0.02, windows=1, drift_action="flag", shuffle=shuffle, order_seed=seed)
        measure_nodes(_trace(rig), meter, settings, clock=rig.clock,
                      on_progress=lambda d, t, s: order.append(s))
        return order

    plain = run(False, 0)
    assert plain == ["root", *LEAF_S, "root"]
    shuffled = [tuple(run(True, seed)) for seed in range(4)]
    assert all(o[0] == "root" == o[-1] and sorted(o[1:-1]) == sorted(LEAF_S) for o in shuffled)
    assert len(set(shuffled)) > 1 and shuffled[0] == tuple(run(True, 0))


def test_window_dataclass_defaults():
    window = Window(calls=2.0, energy_j=1.0, gpu_j=0.0, busy_s=0.1, duration_s=0.1)
    assert window.counter_j == 0.0


# ------------------------------------------------------------------- windows, chunks, meters
def test_a_slow_read_lengthens_the_chunk_and_the_window():
    """1 ms per counter read: reads may take 2 % of a chunk, so a chunk lasts 50 ms; a window
    spans at least min_chunks (10) of the shorter of a chunk and a tick: 0.5 s."""
    rig = Rig(1e-3, 100.0)
    rig.read_s = 1e-3
    meter = rig.meter("slowread", 0.1, seed=5)
    result = measure_callable(rig.call, meter, quick(windows=1), clock=rig.clock)
    assert result.chunk == 50
    assert result.windows[0].duration_s == pytest.approx(0.5, abs=1e-6)
    assert result.ground_truth_energy == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize(("overrides", "window_s"), [
    ({"window_ticks": 3}, 0.3),
    ({"min_window_s": 0.25}, 0.3),  # rounded up to whole ticks
    ({"min_window_s": 0.3}, 0.3),  # already whole: not one more
    ({"min_window_s": 0.21}, 0.3),
    ({"min_window_s": 0.01, "window_ticks": 1}, 0.1),
    ({"min_window_s": 0.01, "window_ticks": 1, "chunk_s": 0.02}, 0.2),  # 10 chunks of 20 ms
])
def test_window_length_rules(overrides, window_s):
    rig = Rig(1e-3, 100.0)
    meter = rig.meter("gpu", 0.1, seed=6)
    result = measure_callable(rig.call, meter, quick(windows=2, **overrides), clock=rig.clock)
    assert [w.duration_s for w in result.windows] == pytest.approx([window_s] * 2, abs=1e-6)
    assert result.ground_truth_energy == pytest.approx(0.1, rel=1e-6)


def test_chunk_is_capped_by_max_repeats_and_warmup_runs_first():
    rig = Rig(10e-6, 100.0)
    meter = rig.meter("gpu", 0.01, seed=2)
    result = measure_callable(rig.call, meter, quick(max_repeats=50, warmup=7, windows=1), clock=rig.clock)
    assert result.chunk == 50  # 2 ms of 10 us calls would be 200
    rig2 = Rig(1e-3, 100.0)
    meter2 = rig2.meter("gpu", 0.01, seed=2)
    meters = MeterSet(meter2)
    meters.probe(rig2.clock)
    before = len(rig2.call_j)
    from irene.measure.protocol import windows as windows_module

    windows_module._measure_aligned(rig2.call, meters, quick(warmup=7, windows=1), sync=lambda: None,
                                    clock=rig2.clock, probes=None)
    # 7 warm-up calls, then 1 + 2 timed calls (2 ms of 1 ms calls), then whole chunks of 2
    assert (len(rig2.call_j) - before - 7 - 3) % 2 == 0 and len(rig2.call_j) - before > 10


def test_a_counter_that_stops_updating_is_an_error_after_its_timeout():
    rig = Rig(1e-3, 100.0)
    meter = rig.meter("gpu", 0.1, seed=3)
    meters = MeterSet(meter)
    meters.probe(rig.clock)
    meter.counter.next_tick_s = math.inf  # the counter freezes
    settings = quick(windows=1)
    start = rig.clock()
    with pytest.raises(MeterUnavailableError) as caught:
        node_module._measure_node(rig.call, meters, settings, sync=lambda: None, clock=rig.clock, probes=None)
    assert str(caught.value) == "the energy counter stopped updating (no update in 7.2 s)"
    # 0.2 s window + 20 ticks + 5 s, from the first read on (warm-up and timing before it)
    assert rig.clock() - start == pytest.approx(7.2, abs=0.01)


def test_utilisation_probes_reach_both_protocols_and_pooling_averages_them():
    rig = Rig(10e-3, 100.0)
    meter = rig.meter("exact", 0.0)
    probed = {"n": 0}

    def probe() -> dict[str, float]:
        probed["n"] += 1
        return {"gpu": 40.0 + probed["n"] % 2 * 20.0}

    for protocol in ("fixed", "aligned"):
        result = measure_callable(rig.call, meter, quick(protocol=protocol, tick_s=0.01, windows=1),
                                  probes=[probe], clock=rig.clock)
        assert 40.0 <= result.utilisation["gpu"] <= 60.0 and {"cpu", "mem"} <= set(result.utilisation)
    a = NodeMeasurement(1.0, 2.0, 0.0, None, {"gpu": 40.0, "cpu": 10.0}, 1,
                        [Window(1.0, 2.0, 0.0, 1.0, 1.0)], measuring_s=1.0)
    b = NodeMeasurement(1.0, 4.0, 0.0, None, {"gpu": 60.0}, 1, [Window(1.0, 4.0, 0.0, 1.0, 1.0)],
                        measuring_s=2.0, attempts=2)
    pooled = a.pooled_with(b)
    assert pooled.utilisation == {"gpu": 50.0, "cpu": 10.0}
    assert (pooled.ground_truth_energy, pooled.attempts, pooled.measuring_s) == (3.0, 3, 3.0)
    assert pooled.gpu_energy_mean is None and len(pooled.windows) == 2
    assert pooled.energy_std_j == pytest.approx(math.sqrt(2.0))


@pytest.mark.parametrize("protocol", ["fixed", "aligned"])
def test_sampling_interval_reaches_the_sampler(protocol):
    """A 0.5 ms sampling interval during 10 real ms of calls: several samples, not only the
    one taken when each window stops (both protocols)."""
    import time as real_time

    rig = Rig(1e-3, 100.0)
    meter = rig.meter("exact", 0.0)
    samples = {"n": 0}

    def probe() -> dict[str, float]:
        samples["n"] += 1
        return {}

    def call() -> None:
        real_time.sleep(0.001)
        rig.call()

    settings = quick(protocol=protocol, min_window_s=0.01, windows=1, sample_interval_s=0.0005, warmup=0,
                     tick_s=0.01)
    measure_callable(call, meter, settings, probes=[probe], clock=rig.clock)
    assert samples["n"] >= 3


def test_without_a_meter_times_are_measured_and_the_spread_is_of_time():
    from irene.measure.meters import NullMeter

    rig = Rig(1e-3, 100.0)
    durations = iter([1e-3] * 10_000 + [2e-3] * 100_000)
    base = rig.call

    def call() -> None:
        rig.call_s = next(durations)
        base()

    result = measure_callable(call, NullMeter(), quick(windows=3, min_window_s=0.2), clock=rig.clock)
    assert result.ground_truth_energy is None and result.energy_std_j is None
    assert result.gpu_energy_mean is None and "ground_truth_energy" not in result.fields()
    per_call = [w.busy_s / w.calls for w in result.windows]
    assert result.spread == pytest.approx(statistics.stdev(per_call) / statistics.fmean(per_call))
    assert all(w.energy_j == 0.0 for w in result.windows)
    # windows of min_window_s busy seconds (no tick to round to): closed by the first chunk past it
    assert all(0.2 <= w.busy_s < 0.2 + 2 * 2e-3 + 1e-9 for w in result.windows)
    meters = MeterSet(NullMeter())
    assert meters.probe() == 0.0 and meters.tick_index is None and meters.read_s == 0.0
    assert not meters.measures_energy and meters.gpu_name is None and meters.read() == []
    assert meters.gpu_j([]) == 0.0 and meters.truth_j([]) == 0


def test_one_window_has_no_spread_and_fields_leave_out_what_was_not_measured():
    one = NodeMeasurement.from_windows([Window(4.0, 2.0, 1.0, 0.4, 0.5)], energy=True, gpu=True,
                                       utilisation={"cpu": 5.0}, measuring_s=3.0)
    assert (one.times_mean, one.ground_truth_energy, one.gpu_energy_mean) == (0.1, 0.5, 0.25)
    assert one.energy_std_j == 0.0 and one.spread == 0.0 and one.repeats == 4 and one.measuring_s == 3.0
    assert one.fields() == {"cpu": 5.0, "times_mean": 0.1, "gpu_energy_mean": 0.25,
                            "ground_truth_energy": 0.5, "energy_std_j": 0.0}
    two = NodeMeasurement.from_windows([Window(2.0, 2.0, 0.0, 0.2, 0.2), Window(2.0, 0.0, 0.0, 0.2, 0.2)],
                                       energy=True, gpu=False, utilisation={})
    assert two.ground_truth_energy == 0.5 and two.spread == pytest.approx(math.sqrt(2) * 0.5 / 0.5)
    assert two.repeats == 2 and "gpu_energy_mean" not in two.fields()
    zero = NodeMeasurement.from_windows([Window(1.0, 0.0, 0.0, 0.1, 0.1)] * 2, energy=True, gpu=False,
                                        utilisation={})
    assert zero.spread == 0.0  # no energy at all: no relative spread
    half = NodeMeasurement.from_windows([Window(0.4, 1.0, 0.0, 0.1, 0.1)], energy=False, gpu=False,
                                        utilisation={})
    assert half.repeats == 1 and half.ground_truth_energy is None


def test_the_meter_set_keeps_each_counter_once():
    rig = Rig(1e-3, 100.0)
    cpu, gpu = rig.meter("cpu", 0.001), rig.meter("gpu", 0.1)
    both = SumMeter([cpu, gpu])
    meters = MeterSet(both, gpu)
    assert meters.meters == [cpu, gpu] and meters.gpu_feature and meters.gpu_name == "gpu"
    values = meters.read()
    assert len(values) == 2 and cpu.reads == 1 and gpu.reads == 1
    assert meters.truth_j([1.0, 2.0]) == 3.0 and meters.gpu_j([1.0, 2.0]) == 2.0
    alone = MeterSet(gpu, gpu)
    assert alone.meters == [gpu] and not alone.gpu_feature and alone.gpu_name is None
    assert alone.gpu_j([5.0]) == 0.0 and alone.truth_j([5.0]) == 5.0
    assert meters.device_state() == {"cpu_reads": 1.0, "gpu_reads": 1.0}


def test_device_sync_waits_for_the_gpu_only_on_cuda(monkeypatch):
    import torch

    from irene.measure.protocol import device_sync, no_sync

    assert device_sync("cpu") is no_sync and device_sync(torch.device("cpu")) is no_sync
    assert no_sync() is None
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: waited.append(device))
    sync = device_sync("cuda:1")
    assert sync is not no_sync and waited == []
    sync()
    assert waited == [torch.device("cuda:1")]


# ------------------------------------------------------------------------ the whole report
def test_the_report_of_a_trace(caplog):
    rig = Rig(1e-3, 200.0)
    meter = rig.meter("gpu", 0.01)
    progress: list[tuple[int, int, str]] = []
    settings = quick(min_window_s=0.02, windows=2, drift_action="flag", settle_min_s=0.1, settle_max_s=5.0)
    with caplog.at_level(logging.DEBUG, logger="irene.measure.protocol.drift"):
        result = measure_nodes(_trace(rig), meter, settings, clock=rig.clock,
                               on_progress=lambda *a: progress.append(a))
    report = result.report
    assert [p[:2] for p in progress] == [(i, 6) for i in range(1, 7)]
    assert report["protocol"] == "aligned" and report["meter"] == "gpu"
    assert report["ground_truth_meter"] == "gpu" and report["gpu_energy_mean_meter"] is None
    assert report["tick_s"] == pytest.approx(0.01, abs=1e-5) and report["windows"] == 2
    assert report["settle"]["settled"] is True and report["settle"]["windows"] >= 3
    assert report["state_before"] == {"gpu_reads": pytest.approx(report["state_before"]["gpu_reads"])}
    assert report["state_before"]["gpu_reads"] < report["state_start"]["gpu_reads"] < \
        report["state_end"]["gpu_reads"]
    assert report["drift"] == pytest.approx(0.0, abs=1e-6) == report["drift_first_pass"]
    assert report["drift_flagged"] is False and report["passes"] == 1 and report["moved"] == []
    assert report["remeasured_for_spread"] == [] and report["high_spread"] == []
    assert report["nodes_measured"] == 5 and report["measurements"] == 6
    assert report["seconds"] == pytest.approx(rig.clock() - 1000.0, abs=0.6)  # probing came first
    assert "root.leaf_1: 0.0015 s/call x" in caplog.text and "spread 0.00%" in caplog.text
    fields = result.fields
    assert set(fields) == {"root", *LEAF_S}
    assert fields["root.leaf_3"]["times_mean"] == pytest.approx(3.5e-3, rel=1e-6)
    from irene.measure.protocol import measure_trace

    rig2 = Rig(1e-3, 200.0)
    assert measure_trace(_trace(rig2), rig2.meter("gpu", 0.01), settings, clock=rig2.clock).keys() == \
        fields.keys()


def test_the_drift_warnings(caplog):
    with caplog.at_level(logging.WARNING, logger="irene.measure.protocol.drift"):
        _drift_run(0.5, 3, "remeasure")
    assert "drift: the root moved -50.0% between the first and the last node; measuring every node " \
        "once more" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="irene.measure.protocol.drift"):
        _drift_run(0.5, 3, "flag")
    assert "drift: the root moved -50.0% during the measurement (flagged in the record)" in caplog.text
    assert "measuring every node" not in caplog.text


def test_fixed_protocol_in_a_trace_reports_no_tick_and_drift_by_time_without_a_meter():
    from irene.measure.meters import NullMeter

    state = {"slow": 1.0}
    rig = Rig(1e-3, 100.0)
    trace = _trace(rig)
    for node in trace.nodes():
        steady = node.func
        node.func = (lambda f: lambda: (f(), rig.advance(1e-3 * (state["slow"] - 1.0))))(steady)
    settings = quick(protocol="fixed", min_window_s=0.02, windows=1, drift_action="flag")
    result = measure_nodes(trace, NullMeter(), settings, clock=rig.clock,
                           on_progress=lambda d, t, s: state.__setitem__("slow", 2.0) if d == 1 else None)
    report = result.report
    assert report["tick_s"] is None and report["ticks_s"] == {} and report["ground_truth_meter"] == "none"
    assert report["drift_first_pass"] == pytest.approx(1 / 3, rel=1e-3)  # 3 ms root + 1 ms slower
    assert report["drift_flagged"] and report["settle"]["power_w"] is None


def test_fixed_windows_last_their_busy_time_and_the_node_its_whole_measurement():
    rig = Rig(1e-3, 100.0)
    meter = rig.meter("exact", 0.0)
    start = rig.clock()
    result = measure_callable(rig.call, meter, quick(protocol="fixed", min_window_s=0.02, windows=2),
                              clock=rig.clock)
    assert all(w.duration_s == w.busy_s > 0 for w in result.windows)
    assert result.measuring_s == pytest.approx(rig.clock() - start, abs=3 * READ_S)
    assert meter.reads == 2 * 2  # no probing: two reads per window


def test_relative_range_of_nothing_is_zero():
    from irene.measure.protocol.settling import _relative_range

    assert _relative_range([0.0, 0.0, 0.0]) == 0.0
    assert _relative_range([1.0, 2.0, 3.0]) == 1.0


def test_the_debug_line_gives_each_node_its_spread(caplog):
    state = {"flicker": False}
    rig = Rig(1e-3, lambda t: 200.0 * (2.0 if state["flicker"] and int(t / 0.03) % 2 else 1.0))
    meter = rig.meter("gpu", 0.01)
    trace = _trace(rig)
    leaf = next(n for n in trace.nodes() if n.scope == "root.leaf_2")
    steady = leaf.func

    def flickering() -> None:
        state["flicker"] = True
        steady()
        state["flicker"] = False

    leaf.func = flickering
    settings = quick(min_window_s=0.02, windows=3, drift_action="flag")
    with caplog.at_level(logging.DEBUG, logger="irene.measure.protocol.drift"):
        result = measure_nodes(trace, meter, settings, clock=rig.clock)
    fields = result.fields["root.leaf_2"]
    spread = fields["energy_std_j"] / fields["ground_truth_energy"]
    assert spread > 0.01
    assert f"spread {100 * spread:.2f}%" in caplog.text


def test_a_second_pass_adds_its_nodes_to_the_progress_total():
    state = {"power": 200.0}
    rig = Rig(1e-3, lambda t: state["power"])
    meter = rig.meter("gpu", 0.01)
    totals: list[int] = []

    def on_progress(done: int, total: int, scope: str) -> None:
        totals.append(total)
        if done == 3:
            state["power"] = 100.0

    settings = quick(min_window_s=0.02, windows=2, drift_action="remeasure")
    measure_nodes(_trace(rig), meter, settings, clock=rig.clock, on_progress=on_progress)
    assert totals == [6] * 6 + [11] * 5


def test_settling_synchronises_the_device_like_every_window():
    def syncs_before_the_first_node(settle_min_s: float) -> int:
        rig = Rig(1e-3, 200.0)
        meter = rig.meter("gpu", 0.01)
        count = {"sync": 0, "at_first": -1}

        def sync() -> None:
            count["sync"] += 1

        def on_progress(done: int, total: int, scope: str) -> None:
            if done == 1:
                count["at_first"] = count["sync"]

        settings = quick(min_window_s=0.02, windows=1, drift_action="flag", settle_min_s=settle_min_s,
                         settle_max_s=max(1.0, settle_min_s))
        measure_nodes(_trace(rig), meter, settings, sync=sync, clock=rig.clock, on_progress=on_progress)
        return count["at_first"]

    assert syncs_before_the_first_node(0.2) > syncs_before_the_first_node(0.0) + 20


def test_a_drift_equal_to_the_threshold_is_not_flagged():
    first, _ = _drift_run(0.5, 3, "flag")
    drift = first.report["drift"]
    again, _ = _drift_run(0.5, 3, "flag", threshold=abs(drift))
    assert again.report["drift"] == drift and again.report["drift_flagged"] is False
    assert again.report["passes"] == 1


def test_an_unsettled_report_gives_the_last_windows_power():
    rig = Rig(1e-3, lambda t: 100.0 * math.exp(0.1 * (t - 1000.0)))
    meter = rig.meter("gpu", 0.1)
    report = _settle(rig, meter, quick(settle_min_s=0.5, settle_max_s=2.0))
    # the last window closed at the last update before returning: 0.2 s ending near now
    expected = 100.0 * math.exp(0.1 * (rig.clock() - 0.1 - 1000.0))
    assert report.power_w == pytest.approx(expected, rel=0.005)


def test_settle_windows_follow_the_window_rules():
    """10 ms ticks, 2 ms calls (one per chunk), min_window_s 15 ms: windows of two ticks
    (20 ms), each opened at the update after the last one closed (30 ms per window)."""
    rig = Rig(2e-3, 100.0)
    meter = rig.meter("gpu", 0.01, seed=9)
    report = _settle(rig, meter, quick(settle_min_s=0.3, settle_max_s=5.0, min_window_s=0.015))
    assert report.settled and report.seconds / report.windows == pytest.approx(0.03, abs=0.004)


def test_probing_every_counter_of_a_meter_set():
    rig = Rig(1e-3, 100.0)
    meters = MeterSet(rig.meter("gpu", 10.0, seed=1))
    assert meters.tick_s is None and meters.tick_index is None and meters.read_s == 0.0
    assert meters.ticks_s == {}
    with pytest.raises(MeterUnavailableError) as caught:
        meters.probe(rig.clock)
    assert str(caught.value) == ("the gpu energy counter did not update within 3.0 s (its period could "
                                 "not be probed; set measure.tick_s to skip probing)")


# ------------------------------------------- gaps found by a whole-file mutation run (trust.md)
def test_probe_tick_s_honours_its_updates_and_its_timeout():
    """A counter updated every 2.5 s: three updates within a 10 s timeout give its period; a
    0.05 s timeout is the one named in the error."""
    rig = Rig(1e-3, 100.0)
    rig.read_s = 1e-3
    meter = rig.meter("slow", 2.5)
    assert probe_tick_s(meter, rig.clock, updates=3, timeout_s=10.0) == pytest.approx(2.5, abs=2e-3)
    with pytest.raises(MeterUnavailableError, match=r"did not update within 0\.05 s"):
        probe_tick_s(meter, rig.clock, timeout_s=0.05)


def test_a_counter_too_slow_to_probe_is_measured_with_a_given_tick():
    """A counter updated every 3.5 s cannot be probed within 3 s (the error says to set
    measure.tick_s); given tick_s, one node and a whole trace are measured exactly on it."""
    rig = Rig(1e-3, 200.0)
    rig.read_s = 1e-3  # 50 ms chunks: few steps per 3.5 s window
    meter = rig.meter("slow", 3.5)
    with pytest.raises(MeterUnavailableError, match="set measure.tick_s"):
        measure_callable(rig.call, meter, quick(windows=1), clock=rig.clock)
    settings = quick(tick_s=3.5, windows=1, window_ticks=1, drift_action="flag")
    result = measure_callable(rig.call, meter, settings, clock=rig.clock)
    assert result.ground_truth_energy == pytest.approx(200.0 * 1e-3, rel=1e-6)
    assert [w.duration_s for w in result.windows] == pytest.approx([3.5], abs=1e-6)
    trace_rig = Rig(1e-3, 200.0)
    trace_rig.read_s = 1e-3
    traced = measure_nodes(_trace(trace_rig), trace_rig.meter("slow", 3.5), settings, clock=trace_rig.clock)
    assert traced.report["tick_s"] == 3.5 and traced.report["ticks_s"] == {"slow": 3.5}
    for scope, call_s in {"root": 3e-3, **LEAF_S}.items():
        assert traced.fields[scope]["ground_truth_energy"] == pytest.approx(200.0 * call_s, rel=1e-6)


def test_a_trace_on_summed_counters_records_the_gpu_feature_and_the_probes():
    """CPU (1 ms ticks, 30 %) + GPU (50 ms, 70 %) summed, the GPU counter also a feature and a
    utilisation probe: every node, the pooled root included, records both energies and the
    probe's reading, and the report names the counters; measure_trace passes the same
    arguments on."""
    from irene.measure.protocol import measure_trace

    def run(measure: Callable):
        rig = Rig(1e-3, 200.0)
        cpu = rig.meter("cpu", 0.001, share=0.3, seed=4)
        gpu = rig.meter("gpu", 0.05, share=0.7, seed=5)
        settings = quick(min_window_s=0.1, windows=2, drift_action="flag")
        return measure(_trace(rig), SumMeter([cpu, gpu]), settings, gpu_meter=gpu,
                       probes=[lambda: {"gpu": 55.0}], clock=rig.clock)

    result = run(measure_nodes)
    report, fields = result.report, result.fields
    assert report["ground_truth_meter"] == "cpu+gpu" and report["gpu_energy_mean_meter"] == "gpu"
    call_s = {"root": 3e-3, **LEAF_S}
    for scope, seconds in call_s.items():
        # the CPU part is read up to one 1 ms tick stale at each end of a 0.1 s window
        assert fields[scope]["ground_truth_energy"] == pytest.approx(200.0 * seconds, rel=4e-3)
        assert fields[scope]["gpu_energy_mean"] == pytest.approx(0.7 * 200.0 * seconds, rel=1e-6)
        assert fields[scope]["gpu"] == 55.0
    traced = run(measure_trace)
    for scope, seconds in call_s.items():
        assert traced[scope]["gpu_energy_mean"] == pytest.approx(fields[scope]["gpu_energy_mean"], rel=1e-12)
        assert traced[scope]["times_mean"] == pytest.approx(seconds, rel=1e-9)
        assert traced[scope]["gpu"] == 55.0


def test_nodes_after_a_reused_one_are_still_measured():
    """leaf_1 has leaf_0's signature: it reuses leaf_0's measurement, and leaf_2 and leaf_3,
    which come after it, are measured (not dropped at the first repeat)."""
    rig = Rig(1e-3, 200.0)
    meter = rig.meter("gpu", 0.01)
    trace = _trace(rig)
    trace.root.children[1].signature = trace.root.children[0].signature
    settings = quick(min_window_s=0.02, windows=2, drift_action="flag")
    result = measure_nodes(trace, meter, settings, clock=rig.clock)
    fields = result.fields
    assert fields["root.leaf_1"]["measurement_reused_from"] == "fake/1x1/root.leaf_0"
    for scope in ("root.leaf_2", "root.leaf_3"):
        assert "measurement_reused_from" not in fields[scope]
        assert fields[scope]["ground_truth_energy"] == pytest.approx(200.0 * LEAF_S[scope], rel=1e-3)
    assert result.report["nodes_measured"] == 4 and result.report["measurements"] == 5


def test_a_drift_equal_to_the_threshold_is_not_remeasured():
    first, _ = _drift_run(0.5, 3, "flag")
    drift = first.report["drift_first_pass"]
    again, _ = _drift_run(0.5, 3, "remeasure", threshold=abs(drift))
    report = again.report
    assert report["drift_first_pass"] == drift
    assert report["passes"] == 1 and report["measurements"] == 6 and report["drift_flagged"] is False


def _flickering_run(scopes: set[str], **overrides: object):
    """The trace at 200 W; the nodes in ``scopes`` double the power every other 30 ms."""
    state = {"flicker": False}
    rig = Rig(1e-3, lambda t: 200.0 * (2.0 if state["flicker"] and int(t / 0.03) % 2 else 1.0))
    meter = rig.meter("gpu", 0.01)
    trace = _trace(rig)
    for node in trace.nodes():
        if node.scope in scopes:
            def flickering(steady: Callable = node.func) -> None:
                state["flicker"] = True
                steady()
                state["flicker"] = False

            node.func = flickering
    settings = quick(min_window_s=0.02, windows=3, drift_action="flag", **overrides)
    return measure_nodes(trace, meter, settings, clock=rig.clock)


def test_a_root_remeasured_for_its_spread_is_named():
    """The root flickers: each of its two measurements takes two attempts (max_remeasure 1),
    so the report names it as re-measured for its spread."""
    report = _flickering_run({"root"}, max_remeasure=1, spread_threshold=0.02).report
    assert report["remeasured_for_spread"] == ["fake/1x1/root"]
    assert report["measurements"] == 6 and report["nodes_measured"] == 5


def test_a_spread_equal_to_the_threshold_is_not_high_spread():
    flicker = _flickering_run({"root.leaf_2"}, spread_threshold=0.02)
    assert flicker.report["high_spread"] == ["fake/1x1/root.leaf_2"]
    leaf = flicker.fields["root.leaf_2"]
    spread = leaf["energy_std_j"] / leaf["ground_truth_energy"]
    at_threshold = _flickering_run({"root.leaf_2"}, spread_threshold=spread)
    same = at_threshold.fields["root.leaf_2"]
    assert [same[k] for k in ("energy_std_j", "ground_truth_energy")] == \
        [leaf[k] for k in ("energy_std_j", "ground_truth_energy")]
    assert at_threshold.report["high_spread"] == []  # at the threshold is within it, as for re-measuring


def test_a_trace_settles_on_its_own_clock():
    """settle_min_s 0.1 s on the virtual clock: three windows of 40 ms (ten chunks of one 3 ms
    root call, and the wait for the next 10 ms update), at 200 W, before the first node."""
    rig = Rig(1e-3, 200.0)
    meter = rig.meter("gpu", 0.01)
    settings = quick(min_window_s=0.02, windows=1, drift_action="flag", settle_min_s=0.1, settle_max_s=5.0)
    settle_report = measure_nodes(_trace(rig), meter, settings, clock=rig.clock).report["settle"]
    assert settle_report["settled"] and 0.1 <= settle_report["seconds"] <= 0.1 + 0.04
    assert settle_report["windows"] == 3
    assert settle_report["power_w"] == pytest.approx(200.0, rel=1e-3)


def test_fixed_protocol_settles_on_timed_windows_with_a_meter():
    """The fixed protocol probes no tick: settling runs windows of busy time and reads the
    counter at their ends; the power is the device's."""
    rig = Rig(1e-3, 250.0)
    meter = rig.meter("exact", 0.0)
    settings = quick(protocol="fixed", min_window_s=0.02, windows=1, drift_action="flag", settle_min_s=0.1,
                     settle_max_s=5.0)
    result = measure_nodes(_trace(rig), meter, settings, clock=rig.clock)
    settle_report = result.report["settle"]
    assert result.report["tick_s"] is None
    assert settle_report["settled"] and settle_report["power_w"] == pytest.approx(250.0, rel=1e-9)
    assert settle_report["time_per_call_s"] == pytest.approx(3e-3, rel=1e-9)  # the root's calls


def test_settling_stops_three_windows_after_the_calls_level_off():
    """Calls slow from 1 to 2 ms over 1 s (30 % per 0.3 s window), then stay: settled with the
    third window after the ramp, as for power."""
    rig = Rig(1e-3, 200.0)
    meter = rig.meter("gpu", 0.1)
    base = rig.call

    def call() -> None:
        rig.call_s = 1e-3 * (1.0 + min(1.0, rig.time_s - 1000.0))
        base()

    rig.call = call
    report = _settle(rig, meter, quick(settle_min_s=0.5, settle_max_s=30.0, settle_tolerance=0.02))
    since_ramp = rig.clock() - 1001.0
    assert report.settled and report.time_per_call_s == pytest.approx(2e-3, rel=1e-6)
    assert 2 * 0.3 < since_ramp <= 3 * 0.3 + 0.01


def test_an_unsettled_report_gives_the_last_windows_time_per_call():
    """Calls slowing 50 % per second never settle: the time per call reported is the last
    0.2 s window's (the one before it is 0.3 s older, about 10 % faster)."""
    rig = Rig(1e-3, 200.0)
    meter = rig.meter("gpu", 0.1)
    base = rig.call
    durations: list[tuple[float, float]] = []

    def call() -> None:
        rig.call_s = 1e-3 * (1.0 + 0.5 * (rig.time_s - 1000.0))
        base()
        durations.append((rig.time_s, rig.call_s))

    rig.call = call
    report = _settle(rig, meter, quick(settle_min_s=0.5, settle_max_s=2.0))
    end = rig.clock()
    last = statistics.fmean(d for t, d in durations if end - 0.2 < t <= end)
    assert not report.settled and report.time_per_call_s == pytest.approx(last, rel=0.005)


def test_settling_reads_take_a_small_share_of_short_calls():
    """10 us calls: settling runs them in chunks of about 2 ms, so the counter reads (20 us)
    take at most MAX_READ_SHARE of its time, as in every node's windows."""
    from irene.measure.protocol import MAX_READ_SHARE

    rig = Rig(10e-6, 200.0)
    meter = rig.meter("gpu", 0.01)
    meters = MeterSet(meter)
    meters.probe(rig.clock)
    reads, start = meter.reads, rig.clock()
    report = settle(rig.call, meters, quick(settle_min_s=0.05, settle_max_s=5.0, min_window_s=0.02),
                    clock=rig.clock)
    assert report.settled and report.time_per_call_s == pytest.approx(10e-6, rel=1e-6)
    assert (meter.reads - reads) * READ_S / (rig.clock() - start) <= MAX_READ_SHARE


def test_fixed_windows_capped_at_max_repeats_are_kept():
    """max_repeats 20 of 1 ms calls: the windows last 20 ms, under min_window_s, and are kept
    (the cap wins; no endless redoing)."""
    rig = Rig(1e-3, 300.0)
    rig.read_s = 0.0
    meter = rig.meter("exact", 0.0)
    base = rig.call

    def call() -> None:
        if len(rig.call_j) > 10_000:
            raise RuntimeError("the fixed protocol kept redoing its windows")
        base()

    settings = quick(protocol="fixed", min_window_s=0.05, windows=3, max_repeats=20)
    result = measure_callable(call, meter, settings, clock=rig.clock)
    assert [w.calls for w in result.windows] == [20, 20, 20]
    assert result.ground_truth_energy == pytest.approx(300.0 * 1e-3, rel=1e-9)


def test_fixed_windows_of_calls_longer_than_the_window_hold_one_call():
    rig = Rig(0.1, 300.0)
    rig.read_s = 0.0
    meter = rig.meter("exact", 0.0)
    result = measure_callable(rig.call, meter, quick(protocol="fixed", min_window_s=0.05, windows=2),
                              clock=rig.clock)
    assert result.repeats == 1 and [w.calls for w in result.windows] == [1, 1]
    assert result.ground_truth_energy == pytest.approx(30.0, rel=1e-9)


def test_fixed_protocol_records_the_gpu_feature():
    """A CPU ground truth (25 %) and a GPU feature counter (75 %), both continuous."""
    rig = Rig(1e-3, 200.0)
    rig.read_s = 0.0
    cpu = rig.meter("cpu", 0.0, share=0.25)
    gpu = rig.meter("gpu", 0.0, share=0.75)
    result = measure_callable(rig.call, cpu, quick(protocol="fixed", min_window_s=0.02, windows=2),
                              gpu_meter=gpu, clock=rig.clock)
    assert result.ground_truth_energy == pytest.approx(0.25 * 0.2, rel=1e-9)
    assert result.gpu_energy_mean == pytest.approx(0.75 * 0.2, rel=1e-9)
    assert result.fields()["gpu_energy_mean"] == result.gpu_energy_mean


def test_an_aligned_measurement_counts_its_whole_time():
    """measuring_s: warm-up, timing, alignment and windows (the given tick's 20 timed reads
    before it are not the node's)."""
    rig = Rig(1e-3, 100.0)
    meter = rig.meter("gpu", 0.1, seed=3)
    start = rig.clock()
    result = measure_callable(rig.call, meter, quick(tick_s=0.1), clock=rig.clock)
    assert result.measuring_s == pytest.approx(rig.clock() - start - 20 * READ_S, abs=1e-9)
    assert result.measuring_s > 3 * 0.2
