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

Nothing walks the trees node by node: a tree is a slice of a :class:`~irene.data.forest.Forest`,
weights of all its nodes come from one matrix product, and aggregation is one ``index_add``
per depth level.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from irene.data.forest import ALL_FEATURE_SETS, Forest, compose, feature_list
from irene.errors import SettingsError
from irene.predictors.base import Each, OneOf, Predictor, Range, clone
from irene.predictors.leaves import (
    LinearLeafRegressor,
    Standardizer,
    expansion_plan,
    fit_leaf_regressors,
    polynomial_expand,
    polynomial_powers,
    polynomial_transform,
    predict_leaves,
)
from irene.predictors.treegrad import (
    Adam,
    BatchedAdam,
    DistinctRows,
    batched_tree,
    batched_tree_loss_and_grad,
    tree_indices,
    tree_loss_and_grad,
)

log = logging.getLogger(__name__)

STRATEGIES = ("end2end", "stepwise", "unstructured", "none")
WEIGHTINGS = ("exact_one", "close_to_one", "free")
# The weighting the paper paired with each training strategy (weighting="paper").
PAPER_WEIGHTING = {"unstructured": "free", "none": "exact_one"}
# (strategy, weighting) whose folds IreneModel.fit_folds trains together (the others fold
# by fold; see its docstring)
BATCHED = {("end2end", "close_to_one"), ("unstructured", "close_to_one"),
           ("unstructured", "free")}
MAX_WEIGHTING_INPUTS = 2000  # polynomial terms of the weighting model's features, at most
# fit_folds trains groups of folds in threads side by side, each group at least this many:
# fewer make each step's arrays so small that the threads mostly wait for each other (6
# synthetic models, 2 threads: 2.4-3.6 s against 1.1-1.3 s in one)
MIN_FOLDS_PER_THREAD = 16


def effective_weighting(weighting: str, training_strategy: str) -> str:
    """``weighting``, with ``"paper"`` resolved to the paper's choice for the strategy."""
    if weighting == "paper":
        return PAPER_WEIGHTING.get(training_strategy, "close_to_one")
    return weighting


