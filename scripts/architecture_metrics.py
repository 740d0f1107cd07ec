"""Numbers behind docs/architecture.md: where defaults are stated, and how deep imports go.

    python scripts/architecture_metrics.py [ROOT]

* **default statements**: for each predictor / measurement hyperparameter, the files (code
  and YAML, tests excluded) that assign it a literal value (``name: value``, ``name=value``,
  ``name: type = value``);
* **import depth**: the longest chain of project-internal imports (``a`` imports ``b``
  imports ``c`` ...: depth 3), over ``irene`` and ``pipelines``, and the number of modules;
* **stage fan-in**: how many names each stage imports from the shared pipeline helpers.
"""

from __future__ import annotations

import ast
import re
import sys
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


def main(root: Path) -> None:
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


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
