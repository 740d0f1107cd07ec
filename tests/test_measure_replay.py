"""The replay meter: a recorded counter trace, replayed against the protocol's clock.

The traces replayed: tests/data/counter_trace_simulated.csv (recorded from the simulated
meter, labelled so) and every ``datasets/**/counter_trace*.csv`` (recorded on hardware by
scripts/gpu_check.sh), so a trace shipped there is tested as soon as it is committed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from irene.errors import InputError, MissingInputError
from irene.measure.meters.replay import ReplayMeter, format_trace, read_trace, thin_samples
from irene.measure.protocol import ProtocolSettings, measure_callable, probe_tick_s

ROOT = Path(__file__).resolve().parents[1]
SIMULATED_TRACE = ROOT / "tests" / "data" / "counter_trace_simulated.csv"
TRACES = [SIMULATED_TRACE, *sorted((ROOT / "datasets").glob("**/counter_trace*.csv"))]


class StepClock:
    """A virtual clock: every call costs ``step_s`` (a counter read's cost); ``advance`` runs work."""

    def __init__(self, step_s: float = 20e-6) -> None:
        self.time_s, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.time_s += self.step_s
        return self.time_s

    def advance(self, seconds: float) -> None:
        self.time_s += seconds


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ the format
def test_format_and_read_round_trip(tmp_path):
    samples = [(100.0, 5000.0), (100.05, 5000.0), (100.1, 5010.0), (100.2, 5020.0)]
    path = _write(tmp_path, format_trace(samples, ["made by hand", "phase: busy 0.0 0.2"]))
    trace = read_trace(path)
    assert trace.times_s == pytest.approx([0.0, 0.05, 0.1, 0.2])
    assert trace.energies_j == [0.0, 0.0, 10.0, 20.0]
    assert trace.comments == ["made by hand", "phase: busy 0.0 0.2"]
    assert trace.phases() == {"busy": (0.0, 0.2)}
    assert trace.mean_power_w(0.0, 0.2) == pytest.approx(100.0)
    # two reads within a nanosecond (a fast counter): one sample, the later value, still readable
    close = _write(tmp_path, format_trace([(1.0, 5.0), (1.0000000001, 5.5), (1.2, 6.0)]))
    assert read_trace(close).energies_j == [0.0, 0.5]  # rebased to the sample kept


@pytest.mark.parametrize(("text", "message"), [
    ("time,energy\n0,0\n1,1\n", "trace.csv:1: header must be 'time_s,energy_j'"),
    ("# only a comment\n", "trace.csv: no header line 'time_s,energy_j'"),
    ("time_s,energy_j\n0,0\n", "trace.csv: a counter trace needs at least two samples, got 1"),
    ("time_s,energy_j\n0,0\n0.1,x\n", "trace.csv:3: field 'energy_j': not a number: 'x'"),
    ("time_s,energy_j\n0,0\n0.1,1,2\n", "trace.csv:3: expected 2 fields (time_s,energy_j), got 3"),
    ("time_s,energy_j\n0,0\n0,1\n", "trace.csv:3: field 'time_s': 0.0 does not increase"),
    ("time_s,energy_j\n0,5\n# note\n0.1,4\n", "trace.csv:4: field 'energy_j': 4.0 decreases"),
    ("time_s,energy_j\n0,0\nnan,1\n", "trace.csv:3: field 'time_s': not finite"),
])
def test_a_bad_trace_is_one_line_naming_file_line_and_field(tmp_path, text, message):
    with pytest.raises(InputError) as error:
        read_trace(_write(tmp_path, text))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_trace_says_so(tmp_path):
    with pytest.raises(MissingInputError, match="no such counter trace file"):
        ReplayMeter(tmp_path / "absent.csv")
    assert not ReplayMeter.available(path=tmp_path / "absent.csv")


def test_thinning_keeps_the_step_function():
    reads = [(i * 0.01, float(10 * (i // 10))) for i in range(100)]  # updates every 10 reads
    kept = thin_samples(reads)
    assert len(kept) == 20  # the first and last, and the two reads around each of the 9 updates
    full, thin = read_trace_from(reads), read_trace_from(kept)
    for i in range(990):
        t = i * 0.001
        assert thin.energy_at_j(t) == full.energy_at_j(t)


def read_trace_from(samples):
    from irene.measure.meters.replay import CounterTrace

    return CounterTrace([t for t, _ in samples], [e for _, e in samples])


# ------------------------------------------------------------------------------ the replay
def test_replay_follows_the_clock_and_loops(tmp_path):
    path = _write(tmp_path, "time_s,energy_j\n0,0\n0.1,0\n0.1001,2\n0.2,2\n0.2001,4\n0.3,4\n")
    clock = StepClock(step_s=0.0)
    meter = ReplayMeter(path, clock=clock)
    reads = {}
    for t in (0.05, 0.1, 0.15, 0.25, 0.3, 0.35, 0.45, 0.6):
        clock.time_s = t
        reads[t] = meter.read_energy_j()
    assert [reads[t] for t in (0.05, 0.1, 0.15, 0.25, 0.3)] == [0, 0, 2, 4, 4]
    assert reads[0.35] == 4 and reads[0.45] == 6 and reads[0.6] == 8  # the second lap carries on
    held = ReplayMeter(path, loop=False, clock=clock)
    clock.advance(10.0)
    assert held.read_energy_j() == 4
    late = ReplayMeter(path, offset_s=0.15, clock=clock)
    assert late.read_energy_j() == 2 and late.describe()["replay_samples"] == "6"


# ------------------------------------------------------------------- recorded traces, replayed
@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name)
def test_a_recorded_trace_replays_through_the_protocol(path):
    """The protocol on a replayed trace: it finds the counter's update period in the data, and
    the energy per call it measures is the trace's power times the call's duration."""
    trace = read_trace(path)
    phases = trace.phases()
    assert set(phases) >= {"idle", "load"}, "the recorder marks its idle and load phases"
    period = trace.update_period_s()
    assert period is not None and 0 < period < 1.0
    # the probe sees in the replay the gaps the recorder saw: the median of the first four
    # after where it starts (a read costs 20 us of the virtual clock)
    for offset_s in (0.0, phases["load"][0]):
        clock = StepClock()
        first = [t - offset_s for t in trace.updates_s() if t > offset_s][:5]
        gaps = sorted(b - a for a, b in zip(first, first[1:], strict=False))
        probed = probe_tick_s(ReplayMeter(path, offset_s=offset_s, clock=clock), clock)
        assert probed == pytest.approx((gaps[1] + gaps[2]) / 2, abs=1e-4)

    # a node of 1 ms a call, measured on the load phase (one lap, no wrap)
    start, end = phases["load"]
    clock = StepClock()
    meter = ReplayMeter(path, offset_s=start + period, loop=False, clock=clock)
    call_s = 1e-3
    settings = ProtocolSettings(windows=3, warmup=1, settle_min_s=0, max_remeasure=0, sample_interval_s=1.0)
    result = measure_callable(lambda: clock.advance(call_s), meter, settings, clock=clock)
    spent_s = clock.time_s
    assert start + period + spent_s < end, "the measurement stayed within the load phase"
    power_w = result.ground_truth_energy / result.times_mean
    assert result.times_mean == pytest.approx(call_s, rel=0.05)
    # the power of every update interval the measurement spanned bounds the power measured
    updates = [t for t in trace.updates_s() if start + period <= t <= start + period + spent_s]
    powers = [trace.mean_power_w(a, b) for a, b in zip(updates, updates[1:], strict=False)]
    assert min(powers) * 0.95 <= power_w <= max(powers) * 1.05


def test_the_simulated_fixture_is_labelled_and_replays_its_power():
    trace = read_trace(SIMULATED_TRACE)
    assert "SIMULATED" in trace.comments[0] and "not a measurement" in trace.comments[0]
    for name, (start, end) in trace.phases().items():
        # simulated.yaml's power
        assert trace.mean_power_w(start, end) == pytest.approx(300.0, rel=0.03), name


def test_the_stage_measures_with_the_replay_meter(tmp_path):
    """measure/meter=replay: the stage end to end on a recorded counter, no hardware."""
    from hydra import compose, initialize_config_dir

    from pipelines.config import register_configs
    from pipelines.stage import run_stage

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "stage=measure", "model=tiny/bert", "batch_size=1", "seq_len=4", "show_progress=false",
            "measure/meter=replay", f"measure.meter.path={SIMULATED_TRACE}", "measure.device=cpu",
            "measure.windows=1", "measure.window_ticks=1", "measure.min_window_s=0.05", "measure.warmup=0",
            "measure.settle_min_s=0", "measure.max_remeasure=0", "measure.drift_action=flag",
            "measure.track=false", f"measure.output={tmp_path / 'trees.jsonl'}"])
    path = run_stage("measure", cfg)
    record = json.loads(path.read_text())
    block = record["measurement"]
    assert block["ground_truth_meter"] == "replay" and block["ground_truth_features"] == []
    assert block["tick_s"] == pytest.approx(0.1, rel=0.2)  # probed from the replayed data
    root = record["frontend_tree"]
    assert root["ground_truth_energy"] / root["times_mean"] == pytest.approx(300.0, rel=0.15)
