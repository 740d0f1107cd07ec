"""A new device from k of its measurements: recalibrate a predictor trained on another device.

Static features (``model_specs``) are the same on every device, so a predictor trained on a
source device predicts every node of a target device, off by the devices' ratio. That ratio
is not one number: it differs by primitive type (a GPU with faster matrix units speeds up
``Linear`` more than ``LayerNorm``) and by node level. The methods here keep the source
predictor and learn a cheap multiplicative correction from ``k`` measured configurations
(trees) of the target device:

* :class:`LevelScale` — one scale per node level (ml, module, model): the prototype of issue 19.
* :class:`TypeScale` — the default: one scale per primitive type on the leaves and one per
  module class on inner nodes, each shrunk toward its level's scale when it has few distinct
  measurements, all log-linear in the size of the node's predicted energy (one slope for
  leaves, one for inner nodes). An inner node's prediction is the geometric mean of two
  paths, each with its own class scales: the source's prediction (``inner="class"``) and the
  source's prediction times the correction of its own leaves (``Σ corrected leaves ÷ Σ
  source leaves`` under it, ``inner="leaves"``); either path alone is an option.
* :class:`CalibratedPool` — the source device's measurements mapped onto the target device by
  a :class:`TypeScale` correction, pooled with the shots, and one predictor fitted on both.
* :class:`TargetOnly` — the baseline: the predictor fitted on the k shots alone.

:func:`learning_curve` runs the protocol: leave one target model out, draw k configurations
of the target's *other* models, fit, predict the left-out model's target trees, repeat over
draws; report mean and sd per k of the ml / module / model % errors. The source predictor is
fitted once per source device; its predictions of every target node are computed once and
sliced for each fold and draw; each fold's left-out trees are cut once for every k and draw;
the folds of the ceiling (whole models of the target) share the data set's fold-free work
(:func:`irene.data.forest.shared_cache`: IrEne+'s distinct leaf rows and selection sums).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from irene.data.forest import Forest, build_forest, compose
from irene.data.tree import ERROR_COLUMNS, NODE_TYPES, Tree
from irene.errors import InputError, SettingsError, TooFewTreesError
from irene.evaluate.metrics import errors_by_node_type
from irene.predictors.base import Predictor
from irene.predictors.irene_plus import IrenePlusPredictor

log = logging.getLogger(__name__)

LEVEL_NAMES = np.asarray([str(t) for t in NODE_TYPES], dtype=object)  # code -> "model", ...
ALL_SHOTS = "all"  # shots=ALL_SHOTS: every configuration of the other models


def static_predictor() -> Predictor:
    """The static IrEne+ (``features=model_specs``), unfitted."""
    return IrenePlusPredictor(feature_sets=["model_specs"])


# --------------------------------------------------------------------------- utilities
def concat_forests(first: Forest, second: Forest) -> Forest:
    """One forest with the trees of ``first`` then those of ``second``."""
    n, t = first.num_nodes, first.num_trees
    return Forest(
        features=np.concatenate([first.features, second.features]),
        gold_j=np.concatenate([first.gold_j, second.gold_j]),
        parent=np.concatenate([first.parent, np.where(second.parent >= 0, second.parent + n, -1)]),
        depth=np.concatenate([first.depth, second.depth]),
        node_type=np.concatenate([first.node_type, second.node_type]),
        op_type=np.concatenate([first.op_type, second.op_type]),
        instance_type=np.concatenate([first.instance_type, second.instance_type]),
        tree_index=np.concatenate([first.tree_index, second.tree_index + t]),
        offsets=np.concatenate([first.offsets, second.offsets[1:] + n]),
        ids=list(first.ids) + list(second.ids),
        model_names=list(first.model_names) + list(second.model_names),
        batch_sizes=np.concatenate([first.batch_sizes, second.batch_sizes]),
        seq_lens=np.concatenate([first.seq_lens, second.seq_lens]),
    )


def node_mask(forest: Forest, tree_mask: np.ndarray) -> np.ndarray:
    """Nodes of the trees where ``tree_mask`` is true (the rows ``Forest.subset`` keeps)."""
    return np.isin(forest.tree_index, np.flatnonzero(tree_mask))


def _measured(forest: Forest) -> np.ndarray:
    gold = np.nan_to_num(forest.gold_j, nan=0.0)
    return gold > 0


def _leaf_sums(forest: Forest, leaf_values: np.ndarray) -> np.ndarray:
    """Σ of ``leaf_values`` over the leaves under every node (a leaf's own value on leaves)."""
    return compose(forest, np.where(forest.is_leaf, leaf_values, 0.0))


def _distinct_weights(forest: Forest, rows: np.ndarray) -> np.ndarray:
    """Weight 1/c for each of ``rows``, c the copies of its (tree, energy) in ``rows``.

    Identical layers were measured once and the value copied to each; a copy adds no
    information about the device, so each distinct measurement of a tree counts once.
    """
    key = np.column_stack([forest.tree_index[rows], forest.gold_j[rows]])
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse.ravel()]


