"""Benchmark: wall time of the paper's ablation presets (feature × strategy, weighting) on one
device, with the joblib launcher and serially, side by side.

Every repetition uses a fresh sqlite store in a temp folder (created once before the jobs,
as the sweep callback does) and ``resume=false``, so every job really runs. Run from the
project root:

    IRENE_DATA_DIR=../shared/data/irene/device_1 python scripts/benchmark_sweeps.py --repeats 2

``--presets feature_strategy_ablation --launchers serial`` times the 9-job sweep alone;
``--checkout PATH`` (repeatable) times other checkouts (e.g. an older commit, with this
machine's environment) side by side: every (checkout, launcher) alternates repeat by repeat.
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


def one_pass(checkout: Path, presets: list[str], launcher: str, store: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}  # the checkout's outputs/: its tree cache
    start = time.perf_counter()
    for preset in presets:
        subprocess.run(
            [sys.executable, "run.py", "-m", f"experiment={preset}", "resume=false",
             f"tracking.uri=sqlite:///{store}", f"hydra.sweep.dir={store.parent / preset}",
             *LAUNCHERS[launcher]],
            cwd=checkout, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=list(LAUNCHERS))
    parser.add_argument("--checkout", type=Path, action="append", default=[],
                        help="a checkout to time (repeatable; default: this one)")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout] or [ROOT]
    for checkout in checkouts:  # import + cache the trees once, untimed
        subprocess.run([sys.executable, "run.py", "stage=featurize", "tracking=off"], cwd=checkout,
                       env={**os.environ, "PYTHONPATH": str(checkout)}, check=True,
                       capture_output=True)
    sides = [(checkout, launcher) for checkout in checkouts for launcher in args.launchers]
    times: dict[tuple[Path, str], list[float]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side in sides:  # alternate, so every side sees the same machine load
            with tempfile.TemporaryDirectory() as tmp:
                times[side].append(one_pass(*side[:1], args.presets, side[1], Path(tmp) / "mlflow.db"))
    print(f"presets: {' + '.join(args.presets)}; cores: {os.cpu_count()}; repeats: {args.repeats}")
    print("| checkout | launcher | wall s (median) | runs |")
    print("|---|---|---|---|")
    for (checkout, launcher), values in times.items():
        print(f"| {checkout} | {launcher} | {statistics.median(values):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in values)} |")
    first = sides[0]
    for side in sides[1:]:
        ratio = statistics.median(times[side]) / statistics.median(times[first])
        print(f"{side[0]} {side[1]} / {first[0]} {first[1]}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
