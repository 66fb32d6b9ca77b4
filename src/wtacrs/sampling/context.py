"""The current training step's examples: what `wtacrs.batch` tells the sampled models."""

from __future__ import annotations

import contextvars
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

from torch import Tensor

from wtacrs.cache.first_visit import FirstVisitKeys

_current: contextvars.ContextVar["BatchContext | None"] = contextvars.ContextVar("wtacrs_batch", default=None)


class StepParticipant(Protocol):
    """A sampled model's state as a block drives it (`wtacrs.sampling.state.SamplingState`)."""

    def commit(self) -> None:
        """Keep what the block's backward recorded (its output-gradient norms)."""

    def end_step(self) -> None:
        """Close the block's step, whether it finished or raised."""


@dataclass
class BatchContext:
    """One `wtacrs.batch` block.

    Attributes:
        example_ids: (B,) int64 on the host.
        attention_mask: (B, T) bool on the host, if the caller gave it.
        first_visit: the rows' first-visit keys (host, laid out as `attention_mask`), if the
            caller gave anchors.
        states: the sampling states that ran a forward inside the block (committed at its exit).
    """

    example_ids: Tensor
    attention_mask: Tensor | None
    first_visit: FirstVisitKeys | None = None
    states: list[StepParticipant] = dataclasses.field(default_factory=list)


def current_batch() -> BatchContext | None:
    """The innermost `wtacrs.batch` block of this thread, if any."""
    return _current.get()


@contextmanager
def inside(context: BatchContext) -> Iterator[None]:
    """Make `context` the current batch for the duration of the block."""
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)
