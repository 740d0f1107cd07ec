"""Mutation testing with mutmut, on a deterministic sample (the predictors and metrics by default).

    python scripts/mutation.py                      # the working tree, 1 mutant in 16
    python scripts/mutation.py --rev 5a70ad6        # a commit (its own tests), same sample rule
    python scripts/mutation.py --sample 1           # every mutant (hours on two cores)
    python scripts/mutation.py --sample 1 --mutate 'irene/measure/protocol/*' \\
        --tests tests/test_protocol_scenarios.py --timeout-constant 5 --timeout-multiplier 10
                                                    # another module, with its own fast tests

The code is copied into a temporary folder (nothing is written into the checkout), mutmut
generates every mutant of the ``--mutate`` files (default ``irene/predictors/*.py`` and
``irene/evaluate/metrics.py``), and a mutant is run when ``sha256(name) % sample == 0``: the
same rule on any version of the code, so scores of two commits are comparable. Each mutant
runs only the ``--tests`` that cover its function (default: the fast predictor and metric
tests). The result is a JSON and a markdown summary (killed, survived, no covering test,
timeout; per module; the diff of every survivor) under ``--out``. ``score`` counts killed
mutants; ``detected`` adds those that made the tests hang (timeout).

Not part of CI: it needs ``pip install mutmut==3.8.1`` and the published device-1 data
(``$IRENE_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT_VERSION = "3.8.1"
MUTATE = ("irene/predictors/*", "irene/evaluate/metrics.py")
FAST_TESTS = ("tests/test_model.py", "tests/test_predictors_plus.py",
              "tests/test_predictors_baselines.py", "tests/test_crossval.py",
              "tests/test_predict_static.py", "tests/test_mutation_guards.py",
              "tests/test_metrics.py", "tests/test_predictor_contract.py")


def copy_tree(rev: str | None, into: Path) -> None:
    """The tracked files at ``rev`` (or the working tree's files git does not ignore)."""
    if rev:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
        return
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                            check=True, capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)


def write_config(folder: Path, tests: list[str], mutate: list[str], timeout_constant: float = 20,
                 timeout_multiplier: float = 30) -> None:
    lines = ["[mutmut]", "source_paths =", "    irene", "also_copy =", "    pipelines", "    conf",
             "    datasets", "    run.py", "only_mutate ="]  # datasets: the H200 trees tests read
    lines += [f"    {pattern}" for pattern in mutate]
    lines += ["pytest_add_cli_args_test_selection ="] + [f"    {t}" for t in tests]
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -q",
              "    -m", "    not slow"]
    # torch is not fork-safe once its thread pools ran: fork from a clean server process
    lines += ["process_isolation = forkserver"]
    # mutmut's wall-clock limit is (estimate + constant) × multiplier: on a shared machine a
    # test's estimate undercounts fixtures and load, so a slow mutant is not a "timeout"
    lines += [f"timeout_constant = {timeout_constant}", f"timeout_multiplier = {timeout_multiplier}"]
    with (folder / "setup.cfg").open("a") as handle:
        handle.write("\n" + "\n".join(lines) + "\n")


GENERATE = """
import os, sys
sys.argv = ["mutmut"]
from mutmut.__main__ import copy_src_dir, copy_also_copy_files, setup_source_paths, create_mutants
os.makedirs("mutants", exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths()
create_mutants(2)
"""


def mutant_names(folder: Path) -> list[str]:
    names = []
    for meta in sorted((folder / "mutants").rglob("*.meta")):
        names.extend(json.loads(meta.read_text())["exit_code_by_key"])
    return sorted(names)


def sampled(names: list[str], sample: int) -> list[str]:
    return [n for n in names if int(hashlib.sha256(n.encode()).hexdigest(), 16) % sample == 0]


def results(folder: Path, names: list[str]) -> dict[str, str]:
    """mutmut's verdict of each mutant (killed, survived, no tests, timeout, ...)."""
    from mutmut.stats import status_by_exit_code

    codes: dict[str, int | None] = {}
    for meta in (folder / "mutants").rglob("*.meta"):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return {n: status_by_exit_code[codes.get(n)] for n in names}


