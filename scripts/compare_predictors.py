"""Leave-one-model-out comparison of every predictor, with full and with static features.

    IRENE_DATA_DIR=/path/to/device_1 python scripts/compare_predictors.py [--out table.md]

Runs in-process (no MLflow): for each predictor × {full: model_specs + resource_utilization,
static: model_specs}, the options of ``conf/predictor/<name>.yaml`` and the paper's shared
hyperparameters, then prints markdown tables: model-level % error per left-out model, the
overall (unweighted mean over the left-out models) ml / module / model rows, and timings.
``physics`` needs measured features and is skipped in the static setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irene import predictors  # noqa: E402
from irene.data.forest import build_forest  # noqa: E402
from irene.data.published import PAPER_MODELS, import_device  # noqa: E402
from irene.evaluate.crossval import leave_one_model_out  # noqa: E402
from irene.tables import Table, to_markdown  # noqa: E402

PREDICTORS = ("irene", "irene_plus", "physics", "flat", "sum_of_children")
SETTINGS = {"full": ["model_specs", "resource_utilization"], "static": ["model_specs"]}
NEEDS_MEASURED = {"physics"}




def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("IRENE_DATA_DIR"),
                        help="device folder of the published CSVs (default: $IRENE_DATA_DIR)")
    parser.add_argument("--predictors", nargs="+", default=list(PREDICTORS))
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("set IRENE_DATA_DIR or pass --data")
    forest = build_forest(import_device(args.data, list(PAPER_MODELS)))
    model_rows, overall_rows, timing_rows = {}, {}, {}
    for setting, feature_sets in SETTINGS.items():
        for name in args.predictors:
            if setting == "static" and name in NEEDS_MEASURED:
                continue
            label = f"{name} ({setting})"
            cls = predictors.classes()[name]
            predictor = cls(feature_sets=feature_sets)
            if "show_progress" in predictor.get_params():
                predictor.set_params(show_progress=False)
            start = time.perf_counter()
            result = leave_one_model_out(forest, predictor, show_progress=False)
            seconds = time.perf_counter() - start
            table = result.table
            model_rows[label] = table["model"]
            overall_rows[label] = table.loc["overall"]
            timing_rows[label] = pd.Series({"lomo_seconds": seconds})
            print(f"{label:28s} ml {table.loc['overall', 'ml']:6.2f}  module "
                  f"{table.loc['overall', 'module']:6.2f}  model {table.loc['overall', 'model']:6.2f}"
                  f"  ({seconds:.1f} s)", file=sys.stderr)
    by_model = pd.DataFrame(model_rows)
    by_model.index.name = "left-out model (model-level % error)"
    overall = pd.DataFrame(overall_rows).T
    overall.index.name = "predictor (features)"
    timings = pd.DataFrame(timing_rows).T
    timings.index.name = "predictor (features)"
    text = "\n\n".join([
        f"Device: {args.data}; {forest.num_trees} trees, {forest.num_nodes} nodes; "
        "leave-one-model-out, mean % error, overall = unweighted mean over the left-out models.",
        "### Overall (ml / module / model)", to_markdown(Table.from_frame(overall)),
        "### Model level, per left-out model", to_markdown(Table.from_frame(by_model)),
        "### Time of one whole leave-one-model-out run", to_markdown(Table.from_frame(timings), ".1f"),
    ])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
