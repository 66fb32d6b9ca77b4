"""Attention that keeps no (batch, heads, q_len, kv_len) tensor for backward.

SDPA's fused CUDA kernels (flash, memory-efficient) save only q, k, v, the output and the
log-sum-exp, and regenerate dropout from a Philox seed. Elsewhere (on the CPU, and in the math
fallback) `F.scaled_dot_product_attention` saves the softmax probabilities, the dropout mask and
the dropped probabilities: three tensors of batch · heads · L² elements per layer, about seven
hidden-state tensors' worth for BERT-base at L = 128 (12 heads · 128² · 12 B against 768 · 128 · 4 B).

`RecomputedAttentionMode` runs every SDPA call made in its scope through non-reentrant
`torch.utils.checkpoint`: forward keeps only SDPA's inputs (q, k, v, which the two attention
matmuls save anyway, and the mask, one tensor shared by all layers), and backward recomputes
QKᵀ, the softmax and the dropout. Checkpoint restores the RNG state first, so the recompute
draws the same dropout mask and the gradients are bitwise those of plain SDPA. The price is one
more attention forward per layer (2 · L² · head_dim multiply-adds per head; at L = 128 and hidden
768 that is about 3% of a layer's forward flops). Where SDPA already saves no probabilities (CUDA)
the call runs unchanged.

Eager attention (`attn_implementation="eager"`) computes the product, softmax and dropout as
separate ops, which this mode does not see: use SDPA (the transformers default) to get the saving.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from wtacrs.companions.dropout import RegeneratedDropoutMode
from wtacrs.companions.usage import acted


def _saves_probabilities(query: torch.Tensor) -> bool:
    """Whether SDPA on this device may keep the L² probabilities for backward (not so with the
    fused CUDA kernels, where recomputing would only cost time)."""
    return query.device.type != "cuda"


class RecomputedAttentionMode(TorchFunctionMode):
    """Within this mode, a training-time `F.scaled_dot_product_attention` call saves its inputs
    only and recomputes the attention probabilities in backward. `owner`, if given, is the
    module recorded as acted on (`wtacrs.companions.usage`)."""

    def __init__(self, owner: torch.nn.Module | None = None):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        query = args[0] if args else kwargs.get("query")
        if func is F.scaled_dot_product_attention and torch.is_grad_enabled() and _saves_probabilities(query):
            if self.owner is not None:
                acted(self.owner, "lean_attention")
            return checkpoint(func, *args, use_reentrant=False, **kwargs)
        return func(*args, **kwargs)


class AttentionCompanion:
    """Mixin for the innermost attention modules: forward runs inside the modes its instance
    flags ask for (`regenerate_dropout`: functional dropout saves no mask, for eager attention;
    `recompute_sdpa`: SDPA saves no probabilities)."""

    def forward(self, *args, **kwargs):  # noqa: D102
        with contextlib.ExitStack() as modes:
            if self.__dict__.get("regenerate_dropout", False):
                modes.enter_context(RegeneratedDropoutMode(owner=self))
            if self.__dict__.get("recompute_sdpa", False):
                modes.enter_context(RecomputedAttentionMode(owner=self))
            return super().forward(*args, **kwargs)
