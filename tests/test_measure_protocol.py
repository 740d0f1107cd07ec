"""The measurement protocol against fake and simulated meters (no hardware)."""

from __future__ import annotations

import statistics
import time

import pytest

from irene.data.architectures import model_from_name
from irene.measure.meters import NullMeter, SimulatedDevice, SimulatedMeter, SumMeter
from irene.measure.meters.base import EnergyMeter
from irene.measure.protocol import (
    MeterSet,
    ProtocolSettings,
    measure_callable,
    measure_nodes,
    measure_trace,
    probe_tick_s,
)
from irene.measure.settings import SimulatedMeterSettings
from irene.measure.trace import Trace, TraceNode, trace_model, trace_to_record

# fast real-time settings: no settling, short windows, no re-measurement
FAST = ProtocolSettings(min_window_s=0.004, windows=2, warmup=1, sample_interval_s=0.001, settle_min_s=0,
                        max_remeasure=0, drift_action="flag", tick_s=1e-4)


class PowerMeter(EnergyMeter):
    """A constant-power device with a continuous counter: energy = power x time since creation."""

    name = "fake"

    def __init__(self, power_w: float = 50.0) -> None:
        self.power_w = power_w
        self.start_s = time.perf_counter()
        self.energy_j = 0.0
        self.last_s = self.start_s
        self.reads = 0

    @classmethod
    def available(cls, **kwargs: object) -> bool:
        return True

    def read_energy_j(self) -> float:
        self.reads += 1
        now = time.perf_counter()
        self.energy_j += self.power_w * (now - self.last_s)
        self.last_s = now
        return self.energy_j


class GpuPowerMeter(PowerMeter):
    name = "fakegpu"
    is_gpu = True


def _nodes(node):
    yield node
    for child in node["child_nodes_obj"]:
        yield from _nodes(child)


def _device(seed: int, call_s: float, **kwargs) -> SimulatedDevice:
    """H200-like: a counter updated every 100 ms, 300 W with 1 % noise, 20 us counter reads."""
    counter = SimulatedMeterSettings(tick_s=0.1, noise=0.01, seed=seed)
    return SimulatedDevice(counter, call_s, 300.0, call_jitter=0.01, read_s=20e-6, **kwargs)


# ------------------------------------------------------------------------------ fixed protocol
def test_fixed_protocol_energy_is_window_energy_over_repeats():
    calls = []
    meter = PowerMeter(power_w=20.0)
    settings = ProtocolSettings(protocol="fixed", min_window_s=0.05, windows=3, warmup=2,
                                sample_interval_s=0.01, max_remeasure=0)
    result = measure_callable(lambda: (calls.append(1), time.sleep(0.002)), meter, settings)
    assert result.repeats >= 0.05 / 0.01  # calibrated to fill the window
    assert 0.002 <= result.times_mean < 0.05  # a 2 ms sleep; longer on a loaded machine
    assert result.ground_truth_energy == pytest.approx(20.0 * result.times_mean, rel=0.05)
    assert result.energy_std_j is not None and result.energy_std_j >= 0
    # two reads per window; a window found too short (real time: the calibration's calls ran
    # slower than the window's) is redone, with two reads more (exact counts: the virtual-clock
    # scenarios in test_protocol_scenarios.py)
    assert len(result.windows) == 3
    assert meter.reads % 2 == 0 and meter.reads >= 2 * len(result.windows)
    assert {"cpu", "mem"} <= set(result.utilisation)
    assert "gpu" not in result.utilisation
    assert len(calls) >= 2 + 3 * result.repeats


def test_fixed_protocol_lengthens_a_short_window():
    meter = PowerMeter()
    settings = ProtocolSettings(protocol="fixed", min_window_s=0.02, windows=1, warmup=0,
                                sample_interval_s=0.01)
    result = measure_callable(lambda: None, meter, settings)
    assert result.times_mean * result.repeats >= 0.02 * 0.9


# ---------------------------------------------------------------------------- aligned protocol
def test_probe_finds_the_tick_of_a_simulated_counter():
    device = _device(0, 1e-3)
    assert probe_tick_s(device.meter, device.clock) == pytest.approx(0.1, abs=1e-3)


def test_probe_refuses_a_counter_that_never_updates():
    from irene.measure.meters import MeterUnavailableError

    class Frozen(PowerMeter):
        def read_energy_j(self) -> float:
            return 1.0

    with pytest.raises(MeterUnavailableError, match="did not update"):
        probe_tick_s(Frozen(), timeout_s=0.05)


