"""Recording a step's norms: each sampled layer's per-row ‖dY‖ from backward, shipped off the device.

Backward hands each layer call's (B, T) row norms to the `StepRecorder`; at the end of the step
they leave for the host in one non-blocking copy per row layout, with one padding flag per layer,
and are folded into the cache at its next use (`NormFolder`).

The padding assumption, checked here: rows outside the attention mask are never drawn, which is
unbiased only if their output gradient is zero. The flag tests that on the norms the recorder
has anyway; a step that breaks it raises `PaddingGradientError` when it is folded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from wtacrs.cache import encode_norms
from wtacrs.cache.first_visit import FirstVisitKeys
from wtacrs.config import WTACRSConfig
from wtacrs.sampling.rows import ForwardRows
from wtacrs.sampling.transport import to_host



class PaddingGradientError(RuntimeError):
    """A row outside the attention mask got a non-zero output gradient, so skipping it biased dW."""


@dataclass
class ShippedStep:
    """One step's norms of one row layout on their way to the host.

    Attributes:
        slots: the R recorded layer calls' slots.
        example_ids: (B,) int64 on the host, or None (recorded for the padding check only).
        host_mask: (B, T) bool on the host.
        codes: (R, B, T) uint8 `encode_norms` codes (host memory; valid once `ready` has passed),
            None when recorded for the padding check only (example_ids None).
        leaks: (R,) bool, a row outside the mask got gradient; None when no record was checked.
        ready: the event after the device-to-host copies (None on the CPU).
        first_visit: the rows' first-visit keys (host) if the step gave anchors.
    """

    slots: list[int]
    example_ids: Tensor | None
    host_mask: Tensor
    codes: Tensor | None
    leaks: Tensor | None
    ready: torch.cuda.Event | None
    first_visit: FirstVisitKeys | None = None

    def wait(self) -> None:
        """Block until the copies to the host are done."""
        if self.ready is not None:
            self.ready.synchronize()

    def check_padding(self, layer_names: list[str]) -> None:
        """Raise PaddingGradientError if a row skipped as padding got a non-zero output gradient
        (the estimate then lacked that row's share of dW)."""
        if self.leaks is None or not bool(self.leaks.any()):
            return
        names = sorted({layer_names[self.slots[i]] for i in self.leaks.nonzero().flatten().tolist()})
        raise PaddingGradientError(
            f"wtacrs: padding rows (outside attention_mask) got a non-zero output gradient in {len(names)} "
            f"sampled layer(s), e.g. {names[0]}: the loss reads padded positions (an extractive-QA head's "
            "softmax spans every position), so skipping them biases the weight gradient. Use "
            "WTACRSConfig(skip_padding=False), or keep padded positions out of the loss."
        )


class StepRecorder:
    """Collects each sampled layer's output-gradient row norms in backward and ships them."""

    def __init__(self, config: WTACRSConfig):
        self.config = config
        self._pending: list[tuple[int, ForwardRows, Tensor, bool]] = []  # (slot, rows, (B, T) norms, for the cache)
        self._shipped: list[ShippedStep] = []

    def wants(self, rows: ForwardRows, cached: bool = True) -> bool:
        """Whether a layer call over `rows` records its norms: for the cache (`cached`: its slot
        reads them at the example's next visit), or for the padding check."""
        return self._for_cache(rows, cached) or (rows.mask is not None and self.config.skip_padding)

    def _for_cache(self, rows: ForwardRows, cached: bool) -> bool:
        """Whether norms over `rows` go to the cache: their slot reads it, and ids key them."""
        return cached and self.config.grad_norm == "cache" and rows.example_ids is not None

    def record(self, slot: int, rows: ForwardRows, norms: Tensor, cached: bool = True) -> None:
        """Keep one layer call's (B, T) row norms until the step ends; for the cache if `cached`
        (and there is one to key them: example ids, grad_norm "cache"), else for the padding check."""
        checked = rows if self.config.skip_padding else dataclasses.replace(rows, mask=None)
        self._pending.append((slot, checked, norms, self._for_cache(rows, cached)))

    def ship(self) -> None:
        """End of a step: one non-blocking transfer per row layout (the layers of a forward share one)."""
        groups: dict[tuple[int, bool], list[tuple[int, ForwardRows, Tensor, bool]]] = {}
        for record in self._pending:
            groups.setdefault((id(record[1].host_mask), record[3]), []).append(record)
        self._pending = []
        for (_, for_cache), records in groups.items():
            self._shipped.append(_ship(records, for_cache))

    def discard(self) -> None:
        """Drop the norms recorded since the last `ship` (a step that did not finish)."""
        self._pending = []

    def take(self) -> list[ShippedStep]:
        """The shipped steps, handed over (to be folded, or dropped by a checkpoint load)."""
        shipped, self._shipped = self._shipped, []
        return shipped


def _ship(records: list[tuple[int, ForwardRows, Tensor, bool]], for_cache: bool) -> ShippedStep:
    rows = records[0][1]
    norms = torch.stack([n for _, _, n, _ in records])  # (R, B, T)
    leaks = _leaks(norms, [r.mask for _, r, _, _ in records])
    codes = to_host(encode_norms(norms)) if for_cache else None
    leaks = None if leaks is None else to_host(leaks)
    ready = None
    if norms.device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    ids, first_visit = (rows.example_ids, rows.first_visit) if for_cache else (None, None)
    return ShippedStep([s for s, *_ in records], ids, rows.host_mask, codes, leaks, ready, first_visit)


def _leaks(norms: Tensor, masks: list[Tensor | None]) -> Tensor | None:
    """(R,) bool on the device: record r has a non-zero norm outside its mask; None if none has a mask."""
    if all(m is None for m in masks):
        return None
    if all(m is masks[0] for m in masks):  # the usual case: one mask for the whole forward
        inside = masks[0]  # (B, T), broadcast over the records
    else:
        inside = torch.stack([torch.ones_like(norms[0], dtype=torch.bool) if m is None else m for m in masks])
    return norms.masked_fill(inside, 0.0).amax((1, 2)) > 0
