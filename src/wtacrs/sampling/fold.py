"""Folding finished steps into the gradient-norm cache: wait for the norms' copy, check padding,
exchange the records across data-parallel ranks, commit."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from wtacrs.cache import GradNormCache, PendingRecord
from wtacrs.config import WTACRSConfig
from wtacrs.sampling.recorder import ShippedStep

Exchange = Callable[[list[PendingRecord]], list[PendingRecord]]  # e.g. `integrations.distributed.CacheSync`


class NormFolder:
    """Owns a model's gradient-norm cache and writes each shipped step into it.

    The cache is created at the first fold that has something for it, so layers PEFT adds between
    `wtacrs.apply` and training get a slot."""

    def __init__(self, config: WTACRSConfig):
        self.config = config
        self.cache: GradNormCache | None = None

    def fold(self, shipped: list[ShippedStep], layer_names: list[str], exchange: Exchange | None = None) -> None:
        """Write `shipped` into the cache, raising PaddingGradientError for a step whose padding got
        gradient. With `exchange` (data parallel: a collective of every rank and step, so it runs
        even with nothing shipped), the records are swapped for every rank's before the commit."""
        for step in shipped:
            step.wait()
            step.check_padding(layer_names)
        if self.cache is None and (exchange is not None or any(s.example_ids is not None for s in shipped)):
            self.cache = GradNormCache(len(layer_names), position_prior=self.config.position_prior)
        if self.cache is None:
            return
        for step in shipped:
            known = [i for i, slot in enumerate(step.slots) if slot < self.cache.num_slots]  # layers added
            if step.example_ids is not None and known:  # after the cache was sized have no slot
                codes = step.codes if len(known) == len(step.slots) else step.codes[known]
                self.cache.record_layers([step.slots[i] for i in known], step.example_ids, step.host_mask, codes,
                                         step.first_visit)
        if exchange is not None:
            self.cache.exchange_pending(exchange)
        self.cache.commit()

    def state_dict(self) -> dict[str, Tensor]:
        """The cache's tensors, keys prefixed "cache." (empty before the cache exists)."""
        return {} if self.cache is None else {f"cache.{k}": v for k, v in self.cache.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the cache from a sampling state dict's "cache." entries, if it has any."""
        cache = {k.removeprefix("cache."): v for k, v in state.items() if k.startswith("cache.")}
        if cache:
            self.cache = GradNormCache(int(cache["num_slots"]), position_prior=self.config.position_prior)
            self.cache.load_state_dict(cache)
