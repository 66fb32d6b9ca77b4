"""A training forward's plan: the host work done before it runs (at `wtacrs.batch`'s enter, or at
the forward's pre-hook), so that the forward and its backward run no host code (a training step
can then be compiled whole), and the norm sinks that backward fills."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from wtacrs import counter_rng
from wtacrs.config import WTACRSConfig
from wtacrs.sampling.draws import draw_budget
from wtacrs.sampling.recorder import StepRecorder
from wtacrs.sampling.rows import ForwardRows
from wtacrs.sampling.transport import to_device


@dataclass
class StepPlan:
    """What `SamplingState.plan` prepared for one training forward (besides its row layouts and
    the reader's tables).

    Attributes:
        slot_keys: (S,) int64 on the model's device, each slot's key of the forward's counter-based
            draws (`counter_rng.lane_keys` of the step's key, made on the host).
        sinks: by slot, (its layout, a (B, T) float32 leaf on the device that the slot's op takes
            as an input and whose gradient backward sets to the slot's ‖dY_i‖, whether the norms
            are for the cache). Norms leave backward as a gradient rather than through a
            callback: backward then has no Python side effects, which a compiled backward could
            not keep.
        budgets: by row layout (`ForwardRows.key`), k as the length of an empty (k, 0) tensor marked
            dynamic, and whether k covers every live row: k depends on the batch's real tokens,
            and as a tensor's size it reaches compiled code as a symbol, so that batches with
            other numbers of real tokens run the same graph (a Python int would be a constant).
    """

    slot_keys: Tensor
    sinks: dict[int, tuple[ForwardRows, Tensor, bool]] = field(default_factory=dict)
    budgets: dict[str, tuple[Tensor, bool]] = field(default_factory=dict)
    cached: list[bool] = field(default_factory=list)

    @classmethod
    def build(cls, planned: list[ForwardRows], layer_streams: list[str], cached: list[bool],
              recorder: StepRecorder, config: WTACRSConfig, step_key: int, device: torch.device) -> "StepPlan":
        """The plan for the layouts `planned` (`RowLayouts.plan`) of a model whose slots read
        `layer_streams` (and the cache, where `cached`): a sink for each slot whose norms `recorder`
        wants, and each layout's budget."""
        plan = cls(to_device(counter_rng.lane_keys(len(layer_streams), step_key), device), cached=cached)
        for rows in planned:
            plan._add(rows, layer_streams, recorder, config, device)
        return plan

    def add_layout(self, rows: ForwardRows, layer_streams: list[str], recorder: StepRecorder, config: WTACRSConfig,
                   device: torch.device) -> None:
        """A layout made once the forward has begun (`RowLayouts.add`): its budget and sinks."""
        self._add(rows, layer_streams, recorder, config, device)

    def _add(self, rows: ForwardRows, layer_streams: list[str], recorder: StepRecorder, config: WTACRSConfig,
             device: torch.device) -> None:
        k, covers_live = draw_budget(config, rows, rows.host_mask.numel())
        slots = torch.empty(k, 0, device=device)  # no elements: no memory, no copy
        torch._dynamo.maybe_mark_dynamic(slots, 0)
        self.budgets[rows.key] = (slots, covers_live)
        for slot, stream in enumerate(layer_streams):
            if stream == rows.key and recorder.wants(rows, self.cached[slot]):
                self.sinks[slot] = (rows, torch.empty(rows.host_mask.shape, device=device).requires_grad_(),
                                    self.cached[slot])

    def budget(self, key: str) -> tuple[int, bool] | None:
        """k and covers_live of the draws over the layout `key`, if planned."""
        if key not in self.budgets:
            return None
        slots, covers_live = self.budgets[key]
        return slots.shape[0], covers_live

    def sink(self, slot: int, rows: ForwardRows, device: torch.device, cached: bool) -> Tensor | None:
        """The norm sink of `slot`'s call over `rows`, whose norms go to the cache if `cached` (the
        call knows it: a slot found drawing in backward keeps no cached norms); planned, or (eager
        only) made now for a layout found in the forward (`RowLayouts.rows_for`'s unmasked ones)."""
        planned = self.sinks.get(slot)
        if planned is not None and planned[0].key == rows.key:
            if planned[2] != cached:
                self.sinks[slot] = (rows, planned[1], cached)
            return planned[1]
        if planned is not None or torch.compiler.is_compiling():
            return None  # a slot called over two layouts in one forward records the planned one
        sink = torch.empty(rows.host_mask.shape, device=device).requires_grad_()
        self.sinks[slot] = (rows, sink, cached)
        return sink

    def backward_ran(self) -> bool:
        """Whether some sink got its norms (the forward's backward has run), or none waits for them."""
        return not self.sinks or any(sink.grad is not None for _, sink, _ in self.sinks.values())

    def collect(self, recorder: StepRecorder) -> None:
        """The norms backward left in the sinks, handed to the recorder (once)."""
        for slot, (rows, sink, cached) in sorted(self.sinks.items()):
            if sink.grad is not None:
                recorder.record(slot, rows, sink.grad, cached)
        self.sinks.clear()
