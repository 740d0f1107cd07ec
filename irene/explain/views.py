"""Explanation views of one tree's energy: where does it go?

For any tree with predicted and/or measured energy:

* :func:`tree_text`: the whole tree with identical siblings grouped, shares of the total, drawn as
  a tree (for the terminal);
* :func:`icicle_figure` / :func:`write_html`: an interactive icicle chart (plotly), saved as
  one self-contained HTML file with plotly's JavaScript embedded, so it opens offline;
* :func:`write_png`: the same icicle drawn with matplotlib, for READMEs and reports.

Every inner node shows its children and an explicit **unattributed** remainder
``parent − Σ children``. For predictions that remainder can be negative (a predicted parent
below its children's sum). A chart cannot draw a negative area, so the drawn sizes are
``max(energy, Σ drawn children)``; the true energy and the signed remainder are in every
label and hover text, and :func:`node_frame` keeps the exact numbers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from irene.data.tree import NodeType, Tree, iter_nodes, iter_nodes_with_parent

SOURCES = ("auto", "predicted", "measured")
ENERGY_FIELDS = {"predicted": "predicted_energy", "measured": "ground_truth_energy"}
UNATTRIBUTED = "unattributed"
UNATTRIBUTED_COLOR = "#d9d9d9"
FALLBACK_COLOR = "#d62728"
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#86bcb6", "#8cd17d", "#f1ce63", "#a0cbe8", "#ffbe7d")
_GROW = 1.0 + 1e-9  # drawn parents a hair larger than their children: no rounding overflow


# ------------------------------------------------------------------------------ the numbers
def energy_source(tree: Tree, source: str = "auto") -> str:
    """``predicted`` or ``measured``: which energy to explain (``auto``: predicted if the
    root has a prediction, else measured).

    Raises:
        ValueError: the tree lacks the asked energy on its root.
    """
    if source not in SOURCES:
        raise ValueError(f"source {source!r}: choose from {list(SOURCES)}")
    root = tree["frontend_tree"]
    if source == "auto":
        source = "predicted" if root.get("predicted_energy") is not None else "measured"
    if root.get(ENERGY_FIELDS[source]) is None:
        raise ValueError(f"tree {tree_label(tree)!r} has no {ENERGY_FIELDS[source]} to explain")
    return source


def tree_label(tree: Tree) -> str:
    return f"{tree['model_name']} {tree['batch_size']}x{tree['seq_len']}"


def node_frame(tree: Tree, source: str = "auto") -> pd.DataFrame:
    """One row per node, in pre-order, with the energy to explain and where it goes.

    Columns: ``scope``, ``parent`` (row index, -1 for the root), ``depth``, ``node_type``,
    ``instance_type``, ``energy_j`` (the explained energy; NaN where a node lacks it),
    ``predicted_j``, ``measured_j``, ``children_j`` (Σ children's energy, 0 on leaves),
    ``unattributed_j`` (energy − Σ children on inner nodes, may be negative), ``share``
    (of the root's energy), ``fallback`` (predicted by a fallback regressor) and
    ``fallback_leaves`` (fallback leaves in the node's subtree).
    """
    source = energy_source(tree, source)
    rows, parents = [], []
    for node, parent, depth in iter_nodes_with_parent(tree["frontend_tree"]):
        rows.append({
            "scope": node["scope"], "depth": depth, "node_type": node["type"],
            "instance_type": node["instance_type"],
            "predicted_j": _number(node.get("predicted_energy")),
            "measured_j": _number(node.get("ground_truth_energy")),
            "fallback": bool(node.get("prediction_fallback", False)),
        })
        parents.append(parent)
    frame = pd.DataFrame(rows)
    frame.insert(1, "parent", np.asarray(parents, dtype=np.int64))
    frame.insert(5, "energy_j", frame[f"{source}_j"])
    parent = frame["parent"].to_numpy()
    energy = frame["energy_j"].to_numpy()
    children = np.zeros(len(frame))
    has_parent = parent >= 0
    np.add.at(children, parent[has_parent], np.nan_to_num(energy[has_parent]))
    is_inner = frame["node_type"].to_numpy() != NodeType.ML
    frame["children_j"] = np.where(is_inner, children, 0.0)
    frame["unattributed_j"] = np.where(is_inner, energy - children, 0.0)
    frame["share"] = energy / energy[0]
    frame["fallback_leaves"] = _subtree_sum(parent, frame["fallback"].to_numpy(dtype=np.int64))
    frame.attrs.update(source=source, label=tree_label(tree))
    return frame


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _subtree_sum(parent: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Σ of ``values`` over each node's subtree (rows in pre-order: children after parents)."""
    total = np.asarray(values, dtype=np.float64).copy()
    for row in range(len(parent) - 1, 0, -1):
        total[parent[row]] += total[row]
    return total.astype(np.int64) if np.issubdtype(values.dtype, np.integer) else total


# ---------------------------------------------------------------------------- terminal view
_NUMBERED = re.compile(r"^(.*?)([._])(\d+)$")


def _group_key(frame: pd.DataFrame, row: int) -> tuple[str, str]:
    """Siblings that differ only by a trailing index (``layer.0``, ``layer.1``) and have the
    same class form one group."""
    name = frame.at[row, "scope"].rsplit(".", 1)[-1] if frame.at[row, "depth"] else "root"
    match = _NUMBERED.match(str(frame.at[row, "scope"]))
    stem = match.group(1) + match.group(2) + "#" if match else name
    return stem.rsplit(".", 1)[-1], str(frame.at[row, "instance_type"])


def tree_text(tree: Tree, max_depth: int = 6, source: str = "auto") -> str:
    """The whole tree as indented text, identical siblings grouped so that it fits a screen.

    Siblings of one class whose names differ only by a trailing index form one line
    (``layer.0-11 ×12 (BertLayer)  13.1 J  92.0%  1.09 J each``) and the group's first member
    stands for all of them below it; nothing is dropped: every node is in a line or in a
    group. Lines deeper than ``max_depth`` levels are summarised by a count. A subtree with
    fallback predictions says how many.
    """
    frame = node_frame(tree, source)
    children: dict[int, list[int]] = {}
    for row in range(1, len(frame)):
        children.setdefault(int(frame.at[row, "parent"]), []).append(row)
    root = frame.iloc[0]
    head = f"{frame.attrs['label']}: {frame.attrs['source']} {root['energy_j']:.4g} J"
    if frame.attrs["source"] == "predicted" and not np.isnan(root["measured_j"]):
        head += f" (measured {root['measured_j']:.4g} J)"
    lines = [head + f"; {len(frame)} nodes, identical siblings grouped"]
    lines.extend(_text_lines(frame, [0], children, "", True, 0, max_depth))
    return "\n".join(lines)


def _text_lines(frame: pd.DataFrame, rows: list[int], children: dict[int, list[int]],
                prefix: str, last: bool, depth: int, max_depth: int) -> list[str]:
    """Lines of one node, or of a group of identical siblings ``rows``, and below it."""
    first = frame.iloc[rows[0]]
    energy = frame["energy_j"].to_numpy()[rows]
    scope = str(first["scope"])
    if depth > 1:  # the name below its parent (the parent's line is right above)
        parent_scope = str(frame.at[int(first["parent"]), "scope"])
        scope = scope.removeprefix(parent_scope + ".")
    scope = scope.removeprefix("root.")
    if len(rows) > 1:
        tail = _NUMBERED.match(str(frame.at[rows[-1], "scope"]))
        scope = f"{scope}-{tail.group(3) if tail else len(rows) - 1} ×{len(rows)}"
    connector = "" if depth == 0 else ("└─ " if last else "├─ ")
    total = float(np.nansum(energy))
    text = (f"{prefix}{connector}{scope} ({first['instance_type']})  {total:.4g} J  "
            f"{100 * total / frame['energy_j'].iat[0]:.1f}%")
    if len(rows) > 1:
        low, high = np.nanmin(energy), np.nanmax(energy)
        text += (f"  {low:.3g} J each" if np.isclose(low, high, rtol=5e-3)
                 else f"  {low:.3g}–{high:.3g} J each")
    if first["node_type"] != NodeType.ML and len(rows) == 1:
        text += f"  unattributed {first['unattributed_j']:+.3g} J"
    fallback = int(frame["fallback_leaves"].to_numpy()[rows].sum())
    if fallback:
        text += f"  [{fallback} fallback leaves]"
    lines = [text]
    kids = children.get(rows[0], [])
    if not kids:
        return lines
    child_prefix = "" if depth == 0 else prefix + ("   " if last else "│  ")
    if depth + 1 > max_depth:
        below = sum(len(children.get(r, [])) for r in rows)
        return lines + [f"{child_prefix}└─ … {below} nodes below (explain.max_depth={depth + 1} shows them)"]
    groups: dict[tuple[str, str], list[int]] = {}
    for kid in kids:
        groups.setdefault(_group_key(frame, kid), []).append(kid)
    ordered = sorted(groups.values(), key=lambda g: -float(np.nansum(frame["energy_j"].to_numpy()[g])))
    if len(rows) > 1:
        lines[-1] += f"; below: the first of the {len(rows)}"
    for i, group in enumerate(ordered):
        lines.extend(_text_lines(frame, group, children, child_prefix, i == len(ordered) - 1,
                                 depth + 1, max_depth))
    return lines


# ------------------------------------------------------------------------- icicle layout
def icicle_rows(tree: Tree, source: str = "auto") -> pd.DataFrame:
    """The icicle's boxes: every node plus one ``unattributed`` box per inner node with a
    positive drawn remainder.

    Columns: ``id``, ``parent_id`` ("" for the root), ``label``, ``value`` (drawn size in J,
    ≥ 0, ≥ Σ drawn children), ``energy_j`` (true energy; the signed remainder for
    unattributed boxes), ``depth``, ``color``, ``hover``.
    """
    frame = node_frame(tree, source)
    parent = frame["parent"].to_numpy()
    energy = np.nan_to_num(frame["energy_j"].to_numpy())
    inner = frame["node_type"].to_numpy() != NodeType.ML
    drawn = np.where(inner, 0.0, np.maximum(energy, 0.0))
    drawn_children = np.zeros(len(frame))
    for row in range(len(frame) - 1, -1, -1):  # children before parents
        if inner[row]:
            drawn[row] = max(energy[row], drawn_children[row]) * _GROW
        if parent[row] >= 0:
            drawn_children[parent[row]] += drawn[row]
    total = energy[0] if energy[0] > 0 else max(drawn[0], 1e-30)
    palette = _palette(frame["instance_type"])
    boxes = []
    for row in range(len(frame)):
        node = frame.iloc[row]
        boxes.append({
            "id": node["scope"], "parent_id": "" if parent[row] < 0 else frame.at[parent[row], "scope"],
            "label": f"{node['scope'].rsplit('.', 1)[-1]} ({node['instance_type']})",
            "value": drawn[row], "energy_j": energy[row], "depth": int(node["depth"]),
            "color": FALLBACK_COLOR if node["fallback"] else palette[node["instance_type"]],
            "hover": _hover(node, total),
        })
        remainder = drawn[row] / _GROW - drawn_children[row] if inner[row] else 0.0
        if inner[row] and remainder > 1e-9 * drawn[row]:
            boxes.append({
                "id": f"{node['scope']}/{UNATTRIBUTED}", "parent_id": node["scope"],
                "label": UNATTRIBUTED, "value": remainder, "energy_j": node["unattributed_j"],
                "depth": int(node["depth"]) + 1, "color": UNATTRIBUTED_COLOR,
                "hover": (f"{node['scope']}: unattributed (parent − Σ children)<br>"
                          f"{node['unattributed_j']:+.4g} J, "
                          f"{100 * node['unattributed_j'] / total:+.1f}% of total"),
            })
    rows = pd.DataFrame(boxes)
    rows.attrs.update(frame.attrs, total_j=float(energy[0]))
    return rows


def _palette(instance_types: pd.Series) -> dict[str, str]:
    """One color per instance type, in order of first appearance (pre-order)."""
    return {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(dict.fromkeys(instance_types))}


def _hover(node: pd.Series, total_j: float) -> str:
    text = (f"{node['scope']} ({node['instance_type']}, {node['node_type']})<br>"
            f"energy {node['energy_j']:.4g} J, {100 * node['energy_j'] / total_j:.1f}% of total")
    if not np.isnan(node["predicted_j"]) and not np.isnan(node["measured_j"]):
        text += f"<br>predicted {node['predicted_j']:.4g} J, measured {node['measured_j']:.4g} J"
    if node["node_type"] != NodeType.ML:
        text += (f"<br>Σ children {node['children_j']:.4g} J, "
                 f"unattributed {node['unattributed_j']:+.4g} J")
        if node["unattributed_j"] < 0:
            text += " (children exceed the parent: drawn at Σ children)"
    if node["fallback"]:
        text += "<br><b>fallback prediction</b> (primitive type unseen in training)"
    elif node["fallback_leaves"]:
        text += f"<br>{int(node['fallback_leaves'])} fallback leaves inside"
    return text


def chart_title(rows: pd.DataFrame) -> str:
    return (f"{rows.attrs['label']}: {rows.attrs['source']} energy "
            f"{rows.attrs['total_j']:.4g} J (grey: unattributed = parent − Σ children; "
            f"red: fallback prediction)")


# ---------------------------------------------------------------------------- HTML (plotly)
def icicle_figure(tree: Tree, source: str = "auto", max_depth: int | None = None):
    """An interactive plotly icicle of ``tree`` (click a box to zoom into it)."""
    import plotly.graph_objects as go

    rows = icicle_rows(tree, source)
    figure = go.Figure(go.Icicle(
        ids=rows["id"], parents=rows["parent_id"], labels=rows["label"],
        values=rows["value"], branchvalues="total", marker={"colors": rows["color"]},
        customdata=rows["hover"], hovertemplate="%{customdata}<extra></extra>",
        texttemplate="%{label}<br>%{percentRoot:.1%}", maxdepth=max_depth or -1,
        root={"color": "white"}, tiling={"orientation": "v"},
    ))
    figure.update_layout(title={"text": chart_title(rows), "font": {"size": 14}},
                         margin={"t": 50, "l": 10, "r": 10, "b": 10}, width=None, height=800)
    return figure


def write_html(tree: Tree, path: str | Path, source: str = "auto",
               max_depth: int | None = 6) -> Path:
    """The icicle as one self-contained HTML file (plotly's JavaScript embedded: offline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    icicle_figure(tree, source, max_depth).write_html(path, include_plotlyjs=True, full_html=True)
    return path


# ---------------------------------------------------------------------- PNG (matplotlib)
def write_png(tree: Tree, path: str | Path, source: str = "auto", max_depth: int = 6,
              dpi: int = 120) -> Path:
    """The icicle drawn with matplotlib (rows = depth, widths = energy) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = icicle_rows(tree, source)
    max_depth = min(int(max_depth), int(rows["depth"].max()))
    x0 = _box_offsets(rows)
    total = float(rows["value"].iloc[0]) or 1.0
    fig, ax = plt.subplots(figsize=(14, 1.0 + 0.9 * (max_depth + 1)))
    for i, row in rows.iterrows():
        if row["depth"] > max_depth or row["value"] <= 0:
            continue
        left, width = x0[i] / total, row["value"] / total
        ax.add_patch(Rectangle((left, row["depth"]), width, 0.95, facecolor=row["color"],
                               edgecolor="white", linewidth=0.4,
                               hatch="//" if row["label"] == UNATTRIBUTED else None))
        if width > 0.04:
            share = 100 * row["energy_j"] / rows.attrs["total_j"]
            ax.text(left + width / 2, row["depth"] + 0.47,
                    f"{_shorten(row['label'], int(width * 140))}\n{share:.1f}%",
                    ha="center", va="center", fontsize=7, clip_on=True)
    ax.set_xlim(0, 1)
    ax.set_ylim(max_depth + 1, 0)
    ax.set_yticks(np.arange(max_depth + 1) + 0.47, [f"depth {d}" for d in range(max_depth + 1)])
    ax.set_xlabel("share of the drawn total energy")
    ax.set_title(chart_title(rows), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _box_offsets(rows: pd.DataFrame) -> np.ndarray:
    """Left edge of every box: children side by side from their parent's left edge."""
    position = {box_id: i for i, box_id in enumerate(rows["id"])}
    x0 = np.zeros(len(rows))
    cursor = np.zeros(len(rows))
    for i, parent_id in enumerate(rows["parent_id"]):
        if parent_id:
            p = position[parent_id]
            x0[i] = x0[p] + cursor[p]
            cursor[p] += rows["value"].iat[i]
    return x0


def _shorten(text: str, width: int) -> str:
    width = max(width, 4)
    return text if len(text) <= width else text[: width - 1] + "…"


# -------------------------------------------------------------------------------- all views
def write_views(tree: Tree, directory: str | Path, stem: str, *, source: str = "auto",
                max_depth: int = 6) -> dict[str, Path]:
    """Write ``<stem>.txt`` (grouped tree text), ``<stem>.html`` and ``<stem>.png`` into
    ``directory``; returns the paths by kind (``text``, ``html``, ``png``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text_path = directory / f"{stem}.txt"
    text_path.write_text(tree_text(tree, max_depth, source) + "\n")
    return {"text": text_path,
            "html": write_html(tree, directory / f"{stem}.html", source, max_depth),
            "png": write_png(tree, directory / f"{stem}.png", source, max_depth)}


def view_stem(tree: Tree) -> str:
    """A file-name-safe stem for a tree's views: ``<model>_<bs>x<seq>``."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(tree["model_name"]))
    return f"{name}_{tree['batch_size']}x{tree['seq_len']}"


__all__: Sequence[str] = ("icicle_figure", "icicle_rows", "node_frame", "tree_text",
                          "view_stem", "write_html", "write_png", "write_views")


# ------------------------------------------------------------------------- tables
def totals_table(trees: list[Tree]) -> pd.DataFrame:
    """Total predicted (and measured, if any) energy per tree, with the counts of fallback
    nodes and of nodes with features outside the predictor's training range."""
    rows = []
    for tree in trees:
        root = tree["frontend_tree"]
        frame = node_frame(tree, "predicted")
        rows.append({"model": tree["model_name"], "batch_size": int(tree["batch_size"]),
                     "seq_len": int(tree["seq_len"]),
                     "predicted_energy_j": float(root["predicted_energy"]),
                     "measured_energy_j": root.get("ground_truth_energy"),
                     "nodes": len(frame), "fallback_nodes": int(frame["fallback"].sum()),
                     "out_of_range_nodes": sum(1 for node in iter_nodes(root)
                                               if node.get("prediction_out_of_range"))})
    table = pd.DataFrame(rows)
    if table["measured_energy_j"].isna().all():
        table = table.drop(columns="measured_energy_j")
    else:
        table["error_pct"] = 100 * (table["predicted_energy_j"] / table["measured_energy_j"] - 1)
    return table.set_index("model")


def fallback_table(trees: list[Tree]) -> pd.DataFrame:
    """Every node predicted by a fallback: tree, node id and type."""
    rows = []
    for tree in trees:
        frame = node_frame(tree, "predicted")
        for _, node in frame[frame["fallback"]].iterrows():
            rows.append({"model": tree["model_name"], "batch_size": int(tree["batch_size"]),
                         "seq_len": int(tree["seq_len"]), "scope": node["scope"],
                         "instance_type": node["instance_type"],
                         "predicted_energy_j": node["predicted_j"]})
    return pd.DataFrame(rows, columns=["model", "batch_size", "seq_len", "scope",
                                       "instance_type", "predicted_energy_j"])
