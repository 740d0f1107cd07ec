"""The right data or a loud failure: where data come from, what a run records about them, a
device written with integer columns, and the tracking store under faults (processes that
start together, that are terminated, that die without a word, and sweeps that die)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from irene.data import locate, published
from irene.data.published import (
    CSV_FILES,
    DataNotFoundError,
    csv_name,
    import_device,
    locate_device,
    sha256_of,
)
from irene.data.tree import write_trees
from pipelines.config import register_configs
from pipelines.stale_runs import HOST_TAG, PID_START_TAG, PID_TAG, close_stale_runs, host_id

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _device(folder: Path, source: Path, cell: tuple[str, str] | None = ("8.0", "32.0")) -> Path:
    """A device folder: the published files, or only their rows of one cell per model."""
    folder.mkdir(parents=True, exist_ok=True)
    for level in CSV_FILES:
        text = (source / csv_name(level)).read_text()
        if cell:
            lines = text.splitlines(keepends=True)
            text = "".join([lines[0]] + [x for x in lines[1:] if tuple(x.split(",")[:2]) == cell])
        (folder / csv_name(level)).write_text(text)
    return folder


@pytest.fixture()
def offline(monkeypatch):
    def refuse(url, timeout):
        raise OSError("network disabled in the tests")

    monkeypatch.setattr(locate.urllib.request, "urlopen", refuse)


# ------------------------------------------------------------------------ the data rule
def test_irene_data_dir_as_a_folder_of_devices(device_dir, tmp_path, monkeypatch, offline):
    one = _device(tmp_path / "irene" / "device_1", device_dir)
    two = _device(tmp_path / "irene" / "device_2", device_dir, cell=("8.0", "64.0"))
    monkeypatch.setenv("IRENE_DATA_DIR", str(tmp_path / "irene"))
    located = locate_device(None, "device_1", datasets_dir=tmp_path / "ds")
    assert (located.folder, located.source) == (one, "$IRENE_DATA_DIR")
    assert located.sha256 == {csv_name(lv): sha256_of(one / csv_name(lv)) for lv in CSV_FILES}
    assert locate_device(None, "device_2", datasets_dir=tmp_path / "ds").folder == two


def test_device_2_never_reads_the_device_1_folder(device_dir, tmp_path, monkeypatch, offline):
    one = _device(tmp_path / "device_1", device_dir)
    monkeypatch.setenv("IRENE_DATA_DIR", str(one))
    assert locate_device(None, "device_1", datasets_dir=tmp_path / "ds").folder == one
    with pytest.raises(DataNotFoundError) as error:
        locate_device(None, "device_2", datasets_dir=tmp_path / "ds")
    assert f"$IRENE_DATA_DIR={one} skipped: it is the folder of device_1" in str(error.value)
    # a device_2 folder where the project keeps downloads is used instead
    two = _device(tmp_path / "ds" / "device_2", device_dir, cell=("8.0", "64.0"))
    located = locate_device(None, "device_2", datasets_dir=tmp_path / "ds")
    assert (located.folder, located.source) == (two, "datasets")


def test_a_folder_under_another_name_counts_by_its_content(device_dir, tmp_path, monkeypatch,
                                                           offline):
    published_copy = _device(tmp_path / "my-copy", device_dir, cell=None)
    monkeypatch.setenv("IRENE_DATA_DIR", str(published_copy))
    assert locate_device(None, "device_1", datasets_dir=tmp_path / "ds").folder == published_copy
    with pytest.raises(DataNotFoundError, match="skipped: it holds the published device_1 files"):
        locate_device(None, "device_2", datasets_dir=tmp_path / "ds")
    edited = _device(tmp_path / "edited", device_dir)
    monkeypatch.setenv("IRENE_DATA_DIR", str(edited))
    with pytest.raises(DataNotFoundError, match="skipped: it is not named device_1 and has no "
                                                "device_1/ folder"):
        locate_device(None, "device_1", datasets_dir=tmp_path / "ds")


def test_data_path_wins_and_never_falls_back(device_dir, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("IRENE_DATA_DIR", str(device_dir))
    mine = _device(tmp_path / "mine", device_dir)
    located = locate_device(mine, "device_1", datasets_dir=tmp_path / "ds")
    assert (located.folder, located.source) == (mine, "data.path")
    (mine / csv_name("ml1")).unlink()
    with pytest.raises(DataNotFoundError) as error:
        locate_device(mine, "device_1", datasets_dir=tmp_path / "ds")
    assert str(error.value).startswith(f"data.path={mine}: ml1_level_features.csv is missing")


def test_an_interrupted_download_is_completed(device_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("IRENE_DATA_DIR", raising=False)
    target = tmp_path / "ds" / "device_1"
    target.mkdir(parents=True)
    (target / csv_name("model")).write_bytes((device_dir / csv_name("model")).read_bytes())
    monkeypatch.setattr(locate.urllib.request, "urlopen", lambda url, timeout: open(
        device_dir / url.rsplit("/", 1)[1], "rb"))
    located = locate_device(None, "device_1", datasets_dir=tmp_path / "ds")
    assert (located.folder, located.source) == (target, "download")
    assert located.sha256 == published.load_sources()["devices"]["device_1"]


def test_integer_columns_import_to_the_same_trees(device_dir, device_trees, tmp_path):
    """Another device writes whole numbers as integers (``8``, not ``8.0``): device 1 with
    every whole-number column converted gives the very same trees."""
    folder = tmp_path / "device_int"
    folder.mkdir()
    converted = set()
    for level in CSV_FILES:
        frame = pd.read_csv(device_dir / csv_name(level))
        for column in frame.columns:
            values = frame[column]
            if values.dtype.kind == "f" and values.notna().all() and (values % 1 == 0).all():
                frame[column] = values.astype("int64")
                converted.add(column)
        frame.to_csv(folder / csv_name(level), index=False)
    assert {"batch_size", "seq_len", "gpu_mem_clk"} <= converted
    assert (folder / csv_name("model")).read_text().splitlines()[1].startswith("8,32,")
    trees = import_device(folder)
    # the same trees; only the device differs: these bytes are no published device's files
    assert {t["device"]["id"] for t in trees} == {"unknown"}
    assert [{**t, "device": None} for t in trees] == [{**t, "device": None} for t in device_trees]


def test_runs_record_where_the_data_came_from(device_dir, tmp_path, mlflow_uri, small_trees):
    from pipelines.stage import run_stage

    device = _device(tmp_path / "device_1", device_dir)
    common = [f"tracking.uri={mlflow_uri}", "tracking.experiment=pytest-trust",
              "show_progress=false"]
    run_stage("featurize", _compose("stage=featurize", f"data.path={device}", *common,
                           f"run_dir={tmp_path / 'a'}"))
    trees = write_trees(tmp_path / "two.jsonl", small_trees)
    result = run_stage("featurize", _compose("stage=featurize", f"data.trees={trees}",
                                    "data.models=[gpt2,bert-base-uncased]", *common,
                                    f"run_dir={tmp_path / 'b'}"))
    assert result.num_trees == 4  # two shapes of each of the two models asked for
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["pytest-trust"], output_format="list",
                              order_by=["attributes.start_time ASC"])
    csv_tags, trees_tags = runs[0].data.tags, runs[1].data.tags
    assert csv_tags["data.location"] == str(device) and csv_tags["data.source"] == "data.path"
    for level in CSV_FILES:
        assert csv_tags[f"data.sha256.{csv_name(level)}"] == sha256_of(device / csv_name(level))
    assert trees_tags["data.source"] == "data.trees"
    assert trees_tags["data.sha256.two.jsonl"] == sha256_of(trees)
    assert int(csv_tags[PID_TAG]) == os.getpid() and csv_tags[HOST_TAG] == host_id()


# ----------------------------------------------------------------------- the store, faults
RUNNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from omegaconf import OmegaConf
    from pipelines.tracking import Terminated, tracked_run

    uri, ready, wait_for = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    cfg = OmegaConf.create({"tracking": {"enabled": True, "uri": uri, "experiment": "faults",
                                         "artifact_root": None,
                                         "background": sys.argv[5] != "in-process"}})
    while time.time() < wait_for:  # start together
        time.sleep(0.001)
    try:
        with tracked_run(cfg, "probe") as tracker:
            print("tracker", type(tracker).__name__, flush=True)
            ready.write_text(tracker.run_id)
            time.sleep(float(sys.argv[4]))
    except Terminated:
        sys.exit(143)
""")


