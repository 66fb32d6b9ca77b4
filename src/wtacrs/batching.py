"""`wtacrs.batch`: one training step of the sampled models, planned from the batch's host tensors."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from wtacrs.cache.first_visit import FirstVisitKeys, first_visit_keys
from wtacrs.cache.norm_cache import check_example_ids
from wtacrs.modeling import follow_model_changes
from wtacrs.sampling.context import BatchContext, inside
from wtacrs.sampling.state import live_states


@contextmanager
def batch(example_ids: Tensor | list[int] | None = None, attention_mask: Tensor | None = None,
          anchors: Tensor | None = None, token_type_ids: Tensor | None = None) -> Iterator[None]:
    """One training step of the sampled models: plan it from the batch's host tensors.

    At enter, each sampled model in training mode plans its coming training forward from
    `attention_mask` (the step counter, the row layouts, the cache's scores for these examples,
    the draws' keys): the forward and backward inside then run no host code and wait for no
    device value, so the step can also be compiled (`torch.compile(model)` or the whole step,
    with `fullgraph=True`). The forward must get the same mask (else `MaskMismatchError`). An eval
    forward, or a second training forward (planned at its own start) may run inside the block too:
    each forward's backward uses its own rows. At exit, the output-gradient norms backward
    recorded are committed. Without the block, each training forward plans itself from its own
    mask (one copy of it to the host).

    Args:
        example_ids: (B,) non-negative integer ids, one per example of the batch, stable across
            epochs (e.g. the dataset index). Optional: only layers that draw their rows in forward
            score them by the gradient-norm cache, which the ids key (the default recipe's layers
            all draw in backward, with their true output-gradient norms).
        attention_mask: (B, T) the batch's attention mask while it is still on the host (before
            moving the batch to a GPU). Without it nothing is planned at enter.
        anchors: (B, K) int64 host tensor of each example's label positions in [0, T) (extractive
            QA: start and end positions), −1 for none; needs `attention_mask`. Examples not in the
            cache yet (and the padding of every anchored example, which the cache never holds) are
            then scored by the prior's tables keyed by offset from the nearest anchor and by token
            type (`wtacrs.cache.first_visit`) before position; examples whose anchors are all −1
            are scored as without anchors.
        token_type_ids: (B, T) integer host tensor of segment ids (BERT-like tokenizers), used with
            `anchors` to tell question from context; without it they share one token type.
    """
    host_mask = _host_mask(attention_mask)
    ids = _example_ids(example_ids, host_mask)
    batch_size = host_mask.shape[0] if host_mask is not None else None if ids is None else ids.numel()
    keys = _first_visit(anchors, token_type_ids, host_mask, batch_size)
    context = BatchContext(ids, host_mask, keys)
    with inside(context):
        try:
            if host_mask is not None:
                for state in live_states():
                    model = state.model
                    if model is not None and model.training:  # eval-mode models do not sample
                        follow_model_changes(model, state)
                        if state.plan_for_block(context, next(model.parameters()).device):
                            context.states.append(state)
            yield
            for state in context.states:
                state.commit()
        finally:
            for state in context.states:
                state.end_step()


def _host_mask(attention_mask: Tensor | None) -> Tensor | None:
    """The (B, T) bool mask, on the host: one on an accelerator is refused rather than copied back
    (the copy would make the host wait for the device at every step)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a (batch, seq) tensor, got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)}")
    if attention_mask.device.type != "cpu":
        raise ValueError(f"wtacrs.batch needs the attention_mask on the host (CPU), got it on "
                         f"{attention_mask.device}: pass it before moving the batch to the device")
    return attention_mask.to(torch.bool)


def _example_ids(example_ids: Tensor | list[int] | None, host_mask: Tensor | None) -> Tensor | None:
    """(B,) int64 host ids, checked as the cache checks them and against the mask's batch size."""
    if example_ids is None:
        return None
    ids = torch.as_tensor(example_ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"example_ids must be a 1-D sequence of integers, got {ids.dtype} of shape {tuple(ids.shape)}")
    if host_mask is not None and ids.numel() != host_mask.shape[0]:
        raise ValueError(f"{ids.numel()} example ids for an attention_mask of {host_mask.shape[0]} examples "
                         f"(shape {tuple(host_mask.shape)}): give one id per example")
    return check_example_ids(ids)


def _first_visit(anchors: Tensor | None, token_type_ids: Tensor | None, host_mask: Tensor | None,
                 batch_size: int | None) -> FirstVisitKeys | None:
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
