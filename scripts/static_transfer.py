"""Static prediction of a model traced by this project, against the published measurements.

For each of the six paper models: train IrEne+ on static features (``model_specs``) on the
published trees of the other five, trace the left-out model at every published (batch, seq)
shape with each tracer convention (``physical``, ``irene``), predict, and compare with the
published measured energies: model-level % error (mean over shapes) and module-level % error
(modules matched by scope). The "published" column predicts the published trees' own
features (the leave-one-model-out number of docs/predict.md).

    IRENE_DATA_DIR=/path/to/device_1 python scripts/static_transfer.py [--default-leaves]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import pandas as pd

from irene.data.forest import build_forest
from irene.data.published import PAPER_MODELS, import_device
from irene.data.tree import Tree, iter_nodes
from irene.predictors.irene_plus import IrenePlusPredictor
from irene.predictors.static import predict_trees, trace_static
from irene.tables import Table, to_markdown

SOURCES = ("published", "physical", "irene")


def train(trees: list[Tree], options: dict):
    """IrEne+ on static features, fitted on ``trees``."""
    return IrenePlusPredictor(feature_sets=["model_specs"], **options).fit(build_forest(trees))


def errors_pct(predicted: list[Tree], measured: list[Tree]) -> tuple[float, float]:
    """Mean absolute % error of the roots and of the modules matched by scope."""
    roots, modules = [], []
    for pred_tree, gold_tree in zip(predicted, measured, strict=True):
        gold = {n["scope"]: n for n in iter_nodes(gold_tree["frontend_tree"])}
        for node in iter_nodes(pred_tree["frontend_tree"]):
            reference = gold.get(node["scope"])
            if reference is None or node["type"] == "ml" or reference["type"] != node["type"]:
                continue
            error = 100 * abs(node["predicted_energy"] / reference["ground_truth_energy"] - 1)
            (roots if node["type"] == "model" else modules).append(error)
    return float(np.mean(roots)), float(np.mean(modules))


def transfer(trees: list[Tree], left_out: str, options: dict, sources: tuple[str, ...]
             ) -> dict[str, float]:
    """Errors of one left-out model, per feature source."""
    predictor = train([t for t in trees if t["model_name"] != left_out], options)
    measured = [t for t in trees if t["model_name"] == left_out]
    shapes = [(int(t["batch_size"]), int(t["seq_len"])) for t in measured]
    row: dict[str, float] = {}
    for source in sources:
        inputs = measured if source == "published" else trace_static(left_out, shapes, convention=source)
        filled = predict_trees(predictor, inputs)[0]
        row[f"{source} model %"], row[f"{source} module %"] = errors_pct(filled, measured)
    return row


def table(trees: list[Tree], options: dict, sources: tuple[str, ...]) -> pd.DataFrame:
    """One row per left-out model and an ``overall`` row (mean of the six)."""
    rows = {}
    for model in PAPER_MODELS:
        start_s = time.perf_counter()
        rows[model] = transfer(trees, model, options, sources)
        print(f"{model}: {rows[model]} ({time.perf_counter() - start_s:.0f} s)", flush=True)
    frame = pd.DataFrame(rows).T
    frame.loc["overall"] = frame.mean()
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--default-leaves",
        action="store_true",
        help="IrEne+'s default leaf degrees (1-3) instead of power laws",
    )
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help=f"comma-separated feature sources among {SOURCES}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not os.environ.get("IRENE_DATA_DIR"):
        raise SystemExit("static_transfer: set IRENE_DATA_DIR to a published device folder")
    trees = import_device(os.environ["IRENE_DATA_DIR"])
    options = {} if args.default_leaves else {"leaf_degrees": [1]}
    start_s = time.perf_counter()
    frame = table(trees, options, tuple(args.sources.split(",")))
    print(f"IrEne+, features=model_specs, options={options}, leave one model out")
    print(to_markdown(Table.from_frame(frame)))
    print(f"({time.perf_counter() - start_s:.0f} s)")


if __name__ == "__main__":
    main()
