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
each row's last position after the shift) count zero; their logits are still computed in their
chunk, since fixed chunks of all rows need no host read (no count or index of the labelled rows
comes back from the device inside the step). Exact: the same sums, in chunks.

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

from wtacrs.companions.entry import Companion
from wtacrs.companions.usage import acted

IGNORE_INDEX = -100
CHUNK_BYTES = 32 * 2**20  # float32 logits per chunk: 32 MiB is 170 tokens at a 49,152 vocabulary


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_rows, normalizer, *params):  # noqa: D102
        # Fixed chunks of all N rows, ignored ones included (their loss and gradient are zero):
        # selecting the labelled rows first would read their count back from the device.
        flat = hidden.detach().reshape(-1, hidden.shape[-1])  # (N, H)
        targets = targets.reshape(-1)
        scale = normalizer.reciprocal()  # () on the device
        grad_hidden = torch.zeros_like(flat) if ctx.needs_input_grad[0] else None
        # accumulated in place over the chunks, already divided by the normalizer
        grad_params = [torch.zeros_like(p) if needed else None for p, needed in zip(params, ctx.needs_input_grad[5:])]
        linear = type(head) is nn.Linear  # gradients by hand, accumulated with addmm_: no per-chunk (V, H) copy
        total = flat.new_zeros((), dtype=_loss_dtype(flat.dtype))
        for start in range(0, flat.shape[0], chunk_rows):
            h, t = flat[start:start + chunk_rows], targets[start:start + chunk_rows]  # (C, H), (C,)
            if linear:
                loss, grad_h = _linear_chunk(h, t, head, grad_params, scale, grad_hidden is not None)
            else:
                loss, grad_h = _module_chunk(h, t, head, params, grad_params, scale, grad_hidden is not None)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_rows] = grad_h
            total += loss
        kept = [grad_hidden, *grad_params]
        ctx.save_for_backward(*(g for g in kept if g is not None))
        ctx.present, ctx.hidden_shape, ctx.used = [g is not None for g in kept], hidden.shape, False
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        if ctx.used:  # the stored gradients are scaled in place below
            raise RuntimeError("chunked_lm_loss supports one backward per forward (no retain_graph reuse)")
        ctx.used = True
        saved = iter(ctx.saved_tensors)
        # The stored gradients are those of the loss itself: scaled by the incoming gradient in
        # place (1 after loss.backward()), with no host read of it and no second copy.
        grads = [next(saved).mul_(grad_loss) if present else None for present in ctx.present]
        grad_hidden = None if grads[0] is None else grads[0].view(ctx.hidden_shape)
        return grad_hidden, None, None, None, None, *grads[1:]


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision logits (as ForCausalLMLoss upcasts), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _linear_chunk(h: Tensor, targets: Tensor, head: nn.Linear, grad_params: list[Tensor | None], scale: Tensor,
                  want_hidden: bool) -> tuple[Tensor, Tensor | None]:
    """Summed loss of one chunk of rows h (C, H) under an nn.Linear head (rows labelled
    IGNORE_INDEX count zero), its gradient w.r.t. h (C, H) times `scale` (a 0-dim tensor), and
    `scale` times the head's weight (V, H) / bias (V,) gradients added into `grad_params`
    (weight first, as `head.parameters()` lists them)."""
    labelled = targets != IGNORE_INDEX  # (C,)
    targets = targets.clamp_min(0).unsqueeze(1)  # (C, 1); an ignored row's value is multiplied by 0 below
    logits = F.linear(h, head.weight, head.bias)
    logits = logits.to(_loss_dtype(logits.dtype))  # (C, V), upcast as ForCausalLMLoss does
    # log-sum-exp by hand, in place of the logits: torch.logsumexp would allocate a hidden
    # (C, V) temporary for logits - max, one more chunk of memory at the loss's peak
    target_logits = logits.gather(1, targets)  # (C, 1), before the logits are overwritten
    maxes = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    exps = logits.sub_(maxes).exp_()  # (C, V)
    sums = exps.sum(dim=-1, keepdim=True)  # (C, 1)
    loss = ((sums.log() + maxes - target_logits).squeeze(1) * labelled).sum()
    dlogits = exps.div_(sums)  # the softmax
    dlogits.scatter_add_(1, targets, torch.full_like(sums, -1.0))
    dlogits = dlogits.mul_((labelled.unsqueeze(1) * scale).to(dlogits.dtype)).to(head.weight.dtype)
    grads = iter(g for g in grad_params)
    for p in head.parameters():
        if p.requires_grad:
            total = next(grads)
            if total is not None and p is head.weight:
                total.addmm_(dlogits.mT, h.to(total.dtype))
            elif total is not None:
                total.add_(dlogits.sum(0))
    return loss, dlogits.mm(head.weight) if want_hidden else None


def _module_chunk(h: Tensor, targets: Tensor, head: nn.Module, params: tuple[Tensor, ...],
                  grad_params: list[Tensor | None], scale: Tensor, want_hidden: bool) -> tuple[Tensor, Tensor | None]:
    """`_linear_chunk` for any head module (a LoRA-wrapped lm_head), through autograd."""
    wanted = [p for p, g in zip(params, grad_params) if g is not None]
    with torch.enable_grad():
        h = h.requires_grad_(want_hidden)
        logits = head(h)
        loss = F.cross_entropy(logits.to(_loss_dtype(logits.dtype)), targets, ignore_index=IGNORE_INDEX,
                               reduction="sum")
        inputs = ([h] if want_hidden else []) + wanted
        grads = list(torch.autograd.grad(loss, inputs, allow_unused=True)) if inputs else []
    grad_h = grads.pop(0) * scale if want_hidden else None
    for total, g in zip((g for g in grad_params if g is not None), grads):
        if g is not None:
            total.add_(g.mul_(scale))  # g is autograd.grad's fresh tensor: scaled where it is
    return loss.detach(), grad_h


def chunked_lm_loss(
    hidden: Tensor,
    labels: Tensor,
    head: nn.Module,
    *,
    num_items_in_batch: Tensor | int | None = None,
    chunk_bytes: int | None = None,
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
        chunk_bytes: float32 logits per chunk (None: CHUNK_BYTES); chunks hold
            max(1, chunk_bytes // (4 V)) tokens.
    Returns:
        The scalar loss (float32; float64 for float64 hidden states and head).
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (B, L): next token, -100 at the end
    # the divisor stays a device tensor: a float() of it would make the step wait for the device
    count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    normalizer = torch.as_tensor(count, device=hidden.device).to(_loss_dtype(hidden.dtype))
    vocab = _output_features(head, hidden)
    chunk_rows = max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * vocab))
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
    an `lm_head` child module, the `ForCausalLMLoss` loss, and no logit soft-capping after the head."""
    # a direct child: PEFT's PeftModelForCausalLM forwards `lm_head` to the model it wraps
    if not type(module).__name__.endswith("ForCausalLM") or not isinstance(module._modules.get("lm_head"), nn.Module):
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


ENTRIES = (Companion(("chunked_lm_loss",), ChunkedLMLoss, match=lambda module, *_: has_chunkable_lm_loss(module)),)
