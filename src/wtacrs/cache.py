"""Gradient-norm cache: ‖dY_i‖ from an example's previous visit, for the scores ‖X_i‖·‖dY_i‖.

The optimal CRS distribution needs the output-gradient norms, which forward does not know.
Liu et al. (2023, Sec. 4) reuse the norms recorded when the same training example last passed
through the layer. Stale or missing norms only change the sampling distribution, and every
estimator stays unbiased for any positive distribution (see `estimators.column_row_scores`).

Storage, per example: one byte per real (unpadded) token per sampled layer slot, as a log-scale
code (4 codes per octave, 2^-40 … 2^23.5; relative error <= 9%, which moves the sampling
probabilities but not the mean), plus 12 bytes of index. The index is a dense array over ids
0 … max id, so ids should be dense (dataset indices are); sparse ids cost 12 bytes per unused
id. The reference code keeps bf16 for every padded position of every layer. Positions are keyed
by the ordinal of the real token in its example, so left and right padding and dynamic padding
find the same entry.

Examples not seen yet (the whole first epoch) get a prior instead of nothing: per slot, the mean
norm at each token position over the examples of recent steps (an exponential moving average,
`PRIOR_DECAY` per step; num_slots × positions float32). Gradient norms are strongly structured by
position: in a classifier that reads only the first token, every other row of the last block's
query, attention-output and MLP layers has ‖dY_i‖ = 0, and value layers concentrate on a few
positions. Measured on all-MiniLM-L6-v2, two real SST-2 batches of 32 (`benchmarks/FIRST_EPOCH.md`),
WTA-CRS@0.3's relative variance E‖dŴ − dW‖² / ‖dW‖² with the prior from the other batch, against
activation norms only: last block's query, attention output and MLP 3.0–10.1 → 0; value layers
3.4–9.0 → 0.14–2.5; the rest about unchanged. Like any positive distribution it leaves the
estimator unbiased.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

_LOG2_MIN = -40.0
_CODES_PER_OCTAVE = 4.0
_MISSING = 0
_INDEX_BYTES_PER_EXAMPLE = 12  # int64 offset + int32 length
PRIOR_DECAY = 0.9  # weight of the previous per-position mean at each commit

class PendingRecord(NamedTuple):
    """One layer's norms of one step, buffered until `GradNormCache.commit`."""

    slot: int
    example_ids: Tensor  # (B,) int64 on the host
    row_mask: Tensor  # (B, T) bool, True at real tokens (on the host once materialised)
    codes: Tensor  # (B, T) uint8 `encode_norms` codes (on the host once materialised)


def encode_norms(norms: Tensor) -> Tensor:
    """(…) float norms → (…) uint8 codes, 0 for non-finite (treated as missing)."""
    g = norms.float()
    code = torch.round((torch.log2(g.clamp(min=2.0**_LOG2_MIN)) - _LOG2_MIN) * _CODES_PER_OCTAVE) + 1
    return torch.where(torch.isfinite(g), code.clamp(1, 255), _MISSING).to(torch.uint8)


def decode_norms(codes: Tensor) -> Tensor:
    """(…) uint8 codes → (…) float32 norms, NaN where missing."""
    g = torch.exp2((codes.float() - 1) / _CODES_PER_OCTAVE + _LOG2_MIN)
    return torch.where(codes == _MISSING, torch.nan, g)


def _grown(t: Tensor, size: int, fill: int) -> Tensor:
    if size <= t.numel():
        return t
    out = torch.full((max(size, 2 * t.numel()),), fill, dtype=t.dtype)
    out[: t.numel()] = t
    return out


