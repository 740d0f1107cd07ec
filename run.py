"""Entry point: ``python run.py stage=<name> [group=option ...]`` (add ``-m`` for a sweep).

A user error (:class:`irene.errors.UserError`: a bad setting, a bad or missing input file, a
non-finite result) ends a single run with one line ``error: <message>`` on stderr and exit
code 2; in a sweep, the job writes that line to its log and ``error.txt``, the other jobs go
on, and the sweep ends with the lines and exit code 2. ``HYDRA_FULL_ERROR=1`` shows the
traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pipelines.tracking_worker import dismiss_prestarted, prestart


def terminated_before_the_stage(signum: int, frame: object) -> None:
    """SIGTERM while Python imports and Hydra composes (seconds): one line and exit code 143,
    like a stage's (:func:`execute` hands over to the stage's own handler)."""
    print("error: terminated by SIGTERM before the stage started", file=sys.stderr, flush=True)
    raise SystemExit(143)


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, terminated_before_the_stage)
    # MLflow's usage telemetry costs its client about a second per process here; a stage
    # does not send it unless asked to (MLFLOW_DISABLE_TELEMETRY=false)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    prestart(sys.argv)  # first: MLflow's import (seconds) overlaps composing the config

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from irene.errors import (  # noqa: E402
    FULL_ERROR_ENV,
    DiskFullError,
    SettingsError,
    UserError,
    full_error_requested,
    one_line,
)
from pipelines.config import bad_group_option, check_settings, register_configs  # noqa: E402
from pipelines.sweep import record_job_error, watch_sweep_process  # noqa: E402
from pipelines.tracking import Terminated, terminate_unwinds  # noqa: E402

# bad input: one line, no traceback (FileNotFoundError: a path the user named is not there)
USER_ERRORS = (UserError, FileNotFoundError)

register_configs()


def run_stage(cfg: DictConfig) -> None:
    """Run ``cfg.stage`` (a plug-in of ``pipelines/stages/``); a user error raises
    :class:`~irene.errors.UserError`."""
    from pipelines.stage import run_stage as run_named

    run_named(str(cfg.stage), cfg)


def unknown_settings(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys of ``node`` that its typed schema does not have, added with ``+key=value``: Hydra
    accepts those without a check (``+predicter=irene`` would change nothing and say nothing).
    Nodes without a dataclass schema (a predictor's, whose keys its constructor checks) are
    not walked."""
    import dataclasses

    from omegaconf import OmegaConf

    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    fields = {f.name for f in dataclasses.fields(schema)}
    unknown = []
    for key, value in node.items_ex(resolve=False):
        if key not in fields:
            unknown.append(f"{prefix}{key}")
        elif isinstance(value, DictConfig):
            unknown += unknown_settings(value, f"{prefix}{key}.")
    return unknown


def check_known_settings(cfg: DictConfig) -> None:
    """Fail in one line on a setting that does not exist (see :func:`unknown_settings`)."""
    unknown = unknown_settings(cfg)
    if unknown:
        import difflib

        from omegaconf import OmegaConf

        key = unknown[0]
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        close = difflib.get_close_matches(name, [str(k) for k in node if k != name], n=1)
        hint = f"; did you mean {(parent + '.' if parent else '') + close[0]}?" if close else ""
        raise SettingsError(f"{key}: no such setting or config group{hint}")


def report_user_error(error: BaseException, multirun: bool) -> None:
    """The one line of a user error: exit code 2 for a single run; in a sweep's job, the
    job's log and ``error.txt`` (the sweep exits 2 at its end)."""
    message = f"error: {one_line(error)}"
    if multirun:
        record_job_error(message)
        return
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


def execute(cfg: DictConfig, *, multirun: bool = False) -> None:
    """Run the stage; a user error becomes its one line (see the module docstring)."""
    try:
        check_known_settings(cfg)
        check_settings(cfg)  # every value in its range, whatever the stage
        _hand_over_sigterm()
        with terminate_unwinds():  # SIGTERM: finally blocks run, then one line, exit 143
            run_stage(cfg)
    except USER_ERRORS as error:
        if full_error_requested():
            raise
        report_user_error(error, multirun)
    except OSError as error:  # a full disk is the user's to fix; any other OSError is a bug
        full = DiskFullError.from_os_error(error)
        if full is None or full_error_requested():
            raise
        report_user_error(full, multirun)
    except (Terminated, KeyboardInterrupt) as stop:
        print(f"error: {stop or 'interrupted'}; a tracked run is marked KILLED", file=sys.stderr)
        raise SystemExit(143 if isinstance(stop, Terminated) else 130) from None


