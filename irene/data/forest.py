"""A batch of trees flattened into arrays: the form every predictor computes on.

Nodes of tree ``t`` occupy rows ``offsets[t]:offsets[t+1]`` in pre-order (a parent before
its children), so a per-tree view is a slice and aggregation runs one depth level at a time.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from irene.data.tree import FEATURE_FIELDS, NODE_TYPES, NodeType, Tree, iter_nodes, iter_nodes_with_parent
from irene.errors import InputError, SettingsError

UNKNOWN_DEVICE = "unknown"  # irene.data.provenance.UNKNOWN: a tree without a device block

NODE_TYPE_CODES = {str(t): code for code, t in enumerate(NODE_TYPES)}  # "model": 0, ...
# Every feature a predictor may use: the tree's shape (input_size, batch_size, seq_len) and
# the node's own fields. "always" features of the paper come first.
ALL_FEATURES = ("num_parameters", "input_size", "batch_size", "seq_len") + tuple(
    f for f in FEATURE_FIELDS if f != "num_parameters"
)
FEATURE_SETS = {
    "model_specs": ("batch_size", "seq_len", "flops", "mem_bytes"),
    "resource_utilization": (
        "cpu", "mem", "gpu", "gpu_mem", "gpu_clk", "gpu_mem_clk", "times_mean", "gpu_energy_mean",
    ),
}
ALWAYS_FEATURES = ("num_parameters", "input_size")
# Every feature set, in the order their features are concatenated (the paper's "both").
ALL_FEATURE_SETS = tuple(FEATURE_SETS)


def feature_list(feature_sets: Sequence[str]) -> list[str]:
    """Expand feature-set names to feature names, the always-on features first.

    >>> feature_list(["model_specs"])
    ['num_parameters', 'input_size', 'batch_size', 'seq_len', 'flops', 'mem_bytes']
    """
    unknown = [name for name in feature_sets if name not in FEATURE_SETS]
    if unknown or not feature_sets:
        raise SettingsError(f"features.sets={list(feature_sets)!r}: unknown feature sets {unknown}; "
                            f"choose a non-empty list from {sorted(FEATURE_SETS)}")
    names = list(ALWAYS_FEATURES)
    for name in ALL_FEATURE_SETS:  # fixed order, whatever was given
        if name in feature_sets:
            names.extend(FEATURE_SETS[name])
    return names


@dataclass
class Forest:
    """Trees as arrays. N nodes, T trees, F = len(ALL_FEATURES).

    Attributes:
        features: N×F raw features (NaN where a node lacks one), columns as ALL_FEATURES.
        gold_j: N measured energies in joules (NaN where not measured).
        parent: N global index of each node's parent (-1 for roots).
        depth: N depth in its tree (root 0).
        node_type: N codes of NODE_TYPE_CODES.
        op_type: N lower-cased instance types ("" for model/module nodes is never used).
        instance_type: N instance types as written in the trees.
        tree_index: N index of the node's tree.
        offsets: T+1 row offsets of each tree.
        ids: N node ids; model_names, batch_sizes, seq_lens: per tree.
        devices: the device id of each tree (its ``device`` block; ``unknown`` without one),
            None where not known (a forest built by hand or cached before devices were kept).
            ``model_names`` stay the models' names on every device: :meth:`fold_names` gives
            the device-qualified names where the forest holds several devices.
    """

    features: np.ndarray
    gold_j: np.ndarray
    parent: np.ndarray
    depth: np.ndarray
    node_type: np.ndarray
    op_type: np.ndarray
    instance_type: np.ndarray
    tree_index: np.ndarray
    offsets: np.ndarray
    ids: list[str]
    model_names: list[str]
    batch_sizes: np.ndarray
    seq_lens: np.ndarray
    devices: list[str] | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.ids)

    @property
    def num_trees(self) -> int:
        return len(self.model_names)

    @property
    def is_leaf(self) -> np.ndarray:
        return self.node_type == NODE_TYPE_CODES[NodeType.ML]

    def node_model_names(self) -> np.ndarray:
        return np.asarray(self.model_names, dtype=object)[self.tree_index]

    def device_names(self) -> list[str]:
        """The distinct devices of the trees, in their order (one ``unknown`` where not known)."""
        return list(dict.fromkeys(self.devices)) if self.devices else [UNKNOWN_DEVICE]

    def fold_names(self) -> list[str]:
        """Per tree, what identifies its model in the data set: the model's name when the
        forest holds one device, ``<device>:<model>`` when it holds several (the same model
        measured on two devices is two models to leave out)."""
        if len(self.device_names()) < 2:
            return list(self.model_names)
        return [f"{d}:{m}" for d, m in zip(self.devices, self.model_names, strict=True)]

    def matrix(self, names: Sequence[str], rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Feature columns ``names`` for ``rows``; a missing value is a clear error."""
        columns = [ALL_FEATURES.index(name) for name in names]
        values = self.features[rows][:, columns]
        if np.isnan(values).any():
            row, col = np.argwhere(np.isnan(values))[0]
            node = np.arange(self.num_nodes)[rows][row]
            raise InputError(f"node {self.ids[node]!r} lacks feature {names[col]!r} (the selected "
                             "feature sets read it; features=model_specs reads only static ones)")
        return values

    def subset(self, tree_mask: np.ndarray) -> Forest:
        """The forest of the trees where ``tree_mask`` is true; it remembers the forest it was
        cut from (:func:`origin`), so work that depends only on the data set is shared by the
        subsets (:func:`shared_cache`)."""
        keep_trees = np.flatnonzero(tree_mask)
        node_mask = np.isin(self.tree_index, keep_trees)
        new_index = np.full(self.num_nodes, -1)
        new_index[node_mask] = np.arange(node_mask.sum())
        parent = self.parent[node_mask]
        parent = np.where(parent >= 0, new_index[np.maximum(parent, 0)], -1)
        tree_remap = np.full(self.num_trees, -1)
        tree_remap[keep_trees] = np.arange(len(keep_trees))
        sizes = np.diff(self.offsets)[keep_trees]
        out = Forest(
            features=self.features[node_mask],
            gold_j=self.gold_j[node_mask],
            parent=parent,
            depth=self.depth[node_mask],
            node_type=self.node_type[node_mask],
            op_type=self.op_type[node_mask],
            instance_type=self.instance_type[node_mask],
            tree_index=tree_remap[self.tree_index[node_mask]],
            offsets=np.concatenate([[0], np.cumsum(sizes)]),
            ids=np.asarray(self.ids, dtype=object)[node_mask].tolist(),
            model_names=[self.model_names[t] for t in keep_trees],
            batch_sizes=self.batch_sizes[keep_trees],
            seq_lens=self.seq_lens[keep_trees],
            devices=None if self.devices is None else [self.devices[t] for t in keep_trees],
        )
        root, root_trees = origin(self)
        out.__dict__["_origin"] = (root, root_trees[keep_trees])
        return out


