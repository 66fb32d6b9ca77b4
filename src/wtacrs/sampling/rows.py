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
    """One forward's `ForwardRows` by stream, set before the forward, read by each layer call."""

    def __init__(self):
        self._rows: dict[str, ForwardRows | None] = {}  # by stream (and unmasked shape)
        self._ids: Tensor | None = None
        self._warned_id_count = False

    def plan(self, context: BatchContext | None, masks: dict[str, tuple[Tensor, Tensor] | None]) -> list[ForwardRows]:
        """The layouts of a forward from its masks by stream ((B, T) on the device, the same on the
        host; None for a stream without one), keyed by the block's example ids."""
        self._ids = None if context is None else context.example_ids
        self._rows = {stream: None if pair is None else forward_rows(stream, *pair, context)
                      for stream, pair in masks.items()}
        return [rows for rows in self._rows.values() if rows is not None]

    def add(self, rows: ForwardRows) -> None:
        """A stream's layout made once the forward has begun (an encoder-decoder's decoder)."""
        self._rows[rows.key] = rows

    def of(self, stream: str) -> ForwardRows | None:
        """The layout set for `stream`, if any."""
        return self._rows.get(stream)

    def rows_for(self, stream: str, x: Tensor) -> ForwardRows | None:
        """The layout of x's rows, if they are (example, token) rows of this forward."""
        rows = self._rows.get(stream)
        if rows is None and stream in self._rows:  # no mask given: every row is real
            rows = self._unmasked(x)
        if rows is None or not rows.matches(x):
            if x.dim() == 3 and rows is not None and rows.example_ids is not None and not self._warned_id_count:
                logger.warning("wtacrs: the batch's mask is %s but a sampled layer's input is %s; "
                               "this layer samples by activation norms only",
                               tuple(rows.host_mask.shape), tuple(x.shape[:2]))
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


def forward_rows(stream: str, mask: Tensor, host_mask: Tensor, context: BatchContext | None) -> ForwardRows:
    """The row layout of one stream from its (B, T) bool mask on the device and on the host; the
    block's example ids and first-visit keys when they are for this layout."""
    ids = None if context is None else context.example_ids
    if ids is not None and ids.numel() != host_mask.shape[0]:
        ids = None
    keys = None
    if stream != "decoder" and context is not None and context.first_visit is not None and (
            context.attention_mask is not None) and (
            context.attention_mask.shape == host_mask.shape):  # anchors index the batch's own layout
        keys = context.first_visit
    return ForwardRows(stream, mask, host_mask, ids, live_count(host_mask), keys)


def live_count(host_mask: Tensor) -> int:
    """Real rows of a (B, T) bool mask on the host (a read of host memory, never a device wait)."""
    return int(host_mask.sum())
