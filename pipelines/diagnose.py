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

import pandas as pd
from omegaconf import DictConfig

from irene.data.forest import build_forest
from irene.data.io import atomic_write_text
from irene.data.tree import NodeType, read_trees
from irene.evaluate.crossval import leave_one_model_out
from irene.evaluate.diagnostics import child_ratio_table, error_sources, report_markdown
from irene.evaluate.metrics import align_predictions
from irene.predictors.irene import IreneModel
from irene.tables import Table, write_table
from pipelines.config import build_predictor, predictor_class, run_params
from pipelines.data import load_trees, record_input
from pipelines.paths import log, run_dir, setup
from pipelines.tracking import tracked_run


@dataclass
class DiagnosticsReport:
    ratios: pd.DataFrame  # rows: "<node type>:<class>" + "all"
    sources: pd.DataFrame  # rows: "<node type>:all" and "<node type>:<class>"
    report_path: Path


def run(cfg: DictConfig) -> DiagnosticsReport:
    setup(cfg)
    out = run_dir(cfg)
    predictor = build_predictor(cfg, show_progress=False)
    # τ of the close_to_one weights: the predictor's, else IrEne's default
    tanh_scalar = predictor.get_params().get("tanh_scalar", IreneModel().tanh_scalar)
    label = f"{predictor_class(cfg).name} ({cfg.features.name})"
    params = {**run_params(cfg),
              "predictions": str(cfg.predictions) if cfg.predictions else "leave-one-model-out"}
    with tracked_run(cfg, "diagnose", params) as tracker:
        trees, _ = load_trees(cfg, tracker)  # inside the run: its location and sha256 are logged
        forest = build_forest(trees)
        tracker.log_params({"num_trees": forest.num_trees})
        ratios = child_ratio_table(forest, tanh_scalar=tanh_scalar)
        if cfg.predictions:
            record_input(tracker, "predictions", Path(cfg.predictions), source="predictions")
            forest, predicted = align_predictions(trees, read_trees(cfg.predictions),
                                                   str(cfg.predictions))
        else:
            log.info("leave-one-model-out predictions of %s for the error sources", label)
            predicted = leave_one_model_out(
                forest, predictor, show_progress=bool(cfg.show_progress)).predicted_j
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