@pytest.mark.parametrize("call_s", [20e-6, 500e-6, 7e-3])
def test_aligned_windows_are_exact_on_a_100ms_counter(call_s):
    """The issue's target: within 1 % of the true per-call energy with windows <= 0.4 s."""
    errors, windows = [], []
    for seed in range(4):
        device = _device(seed, call_s)
        result = measure_callable(device.call, device.meter, ProtocolSettings(sample_interval_s=1.0),
                                  clock=device.clock)
        errors.append(result.ground_truth_energy / device.energy_per_call_j - 1)
        windows += [w.duration_s for w in result.windows]
        assert result.times_mean == pytest.approx(call_s, rel=0.01)
    assert max(abs(e) for e in errors) < 0.01
    assert max(windows) <= 0.4 + 1e-9
    assert statistics.median(windows) == pytest.approx(0.2, abs=0.01)  # two ticks


def test_aligned_beats_the_fixed_protocol_at_equal_time():
    """Same simulated device, same measuring time per node: the fixed protocol's reads are up
    to one tick stale, which costs it an order of magnitude in accuracy."""
    new, old = [], []
    for seed in range(12):
        device = _device(seed, 1e-3)
        start = device.clock()
        result = measure_callable(device.call, device.meter, ProtocolSettings(sample_interval_s=1.0),
                                  clock=device.clock)
        spent = device.clock() - start
        new.append(result.ground_truth_energy / device.energy_per_call_j - 1)
        device = _device(seed, 1e-3)
        # the fixed protocol's windows last 1.1 x min_window_s: about the same time spent
        fixed = ProtocolSettings(protocol="fixed", min_window_s=spent / 3 / 1.1, sample_interval_s=1.0,
                                 max_remeasure=0)
        start = device.clock()
        result = measure_callable(device.call, device.meter, fixed, clock=device.clock)
        assert device.clock() - start == pytest.approx(spent, rel=0.25)
        old.append(result.ground_truth_energy / device.energy_per_call_j - 1)

    def rms(errors: list[float]) -> float:
        return statistics.fmean(e * e for e in errors) ** 0.5

    assert rms(new) < 0.005 and rms(old) > 5 * rms(new)


def test_noisy_node_is_remeasured_and_keeps_the_tightest():
    device = _device(3, 100e-6)
    device.counter.settings.noise = 0.5  # very noisy power: windows disagree
    settings = ProtocolSettings(sample_interval_s=1.0, spread_threshold=0.001, max_remeasure=2)
    result = measure_callable(device.call, device.meter, settings, clock=device.clock)
    assert result.attempts == 3


def test_gpu_counter_that_is_the_ground_truth_is_not_a_feature():
    gpu = GpuPowerMeter(power_w=30.0)
    result = measure_callable(lambda: time.sleep(0.0005), gpu, FAST, gpu_meter=gpu)
    assert result.ground_truth_energy is not None and result.gpu_energy_mean is None
    assert "gpu_energy_mean" not in result.fields()
    assert MeterSet(gpu, gpu).gpu_feature is False


def test_gpu_counter_beside_a_separate_ground_truth_is_a_feature():
    gpu, cpu = GpuPowerMeter(power_w=30.0), PowerMeter(power_w=10.0)
    both = SumMeter([cpu, gpu])
    meters = MeterSet(both, gpu)
    assert meters.gpu_feature and meters.gpu_name == "fakegpu" and len(meters.meters) == 2
    result = measure_callable(lambda: time.sleep(0.0005), both, FAST, gpu_meter=gpu)
    assert 0 < result.gpu_energy_mean < result.ground_truth_energy
    assert result.gpu_energy_mean / result.ground_truth_energy == pytest.approx(0.75, rel=0.1)


# ------------------------------------------------------------------------------- whole trees
@pytest.fixture(scope="module")
def tiny_trace():
    return trace_model(model_from_name("tiny/bert"), 2, 8, "tiny/bert", capture_inputs=True)


def test_every_node_measured_with_fake_meter(tiny_trace):
    measured = measure_trace(tiny_trace, PowerMeter(), FAST)
    record = trace_to_record(tiny_trace, measured)
    ids = {n["id"] for n in _nodes(record["frontend_tree"])}
    reused = 0
    for node in _nodes(record["frontend_tree"]):
        assert node["ground_truth_energy"] > 0
        assert node["times_mean"] > 0
        assert {"cpu", "mem"} <= set(node)
        assert "gpu" not in node and "gpu_energy_mean" not in node  # no GPU: absent
        source = node.get("measurement_reused_from")
        if source is not None:
            reused += 1
            assert source in ids and source != node["id"]
    # layer 1 repeats layer 0: its layer, attention, ... nodes reuse layer 0's measurements.
    assert reused >= 10
    layer1 = next(n for n in _nodes(record["frontend_tree"]) if n["scope"] == "root.encoder.layer.1")
    assert layer1["measurement_reused_from"] == "tiny/bert/2x8/root.encoder.layer.0"
    pytest.importorskip("irene.data.tree").validate_tree(record, "measured", require_energy=True)


