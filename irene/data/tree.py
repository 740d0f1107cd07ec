"""The public IrEne tree format: read with validation, write atomically, walk.

One JSON object per line, one line per (device, model_name, batch_size, seq_len)::

    {"model_name": str, "batch_size": int, "seq_len": int, "frontend_tree": <node>}

A node carries ``id``, ``scope``, ``parent_name``, ``level``, ``instance_type``, ``type``
(``model`` | ``module`` | ``ml``), the features (:data:`FEATURE_FIELDS`),
``ground_truth_energy`` in joules when measured, ``predicted_energy`` once predicted, and its
children in ``child_nodes_obj`` (their scopes in ``child_nodes``). A line may also carry
``device`` (:mod:`irene.data.provenance`: where, on what and by which convention it was
measured). A file may hold several devices' trees: a tree's key is its device's ``id`` with its
model and shape (:func:`device_key`), so two devices' trees of one shape are two trees, and
node ids (model/shape/scope) need only be unique within a device. Trees stay plain dicts so
that files written here are readable by the public IrEne evaluator and vice versa.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

from irene.data.io import atomic_write_text
from irene.data.provenance import device_problem
from irene.errors import InputError, MissingInputError  # noqa: F401 - re-exported


class NodeType(StrEnum):
    """The ``type`` of a node: the root, a module, or an ML primitive (a leaf)."""

    MODEL = "model"
    MODULE = "module"
    ML = "ml"


# Every node type; a node's position here is its code in :class:`irene.data.forest.Forest`.
NODE_TYPES = tuple(NodeType)
# Column order of every error table (the reference report's: leaves first).
ERROR_COLUMNS = (NodeType.ML.value, NodeType.MODULE.value, NodeType.MODEL.value)
REQUIRED_TREE_FIELDS = ("model_name", "batch_size", "seq_len", "frontend_tree")
REQUIRED_NODE_FIELDS = ("id", "scope", "level", "instance_type", "type", "child_nodes_obj")
# Features a node may carry, in the column order of the published data.
FEATURE_FIELDS = (
    "num_parameters",
    "flops",
    "mem_bytes",
    "cpu",
    "mem",
    "gpu",
    "gpu_mem",
    "gpu_clk",
    "gpu_mem_clk",
    "times_mean",
    "gpu_energy_mean",
)

Tree = dict[str, Any]
Node = dict[str, Any]

# Physically possible values of every numeric field of a node, in its unit: (low, high, unit).
# The bounds are generous (a GPU's utilisation is a percentage; no forward pass takes 1 GJ)
# and keep every later product finite; a value outside is a broken measurement or file.
FIELD_BOUNDS: dict[str, tuple[float, float, str]] = {
    "num_parameters": (0.0, 1e13, "parameters"),
    "flops": (0.0, 1e15, "MFLOP"),
    "mem_bytes": (0.0, 1e12, "MiB"),
    "cpu": (0.0, 1e5, "%"),  # per-core percentages may add up beyond 100
    "mem": (0.0, 100.0, "%"),
    "gpu": (0.0, 100.0, "%"),
    "gpu_mem": (0.0, 100.0, "%"),
    "gpu_clk": (0.0, 1e5, "MHz"),
    "gpu_mem_clk": (0.0, 1e5, "MHz"),
    "times_mean": (0.0, 1e6, "s"),
    "gpu_energy_mean": (0.0, 1e9, "J"),
    "ground_truth_energy": (0.0, 1e9, "J"),  # and strictly positive
}
MAX_SHAPE = 2**31 - 1  # batch_size and seq_len: positive integers up to this


class TreeFormatError(InputError):
    """Bad input, reported in one line as ``file:line: node 'scope': field 'name': problem``."""


def value_problem(field: str, value: Any) -> str | None:
    """Why ``value`` cannot be the ``field`` of a node (None when it can).

    ``field`` is a feature of :data:`FIELD_BOUNDS`, ``ground_truth_energy`` (strictly
    positive) or ``batch_size`` / ``seq_len`` (positive integers).
    """
    if field == "ground_truth_energy" and not (_is_finite_number(value) and value > 0):
        return f"must be a finite positive number, got {value!r}"
    if not _is_finite_number(value):
        return f"must be a finite number, got {value!r}"
    if field in ("batch_size", "seq_len"):
        if value <= 0 or int(value) != value or value > MAX_SHAPE:
            return f"must be a positive integer, got {value!r}"
        return None
    low, high, unit = FIELD_BOUNDS[field]
    if not low <= value <= high:
        return f"must be in [{low:g}, {high:g}] {unit}, got {value!r}"
    return None


def iter_nodes(node: Node) -> Iterator[Node]:
    """Yield ``node`` and its descendants in pre-order (parent before children)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.get("child_nodes_obj") or []))