@dataclass
class GroupScales:
    """Log-scale of every group, shrunk toward its level's, optionally log-linear in a size.

    ``r = log(gold / predicted)`` per node, ``w`` the distinct-measurement weights, ``z`` an
    optional per-node size (e.g. the log of the prediction). One slope ``b`` for all the
    levels given, from the regression of ``r`` on ``z`` within each group (``within="group"``:
    only sizes of one type against that type's mean count) or within each level
    (``within="level"``: small and large types count too), ridge-shrunk toward 0
    (``slope_ridge``, in units of Σ w·(z − z̄)²); per level ``a = mean_w(r − b·(z − z̄))``;
    per group ``a_g = (Σ w·(r − b·(z − z̄)) + λ·a) / (Σ w + λ)``, the group's mean pulled
    toward its level's by ``λ = prior_nodes``.

    Attributes:
        level_: level name -> its intercept a.
        group_: (level, group) -> shrunk intercept a_g.
        slope_, center_: b and z̄ (0 and 0 without a size).
    """

    level_: dict[str, float]
    group_: dict[tuple[str, str], float]
    slope_: float = 0.0
    center_: float = 0.0

    @classmethod
    def fit(cls, levels: np.ndarray, groups: np.ndarray, log_ratio: np.ndarray, weight: np.ndarray,
            prior_nodes: float, size: np.ndarray | None = None, slope_ridge: float = 0.0,
            within: str = "group") -> GroupScales:
        slope = center = 0.0
        if size is not None and len(size):
            center = float(np.average(size, weights=weight))
            z_within, r_within = size.astype(np.float64).copy(), log_ratio.astype(np.float64).copy()
            keys = zip(levels, groups if within == "group" else levels, strict=True)
            for key in set(keys):
                rows = (levels == key[0]) & ((groups if within == "group" else levels) == key[1])
                z_within[rows] -= np.average(size[rows], weights=weight[rows])
                r_within[rows] -= np.average(log_ratio[rows], weights=weight[rows])
            spread = float(np.dot(weight, z_within ** 2))
            if spread > 0:
                slope = float(np.dot(weight, z_within * r_within) / (spread + slope_ridge))
        adjusted = log_ratio - (slope * (size - center) if size is not None else 0.0)
        level_scale, group_scale = {}, {}
        for level in sorted(set(levels)):
            in_level = levels == level
            a = float(np.average(adjusted[in_level], weights=weight[in_level]))
            level_scale[level] = a
            for group in sorted(set(groups[in_level])):
                rows = in_level & (groups == group)
                group_scale[(level, group)] = float(
                    (np.dot(weight[rows], adjusted[rows]) + prior_nodes * a)
                    / (float(weight[rows].sum()) + prior_nodes))
        return cls(level_=level_scale, group_=group_scale, slope_=slope, center_=center)

    def log_scale(self, levels: np.ndarray, groups: np.ndarray,
                  size: np.ndarray | None = None) -> np.ndarray:
        """Log scale of every node: its group's intercept, else its level's, else 0 (no
        correction), plus the slope times its size."""
        out = np.asarray([self.group_.get((lv, g), self.level_.get(lv, 0.0))
                          for lv, g in zip(levels, groups, strict=True)], dtype=np.float64)
        if size is not None and self.slope_:
            out = out + self.slope_ * (size - self.center_)
        return out


