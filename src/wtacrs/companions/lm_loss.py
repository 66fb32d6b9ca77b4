"""Next-token cross-entropy that never holds the whole (tokens × vocabulary) logits.

A causal LM's training step computes logits = lm_head(h) for every token and the cross-entropy
on them: with SmolLM2's vocabulary of 49,152 that is 200 MB of float32 logits per 1,024-token
sequence (the loss upcasts them), their softmax kept for backward, and a gradient of the same
size, often the largest tensors of a LoRA step. Liger-Kernel's fused linear cross-entropy
(Hsu et al. 2024, arXiv 2410.10989) cuts the tokens into chunks and, in the forward pass,
computes each chunk's logits, loss and gradients with respect to h and to the head's weight at
once, then drops the logits; backward only scales the stored gradients by the incoming one.
Apple's cut cross-entropy (Wijmans et al. 2024, arXiv 2411.09009) instead recomputes the logits
blockwise in backward, which costs the head's matmul once more.

`chunked_lm_loss` is Liger's scheme in plain PyTorch: per chunk of tokens it runs the head and
`F.cross_entropy(..., reduction="sum")` under autograd and takes their gradients right away with
`torch.autograd.grad`, so any head module works (a plain or LoRA-wrapped `lm_head`, weights tied
to the embedding). The matmuls are those of the plain step, none repeated; what stays alive
between forward and backward is the gradient of h (tokens × hidden) and of the trainable head
parameters (which backward produces anyway). Tokens whose label is ignored (-100: padding, and
each row's last position after the shift) are skipped. Exact: the same sums, in chunks.

`ChunkedLMLoss` is the companion (`WTACRSConfig.chunked_lm_loss`): a mixin for transformers'
`*ForCausalLM` models whose loss is `ForCausalLMLoss`; in a training forward given `labels`, it
runs the model with its head replaced by the identity (so the model returns h as "logits") and
computes the loss with `chunked_lm_loss`. The output's `logits` is then None: a training step
that reads them (rather than the loss) should not use this companion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs.companions.usage import acted

IGNORE_INDEX = -100
CHUNK_BYTES = 32 * 2**20  # float32 logits per chunk: 32 MiB is 170 tokens at a 49,152 vocabulary


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_rows, normalizer, *params):  # noqa: D102
        flat = hidden.detach().reshape(-1, hidden.shape[-1])  # (N, H)
        targets = targets.reshape(-1)
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (T,) positions with a label
        grad_hidden = torch.zeros_like(flat) if ctx.needs_input_grad[0] else None
        grad_params = [torch.zeros_like(p) if needed else None
                       for p, needed in zip(params, ctx.needs_input_grad[5:])]
        wanted = [p for p, g in zip(params, grad_params) if g is not None]
        total = flat.new_zeros((), dtype=torch.float32)
        for chunk in rows.split(chunk_rows):
            with torch.enable_grad():
                h = flat.index_select(0, chunk).requires_grad_(grad_hidden is not None)
                logits = head(h).float()  # as ForCausalLMLoss upcasts
                loss = F.cross_entropy(logits, targets.index_select(0, chunk), reduction="sum")
                inputs = ([h] if grad_hidden is not None else []) + wanted
                grads = list(torch.autograd.grad(loss, inputs, allow_unused=True)) if inputs else []
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, chunk, grads.pop(0))
            for g_total, g in zip((g for g in grad_params if g is not None), grads):
                if g is not None:
                    g_total.add_(g)
            total += loss.detach()
            del logits, loss  # free this chunk's logits before the next one's
        ctx.save_for_backward(*([grad_hidden] if grad_hidden is not None else []),
                              *(g for g in grad_params if g is not None))
        ctx.has_hidden_grad, ctx.param_needed = grad_hidden is not None, [g is not None for g in grad_params]
        ctx.normalizer, ctx.hidden_shape = normalizer, hidden.shape
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        saved = list(ctx.saved_tensors)
        scale = grad_loss / ctx.normalizer
        grad_hidden = None
        if ctx.has_hidden_grad:
            grad_hidden = (saved.pop(0) * scale).view(ctx.hidden_shape)
        grad_params = [saved.pop(0) * scale if needed else None for needed in ctx.param_needed]
        return grad_hidden, None, None, None, None, *grad_params


def chunked_lm_loss(
    hidden: Tensor,
    labels: Tensor,
    head: nn.Module,
    *,
    num_items_in_batch: Tensor | int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Tensor:
    """Causal-LM cross-entropy of `head(hidden)` against `labels` shifted by one, computed in
    chunks of tokens (see the module docstring); equal to transformers' `ForCausalLMLoss` on the
    full logits, with the same gradients, up to summation order.

    Args:
        hidden: (B, L, H) final hidden states (after the final norm).
        labels: (B, L) int64 token ids, IGNORE_INDEX (-100) where no loss is wanted; position t
            is predicted from hidden[:, t - 1].
        head: maps (T, H) → (T, V) row by row (the model's `lm_head`).
        num_items_in_batch: the loss's divisor, as transformers' Trainer passes under gradient
            accumulation; None: the number of labelled positions of this batch (the mean).
        chunk_bytes: float32 logits per chunk; chunks hold max(1, chunk_bytes // (4 V)) tokens.
    Returns:
        The scalar loss (float32).
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (B, L): next token, -100 at the end
    if num_items_in_batch is None:
        normalizer = float((targets != IGNORE_INDEX).sum())
    else:
        normalizer = float(num_items_in_batch)
    vocab = _output_features(head, hidden)
    chunk_rows = max(1, chunk_bytes // (4 * vocab))
    params = [p for p in head.parameters() if p.requires_grad]
    return _ChunkedLinearCrossEntropy.apply(hidden, targets, head, chunk_rows, normalizer, *params)


def _output_features(head: nn.Module, hidden: Tensor) -> int:
    """V, the head's output width: `out_features` of a linear (maybe LoRA-wrapped), else measured."""
    for module in (head, getattr(head, "base_layer", None)):
        if isinstance(module, nn.Linear):
            return module.out_features
    with torch.no_grad():
        return head(hidden.detach().reshape(-1, hidden.shape[-1])[:1]).shape[-1]


def has_chunkable_lm_loss(module: nn.Module) -> bool:
    """Whether `module` is a transformers causal LM whose training loss `ChunkedLMLoss` can compute:
    an `lm_head` module, the `ForCausalLMLoss` loss, and no logit soft-capping after the head."""
    if not type(module).__name__.endswith("ForCausalLM") or not isinstance(getattr(module, "lm_head", None), nn.Module):
        return False
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    config = getattr(module, "config", None)
    return getattr(module, "loss_function", None) is ForCausalLMLoss and getattr(
        config, "final_logit_softcapping", None) is None


class ChunkedLMLoss:
    """Mixin for causal LMs (`has_chunkable_lm_loss`): a training forward given `labels` as a
    keyword computes the loss with `chunked_lm_loss` and returns no logits (module docstring)."""

    def forward(self, *args, **kwargs):  # noqa: D102
        labels = kwargs.get("labels")
        if labels is None or not (self.training and torch.is_grad_enabled()) or kwargs.get("shift_labels") is not None:
            return super().forward(*args, **kwargs)
        acted(self, "chunked_lm_loss")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        head = self.lm_head
        self._modules["lm_head"] = nn.Identity()  # the model's "logits" are then its final hidden states
        try:
            output = super().forward(*args, **{**kwargs, "labels": None})
        finally:
            self._modules["lm_head"] = head
        output["loss"] = chunked_lm_loss(output.logits, labels, head, num_items_in_batch=num_items_in_batch)
        output["logits"] = None
        return output
