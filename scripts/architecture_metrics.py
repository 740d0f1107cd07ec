"""Numbers behind docs/architecture.md: where defaults are stated, and how deep imports go.

    python scripts/architecture_metrics.py [ROOT] [--walk]

* **default statements**: for each predictor / measurement hyperparameter, the files (code
  and YAML, tests excluded) that assign it a literal value (``name: value``, ``name=value``,
  ``name: type = value``);
* **import depth**: the longest chain of project-internal imports (``a`` imports ``b``
  imports ``c`` ...: depth 3), over ``irene`` and ``pipelines``, and the number of modules;
* **whole-config functions**: the functions of ``pipelines/`` and ``run.py`` that take the
  whole composed config (a parameter named ``cfg`` or typed ``DictConfig``);
* **the walk of cfg through ``stage=crossvalidate``** (``--walk``, runs the stage once on the
  device's trees with tracking in this process): every call of a project function that
  receives the whole config, in order. *Files*: the files of those functions; a *visit*: the
  config enters a file from another one (a call into it, or a return back to it); a *climb
  back up*: a return that hands the config back to a caller in another file.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

PARAMETERS = ("tanh_scalar", "polynomial_degree", "epochs", "lr", "seed", "normalize_loss_scale",
              "standardize_features", "unseen_op", "engine", "min_window_s", "windows", "warmup",
              "leaf_alphas", "inner_ridge")


def default_statements(root: Path) -> dict[str, list[str]]:
    files = [p for p in root.rglob("*") if p.suffix in (".py", ".yaml")
             and not any(part in (".venv", "tests", "outputs", "scripts", ".git") for part in p.parts)]
    found: dict[str, list[str]] = {}
    for name in PARAMETERS:
        # a literal: number, bool, quoted or bare word, list; not an interpolation or a variable
        pattern = re.compile(rf"(?<![\w.]){name}\s*(?::\s*[\w\[\], |]+)?\s*[:=]\s*"
                             r"(-?[\d.][\d.e+-]*|true|false|True|False|\"\w+\"|'\w+'|[a-z]\w*$|\[|\()",
                             re.MULTILINE)
        hits = []
        for path in files:
            text = path.read_text()
            for match in pattern.finditer(text):
                line = text[:match.start()].count("\n") + 1
                src = text.splitlines()[line - 1].strip()
                if src.startswith(("#", "-")) or "${" in src or f"{name}=self" in src:
                    continue
                if re.search(rf"{name}\s*=\s*(cfg|p|mcfg|self|config|settings|options)\b", src):
                    continue
                hits.append(f"{path.relative_to(root)}:{line}")
                break
        found[name] = hits
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = {}
    for package in ("irene", "pipelines"):
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    @cache
    def chain(name: str, seen: frozenset = frozenset()) -> tuple[str, ...]:
        best: tuple[str, ...] = ()
        for dep in graph[name]:
            if dep in seen:
                continue
            candidate = chain(dep, seen | {name})
            if len(candidate) > len(best):
                best = candidate
        return (name, *best)

    return list(max((chain(n) for n in graph), key=len))


def whole_config_functions(root: Path) -> list[str]:
    """``file:function`` of every function taking the whole config (``cfg`` or ``DictConfig``)."""
    found = []
    for path in sorted([*(root / "pipelines").rglob("*.py"), root / "run.py"]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            if any(a.arg == "cfg" or (a.annotation is not None and "DictConfig" in ast.unparse(a.annotation))
                   for a in args):
                found.append(f"{path.relative_to(root)}:{node.name}")
    return found


# Runs in a child process with the checkout on sys.path: composes the real config, then calls
# run.run_stage(cfg) under a profiler that follows the composed config object.
_WALK = r"""
import json, os, sys
from pathlib import Path
root, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(root))
os.chdir(work)
from hydra import compose, initialize_config_dir
import run
from omegaconf import DictConfig
with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
    cfg = compose("config", overrides=["stage=crossvalidate", "tracking.background=false",
                                       f"tracking.uri=sqlite:///{work}/mlflow.db",
                                       f"run_dir={work}/run", "show_progress=false"])
stack, events = [], []  # stack: file of each frame that holds cfg (None: one that does not)
def holds(frame):
    code = frame.f_code
    n = code.co_argcount + code.co_kwonlyargcount
    return any(frame.f_locals.get(name) is cfg for name in code.co_varnames[:n])
def profile(frame, event, arg):
    if event == "call":
        file = frame.f_code.co_filename
        mine = file.startswith(str(root)) and "/.venv/" not in file and holds(frame)
        where = os.path.relpath(file, root) if mine else None
        if where:
            events.append(("call", where, frame.f_code.co_name))
        stack.append(where)
    elif event == "return" and stack:
        where = stack.pop()
        if where:
            back = next((f for f in reversed(stack) if f), None)
            events.append(("return", back, frame.f_code.co_name))
sys.setprofile(profile)
try:
    run.run_stage(cfg)
finally:
    sys.setprofile(None)
print("WALK " + json.dumps(events))
"""


def cfg_walk(root: Path) -> dict:
    """Follow the composed config through ``stage=crossvalidate`` (see the module docstring)."""
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "IRENE_OUTPUTS": str(Path(work) / "outputs"),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", _WALK, str(root), work], env=env,
                              capture_output=True, text=True, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WALK ")), None)
    if line is None:
        raise SystemExit(f"the walk failed:\n{done.stderr[-3000:]}")
    current, visits, climbs, functions = None, {}, 0, set()
    for event, where, name in json.loads(line[5:]):
        if event == "call":
            functions.add(f"{where}:{name}")
        if where is not None and where != current:
            visits[where] = visits.get(where, 0) + 1
            climbs += event == "return"
        current = where
    most = max(visits, key=visits.get)
    return {"files": len(visits), "climbs_back_up": climbs, "most_visited": most,
            "visits": visits[most], "functions": len(functions), "visits_per_file": visits}


def main(root: Path, walk: bool = False) -> None:
    print(f"# architecture metrics of {root}\n")
    statements = default_statements(root)
    print("| parameter | files stating a default |")
    print("|---|---|")
    for name, hits in statements.items():
        print(f"| {name} | {len(hits)}: {', '.join(hits) or '-'} |")
    restating = {h.split(':')[0] for hits in statements.values() if len(hits) > 1 for h in hits}
    print(f"\nfiles re-stating a default stated elsewhere: {len(restating)}")
    graph = import_graph(root)
    chain = longest_chain(graph)
    print(f"modules: {len(graph)}; longest internal import chain: {len(chain)}: {' -> '.join(chain)}")
    whole = whole_config_functions(root)
    print(f"functions taking the whole config (pipelines/, run.py): {len(whole)}")
    if walk:
        found = cfg_walk(root)
        print(f"cfg through stage=crossvalidate: {found['files']} files, {found['climbs_back_up']} "
              f"climbs back up, {found['functions']} functions; most visited: "
              f"{found['most_visited']} ({found['visits']} visits)")
        print("visits per file: " + ", ".join(f"{f} {n}" for f, n in sorted(
            found["visits_per_file"].items(), key=lambda item: -item[1])))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--walk", action="store_true",
                        help="also follow cfg through stage=crossvalidate (runs it, ~10 s)")
    args = parser.parse_args()
    main(args.root.resolve(), walk=args.walk)
