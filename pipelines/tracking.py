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

Where the logging happens: importing MLflow and its sqlite store takes about 4 s, longer than
a cross-validation computes. So a single run whose process has not imported MLflow yet hands
its tracking to a second process (:mod:`pipelines.tracking_worker`) that imports MLflow while
the stage computes, and performs every call in order; the stage waits for it at its end and
fails with one line if any call failed (``tracking.background=false``: log from the stage's own
process). Sweeps' jobs, and processes that already use MLflow, log from their own process.
If the stage's process dies without a word, the worker ends its runs KILLED.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from irene.errors import UserError, one_line
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
    return open_experiment(tracking_uri(cfg), cfg.tracking.experiment, artifact_root(cfg))


def artifact_root(cfg: DictConfig) -> str:
    """Where the experiment's artifacts go: ``tracking.artifact_root``, else ``<outputs>/mlartifacts``."""
    return str(cfg.tracking.get("artifact_root") or (outputs_dir() / "mlartifacts").as_uri())


def open_experiment(uri: str, name: str, root: str) -> str:
    """:func:`ensure_experiment` from plain values (what the tracking worker gets)."""
    open_store(uri)
    experiment_id = _experiment_id(name, root)
    close_stale_runs(experiment_id)
    return experiment_id


def _experiment_id(name: str, root: str) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=f"{root.rstrip('/')}/{name}",
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

    def close(run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, status="KILLED")

    return _close_stale([(run.info.run_id, {**run.data.tags, "mlflow.runName": run.info.run_name})
                         for run in running], close)


def _close_stale(running: list[tuple[str, dict[str, str]]], close) -> list[str]:
    """:func:`close_stale_runs` over (run id, tags) pairs; ``close(run_id, tags)`` tags a
    stale run and ends it KILLED."""
    host, closed, elsewhere = host_id(), [], 0
    for run_id, tags in running:
        if PID_TAG not in tags:
            continue  # not a run of this pipeline
        if tags.get(HOST_TAG) != host:
            elsewhere += 1
            continue
        pid, started = int(tags[PID_TAG]), float(tags.get(PID_START_TAG, "-1"))
        if _alive(pid, started):
            continue
        close(run_id, {"irene.closed_by": f"stale-run check of process {os.getpid()} on {host}"})
        closed.append(run_id)
        log.warning("run %s (%s) was left RUNNING by process %d, which is gone: marked KILLED",
                    run_id, tags.get("stage", tags.get("mlflow.runName")), pid)
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


class TrackingError(UserError):
    """An MLflow call of the tracking worker failed (e.g. an unreachable store)."""


class InProcessTracker:
    """MLflow's fluent API in this process: the runs of one stage, nested in order. The
    tracking worker drives one of these with the calls it receives."""

    def __init__(self, uri: str, experiment: str, root: str):
        self.experiment_id = open_experiment(uri, experiment, root)
        self.depth = 0
        self.run_ids: list[str] = []  # of every run started, in order

    @property
    def num_started(self) -> int:
        return len(self.run_ids)

    def start(self, name: str, tags: dict[str, str], nested: bool, params: dict[str, str],
              config_yaml: str | None) -> None:
        import mlflow

        run = mlflow.start_run(experiment_id=self.experiment_id, run_name=name, nested=nested,
                               tags=tags)
        self.run_ids.append(run.info.run_id)
        try:
            if params:
                mlflow.log_params(params)
            if config_yaml is not None:
                mlflow.log_text(config_yaml, "config.yaml")
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        self.depth += 1

    def end(self, status: str) -> None:
        import mlflow

        self.depth -= 1
        mlflow.end_run(status)

    def log_params(self, params: dict[str, str]) -> None:
        import mlflow

        mlflow.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def log_artifact(self, path: str, artifact_path: str | None) -> None:
        import mlflow

        if Path(path).is_dir():
            mlflow.log_artifacts(path, artifact_path or Path(path).name)
        else:
            mlflow.log_artifact(path, artifact_path)

    def started(self, index: int) -> str:
        """The id of the ``index``-th run started."""
        return self.run_ids[index]

    def close(self) -> None:
        pass


