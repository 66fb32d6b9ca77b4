"""Models a plan can name: `wtacrs bench`'s sizes, published shapes of 7–8B decoders, a local
folder's config.json, or a hub id's config (from the local cache or the network). Only configs
are read: the model is built under the tracer's fake mode, so no weight is ever allocated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from wtacrs.bench.models import MODEL_SIZES, build_model

# Published dimensions (the models' config.json on the Hugging Face hub: meta-llama/Llama-3.1-8B,
# Qwen/Qwen2.5-7B). Llama 3.1's RoPE scaling is left out: it changes no tensor's shape.
LARGE_DECODERS: dict[str, tuple[str, dict]] = {
    "llama-3.1-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001, pad_token_id=128001)),
    "qwen2.5-7b": ("Qwen2Config", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151643, pad_token_id=151643)),
}
PLAN_MODELS: tuple[str, ...] = (*MODEL_SIZES, *LARGE_DECODERS)


@dataclass(frozen=True)
class ModelSpec:
    """A model to plan: its name and how to build it (random weights; call under the fake mode)."""

    name: str
    build: Callable[[], nn.Module]


def model_spec(model: str) -> ModelSpec:
    """The `ModelSpec` of a named size (`PLAN_MODELS`), a folder with a config.json, or a hub id.

    Decoders (a config whose architectures end in ForCausalLM) are causal LMs trained on
    next-token labels; other configs build their sequence classifier with 2 labels, as
    `wtacrs bench` and `wtacrs finetune` train them. Raises ValueError for anything else."""
    if model in MODEL_SIZES:
        return ModelSpec(model, lambda: build_model(model))
    if model in LARGE_DECODERS:
        return ModelSpec(model, lambda: _causal_lm(_large_config(model)))
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        kind = "folder" if Path(model).exists() else "name"
        raise ValueError(f"cannot read a config for model {kind} {model!r}: {str(e).splitlines()[0]}; "
                         f"name one of {', '.join(PLAN_MODELS)}, a folder with config.json or a hub id") from None
    if any(a.endswith("ForCausalLM") for a in config.architectures or ()):
        return ModelSpec(model, lambda: _causal_lm(config))
    config.num_labels = 2
    return ModelSpec(model, lambda: transformers.AutoModelForSequenceClassification.from_config(config).train())


def _large_config(name: str):
    import transformers

    class_name, dims = LARGE_DECODERS[name]
    return getattr(transformers, class_name)(**dims, tie_word_embeddings=False, use_cache=False)


def _causal_lm(config) -> nn.Module:
    import transformers

    config.use_cache = False
    return transformers.AutoModelForCausalLM.from_config(config).train()
