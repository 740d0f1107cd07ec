"""The measurement protocol against a fake meter (energy = power x elapsed time)."""

from __future__ import annotations

import time

import pytest

from irene.data.architectures import model_from_name
from irene.measure.meters import NullMeter
from irene.measure.meters.base import EnergyMeter
from irene.measure.protocol import ProtocolSettings, measure_callable, measure_trace
from irene.measure.trace import trace_model, trace_to_record

FAST = ProtocolSettings(min_window_s=0.004, windows=2, warmup=1, sample_interval_s=0.001)


class PowerMeter(EnergyMeter):
    """A constant-power device: energy is power times the time since creation."""

    name = "fake"

    def __init__(self, power_w: float = 50.0) -> None:
        self.power_w = power_w
        self.start_s = time.perf_counter()
        self.reads = 0

    @classmethod
    def available(cls, **kwargs: object) -> bool:
        return True

    def read_energy_j(self) -> float:
        self.reads += 1
        return self.power_w * (time.perf_counter() - self.start_s)


def _nodes(node):
    yield node
    for child in node["child_nodes_obj"]:
        yield from _nodes(child)


def test_energy_per_call_is_window_energy_over_repeats():
    calls = []
    meter = PowerMeter(power_w=20.0)
    settings = ProtocolSettings(min_window_s=0.05, windows=3, warmup=2, sample_interval_s=0.01)
    result = measure_callable(lambda: (calls.append(1), time.sleep(0.002)), meter, settings)
    assert result.repeats >= 0.05 / 0.01  # calibrated to fill the window
    assert result.times_mean == pytest.approx(0.002, rel=0.5)
    assert result.ground_truth_energy == pytest.approx(20.0 * result.times_mean, rel=0.05)
    assert result.energy_std_j is not None and result.energy_std_j >= 0
    assert meter.reads == 2 * 3
    assert {"cpu", "mem"} <= set(result.utilisation)
    assert "gpu" not in result.utilisation
    assert len(calls) >= 2 + 3 * result.repeats


def test_short_window_is_lengthened():
    state = {"slow": False}

    def fn():
        time.sleep(0.0005 if state["slow"] else 0.0)

    meter = PowerMeter()
    settings = ProtocolSettings(min_window_s=0.02, windows=1, warmup=0, sample_interval_s=0.01)
    result = measure_callable(fn, meter, settings)
    assert result.times_mean * result.repeats >= 0.02 * 0.9


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


def test_reuse_can_be_disabled(tiny_trace):
    settings = ProtocolSettings(
        min_window_s=0.002, windows=1, warmup=0, reuse_identical=False, sample_interval_s=0.001
    )
    measured = measure_trace(tiny_trace, PowerMeter(), settings)
    assert not any("measurement_reused_from" in fields for fields in measured.values())


def test_no_meter_leaves_ground_truth_absent(tiny_trace):
    measured = measure_trace(tiny_trace, NullMeter(), FAST)
    record = trace_to_record(tiny_trace, measured)
    for node in _nodes(record["frontend_tree"]):
        assert "ground_truth_energy" not in node
        assert "energy_std_j" not in node
        assert node["times_mean"] > 0
