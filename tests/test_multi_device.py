"""Several devices in one data set (issue 19): a tree's key is its device, model and shape;
``data.devices=[...]`` combines devices; trees of two static-feature conventions are refused;
cross-validation leaves out one model on each device, or one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from irene.data.forest import build_forest
from irene.data.locate import load_sources
from irene.data.provenance import DataIdentity, check_one_convention, combined_sha256, stamp
from irene.data.published import CSV_FILES, csv_name, import_device, sha256_of
from irene.data.tree import TreeFormatError, device_key, dumps_trees, read_trees, tree_key
from irene.errors import InputError, SettingsError
from irene.evaluate.crossval import cross_validate, cv_folds, leave_one_model_out
from irene.predictors.irene_plus import IrenePlusPredictor
from pipelines.config import register_configs

register_configs()

ROOT = Path(__file__).resolve().parents[1]
DEVICE_2 = Path("/work/shared/data/irene/device_2")  # as tests/test_devices.py finds it
H200_TREES = ROOT / "datasets" / "h200" / "trees.jsonl"
MODELS = ("distilgpt2", "gpt2", "bert-base-uncased")
SHAPES = {(8, 32), (16, 128)}  # measured on both devices


def _device_2_dir(device_dir: Path) -> Path:
    """Device 2's published folder: next to device 1's, or the shared data folder."""
    for candidate in (device_dir.parent / "device_2", DEVICE_2):
        if all((candidate / csv_name(level)).is_file() for level in CSV_FILES):
            return candidate
    pytest.skip(f"device 2's published CSVs not found (looked in {device_dir.parent / 'device_2'}"
                f" and {DEVICE_2})")


@pytest.fixture(scope="module")
def both(device_dir):
    """Device 1's and device 2's trees of three models at three shapes, as imported."""
    keep = lambda trees: [t for t in trees if (t["batch_size"], t["seq_len"]) in SHAPES]  # noqa: E731
    first = keep(import_device(device_dir, models=MODELS))
    second = keep(import_device(_device_2_dir(device_dir), models=MODELS))
    return first, second


@pytest.fixture
def data_root(device_dir, tmp_path) -> Path:
    """A folder holding ``device_1/`` and ``device_2/`` (links to the published folders)."""
    root = tmp_path / "irene-data"
    root.mkdir()
    (root / "device_1").symlink_to(device_dir.resolve())
    (root / "device_2").symlink_to(_device_2_dir(device_dir).resolve())
    return root


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


class Tags:
    """A tracker that keeps the tags it is given."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}

    def set_tags(self, tags) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})


# ------------------------------------------------------------------- a file of two devices
def test_a_file_of_both_devices_imports_keyed_by_device_and_shape(both, tmp_path):
    first, second = both
    path = tmp_path / "both.jsonl"
    path.write_text(dumps_trees([*first, *second]))
    trees = read_trees(path, require_energy=True)
    assert len(trees) == len(first) + len(second) == 2 * len(MODELS) * len(SHAPES)
    keys = [device_key(t) for t in trees]
    assert len(set(keys)) == len(keys)
    assert {k[0] for k in keys} == {"device_1", "device_2"}
    # the same (model, batch, seq) on both devices: two trees, told apart by their device
    assert len({tree_key(t) for t in trees}) == len(trees) // 2
    assert ("device_2", "gpt2", 8, 32) in keys and ("device_1", "gpt2", 8, 32) in keys


def test_a_second_tree_of_one_device_is_still_refused(both, tmp_path):
    first, second = both
    path = tmp_path / "twice.jsonl"
    path.write_text(dumps_trees([*first, *second, second[0]]))
    line = len(first) + len(second) + 1
    with pytest.raises(TreeFormatError) as error:
        read_trees(path, require_energy=True)
    assert str(error.value) == (
        f"{path}:{line}: field 'model_name': a second tree for {tree_key(second[0])} of device "
        f"device_2 (the first is on line {len(first) + 1})")
    one = tmp_path / "one.jsonl"  # a file of one device: the message as it always was
    one.write_text(dumps_trees([*first, first[0]]))
    with pytest.raises(TreeFormatError) as error:
        read_trees(one)
    assert str(error.value) == (f"{one}:{len(first) + 1}: field 'model_name': a second tree for "
                                f"{tree_key(first[0])} (the first is on line 1)")


