"""``stage=train``: fit the tree model on the whole data set and save it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.paths import log
from pipelines.stage import Context, Stage, predictor_run_name


@dataclass
class TrainSettings:
    model_dir: str | None = None  # train: output (default: run folder); predict/whatif: trained model


def run(ctx: Context, settings: TrainSettings) -> Path:
    """Returns the model folder (``model_dir``, default ``<run folder>/model``)."""
    from irene.data.forest import build_forest
    from irene.evaluate.metrics import errors_by_node_type

    out = Path(settings.model_dir) if settings.model_dir else ctx.run_dir / "model"
    with ctx.tracked_run(ctx.run_params()) as tracker:
        predictor = ctx.build_predictor()
        trees, _ = ctx.load_trees(tracker)
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


STAGE = Stage("train", TrainSettings, run, run_name=predictor_run_name("train"))
