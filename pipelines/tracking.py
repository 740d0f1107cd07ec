"""MLflow tracking of the stages: the store, and one run per stage behind one interface.

A stage logs through the :class:`Tracker` it receives from :func:`tracked_run` (its open
run): ``log_params``, ``log_metrics``, ``set_tags``, ``log_artifact``, ``child_run`` for a
nested run (e.g. one per cross-validation fold) and ``run_id``. Three classes implement it:

* :class:`InProcessTracker`: MLflow's public API in the stage's own process;
* :class:`BackgroundTracker`: the same calls, sent in order to a tracking worker process
  (:mod:`pipelines.tracking_worker`) that performs them with an :class:`InProcessTracker`;
* :class:`NullTracker`: ``tracking.enabled=false``; every call does nothing, so stages never
  test whether tracking is on.

Where the logging happens: importing MLflow and its sqlite store takes about 4 s, longer than
a cross-validation computes. So a single run whose process has not imported MLflow yet hands
its tracking to a tracking worker that imports MLflow while the stage computes; the stage
waits for it at its end and fails with one line if any call failed
(``tracking.background=false``: log from the stage's own process). Sweeps' jobs, and
processes that already use MLflow, log from their own process.

Faults are part of the contract:

* any number of processes may open a fresh store at once: the first to create a sqlite
  store's schema holds a file lock (``<store>.lock``) while the others wait;
* a run whose process is terminated (SIGTERM, SIGINT) ends KILLED, one that raises ends
  FAILED; if the stage's process dies without a word, its worker ends its runs KILLED, and
  otherwise the next run on the store does (:mod:`pipelines.stale_runs`).

Which runs are the same computation (``resume=true``) is :mod:`pipelines.run_identity`'s job.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from omegaconf import DictConfig, OmegaConf

from irene.errors import UserError, one_line
from pipelines.paths import log, outputs_dir
from pipelines.run_identity import identity_tags
from pipelines.stale_runs import close_stale_runs, process_tags


# --------------------------------------------------------------------------- the interface
@runtime_checkable
class Tracker(Protocol):
    """What a stage logs through: its open run (the child's while a :meth:`child_run` is open).

    Params are flattened to strings (lists and dicts as JSON), metrics to floats, tags to
    strings. A folder given to :meth:`log_artifact` logs its files under ``artifact_path``
    (default: the folder's name).
    """

    @property
    def run_id(self) -> str | None:
        """The stage's run (None when tracking is off); with a tracking worker, asking while
        the run is open waits for MLflow."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], *, prefix: str = "",
                    step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def child_run(self, stage: str, name: str, params: Mapping[str, Any] | None = None
                  ) -> contextlib.AbstractContextManager[Tracker]:
        """A nested run inside the open one (tags of the parent, ``stage`` its own); it ends
        FINISHED, FAILED or KILLED as its block does."""


class NullTracker:
    """``tracking.enabled=false``: a :class:`Tracker` that records nothing."""

    run_id = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], *, prefix: str = "",
                    step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def child_run(self, stage: str, name: str, params: Mapping[str, Any] | None = None
                  ) -> contextlib.AbstractContextManager[Tracker]:
        return contextlib.nullcontext(self)


class TrackingError(UserError):
    """An MLflow call of the tracking worker failed (e.g. an unreachable store)."""


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


# --------------------------------------------------------------------------- the store
def tracking_uri(cfg: DictConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite under ``outputs/``."""
    uri = cfg.tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    outputs_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{outputs_dir() / 'mlflow.db'}"


def artifact_root(cfg: DictConfig) -> str:
    """Where the experiment's artifacts go: ``tracking.artifact_root``, else ``<outputs>/mlartifacts``."""
    return str(cfg.tracking.get("artifact_root") or (outputs_dir() / "mlartifacts").as_uri())


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


def run_name(cfg: DictConfig, stage: str) -> str:
    """A run's default name, ``<stage> <data set>`` (a stage names its own runs:
    ``STAGE.run_name``, e.g. ``cv irene both/end2end/close_to_one device_1``)."""
    data = OmegaConf.select(cfg, "data.name", default=None)
    return f"{stage} {data}" if data else stage


# --------------------------------------------------------------------------- the trackers
def _flat_params(params: Mapping[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in params.items()}


class _Runs:
    """What both MLflow trackers share: a stack of open runs, each started with the stage's
    tags and ended by how its block ends. Subclasses make the calls (``_start``, ``_end``,
    ``_log_*``) in this process or in a worker."""

    def __init__(self) -> None:
        self.depth = 0
        self.num_started = 0
        self._first: int | None = None  # index of the stage's run among those started
        self._tags: dict[str, str] = {}  # of the stage's run: its children inherit them

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str], params: Mapping[str, Any],
            config_yaml: str | None = None) -> Iterator[Tracker]:
        """A run inside the open one, if any (else the stage's run)."""
        nested = self.depth > 0
        index = self.num_started
        if not nested:  # the stage's run; its children get its tags, not a sweep's parent
            self._first = index
            self._tags = {k: v for k, v in tags.items() if k != "mlflow.parentRunId"}
        with terminate_unwinds():
            self._start(name, dict(tags), nested, _flat_params(params), config_yaml)
            self.num_started += 1
            self.depth += 1
            status = "FINISHED"
            try:
                yield self
            except (Terminated, KeyboardInterrupt):
                status = "KILLED"
                raise
            except BaseException:
                status = "FAILED"
                raise
            finally:
                self.depth -= 1
                self._end(status)

    def child_run(self, stage: str, name: str, params: Mapping[str, Any] | None = None
                  ) -> contextlib.AbstractContextManager[Tracker]:
        return self.run(name, {**self._tags, "stage": stage}, params or {})

    @property
    def run_id(self) -> str | None:
        return None if self._first is None else self.started(self._first)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._log_params(_flat_params(params))

    def log_metrics(self, metrics: Mapping[str, float], *, prefix: str = "",
                    step: int | None = None) -> None:
        self._log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._log_artifact(str(Path(path).absolute()), artifact_path)


class InProcessTracker(_Runs):
    """MLflow's fluent API in this process: the runs of one stage, nested in order. The
    tracking worker drives one of these with the calls it receives."""

    def __init__(self, uri: str, experiment: str, root: str):
        super().__init__()
        self.experiment_id = open_experiment(uri, experiment, root)
        self.run_ids: list[str] = []  # of every run started, in order

    def _start(self, name: str, tags: dict[str, str], nested: bool, params: dict[str, str],
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

    def _end(self, status: str) -> None:
        import mlflow

        mlflow.end_run(status)

    def _log_params(self, params: dict[str, str]) -> None:
        import mlflow

        mlflow.log_params(params)

    def _log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def _set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def _log_artifact(self, path: str, artifact_path: str | None) -> None:
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


class BackgroundTracker(_Runs):
    """The calls of :class:`InProcessTracker`, sent in order to a tracking worker process
    (:mod:`pipelines.tracking_worker`); only :attr:`run_id` and :meth:`close` wait."""

    def __init__(self, uri: str, experiment: str, root: str):
        from pipelines.tracking_worker import spawn, take_prestarted

        super().__init__()
        self.uri = uri
        self.process = take_prestarted() or spawn()
        self.run_ids: list[str] | None = None  # known once the worker is closed
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

    def _start(self, name: str, tags: dict[str, str], nested: bool, params: dict[str, str],
               config_yaml: str | None) -> None:
        self._send("start", name=name, tags=tags, nested=nested, params=params,
                   config_yaml=config_yaml)

    def _end(self, status: str) -> None:
        self._send("end", status=status)

    def _log_params(self, params: dict[str, str]) -> None:
        self._send("log_params", params=params)

    def _log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        self._send("log_metrics", metrics=metrics, step=step)

    def _set_tags(self, tags: dict[str, str]) -> None:
        self._send("set_tags", tags=tags)

    def _log_artifact(self, path: str, artifact_path: str | None) -> None:
        self._send("log_artifact", path=path, artifact_path=artifact_path)

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


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().mode) == "RunMode.MULTIRUN"
    except (ValueError, ImportError):
        return False


def _new_tracker(cfg: DictConfig, background: bool) -> _Runs:
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


@contextlib.contextmanager
def tracked_run(cfg: DictConfig, stage: str, params: Mapping[str, Any] | None = None, *,
                name: str | None = None, tags: Mapping[str, str] | None = None,
                background: bool = True) -> Iterator[Tracker]:
    """The stage's run: yields the :class:`Tracker` the stage logs through (a
    :class:`NullTracker` when tracking is off).

    The resolved config is logged as ``config.yaml``. An exception inside ends the run as
    FAILED and propagates; SIGTERM or Ctrl-C inside ends it KILLED; the store stays usable.
    ``background=False``: the stage itself uses MLflow inside the run (e.g. logs a model),
    so the run is this process's.
    """
    if not cfg.tracking.enabled:
        yield NullTracker()
        return
    tracker = _new_tracker(cfg, background)
    all_tags = {**identity_tags(cfg, stage), **process_tags(), **_sweep_tags(), **(tags or {})}
    if cfg.get("sweep_name"):
        all_tags["preset"] = str(cfg.sweep_name)
    parent = os.environ.get("IRENE_PARENT_RUN_ID")
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    failed: BaseException | None = None
    try:
        with tracker.run(name or run_name(cfg, stage), all_tags, params or {},
                         OmegaConf.to_yaml(cfg, resolve=True)):
            yield tracker
    except BaseException as error:
        failed = error
        raise
    finally:
        try:
            tracker.close()
        except TrackingError as error:
            if failed is None:
                raise
            log.error("%s", one_line(error))  # the stage's own error goes first


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
