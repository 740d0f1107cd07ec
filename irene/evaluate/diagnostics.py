"""Diagnostics of the tree assumption and of where a predictor's error comes from.

Two questions, answered per node type and module class (``instance_type``):

1. **How far is a measured parent from the sum of its measured children?**
   :func:`child_ratio_table` gives ``parent ÷ Σ children`` (measured), and the share of
   parents that IrEne's weights ``1 ± 1/τ`` could not reach even if every child had the
   extreme weight (ratio outside ``[1 − 1/τ, 1 + 1/τ]``).
2. **Is a predictor's error inherited from the leaves or made while aggregating?**
   For a node ``p``, with leaf descendants ``L(p)``, the signed error splits exactly into

   ``pred_p − gold_p = Σ_{l∈L(p)} (pred_l − gold_l)  +  [(pred_p − gold_p) − Σ_{l∈L(p)} (pred_l − gold_l)]``

   the **leaf part** (what the leaf regressors got wrong, passed up unchanged by plain sums)
   and the **aggregation part** (what the weights, the unattributed term or the missing
   unattributed work added). :func:`error_sources` reports both in % of the measured energy.
   A plain sum of perfect leaves has a leaf part of 0 and an aggregation part of minus the
   unattributed work.

Everything is arrays over a :class:`~irene.data.forest.Forest`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from irene.data.forest import Forest, children_sum, num_children, subtree_leaf_sum
from irene.data.tree import NODE_TYPES
from irene.tables import Table, to_markdown

GROUP_COLUMNS = ["node_type", "instance_type"]


def _node_frame(forest: Forest) -> pd.DataFrame:
    return pd.DataFrame({
        "node_type": np.asarray([str(t) for t in NODE_TYPES], dtype=object)[forest.node_type],
        "instance_type": forest.instance_type,
    })


def child_ratios(forest: Forest) -> np.ndarray:
    """Measured parent ÷ Σ measured children of every inner node (NaN for leaves, and for
    parents with an unmeasured child or no measurement)."""
    gold = forest.gold_j
    unmeasured_child = children_sum(forest, np.isnan(gold).astype(float)) > 0
    total = children_sum(forest, np.nan_to_num(gold))
    ok = ~forest.is_leaf & ~np.isnan(gold) & ~unmeasured_child & (total > 0)
    return np.where(ok, gold / np.where(ok, total, 1.0), np.nan)


def child_ratio_table(forest: Forest, tanh_scalar: float) -> pd.DataFrame:
    """Per (node type, module class): how the measured parent compares with its children.

    Args:
        forest: measured trees.
        tanh_scalar: τ of IrEne's ``close_to_one`` weights ``1 + tanh(·)/τ``.

    Returns:
        Columns ``nodes``, ``children`` (mean number), ``ratio_mean``, ``ratio_median``,
        ``ratio_min``, ``ratio_max`` (measured parent ÷ Σ measured children),
        ``unattributed_pct`` (mean share of the parent no child accounts for, 100·(1 − 1/ratio)),
        ``outside_tau_pct`` (% of parents whose ratio lies outside ``1 ± 1/τ``: out of reach of
        IrEne's weights). One row per group, sorted by node type then class, and a last row
        ``all`` over every inner node.
    """
    ratio = child_ratios(forest)
    frame = _node_frame(forest)
    frame["ratio"] = ratio
    frame["children"] = num_children(forest)
    frame["unattributed_pct"] = 100.0 * (1.0 - 1.0 / ratio)
    bound = 1.0 / tanh_scalar
    frame["outside_tau_pct"] = 100.0 * (np.abs(ratio - 1.0) > bound)
    frame = frame[~np.isnan(ratio)]

    def summarise(group: pd.DataFrame) -> pd.Series:
        return pd.Series({
            "nodes": float(len(group)), "children": group["children"].mean(),
            "ratio_mean": group["ratio"].mean(), "ratio_median": group["ratio"].median(),
            "ratio_min": group["ratio"].min(), "ratio_max": group["ratio"].max(),
            "unattributed_pct": group["unattributed_pct"].mean(),
            "outside_tau_pct": group["outside_tau_pct"].mean(),
        })

    rows = {key: summarise(group) for key, group in frame.groupby(GROUP_COLUMNS, sort=True)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.Index([f"{t}:{c}" for t, c in table.index], name="group")
    order = {str(name): i for i, name in enumerate(NODE_TYPES)}
    table = table.iloc[sorted(range(len(table)),
                              key=lambda i: (order[table.index[i].split(":")[0]], table.index[i]))]
    if len(frame):
        table.loc["all"] = summarise(frame)
    return table


def error_parts(forest: Forest, predicted_j: np.ndarray) -> pd.DataFrame:
    """Per node: signed % error and its leaf and aggregation parts (see the module doc).

    Returns:
        One row per measured node, in forest order: ``model_name``, ``node_type``,
        ``instance_type``, ``error_pct`` (signed, 100·(pred − gold)/gold), ``leaf_part_pct``,
        ``aggregation_part_pct`` (they add up to ``error_pct``; a leaf is all leaf part).
        Leaf parts need every leaf below the node measured; otherwise they are NaN.
    """
    gold = forest.gold_j
    leaf_error = np.where(forest.is_leaf, predicted_j - gold, 0.0)
    leaf_part = subtree_leaf_sum(forest, leaf_error)  # NaN propagates from an unmeasured leaf
    error = predicted_j - gold
    keep = ~np.isnan(gold) & (np.nan_to_num(gold) > 0)
    frame = _node_frame(forest)
    frame.insert(0, "model_name", forest.node_model_names())
    frame["error_pct"] = 100.0 * error / gold
    frame["leaf_part_pct"] = 100.0 * leaf_part / gold
    frame["aggregation_part_pct"] = 100.0 * (error - leaf_part) / gold
    return frame[keep].reset_index(drop=True)


def error_sources(forest: Forest, predicted_j: np.ndarray) -> pd.DataFrame:
    """Per (node type, module class): mean |error| and where it comes from.

    Returns:
        Columns ``nodes``, ``abs_error_pct`` (mean |pred − gold|/gold, the evaluator's
        number), ``error_pct`` (mean signed), ``leaf_part_pct`` and ``aggregation_part_pct``
        (mean signed parts, adding up to ``error_pct``), ``abs_leaf_part_pct`` and
        ``abs_aggregation_part_pct`` (mean sizes of the parts). Rows as
        :func:`child_ratio_table`, plus one row per node type (``<type>:all``).
    """
    parts = error_parts(forest, predicted_j)

    def summarise(group: pd.DataFrame) -> pd.Series:
        return pd.Series({
            "nodes": float(len(group)),
            "abs_error_pct": group["error_pct"].abs().mean(),
            "error_pct": group["error_pct"].mean(),
            "leaf_part_pct": group["leaf_part_pct"].mean(),
            "aggregation_part_pct": group["aggregation_part_pct"].mean(),
            "abs_leaf_part_pct": group["leaf_part_pct"].abs().mean(),
            "abs_aggregation_part_pct": group["aggregation_part_pct"].abs().mean(),
        })

    rows = {}
    for node_type in map(str, NODE_TYPES):
        of_type = parts[parts["node_type"] == node_type]
        if not len(of_type):
            continue
        rows[f"{node_type}:all"] = summarise(of_type)
        for cls, group in of_type.groupby("instance_type", sort=True):
            rows[f"{node_type}:{cls}"] = summarise(group)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "group"
    return table


def report_markdown(ratio_table: pd.DataFrame, sources: dict[str, pd.DataFrame],
                    tanh_scalar: float) -> str:
    """The diagnostics as one markdown document.

    Args:
        ratio_table: :func:`child_ratio_table`'s output.
        sources: predictor label -> :func:`error_sources`'s output.
        tanh_scalar: τ used for ``outside_tau_pct``.
    """
    def table_md(frame: pd.DataFrame) -> str:
        formats = {str(c): ".0f" if c == "nodes" else ".3f" if str(c).startswith("ratio")
                   or c == "children" else ".2f" for c in frame.columns}
        return to_markdown(Table.from_frame(frame), formats)

    out = ["# Diagnostics", "",
           "## Measured parent ÷ sum of measured children", "",
           f"IrEne's `close_to_one` weights lie in 1 ± 1/τ = [{1 - 1 / tanh_scalar:.2f}, "
           f"{1 + 1 / tanh_scalar:.2f}]; `outside_tau_pct` is the share of parents whose "
           "measured ratio they cannot reach. `unattributed_pct`: share of the parent's "
           "energy that no child accounts for.", "", table_md(ratio_table), ""]
    for label, frame in sources.items():
        out += [f"## Where the error of `{label}` comes from", "",
                "Signed error = leaf part (errors of the leaves below, passed up) + aggregation "
                "part (added by the weights / unattributed term). % of the measured energy.", "",
                table_md(frame), ""]
    return "\n".join(out)
