"""The norm store: uint8 codes of ‖dY‖ by (example id, real-token ordinal, slot), in host memory.

One byte per real (unpadded) token per sampled layer slot, as a log-scale code (4 codes per
octave, 2^-40 … 2^23.5; relative error <= 9%, which moves the sampling probabilities but not the
mean), plus 12 bytes of index per example. The index is a dense array over ids 0 … max id, so ids
should be dense (dataset indices are); sparse ids cost 12 bytes per unused id. The reference code
keeps bf16 for every padded position of every layer. Positions are keyed by the ordinal of the
real token in its example, so left and right padding and dynamic padding find the same entry.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOG2_MIN = -40.0
_CODES_PER_OCTAVE = 4.0
_MISSING = 0  # the code of a missing (non-finite or never recorded) norm
_INDEX_BYTES_PER_EXAMPLE = 12  # int64 offset + int32 length


def encode_norms(norms: Tensor) -> Tensor:
    """(…) float norms (never negative) → (…) uint8 codes, 0 for non-finite (treated as missing)."""
    g = norms.float()
    code = torch.round((torch.log2(g.clamp(min=2.0**_LOG2_MIN)) - _LOG2_MIN) * _CODES_PER_OCTAVE) + 1  # >= 1 if finite
    return code.nan_to_num_(nan=_MISSING, posinf=_MISSING).clamp_(max=255).to(torch.uint8)


def decode_norms(codes: Tensor) -> Tensor:
    """(…) uint8 codes → (…) float32 norms, NaN where missing."""
    g = torch.exp2((codes.float() - 1) / _CODES_PER_OCTAVE + _LOG2_MIN)
    return torch.where(codes == _MISSING, torch.nan, g)


def real_token_ordinals(mask: Tensor) -> Tensor:
    """(B, T) int64: each position's ordinal among its example's real tokens (mask (B, T) bool)."""
    return mask.cumsum(1) - 1


class NormStore:
    """Codes by (example id, real-token ordinal, slot). Each example owns one entry of
    num_slots × (its real tokens) bytes, slot-major, in one growable buffer; a dense index by
    example id holds each entry's offset (-1: none) and real-token count. An example seen again
    with another number of real tokens gets a fresh entry (the old one is not reused)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._data = torch.zeros(0, dtype=torch.uint8)
        self._used = 0
        self._offset = torch.zeros(0, dtype=torch.int64)  # by example id, -1 = no entry
        self._length = torch.zeros(0, dtype=torch.int32)  # real tokens of the stored entry

    @property
    def num_examples(self) -> int:
        return int((self._offset >= 0).sum())

    @property
    def nbytes(self) -> int:
        """Host bytes held, including spare capacity of the growable buffers."""
        return sum(t.numel() * t.element_size() for t in (self._data, self._offset, self._length))

    def bytes_per_example(self, real_tokens: int) -> int:
        """Bytes one example of `real_tokens` tokens costs: num_slots · tokens + index."""
        return self.num_slots * real_tokens + _INDEX_BYTES_PER_EXAMPLE

    def read(self, slots: list[int], ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Codes stored for these slots and examples.

        Args:
            slots: S slots; ids: (B,) int64 on the host; mask: (B, T) bool on the host, True at real tokens.
        Returns:
            (S, B, T) uint8 codes (0, missing, where nothing is stored), and (B, T) bool: the real
            tokens of examples stored at this length (the others are unseen).
        """
        offset, length = self._entries(ids)
        found = mask & ((offset >= 0) & (length == mask.sum(1))).unsqueeze(1)
        base = (offset.unsqueeze(1) + real_token_ordinals(mask))[found]  # (U,) first-slot positions
        step = length.unsqueeze(1).expand_as(mask)[found].to(torch.int64)  # (U,) bytes per slot
        codes = torch.zeros((len(slots), *mask.shape), dtype=torch.uint8)
        codes[:, found] = self._data[base + torch.tensor(slots).unsqueeze(1) * step]  # (S, U) in one gather
        return codes, found

    def write(self, slots: Tensor, ids: Tensor, mask: Tensor, codes: Tensor) -> None:
        """Store codes (R, U) of slots (R,) at the U real tokens of mask (B, T) for examples ids (B,)."""
        length = mask.sum(1).to(torch.int32)
        offset = self._allocate(ids, length)
        step = length.unsqueeze(1).expand_as(mask)[mask].to(torch.int64)
        first = offset.unsqueeze(1).expand_as(mask)[mask] + real_token_ordinals(mask)[mask]  # (U,) slot-0 positions
        self._data[first + slots.unsqueeze(1) * step] = codes

    def state_dict(self) -> dict[str, Tensor]:
        """Compact tensors (no spare capacity)."""
        return {"data": self._data[: self._used].clone(), "offset": self._offset.clone(),
                "length": self._length.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._data = state["data"].to(torch.uint8).clone()
        self._used = self._data.numel()
        self._offset = state["offset"].to(torch.int64).clone()
        self._length = state["length"].to(torch.int32).clone()

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


def _grown(t: Tensor, size: int, fill: int) -> Tensor:
    if size <= t.numel():
        return t
    out = torch.full((max(size, 2 * t.numel()),), fill, dtype=t.dtype)
    out[: t.numel()] = t
    return out


def _first_occurrence(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Unique ids and the position of each one's first occurrence in `ids`."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel())
    first = torch.full((unique.numel(),), ids.numel(), dtype=torch.int64).scatter_reduce_(0, inverse, positions, "amin")
    return unique, first
