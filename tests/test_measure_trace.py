"""Tracing small configs of every model family into IrEne trees."""

from __future__ import annotations

import json

import pytest
import torch

from irene.data.architectures import MODEL_REGISTRY, TINY_MODELS, model_from_name
from irene.measure.trace import trace_model, trace_tree

NODE_FIELDS = [
    "id",
    "scope",
    "parent_name",
    "level",
    "instance_type",
    "type",
    "num_parameters",
    "flops",
    "mem_bytes",
]


def _nodes(node):
    yield node
    for child in node["child_nodes_obj"]:
        yield from _nodes(child)


def _by_scope(record):
    return {n["scope"]: n for n in _nodes(record["frontend_tree"])}


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def record(request):
    model = model_from_name(request.param)
    return trace_tree(model, 2, 8, request.param)


def test_tree_shape_and_fields(record):
    root = record["frontend_tree"]
    assert list(record) == ["model_name", "batch_size", "seq_len", "frontend_tree"]
    assert root["type"] == "model" and root["scope"] == "root" and root["parent_name"] is None
    ids = set()
    for node in _nodes(root):
        assert list(node)[:9] == NODE_FIELDS
        assert list(node)[-2:] == ["child_nodes_obj", "child_nodes"]
        assert "ground_truth_energy" not in node  # static trace: nothing measured
        assert node["id"] == f"{record['model_name']}/2x8/{node['scope']}"
        assert node["id"] not in ids
        ids.add(node["id"])
        assert node["child_nodes"] == [c["scope"] for c in node["child_nodes_obj"]]
        for child in node["child_nodes_obj"]:
            assert child["parent_name"] == node["scope"]
            assert child["level"] == node["level"] + 1
        if node["child_nodes_obj"]:
            assert node["type"] in ("model", "module")
            total = sum(c["flops"] for c in node["child_nodes_obj"])
            assert node["flops"] >= total - 1e-9
        else:
            assert node["type"] == "ml"
        assert "Dropout" not in node["instance_type"]
        assert node["instance_type"] not in ("ModuleList", "Sequential")
    json.dumps(record)  # serialisable as one jsonl line


def test_validates_with_core_library(record):
    tree = pytest.importorskip("irene.data.tree")
    tree.validate_tree(record, "trace")


def test_parameters_add_up(record):
    model = model_from_name(record["model_name"])
    assert record["frontend_tree"]["num_parameters"] == sum(p.numel() for p in model.parameters())


def _children_types(node):
    return sorted(c["instance_type"] for c in node["child_nodes_obj"])


def test_bert_attention_matches_published_structure():
    nodes = _by_scope(trace_tree(model_from_name("tiny/bert"), 2, 8, "tiny/bert"))
    self_attn = nodes["root.encoder.layer.0.attention.self"]
    assert self_attn["instance_type"] == "BertSelfAttention"
    assert _children_types(self_attn) == ["Linear", "Linear", "Linear", "MatMul", "MatMul", "Softmax"]
    assert [c["scope"] for c in self_attn["child_nodes_obj"]][3:] == [
        "root.encoder.layer.0.attention.self.matmul_0",
        "root.encoder.layer.0.attention.self.softmax_0",
        "root.encoder.layer.0.attention.self.matmul_1",
    ]
    assert _children_types(nodes["root"]) == ["BertEmbeddings", "BertEncoder", "BertPooler"]
    assert _children_types(nodes["root.pooler"]) == ["Linear", "Tanh"]
    assert "root.encoder.layer" not in nodes  # ModuleList is not a node


