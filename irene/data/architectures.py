"""Base transformer models built from config classes, with random weights.

Energy, time and FLOPs of inference do not depend on the weights' values, so models are built
from their published architecture (config) alone: nothing is downloaded. The one registry of
model names, used by the import of the published data (parameter counts) and by measurement.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf

from irene.errors import InputError, SettingsError


def _bert_base() -> tf.PretrainedConfig:
    return tf.BertConfig()


def _bert_large() -> tf.PretrainedConfig:
    return tf.BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    )


def _roberta_base() -> tf.PretrainedConfig:
    return tf.RobertaConfig(
        vocab_size=50265,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )


def _tiny_ctrl() -> tf.PretrainedConfig:
    # Sizes read off the published flops column (Wq: 2*16*16+16 FLOP per token, ffn.0: 2*16*2+2).
    return tf.CTRLConfig(n_embd=16, dff=2, n_layer=2, n_head=2)


def _llama_small() -> tf.PretrainedConfig:
    # A Llama-architecture model of TinyLlama-like width, 4 layers: RMSNorm, RoPE, SwiGLU, GQA.
    return tf.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )


def _t5_small() -> tf.PretrainedConfig:
    return tf.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8)


_TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}

# Tiny members of each family: seconds-fast smoke tests and CI, same module structure.
TINY_MODELS: dict[str, tuple[Callable[[], tf.PretrainedConfig], type]] = {
    "tiny/bert": (lambda: tf.BertConfig(**_TINY), tf.BertModel),
    "tiny/roberta": (lambda: tf.RobertaConfig(**_TINY, type_vocab_size=1, pad_token_id=1), tf.RobertaModel),
    "tiny/distilbert": (
        lambda: tf.DistilBertConfig(
            vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
        ),
        tf.DistilBertModel,
    ),
    "tiny/gpt2": (
        lambda: tf.GPT2Config(
            vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        ),
        tf.GPT2Model,
    ),
    "tiny/openai-gpt": (
        lambda: tf.OpenAIGPTConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        tf.OpenAIGPTModel,
    ),
    "tiny/llama": (
        lambda: tf.LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        tf.LlamaModel,
    ),
    "tiny/t5-encoder": (
        lambda: tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        tf.T5EncoderModel,
    ),
}

# name -> (config factory, model class)
MODEL_REGISTRY: dict[str, tuple[Callable[[], tf.PretrainedConfig], type]] = {
    "bert-base-uncased": (_bert_base, tf.BertModel),
    "bert-large-uncased": (_bert_large, tf.BertModel),
    "distilbert-base-uncased": (tf.DistilBertConfig, tf.DistilBertModel),
    "roberta-base": (_roberta_base, tf.RobertaModel),
    "gpt2": (tf.GPT2Config, tf.GPT2Model),
    "distilgpt2": (lambda: tf.GPT2Config(n_layer=6), tf.GPT2Model),
    "openai-gpt": (tf.OpenAIGPTConfig, tf.OpenAIGPTModel),
    "sshleifer/tiny-ctrl": (_tiny_ctrl, tf.CTRLModel),
    "llama-small": (_llama_small, tf.LlamaModel),
    "t5-small-encoder": (_t5_small, tf.T5EncoderModel),
    **TINY_MODELS,
}


def config_from_name(name_or_path: str) -> tf.PretrainedConfig:
    """The architecture config of a known model name, or of a local ``config.json``.

    Args:
        name_or_path: a key of ``MODEL_REGISTRY`` or a path to a local ``config.json`` file or
            to a directory holding one.

    Returns:
        The config; nothing is downloaded.

    Raises:
        ValueError: for an unknown name that is not an existing local path.
    """
    if name_or_path in MODEL_REGISTRY:
        return MODEL_REGISTRY[name_or_path][0]()
    path = Path(name_or_path)
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise InputError(f"model={name_or_path!r}: a folder without a config.json (a Hugging "
                             "Face config.json, or a folder holding one, is read from disk)")
        try:
            return tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:  # not JSON, or no model_type it knows
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"model={name_or_path!r}: not a Hugging Face config.json: {reason}"
                             ) from None
    if (name_or_path.endswith((".json", "/")) or name_or_path.startswith(("/", ".", "~"))
            or name_or_path.count("/") > 1):  # a path, not a registry name such as tiny/bert
        raise SettingsError(f"model={name_or_path!r}: no such file or folder (a Hugging Face "
                            "config.json, or a folder holding one, is read from disk)")
    known = ", ".join(sorted(MODEL_REGISTRY))
    raise SettingsError(f"model={name_or_path!r}: unknown model; use one of {known} or a "
                        "config.json path")


def model_from_name(
    name_or_config_json_path: str,
    attn_implementation: str = "eager",
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Build a base model (no task head) with random weights, in eval mode.

    Args:
        name_or_config_json_path: a paper model name (``bert-base-uncased``, ``gpt2``, ...),
            another key of ``MODEL_REGISTRY``, or a local ``config.json`` path.
        attn_implementation: forced attention implementation; ``"eager"`` (default) makes
            the attention's matmuls and softmax visible as separate ops, ``"sdpa"`` calls
            ``scaled_dot_product_attention``.
        device: where to allocate the weights; ``"meta"`` builds a weightless model whose
            forward pass still yields every shape (enough for FLOP and byte counts).

    Returns:
        The model, in eval mode, with ``use_cache`` off so a replayed layer does not grow a
        key/value cache.

    Raises:
        SettingsError: on a real device, in one line, when the weights (counted on a meta
            build first) do not fit in the device's free memory.
    """
    if torch.device(device).type != "meta":
        _check_weights_fit(name_or_config_json_path, attn_implementation, device)
    config = config_from_name(name_or_config_json_path)
    config._attn_implementation = attn_implementation
    if hasattr(config, "use_cache"):
        config.use_cache = False
    if name_or_config_json_path in MODEL_REGISTRY:
        model_class = MODEL_REGISTRY[name_or_config_json_path][1]
        build = lambda: model_class(config)  # noqa: E731
    else:
        build = lambda: tf.AutoModel.from_config(config)  # noqa: E731
    with torch.device(device):
        model = build()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    return model.eval()


