"""The prior: scores for examples the cache has not seen yet (the whole first epoch).

Per slot, exponential moving averages (`PRIOR_DECAY` per update) of recent norms by a key of the
row, each a `KeyedAverage` (num_slots × keys float32):
- by real-token position (always). Gradient norms are strongly structured by position: in a
  classifier that reads only the first token, every other row of the last block's query,
  attention-output and MLP layers has ‖dY_i‖ = 0, and value layers concentrate on a few positions.
  Measured on all-MiniLM-L6-v2, two real SST-2 batches of 32 (`benchmarks/FIRST_EPOCH.md`),
  WTA-CRS@0.3's relative variance E‖dŴ − dW‖² / ‖dW‖² with the prior from the other batch,
  against activation norms only: last block's query, attention output and MLP 3.0–10.1 → 0; value
  layers 3.4–9.0 → 0.14–2.5; the rest about unchanged.
- by offset from a label position, and by token type, for steps that give anchors
  (`wtacrs.cache.first_visit`; `benchmarks/FIRST_VISIT.md`). Padding rows are keyed too: QA samples
  them and their norms are known in backward.
Like any positive distribution the prior leaves the estimator unbiased.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wtacrs.cache.first_visit import FirstVisitKeys

PRIOR_DECAY = 0.9  # weight of the previous mean at each update


class KeyedAverage:
    """Per slot and integer key ≥ 0, an exponential moving average of ‖dY‖ (`PRIOR_DECAY` per
    update). `means`: (slots, keys) float32, NaN where no record reached; grows with the keys seen."""

    def __init__(self, num_slots: int, means: Tensor | None = None):
        self.means = torch.full((num_slots, 0), torch.nan) if means is None else means.float().clone()

    def update(self, slots: Tensor, keys: Tensor, norms: Tensor) -> None:
        """Fold one row layout's per-key mean norms into these slots' averages.

        Args:
            slots: (R,) slots; keys: (U,) int64, rows with key −1 are left out; norms: (R, U), NaN
                norms are left out.
        """
        use = keys >= 0
        keys, norms = keys[use], norms[:, use]
        size = int(keys.max()) + 1 if keys.numel() else 0
        if size > self.means.shape[1]:
            grown = torch.full((self.means.shape[0], size), torch.nan)
            grown[:, : self.means.shape[1]] = self.means
            self.means = grown
        known = norms.isfinite()
        count = torch.zeros(len(slots), size).index_add_(1, keys, known.float())
        total = torch.zeros(len(slots), size).index_add_(1, keys, norms.nan_to_num(0.0))
        mean = total / count.clamp(min=1)
        old = self.means[slots, :size]
        update = torch.where(old.isnan(), mean, PRIOR_DECAY * old + (1 - PRIOR_DECAY) * mean)
        self.means[slots, :size] = torch.where(count > 0, update, old)

    def lookup(self, slots: list[int], keys: Tensor) -> Tensor:
        """(S, U) averages of these slots at keys (U,); NaN where none is known (or key −1)."""
        known = self.means.shape[1]
        if known == 0:
            return torch.full((len(slots), keys.numel()), torch.nan)
        prior = self.means[slots][:, keys.clamp(0, known - 1)]
        return torch.where((keys >= 0) & (keys < known), prior, torch.nan)

    @property
    def nbytes(self) -> int:
        return self.means.numel() * self.means.element_size()


class PositionPrior:
    """The prior's tables: `position` (by real-token ordinal), `anchor` and `token_type`
    (`FirstVisitKeys` columns), each a `KeyedAverage`. Lookup order for an unseen row: anchor,
    then token type, then position."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.position = KeyedAverage(num_slots)
        self.anchor = KeyedAverage(num_slots)
        self.token_type = KeyedAverage(num_slots)

    @property
    def means(self) -> Tensor:
        """(slots, positions) the position table."""
        return self.position.means

    def update(self, slots: Tensor, positions: Tensor, norms: Tensor) -> None:
        """Fold one row layout's real-token norms into the position table.

        Args:
            slots: (R,) slots; positions: (U,) real-token ordinals; norms: (R, U), NaN = missing
                (counted as 0, as it always was: changing it would change resumed runs' draws).
        """
        self.position.update(slots, positions, norms.nan_to_num(0.0))

    def update_first_visit(self, slots: Tensor, keys: FirstVisitKeys, norms: Tensor) -> None:
        """Fold one row layout's norms (R, B, T), padding included, into the anchor and type tables."""
        flat = norms.reshape(len(slots), -1)
        self.anchor.update(slots, keys.anchor.reshape(-1), flat)
        self.token_type.update(slots, keys.token_type.reshape(-1), flat)

    def lookup(self, slots: list[int], positions: Tensor) -> Tensor:
        """(S, U) position averages of these slots at real-token ordinals (U,); NaN where none is known."""
        return self.position.lookup(slots, positions)

    def lookup_first_visit(self, slots: list[int], anchor: Tensor, token_type: Tensor, positions: Tensor) -> Tensor:
        """(S, U) estimates of U rows from their keys (U,) each (−1: none): the anchor table's,
        else the type table's, else the position table's; NaN where none knows the row."""
        norms = self.anchor.lookup(slots, anchor)
        norms = torch.where(norms.isnan(), self.token_type.lookup(slots, token_type), norms)
        return torch.where(norms.isnan(), self.position.lookup(slots, positions), norms)

    @property
    def nbytes(self) -> int:
        return self.position.nbytes + self.anchor.nbytes + self.token_type.nbytes

    def state_dict(self) -> dict[str, Tensor]:
        return {"prior": self.position.means.clone(), "prior_anchor": self.anchor.means.clone(),
                "prior_type": self.token_type.means.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        # checkpoints from before a table existed have none: it rebuilds within a few steps
        self.position = KeyedAverage(self.num_slots, state.get("prior"))
        self.anchor = KeyedAverage(self.num_slots, state.get("prior_anchor"))
        self.token_type = KeyedAverage(self.num_slots, state.get("prior_type"))
