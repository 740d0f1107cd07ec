"""Import of the published IrEne measurements (a device folder of four CSV files) into trees.

The CSVs carry no parent links: within one (model, batch_size, seq_len), a node's parent is
the row whose scope is the longest proper dotted prefix of its own; top-level modules hang
under the model row (the root); MatMul/Softmax rows (``ml2``) hang under the module their
scope names. ``num_parameters`` is computed offline from the HuggingFace config classes.

Finding and downloading the files: :mod:`irene.data.locate` (its names are re-exported here).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from irene.data.integrity import check_import, check_input_file
from irene.data.locate import (
    CSV_FILES,
    ENV_VAR,
    SOURCES_FILE,
    DataLocation,
    DataNotFoundError,
    csv_name,
    download_device,
    load_sources,
    locate_device,
    published_device,
    resolve_device_dir,
    sha256_of,
)
from irene.data.provenance import csv_block
from irene.data.tree import FEATURE_FIELDS, FIELD_BOUNDS, MAX_SHAPE, NodeType, Tree, value_problem
from irene.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CSV_COLUMNS",
    "CSV_FEATURES",
    "CSV_FILES",
    "ENV_VAR",
    "PAPER_MODELS",
    "SOURCES_FILE",
    "DataFormatError",
    "DataLocation",
    "DataNotFoundError",
    "csv_name",
    "download_device",
    "import_device",
    "load_sources",
    "locate_device",
    "published_device",
    "resolve_device_dir",
    "sha256_of",
]

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "batch_size", "seq_len", "flops", "mem_bytes", "cpu", "mem", "gpu", "gpu_mem", "gpu_clk",
    "gpu_mem_clk", "times_mean", "gpu_energy_mean", "energy_mean", "level_name", "model_name",
)
CSV_FEATURES = tuple(f for f in FEATURE_FIELDS if f != "num_parameters")
PAPER_MODELS = (
    "bert-base-uncased",
    "distilbert-base-uncased",
    "roberta-base",
    "gpt2",
    "distilgpt2",
    "openai-gpt",
)


class DataFormatError(InputError):
    """Bad CSV input, reported as ``file:line: field 'x': problem``."""


# CSV column -> the node field whose bounds it obeys (irene.data.tree.FIELD_BOUNDS)
_COLUMN_FIELDS = {**{c: c for c in CSV_FEATURES}, "energy_mean": "ground_truth_energy",
                  "batch_size": "batch_size", "seq_len": "seq_len"}


def _read_csv(folder: Path, level: str, max_mb: float | None = None) -> pd.DataFrame:
    """One CSV, every value checked: numbers of any numeric dtype (``8`` or ``8.0``) within
    their physical bounds, whole numbers where a count is meant, names in place. A file
    larger than ``max_mb`` is refused before it is read (:mod:`irene.data.integrity`)."""
    import pandas as pd  # here: a stage that reads the cached trees does not import pandas

    path = folder / csv_name(level)
    check_input_file(path, "CSV file", max_mb)
    try:
        frame = pd.read_csv(path, dtype={"level_name": str, "model_name": str})
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {_first_bad_byte(path)}); is this a "
                              "CSV file?") from None
    except pd.errors.EmptyDataError:
        raise DataFormatError(f"{path}:1: empty file; expected the header "
                              f"{','.join(CSV_COLUMNS)}") from None
    except (pd.errors.ParserError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataFormatError(f"{path}: not a readable CSV file ({first})") from None
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise DataFormatError(f"{path}:1: field {missing[0]!r}: column missing")
    numeric = [c for c in CSV_COLUMNS if c not in ("level_name", "model_name")]
    values = frame[numeric].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    for row, column in _first_problems(values, numeric):
        raw = frame.iloc[row][column]
        raw = raw.item() if isinstance(raw, np.generic) else raw
        value = float(values.iloc[row][column])
        plain = int(value) if value.is_integer() and abs(value) < 2**53 else value
        problem = value_problem(_COLUMN_FIELDS[column], raw if np.isnan(value) else plain)
        if problem and isinstance(raw, float) and np.isnan(raw):  # pandas reads "" as NaN
            problem = problem.rpartition(", got ")[0] + ", got an empty cell (or NaN)"
        if problem:
            raise DataFormatError(f"{path}:{row + 2}: field {column!r}: {problem}")
    for column in ("level_name", "model_name"):
        names = frame[column]
        empty = np.flatnonzero(names.isna().to_numpy() | (names.astype(str).str.strip() == ""))
        if len(empty):
            raise DataFormatError(f"{path}:{empty[0] + 2}: field {column!r}: empty")
    frame[numeric] = values
    frame["src_line"] = range(2, len(frame) + 2)
    frame["src_level"] = level
    frame["src_file"] = str(path)
    frame.attrs["src_file"] = str(path)  # named even when the file has no rows
    return frame


def _first_bad_byte(path: Path) -> int:
    """1-based offset in the file of its first byte that is not UTF-8 (pandas reports an
    offset within the chunk it was decoding)."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start + 1
    return 0