def test_report_and_order(tiny_trace):
    order = []
    settings = ProtocolSettings(min_window_s=0.004, windows=2, warmup=0, sample_interval_s=0.01,
                                settle_min_s=0.05, settle_max_s=30.0, settle_tolerance=10.0,
                                max_remeasure=0, drift_threshold=10.0, drift_action="flag")
    result = measure_nodes(tiny_trace, SimulatedMeter(SimulatedMeterSettings(tick_s=0.0)), settings,
                           on_progress=lambda done, total, scope: order.append((done, total, scope)))
    report = result.report
    assert order[0][2] == "root" and order[-1][2] == "root"  # root first and last (drift check)
    assert [d for d, _, _ in order] == list(range(1, len(order) + 1)) and order[-1][1] == len(order)
    middle = [s for _, _, s in order[1:-1]]
    tree_order = [n.scope for n in tiny_trace.nodes() if n.scope in set(middle)]
    assert middle != tree_order and sorted(middle) == sorted(tree_order)  # shuffled
    assert report["ground_truth_meter"] == "simulated" and report["gpu_energy_mean_meter"] is None
    assert report["settle"]["windows"] >= 3 and report["settle"]["power_w"] > 0
    assert report["nodes_measured"] == len(middle) + 1 and report["measurements"] == len(order)
    # real time on a loaded machine can move the root by more than 10x: drift is not asserted here
    # (tests/test_protocol_scenarios.py decides drift on a virtual clock); one pass, flagged or not
    assert report["passes"] == 1
    assert report["tick_s"] is not None and report["seconds"] > 0


def _fake_trace(device: SimulatedDevice) -> Trace:
    """A root and four leaves whose calls last 3, 0.5, 1.5, 2.5, 3.5 ms on the virtual clock."""

    def node(scope: str, parent: TraceNode | None, call_s: float) -> TraceNode:
        def call() -> None:
            device.advance(call_s, device.busy_power_w)

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


@pytest.mark.parametrize("action", ["flag", "remeasure"])
def test_drift_is_detected_flagged_and_remeasured(action):
    """On a virtual clock: the device's power doubles after the root's first measurement."""
    counter = SimulatedMeterSettings(tick_s=0.01, noise=0.0, resolution_j=0.0)
    device = SimulatedDevice(counter, 1e-3, 100.0, read_s=1e-5)

    def on_progress(done: int, total: int, scope: str) -> None:
        if done == 1:
            device.busy_power_w = device.gap_power_w = 200.0

    settings = ProtocolSettings(min_window_s=0.02, windows=2, warmup=1, sample_interval_s=1.0,
                                settle_min_s=0, max_remeasure=0, drift_action=action)
    result = measure_nodes(_fake_trace(device), device.meter, settings, clock=device.clock,
                           on_progress=on_progress)
    report = result.report
    assert report["tick_s"] == pytest.approx(0.01, rel=1e-3)
    assert report["drift_first_pass"] == pytest.approx(1.0, rel=1e-3)
    assert result.fields["root.leaf_1"]["ground_truth_energy"] == pytest.approx(200.0 * 1.5e-3, rel=1e-3)
    if action == "flag":
        assert report["passes"] == 1 and report["drift_flagged"] and report["measurements"] == 6
        # the root pools its measurements before and after the change
        assert result.fields["root"]["ground_truth_energy"] == pytest.approx(150.0 * 3e-3, rel=0.05)
    else:
        assert report["passes"] == 2 and report["measurements"] == 11
        assert report["drift"] == pytest.approx(0.0, abs=1e-3) and not report["drift_flagged"]
        assert report["moved"] == []  # every leaf was measured after the change, both times
        assert result.fields["root"]["ground_truth_energy"] == pytest.approx(200.0 * 3e-3, rel=1e-3)


def test_reuse_can_be_disabled(tiny_trace):
    settings = ProtocolSettings(min_window_s=0.002, windows=1, warmup=0, reuse_identical=False,
                                sample_interval_s=0.001, settle_min_s=0, drift_action="flag", tick_s=1e-4)
    measured = measure_trace(tiny_trace, PowerMeter(), settings)
    assert not any("measurement_reused_from" in fields for fields in measured.values())


def test_no_meter_leaves_ground_truth_absent(tiny_trace):
    result = measure_nodes(tiny_trace, NullMeter(), FAST)
    record = trace_to_record(tiny_trace, result.fields)
    for node in _nodes(record["frontend_tree"]):
        assert "ground_truth_energy" not in node
        assert "energy_std_j" not in node
        assert node["times_mean"] > 0
    assert result.report["ground_truth_meter"] == "none" and result.report["tick_s"] == 0.0
