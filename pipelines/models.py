"""Trained predictors of the stages that use one (predict, whatif): where they come from."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from irene import predictors
from irene.errors import SettingsError
from pipelines.tracking import tracking_uri


def resolve_model_dir(cfg: DictConfig, into: Path) -> Path:
    """The trained predictor's folder: ``model_dir``, or the ``model`` artifact of the MLflow
    run ``model_run`` (downloaded into ``into``)."""
    if cfg.get("model_dir"):
        return Path(cfg.model_dir)
    if cfg.get("model_run"):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(cfg))
        local = mlflow.artifacts.download_artifacts(run_id=str(cfg.model_run),
                                                    artifact_path="model", dst_path=str(into))
        return Path(local)
    raise SettingsError(f"stage={cfg.stage} needs a trained predictor: model_dir=<folder written by "
                     "stage=train> or model_run=<MLflow run id of stage=train>")


def load_predictor(cfg: DictConfig, into: Path):
    """The trained predictor and where it came from (for the run's params)."""
    from pipelines.data import record_input

    model_dir = resolve_model_dir(cfg, into)
    predictor = predictors.load(model_dir)
    record_input("model", model_dir / predictors.base.STATE_FILE, source="model_dir" if
                 cfg.get("model_dir") else f"model_run={cfg.model_run}")
    return predictor, model_dir


def unseen_policy(cfg: DictConfig) -> str | None:
    """The stage's ``unseen_op`` (None: the predictor's own policy)."""
    value = cfg.get("unseen_op")
    return None if value in (None, "", "null") else str(value)
