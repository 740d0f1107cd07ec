"""Diagnostics: parent ÷ children ratios, leaf vs aggregation error, the diagnose stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from irene.data.forest import build_forest, compose, subtree_leaf_sum
from irene.evaluate.diagnostics import child_ratio_table, child_ratios, error_parts, error_sources
from tests.conftest import make_tree

ROOT = Path(__file__).resolve().parents[1]


def test_child_ratios_of_a_toy_tree():
    forest = build_forest([make_tree()])  # root 3.0 <- block 2.0 (1.0 + 0.5), norm 0.25
    ratios = child_ratios(forest)
    np.testing.assert_allclose(ratios[:2], [3.0 / 2.25, 2.0 / 1.5])
    assert np.isnan(ratios[2:]).all()
    table = child_ratio_table(forest, tanh_scalar=10.0)
    assert table.loc["module:Block", "ratio_mean"] == pytest.approx(2.0 / 1.5)
    assert table.loc["module:Block", "outside_tau_pct"] == 100.0
    assert table.loc["all", "nodes"] == 2


def test_published_parents_exceed_their_children(device_forest):
    table = child_ratio_table(device_forest, tanh_scalar=10.0)
    for cls in ("BertSelfAttention", "Attention", "MLP", "BertEmbeddings", "BertPooler"):
        assert 1.15 < table.loc[f"module:{cls}", "ratio_mean"] < 1.55, cls
        assert table.loc[f"module:{cls}", "outside_tau_pct"] > 50
    for cls in ("BertLayer", "Block", "BertEncoder"):
        assert abs(table.loc[f"module:{cls}", "ratio_mean"] - 1.0) < 0.03, cls


def test_error_parts_add_up_and_separate_leaves_from_aggregation(small_trees):
    forest = build_forest(small_trees)
    # perfect leaves, plain sums: all error is aggregation (the missing unattributed work)
    plain = compose(forest, np.where(forest.is_leaf, forest.gold_j, 0.0))
    parts = error_parts(forest, plain)
    np.testing.assert_allclose(parts["leaf_part_pct"], 0.0, atol=1e-9)
    np.testing.assert_allclose(parts["aggregation_part_pct"], parts["error_pct"], atol=1e-9)
    # leaves 10 % too high, inner nodes exactly right: leaf part +10·Σleaves/gold, rest aggregation
    skewed = np.where(forest.is_leaf, 1.1 * forest.gold_j, forest.gold_j)
    parts = error_parts(forest, skewed)
    np.testing.assert_allclose(parts["error_pct"],
                               parts["leaf_part_pct"] + parts["aggregation_part_pct"], atol=1e-9)
    inner = parts["node_type"] != "ml"
    np.testing.assert_allclose(parts.loc[inner, "error_pct"], 0.0, atol=1e-9)
    leaves_below = subtree_leaf_sum(forest, np.where(forest.is_leaf, forest.gold_j, 0.0))
    np.testing.assert_allclose(parts.loc[inner, "leaf_part_pct"],
                               (10.0 * leaves_below / forest.gold_j)[~forest.is_leaf], rtol=1e-9)
    table = error_sources(forest, skewed)
    assert table.loc["ml:all", "abs_error_pct"] == pytest.approx(10.0)
    assert table.loc["module:all", "abs_error_pct"] == pytest.approx(0.0, abs=1e-9)


def test_diagnose_stage_writes_and_logs_the_report(small_trees, mlflow_uri, tmp_path):
    import mlflow
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from irene.data.tree import write_trees
    from pipelines.config import register_configs
    from pipelines.stage import run_stage

    register_configs()
    trees_file = write_trees(tmp_path / "small.jsonl", small_trees)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[
            "stage=diagnose", f"data.trees={trees_file}", f"tracking.uri={mlflow_uri}",
            f"run_dir={tmp_path / 'diagnose'}", "tracking.experiment=pytest-diagnose",
            "show_progress=false", "predictor=irene_plus", "features=model_specs",
            "predictor.leaf_degrees=[1,2]", "predictor.leaf_alphas=[1e-4]"])
    report = run_stage("diagnose", cfg)
    for name in ("child_ratios.csv", "child_ratios.md", "error_sources.csv", "diagnostics.md"):
        assert (tmp_path / "diagnose" / name).is_file(), name
    text = report.report_path.read_text()
    assert "BertSelfAttention" in text and "irene_plus (model_specs)" in text
    assert report.sources.loc["module:all", "abs_error_pct"] < 8.0
    mlflow.set_tracking_uri(mlflow_uri)
    run = mlflow.search_runs(experiment_names=["pytest-diagnose"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["parents_outside_tau_pct"] > 10
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert "report/diagnostics.md" in artifacts
