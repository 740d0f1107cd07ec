"""The IrEne tree model, vectorized.

Leaves (ML primitives) get energy from one linear regressor per primitive type. An inner
node's energy is the weighted sum of its children's, each child's weight computed from the
child's own (standardized, polynomial-expanded) features:

* ``exact_one``:    w = 1
* ``close_to_one``: w = 1 + tanh(θ·x) / τ   (the paper's choice, τ = ``tanh_scalar``)
* ``free``:         w = θ·x

Training strategies (how the weighting model θ learns; leaves are always fit first):

* ``end2end``:      parent = Σ w·(predicted child), recursively from the leaves; the loss on
                    every inner node back-propagates through the whole subtree (the paper's).
* ``stepwise``:     during training each parent is Σ w·(measured child) — every level learns
                    in isolation; prediction composes levels like ``end2end``.
* ``unstructured``: an inner node is predicted from its own features alone, θ·x (with the
                    weighting's squashing), ignoring its children; only ``free`` makes sense.
* ``none``:         no weighting model is trained: a parent is the plain sum of its
                    children's predictions, whatever the weighting (the reference code would
                    train it like ``end2end``, which makes the two identical).

Loss per inner node with a measurement: (pred − gold)², divided by gold² when
``normalize_loss_scale`` (so every node counts by its relative error); Adam, one tree per step.

Nothing walks the trees node by node: a tree is a slice of a :class:`~irene.forest.Forest`,
weights of all its nodes come from one matrix product, and aggregation is one ``index_add``
per depth level.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from irene import __version__
from irene.forest import Forest, compose, feature_list, predict_leaves
from irene.io import atomic_write_json
from irene.transforms import LinearLeafRegressor, Standardizer, polynomial_expand
from irene.treegrad import Adam, TreeIndex, tree_indices, tree_loss_and_grad

log = logging.getLogger(__name__)

STRATEGIES = ("end2end", "stepwise", "unstructured", "none")
WEIGHTINGS = ("exact_one", "close_to_one", "free")
FORMAT_VERSION = 1


@dataclass
class IreneConfig:
    """Hyperparameters of the IrEne model; defaults are the paper's."""

    feature_sets: list[str] = field(default_factory=lambda: ["model_specs", "resource_utilization"])
    standardize_features: bool = True
    polynomial_degree: int = 3  # 0 or 1 switches the polynomial expansion off
    training_strategy: str = "end2end"
    weighting: str = "close_to_one"
    tanh_scalar: float = 10.0
    normalize_loss_scale: bool = True
    epochs: int = 8
    lr: float = 1e-3
    seed: int = 13370
    # what to do with a primitive type the leaf regressors never saw: "error", or the name
    # of a trained primitive type whose regressor is used instead (the node is marked)
    unseen_op: str = "error"
    # "numpy": hand-written gradients (fast); "torch": autograd (the reference for tests)
    engine: str = "numpy"
    show_progress: bool = True

    def validate(self) -> None:
        if self.training_strategy not in STRATEGIES:
            raise ValueError(f"training_strategy {self.training_strategy!r}: choose from "
                             f"{list(STRATEGIES)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {self.weighting!r}: choose from {list(WEIGHTINGS)}")
        feature_list(self.feature_sets)
        if self.engine not in ("numpy", "torch"):
            raise ValueError(f"engine {self.engine!r}: choose from ['numpy', 'torch']")
        if self.tanh_scalar <= 0:
            raise ValueError("tanh_scalar must be positive")


class WeightingModel(torch.nn.Module):
    """Weight of a node in its parent's sum, from the node's transformed features."""

    def __init__(self, num_features: int, weighting: str, tanh_scalar: float):
        super().__init__()
        self.linear = torch.nn.Linear(num_features, 1)
        self.weighting = weighting
        self.tanh_scalar = tanh_scalar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weighting == "exact_one":
            return torch.ones(x.shape[0], dtype=x.dtype)
        z = self.linear(x).squeeze(-1)
        if self.weighting == "close_to_one":
            return 1.0 + torch.tanh(z) / self.tanh_scalar
        return z


