"""MLflow tracking of the stages: the store, one run per stage, params, resume.

Every stage runs inside :func:`tracked_run`; with ``tracking=off`` the helpers do nothing, so
stages never test whether tracking is on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipelines.paths import outputs_dir


def tracking_uri(cfg: DictConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite under ``outputs/``."""
    uri = cfg.tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    outputs_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{outputs_dir() / 'mlflow.db'}"


def ensure_experiment(cfg: DictConfig) -> str:
    """Point MLflow at the store and return the experiment id (created once)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    name = cfg.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = cfg.tracking.get("artifact_root") or (outputs_dir() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=f"{str(root).rstrip('/')}/{name}")
    except Exception:  # another job created it first
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _flat_params(params: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in params.items()}


@contextlib.contextmanager
def tracked_run(cfg: DictConfig, stage: str, params: dict[str, Any] | None = None, *,
                run_name: str | None = None, nested: bool = False,
                tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run around a stage (or ``None`` when tracking is off).

    The resolved config is logged as ``config.yaml``. An exception inside ends the run as
    FAILED (MLflow's context manager does so) and propagates; the store stays usable.
    """
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    experiment_id = ensure_experiment(cfg)
    all_tags = {"stage": stage, "config_hash": config_hash(cfg), **_sweep_tags(), **(tags or {})}
    if cfg.get("sweep_name"):
        all_tags["preset"] = str(cfg.sweep_name)
    parent = os.environ.get("IRENE_PARENT_RUN_ID")
    if parent and not nested and mlflow.active_run() is None:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name or stage,
                          nested=nested, tags=all_tags) as run:
        if params:
            mlflow.log_params(_flat_params(params))
        if not nested:
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        yield run


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


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path or path.name)
        else:
            mlflow.log_artifact(str(path), artifact_path)
