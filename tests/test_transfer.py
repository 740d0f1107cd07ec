"""Transfer to a new device from k shots (irene/transfer.py): the protocol never shows a
method the left-out model, shots are k configurations of other models, and the corrections
recover known device ratios on synthetic trees."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from irene.data.forest import build_forest, compose
from irene.errors import SettingsError
from irene.transfer import (
    ALL_SHOTS,
    CalibratedPool,
    Correction,
    LevelScale,
    Source,
    SourceAsIs,
    TargetOnly,
    TypeScale,
    concat_forests,
    draw_shots,
    learning_curve,
    methods_by_name,
    node_mask,
)

# name -> (hidden size, layers); the source device's energy per MFLOP of each primitive type
MODELS = {"alpha": (64, 2), "beta": (96, 1), "gamma": (128, 2), "delta": (80, 3)}
SHAPES = [(1, 16), (2, 32), (4, 16), (8, 64)]
JOULES_PER_MFLOP = {"Linear": 1e-3, "MatMul": 2e-3, "Softmax": 5e-3, "LayerNorm": 4e-3}
INNER_OVERHEAD = 1.05  # every inner node: 1.05 × Σ children


def _tree(model: str, batch: int, seq: int, factors: dict[str, float], power: float = 0.0):
    """A model's tree at one shape; leaf energy = J/MFLOP × flops × factor × flops**power."""
    hidden, layers = MODELS[model]
    tokens = batch * seq

    def leaf(scope, cls, flops):
        energy = JOULES_PER_MFLOP[cls] * flops * factors.get(cls, 1.0) * flops ** power
        return {"id": f"{model}/{batch}x{seq}/{scope}", "scope": scope, "level": 2,
                "instance_type": cls, "type": "ml", "num_parameters": hidden * hidden,
                "flops": flops, "mem_bytes": flops / 7.0, "ground_truth_energy": energy,
                "child_nodes_obj": []}

    def inner(scope, cls, kind, children):
        return {"id": f"{model}/{batch}x{seq}/{scope}", "scope": scope, "level": 1,
                "instance_type": cls, "type": kind,
                "num_parameters": sum(c["num_parameters"] for c in children),
                "flops": sum(c["flops"] for c in children),
                "mem_bytes": sum(c["mem_bytes"] for c in children),
                "ground_truth_energy": INNER_OVERHEAD * sum(c["ground_truth_energy"]
                                                            for c in children),
                "child_nodes_obj": children}

    blocks = []
    for i in range(layers):
        prefix = f"root.layer.{i}"
        blocks.append(inner(prefix, "Block", "module", [
            leaf(f"{prefix}.dense", "Linear", 2e-6 * tokens * hidden * hidden),
            leaf(f"{prefix}.matmul_0", "MatMul", 2e-6 * batch * seq * seq * hidden),
            leaf(f"{prefix}.softmax_0", "Softmax", 5e-6 * batch * seq * seq),
            leaf(f"{prefix}.LayerNorm", "LayerNorm", 8e-6 * tokens * hidden)]))
    root = inner("root", f"{model.title()}Model", "model", blocks)
    return {"model_name": model, "batch_size": batch, "seq_len": seq, "frontend_tree": root}


def _device(factors: dict[str, float] | None = None, power: float = 0.0):
    return [_tree(m, b, s, factors or {}, power) for m in MODELS for b, s in SHAPES]


class SourceDeviceOracle:
    """The source device's exact energies, computed from the features (a perfect predictor)."""

    def predict(self, forest):
        cls = forest.instance_type.astype(str)
        rate = np.asarray([JOULES_PER_MFLOP.get(c, 0.0) for c in cls])
        flops = forest.features[:, 4]  # ALL_FEATURES: num_parameters, shape ×3, flops, ...
        leaves = np.where(forest.is_leaf, rate * flops, 0.0)
        return compose(forest, leaves, np.full(forest.num_nodes, INNER_OVERHEAD))


def _oracle_source():
    forest = build_forest(_device())
    return Source(predictor=SourceDeviceOracle(), forest=forest)


def test_oracle_is_the_source_device():
    forest = build_forest(_device())
    assert np.allclose(SourceDeviceOracle().predict(forest), forest.gold_j, rtol=1e-12)


FACTORS = {"Linear": 0.5, "MatMul": 0.8, "Softmax": 2.0, "LayerNorm": 3.0}