class BackgroundTracker:
    """The same calls as :class:`InProcessTracker`, sent in order to a tracking worker
    process (:mod:`pipelines.tracking_worker`); only :meth:`run_id` and :meth:`close` wait."""

    def __init__(self, uri: str, experiment: str, root: str):
        from pipelines.tracking_worker import spawn, take_prestarted

        self.uri = uri
        self.process = take_prestarted() or spawn()
        self.depth = 0
        self.run_ids: list[str] | None = None  # known once the worker is closed
        self.num_started = 0
        self._send("open", uri=uri, experiment=experiment, root=root, argv=sys.argv)

    def _send(self, op: str, **fields: Any) -> None:
        try:
            self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise TrackingError(f"the MLflow tracking worker (pid {self.process.pid}) is gone "
                                f"(exit code {self.process.poll()}); see its messages above") from None

    def _ask(self, op: str) -> dict[str, Any]:
        self._send(op)
        line = self.process.stdout.readline()
        if not line:
            raise TrackingError(f"the MLflow tracking worker (pid {self.process.pid}) ended "
                                f"without an answer (exit code {self.process.wait()}); see its "
                                "messages above")
        return json.loads(line)

    def start(self, name: str, tags: dict[str, str], nested: bool, params: dict[str, str],
              config_yaml: str | None) -> None:
        self.depth += 1
        self.num_started += 1
        self._send("start", name=name, tags=tags, nested=nested, params=params,
                   config_yaml=config_yaml)

    def end(self, status: str) -> None:
        self.depth -= 1
        self._send("end", status=status)

    def log_params(self, params: dict[str, str]) -> None:
        self._send("log_params", params=params)

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        self._send("log_metrics", metrics=metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send("set_tags", tags=tags)

    def log_artifact(self, path: str, artifact_path: str | None) -> None:
        self._send("log_artifact", path=str(Path(path).absolute()), artifact_path=artifact_path)

    def started(self, index: int) -> str:
        """The id of the ``index``-th run started (asks the worker while it runs)."""
        if self.run_ids is None:
            return self._ask("run_ids")["run_ids"][index]
        return self.run_ids[index]

    def close(self) -> None:
        """Wait until every call is done; a failed one raises :class:`TrackingError`."""
        reply = self._ask("close")
        self.process.stdin.close()
        self.process.wait()
        self.run_ids = reply["run_ids"]
        if reply["errors"]:
            raise TrackingError(f"MLflow tracking to {self.uri} failed: {reply['errors'][0]}")


Tracker = InProcessTracker | BackgroundTracker
_TRACKER: Tracker | None = None  # the stage's, while it runs


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().mode) == "RunMode.MULTIRUN"
    except (ValueError, ImportError):
        return False


def _new_tracker(cfg: DictConfig, background: bool) -> Tracker:
    """A worker process when it saves time (see the module docstring), else this process."""
    from pipelines.tracking_worker import dismiss_prestarted

    target = (tracking_uri(cfg), cfg.tracking.experiment, artifact_root(cfg))
    if (background and cfg.tracking.get("background", True) and not _multirun()
            and "mlflow" not in sys.modules):
        log.debug("tracking: MLflow writes from a tracking worker")
        return BackgroundTracker(*target)
    dismiss_prestarted()
    log.debug("tracking: MLflow writes from this process")
    return InProcessTracker(*target)


class RunHandle:
    """What a stage gets from :func:`tracked_run`: ``run.info.run_id``, during the run or
    after it (with a tracking worker, asking for it while the run is open waits for MLflow)."""

    def __init__(self, tracker: Tracker, index: int):
        self._tracker = tracker
        self._index = index  # the how-manieth run this tracker started

    @property
    def info(self) -> RunHandle:
        return self

    @property
    def run_id(self) -> str:
        return self._tracker.started(self._index)