def origin(forest: Forest) -> tuple[Forest, np.ndarray]:
    """The forest ``forest`` was cut from by :meth:`Forest.subset` (through any number of
    subsets; ``forest`` itself if it was not cut from one) and the index there of each of its
    trees. A tree of a subset has the same nodes, in the same order, as the tree it copies."""
    found = forest.__dict__.get("_origin")
    return found if found is not None else (forest, np.arange(forest.num_trees))


def origin_rows(forest: Forest) -> np.ndarray:
    """The row in ``origin(forest)[0]`` of every node of ``forest``."""
    root, trees = origin(forest)
    if forest is root:
        return np.arange(forest.num_nodes)
    shift = root.offsets[trees] - forest.offsets[:-1]
    return np.repeat(shift, np.diff(forest.offsets)) + np.arange(forest.num_nodes)


def shared_cache(forest: Forest) -> dict:
    """A dict for results that depend only on the data of the forest ``forest`` was cut from
    (:func:`origin`): the subsets of one data set (the folds of a cross-validation, the draws
    of a learning curve) compute such work once. A forest is never changed in place
    (``dataclasses.replace`` makes a new one, with a cache of its own)."""
    root = origin(forest)[0]
    return root.__dict__.setdefault("_shared", {})


def build_forest(trees: Sequence[Tree]) -> Forest:
    """Flatten trees (one pass over the nodes; everything after works on arrays)."""
    rows: list[list[float]] = []
    gold, parent, depth, node_type, instance_type, tree_index, ids = [], [], [], [], [], [], []
    offsets = [0]
    node_fields = ALL_FEATURES[4:]
    for t, tree in enumerate(trees):
        batch_size, seq_len = int(tree["batch_size"]), int(tree["seq_len"])
        shape = [batch_size * seq_len, batch_size, seq_len]
        base = offsets[-1]
        count = 0
        for node, parent_pos, node_depth in iter_nodes_with_parent(tree["frontend_tree"]):
            num_parameters = node.get("num_parameters")
            rows.append([np.nan if num_parameters is None else num_parameters, *shape,
                         *(np.nan if node.get(f) is None else node[f] for f in node_fields)])
            energy = node.get("ground_truth_energy")
            gold.append(np.nan if energy is None else energy)
            parent.append(-1 if parent_pos < 0 else base + parent_pos)
            depth.append(node_depth)
            node_type.append(NODE_TYPE_CODES[node["type"]])
            instance_type.append(node["instance_type"])
            tree_index.append(t)
            ids.append(node["id"])
            count += 1
        offsets.append(base + count)
    instance_type_arr = np.asarray(instance_type, dtype=object)
    return Forest(
        features=np.asarray(rows, dtype=np.float64).reshape(len(ids), len(ALL_FEATURES)),
        gold_j=np.asarray(gold, dtype=np.float64),
        parent=np.asarray(parent, dtype=np.int64),
        depth=np.asarray(depth, dtype=np.int64),
        node_type=np.asarray(node_type, dtype=np.int64),
        op_type=np.char.lower(instance_type_arr.astype(str)).astype(object),
        instance_type=instance_type_arr,
        tree_index=np.asarray(tree_index, dtype=np.int64),
        offsets=np.asarray(offsets, dtype=np.int64),
        ids=ids,
        model_names=[tree["model_name"] for tree in trees],
        batch_sizes=np.asarray([int(tree["batch_size"]) for tree in trees]),
        seq_lens=np.asarray([int(tree["seq_len"]) for tree in trees]),
        devices=[_device_id(tree) for tree in trees],
    )


