"""The main job's overhead: a warm ``python run.py stage=crossvalidate`` against the
cross-validation's own compute time, side by side in one session.

    python scripts/benchmark_main_job.py [--repeats 9] [--threads 1]
        [--variant LABEL=CHECKOUT[:OVERRIDE,...]] ...

For each repeat, in alternation: (1) the whole job as a user runs it (a fresh process,
tracking to a temporary sqlite store that already exists, the device's trees already
cached), wall time from start to exit; (2) in a fresh process, the leave-one-model-out
cross-validation of the same predictor on the same cached trees, timed around the call
alone. Reports medians, their ratio and the median of the ratios of each pair (the two
timings of one repeat ran one after the other, so they share the machine's load). The
default ``--threads 1`` is what ``threads=0`` (the default) gives the predictors.

``--variant`` (repeatable) times another checkout (e.g. an older commit, with this
machine's environment) and/or the job with extra overrides; the variants alternate repeat by
repeat, each with its own outputs folder, and the table compares each with the first:
``--variant now=. --variant before=/tmp/before --variant fg=.:tracking.background=false``.
Without it, this checkout alone is timed.
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


class Variant:
    """One side of the comparison: a checkout, extra overrides, its own outputs folder."""

    def __init__(self, spec: str, threads: int):
        label, _, rest = spec.partition("=")
        checkout, _, overrides = (rest or str(ROOT)).partition(":")
        self.label, self.checkout = label, Path(checkout).resolve()
        self.overrides = [o for o in overrides.split(",") if o]
        self.outputs = Path(tempfile.mkdtemp(prefix=f"irene-bench-{label}-"))
        self.env = {**os.environ, "IRENE_OUTPUTS": str(self.outputs),
                    "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "OPENBLAS_NUM_THREADS": str(threads), "PYTHONPATH": str(self.checkout)}
        uri = f"sqlite:///{self.outputs / 'mlflow.db'}"
        # the user's command with its defaults (progress bar included), its store and run
        # folders under the temporary outputs folder
        self.job = [sys.executable, "run.py", "stage=crossvalidate", f"tracking.uri={uri}",
                    f"threads={threads}", f"hydra.run.dir={self.outputs}/runs/${{now:%H-%M-%S-%f}}",
                    *self.overrides]
        self.walls: list[float] = []
        self.cvs: list[float] = []

    def warm_up(self) -> None:
        """Create the store and the tree cache (of either layout) outside the timing."""
        subprocess.run(self.job, cwd=self.checkout, env=self.env, check=True, capture_output=True)
        caches = (sorted((self.outputs / "cache").glob("*.jsonl"))
                  or sorted((self.checkout / "outputs" / "cache").glob("*.jsonl")))
        self.trees = caches[-1]

    def once(self, threads: int) -> None:
        start = time.perf_counter()
        subprocess.run(self.job, cwd=self.checkout, env=self.env, check=True, capture_output=True)
        self.walls.append(time.perf_counter() - start)
        out = subprocess.run([sys.executable, "-c", CV_ONLY, str(self.trees), str(threads)],
                             cwd=self.checkout, env=self.env, check=True, capture_output=True,
                             text=True)
        self.cvs.append(json.loads(out.stdout.strip().splitlines()[-1])["cv_s"])

    def row(self) -> tuple[str, float, float]:
        wall, cv = statistics.median(self.walls), statistics.median(self.cvs)
        pairs = sorted(w / c for w, c in zip(self.walls, self.cvs, strict=True))
        text = (f"| {self.label} ({self.checkout}{' ' + ' '.join(self.overrides) if self.overrides else ''}) "
                f"| {wall:.1f} ({min(self.walls):.1f}–{max(self.walls):.1f}) | {cv:.1f} "
                f"| {wall / cv:.2f} | {statistics.median(pairs):.2f} ({pairs[0]:.2f}–{pairs[-1]:.2f}) |")
        return text, wall, cv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", action="append", default=[],
                        help="LABEL=CHECKOUT[:OVERRIDE,...]; repeatable (default: this checkout)")
    args = parser.parse_args()
    variants = [Variant(spec, args.threads) for spec in args.variant or [f"now={ROOT}"]]
    for variant in variants:
        variant.warm_up()
    for _ in range(args.repeats):
        for variant in variants:  # alternate, so every variant sees the same machine load
            variant.once(args.threads)
    print(f"{args.repeats} repeats, {args.threads} threads, {os.cpu_count()} cores")
    print("| variant | whole job, median (min–max) s | cross-validation alone s "
          "| ratio of medians | ratio per pair, median (min–max) |")
    print("|---|---|---|---|---|")
    rows = [variant.row() for variant in variants]
    for text, _, _ in rows:
        print(text)
    for variant, (_, wall, _) in zip(variants[1:], rows[1:], strict=True):
        print(f"whole job, {variant.label} / {variants[0].label}: {wall / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
