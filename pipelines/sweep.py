"""Hydra callback that groups a multirun under one MLflow parent run, and the sweep's faults.

``on_multirun_start`` runs once in the launching process, before any job: it creates the
tracking store and the experiment (so parallel jobs never race on schema creation) and a
parent run, whose id reaches every job through ``$IRENE_PARENT_RUN_ID`` (inherited by joblib
workers, submitit processes and SLURM jobs, which export the environment). Each job's run
then carries ``mlflow.parentRunId`` and the sweep's tags.

Faults:

* a job that meets a user error writes its one ``error: ...`` line into its log and its
  folder (``error.txt``) and returns; the other jobs go on, and the sweep ends with one line
  per failed job (``error: job <n>: ...``) and exit code 2 (see ``run.py``);
* the parent run always ends: FINISHED, FAILED (a job failed, or the sweep raised) or
  KILLED (the sweep was terminated);
* SIGTERM to the sweep is passed on to its local jobs (which end their runs KILLED) before
  the sweep stops, and a job process whose sweep died (even by SIGKILL) terminates itself
  within seconds instead of idling (:func:`watch_sweep_process`).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("irene")
PARENT_ENV = "IRENE_PARENT_RUN_ID"
SWEEP_PID_ENV = "IRENE_SWEEP_PID"  # the launching process of the sweep, for its local jobs
ERROR_FILE = "error.txt"  # a job's user error, one line, in the job's folder
CHILD_GRACE_S = 20.0  # how long a terminated sweep waits for its jobs to close their runs


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.failed = 0
        self.started = 0.0
        self.terminated: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        os.environ[SWEEP_PID_ENV] = str(os.getpid())
        self._install_sigterm()
        if not config.tracking.enabled:
            return
        import mlflow

        from pipelines.stale_runs import process_tags
        from pipelines.tracking import ensure_experiment

        experiment_id = ensure_experiment(config)
        tags = {"stage": "sweep", "sweep_dir": str(config.hydra.sweep.dir), **process_tags()}
        if config.get("sweep_name"):
            tags["preset"] = str(config.sweep_name)
        name = f"sweep {config.get('sweep_name') or ''}".strip()
        preset = config.get("sweep_name")
        tags["mlflow.note.content"] = (
            f"Multirun of preset `{preset}`: its jobs are the child runs. "
            f"`python run.py stage=report experiment={preset}` adds the table here (tables/)."
            if preset else f"Multirun in {config.hydra.sweep.dir}: its jobs are the child runs.")
        run = mlflow.MlflowClient().create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        os.environ[PARENT_ENV] = self.run_id
        atexit.register(self._close, "FAILED")  # the sweep raised or was stopped
        log.info("MLflow parent run of this sweep: %s", self.run_id)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if getattr(job_return, "status", None) == JobStatus.FAILED:
            self.failed += 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        errors = job_errors(Path(str(config.hydra.sweep.dir)), since=self.started)
        # jobs in other processes report their own status; this process sees only its own
        self._close("FAILED" if self.failed or errors else "FINISHED")
        os.environ.pop(PARENT_ENV, None)
        if errors:
            for job, line in errors:
                print(f"error: job {job}: {line.removeprefix('error: ')}", file=sys.stderr)
            raise SystemExit(2)

    def _close(self, status: str) -> None:
        if self.run_id is None:
            return
        import mlflow

        run_id, self.run_id = self.run_id, None
        status = "KILLED" if self.terminated else status
        try:
            mlflow.MlflowClient().set_terminated(run_id, status=status)
        except Exception as error:  # never hide the sweep's own outcome behind this one
            log.warning("could not close the sweep's parent run %s: %s", run_id, error)

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, frame: Any) -> None:
            from pipelines.tracking import Terminated

            self.terminated = signal.Signals(signum).name
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
            terminate_children(CHILD_GRACE_S)
            raise Terminated(f"sweep terminated by {self.terminated}")

        signal.signal(signal.SIGTERM, stop)


def terminate_children(grace_s: float) -> None:
    """SIGTERM to this process's job processes (they end their runs KILLED), then SIGKILL to
    those still there after ``grace_s``. Resource trackers are left to clean up after the
    sweep, as they do when it exits."""
    import psutil

    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if not any("resource_tracker" in part for part in child.cmdline()):
                children.append(child)
        except psutil.Error:
            continue
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def job_errors(sweep_dir: Path, since: float = 0.0) -> list[tuple[str, str]]:
    """(job folder, error line) of every job of the sweep that recorded a user error."""
    found = []
    for path in sorted(sweep_dir.glob(f"**/{ERROR_FILE}")):
        try:
            if path.stat().st_mtime >= since:
                found.append((str(path.parent.relative_to(sweep_dir)),
                              path.read_text().strip().splitlines()[0]))
        except (OSError, IndexError):
            continue
    return found


def record_job_error(message: str) -> None:
    """A job's user error: appended to the job's log and written to ``error.txt`` in its
    folder, as the one line ``message``; the sweep prints the lines of its jobs at its end."""
    from hydra.core.hydra_config import HydraConfig

    from irene.data.io import atomic_write_text

    config = HydraConfig.get()
    job_dir = Path(config.runtime.output_dir)
    atomic_write_text(job_dir / ERROR_FILE, message + "\n")
    for handler in logging.getLogger().handlers:
        handler.flush()
    log_file = job_dir / f"{config.job.name}.log"
    if log_file.is_file():
        with log_file.open("a", encoding="utf-8") as handle:
            handle.write(message + "\n")


_WATCHING: list[int] = []


def watch_sweep_process(poll_s: float = 1.0, grace_s: float = 15.0) -> bool:
    """In a job process started by a local sweep (joblib's workers, submitit's local jobs),
    watch the sweep: when it dies, however it died, this process sends itself SIGTERM (its
    run ends KILLED) and exits after ``grace_s``, instead of idling for ever.

    Returns:
        Whether this process is watching (once per process; nothing for a job that runs in
        the sweep's own process or on another machine).
    """
    sweep_pid = int(os.environ.get(SWEEP_PID_ENV) or 0)
    if _WATCHING:
        return True
    if not sweep_pid or sweep_pid == os.getpid() or os.getppid() != sweep_pid:
        return False

    def watch() -> None:
        while os.getppid() == sweep_pid:
            time.sleep(poll_s)
        log.warning("the sweep (process %d) is gone: stopping this job process %d", sweep_pid,
                    os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(143)

    threading.Thread(target=watch, name="irene-sweep-watch", daemon=True).start()
    _WATCHING.append(sweep_pid)
    return True
