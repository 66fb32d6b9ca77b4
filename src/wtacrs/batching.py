"""`wtacrs.batch`: which examples the current training step sees, for the gradient-norm cache."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from wtacrs.modeling import sampling_state, swap_new_targets
from wtacrs.sampling.context import BatchContext, inside


@contextmanager
def batch(example_ids: Tensor | list[int], attention_mask: Tensor | None = None,
          model: nn.Module | None = None) -> Iterator[None]:
    """Tell sampled models which examples the current training step sees.

    Forward passes inside the block read the gradient-norm cache for these examples; output
    gradient norms computed by backward inside the block are committed when it exits.

    Args:
        example_ids: (B,) non-negative integer ids, one per example of the batch, stable
            across epochs (e.g. the dataset index).
        attention_mask: (B, T) the batch's attention mask while it is still on the host (before
            moving the batch to a GPU): lets the step count live rows and look up the cache
            without waiting for the GPU. Optional, except with `model`.
        model: a model with `wtacrs.apply` whose step's host work (step counter, cache lookup,
            row layout, the draws' key) is done here, at enter, and whose norms are collected at
            exit: its forward and backward inside the block then run no host code, so a training
            step can be compiled whole (`torch.compile(step, fullgraph=True)`, see README). The
            block then holds one training forward of `model`, whose rows are laid out as
            `attention_mask` (an encoder-decoder's decoder samples by activation norms only).
    """
    ids = torch.as_tensor(example_ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"example_ids must be a 1-D sequence of integers, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.device.type == "cpu" and ids.numel() and int(ids.min()) < 0:
        raise ValueError("example_ids must be non-negative")
    host_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != ids.numel():
            raise ValueError(f"attention_mask must be (batch, seq) with batch = {ids.numel()} example ids, "
                             f"got shape {tuple(attention_mask.shape)}")
        host_mask = attention_mask.cpu().to(torch.bool)
    planned = None
    if model is not None:
        if host_mask is None:
            raise ValueError("wtacrs.batch(model=...) needs the attention_mask: it lays out the rows "
                             "before the forward")
        planned = sampling_state(model)
        swap_new_targets(model, planned)
    context = BatchContext(ids.to(torch.int64).cpu(), host_mask)
    with inside(context):
        try:
            if planned is not None:
                planned.plan_step(context, next(model.parameters()).device)
            yield
            for state in context.states:
                state.commit()
        finally:
            for state in context.states:
                state.end_step()
