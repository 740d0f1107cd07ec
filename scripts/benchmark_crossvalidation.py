"""Benchmark: wall time and peak memory of the device's leave-one-model-out cross-validation.

Each repetition runs in a fresh Python process that reads the cached trees, flattens them and
cross-validates the default (IrEne) config; the parent reports the median wall time of the
cross-validation itself and of the whole process, and the peak resident memory
(``ru_maxrss``) of the child. Run from the project root:

    IRENE_DATA_DIR=../shared/data/irene/device_1 python scripts/benchmark_crossvalidation.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[3]))
from irene.evaluate.crossval import leave_one_model_out
from irene.data.forest import build_forest
from irene.predictors.irene import IreneModel
from irene.data.tree import read_trees
trees = read_trees(sys.argv[1])
t1 = time.perf_counter()
forest = build_forest(trees)
result = leave_one_model_out(forest, IreneModel(engine=sys.argv[2], show_progress=False),
                             show_progress=False)
t2 = time.perf_counter()
print(json.dumps({"cv_s": t2 - t1, "total_s": t2 - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "overall": result.table.loc["overall"].round(2).to_dict()}))
"""


def cached_trees() -> Path:
    """Import the device once (outside the timing) through the pipeline's cache."""
    from hydra import compose, initialize_config_dir

    from pipelines.config import register_configs
    from pipelines.data import load_trees
    from pipelines.tracking import NullTracker

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config")
    return load_trees(cfg, NullTracker())[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="numpy,torch",
                        help="comma-separated: numpy (default engine), torch (autograd)")
    args = parser.parse_args()
    trees = cached_trees()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print(f"trees: {trees}; {args.repeats} runs per engine; torch threads: {args.threads}; "
          f"cores: {os.cpu_count()}")
    rows = []
    for engine in args.engines.split(","):
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(trees), engine, str(args.threads)],
                                 cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            record = json.loads(out.stdout.strip().splitlines()[-1])
            record["process_s"] = time.perf_counter() - start
            runs.append(record)
        rows.append((engine, runs))
    print("| engine | CV wall s (median) | CV min–max s | process s (median) | peak RSS MiB (max) | "
          "overall ml / module / model |")
    print("|---|---|---|---|---|---|")
    for engine, runs in rows:
        cv = [r["cv_s"] for r in runs]
        overall = runs[0]["overall"]
        print(f"| {engine} | {statistics.median(cv):.2f} | {min(cv):.2f}–{max(cv):.2f} | "
              f"{statistics.median(r['process_s'] for r in runs):.2f} | "
              f"{max(r['peak_rss_mib'] for r in runs):.0f} | "
              f"{overall['ml']:.2f} / {overall['module']:.2f} / {overall['model']:.2f} |")


if __name__ == "__main__":
    main()