def _first_problems(values: pd.DataFrame, columns: list[str]):
    """(row, column) of cells that may break a bound, in file order (checked exactly later)."""
    bad = ~np.isfinite(values.to_numpy())
    for j, column in enumerate(columns):
        field = _COLUMN_FIELDS[column]
        col = values[column].to_numpy()
        with np.errstate(invalid="ignore"):
            if field in ("batch_size", "seq_len"):
                bad[:, j] |= (col <= 0) | (col != np.round(col)) | (col > MAX_SHAPE)
            else:
                low, high, _ = FIELD_BOUNDS[field]
                bad[:, j] |= (col < low) | (col > high)
                if field == "ground_truth_energy":
                    bad[:, j] |= col <= 0
    rows, cols = np.nonzero(bad)
    return [(int(r), columns[c]) for r, c in sorted(zip(rows, cols, strict=True))]


def _split_level_name(row: dict) -> tuple[str, str]:
    """``(scope, class)`` of a module / ml row's ``level_name`` (``<scope>:<class>``)."""
    scope, colon, instance_type = str(row["level_name"]).rpartition(":")
    if not colon or not scope or not instance_type:
        raise DataFormatError(f"{row['src_file']}:{row['src_line']}: field 'level_name': expected "
                              f"'<module scope>:<class name>', got {row['level_name']!r}")
    return scope, instance_type


def _node_id(model: str, batch_size: int, seq_len: int, scope: str) -> str:
    return f"{model}/{batch_size}x{seq_len}/{scope}"


def _make_node(row, scope: str, parent: str | None, instance_type: str, node_type: str,
               num_parameters: int, ids: tuple) -> dict:
    node = {"id": _node_id(*ids, scope), "scope": scope, "parent_name": parent, "level": 0,
            "instance_type": instance_type, "type": node_type, "num_parameters": num_parameters}
    for field in CSV_FEATURES:
        node[field] = float(row[field])
    node["ground_truth_energy"] = float(row["energy_mean"])
    node["child_nodes_obj"] = []
    node["child_nodes"] = []
    return node


def _build_tree(model: str, batch_size: int, seq_len: int, rows: list[dict]) -> Tree:
    """One tree from all rows of one (model, batch_size, seq_len)."""
    from irene.data.architectures import model_class_name, parameter_counts  # torch, transformers

    ids = (model, batch_size, seq_len)
    counts = parameter_counts(model)
    model_row = next(row for row in rows if row["src_level"] == "model")
    root = _make_node(model_row, "root", None, model_class_name(model), NodeType.MODEL, counts[""], ids)
    by_scope: dict[str, dict] = {"": root}
    nodes: list[tuple[str, dict]] = []  # (relative scope of the parent to look up, node)
    first_row: dict[str, dict] = {}
    for row in (row for row in rows if row["src_level"] in ("module", "ml1")):
        scope, instance_type = _split_level_name(row)
        where = f"{row['src_file']}:{row['src_line']}: field 'level_name'"
        if scope not in counts:
            raise DataFormatError(f"{where}: scope {scope!r} is not a module of {model} in this "
                                  "transformers version")
        if scope in first_row:
            first = first_row[scope]
            raise DataFormatError(f"{where}: a second row for scope {scope!r} of {model} "
                                  f"({batch_size}, {seq_len}) (the first is "
                                  f"{Path(first['src_file']).name}:{first['src_line']})")
        first_row[scope] = row
        node_type = NodeType.MODULE if row["src_level"] == "module" else NodeType.ML
        node = _make_node(row, f"root.{scope}", None, instance_type, node_type, counts[scope], ids)
        by_scope[scope] = node
        nodes.append((scope, node))
    op_counter: dict[tuple[str, str], int] = defaultdict(int)
    for row in (row for row in rows if row["src_level"] == "ml2"):
        scope, instance_type = _split_level_name(row)
        where = f"{row['src_file']}:{row['src_line']}: field 'level_name'"
        if scope not in counts:  # else it would hang silently under the nearest ancestor
            raise DataFormatError(f"{where}: scope {scope!r} is not a module of {model} in this "
                                  "transformers version")
        holder = by_scope.get(scope)
        if holder is not None and holder["type"] == NodeType.ML:
            raise DataFormatError(f"{where}: scope {scope!r} is an ml1 row (a leaf, "
                                  f"{Path(first_row[scope]['src_file']).name}:"
                                  f"{first_row[scope]['src_line']}); it cannot hold {instance_type}")
        k = op_counter[(scope, instance_type)]
        op_counter[(scope, instance_type)] += 1
        node = _make_node(row, f"root.{scope}.{instance_type.lower()}_{k}", None, instance_type,
                          NodeType.ML, 0, ids)
        # an ml2 row's scope is its parent's scope: look up the parent by "scope + '.'"
        nodes.append((f"{scope}.{instance_type.lower()}_{k}", node))

    for scope, node in nodes:
        parent_scope = scope
        while parent_scope:
            parent_scope = parent_scope.rpartition(".")[0]
            if parent_scope in by_scope:
                break
        parent = by_scope[parent_scope]
        node["parent_name"] = parent["scope"]
        parent["child_nodes_obj"].append(node)
        parent["child_nodes"].append(node["scope"])
    _finish(root, 0)
    return {"model_name": model, "batch_size": batch_size, "seq_len": seq_len,
            "frontend_tree": root}


