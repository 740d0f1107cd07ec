"""``stage=evaluate``: mean absolute % error per node type, per model and per primitive."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from irene.errors import SettingsError
from pipelines.stage import Context, Stage


@dataclass
class EvaluateSettings:
    trees: str | None = None  # predict/evaluate: input trees (default: the data set)
    predictions: str | None = None  # evaluate, diagnose: predicted trees


def run(ctx: Context, settings: EvaluateSettings) -> dict:
    from irene.data.provenance import check_same_device, device_ids
    from irene.data.tree import read_trees
    from irene.evaluate.metrics import align_predictions, error_tables
    from irene.tables import Table, to_markdown, write_table
    from pipelines.data import read_identified, record_input

    if not settings.predictions:
        raise SettingsError("stage=evaluate needs predictions=<predicted trees jsonl>")
    out = ctx.run_dir
    with ctx.tracked_run({"predictions": str(settings.predictions)}) as tracker:
        if settings.trees:
            gold_trees = read_trees(settings.trees, require_energy=True)
            digest = record_input(tracker, "trees", Path(settings.trees), source="trees")
            gold_trees = read_identified(gold_trees, Path(settings.trees), digest, ctx.data_name,
                                         tracker, prefix="trees")
            measured = f"trees={settings.trees}"
        else:
            gold_trees, source = ctx.load_trees(tracker)
            measured = f"the data set (data.name={ctx.data_name}, {source})"
        predicted_trees = read_trees(settings.predictions)
        record_input(tracker, "predictions", Path(settings.predictions), source="predictions")
        check_same_device(gold_trees, predicted_trees, settings.predictions, measured)
        tracker.set_tags({"predictions.device": "+".join(device_ids(predicted_trees))})
        forest, predicted = align_predictions(gold_trees, predicted_trees, settings.predictions)
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


STAGE = Stage("evaluate", EvaluateSettings, run)
