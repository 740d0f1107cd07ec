"""``stage=train``: fit the tree model on the whole data set and save it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from irene.data.forest import build_forest
from irene.evaluate.metrics import errors_by_node_type
from pipelines.config import build_predictor, run_params
from pipelines.data import load_trees
from pipelines.paths import log, run_dir, setup
from pipelines.tracking import tracked_run


def run(cfg: DictConfig) -> Path:
    """Returns the model folder (``model_dir``, default ``<run folder>/model``)."""
    setup(cfg)
    out = Path(cfg.model_dir) if cfg.model_dir else run_dir(cfg) / "model"
    with tracked_run(cfg, "train", run_params(cfg)) as tracker:
        predictor = build_predictor(cfg)
        trees, _ = load_trees(cfg, tracker)
        forest = build_forest(trees)
        log.info("training on %d trees (%d nodes) of %s", forest.num_trees, forest.num_nodes,
                 sorted(set(forest.model_names)))
        model = predictor.fit(forest)
        errors = errors_by_node_type(forest, model.predict(forest))
        log.info("training error (in-sample): %s", {k: round(v, 2) for k, v in errors.items()})
        tracker.log_metrics(errors, prefix="train_")
        for epoch, loss in enumerate(getattr(model, "history_", [])):
            tracker.log_metrics({"train_loss": loss}, step=epoch)
        model.save(out)
        tracker.log_artifact(out, "model")
    if tracker.run_id is not None:  # what stage=predict model_run=... takes
        print(f"MLflow run: {tracker.run_id}  (stage=predict model_run={tracker.run_id})")
    print(f"model: {out}  (stage=predict model_dir={out})")
    return out
