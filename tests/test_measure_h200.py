"""Trees measured on an H200 (datasets/h200, shipped with the project) through the stages,
and the leakage rule."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from irene.data.tree import iter_nodes, read_trees, write_trees
from irene.measure.leakage import LeakedTargetError, check_no_leaked_target, leaked_features
from irene.measure.summary import summarize, summary_line
from pipelines.config import register_configs
from tests.conftest import H200_TREES

ROOT = Path(__file__).resolve().parents[1]

H200 = H200_TREES
register_configs()


@pytest.fixture(scope="module")
def h200_path() -> Path:
    assert H200.is_file(), f"{H200} is part of the project: is the checkout complete?"
    return H200


@pytest.fixture(scope="module")
def h200(h200_path):
    return read_trees(h200_path, require_energy=True)


def _cfg(stage: str, tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"stage={stage}", "tracking=off", "show_progress=false",
                                            f"run_dir={tmp_path / stage}", *overrides])


# ------------------------------------------------------------------------------- leakage
def test_h200_gpu_counter_is_detected_as_the_target(h200):
    leaks = leaked_features(h200, ["flops", "gpu_energy_mean"])
    assert list(leaks) == ["gpu_energy_mean"] and "of 1459 nodes" in leaks["gpu_energy_mean"]
    assert leaked_features(h200, ["flops", "mem_bytes", "times_mean"]) == {}
    check_no_leaked_target(h200, ["model_specs"], "h200")
    for sets in (["model_specs", "resource_utilization"], ["resource_utilization"]):
        with pytest.raises(LeakedTargetError, match="'gpu_energy_mean'.*is the target") as error:
            check_no_leaked_target(h200, sets, "h200")
        assert "\n" not in str(error.value) and "features=model_specs" in str(error.value)


def test_new_nvml_only_trees_declare_it_and_a_separate_ground_truth_is_allowed(h200):
    nvml_only = copy.deepcopy(h200[:2])
    for tree in nvml_only:
        tree["measurement"] = {"ground_truth_meter": "nvml", "gpu_energy_mean_meter": None}
        for node in iter_nodes(tree["frontend_tree"]):
            node.pop("gpu_energy_mean")  # what the protocol now writes with NVML alone
    with pytest.raises(LeakedTargetError, match="nvml counter is the ground truth"):
        check_no_leaked_target(nvml_only, ["model_specs", "resource_utilization"], "new")
    separate = copy.deepcopy(nvml_only)
    for tree in separate:
        tree["measurement"].update(ground_truth_meter="rapl+nvml", gpu_energy_mean_meter="nvml")
        for node in iter_nodes(tree["frontend_tree"]):
            node["gpu_energy_mean"] = 0.6 * node["ground_truth_energy"]  # a part of the target
    check_no_leaked_target(separate, ["model_specs", "resource_utilization"], "rapl+nvml")


@pytest.mark.parametrize("stage", ["crossvalidate", "train", "diagnose"])
def test_stages_refuse_features_that_read_the_target(h200_path, tmp_path, stage):
    from pipelines.stage import run_stage

    with pytest.raises(LeakedTargetError, match="gpu_energy_mean"):
        run_stage(stage, _cfg(stage, tmp_path, f"data.trees={h200_path}", "features=both"))


# --------------------------------------------------------------------------------- stages
def test_measured_trees_flow_through_the_stages(h200_path, h200, tmp_path):
    from pipelines.stage import run_stage

    # llama-small alone has RMSNorm and SiLU leaves: left out, they use the LayerNorm regressor
    data = [f"data.trees={h200_path}", "features=model_specs", "predictor.unseen_op=layernorm"]
    report = run_stage("crossvalidate", _cfg("crossvalidate", tmp_path, *data, "save_predictions=true"))
    assert set(report.table.index) >= {t["model_name"] for t in h200} | {"overall"}
    assert report.predictions_path.is_file()

    summary = run_stage("evaluate", _cfg("evaluate", tmp_path, f"trees={h200_path}",
                                f"predictions={report.predictions_path}"))
    assert set(summary) == {"ml", "module", "model"} and all(v >= 0 for v in summary.values())

    diagnostics = run_stage("diagnose", _cfg("diagnose", tmp_path, *data,
                                             f"predictions={report.predictions_path}"))
    assert diagnostics.report_path.is_file()

    model_dir = run_stage("train", _cfg("train", tmp_path, *data))
    predictions = run_stage("predict", _cfg("predict", tmp_path, *data, f"model_dir={model_dir}",
                                   f"output={tmp_path / 'predicted.jsonl'}"))
    predicted = read_trees(predictions)
    assert len(predicted) == len(h200)
    assert all(n.get("predicted_energy", 0) > 0 for t in predicted for n in iter_nodes(t["frontend_tree"]))


def test_summary_of_the_h200_trees(h200):
    by_model = {t["model_name"]: summarize(t) for t in h200}
    bert = by_model["bert-base-uncased"]
    assert bert["nodes"] == 226 and bert["nodes_measured"] == 23
    assert bert["root_energy_j"] == pytest.approx(3.82, abs=0.005)
    assert bert["root_time_s"] == pytest.approx(0.01116, abs=1e-5)
    medians = [s["window_spread_median"] for s in by_model.values()]
    assert 0.02 < min(medians) and max(medians) < 0.05  # 1 s windows of the fixed protocol
    assert all(0.9 < s["children_over_parent_median"] < 1.1 for s in by_model.values())
    line = summary_line(bert)
    assert line.startswith("bert-base-uncased 8x128: 23/226 nodes measured, root 3.819 J 11.2 ms")
    assert "drift" not in line  # measured before drift detection existed


def test_summary_without_energy_says_so(h200, tmp_path):
    tree = copy.deepcopy(h200[0])
    for node in iter_nodes(tree["frontend_tree"]):
        for key in ("ground_truth_energy", "energy_std_j", "gpu_energy_mean"):
            node.pop(key, None)
    line = summary_line(summarize(tree))
    assert "root no energy" in line and "spread median n/a" in line
    path = write_trees(tmp_path / "unmeasured.jsonl", [tree])
    assert json.loads(path.read_text())["model_name"] == tree["model_name"]
