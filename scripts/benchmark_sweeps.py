"""Benchmark: wall time of the paper's ablation presets (feature × strategy, weighting) on one
device, with the joblib launcher and serially, side by side.

Every repetition uses a fresh sqlite store in a temp folder (created once before the jobs,
as the sweep callback does) and ``resume=false``, so every job really runs. Run from the
project root:

    IRENE_DATA_DIR=../shared/data/irene/device_1 python scripts/benchmark_sweeps.py --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("feature_strategy_ablation", "weighting_ablation")
LAUNCHERS = {"joblib": ["hydra/launcher=joblib"], "serial": []}


def one_pass(launcher: str, store: Path) -> float:
    start = time.perf_counter()
    for preset in PRESETS:
        subprocess.run(
            [sys.executable, "run.py", "-m", f"experiment={preset}", "resume=false",
             f"tracking.uri=sqlite:///{store}", f"hydra.sweep.dir={store.parent / preset}",
             *LAUNCHERS[launcher]],
            cwd=ROOT, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    subprocess.run([sys.executable, "run.py", "stage=featurize", "tracking=off"], cwd=ROOT,
                   check=True, capture_output=True)  # import + cache the trees once, untimed
    times: dict[str, list[float]] = {name: [] for name in LAUNCHERS}
    for _ in range(args.repeats):
        for name in LAUNCHERS:  # alternate, so both see the same machine load
            with tempfile.TemporaryDirectory() as tmp:
                times[name].append(one_pass(name, Path(tmp) / "mlflow.db"))
    print(f"presets: {' + '.join(PRESETS)} (18 jobs); cores: {os.cpu_count()}; "
          f"repeats: {args.repeats}")
    print("| launcher | wall s (median) | runs |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.0f} | "
              f"{', '.join(f'{v:.0f}' for v in values)} |")
    ratio = statistics.median(times["serial"]) / statistics.median(times["joblib"])
    print(f"serial / joblib: {ratio:.2f}x")


if __name__ == "__main__":
    main()