def test_type_scale_recovers_known_per_type_factors():
    target = build_forest(_device(FACTORS))
    shots = target.subset(np.asarray(target.model_names) != "gamma")
    method = TypeScale(prior_nodes=0.0, size=None, inner="leaves").fit(_oracle_source(), shots)
    for cls, factor in FACTORS.items():
        assert np.exp(method.leaf_scales_.group_[("ml", cls.lower())]) == pytest.approx(factor)
    test = target.subset(np.asarray(target.model_names) == "gamma")
    # inner nodes follow their own leaves' mix, so the left-out model is exact at every level
    assert np.allclose(method.predict(test), test.gold_j, rtol=1e-9)
    # one scale per level cannot (the mix of types differs between nodes), nor can one per
    # module class for a class whose mix of types varies with the shape
    level = LevelScale().fit(_oracle_source(), shots)
    assert np.max(np.abs(level.predict(test) / test.gold_j - 1)) > 0.1
    by_class = TypeScale(prior_nodes=0.0, size=None, inner="class").fit(_oracle_source(), shots)
    assert np.allclose(by_class.predict(test)[test.is_leaf], test.gold_j[test.is_leaf])
    assert np.max(np.abs(by_class.predict(test) / test.gold_j - 1)) > 0.01


def test_type_scale_both_is_the_geometric_mean_of_the_class_and_leaves_paths():
    """inner="both": leaves as either path; an inner node the geometric mean of the class
    path's and the leaves path's predictions, each path with its own fitted class scales."""
    target = build_forest(_device(FACTORS, power=0.1))
    names = np.asarray(target.model_names)
    shots, test = target.subset(names != "delta"), target.subset(names == "delta")
    fits = {inner: TypeScale(inner=inner).fit(_oracle_source(), shots)
            for inner in ("class", "leaves", "both")}
    pred = {inner: fit.predict(test) for inner, fit in fits.items()}
    assert fits["both"].inner_scales_ == fits["class"].inner_scales_
    assert fits["both"].leaves_path_scales_ == fits["leaves"].inner_scales_
    leaves = test.is_leaf
    assert np.array_equal(pred["both"][leaves], pred["class"][leaves])
    assert np.allclose(pred["both"][~leaves],
                       np.sqrt(pred["class"][~leaves] * pred["leaves"][~leaves]), rtol=1e-12)
    # the two paths disagree here, so the mean is neither of them
    assert np.max(np.abs(pred["class"][~leaves] / pred["leaves"][~leaves] - 1)) > 0.01
    assert not np.allclose(pred["both"][~leaves], pred["class"][~leaves], rtol=1e-3)
    assert not np.allclose(pred["both"][~leaves], pred["leaves"][~leaves], rtol=1e-3)


def test_type_scale_recovers_a_size_dependent_ratio():
    """target = source × factor × flops**0.1: the size slope finds 0.1 on the leaves."""
    target = build_forest(_device(FACTORS, power=0.1))
    shots = target.subset(np.asarray(target.model_names) != "alpha")
    method = TypeScale(prior_nodes=0.0, size="energy", slope_ridge=0.0,
                       slope_within="group").fit(_oracle_source(), shots)
    assert method.leaf_scales_.slope_ == pytest.approx(0.1, rel=1e-6)
    test = target.subset(np.asarray(target.model_names) == "alpha")
    leaves = test.is_leaf
    assert np.allclose(method.predict(test)[leaves], test.gold_j[leaves], rtol=1e-6)
    without = TypeScale(prior_nodes=0.0, size=None).fit(_oracle_source(), shots)
    assert np.max(np.abs(without.predict(test)[leaves] / test.gold_j[leaves] - 1)) > 0.05


def test_shrinkage_pulls_a_rare_type_toward_its_level():
    target = build_forest(_device(FACTORS))
    one_tree = np.zeros(target.num_trees, bool)
    one_tree[0] = True
    shots = target.subset(one_tree)
    free = TypeScale(prior_nodes=0.0, size=None).fit(_oracle_source(), shots)
    pulled = TypeScale(prior_nodes=1e6, size=None).fit(_oracle_source(), shots)
    level = pulled.leaf_scales_.level_["ml"]
    assert np.exp(free.leaf_scales_.group_[("ml", "softmax")]) == pytest.approx(2.0)
    assert pulled.leaf_scales_.group_[("ml", "softmax")] == pytest.approx(level, abs=1e-4)


