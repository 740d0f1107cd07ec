"""A new device's predictor (kept by stage=transfer, used by stage=predict device=<id>) and
the training-range flags every prediction carries."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from irene.data.forest import build_forest
from irene.data.tree import iter_nodes, write_trees
from irene.errors import InputError, SettingsError
from irene.predictors import load
from irene.predictors.device import DevicePredictor
from irene.predictors.irene_plus import IrenePlusPredictor
from irene.predictors.ranges import fit_ranges, out_of_range
from irene.predictors.static import OUT_OF_RANGE_FIELD, predict_trees

ROOT = Path(__file__).resolve().parents[1]


def _on_device(trees, device_id: str, factor: float):
    """The same trees measured on another device: every energy times ``factor``."""
    out = copy.deepcopy(trees)
    for tree in out:
        tree["device"] = {**tree.get("device", {}), "id": device_id}
        for node in iter_nodes(tree["frontend_tree"]):
            node["ground_truth_energy"] *= factor
    return out


@pytest.fixture(scope="module")
def toy_device(small_trees):
    return _on_device(small_trees, "toy_gpu", 1.5)


def test_a_device_predictor_learns_the_new_device_and_reads_back_the_same(
        tmp_path, small_trees, toy_device):
    source = build_forest(small_trees)
    shots = build_forest([t for t in toy_device if t["model_name"] == "bert-base-uncased"])
    test = build_forest([t for t in toy_device if t["model_name"] != "bert-base-uncased"])
    predictor = DevicePredictor(device="toy_gpu", sources=["device_1"]).fit_transfer(
        [source], shots)
    static = IrenePlusPredictor(feature_sets=["model_specs"]).fit(source)
    ratio = predictor.predict(test) / static.predict(test)
    # the correction found the device's factor from one model's trees: 1.5 on every node
    assert np.median(ratio) == pytest.approx(1.5, rel=0.02)
    assert np.all((ratio > 1.3) & (ratio < 1.7))
    predictor.save(tmp_path / "model")
    again = load(tmp_path / "model")
    assert isinstance(again, DevicePredictor) and again.device == "toy_gpu"
    np.testing.assert_array_equal(again.predict(test), predictor.predict(test))
    assert again.ranges_ == predictor.ranges_


def test_a_device_predictor_is_not_fitted_from_one_forest(small_trees):
    with pytest.raises(SettingsError, match="fit_transfer"):
        DevicePredictor().fit(build_forest(small_trees))


def test_two_sources_are_combined_by_their_geometric_mean(small_trees, toy_device):
    source = build_forest(small_trees)
    shots = build_forest(toy_device[:4])
    test = build_forest(toy_device[4:8])
    one = DevicePredictor().fit_transfer([source], shots).predict(test)
    doubled = _on_device(small_trees, "other", 4.0)
    two = DevicePredictor().fit_transfer([source, build_forest(doubled)], shots).predict(test)
    # each source is corrected to the target, so a second source 4x off changes little
    assert np.allclose(two, one, rtol=0.1)


def test_every_fitted_predictor_keeps_its_feature_ranges_and_flags_what_lies_outside(
        tmp_path, small_trees):
    predictor = IrenePlusPredictor(feature_sets=["model_specs"]).fit(build_forest(small_trees))
    assert "leaf:linear" in predictor.ranges_ and "model" in predictor.ranges_
    inside = predict_trees(predictor, small_trees[:3])[0]
    assert not any(n.get(OUT_OF_RANGE_FIELD) for t in inside for n in iter_nodes(t["frontend_tree"]))
    bigger = copy.deepcopy(small_trees[:1])
    flops_max = predictor.ranges_["leaf:linear"]["flops"][1]
    changed = 0
    for node in iter_nodes(bigger[0]["frontend_tree"]):
        if node.get("type") == "ml" and node["instance_type"] == "Linear":
            node["flops"] = 10 * flops_max
            changed += 1
    filled = predict_trees(predictor, bigger)[0]
    flagged = [n for n in iter_nodes(filled[0]["frontend_tree"]) if n.get(OUT_OF_RANGE_FIELD)]
    assert len(flagged) == changed > 0
    assert all(n[OUT_OF_RANGE_FIELD] == ["flops"] for n in flagged)
    # saved and read back with the predictor; a damaged range is named in one line
    predictor.save(tmp_path / "m")
    assert load(tmp_path / "m").ranges_ == predictor.ranges_
    meta = json.loads((tmp_path / "m" / "predictor.json").read_text())
    meta["ranges"] = {"model": {"flops": [1.0]}}
    (tmp_path / "m" / "predictor.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="field 'ranges'"):
        load(tmp_path / "m")


def test_ranges_are_kept_per_kind_of_node(small_trees):
    forest = build_forest(small_trees)
    ranges = fit_ranges(forest, ["flops"])
    # a LayerNorm leaf is compared with LayerNorm leaves, not with the (much larger) Linear
    assert ranges["leaf:layernorm"]["flops"][1] < ranges["leaf:linear"]["flops"][1]
    assert not any(out_of_range(ranges, forest))


def _run(tmp_path, *args):
    env = {**os.environ, "IRENE_OUTPUTS": str(tmp_path / "out"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.mark.slow
def test_transfer_keeps_the_devices_predictor_and_predict_finds_it_by_device(
        tmp_path, small_trees, toy_device):
    source = write_trees(tmp_path / "source.jsonl", small_trees)
    target = write_trees(tmp_path / "toy.jsonl", toy_device)
    out = _run(tmp_path, "stage=transfer", f"source={source}", f"target={target}",
               "shots=[0,1]", "draws=1", "methods=[type_scale]")
    assert out.returncode == 0, out.stderr[-3000:]
    kept = [line for line in out.stdout.splitlines() if line.startswith("predictor for toy_gpu: ")]
    assert len(kept) == 1 and out.stdout.strip().splitlines()[-1].startswith("transfer table: ")
    model_dir = Path(kept[0].split(": ", 1)[1].split("  ")[0])
    assert isinstance(load(model_dir), DevicePredictor)

    out = _run(tmp_path, "stage=predict", "model=distilbert-base-uncased", "device=toy_gpu",
               "batch_size=8", "seq_len=32", "explain.views=false")
    assert out.returncode == 0, out.stderr[-3000:]
    predictions = Path(out.stdout.strip().splitlines()[-1].removeprefix("predictions: "))
    totals = (predictions.parent / "totals.csv").read_text().splitlines()
    assert "out_of_range_nodes" in totals[0]
    # the same model and shape the target measured: 1.5x device 1, predicted close to it
    measured = next(t for t in toy_device if (t["model_name"], t["batch_size"], t["seq_len"])
                    == ("distilbert-base-uncased", 8, 32))["frontend_tree"]["ground_truth_energy"]
    root = json.loads(predictions.read_text().splitlines()[0])["frontend_tree"]
    assert root["predicted_energy"] == pytest.approx(measured, rel=0.35)

    out = _run(tmp_path, "stage=predict", "model=distilbert-base-uncased", "device=nope")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: device=nope: no finished stage=transfer run kept a predictor for it (devices "
        "with one: ['toy_gpu']); run stage=transfer source=<devices> target=<nope's measured "
        "trees> first")
    out = _run(tmp_path, "stage=predict", "model=distilbert-base-uncased", "device=toy_gpu",
               f"model_dir={model_dir}")
    assert out.returncode == 2 and "model_dir and device both name a predictor" in out.stderr


def test_the_device_predictor_is_not_a_config_option_and_the_schema_still_registers():
    from irene.predictors import classes
    from pipelines.config import register_configs

    assert "device" not in classes() and "irene_plus" in classes()
    register_configs()  # DevicePredictor is imported (above): its fields are not a schema
