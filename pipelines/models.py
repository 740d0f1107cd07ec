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
                      model_run: str | None, traced: bool, device: str | None = None) -> Path:
    """The trained predictor's folder: ``model_dir``, or the ``model`` artifact of the MLflow
    run ``model_run`` (downloaded into ``into``), or that of the newest run of
    ``stage=transfer`` that kept a predictor for ``device``, or, for traced models
    (``traced``) with none of them, the default static predictor of the configured data
    (trained once, then reused)."""
    given = [name for name, value in (("model_dir", model_dir), ("model_run", model_run),
                                      ("device", device)) if value]
    if len(given) > 1:
        raise SettingsError(f"{' and '.join(given)} both name a predictor: give one of them")
    if model_dir:
        return Path(model_dir)
    if device:
        model_run = device_run(cfg, str(device))
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


def device_run(cfg: DictConfig, device: str) -> str:
    """The id of the newest FINISHED ``stage=transfer`` run that kept a predictor for
    ``device`` (tag ``transfer.device``).

    Raises:
        SettingsError: tracking is off, or no such run (naming the devices that have one).
    """
    if not cfg.tracking.enabled:
        raise SettingsError(f"device={device}: device predictors are found in the MLflow store, "
                            "but tracking.enabled=false; give model_dir=<transfer run>/model")
    import mlflow

    from pipelines.stages.transfer import DEVICE_TAG
    from pipelines.tracking import ensure_experiment

    experiment_id = ensure_experiment(cfg)
    if "'" in device or "\\" in device:
        raise SettingsError(f"device={device!r}: not a device id")
    found = mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", max_results=1,
        filter_string=(f"tags.`{DEVICE_TAG}` = '{device}' and tags.stage = 'transfer' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"])
    if found:
        log.info("device=%s: the predictor kept by transfer run %s", device, found[0].info.run_id)
        return found[0].info.run_id
    kept = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list",
                              filter_string=("tags.stage = 'transfer' and "
                                             "attributes.status = 'FINISHED'"), max_results=200)
    devices = sorted({r.data.tags.get(DEVICE_TAG) for r in kept} - {None})
    raise SettingsError(f"device={device}: no finished stage=transfer run kept a predictor for it "
                        f"(devices with one: {devices or 'none'}); run stage=transfer "
                        f"source=<devices> target=<{device}'s measured trees> first")


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
                   model_run: str | None, traced: bool, device: str | None = None):
    """The trained predictor and its folder (see :func:`resolve_model_dir`)."""
    from pipelines.data import record_input

    folder = resolve_model_dir(cfg, into, tracker, model_dir=model_dir, model_run=model_run,
                               traced=traced, device=device)
    predictor = predictors.load(folder)
    source = ("model_dir" if model_dir else f"model_run={model_run}" if model_run
              else f"device={device}" if device else "default static predictor")
    record_input(tracker, "model", folder / predictors.base.STATE_FILE, source=source)
    return predictor, folder


def unseen_policy(value: str | None) -> str | None:
    """An ``unseen_op`` setting as a policy (None: the predictor's own policy)."""
    return None if value in (None, "", "null") else str(value)
