"""Reading norms for a forward: example ids → gradient-norm cache → each slot's score multiplier.

Inside `wtacrs.batch(ids)`, one host lookup per forward and row layout brings every layer's cached
‖dY‖ to the device in one asynchronous copy, already combined per shared draw and masked.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from wtacrs.cache import GradNormCache
from wtacrs.estimators import fill_missing_norms
from wtacrs.sampling.rows import ForwardRows
from wtacrs.sampling.transport import to_device


class NormReader:
    """Per forward and row layout: every slot's score multiplier, on the device, in one copy.

    multiplier[slot] = ‖dY‖ cached for the slot's draw group (Σ_members ‖dY‖²)^½ (shared draws serve
    several layers: this p minimises their summed variance), missing ones filled
    (`estimators.fill_missing_norms`: its floor, relative to the mean, comes after the prior's
    lookup and the group combination, so a learnt 0 never gives a drawable row probability 0),
    times the row mask."""

    def __init__(self):
        # ForwardRows.key -> float32 on the device: (N,) for every slot, or one (N,) per slot
        self._tables: dict[str, Tensor | tuple[Tensor, ...] | None] = {}

    def clear(self) -> None:
        self._tables.clear()

    def multipliers(self, rows: ForwardRows, use_mask: bool, cache: GradNormCache | None,
                    members: Callable[[int], Tensor], num_slots: int, device: torch.device
                    ) -> Tensor | tuple[Tensor, ...] | None:
        """float32 multipliers for `rows` (row mask applied if `use_mask`): (N,) for every slot, a
        tuple of one (N,) per slot (the rows of `_build`'s table, split once), or None for 1.

        Args:
            cache: None to score by activation norms only.
            members: num_slots -> (S, S) draw-group membership (`DrawRegistry.members`).
        """
        if rows.key not in self._tables:
            table = self._build(rows, use_mask, cache, members, num_slots, device)
            self._tables[rows.key] = table.unbind(0) if table is not None and table.dim() == 2 else table
        return self._tables[rows.key]

    @staticmethod
    def _build(rows: ForwardRows, use_mask: bool, cache: GradNormCache | None, members: Callable[[int], Tensor],
               num_slots: int, device: torch.device) -> Tensor | None:
        """(S, N) multipliers from the cache, or (N,) the row mask alone, or None (neither)."""
        if cache is None or rows.example_ids is None:
            return rows.mask.view(-1).to(torch.float32) if use_mask else None
        filled = to_device(_filled_norms(rows, use_mask, cache, members, num_slots), device)
        return filled * rows.mask.view(1, -1) if use_mask else filled


def _filled_norms(rows: ForwardRows, use_mask: bool, cache: GradNormCache, members: Callable[[int], Tensor],
                  num_slots: int) -> Tensor:
    """(S, N) the cached norms combined per draw group and filled (`fill_missing_norms`), made on the
    host, where the cache lives: one copy takes them to the device."""
    norms = cache.lookup_slots(list(range(cache.num_slots)), rows.example_ids, rows.host_mask,
                               rows.first_visit)  # (S', B, T)
    if use_mask and rows.first_visit is not None:  # padding is not drawn: its prior must not move the fill
        norms[:, ~rows.host_mask] = torch.nan
    known = norms.isfinite().reshape(cache.num_slots, -1).float()
    squares = norms.nan_to_num(0.0).square().reshape(cache.num_slots, -1)
    table = members(num_slots)[:, : cache.num_slots]  # layers added after the cache have no slot
    combined = torch.where(table @ known > 0, (table @ squares).sqrt(), torch.nan)  # (S, N)
    return fill_missing_norms(combined)
