"""Row layouts: which rows of a forward's activations are which examples' tokens, per stream.

A stream is the attention mask that lays out a layer's rows: the model's ("main"), or an
encoder-decoder's "encoder" and "decoder" masks (`modeling._stream`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from wtacrs.cache.first_visit import FirstVisitKeys
from wtacrs.sampling.context import BatchContext
from wtacrs.sampling.transport import to_device

logger = logging.getLogger(__name__)


@dataclass
class ForwardRows:
    """How the rows of one stream's activations map to examples in the current forward.

    Attributes:
        key: names the layout within a forward (the stream, or the shape of an unmasked one).
        mask: (B, T) bool on the model's device (sampling and the padding check), or None.
        host_mask: (B, T) bool on the host (cache keys and live-row counts).
        example_ids: (B,) int64 on the host, or None outside `wtacrs.batch`.
        live: real rows (host_mask's count).
        first_visit: the rows' first-visit keys (host) when the batch gave anchors for this layout.
    """

    key: str
    mask: Tensor | None
    host_mask: Tensor
    example_ids: Tensor | None
    live: int
    first_visit: FirstVisitKeys | None = None

    def matches(self, x: Tensor) -> bool:
        return x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.host_mask.shape)


class RowLayouts:
    """The current forward's `ForwardRows` by stream, set before the forward, read by each layer call."""

    def __init__(self):
        self._rows: dict[str, ForwardRows | None] = {}  # by stream (and unmasked shape), for this forward
        # Read at the top-level forward: a checkpoint recompute runs inside backward, which autograd
        # runs on a device thread for CUDA tensors, where the batch's context variable is not set.
        self._ids: Tensor | None = None
        self._warned_id_count = False

    def begin(self, masks: dict[str, Tensor | None], context: BatchContext | None) -> None:
        """A forward's layouts from its (B, T) masks by stream (the batch's host mask is not a decoder's)."""
        self._ids = None if context is None else context.example_ids
        self._rows = {stream: forward_rows(stream, mask, context, host_mask_given=stream != "decoder")
                      for stream, mask in masks.items()}

    def plan(self, context: BatchContext, streams: set[str], device: torch.device) -> list[ForwardRows]:
        """The layouts of a planned step, all from the batch's host mask (one copy to `device`)."""
        host_mask = context.attention_mask
        mask = to_device(host_mask, device)
        live = live_count(host_mask)
        self._ids = context.example_ids
        self._rows = {stream: ForwardRows(stream, mask, host_mask, context.example_ids, live, context.first_visit)
                      for stream in streams}
        return list(self._rows.values())

    def of(self, stream: str) -> ForwardRows | None:
        """The layout set for `stream` (planned, or from its mask), if any."""
        return self._rows.get(stream)

    def rows_for(self, stream: str, x: Tensor) -> ForwardRows | None:
        """The layout of x's rows, if they are (example, token) rows of this forward."""
        rows = self._rows.get(stream)
        if rows is None and stream in self._rows:  # no mask given: every row is real
            rows = self._unmasked(x)
        if rows is None or not rows.matches(x):
            if x.dim() == 3 and rows is not None and rows.example_ids is not None and not self._warned_id_count:
                logger.warning("wtacrs: %d example ids for a batch of %d; this layer samples by activation norms only",
                               rows.example_ids.numel(), x.shape[0])
                self._warned_id_count = True
            return None
        return rows

    def _unmasked(self, x: Tensor) -> ForwardRows | None:
        ids = self._ids
        if ids is None or x.dim() != 3 or x.shape[0] != ids.numel():
            return None
        key = f"unmasked-{x.shape[0]}x{x.shape[1]}"
        if key not in self._rows:  # one per shape and forward, so the reader's tables key on it
            everything = torch.ones(x.shape[:2], dtype=torch.bool)
            self._rows[key] = ForwardRows(key, None, everything, ids, x.shape[0] * x.shape[1])
        return self._rows[key]


def forward_rows(stream: str, mask: Tensor | None, context: BatchContext | None,
                 host_mask_given: bool) -> ForwardRows | None:
    """The row layout of one stream from its (B, T) mask; the host copy comes from the batch
    context when it is this stream's (`host_mask_given`) and matches (no wait), else from the
    mask itself (one copy per forward)."""
    ids = None if context is None else context.example_ids
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    host = context.attention_mask if context is not None and host_mask_given else None
    keys = None if host is None else context.first_visit  # anchors index the batch's own layout
    if host is None or host.shape != mask.shape:
        host, keys = mask.cpu(), None
    if ids is not None and ids.numel() != mask.shape[0]:
        ids = None
    return ForwardRows(stream, mask, host, ids, live_count(host), keys)


def live_count(host_mask: Tensor) -> int:
    """Real rows of a (B, T) bool mask on the host (a read of host memory, never a device wait)."""
    return int(host_mask.sum())