def _start(tmp_path: Path, uri: str, name: str, sleep_s: float, start_at: float = 0.0,
           background: bool = False):
    """A process that runs a stage's run for ``sleep_s``; with ``background`` its tracking
    is done by a tracking worker (as for a stage started from the command line)."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    ready = tmp_path / f"{name}.ready"
    process = subprocess.Popen([sys.executable, str(script), uri, str(ready), str(start_at),
                                str(sleep_s), "background" if background else "in-process"],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, ready


def _wait_for(path: Path, process, timeout_s: float = 240.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.1)
    return path.read_text()


def _status(uri: str, run_id: str):
    return mlflow.MlflowClient(uri).get_run(run_id)


@pytest.mark.slow
def test_processes_that_start_together_on_a_fresh_store_all_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    start_at = time.time() + 25.0  # after every interpreter has imported mlflow
    started = [_start(tmp_path, uri, f"p{i}", 0.0, start_at, background=i % 2 == 0)
               for i in range(4)]
    outputs = [process.communicate(timeout=300)[0] for process, _ in started]
    assert [process.returncode for process, _ in started] == [0] * 4, outputs
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("faults").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4


@pytest.mark.slow
def test_terminated_and_killed_runs_end_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # the schema, once
    term, term_ready = _start(tmp_path, uri, "term", 600, background=True)
    kill, kill_ready = _start(tmp_path, uri, "kill", 600)  # its own process logs: both die
    term_id, kill_id = _wait_for(term_ready, term), _wait_for(kill_ready, kill)
    term.send_signal(signal.SIGTERM)
    kill.send_signal(signal.SIGKILL)
    assert term.wait(timeout=60) == 143 and kill.wait(timeout=60) == -signal.SIGKILL
    assert _status(uri, term_id).info.status == "KILLED"
    assert _status(uri, kill_id).info.status == "RUNNING"  # nobody could say otherwise
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name("faults").experiment_id
    assert close_stale_runs(experiment) == [kill_id]  # what the next run on the store does
    closed = _status(uri, kill_id)
    assert closed.info.status == "KILLED" and "stale-run check" in closed.data.tags[
        "irene.closed_by"]
    assert _status(uri, term_id).info.status == "KILLED"


@pytest.mark.slow
def test_a_killed_stage_has_its_run_ended_by_the_tracking_worker(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    kill, kill_ready = _start(tmp_path, uri, "kill", 600, background=True)
    kill_id = _wait_for(kill_ready, kill)
    kill.send_signal(signal.SIGKILL)  # no word from the stage: its worker sees its stdin end
    assert kill.wait(timeout=60) == -signal.SIGKILL
    deadline = time.monotonic() + 60
    while _status(uri, kill_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    closed = _status(uri, kill_id)
    assert closed.info.status == "KILLED"
    assert "the stage's process ended" in closed.data.tags["irene.closed_by"]


def test_only_runs_of_dead_processes_of_this_host_are_closed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    experiment = client.create_experiment("stale", artifact_location=(tmp_path / "a").as_uri())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = os.getpid()
    import psutil

    mine = f"{psutil.Process(me).create_time():.2f}"

    def running(pid, host=None, started="-1"):
        tags = {PID_TAG: str(pid), HOST_TAG: host or host_id(), PID_START_TAG: started}
        return client.create_run(experiment, tags=tags).info.run_id

    dead = running(gone.pid)
    alive = running(me, started=mine)
    reused = running(me, started="12.00")  # this pid, but another process's start time
    elsewhere = running(gone.pid, host="another-machine/pidns:1")
    foreign = client.create_run(experiment).info.run_id  # not a run of this pipeline
    assert sorted(close_stale_runs(experiment)) == sorted([dead, reused])
    status = {r: client.get_run(r).info.status for r in (dead, alive, reused, elsewhere, foreign)}
    assert status == {dead: "KILLED", alive: "RUNNING", reused: "KILLED",
                      elsewhere: "RUNNING", foreign: "RUNNING"}


WATCHED_JOB = textwrap.dedent("""
    import os, sys, time
    from pipelines.sweep import watch_sweep_process
    assert watch_sweep_process(poll_s=0.2, grace_s=5.0)
    print("watching", flush=True)
    time.sleep(600)  # an idle worker
