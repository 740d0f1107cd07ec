"""Static prediction: trace a model nobody measured and predict it from static features only.

A traced tree (:mod:`irene.measure.trace`) carries ``num_parameters``, ``flops`` (MFLOP) and
``mem_bytes`` (MiB) on every node, and the forest adds ``input_size``, ``batch_size`` and
``seq_len``: exactly the ``model_specs`` feature set. A predictor trained on those features
alone can predict every node of any model that can be traced, with no energy meter.

Primitive types the predictor never saw (``GELUActivation``, ``LlamaRMSNorm``, ``SiLUActivation``
... are absent from the published data) follow an explicit policy, see
:func:`predict_with_policy`; the nodes it touches are returned as a mask and marked
``prediction_fallback: true`` in the trees.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace

import numpy as np

from irene.data.forest import ALL_FEATURES, FEATURE_SETS, Forest, build_forest, fill_predictions
from irene.data.tree import Tree, iter_nodes
from irene.errors import InputError, SettingsError

log = logging.getLogger(__name__)

# Features a traced tree provides without measuring anything.
STATIC_FEATURES = ("num_parameters", "input_size", *FEATURE_SETS["model_specs"])
FALLBACK_FIELD = "prediction_fallback"  # node field marking a fallback prediction
NEGATIVE_FIELD = "prediction_negative"  # node field marking a negative (impossible) energy
# node field naming the features outside the range the predictor was fitted on
OUT_OF_RANGE_FIELD = "prediction_out_of_range"
POLICY_HELP = ("unseen_op: null (the predictor's own policy), 'error', or a known primitive "
               "type whose regressor is used instead")


# ------------------------------------------------------------------------------- tracing
def trace_static(model: str, shapes: Iterable[tuple[int, int]], *,
                 attn_implementation: str = "eager", convention: str = "physical") -> list[Tree]:
    """Trace ``model`` once per (batch size, sequence length) into trees with static features.

    The model is built and traced on the ``meta`` device: no weights and no activations, so
    time and memory do not grow with the model or the shapes (values a branch reads, such as
    the causal masks' packed-sequence check, are computed from the input ids alone; see
    :mod:`irene.measure.trace`). The trees equal those traced on real tensors.

    Args:
        model: a name of ``irene.data.architectures.MODEL_REGISTRY`` or a local ``config.json``.
        shapes: (batch_size, seq_len) pairs.
        attn_implementation: forced attention implementation (``eager`` shows MatMul and
            Softmax leaves, like the published data).
        convention: static-feature convention of the tracer: ``"irene"`` gives the published
            trees' ``mem_bytes`` and leaf structure (use it with a predictor trained on the
            published data: ``trace_convention`` of ``stage=predict``), ``"physical"`` the
            bytes read + written (as ``stage=measure`` records by default).

    Returns:
        One tree per shape, in order; nodes carry ``num_parameters``, ``flops`` (MFLOP) and
        ``mem_bytes`` (MiB) and no measurement.
    """
    from irene.data.architectures import model_from_name
    from irene.measure.trace import check_convention, trace_tree

    check_convention(convention)

    from irene.data.architectures import max_positions

    shapes = [(int(b), int(s)) for b, s in shapes]
    if not shapes:
        raise SettingsError("no (batch_size, seq_len) pair to trace")
    longest = max_positions(model)
    for b, s in shapes:
        if b <= 0 or s <= 0:
            raise SettingsError(f"batch_size and seq_len must be positive, got ({b}, {s})")
        if longest is not None and s > longest:
            raise SettingsError(f"seq_len={s}: {model} takes at most {longest} tokens "
                                "(its position embeddings)")
    module = model_from_name(model, attn_implementation, device="meta")
    return [trace_tree(module, batch_size, seq_len, model, convention)
            for batch_size, seq_len in shapes]


def parse_shapes(shapes: Sequence[Sequence[int]] | None, batch_size: int, seq_len: int
                 ) -> list[tuple[int, int]]:
    """``shapes`` as (batch_size, seq_len) pairs, else the single pair given."""
    if not shapes:
        return [(int(batch_size), int(seq_len))]
    pairs = []
    for pair in shapes:
        if len(pair) != 2:
            raise SettingsError(f"shapes: every entry is [batch_size, seq_len], got {list(pair)}")
        pairs.append((int(pair[0]), int(pair[1])))
    return pairs


# --------------------------------------------------------------------------- predictor
def predictor_features(predictor) -> list[str]:
    """The features a fitted predictor reads (all of ``ALL_FEATURES`` when it does not say)."""
    return list(getattr(predictor, "features_", None) or ALL_FEATURES)


def require_static(predictor) -> None:
    """Raise unless ``predictor`` uses only features a traced tree has.

    Raises:
        ValueError: naming the measured features the predictor needs.
    """
    missing = [f for f in predictor_features(predictor) if f not in STATIC_FEATURES]
    if missing:
        raise SettingsError(
            f"this predictor ({type(predictor).__name__}) was trained on measured features "
            f"{missing}, which a model nobody measured does not have; train one on static "
            f"features only (stage=train features=model_specs), i.e. {list(STATIC_FEATURES)}")


def known_ops(predictor) -> set[str] | None:
    """Primitive types (lower case) the predictor has a leaf regressor for; ``None`` when it
    does not predict leaves per primitive type."""
    models = getattr(predictor, "leaf_models_", None)
    return None if models is None else set(models)


def unseen_ops(predictor, forest: Forest) -> list[str]:
    """Primitive types of ``forest``'s leaves the predictor never saw (lower case)."""
    known = known_ops(predictor)
    if known is None:
        return []
    return sorted(set(forest.op_type[forest.is_leaf]) - known)


