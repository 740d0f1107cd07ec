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

import warnings
from collections.abc import Sequence

import numpy as np

from irene.data.forest import ALL_FEATURES, Forest, origin, shared_cache

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
    feature no node of a kind has is left out for that kind).

    The minimum and maximum of every (tree, kind) are computed once per data set
    (:func:`irene.data.forest.shared_cache`); a subset, such as a cross-validation fold,
    reduces its trees' rows of that table."""
    forests = [forests] if isinstance(forests, Forest) else list(forests)
    features = list(features)
    ranges: dict[str, dict[str, list[float]]] = {}
    for forest in forests:
        kinds, low, high = _tree_kind_table(forest, features)
        trees = origin(forest)[1]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: a kind not in these trees
            lows, highs = np.nanmin(low[trees], axis=0), np.nanmax(high[trees], axis=0)
        for k, kind in enumerate(kinds):
            for j in np.flatnonzero(~np.isnan(lows[k])):
                entry = ranges.setdefault(str(kind), {})
                lo, hi = float(lows[k, j]), float(highs[k, j])
                old = entry.get(features[j])
                entry[features[j]] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]
    return ranges


def _tree_kind_table(forest: Forest, features: list[str]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the data set ``forest`` belongs to: its kinds of node, and the T × K × F minima
    and maxima of every feature over each tree's nodes of each kind (NaN: none)."""
    cache = shared_cache(forest)
    key = ("feature_ranges", tuple(features))
    if key not in cache:
        root = origin(forest)[0]
        kinds, code = np.unique(node_kinds(root).astype(str), return_inverse=True)
        values = root.features[:, [ALL_FEATURES.index(f) for f in features]]
        group = root.tree_index * len(kinds) + code.ravel()
        order = np.argsort(group, kind="stable")
        starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
        shape = (root.num_trees * len(kinds), len(features))
        low, high = np.full(shape, np.nan), np.full(shape, np.nan)
        if len(order):
            block = values[order]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                low[group[order][starts]] = np.fmin.reduceat(block, starts, axis=0)
                high[group[order][starts]] = np.fmax.reduceat(block, starts, axis=0)
        cache[key] = (kinds, low.reshape(root.num_trees, len(kinds), -1),
                      high.reshape(root.num_trees, len(kinds), -1))
    return cache[key]


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
