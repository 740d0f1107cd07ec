"""``make mlflow-ui`` opens MLflow's UI on the experiment's runs table, metric columns in view."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.servers import MlflowServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import mlflow_ui  # noqa: E402


def test_the_view_picks_the_cross_validation_errors_and_the_ablation_axes():
    view = mlflow_ui.runs_view({"overall_ml", "overall_module", "overall_model", "train_ml"},
                               {"strategy", "weighting", "seed", "predictor"})
    assert view == {"selectedColumns": [
        "metrics.`overall_ml`", "metrics.`overall_module`", "metrics.`overall_model`",
        "params.`predictor`", "params.`strategy`", "params.`weighting`"]}
    # runs of other stages: their first metrics by name
    assert mlflow_ui.runs_view({f"m{i}" for i in range(9)}, set(), max_metrics=2) == {
        "selectedColumns": ["metrics.`m0`", "metrics.`m1`"]}


def test_the_address_names_the_runs_tab_and_the_machine_learning_workflow():
    url = mlflow_ui.runs_table_url("http://127.0.0.1:5000", "7")
    assert url == ("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
                   "&viewStateShareKey=irene-runs")
    assert mlflow_ui.runs_table_url("http://127.0.0.1:5000", None) == "http://127.0.0.1:5000/"


def _chromium_dom(url: str, tmp_path: Path) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI (apt-get install chromium)")
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
                          "--virtual-time-budget=30000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=240)
    return out.stdout


@pytest.mark.slow
def test_first_load_shows_the_runs_table_with_its_metrics(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    experiment = mlflow.create_experiment("irene", artifact_location=str(tmp_path / "art"))
    for name, module in (("cv-end2end-close_to_one", 10.2), ("cv-stepwise-free", 53.9)):
        with mlflow.start_run(experiment_id=experiment, run_name=name):
            mlflow.log_params({"strategy": name.split("-")[1], "predictor": "irene"})
            mlflow.log_metrics({"overall_ml": 0.69, "overall_module": module, "overall_model": 7.16,
                                "train_ml": 0.5})
    assert mlflow_ui.prepare_experiment(store, "irene") == experiment
    tags = mlflow.get_experiment(experiment).tags
    assert json.loads(tags[mlflow_ui.VIEW_TAG])["selectedColumns"][:3] == [
        "metrics.`overall_ml`", "metrics.`overall_module`", "metrics.`overall_model`"]
    server = MlflowServer(store, tmp_path / "art")
    try:
        server.wait()
        dom = _chromium_dom(mlflow_ui.runs_table_url(server.url, experiment), tmp_path / "view")
        plain = _chromium_dom(mlflow_ui.runs_table_url(server.url, experiment, view=False),
                              tmp_path / "plain")
    finally:
        server.stop()
    for text in ("cv-end2end-close_to_one", "cv-stepwise-free", "overall_module", "53.9"):
        assert text in dom, f"{text!r} is not on the first page"
    assert "train_ml" not in dom  # a metric the view did not pick stays out of the table
    # without the view, MLflow lists the runs but none of their metrics
    assert "cv-stepwise-free" in plain and "53.9" not in plain
