"""Attention that keeps no (batch, heads, q_len, kv_len) tensor for backward.

SDPA's fused kernels (flash, memory-efficient, cuDNN on CUDA; flash on the CPU for calls without
dropout) save only q, k, v, the output and the log-sum-exp. Its math kernel (the CPU's choice
with dropout, e.g. BERT's attention dropout in training, and any call no fused kernel takes)
saves the softmax probabilities, the dropout mask and the dropped probabilities: three tensors
of batch · heads · L² elements per layer, about seven hidden-state tensors' worth for BERT-base
at L = 128 (12 heads · 128² · 12 B against 768 · 128 · 4 B).

`RecomputedAttentionMode` runs every SDPA call made in its scope through non-reentrant
`torch.utils.checkpoint`: forward keeps only SDPA's inputs (q, k, v, which the two attention
matmuls save anyway, and the mask, one tensor shared by all layers), and backward recomputes
QKᵀ, the softmax and the dropout. Checkpoint restores the RNG state first, so the recompute
draws the same dropout mask and the gradients are bitwise those of plain SDPA. The price is one
more attention forward per layer (2 · L² · head_dim multiply-adds per head; at L = 128 and hidden
768 that is about 3% of a layer's forward flops). A call SDPA would give a fused kernel runs
unchanged, as on CUDA: it keeps no L² tensor, and a recompute would only drop its output and
log-sum-exp (one hidden-size tensor per layer: 69 MB of a SmolLM2 LoRA step at batch 2, seq 512)
for a second attention forward (about 4% of that step on the CPU). `recompute_attention` drops
them with the rest of the attention sub-block.

Eager attention (`attn_implementation="eager"`) computes the product, softmax and dropout as
separate ops, which this mode does not see: use SDPA (the transformers default) to get the saving.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from wtacrs.companions.dropout import RegeneratedDropoutMode
from wtacrs.companions.entry import Companion
from wtacrs.companions.usage import acted


def _saves_probabilities(args: tuple, kwargs: dict) -> bool:
    """Whether this SDPA call would run the math kernel, which keeps the L² probabilities for
    backward (SDPA's own choice, `torch._fused_sdp_choice`, with the same arguments; where torch
    lacks it, every call off CUDA)."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is not None:
        try:
            return choose(*args, **kwargs) == int(SDPBackend.MATH)
        except (RuntimeError, TypeError):  # an argument the chooser does not take: assume the worst
            pass
    query = args[0] if args else kwargs.get("query")
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
        if func is F.scaled_dot_product_attention and torch.is_grad_enabled() and _saves_probabilities(args, kwargs):
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


def _is_innermost_attention(module: torch.nn.Module, *_) -> bool:
    """Class name contains "Attention" and no submodule's does (BertSelfAttention, T5Attention)."""
    return "Attention" in type(module).__name__ and not any(
        "Attention" in type(child).__name__ for child in module.modules() if child is not module
    )


def _set_modes(module: torch.nn.Module, on) -> None:
    module.regenerate_dropout, module.recompute_sdpa = on.lean_dropout, on.lean_attention


# lean_dropout's functional dropout and lean_attention's SDPA calls, in the innermost attention
# modules; inside a recomputed attention block (`recompute.ENTRIES`) where both apply
ENTRIES = (Companion(("lean_dropout", "lean_attention"), AttentionCompanion, match=_is_innermost_attention,
                     set_up=_set_modes, state=("regenerate_dropout", "recompute_sdpa"), alone=False),)
