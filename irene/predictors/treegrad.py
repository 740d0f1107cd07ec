"""Loss and gradient of the IrEne weighting model on one tree, by hand, in NumPy.

Autograd costs about half a millisecond of bookkeeping per tree step, more than the arithmetic
of a 150-node tree; the explicit reverse pass below does the same work in a few dozen array
operations. ``IreneModel(engine="torch")`` keeps the autograd version, and the tests check that
both give the same loss and gradient.

Notation for one tree: x (n×P) transformed features, θ = (weights, bias), z = x·θ, w(z) the
child weights, v the node values (energies), g the measured energies. With
``normalize`` the loss is Σ_inner ((v − g)/g)², else Σ_inner (v − g)².
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from irene.data.forest import Forest, origin, shared_cache


@dataclass
class TreeIndex:
    """Local index arrays of one tree (rows ``start:stop`` of a forest)."""

    start: int
    stop: int
    parent: np.ndarray  # local parent of every node, -1 for the root
    levels: list[tuple[np.ndarray, np.ndarray]]  # (children, their parents), deepest first
    edges: tuple[np.ndarray, np.ndarray]  # every (child, parent) pair
    inner: np.ndarray  # inner nodes with a measured energy: the loss targets
    is_leaf: np.ndarray


def tree_indices(forest: Forest) -> list[TreeIndex]:
    """Index arrays of every tree of a forest (computed once per fit).

    A tree's local arrays depend only on the tree, so they are computed once per data set
    (:func:`~irene.data.forest.shared_cache`) and shared by the forests cut from it: every
    fold of a cross-validation reuses them with its own row offsets.
    """
    root, root_trees = origin(forest)
    cache = shared_cache(forest).setdefault("tree_indices", {})
    missing = [int(r) for r in root_trees if int(r) not in cache]
    if missing:
        cache.update(zip(missing, _tree_indices(root, missing), strict=True))
    return [replace(cache[int(r)], start=int(forest.offsets[t]), stop=int(forest.offsets[t + 1]))
            for t, r in enumerate(root_trees)]


def _tree_indices(forest: Forest, trees: list[int]) -> list[TreeIndex]:
    out = []
    measured = ~np.isnan(forest.gold_j)
    leaf = forest.is_leaf
    for t in trees:
        a, b = int(forest.offsets[t]), int(forest.offsets[t + 1])
        parent = np.where(forest.parent[a:b] >= 0, forest.parent[a:b] - a, -1)
        depth = forest.depth[a:b]
        levels = []
        for d in range(int(depth.max()), 0, -1):
            children = np.flatnonzero(depth == d)
            levels.append((children, parent[children]))
        nonroot = np.flatnonzero(parent >= 0)
        is_leaf = leaf[a:b]
        out.append(TreeIndex(start=a, stop=b, parent=parent, levels=levels,
                             edges=(nonroot, parent[nonroot]),
                             inner=np.flatnonzero(~is_leaf & measured[a:b]), is_leaf=is_leaf))
    return out


def _weights(z: np.ndarray, weighting: str, tanh_scalar: float) -> tuple[np.ndarray, np.ndarray]:
    """Child weights w(z) and dw/dz."""
    if weighting == "close_to_one":
        t = np.tanh(z)
        return 1.0 + t / tanh_scalar, (1.0 - t * t) / tanh_scalar
    if weighting == "free":
        return z, np.ones_like(z)
    return np.ones_like(z), np.zeros_like(z)


def tree_loss_and_grad(theta: np.ndarray, x: np.ndarray, leaf_pred: np.ndarray, gold: np.ndarray,
                       tree: TreeIndex, *, strategy: str, weighting: str, tanh_scalar: float,
                       normalize: bool) -> tuple[float, np.ndarray]:
    """Loss of one tree and its gradient with respect to ``theta`` (weights then bias)."""
    n = len(x)
    inner = tree.inner
    if strategy == "unstructured":
        z = x[inner] @ theta[:-1] + theta[-1]
        w, dw = _weights(z, weighting, tanh_scalar)
        residual = w - gold[inner]
        scale = 1.0 / gold[inner] ** 2 if normalize else 1.0
        dz = 2.0 * residual * scale * dw
        return float(np.sum(residual**2 * scale)), np.append(x[inner].T @ dz, dz.sum())

    z = x @ theta[:-1] + theta[-1]
    w, dw = _weights(z, weighting, tanh_scalar)
    children, parents = tree.edges
    if strategy == "stepwise":
        values = np.bincount(parents, weights=w[children] * gold[children], minlength=n)
        inputs = gold  # what each weight multiplies
    else:  # end2end: values flow up from the leaf predictions, one level at a time
        values = np.where(tree.is_leaf, leaf_pred, 0.0)
        for level_children, level_parents in tree.levels:
            values += np.bincount(level_parents, weights=w[level_children] * values[level_children],
                                  minlength=n)
        inputs = values
    residual = values[inner] - gold[inner]
    scale = 1.0 / gold[inner] ** 2 if normalize else 1.0
    loss = float(np.sum(residual**2 * scale))

    grad_values = np.zeros(n)
    grad_values[inner] = 2.0 * residual * scale
    if strategy != "stepwise":
        # reverse pass, top-down: a child's value feeds its parent with factor w(child)
        for level_children, level_parents in reversed(tree.levels):
            grad_values[level_children] += w[level_children] * grad_values[level_parents]
    grad_w = np.zeros(n)
    grad_w[children] = grad_values[parents] * inputs[children]
    dz = grad_w * dw
    return loss, np.append(x.T @ dz, dz.sum())


class Adam:
    """torch.optim.Adam's update (default betas and eps, no weight decay) on a flat array."""

    def __init__(self, params: np.ndarray, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)
        self.t = 0

    def step(self, grad: np.ndarray) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        step_size = self.lr / (1 - b1**self.t)
        denom = np.sqrt(self.v) / np.sqrt(1 - b2**self.t) + self.eps
        self.params -= step_size * self.m / denom