def test_copies_of_one_measurement_count_once():
    """Identical layers share one measured value: four copies weigh as much as one node."""
    from irene.transfer import _distinct_weights

    forest = build_forest([_tree("delta", 2, 32, {})])  # 3 identical layers
    rows = np.flatnonzero(forest.is_leaf)
    weights = _distinct_weights(forest, rows)
    assert weights.sum() == pytest.approx(4.0)  # four distinct leaf measurements


def test_level_scale_recovers_one_global_factor():
    target = build_forest(_device({c: 2.5 for c in JOULES_PER_MFLOP}))
    shots = target.subset(np.asarray(target.model_names) == "beta")
    method = LevelScale().fit(_oracle_source(), shots)
    assert np.allclose(method.predict(target), target.gold_j, rtol=1e-9)


# --------------------------------------------------------------------------- the protocol
class Spy(Correction):
    """Records the shots it is given; predicts the source as is."""

    seen: list = []

    def fit(self, source, shots, *, source_pred=None):
        self.source_ = source
        Spy.seen.append((list(shots.model_names), list(zip(shots.batch_sizes, shots.seq_lens,
                                                           strict=True)), set(shots.ids)))
        assert source_pred is not None and len(source_pred) == shots.num_nodes
        return self

    def predict(self, forest, *, source_pred=None):
        Spy.seen[-1] = (*Spy.seen[-1], list(forest.model_names), set(forest.ids))
        return self._source_pred(forest, source_pred)


def test_shots_are_k_configurations_of_other_models_never_the_left_out_one():
    Spy.seen = []
    rows = learning_curve(_device(), _device(FACTORS), shots=[1, 3, 5], draws=4, seed=3,
                          methods={"spy": Spy}, ceiling=False)
    assert [r["shots"] for r in rows] == [1, 3, 5]
    assert len(Spy.seen) == (1 + 1 + 1) * 4 * len(MODELS)
    for k_index, k in enumerate([1, 3, 5]):
        block = Spy.seen[k_index * 4 * len(MODELS):(k_index + 1) * 4 * len(MODELS)]
        for shot_models, shot_shapes, shot_ids, test_models, test_ids in block:
            left_out = set(test_models)
            assert len(left_out) == 1 and len(test_models) == len(SHAPES)
            assert len(shot_models) == k  # k trees...
            assert len(set(zip(shot_models, shot_shapes, strict=True))) == k  # ...distinct
            assert not left_out & set(shot_models)
            assert not shot_ids & test_ids  # no node of the left-out model is a shot
    draws_k3 = [tuple(s[2]) for s in Spy.seen[4 * len(MODELS):8 * len(MODELS)]]
    assert len(set(map(frozenset, draws_k3))) > 1  # draws differ


def test_draw_shots():
    forest = build_forest(_device())
    rng = np.random.default_rng(0)
    chosen = draw_shots(forest, "beta", 6, rng)
    assert len(set(chosen)) == 6 and list(chosen) == sorted(chosen)
    assert "beta" not in {forest.model_names[i] for i in chosen}
    with pytest.raises(SettingsError, match="only 12 configurations"):
        draw_shots(forest, "beta", 13, rng)


def test_rows_same_seed_same_numbers_and_k0_only_for_source_methods(caplog):
    methods = {"type_scale": lambda: TypeScale(prior_nodes=0.0, size=None, inner="leaves"),
               "level_scale": LevelScale, "target_only": lambda: TargetOnly()}
    with caplog.at_level(logging.WARNING):
        rows = learning_curve(_device(), _device(FACTORS), shots=[0, 2, 13, ALL_SHOTS],
                              draws=2, methods=methods, sources=[_oracle_source()])
    assert "shots=13 skipped" in caplog.text
    keys = [(r["method"], r["shots"]) for r in rows]
    assert ("target_only", 0) not in keys and ("type_scale", 0) in keys
    assert ("target_lomo", ALL_SHOTS) in keys and ("type_scale", 13) not in keys
    k0 = {r["method"]: r for r in rows if r["shots"] == 0}
    assert k0["type_scale"]["model"] == k0["level_scale"]["model"] > 10  # the source as is
    exact = {r["method"]: r for r in rows if r["shots"] == 2}["type_scale"]
    assert exact["model"] < 1e-6 and exact["ml"] < 1e-6 and exact["draws"] == 2
    assert all(r["model_sd"] == 0 for r in rows if r["draws"] == 1)
    again = learning_curve(_device(), _device(FACTORS), shots=[0, 2, 13, ALL_SHOTS], draws=2,
                           methods=methods, sources=[_oracle_source()])
    assert again == rows