def retrace(trees: Sequence[Tree], convention: str = "irene") -> list[Tree]:
    """The trees traced again in another static-feature convention, measured energies copied
    by scope (so a target measured in the ``physical`` convention is comparable with the
    published devices' ``irene`` trees). Needs torch and transformers.

    Raises:
        InputError: a node of the retraced tree has no measured node of the same scope.
    """
    from irene.data.tree import iter_nodes
    from irene.predictors.static import trace_static

    out = []
    for tree in trees:
        traced = trace_static(tree["model_name"], [(int(tree["batch_size"]), int(tree["seq_len"]))],
                              convention=convention)[0]
        gold = {n["scope"]: n.get("ground_truth_energy")
                for n in iter_nodes(tree["frontend_tree"])}
        for node in iter_nodes(traced["frontend_tree"]):
            if gold.get(node["scope"]) is None:
                raise InputError(f"{tree['model_name']} {tree['batch_size']}x{tree['seq_len']}: "
                                 f"node {node['scope']!r} of the {convention} trace has no "
                                 "measured node of that scope")
            node["ground_truth_energy"] = gold[node["scope"]]
        out.append(traced)
    return out


# ----------------------------------------------------------------------------- sources
@dataclass
class Source:
    """A fitted predictor of a source device and the forest it was fitted on."""

    predictor: Predictor
    forest: Forest

    @classmethod
    def fit(cls, trees_or_forest: Sequence[Tree] | Forest,
            make_predictor: Callable[[], Predictor] = static_predictor) -> Source:
        forest = (trees_or_forest if isinstance(trees_or_forest, Forest)
                  else build_forest(list(trees_or_forest)))
        return cls(predictor=make_predictor().fit(forest), forest=forest)

    def predict(self, forest: Forest) -> np.ndarray:
        return np.asarray(self.predictor.predict(forest), dtype=np.float64)


# ------------------------------------------------------------------------- corrections
class Correction:
    """A target-device predictor built from a :class:`Source` and a forest of shots.

    ``fit(source, shots)`` then ``predict(forest)``; ``source_pred`` (the source predictor's
    energies of the same nodes) may be passed to both to skip recomputing them.
    """

    uses_source = True  # False: ignores the source (fitted once for several sources)

    def fit(self, source: Source | None, shots: Forest, *,
            source_pred: np.ndarray | None = None) -> Correction:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, forest: Forest, *, source_pred: np.ndarray | None = None
                ) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _source_pred(self, forest: Forest, source_pred: np.ndarray | None) -> np.ndarray:
        if source_pred is None:
            return self.source_.predict(forest)
        if len(source_pred) != forest.num_nodes:
            raise InputError(f"source_pred has {len(source_pred)} values for "
                             f"{forest.num_nodes} nodes")
        return np.asarray(source_pred, dtype=np.float64)

    def check_fitted(self) -> None:
        if not hasattr(self, "source_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit first")


#: TypeScale's ``inner`` settings -> the paths an inner node's prediction takes (several: their
#: geometric mean).
INNER_PATHS = {"class": ("class",), "leaves": ("leaves",), "both": ("class", "leaves")}


