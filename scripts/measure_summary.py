"""Summary lines of a measured trees file; optionally compare two files and check targets.

    python scripts/measure_summary.py outputs/measured/trees.jsonl
    python scripts/measure_summary.py run1.jsonl --compare run2.jsonl
    python scripts/measure_summary.py trees.jsonl --check bert-base-uncased 8 128 --max-seconds 20

One line per configuration (nodes, root energy and time, Σ children / parent, window spread,
drift, seconds). ``--compare``: for the configurations in both files, how much the root and
the median node moved between the two measurements. ``--check``: the speed and spread
targets of one configuration, ``PASS``/``FAIL`` per target; exit status 1 if any fails
(``--informational`` reports without failing).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from irene.data.tree import iter_nodes, read_trees, tree_key
from irene.measure.summary import summarize, summary_line


def compare(first: list[dict], second: list[dict]) -> list[str]:
    """Lines: relative change of the root and the median node between two measurements."""
    other = {tree_key(t): t for t in second}
    lines = []
    for tree in first:
        twin = other.get(tree_key(tree))
        if twin is None:
            continue
        energies = {n["id"]: n.get("ground_truth_energy") for n in iter_nodes(twin["frontend_tree"])}
        changes = [abs(energies[n["id"]] / n["ground_truth_energy"] - 1)
                   for n in iter_nodes(tree["frontend_tree"])
                   if n.get("ground_truth_energy") and energies.get(n["id"])
                   and "measurement_reused_from" not in n]
        root = tree["frontend_tree"]
        if not changes or not root.get("ground_truth_energy"):
            lines.append(f"{summary_line(summarize(tree)).split(':')[0]}: no energies to compare")
            continue
        root_change = energies[root["id"]] / root["ground_truth_energy"] - 1
        median = statistics.median(changes)
        lines.append(f"{tree['model_name']} {tree['batch_size']}x{tree['seq_len']} measured twice: root "
                     f"{100 * root_change:+.2f}%, nodes median |change| {100 * median:.2f}% "
                     f"max {100 * max(changes):.2f}%")
    return lines


def check(trees: list[dict], model: str, batch_size: int, seq_len: int, max_seconds: float,
          max_spread: float) -> list[tuple[str, bool]]:
    """(line, passed) per target of one configuration."""
    found = [t for t in trees if tree_key(t) == (model, batch_size, seq_len)]
    if not found:
        return [(f"{model} {batch_size}x{seq_len}: not in the file", False)]
    s = summarize(found[0])
    seconds, spread = s["measure_seconds"], s["window_spread_median"]
    took = "n/a" if seconds is None else f"{seconds:.1f} s"
    return [
        (f"{model} {batch_size}x{seq_len}: {took} measuring (target <= {max_seconds:g} s)",
         seconds is not None and seconds <= max_seconds),
        (f"{model} {batch_size}x{seq_len}: median window spread "
         f"{'n/a' if spread is None else f'{100 * spread:.2f}%'} (target <= {100 * max_spread:g}%)",
         spread is not None and spread <= max_spread),
        (f"{model} {batch_size}x{seq_len}: drift {'flagged' if s['drift_flagged'] else 'within threshold'}",
         not s["drift_flagged"]),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", help="a trees.jsonl file")
    parser.add_argument("--compare", help="a second measurement of some of the same configurations")
    parser.add_argument("--check", nargs=3, metavar=("MODEL", "BATCH", "SEQ"), help="configuration to check")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="speed target, seconds measuring")
    parser.add_argument("--max-spread", type=float, default=0.02, help="median window spread target")
    parser.add_argument("--informational", action="store_true", help="report the checks without failing")
    args = parser.parse_args()
    trees = read_trees(args.trees)
    for tree in trees:
        print(summary_line(summarize(tree)))
    if args.compare:
        for line in compare(trees, read_trees(args.compare)):
            print(line)
    failed = False
    if args.check:
        model, batch, seq = args.check
        for line, ok in check(trees, model, int(batch), int(seq), args.max_seconds, args.max_spread):
            print(f"{'PASS' if ok else 'FAIL'} {line}")
            failed |= not ok
    return 1 if failed and not args.informational else 0


if __name__ == "__main__":
    sys.exit(main())
