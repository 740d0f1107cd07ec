"""Devices as facts in the data (issue 19): a run's data identity comes from the content, the
report selects runs by it, evaluate refuses another device's measurements, and every tree
line carries its ``device`` block."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from irene.data.locate import load_sources
from irene.data.provenance import (
    DataIdentity,
    combined_sha256,
    csv_block,
    declared_id,
    device_block,
    device_ids,
    device_problem,
    match_published,
    stamp,
)
from irene.data.published import CSV_FILES, csv_name
from irene.errors import InputError, MissingInputError
from pipelines.config import register_configs

register_configs()

ROOT = Path(__file__).resolve().parents[1]
DEVICE_2 = Path("/work/shared/data/irene/device_2")
TWO_MODELS = "data.models=[distilgpt2,gpt2]"


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _device_2_dir(device_dir: Path) -> Path:
    """Device 2's published folder: next to device 1's, or $IRENE_DATA_DIR/device_2."""
    for candidate in (device_dir.parent / "device_2", DEVICE_2):
        if all((candidate / csv_name(level)).is_file() for level in CSV_FILES):
            return candidate
    pytest.skip("device 2's published CSVs not found")


# ------------------------------------------------------------------------------ the blocks
def test_published_checksums_name_the_device_and_nothing_else():
    for device, files in load_sources()["devices"].items():
        assert match_published(files) == device
        block = csv_block(files, declared="device_1")
        assert block["id"] == device and block["convention"] == "irene"
        assert block["source"] == {"kind": "published", "sha256": dict(sorted(files.items()))}
        assert block["gpu"] == dict.fromkeys(("name", "memory_mib", "driver", "cuda",
                                              "power_limit_w"))
        assert block["meter"] is None  # the CSVs name no meter: never invented
    files = dict(load_sources()["devices"]["device_1"])
    files[csv_name("ml2")] = "0" * 64
    assert match_published(files) is None
    assert match_published({k: v for k, v in load_sources()["devices"]["device_1"].items()
                            if k != csv_name("ml2")}) is None  # three of four files: not it


@pytest.mark.parametrize(("declared", "expected"), [
    ("device_1", "unknown"), ("device_2", "unknown"), (None, "unknown"), ("", "unknown"),
    ("unknown", "unknown"), ("my_a100", "my_a100")])
def test_other_files_get_the_users_name_unless_it_is_a_published_one(declared, expected):
    assert declared_id(declared) == expected
    block = csv_block({"model_level_features.csv": "1" * 64}, declared)
    assert block["id"] == expected and block["convention"] is None
    assert block["source"]["kind"] == ("unknown" if expected == "unknown" else "declared")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda b: b.pop("id"), "'id' must be a non-empty string, got None"),
    (lambda b: b.update(id=" "), "'id' must be a non-empty string"),
    (lambda b: b.update(color="red"), "unknown key 'color'"),
    (lambda b: b.update(id="../../etc"), "'id' must be a folder name"),
    (lambda b: b.update(id=".."), "'id' must be a folder name"),
    (lambda b: b["gpu"].update(memory_mib=-1), "'gpu.memory_mib' must be a positive number"),
    (lambda b: b["gpu"].update(power_limit_w=True), "'gpu.power_limit_w' must be a positive"),
    (lambda b: b["gpu"].update(name=3), "'gpu.name' must be a non-empty string or null"),
    (lambda b: b["gpu"].update(vendor="x"), "unknown key 'gpu.vendor'"),
    (lambda b: b.update(gpu=[]), "'gpu' must be a JSON object or null"),
    (lambda b: b.update(meter=""), "'meter' must be a non-empty string or null"),
    (lambda b: b.update(convention="mine"), "'convention' must be one of"),
    (lambda b: b.update(source="x"), "'source' must be a JSON object or null"),
    (lambda b: b["source"].update(kind="guess"), "'source.kind' must be one of"),
    (lambda b: b["source"].update(sha256={"a": "b"}), "'source.sha256' must map"),
])
def test_a_bad_device_block_names_its_field(edit, message):
    block = device_block("d", kind="declared", sha256={"f": "a" * 64}, convention="physical",
                         meter="nvml", gpu={"name": "G", "memory_mib": 1024})
    assert device_problem(block) is None
    edit(block)
    assert message in device_problem(block)
    assert device_problem("device_1") == "must be a JSON object, got str"


def test_stamp_keeps_a_lines_own_block_and_labels_the_others(tmp_path):
    own = device_block("device_1", kind="published", convention="irene")
    trees = [{"model_name": "a", "device": own}, {"model_name": "b"},
             {"model_name": "c", "measurement": {"device": "cuda:0", "meter": "nvml"}}]
    path = tmp_path / "t.jsonl"
    stamp(trees, path=path, digest="f" * 64, declared="device_1")
    assert trees[0]["device"] is own
    assert trees[1]["device"]["id"] == "unknown"
    assert trees[1]["device"]["source"] == {"kind": "unknown", "sha256": {"t.jsonl": "f" * 64}}
    assert trees[2]["device"]["meter"] == "nvml" and trees[2]["device"]["source"]["kind"] == "measured"
    assert device_ids(trees) == ("device_1", "unknown")
    assert DataIdentity(("device_1", "device_2"), "x").label == "device_1+device_2"


# ------------------------------------------------------------------------- the label trap
@pytest.fixture(scope="module")
def trap(device_dir, tmp_path_factory):
    """Device 2's published files copied (unchanged) into tmp, cross-validated as
    ``experiment=per_model data.path=<copy>`` with data.name left at its default, device_1."""
    from pipelines.stage import run_stage

    tmp = tmp_path_factory.mktemp("trap")
    folder = tmp / "somewhere"
    shutil.copytree(_device_2_dir(device_dir), folder)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    store = (f"tracking.uri={uri}", "tracking.experiment=pytest-devices")
    base = (*store, TWO_MODELS, "predictor.epochs=2")
    cfg = compose_cfg("experiment=per_model", f"data.path={folder}", *base,
                      f"run_dir={tmp / 'cv'}")
    assert cfg.data.name == "device_1"  # the label the run starts with
    result = run_stage("crossvalidate", cfg)
    return {"tmp": tmp, "folder": folder, "base": base, "store": store, "uri": uri, "cv": result}


def _runs(uri: str, filter_string: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name("pytest-devices")
    return mlflow.search_runs([experiment.experiment_id], filter_string, output_format="list")


def test_the_run_is_tagged_with_the_device_of_its_bytes(trap):
    (run,) = _runs(trap["uri"], "tags.stage = 'crossvalidate'")
    files = load_sources()["devices"]["device_2"]
    assert run.data.tags["data.device"] == "device_2"
    assert run.data.tags["data.identity"] == combined_sha256(files)
    assert all(run.data.tags[f"data.sha256.{name}"] == digest for name, digest in files.items())
    assert run.data.params["data"] == "device_1"  # the label, kept; the tag says what it read


def test_report_of_device_1_does_not_take_device_2s_runs(trap, tmp_path):
    from irene.errors import MissingInputError as Missing
    from pipelines.paths import outputs_dir
    from pipelines.stage import run_stage

    before = (outputs_dir() / "tables" / "device_1" / "per_model.md")
    existed = before.read_bytes() if before.is_file() else None
    cfg = compose_cfg("stage=report", "experiment=per_model", *trap["base"],
                      f"run_dir={tmp_path / 'r1'}")
    with pytest.raises(Missing, match="no FINISHED crossvalidate run of preset 'per_model' on device_1"):
        run_stage("report", cfg)
    after = before.read_bytes() if before.is_file() else None
    assert after == existed  # nothing written under device_1


@pytest.mark.parametrize("selector", ["data=device_2", "data.path"])
def test_report_writes_the_runs_numbers_under_their_device(trap, tmp_path, selector):
    from pipelines.paths import outputs_dir
    from pipelines.stage import run_stage

    which = f"data.path={trap['folder']}" if selector == "data.path" else selector
    cfg = compose_cfg("stage=report", "experiment=per_model", which, *trap["base"],
                      f"run_dir={tmp_path / 'r2'}")
    result = run_stage("report", cfg)
    table = result.table
    assert "reference ml" not in table.columns  # device 1's reference columns: not here
    cv = trap["cv"].table
    assert table.loc["overall", "model"] == pytest.approx(cv.loc["overall", "model"])
    stable = outputs_dir() / "tables" / "device_2" / "per_model.md"
    assert stable in result.paths
    assert stable.read_text() == (tmp_path / "r2" / "per_model.md").read_text()


def test_files_of_no_published_device_are_unknown_or_the_users_name(trap, tmp_path):
    from pipelines.stage import run_stage

    folder = tmp_path / "edited"
    shutil.copytree(trap["folder"], folder)
    path = folder / csv_name("ml2")
    path.write_bytes(path.read_bytes() + b"\n")  # one byte more: no longer device 2's files
    for name, expected in (("device_2", "unknown"), ("my_gpu", "my_gpu")):
        cfg = compose_cfg("stage=featurize", f"data.path={folder}", f"data.name={name}",
                          "data.models=[distilgpt2]", *trap["store"], f"run_dir={tmp_path / name}")
        run_stage("featurize", cfg)
        (run,) = [r for r in _runs(trap["uri"], "tags.stage = 'featurize'")
                  if r.data.params.get("data") == name]
        assert run.data.tags["data.device"] == expected
        assert len(run.data.tags["data.identity"]) == 64


def test_a_trees_file_without_devices_is_the_users_name_or_unknown(trap, tmp_path):
    from irene.data.tree import write_trees
    from pipelines.data import data_identity

    trees = [{k: v for k, v in t.items() if k != "device"} for t in _cache_trees(trap)[:2]]
    path = write_trees(tmp_path / "plain.jsonl", trees)
    assert data_identity(compose_cfg(f"data.trees={path}")).devices == ("unknown",)
    assert data_identity(compose_cfg(f"data.trees={path}", "data.name=lab")).devices == ("lab",)
    labelled = write_trees(tmp_path / "labelled.jsonl", _cache_trees(trap)[:2])
    assert data_identity(compose_cfg(f"data.trees={labelled}")).devices == ("device_2",)


def _cache_trees(trap) -> list:
    from irene.data.tree import read_trees
    from pipelines.paths import outputs_dir

    caches = [p for p in (outputs_dir() / "cache").glob("trees-*.jsonl")
              if '"id": "device_2"' in p.read_text()[:200_000]]
    assert caches, "the trap's import cache"
    return read_trees(caches[0], validate=False)


def test_input_errors_stay_one_line(tmp_path):
    bad = tmp_path / "device.json"
    bad.write_text("[1]")
    with pytest.raises(InputError, match="not a device sidecar"):
        stamp([{"model_name": "a"}], path=tmp_path / "t.jsonl", digest="a" * 64)
    assert issubclass(MissingInputError, Exception)
    bad.write_text(json.dumps({"trees_sha256": {"t.jsonl": "a" * 64}, "device": {"id": 1}}))
    with pytest.raises(InputError, match="field 'device': 'id' must be"):
        stamp([{"model_name": "a"}], path=tmp_path / "t.jsonl", digest="a" * 64)


# ------------------------------------------------------------------ evaluate: one device only
@pytest.fixture(scope="module")
def device_2_predictions(trap):
    """A predictor trained on the trap's device-2 runs, predicting device 2's trees."""
    from pipelines.stage import run_stage

    tmp, store = trap["tmp"], trap["store"]
    data = (f"data.path={trap['folder']}", TWO_MODELS)
    run_stage("train", compose_cfg("stage=train", *data, *store, "predictor.epochs=2",
                                   "show_progress=false",
                                   f"run_dir={tmp / 'train'}"))
    return run_stage("predict", compose_cfg("stage=predict", *data, *store,
                                            f"model_dir={tmp / 'train' / 'model'}", "explain.views=false",
                                            f"run_dir={tmp / 'predict'}"))


def test_predictions_carry_the_device_of_their_input_trees(device_2_predictions):
    from irene.data.tree import read_trees

    trees = read_trees(device_2_predictions)
    assert device_ids(trees) == ("device_2",)
    assert all(t["device"]["source"]["kind"] == "published" for t in trees)


def test_evaluate_refuses_another_devices_measurements(trap, device_2_predictions, tmp_path):
    from pipelines.stage import run_stage

    cfg = compose_cfg("stage=evaluate", f"predictions={device_2_predictions}", TWO_MODELS,
                      *trap["store"], f"run_dir={tmp_path / 'e1'}")  # data: device 1
    with pytest.raises(InputError) as refused:
        run_stage("evaluate", cfg)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"predictions={device_2_predictions}: predicted for device_2's "
                              "trees, but the measurements, the data set (")
    assert "are device_1's: scoring one device against another's measurements is refused" in message
    assert not (tmp_path / "e1" / "errors_by_node_type.csv").exists()
    # against device 2's own measurements it scores
    cfg = compose_cfg("stage=evaluate", f"predictions={device_2_predictions}", TWO_MODELS,
                      f"data.path={trap['folder']}", *trap["store"], f"run_dir={tmp_path / 'e2'}")
    summary = run_stage("evaluate", cfg)
    assert set(summary) == {"ml", "module", "model"} and all(v >= 0 for v in summary.values())


def test_diagnose_refuses_another_devices_measurements_too(trap, device_2_predictions, tmp_path):
    from pipelines.stage import run_stage

    cfg = compose_cfg("stage=diagnose", f"predictions={device_2_predictions}", TWO_MODELS,
                      *trap["store"], f"run_dir={tmp_path / 'd'}")  # data: device 1
    with pytest.raises(InputError, match=r"predicted for device_2's trees, but the measurements, "
                       r"the data set \(data.name=device_1\), are device_1's"):
        run_stage("diagnose", cfg)


def test_the_device_check_refuses_only_two_known_different_devices():
    from irene.data.provenance import check_same_device

    def trees(*ids):
        return [{"device": device_block(i, kind="declared")} if i else {} for i in ids]

    check_same_device(trees("device_1"), trees("device_1"), "p.jsonl", "trees=g.jsonl")
    check_same_device(trees("device_1"), trees(None), "p.jsonl", "trees=g.jsonl")  # unknown
    check_same_device(trees("unknown"), trees("device_2"), "p.jsonl", "trees=g.jsonl")
    with pytest.raises(InputError, match=r"^predictions=p.jsonl: predicted for h200's trees, "
                       r"but the measurements, trees=g.jsonl, are device_1\+device_2's"):
        check_same_device(trees("device_1", "device_2"), trees("h200"), "p.jsonl", "trees=g.jsonl")


# ----------------------------------------------------------------------- the H200 trees
H200 = ROOT / "datasets" / "h200" / "trees.jsonl"


def test_the_h200_trees_get_their_device_on_read_and_the_file_is_unchanged(tmp_path):
    from irene.data.locate import sha256_of
    from pipelines.stage import run_stage

    before = sha256_of(H200)
    cfg = compose_cfg("stage=featurize", f"data.trees={H200}", "tracking.enabled=false",
                      "features=model_specs", f"run_dir={tmp_path / 'f'}")
    result = run_stage("featurize", cfg)
    lines = [json.loads(line) for line in result.trees_path.read_text().splitlines()]
    assert len(lines) == 8
    block = lines[0]["device"]
    assert all(line["device"] == block for line in lines)
    assert block["id"] == "h200" and block["convention"] == "physical" and block["meter"] == "nvml"
    assert block["gpu"] == {"name": "NVIDIA H200", "memory_mib": 143771, "driver": "580.159.04",
                            "cuda": "13.0", "power_limit_w": None}  # the README gives no limit
    assert block["source"]["kind"] == "measured" and "1bf1e62" in block["source"]["run"]
    assert device_problem(block) is None
    assert sha256_of(H200) == before  # derived on read, never written back


def test_the_sidecar_describes_those_bytes_only(tmp_path):
    from pipelines.data import data_identity

    assert data_identity(compose_cfg(f"data.trees={H200}")).devices == ("h200",)
    folder = tmp_path / "h200"
    folder.mkdir()
    shutil.copy(H200.with_name("device.json"), folder)
    edited = folder / "trees.jsonl"
    edited.write_bytes(H200.read_bytes() + b"\n")  # other bytes: not what was measured
    assert data_identity(compose_cfg(f"data.trees={edited}")).devices == ("unknown",)
    alone = tmp_path / "trees.jsonl"
    shutil.copy(H200, alone)  # the same bytes without their sidecar: nothing says the device
    assert data_identity(compose_cfg(f"data.trees={alone}", "data.name=my_h200")).devices == (
        "my_h200",)


# ----------------------------------------------------------------------- stage=measure
def _measure_cfg(tmp_path, *extra: str):
    measure = {"device": "cpu", "min_window_s": 0.002, "windows": 1, "warmup": 0,
               "sample_interval_s": 0.001, "settle_min_s": 0, "track": "false",
               "output": str(tmp_path / "trees.jsonl")}
    return compose_cfg("stage=measure", "model=tiny/bert", "batch_size=2", "seq_len=8",
                       "show_progress=false", *[f"measure.{k}={v}" for k, v in measure.items()],
                       *extra)


@pytest.mark.parametrize(("meter", "name", "expected_meter", "expected_id"), [
    ("none", "device_1", None, "unknown"),  # a published name is not the measured machine's
    ("simulated", "lab_cpu", "simulated", "lab_cpu"),
])
def test_measure_writes_the_device_of_each_line(tmp_path, meter, name, expected_meter,
                                                expected_id):
    from irene.data.tree import read_trees
    from pipelines.stage import run_stage

    out = run_stage("measure", _measure_cfg(tmp_path, f"measure/meter={meter}", f"data.name={name}"))
    (tree,) = read_trees(out)  # validated, device block included
    block = tree["device"]
    assert block["id"] == expected_id and block["meter"] == expected_meter
    assert block["convention"] == "physical"
    assert block["gpu"] == dict.fromkeys(("name", "memory_mib", "driver", "cuda",
                                          "power_limit_w"))  # a CPU: no GPU facts
    assert block["source"] == {"kind": "measured", "run": "stage=measure tiny/bert 2x8 on cpu"}


def test_measured_block_keeps_what_the_environment_reports_and_nothing_else():
    from irene.data.provenance import measured_block

    env = {"device": "cuda:0", "gpu_name": "NVIDIA H200", "driver_version": "580.159.04",
           "cuda_driver_version": "13000", "cuda_runtime": "13.0", "meter": "nvml"}
    block = measured_block(env, declared="h200", convention="physical", run="abc",
                           memory_mib=143771.0)
    assert block == {"id": "h200", "gpu": {"name": "NVIDIA H200", "memory_mib": 143771.0,
                                           "driver": "580.159.04", "cuda": "13.0",
                                           "power_limit_w": None},
                     "meter": "nvml", "convention": "physical",
                     "source": {"kind": "measured", "run": "abc"}}
    assert measured_block({**env, "cuda_runtime": "None"}, declared=None, convention="irene",
                          run=None)["gpu"]["cuda"] == "13000"  # the driver's, when torch has none
    unknown = measured_block({**env, "gpu_name": "unknown", "driver_version": "unknown"},
                             declared=None, convention="irene", run=None)
    assert unknown["gpu"]["name"] is None and unknown["gpu"]["driver"] is None
    assert unknown["gpu"]["cuda"] is None  # no GPU named: the CUDA version says nothing
    assert device_problem(block) is None and device_problem(unknown) is None


def test_measure_records_the_power_limit_its_meter_reads_and_nothing_it_does_not():
    from pipelines.stages.measure import power_limit_w

    class Nvml:
        def __init__(self, state):
            self.state = state

        def device_state(self):
            if isinstance(self.state, Exception):
                raise self.state
            return self.state

    assert power_limit_w(Nvml({"gpu_power_limit_w": 700.0, "gpu_power_w": 124.0})) == 700.0
    assert power_limit_w(Nvml({"gpu_power_w": 124.0})) is None  # NVML did not say
    assert power_limit_w(Nvml(RuntimeError("NVML gone"))) is None
    assert power_limit_w(Nvml({"gpu_power_limit_w": 0.0})) is None
    assert power_limit_w(object()) is None  # a meter without device state (RAPL, none)