class LinearWeighting:
    """Weight of a node in its parent's sum, from the node's transformed features x:
    ``1`` (exact_one), ``1 + tanh(θ·x + b)/τ`` (close_to_one) or ``θ·x + b`` (free).

    θ and b are float32 and the weights are computed in float32, as the reference's
    ``torch.nn.Linear`` holds and applies them; training works on a float64 copy.
    """

    def __init__(self, weight: np.ndarray, bias: float, weighting: str, tanh_scalar: float):
        self.weight = np.asarray(weight, dtype=np.float32).ravel()
        self.bias = np.float32(bias)
        self.weighting = weighting
        self.tanh_scalar = tanh_scalar

    @classmethod
    def initial(cls, num_features: int, weighting: str, tanh_scalar: float, seed: int
                ) -> LinearWeighting:
        """The initial parameters of ``torch.nn.Linear(num_features, 1)`` after
        ``torch.manual_seed(seed)``, bit for bit, drawn without importing torch (tested).

        torch draws the weight from U(-a, a) with a = √3·gain/√fan_in, gain = √(2/(1+5))
        (``kaiming_uniform_(a=√5)``), then the bias from U(-1/√fan_in, 1/√fan_in); each
        float32 draw takes the low 24 bits of one 32-bit output of the MT19937 generator
        seeded with ``seed`` (the same generator and seeding as ``numpy.random.RandomState``).
        """
        stream = np.random.RandomState(seed)
        gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
        weight_bound = math.sqrt(3.0) * gain / math.sqrt(num_features)
        bias_bound = 1 / math.sqrt(num_features)
        weight = _torch_uniform(stream, num_features, weight_bound)
        bias = _torch_uniform(stream, 1, bias_bound)[0]
        return cls(weight, bias, weighting, tanh_scalar)

    @property
    def theta(self) -> np.ndarray:
        """θ then b, as float64 (what training updates)."""
        return np.append(self.weight, self.bias).astype(np.float64)

    def with_theta(self, theta: np.ndarray) -> LinearWeighting:
        """A copy holding ``theta`` (rounded to float32, as torch's parameters would be)."""
        return LinearWeighting(theta[:-1], theta[-1], self.weighting, self.tanh_scalar)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The weight of every row of ``x`` (float64 array of float32 values)."""
        if self.weighting == "exact_one":
            return np.ones(len(x))
        z = x.astype(np.float32) @ self.weight + self.bias
        if self.weighting == "close_to_one":
            z = np.float32(1.0) + np.tanh(z) / np.float32(self.tanh_scalar)
        return z.astype(np.float64)


def _torch_uniform(stream: np.random.RandomState, size: int, bound: float) -> np.ndarray:
    """``torch.empty(size).uniform_(-bound, bound)`` on the CPU generator ``stream``."""
    raw = stream.randint(0, 2**32, size=size, dtype=np.uint64)
    unit = (raw & ((1 << 24) - 1)).astype(np.float64) * 2.0**-24
    low, high = np.float32(-bound), np.float32(bound)
    return (unit * np.float64(high - low) + np.float64(low)).astype(np.float32)


class TreeFeatures:
    """The weighting model's inputs of a forest's nodes: the polynomial expansion of the
    (standardized) features ``z``, built for the rows asked for (``x[a:b]``: one tree's
    rows, the same floats as those rows of the whole expansion).

    Training reads one tree at a time. The first rows, up to ``WHOLE_BYTES`` of expansion,
    are expanded once and sliced (all of a device's six models: 25k nodes, 130 MB; 91 % of 48
    synthetic models: 1.1 GB; 46 % of 96: 2.2 GB in all, 680 columns of float64 per node with
    the default features); a tree beyond them gets its block when its step needs it, built
    in buffers that are reused (a fresh block per step would cost a fresh allocation, page
    faults included). Built once is faster (a fold reads it eight times); tree by tree, the
    memory stays bounded. A block is valid until the next one is asked for; more rows than
    ``BLOCK_ROWS`` get a new array.
    """

    BLOCK_ROWS = 1024
    WHOLE_BYTES = 2**30

    def __init__(self, z: np.ndarray, degree: int, whole_bytes: int | None = None):
        self.z, self.degree = z, degree
        width = len(polynomial_powers(z.shape[1], degree)) if degree > 1 else z.shape[1]
        self.shape = (len(z), width)
        self._local = threading.local()  # the block buffers: one set per thread
        budget = max(self.WHOLE_BYTES if whole_bytes is None else whole_bytes, 0)
        held = min(len(z), budget // (width * 8)) if degree > 1 else 0
        self._whole = polynomial_expand(z[:held], degree) if held else np.empty((0, width))

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self.z))
        if stop <= len(self._whole):
            return self._whole[rows]
        z = self.z[rows]
        if self.degree <= 1:
            return z
        if len(z) > self.BLOCK_ROWS:
            return polynomial_expand(z, self.degree)
        if getattr(self._local, "buffers", None) is None:
            plan = expansion_plan(z.shape[1], self.degree)[1]
            # degree 1 is z itself (1.0 × z) and the left factors of degree 2 are z's columns
            # (plan[0][0].start offsets them), so both degrees read z alone
            steps = [(columns, lower - plan[0][0].start if d == 2 else lower, factor,
                      np.empty((self.BLOCK_ROWS, len(lower))),
                      np.empty((self.BLOCK_ROWS, len(lower))))
                     for d, (columns, lower, factor) in enumerate(plan[1:], start=2)]
            self._local.buffers = (plan[0][0], np.empty((self.BLOCK_ROWS, self.shape[1])), steps)
        first, out, steps = self._local.buffers
        n = len(z)
        block = out[:n]
        block[:, 0] = 1.0
        block[:, first] = z
        # column c of degree k = (its degree k-1 column) × (one input column), as
        # polynomial_expand computes it
        for d, (columns, lower, factor, left, right) in enumerate(steps, start=2):
            np.take(z if d == 2 else block, lower, axis=1, out=left[:n], mode="clip")
            np.take(z, factor, axis=1, out=right[:n], mode="clip")
            np.multiply(left[:n], right[:n], out=block[:, columns])
        return block


class _LeafRows:
    """A forest's leaves by primitive type, for fitting many folds' leaf regressors: the
    types (sorted), each one's leaf rows and measured leaf rows, and every node's position
    among the leaves (valid on leaves)."""

    def __init__(self, forest: Forest):
        leaf = forest.is_leaf
        ops, codes = np.unique(np.asarray(forest.op_type)[leaf], return_inverse=True)
        code = np.full(forest.num_nodes, -1)
        code[leaf] = codes
        measured = leaf & ~np.isnan(forest.gold_j)
        self.ops = ops.tolist()
        self.rows = [np.flatnonzero(code == k) for k in range(len(ops))]
        self.measured = [np.flatnonzero(measured & (code == k)) for k in range(len(ops))]
        self.position = np.cumsum(leaf) - 1
        self.count = int(leaf.sum())


class _TreeMoments:
    """Per tree of a forest: its node count and its features' mean, centred sum of squares,
    minimum and maximum, so that any set of trees' standardisation is a combination of
    them (the centred sums combine by Chan's rule: within-tree sums plus each tree's count ×
    its mean's squared distance from the set's mean), not a pass over the set's rows."""

    def __init__(self, x: np.ndarray, offsets: np.ndarray):
        starts = offsets[:-1]
        self.count = np.diff(offsets).astype(np.float64)
        self.mean = np.add.reduceat(x, starts, axis=0) / self.count[:, None]
        centred = x - np.repeat(self.mean, np.diff(offsets), axis=0)
        self.squares = np.add.reduceat(centred * centred, starts, axis=0)
        self.low = np.minimum.reduceat(x, starts, axis=0)
        self.high = np.maximum.reduceat(x, starts, axis=0)

    def standardizer(self, trees: np.ndarray) -> Standardizer:
        """The :class:`Standardizer` of the nodes of the trees ``trees`` (bool mask, at least
        one tree): equal to ``Standardizer.fit`` of their rows to rounding; a column constant
        over them gets its value as mean exactly, so it standardizes to exactly 0."""
        count = self.count[trees]
        n = count.sum()
        mean = count @ self.mean[trees] / n
        squares = self.squares[trees].sum(axis=0) + count @ (self.mean[trees] - mean) ** 2
        low, high = self.low[trees].min(axis=0), self.high[trees].max(axis=0)
        constant = low == high
        return Standardizer.from_moments(np.where(constant, low, mean),
                                         np.where(constant, 0.0, np.sqrt(squares / n)))


