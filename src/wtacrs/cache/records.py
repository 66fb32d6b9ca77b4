"""The typed record of one layer's norms in one step, between backward and `GradNormCache.commit`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from wtacrs.cache.first_visit import FirstVisitKeys


@dataclass(frozen=True)
class PendingRecord:
    """One layer's output-gradient norms of one step, waiting for a commit.

    Attributes:
        slot: the sampled layer's slot.
        example_ids: (B,) int64 on the host.
        row_mask: (B, T) bool, True at real tokens.
        codes: (B, T) uint8 `encode_norms` codes of ‖dY_i‖ (0: missing), padding included.
        keys: the rows' first-visit keys (host) if the step gave anchors, else None.
    `row_mask` and `codes` may still be on the device that computed them (`on_host` moves them):
    copying them out in backward would stall every sampled layer.
    """

    slot: int
    example_ids: Tensor
    row_mask: Tensor
    codes: Tensor
    keys: FirstVisitKeys | None = None


def layout_of(record: PendingRecord) -> tuple:
    """What identifies a record's row layout: the records of one step share their ids and mask
    tensors (a commit writes each layout once, and a data-parallel exchange sends it once)."""
    return record.example_ids.data_ptr(), record.row_mask.data_ptr(), tuple(record.row_mask.shape)


def on_host(records: list[PendingRecord]) -> list[PendingRecord]:
    """The records with host tensors. Codes on a device move in one transfer per (device, shape)
    (one copy per layer would cost a device round trip each); the layers of a forward share a few
    mask tensors, each copied once."""
    on_device: dict[tuple, list[int]] = {}
    for i, record in enumerate(records):
        if record.codes.device.type != "cpu":
            on_device.setdefault((record.codes.device, record.codes.shape), []).append(i)
    moved = list(records)
    for positions in on_device.values():
        codes = torch.stack([records[i].codes for i in positions]).cpu()
        for i, code in zip(positions, codes):
            moved[i] = dataclasses.replace(moved[i], codes=code)
    host_masks: dict[int, Tensor] = {}
    return [dataclasses.replace(r, row_mask=host_masks.setdefault(id(r.row_mask), r.row_mask.cpu().to(torch.bool)))
            for r in moved]
