"""Which k configurations of a new device to measure: the most informative first.

A correction from source devices to a target (:mod:`irene.transfer`) learns one scale per
kind of node (primitive type for leaves, module class for inner nodes) and a slope in the
node's size. A configuration teaches it the kinds of node it contains and the sizes it spans.
:func:`pick_shots` picks k configurations greedily from a pool (traced, unmeasured):

1. the configuration whose kinds of node not yet covered carry the largest share of the
   pool's energy (as the source predicts it), so the kinds that matter are measured first;
2. when every kind is covered (or the gain is below ``min_gain``), the configuration whose
   size (log of the predicted total energy) is farthest from those already picked, so the
   slope sees both small and large work.

Ties go to the configuration closest to the pool's median size, then to pool order, so the
picks are deterministic.
"""

from __future__ import annotations

import numpy as np

from irene.data.forest import Forest
from irene.data.tree import NODE_TYPES

_LEVELS = np.asarray([str(t) for t in NODE_TYPES], dtype=object)


def node_groups(forest: Forest) -> np.ndarray:
    """Per node, the unit a correction scales: ``ml:<primitive type>`` for leaves,
    ``<level>:<class>`` for inner nodes."""
    leaf = np.char.add("ml:", forest.op_type.astype(str))
    inner = np.char.add(np.char.add(_LEVELS[forest.node_type].astype(str), ":"),
                        forest.instance_type.astype(str))
    return np.where(forest.is_leaf, leaf, inner).astype(object)


def pick_shots(forest: Forest, k: int, energy_j: np.ndarray, pool: np.ndarray | None = None,
               *, min_gain: float = 0.005) -> list[int]:
    """Tree indices of the k configurations to measure, in the order picked.

    Args:
        forest: the candidate configurations (traced trees; no energy needed).
        k: how many to pick (at most the pool's size).
        energy_j: every node's energy as a source device predicts it (weights the kinds).
        pool: the trees to pick from (default: all).
        min_gain: a share of energy below which covering new kinds no longer counts more
            than spreading the sizes.
    """
    pool = np.arange(forest.num_trees) if pool is None else np.asarray(pool, dtype=int)
    k = min(int(k), len(pool))
    if k <= 0:
        return []
    groups = node_groups(forest)
    energy = np.nan_to_num(np.maximum(np.asarray(energy_j, dtype=np.float64), 0.0))
    in_pool = np.isin(forest.tree_index, pool)
    total = float(energy[in_pool].sum()) or 1.0
    names, code = np.unique(groups[in_pool].astype(str), return_inverse=True)
    share = np.bincount(code.ravel(), weights=energy[in_pool], minlength=len(names)) / total
    node_code = np.full(forest.num_nodes, -1)
    node_code[in_pool] = code.ravel()
    covers = [np.unique(node_code[forest.offsets[t]:forest.offsets[t + 1]]) for t in pool]
    roots = forest.offsets[:-1][pool]
    size = np.log(np.maximum(energy[roots], 1e-300))
    median = float(np.median(size))
    covered = np.zeros(len(names), dtype=bool)
    picked: list[int] = []
    free = np.ones(len(pool), dtype=bool)
    for _ in range(k):
        gain = np.asarray([share[c[~covered[c]]].sum() for c in covers])
        if np.max(gain[free]) >= min_gain:
            score = gain
        elif picked:  # every kind that matters is covered: spread the sizes
            chosen = size[[int(np.flatnonzero(pool == p)[0]) for p in picked]]
            score = np.min(np.abs(size[:, None] - chosen[None, :]), axis=1)
        else:
            score = np.zeros(len(pool))
        score = np.where(free, score, -np.inf)
        best = np.flatnonzero(np.isclose(score, score.max(), rtol=0, atol=1e-12))
        i = int(best[np.argmin(np.abs(size[best] - median))])
        picked.append(int(pool[i]))
        free[i] = False
        covered[covers[i]] = True
    return picked
