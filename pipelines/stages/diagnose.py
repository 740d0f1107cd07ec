"""``stage=diagnose``: is the tree assumption true of the data, and where does the error of the
configured predictor come from?

Writes into the run folder and logs as MLflow artifacts (``report/``):

* ``child_ratios.csv|md``: per node type and module class, measured parent ÷ Σ measured
  children and the share of parents out of reach of IrEne's weights 1 ± 1/τ;
* ``error_sources.csv|md``: per node type and module class, the predictor's mean % error
  split into the part inherited from the leaves and the part added while aggregating;
  predictions are the out-of-fold ones of leave-one-model-out (or ``predictions=<file>``);
* ``diagnostics.md``: both, as one report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.paths import log
from pipelines.stage import Context, Stage, predictor_run_name

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class DiagnosticsReport:
    ratios: pd.DataFrame  # rows: "<node type>:<class>" + "all"
    sources: pd.DataFrame  # rows: "<node type>:all" and "<node type>:<class>"
    report_path: Path


@dataclass
class DiagnoseSettings:
    predictions: str | None = None  # evaluate, diagnose: predicted trees


def run(ctx: Context, settings: DiagnoseSettings) -> DiagnosticsReport:
    from irene.data.forest import build_forest
    from irene.data.io import atomic_write_text
    from irene.data.provenance import check_same_device
    from irene.data.tree import NodeType, read_trees
    from irene.evaluate.crossval import leave_one_model_out
    from irene.evaluate.diagnostics import child_ratio_table, error_sources, report_markdown
    from irene.evaluate.metrics import align_predictions
    from irene.predictors.irene import IreneModel
    from irene.tables import Table, write_table
    from pipelines.data import record_input

    out = ctx.run_dir
    predictor = ctx.build_predictor(show_progress=False)
    # τ of the close_to_one weights: the predictor's, else IrEne's default
    tanh_scalar = predictor.get_params().get("tanh_scalar", IreneModel().tanh_scalar)
    label = f"{ctx.predictor_name} ({ctx.features_name})"
    predictions = settings.predictions
    params = {**ctx.run_params(),
              "predictions": str(predictions) if predictions else "leave-one-model-out"}
    with ctx.tracked_run(params) as tracker:
        trees, _ = ctx.load_trees(tracker)  # inside the run: its location and sha256 are logged
        forest = build_forest(trees)
        tracker.log_params({"num_trees": forest.num_trees})
        ratios = child_ratio_table(forest, tanh_scalar=tanh_scalar)
        if predictions:
            record_input(tracker, "predictions", Path(predictions), source="predictions")
            predicted_trees = read_trees(predictions)
            check_same_device(trees, predicted_trees, str(predictions),
                              f"the data set (data.name={ctx.data_name})")
            forest, predicted = align_predictions(trees, predicted_trees, str(predictions))
        else:
            log.info("leave-one-model-out predictions of %s for the error sources", label)
            predicted = leave_one_model_out(
                forest, predictor, show_progress=ctx.show_progress).predicted_j
        sources = error_sources(forest, predicted)
        paths = write_table(Table.from_frame(ratios), out, "child_ratios", floatfmt=".3f")
        paths += write_table(Table.from_frame(sources), out, "error_sources")
        report = atomic_write_text(out / "diagnostics.md",
                                   report_markdown(ratios, {label: sources},
                                                   tanh_scalar=tanh_scalar) + "\n")
        metrics = {"parents_outside_tau_pct": float(ratios.loc["all", "outside_tau_pct"])}
        for node_type in (NodeType.MODULE.value, NodeType.MODEL.value):
            key = f"{node_type}:all"
            if key in sources.index:
                metrics[f"{node_type}_leaf_part_pct"] = float(sources.loc[key, "abs_leaf_part_pct"])
                metrics[f"{node_type}_aggregation_part_pct"] = float(
                    sources.loc[key, "abs_aggregation_part_pct"])
        tracker.log_metrics(metrics)
        for path in [*paths, report]:
            tracker.log_artifact(path, "report")
    print(f"diagnostics report: {report}")
    return DiagnosticsReport(ratios=ratios, sources=sources, report_path=report)


STAGE = Stage("diagnose", DiagnoseSettings, run, run_name=predictor_run_name("diagnose"))
