"""HuggingFace architectures of the published data, built offline from their config classes.

Energy depends on shapes, not weights, so every model is built from its config class with
random weights (on the ``meta`` device when only parameter counts are needed): nothing is
downloaded. A name that is not in :data:`KNOWN_MODELS` can be given as a local
``config.json`` path.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

# name -> (transformers base-model class, config class, config overrides). The overrides are
# the published configs' values where they differ from the config class defaults.
KNOWN_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert-base-uncased": ("BertModel", "BertConfig", {}),
    "bert-large-uncased": (
        "BertModel",
        "BertConfig",
        {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
         "intermediate_size": 4096},
    ),
    "distilbert-base-uncased": ("DistilBertModel", "DistilBertConfig", {}),
    "roberta-base": (
        "RobertaModel",
        "RobertaConfig",
        {"vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1,
         "pad_token_id": 1, "layer_norm_eps": 1e-5},
    ),
    "gpt2": ("GPT2Model", "GPT2Config", {}),
    "distilgpt2": ("GPT2Model", "GPT2Config", {"n_layer": 6}),
    "openai-gpt": ("OpenAIGPTModel", "OpenAIGPTConfig", {}),
    # Sizes read off the published flops column (Wq: 2*16*16+16 FLOP per token, ffn.0: 2*16*2+2).
    "sshleifer/tiny-ctrl": ("CTRLModel", "CTRLConfig", {"n_embd": 16, "dff": 2, "n_layer": 2,
                                                        "n_head": 2}),
}


class UnknownModelError(ValueError):
    """Raised for a model name that is neither known nor a local config.json."""


def build_config(name_or_path: str, attn_implementation: str | None = "eager"):
    """Return the transformers config for a known model name or a local ``config.json``."""
    import transformers

    if name_or_path in KNOWN_MODELS:
        _, config_cls, overrides = KNOWN_MODELS[name_or_path]
        config = getattr(transformers, config_cls)(**overrides)
    elif Path(name_or_path).exists():
        path = Path(name_or_path)
        path = path / "config.json" if path.is_dir() else path
        config_dict = json.loads(path.read_text())
        model_type = config_dict.pop("model_type", None)
        if model_type is None:
            raise UnknownModelError(f"{path}: field 'model_type' is missing")
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
    else:
        raise UnknownModelError(
            f"unknown model {name_or_path!r}: use one of {sorted(KNOWN_MODELS)} or the path of a "
            "local config.json (nothing is downloaded)"
        )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def build_model(name_or_path: str, *, device: str | torch.device = "cpu",
                attn_implementation: str | None = "eager") -> torch.nn.Module:
    """Build the base model (no task head) with random weights, in eval mode."""
    import transformers

    config = build_config(name_or_path, attn_implementation)
    with torch.device(device):
        if name_or_path in KNOWN_MODELS:
            model = getattr(transformers, KNOWN_MODELS[name_or_path][0])(config)
        else:
            model = transformers.AutoModel.from_config(config)
    return model.eval()


@functools.lru_cache(maxsize=32)
def parameter_counts(name_or_path: str) -> dict[str, int]:
    """Number of parameters of every module scope of a model ("" is the whole model).

    Computed on the meta device, so it takes milliseconds and no memory. Shared parameters
    are counted once per module.
    """
    model = build_model(name_or_path, device="meta", attn_implementation=None)
    counts = {}
    for scope, module in model.named_modules(remove_duplicate=False):
        counts[scope] = sum(p.numel() for p in module.parameters())
    return counts
