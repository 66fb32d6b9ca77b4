"""`GradNormCache`: what the sampler reads and writes, made of a `NormStore` and a `PositionPrior`.

Reads see the state as of the last `commit`; records wait in a buffer until then, so a recomputed
forward inside gradient checkpointing reads the same norms as the original forward did, and data
parallel training can exchange a step's records before any rank writes them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from wtacrs.cache.first_visit import FirstVisitKeys
from wtacrs.cache.prior import PositionPrior
from wtacrs.cache.records import PendingRecord, layout_of, on_host
from wtacrs.cache.store import NormStore, decode_norms, encode_norms, real_token_ordinals

# The store's index is a dense array over ids 0 … max id, 12 bytes each (`wtacrs.cache.store`):
# ids up to 2^32 - 1 keep it under 48 GiB; larger ones are hashes, not dataset indices.
MAX_EXAMPLE_ID = 2**32 - 1


def check_example_ids(example_ids: Tensor) -> Tensor:
    """(B,) int64 ids that key the cache, checked on the host: non-negative, at most
    `MAX_EXAMPLE_ID`, none twice in one batch. Ids on an accelerator are refused rather than
    copied back: the copy would make the host wait for the device in every step."""
    if example_ids.device.type != "cpu":
        raise ValueError(f"example_ids must be on the host (CPU), got them on {example_ids.device}: pass the "
                         "batch's ids before moving it to the device")
    ids = example_ids.detach().to(torch.int64)
    if bool((ids < 0).any()):
        raise ValueError("example_ids must be non-negative")
    if bool((ids > MAX_EXAMPLE_ID).any()):
        raise ValueError(f"example_ids must be at most {MAX_EXAMPLE_ID} (the cache's index is dense over ids: "
                         f"use dataset indices), got {int(ids.max())}")
    unique, counts = torch.unique(ids, return_counts=True)
    if bool((counts > 1).any()):
        twice = unique[counts > 1].tolist()
        shown = ", ".join(map(str, twice[:5])) + (" …" if len(twice) > 5 else "")
        raise ValueError(f"example id(s) {shown} appear more than once in one batch: each example's cached "
                         "norms are keyed by its id")
    return ids


class GradNormCache:
    """Host-memory cache of per-token output-gradient norms, keyed by (example id, token, slot).

    Args:
        num_slots: number of sampled layers that record norms (each gets a slot index).
        position_prior: answer lookups of unseen examples with the slot's prior (`wtacrs.cache.prior`:
            per-position means, and per anchor offset and token type for steps with anchors);
            False returns NaN for them (the paper's cache).
    """

    def __init__(self, num_slots: int, position_prior: bool = True):
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
        self.num_slots = num_slots
        self.position_prior = position_prior
        self.store = NormStore(num_slots)
        self.prior = PositionPrior(num_slots)
        self._pending: list[PendingRecord] = []

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return self.store.num_examples

    @property
    def nbytes(self) -> int:
        """Host bytes held, including spare capacity of the growable buffers."""
        return self.store.nbytes + self.prior.nbytes

    def bytes_per_example(self, real_tokens: int) -> int:
        """Bytes one example of `real_tokens` tokens costs: num_slots · tokens + index."""
        return self.store.bytes_per_example(real_tokens)

    def lookup(self, slot: int, example_ids: Tensor, row_mask: Tensor) -> Tensor:
        """Norms recorded for `slot` at the last visit of these examples.

        Args:
            example_ids: (B,) int64 non-negative ids.
            row_mask: (B, T) bool, True at real tokens.
        Returns:
            (B, T) float32 on the CPU. Padding is NaN; so is an example not recorded at this
            length (first visit, length changed), unless the position prior knows its positions.
        """
        return self.lookup_slots([slot], example_ids, row_mask)[0]

    def lookup_slots(self, slots: list[int], example_ids: Tensor, row_mask: Tensor,
                     keys: FirstVisitKeys | None = None) -> Tensor:
        """`lookup` for several slots at once (layers sharing one draw): (S, B, T) float32.

        With `keys` (a step with anchors), rows the store does not hold (unseen examples' rows,
        and padding, which it never holds) of anchored examples are answered by the prior's
        anchor, token-type, then position table; rows of examples without anchors as without keys.
        """
        ids = self._check_ids(example_ids, row_mask)
        for slot in slots:
            self._check_slot(slot)
        mask = row_mask.detach().cpu().to(torch.bool)
        codes, found = self.store.read(slots, ids, mask)
        norms = decode_norms(codes)
        if not self.position_prior:
            return norms
        unseen = mask & ~found
        if keys is not None:
            unseen = unseen | (~found & (keys.token_type >= 0))  # anchored examples' padding too
            if bool(unseen.any()):
                positions = torch.where(mask, real_token_ordinals(mask), -1)[unseen]
                norms[:, unseen] = self.prior.lookup_first_visit(slots, keys.anchor[unseen],
                                                                 keys.token_type[unseen], positions)
        elif bool(unseen.any()):
            norms[:, unseen] = self.prior.lookup(slots, real_token_ordinals(mask)[unseen])
        return norms

    # -- updates -------------------------------------------------------------------------------
    def record(self, slot: int, example_ids: Tensor, row_mask: Tensor, norms: Tensor,
               keys: FirstVisitKeys | None = None) -> None:
        """Buffer (B, T) norms of one layer's output gradient (any device); written at the next
        `commit` (with `keys`, the step's anchors: into the prior's first-visit tables too)."""
        self._check_slot(slot)
        ids = self._check_ids(example_ids, row_mask)
        if norms.shape != row_mask.shape:
            raise ValueError(f"norms shape {tuple(norms.shape)} does not match row_mask {tuple(row_mask.shape)}")
        # Encoded and kept where they are (maybe a GPU) until commit: a copy to the host here
        # would stall every backward step on every sampled layer.
        self._pending.append(PendingRecord(slot, ids, row_mask.detach(), encode_norms(norms.detach()), keys))

    def record_layers(self, slots: list[int], example_ids: Tensor, row_mask: Tensor, codes: Tensor,
                      keys: FirstVisitKeys | None = None) -> None:
        """`record` of one step's layers at once, already encoded: codes (len(slots), B, T) uint8
        on the host (`encode_norms`); the arguments are checked once for all of them."""
        ids = self._check_ids(example_ids, row_mask)
        for slot in slots:
            self._check_slot(slot)
        if codes.dtype != torch.uint8 or codes.shape != (len(slots), *row_mask.shape):
            raise ValueError(f"codes must be uint8 of shape {(len(slots), *row_mask.shape)}, "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        self._pending.extend(PendingRecord(slot, ids, row_mask, code, keys) for slot, code in zip(slots, codes))

    def discard_pending(self) -> None:
        """Drop buffered records (e.g. a step skipped for non-finite gradients)."""
        self._pending.clear()

    def exchange_pending(self, exchange: Callable[[list[PendingRecord]], list[PendingRecord]]) -> None:
        """Replace the buffered records by `exchange(records)` before a commit (data-parallel
        training passes an all-gather, so every rank commits every rank's records)."""
        self._pending = list(exchange(on_host(self._pending)))

    def commit(self) -> None:
        """Write all buffered records: one scatter per row layout (the layers of a step share one)."""
        groups: dict[tuple, list[PendingRecord]] = {}
        for record in on_host(self._pending):
            groups.setdefault(layout_of(record), []).append(record)
        for records in groups.values():
            records = list({r.slot: r for r in records}.values())  # a slot called twice (ALBERT): its last call
            ids, mask = records[0].example_ids, records[0].row_mask
            slots = torch.tensor([r.slot for r in records])  # (R,)
            every = torch.stack([r.codes for r in records])  # (R, B, T), padding included
            codes = every[:, mask]  # (R, U) codes of the real tokens
            self.store.write(slots, ids, mask, codes)
            self.prior.update(slots, real_token_ordinals(mask)[mask], decode_norms(codes))
            if records[0].keys is not None:
                self.prior.update_first_visit(slots, records[0].keys, decode_norms(every))
        self._pending.clear()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Compact tensors (no spare capacity); pending records are not included."""
        return {"num_slots": torch.tensor(self.num_slots), **self.store.state_dict(), **self.prior.state_dict()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if int(state["num_slots"]) != self.num_slots:
            raise ValueError(f"cache has {int(state['num_slots'])} slots, this model samples {self.num_slots} layers")
        self.store.load_state_dict(state)
        self.prior.load_state_dict(state)
        self._pending.clear()

    # -- argument checks -----------------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")

    def _check_ids(self, example_ids: Tensor, row_mask: Tensor) -> Tensor:
        """Validated host int64 ids; the mask is checked for shape only (it may live on a GPU)."""
        if example_ids.dim() != 1 or example_ids.dtype.is_floating_point or example_ids.dtype == torch.bool:
            raise ValueError("example_ids must be a 1-D integer tensor, "
                             f"got {example_ids.dtype} {tuple(example_ids.shape)}")
        if row_mask.dim() != 2 or row_mask.shape[0] != example_ids.shape[0]:
            raise ValueError(
                f"row_mask must be (batch, seq) with batch = len(example_ids) = {example_ids.shape[0]}, "
                f"got {tuple(row_mask.shape)}"
            )
        return check_example_ids(example_ids)
