"""Benchmark: do the configurations :func:`irene.shots.pick_shots` picks teach a new device
more than k drawn at random?

For each (sources -> target) pair and each k, the protocol of ``stage=transfer``: leave one
target model out, take k configurations of the target's other models, fit the default
correction (``type_scale``) per source, predict the left-out model's target trees; per k the
mean over folds. "picked": the k that ``pick_shots`` picks from the other models' trees
(weighted by the sources' predicted energies; no target energy is read to pick). "random":
``irene.transfer.learning_curve`` with ``--draws`` random draws (mean and sd over draws).
Prints a markdown table. Run from the project root:

    IRENE_DATA_DIR=/path/to/irene python scripts/pick_shots_eval.py --draws 10

(``$IRENE_DATA_DIR`` holds ``device_1/`` and ``device_2/``.)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _trees(name: str):
    from irene.data.published import import_device
    from irene.data.tree import read_trees

    if name.endswith(".jsonl"):
        return read_trees(ROOT / name)
    return import_device(Path(os.environ["IRENE_DATA_DIR"]) / name)


def picked_errors(sources, target, k: int) -> tuple[np.ndarray, list[list[str]]]:
    """Mean over folds of (ml, module, model) % error with picked shots, and the picks."""
    from irene.evaluate.metrics import errors_by_node_type
    from irene.shots import pick_shots
    from irene.transfer import TypeScale, geometric_mean, node_mask

    names = np.asarray(target.model_names, dtype=object)
    preds = [s.predict(target) for s in sources]
    energy = geometric_mean(preds)
    rows, picks = [], []
    for left_out in dict.fromkeys(target.model_names):
        pool = np.flatnonzero(names != left_out)
        chosen = pick_shots(target, k, energy, pool)
        picks.append([f"{target.model_names[t]} {target.batch_sizes[t]}x{target.seq_lens[t]}"
                      for t in chosen])
        mask = np.zeros(target.num_trees, bool)
        mask[chosen] = True
        shots, shot_rows = target.subset(mask), node_mask(target, mask)
        test_mask = names == left_out
        test, test_rows = target.subset(test_mask), node_mask(target, test_mask)
        corrected = [TypeScale().fit(source, shots, source_pred=pred[shot_rows])
                     .predict(test, source_pred=pred[test_rows])
                     for source, pred in zip(sources, preds, strict=True)]
        errs = errors_by_node_type(test, geometric_mean(corrected))
        rows.append([errs["ml"], errs["module"], errs["model"]])
    return np.mean(rows, axis=0), picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--pairs", nargs="+", default=[
        "device_1>device_2", "device_2>device_1", "device_1,device_2>datasets/h200/trees.jsonl",
        "device_2>datasets/h200/trees.jsonl"])
    parser.add_argument("--show-picks", action="store_true")
    args = parser.parse_args()
    from irene.data.forest import build_forest
    from irene.transfer import Source, TypeScale, learning_curve

    print("| sources -> target | k | picked: ml / module / model | random: ml / module / model "
          "(sd) |\n|---|---|---|---|")
    for pair in args.pairs:
        left, right = pair.split(">")
        started = time.perf_counter()
        sources = [Source.fit(_trees(name)) for name in left.split(",")]
        target = build_forest(_trees(right))
        shots = [k for k in args.shots if k < len(set(target.model_names)) * 1000]
        pool = min(int((np.asarray(target.model_names) != m).sum())
                   for m in set(target.model_names))
        shots = [k for k in shots if k <= pool]
        random_rows = {r["shots"]: r for r in learning_curve(
            None, target, shots=shots, draws=args.draws, seed=0,
            methods={"type_scale": TypeScale}, ceiling=False, sources=sources)}
        for k in shots:
            errors, picks = picked_errors(sources, target, k)
            r = random_rows[k]
            print(f"| {left} -> {Path(right).parent.name or right} | {k} | "
                  f"{errors[0]:.2f} / {errors[1]:.2f} / {errors[2]:.2f} | "
                  f"{r['ml']:.2f} / {r['module']:.2f} ({r['module_sd']:.2f}) / "
                  f"{r['model']:.2f} ({r['model_sd']:.2f}) |", flush=True)
            if args.show_picks:
                print(f"<!-- picks: {picks} -->")
        print(f"<!-- {pair}: {time.perf_counter() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
