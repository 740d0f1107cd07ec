"""Input that cannot exhaust memory or change silently.

Two kinds of checks, both ending in one line that names the file (and the rows):

- :func:`check_input_file`, before any byte is read: the path is a regular file (not a
  folder, not a symbolic link that loops) no larger than a stated limit
  (:data:`DEFAULT_MAX_FILE_MB`, the setting ``data.max_file_mb``). Reading a published CSV
  with pandas takes about 2.8 MiB of memory per MB of file, a trees file about 3 MiB per MB
  when parsed (docs/pipeline.md), so a file at the default limit is read well within 2 GiB.
- :func:`check_import` (the rows of a device's four CSVs) and :func:`check_trees` (a trees
  file): data whose values are each plausible but that together say the file was edited,
  appended to or mislabelled:

  * exact duplicate rows. The published ``ml2`` files repeat the row of an attention's
    second MatMul right after the first (two children of equal cost), so one repetition of
    the row just before is allowed there; any other repetition is refused;
  * a model row whose name (``model_name`` or ``level_name``) matches no row of the other
    levels at its shape: its tree would be dropped, or built from no modules;
  * trees of one model whose structure (the multiset of rows, or of nodes, below the root)
    differs between shapes: rows lost or added in some shapes;
  * physics inverted: the GPU's own energy above the measured energy by more than
    :data:`INVERTED_MARGIN` in most rows (on both published devices the system energy is at
    least the GPU energy in every row; on the H200 trees, whose ground truth is the GPU
    counter, the two agree within 7 %), as when the two columns are swapped in the header.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from irene.errors import InputError, MissingInputError

if TYPE_CHECKING:
    import pandas as pd

MB = 2**20  # a "MB" of the size limit
DEFAULT_MAX_FILE_MB = 256.0  # data.max_file_mb: the largest CSV or trees file read
SIZE_SETTING = "data.max_file_mb"
# GPU energy above the measured energy by more than this factor counts as inverted physics
INVERTED_MARGIN = 1.1
_LINES_SHOWN = 3  # row numbers quoted in a message


class IntegrityError(InputError):
    """Input whose rows together cannot be right (duplicates, orphans, inverted physics)."""


class InputFileError(InputError):
    """A path that cannot be read as an input file: a folder, a loop, too large."""


# ------------------------------------------------------------------------------ the file
def check_input_file(path: str | Path, what: str, max_mb: float | None = None) -> int:
    """Check ``path`` before reading it; return its size in bytes.

    Args:
        path: the file.
        what: what the file should be, for the messages (``"trees file"``, ``"CSV file"``).
        max_mb: the size limit in MB (2**20 bytes); None: :data:`DEFAULT_MAX_FILE_MB`.

    Raises:
        MissingInputError: ``"<what> not found: <path>"`` (also a dangling link).
        InputFileError: a folder, a symbolic link loop, not a regular file, or larger
            than the limit, in one line naming the file, its size and the setting.
    """
    path = Path(path)
    limit = DEFAULT_MAX_FILE_MB if max_mb is None else float(max_mb)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise MissingInputError(f"{what} not found: {path}") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise InputFileError(f"{path}: a symbolic link that loops (it never reaches a "
                                 f"file); expected a {what}") from None
        raise InputFileError(f"{path}: cannot be read ({error.strerror}); expected a "
                             f"{what}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputFileError(f"{path}: a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise InputFileError(f"{path}: not a regular file (a device, pipe or socket); "
                             f"expected a {what}")
    if info.st_size > limit * MB:
        raise InputFileError(
            f"{path}: {_mb(info.st_size)} MB ({info.st_size} bytes), larger than the "
            f"{limit:g} MB limit on an input file; {SIZE_SETTING}=<MB> raises it "
            "(memory grows about 3 MB per MB read)")
    return int(info.st_size)


def _mb(size: int) -> str:
    """A size in MB: one decimal from 1 MB up (``2048.0``), three significant digits below."""
    return f"{size / MB:.1f}" if size >= MB else f"{size / MB:.3g}"


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable regular file, in a few words (None when it is)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "is missing"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link that loops"
        return f"cannot be read ({error.strerror})"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    return None


# ------------------------------------------------------------------ the published CSVs
_ROW_COLUMNS = (
    "batch_size", "seq_len", "flops", "mem_bytes", "cpu", "mem", "gpu", "gpu_mem", "gpu_clk",
    "gpu_mem_clk", "times_mean", "gpu_energy_mean", "energy_mean", "level_name", "model_name",
)  # a row's content (irene.data.published.CSV_COLUMNS)


def check_import(frames: Sequence[pd.DataFrame]) -> None:
    """Refuse a device's rows that cannot be right together (module docstring).

    Args:
        frames: the four levels as read by ``irene.data.published._read_csv`` (values
            checked, plus ``src_file``, ``src_line`` and ``src_level``), model level first.

    Raises:
        IntegrityError: the first problem, in one line naming the file and its lines.
    """
    for frame in frames:
        _no_header_only(frame)
    for frame in frames:
        _no_duplicate_rows(frame)
    for frame in frames:
        _physics_not_inverted(frame)
    model, others = _split_model_level(frames)
    _model_rows_match(model, others)
    _same_structure_at_every_shape(model, others)


def _file(frame: pd.DataFrame) -> str:
    return str(frame.attrs.get("src_file") or frame["src_file"].iloc[0])


def _lines(lines: Sequence[int]) -> str:
    shown = ", ".join(str(int(line)) for line in lines[:_LINES_SHOWN])
    more = len(lines) - _LINES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _no_header_only(frame: pd.DataFrame) -> None:
    if len(frame) == 0:
        raise IntegrityError(f"{frame.attrs.get('src_file', '?')}:2: no rows after the header "
                             "(a device's file holds one row per node it measured)")


def _no_duplicate_rows(frame: pd.DataFrame) -> None:
    """An exact repetition of an earlier row is refused, except in ``ml2``: one repetition of
    the row right before (an attention's two MatMuls of equal cost)."""
    content = frame[list(_ROW_COLUMNS)]
    repeated = content.duplicated(keep="first").to_numpy().copy()
    if not repeated.any():
        return
    same_as_before = np.zeros(len(frame), dtype=bool)
    same_as_before[1:] = True
    for column in _ROW_COLUMNS:
        values = content[column].to_numpy()
        same_as_before[1:] &= values[1:] == values[:-1]
    if frame["src_level"].iloc[0] == "ml2":
        twin = same_as_before.copy()
        twin[1:] &= ~same_as_before[:-1]  # a pair, not a third copy,
        twin[1:] &= ~repeated[:-1]  # of a row that is no repetition itself
        repeated &= ~twin
    bad = np.flatnonzero(repeated)
    if not len(bad):
        return
    first_bad = int(bad[0])
    row = content.iloc[first_bad]
    equal = np.ones(len(frame), dtype=bool)
    for column in _ROW_COLUMNS:
        equal &= content[column].to_numpy() == row[column]
    original = int(np.flatnonzero(equal)[0])
    lines = frame["src_line"].to_numpy()
    what = (f"{row['model_name']} ({int(row['batch_size'])}, {int(row['seq_len'])}) "
            f"{row['level_name']}")
    allowed = (" (only an ml2 row may repeat once, right after itself: an attention's two "
               "MatMuls)" if frame["src_level"].iloc[0] == "ml2" else "")
    raise IntegrityError(
        f"{_file(frame)}:{lines[first_bad]}: an exact duplicate of line {lines[original]} "
        f"({what}){allowed}; duplicate rows: lines {_lines(lines[bad])}")


def _physics_not_inverted(frame: pd.DataFrame) -> None:
    gpu = frame["gpu_energy_mean"].to_numpy(dtype=np.float64)
    total = frame["energy_mean"].to_numpy(dtype=np.float64)
    inverted = np.flatnonzero(gpu > INVERTED_MARGIN * total)
    if 2 * len(inverted) > len(frame):
        lines = frame["src_line"].to_numpy()[inverted]
        raise IntegrityError(
            f"{_file(frame)}: field 'gpu_energy_mean' is above 'energy_mean' (the measured "
            f"energy) by more than {INVERTED_MARGIN - 1:.0%} in {len(inverted)} of "
            f"{len(frame)} rows (lines {_lines(lines)}): a GPU's own counter cannot exceed the "
            "whole measured energy; are the two columns swapped in the header?")


def _split_model_level(frames: Sequence[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    import pandas as pd

    model = next(f for f in frames if f["src_level"].iloc[0] == "model")
    others = pd.concat([f for f in frames if f["src_level"].iloc[0] != "model"],
                       ignore_index=True)
    return model, others


def _shape(row: Any) -> str:
    return f"({int(row['batch_size'])}, {int(row['seq_len'])})"


def _model_rows_match(model: pd.DataFrame, others: pd.DataFrame) -> None:
    """Every model row's ``model_name`` and ``level_name`` name a model that has rows at
    the other levels at the same shape."""
    shapes = set(zip(others["model_name"], others["batch_size"], others["seq_len"],
                     strict=True))
    for row in model.to_dict("records"):
        for field in ("model_name", "level_name"):
            if (row[field], row["batch_size"], row["seq_len"]) not in shapes:
                raise IntegrityError(
                    f"{row['src_file']}:{row['src_line']}: field {field!r}: the model row "
                    f"{row[field]!r} {_shape(row)} matches no row of the module, ml1 or ml2 "
                    "files at that shape (a model row names the model its other rows measure)")


def _same_structure_at_every_shape(model: pd.DataFrame, others: pd.DataFrame) -> None:
    """The rows below each model row, counted by (level, level_name), are the same at every
    shape of the model. Cells without a model row are not imported and not compared."""
    keys = ["model_name", "batch_size", "seq_len"]
    imported = others.merge(model[keys].drop_duplicates(), on=keys, how="inner")
    if imported.empty:
        return
    counts = imported.groupby([*keys, "src_level", "level_name"], sort=False).size()
    first_line = imported.groupby([*keys, "src_level", "level_name"], sort=False)[
        ["src_line", "src_file"]].first()
    structures: dict[tuple, Counter] = {}
    for (name, batch, seq, level, level_name), n in counts.items():
        structures.setdefault((name, batch, seq), Counter())[(level, level_name)] = int(n)
    by_model: dict[str, list[tuple]] = {}
    for cell in structures:  # cells in file order
        by_model.setdefault(cell[0], []).append(cell)
    for cells in by_model.values():
        signatures = [frozenset(structures[c].items()) for c in cells]
        tally = Counter(signatures)
        if len(tally) == 1:
            continue
        reference = max(tally, key=lambda s: (tally[s], -signatures.index(s)))
        ref_cell = cells[signatures.index(reference)]
        odd = next(c for c, s in zip(cells, signatures, strict=True) if s != reference)
        _structure_error(odd, ref_cell, structures, first_line, tally[reference])


def _structure_error(odd: tuple, ref_cell: tuple, structures: dict, first_line: Any,
                     agreeing: int) -> None:
    name, batch, seq = odd
    shape = f"{name} ({int(batch)}, {int(seq)})"
    ref_shape = f"({int(ref_cell[1])}, {int(ref_cell[2])})"
    def first_row(rows: dict, cell: tuple) -> tuple[str, Any]:
        """The row of ``rows`` (of ``cell``) that comes first in its file: name, location."""
        level, level_name = min(rows, key=lambda key: first_line.loc[(*cell, *key)]["src_line"])
        return level_name, first_line.loc[(*cell, level, level_name)]

    extra = structures[odd] - structures[ref_cell]
    lacking = structures[ref_cell] - structures[odd]
    if extra:
        level_name, at = first_row(extra, odd)
        raise IntegrityError(
            f"{at['src_file']}:{at['src_line']}: {shape} has {sum(extra.values())} row(s) more "
            f"than the {agreeing} shapes of its model that agree (first: {level_name!r}, compare "
            f"{ref_shape}); one model's trees have one structure at every shape")
    level_name, at = first_row(lacking, ref_cell)
    raise IntegrityError(
        f"{at['src_file']}: {shape} lacks {sum(lacking.values())} row(s) that the {agreeing} "
        f"shapes of its model that agree have (first: {level_name!r}, line {at['src_line']} at "
        f"{ref_shape}); one model's trees have one structure at every shape")


# -------------------------------------------------------------------------- trees files
def check_trees(trees: Sequence[dict], lines: Sequence[int], path: str | Path, *,
                structure: bool = True) -> None:
    """Refuse a trees file whose energies are inverted in most nodes, or (``structure``)
    whose trees of one model differ in structure between shapes.

    Args:
        trees: the validated trees of the file.
        lines: the line of each tree in the file.
        path: the file, for the messages.
        structure: compare the trees of a model on one device (measured data sets: all
            shapes of a model are the same network; each device's trees are compared apart).
    """
    from irene.data.tree import iter_nodes

    inverted, both, inverted_lines = 0, 0, []
    for tree, line in zip(trees, lines, strict=True):
        for node in iter_nodes(tree["frontend_tree"]):
            gpu, total = node.get("gpu_energy_mean"), node.get("ground_truth_energy")
            if gpu is None or total is None:
                continue
            both += 1
            if gpu > INVERTED_MARGIN * total:
                inverted += 1
                if not inverted_lines or inverted_lines[-1] != line:
                    inverted_lines.append(line)
    if both and 2 * inverted > both:
        raise IntegrityError(
            f"{path}: field 'gpu_energy_mean' is above 'ground_truth_energy' by more than "
            f"{INVERTED_MARGIN - 1:.0%} in {inverted} of {both} nodes (lines "
            f"{_lines(inverted_lines)}): a GPU's own counter cannot exceed the whole measured "
            "energy; were the two fields swapped?")
    if structure:
        _trees_share_structure(trees, lines, path)


def _trees_share_structure(trees: Sequence[dict], lines: Sequence[int], path: str | Path) -> None:
    from irene.data.tree import device_key, iter_nodes

    by_model: dict[tuple, list[int]] = {}  # a model on each device (its trees' key: device_key)
    for i, tree in enumerate(trees):
        by_model.setdefault(device_key(tree)[:2], []).append(i)
    for positions in by_model.values():
        if len(positions) < 2:
            continue
        structures = [Counter((n["scope"], n["instance_type"], n["type"])
                              for n in iter_nodes(trees[i]["frontend_tree"])) for i in positions]
        signatures = [frozenset(s.items()) for s in structures]
        tally = Counter(signatures)
        if len(tally) == 1:
            continue
        reference = max(tally, key=lambda s: (tally[s], -signatures.index(s)))
        ref = signatures.index(reference)
        odd = next(k for k, s in enumerate(signatures) if s != reference)
        tree, ref_tree = trees[positions[odd]], trees[positions[ref]]
        extra = structures[odd] - structures[ref]
        lacking = structures[ref] - structures[odd]
        shape = f"({tree['batch_size']}, {tree['seq_len']})"
        ref_at = f"line {lines[positions[ref]]}, ({ref_tree['batch_size']}, {ref_tree['seq_len']})"
        parts = []
        if lacking:
            parts.append(f"lacks {sum(lacking.values())} node(s) (first: "
                         f"{min(lacking)[0]!r})")
        if extra:
            parts.append(f"has {sum(extra.values())} node(s) more (first: {min(extra)[0]!r})")
        raise IntegrityError(
            f"{path}:{lines[positions[odd]]}: {tree['model_name']} {shape} {' and '.join(parts)} "
            f"than the {tally[reference]} tree(s) of its model that agree ({ref_at}); one "
            "model's trees have one structure at every shape")
