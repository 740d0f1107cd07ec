"""MLflow tracking of the stages: the store, one run per stage, params, resume.

Every stage runs inside :func:`tracked_run`; with ``tracking=off`` the helpers do nothing, so
stages never test whether tracking is on.

Faults are part of the contract:

* any number of processes may open a fresh store at once: the first to create a sqlite
  store's schema holds a file lock (``<store>.lock``) while the others wait;
* a run whose process is terminated (SIGTERM, SIGINT) ends KILLED, one that raises ends
  FAILED;
* every run is tagged with its process (``irene.host``, ``irene.pid``, ``irene.pid_start``), so
  a run left RUNNING by a process that died without a word (SIGKILL, power loss) is closed as
  KILLED by the next run on that store started on the same host (see :func:`close_stale_runs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipelines.paths import log, outputs_dir

HOST_TAG, PID_TAG, PID_START_TAG = "irene.host", "irene.pid", "irene.pid_start"


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error of the code
    """The process was asked to stop (SIGTERM): unwinds like ``KeyboardInterrupt``."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by {signal.Signals(signum).name}")


@contextlib.contextmanager
def terminate_unwinds() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread while inside (so ``finally``
    blocks and context managers run); a handler someone else installed is left alone."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def host_id() -> str:
    """This machine and pid namespace: pids compare only within one (containers may share a
    host name)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}/pidns:{namespace}"


def process_tags() -> dict[str, str]:
    """Tags naming this process, for :func:`close_stale_runs`."""
    return {HOST_TAG: host_id(), PID_TAG: str(os.getpid()),
            PID_START_TAG: f"{_process_start(os.getpid()):.2f}"}


def _process_start(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return -1.0


def tracking_uri(cfg: DictConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite under ``outputs/``."""
    uri = cfg.tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    outputs_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{outputs_dir() / 'mlflow.db'}"


_OPENED: set[str] = set()  # store URIs this process has opened (schema checked)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on a sqlite store's ``<file>.lock`` (nothing for other stores)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_store(uri: str, *, attempts: int = 5) -> None:
    """Point MLflow at ``uri`` and make sure its schema exists, safely when many processes
    open a fresh store at once (sqlite: one creates it under a file lock; any store: a
    failed first access is retried)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if uri in _OPENED:
        return
    for attempt in range(attempts):
        try:
            with _store_lock(uri):
                mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates the schema
            break
        except Exception:  # e.g. a server-backed store migrated by another process just now
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    _OPENED.add(uri)


def ensure_experiment(cfg: DictConfig) -> str:
    """Point MLflow at the store and return the experiment id (created once); runs left
    RUNNING there by dead processes of this host are closed first."""
    open_store(tracking_uri(cfg))
    experiment_id = _experiment_id(cfg)
    close_stale_runs(experiment_id)
    return experiment_id


def _experiment_id(cfg: DictConfig) -> str:
    import mlflow

    name = cfg.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = cfg.tracking.get("artifact_root") or (outputs_dir() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=f"{str(root).rstrip('/')}/{name}",
                                        tags=EXPERIMENT_TAGS)
    except Exception:  # another job created it first
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# The UI opens the experiment on its runs (a model-development experiment, not a GenAI one)
# and shows what it holds.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "IrEne pipeline runs: one run per stage (`cv ...` = leave-one-model-out cross-validation, "
        "with one child run per left-out model; `train`, `predict`, ...). A sweep (`sweep <preset>`) "
        "is a parent run whose children are its jobs; its `tables/` artifacts hold the preset's "
        "table. Group or compare runs by the params `features`, `strategy`, `weighting`, `predictor`."),
}
STAGE_SHORT = {"crossvalidate": "cv"}


def run_name(cfg: DictConfig, stage: str) -> str:
    """What a run is, readable in the run list: ``cv irene both/end2end/close_to_one device_1``."""
    from pipelines.config import predictor_class, run_params

    data = OmegaConf.select(cfg, "data.name", default=None)
    if stage not in ("crossvalidate", "train", "diagnose") or OmegaConf.select(
            cfg, "predictor._target_", default=None) is None:
        return f"{stage} {data}" if data else stage
    params = run_params(cfg)
    name = predictor_class(cfg).name
    axes = (f"{params['features']}/{params['strategy']}/{params['weighting']}" if name == "irene"
            else params["features"])
    return f"{STAGE_SHORT.get(stage, stage)} {name} {axes} {cfg.data.name}"


def close_stale_runs(experiment_id: str) -> list[str]:
    """Close the runs left RUNNING by processes of this host that no longer exist.

    A run is stale when its ``irene.host`` tag is this host and the process of its
    ``irene.pid`` tag is gone (or is another process that reuses the pid: its start time
    differs from ``irene.pid_start``). Such a run is set KILLED, tagged ``irene.closed_by``,
    and named in the log. Runs of other hosts cannot be checked from here; they are counted
    in the log. Returns the ids of the runs closed.
    """
    import mlflow

    client = mlflow.MlflowClient()
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'",
                                 max_results=1000)
    host, closed, elsewhere = host_id(), [], 0
    for run in running:
        tags = run.data.tags
        if PID_TAG not in tags:
            continue  # not a run of this pipeline
        if tags.get(HOST_TAG) != host:
            elsewhere += 1
            continue
        pid, started = int(tags[PID_TAG]), float(tags.get(PID_START_TAG, "-1"))
        if _alive(pid, started):
            continue
        client.set_tag(run.info.run_id, "irene.closed_by",
                       f"stale-run check of process {os.getpid()} on {host}")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
        log.warning("run %s (%s) was left RUNNING by process %d, which is gone: marked KILLED",
                    run.info.run_id, tags.get("stage", run.info.run_name), pid)
    if elsewhere:
        log.info("%d RUNNING run(s) of other hosts in this experiment (not checked from here)",
                 elsewhere)
    return closed


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        return (process.status() != psutil.STATUS_ZOMBIE
                and (started < 0 or abs(process.create_time() - started) < 1.0))
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _flat_params(params: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in params.items()}


@contextlib.contextmanager
def tracked_run(cfg: DictConfig, stage: str, params: dict[str, Any] | None = None, *,
                name: str | None = None, nested: bool = False,
                tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run around a stage (or ``None`` when tracking is off).

    The resolved config is logged as ``config.yaml``. An exception inside ends the run as
    FAILED (MLflow's context manager does so) and propagates; SIGTERM or Ctrl-C inside ends
    it KILLED; the store stays usable.
    """
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    experiment_id = ensure_experiment(cfg)
    all_tags = {"stage": stage, "config_hash": config_hash(cfg), **process_tags(),
                **_sweep_tags(), **(tags or {})}
    if cfg.get("sweep_name"):
        all_tags["preset"] = str(cfg.sweep_name)
    parent = os.environ.get("IRENE_PARENT_RUN_ID")
    if parent and not nested and mlflow.active_run() is None:
        all_tags["mlflow.parentRunId"] = parent
    with terminate_unwinds(), mlflow.start_run(experiment_id=experiment_id,
                                               run_name=name or run_name(cfg, stage),
                                               nested=nested,
                                               tags=all_tags) as run:
        try:
            if params:
                mlflow.log_params(_flat_params(params))
            if not nested:
                mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            yield run
        except (Terminated, KeyboardInterrupt):
            mlflow.end_run("KILLED")
            raise