def _device_id(tree: Tree) -> str:
    block = tree.get("device")
    device = block.get("id") if isinstance(block, dict) else None
    return device if isinstance(device, str) and device else UNKNOWN_DEVICE


_TEXT_ARRAYS = ("op_type", "instance_type")  # object arrays of str
_TEXT_LISTS = ("ids", "model_names", "devices")  # lists of str (devices: or None, not saved)


def save_forest(forest: Forest, path: str | Path) -> Path:
    """Write the forest's arrays to one ``.npz`` file (no pickles), atomically."""
    from irene.data.io import atomic_write_bytes

    arrays = {}
    for name in Forest.__dataclass_fields__:
        value = getattr(forest, name)
        if value is None:  # devices not known: left out, None again when loaded
            continue
        arrays[name] = (np.asarray(value, dtype=str) if name in _TEXT_ARRAYS + _TEXT_LISTS
                        else value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def load_forest(path: str | Path) -> Forest:
    """The forest :func:`save_forest` wrote, equal to the one it was given (types included)."""
    with np.load(path, allow_pickle=False) as data:
        fields = {}
        for name in Forest.__dataclass_fields__:
            if name not in data.files and name == "devices":  # not known (or an older file)
                continue
            value = data[name]
            if name in _TEXT_ARRAYS:
                value = value.astype(object)
            elif name in _TEXT_LISTS:
                value = value.tolist()
            fields[name] = value
    return Forest(**fields)


def children_sum(forest: Forest, values: np.ndarray) -> np.ndarray:
    """Σ over each node's direct children of ``values`` (0 for leaves), one ``bincount``."""
    nonroot = forest.parent >= 0
    return np.bincount(forest.parent[nonroot], weights=values[nonroot], minlength=forest.num_nodes)



def num_children(forest: Forest) -> np.ndarray:
    """Number of direct children of every node."""
    return np.bincount(forest.parent[forest.parent >= 0], minlength=forest.num_nodes)



def compose(forest: Forest, own_j: np.ndarray, child_weight: np.ndarray | None = None) -> np.ndarray:
    """Bottom-up tree sums: ``value = own + Σ_children weight·value``, one level at a time.

    Args:
        forest: the trees.
        own_j: each node's own term in joules: the leaf prediction on leaves, the
            unattributed (residual) term on inner nodes (0 for a plain sum).
        child_weight: the weight of each node in its parent's sum (default 1).

    Returns:
        The energy of every node in joules.
    """
    values = np.array(own_j, dtype=np.float64)
    weight = np.ones(forest.num_nodes) if child_weight is None else child_weight
    for d in range(int(forest.depth.max()), 0, -1):
        children = np.flatnonzero(forest.depth == d)
        values += np.bincount(forest.parent[children], weights=weight[children] * values[children],
                              minlength=forest.num_nodes)
    return values


def subtree_leaf_sum(forest: Forest, leaf_values: np.ndarray) -> np.ndarray:
    """Σ of ``leaf_values`` over every node's leaf descendants (a leaf: its own value)."""
    return compose(forest, np.where(forest.is_leaf, leaf_values, 0.0))


def fill_predictions(trees: Sequence[Tree], forest: Forest, predicted_j: np.ndarray) -> list[Tree]:
    """Copies of ``trees`` with ``predicted_energy`` set on every node (same pre-order)."""
    import copy

    if len(predicted_j) != forest.num_nodes:
        raise ValueError("one prediction per node is needed")
    out = copy.deepcopy(list(trees))
    position = 0
    for tree in out:
        for node in iter_nodes(tree["frontend_tree"]):
            node["predicted_energy"] = float(predicted_j[position])
            position += 1
    return out
