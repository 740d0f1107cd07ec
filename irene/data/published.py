"""Import of the published IrEne measurements (a device folder of four CSV files) into trees.

The CSVs carry no parent links: within one (model, batch_size, seq_len), a node's parent is
the row whose scope is the longest proper dotted prefix of its own; top-level modules hang
under the model row (the root); MatMul/Softmax rows (``ml2``) hang under the module their
scope names. ``num_parameters`` is computed offline from the HuggingFace config classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from irene.data.tree import FEATURE_FIELDS, FIELD_BOUNDS, MAX_SHAPE, NodeType, Tree, value_problem
from irene.errors import InputError, MissingInputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CSV_FILES = ("model", "module", "ml1", "ml2")
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
SOURCES_FILE = Path(__file__).resolve().with_name("published.json")  # packaged with irene
ENV_VAR = "IRENE_DATA_DIR"


class DataNotFoundError(MissingInputError):
    """The published CSVs are neither on disk nor downloadable, or a folder lacks one."""


class DataFormatError(InputError):
    """Bad CSV input, reported as ``file:line: field 'x': problem``."""


def csv_name(level: str) -> str:
    return f"{level}_level_features.csv"


def _missing_files(folder: Path) -> list[str]:
    return [csv_name(level) for level in CSV_FILES if not (folder / csv_name(level)).is_file()]


def load_sources(path: Path = SOURCES_FILE) -> dict:
    """Public raw-file URLs and sha256 checksums of each device's CSVs."""
    return json.loads(path.read_text())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_device(device: str, target: Path, *, timeout_s: float = 30.0) -> Path:
    """Download a device's CSVs from the public repository and check their sha256.

    Files land in ``target`` only once complete and verified.
    """
    sources = load_sources()
    if device not in sources["devices"]:
        raise DataNotFoundError(
            f"no public source known for device {device!r}; known: {sorted(sources['devices'])}"
        )
    entry = sources["devices"][device]
    for level in CSV_FILES:
        name = csv_name(level)
        url = f"{sources['base_url']}/{device}/{name}"
        expected = entry.get(name)
        partial = target / f".{name}.part"
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                content = response.read()
            target.mkdir(parents=True, exist_ok=True)  # only once there is something to keep
            partial.write_bytes(content)
        except (urllib.error.URLError, OSError) as error:
            partial.unlink(missing_ok=True)
            raise DataNotFoundError(f"could not download {url}: {error}") from error
        actual = sha256_of(partial)
        if expected and actual != expected:
            partial.unlink(missing_ok=True)
            raise DataNotFoundError(f"{url}: sha256 {actual} does not match the published {expected}")
        if not expected:
            log.warning("no published checksum for %s; its content is not verified", name)
        os.replace(partial, target / name)
    return target


@dataclass(frozen=True)
class DataLocation:
    """Where a device's CSVs were found, and how (see :func:`locate_device`).

    Attributes:
        folder: the folder of the four CSVs.
        source: ``data.path``, ``$IRENE_DATA_DIR``, ``datasets`` or ``download``.
        sha256: file name -> sha256 of its bytes, for the four CSVs.
    """

    folder: Path
    source: str
    sha256: dict[str, str]


def published_device(folder: Path) -> str | None:
    """The device whose published CSVs (sha256 in ``published.json``) ``folder`` holds."""
    if _missing_files(folder):
        return None
    digests = {csv_name(level): sha256_of(folder / csv_name(level)) for level in CSV_FILES}
    for device, checksums in load_sources()["devices"].items():
        if checksums and all(checksums.get(name) == digest for name, digest in digests.items()):
            return device
    return None


def _env_folder(device: str, env_dir: str) -> tuple[Path | None, str]:
    """The folder ``$IRENE_DATA_DIR`` gives for ``device`` (None if it names another one),
    and what it is. It names ``device`` when it holds a ``<device>/`` folder (a folder of
    device folders), when its own name is ``device``, or when its files are the published
    CSVs of ``device``."""
    root = Path(env_dir).expanduser()
    if (root / device).is_dir():
        return root / device, f"${ENV_VAR}/{device}"
    if root.name == device:
        return root, f"${ENV_VAR}"
    holds = published_device(root)
    if holds == device:
        return root, f"${ENV_VAR} (the published {device} files)"
    if holds:
        reason = f"holds the published {holds} files"
    elif root.name in load_sources()["devices"]:
        reason = f"is the folder of {root.name}"
    else:
        reason = f"is not named {device} and has no {device}/ folder"
    return None, f"${ENV_VAR}={root} skipped: it {reason}"


