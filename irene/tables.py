"""The one table writer: markdown, LaTeX and CSV from a pandas frame, written atomically.

Cells: floats are formatted (``floatfmt``, one format or one per column), integers and
strings are written as they are, missing values as ``–``. ``bold_columns`` marks the best
(lowest) value of each of those columns, every tie included.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from irene.data.io import atomic_write_text

MISSING = "–"


def _labels(frame: pd.DataFrame) -> list[list[str]]:
    return [list(map(str, i)) if isinstance(i, tuple) else [str(i)] for i in frame.index]


def _index_names(frame: pd.DataFrame) -> list[str]:
    return ["" if n is None else str(n) for n in frame.index.names]


def _cells(frame: pd.DataFrame, floatfmt: str | dict[str, str], bold: tuple[str, str],
           bold_columns: Sequence[str]) -> list[list[str]]:
    def fmt(column) -> str:
        return floatfmt.get(str(column), ".2f") if isinstance(floatfmt, dict) else floatfmt

    def text(value, column) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return MISSING
        return format(value, fmt(column)) if isinstance(value, float) else str(value)

    best = {}
    for column in bold_columns:
        values = pd.to_numeric(frame[column], errors="coerce").dropna()
        if not values.empty:
            best[column] = text(float(values.min()), column)
    rows = []
    for position in range(len(frame)):  # per cell: iterrows would upcast integers to floats
        cells = []
        for j, column in enumerate(frame.columns):
            cell = text(frame.iat[position, j], column)
            if column in best and cell == best[column]:
                cell = f"{bold[0]}{cell}{bold[1]}"
            cells.append(cell)
        rows.append(cells)
    return rows


def to_markdown(frame: pd.DataFrame, floatfmt: str | dict[str, str] = ".2f", *,
                bold_columns: Sequence[str] = ()) -> str:
    """A markdown table; the index (every level of a MultiIndex) comes first."""
    header = _index_names(frame) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for label, cells in zip(_labels(frame), _cells(frame, floatfmt, ("**", "**"), bold_columns),
                            strict=True):
        lines.append("| " + " | ".join(label + cells) + " |")
    return "\n".join(lines)


def _tex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def to_latex(frame: pd.DataFrame, caption: str, floatfmt: str | dict[str, str] = ".2f", *,
             bold_columns: Sequence[str] = ()) -> str:
    """A booktabs LaTeX table with a caption."""
    names = _index_names(frame)
    header = [_tex_escape(h) for h in names + [str(c) for c in frame.columns]]
    spec = "l" * len(names) + "r" * len(frame.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    for label, cells in zip(_labels(frame), _cells(frame, floatfmt, (r"\textbf{", "}"), bold_columns),
                            strict=True):
        lines.append(" & ".join([_tex_escape(x) for x in label] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex_escape(caption)}}}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(frame: pd.DataFrame, directory: Path, name: str,
                floatfmt: str | dict[str, str] = ".2f") -> list[Path]:
    """``name.csv`` (4 decimals) and ``name.md`` in ``directory``, each written atomically."""
    csv_path = atomic_write_text(directory / f"{name}.csv", frame.to_csv(float_format="%.4f"))
    md_path = atomic_write_text(directory / f"{name}.md", to_markdown(frame, floatfmt) + "\n")
    return [csv_path, md_path]
