"""Multirun sweeps: parent/child runs, parallel jobs on one sqlite store, report tables,
resume, submitit, a PostgreSQL-backed store and the MLflow server (all on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir

from irene.data.tree import write_trees
from pipelines.config import register_configs
from tests.servers import MlflowServer, Postgres, postgres_bindir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
register_configs()


@pytest.fixture(scope="module")
def trees_file(small_trees, tmp_path_factory):
    return write_trees(tmp_path_factory.mktemp("data") / "small.jsonl", small_trees)


def sqlite_store(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri


def sweep(tmp_path, uri: str, trees_file: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "IRENE_PARENT_RUN_ID"}
    return subprocess.run(
        [sys.executable, "run.py", "-m", f"data.trees={trees_file}", f"tracking.uri={uri}",
         "tracking.experiment=sweeps", f"hydra.sweep.dir={tmp_path / 'multirun'}",
         "show_progress=false", "save_predictions=false", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def runs(uri: str, filter_string: str = "") -> list:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["sweeps"], filter_string=filter_string,
                              output_format="list", max_results=1000)


def test_parallel_jobs_on_one_sqlite_store_and_a_failing_job(tmp_path, trees_file):
    uri = sqlite_store(tmp_path)
    # tanh_scalar=-1 is invalid: that job fails at its start, as a FAILED run with its
    # params; the seven others complete
    out = sweep(tmp_path, uri, trees_file, "hydra/launcher=joblib", "hydra.launcher.n_jobs=8",
                "predictor.tanh_scalar=1,2,3,4,5,6,7,-1")
    jobs = runs(uri, "tags.stage = 'crossvalidate'")
    assert len(jobs) == 8, out.stderr[-3000:]
    status = sorted(r.info.status for r in jobs)
    assert status == ["FAILED"] + ["FINISHED"] * 7
    failed = next(r for r in jobs if r.info.status == "FAILED")
    assert failed.data.params["tanh_scalar"] == "-1.0"
    parent = runs(uri, "tags.stage = 'sweep'")
    assert len(parent) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent[0].info.run_id}
    assert {r.data.tags["job_num"] for r in jobs} == {str(i) for i in range(8)}


def _report(uri: str, run_dir: Path):
    from pipelines.stage import run_stage

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "stage=report", "experiment=weighting_ablation", f"tracking.uri={uri}",
            "tracking.experiment=sweeps", f"run_dir={run_dir}", "data.name=device_1"])
    return run_stage("report", cfg)


def test_report_resume_and_mlflow_server(tmp_path, trees_file):
    uri = sqlite_store(tmp_path)
    args = ("experiment=weighting_ablation", "strategy=end2end,none", "weighting=close_to_one")
    first = sweep(tmp_path, uri, trees_file, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = runs(uri, "tags.stage = 'crossvalidate'")
    assert len(jobs) == 2 and all(r.data.tags["preset"] == "weighting_ablation" for r in jobs)
    assert {r.data.params["strategy"] for r in jobs} == {"end2end", "none"}

    a = _report(uri, tmp_path / "report_a")
    b = _report(uri, tmp_path / "report_b")
    for suffix in ("md", "csv", "tex"):
        left = (tmp_path / "report_a" / f"weighting_ablation.{suffix}").read_bytes()
        assert left == (tmp_path / "report_b" / f"weighting_ablation.{suffix}").read_bytes()
    assert list(a.table.index) == [("none", "n/a"), ("end2end", "close_to_one")]
    assert "**" in (tmp_path / "report_a" / "weighting_ablation.md").read_text()
    assert r"\textbf{" in (tmp_path / "report_a" / "weighting_ablation.tex").read_text()
    assert (tmp_path / "report_a" / "weighting_ablation.png").stat().st_size > 1000
    parent = runs(uri, "tags.stage = 'sweep'")[0]
    logged = mlflow.MlflowClient().list_artifacts(parent.info.run_id, "tables/device_1")
    assert {Path(f.path).name for f in logged} >= {"weighting_ablation.md", "weighting_ablation.tex"}
    assert b.table.equals(a.table)

    again = sweep(tmp_path, uri, trees_file, *args)  # resume: both jobs already FINISHED
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume: identical config already FINISHED" in again.stderr + again.stdout
    assert len(runs(uri, "tags.stage = 'crossvalidate'")) == 2

    server = MlflowServer(uri, tmp_path / "server-artifacts").wait()
    try:
        experiment = mlflow.get_experiment_by_name("sweeps")
        request = urllib.request.Request(
            f"{server.url}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment.experiment_id],
                             "filter": "tags.stage = 'crossvalidate'"}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            listed = json.loads(response.read())["runs"]
        assert {r["info"]["run_id"] for r in listed} == {r.info.run_id for r in jobs}
        # a single run logs through its tracking worker over HTTP (MLflow prints run links
        # there: they must not reach the worker's answers)
        train = subprocess.run(
            [sys.executable, "run.py", "stage=train", f"data.trees={trees_file}",
             f"tracking.uri={server.url}", "tracking.experiment=server-single",
             "show_progress=false", "predictor.epochs=1", f"hydra.run.dir={tmp_path / 'train'}"],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert train.returncode == 0, train.stderr[-3000:]
        run_id = re.search(r"MLflow run: (\w+)", train.stdout).group(1)
        trained = mlflow.MlflowClient(server.url).get_run(run_id)
        assert trained.info.status == "FINISHED" and "train_model" in trained.data.metrics
    finally:
        server.stop()


def test_submitit_local_launcher(tmp_path, trees_file):
    uri = sqlite_store(tmp_path)
    out = sweep(tmp_path, uri, trees_file, "hydra/launcher=submitit_local",
                "hydra.launcher.timeout_min=20", "strategy=end2end,none")
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = runs(uri, "tags.stage = 'crossvalidate'")
    assert sorted(r.data.params["strategy"] for r in jobs) == ["end2end", "none"]
    assert all(r.info.status == "FINISHED" for r in jobs)
    assert len({r.data.tags["mlflow.parentRunId"] for r in jobs}) == 1


def test_sweep_lands_in_a_postgresql_store(tmp_path, trees_file):
    if postgres_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries missing in CI: .ci/run must install postgresql")
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql)")
    server = Postgres().start()
    try:
        out = sweep(tmp_path, server.uri, trees_file, "strategy=end2end,none",
                    f"tracking.artifact_root={(tmp_path / 'artifacts').as_uri()}")
        assert out.returncode == 0, out.stderr[-3000:]
        jobs = runs(server.uri, "tags.stage = 'crossvalidate'")
        assert sorted(r.data.params["strategy"] for r in jobs) == ["end2end", "none"]
        assert all(r.info.status == "FINISHED" for r in jobs)
        assert runs(server.uri, "tags.stage = 'sweep'")
    finally:
        server.stop()


def test_seeded_sweep_and_its_report_from_the_cli(tmp_path, trees_file):
    uri = sqlite_store(tmp_path)
    args = ("experiment=weighting_ablation", "strategy=end2end,none", "weighting=close_to_one",
            "seeds=2", "predictor.epochs=2", "hydra/launcher=joblib")
    out = sweep(tmp_path, uri, trees_file, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = runs(uri, "tags.stage = 'crossvalidate'")
    assert sorted(r.data.params["num_seeds"] for r in jobs) == ["1", "2"]  # none: fit once
    parent = runs(uri, "tags.stage = 'sweep'")[0]
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert len(runs(uri, "tags.stage = 'crossvalidate-fold'")) == 2 * 6 + 6

    def report(folder: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "IRENE_PARENT_RUN_ID"}
        return subprocess.run(
            [sys.executable, "run.py", "stage=report", "experiment=weighting_ablation", "seeds=2",
             "data.name=device_1", f"tracking.uri={uri}", "tracking.experiment=sweeps",
             f"run_dir={tmp_path / folder}"], cwd=ROOT, capture_output=True, text=True,
            timeout=600, env=env)

    for folder in ("a", "b"):
        done = report(folder)
        assert done.returncode == 0, done.stderr[-3000:]
    for suffix in ("md", "csv", "tex"):
        name = f"weighting_ablation_k2.{suffix}"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "Welch t-test" in (tmp_path / "a" / "weighting_ablation_k2.md").read_text()
    logged = mlflow.MlflowClient().list_artifacts(parent.info.run_id, "tables/device_1")
    assert "weighting_ablation_k2.md" in {Path(f.path).name for f in logged}
