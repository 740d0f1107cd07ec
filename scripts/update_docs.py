"""Fill the generated tables of README.md and docs/*.md from the report outputs.

    python scripts/update_docs.py [--tables outputs/tables] [--check]

A generated block is written in the markdown as

    <!-- table: device_1/per_model -->
    ... (replaced) ...
    <!-- end table -->

and receives the table of ``<tables>/device_1/per_model.md`` (what ``stage=report
experiment=per_model`` wrote; ``make tables`` writes them all), without its title line.
``--check`` changes nothing and exits 1 if a block differs from its table. ``make docs``
runs ``make tables`` and then this script, so every number in a generated block comes from
a run. tests/test_docs.py recomputes sampled rows of every block and fails when the docs and
the code disagree.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def table_body(tables: Path, name: str) -> str:
    path = tables / f"{name}.md"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such table; run `make tables` (or the preset's "
                         f"sweep and `stage=report`) first")
    lines = path.read_text().splitlines()
    body = [line for line in lines if line.startswith("|")]
    return "\n".join(body) + "\n"


def update(text: str, tables: Path) -> str:
    return BLOCK.sub(lambda m: m.group(1) + table_body(tables, m.group("name")) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("IRENE_OUTPUTS") or ROOT / "outputs") / "tables"
    parser.add_argument("--tables", type=Path, default=default)
    parser.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        text = path.read_text()
        new = update(text, args.tables)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(new)
                tmp.replace(path)
    verb = "stale" if args.check else "updated"
    print(f"{verb}: {', '.join(map(str, stale)) or 'none'}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