def iter_nodes_with_parent(root: Node) -> Iterator[tuple[Node, int, int]]:
    """Yield ``(node, parent_position, depth)`` in pre-order; the root's parent is -1."""
    stack: list[tuple[Node, int, int]] = [(root, -1, 0)]
    position = 0
    while stack:
        node, parent, depth = stack.pop()
        yield node, parent, depth
        for child in reversed(node.get("child_nodes_obj") or []):
            stack.append((child, position, depth + 1))
        position += 1


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_tree(
    tree: Any,
    where: str,
    *,
    require_energy: bool = False,
    seen_ids: set[str] | None = None,
) -> None:
    """Check one tree; raise :class:`TreeFormatError` naming ``where``, node and field.

    Args:
        tree: the decoded JSON object of one line.
        where: ``"file:line"`` used as the message prefix.
        require_energy: every node must carry a finite positive ``ground_truth_energy``.
        seen_ids: ids already used in the same file (updated in place), to catch duplicates.
    """

    def fail(field: str, problem: str, node: Node | None = None) -> None:
        at = f" node {node.get('scope', node.get('id'))!r}:" if isinstance(node, dict) else ""
        raise TreeFormatError(f"{where}:{at} field {field!r}: {problem}")

    if not isinstance(tree, dict):
        raise TreeFormatError(f"{where}: expected a JSON object, got {type(tree).__name__}")
    for field in REQUIRED_TREE_FIELDS:
        if field not in tree:
            fail(field, "missing")
    if not isinstance(tree["model_name"], str) or not tree["model_name"]:
        fail("model_name", f"must be a non-empty string, got {tree['model_name']!r}")
    for field in ("batch_size", "seq_len"):
        problem = value_problem(field, tree[field])
        if problem:
            fail(field, problem)
    if "device" in tree:  # where it was measured (irene.data.provenance); absent: public format
        problem = device_problem(tree["device"])
        if problem:
            fail("device", problem)
    root = tree["frontend_tree"]
    if not isinstance(root, dict):
        fail("frontend_tree", "must be a JSON object")
    if root.get("type") != NodeType.MODEL:
        fail("type", f"the root must be of type 'model', got {root.get('type')!r}", root)

    seen_ids = set() if seen_ids is None else seen_ids
    for node in iter_nodes(root):
        if not isinstance(node, dict):
            fail("child_nodes_obj", "every child must be a JSON object")
        for field in REQUIRED_NODE_FIELDS:
            if field not in node:
                fail(field, "missing", node)
        if node["type"] not in NODE_TYPES:
            fail("type", f"must be one of {[t.value for t in NODE_TYPES]}, got {node['type']!r}", node)
        if not isinstance(node["child_nodes_obj"], list):
            fail("child_nodes_obj", "must be a list", node)
        if not node["child_nodes_obj"] and node["type"] != NodeType.ML:
            fail("type", f"a leaf must be an 'ml' node, got {node['type']!r}", node)
        if node["type"] == NodeType.ML and node["child_nodes_obj"]:
            fail("child_nodes_obj", "an 'ml' node must be a leaf", node)
        node_id = node["id"]
        if not isinstance(node_id, str) or not node_id:
            fail("id", f"must be a non-empty string, got {node_id!r}", node)
        if node_id in seen_ids:
            fail("id", f"duplicate node id {node_id!r}", node)
        seen_ids.add(node_id)
        for field in ("scope", "instance_type"):
            if not isinstance(node[field], str) or not node[field]:
                fail(field, f"must be a non-empty string, got {node[field]!r}", node)
        level = node["level"]
        if not (_is_finite_number(level) and level >= 0 and int(level) == level):
            fail("level", f"must be a whole number >= 0, got {level!r}", node)
        for field in FEATURE_FIELDS:
            if field in node and node[field] is not None:
                problem = value_problem(field, node[field])
                if problem:
                    fail(field, problem, node)
        energy = node.get("ground_truth_energy")
        if energy is None:
            if require_energy:
                fail("ground_truth_energy", "missing (a measured energy is required here)", node)
        else:
            problem = value_problem("ground_truth_energy", energy)
            if problem:
                fail("ground_truth_energy", problem, node)
        predicted = node.get("predicted_energy")
        if predicted is not None and not _is_finite_number(predicted):
            fail("predicted_energy", f"must be a finite number, got {predicted!r}", node)


