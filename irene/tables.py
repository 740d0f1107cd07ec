"""The one table type and its writers: markdown, LaTeX and CSV from a :class:`Table`,
written atomically. A stage that computes with pandas converts its frame once, where it
writes (:meth:`Table.from_frame`); one that has no frame (the main job: one row per
left-out model) builds a :class:`Table` without importing pandas.

Cells: floats are formatted (``floatfmt``, one format or one per column), integers and
strings are written as they are, missing values as ``–``; a :class:`MeanSd` cell is written
``mean ± sd`` (both in the column's format). ``bold_columns`` marks the best (lowest) value
of each of those columns, every tie included; ``bold_cells`` bolds given cells instead (a
decision made elsewhere, e.g. by a significance test) and ``marks`` appends a marker (``†``)
to given cells. Without :class:`MeanSd` cells, ``bold_cells`` and ``marks`` the output is
what it always was.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from irene.data.io import atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

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


@dataclass
class Table:
    """Rows of cells with labels: ``index_names`` (one per label level), one label list per
    row, ``columns`` (names), ``rows`` (one list of cell values per row, as in the columns)."""

    index_names: list[str]
    labels: list[list[str]]
    columns: list[Any]
    rows: list[list[Any]]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Table:
        """A pandas frame as a table: where frames enter the writers (every index level a
        label column)."""
        return cls(index_names=["" if n is None else str(n) for n in frame.index.names],
                   labels=[list(map(str, i)) if isinstance(i, tuple) else [str(i)]
                           for i in frame.index],
                   columns=list(frame.columns),
                   rows=[[frame.iat[i, j] for j in range(frame.shape[1])]  # not iterrows: it
                         for i in range(frame.shape[0])])                # upcasts ints to floats

    def row(self, label: str) -> dict[Any, Any]:
        """The cells of the (first) row labelled ``label``: column name -> value."""
        position = next(i for i, labels in enumerate(self.labels) if labels[0] == label)
        return dict(zip(self.columns, self.rows[position], strict=True))

    def column(self, name: Any) -> list[Any]:
        j = self.columns.index(name)
        return [row[j] for row in self.rows]

    def to_frame(self) -> pd.DataFrame:
        """The same as a pandas frame (one label level)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.columns,
                            index=pd.Index([label[0] for label in self.labels],
                                           name=self.index_names[0] or None))

    def to_csv(self, float_format: str = "%.4f") -> str:
        """CSV as pandas' ``to_csv(float_format=...)`` writes it: floats in ``float_format``,
        missing cells empty."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*self.index_names, *map(str, self.columns)])
        for label, row in zip(self.labels, self.rows, strict=True):
            writer.writerow([*label, *(_csv_cell(v, float_format) for v in row)])
        return out.getvalue()


def _csv_cell(value: Any, float_format: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return float_format % value if isinstance(value, float) else str(value)


def _numeric(value: Any) -> float | None:
    """A cell as a number, as ``pandas.to_numeric(errors="coerce")`` reads it (None: not one)."""
    if isinstance(value, MeanSd) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _cells(table: Table, floatfmt: str | dict[str, str], style: _Style,
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
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return MISSING
        return format(value, fmt(column)) if isinstance(value, float) else str(value)

    best = {}
    for column in bold_columns:
        values = [n for n in map(_numeric, table.column(column)) if n is not None]
        if values:
            best[column] = text(float(min(values)), column)
    rows = []
    for position, row in enumerate(table.rows):
        cells = []
        for column, value in zip(table.columns, row, strict=True):
            cell = text(value, column)
            if (column in best and cell == best[column]) or (position, column) in bold_cells:
                cell = f"{style.bold[0]}{cell}{style.bold[1]}"
            mark = (marks or {}).get((position, column))
            if mark:
                cell += style.marks.get(mark, mark)
            cells.append(cell)
        rows.append(cells)
    return rows


def _checked(table: Table) -> Table:
    if not isinstance(table, Table):
        raise TypeError(f"a table writer takes a Table, got {type(table).__name__} "
                        "(convert a pandas frame with Table.from_frame)")
    return table


def to_markdown(table: Table, floatfmt: str | dict[str, str] = ".2f", *,
                bold_columns: Sequence[str] = (), bold_cells: Collection[tuple[int, str]] = (),
                marks: Mapping[tuple[int, str], str] | None = None) -> str:
    """A markdown table; the index (every level of a MultiIndex) comes first. ``bold_cells``
    and ``marks`` address cells by (row position, column name)."""
    table = _checked(table)
    header = table.index_names + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    style = _Style(bold=("**", "**"), pm=" ± ", marks={})
    for label, cells in zip(table.labels,
                            _cells(table, floatfmt, style, bold_columns, bold_cells, marks),
                            strict=True):
        lines.append("| " + " | ".join(label + cells) + " |")
    return "\n".join(lines)


def _tex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def _tex_note(text: str) -> str:
    """A line of prose for LaTeX: special characters escaped, symbols as LaTeX."""
    return "".join(_TEX_SYMBOLS.get(c, c) for c in _tex_escape(text.replace("#", r"\#")))


def to_latex(table: Table, caption: str, floatfmt: str | dict[str, str] = ".2f", *,
             bold_columns: Sequence[str] = (), bold_cells: Collection[tuple[int, str]] = (),
             marks: Mapping[tuple[int, str], str] | None = None, notes: Sequence[str] = ()) -> str:
    """A booktabs LaTeX table with a caption; ``notes`` are small lines under the table."""
    table = _checked(table)
    names = table.index_names
    header = [_tex_escape(h) for h in names + [str(c) for c in table.columns]]
    spec = "l" * len(names) + "r" * len(table.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    style = _Style(bold=(r"\textbf{", "}"), pm=r" $\pm$ ", marks=_TEX_SYMBOLS)
    for label, cells in zip(table.labels,
                            _cells(table, floatfmt, style, bold_columns, bold_cells, marks),
                            strict=True):
        lines.append(" & ".join([_tex_escape(x) for x in label] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par{{\footnotesize {_tex_note(note)}}}" for note in notes]
    lines += [rf"\caption{{{_tex_note(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


SPREAD_SUFFIX = "_sd"


def fold_spread(table: Table) -> Table:
    """Every column ``c`` that has a ``c_sd`` partner as :class:`MeanSd` cells (the partner
    dropped); a table without such pairs is returned as it is."""
    table = _checked(table)
    pairs = [c for c in table.columns if f"{c}{SPREAD_SUFFIX}" in table.columns]
    if not pairs:
        return table
    partners = {f"{c}{SPREAD_SUFFIX}" for c in pairs}
    kept = [c for c in table.columns if c not in partners]
    where = {c: table.columns.index(c) for c in table.columns}
    rows = [[MeanSd(float(row[where[c]]), float(row[where[f"{c}{SPREAD_SUFFIX}"]]))
             if c in pairs else row[where[c]] for c in kept] for row in table.rows]
    return Table(table.index_names, table.labels, kept, rows)


def write_table(table: Table, directory: Path, name: str,
                floatfmt: str | dict[str, str] = ".2f") -> list[Path]:
    """``name.csv`` (4 decimals) and ``name.md`` in ``directory``, each written atomically; in
    the markdown, columns ``c`` and ``c_sd`` are one ``mean ± sd`` column (:func:`fold_spread`)."""
    csv_path = atomic_write_text(directory / f"{name}.csv", _checked(table).to_csv())
    md_path = atomic_write_text(directory / f"{name}.md",
                                to_markdown(fold_spread(table), floatfmt) + "\n")
    return [csv_path, md_path]
