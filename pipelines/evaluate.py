"""``stage=evaluate``: mean absolute % error per node type, per model and per primitive."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from irene.data.tree import read_trees
from irene.errors import SettingsError
from irene.evaluate.metrics import align_predictions, error_tables
from irene.tables import Table, to_markdown, write_table
from pipelines.data import load_trees, record_input
from pipelines.paths import run_dir, setup
from pipelines.tracking import tracked_run


def run(cfg: DictConfig) -> dict:
    setup(cfg)
    if not cfg.predictions:
        raise SettingsError("stage=evaluate needs predictions=<predicted trees jsonl>")
    out = run_dir(cfg)
    with tracked_run(cfg, "evaluate", {"predictions": str(cfg.predictions)}) as tracker:
        if cfg.trees:
            gold_trees = read_trees(cfg.trees, require_energy=True)
            record_input(tracker, "trees", Path(cfg.trees), source="trees")
        else:
            gold_trees = load_trees(cfg, tracker)[0]
        predicted_trees = read_trees(cfg.predictions)
        record_input(tracker, "predictions", Path(cfg.predictions), source="predictions")
        forest, predicted = align_predictions(gold_trees, predicted_trees, cfg.predictions)
        tables = error_tables(forest, predicted)
        for name, table in tables.items():
            for path in write_table(Table.from_frame(table), out, f"errors_{name}"):
                tracker.log_artifact(path, "report")
        summary = {t: float(v) for t, v in tables["by_node_type"]["mean"].items()}
        tracker.log_metrics(summary)
    print("Mean percentage error by node type")
    print(to_markdown(Table.from_frame(tables["by_node_type"])))
    print(to_markdown(Table.from_frame(tables["by_model"])))
    print(f"reports: {out}")
    return summary