def _hand_over_sigterm() -> None:
    """From here the stage's handler (:func:`terminate_unwinds`) answers SIGTERM."""
    import signal

    if signal.getsignal(signal.SIGTERM) is terminated_before_the_stage:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def warn_foreign_settings(cfg: DictConfig) -> None:
    """One warning line for command-line settings that the chosen stage does not read."""
    from pipelines.stage import foreign_settings

    foreign = foreign_settings(list(HydraConfig.get().overrides.task), str(cfg.stage))
    if foreign:
        print(f"warning: stage={cfg.stage} does not read " + "; ".join(
            f"{setting} (a setting of {', '.join(readers)})" for setting, readers in foreign.items())
            + ": ignored", file=sys.stderr, flush=True)


_SINGLE_RUN_DONE = False  # set when a single run's stage returned


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    global _SINGLE_RUN_DONE, _STAGE_STARTED
    _STAGE_STARTED = True
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:
        watch_sweep_process()
    warn_foreign_settings(cfg)
    execute(cfg, multirun=multirun)
    _SINGLE_RUN_DONE = not multirun


def config_error_line(error: Exception) -> str:
    """The one ``error:`` line of a setting Hydra cannot apply (``predictor.lr=abc``,
    ``data.pth=x``, ``seeds=[1,2``): Hydra's message and its cause, joined on one line."""
    from hydra.errors import OverrideParseException

    parts = [" ".join(line.strip() for line in str(error).splitlines() if line.strip())]
    if isinstance(error, OverrideParseException):
        parts.insert(0, error.override)
    if error.__cause__ is not None and str(error.__cause__).strip():
        parts.append(str(error.__cause__).strip().splitlines()[0])
    return f"error: {': '.join(parts)}"


_STAGE_STARTED = False  # set when the task function starts (Hydra has written its files)


def remove_unstarted_run_folder() -> None:
    """After Hydra failed to write its own files (``.hydra/*.yaml``, the log) into a new run
    folder, remove that folder when it holds nothing else: no half-written file stays."""
    if not _STAGE_STARTED:
        from pipelines.run_folder import remove_if_only_hydras

        remove_if_only_hydras()


def exit_without_teardown() -> None:
    """End a finished single run now: every output is written and closed, and its tracking
    is done, so the interpreter's teardown (a few tenths of a second of freeing objects) is
    skipped. Not while child processes live (e.g. ``cv_jobs`` workers): they get a normal exit."""
    import psutil

    if psutil.Process().children():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    bad_option = bad_group_option(sys.argv[1:], Path(__file__).resolve().parent / "conf")
    if bad_option:
        dismiss_prestarted()
        print(f"error: {bad_option}", file=sys.stderr)
        raise SystemExit(2)
    # Hydra prints its own multi-line report of a failure and exits 1, unless HYDRA_FULL_ERROR=1
    # (public, documented), where it re-raises: the errors come here and get their one line.
    # The user's own choice is kept for the stages (irene.errors.full_error_requested).
    os.environ.setdefault(FULL_ERROR_ENV, os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from hydra.errors import ConfigCompositionException, OverrideParseException

    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as error:
        dismiss_prestarted()
        if full_error_requested():
            raise
        print(config_error_line(error), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OSError as error:  # Hydra's own writes (the run folder, .hydra/*.yaml) on a full disk
        full = DiskFullError.from_os_error(error)
        if full is None or full_error_requested():
            raise
        remove_unstarted_run_folder()
        print(f"error: {full}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (Terminated, KeyboardInterrupt) as stop:  # a sweep's own process; its jobs said theirs
        print(f"error: {stop or 'interrupted'}; the sweep's runs are marked KILLED", file=sys.stderr)
        raise SystemExit(143 if isinstance(stop, Terminated) else 130) from None
    finally:
        dismiss_prestarted()  # a stage that tracked nothing (tracking off, an early error)
    if _SINGLE_RUN_DONE:
        exit_without_teardown()
