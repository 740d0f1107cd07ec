"""Runs written without MLflow (pipelines.sqlite_tracker) read back with MLflow exactly as
runs MLflow wrote; and the writer steps aside for any store it was not checked against."""

from __future__ import annotations

import math
import shutil
import sqlite3
import subprocess
import sys

import mlflow
import pytest

from pipelines.sqlite_tracker import KNOWN_SCHEMAS, DirectWriteError, SqliteTracker, unusable
from pipelines.tracking import DirectTracker, TrackingError
from pipelines.tracking_worker import _direct_store_likely


@pytest.fixture()
def store(tmp_path):
    """A store MLflow created, with experiment ``e`` (artifacts under tmp_path)."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client


# Metric calls that exercise MLflow's rules: NaN and ±inf stand-ins, repeated keys, steps
# out of order (the latest value is the one of the highest step, then time, then value).
CALLS = [({"a": 1.0, "b": float("nan")}, None), ({"a": 2.0}, 3), ({"a": 0.5}, 1),
         ({"c": float("inf"), "d": -float("inf")}, 2), ({"b": 4.0}, None), ({"a": 2.0}, 3)]


def _mlflow_run(client, experiment_id):
    run = client.create_run(experiment_id, run_name="probe")
    for metrics, step in CALLS:
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value, step=step or 0)
    client.log_param(run.info.run_id, "p", "1")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _direct_run(uri):
    tracker = SqliteTracker(uri, "e")
    tracker.start("probe", {}, False, {"p": "1"}, None)
    for metrics, step in CALLS:
        for key, value in metrics.items():
            tracker.log_metrics({key: value}, step)
    tracker.end("FINISHED")
    tracker.close()
    return tracker.run_ids[0]


def _metrics(client, run_id):
    run = client.get_run(run_id)
    latest = {k: (v if not math.isnan(v) else "nan") for k, v in run.data.metrics.items()}
    history = {k: [(m.step, m.value if not math.isnan(m.value) else "nan")
                   for m in client.get_metric_history(run_id, k)] for k in latest}
    return latest, history, run.data.params


def test_metrics_and_params_read_back_as_mlflow_writes_them(store):
    uri, client = store
    experiment_id = client.get_experiment_by_name("e").experiment_id
    ours, theirs = _direct_run(uri), _mlflow_run(client, experiment_id)
    assert _metrics(client, ours) == _metrics(client, theirs)
    latest, history, _ = _metrics(client, ours)
    assert latest["a"] == 2.0 and latest["b"] == 4.0 and latest["c"] > 1e308
    assert sorted(history["a"]) == [(0, 1.0), (1, 0.5), (3, 2.0), (3, 2.0)]  # one per call


def test_mlflow_rules_are_enforced(store):
    uri, client = store
    tracker = SqliteTracker(uri, "e")
    tracker.start("first", {}, False, {"p": "1"}, None)
    tracker.log_params({"p": "1"})  # the same value again: allowed
    with pytest.raises(DirectWriteError, match="changing param values is not allowed"):
        tracker.log_params({"p": "2"})
    with pytest.raises(DirectWriteError, match="6000"):
        tracker.log_params({"long": "x" * 6001})
    with pytest.raises(DirectWriteError, match="key"):
        tracker.log_metrics({"k" * 251: 1.0}, None)
    tracker.set_tags({"long": "y" * 9000, "mlflow.runName": "renamed"})
    tracker.end("FINISHED")
    run = client.get_run(tracker.run_ids[0])
    assert run.data.params == {"p": "1"}  # nothing of the refused calls
    assert len(run.data.tags["long"]) == 8000  # truncated, as MLflow does
    assert run.info.run_name == "renamed" and run.data.tags["mlflow.runName"] == "renamed"


def test_nested_runs_and_artifacts(store, tmp_path):
    uri, client = store
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "sub" / "x.txt").write_text("x")
    (tmp_path / "table.csv").write_text("a\n1\n")
    tracker = SqliteTracker(uri, "e")
    tracker.start("parent", {"stage": "s"}, False, {}, "a: 1\n")
    tracker.start("child", {}, True, {}, None)
    tracker.log_artifact(str(tmp_path / "table.csv"), "report")
    tracker.end("FINISHED")
    tracker.log_artifact(str(tmp_path / "folder"), None)
    tracker.end("KILLED")
    parent, child = (client.get_run(r) for r in tracker.run_ids)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "mlflow.parentRunId" not in parent.data.tags
    assert (parent.info.status, child.info.status) == ("KILLED", "FINISHED")
    assert [a.path for a in client.list_artifacts(child.info.run_id, "report")] == ["report/table.csv"]
    got = client.download_artifacts(parent.info.run_id, "", str(tmp_path / "dl"))
    assert sorted(p.relative_to(got).as_posix() for p in __import__("pathlib").Path(got).rglob("*")
                  if p.is_file()) == ["config.yaml", "folder/sub/x.txt"]
    assert not list((tmp_path / "artifacts").rglob("*.partial"))


def test_the_writer_steps_aside_for_stores_it_does_not_know(store, tmp_path, monkeypatch):
    uri, client = store
    assert unusable(uri, "e") is None
    assert "does not exist yet" in unusable(f"sqlite:///{tmp_path / 'none.db'}", "e")
    assert "experiment 'other'" in unusable(uri, "other")
    assert "not a sqlite store" in unusable("http://127.0.0.1:5000", "e")
    assert "not a sqlite store" in unusable("postgresql://u@127.0.0.1/db", "e")
    client.create_experiment("remote", artifact_location="s3://bucket/prefix")
    assert "not a local folder" in unusable(uri, "remote")
    monkeypatch.setenv("MLFLOW_ENABLE_WORKSPACES", "true")
    assert "workspaces" in unusable(uri, "e")
    monkeypatch.delenv("MLFLOW_ENABLE_WORKSPACES")
    other = tmp_path / "other.db"
    shutil.copyfile(uri[len("sqlite:///"):], other)
    with sqlite3.connect(other) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'f00dcafe0000'")
    assert "schema revision f00dcafe0000" in unusable(f"sqlite:///{other}", "e")


def test_the_installed_mlflow_creates_a_schema_the_writer_knows(tmp_path):
    """Else every run goes through MLflow again (slower, still correct): when MLflow's schema
    changes, check the writer against the new one (the equality tests) and add it."""
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    with sqlite3.connect(tmp_path / "new.db") as connection:
        revision, = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision in KNOWN_SCHEMAS, f"MLflow {mlflow.__version__}: schema {revision}"


def test_stale_runs_are_closed_by_a_direct_tracker(store):
    uri, client = store
    experiment_id = client.get_experiment_by_name("e").experiment_id
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    from pipelines.tracking import HOST_TAG, PID_START_TAG, PID_TAG, host_id

    dead = client.create_run(experiment_id, tags={PID_TAG: str(gone.pid), HOST_TAG: host_id(),
                                                  PID_START_TAG: "-1"}).info.run_id
    foreign = client.create_run(experiment_id).info.run_id
    DirectTracker(uri, "e").close()
    assert client.get_run(dead).info.status == "KILLED"
    assert "stale-run check" in client.get_run(dead).data.tags["irene.closed_by"]
    assert client.get_run(foreign).info.status == "RUNNING"


def test_a_store_that_fails_gives_one_line(store, tmp_path):
    uri, _ = store
    tracker = DirectTracker(uri, "e")
    tracker.start("r", {}, False, {}, None)
    path = uri[len("sqlite:///"):]
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the store for writing
    import pipelines.sqlite_tracker as module

    tracker.connection.execute("PRAGMA busy_timeout = 200")
    try:
        with pytest.raises(TrackingError, match=r"^MLflow tracking to sqlite:.* failed: "
                                                r"log_metrics: sqlite: database is locked$"):
            tracker.log_metrics({"m": 1.0}, None)
    finally:
        blocker.rollback()
        blocker.close()
    assert module._BUSY_TIMEOUT_S >= 30  # a busy store is waited for, in real use


def test_the_prestart_guess_follows_the_command_line(store, tmp_path, monkeypatch):
    uri, _ = store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("IRENE_OUTPUTS", str(tmp_path / "empty"))
    assert _direct_store_likely(["run.py", f"tracking.uri={uri}", "tracking.experiment=e"])
    assert not _direct_store_likely(["run.py", f"tracking.uri={uri}"])  # no experiment irene
    assert not _direct_store_likely(["run.py", f"tracking.uri={uri}", "tracking.experiment=e",
                                     "tracking.direct=false"])
    assert not _direct_store_likely(["run.py", "stage=train"])  # the default store: none yet
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert _direct_store_likely(["run.py", "tracking.experiment=e"])


def test_a_store_whose_path_has_uri_characters_is_written_directly(tmp_path):
    folder = tmp_path / "a dir #1 100%"
    folder.mkdir()
    uri = f"sqlite:///{folder / 'store.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("e", artifact_location=(folder / "artifacts").as_uri())
    assert unusable(uri, "e") is None
    tracker = SqliteTracker(uri, "e")
    tracker.start("r", {}, False, {"p": "1"}, "a: 1\n")
    tracker.end("FINISHED")
    run = client.get_run(tracker.run_ids[0])
    assert run.data.params == {"p": "1"} and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
