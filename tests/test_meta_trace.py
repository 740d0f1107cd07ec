"""Tracing on the meta device: the same trees as on real tensors, with no weights or activations."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from irene.data import architectures
from irene.data.architectures import MODEL_REGISTRY, TINY_MODELS, model_from_name
from irene.errors import SettingsError, UserError
from irene.measure import trace as trace_module
from irene.measure.trace import (
    MetaTraceError,
    check_activations_fit,
    estimate_activation_bytes,
    random_input_ids,
    trace_model,
    trace_to_record,
    trace_tree,
)

ROOT = Path(__file__).resolve().parents[1]
# Full-size registry models: a real build takes seconds each (bert-large: 1.3 GB of fp32
# weights), so they run with the slow tests; the tiny member of each family always runs.
FULL_SIZE = sorted(set(MODEL_REGISTRY) - set(TINY_MODELS))
CASES = [pytest.param(name, marks=pytest.mark.slow) for name in FULL_SIZE] + sorted(TINY_MODELS)


def _real_and_meta(name: str, attn_implementation: str = "eager") -> tuple[nn.Module, nn.Module]:
    return (model_from_name(name, attn_implementation),
            model_from_name(name, attn_implementation, device="meta"))


@pytest.mark.parametrize("name", CASES)
def test_meta_trees_equal_real_trees_node_for_node(name):
    real, meta = _real_and_meta(name)
    assert next(meta.parameters()).is_meta
    for convention in ("physical", "irene"):
        for batch_size, seq_len in ((2, 8), (1, 5)):
            expected = trace_tree(real, batch_size, seq_len, name, convention)
            got = trace_tree(meta, batch_size, seq_len, name, convention)
            assert got == expected, (name, convention, batch_size, seq_len)


@pytest.mark.parametrize("name", ["tiny/bert", "tiny/gpt2", "tiny/llama"])
def test_meta_trees_equal_real_trees_with_sdpa(name):
    real, meta = _real_and_meta(name, "sdpa")
    assert trace_tree(meta, 2, 8, name) == trace_tree(real, 2, 8, name)


class _Branchy(nn.Module):
    """A model whose forward pass branches on a value (of the ids, or of its weights)."""

    def __init__(self, branch: str) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=16)
        self.branch = branch
        self.embed = nn.Embedding(16, 4)
        self.linear = nn.Linear(4, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        if self.branch == "ids":
            # seed 0 draws no token 15 in the first row of 2x8 ids, so this goes one way only
            taken = bool((input_ids[0] == 15).any())
        elif self.branch == "weights":
            taken = bool(hidden.sum() > 0)
        else:  # a weight-free tensor changed in place after it was made
            counter = torch.zeros(2, device=input_ids.device)
            counter.add_(1)
            taken = bool(counter.sum() > 1)
        return self.linear(hidden) * 2 if taken else torch.softmax(self.linear(hidden), -1)


def test_a_branch_on_the_input_ids_goes_the_way_it_goes_on_real_ids():
    real = _Branchy("ids")
    meta = _Branchy("ids").to("meta")
    outcomes = {bool((random_input_ids(16, 2, 8, seed=seed)[0] == 15).any()): seed
                for seed in range(20)}
    assert set(outcomes) == {True, False}  # seeds that take each branch
    records = {}
    for taken, seed in outcomes.items():
        expected = trace_to_record(trace_model(real, 2, 8, "branchy", seed=seed))
        got = trace_to_record(trace_model(meta, 2, 8, "branchy", seed=seed))
        assert got == expected, (taken, seed)
        records[taken] = got
    assert records[True] != records[False]  # the two branches make different trees


@pytest.mark.parametrize("branch,why", [("weights", "a weight, buffer or input"),
                                        ("inplace", "changed in place")])
def test_a_value_shapes_cannot_give_is_refused_in_one_line(branch, why):
    meta = _Branchy(branch).to("meta")
    with pytest.raises(MetaTraceError) as error:
        trace_tree(meta, 2, 8, "branchy")
    message = str(error.value)
    assert "\n" not in message and message.startswith("branchy 2x8: cannot trace on the meta device")
    assert why in message and isinstance(error.value, UserError)


def test_a_shape_whose_branch_values_exceed_the_cap_is_refused_before_computing():
    meta = model_from_name("tiny/gpt2", device="meta")
    # 25 bytes per token of weight-free values (four batch x seq tensors): past 256 MiB
    with pytest.raises(MetaTraceError, match=r"tiny/gpt2 200000x64: .* exceed 256 MiB; use a smaller"):
        trace_tree(meta, 200_000, 64, "tiny/gpt2")
    # an encoder without such a branch traces any shape
    record = trace_tree(model_from_name("tiny/bert", device="meta"), 200_000, 64, "tiny/bert")
    assert record["frontend_tree"]["flops"] > 0


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from irene.predictors.static import trace_static
out = {}
for model, b, s in json.loads(sys.argv[2]):
    start = time.perf_counter()
    root = trace_static(model, [(b, s)])[0]["frontend_tree"]
    out[model] = {"s": time.perf_counter() - start, "params": root["num_parameters"],
                  "mflops": root["flops"]}
# VmHWM: this process's own peak (ru_maxrss keeps the forking parent's across exec on Linux,
# so a child of a large pytest process would report the parent's size)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
out["peak_rss_mib"] = (int(hwm[0].split()[1]) if hwm
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
print(json.dumps(out))
"""


