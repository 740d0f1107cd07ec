"""Benchmark: how the cost of leave-one-model-out cross-validation grows with the number of models.

Synthetic data sets are made from both devices' trees: every source model (device 1's and
device 2's, interleaved) is copied under new model names until the data set holds N models,
each copy's measured energies multiplied by a random factor exp(N(0, 0.05²)) per measured
value (``--perturb value``: nodes that share a measurement, identical layers measured once,
keep sharing one) or per node (``--perturb node``); the features stay those of the source.
Each size is cross-validated in a fresh Python process (load the flattened forest,
``leave_one_model_out``) with the thread count set; the parent records the
cross-validation's wall time, the child's peak resident memory (VmHWM) and the overall
errors, fits the exponent b of ``time ∝ models^b`` (least squares of log time on log
models) and prints a markdown table. ``--before REV`` runs the same children at another
commit, checked out with ``git worktree`` under /tmp, alternating with this checkout size by
size, so the table compares them side by side. ``--folds K`` times only the first K folds of
the larger sizes (scaled by models/K). ``--together`` cross-validates this checkout with the
folds trained together (IrEne's ``fit_folds``; every fold is then run and timed). Run from
the project root:

    IRENE_DATA_DIR=/path/to/irene python scripts/benchmark_scale.py --before 549dfff
    python scripts/benchmark_scale.py --profile 96 --predictors irene   # cProfile: 2 folds at 96

(``$IRENE_DATA_DIR`` holds ``device_1/`` and ``device_2/``.)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREDICTORS = {"irene": "IrEne", "irene_plus": "IrEne+"}

CHILD = r"""
import json, sys, time
forest_path, predictor_name, profile = sys.argv[1], sys.argv[2], int(sys.argv[3])
from irene.data.forest import load_forest
from irene.evaluate.crossval import leave_one_model_out
from irene.predictors import IreneModel, IrenePlusPredictor
predictor = (IreneModel(show_progress=False) if predictor_name == "irene"
             else IrenePlusPredictor())
