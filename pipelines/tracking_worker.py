"""The tracking worker: performs a stage's MLflow calls in a process of its own, so that
importing MLflow overlaps the stage's computation (see :mod:`pipelines.tracking`).

``python -m pipelines.tracking_worker`` reads one JSON object per line on stdin: ``open``
(store, experiment, the stage's ``argv`` for MLflow's source tags), then ``start``, ``end``,
``log_params``, ``log_metrics``, ``set_tags``, ``log_artifact`` in the stage's order, and
``run_ids`` and ``close``, which it answers with one JSON line on stdout (the ids of the runs
started so far, in order; ``close`` adds the errors). Lines are read as they come (the stage
never waits on a full pipe) and performed once MLflow is imported.

After a failed call it performs no more calls but ``end``s the open runs FAILED, and answers
``close`` with the error (its traceback on stderr with ``HYDRA_FULL_ERROR=1``). If stdin ends
without ``close`` (the stage's process died), it ends the open runs KILLED. It ignores SIGINT
and SIGTERM: Ctrl-C in a terminal reaches the whole process group, and the stage's process is
the one that decides how its runs end.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path


def _reader(lines: queue.Queue) -> None:
    told = False
    for line in sys.stdin:
        told = True
        lines.put(line)
    if not told:  # dismissed before any call (a pre-started worker that is not needed)
        os._exit(0)
    lines.put(None)


# ------------------------------------------------------------- the stage's side: starting one
_PRESTARTED: subprocess.Popen | None = None


def spawn() -> subprocess.Popen:
    """A tracking worker process, waiting for its calls on stdin."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "pipelines.tracking_worker"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                            encoding="utf-8")


def prestart(argv: list[str]) -> None:
    """Start a worker before the config is even composed, so that MLflow is imported by the
    time the stage's first results come (run.py calls this first). Not when the command line
    says a worker will not be used (tracking off, a sweep); a worker that turns out not to be
    needed is dismissed and exits at once (:func:`dismiss_prestarted`)."""
    global _PRESTARTED
    words = set(argv[1:])
    if words & {"-m", "--multirun", "tracking=off", "tracking.enabled=false",
                "tracking.background=false", "--help", "-h", "--cfg", "-c", "--info"}:
        return
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith("databricks"):
        return
    _PRESTARTED = spawn()


def take_prestarted() -> subprocess.Popen | None:
    """The pre-started worker, for the stage's tracking (None if there is none)."""
    global _PRESTARTED
    process, _PRESTARTED = _PRESTARTED, None
    return process


def dismiss_prestarted() -> None:
    """Let a pre-started worker that no stage took exit (it has imported nothing yet or
    drops what it imported)."""
    process = take_prestarted()
    if process is not None and process.poll() is None:
        process.stdin.close()
        try:
            process.wait(timeout=2)  # it exits at once; a stage exits faster without children
        except subprocess.TimeoutExpired:
            pass


_REPLIES = sys.stdout  # the stage reads the answers here; main() keeps it for them alone


def _answer(message: dict) -> None:
    try:
        _REPLIES.write(json.dumps(message) + "\n")
        _REPLIES.flush()
    except BrokenPipeError:  # the stage is gone (terminated while closing): no one to answer,
        pass  # and no traceback after its one line


def main() -> None:
    global _REPLIES
    # answers only on the pipe: what MLflow prints (run links of a tracking server, say) goes
    # to stderr with the rest of its messages
    _REPLIES = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(lines,), daemon=True).start()

    import mlflow  # the slow part: about 4 s, while the stage computes

    from irene.errors import one_line
    from pipelines.tracking import InProcessTracker

    tracker: InProcessTracker | None = None
    errors: list[str] = []
    started: list[str | None] = []  # run ids in the order the stage started its runs
    while True:
        line = lines.get()
        if line is None:  # the stage's process is gone without closing its runs
            while mlflow.active_run() is not None:
                mlflow.set_tag("irene.closed_by", f"tracking worker {os.getpid()}: the stage's "
                               "process ended without closing its run")
                mlflow.end_run("KILLED")
            os._exit(1)
        message = json.loads(line)
        op = message.pop("op")
        if op == "close":
            _answer({"errors": errors, "run_ids": started})
            sys.stderr.flush()
            os._exit(0)  # skips MLflow's slow interpreter teardown; every call is done
        if op == "run_ids":
            _answer({"run_ids": started})
            continue
        if errors:  # after a failure: only close what is open
            if op == "start":
                started.append(None)
            if op == "end" and mlflow.active_run() is not None:
                mlflow.end_run("FAILED")
            continue
        try:
            if op == "open":
                sys.argv = message.pop("argv")  # MLflow's source tags name the stage's script
                tracker = InProcessTracker(**message)
            elif op == "start":
                started.append(None)
                tracker._start(**message)
                started[-1] = tracker.run_ids[-1]
            elif op in ("end", "log_params", "log_metrics", "set_tags", "log_artifact"):
                getattr(tracker, f"_{op}")(**message)  # the raw call, as the stage made it
            else:
                raise ValueError(f"unknown call {op!r}")
        except Exception as error:  # noqa: BLE001 - reported to the stage at close
            if os.environ.get("HYDRA_FULL_ERROR") == "1":  # else the stage's one line says it
                traceback.print_exc(file=sys.stderr)
            errors.append(f"{op}: {one_line(error)}")
            while mlflow.active_run() is not None:
                mlflow.end_run("FAILED")


if __name__ == "__main__":
    main()
