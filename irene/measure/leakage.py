"""Refuse a feature that is the ground truth itself.

With a GPU's own counter as the only meter, a node's GPU energy *is* its ground truth: a
predictor given ``gpu_energy_mean`` as a feature reads the answer. New measurements never
record it then (``irene.measure.protocol``) and say so in the record's ``measurement`` block
(``ground_truth_features``, from the meter's declared ``reading_feature``); trees measured
before that rule (such as the H200 data set, where ``gpu_energy_mean == ground_truth_energy``
on almost every node) are recognised here, and a feature set that reads such a feature is
refused in one line. This module knows meters only through that declaration.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from irene.data.forest import feature_list
from irene.data.tree import Tree, TreeFormatError, iter_nodes
from irene.measure.meters import GPU_ENERGY_FEATURE, reading_feature_of

#: Features that are an energy counter's reading: the target itself when that counter is the
#: only meter.
ENERGY_FEATURES = (GPU_ENERGY_FEATURE,)
#: Relative difference under which a feature equals the target on a node.
EQUAL_RTOL = 1e-9
#: Share of the nodes (with both values) on which a feature equal to the target is a leak.
LEAK_SHARE = 0.5


class LeakedTargetError(TreeFormatError):
    """A selected feature is the ground truth itself; the message says which and what to do."""


def _declared_target(tree: Tree, feature: str) -> str | None:
    """The ground-truth meter's name when a measured tree declares that ``feature`` is its
    ground truth (so that feature was not recorded), else ``None``.

    The block's ``ground_truth_features``; a block written before that field existed is read
    through the meter's class (:func:`irene.measure.meters.reading_feature_of`)."""
    block = tree.get("measurement") or {}
    meter = block.get("ground_truth_meter")
    if "ground_truth_features" in block:
        declared = feature in block["ground_truth_features"]
    else:
        recorded = block.get("gpu_energy_mean_meter")
        declared = bool(meter) and reading_feature_of(meter) == feature and not recorded
    return str(meter) if declared else None


def leaked_features(trees: Iterable[Tree], features: Sequence[str]) -> dict[str, str]:
    """Features among ``features`` that are the target, with the evidence.

    A feature leaks when it equals ``ground_truth_energy`` (relative difference below
    :data:`EQUAL_RTOL`) on at least :data:`LEAK_SHARE` of the nodes that carry both, or when
    the trees were measured with that GPU counter as their only meter.

    Returns:
        ``{feature: evidence}``; empty when nothing leaks.
    """
    trees = list(trees)
    found: dict[str, str] = {}
    for feature in (f for f in ENERGY_FEATURES if f in features):
        both = equal = 0
        for tree in trees:
            for node in iter_nodes(tree["frontend_tree"]):
                value, target = node.get(feature), node.get("ground_truth_energy")
                if value is None or target is None:
                    continue
                both += 1
                equal += abs(value - target) <= EQUAL_RTOL * abs(target)
        if both and equal >= LEAK_SHARE * both:
            found[feature] = f"it equals ground_truth_energy on {equal} of {both} nodes"
            continue
        declared = sorted({m for m in (_declared_target(t, feature) for t in trees) if m})
        if declared:
            found[feature] = (f"the {'/'.join(declared)} counter is the ground truth of these trees, so it "
                              "was not recorded as a feature")
    return found


def check_no_leaked_target(trees: Iterable[Tree], feature_sets: Sequence[str], source: object) -> None:
    """Raise :class:`LeakedTargetError` when a selected feature set reads the target.

    Args:
        trees: the trees a predictor will be trained or evaluated on.
        feature_sets: names of the selected feature sets (``features.sets``).
        source: where the trees came from, for the message.
    """
    leaks = leaked_features(trees, feature_list(list(feature_sets)))
    if leaks:
        feature, evidence = next(iter(leaks.items()))
        raise LeakedTargetError(
            f"{source}: feature {feature!r} (feature sets {list(feature_sets)}) is the target: {evidence}; "
            "the GPU counter was the only meter. Use features=model_specs, or measure a ground truth "
            "of its own beside the GPU counter (a summed meter), see docs/measure.md")