def fit_leaf_regressors(forest: Forest, x: np.ndarray) -> dict[str, LinearLeafRegressor]:
    """The paper's leaf model: one standardized linear regression per primitive type, fit on
    the measured leaves of ``forest`` (feature rows ``x``)."""
    leaves = forest.is_leaf & ~np.isnan(forest.gold_j)
    models = {op: LinearLeafRegressor.fit(x[leaves & (forest.op_type == op)],
                                          forest.gold_j[leaves & (forest.op_type == op)])
              for op in sorted(set(forest.op_type[leaves]))}
    if not models:
        raise ValueError("no measured leaf (ml) nodes to fit the leaf regressors on")
    return models


class IreneModel:
    """The IrEne predictor (scikit-learn style: ``fit`` returns self, state ends in ``_``)."""

    def __init__(self, config: IreneConfig | None = None):
        self.config = config or IreneConfig()

    # ------------------------------------------------------------------ fitting
    def fit(self, forest: Forest) -> IreneModel:
        cfg = self.config
        cfg.validate()
        self.features_ = feature_list(cfg.feature_sets)
        x = forest.matrix(self.features_)
        self.leaf_models_ = fit_leaf_regressors(forest, x)
        leaf_pred = self._predict_leaves(forest, x)[0]
        self.node_scaler_ = Standardizer.fit(x) if cfg.standardize_features else None
        xt = self._transform(x)
        torch.manual_seed(cfg.seed)
        self.weighting_ = WeightingModel(xt.shape[1], cfg.weighting, cfg.tanh_scalar)
        self.history_ = self._train_weighting(forest, xt, leaf_pred)
        return self

    def _transform(self, x: np.ndarray) -> np.ndarray:
        if self.node_scaler_ is not None:
            x = self.node_scaler_.transform(x)
        if self.config.polynomial_degree > 1:
            x = polynomial_expand(x, self.config.polynomial_degree)
        return x

    def _trainable(self) -> bool:
        cfg = self.config
        return cfg.training_strategy != "none" and cfg.weighting != "exact_one" and cfg.epochs > 0

    def _train_weighting(self, forest: Forest, x: np.ndarray, leaf_pred: np.ndarray
                         ) -> list[float]:
        """Adam over the trees, one tree per step; returns the mean loss of each epoch."""
        cfg = self.config
        if not self._trainable():
            return []
        gold = np.nan_to_num(forest.gold_j, nan=0.0)
        trees = tree_indices(forest)
        linear = self.weighting_.linear
        if cfg.engine == "numpy":
            # float32 initial parameters (torch's init), trained in float64
            theta = np.concatenate([linear.weight.detach().numpy().ravel(),
                                    linear.bias.detach().numpy()]).astype(np.float64)
            optimizer = Adam(theta, lr=cfg.lr)
        else:
            xt, lt, gt = (torch.from_numpy(a).float() for a in (x, leaf_pred, gold))
            optimizer = torch.optim.Adam(self.weighting_.parameters(), lr=cfg.lr)
        history = []
        epochs = tqdm(range(cfg.epochs), desc="train weighting", unit="epoch",
                      disable=not cfg.show_progress, leave=False)
        for _ in epochs:
            total = 0.0
            for tree in trees:
                if len(tree.inner) == 0:
                    continue
                rows = slice(tree.start, tree.stop)
                if cfg.engine == "numpy":
                    loss, grad = tree_loss_and_grad(
                        theta, x[rows], leaf_pred[rows], gold[rows], tree,
                        strategy=cfg.training_strategy, weighting=cfg.weighting,
                        tanh_scalar=cfg.tanh_scalar, normalize=cfg.normalize_loss_scale)
                    optimizer.step(grad)
                else:
                    loss_t = self._tree_loss(tree, xt[rows], lt[rows], gt[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss_t.backward()
                    optimizer.step()
                    loss = loss_t.item()
                total += loss
            history.append(total / max(len(trees), 1))
            epochs.set_postfix(loss=f"{history[-1]:.4g}")
        if cfg.engine == "numpy":
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(theta[:-1]).view_as(linear.weight))
                linear.bias.copy_(torch.from_numpy(theta[-1:]))
        return history

    def _tree_loss(self, tree: TreeIndex, x: torch.Tensor, leaf_pred: torch.Tensor,
                   gold: torch.Tensor) -> torch.Tensor:
        """Autograd version of :func:`irene.treegrad.tree_loss_and_grad` (engine="torch")."""
        strategy = self.config.training_strategy
        inner = torch.from_numpy(tree.inner)
        if strategy == "unstructured":
            pred = self.weighting_(x[inner])
        else:
            weights = self.weighting_(x)
            if strategy == "stepwise":
                children, parents = (torch.from_numpy(a) for a in tree.edges)
                pred = torch.zeros_like(gold).index_add(0, parents,
                                                        weights[children] * gold[children])
            else:
                pred = torch.where(torch.from_numpy(tree.is_leaf), leaf_pred, 0.0)
                for children, parents in tree.levels:
                    children, parents = torch.from_numpy(children), torch.from_numpy(parents)
                    pred = pred.index_add(0, parents, weights[children] * pred[children])
            pred = pred[inner]
        target = gold[inner]
        error = (pred - target) ** 2
        if self.config.normalize_loss_scale:
            error = error / target**2
        return error.sum()

    # --------------------------------------------------------------- prediction
    def _check_fitted(self) -> None:
        if not hasattr(self, "leaf_models_"):
            raise RuntimeError("this IreneModel is not fitted yet: call fit() or load()")

    def _predict_leaves(self, forest: Forest, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Leaf predictions for every node (0 on inner nodes) and the mask of leaves that
        used the fallback regressor of an unseen primitive type."""
        return predict_leaves(forest, x, self.leaf_models_,
                              lambda op: self.leaf_models_.get(self.config.unseen_op),
                              "set unseen_op to one of those to use its regressor instead")

    def predict(self, forest: Forest, *, return_fallback: bool = False):
        """Predicted energy (J) of every node of ``forest``, in forest order."""
        self._check_fitted()
        x = forest.matrix(self.features_)
        leaf_pred, fallback = self._predict_leaves(forest, x)
        if self.config.training_strategy == "none":
            weights = np.ones(forest.num_nodes)
        else:
            with torch.no_grad():
                xt = torch.from_numpy(self._transform(x)).float()
                weights = self.weighting_(xt).double().numpy()
        pred = compose(forest, np.where(forest.is_leaf, leaf_pred, 0.0), weights)
        if self.config.training_strategy == "unstructured":
            pred = np.where(forest.is_leaf, pred, weights)
        return (pred, fallback) if return_fallback else pred

    # ------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``config.json``, ``leaf_regressors.json``, ``node_transform.json`` and the
        weighting model's state dict (``weighting.pt``, tensors only)."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "irene_version": __version__,
                "predictor": "irene", "features": self.features_, "config": asdict(self.config)}
        atomic_write_json(directory / "config.json", meta)
        atomic_write_json(directory / "leaf_regressors.json",
                          {op: m.to_dict() for op, m in self.leaf_models_.items()})
        atomic_write_json(directory / "node_transform.json", {
            "standardizer": None if self.node_scaler_ is None else self.node_scaler_.to_dict(),
            "polynomial_degree": self.config.polynomial_degree,
            "num_inputs": len(self.features_), "history": self.history_,
        })
        tmp = directory / ".weighting.pt.tmp"
        torch.save(self.weighting_.state_dict(), tmp)
        tmp.replace(directory / "weighting.pt")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> IreneModel:
        directory = Path(directory)
        meta = json.loads((directory / "config.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory / 'config.json'}: field 'format_version': expected "
                             f"{FORMAT_VERSION}, got {meta.get('format_version')!r}")
        model = cls(IreneConfig(**meta["config"]))
        model.features_ = meta["features"]
        model.leaf_models_ = {
            op: LinearLeafRegressor.from_dict(state)
            for op, state in json.loads((directory / "leaf_regressors.json").read_text()).items()
        }
        transform = json.loads((directory / "node_transform.json").read_text())
        model.node_scaler_ = (None if transform["standardizer"] is None
                              else Standardizer.from_dict(transform["standardizer"]))
        model.history_ = transform.get("history", [])
        num_inputs = len(model._transform(np.zeros((1, len(model.features_))))[0])
        model.weighting_ = WeightingModel(num_inputs, model.config.weighting,
                                          model.config.tanh_scalar)
        state = torch.load(directory / "weighting.pt", weights_only=True)
        model.weighting_.load_state_dict(state)
        return model


__all__: Sequence[str] = ("IreneConfig", "IreneModel", "STRATEGIES", "WEIGHTINGS", "fit_leaf_regressors")
