"""`wtacrs.batch`: which examples the current training step sees, for the gradient-norm cache."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from wtacrs.cache.first_visit import FirstVisitKeys, first_visit_keys
from wtacrs.modeling import sampling_state, swap_new_targets
from wtacrs.sampling.context import BatchContext, inside


@contextmanager
def batch(example_ids: Tensor | list[int], attention_mask: Tensor | None = None,
          model: nn.Module | None = None, anchors: Tensor | None = None,
          token_type_ids: Tensor | None = None) -> Iterator[None]:
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
        anchors: (B, K) int64 host tensor of each example's label positions in [0, T) (extractive
            QA: start and end positions), −1 for none; needs `attention_mask`. Examples not in the
            cache yet (and the padding of every anchored example, which the cache never holds) are
            then scored by the prior's tables keyed by offset from the nearest anchor and by token
            type (`wtacrs.cache.first_visit`) before position; examples whose anchors are all −1
            are scored as without anchors.
        token_type_ids: (B, T) integer host tensor of segment ids (BERT-like tokenizers), used with
            `anchors` to tell question from context; without it they share one token type.
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
    keys = _first_visit(anchors, token_type_ids, host_mask, ids.numel())
    context = BatchContext(ids.to(torch.int64).cpu(), host_mask, keys)
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


def _first_visit(anchors: Tensor | None, token_type_ids: Tensor | None, host_mask: Tensor | None,
                 batch_size: int) -> FirstVisitKeys | None:
    """The rows' first-visit keys from validated host tensors, or None without anchors."""
    if anchors is None:
        if token_type_ids is not None:
            raise ValueError("token_type_ids are only used with anchors")
        return None
    if not isinstance(anchors, Tensor) or anchors.dtype != torch.int64 or anchors.device.type != "cpu":
        raise ValueError("anchors must be an int64 tensor on the host (CPU), got "
                         f"{getattr(anchors, 'dtype', type(anchors))} on {getattr(anchors, 'device', '-')}")
    if host_mask is None:
        raise ValueError("anchors need the attention_mask: token types and padding come from it")
    length = host_mask.shape[1]
    if anchors.dim() != 2 or anchors.shape[0] != batch_size:
        raise ValueError(f"anchors must be (batch, K) with batch = {batch_size} example ids, "
                         f"got shape {tuple(anchors.shape)}")
    if anchors.numel() and (int(anchors.min()) < -1 or int(anchors.max()) >= length):
        raise ValueError(f"anchors must be positions in [0, {length}) or -1 for none")
    if token_type_ids is not None:
        if not isinstance(token_type_ids, Tensor) or token_type_ids.device.type != "cpu" or (
                token_type_ids.dtype.is_floating_point or token_type_ids.dtype == torch.bool):
            raise ValueError("token_type_ids must be an integer tensor on the host (CPU)")
        if token_type_ids.shape != host_mask.shape:
            raise ValueError(f"token_type_ids must have the attention_mask's shape {tuple(host_mask.shape)}, "
                             f"got {tuple(token_type_ids.shape)}")
    return first_visit_keys(host_mask, anchors, token_type_ids)