def test_node_ids_are_unique_within_a_device_only(both, tmp_path):
    first, second = both
    assert first[0]["frontend_tree"]["id"] == second[0]["frontend_tree"]["id"]  # model/shape/scope
    clash = json.loads(json.dumps(second[1]))
    clash["frontend_tree"]["child_nodes_obj"][0]["id"] = second[0]["frontend_tree"]["id"]
    path = tmp_path / "clash.jsonl"
    path.write_text(dumps_trees([*first, second[0], clash]))
    with pytest.raises(TreeFormatError, match=r":\d+: node .*field 'id': duplicate node id"):
        read_trees(path)


def test_the_forest_keeps_models_and_qualifies_fold_names_only_with_several_devices(both):
    first, second = both
    forest = build_forest([*first, *second])
    assert forest.devices == ["device_1"] * len(first) + ["device_2"] * len(second)
    assert forest.model_names == [t["model_name"] for t in [*first, *second]]
    assert forest.device_names() == ["device_1", "device_2"]
    assert forest.fold_names()[0] == f"device_1:{first[0]['model_name']}"
    single = build_forest(first)
    assert single.fold_names() == single.model_names
    part = forest.subset(np.asarray(forest.devices) == "device_2")
    assert part.devices == ["device_2"] * len(second) and part.fold_names() == part.model_names


# ------------------------------------------------------------------------- conventions
def test_a_file_of_two_conventions_is_refused_in_one_line(both, tmp_path):
    from pipelines.data import load_trees

    h200 = stamp(read_trees(H200_TREES), path=H200_TREES, digest=sha256_of(H200_TREES))
    path = tmp_path / "mixed.jsonl"
    path.write_text(dumps_trees([*both[0], *h200]))
    cfg = compose_cfg(f"data.trees={path}", "features=model_specs")
    with pytest.raises(InputError) as error:
        load_trees(cfg, Tags())
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"data.trees={path}: trees of two static-feature conventions")
    assert f"irene: device_1 ({path}); physical: h200 ({path})" in message
    assert "irene.transfer.retrace" in message


def test_an_unknown_convention_is_not_refused():
    known = {"device": {"id": "a", "convention": "irene"}}
    check_one_convention({"x": [known], "y": [{"device": {"id": "b", "convention": None}}, {}]},
                         "data")  # nothing says b or the plain line differ
    with pytest.raises(InputError, match=r"^data: .*irene: a \(x\); physical: b \(y\)\)"):
        check_one_convention({"x": [known], "y": [{"device": {"id": "b",
                                                               "convention": "physical"}}]}, "data")


