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

from irene.crossval import leave_one_model_out
from irene.diagnostics import child_ratio_table, error_sources, report_markdown
from irene.forest import build_forest
from irene.io import atomic_write_text
from irene.tree import read_trees
from pipelines.common import (
    ablation_params,
    irene_config,
    load_trees,
    log,
    log_artifact,
    log_metrics,
    make_predictor,
    run_dir,
    setup,
    tracked_run,
    write_table,
)


@dataclass
class DiagnosticsReport:
    ratios: pd.DataFrame  # rows: "<node type>:<class>" + "all"
    sources: pd.DataFrame  # rows: "<node type>:all" and "<node type>:<class>"
    report_path: Path


def run(cfg: DictConfig) -> DiagnosticsReport:
    setup(cfg)
    out = run_dir(cfg)
    trees, _ = load_trees(cfg)
    forest = build_forest(trees)
    config = irene_config(cfg)
    label = f"{cfg.predictor.name} ({cfg.features.name})"
    params = {**ablation_params(cfg), "num_trees": forest.num_trees,
              "predictions": str(cfg.predictions) if cfg.predictions else "leave-one-model-out"}
    with tracked_run(cfg, "diagnose", params, run_name="diagnose"):
        ratios = child_ratio_table(forest, tanh_scalar=config.tanh_scalar)
        if cfg.predictions:
            from pipelines.evaluate import gold_and_predicted

            forest, predicted = gold_and_predicted(trees, read_trees(cfg.predictions),
                                                   str(cfg.predictions))
        else:
            log.info("leave-one-model-out predictions of %s for the error sources", label)
            predicted = leave_one_model_out(
                forest, lambda: make_predictor(cfg, show_progress=False),
                show_progress=config.show_progress).predicted_j
        sources = error_sources(forest, predicted)
        paths = write_table(ratios, out, "child_ratios", floatfmt=".3f")
        paths += write_table(sources, out, "error_sources")
        report = atomic_write_text(out / "diagnostics.md",
                                   report_markdown(ratios, {label: sources},
                                                   tanh_scalar=config.tanh_scalar) + "\n")
        metrics = {"parents_outside_tau_pct": float(ratios.loc["all", "outside_tau_pct"])}
        for node_type in ("module", "model"):
            key = f"{node_type}:all"
            if key in sources.index:
                metrics[f"{node_type}_leaf_part_pct"] = float(sources.loc[key, "abs_leaf_part_pct"])
                metrics[f"{node_type}_aggregation_part_pct"] = float(
                    sources.loc[key, "abs_aggregation_part_pct"])
        log_metrics(metrics)
        for path in [*paths, report]:
            log_artifact(path, "report")
    print(f"diagnostics report: {report}")
    return DiagnosticsReport(ratios=ratios, sources=sources, report_path=report)
