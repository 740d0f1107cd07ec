"""Tracking from a second process: the stage computes while the tracking worker imports
MLflow, and the runs it writes are the runs the stage would have written itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from irene.data.tree import write_trees

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# A stage's tracking calls, in a fresh process: nested runs, every helper, a file and a folder.
STAGE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from omegaconf import OmegaConf
    from pipelines import tracking

    uri, mode, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    cfg = OmegaConf.create({"stage": "probe", "tracking": {
        "enabled": True, "uri": uri, "experiment": "same", "artifact_root": None,
        "background": mode != "in-process"}})
    (folder / "views").mkdir(parents=True, exist_ok=True)
    (folder / "table.csv").write_text("a,b\\n1,2\\n")
    (folder / "views" / "tree.txt").write_text("root 1 J\\n")
    with tracking.tracked_run(cfg, "probe", {"alpha": 0.5, "models": ["a", "b"]},
                              name="probe run") as tracker:
        assert isinstance(tracker, tracking.Tracker)
        for fold in ("a", "b"):
            with tracker.child_run("probe-fold", f"fold {fold}", {"left_out": fold}) as child:
                child.log_metrics({"error": 1.5 if fold == "a" else 2.5})
        tracker.log_params({"num_trees": 3})
        tracker.set_tags({"data.source": "test"})
        for step, loss in enumerate([3.0, 2.0]):
            tracker.log_metrics({"loss": loss}, step=step)
        tracker.log_artifact(folder / "table.csv", "report")
        tracker.log_artifact(folder / "views", "views")
        run_id = tracker.run_id  # while the run is open
    assert tracker.run_id == run_id  # and after it
    print(json.dumps({"run_id": run_id, "mlflow_imported": "mlflow" in sys.modules,
                      "tracker": type(tracker).__name__}))
""")


