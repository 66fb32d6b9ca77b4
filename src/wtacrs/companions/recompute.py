"""Recompute an activation function's input in backward instead of saving it. Exact.

In BERT-style blocks the intermediate module is `act(dense(x))`. The activation's input (4 ·
hidden per token) is the largest tensor a step still saves once the linear inputs are sampled
and dropout, LayerNorm and attention are lean, and only the activation's backward reads it.
Running that module under non-reentrant `torch.utils.checkpoint` saves only x, which the
preceding LayerNorm keeps anyway (its output, with lean LayerNorm), and recomputes dense(x) and
the activation in backward: one more hidden → 4·hidden matmul per block, a third of the block's
forward matmul flops. Sampled layers inside redo the same draw (draws are keyed by the input
tensor and regathered), and the recompute restores the RNG state.

Applies to modules whose children are exactly one linear layer (plain or LoRA-wrapped) and one
elementwise activation (`BertIntermediate` and its copies in RoBERTa, ELECTRA, ...). With LoRA the
recompute runs the frozen matmul and the adapter again. Other MLPs (T5, GPT-2, LLaMA,
DistilBERT) also contain their output projection, which a checkpoint would recompute too; they
are left alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wtacrs.companions.activation import elementwise_activation_types


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or an adapter wrapping one (PEFT's LoRA layers keep it as `base_layer`)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def is_linear_then_activation(module: nn.Module) -> bool:
    """Whether `module`'s children are exactly one linear layer (maybe LoRA-wrapped) and one
    elementwise activation."""
    children = list(module.children())
    return (
        len(children) == 2
        and sum(_is_linear(c) for c in children) == 1
        and sum(isinstance(c, elementwise_activation_types()) for c in children) == 1
    )


class RecomputesActivationInput:
    """Mixin: in training, forward runs under non-reentrant checkpoint (see module docstring)."""

    def forward(self, *args, **kwargs):  # noqa: D102
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)
