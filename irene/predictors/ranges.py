"""The range of every feature a predictor was fitted on, and the nodes it is asked about
outside that range.

A regressor extrapolates outside the features it saw: a power law fitted on hidden size 768
says little about 8192, and an answer from there deserves a flag, not trust. Ranges are kept
per kind of node, the unit a predictor learns per: leaves per primitive type (one regressor
each), inner nodes per level (``module``, ``model``). Every fitted predictor keeps them
(``ranges_``, saved with it); :func:`out_of_range` names, per node, the features outside
them. A kind of node never seen in training has no range (its prediction is a fallback, which
is flagged on its own).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from irene.data.forest import ALL_FEATURES, Forest

#: A value counts as inside a range up to this relative tolerance (rounding of written files).
TOLERANCE = 1e-6


def node_kinds(forest: Forest) -> np.ndarray:
    """Per node, the unit ranges are kept for: ``leaf:<primitive type>`` or the level name."""
    from irene.data.tree import NODE_TYPES

    levels = np.asarray([str(t) for t in NODE_TYPES], dtype=object)[forest.node_type]
    leaf = np.char.add("leaf:", forest.op_type.astype(str)).astype(object)
    return np.where(forest.is_leaf, leaf, levels)


def fit_ranges(forests: Forest | Sequence[Forest], features: Sequence[str]
               ) -> dict[str, dict[str, list[float]]]:
    """``{kind: {feature: [low, high]}}`` over the nodes of ``forests`` (NaN ignored; a
    feature no node of a kind has is left out for that kind)."""
    forests = [forests] if isinstance(forests, Forest) else list(forests)
    ranges: dict[str, dict[str, list[float]]] = {}
    for forest in forests:
        kinds = node_kinds(forest)
        values = forest.matrix(list(features))
        order = np.argsort(kinds, kind="stable")
        sorted_kinds = kinds[order]
        starts = np.flatnonzero(np.r_[True, sorted_kinds[1:] != sorted_kinds[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends, strict=True):
            block = values[order[start:end]]
            seen = ~np.all(np.isnan(block), axis=0)
            if not seen.any():
                continue
            with np.errstate(invalid="ignore"):
                low = np.nanmin(np.where(seen, block, 0.0), axis=0)
                high = np.nanmax(np.where(seen, block, 0.0), axis=0)
            kind = ranges.setdefault(str(sorted_kinds[start]), {})
            for j in np.flatnonzero(seen):
                name = features[j]
                old = kind.get(name)
                lo, hi = float(low[j]), float(high[j])
                kind[name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]
    return ranges


def out_of_range(ranges: dict[str, dict[str, list[float]]] | None, forest: Forest
                 ) -> list[list[str]]:
    """Per node, the features outside the range its kind had in training (empty: inside,
    or no range known). Outside means below ``low`` or above ``high`` by more than
    :data:`TOLERANCE` of the range's magnitude."""
    flags: list[list[str]] = [[] for _ in range(forest.num_nodes)]
    if not ranges:
        return flags
    names = sorted({name for kind in ranges.values() for name in kind if name in ALL_FEATURES})
    if not names:
        return flags
    values = forest.matrix(names)
    kinds = node_kinds(forest)
    for kind in np.unique(kinds):
        known = ranges.get(str(kind))
        if not known:
            continue
        rows = np.flatnonzero(kinds == kind)
        for j, name in enumerate(names):
            if name not in known:
                continue
            low, high = known[name]
            slack = TOLERANCE * max(abs(low), abs(high), 1e-12)
            column = values[rows, j]
            with np.errstate(invalid="ignore"):
                outside = (column < low - slack) | (column > high + slack)
            for row in rows[outside]:
                flags[row].append(name)
    return flags
