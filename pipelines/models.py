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


def resolve_model_dir(cfg: DictConfig, into: Path, tracker: Tracker, *, model_dir: str | None,
                      model_run: str | None, traced: bool) -> Path:
    """The trained predictor's folder: ``model_dir``, or the ``model`` artifact of the MLflow
    run ``model_run`` (downloaded into ``into``), or, for traced models (``traced``) with
    neither, the default static predictor of the configured data (trained once, then reused)."""
    if model_dir:
        return Path(model_dir)
    if model_run:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(cfg))
        local = mlflow.artifacts.download_artifacts(run_id=str(model_run),
                                                    artifact_path="model", dst_path=str(into))
        return Path(local)
    if traced:  # traced models: static features suffice
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


def load_predictor(cfg: DictConfig, into: Path, tracker: Tracker, *, model_dir: str | None,
                   model_run: str | None, traced: bool):
    """The trained predictor and its folder (see :func:`resolve_model_dir`)."""
    from pipelines.data import record_input

    folder = resolve_model_dir(cfg, into, tracker, model_dir=model_dir, model_run=model_run,
                               traced=traced)
    predictor = predictors.load(folder)
    source = ("model_dir" if model_dir else f"model_run={model_run}" if model_run
              else "default static predictor")
    record_input(tracker, "model", folder / predictors.base.STATE_FILE, source=source)
    return predictor, folder


def unseen_policy(value: str | None) -> str | None:
    """An ``unseen_op`` setting as a policy (None: the predictor's own policy)."""
    return None if value in (None, "", "null") else str(value)