def _stage(tmp_path: Path, uri: str, mode: str) -> dict:
    """Run STAGE from a git checkout of its own (with a branch and a remote: MLflow's source
    tags name them)."""
    repo = tmp_path / "repo"
    script = repo / "stage.py"
    if not script.exists():
        repo.mkdir()
        script.write_text(STAGE)
        git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
        for args in (["init", "-q", "-b", "topic"], ["add", "stage.py"],
                     ["commit", "-q", "-m", "stage"],
                     ["remote", "add", "origin", "https://example.org/stage.git"]):
            subprocess.run(git + args, check=True, capture_output=True)
    out = subprocess.run([sys.executable, str(script), uri, mode, str(tmp_path / mode)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _contents(client: mlflow.MlflowClient, run_id: str) -> dict:
    """What a run holds, without what differs between two processes (ids, times, pids)."""
    run = client.get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items()
            if not k.startswith("irene.pid") and k not in ("mlflow.parentRunId",)}

    def files(path=None):
        found = []
        for item in client.list_artifacts(run_id, path):
            found.extend(files(item.path) if item.is_dir else [item.path])
        return sorted(found)

    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert run.info.start_time <= run.info.end_time
    return {"name": run.info.run_name, "status": run.info.status, "params": run.data.params,
            "metrics": run.data.metrics, "tags": tags, "files": files(), "loss": history,
            "user": run.info.user_id, "lifecycle": run.info.lifecycle_stage,
            "artifact_uri": run.info.artifact_uri.replace(run_id, "<id>")}


@pytest.mark.slow
def test_background_tracking_writes_what_in_process_tracking_writes(tmp_path):
    """The same calls through MLflow in the stage's process and through the tracking worker
    give the same runs, read with MLflow."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    in_process = _stage(tmp_path, uri, "in-process")  # creates the experiment
    background = _stage(tmp_path, uri, "background")
    assert background["mlflow_imported"] is False  # the worker imported it, not the stage
    assert background["tracker"] == "BackgroundTracker"
    assert in_process["mlflow_imported"] is True
    client = mlflow.MlflowClient(uri)
    runs = {}
    for mode, result in (("background", background), ("in-process", in_process)):
        parent = _contents(client, result["run_id"])
        children = client.search_runs(
            [client.get_run(result["run_id"]).info.experiment_id],
            f"tags.mlflow.parentRunId = '{result['run_id']}'", order_by=["attributes.start_time"])
        runs[mode] = (parent, [_contents(client, c.info.run_id) for c in children])
    parent, children = runs["background"]
    assert parent["tags"]["mlflow.source.git.branch"] == "topic"
    assert parent["tags"]["mlflow.source.git.repoURL"] == "https://example.org/stage.git"
    assert parent["status"] == "FINISHED" and parent["name"] == "probe run"
    assert parent["params"]["models"] == '["a", "b"]' and parent["params"]["num_trees"] == "3"
    assert parent["loss"] == [(0, 3.0), (1, 2.0)]
    assert parent["files"] == ["config.yaml", "report/table.csv", "views/tree.txt"]
    assert [c["name"] for c in children] == ["fold a", "fold b"]
    assert [c["metrics"]["error"] for c in children] == [1.5, 2.5]
    assert runs["background"] == runs["in-process"]
    config = client.download_artifacts(background["run_id"], "config.yaml", str(tmp_path / "dl"))
    assert "background: true" in Path(config).read_text()


@pytest.mark.slow
def test_the_main_job_imports_neither_torch_nor_mlflow_nor_pandas_and_logs_every_run(
        small_trees, tmp_path):
    """``stage=crossvalidate`` as a user runs it: the stage's process imports only what the
    cross-validation computes with; the tracking worker logs the parent and fold runs."""
    trees = write_trees(tmp_path / "small.jsonl", small_trees)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "run.py", "stage=crossvalidate",
         f"data.trees={trees}", f"tracking.uri={uri}", "tracking.experiment=main-job",
         "show_progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "irene.evaluate.crossval" in imported  # the stage's own imports are seen
    for heavy in ("torch", "sklearn", "scipy", "transformers", "mlflow", "pandas"):
        assert heavy not in imported, heavy
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("main-job").experiment_id
    parent, = client.search_runs([experiment], "tags.stage = 'crossvalidate'")
    folds = client.search_runs([experiment], "tags.stage = 'crossvalidate-fold'")
    assert parent.info.status == "FINISHED"
    assert len(folds) == len({t["model_name"] for t in small_trees})
    assert {f.data.tags["mlflow.parentRunId"] for f in folds} == {parent.info.run_id}
    assert {"overall_ml", "overall_module", "overall_model"} <= set(parent.data.metrics)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "report/crossvalidation.csv", "report/crossvalidation.md"}
    assert parent.data.tags["data.source"] == "data.trees"
    # again, on the store that now exists: the worker again, MLflow still not in the stage
    again = subprocess.run(
        [sys.executable, "-X", "importtime", "run.py", "stage=crossvalidate",
         f"data.trees={trees}", f"tracking.uri={uri}", "tracking.experiment=main-job",
         "show_progress=false", f"hydra.run.dir={tmp_path / 'again'}", "hydra.verbose=irene"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "tracking: MLflow writes from a tracking worker" in again.stdout + again.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in again.stderr.splitlines()
                if line.startswith("import time:")}
    assert "pipelines.tracking_worker" in imported and "mlflow" not in imported
    second = client.search_runs([experiment], "tags.stage = 'crossvalidate'",
                                order_by=["attributes.start_time DESC"])[0]
    assert second.info.run_id != parent.info.run_id and second.info.status == "FINISHED"
    assert second.data.metrics == parent.data.metrics
    assert len(client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{second.info.run_id}'")) == len(folds)


@pytest.mark.slow
def test_a_store_that_cannot_be_written_fails_the_stage_in_one_line(small_trees, tmp_path):
    trees = write_trees(tmp_path / "small.jsonl", small_trees)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the store's folder would be")
    uri = f"sqlite:///{blocked / 'store.db'}"
    out = subprocess.run(
        [sys.executable, "run.py", "stage=crossvalidate", f"data.trees={trees}",
         f"tracking.uri={uri}", "show_progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow tracking to {uri} failed: open:")
    assert (tmp_path / "run" / "crossvalidation.csv").is_file()  # the results are kept


def test_a_prestarted_worker_that_is_not_needed_exits_at_once():
    from pipelines import tracking_worker

    tracking_worker.prestart(["run.py", "stage=report"])
    process = tracking_worker.take_prestarted()
    assert process is not None and process.poll() is None
    tracking_worker._PRESTARTED = process
    started = time.monotonic()
    tracking_worker.dismiss_prestarted()
    assert process.wait(timeout=30) == 0
    assert time.monotonic() - started < 5.0  # it did not wait for its MLflow import (3-5 s)
    assert tracking_worker.take_prestarted() is None


@pytest.mark.parametrize("argv", [["run.py", "-m", "experiment=per_model"],
                                  ["run.py", "stage=crossvalidate", "tracking=off"],
                                  ["run.py", "stage=train", "tracking.enabled=false"],
                                  ["run.py", "stage=train", "tracking.background=false"]])
def test_no_worker_is_prestarted_when_the_command_says_none_is_needed(argv):
    from pipelines import tracking_worker

    tracking_worker.prestart(argv)
    assert tracking_worker.take_prestarted() is None


def test_resume_reuses_only_a_run_of_the_same_code(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from pipelines import run_identity, tracking

    cfg = OmegaConf.create({"stage": "probe", "resume": True, "tracking": {
        "enabled": True, "uri": f"sqlite:///{tmp_path / 'store.db'}", "experiment": "resume",
        "artifact_root": None, "background": False}})
    with tracking.tracked_run(cfg, "probe") as tracker:
        pass
    assert run_identity.finished_run(cfg, "probe").info.run_id == tracker.run_id
    identity = run_identity.code_identity()
    assert identity.startswith(__import__("irene").__version__)
    monkeypatch.setattr(run_identity, "code_identity", lambda: identity + "+other")
    assert run_identity.finished_run(cfg, "probe") is None  # other code: computed again


def test_tracking_off_gives_the_stage_a_null_tracker_that_records_nothing(tmp_path):
    from omegaconf import OmegaConf

    from pipelines import tracking

    cfg = OmegaConf.create({"stage": "probe", "tracking": {
        "enabled": False, "uri": f"sqlite:///{tmp_path / 'store.db'}", "experiment": "off"}})
    with tracking.tracked_run(cfg, "probe", {"alpha": 1}) as tracker:
        assert isinstance(tracker, tracking.NullTracker) and isinstance(tracker, tracking.Tracker)
        with tracker.child_run("probe-fold", "fold a", {"left_out": "a"}) as child:
            child.log_metrics({"error": 1.0}, prefix="x_", step=0)
        tracker.log_params({"models": ["a"]})
        tracker.set_tags({"k": "v"})
        tracker.log_artifact(tmp_path / "absent.csv", "report")
    assert tracker.run_id is None
    assert not (tmp_path / "store.db").exists()  # nothing was opened


def test_every_tracker_implements_the_interface_the_stages_use():
    from pipelines import tracking

    names = [n for n in dir(tracking.Tracker) if not n.startswith("_")]
    assert set(names) == {"run_id", "log_params", "log_metrics", "set_tags", "log_artifact",
                          "child_run"}
    for cls in (tracking.InProcessTracker, tracking.BackgroundTracker, tracking.NullTracker):
        assert all(hasattr(cls, name) for name in names), cls