forest = load_forest(forest_path)
if profile:  # the first `folds` folds of the cross-validation, as it runs them, profiled
    import cProfile, pstats
    import numpy as np
    from irene.predictors.base import clone
    folds = int(sys.argv[4]) or 2
    names = np.asarray(forest.model_names, dtype=object)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    if sys.argv[5] == "1":  # --together: the whole cross-validation, its folds trained together
        folds = len(set(names))
        leave_one_model_out(forest, predictor, show_progress=False, together=True)
    for left_out in list(dict.fromkeys(forest.model_names))[:folds] if sys.argv[5] != "1" else []:
        clone(predictor).fit(forest.subset(names != left_out)).predict(forest.subset(names == left_out))
    profiler.disable()
    print(f"{folds} folds of {len(set(names))} models: {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(int(profile))
    sys.exit(0)
folds = int(sys.argv[4])
together = sys.argv[5] == "1"  # the folds trained together: every fold runs, never --folds
models = len(set(forest.model_names))
start = time.perf_counter()
if folds and folds < models and not together:  # the first `folds` folds as leave_one_model_out runs them
    import numpy as np
    from irene.predictors.base import clone
    names = np.asarray(forest.model_names, dtype=object)
    for left_out in list(dict.fromkeys(forest.model_names))[:folds]:
        clone(predictor).fit(forest.subset(names != left_out)).predict(forest.subset(names == left_out))
    overall = None
else:
    folds = models
    kwargs = {"together": True} if together else {}  # older commits lack the argument
    overall = leave_one_model_out(forest, predictor, show_progress=False, **kwargs).overall()
wall = (time.perf_counter() - start) * models / folds
# VmHWM, not ru_maxrss: Linux keeps the forking parent's maximum across exec
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(json.dumps({"wall_s": wall, "peak_rss_mib": int(status.split()[0]) / 1024,
                  "nodes": forest.num_nodes, "trees": forest.num_trees, "folds_run": folds,
                  "overall": overall and {k: round(v, 4) for k, v in overall.items()}}))
"""


def source_trees(devices: list[str]) -> list[list[dict]]:
    """Every device's trees through the pipeline's import cache (read once, outside timing)."""
    from hydra import compose, initialize_config_dir

    from irene.data.tree import read_trees
    from pipelines.config import register_configs
    from pipelines.data import load_trees
    from pipelines.tracking import NullTracker

    register_configs()
    out = []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for device in devices:
            cfg = compose("config", overrides=[f"data={device}"])
            out.append(read_trees(load_trees(cfg, NullTracker())[1]))
    return out


def synthetic_trees(sources: list[list[dict]], models: int, seed: int = 0,
                    perturb: str = "value") -> list[dict]:
    """``models`` models: the source models, interleaved across devices and repeated, each
    copy renamed (model name and node ids) and its energies perturbed: per measured value
    (``perturb="value"``: the nodes of a copy that share a measurement, identical layers
    measured once, still share one, as in the published data) or per node (``"node"``:
    every leaf row distinct)."""
    by_device = []
    for device, trees in enumerate(sources, start=1):
        names = list(dict.fromkeys(t["model_name"] for t in trees))
        by_device.append([(device, name, [t for t in trees if t["model_name"] == name])
                          for name in names])
    order = [entry for group in zip(*by_device, strict=True) for entry in group]
    rng = random.Random(seed)
    out = []
    for i in range(models):
        device, name, trees = order[i % len(order)]
        new_name = f"d{device}-{name}-{i // len(order)}"
        factors: dict[float, float] = {}  # one factor per measured value of this copy
        for tree in trees:
            tree = copy.deepcopy(tree)
            tree["model_name"] = new_name
            stack = [tree["frontend_tree"]]
            while stack:
                node = stack.pop()
                node["id"] = f"{new_name}/{node['id']}"
                energy = node.get("ground_truth_energy")
                if energy is not None:
                    if perturb == "node" or energy not in factors:
                        factors[energy] = math.exp(rng.gauss(0.0, 0.05))
                    node["ground_truth_energy"] = energy * factors[energy]
                stack.extend(node["child_nodes_obj"])
            out.append(tree)
    return out


def write_data_sets(devices: list[str], files: dict[int, Path], perturb: str) -> None:
    """The synthetic data set of every size, flattened (``save_forest``), unless already there."""
    todo = {n: path for n, path in files.items() if not path.exists()}
    if not todo:
        return
    from irene.data.forest import build_forest, save_forest

    sources = source_trees(devices)
    for n, path in todo.items():
        save_forest(build_forest(synthetic_trees(sources, n, perturb=perturb)), path)


def run_child(checkout: Path, data: Path, predictor: str, threads: int, profile: int = 0,
              folds: int = 0, together: bool = False) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONDONTWRITEBYTECODE": "1"}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(data), predictor, str(profile),
                           str(folds), "1" if together else "0"],
                          cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({checkout}, {data.name}, {predictor}):\n{done.stderr[-3000:]}")
    if profile:
        print(done.stderr, file=sys.stderr)
        return None
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["process_s"] = time.perf_counter() - start
    return record


def exponent(points: list[tuple[int, float]]) -> float:
    """Slope of log(time) against log(models), least squares."""
    if len(points) < 2:
        return float("nan")
    xs = [math.log(m) for m, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
            / sum((x - mx) ** 2 for x in xs))


def worktree(rev: str) -> Path:
    """A detached worktree of ``rev`` under /tmp (reused when it is already there)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"irene-scale-{sha}"
    if not (path / "irene").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT,
                       check=True, capture_output=True)
    return path


def parse_skip(values: list[str]) -> set[tuple[str, str, int]]:
    """``variant:predictor:models`` triples not to run (e.g. ``before:irene_plus:96``)."""
    out = set()
    for value in values:
        variant, predictor, models = value.split(":")
        out.add((variant, predictor, int(models)))
    return out


def fmt_time(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.1f} s"