def test_a_7b_llama_config_and_gpt2_at_64x1024_trace_in_seconds_and_little_memory(tmp_path):
    config = tmp_path / "llama-7b" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096}))
    cases = [[str(config), 8, 128], ["gpt2", 64, 1024]]

    def limit() -> None:  # a regression to real weights (26 GB) fails here, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps(cases)],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out[str(config)]["params"] == 6_607_343_616  # Llama-2-7B without its LM head
    # 2 x params x tokens is the weights' share of the FLOPs: the trace saw every layer
    assert out[str(config)]["mflops"] * 1e6 > 2 * 6_607_343_616 * 8 * 128 * 0.9
    assert out["peak_rss_mib"] < 1536, out
    assert out[str(config)]["s"] < 60 and out["gpt2"]["s"] < 60, out


# ----------------------------------------------------------------------- measuring on real tensors
def test_activation_estimate_is_the_captured_inputs_of_the_real_trace():
    real = model_from_name("tiny/bert")
    trace = trace_model(real, 2, 8, "tiny/bert", capture_inputs=True, check_memory=False)
    weights = {id(t) for t in list(real.parameters()) + list(real.buffers())}
    sizes = {}
    for node in trace.nodes():
        for tensor in trace_module._tensors_of((node.args, node.kwargs)):
            if id(tensor) not in weights:
                sizes[id(tensor)] = tensor.numel() * tensor.element_size()
    expected = sum(sizes.values()) + max(sizes.values())
    assert estimate_activation_bytes(real, 2, 8, capture_inputs=True) == expected
    assert estimate_activation_bytes(real, 2, 8, capture_inputs=False) == 3 * max(sizes.values())
    # twice the batch, (about) twice the activations
    assert estimate_activation_bytes(real, 4, 8, capture_inputs=True) > 1.8 * expected


def test_measuring_a_shape_that_cannot_fit_is_refused_before_the_forward_pass(monkeypatch):
    real = model_from_name("tiny/bert")
    monkeypatch.setattr(architectures, "device_free_bytes", lambda device: 1 << 10)
    calls = []
    real.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(SettingsError) as error:
        trace_model(real, 2, 8, "tiny/bert", capture_inputs=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith("tiny/bert 2x8: its activations need about")
    assert "but cpu has 0.0 GiB free; use a smaller batch_size or seq_len" in message
    assert not calls  # refused up front
    monkeypatch.setattr(architectures, "device_free_bytes", lambda device: 1 << 40)
    assert check_activations_fit(real, 2, 8, "tiny/bert", capture_inputs=True) == int(
        estimate_activation_bytes(real, 2, 8, capture_inputs=True) * trace_module.ACTIVATION_HEADROOM)
    assert trace_model(real, 2, 8, "tiny/bert", capture_inputs=True).root.children


def test_building_weights_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    meta = model_from_name("bert-large-uncased", device="meta")
    fp32 = 4 * sum(p.numel() for p in meta.parameters())
    buffers = sum(b.numel() * b.element_size() for b in meta.buffers())
    assert architectures.weight_bytes("bert-large-uncased") == fp32 + buffers  # 1.25 GiB
    monkeypatch.setattr(architectures, "device_free_bytes", lambda device: 1 << 30)
    with pytest.raises(SettingsError, match=r"^model=bert-large-uncased: its weights need 1\.2 GiB but "
                                            r"cpu has 1\.0 GiB free$"):
        model_from_name("bert-large-uncased", device="cpu")
    assert model_from_name("tiny/bert", device="cpu").embeddings.word_embeddings.weight.device.type == "cpu"


def test_predicting_builds_every_model_on_meta_only(monkeypatch):
    from irene.predictors.static import trace_static

    devices = []
    build = architectures.model_from_name

    def spy(name, attn_implementation="eager", device="cpu"):
        devices.append(str(device))
        return build(name, attn_implementation, device=device)

    monkeypatch.setattr(architectures, "model_from_name", spy)
    trees = trace_static("tiny/llama", [(2, 8), (3, 16)]) + trace_static("tiny/gpt2", [(2, 8)])
    assert devices == ["meta", "meta"] and len(trees) == 3
    assert trees[0] == trace_tree(model_from_name("tiny/llama"), 2, 8, "tiny/llama")