def test_the_left_out_model_cannot_help():
    """Corrupting the left-out model's target measurements changes only its errors, never
    what was fitted: every method's predictions of it stay the same."""
    clean = _device(FACTORS)
    corrupted = _device(FACTORS)
    for tree in corrupted:
        if tree["model_name"] == "gamma":
            _scale_energies(tree["frontend_tree"], 10.0)
    methods = {"type_scale": lambda: TypeScale(prior_nodes=0.0, size=None, inner="leaves")}
    a = learning_curve(_device(), clean, shots=[3], draws=2, methods=methods, models=["gamma"],
                       sources=[_oracle_source()], ceiling=False)[0]
    b = learning_curve(_device(), corrupted, shots=[3], draws=2, methods=methods,
                       models=["gamma"], sources=[_oracle_source()], ceiling=False)[0]
    assert a["model"] < 1e-6 and b["model"] == pytest.approx(90.0)  # 1 − 1/10


def _scale_energies(node, factor):
    node["ground_truth_energy"] *= factor
    for child in node["child_nodes_obj"]:
        _scale_energies(child, factor)


def test_several_sources_are_combined_by_geometric_mean():
    forest = build_forest(_device())

    class Times:
        def __init__(self, factor):
            self.factor = factor

        def predict(self, f):
            return SourceDeviceOracle().predict(f) * self.factor

    sources = [Source(Times(2.0), forest), Source(Times(0.5), forest)]
    rows = learning_curve(None, _device(), shots=[0], methods={"as_is": SourceAsIs},
                          sources=sources, ceiling=False)
    assert rows[0]["model"] < 1e-9 and rows[0]["worst_ratio"] == pytest.approx(1.0)


def test_calibrated_pool_maps_the_source_onto_the_target():
    source = _oracle_source()
    target = build_forest(_device(FACTORS))  # the same trees as the source, in the same order
    names = np.asarray(target.model_names)
    shots = target.subset(names == "beta")
    method = CalibratedPool(lambda: TypeScale(prior_nodes=0.0, size=None, inner="leaves")).fit(source, shots)
    assert np.allclose(source.forest.gold_j * method.source_factor_, target.gold_j, rtol=1e-9)
    test = target.subset(names == "gamma")
    error = np.mean(np.abs(method.predict(test) / test.gold_j - 1))
    as_is = np.mean(np.abs(source.predict(test) / test.gold_j - 1))
    assert error < as_is / 3


def test_concat_and_node_mask_keep_the_trees():
    forest = build_forest(_device())
    first, second = forest.subset(np.arange(forest.num_trees) < 5), forest.subset(
        np.arange(forest.num_trees) >= 5)
    joined = concat_forests(first, second)
    for name in ("features", "gold_j", "parent", "tree_index", "offsets", "node_type"):
        assert np.array_equal(getattr(joined, name), getattr(forest, name), equal_nan=True)
    mask = np.zeros(forest.num_trees, bool)
    mask[[2, 7]] = True
    assert np.array_equal(forest.gold_j[node_mask(forest, mask)], forest.subset(mask).gold_j)


def test_bad_settings_fail_in_one_line():
    with pytest.raises(SettingsError, match="inner="):
        TypeScale(inner="tree").fit(_oracle_source(), build_forest(_device()))
    with pytest.raises(SettingsError, match="shots"):
        learning_curve(None, _device(), shots=[-1], sources=[_oracle_source()])
    with pytest.raises(SettingsError, match="draws"):
        learning_curve(None, _device(), draws=0, sources=[_oracle_source()])
    with pytest.raises(SettingsError, match="unknown \\['typo'\\]"):
        methods_by_name(["type_scale", "typo"])


def test_every_named_method_runs_on_small_data():
    """What a pipeline stage calls: names in, one row per method and k out."""
    from irene.transfer import METHODS

    rows = learning_curve(_device(), _device(FACTORS), shots=[0, 2], draws=1,
                          methods=methods_by_name(list(METHODS)), models=["beta"])
    for row in rows:
        assert {"method", "shots", "ml", "module", "model", "ml_sd", "module_sd",
                "model_sd", "worst_ratio"} <= set(row)
    by_key = {(r["method"], r["shots"]): r for r in rows}
    assert set(by_key) == {(m, 2) for m in METHODS} | {
        (m, 0) for m in METHODS if m not in ("target_only",)} | {("target_lomo", ALL_SHOTS)}
    # with the per-type factors known from 2 shots, the default method beats the prototype
    assert by_key[("type_scale", 2)]["ml"] < by_key[("level_scale", 2)]["ml"]