@contextlib.contextmanager
def tracked_run(cfg: DictConfig, stage: str, params: dict[str, Any] | None = None, *,
                name: str | None = None, nested: bool = False,
                tags: dict[str, str] | None = None, background: bool = True
                ) -> Iterator[RunHandle | None]:
    """An MLflow run around a stage (or ``None`` when tracking is off).

    The resolved config is logged as ``config.yaml``. An exception inside ends the run as
    FAILED and propagates; SIGTERM or Ctrl-C inside ends it KILLED; the store stays usable.
    ``background=False``: the stage itself uses MLflow inside the run (e.g. logs a model),
    so the run is this process's.
    """
    global _TRACKER
    if not cfg.tracking.enabled:
        yield None
        return
    owner = _TRACKER is None
    if owner:
        _TRACKER = _new_tracker(cfg, background)
    tracker = _TRACKER
    all_tags = {"stage": stage, "config_hash": config_hash(cfg), CODE_TAG: code_identity(),
                **process_tags(), **_sweep_tags(), **(tags or {})}
    if cfg.get("sweep_name"):
        all_tags["preset"] = str(cfg.sweep_name)
    parent = os.environ.get("IRENE_PARENT_RUN_ID")
    if parent and not nested and tracker.depth == 0:
        all_tags["mlflow.parentRunId"] = parent
    failed: BaseException | None = None
    try:
        with terminate_unwinds():
            index = tracker.num_started
            tracker.start(name or run_name(cfg, stage), all_tags, nested,
                          _flat_params(params or {}),
                          None if nested else OmegaConf.to_yaml(cfg, resolve=True))
            status = "FINISHED"
            try:
                yield RunHandle(tracker, index)
            except (Terminated, KeyboardInterrupt):
                status = "KILLED"
                raise
            except BaseException:
                status = "FAILED"
                raise
            finally:
                tracker.end(status)
    except BaseException as error:
        failed = error
        raise
    finally:
        if owner:
            _TRACKER = None
            try:
                tracker.close()
            except TrackingError as error:
                if failed is None:
                    raise
                log.error("%s", one_line(error))  # the stage's own error goes first


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


CODE_TAG = "irene.code"


@functools.cache
def code_identity() -> str:
    """Which code computes: the version, and in a git checkout the commit, plus a digest of
    the uncommitted changes to the code and configs (``+dirty.<sha>``). Resume reuses only
    runs of the same code: a changed predictor must not be answered by an old result."""
    from irene import __version__

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True,
                                  timeout=30).stdout.decode("utf-8", "replace")
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return __version__  # an installed package
    identity = f"{__version__}+{commit.strip()[:12]}"
    diff = git("diff", "HEAD", "--", "irene", "pipelines", "conf", "run.py")
    if diff:
        identity += f"+dirty.{hashlib.sha256(diff.encode()).hexdigest()[:12]}"
    return identity


def finished_run(cfg: DictConfig, stage: str):
    """The latest FINISHED run of ``stage`` with this exact config and code
    (:func:`code_identity`), when ``resume`` is on."""
    if not (cfg.get("resume") and cfg.tracking.enabled):
        return None
    import mlflow

    experiment_id = ensure_experiment(cfg)
    found = mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", max_results=1,
        filter_string=(f"tags.stage = '{stage}' and tags.config_hash = '{config_hash(cfg)}' "
                       f"and tags.`{CODE_TAG}` = '{code_identity()}' "
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
    """Log metrics to the stage's run, if any (tracking may be off)."""
    if _TRACKER is not None:
        _TRACKER.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step)


def log_params(params: dict[str, Any]) -> None:
    """Log params to the stage's run, if any."""
    if _TRACKER is not None:
        _TRACKER.log_params(_flat_params(params))


def set_tag(key: str, value: str) -> None:
    """Tag the stage's run, if any."""
    set_tags({key: value})


def set_tags(tags: dict[str, str]) -> None:
    """Tag the stage's run, if any."""
    if _TRACKER is not None:
        _TRACKER.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file, or a folder's files, to the stage's run, if any."""
    if _TRACKER is not None:
        _TRACKER.log_artifact(str(path), artifact_path)
