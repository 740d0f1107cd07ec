"""Learning curves of a new device from k of its measurements (issue 19), as markdown tables.

Four experiments, each leaving one target model out and drawing k configurations of the
target's other models (irene/transfer.py):

1. device 1 -> device 2, and 2. device 2 -> device 1 (shots 0..16);
3. device 1, device 2 and both -> H200 (the H200 trees retraced in the published devices'
   ``irene`` feature convention, energies copied by scope; and as measured, in the
   ``physical`` convention; shots 0..4 of the other seven);
4. device 1 + all of device 2 against device 2 alone (shots = every configuration of the
   other device-2 models).

    python scripts/transfer_curve.py [--cache /tmp/transfer] [--draws 5] [--out table.md]

Importing a published device takes ~20 s; ``--cache`` keeps the imported trees as JSON lines.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd

from irene.data.io import atomic_write_text
from irene.data.published import import_device
from irene.data.tree import read_trees, write_trees
from irene.predictors.irene_plus import IrenePlusPredictor
from irene.tables import Table, to_markdown
from irene.transfer import (
    ALL_SHOTS,
    CalibratedPool,
    LevelScale,
    TargetOnly,
    TypeScale,
    learning_curve,
    retrace,
)

DATA = Path("/work/shared/data/irene")
H200 = Path(__file__).resolve().parents[1] / "datasets" / "h200" / "trees.jsonl"

METHODS = {
    "type_scale (default, inner=both)": TypeScale,
    "type_scale inner=class": lambda: TypeScale(inner="class"),
    "type_scale inner=leaves": lambda: TypeScale(inner="leaves"),
    "level_scale (prototype)": LevelScale,
    "target_only": TargetOnly,
}


def guarded_predictor() -> IrenePlusPredictor:
    """Static IrEne+ with log-space leaves and ridge 0.01 only: no wild power laws on
    features that never varied in training (the k = 0 guard for a new GPU)."""
    return IrenePlusPredictor(feature_sets=["model_specs"], leaf_spaces=["log"],
                              leaf_alphas=[0.01])


def load(name: str, reader, cache: Path | None) -> list:
    """Trees from ``reader()``, kept as ``cache/name.jsonl`` when a cache folder is given."""
    if cache is not None and (cache / f"{name}.jsonl").is_file():
        return read_trees(cache / f"{name}.jsonl")
    trees = reader()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        write_trees(cache / f"{name}.jsonl", trees)
    return trees


def table(rows: list[dict]) -> str:
    frame = pd.DataFrame([{
        "method": r["method"], "k": r["shots"], "draws": r["draws"],
        **{level: f"{r[level]:.2f} ± {r[f'{level}_sd']:.2f}" for level in ("ml", "module", "model")},
        "worst node ×": f"{r['worst_ratio']:.1f}",
    } for r in rows])
    return to_markdown(Table.from_frame(frame))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device1", type=Path, default=DATA / "device_1")
    parser.add_argument("--device2", type=Path, default=DATA / "device_2")
    parser.add_argument("--h200", type=Path, default=H200)
    parser.add_argument("--cache", type=Path, default=None, help="folder for imported trees")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", default="0,1,2,4,8,16")
    parser.add_argument("--h200-shots", default="0,1,2,4")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shots = [int(k) for k in args.shots.split(",")]
    h200_shots = [int(k) for k in args.h200_shots.split(",")]
    d1 = load("device_1", lambda: import_device(args.device1), args.cache)
    d2 = load("device_2", lambda: import_device(args.device2), args.cache)
    h200 = load("h200_irene", lambda: retrace(read_trees(args.h200), "irene"), args.cache)
    common = {"draws": args.draws, "seed": args.seed}
    sections = []

    def run(title: str, *curve_args, **kwargs) -> None:
        start_s = time.perf_counter()
        rows = learning_curve(*curve_args, **common, **kwargs)
        text = f"### {title}\n\n{table(rows)}\n\n({time.perf_counter() - start_s:.0f} s)\n"
        print(text, flush=True)
        sections.append(text)

    run("device 1 -> device 2", d1, d2, shots, methods=METHODS)
    run("device 2 -> device 1", d2, d1, shots, methods=METHODS)
    h200_methods = {k: v for k, v in METHODS.items() if k != "target_only"}
    run("device 1 -> H200 (irene convention)", d1, h200, h200_shots, methods=METHODS)
    run("device 2 -> H200 (irene convention)", d2, h200, h200_shots, methods=h200_methods,
        ceiling=False)
    run("devices 1 and 2 -> H200 (irene convention; geometric mean of the two)", [d1, d2], h200,
        h200_shots, methods=h200_methods, ceiling=False)
    run("devices 1 and 2 -> H200, guarded source (log leaves, ridge 0.01)", [d1, d2], h200,
        h200_shots, methods=h200_methods, make_predictor=guarded_predictor)
    h200_physical = read_trees(args.h200)
    run("device 2 -> H200 (physical convention, as measured)", d2, h200_physical, h200_shots,
        methods=h200_methods)
    run("devices 1 and 2 -> H200 (physical convention, as measured)", [d1, d2], h200_physical,
        h200_shots, methods=h200_methods)
    run("device 1 -> H200 (physical convention), default and guarded source at k = 0",
        d1, h200_physical, [0], methods={"as is": LevelScale}, ceiling=False)
    run("device 1 -> H200 (physical convention), guarded source", d1, h200_physical, [0],
        methods={"as is": LevelScale}, ceiling=False, make_predictor=guarded_predictor)
    run("device 1 + all of device 2 (target_lomo: device 2 alone)", d1, d2, [ALL_SHOTS],
        methods={"type_scale (default, inner=both)": TypeScale,
                 "type_scale inner=class": lambda: TypeScale(inner="class"),
                 "type_scale inner=leaves": lambda: TypeScale(inner="leaves"),
                 "calibrated_pool": CalibratedPool})
    if args.out is not None:
        atomic_write_text(args.out, "\n".join(sections))


if __name__ == "__main__":
    main()
