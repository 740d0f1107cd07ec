"""``stage=evaluate``: mean absolute % error per node type, per model and per primitive."""

from __future__ import annotations

from omegaconf import DictConfig

from irene.forest import build_forest
from irene.metrics import error_tables
from irene.tree import read_trees
from pipelines.common import (
    load_trees,
    log_artifact,
    log_metrics,
    run_dir,
    setup,
    to_markdown,
    tracked_run,
    write_table,
)


def gold_and_predicted(gold_trees: list, predicted_trees: list, where: str):
    """Align predictions to gold by node id (as the public evaluator does)."""
    import numpy as np

    from irene.tree import iter_nodes

    predicted = {n["id"]: n.get("predicted_energy") for t in predicted_trees
                 for n in iter_nodes(t["frontend_tree"])}
    forest = build_forest(gold_trees)
    missing = [i for i in forest.ids if predicted.get(i) is None]
    if missing:
        raise ValueError(f"{where}: field 'predicted_energy': missing for {len(missing)} nodes, "
                         f"e.g. id {missing[0]!r}")
    return forest, np.asarray([predicted[i] for i in forest.ids], dtype=float)


def run(cfg: DictConfig) -> dict:
    setup(cfg)
    if not cfg.predictions:
        raise ValueError("stage=evaluate needs predictions=<predicted trees jsonl>")
    out = run_dir(cfg)
    with tracked_run(cfg, "evaluate", {"predictions": str(cfg.predictions)}):
        gold_trees = (read_trees(cfg.trees, require_energy=True) if cfg.trees
                      else load_trees(cfg)[0])
        predicted_trees = read_trees(cfg.predictions)
        forest, predicted = gold_and_predicted(gold_trees, predicted_trees, cfg.predictions)
        tables = error_tables(forest, predicted)
        for name, table in tables.items():
            for path in write_table(table, out, f"errors_{name}"):
                log_artifact(path, "report")
        summary = {t: float(v) for t, v in tables["by_node_type"]["mean"].items()}
        log_metrics(summary)
    print("Mean percentage error by node type")
    print(to_markdown(tables["by_node_type"]))
    print(to_markdown(tables["by_model"]))
    print(f"reports: {out}")
    return summary
