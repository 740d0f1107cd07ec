"""Entry point: ``python run.py stage=<name> [group=option ...]`` (add ``-m`` for a sweep).

A user error (:class:`irene.errors.UserError`: a bad setting, a bad or missing input file, a
non-finite result) ends a single run with one line ``error: <message>`` on stderr and exit
code 2; in a sweep, the job writes that line to its log and ``error.txt``, the other jobs go
on, and the sweep ends with the lines and exit code 2. ``HYDRA_FULL_ERROR=1`` shows the
traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

from pipelines.tracking_worker import dismiss_prestarted, prestart

if __name__ == "__main__":
    # MLflow's usage telemetry costs its client about a second per process here; a stage
    # does not send it unless asked to (MLFLOW_DISABLE_TELEMETRY=false)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    prestart(sys.argv)  # first: MLflow's import (seconds) overlaps composing the config

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from irene.errors import SettingsError, UserError, one_line  # noqa: E402
from pipelines.config import STAGES, bad_group_option, register_configs  # noqa: E402
from pipelines.sweep import record_job_error, watch_sweep_process  # noqa: E402
from pipelines.tracking import Terminated  # noqa: E402

# bad input: one line, no traceback (FileNotFoundError: a path the user named is not there)
USER_ERRORS = (UserError, FileNotFoundError)

register_configs()


def run_stage(cfg: DictConfig) -> None:
    """Run ``cfg.stage``; a user error raises :class:`~irene.errors.UserError`."""
    if cfg.stage not in STAGES:
        raise SettingsError(f"stage={cfg.stage!r}: choose from {list(STAGES)}")
    importlib.import_module(f"pipelines.{cfg.stage}").run(cfg)


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
        run_stage(cfg)
    except USER_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_user_error(error, multirun)
    except (Terminated, KeyboardInterrupt) as stop:
        print(f"error: {stop or 'interrupted'}; the run is marked KILLED", file=sys.stderr)
        raise SystemExit(143 if isinstance(stop, Terminated) else 130) from None


_SINGLE_RUN_DONE = False  # set when a single run's stage returned


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    global _SINGLE_RUN_DONE
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:
        watch_sweep_process()
    execute(cfg, multirun=multirun)
    _SINGLE_RUN_DONE = not multirun


# Command-line words after which a config may set ``hydra.mode`` outside conf/ (whose configs
# never set it: tests/test_pipeline.py checks every one).
_MODE_MAY_BE_SET = ("hydra.mode", "hydra.searchpath", "--config-dir", "-cd", "--config-path",
                    "-cp", "--config-name", "-cn", "-m", "--multirun")


def skip_mode_probe(argv: list[str]) -> bool:
    """Skip Hydra's mode probe for a plain single run (0.4 s of a warm job).

    Before a run, Hydra composes the whole config once only to read ``hydra.mode`` from it,
    then composes it again for the run. None of conf/'s configs sets ``hydra.mode``, so that
    probe finds nothing (Hydra then runs a single run, as for ``hydra.mode`` unset) unless the
    command line sets it or names configs from elsewhere; only then is the probe kept.
    """
    if any(word.split("=", 1)[0].lstrip("+~") in _MODE_MAY_BE_SET
           or word.startswith(("--config-dir=", "--config-path=", "--config-name="))
           for word in argv[1:]):
        return False
    from hydra._internal.hydra import Hydra

    Hydra.get_mode = lambda self, config_name, overrides: None  # what the probe finds here
    return True


def one_line_config_errors() -> None:
    """A setting Hydra cannot apply (``predictor.lr=abc``, ``tracking.direct=maybe``,
    ``data.pth=x``) ends in one ``error:`` line and exit code 2, like every user error; Hydra
    would print six lines and exit 1. ``HYDRA_FULL_ERROR=1`` keeps Hydra's report."""
    import hydra._internal.utils as hydra_utils
    from hydra.errors import ConfigCompositionException, OverrideParseException

    report = hydra_utils.run_and_report

    def run_and_report(func):
        def composed():
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                parts = [" ".join(line.strip() for line in str(error).splitlines() if line.strip())]
                if isinstance(error, OverrideParseException):
                    parts.insert(0, error.override)
                if error.__cause__ is not None and str(error.__cause__).strip():
                    parts.append(str(error.__cause__).strip().splitlines()[0])
                print(f"error: {': '.join(parts)}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None

        return report(composed)

    hydra_utils.run_and_report = run_and_report


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
    skip_mode_probe(sys.argv)
    one_line_config_errors()
    try:
        main()
    except (Terminated, KeyboardInterrupt) as stop:  # a sweep's own process; its jobs said theirs
        print(f"error: {stop or 'interrupted'}; the sweep's runs are marked KILLED", file=sys.stderr)
        raise SystemExit(143 if isinstance(stop, Terminated) else 130) from None
    finally:
        dismiss_prestarted()  # a stage that tracked nothing (tracking off, an early error)
    if _SINGLE_RUN_DONE:
        exit_without_teardown()