def remap_ops(forest: Forest, ops: Iterable[str], target: str) -> tuple[Forest, np.ndarray]:
    """A copy of ``forest`` whose leaves of primitive types ``ops`` read as ``target``, and
    the mask of the remapped nodes."""
    mask = forest.is_leaf & np.isin(forest.op_type, list(ops))
    op_type = np.where(mask, target, forest.op_type).astype(object)
    return replace(forest, op_type=op_type), mask


def predict_with_policy(predictor, forest: Forest, unseen_op: str | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Every node's predicted energy (J) and the mask of leaves predicted by a fallback.

    Args:
        predictor: a fitted predictor (``predict(forest, return_fallback=True)``).
        forest: the trees to predict.
        unseen_op: policy for primitive types the predictor never saw: ``None`` keeps the
            predictor's own (IrEne: its ``unseen_op``; IrEne+: the op-agnostic regressor
            unless ``fallback`` is off), ``"error"`` refuses, and a known primitive type
            (any case) predicts them with that type's regressor.

    Raises:
        ValueError: an unseen primitive type under ``"error"``, or an unknown target type.
    """
    unseen = unseen_ops(predictor, forest)
    mask = np.zeros(forest.num_nodes, dtype=bool)
    known = sorted(known_ops(predictor) or ())
    if (unseen_op is not None and str(unseen_op).lower() != "error" and known
            and str(unseen_op).lower() not in known):  # checked even when no type is unseen
        raise SettingsError(f"unseen_op={unseen_op!r} is not a primitive type the predictor "
                            f"knows ({known}); {POLICY_HELP}")
    if unseen and unseen_op is not None:
        if str(unseen_op).lower() == "error":
            first = forest.ids[int(np.flatnonzero(forest.is_leaf
                                                  & np.isin(forest.op_type, unseen))[0])]
            raise InputError(f"primitive types {unseen} (e.g. node {first!r}) were never seen "
                             f"in training (known: {known}); {POLICY_HELP}")
        forest, mask = remap_ops(forest, unseen, str(unseen_op).lower())
    predicted, own_fallback = predictor.predict(forest, return_fallback=True)
    return np.asarray(predicted, dtype=np.float64), mask | np.asarray(own_fallback, dtype=bool)


def mark_predictions(trees: Sequence[Tree], forest: Forest, predicted_j: np.ndarray,
                     fallback: np.ndarray, out_of_range: Sequence[Sequence[str]] | None = None
                     ) -> list[Tree]:
    """Copies of ``trees`` with ``predicted_energy`` on every node,
    ``prediction_fallback: true`` on the nodes predicted by a fallback,
    ``prediction_negative: true`` on those whose predicted energy is below zero (a predictor
    extrapolating far outside its data; such a number is not an energy) and
    ``prediction_out_of_range: [features]`` on those with features outside the range the
    predictor was fitted on (:mod:`irene.predictors.ranges`)."""
    filled = fill_predictions(trees, forest, predicted_j)
    position = 0
    for tree in filled:
        for node in iter_nodes(tree["frontend_tree"]):
            if fallback[position]:
                node[FALLBACK_FIELD] = True
            if predicted_j[position] < 0:
                node[NEGATIVE_FIELD] = True
            if out_of_range is not None and out_of_range[position]:
                node[OUT_OF_RANGE_FIELD] = list(out_of_range[position])
            position += 1
    return filled



def predict_trees(predictor, trees: Sequence[Tree], unseen_op: str | None = None,
                  *, static_only: bool = False) -> tuple[list[Tree], Forest, np.ndarray]:
    """Predict ``trees``: the filled copies, their forest and the fallback mask.

    Args:
        predictor: a fitted predictor.
        trees: trees in the IrEne format (measured or traced).
        unseen_op: see :func:`predict_with_policy`.
        static_only: first check that the predictor needs no measured feature.
    """
    if static_only:
        require_static(predictor)
    from irene.predictors.ranges import out_of_range

    forest = build_forest(trees)
    predicted, fallback = predict_with_policy(predictor, forest, unseen_op)
    flags = out_of_range(getattr(predictor, "ranges_", None), forest)
    return mark_predictions(trees, forest, predicted, fallback, flags), forest, fallback


def fallback_summary(forest: Forest, fallback: np.ndarray) -> dict[str, int]:
    """How many nodes of each instance type were predicted by a fallback."""
    types, counts = np.unique(forest.instance_type[fallback].astype(str), return_counts=True)
    return {str(t): int(c) for t, c in zip(types, counts, strict=True)}
