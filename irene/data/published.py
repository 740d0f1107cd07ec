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
import math
import os
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from irene.data.tree import FEATURE_FIELDS, NodeType, Tree

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


class DataNotFoundError(FileNotFoundError):
    """The published CSVs are neither on disk nor downloadable."""


class DataFormatError(ValueError):
    """Bad CSV input, reported as ``file:line: field 'x': problem``."""


def csv_name(level: str) -> str:
    return f"{level}_level_features.csv"


def _has_all_files(folder: Path) -> bool:
    return all((folder / csv_name(level)).is_file() for level in CSV_FILES)


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
    target.mkdir(parents=True, exist_ok=True)
    for level in CSV_FILES:
        name = csv_name(level)
        url = f"{sources['base_url']}/{device}/{name}"
        expected = entry.get(name)
        partial = target / f".{name}.part"
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                partial.write_bytes(response.read())
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


def resolve_device_dir(path: str | Path | None, device: str = "device_1", *,
                       datasets_dir: Path, download: bool = True) -> Path:
    """Find a device folder: ``path``, then ``$IRENE_DATA_DIR``, then ``datasets/<device>``.

    When none holds the four CSVs and ``download`` is set, fetch them into
    ``datasets/<device>`` from the public repository (sha256 checked).
    """
    tried: list[str] = []
    candidates = [("config data.path", path), (f"${ENV_VAR}", os.environ.get(ENV_VAR)),
                  ("project datasets folder", datasets_dir / device)]
    for label, candidate in candidates:
        if candidate:
            folder = Path(candidate).expanduser()
            if _has_all_files(folder):
                return folder
            tried.append(f"{label}: {folder}")
    target = datasets_dir / device
    if download:
        try:
            return download_device(device, target)
        except DataNotFoundError as error:
            tried.append(f"download: {error}")
    files = ", ".join(csv_name(level) for level in CSV_FILES)
    raise DataNotFoundError(
        f"published data for {device} not found. Looked in: {'; '.join(tried)}. "
        f"Provide a folder with {files} via data.path=... or ${ENV_VAR}, or put them in {target} "
        f"(public URLs and sha256 in {SOURCES_FILE})."
    )


@dataclass(frozen=True)
class _Row:
    level: str  # model | module | ml1 | ml2
    scope: str  # dotted module path relative to the model ("" for the model row)
    instance_type: str
    features: dict
    energy_j: float


def _read_csv(folder: Path, level: str) -> pd.DataFrame:
    path = folder / csv_name(level)
    frame = pd.read_csv(path)
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise DataFormatError(f"{path}:1: field {missing[0]!r}: column missing")
    numeric = [c for c in CSV_COLUMNS if c not in ("level_name", "model_name")]
    values = frame[numeric].apply(pd.to_numeric, errors="coerce")
    bad = ~values.apply(lambda col: col.map(lambda v: isinstance(v, float) and math.isfinite(v)))
    if bad.to_numpy().any():
        row, col = next(zip(*bad.to_numpy().nonzero(), strict=True))
        raise DataFormatError(
            f"{path}:{row + 2}: field {numeric[col]!r}: must be a finite number, "
            f"got {frame.iloc[row][numeric[col]]!r}"
        )
    nonpositive = (values["energy_mean"] <= 0).to_numpy().nonzero()[0]
    if len(nonpositive):
        row = nonpositive[0]
        raise DataFormatError(f"{path}:{row + 2}: field 'energy_mean': must be positive, "
                              f"got {values['energy_mean'].iloc[row]!r}")
    frame[numeric] = values
    frame["src_line"] = range(2, len(frame) + 2)
    frame["src_level"] = level
    return frame


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
    ids = (model, batch_size, seq_len)
    from irene.data.architectures import model_class_name, parameter_counts  # transformers: slow

    counts = parameter_counts(model)
    model_row = next(row for row in rows if row["src_level"] == "model")
    root = _make_node(model_row, "root", None, model_class_name(model), NodeType.MODEL, counts[""], ids)
    by_scope: dict[str, dict] = {"": root}
    nodes: list[tuple[str, dict]] = []  # (relative scope of the parent to look up, node)
    for row in (row for row in rows if row["src_level"] in ("module", "ml1")):
        scope, instance_type = row["level_name"].rsplit(":", 1)
        if scope not in counts:
            raise DataFormatError(
                f"{csv_name(row['_level'])}:{row['_line']}: field 'level_name': scope {scope!r} "
                f"is not a module of {model} in this transformers version"
            )
        node_type = NodeType.MODULE if row["src_level"] == "module" else NodeType.ML
        node = _make_node(row, f"root.{scope}", None, instance_type, node_type, counts[scope], ids)
        by_scope[scope] = node
        nodes.append((scope, node))
    op_counter: dict[tuple[str, str], int] = defaultdict(int)
    for row in (row for row in rows if row["src_level"] == "ml2"):
        scope, instance_type = row["level_name"].rsplit(":", 1)
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
                                  f"'level_name': second row for {model} ({batch_size}, {seq_len})")
        trees.append(_build_tree(model, int(batch_size), int(seq_len), cell))
    return trees