""")

SWEEP = textwrap.dedent("""
    import os, subprocess, sys, time
    os.environ["IRENE_SWEEP_PID"] = str(os.getpid())
    job = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline().strip() == "watching"
    print(job.pid, flush=True)
    time.sleep(600)
""")


def test_a_job_process_does_not_outlive_its_sweep(tmp_path):
    """Killed with SIGKILL, a sweep cannot stop its workers; they notice and stop."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sweep = subprocess.Popen([sys.executable, "-c", SWEEP, WATCHED_JOB], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, text=True)
    job = psutil.Process(int(sweep.stdout.readline()))
    sweep.kill()
    sweep.wait(timeout=30)
    deadline = time.monotonic() + 60  # the poll interval + grace, with room for a busy machine
    while time.monotonic() < deadline:
        try:
            if job.status() == psutil.STATUS_ZOMBIE:
                break  # exited; waiting for whoever adopted it to reap it
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        job.kill()
        pytest.fail("the job process outlived its sweep")


def test_a_job_of_another_machine_or_the_sweep_itself_does_not_watch(monkeypatch):
    from pipelines import sweep

    monkeypatch.setattr(sweep, "_WATCHING", [])
    monkeypatch.setenv(sweep.SWEEP_PID_ENV, str(os.getpid()))
    assert not sweep.watch_sweep_process()  # the sweep's own process (basic launcher)
    monkeypatch.setenv(sweep.SWEEP_PID_ENV, "999999999")
    assert not sweep.watch_sweep_process()  # not our parent (e.g. a SLURM job)
    monkeypatch.delenv(sweep.SWEEP_PID_ENV)
    assert not sweep.watch_sweep_process()


