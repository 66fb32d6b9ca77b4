"""The position prior: scores for examples the cache has not seen yet (the whole first epoch).

Per slot, the mean norm at each real-token position over the examples of recent steps, an
exponential moving average (`PRIOR_DECAY` per update; num_slots × positions float32). Gradient
norms are strongly structured by position: in a classifier that reads only the first token, every
other row of the last block's query, attention-output and MLP layers has ‖dY_i‖ = 0, and value
layers concentrate on a few positions. Measured on all-MiniLM-L6-v2, two real SST-2 batches of 32
(`benchmarks/FIRST_EPOCH.md`), WTA-CRS@0.3's relative variance E‖dŴ − dW‖² / ‖dW‖² with the prior
from the other batch, against activation norms only: last block's query, attention output and MLP
3.0–10.1 → 0; value layers 3.4–9.0 → 0.14–2.5; the rest about unchanged. Like any positive
distribution it leaves the estimator unbiased.
"""

from __future__ import annotations

import torch
from torch import Tensor

PRIOR_DECAY = 0.9  # weight of the previous per-position mean at each update


class PositionPrior:
    """Per slot and real-token position, an exponential moving average of ‖dY‖ (`PRIOR_DECAY` per
    update). `means`: (slots, positions) float32, NaN where no record reached."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.means = torch.full((num_slots, 0), torch.nan)

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

    @property
    def nbytes(self) -> int:
        return self.means.numel() * self.means.element_size()

    def state_dict(self) -> dict[str, Tensor]:
        return {"prior": self.means.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        # checkpoints from before the prior existed have none: it rebuilds within a few steps
        self.means = state.get("prior", torch.full((self.num_slots, 0), torch.nan)).float().clone()