class NumpyStepper:
    """One Adam step per tree with the hand-written gradients, θ in float64 (starting from
    the float32 initial parameters)."""

    def __init__(self, model: IreneModel, initial: LinearWeighting, x: TreeFeatures,
                 leaf_pred: np.ndarray, gold: np.ndarray):
        self.model, self.initial = model, initial
        self.x, self.leaf_pred, self.gold = x, leaf_pred, gold
        self.theta = initial.theta
        self.optimizer = Adam(self.theta, lr=model.lr)

    def step(self, tree, rows: slice) -> float:
        """Update θ on one tree; returns the tree's loss before the update."""
        model = self.model
        loss, grad = tree_loss_and_grad(
            self.theta, self.x[rows], self.leaf_pred[rows], self.gold[rows], tree,
            strategy=model.training_strategy, weighting=model.weighting_name_,
            tanh_scalar=model.tanh_scalar, normalize=model.normalize_loss_scale)
        self.optimizer.step(grad)
        return loss

    def result(self) -> LinearWeighting:
        return self.initial.with_theta(self.theta)


class IreneModel(Predictor):
    """The IrEne predictor of the paper: per-primitive linear leaves, learned child weights.

    Every argument is a hyperparameter; its default is the paper's value, and this signature
    is the only place that states it (the Hydra schema of ``conf/predictor/irene.yaml`` is
    generated from it).

    Args:
        feature_sets: feature sets the leaves and the weighting model read
            (``model_specs``, ``resource_utilization``).
        training_strategy: how the weighting model learns: ``end2end``, ``stepwise``,
            ``unstructured`` or ``none`` (see the module docstring).
        weighting: child weights: ``exact_one``, ``close_to_one``, ``free``, or ``paper`` (the
            paper's choice for the strategy: ``free`` for unstructured, else close_to_one).
        standardize_features: z-score the features before the polynomial expansion.
        polynomial_degree: degree of the weighting model's feature interactions (≤ 1: off).
        tanh_scalar: τ of ``w = 1 + tanh(θ·x)/τ``.
        normalize_loss_scale: divide each node's squared error by its measured energy².
        epochs: passes over the training trees, one tree per Adam step.
        lr: Adam's learning rate.
        seed: seed of the weighting model's initialisation (the one ``torch.manual_seed``
            would give, without importing torch).
        unseen_op: a primitive type never seen in training: ``error``, or a known primitive
            type whose regressor is used instead (the node is marked as a fallback).
        engine: ``numpy`` (hand-written gradients in float64, fast; torch is not imported)
            or ``torch`` (autograd in float32, the reference's arithmetic).
        show_progress: a progress bar over the epochs.
    """

    name = "irene"
    constraints = {
        "training_strategy": OneOf(STRATEGIES),
        "weighting": OneOf((*WEIGHTINGS, "paper")),
        "polynomial_degree": Range(int, 0, 10),
        "tanh_scalar": Range(float, 0, None, low_open=True),
        "epochs": Range(int, 1, 100_000),
        "lr": Range(float, 0, 1.0, low_open=True),
        "seed": Range(int, 0, 2**32 - 1),
        "engine": OneOf(("numpy", "torch")),
        "feature_sets": Each(OneOf(ALL_FEATURE_SETS)),
    }

    def __init__(self, feature_sets: list[str] = ALL_FEATURE_SETS,
                 training_strategy: str = "end2end", weighting: str = "close_to_one",
                 standardize_features: bool = True, polynomial_degree: int = 3,
                 tanh_scalar: float = 10.0, normalize_loss_scale: bool = True, epochs: int = 8,
                 lr: float = 1e-3, seed: int = 13370, unseen_op: str = "error",
                 engine: str = "numpy", show_progress: bool = True):
        self.feature_sets = feature_sets
        self.training_strategy = training_strategy
        self.weighting = weighting
        self.standardize_features = standardize_features
        self.polynomial_degree = polynomial_degree
        self.tanh_scalar = tanh_scalar
        self.normalize_loss_scale = normalize_loss_scale
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.unseen_op = unseen_op
        self.engine = engine
        self.show_progress = show_progress

    def validate_params(self) -> None:
        super().validate_params()
        inputs = len(polynomial_powers(len(feature_list(list(self.feature_sets))),
                                       max(int(self.polynomial_degree), 1)))
        if self.polynomial_degree > 1 and inputs > MAX_WEIGHTING_INPUTS:
            raise SettingsError(
                f"predictor.polynomial_degree={self.polynomial_degree!r}: gives {inputs} weighting "
                f"inputs for {len(feature_list(list(self.feature_sets)))} features, more than "
                f"{MAX_WEIGHTING_INPUTS}; use a smaller degree")

    # ------------------------------------------------------------------ fitting
    def fit(self, forest: Forest) -> IreneModel:
        self.validate_params()
        xt, leaf_pred = self._fit_unseeded(forest)
        self._fit_seeded(forest, xt, leaf_pred)
        return self

    def fit_seeds(self, forest: Forest, seeds: Sequence[int]) -> list[IreneModel]:
        """One fitted copy per seed, equal to ``clone(self).set_params(seed=s).fit(forest)``;
        the leaf regressors and the transformed features, which the seed does not touch, are
        computed once and shared (read-only) by the copies."""
        copies = [clone(self).set_params(seed=int(seed)) for seed in seeds]
        for copy in copies:
            copy.validate_params()
        if not copies:
            return []
        xt, leaf_pred = copies[0]._fit_unseeded(forest)
        for copy in copies:
            if copy is not copies[0]:
                copy._share_unseeded(copies[0])
            copy._fit_seeded(forest, xt, leaf_pred)
        return copies

    def uses_seed(self) -> bool:
        """The seed draws the weighting model's initial parameters; nothing learns them (and
        the seed changes nothing) with ``strategy=none`` or ``exact_one`` weights."""
        return self._trainable()

    def _fit_unseeded(self, forest: Forest) -> tuple[TreeFeatures, np.ndarray]:
        """Leaf regressors and feature transform; returns the transformed node features (row
        blocks expanded when asked for) and the leaf predictions the weighting model trains on."""
        x, leaf_pred = self._fit_leaves_and_scaler(forest)
        return TreeFeatures(x, self.polynomial_degree), leaf_pred

    def _fit_leaves_and_scaler(self, forest: Forest) -> tuple[np.ndarray, np.ndarray]:
        """Leaf regressors and standardizer; returns the standardized features and the leaf
        predictions."""
        self.weighting_name_ = effective_weighting(self.weighting, self.training_strategy)
        self.features_ = feature_list(list(self.feature_sets))
        x = forest.matrix(self.features_)
        self.leaf_models_ = fit_leaf_regressors(forest, x)
        leaf_pred = self._predict_leaves(forest, x)[0]
        self.node_scaler_ = Standardizer.fit(x) if self.standardize_features else None
        if self.node_scaler_ is not None:
            x = self.node_scaler_.transform(x)
        return x, leaf_pred

    # -------------------------------------------------------- many folds at once
    def fit_folds(self, forest: Forest, train_masks: Sequence[np.ndarray]) -> list[IreneModel]:
        """One fitted copy per mask of ``forest``'s trees, each equal (to rounding, see
        below) to ``clone(self).fit(forest.subset(mask))``: the folds of a cross-validation
        trained together.

        Every fold runs the same schedule: ``epochs`` passes, one Adam step per training tree
        in forest order. So the folds advance together, tree by tree: each tree's
        expansion is built (or sliced) once for all the folds that train on it, and their
        weighting models take one matrix product each way instead of one matrix-vector
        product per fold. A fold standardizes on its own training nodes, z_f = (z - s_f)/c_f
        of one reference standardization z (of all of ``forest``'s nodes); the degree-d
        expansion of z_f is a sparse linear map T_f of z's
        (:func:`~irene.predictors.leaves.polynomial_transform`), so a fold's logits are
        E(z)·(T_fᵀθ_f) and its gradient T_f·(E(z)ᵀ·dz). The products run on each tree's
        distinct rows of features only (identical layers repeat the same nodes; a tenth of
        the rows of the 96-model benchmark), each row's gradient summed over its copies
        first (:class:`~irene.predictors.treegrad.DistinctRows`). The fold's θ, Adam state, leaf
        regressors and standardizer stay its own. The products are summed in another order
        than a fold's own fit, so the results equal it to rounding, not bit for bit (the
        tests hold the predictions to 1e-6 relative).

        Trained together: ``end2end`` with ``close_to_one`` weights (the default) and
        ``unstructured``. Fold by fold: ``stepwise`` training, which amplifies rounding (a
        change in the 14th digit of a fold's loss grows to the 4th over the eight epochs on
        device 1, and the cross-validation table moves in its 2nd decimal); ``end2end`` with
        ``free`` weights, whose predictions blow up (model errors of 10⁵ % on device 1), so
        that a float32 rounding of θ moves the table's cells by 0.2; the torch engine,
        unstandardized features and degree ≤ 1 (not implemented together).
        """
        from threadpoolctl import threadpool_info, threadpool_limits

        # the job's thread count (its BLAS pools' size): the folds' leaves are fitted, and
        # groups of folds trained, in that many threads side by side (numpy and BLAS release
        # the GIL); every product runs on one BLAS thread: they are of one tree's rows, too
        # small for a second thread to pay (on a loaded machine two made them 4x slower)
        workers = max([pool["num_threads"] for pool in threadpool_info()
                       if pool["user_api"] == "blas"] or [1])
        with threadpool_limits(limits=1, user_api="blas"):
            return self._fit_folds(forest, train_masks, workers)

    def _fit_folds(self, forest: Forest, train_masks: Sequence[np.ndarray], workers: int = 1
                   ) -> list[IreneModel]:
        masks = [np.asarray(m, dtype=bool) for m in train_masks]
        copies = [clone(self) for _ in masks]
        for copy in copies:
            copy.validate_params()
        if not copies:
            return []
        if not self.trains_folds_together():
            return [copy.fit(forest.subset(mask)) for copy, mask in zip(copies, masks, strict=True)]
        from scipy import sparse  # imported when used: about a second per process

        x = forest.matrix(feature_list(list(self.feature_sets)))
        reference = Standardizer.fit(x)
        leaves = _LeafRows(forest)
        moments = _TreeMoments(x, forest.offsets)
        leaf_pred = (np.zeros((leaves.count, len(copies)))
                     if self.training_strategy == "end2end" else None)
        forward, backward = [], []
        workers = max(min(workers, len(copies)), 1)

        def fit_leaves(i: int) -> np.ndarray | None:
            return copies[i]._fit_fold_leaves(forest, x, masks[i], leaves, leaf_pred is not None,
                                              moments)

        with ThreadPoolExecutor(workers) as pool:
            fold_leaf_preds = list(pool.map(fit_leaves, range(len(copies))))
        for i, copy in enumerate(copies):
            if leaf_pred is not None:
                leaf_pred[:, i] = fold_leaf_preds[i]
            scaler = copy.node_scaler_
            transform = polynomial_transform((scaler.mean_ - reference.mean_) / reference.scale_,
                                             scaler.scale_ / reference.scale_,
                                             self.polynomial_degree)
            # θ_f's bias (its last entry) passes by the maps: no entries in its column and row
            width = transform.shape[0]
            forward.append(sparse.hstack([sparse.csr_matrix(transform.T),
                                          sparse.csr_matrix((width, 1))], format="csr"))
            backward.append(sparse.vstack([sparse.csr_matrix(transform),
                                           sparse.csr_matrix((1, width))], format="csr"))
        kept, distinct = [], []
        for a, b in zip(forest.offsets[:-1], forest.offsets[1:], strict=True):
            rows, tree_distinct = DistinctRows.of(x[a:b])
            kept.append(rows + a)
            distinct.append(tree_distinct)
        distinct_offsets = np.r_[0, np.cumsum([len(rows) for rows in kept])]
        held = TreeFeatures.WHOLE_BYTES - (0 if leaf_pred is None else leaf_pred.nbytes)
        features = TreeFeatures(reference.transform(x[np.concatenate(kept)]),
                                self.polynomial_degree, whole_bytes=held)
        initial = LinearWeighting.initial(features.shape[1], copies[0].weighting_name_,
                                          self.tanh_scalar, self.seed)

        def train(group: np.ndarray) -> tuple[np.ndarray, list[list[float]]]:
            """The folds ``group`` (consecutive) trained together."""
            columns = slice(group[0], group[-1] + 1)
            return self._train_folds(
                forest, masks[columns], features,
                None if leaf_pred is None else leaf_pred[:, columns],
                sparse.block_diag(forward[columns], format="csr"),
                sparse.block_diag(backward[columns], format="csr"), initial, distinct,
                distinct_offsets, progress=self.show_progress and group[0] == 0)

        # each fold's arithmetic is its own, but BLAS may round a product of fewer columns
        # otherwise: the same floats at 96 synthetic models and on devices 1 and 2 (their
        # tables), not at 6 synthetic models split in two (model error 8.52 → 8.44 %)
        groups = np.array_split(np.arange(len(copies)),
                                max(min(workers, len(copies) // MIN_FOLDS_PER_THREAD), 1))
        with ThreadPoolExecutor(len(groups)) as pool:
            trained = list(pool.map(train, groups))
        thetas = np.vstack([theta for theta, _ in trained])
        histories = [history for _, group in trained for history in group]
        for copy, theta, history in zip(copies, thetas, histories, strict=True):
            copy.weighting_, copy.history_ = initial.with_theta(theta), history
        return copies

    def _fit_fold_leaves(self, forest: Forest, x: np.ndarray, mask: np.ndarray,
                         leaves: _LeafRows, predict: bool, moments: _TreeMoments
                         ) -> np.ndarray | None:
        """:meth:`_fit_leaves_and_scaler` of the fold of ``forest``'s trees ``mask`` from its
        rows of ``x`` (in order: the same floats as the fold's own forest gives; the
        standardizer from the trees' ``moments``, equal to rounding), without cutting the
        fold's forest; returns the fold's leaf predictions on every leaf of ``forest`` (0 off
        the fold) when ``predict``."""
        nodes = mask[forest.tree_index]
        gold = forest.gold_j
        models = {}
        for op, rows in zip(leaves.ops, leaves.measured, strict=True):
            rows = rows[nodes[rows]]
            if len(rows):
                models[op] = LinearLeafRegressor.fit(x[rows], gold[rows])
        present = [k for k, rows in enumerate(leaves.rows) if nodes[rows].any()]
        if not models or any(leaves.ops[k] not in models for k in present):
            # no measured leaf, or a primitive type with no measured leaf (unseen_op): the
            # fold's own path, with its errors and fallbacks
            fold = forest.subset(mask)
            fold_leaf_pred = self._fit_leaves_and_scaler(fold)[1]
            if not predict:
                return None
            out = np.zeros(leaves.count)
            rows = np.flatnonzero(nodes)[fold.is_leaf]
            out[leaves.position[rows]] = fold_leaf_pred[fold.is_leaf]
            return out
        self.weighting_name_ = effective_weighting(self.weighting, self.training_strategy)
        self.features_ = feature_list(list(self.feature_sets))
        self.leaf_models_ = models
        self.node_scaler_ = moments.standardizer(mask)
        if not predict:
            return None
        out = np.zeros(leaves.count)
        for k in present:
            rows = leaves.rows[k][nodes[leaves.rows[k]]]
            out[leaves.position[rows]] = models[leaves.ops[k]].predict(x[rows])
        return out

    def trains_folds_together(self) -> bool:
        """Whether :meth:`fit_folds` trains the folds together with these settings (else it
        fits them one by one)."""
        weighting = effective_weighting(self.weighting, self.training_strategy)
        return (self.engine == "numpy" and self.standardize_features
                and self.polynomial_degree > 1 and self._trainable()
                and (self.training_strategy, weighting) in BATCHED)

    def _train_folds(self, forest: Forest, masks: list[np.ndarray], x: TreeFeatures,
                     leaf_pred: np.ndarray | None, forward, backward, initial: LinearWeighting,
                     distinct: list[DistinctRows], distinct_offsets: np.ndarray,
                     progress: bool = True) -> tuple[np.ndarray, list[list[float]]]:
        """:meth:`_train_weighting` of every fold at once; returns each fold's θ (rows) and
        epoch losses. ``x`` holds each tree's distinct rows (``distinct``), tree t's at
        ``distinct_offsets[t]:distinct_offsets[t + 1]``."""
        gold = np.nan_to_num(forest.gold_j, nan=0.0)
        trees = tree_indices(forest)
        batched = [batched_tree(tree) for tree in trees]
        member = np.stack(masks)  # fold × tree
        num_folds, width = len(masks), x.shape[1]
        thetas = np.tile(initial.theta, (num_folds, 1))
        optimizer = BatchedAdam(thetas, lr=self.lr)
        leaf_starts = np.r_[0, np.cumsum(forest.is_leaf)]
        counts = np.maximum(member.sum(axis=1), 1)
        histories: list[list[float]] = [[] for _ in masks]
        epochs = tqdm(range(self.epochs), desc="train weighting (folds)", unit="epoch",
                      disable=not progress, leave=False)
        for _ in epochs:
            totals = np.zeros(num_folds)
            for t, bt in enumerate(batched):
                tree = bt.tree
                active = np.flatnonzero(member[:, t])
                if len(tree.inner) == 0 or len(active) == 0:
                    continue
                v = (forward @ thetas.ravel()).reshape(num_folds, width).T
                rows = slice(tree.start, tree.stop)
                values = None
                if leaf_pred is not None:
                    values = np.zeros((tree.stop - tree.start, num_folds))
                    values[tree.is_leaf] = leaf_pred[leaf_starts[tree.start]:leaf_starts[tree.stop]]
                loss, grad_v, grad_bias = batched_tree_loss_and_grad(
                    x[distinct_offsets[t]:distinct_offsets[t + 1]], v, thetas[:, -1], values,
                    gold[rows], bt, strategy=self.training_strategy,
                    weighting=effective_weighting(self.weighting, self.training_strategy),
                    tanh_scalar=self.tanh_scalar, normalize=self.normalize_loss_scale,
                    distinct=distinct[t])
                grad = (backward @ grad_v.T.ravel()).reshape(num_folds, width + 1)
                grad[:, -1] = grad_bias
                optimizer.step(member[:, t], grad)
                totals[active] += loss[active]
            for history, total, count in zip(histories, totals, counts, strict=True):
                history.append(float(total / count))
        return thetas, histories

    def _share_unseeded(self, other: IreneModel) -> None:
        self.weighting_name_ = other.weighting_name_
        self.features_ = other.features_
        self.leaf_models_ = other.leaf_models_
        self.node_scaler_ = other.node_scaler_

    def _fit_seeded(self, forest: Forest, xt: TreeFeatures, leaf_pred: np.ndarray) -> None:
        """The weighting model: initial parameters drawn from ``seed``, then trained."""
        initial = LinearWeighting.initial(xt.shape[1], self.weighting_name_, self.tanh_scalar,
                                          self.seed)
        self.weighting_, self.history_ = self._train_weighting(forest, xt, leaf_pred, initial)

    def _transform(self, x: np.ndarray) -> np.ndarray:
        if self.node_scaler_ is not None:
            x = self.node_scaler_.transform(x)
        if self.polynomial_degree > 1:
            x = polynomial_expand(x, self.polynomial_degree)
        return x

    def _trainable(self) -> bool:
        weighting = effective_weighting(self.weighting, self.training_strategy)
        return self.training_strategy != "none" and weighting != "exact_one" and self.epochs > 0

    def _train_weighting(self, forest: Forest, x: TreeFeatures, leaf_pred: np.ndarray,
                         initial: LinearWeighting) -> tuple[LinearWeighting, list[float]]:
        """Adam over the trees, one tree per step, from ``initial``; returns the trained
        weighting and the mean loss of each epoch."""
        if not self._trainable():
            return initial, []
        gold = np.nan_to_num(forest.gold_j, nan=0.0)
        trees = tree_indices(forest)
        epochs = tqdm(range(self.epochs), desc="train weighting", unit="epoch",
                      disable=not self.show_progress, leave=False)
        if self.engine == "torch":
            from irene.predictors.irene_torch import AutogradStepper

            stepper = AutogradStepper(self, initial, x[:], leaf_pred, gold)
        else:
            stepper = NumpyStepper(self, initial, x, leaf_pred, gold)
        history = []
        for _ in epochs:
            total = 0.0
            for tree in trees:
                if len(tree.inner) > 0:
                    total += stepper.step(tree, slice(tree.start, tree.stop))
            history.append(total / max(len(trees), 1))
            epochs.set_postfix(loss=f"{history[-1]:.4g}")
        return stepper.result(), history

    # --------------------------------------------------------------- prediction
    def _predict_leaves(self, forest: Forest, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Leaf predictions for every node (0 on inner nodes) and the mask of leaves that
        used the fallback regressor of an unseen primitive type."""
        return predict_leaves(forest, x, self.leaf_models_,
                              lambda op: self.leaf_models_.get(self.unseen_op),
                              "set unseen_op to one of those to use its regressor instead")

    def predict(self, forest: Forest, *, return_fallback: bool = False):
        """Predicted energy (J) of every node of ``forest``, in forest order."""
        self.check_fitted()
        x = forest.matrix(self.features_)
        leaf_pred, fallback = self._predict_leaves(forest, x)
        if self.training_strategy == "none":
            weights = np.ones(forest.num_nodes)
        else:
            weights = self.weighting_(self._transform(x))
        pred = compose(forest, np.where(forest.is_leaf, leaf_pred, 0.0), weights)
        if self.training_strategy == "unstructured":
            pred = np.where(forest.is_leaf, pred, weights)
        return (pred, fallback) if return_fallback else pred

    # ------------------------------------------------------------- persistence
    def _get_state(self) -> dict:
        return {
            "weighting": self.weighting_name_, "features": self.features_,
            "leaf_regressors": {op: m.to_dict() for op, m in self.leaf_models_.items()},
            "standardizer": None if self.node_scaler_ is None else self.node_scaler_.to_dict(),
            "weighting_weight": self.weighting_.weight.tolist(),
            "weighting_bias": float(self.weighting_.bias),
            "history": self.history_,
        }

    def _set_state(self, state: dict) -> None:
        self.weighting_name_ = state["weighting"]
        self.features_ = list(state["features"])
        self.leaf_models_ = {op: LinearLeafRegressor.from_dict(s)
                             for op, s in state["leaf_regressors"].items()}
        self.node_scaler_ = (None if state["standardizer"] is None
                             else Standardizer.from_dict(state["standardizer"]))
        self.history_ = list(state["history"])
        # float32 values written as float64: the round trip is exact
        self.weighting_ = LinearWeighting(np.asarray(state["weighting_weight"], dtype=np.float64),
                                          float(state["weighting_bias"]), self.weighting_name_,
                                          self.tanh_scalar)