def fmt_mem(mib: float | None) -> str:
    if mib is None:
        return "–"
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="6,12,24,48,96", help="model counts for IrEne")
    parser.add_argument("--plus-sizes", default="6,12,24,48", help="model counts for IrEne+")
    parser.add_argument("--predictors", default="irene,irene_plus")
    parser.add_argument("--devices", default="device_1,device_2")
    parser.add_argument("--perturb", choices=["value", "node"], default="value",
                        help="energies of a copy perturbed per measured value or per node")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (median)")
    parser.add_argument("--before", help="a commit to run side by side (git worktree in /tmp)")
    parser.add_argument("--no-now", action="store_true", help="run only the --before commit")
    parser.add_argument("--skip", action="append", default=[],
                        help="variant:predictor:models not to run, e.g. before:irene_plus:96")
    parser.add_argument("--data-dir", help="keep the synthetic data sets here (default: a temp folder)")
    parser.add_argument("--profile", type=int, default=0,
                        help="cProfile one size (this many models) of this checkout instead")
    parser.add_argument("--profile-folds", type=int, default=2, help="folds to profile")
    parser.add_argument("--folds", type=int, default=0,
                        help="time only the first FOLDS folds of sizes >= --folds-from and scale "
                             "the time by models/FOLDS (every fold trains on all models but one; "
                             "the work shared across folds is then counted more than once)")
    parser.add_argument("--folds-from", type=int, default=24)
    parser.add_argument("--together", action="store_true",
                        help="this checkout trains the folds together "
                             "(leave_one_model_out(together=True)); it then runs every fold, "
                             "whatever --folds")
    parser.add_argument("--json", help="also write every run's record to this file")
    args = parser.parse_args()

    predictors = args.predictors.split(",")
    sizes = {"irene": [int(s) for s in args.sizes.split(",")],
             "irene_plus": [int(s) for s in args.plus_sizes.split(",")]}
    if args.profile:
        sizes = {p: [args.profile] for p in predictors}
    variants = [] if args.no_now and args.before else [("now", ROOT)]
    if args.before and not args.profile:
        variants.insert(0, ("before", worktree(args.before)))
    skip = parse_skip(args.skip)

    with tempfile.TemporaryDirectory(prefix="irene-scale-") as tmp:
        data_dir = Path(args.data_dir or tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        files = {n: data_dir / f"synthetic-{n}-{args.perturb}.forest.npz"
                 for n in sorted({n for p in predictors for n in sizes[p]})}
        write_data_sets(args.devices.split(","), files, args.perturb)
        if args.profile:
            for predictor in predictors:
                print(f"## {PREDICTORS[predictor]}, {args.profile} models", file=sys.stderr)
                run_child(ROOT, files[args.profile], predictor, args.threads, profile=25,
                          folds=args.profile_folds or 2, together=args.together)
            return
        print(f"threads {args.threads}; {args.repeats} run(s) per cell; variants: "
              + ", ".join(f"{name}={path}" for name, path in variants), flush=True)
        results: dict[tuple[str, str, int], list[dict]] = {}
        for predictor in predictors:
            for n in sizes[predictor]:
                for _ in range(args.repeats):
                    for name, path in variants:  # alternate the variants size by size
                        if (name, predictor, n) in skip:
                            continue
                        folds = args.folds if n >= args.folds_from else 0
                        record = run_child(path, files[n], predictor, args.threads, folds=folds,
                                           together=args.together and name == "now")
                        results.setdefault((name, predictor, n), []).append(record)
                        print(f"{name} {predictor} {n} models ({record['folds_run']} folds run): "
                              f"{record['wall_s']:.1f} s, "
                              f"{record['peak_rss_mib']:.0f} MiB, overall {record['overall']}",
                              flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(
                [{"variant": v, "predictor": p, "models": n, "runs": r}
                 for (v, p, n), r in results.items()], indent=1))
    print_table(results, predictors, sizes, [name for name, _ in variants])


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def print_table(results: dict, predictors: list[str], sizes: dict, variants: list[str]) -> None:
    header = ["models"]
    for predictor in predictors:
        for variant in variants:
            header += [f"{PREDICTORS[predictor]} time, {variant}",
                       f"{PREDICTORS[predictor]} peak RSS, {variant}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    every = sorted({n for p in predictors for n in sizes[p]})
    for n in every:
        cells = [str(n)]
        for predictor in predictors:
            for variant in variants:
                runs = results.get((variant, predictor, n))
                mark = "≈ " if runs and runs[0]["folds_run"] < n else ""
                cells.append(mark + fmt_time(median([r["wall_s"] for r in runs])) if runs else "–")
                cells.append(fmt_mem(max(r["peak_rss_mib"] for r in runs) if runs else None))
        print("| " + " | ".join(cells) + " |")
    cells = ["exponent"]
    for predictor in predictors:
        for variant in variants:
            points = [(n, median([r["wall_s"] for r in results[(variant, predictor, n)]]))
                      for n in sizes[predictor] if (variant, predictor, n) in results]
            span = f" ({points[0][0]}..{points[-1][0]})" if points else ""
            cells += [f"{exponent(points):.2f}{span}", ""]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
