"""The one-line summary of a measured configuration (printed and logged by ``stage=measure``)."""

from __future__ import annotations

import statistics
from typing import Any

from irene.data.tree import Tree, iter_nodes


def children_over_parent(tree: Tree) -> list[float]:
    """Σ children's energy / parent's energy for every inner node whose children are all measured."""
    ratios = []
    for node in iter_nodes(tree["frontend_tree"]):
        children = node.get("child_nodes_obj") or []
        parent = node.get("ground_truth_energy")
        if not children or not parent or any(c.get("ground_truth_energy") is None for c in children):
            continue
        ratios.append(sum(c["ground_truth_energy"] for c in children) / parent)
    return ratios


def window_spreads(tree: Tree) -> list[float]:
    """``energy_std_j / ground_truth_energy`` of every node measured (not reused)."""
    return [n["energy_std_j"] / n["ground_truth_energy"] for n in iter_nodes(tree["frontend_tree"])
            if "measurement_reused_from" not in n and n.get("energy_std_j") is not None
            and n.get("ground_truth_energy")]


def summarize(tree: Tree) -> dict[str, Any]:
    """Nodes, root energy and time, Σ children / parent, window spread, drift, time spent.

    Works on any trees line (a measurement block, when present, adds drift, tick and time).

    Returns:
        ``model``, ``batch_size``, ``seq_len`` and metrics; a metric that cannot be computed
        (e.g. energies on a machine without a meter) is ``None``.
    """
    nodes = list(iter_nodes(tree["frontend_tree"]))
    root = tree["frontend_tree"]
    ratios = children_over_parent(tree)
    spreads = window_spreads(tree)
    block = tree.get("measurement") or {}
    return {
        "model": tree["model_name"],
        "batch_size": int(tree["batch_size"]),
        "seq_len": int(tree["seq_len"]),
        "nodes": len(nodes),
        "nodes_measured": sum("measurement_reused_from" not in n for n in nodes),
        "root_energy_j": root.get("ground_truth_energy"),
        "root_time_s": root.get("times_mean"),
        "children_over_parent_median": statistics.median(ratios) if ratios else None,
        "window_spread_median": statistics.median(spreads) if spreads else None,
        "window_spread_max": max(spreads) if spreads else None,
        "drift": block.get("drift"),
        "drift_flagged": block.get("drift_flagged"),
        "high_spread_nodes": len(block["high_spread"]) if "high_spread" in block else None,
        "tick_s": block.get("tick_s"),
        "settled": (block.get("settle") or {}).get("settled"),
        "measure_seconds": block.get("seconds"),
    }


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}%" if signed else f"{100 * value:.1f}%"


def summary_line(summary: dict[str, Any]) -> str:
    """``bert-base-uncased 8x128: 23/226 nodes, root 3.818 J 6.95 ms, Σchildren/parent 1.00, ...``."""
    s = summary
    energy = "no energy" if s["root_energy_j"] is None else f"{s['root_energy_j']:.4g} J"
    time_ms = "n/a" if s["root_time_s"] is None else f"{1000 * s['root_time_s']:.3g} ms"
    ratio = "n/a" if s["children_over_parent_median"] is None else f"{s['children_over_parent_median']:.2f}"
    parts = [
        f"{s['model']} {s['batch_size']}x{s['seq_len']}: {s['nodes_measured']}/{s['nodes']} nodes measured",
        f"root {energy} {time_ms}",
        f"Σchildren/parent median {ratio}",
        f"window spread median {_pct(s['window_spread_median'])} max {_pct(s['window_spread_max'])}",
    ]
    if s["drift"] is not None:
        parts.append(f"drift {_pct(s['drift'], signed=True)}" + (" FLAGGED" if s["drift_flagged"] else ""))
    if s["settled"] is False:
        parts.append("NOT SETTLED")
    if s["high_spread_nodes"]:
        parts.append(f"{s['high_spread_nodes']} nodes above the spread threshold")
    if s["measure_seconds"] is not None:
        parts.append(f"{s['measure_seconds']:.1f} s")
    return ", ".join(parts)


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a summary (for MLflow)."""
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, int | float) and k not in ("batch_size", "seq_len") and v is not None}