def _log_ratio_rows(shots: Forest, pred: np.ndarray, rows: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a positive gold and prediction, log(gold / prediction) there)."""
    rows = rows & _measured(shots) & (pred > 0)
    return rows, np.log(shots.gold_j[rows] / pred[rows])


class SourceAsIs(Correction):
    """The source predictor unchanged (k = 0)."""

    def fit(self, source, shots=None, *, source_pred=None) -> SourceAsIs:
        self.source_ = source
        return self

    def predict(self, forest, *, source_pred=None) -> np.ndarray:
        self.check_fitted()
        return self._source_pred(forest, source_pred)


class LevelScale(Correction):
    """One multiplicative scale per node level (ml, module, model): issue 19's prototype."""

    def fit(self, source, shots, *, source_pred=None) -> LevelScale:
        self.source_ = source
        pred = self._source_pred(shots, source_pred)
        rows, log_ratio = _log_ratio_rows(shots, pred, np.ones(shots.num_nodes, bool))
        levels = LEVEL_NAMES[shots.node_type[rows]]
        self.scales_ = GroupScales.fit(levels, levels, log_ratio,
                                       _distinct_weights(shots, rows), prior_nodes=0.0)
        return self

    def predict(self, forest, *, source_pred=None) -> np.ndarray:
        self.check_fitted()
        levels = LEVEL_NAMES[forest.node_type]
        return self._source_pred(forest, source_pred) * np.exp(
            self.scales_.log_scale(levels, levels))