def test_devices_of_two_conventions_exit_2_naming_both(device_dir, tmp_path):
    env = {**os.environ, "IRENE_DATA_DIR": str(device_dir), "IRENE_OUTPUTS": str(tmp_path / "out")}
    out = subprocess.run(
        [sys.executable, "run.py", "tracking.enabled=false", f"run_dir={tmp_path / 'run'}",
         "features=model_specs", "data.download=false", f"data.devices=[device_1,{H200_TREES}]"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.devices=")
    assert f"irene: device_1 ({device_dir.resolve()}" in lines[0] or "irene: device_1 (" in lines[0]
    assert f"physical: h200 ({H200_TREES})" in lines[0]


# ------------------------------------------------------------------ data.devices=[...]
def test_data_devices_tags_every_device_and_one_sha256(data_root, tmp_path, monkeypatch):
    from pipelines.data import data_identity, load_forest

    monkeypatch.setenv("IRENE_DATA_DIR", str(data_root))
    monkeypatch.setenv("IRENE_OUTPUTS", str(tmp_path / "out"))
    cfg = compose_cfg("data.devices=[device_1,device_2]", "data.models=[distilgpt2,gpt2]",
                      "data.download=false")
    tags = Tags()
    data = load_forest(cfg, tags)
    sources = load_sources()["devices"]
    assert tags.tags["data.device"] == "device_1+device_2"
    assert tags.tags["data.identity"] == combined_sha256(
        {d: combined_sha256(sources[d]) for d in ("device_1", "device_2")})
    for device in ("device_1", "device_2"):
        for name, digest in sources[device].items():
            assert tags.tags[f"data.{device}.sha256.{name}"] == digest
    assert data.forest.device_names() == ["device_1", "device_2"]
    assert sorted(set(data.forest.fold_names())) == [
        "device_1:distilgpt2", "device_1:gpt2", "device_2:distilgpt2", "device_2:gpt2"]
    assert str(tmp_path / "out") in str(data.source)  # the combined trees: a cache, not the checkout
    assert data_identity(cfg) == DataIdentity(("device_1", "device_2"), "")  # not imported
    again = Tags()
    assert load_forest(cfg, again).forest.num_nodes == data.forest.num_nodes  # from the cache
    assert again.tags == tags.tags


def test_single_device_loading_is_unchanged(device_dir, tmp_path, monkeypatch):
    from pipelines.data import load_forest

    monkeypatch.setenv("IRENE_DATA_DIR", str(device_dir))
    monkeypatch.setenv("IRENE_OUTPUTS", str(tmp_path / "out"))
    cfg = compose_cfg("data.models=[distilgpt2,gpt2]", "data.download=false")
    tags = Tags()
    data = load_forest(cfg, tags)
    files = load_sources()["devices"]["device_1"]
    assert tags.tags["data.device"] == "device_1"
    assert tags.tags["data.identity"] == combined_sha256(files)
    assert {k for k in tags.tags if k.startswith("data.device_")} == set()
    assert data.forest.device_names() == ["device_1"]
    assert data.forest.fold_names() == data.forest.model_names


# --------------------------------------------------------------------- cross-validation
def test_leave_one_device_out_gives_one_fold_per_device(both):
    forest = build_forest([*both[0], *both[1]])
    folds = cv_folds(forest, "device")
    assert [name for name, _, _ in folds] == ["device_1", "device_2"]
    for name, train, test in folds:
        assert not (train & test).any() and (train | test).all()
        assert {forest.devices[t] for t in np.flatnonzero(test)} == {name}
    result = cross_validate(forest, IrenePlusPredictor(feature_sets=["model_specs"]), "device",
                            show_progress=False)
    assert result.grid.index_names == ["left_out_device"]
    assert [label[0] for label in result.grid.labels] == ["device_1", "device_2", "overall"]
    assert np.isfinite(result.predicted_j).all()
    assert np.isclose(result.grid.rows[-1], np.mean(result.grid.rows[:-1], axis=0)).all()


def test_leave_one_model_out_on_two_devices_keeps_the_model_out_of_training(both):
    forest = build_forest([*both[0], *both[1]])
    folds = cv_folds(forest, "model")
    assert [name for name, _, _ in folds] == [f"{d}:{m}" for d in ("device_1", "device_2")
                                              for m in dict.fromkeys(forest.model_names)]
    names = np.asarray(forest.model_names)
    devices = np.asarray(forest.devices)
    for name, train, test in folds:
        device, model = name.split(":")
        assert set(np.flatnonzero(test)) == set(np.flatnonzero((devices == device) & (names == model)))
        assert set(np.flatnonzero(train)) == set(np.flatnonzero(names != model))  # every device


def test_one_device_grouped_by_model_is_plain_leave_one_model_out(both):
    forest = build_forest(both[0])
    predictor = IrenePlusPredictor(feature_sets=["model_specs"])
    plain = leave_one_model_out(forest, predictor, show_progress=False)
    grouped = cross_validate(forest, predictor, "model", show_progress=False)
    assert grouped.grid == plain.grid
    with pytest.raises(SettingsError, match=r"cv_group=device: leave-one-device-out needs at "
                                            r"least two devices, the data set has \['device_1'\]"):
        cross_validate(forest, predictor, "device", show_progress=False)


@pytest.mark.slow
def test_stage_leave_one_device_out_on_data_devices(data_root, tmp_path):
    env = {**os.environ, "IRENE_DATA_DIR": str(data_root), "IRENE_OUTPUTS": str(tmp_path / "out")}
    out = subprocess.run(
        [sys.executable, "run.py", "tracking.enabled=false", f"run_dir={tmp_path / 'run'}",
         "show_progress=false", "cv_group=device", "data.download=false",
         "data.devices=[device_1,device_2]", "data.models=[distilgpt2,gpt2]"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = (tmp_path / "run" / "crossvalidation.csv").read_text().splitlines()
    assert lines[0] == "left_out_device,ml,module,model"
    assert [line.split(",")[0] for line in lines[1:]] == ["device_1", "device_2", "overall"]
    assert "leave-one-device-out" in out.stdout


def test_predictions_of_two_devices_align_by_device_and_node_id(both):
    from irene.data.tree import iter_nodes
    from irene.evaluate.metrics import align_predictions

    first, second = both
    predicted = json.loads(json.dumps([*second, *first]))  # another order: aligned by key
    for tree in predicted:
        factor = 2.0 if tree["device"]["id"] == "device_2" else 1.0
        for node in iter_nodes(tree["frontend_tree"]):
            node["predicted_energy"] = factor * node["ground_truth_energy"]
    forest, values = align_predictions([*first, *second], predicted, "p.jsonl")
    factor = np.where(np.asarray(forest.devices)[forest.tree_index] == "device_2", 2.0, 1.0)
    assert np.array_equal(values, factor * forest.gold_j)


def test_a_trees_file_of_two_devices_as_an_entry_of_data_devices(both, tmp_path, monkeypatch):
    from pipelines.data import load_forest

    monkeypatch.setenv("IRENE_OUTPUTS", str(tmp_path / "out"))
    path = tmp_path / "both.jsonl"
    path.write_text(dumps_trees([*both[0], *both[1]]))
    tags = Tags()
    data = load_forest(compose_cfg(f"data.devices=[{path}]"), tags)
    assert tags.tags["data.device"] == "device_1+device_2"
    assert tags.tags["data.device_1_device_2.sha256.both.jsonl"] == sha256_of(path)  # MLflow key
    assert tags.tags["data.identity"] == combined_sha256({"device_1+device_2": sha256_of(path)})
    assert [name for name, _, _ in cv_folds(data.forest, "device")] == ["device_1", "device_2"]


def test_stage_on_a_trees_file_of_two_devices_by_device_and_no_seeds(both, tmp_path, monkeypatch):
    from pipelines.stage import run_stage

    monkeypatch.setenv("IRENE_OUTPUTS", str(tmp_path / "out"))
    path = tmp_path / "both.jsonl"
    path.write_text(dumps_trees([*both[0], *both[1]]))
    base = (f"data.trees={path}", "tracking.enabled=false", "show_progress=false",
            "predictor=irene_plus", "features=model_specs")
    report = run_stage("crossvalidate", compose_cfg(*base, "cv_group=device",
                                                    f"run_dir={tmp_path / 'cv'}"))
    lines = report.csv_path.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "left_out_device", "device_1", "device_2", "overall"]
    with pytest.raises(SettingsError, match=r"^seeds=2: repeats the leave-one-model-out of one "
                                            r"device only \(this data set: device_1\+device_2"):
        run_stage("crossvalidate", compose_cfg(*base, "seeds=2", f"run_dir={tmp_path / 's'}"))


def test_transfer_refuses_two_conventions_only_in_a_pooled_fit(both, tmp_path, monkeypatch):
    from pipelines.stage import run_stage

    monkeypatch.setenv("IRENE_OUTPUTS", str(tmp_path / "out"))
    source = tmp_path / "device_1.jsonl"
    source.write_text(dumps_trees(both[0]))
    base = (f"source={source}", f"target={H200_TREES}", "shots=[0,1]", "draws=1",
            "tracking.enabled=false", "show_progress=false", "keep_model=false")
    with pytest.raises(InputError) as error:
        run_stage("transfer", compose_cfg("stage=transfer", *base, "methods=[calibrated_pool]",
                                          f"run_dir={tmp_path / 'pool'}"))
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("methods=['calibrated_pool']: calibrated_pool: trees of "
                                       f"two static-feature conventions in one data set (irene: "
                                       f"device_1 ({source}); physical: h200 ({H200_TREES}))")
    csv = run_stage("transfer", compose_cfg("stage=transfer", *base, f"run_dir={tmp_path / 'ok'}"))
    assert csv.read_text().splitlines()[0].startswith("shots,ml,module,model")