# ------------------------------------------------------------------ many folds at once
@dataclass
class BatchedTree:
    """One tree's index arrays for :func:`batched_tree_loss_and_grad`: each level's children
    sorted (stably) by parent, the start of each parent's run and the parents, so a level's
    sum over children is one ``np.add.reduceat`` over rows of an n×F array (the children of
    a parent added in their order, as ``np.bincount`` adds them)."""

    tree: TreeIndex
    levels: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # children, their
    # parents (as in tree.levels), the children sorted by parent, run starts, run parents
    edges: tuple[np.ndarray, np.ndarray, np.ndarray]  # children sorted, starts, parents


def _runs(children: np.ndarray, parents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(parents, kind="stable")
    sorted_parents = parents[order]
    starts = np.flatnonzero(np.r_[True, sorted_parents[1:] != sorted_parents[:-1]])
    return children[order], starts, sorted_parents[starts]


def batched_tree(tree: TreeIndex) -> BatchedTree:
    levels = [(c, p, *_runs(c, p)) for c, p in tree.levels]
    return BatchedTree(tree=tree, levels=levels, edges=_runs(*tree.edges))


def _sum_children(out: np.ndarray, terms: np.ndarray, starts: np.ndarray,
                  parents: np.ndarray) -> None:
    """``out[parent] += Σ terms`` over each parent's run of rows of ``terms``."""
    if len(terms):
        out[parents] += np.add.reduceat(terms, starts, axis=0)


@dataclass
class DistinctRows:
    """A tree's distinct feature rows: the tree's row i has the features of distinct row
    ``inverse[i]``; ``order`` lists the tree's rows grouped by distinct row (each group in
    row order) and ``starts`` where each group begins, so a sum over each distinct row's
    copies is one ``np.add.reduceat``. Identical layers repeat the same nodes: a tree has
    about a tenth as many distinct rows as nodes, so the products run on those alone."""

    inverse: np.ndarray
    order: np.ndarray
    starts: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> tuple[np.ndarray, DistinctRows]:
        """(the rows of ``x`` kept, first copies in row order; their :class:`DistinctRows`)."""
        _, first, inverse = np.unique(x, axis=0, return_index=True, return_inverse=True)
        by_first = np.argsort(first, kind="stable")  # distinct rows in order of first copy
        rank = np.empty_like(by_first)
        rank[by_first] = np.arange(len(by_first))
        inverse = rank[inverse.ravel()]
        order = np.argsort(inverse, kind="stable")
        starts = np.flatnonzero(np.r_[True, inverse[order][1:] != inverse[order][:-1]])
        return first[by_first], cls(inverse=inverse, order=order, starts=starts)


def batched_tree_loss_and_grad(x: np.ndarray, v: np.ndarray, bias: np.ndarray,
                               leaf_pred: np.ndarray | None, gold: np.ndarray, bt: BatchedTree,
                               *, strategy: str, weighting: str, tanh_scalar: float,
                               normalize: bool, distinct: DistinctRows | None = None
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`tree_loss_and_grad` for F weight vectors at once: ``v`` (P×F) and ``bias`` (F)
    are the columns' weights and biases on the features ``x`` (n×P), ``leaf_pred`` (n×F, 0
    off the leaves) each column's leaf predictions. Returns the F losses, the gradients
    with respect to ``v`` (P×F) and to ``bias`` (F): one matrix product each way instead
    of F matrix-vector products. With ``distinct``, ``x`` holds the tree's distinct rows
    only (:class:`DistinctRows`): the products run on those, the weights are copied to
    the nodes and each distinct row's gradient is summed over its copies first."""
    tree = bt.tree
    n = len(x) if distinct is None else len(distinct.inverse)
    inner = tree.inner
    scale = (1.0 / gold[inner] ** 2 if normalize else np.ones(len(inner)))[:, None]
    if strategy == "unstructured":
        xi = x[inner] if distinct is None else x[distinct.inverse[inner]]
        z = xi @ v + bias
        w, dw = _weights(z, weighting, tanh_scalar)
        residual = w - gold[inner][:, None]
        dz = 2.0 * residual * scale * dw
        return np.sum(residual**2 * scale, axis=0), xi.T @ dz, dz.sum(axis=0)

    w, dw = _weights(x @ v + bias, weighting, tanh_scalar)
    if distinct is not None:
        w, dw = w[distinct.inverse], dw[distinct.inverse]
    f = v.shape[1]
    children = tree.edges[0]
    if strategy == "stepwise":
        values = np.zeros((n, f))
        sorted_children, starts, parents = bt.edges
        _sum_children(values, w[sorted_children] * gold[sorted_children, None], starts, parents)
        inputs = np.broadcast_to(gold[:, None], (n, f))
    else:
        values = leaf_pred.copy()
        for _, _, sorted_children, starts, parents in bt.levels:
            _sum_children(values, w[sorted_children] * values[sorted_children], starts, parents)
        inputs = values
    residual = values[inner] - gold[inner][:, None]
    loss = np.sum(residual**2 * scale, axis=0)

    grad_values = np.zeros((n, f))
    grad_values[inner] = 2.0 * residual * scale
    if strategy != "stepwise":
        for level_children, level_parents, *_ in reversed(bt.levels):
            grad_values[level_children] += w[level_children] * grad_values[level_parents]
    dz = np.zeros((n, f))
    dz[children] = grad_values[tree.edges[1]] * inputs[children] * dw[children]
    if distinct is None:
        return loss, x.T @ dz, dz.sum(axis=0)
    return loss, x.T @ np.add.reduceat(dz[distinct.order], distinct.starts), dz.sum(axis=0)


class BatchedAdam:
    """:class:`Adam` on the rows of an F×P array, each row its own optimizer (its own step
    count); :meth:`step` updates the rows marked active."""

    def __init__(self, params: np.ndarray, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)
        self.t = np.zeros(len(params), dtype=np.int64)
        self._corrections = (np.zeros(0), np.zeros(0))
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None

    def step(self, active: np.ndarray, grad: np.ndarray) -> None:
        """One step of the rows where ``active`` (bool, F) is true, ``grad`` F×P (its other
        rows are ignored). Every row is computed and the inactive ones put back: cheaper
        than gathering the active rows when most are (a cross-validation's folds all train
        on a tree but one)."""
        b1, b2 = self.betas
        idle = np.flatnonzero(~active)
        kept = (self.params[idle], self.m[idle], self.v[idle])
        self.t[active] += 1
        if self.t.max() >= len(self._corrections[0]):  # Adam's bias corrections by step count
            k = range(1, 2 * int(self.t.max()) + 2)
            self._corrections = (np.array([0.0, *(self.lr / (1 - b1**i) for i in k)]),
                                 np.array([1.0, *(math.sqrt(1 - b2**i) for i in k)]))
        # Adam's arithmetic, operation for operation, in place (two scratch arrays)
        if self._scratch is None or self._scratch[0].shape != grad.shape:
            self._scratch = (np.empty_like(grad), np.empty_like(grad))
        a, b = self._scratch
        self.m *= b1
        np.multiply(grad, 1 - b1, out=a)
        self.m += a
        self.v *= b2
        np.multiply(grad, 1 - b2, out=a)
        a *= grad
        self.v += a
        np.sqrt(self.v, out=b)
        b /= self._corrections[1][self.t][:, None]
        b += self.eps
        np.multiply(self.m, self._corrections[0][self.t][:, None], out=a)
        a /= b
        self.params -= a
        self.params[idle], self.m[idle], self.v[idle] = kept