class TypeScale(Correction):
    """Per-primitive-type scales on leaves; inner nodes follow their leaves, then a per-class
    scale. Types and classes with few shots are shrunk toward their level's scale.

    Args:
        prior_nodes: strength of the pull toward the level scale, in distinct measurements
            (a type seen in that many distinct nodes sits halfway between its own mean and
            the level's).
        inner: ``"both"`` (the default: each of the two paths below fitted on its own, an
            inner node's prediction the geometric mean of the two; their errors differ, so
            their mean errs less than either: at k=4 better than either path from device 1
            to 2, from 2 to 1 and to the H200, docs/transfer.md), ``"class"`` (inner nodes
            scaled per class only) or ``"leaves"`` (inner nodes scaled by their corrected
            leaves, then per class: one wild leaf prediction of the source then spoils
            every module above it).
        size: ``None`` (one scale per group), ``"energy"`` (the log scale also linear, per
            level, in the log of the node's predicted energy: small and large kernels may
            speed up differently) or ``"tokens"`` (linear in log batch × sequence length).
            One slope for the leaves, one for the inner nodes.
        slope_ridge: pull of the slope toward 0 (added to Σ w·(z − z̄)²).
        slope_within: ``"level"`` (the slope also learns from differences between types:
            on the published devices small kernels gain less than large ones, and a type no
            shot has follows its size) or ``"group"`` (only from sizes within each type).
    """

    def __init__(self, prior_nodes: float = 2.0, inner: str = "both", size: str | None = "energy",
                 slope_ridge: float = 2.0, slope_within: str = "level"):
        self.prior_nodes = prior_nodes
        self.inner = inner
        self.size = size
        self.slope_ridge = slope_ridge
        self.slope_within = slope_within

    def _size(self, forest: Forest, pred: np.ndarray) -> np.ndarray | None:
        if self.size is None:
            return None
        if self.size == "energy":
            return np.log(np.maximum(pred, 1e-300))
        return np.log(forest.batch_sizes[forest.tree_index] * forest.seq_lens[forest.tree_index])

    def fit(self, source, shots, *, source_pred=None) -> TypeScale:
        if self.inner not in INNER_PATHS:
            raise SettingsError(f"TypeScale inner={self.inner!r}: choose 'class', 'leaves' or "
                                "'both'")
        if self.slope_within not in ("level", "group"):
            raise SettingsError(f"TypeScale slope_within={self.slope_within!r}: choose 'level' "
                                "or 'group'")
        if self.size not in (None, "energy", "tokens"):
            raise SettingsError(f"TypeScale size={self.size!r}: choose None, 'energy' or 'tokens'")
        if not (self.prior_nodes >= 0 and math.isfinite(self.prior_nodes)):
            raise SettingsError(f"TypeScale prior_nodes={self.prior_nodes!r}: must be ≥ 0")
        self.source_ = source
        pred = self._source_pred(shots, source_pred)
        leaves = shots.is_leaf
        rows, log_ratio = _log_ratio_rows(shots, pred, leaves)
        size = self._size(shots, pred)
        self.leaf_scales_ = GroupScales.fit(
            LEVEL_NAMES[shots.node_type[rows]], shots.op_type[rows], log_ratio,
            _distinct_weights(shots, rows), self.prior_nodes,
            None if size is None else size[rows], self.slope_ridge, self.slope_within)
        leaf_pred = self._leaf_corrected(shots, pred)
        inner_scales = []
        for path in INNER_PATHS[self.inner]:
            inner_pred = self._path(shots, pred, leaf_pred, path)
            rows, log_ratio = _log_ratio_rows(shots, inner_pred, ~leaves)
            size = self._size(shots, inner_pred)
            inner_scales.append(GroupScales.fit(
                LEVEL_NAMES[shots.node_type[rows]], shots.instance_type[rows].astype(str),
                log_ratio, _distinct_weights(shots, rows), self.prior_nodes,
                None if size is None else size[rows], self.slope_ridge, self.slope_within))
        self.inner_scales_ = inner_scales[0]  # inner="both": the class path's, then the leaves'
        if len(inner_scales) > 1:
            self.leaves_path_scales_ = inner_scales[1]
        return self

    def _leaf_corrected(self, forest: Forest, pred: np.ndarray) -> np.ndarray:
        """Leaves times their type's scale, inner nodes unchanged."""
        levels = LEVEL_NAMES[forest.node_type]
        scale = self.leaf_scales_.log_scale(levels, forest.op_type, self._size(forest, pred))
        return pred * np.where(forest.is_leaf, np.exp(scale), 1.0)

    @staticmethod
    def _path(forest: Forest, pred: np.ndarray, leaf_pred: np.ndarray, path: str) -> np.ndarray:
        """Inner nodes before their class scale: the source's prediction (``"class"``) or
        times Σ corrected ÷ Σ source leaves under them (``"leaves"``); leaves corrected."""
        if path == "class":
            return leaf_pred
        source_sum = _leaf_sums(forest, pred)
        ratio = np.divide(_leaf_sums(forest, leaf_pred), source_sum,
                          out=np.ones(forest.num_nodes), where=source_sum > 0)
        return np.where(forest.is_leaf, leaf_pred, pred * ratio)

    def predict(self, forest, *, source_pred=None) -> np.ndarray:
        self.check_fitted()
        pred = self._source_pred(forest, source_pred)
        leaf_pred = self._leaf_corrected(forest, pred)
        levels, classes = LEVEL_NAMES[forest.node_type], forest.instance_type.astype(str)
        scales = [self.inner_scales_] + ([self.leaves_path_scales_] if self.inner == "both" else [])
        paths = []
        for path, fitted in zip(INNER_PATHS[self.inner], scales, strict=True):
            out = self._path(forest, pred, leaf_pred, path)
            paths.append(out * np.exp(fitted.log_scale(levels, classes, self._size(forest, out))))
        return np.where(forest.is_leaf, leaf_pred, geometric_mean(paths))


class TargetOnly(Correction):
    """The predictor fitted on the shots alone (the source is ignored)."""

    uses_source = False

    def __init__(self, make_predictor: Callable[[], Predictor] = static_predictor):
        self.make_predictor = make_predictor

    def fit(self, source, shots, *, source_pred=None) -> TargetOnly:
        self.source_ = None
        self.predictor_ = self.make_predictor().fit(shots)
        return self

    def predict(self, forest, *, source_pred=None) -> np.ndarray:
        self.check_fitted()
        return np.asarray(self.predictor_.predict(forest), dtype=np.float64)