# ------------------------------------------------------------------ the command line
def _cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("IRENE_PARENT_RUN_ID",
                                                              "HYDRA_FULL_ERROR")}
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**clean, **(env or {})})


@pytest.mark.slow
def test_cli_user_error_is_one_line_and_exit_2_unless_hydra_full_error(tmp_path, small_trees):
    trees = write_trees(tmp_path / "small.jsonl", small_trees)
    args = ("stage=crossvalidate", f"data.trees={trees}", "predictor.lr=0", "tracking=off",
            f"hydra.run.dir={tmp_path / 'cli'}")
    out = _cli(tmp_path, *args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: predictor.lr=0.0: must be in (0, 1]"]
    full = _cli(tmp_path, *args, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr
    assert "irene.errors.SettingsError: predictor.lr=0.0: must be in (0, 1]" in full.stderr


@pytest.mark.slow
def test_sweep_job_user_error_is_one_line_in_its_log_and_the_sweep_exits_2(tmp_path,
                                                                          small_trees):
    trees = write_trees(tmp_path / "small.jsonl", small_trees)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "multirun"
    out = _cli(tmp_path, "-m", "stage=crossvalidate", f"data.trees={trees}",
               "predictor.lr=0.001,0", "predictor.epochs=1", f"tracking.uri={uri}",
               "tracking.experiment=sweep-errors", f"hydra.sweep.dir={sweep_dir}",
               "save_predictions=false", "show_progress=false")
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: job 1: predictor.lr=0.0: must be in (0, 1]"]
    assert "Traceback" not in out.stderr
    assert (sweep_dir / "1" / "error.txt").read_text() == (
        "error: predictor.lr=0.0: must be in (0, 1]\n")
    assert (sweep_dir / "1" / "run.log").read_text().splitlines()[-1] == (
        "error: predictor.lr=0.0: must be in (0, 1]")
    assert not (sweep_dir / "0" / "error.txt").exists()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["sweep-errors"], output_format="list")
    status = sorted((r.data.tags["stage"], r.info.status) for r in runs
                    if r.data.tags["stage"] != "crossvalidate-fold")
    assert status == [("crossvalidate", "FAILED"), ("crossvalidate", "FINISHED"),
                      ("sweep", "FAILED")]
