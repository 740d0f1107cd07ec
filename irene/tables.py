"""The one table writer: markdown, LaTeX and CSV from a pandas frame, written atomically.

Cells: floats are formatted (``floatfmt``, one format or one per column), integers and
strings are written as they are, missing values as ``–``; a :class:`MeanSd` cell is written
``mean ± sd`` (both in the column's format). ``bold_columns`` marks the best (lowest) value
of each of those columns, every tie included; ``bold_cells`` bolds given cells instead (a
decision made elsewhere, e.g. by a significance test) and ``marks`` appends a marker (``†``)
to given cells. Without :class:`MeanSd` cells, ``bold_cells`` and ``marks`` the output is
what it always was.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from irene.data.io import atomic_write_text

MISSING = "–"
# LaTeX for the few non-ASCII symbols the tables and their notes use
_TEX_SYMBOLS = {"±": r"$\pm$", "†": r"\textsuperscript{\dag}", "‡": r"\textsuperscript{\ddag}",
                "≥": r"$\geq$", "≤": r"$\leq$", "−": "-", "√": r"$\surd$", "·": r"$\cdot$",
                "|": r"$|$", "×": r"$\times$"}


@dataclass(frozen=True)
class MeanSd:
    """A ``mean ± sd`` cell (e.g. over seeds); ``sd`` None or NaN: the mean alone."""

    mean: float
    sd: float | None = None


@dataclass(frozen=True)
class _Style:
    bold: tuple[str, str]
    pm: str  # the "±" between mean and sd
    marks: Mapping[str, str]  # marker -> how this format writes it (missing: as given)


def _labels(frame: pd.DataFrame) -> list[list[str]]:
    return [list(map(str, i)) if isinstance(i, tuple) else [str(i)] for i in frame.index]


def _index_names(frame: pd.DataFrame) -> list[str]:
    return ["" if n is None else str(n) for n in frame.index.names]


def _cells(frame: pd.DataFrame, floatfmt: str | dict[str, str], style: _Style,
           bold_columns: Sequence[str], bold_cells: Collection[tuple[int, str]] = (),
           marks: Mapping[tuple[int, str], str] | None = None) -> list[list[str]]:
    def fmt(column) -> str:
        return floatfmt.get(str(column), ".2f") if isinstance(floatfmt, dict) else floatfmt

    def text(value, column) -> str:
        if isinstance(value, MeanSd):
            if value.mean is None or math.isnan(value.mean):
                return MISSING
            mean = format(value.mean, fmt(column))
            if value.sd is None or math.isnan(value.sd):
                return mean
            return f"{mean}{style.pm}{format(value.sd, fmt(column))}"
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
            if (column in best and cell == best[column]) or (position, column) in bold_cells:
                cell = f"{style.bold[0]}{cell}{style.bold[1]}"
            mark = (marks or {}).get((position, column))
            if mark:
                cell += style.marks.get(mark, mark)
            cells.append(cell)
        rows.append(cells)
    return rows


def to_markdown(frame: pd.DataFrame, floatfmt: str | dict[str, str] = ".2f", *,
                bold_columns: Sequence[str] = (), bold_cells: Collection[tuple[int, str]] = (),
                marks: Mapping[tuple[int, str], str] | None = None) -> str:
    """A markdown table; the index (every level of a MultiIndex) comes first. ``bold_cells``
    and ``marks`` address cells by (row position, column name)."""
    header = _index_names(frame) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    style = _Style(bold=("**", "**"), pm=" ± ", marks={})
    for label, cells in zip(_labels(frame),
                            _cells(frame, floatfmt, style, bold_columns, bold_cells, marks),
                            strict=True):
        lines.append("| " + " | ".join(label + cells) + " |")
    return "\n".join(lines)


def _tex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def _tex_note(text: str) -> str:
    """A line of prose for LaTeX: special characters escaped, symbols as LaTeX."""
    return "".join(_TEX_SYMBOLS.get(c, c) for c in _tex_escape(text.replace("#", r"\#")))


def to_latex(frame: pd.DataFrame, caption: str, floatfmt: str | dict[str, str] = ".2f", *,
             bold_columns: Sequence[str] = (), bold_cells: Collection[tuple[int, str]] = (),
             marks: Mapping[tuple[int, str], str] | None = None, notes: Sequence[str] = ()) -> str:
    """A booktabs LaTeX table with a caption; ``notes`` are small lines under the table."""
    names = _index_names(frame)
    header = [_tex_escape(h) for h in names + [str(c) for c in frame.columns]]
    spec = "l" * len(names) + "r" * len(frame.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    style = _Style(bold=(r"\textbf{", "}"), pm=r" $\pm$ ", marks=_TEX_SYMBOLS)
    for label, cells in zip(_labels(frame),
                            _cells(frame, floatfmt, style, bold_columns, bold_cells, marks),
                            strict=True):
        lines.append(" & ".join([_tex_escape(x) for x in label] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par{{\footnotesize {_tex_note(note)}}}" for note in notes]
    lines += [rf"\caption{{{_tex_note(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


SPREAD_SUFFIX = "_sd"


def fold_spread(frame: pd.DataFrame) -> pd.DataFrame:
    """Every column ``c`` that has a ``c_sd`` partner as :class:`MeanSd` cells (the partner
    dropped); a frame without such pairs is returned as it is."""
    pairs = [c for c in frame.columns if f"{c}{SPREAD_SUFFIX}" in frame.columns]
    if not pairs:
        return frame
    folded = frame.drop(columns=[f"{c}{SPREAD_SUFFIX}" for c in pairs])
    for column in pairs:
        folded[column] = [MeanSd(float(m), float(sd)) for m, sd in
                          zip(frame[column], frame[f"{column}{SPREAD_SUFFIX}"], strict=True)]
    return folded


def write_table(frame: pd.DataFrame, directory: Path, name: str,
                floatfmt: str | dict[str, str] = ".2f") -> list[Path]:
    """``name.csv`` (4 decimals) and ``name.md`` in ``directory``, each written atomically; in
    the markdown, columns ``c`` and ``c_sd`` are one ``mean ± sd`` column (:func:`fold_spread`)."""
    csv_path = atomic_write_text(directory / f"{name}.csv", frame.to_csv(float_format="%.4f"))
    md_path = atomic_write_text(directory / f"{name}.md",
                                to_markdown(fold_spread(frame), floatfmt) + "\n")
    return [csv_path, md_path]
