"""Glue shared by the stages: data loading (with a cache), run folders, MLflow tracking."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from irene.measure.leakage import check_no_leaked_target
from irene.model import IreneConfig
from irene.published import CSV_FILES, csv_name, import_device, resolve_device_dir, sha256_of
from irene.tree import Tree, read_trees, write_trees

log = logging.getLogger("irene")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = PROJECT_ROOT / "outputs"
CACHE_VERSION = 1  # bump when the import's output changes


# ------------------------------------------------------------------------------------ paths
def run_dir(cfg: DictConfig) -> Path:
    """The folder this stage writes into: ``cfg.run_dir``, else Hydra's run folder."""
    explicit = cfg.get("run_dir")
    if explicit:
        path = Path(explicit)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:  # not under @hydra.main (e.g. a test): a fresh folder
            stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
            path = OUTPUTS / "runs" / f"{stamp}_{cfg.stage}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def setup(cfg: DictConfig) -> None:
    """Logging format and thread count, once per stage."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s",
                        datefmt="%H:%M:%S")
    threads = int(cfg.get("threads") or 0)
    if not threads and _parallel_launcher():
        threads = 1  # jobs already run side by side: one thread each
    if threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        threadpool_limits(threads)


def _parallel_launcher() -> bool:
    """Whether this job runs under a launcher that runs jobs in parallel on this machine."""
    try:
        from hydra.core.hydra_config import HydraConfig

        target = str(HydraConfig.get().launcher.get("_target_", ""))
    except (ValueError, ImportError):
        return False
    return "Joblib" in target or "Submitit" in target


# ------------------------------------------------------------------------------------- data
def _import_cache_path(folder: Path, models: list[str] | None) -> Path:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{models}".encode())
    for level in CSV_FILES:
        digest.update(sha256_of(folder / csv_name(level)).encode())
    return OUTPUTS / "cache" / f"trees-{digest.hexdigest()[:16]}.jsonl"


def load_trees(cfg: DictConfig, *, require_energy: bool = True) -> tuple[list[Tree], Path]:
    """The data set's trees and the file they came from.

    ``data.trees`` is read as it is; otherwise the device's CSVs are imported once and the
    trees cached under ``outputs/cache/`` (keyed by the CSVs' sha256 and the model list).
    """
    data = cfg.data
    if data.trees:
        path = Path(data.trees)
        log.info("reading trees from %s", path)
        trees = read_trees(path, require_energy=require_energy)
        check_no_leaked_target(trees, cfg.features.sets, path)  # a feature that is the target: refused
        return trees, path
    folder = resolve_device_dir(data.path, data.name, download=data.download)
    models = None if data.models is None else list(data.models)
    cache = _import_cache_path(folder, models)
    if cache.exists():
        log.info("reading trees of %s from cache %s", folder, cache)
        return read_trees(cache, require_energy=require_energy), cache
    log.info("importing the published CSVs of %s (models: %s)", folder, models or "all")
    trees = import_device(folder, models)
    write_trees(cache, trees)
    return trees, cache


def irene_config(cfg: DictConfig) -> IreneConfig:
    """The tree model's hyperparameters from the composed config's groups."""
    p = cfg.predictor
    config = IreneConfig(
        feature_sets=list(cfg.features.sets),
        standardize_features=p.standardize_features,
        polynomial_degree=p.polynomial_degree,
        training_strategy=cfg.strategy.name,
        weighting=effective_weighting(cfg),
        tanh_scalar=p.tanh_scalar,
        normalize_loss_scale=p.normalize_loss_scale,
        epochs=p.epochs,
        lr=p.lr,
        seed=p.seed,
        unseen_op=p.unseen_op,
        engine=p.engine,
        show_progress=bool(cfg.get("show_progress", True)),
    )
    config.validate()  # a bad option fails before any work starts
    return config


# The weighting the paper paired with each training strategy (weighting=paper).
PAPER_WEIGHTING = {"unstructured": "free", "none": "exact_one"}


def effective_weighting(cfg: DictConfig) -> str:
    """``weighting.name``, with ``paper`` resolved for the chosen strategy."""
    if cfg.weighting.name == "paper":
        return PAPER_WEIGHTING.get(cfg.strategy.name, "close_to_one")
    return cfg.weighting.name


def make_predictor(cfg: DictConfig, *, show_progress: bool | None = None):
    """A fresh, unfitted predictor of ``cfg.predictor.name`` (see irene/predictors.py)."""
    from dataclasses import replace

    from irene import predictors

    config = irene_config(cfg)
    if show_progress is not None:
        config = replace(config, show_progress=show_progress)
    options = cfg.predictor.get("options")
    options = {} if options is None else OmegaConf.to_container(options, resolve=True)
    return predictors.build(cfg.predictor.name, config, options)


def ablation_params(cfg: DictConfig) -> dict[str, Any]:
    """The chosen option of every config group plus key hyperparameters (MLflow params)."""
    p = cfg.predictor
    return {
        "data": cfg.data.name,
        "features": cfg.features.name,
        "strategy": cfg.strategy.name,
        "weighting": "n/a" if cfg.strategy.name == "none" else effective_weighting(cfg),
        "predictor": p.name,
        "tanh_scalar": p.tanh_scalar,
        "polynomial_degree": p.polynomial_degree,
        "standardize_features": p.standardize_features,
        "normalize_loss_scale": p.normalize_loss_scale,
        "epochs": p.epochs,
        "lr": p.lr,
        "seed": p.seed,
    }


# --------------------------------------------------------------------------------- tracking
def tracking_uri(cfg: DictConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite under ``outputs/``."""
    uri = cfg.tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{OUTPUTS / 'mlflow.db'}"


def ensure_experiment(cfg: DictConfig) -> str:
    """Point MLflow at the store and return the experiment id (created once)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    name = cfg.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = cfg.tracking.get("artifact_root") or (OUTPUTS / "mlartifacts").as_uri()
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
               "report", "skip_not_applicable")


def config_hash(cfg: DictConfig) -> str:
    """A digest of everything that determines a stage's result (not where it is logged)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    kept = {k: v for k, v in container.items() if k not in _NOT_HASHED}
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


def write_table(frame, directory: Path, name: str, floatfmt: str = ".2f") -> list[Path]:
    """A table as ``name.csv`` and ``name.md`` (written atomically)."""
    from irene.io import atomic_write_text

    csv_path = atomic_write_text(directory / f"{name}.csv", frame.to_csv(float_format="%.4f"))
    md_path = atomic_write_text(directory / f"{name}.md", to_markdown(frame, floatfmt) + "\n")
    return [csv_path, md_path]


def to_markdown(frame, floatfmt: str = ".2f") -> str:
    """A small markdown table without the tabulate dependency."""
    index_name = frame.index.name or ""
    header = [index_name, *map(str, frame.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for position, idx in enumerate(frame.index):  # per cell: iterrows would upcast ints
        values = [frame.iat[position, j] for j in range(frame.shape[1])]
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in values]
        lines.append("| " + " | ".join([str(idx), *cells]) + " |")
    return "\n".join(lines)