def module_of(name: str) -> str:
    """``irene.data.tree`` of ``irene.data.tree.x_read_trees__mutmut_3`` (or of a method's
    ``irene.data.tree.xǁTreeǁread__mutmut_1``)."""
    return re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]


def by_module(status: dict[str, str]) -> dict[str, dict[str, float]]:
    """Killed, total and score of each mutated module."""
    table: dict[str, dict[str, float]] = {}
    for name, verdict in sorted(status.items()):
        row = table.setdefault(module_of(name), {"killed": 0, "timeout": 0, "total": 0})
        row["total"] += 1
        row["killed"] += verdict in ("killed", "caught by type check")
        row["timeout"] += verdict == "timeout"
    for row in table.values():
        row["score"] = round(row["killed"] / row["total"], 4)
        # a mutant that makes the tests hang is caught too, by the hang
        row["detected"] = round((row["killed"] + row["timeout"]) / row["total"], 4)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", help="a commit (default: the working tree)")
    parser.add_argument("--sample", type=int, default=16, help="run 1 mutant in N (hash rule)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--tests", nargs="*", default=list(FAST_TESTS))
    parser.add_argument("--mutate", nargs="*", default=list(MUTATE),
                        help="files (glob patterns) to mutate, relative to the project")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "irene-mutation")
    parser.add_argument("--timeout-constant", type=float, default=20,
                        help="seconds added to a mutant's time limit (a hung mutant waits this long)")
    parser.add_argument("--timeout-multiplier", type=float, default=30,
                        help="times the covering tests' own duration, in a mutant's time limit")
    parser.add_argument("--only", nargs="*", default=None, metavar="NAME",
                        help="run these mutants only (e.g. the survivors of a run, with newer tests)")
    parser.add_argument("--tag", help="name of the output files (default: the revision)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()

    from importlib.metadata import version

    import mutmut  # noqa: F401 - fail early and clearly when it is missing

    if version("mutmut") != MUTMUT_VERSION:
        print(f"warning: written for mutmut {MUTMUT_VERSION}, found {version('mutmut')}")
    work = Path(tempfile.mkdtemp(prefix="irene-mutmut-"))
    try:
        copy_tree(args.rev, work)
        tests = [t for t in args.tests if (work / t).is_file()]
        write_config(work, tests, args.mutate, args.timeout_constant, args.timeout_multiplier)
        env = {**os.environ, "PYTHONPATH": str(work / "mutants"), "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", GENERATE], cwd=work, check=True, env=env,
                       capture_output=True)
        everything = mutant_names(work)
        chosen = sampled(everything, args.sample) if args.only is None else \
            [name for name in everything if name in set(args.only)]
        print(f"{len(everything)} mutants, {len(chosen)} sampled (1 in {args.sample}); "
              f"tests: {tests}", flush=True)
        mutmut_bin = Path(sys.executable).with_name("mutmut")
        subprocess.run([str(mutmut_bin), "run", "--max-children", str(args.jobs), *chosen],
                       cwd=work, env=env, check=False)
        status = results(work, chosen)
        counts = Counter(status.values())
        killed = counts["killed"] + counts["caught by type check"]
        summary = {"rev": args.rev or "working tree", "mutants": len(everything),
                   "sampled": len(chosen), "sample": args.sample, "tests": tests,
                   "counts": dict(counts), "score": killed / max(len(chosen), 1),
                   "detected": (killed + counts["timeout"]) / max(len(chosen), 1),
                   "by_module": by_module(status),
                   "survivors": sorted(n for n, s in status.items() if s != "killed")}
        args.out.mkdir(parents=True, exist_ok=True)
        tag = (args.tag or args.rev or "worktree").replace("/", "_")
        (args.out / f"mutation-{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
        diffs = []
        for name in summary["survivors"]:
            shown = subprocess.run([str(mutmut_bin), "show", name], cwd=work, env=env,
                                   capture_output=True, text=True).stdout
            diffs.append(f"### {name} ({status[name]})\n\n```diff\n{shown.strip()}\n```\n")
        (args.out / f"survivors-{tag}.md").write_text("\n".join(diffs))
        print(json.dumps({k: summary[k] for k in ("rev", "mutants", "sampled", "counts",
                                                   "score", "detected", "by_module")}, indent=2))
        print(f"survivors: {args.out / f'survivors-{tag}.md'}")
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
