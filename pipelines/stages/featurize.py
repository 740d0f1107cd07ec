"""``stage=featurize``: import the published CSVs into trees and write the feature tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.paths import log
from pipelines.stage import Context, Stage


@dataclass
class FeaturizeResult:
    trees_path: Path
    features_path: Path
    num_trees: int
    num_nodes: int


@dataclass
class FeaturizeSettings:
    """No settings of its own: the data set (``data``) is all it reads."""


def run(ctx: Context, settings: FeaturizeSettings) -> FeaturizeResult:
    import pandas as pd

    from irene.data.forest import ALL_FEATURES, build_forest
    from irene.data.io import atomic_write_text
    from irene.data.tree import NODE_TYPES, write_trees

    out = ctx.run_dir
    with ctx.tracked_run({"data": ctx.data_name, "models": ctx.data_models}) as tracker:
        trees, source = ctx.load_trees(tracker)
        trees_path = write_trees(out / "trees.jsonl", trees, protect=[source])
        forest = build_forest(trees)
        names = dict(enumerate(map(str, NODE_TYPES)))
        table = pd.DataFrame(forest.features, columns=list(ALL_FEATURES))
        table.insert(0, "id", forest.ids)
        table.insert(1, "model_name", forest.node_model_names())
        table.insert(2, "node_type", [names[c] for c in forest.node_type])
        table.insert(3, "instance_type", forest.instance_type)
        table["ground_truth_energy"] = forest.gold_j
        features_path = atomic_write_text(out / "features.csv", table.to_csv(index=False))
        counts = table.groupby(["model_name", "node_type"]).size().unstack(fill_value=0)
        log.info("%d trees, %d nodes\n%s", forest.num_trees, forest.num_nodes, counts)
        tracker.log_metrics({"num_trees": forest.num_trees, "num_nodes": forest.num_nodes})
        tracker.log_artifact(trees_path, "data")
        tracker.log_artifact(features_path, "data")
    print(f"trees: {trees_path}")
    print(f"features: {features_path}")
    return FeaturizeResult(trees_path, features_path, forest.num_trees, forest.num_nodes)


STAGE = Stage("featurize", FeaturizeSettings, run)