# keys that do not change a stage's result (sweep_name is hashed: resume works within a preset)
_NOT_HASHED = ("tracking", "run_dir", "show_progress", "threads", "resume", "output",
               "report", "skip_not_applicable", "cv_jobs")


def config_hash(cfg: DictConfig) -> str:
    """A digest of everything that determines a stage's result (not where it is logged).
    An unset ``seeds`` is left out, so single-seed runs keep the hash they had before it."""
    container = OmegaConf.to_container(cfg, resolve=True)
    kept = {k: v for k, v in container.items()
            if k not in _NOT_HASHED and not (k == "seeds" and v is None)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_run(cfg: DictConfig, stage: str):
    """The latest FINISHED run of ``stage`` with this exact config, when ``resume`` is on."""
    if not (cfg.get("resume") and cfg.tracking.enabled):
        return None
    import mlflow

    experiment_id = ensure_experiment(cfg)
    found = mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", max_results=1,
        filter_string=(f"tags.stage = '{stage}' and tags.config_hash = '{config_hash(cfg)}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def _sweep_tags() -> dict[str, str]:
    """Tags that group the jobs of one Hydra multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ValueError, ImportError):
        return {}
    if str(hc.mode) != "RunMode.MULTIRUN":
        return {}
    return {"sweep_dir": str(hc.sweep.dir), "job_num": str(hc.job.num),
            "overrides": " ".join(hc.overrides.task)}


def log_metrics(metrics: dict[str, float], prefix: str = "", step: int | None = None) -> None:
    """Log metrics to the active run, if any (tracking may be off)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step=step)


def log_params(params: dict[str, Any]) -> None:
    """Log params to the active run, if any."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_params(_flat_params(params))


def set_tag(key: str, value: str) -> None:
    """Tag the active run, if any."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tag(key, value)


def set_tags(tags: dict[str, str]) -> None:
    """Tag the active run, if any."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path or path.name)
        else:
            mlflow.log_artifact(str(path), artifact_path)
