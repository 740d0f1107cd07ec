"""Mean absolute percentage error of predicted energies, per node type and finer groups."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from irene.data.forest import Forest, build_forest
from irene.data.tree import ERROR_COLUMNS, NODE_TYPES, iter_nodes
from irene.errors import InputError, NonFiniteResultError

if TYPE_CHECKING:
    import pandas as pd


def percentage_errors(gold_j: np.ndarray, predicted_j: np.ndarray) -> np.ndarray:
    """100·|gold − predicted| / gold per node (gold must be positive)."""
    return 100.0 * np.abs(gold_j - predicted_j) / gold_j


def check_finite(forest: Forest, predicted_j: np.ndarray) -> None:
    """Raise :class:`~irene.errors.NonFiniteResultError` if a prediction is NaN or infinite,
    naming how many and the first node."""
    bad = ~np.isfinite(np.asarray(predicted_j, dtype=np.float64))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise NonFiniteResultError(
            f"{int(bad.sum())} of {forest.num_nodes} predicted energies are not finite, e.g. "
            f"node {forest.ids[first]!r}: {float(predicted_j[first])!r} (training diverged or "
            "the input is far outside the training data; a smaller predictor.lr may help)")


def node_errors(forest: Forest, predicted_j: np.ndarray) -> pd.DataFrame:
    """One row per measured node: model, node type, primitive type, % error.

    Raises:
        NonFiniteResultError: a prediction is NaN or infinite (never averaged away).
    """
    import pandas as pd

    check_finite(forest, predicted_j)
    measured = ~np.isnan(forest.gold_j)
    return pd.DataFrame({
        "model_name": forest.node_model_names()[measured],
        "node_type": np.asarray([str(t) for t in NODE_TYPES], dtype=object)[forest.node_type[measured]],
        "instance_type": forest.instance_type[measured],
        "error_pct": percentage_errors(forest.gold_j[measured], predicted_j[measured]),
    })


def errors_by_node_type(forest: Forest, predicted_j: np.ndarray) -> dict[str, float]:
    """Mean % error of ml, module and model nodes (the reference evaluator's numbers).

    Raises:
        NonFiniteResultError: a prediction or a mean is NaN or infinite.
    """
    check_finite(forest, predicted_j)
    measured = ~np.isnan(forest.gold_j)
    error_pct = percentage_errors(forest.gold_j[measured], predicted_j[measured])
    types = forest.node_type[measured]
    names = [str(t) for t in NODE_TYPES]
    errors = {}
    for node_type in ERROR_COLUMNS:
        values = error_pct[types == names.index(node_type)]
        if len(values):  # an exactly rounded sum: the same whatever the order of the nodes
            try:
                errors[node_type] = math.fsum(values.tolist()) / len(values)
            except OverflowError:  # finite errors whose sum is not
                errors[node_type] = math.inf
    for node_type, value in errors.items():
        if not np.isfinite(value):
            raise NonFiniteResultError(f"the mean % error of {node_type} nodes is {value!r}: "
                                       "predictions too large to compare")
    return errors


def error_tables(forest: Forest, predicted_j: np.ndarray) -> dict[str, pd.DataFrame]:
    """Tables of mean % error: by node type, by model × node type, by primitive type."""
    frame = node_errors(forest, predicted_j)
    by_type = frame.groupby("node_type")["error_pct"].agg(["mean", "count"]).reindex(
        [t for t in ERROR_COLUMNS if t in set(frame["node_type"])])
    by_model = frame.pivot_table(index="model_name", columns="node_type", values="error_pct",
                                 aggfunc="mean", sort=False)
    by_model = by_model[[t for t in ERROR_COLUMNS if t in by_model.columns]]
    leaves = frame[frame["node_type"] == ERROR_COLUMNS[0]]
    by_op = leaves.groupby("instance_type")["error_pct"].agg(["mean", "count"])
    return {"by_node_type": by_type, "by_model": by_model, "by_primitive": by_op}


def align_predictions(gold_trees: list, predicted_trees: list, where: str) -> tuple[Forest, np.ndarray]:
    """Align predictions to gold by node id (as the public evaluator does); where the gold
    trees are of several devices (node ids repeat across devices), by device and node id."""
    forest = build_forest(gold_trees)
    several = len(forest.device_names()) > 1

    def key(device, node_id):
        return (device, node_id) if several else node_id

    predicted = {key(_device(t), n["id"]): n.get("predicted_energy") for t in predicted_trees
                 for n in iter_nodes(t["frontend_tree"])}
    keys = ([key(d, i) for d, i in zip(np.asarray(forest.devices, dtype=object)[forest.tree_index],
                                       forest.ids, strict=True)] if several else forest.ids)
    missing = [k for k in keys if predicted.get(k) is None]
    if missing:
        raise InputError(f"{where}: field 'predicted_energy': missing for {len(missing)} nodes, "
                         f"e.g. id {missing[0]!r}")
    return forest, np.asarray([predicted[k] for k in keys], dtype=float)


def _device(tree: dict) -> str:
    block = tree.get("device")
    return (block.get("id") or "unknown") if isinstance(block, dict) else "unknown"