class PositionPrior:
    """Per slot and real-token position, an exponential moving average of ‖dY‖ (`PRIOR_DECAY` per
    update): the scores of examples not seen yet (module docstring). (slots, positions) float32."""

    def __init__(self, num_slots: int):
        self.means = torch.full((num_slots, 0), torch.nan)  # NaN: no record at that position yet

    def update(self, slots: Tensor, positions: Tensor, norms: Tensor) -> None:
        """Fold one row layout's per-position mean norms into these slots' averages.

        Args:
            slots: (R,) slots; positions: (U,) real-token ordinals; norms: (R, U), NaN = missing.
        """
        norms = norms.nan_to_num(0.0)
        size = int(positions.max()) + 1 if positions.numel() else 0
        if size > self.means.shape[1]:
            grown = torch.full((self.means.shape[0], size), torch.nan)
            grown[:, : self.means.shape[1]] = self.means
            self.means = grown
        count = torch.zeros(size).index_add_(0, positions, torch.ones(positions.shape))
        mean = torch.zeros(len(slots), size).index_add_(1, positions, norms) / count.clamp(min=1)
        old = self.means[slots, :size]
        update = torch.where(old.isnan(), mean, PRIOR_DECAY * old + (1 - PRIOR_DECAY) * mean)
        self.means[slots, :size] = torch.where(count > 0, update, old)

    def lookup(self, slots: list[int], positions: Tensor) -> Tensor:
        """(S, U) averages of these slots at real-token ordinals (U,); NaN where none is known."""
        known = self.means.shape[1]
        if known == 0:
            return torch.full((len(slots), positions.numel()), torch.nan)
        prior = self.means[slots][:, positions.clamp(max=known - 1)]
        return torch.where(positions < known, prior, torch.nan)


