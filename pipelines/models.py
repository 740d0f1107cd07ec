"""Trained predictors of the stages that use one (predict, whatif): where they come from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig

from irene import predictors
from irene.errors import SettingsError
from irene.predictors.base import STATE_FILE
from pipelines.paths import log, outputs_dir
from pipelines.tracking import Tracker, tracking_uri


def resolve_model_dir(cfg: DictConfig, into: Path, tracker: Tracker) -> Path:
    """The trained predictor's folder: ``model_dir``, or the ``model`` artifact of the MLflow
    run ``model_run`` (downloaded into ``into``), or, for a traced model (``model=``) with
    neither, the default static predictor of the configured data (trained once, then reused)."""
    if cfg.get("model_dir"):
        return Path(cfg.model_dir)
    if cfg.get("model_run"):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(cfg))
        local = mlflow.artifacts.download_artifacts(run_id=str(cfg.model_run),
                                                    artifact_path="model", dst_path=str(into))
        return Path(local)
    if cfg.get("model") or cfg.get("models"):  # traced models: static features suffice
        return default_static_predictor(cfg, tracker)
    raise SettingsError(f"stage={cfg.stage} needs a trained predictor: model_dir=<folder written by "
                        "stage=train> or model_run=<MLflow run id of stage=train> (or model=<name> "
                        "to trace a model and use the default static predictor)")


def default_static_predictor(cfg: DictConfig, tracker: Tracker) -> Path:
    """IrEne+ on static features (``model_specs``), trained on the configured data set.

    Kept under ``outputs/models/<key>/`` where the key hashes the predictor's class and
    hyperparameters, the data's file and the package version: the first call trains it
    (seconds), later calls reuse it. Says which in one line.
    """
    from irene import __version__
    from irene.data.forest import build_forest
    from irene.data.published import sha256_of
    from irene.predictors.irene_plus import IrenePlusPredictor
    from pipelines.data import load_trees

    predictor = IrenePlusPredictor(feature_sets=["model_specs"])
    trees, source = load_trees(cfg, tracker)
    key = hashlib.sha256(json.dumps(
        [type(predictor).__qualname__, repr(sorted(predictor.get_params().items())),
         sha256_of(source), __version__]).encode()).hexdigest()[:16]
    folder = outputs_dir() / "models" / f"static-{cfg.data.name}-{key}"
    if (folder / STATE_FILE).is_file():
        log.info("no model_dir/model_run given: using the static IrEne+ predictor trained on %s "
                 "earlier (%s)", cfg.data.name, folder)
        return folder
    log.info("no model_dir/model_run given: training the static IrEne+ predictor on %s "
             "(features=model_specs; kept in %s for the next run)", cfg.data.name, folder)
    predictor.fit(build_forest(trees)).save(folder)
    return folder


def load_predictor(cfg: DictConfig, into: Path, tracker: Tracker):
    """The trained predictor and where it came from (for the run's params)."""
    from pipelines.data import record_input

    model_dir = resolve_model_dir(cfg, into, tracker)
    predictor = predictors.load(model_dir)
    record_input(tracker, "model", model_dir / predictors.base.STATE_FILE, source="model_dir" if
                 cfg.get("model_dir") else f"model_run={cfg.model_run}")
    return predictor, model_dir


def unseen_policy(cfg: DictConfig) -> str | None:
    """The stage's ``unseen_op`` (None: the predictor's own policy)."""
    value = cfg.get("unseen_op")
    return None if value in (None, "", "null") else str(value)