def read_trees(path: str | Path, *, require_energy: bool = False, validate: bool = True,
               max_mb: float | None = None) -> list[Tree]:
    """Read and validate a trees jsonl file (``validate=False``: parse only, for bytes known
    to have passed validation before, such as a checked cache).

    Validation includes :func:`irene.data.integrity.check_trees`: energies not inverted and,
    with ``require_energy`` (a measured data set), one structure per model at every shape.
    A file larger than ``max_mb`` (None: ``integrity.DEFAULT_MAX_FILE_MB``) is refused
    before it is read.

    Raises:
        MissingInputError: the file does not exist (a ``FileNotFoundError``).
        TreeFormatError: the first problem found, as ``file:line: ... field 'x': ...``; two
            trees of the same device, model_name, batch_size and seq_len are one (lines
            without a ``device`` block are one device: the file's).
        InputError: a folder, a link loop or a file over the limit; trees that cannot be
            right together (``integrity.IntegrityError``).
    """
    from irene.data import integrity

    path = Path(path)
    integrity.check_input_file(path, "trees file", max_mb)
    trees: list[Tree] = []
    seen_ids: dict[str | None, set[str]] = {}  # node ids, per device
    first_line: dict[tuple, int] = {}
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise TreeFormatError(f"{where}: not UTF-8 text (byte {error.start + 1}); "
                                      "is this a trees jsonl file?") from None
            if not line.strip():
                continue
            try:
                tree = json.loads(line)
            except json.JSONDecodeError as error:
                problem = error.msg.removesuffix(" at")  # "Unterminated string starting at"
                raise TreeFormatError(
                    f"{where}: invalid JSON ({problem} at character {error.pos + 1}); "
                    "is the file truncated?"
                ) from None
            except RecursionError:
                raise TreeFormatError(f"{where}: JSON nested too deeply") from None
            if not validate:
                trees.append(tree)
                continue
            device, key = _line_device(tree), _shape_key(tree)
            if key is not None and (device, *key) in first_line:
                raise TreeFormatError(f"{where}: field 'model_name': a second tree for {key} "
                                      f"{_of_device(device, seen_ids)}(the first is on line "
                                      f"{first_line[(device, *key)]})")
            validate_tree(tree, where, require_energy=require_energy,
                          seen_ids=seen_ids.setdefault(device, set()))
            first_line[device_key(tree)] = line_number
            trees.append(tree)
    if not trees:
        raise TreeFormatError(f"{path}: no trees in file")
    if validate:
        integrity.check_trees(trees, [first_line[device_key(t)] for t in trees], path,
                              structure=require_energy)
    return trees


def _shape_key(tree: Any) -> tuple | None:
    """``(model_name, batch_size, seq_len)`` of a decoded line, if it has them (unvalidated)."""
    if not isinstance(tree, dict):
        return None
    key = (tree.get("model_name"), tree.get("batch_size"), tree.get("seq_len"))
    if not isinstance(key[0], str) or not all(_is_finite_number(v) and int(v) == v for v in key[1:]):
        return None  # not a shape (validation says why), never the shape of another tree
    return key[0], int(key[1]), int(key[2])


def _line_device(tree: Any) -> str | None:
    """The ``device.id`` of a decoded line, None when it has none (unvalidated: a bad block is
    reported by validation)."""
    block = tree.get("device") if isinstance(tree, dict) else None
    device = block.get("id") if isinstance(block, dict) else None
    return device if isinstance(device, str) else None


def _of_device(device: str | None, seen: dict) -> str:
    """``of device device_2 `` in a message about a file of several devices ('' in a file of
    one device so far: the message as it has always been)."""
    return f"of device {device} " if len(seen) > 1 else ""


def dumps_trees(trees: Iterable[Tree]) -> str:
    """Serialise trees to jsonl text (one compact line per tree)."""
    return "".join(json.dumps(tree, separators=(", ", ": ")) + "\n" for tree in trees)


def write_trees(path: str | Path, trees: Iterable[Tree], *, protect: Iterable[str | Path] = ()
                ) -> Path:
    """Write trees atomically; refuse to overwrite any file in ``protect`` (the inputs)."""
    return atomic_write_text(path, dumps_trees(trees), protect=protect)


def tree_key(tree: Tree) -> tuple[str, int, int]:
    """``(model_name, batch_size, seq_len)`` of a tree (one device's trees: its key)."""
    return tree["model_name"], int(tree["batch_size"]), int(tree["seq_len"])


def device_key(tree: Tree) -> tuple[str | None, str, int, int]:
    """``(device id, model_name, batch_size, seq_len)``: the key of a tree in a file that may
    hold several devices' trees (the device None for a line without a ``device`` block)."""
    return (_line_device(tree), *tree_key(tree))