def device_free_bytes(device: str | torch.device) -> int:
    """Free memory of ``device`` in bytes: the GPU's free memory (``torch.cuda.mem_get_info``),
    else the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def weight_bytes(name_or_path: str, attn_implementation: str = "eager") -> int:
    """Bytes of a model's parameters and buffers, counted on a meta build (no memory)."""
    model = model_from_name(name_or_path, attn_implementation, device="meta")
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_weights_fit(name_or_path: str, attn_implementation: str, device: str | torch.device) -> None:
    need, free = weight_bytes(name_or_path, attn_implementation), device_free_bytes(device)
    if need > free:
        raise SettingsError(f"model={name_or_path}: its weights need {need / 2**30:.1f} GiB but "
                            f"{torch.device(device)} has {free / 2**30:.1f} GiB free")


def max_positions(name_or_path: str) -> int | None:
    """The longest input (tokens) a model's position embeddings take; None when unbounded
    (relative positions, e.g. T5)."""
    config = config_from_name(name_or_path)
    for attribute in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            if config.model_type in ("roberta", "xlm-roberta", "camembert"):
                # positions start after the padding index: 514 embeddings take 512 tokens
                value -= int(config.pad_token_id or 0) + 1
            return value
    return None


def model_class_name(name_or_path: str) -> str:
    """Class name of a registered model's base model ("Model" for a config.json path)."""
    return MODEL_REGISTRY[name_or_path][1].__name__ if name_or_path in MODEL_REGISTRY else "Model"


@functools.lru_cache(maxsize=32)
def parameter_counts(name_or_path: str) -> dict[str, int]:
    """Number of parameters of every module scope of a model ("" is the whole model).

    Built on the meta device: milliseconds and no memory. Shared parameters count once per
    module.
    """
    model = model_from_name(name_or_path, device="meta")
    return {scope: sum(p.numel() for p in module.parameters())
            for scope, module in model.named_modules(remove_duplicate=False)}