class CalibratedPool(Correction):
    """The source device's measurements mapped onto the target by a correction fitted on the
    shots (measured source energy × the correction's target ÷ source prediction ratio), pooled
    with the shots; one predictor fitted on both.

    Args:
        correction: makes the correction that maps the source's energies (default
            :class:`TypeScale`).
        make_predictor: makes the pooled predictor (default: static IrEne+).
    """

    def __init__(self, correction: Callable[[], Correction] = TypeScale,
                 make_predictor: Callable[[], Predictor] = static_predictor):
        self.correction = correction
        self.make_predictor = make_predictor

    def fit(self, source, shots, *, source_pred=None) -> CalibratedPool:
        self.source_ = source
        if source is None:
            raise SettingsError("CalibratedPool needs a source device")
        mapping = self.correction().fit(source, shots, source_pred=source_pred)
        source_on_source = source.predict(source.forest)
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = mapping.predict(source.forest, source_pred=source_on_source) / source_on_source
        factor = np.where(np.isfinite(factor) & (factor > 0), factor, np.nan)
        self.source_factor_ = factor  # per source node: target ÷ source energy
        mapped = replace(source.forest, gold_j=source.forest.gold_j * factor)
        self.predictor_ = self.make_predictor().fit(concat_forests(mapped, shots))
        return self

    def predict(self, forest, *, source_pred=None) -> np.ndarray:
        self.check_fitted()
        return np.asarray(self.predictor_.predict(forest), dtype=np.float64)


# every method by the name a configuration gives it (a stage's ``transfer.methods`` list)
METHODS: dict[str, Callable[[], Correction]] = {
    "type_scale": TypeScale,
    "type_scale_class": lambda: TypeScale(inner="class"),
    "type_scale_leaves": lambda: TypeScale(inner="leaves"),
    "level_scale": LevelScale,
    "target_only": TargetOnly,
    "calibrated_pool": CalibratedPool,
    "source_as_is": SourceAsIs,
}


def default_methods() -> dict[str, Callable[[], Correction]]:
    """The methods :func:`learning_curve` compares by default, the default one first."""
    return methods_by_name(["type_scale", "level_scale", "target_only"])


def methods_by_name(names: Sequence[str]) -> dict[str, Callable[[], Correction]]:
    """The factories of :data:`METHODS` named ``names`` (an unknown name: one-line error)."""
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise SettingsError(f"transfer methods {list(names)!r}: unknown {unknown}; choose a "
                            f"non-empty list from {sorted(METHODS)}")
    return {name: METHODS[name] for name in names}


# ------------------------------------------------------------------------ the protocol
def draw_shots(forest: Forest, left_out: str, k: int, rng: np.random.Generator) -> np.ndarray:
    """Tree indices of ``k`` configurations drawn without replacement from the trees of every
    model but ``left_out`` (sorted)."""
    pool = np.flatnonzero(np.asarray(forest.model_names, dtype=object) != left_out)
    if k > len(pool):
        raise SettingsError(f"shots={k}: only {len(pool)} configurations of models other "
                            f"than {left_out!r}")
    return np.sort(rng.choice(pool, size=k, replace=False))


def _worst_ratio(forest: Forest, pred: np.ndarray) -> float:
    """The largest max(pred/gold, gold/pred) over measured nodes (inf if a prediction ≤ 0)."""
    rows = _measured(forest)
    ratio = pred[rows] / forest.gold_j[rows]
    if (ratio <= 0).any():
        return math.inf
    return float(np.max(np.maximum(ratio, 1.0 / ratio))) if len(ratio) else math.nan


def _shot_counts(shots: Sequence[int | str], pool_sizes: list[int]) -> list[int | str]:
    out: list[int | str] = []
    for k in shots:
        if k == ALL_SHOTS:
            out.append(ALL_SHOTS)
            continue
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise SettingsError(f"shots: {k!r} is not a count ≥ 0 or {ALL_SHOTS!r}")
        if k > min(pool_sizes):
            log.warning("shots=%d skipped: a fold has only %d configurations of other models",
                        k, min(pool_sizes))
            continue
        out.append(int(k))
    return out


