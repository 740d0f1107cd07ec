"""``stage=predict``: fill ``predicted_energy`` in a copy of the input trees."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from irene import predictors
from irene.forest import build_forest, fill_predictions
from irene.tree import read_trees, write_trees
from pipelines.common import (
    load_trees,
    log,
    log_artifact,
    log_params,
    run_dir,
    setup,
    tracked_run,
)


def run(cfg: DictConfig) -> Path:
    """Returns the predictions file (``output``, default ``<run folder>/predictions.jsonl``)."""
    setup(cfg)
    if not cfg.model_dir:
        raise ValueError("stage=predict needs model_dir=<folder written by stage=train>")
    out = Path(cfg.output) if cfg.output else run_dir(cfg) / "predictions.jsonl"
    with tracked_run(cfg, "predict", {"model_dir": str(cfg.model_dir)}):
        model = predictors.load(cfg.model_dir)
        if cfg.trees:
            source = Path(cfg.trees)
            trees = read_trees(source)
        else:
            trees, source = load_trees(cfg, require_energy=False)
        log_params({"trees": str(source), "predictor": type(model).__name__})
        forest = build_forest(trees)
        predicted, fallback = model.predict(forest, return_fallback=True)
        filled = fill_predictions(trees, forest, predicted)
        write_trees(out, filled, protect=[source])
        log.info("predicted %d nodes of %d trees (%d with a fallback regressor)",
                 forest.num_nodes, forest.num_trees, int(fallback.sum()))
        log_artifact(out, "predictions")
    print(f"predictions: {out}")
    return out
