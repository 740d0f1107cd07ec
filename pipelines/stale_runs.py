"""Stale-run cleanup: a run left RUNNING by a process that died without a word.

Every run is tagged with its process (``irene.host``, ``irene.pid``, ``irene.pid_start``;
:func:`process_tags`), so a run left RUNNING by a process that died without a word (SIGKILL,
power loss) is closed as KILLED by the next run on that store started on the same host
(:func:`close_stale_runs`, called when a stage opens its experiment).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from pipelines.paths import log

HOST_TAG, PID_TAG, PID_START_TAG = "irene.host", "irene.pid", "irene.pid_start"


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


def _close_stale(running: list[tuple[str, dict[str, str]]],
                 close: Callable[[str, dict[str, str]], None]) -> list[str]:
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
