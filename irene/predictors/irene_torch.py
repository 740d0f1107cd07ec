"""``IreneModel(engine="torch")``: the weighting model trained by torch's autograd in float32,
the reference implementation's arithmetic. The default numpy engine computes the same
gradients by hand (:mod:`irene.predictors.treegrad`; the tests check both agree) and never
imports this module, so a cross-validation does not pay for importing torch.
"""

from __future__ import annotations

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


class AutogradStepper:
    """One step of torch's Adam per tree, autograd in float32 (the reference's arithmetic)."""

    def __init__(self, model: IreneModel, initial: LinearWeighting, x: np.ndarray,
                 leaf_pred: np.ndarray, gold: np.ndarray):
        self.model, self.initial = model, initial
        self.module = WeightingModel.from_weighting(initial)
        self.x, self.leaf_pred, self.gold = (torch.from_numpy(a).float()
                                             for a in (x, leaf_pred, gold))
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=model.lr)

    def step(self, tree: TreeIndex, rows: slice) -> float:
        """Update the module on one tree; returns the tree's loss before the update."""
        loss = tree_loss(self.module, self.model.training_strategy,
                         self.model.normalize_loss_scale, tree, self.x[rows],
                         self.leaf_pred[rows], self.gold[rows])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def result(self) -> LinearWeighting:
        linear = self.module.linear
        theta = np.append(linear.weight.detach().numpy().ravel(),
                          linear.bias.detach().numpy()).astype(np.float64)
        return self.initial.with_theta(theta)
