"""The main job's overhead: a warm ``python run.py stage=crossvalidate`` against the
cross-validation's own compute time, side by side in one session.

    python scripts/benchmark_main_job.py [--repeats 9] [--threads 1] [--checkout PATH]

For each repeat, in alternation: (1) the whole job as a user runs it (a fresh process,
tracking to a temporary sqlite store that already exists, the device's trees already
cached), wall time from start to exit; (2) in a fresh process, the leave-one-model-out
cross-validation of the same predictor on the same cached trees, timed around the call
alone. Reports medians, their ratio and the median of the ratios of each pair (the two
timings of one repeat ran one after the other, so they share the machine's load). The
default ``--threads 1`` is what ``threads=0`` (the default) gives the predictors.
``--checkout`` times another checkout (e.g. an older commit) with this machine's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The compute alone: import what the fold loop needs, then time leave_one_model_out only.
CV_ONLY = r"""
import glob, json, sys, time
try:  # one thread count for every library, without importing torch
    from irene.threads import limit_threads
except ImportError:  # before irene/threads.py: torch was imported anyway
    import torch
    from threadpoolctl import threadpool_limits
    def limit_threads(n):
        torch.set_num_threads(n)
        threadpool_limits(n)
limit_threads(int(sys.argv[2]))
try:  # this layout
    from irene.data.forest import build_forest
    from irene.data.tree import read_trees
    from irene.evaluate.crossval import leave_one_model_out
    from irene.predictors.irene import IreneModel
    make = IreneModel(show_progress=False)
except ImportError:  # the layout before irene/data, irene/predictors
    from irene.crossval import leave_one_model_out
    from irene.forest import build_forest
    from irene.model import IreneConfig, IreneModel
    from irene.tree import read_trees
    make = lambda: IreneModel(IreneConfig(show_progress=False))
forest = build_forest(read_trees(sys.argv[1]))
start = time.perf_counter()
leave_one_model_out(forest, make, show_progress=False)
print(json.dumps({"cv_s": time.perf_counter() - start}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkout", type=Path, default=ROOT)
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    outputs = Path(tempfile.mkdtemp(prefix="irene-bench-"))
    env = {**os.environ, "IRENE_OUTPUTS": str(outputs), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(checkout)}
    uri = f"sqlite:///{outputs / 'mlflow.db'}"
    # the user's command with its defaults (progress bar included), its store and run folders
    # under the temporary outputs folder
    job = [sys.executable, "run.py", "stage=crossvalidate", f"tracking.uri={uri}",
           f"threads={args.threads}", f"hydra.run.dir={outputs}/runs/${{now:%H-%M-%S-%f}}"]
    # warm-up: creates the store and the tree cache (of either layout) outside the timing
    subprocess.run(job, cwd=checkout, env=env, check=True, capture_output=True)
    caches = (sorted((outputs / "cache").glob("*.jsonl"))
              or sorted((checkout / "outputs" / "cache").glob("*.jsonl")))
    trees = caches[-1]
    walls, cvs = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        subprocess.run(job, cwd=checkout, env=env, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
        out = subprocess.run([sys.executable, "-c", CV_ONLY, str(trees), str(args.threads)],
                             cwd=checkout, env=env, check=True, capture_output=True, text=True)
        cvs.append(json.loads(out.stdout.strip().splitlines()[-1])["cv_s"])
    wall, cv = statistics.median(walls), statistics.median(cvs)
    pairs = sorted(w / c for w, c in zip(walls, cvs, strict=True))
    print(f"checkout {checkout} ({args.repeats} repeats, {args.threads} threads, {os.cpu_count()} cores)")
    print("| | median s | min–max s |")
    print("|---|---|---|")
    print(f"| whole job (`run.py stage=crossvalidate`) | {wall:.1f} | {min(walls):.1f}–{max(walls):.1f} |")
    print(f"| cross-validation alone | {cv:.1f} | {min(cvs):.1f}–{max(cvs):.1f} |")
    print(f"| ratio of the medians | {wall / cv:.2f} | |")
    print(f"| ratio per pair (median, min–max) | {statistics.median(pairs):.2f} | "
          f"{pairs[0]:.2f}–{pairs[-1]:.2f} |")


if __name__ == "__main__":
    main()
