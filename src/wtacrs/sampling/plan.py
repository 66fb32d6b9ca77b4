"""The planned step of `wtacrs.batch(..., model=)`: host work done at the block's enter, norms
collected at its exit, so that the forward and backward in between run no host code (a training
step can then be compiled whole)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wtacrs import counter_rng
from wtacrs.config import WTACRSConfig
from wtacrs.sampling.draws import draw_budget
from wtacrs.sampling.recorder import StepRecorder
from wtacrs.sampling.rows import ForwardRows, RowLayouts
from wtacrs.sampling.transport import to_device


@dataclass
class StepPlan:
    """What `SamplingState.plan_step` prepared for the coming training forward (besides the row
    layouts and the reader's tables).

    Attributes:
        slot_keys: (S,) int64 on the model's device, each slot's key of this step's counter-based
            draws (`counter_rng.lane_keys` of the step's key, made on the host).
        norm_sinks: by slot, a (B, T) float32 leaf on the device that the slot's op takes as an
            input and whose gradient backward sets to the slot's ‖dY_i‖ (None: nothing to record).
            Norms leave backward as a gradient rather than through a callback: backward then has
            no Python side effects, which a compiled backward could not keep.
        cached: by slot, whether its norms are for the cache (else for the padding check only).
        budgets: by row layout (`ForwardRows.key`), k as the length of an empty (k, 0) tensor marked
            dynamic, and whether k covers every live row: k depends on the batch's real tokens,
            and as a tensor's size it reaches compiled code as a symbol, so that batches with
            other numbers of real tokens run the same graph (a Python int would be a constant).
    """

    slot_keys: Tensor
    norm_sinks: list[Tensor | None]
    cached: list[bool]
    budgets: dict[str, tuple[Tensor, bool]]

    @classmethod
    def build(cls, layouts: RowLayouts, planned: list[ForwardRows], layer_streams: list[str], cached: list[bool],
              recorder: StepRecorder, config: WTACRSConfig, step_key: int, device: torch.device) -> "StepPlan":
        """The plan for the layouts `planned` (`RowLayouts.plan`) of a model whose slots read
        `layer_streams` (and the cache, where `cached`): a sink for each slot whose norms `recorder`
        wants, and each layout's budget."""
        sinks = []
        for stream, for_cache in zip(layer_streams, cached):
            rows = layouts.of(stream)
            records = rows is not None and recorder.wants(rows, for_cache)
            sinks.append(torch.empty(rows.host_mask.shape, device=device).requires_grad_() if records else None)
        budgets = {}
        for rows in planned:
            k, covers_live = draw_budget(config, rows, rows.host_mask.numel())
            slots = torch.empty(k, 0, device=device)  # no elements: no memory, no copy
            torch._dynamo.maybe_mark_dynamic(slots, 0)
            budgets[rows.key] = (slots, covers_live)
        return cls(to_device(counter_rng.lane_keys(len(layer_streams), step_key), device), sinks, cached, budgets)

    def budget(self, key: str) -> tuple[int, bool]:
        """k and covers_live of the draws over the layout `key`."""
        slots, covers_live = self.budgets[key]
        return slots.shape[0], covers_live

    def collect(self, layouts: RowLayouts, layer_streams: list[str], recorder: StepRecorder) -> None:
        """The block's exit: the norms backward left in the sinks, handed to the recorder."""
        for slot, sink in enumerate(self.norm_sinks):
            if sink is not None and sink.grad is not None:
                recorder.record(slot, layouts.of(layer_streams[slot]), sink.grad, self.cached[slot])