def test_gpt2_attention_matches_published_structure():
    nodes = _by_scope(trace_tree(model_from_name("tiny/gpt2"), 2, 8, "tiny/gpt2"))
    assert _children_types(nodes["root.h.0.attn"]) == ["Conv1D", "Conv1D", "MatMul", "MatMul", "Softmax"]
    assert _children_types(nodes["root.h.0.mlp"]) == ["Conv1D", "Conv1D", "NewGELUActivation"]
    conv = nodes["root.h.0.attn.c_attn"]  # 2 * tokens * 32 * 96 + bias adds
    assert conv["flops"] == pytest.approx((2 * 16 * 32 * 96 + 16 * 96) / 1e6)


def test_llama_and_t5_structure():
    llama = _by_scope(trace_tree(model_from_name("tiny/llama"), 2, 8, "tiny/llama"))
    assert _children_types(llama["root.layers.0.self_attn"]) == [
        "Linear",
        "Linear",
        "Linear",
        "Linear",
        "MatMul",
        "MatMul",
        "Softmax",
    ]
    assert llama["root.norm"]["instance_type"] == "LlamaRMSNorm"
    assert llama["root.norm"]["type"] == "ml"
    t5 = _by_scope(trace_tree(model_from_name("tiny/t5-encoder"), 2, 8, "tiny/t5-encoder"))
    attention = t5["root.encoder.block.0.layer.0.SelfAttention"]
    assert "Embedding" in _children_types(attention)  # relative position bias
    assert _children_types(attention).count("MatMul") == 1 + 1
    assert t5["root.encoder.embed_tokens"]["type"] == "ml"  # shared embedding, named in place


def test_sdpa_leaf_when_not_eager():
    model = model_from_name("tiny/bert", attn_implementation="sdpa")
    nodes = _by_scope(trace_tree(model, 2, 8, "tiny/bert"))
    self_attn = nodes["root.encoder.layer.0.attention.self"]
    assert _children_types(self_attn) == ["Linear", "Linear", "Linear", "ScaledDotProductAttention"]
    eager = _by_scope(trace_tree(model_from_name("tiny/bert"), 2, 8, "tiny/bert"))
    assert self_attn["flops"] == pytest.approx(eager["root.encoder.layer.0.attention.self"]["flops"])


def test_registry_configs():
    for name in (
        "bert-base-uncased",
        "bert-large-uncased",
        "distilbert-base-uncased",
        "roberta-base",
        "gpt2",
        "distilgpt2",
        "openai-gpt",
        "llama-small",
        "t5-small-encoder",
    ):
        assert name in MODEL_REGISTRY
    roberta = model_from_name("roberta-base", device="meta").config
    assert (
        roberta.vocab_size,
        roberta.max_position_embeddings,
        roberta.type_vocab_size,
        roberta.pad_token_id,
        roberta.layer_norm_eps,
    ) == (50265, 514, 1, 1, 1e-5)
    assert model_from_name("distilgpt2", device="meta").config.n_layer == 6
    bert = model_from_name("bert-base-uncased", device="meta")
    assert sum(p.numel() for p in bert.parameters()) == 109_482_240
    assert bert.config._attn_implementation == "eager"


def test_config_json_path(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50
    ).to_json_file(tmp_path / "config.json")
    for path in (tmp_path, tmp_path / "config.json"):
        model = model_from_name(str(path))
        assert type(model).__name__ == "BertModel"
    with pytest.raises(ValueError, match="unknown model"):
        model_from_name("no-such-model")


def test_captured_inputs_replay_in_isolation():
    model = model_from_name("tiny/gpt2")
    trace = trace_model(model, 2, 8, "tiny/gpt2", capture_inputs=True)
    with torch.no_grad():
        for node in trace.nodes():
            out = node.call()
            assert out is not None
        block = next(n for n in trace.nodes() if n.scope == "root.h.1")
        mlp = next(n for n in trace.nodes() if n.scope == "root.h.1.mlp")
        assert torch.is_tensor(mlp.call()) and mlp.call().shape == (2, 8, 32)
        assert (
            block.call()[0].shape == (2, 8, 32)
            if isinstance(block.call(), tuple)
            else block.call().shape == (2, 8, 32)
        )