def learning_curve(source_trees: Sequence[Tree] | Sequence[Sequence[Tree]] | Sequence[Forest],
                   target_trees: Sequence[Tree] | Forest,
                   shots: Sequence[int | str] = (0, 1, 2, 4, 8, 16), draws: int = 5, seed: int = 0,
                   methods: dict[str, Callable[[], Correction]] | None = None, *,
                   make_predictor: Callable[[], Predictor] = static_predictor,
                   ceiling: bool = True, models: Sequence[str] | None = None,
                   sources: Sequence[Source] | None = None) -> list[dict]:
    """Errors on a target device's left-out model against the number of its shots.

    For each target model m (a fold) and each k in ``shots``: ``draws`` times, draw k
    configurations (trees) of the target's models other than m, fit every method on the
    source(s) and those shots, and predict m's target trees. Every method sees the same
    draws. k = 0 is one draw of the source predictor unchanged (methods that need shots are
    not run); ``"all"`` is one draw of every configuration of the other models.

    Args:
        source_trees: the source device's trees, or a list of several devices' trees (each
            a source; a correction is fitted per source and the predictions combined by
            their geometric mean); forests are accepted in place of tree lists.
        target_trees: the target device's trees (or forest).
        shots: the k to try (counts, or ``"all"``); a k larger than some fold's pool is
            skipped with a warning.
        draws: draws per k (k = 0 and ``"all"`` have one).
        seed: seed of the draws (the same seed gives the same shots).
        methods: name -> factory of a :class:`Correction` (default :func:`default_methods`).
        make_predictor: the source (and target-only) predictor.
        ceiling: add the target's own leave-one-model-out (``target_lomo``: the predictor
            fitted on every configuration of the other target models; shots ``"all"``).
        models: the left-out models (default: every model of the target).
        sources: already fitted sources (then ``source_trees`` is ignored).

    Returns:
        One row per (method, k): ``method``, ``shots``, ``draws``, ``ml``, ``module``,
        ``model`` (mean % error: per draw the mean over folds, then the mean over draws),
        ``ml_sd``, ``module_sd``, ``model_sd`` (sd over draws, 0 for one draw),
        ``worst_ratio`` (the largest max(pred/gold, gold/pred) of any node in any draw).
        Where a method's predictor refuses to fit that few shots (``TargetOnly`` on one tree:
        IrEne+ needs two, :class:`~irene.errors.TooFewTreesError`), its row's values are NaN.
    """
    if draws < 1:
        raise SettingsError(f"draws={draws}: must be ≥ 1")
    methods = default_methods() if methods is None else dict(methods)
    target = target_trees if isinstance(target_trees, Forest) else build_forest(list(target_trees))
    if sources is None:
        sources = [Source.fit(trees, make_predictor) for trees in _source_lists(source_trees)]
    source_preds = [src.predict(target) for src in sources]
    names = np.asarray(target.model_names, dtype=object)
    folds = list(dict.fromkeys(target.model_names)) if models is None else list(models)
    unknown = [m for m in folds if m not in set(target.model_names)]
    if unknown:
        raise SettingsError(f"models {unknown} are not in the target trees")
    counts = _shot_counts(shots, [int((names != m).sum()) for m in folds])
    source_based = {name for name, factory in methods.items() if factory().uses_source}
    rng = np.random.default_rng(seed)
    # errors[(method, k)] -> draws × folds × 3, and the worst ratio seen
    errors: dict[tuple[str, int | str], np.ndarray] = {}
    worst: dict[tuple[str, int | str], float] = {}
    refused: set[tuple[str, int | str]] = set()

    def record(key, draw, fold, test: Forest, pred: np.ndarray | None) -> None:
        if pred is None:  # the method refused this many shots (TooFewTreesError)
            refused.add(key)
            return
        errs = errors_by_node_type(test, pred)
        errors[key][draw, fold] = [errs.get(level, np.nan) for level in ERROR_COLUMNS]
        worst[key] = max(worst.get(key, 0.0), _worst_ratio(test, pred))

    # the left-out model's trees and their source predictions: once per fold, shared by
    # every k, draw and method (and the ceiling)
    tests = []
    for left_out in folds:
        test_rows = node_mask(target, names == left_out)
        tests.append((target.subset(names == left_out), [p[test_rows] for p in source_preds]))
    for k in counts:
        n_draws = 1 if k in (0, ALL_SHOTS) else draws
        for name in methods:
            errors[(name, k)] = np.full((n_draws, len(folds), 3), np.nan)
        for draw in range(n_draws):
            for f, left_out in enumerate(folds):
                test, test_preds = tests[f]
                if k == 0:  # the source as is, for every method that uses one
                    for name in source_based:
                        record((name, k), draw, f, test, geometric_mean(test_preds))
                    continue
                chosen = (np.flatnonzero(names != left_out) if k == ALL_SHOTS
                          else draw_shots(target, left_out, k, rng))
                shot_trees = np.zeros(target.num_trees, bool)
                shot_trees[chosen] = True
                shots_forest = target.subset(shot_trees)
                shot_rows = node_mask(target, shot_trees)
                for name, factory in methods.items():
                    pred = _fit_predict(factory, sources, source_preds, shots_forest, shot_rows,
                                        test, test_preds)
                    record((name, k), draw, f, test, pred)
    rows = [_summary(name, k, errors[(name, k)], worst.get((name, k), math.nan),
                     (name, k) in refused)
            for k in counts for name in methods
            if k != 0 or name in source_based]
    if ceiling:
        key = ("target_lomo", ALL_SHOTS)
        errors[key] = np.full((1, len(folds), 3), np.nan)
        for f, left_out in enumerate(folds):  # whole models: the folds share the data set's work
            predictor = make_predictor().fit(target.subset(names != left_out))
            test = tests[f][0]
            record(key, 0, f, test, np.asarray(predictor.predict(test), dtype=np.float64))
        rows.append(_summary("target_lomo", ALL_SHOTS, errors[key], worst[key]))
    return rows


