"""First-visit keys: what the host knows about each row before its example's gradient was ever seen.

On an example's first visit the cache has no ‖dY_i‖. When the step knows label positions
("anchors", e.g. an extractive-QA window's start and end positions), the prior is keyed by each
row's offset from the nearest anchor and, beyond `ANCHOR_WINDOW`, by the row's token type
(`benchmarks/FIRST_VISIT.md`: on SQuAD this cut the median first-visit relative variance of
WTA-CRS@0.3 from 1.3–1.7 to 0.14–0.15 against the per-position prior).

Token types come from host tensors only: the attention mask and, if given, token_type_ids.
- padding (outside the mask) is `PAD`; the first real token `FIRST` ([CLS]); the last `LAST`
  (the final [SEP], or a decoder's last token);
- other real tokens are `SEGMENT_B` where token_type_ids ≠ 0 (a BERT-like QA window's context),
  else `SEGMENT_A` (its question); the segment-A token just before segment B is `END_A` (the
  first [SEP]);
- without token_type_ids (RoBERTa-like or decoder tokenizers) every inner real token is
  `SEGMENT_A`: question and context share one type, and only [CLS], last token and padding stand
  apart. Anchored rows are keyed by offset first, so the type table matters beyond the window only.

Examples whose anchors are all −1 get no keys (−1): they are looked up exactly as without anchors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ANCHOR_WINDOW = 8  # rows within ±W of an anchor are keyed by their offset (the study's W)
PAD, FIRST, SEGMENT_A, END_A, SEGMENT_B, LAST = range(6)
NUM_TOKEN_TYPES = 6


@dataclass(frozen=True)
class FirstVisitKeys:
    """Per row of one layout, the columns of the prior's first-visit tables (−1: no key).

    Attributes:
        anchor: (B, T) int64, column of the anchor table: ((k · 2 + at_first) · (2W + 1) + offset + W)
            for the nearest anchor k, at_first = that anchor is the example's first real token
            (QA labels a window without the answer at [CLS]); −1 beyond W or without anchors.
        token_type: (B, T) int64 in [0, NUM_TOKEN_TYPES), −1 for examples without anchors.
    """

    anchor: Tensor
    token_type: Tensor


def first_visit_keys(mask: Tensor, anchors: Tensor, token_type_ids: Tensor | None = None,
                     window: int = ANCHOR_WINDOW) -> FirstVisitKeys:
    """Keys of every row (padding included: QA samples it) from host tensors.

    Args:
        mask: (B, T) bool, True at real tokens.
        anchors: (B, K) int64 label positions in [0, T), −1 for none.
        token_type_ids: (B, T) integer segment ids, or None.
    """
    anchored = (anchors >= 0).any(1, keepdim=True)  # (B, 1)
    types = torch.where(anchored, token_types(mask, token_type_ids), -1)
    return FirstVisitKeys(anchor_keys(mask, anchors, window), types)


def token_types(mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
    """(B, T) int64 token type of each row by the rule in the module docstring."""
    batch, length = mask.shape
    t = torch.arange(length).expand(batch, length)
    has_real = mask.any(1, keepdim=True)
    first = mask.int().argmax(1, keepdim=True)  # (B, 1) first real position (0 without any)
    last = length - 1 - mask.flip(1).int().argmax(1, keepdim=True)
    segment_b = torch.zeros_like(mask) if token_type_ids is None else (token_type_ids != 0) & mask
    types = torch.where(segment_b, SEGMENT_B, SEGMENT_A)
    start_b = torch.where(segment_b.any(1, keepdim=True), segment_b.int().argmax(1, keepdim=True), -1)
    types = torch.where((t == start_b - 1) & ~segment_b & (start_b - 1 > first), END_A, types)
    types = torch.where((t == last) & has_real, LAST, types)
    types = torch.where((t == first) & has_real, FIRST, types)
    return torch.where(mask, types, PAD).to(torch.int64)


def anchor_keys(mask: Tensor, anchors: Tensor, window: int = ANCHOR_WINDOW) -> Tensor:
    """(B, T) int64 anchor-table column of each row (see `FirstVisitKeys.anchor`), −1 for none."""
    batch, length = mask.shape
    if anchors.shape[1] == 0:
        return torch.full((batch, length), -1, dtype=torch.int64)
    t = torch.arange(length)
    offset = t.view(1, 1, -1) - anchors.unsqueeze(2)  # (B, K, T)
    distance = torch.where((anchors >= 0).unsqueeze(2), offset.abs(), length + window + 1)
    nearest = distance.argmin(1, keepdim=True)  # (B, 1, T), ties to the first anchor
    offset = offset.gather(1, nearest).squeeze(1)
    near = distance.gather(1, nearest).squeeze(1) <= window
    first = mask.int().argmax(1, keepdim=True)
    at_first = (anchors.gather(1, nearest.squeeze(1)) == first).long()
    key = (nearest.squeeze(1) * 2 + at_first) * (2 * window + 1) + offset + window
    return torch.where(near, key, -1)
