"""Sampled attention matmuls for Hugging Face Transformers, through its attention-function registry.

`enable_sampled_attention(model, ...)` registers a "wtacrs" attention function once (in
`transformers.AttentionInterface`, with the eager additive-mask builder in
`transformers.masking_utils.AttentionMaskInterface`), switches the model to it with
`model.set_attn_implementation("wtacrs")` and stores the ratio and estimator on each attention
module. The function is eager attention in which the score product QKᵀ and the output product PV
are `wtacrs.sampled_attention.ops.sampled_matmul` (the paper's "score" and "attout"; Liu et al. 2023,
arXiv:2305.15265): forward exact, gradients estimated per (batch, head).

Architectures whose attention goes through the registry in transformers 5.24 (checked by
`tests/test_attention.py` on tiny configs): BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA, T5
(encoder, decoder and cross attention), GPT-2 and LLaMA (with grouped-query attention).
MPNet and DeBERTa-v2 compute attention in their own code and are refused with a ValueError.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from wtacrs.sampled_attention.ops import sampled_matmul
from wtacrs.counter_rng import stream_key
from wtacrs.estimators import Estimator, validate_estimator, validate_ratio
from wtacrs.functional import Budget, validate_budget

if TYPE_CHECKING:
    from wtacrs.sampling import SamplingState

ATTN_IMPLEMENTATION = "wtacrs"
_ATTENTION_STREAM = 1 << 20  # keys the attention draws apart from the linear layers' slots
_SETTINGS_ATTR = "wtacrs_attention"  # on each attention module: its AttentionSampling
_PREVIOUS_ATTR = "wtacrs_previous_attn_implementation"  # on the model: what disable restores
# Keyword arguments some eager attentions honour (Gemma-2 soft-capping, GPT-OSS sinks) that the
# BERT/LLaMA-style computation here does not: refused rather than silently ignored.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


class AttentionNotSupportedError(ValueError):
    """The model computes attention outside transformers' attention registry (or refuses it)."""


@dataclass
class AttentionSampling:
    """Per attention module: how its two matmuls sample.

    Under `wtacrs.apply` (`state` set) the draws are counter-based, keyed by the model's sampling
    seed, rank and step and this module's ordinal, like the linear layers': a checkpoint
    recompute and a resumed run draw the same slices. Otherwise `seed` None draws from the
    global RNG (restored by checkpoint recomputation), and a seed from a generator per device."""

    ratio: float
    estimator: Estimator
    seed: int | None
    budget: Budget = "live"
    state: SamplingState | None = field(default=None, repr=False)
    ordinal: int = 0
    generators: dict[torch.device, torch.Generator] = field(default_factory=dict, repr=False)

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self.generators:
            self.generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self.generators[device]

    def key(self, product: int) -> int | None:
        """The stream key of this step's draws for `product` (0: QKᵀ, 1: PV), or None."""
        if self.state is None:
            return None
        state = self.state
        return stream_key(state.config.seed, state.rank, state.current_step, _ATTENTION_STREAM, self.ordinal, product)


