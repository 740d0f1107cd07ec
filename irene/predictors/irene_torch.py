"""``IreneModel(engine="torch")``: the weighting model trained by torch's autograd in float32,
the reference implementation's arithmetic. The default numpy engine computes the same
gradients by hand (:mod:`irene.predictors.treegrad`; the tests check both agree) and never
imports this module, so a cross-validation does not pay for importing torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from irene.predictors.treegrad import TreeIndex

if TYPE_CHECKING:
    from irene.predictors.irene import IreneModel, LinearWeighting


class WeightingModel(torch.nn.Module):
    """:class:`~irene.predictors.irene.LinearWeighting` as a torch module."""

    def __init__(self, num_features: int, weighting: str, tanh_scalar: float):
        super().__init__()
        self.linear = torch.nn.Linear(num_features, 1)
        self.weighting = weighting
        self.tanh_scalar = tanh_scalar

    @classmethod
    def from_weighting(cls, weighting: LinearWeighting) -> WeightingModel:
        module = cls(len(weighting.weight), weighting.weighting, weighting.tanh_scalar)
        with torch.no_grad():
            module.linear.weight.copy_(torch.from_numpy(weighting.weight).view(1, -1))
            module.linear.bias.fill_(float(weighting.bias))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weighting == "exact_one":
            return torch.ones(x.shape[0], dtype=x.dtype)
        z = self.linear(x).squeeze(-1)
        if self.weighting == "close_to_one":
            return 1.0 + torch.tanh(z) / self.tanh_scalar
        return z


def tree_loss(module: WeightingModel, strategy: str, normalize: bool, tree: TreeIndex,
              x: torch.Tensor, leaf_pred: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Autograd version of :func:`irene.predictors.treegrad.tree_loss_and_grad`."""
    inner = torch.from_numpy(tree.inner)
    if strategy == "unstructured":
        pred = module(x[inner])
    else:
        weights = module(x)
        if strategy == "stepwise":
            children, parents = (torch.from_numpy(a) for a in tree.edges)
            pred = torch.zeros_like(gold).index_add(0, parents, weights[children] * gold[children])
        else:
            pred = torch.where(torch.from_numpy(tree.is_leaf), leaf_pred, 0.0)
            for children, parents in tree.levels:
                children, parents = torch.from_numpy(children), torch.from_numpy(parents)
                pred = pred.index_add(0, parents, weights[children] * pred[children])
        pred = pred[inner]
    target = gold[inner]
    error = (pred - target) ** 2
    if normalize:
        error = error / target**2
    return error.sum()


def train_with_autograd(model: IreneModel, initial: LinearWeighting, trees: list[TreeIndex],
                        x: np.ndarray, leaf_pred: np.ndarray, gold: np.ndarray,
                        epochs: Iterable[int]) -> tuple[LinearWeighting, list[float]]:
    """Adam (torch's) over the trees, one tree per step, in float32; returns the trained
    weighting and the mean loss of each epoch."""
    module = WeightingModel.from_weighting(initial)
    xt, lt, gt = (torch.from_numpy(a).float() for a in (x, leaf_pred, gold))
    optimizer = torch.optim.Adam(module.parameters(), lr=model.lr)
    history = []
    for _ in epochs:
        total = 0.0
        for tree in trees:
            if len(tree.inner) == 0:
                continue
            rows = slice(tree.start, tree.stop)
            loss = tree_loss(module, model.training_strategy, model.normalize_loss_scale, tree,
                             xt[rows], lt[rows], gt[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        history.append(total / max(len(trees), 1))
        if hasattr(epochs, "set_postfix"):
            epochs.set_postfix(loss=f"{history[-1]:.4g}")
    theta = np.append(module.linear.weight.detach().numpy().ravel(),
                      module.linear.bias.detach().numpy()).astype(np.float64)
    return initial.with_theta(theta), history
