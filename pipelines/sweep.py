"""Hydra callback that groups a multirun under one MLflow parent run.

``on_multirun_start`` runs once in the launching process, before any job: it creates the
tracking store and the experiment (so parallel jobs never race on schema creation) and a
parent run, whose id reaches every job through ``$IRENE_PARENT_RUN_ID`` (inherited by joblib
workers, submitit processes and SLURM jobs, which export the environment). Each job's run
then carries ``mlflow.parentRunId`` and the sweep's tags.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("irene")
PARENT_ENV = "IRENE_PARENT_RUN_ID"


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.failed = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        import mlflow

        from pipelines.tracking import ensure_experiment

        experiment_id = ensure_experiment(config)
        tags = {"stage": "sweep", "sweep_dir": str(config.hydra.sweep.dir)}
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
        log.info("MLflow parent run of this sweep: %s", self.run_id)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if getattr(job_return, "status", None) == JobStatus.FAILED:
            self.failed += 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        import mlflow

        # jobs in other processes report their own status; this process sees only its own
        status = "FAILED" if self.failed else "FINISHED"
        mlflow.MlflowClient().set_terminated(self.run_id, status=status)
        os.environ.pop(PARENT_ENV, None)
