"""The measure stage: config, one line per configuration, kill-and-resume of a sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from irene.measure.runner import measure_into
from irene.measure.store import append_record, read_keys

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "tests" / "data" / "counter_trace_simulated.csv"  # recorded from the simulated meter


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from pipelines.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _cfg(tmp_path, **measure):
    """The real config, shrunk: no meter, tiny windows, no settling, no tracking."""
    values = {"meter": "none", "device": "cpu", "min_window_s": 0.002, "windows": 1, "warmup": 0,
              "sample_interval_s": 0.001, "settle_min_s": 0, "track": False,
              "output": str(tmp_path / "trees.jsonl"), **measure}
    overrides = [f"measure/meter={values.pop('meter')}"]  # the group: conf/measure/meter/<name>.yaml
    overrides += [f"measure.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
    return _compose(["stage=measure", "model=tiny/bert", "batch_size=2", "seq_len=8", "show_progress=false",
                     *overrides])


def test_defaults_live_in_the_schema_only():
    """conf/measure/default.yaml repeats no default: the schema (and the settings it inherits)
    holds each one once."""
    block = OmegaConf.load(ROOT / "conf" / "measure" / "default.yaml")
    assert list(block) == ["defaults"] and list(block.defaults) == [{"meter": "auto"}, "_self_"]
    cfg = _compose(["stage=measure"])
    assert cfg.measure.meter._target_ == "irene.measure.meters.DeviceCounter" and cfg.measure.device == "auto"
    assert cfg.measure.protocol == "aligned" and cfg.measure.windows == 3
    assert cfg.measure.reuse_identical is True and cfg.measure.attn_implementation == "eager"


@pytest.mark.parametrize("override", ["measure.windows=abc", "measure.min_window_s=fast",
                                      "measure.reuse_identical=maybe", "measure.widnows=3"])
def test_bad_type_or_key_fails_at_compose_time(override):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose(["stage=measure", override])


@pytest.mark.parametrize(("override", "message"), [
    ("measure.windows=0", "measure.windows: must be an integer >= 1, got 0"),
    ("measure.min_window_s=0", "measure.min_window_s: must be a number > 0, got 0.0"),
    ("measure.protocol=sloppy", "measure.protocol: must be one of aligned, fixed, got 'sloppy'"),
    ("measure.meter=wattmeter",
     "measure.meter=wattmeter: no such meter; choose one of auto, none, nvml, rapl, rapl+nvml, replay, "
     "simulated (conf/measure/meter/), as measure/meter=<name>"),
    ("measure/meter=simulated measure.meter.tick_s=-1",
     "measure.meter.tick_s: must be a number >= 0, got -1"),
    ("measure/meter=simulated +measure.meter.tik_s=1",
     "measure.meter (irene.measure.meters.simulated.SimulatedMeter): SimulatedMeterSettings.__init__() "
     "got an unexpected keyword argument 'tik_s'"),
    ("measure/meter=replay", "measure.meter.path: must be set for this meter (measure.meter.path=...)"),
    ("measure/meter=replay measure.meter.path=absent.csv", "absent.csv: no such counter trace file"),
    ("measure.settle_max_s=0.5", "measure.settle_max_s: must be a number >= settle_min_s (1.0), got 0.5"),
    ("measure.device=tpu", "measure.device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("measure.device=cuda:1", "measure.device: cuda:1 is not the GPU the meter reads (measure.gpu_index=0)"),
])
def test_out_of_range_fails_at_start_in_one_line(tmp_path, override, message):
    from irene.errors import UserError  # SettingsError; a missing file: MissingInputError
    from pipelines.stage import run_stage
    cfg = _compose(["stage=measure", "model=tiny/bert", "measure.device=cpu",
                    f"measure.output={tmp_path / 't.jsonl'}", *override.split()])
    with pytest.raises(UserError) as error:
        run_stage("measure", cfg)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "t.jsonl").exists()


def test_settings_instantiate_the_protocol_and_the_meter():
    from irene.measure.meters import SimulatedMeter
    from irene.measure.settings import ProtocolSettings
    from pipelines.stages.measure import build_meter, measure_settings

    cfg = _compose(["stage=measure", "measure=simulated", "measure.meter.tick_s=0.05", "measure.windows=5"])
    settings = measure_settings(cfg)
    assert isinstance(settings, ProtocolSettings) and settings.windows == 5
    meter = build_meter(settings, "cpu")
    assert isinstance(meter, SimulatedMeter) and meter.settings.tick_s == 0.05


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "measure" / "meter").glob("*.yaml")))
def test_every_meter_option_composes_and_names_a_meter(name, tmp_path):
    """Each conf/measure/meter/*.yaml composes and its _target_ is a meter (or auto's picker);
    the ones this machine can open are built, and `measure.meter=<name>` (the former form)
    gives the same config as the group `measure/meter=<name>`."""
    from hydra.utils import get_object

    from irene.measure.meters import DeviceCounter, EnergyMeter, MeterUnavailableError
    from pipelines.stages.measure import build_meter, measure_settings, meter_config

    extra = [f"measure.meter.path={TRACE}"] if name == "replay" else []
    group = _compose(["stage=measure", f"measure/meter={name}", *extra])
    target = get_object(group.measure.meter._target_)
    assert target is DeviceCounter or issubclass(target, EnergyMeter)
    legacy = _compose(["stage=measure", f"measure.meter={name}"])
    assert OmegaConf.to_container(meter_config(legacy)) == OmegaConf.to_container(
        _compose(["stage=measure", f"measure/meter={name}"]).measure.meter)
    try:
        meter = build_meter(measure_settings(group), "cpu")
    except MeterUnavailableError as error:  # no such hardware here (NVML, RAPL): said in one line
        assert "\n" not in str(error)
        return
    assert isinstance(meter, EnergyMeter)
    meter.close()


def test_the_simulated_yaml_repeats_the_settings_defaults():
    import dataclasses

    from irene.measure.settings import SimulatedMeterSettings

    block = OmegaConf.load(ROOT / "conf" / "measure" / "meter" / "simulated.yaml")
    assert {k: v for k, v in block.items() if k != "_target_"} == dataclasses.asdict(SimulatedMeterSettings())


def test_meter_must_measure_the_device_the_model_runs_on(tmp_path):
    from irene.measure.meters import MeterMismatchError
    from pipelines.stages.measure import build_meter, measure_settings

    package = tmp_path / "intel-rapl:0"
    package.mkdir()
    (package / "energy_uj").write_text("1000\n")
    (package / "max_energy_range_uj").write_text("262143328850\n")
    cfg = _compose(["stage=measure", "measure/meter=rapl", f"measure.meter.root={tmp_path}"])
    settings = measure_settings(cfg)
    assert build_meter(settings, "cpu").name == "rapl"
    with pytest.raises(MeterMismatchError, match="meter rapl measures cpu but the model runs on cuda:0"):
        build_meter(settings, "cuda:0")


def test_stage_appends_once_and_skips_on_rerun(tmp_path, monkeypatch, capsys):
    from pipelines.stage import run_stage
    cfg = _cfg(tmp_path)
    path = run_stage("measure", cfg)
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (record["model_name"], record["batch_size"], record["seq_len"]) == ("tiny/bert", 2, 8)
    tree = record["frontend_tree"]
    assert "ground_truth_energy" not in tree and tree["times_mean"] > 0
    called = []
    monkeypatch.setattr("irene.measure.runner.measure_into", lambda *a, **k: called.append(1))
    assert run_stage("measure", cfg) == path
    assert called == [] and len(path.read_text().splitlines()) == 1
    cfg.seq_len = 4
    monkeypatch.undo()
    run_stage("measure", cfg)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"trees: {path}"
    assert read_keys(path) == {("tiny/bert", 2, 8), ("tiny/bert", 2, 4)}


def test_append_record_is_idempotent(tmp_path):
    path = tmp_path / "out" / "trees.jsonl"
    record = {"model_name": "m", "batch_size": 1, "seq_len": 2, "frontend_tree": {}}
    assert append_record(path, record)
    assert not append_record(path, record)
    assert len(path.read_text().splitlines()) == 1
    assert not list(path.parent.glob("*.tmp"))


def test_a_line_with_less_is_replaced_in_place_and_never_one_with_as_much(tmp_path):
    from irene.measure.store import ENERGY, TIMES, TRACE, completeness

    path = tmp_path / "trees.jsonl"

    def record(seq_len, **root):
        return {"model_name": "m", "batch_size": 1, "seq_len": seq_len,
                "frontend_tree": {"id": "root", **root}}

    trace, times = record(2), record(2, times_mean=0.1)
    energy = record(2, times_mean=0.1, ground_truth_energy=3.0)
    assert [completeness(r) for r in (trace, times, energy)] == [TRACE, TIMES, ENERGY]
    assert append_record(path, record(1)) and append_record(path, trace)
    assert append_record(path, record(3))
    assert append_record(path, times)  # more than the trace: replaces it, in its place
    assert not append_record(path, trace)
    assert append_record(path, energy)
    assert not append_record(path, times) and not append_record(path, energy)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seq_len"] for r in lines] == [1, 2, 3]
    assert lines[1] == energy


def test_a_times_only_line_does_not_stop_a_measurement_with_energy(tmp_path, monkeypatch):
    """Measured first where no energy meter exists (times only), then with one: the shape is
    measured again and its line gets the energies; later runs skip it."""
    from pipelines.stage import run_stage
    measured = []
    from irene.measure import runner

    real = runner.measure_into
    monkeypatch.setattr(runner, "measure_into", lambda *a, **k: measured.append(1) or real(*a, **k))
    path = run_stage("measure", _cfg(tmp_path))
    assert "ground_truth_energy" not in json.loads(path.read_text())["frontend_tree"]
    run_stage("measure", _cfg(tmp_path))  # the same meter again: nothing to add
    assert measured == [1]
    simulated = {"meter": "simulated", "meter.tick_s": 0.001}
    run_stage("measure", _cfg(tmp_path, **simulated))
    assert measured == [1, 1]
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["frontend_tree"]["ground_truth_energy"] > 0
    before = path.read_text()
    run_stage("measure", _cfg(tmp_path, **simulated))
    run_stage("measure", _cfg(tmp_path))  # less than what is there: skipped too
    assert measured == [1, 1] and path.read_text() == before


SWEEP = """
import sys, time
from irene.measure.runner import measure_into
path = sys.argv[1]
for seq_len in (2, 3, 4, 5, 6, 7):
    measure_into(path, "tiny/bert", 1, seq_len, measure=False)
    time.sleep(0.15)
"""


def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path):
    path = tmp_path / "trees.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SWEEP, str(path)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while len(read_keys(path)) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = read_keys(path)
    assert 1 <= len(done) < 6, "the sweep must have been killed mid-way"
    # a job killed while writing leaves at most a temporary file, never a torn line
    (tmp_path / ".trees.jsonl.999.tmp").write_text('{"model_name": "tiny/b')
    for seq_len in (2, 3, 4, 5, 6, 7):
        measure_into(path, "tiny/bert", 1, seq_len, measure=False)
    lines = path.read_text().splitlines()
    keys = [tuple(json.loads(line)[k] for k in ("model_name", "batch_size", "seq_len")) for line in lines]
    assert sorted(keys) == [("tiny/bert", 1, s) for s in (2, 3, 4, 5, 6, 7)]


@pytest.mark.parametrize("measure", [False, True])
def test_stage_static_or_measured(tmp_path, measure):
    from pipelines.stage import run_stage
    path = run_stage("measure", _cfg(tmp_path, measure=measure))
    tree = json.loads(path.read_text())["frontend_tree"]
    assert ("times_mean" in tree) is measure
    assert "ground_truth_energy" not in tree


def test_real_config_with_mlflow(tmp_path, capsys):
    """Compose the project's config; the run logs protocol, versions, the summary and the trees."""
    mlflow = pytest.importorskip("mlflow")
    from pipelines.stage import run_stage
    cfg = _compose(
        [
            "stage=measure",
            "model=tiny/gpt2",
            "batch_size=1",
            "seq_len=4",
            "measure=simulated",
            "measure.device=cpu",
            "measure.meter.tick_s=0.005",
            "measure.min_window_s=0.01",
            "measure.windows=2",
            "measure.settle_min_s=0.05",
            "measure.settle_max_s=0.5",
            "measure.max_remeasure=0",
            "measure.drift_action=flag",
            f"measure.output={tmp_path / 'trees.jsonl'}",
            "show_progress=false",
            "tracking=sqlite",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_root={(tmp_path / 'artifacts').as_uri()}",
        ]
    )
    assert cfg.measure.reuse_identical is True
    path = run_stage("measure", cfg)
    assert read_keys(path) == {("tiny/gpt2", 1, 4)}
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"trees: {path}" and out[-2].startswith("tiny/gpt2 1x4: 15/30 nodes measured, root ")
    record = json.loads(path.read_text())
    block = record["measurement"]
    # the simulated meter declares its period: not probed
    assert block["ground_truth_meter"] == "simulated" and block["tick_s"] == 0.005
    assert block["ground_truth_features"] == []  # not a GPU's own counter: no feature is the target
    assert block["protocol"] == "aligned" and block["device"] == "cpu" and "settle" in block
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert len(runs) == 1
    params, metrics = runs[0].data.params, runs[0].data.metrics
    assert params["meter"] == "simulated" and params["protocol.min_window_s"] == "0.01"
    assert params["protocol.protocol"] == "aligned" and params["meter.tick_s"] == "0.005"
    assert {"torch_version", "transformers_version", "device"} <= set(params)
    assert metrics["root_energy_j"] == pytest.approx(record["frontend_tree"]["ground_truth_energy"])
    assert metrics["nodes_measured"] == 15 and "window_spread_median" in metrics and "tick_s" in metrics
    artifacts = mlflow.artifacts.list_artifacts(run_id=runs[0].info.run_id)
    assert "trees.jsonl" in {a.path for a in artifacts}


def test_cuda_without_cuda_is_one_clear_error():
    import torch

    from irene.errors import SettingsError
    from irene.measure.runner import resolve_device

    if torch.cuda.is_available():  # a GPU machine: the device is the one asked for
        assert resolve_device("cuda", 0) == "cuda:0"
        return
    with pytest.raises(SettingsError, match=r"measure.device=cuda: CUDA is not available"):
        resolve_device("cuda", 0)
    with pytest.raises(SettingsError, match=r"measure.device=cuda:1: CUDA is not available"):
        resolve_device("cuda:1", 1)
    assert resolve_device("auto", 0) == "cpu"


def test_a_device_that_is_not_here_fails_even_when_the_shape_is_already_measured(tmp_path):
    import torch

    from irene.data.tree import write_trees
    from irene.errors import SettingsError
    from pipelines.stage import run_stage
    from tests.conftest import make_tree

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: measure.device=cuda is available here")
    write_trees(tmp_path / "trees.jsonl", [make_tree(model="tiny/bert", batch_size=2, seq_len=8)])
    assert run_stage("measure", _cfg(tmp_path)) == tmp_path / "trees.jsonl"  # on the CPU: skipped
    with pytest.raises(SettingsError, match=r"measure.device=cuda: CUDA is not available"):
        run_stage("measure", _cfg(tmp_path, device="cuda"))


def test_a_ground_truth_without_a_gpu_counter_gets_the_devices_counter_beside_it(tmp_path, monkeypatch):
    """simulated (or none, replay) on a GPU: auto's GPU counter is read beside it for its
    utilisation and gpu_energy_mean, which is not the target there."""
    from irene.measure.meters import NvmlMeter, SimulatedMeter
    from irene.measure.meters import nvml as nvml_module
    from irene.measure.runner import measure_configuration
    from irene.measure.settings import ProtocolSettings
    from pipelines.stages.measure import build_companion, measure_settings
    from tests.test_measure_meters import _FakeNvml

    monkeypatch.setattr(nvml_module, "_pynvml", _FakeNvml)
    monkeypatch.setattr(nvml_module, "_torch_cuda_available", lambda: True)
    settings = measure_settings(_compose(["stage=measure", "measure=simulated"]))
    simulated = SimulatedMeter(tick_s=0.001, noise=0.0)
    companion = build_companion(settings, simulated, "cuda:0")
    assert isinstance(companion, NvmlMeter)
    assert build_companion(settings, companion, "cuda:0") is None  # a GPU counter already
    companion.synchronize = False  # no CUDA here: the fake counter is read as is
    record = measure_configuration(
        "tiny/bert", 1, 4, meter=simulated, companion=companion, device="cpu",
        settings=ProtocolSettings(min_window_s=0.002, windows=1, warmup=0, sample_interval_s=0.001,
                                  settle_min_s=0, max_remeasure=0, drift_action="flag"))
    block, root = record["measurement"], record["frontend_tree"]
    assert block["ground_truth_meter"] == "simulated" and block["gpu_energy_mean_meter"] == "nvml"
    assert block["tick_s"] == 0.001  # the simulated meter's declared period, not probed
    assert root["gpu"] == 97.0 and root["gpu_clk"] == 1410.0  # the companion's probes were sampled
    assert root["gpu_energy_mean"] == 0.0 and root["ground_truth_energy"] > 0  # the fake GPU idles