def locate_device(path: str | Path | None, device: str = "device_1", *, datasets_dir: Path,
                  download: bool = True) -> DataLocation:
    """Find a device's four CSVs. The one rule, first match wins:

    1. ``path`` (``data.path``): that folder, which must hold all four files; never another.
    2. ``$IRENE_DATA_DIR``, only for the device it names: a folder holding ``<device>/``, a
       folder named ``<device>``, or a folder of that device's published files (sha256). A
       folder it names that lacks a file is an error; one naming another device is skipped,
       so ``data=device_2`` never reads device 1.
    3. ``datasets/<device>`` next to ``outputs/``.
    4. With ``download``: fetch the published files into ``datasets/<device>`` (sha256 checked).

    Raises:
        DataNotFoundError: naming the folder and the missing file, or every place it looked.
    """
    if path:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise DataNotFoundError(f"data.path={folder}: no such folder")
        missing = _missing_files(folder)
        if missing:
            raise DataNotFoundError(f"data.path={folder}: {missing[0]} is missing "
                                    f"(a device folder holds {', '.join(_all_files())})")
        return _located(folder, "data.path")
    tried: list[str] = []
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        folder, label = _env_folder(device, env_dir)
        if folder is not None:
            missing = _missing_files(folder)
            if missing:
                raise DataNotFoundError(f"{label}={folder}: {missing[0]} is missing "
                                        f"(a device folder holds {', '.join(_all_files())})")
            return _located(folder, f"${ENV_VAR}")
        log.info("%s", label)
        tried.append(label)
    target = datasets_dir / device
    if not _missing_files(target):
        return _located(target, "datasets")
    tried.append(f"project datasets folder: {target}")
    if download:
        try:
            return _located(download_device(device, target), "download")
        except DataNotFoundError as error:
            tried.append(f"download: {error}")
    raise DataNotFoundError(
        f"published data for {device} not found. Looked in: {'; '.join(tried)}. "
        f"Provide a folder with {', '.join(_all_files())} via data.path=..., or "
        f"${ENV_VAR}=<folder holding {device}/>, or put them in {target} "
        f"(public URLs and sha256 in {SOURCES_FILE})."
    )


def resolve_device_dir(path: str | Path | None, device: str = "device_1", *,
                       datasets_dir: Path, download: bool = True) -> Path:
    """The folder of :func:`locate_device`."""
    return locate_device(path, device, datasets_dir=datasets_dir, download=download).folder


def _all_files() -> list[str]:
    return [csv_name(level) for level in CSV_FILES]


def _located(folder: Path, source: str) -> DataLocation:
    return DataLocation(folder=folder, source=source,
                        sha256={name: sha256_of(folder / name) for name in _all_files()})


@dataclass(frozen=True)
class _Row:
    level: str  # model | module | ml1 | ml2
    scope: str  # dotted module path relative to the model ("" for the model row)
    instance_type: str
    features: dict
    energy_j: float


# CSV column -> the node field whose bounds it obeys (irene.data.tree.FIELD_BOUNDS)
_COLUMN_FIELDS = {**{c: c for c in CSV_FEATURES}, "energy_mean": "ground_truth_energy",
                  "batch_size": "batch_size", "seq_len": "seq_len"}


def _read_csv(folder: Path, level: str) -> pd.DataFrame:
    """One CSV, every value checked: numbers of any numeric dtype (``8`` or ``8.0``) within
    their physical bounds, whole numbers where a count is meant, names in place."""
    import pandas as pd  # here: a stage that reads the cached trees does not import pandas

    path = folder / csv_name(level)
    try:
        frame = pd.read_csv(path, dtype={"level_name": str, "model_name": str})
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {error.start + 1}); is this a "
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
    return frame


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


def import_device(folder: str | Path, models: tuple[str, ...] | list[str] | None = PAPER_MODELS
                  ) -> list[Tree]:
    """Build one tree per (model, batch_size, seq_len) of a device folder.

    Args:
        folder: a folder with the four ``*_level_features.csv`` files.
        models: the models to keep, in this order (default: the six of the paper);
            ``None`` keeps every model of the files, in order of appearance.

    Returns:
        Trees ordered by model (as given), then batch size, then sequence length. Cells
        without a model row (some exist in the published data) are skipped with a warning.
    """
    import pandas as pd

    folder = Path(folder)
    frames = [_read_csv(folder, level) for level in CSV_FILES]
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
    return trees
