"""Named model sizes built from configs with random weights (no download), local folders of
pre-trained models, and random batches.

Encoder sizes (BERT) are sequence classifiers, T5 sizes text-to-text models; decoder sizes
(LLaMA-style) are causal LMs trained on next-token labels, the workload decoder users run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

_BERT = {
    "bert-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=512),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
_T5 = {
    "t5-tiny": dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=512),
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
}
# LLaMA-style decoders: SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config, the model of the
# packaged "smollm2-135m") and Llama-3.2-1B's (1.24B parameters); both tie the head to the embedding.
_LLAMA = {
    "llama-tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=512),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                     max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
                     pad_token_id=128001),
}
MODEL_SIZES: tuple[str, ...] = (*_BERT, *_T5, *_LLAMA)
DECODER_SIZES: tuple[str, ...] = tuple(_LLAMA)
T5_TARGET_LENGTH = 16  # decoder tokens per example (GLUE-style label strings are short)


def build_model(size: str, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """A model of a named size with random weights, or one loaded from a local folder, in train
    mode, on `device`.

    BERT sizes are `BertForSequenceClassification` (2 labels); T5 sizes are
    `T5ForConditionalGeneration`; decoder sizes (`DECODER_SIZES`) are `LlamaForCausalLM` with tied
    embeddings, trained without a key/value cache (`use_cache=False`); a folder (any family with a sequence-classification class:
    BERT, GPT-2, LLaMA, T5, ModernBERT, ...) loads as its `*ForSequenceClassification` with 2
    labels, the head initialised from `seed`. Same `seed` and device, same weights.
    """
    import transformers

    if Path(size).is_dir():
        return _from_folder(Path(size), seed, device)
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)} or a model folder")
    torch.manual_seed(seed)
    with torch.device(device):  # initialising on the GPU is much faster than on the CPU
        if size in _BERT:
            model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2, **_BERT[size]))
        elif size in _LLAMA:
            config = transformers.LlamaConfig(**_LLAMA[size], tie_word_embeddings=True, use_cache=False)
            model = transformers.LlamaForCausalLM(config)
        else:
            model = transformers.T5ForConditionalGeneration(transformers.T5Config(**_T5[size]))
    return model.train()


def _from_folder(folder: Path, seed: int, device: str | torch.device) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    if model.config.pad_token_id is None:  # GPT-style decoders: batches of several rows need one
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model.to(device).train()


def is_seq2seq(model: nn.Module) -> bool:
    """An encoder-decoder with a language-model head (T5ForConditionalGeneration), trained on
    token labels; encoder-decoders with a classification head take class labels."""
    return bool(getattr(model.config, "is_encoder_decoder", False)) and hasattr(model, "lm_head")


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only model with a language-model head (`*ForCausalLM`), trained on next-token
    labels (the input ids); PEFT-wrapped models are looked through."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForCausalLM")


def make_batch(model: nn.Module, batch: int, seq: int, seed: int = 0,
               device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Random token ids (no padding) and labels for `model`: (batch, seq) inputs. Causal LMs take
    their input ids as labels (the model shifts them). Encoder-decoder classifiers
    (T5ForSequenceClassification) pool at the end-of-sequence token, so each row then holds it
    once, last."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}
    if is_seq2seq(model):
        inputs["labels"] = torch.randint(0, config.vocab_size, (batch, T5_TARGET_LENGTH), generator=g)
    elif is_causal_lm(model):
        inputs["labels"] = ids.clone()
    else:
        if getattr(config, "is_encoder_decoder", False):
            inputs["input_ids"] = _ending_with(ids, config.eos_token_id, config.vocab_size)
        inputs["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g)
    return {k: v.to(device) for k, v in inputs.items()}


def _ending_with(ids: Tensor, token: int, vocab_size: int) -> Tensor:
    """`ids` with `token` only in the last column."""
    ids = torch.where(ids == token, (token + 1) % vocab_size, ids)
    ids[:, -1] = token
    return ids


def batch_shapes(inputs: dict[str, Tensor]) -> dict[str, list[int]]:
    """{name: shape} of a batch, for the JSON record."""
    return {k: list(v.shape) for k, v in inputs.items()}