class GradNormCache:
    """Host-memory store of per-token output-gradient norms, keyed by (example id, token, slot).

    Args:
        num_slots: number of sampled layers that record norms (each gets a slot index).
        position_prior: answer lookups of unseen examples with the slot's per-position mean
            (module docstring); False returns NaN for them (the paper's cache).

    Reads (`lookup`) see the state as of the last `commit`; `record` buffers until `commit`,
    so a recomputed forward inside gradient checkpointing reads the same norms as the
    original forward did.
    """

    def __init__(self, num_slots: int, position_prior: bool = True):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.position_prior = position_prior
        self.prior = PositionPrior(num_slots)
        self._data = torch.zeros(0, dtype=torch.uint8)
        self._used = 0
        self._offset = torch.zeros(0, dtype=torch.int64)  # by example id, -1 = no entry
        self._length = torch.zeros(0, dtype=torch.int32)  # real tokens of the stored entry
        self._pending: list[PendingRecord] = []

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return int((self._offset >= 0).sum())

    @property
    def nbytes(self) -> int:
        """Host bytes held, including spare capacity of the growable buffers."""
        return sum(t.numel() * t.element_size() for t in (self._data, self._offset, self._length, self.prior.means))

    def bytes_per_example(self, real_tokens: int) -> int:
        """Bytes one example of `real_tokens` tokens costs: num_slots · tokens + index."""
        return self.num_slots * real_tokens + _INDEX_BYTES_PER_EXAMPLE

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

    def lookup_slots(self, slots: list[int], example_ids: Tensor, row_mask: Tensor) -> Tensor:
        """`lookup` for several slots at once (layers sharing one draw): (S, B, T) float32."""
        ids = self._check_ids(example_ids, row_mask)
        for slot in slots:
            self._check_slot(slot)
        mask = row_mask.detach().cpu().to(torch.bool)
        offset, length = self._entries(ids)
        use = mask & ((offset >= 0) & (length == mask.sum(1))).unsqueeze(1)
        base = (offset.unsqueeze(1) + mask.cumsum(1) - 1)[use]  # (U,) first-slot positions
        step = length.unsqueeze(1).expand_as(mask)[use].to(torch.int64)  # (U,) bytes per slot
        codes = torch.zeros((len(slots), *mask.shape), dtype=torch.uint8)
        codes[:, use] = self._data[base + torch.tensor(slots).unsqueeze(1) * step]  # (S, U) in one gather
        norms = decode_norms(codes)
        unseen = mask & ~use
        if self.position_prior and bool(unseen.any()):
            norms[:, unseen] = self.prior.lookup(slots, (mask.cumsum(1) - 1)[unseen])
        return norms

    # -- updates -------------------------------------------------------------------------------
    def record(self, slot: int, example_ids: Tensor, row_mask: Tensor, norms: Tensor) -> None:
        """Buffer (B, T) norms of one layer's output gradient (any device); written at the next `commit`."""
        ids = self._check(slot, example_ids, row_mask)
        if norms.shape != row_mask.shape:
            raise ValueError(f"norms shape {tuple(norms.shape)} does not match row_mask {tuple(row_mask.shape)}")
        # Encoded and kept where they are (maybe a GPU) until commit: a copy to the host here
        # would stall every backward step on every sampled layer.
        self._pending.append(PendingRecord(slot, ids, row_mask.detach(), encode_norms(norms.detach())))

    def record_layers(self, slots: list[int], example_ids: Tensor, row_mask: Tensor, codes: Tensor) -> None:
        """`record` of one step's layers at once, already encoded: codes (len(slots), B, T) uint8
        on the host (`encode_norms`); the arguments are checked once for all of them."""
        ids = self._check_ids(example_ids, row_mask)
        for slot in slots:
            self._check_slot(slot)
        if codes.dtype != torch.uint8 or codes.shape != (len(slots), *row_mask.shape):
            raise ValueError(f"codes must be uint8 of shape {(len(slots), *row_mask.shape)}, "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        self._pending.extend(PendingRecord(slot, ids, row_mask, code) for slot, code in zip(slots, codes))

    def _materialize_pending(self) -> list[PendingRecord]:
        """Pending records with host tensors. Codes on a device move in one transfer per
        (device, shape): one copy per layer would cost a device round trip each."""
        on_device: dict[tuple, list[int]] = {}
        for i, record in enumerate(self._pending):
            if record.codes.device.type != "cpu":
                on_device.setdefault((record.codes.device, record.codes.shape), []).append(i)
        records = list(self._pending)
        for positions in on_device.values():
            codes = torch.stack([self._pending[i].codes for i in positions]).cpu()
            for i, code in zip(positions, codes):
                records[i] = records[i]._replace(codes=code)
        host_masks: dict[int, Tensor] = {}  # layers of one forward share a few mask tensors
        self._pending = [
            r._replace(row_mask=host_masks.setdefault(id(r.row_mask), r.row_mask.cpu().to(torch.bool)))
            for r in records
        ]
        return self._pending

    def discard_pending(self) -> None:
        """Drop buffered records (e.g. a step skipped for non-finite gradients)."""
        self._pending.clear()

    def exchange_pending(self, exchange: Callable[[list[PendingRecord]], list[PendingRecord]]) -> None:
        """Replace the buffered records by `exchange(records)` before a commit (data-parallel
        training passes an all-gather, so every rank commits every rank's records)."""
        self._pending = list(exchange(self._materialize_pending()))

    def commit(self) -> None:
        """Write all buffered records: one scatter per row layout (the layers of a step share one)."""
        groups: dict[tuple, list[PendingRecord]] = {}
        for record in self._materialize_pending():
            ids, mask = record.example_ids, record.row_mask  # the records of a step share them
            groups.setdefault((ids.data_ptr(), mask.data_ptr(), tuple(mask.shape)), []).append(record)
        for records in groups.values():
            records = list({r.slot: r for r in records}.values())  # a slot called twice (ALBERT): its last call
            ids, mask = records[0].example_ids, records[0].row_mask
            slots = torch.tensor([r.slot for r in records])  # (R,)
            codes = torch.stack([r.codes for r in records])[:, mask]  # (R, U) codes of the real tokens
            length = mask.sum(1).to(torch.int32)
            offset = self._allocate(ids, length)
            ordinal = (mask.cumsum(1) - 1)[mask]  # (U,) real-token ordinals
            step = length.unsqueeze(1).expand_as(mask)[mask].to(torch.int64)
            first = offset.unsqueeze(1).expand_as(mask)[mask] + ordinal  # (U,) slot-0 positions
            self._data[first + slots.unsqueeze(1) * step] = codes
            self.prior.update(slots, ordinal, decode_norms(codes))
        self._pending.clear()

    def state_dict(self) -> dict[str, Tensor]:
        """Compact tensors (no spare capacity); pending records are not included."""
        return {
            "num_slots": torch.tensor(self.num_slots),
            "data": self._data[: self._used].clone(),
            "offset": self._offset.clone(),
            "length": self._length.clone(),
            "prior": self.prior.means.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if int(state["num_slots"]) != self.num_slots:
            raise ValueError(f"cache has {int(state['num_slots'])} slots, this model samples {self.num_slots} layers")
        self._data = state["data"].to(torch.uint8).clone()
        self._used = self._data.numel()
        self._offset = state["offset"].to(torch.int64).clone()
        self._length = state["length"].to(torch.int32).clone()
        # checkpoints from before the prior existed have none: it rebuilds within a few steps
        self.prior.means = state.get("prior", torch.full((self.num_slots, 0), torch.nan)).float().clone()
        self._pending.clear()

    # -- internals -----------------------------------------------------------------------------
    def _check(self, slot: int, example_ids: Tensor, row_mask: Tensor) -> Tensor:
        """Validated host int64 ids; the mask is checked for shape only (it may live on a GPU)."""
        self._check_slot(slot)
        return self._check_ids(example_ids, row_mask)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")

    def _check_ids(self, example_ids: Tensor, row_mask: Tensor) -> Tensor:
        if example_ids.dim() != 1 or example_ids.dtype.is_floating_point or example_ids.dtype == torch.bool:
            raise ValueError("example_ids must be a 1-D integer tensor, "
                             f"got {example_ids.dtype} {tuple(example_ids.shape)}")
        if row_mask.dim() != 2 or row_mask.shape[0] != example_ids.shape[0]:
            raise ValueError(
                f"row_mask must be (batch, seq) with batch = len(example_ids) = {example_ids.shape[0]}, "
                f"got {tuple(row_mask.shape)}"
            )
        ids = example_ids.detach().cpu().to(torch.int64)
        if bool((ids < 0).any()):
            raise ValueError("example_ids must be non-negative")
        return ids

    def _entries(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        inside = ids < self._offset.numel()
        safe = torch.where(inside, ids, 0)
        if self._offset.numel() == 0:
            return torch.full_like(ids, -1), torch.zeros_like(ids, dtype=torch.int32)
        return torch.where(inside, self._offset[safe], -1), torch.where(inside, self._length[safe], 0)

    def _allocate(self, ids: Tensor, length: Tensor) -> Tensor:
        """Offsets for these examples, giving a fresh zeroed entry to any new or re-sized one."""
        self._offset = _grown(self._offset, int(ids.max()) + 1, -1)
        self._length = _grown(self._length, int(ids.max()) + 1, 0)
        stale = (self._offset[ids] < 0) | (self._length[ids] != length)
        new_ids, first = _first_occurrence(ids[stale])
        if new_ids.numel():
            sizes = self.num_slots * length[stale][first].to(torch.int64)
            starts = self._used + sizes.cumsum(0) - sizes
            self._used += int(sizes.sum())
            self._data = _grown(self._data, self._used, _MISSING)
            self._offset[new_ids] = starts
            self._length[new_ids] = length[stale][first]
        return self._offset[ids]


def _first_occurrence(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Unique ids and the position of each one's first occurrence in `ids`."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel())
    first = torch.full((unique.numel(),), ids.numel(), dtype=torch.int64).scatter_reduce_(0, inverse, positions, "amin")
    return unique, first