def sampled_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: Tensor | None = None,
    head_mask: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Eager attention with sampled-backward QKᵀ and PV, for `AttentionInterface`.

    Args:
        module: the attention module; carries its `AttentionSampling` (set by enable).
        query: (batch, heads, q_len, head_dim).
        key, value: (batch, kv_heads, kv_len, head_dim); kv_heads divides heads (grouped-query
            attention repeats them, as LLaMA's eager attention does).
        attention_mask: additive float mask broadcastable to (batch, heads, q_len, kv_len).
        scaling: score scale; None means head_dim ** -0.5.
        dropout: attention-probability dropout, applied only in training.
        position_bias: additive (T5 relative-position) bias, added before the mask.
        head_mask: multiplies the (dropped) probabilities.
    Returns:
        attn_output (batch, q_len, heads, head_dim) and attn_weights (batch, heads, q_len, kv_len),
        as eager attention returns them. The softmax runs in float32 (as LLaMA's eager does); in
        float32 models the outputs equal eager attention's bit for bit.
    """
    settings = _settings_of(module)
    unsupported = [name for name in _UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"wtacrs attention does not support {', '.join(unsupported)}")
    sample = dict(
        ratio=settings.ratio if module.training else 1.0,  # eval: the plain matmul
        estimator=settings.estimator,
        generator=settings.generator(query.device),
        budget=settings.budget,
    )
    keys = [settings.key(product) for product in (0, 1)]
    key, value = _repeat_kv_heads(query, key, value)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    live = _attended_keys(attention_mask, key.shape[:-1]) if module.training else None
    scores = sampled_matmul(query, key.transpose(-1, -2), live_columns=live, key=keys[0], **sample) * scale  # "score"
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    softmaxed = F.softmax(scores, dim=-1, dtype=torch.float32)
    probs = F.dropout(softmaxed.to(value.dtype), p=dropout, training=module.training)
    if head_mask is not None:
        probs = probs * head_mask
    # Softmax saves its output for its own backward: when probs is that very tensor (no dropout,
    # no cast, no head mask), sampled rows of it would add memory, so PV keeps it whole (dV exact).
    output = sampled_matmul(probs, value, keep_a=probs is softmaxed, key=keys[1], **sample)  # "attout"
    return output.transpose(1, 2).contiguous(), probs


def _settings_of(module: nn.Module) -> AttentionSampling:
    settings = getattr(module, _SETTINGS_ATTR, None)
    if settings is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation={ATTN_IMPLEMENTATION!r} without sampling "
            "settings; switch models to it with wtacrs.sampled_attention.transformers.enable_sampled_attention"
        )
    return settings


def _attended_keys(attention_mask: Tensor | None, shape: torch.Size) -> Tensor | None:
    """bool (batch, heads, kv_len): keys that some query may attend to, or None for all.

    A key that the additive mask blocks (finfo.min, as eager masks write it) for every query gets
    probability exactly 0, hence a zero score gradient, so dQ need not spend draws on it (padding).
    Not so when a query row is blocked entirely: its softmax then spreads over the blocked keys.
    """
    if attention_mask is None or attention_mask.dtype == torch.bool or attention_mask.dim() != 4:
        return None
    blocked = attention_mask == torch.finfo(attention_mask.dtype).min  # (batch, 1 | heads, q_len, kv_len)
    if bool(blocked.all(-1).any()):
        return None
    return (~blocked.all(-2)).expand(shape)


def _repeat_kv_heads(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Repeat key/value heads to the query's head count (grouped-query attention)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query has {heads} heads, not a multiple of the {kv_heads} key/value heads")
    return repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)


def register_sampled_attention() -> None:
    """Register "wtacrs" with transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sampled_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)  # the additive float mask eager uses


def _dispatches_through_registry(module: nn.Module) -> bool:
    """Whether the module's forward looks its attention function up in ALL_ATTENTION_FUNCTIONS."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def attention_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules whose attention goes through the registry."""
    return [name for name, module in model.named_modules() if _dispatches_through_registry(module)]


def sampled_attention_names(model: nn.Module) -> list[str]:
    """Qualified names of the attention modules `enable_sampled_attention` set to sample."""
    return [name for name, module in model.named_modules() if hasattr(module, _SETTINGS_ATTR)]


def enable_sampled_attention(
    model: nn.Module,
    ratio: float,
    estimator: Estimator = "wta-crs",
    seed: int | None = None,
    budget: Budget = "live",
    state: SamplingState | None = None,
) -> list[str]:
    """Sample the backward of every attention's QKᵀ and PV products of a transformers model.

    Args:
        model: a `transformers.PreTrainedModel` whose attention uses the attention registry.
        ratio: fraction in (0, 1] of the contracted index kept per (batch, head), see
            `wtacrs.sampled_attention.ops.sampled_matmul`.
        estimator: one of `wtacrs.estimators.ESTIMATORS`.
        seed: seeds one generator per attention module (seed + its ordinal); None uses the
            global RNG, which `torch.utils.checkpoint` restores for recomputation.
        budget: what the ratio of keys counts, "live" (unmasked keys) or "all" (every key,
            padding included: the paper's counting); see `sampled_matmul`.
        state: the model's `SamplingState` (`wtacrs.apply` passes it): draws keyed by its seed,
            rank and step, as the linear layers' are (`seed` is then unused).
    Returns:
        The qualified names of the attention modules that now sample.
    Raises:
        ValueError: bad ratio/estimator/budget.
        AttentionNotSupportedError (a ValueError): the model does not dispatch attention through
            the registry (e.g. MPNet, DeBERTa-v2), or it refused the new implementation.
    """
    validate_ratio(ratio)
    validate_estimator(estimator)
    validate_budget(budget)
    names = attention_module_names(model)
    if not names or not hasattr(model, "set_attn_implementation"):
        raise AttentionNotSupportedError(
            f"{type(model).__name__} does not compute attention through transformers' AttentionInterface, "
            "so its attention matmuls cannot be sampled (the linear layers still can)"
        )
    register_sampled_attention()
    if not hasattr(model, _PREVIOUS_ATTR):  # enabling twice must still restore the original
        setattr(model, _PREVIOUS_ATTR, model.config._attn_implementation)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    modules = dict(model.named_modules())
    refused = [name for name in names if modules[name].config._attn_implementation != ATTN_IMPLEMENTATION]
    if refused:
        disable_sampled_attention(model)
        raise AttentionNotSupportedError(
            f"{type(model).__name__} kept its attention implementation in {refused}")
    for ordinal, name in enumerate(names):
        module_seed = None if seed is None else seed + ordinal
        setattr(modules[name], _SETTINGS_ATTR,
                AttentionSampling(ratio, estimator, module_seed, budget, state=state, ordinal=ordinal))
    return names


def disable_sampled_attention(model: nn.Module) -> list[str]:
    """Undo `enable_sampled_attention`: restore the previous attn_implementation and drop the
    per-module settings. Returns the names of the attention modules restored.

    Raises:
        ValueError: the model's attention was not enabled.
    """
    if not hasattr(model, _PREVIOUS_ATTR):
        raise ValueError(f"sampled attention is not enabled on this {type(model).__name__}")
    model.set_attn_implementation(getattr(model, _PREVIOUS_ATTR))
    delattr(model, _PREVIOUS_ATTR)
    restored = []
    for name, module in model.named_modules():
        if hasattr(module, _SETTINGS_ATTR):
            delattr(module, _SETTINGS_ATTR)
            restored.append(name)
    return restored