def _source_lists(source_trees) -> list:
    items = list(source_trees)
    if not items:
        raise SettingsError("no source trees")
    if isinstance(items[0], dict):  # one device's trees
        return [items]
    return items  # several devices (lists of trees or forests)


def geometric_mean(preds: list[np.ndarray]) -> np.ndarray:
    """Several sources' predictions of the same nodes combined: their geometric mean."""
    if len(preds) == 1:
        return preds[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.exp(np.mean(np.log(np.stack(preds)), axis=0))


def _fit_predict(factory, sources, source_preds, shots_forest, shot_rows, test, test_preds
                 ) -> np.ndarray | None:
    """Fit a method on the shots (once per source) and predict the test forest (None: the
    method's predictor refuses this few shots)."""
    probe = factory()
    if not probe.uses_source:
        try:
            probe.fit(None, shots_forest)
        except TooFewTreesError:
            return None
        return probe.predict(test)
    preds = []
    for i, (source, pred) in enumerate(zip(sources, source_preds, strict=True)):
        method = probe if i == 0 else factory()
        method.fit(source, shots_forest, source_pred=pred[shot_rows])
        preds.append(method.predict(test, source_pred=test_preds[i]))
    return geometric_mean(preds)


def _summary(name: str, k: int | str, values: np.ndarray, worst: float,
             refused: bool = False) -> dict:
    row: dict = {"method": name, "shots": k, "draws": int(values.shape[0])}
    if refused:  # a method that refuses some draws has no mean: every value NaN
        row.update({level: math.nan for level in ERROR_COLUMNS})
        row.update({f"{level}_sd": math.nan for level in ERROR_COLUMNS})
        row["worst_ratio"] = math.nan
        return row
    per_draw = np.nanmean(values, axis=1)  # draws × 3: the mean over folds
    for j, level in enumerate(ERROR_COLUMNS):
        row[level] = float(np.mean(per_draw[:, j]))
    for j, level in enumerate(ERROR_COLUMNS):
        row[f"{level}_sd"] = float(np.std(per_draw[:, j], ddof=1)) if len(per_draw) > 1 else 0.0
    row["worst_ratio"] = worst
    return row