def _finish(node: dict, level: int) -> None:
    """Set tree depths; a module that ended up childless is a primitive (e.g. a ReLU module)."""
    node["level"] = level
    if node["type"] == NodeType.MODULE and not node["child_nodes_obj"]:
        node["type"] = NodeType.ML.value
    for child in node["child_nodes_obj"]:
        _finish(child, level + 1)


def import_device(folder: str | Path, models: tuple[str, ...] | list[str] | None = PAPER_MODELS,
                  *, max_mb: float | None = None, device: str | None = None) -> list[Tree]:
    """Build one tree per (model, batch_size, seq_len) of a device folder.

    Args:
        folder: a folder with the four ``*_level_features.csv`` files.
        models: the models to keep, in this order (default: the six of the paper);
            ``None`` keeps every model of the files, in order of appearance.
        max_mb: the largest CSV read, in MB (None: ``integrity.DEFAULT_MAX_FILE_MB``).
        device: the user's name for files that are no published device's
            (:func:`irene.data.provenance.csv_block` gives every tree its ``device``).

    Returns:
        Trees ordered by model (as given), then batch size, then sequence length. Cells
        without a model row (some exist in the published data) are skipped with a warning.
    """
    import pandas as pd

    folder = Path(folder)
    frames = [_read_csv(folder, level, max_mb) for level in CSV_FILES]
    rows = pd.concat(frames, ignore_index=True)
    rows["batch_size"] = rows["batch_size"].astype(int)
    rows["seq_len"] = rows["seq_len"].astype(int)
    available = list(dict.fromkeys(rows["model_name"]))
    wanted = available if models is None else list(models)
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise DataFormatError(f"{folder}: models {unknown} not in the data; it has {available}")
    from irene.data.architectures import MODEL_REGISTRY  # torch, transformers: only to import

    for model in wanted:
        if model not in MODEL_REGISTRY:  # num_parameters is computed from the architecture
            first = rows[rows["model_name"] == model].iloc[0]
            raise DataFormatError(
                f"{first['src_file']}:{first['src_line']}: field 'model_name': {model!r} is not "
                f"an architecture this version knows (irene/data/architectures.py); known: "
                f"{', '.join(sorted(MODEL_REGISTRY))}")
    cells: dict[tuple[str, int, int], list[dict]] = defaultdict(list)
    for row in rows.to_dict("records"):
        cells[(row["model_name"], row["batch_size"], row["seq_len"])].append(row)
    order = {model: i for i, model in enumerate(wanted)}
    trees = []
    for (model, batch_size, seq_len) in sorted((k for k in cells if k[0] in order),
                                              key=lambda k: (order[k[0]], k[1], k[2])):
        cell = cells[(model, batch_size, seq_len)]
        model_lines = [row["src_line"] for row in cell if row["src_level"] == "model"]
        if not model_lines:
            log.warning("%s: %s at batch %d, seq %d has no model row; skipped",
                        folder, model, batch_size, seq_len)
            continue
        if len(model_lines) > 1:
            raise DataFormatError(f"{folder / csv_name('model')}:{model_lines[1]}: field "
                                  f"'level_name': a second row for {model} ({batch_size}, "
                                  f"{seq_len}) (the first is line {model_lines[0]})")
        trees.append(_build_tree(model, int(batch_size), int(seq_len), cell))
    check_import(frames)  # duplicates, orphan model rows, structure, physics: every model
    block = csv_block({csv_name(level): sha256_of(folder / csv_name(level)) for level in CSV_FILES},
                      device)
    return [{**tree, "device": block} for tree in trees]
