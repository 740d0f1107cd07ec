"""The tracer's ``irene`` convention reproduces the published trees' ``mem_bytes`` and leaves."""

from __future__ import annotations

import pytest

from irene.data.architectures import model_from_name
from irene.data.tree import iter_nodes
from irene.measure.flops import IRENE_LEAF_TYPES
from irene.measure.trace import FOLDED_ACTIVATIONS, trace_model, trace_tree

MODELS = ("bert-base-uncased", "gpt2", "distilbert-base-uncased")
SHAPES = ((8, 32), (16, 128))
TOLERANCE_MIB = 1e-9
CPU_MODELS = {"gpt2": "cpu"}


@pytest.fixture(scope="module")
def published(device_dir) -> dict:
    """Published nodes by (model, batch_size, seq_len) and scope."""
    from irene.data.published import import_device

    trees = import_device(device_dir, list(MODELS))
    return {
        (t["model_name"], int(t["batch_size"]), int(t["seq_len"])): {
            n["scope"]: n for n in iter_nodes(t["frontend_tree"])
        }
        for t in trees
    }


@pytest.fixture(scope="module")
def meta_models() -> dict:
    """Weightless models; GPT-2's mask preparation calls ``.item()``, so it runs on the CPU."""
    return {name: model_from_name(name, device=CPU_MODELS.get(name, "meta")) for name in MODELS}


def _nodes(record: dict) -> dict:
    return {n["scope"]: n for n in iter_nodes(record["frontend_tree"])}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_irene_leaves_match_published_mem_bytes(name, shape, published, meta_models):
    traced = _nodes(trace_tree(meta_models[name], *shape, name, convention="irene"))
    reference = published[(name, *shape)]
    leaves = {s: n for s, n in reference.items() if n["type"] == "ml"}
    assert {n["instance_type"] for n in leaves.values()} <= IRENE_LEAF_TYPES
    assert set(leaves) <= set(traced)
    for scope, node in leaves.items():
        assert traced[scope]["type"] == "ml"
        assert abs(traced[scope]["mem_bytes"] - node["mem_bytes"]) <= TOLERANCE_MIB, scope
    # the traced leaves are exactly the published ones: no GELU leaf under "irene"
    assert {s for s, n in traced.items() if n["type"] == "ml"} == set(leaves)


@pytest.mark.parametrize("name", MODELS)
def test_gelu_is_folded_into_its_parent_and_flops_still_add_up(name, meta_models):
    physical = trace_model(meta_models[name], 8, 32, name)
    irene = trace_model(meta_models[name], 8, 32, name, convention="irene")
    folded = [n for n in physical.nodes() if n.instance_type in FOLDED_ACTIVATIONS]
    assert folded  # every one of the three models has a GELU module
    assert not any(n.instance_type in FOLDED_ACTIVATIONS for n in irene.nodes())
    by_scope = {n.scope: n for n in irene.nodes()}
    for node in folded:  # the parent's own work now holds the activation's FLOPs
        parent = by_scope[node.parent.scope]
        assert parent.own.flops == pytest.approx(node.parent.own.flops + node.total().flops)
    for node in irene.nodes():  # a parent's FLOPs are its own ops plus its children's
        assert node.total().flops == pytest.approx(
            node.own.flops + sum(c.total().flops for c in node.children)
        )
    assert irene.root.total().flops == physical.root.total().flops


def test_physical_convention_is_the_default_and_unchanged(meta_models):
    model = meta_models["bert-base-uncased"]
    default = _nodes(trace_tree(model, 8, 32, "bert-base-uncased"))
    physical = _nodes(trace_tree(model, 8, 32, "bert-base-uncased", convention="physical"))
    assert default == physical
    query = default["root.encoder.layer.0.attention.self.query"]
    # x (8*32*768) + W (768*768) + b (768) + y (8*32*768) float32 bytes
    assert query["mem_bytes"] == pytest.approx((2 * 256 * 768 + 768 * 768 + 768) * 4 / 2**20)
    gelu = default["root.encoder.layer.0.intermediate.intermediate_act_fn"]
    assert gelu["type"] == "ml" and gelu["instance_type"] == "GELUActivation"


def test_unknown_convention_is_refused(meta_models):
    with pytest.raises(ValueError, match="convention"):
        trace_model(meta_models["gpt2"], 2, 8, "gpt2", convention="published")
