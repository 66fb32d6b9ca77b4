"""`SamplingState`: the units one model's sampled layers share, and the entry points that drive them.

A training step, in the order its entry points run:
1. `begin_forward` (the model's forward pre-hook) or `plan_step` (`wtacrs.batch(..., model=)`):
   fold the last step into the cache, count the step, lay out the rows (`RowLayouts`).
2. `layer_call`, per sampled layer call: its rows, its draw (shared per tensor: `DrawRegistry`;
   scored with the cache's norms: `NormReader`; keyed by this step: `StepUniforms`), and how its
   backward hands over ‖dY‖ (`StepRecorder`, or the plan's norm sink).
3. `commit` (the `wtacrs.batch` block's exit): ship the step's norms off the device; they are
   folded into the cache (`NormFolder`) at its next use, or at once under data parallelism.

Nothing in a training step reads a device value on the host, given the batch's attention mask on
the host (`wtacrs.batch(ids, attention_mask=...)`, as `WTACRSTrainer` passes it); without it, the
mask is copied to the host once per forward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from wtacrs import counter_rng
from wtacrs.cache import GradNormCache
from wtacrs.config import WTACRSConfig
from wtacrs.estimators import uniforms_needed
from wtacrs.functional import BackwardDraw, RowSample, draw_rows
from wtacrs.sampling.context import BatchContext, current_batch
from wtacrs.sampling.draws import DrawRegistry, StepUniforms, draw_budget, samples_inside_mask
from wtacrs.sampling.fold import Exchange, NormFolder
from wtacrs.sampling.norms import NormReader
from wtacrs.sampling.plan import StepPlan
from wtacrs.sampling.recorder import StepRecorder
from wtacrs.sampling.rows import ForwardRows, RowLayouts


class SamplingState:
    """Everything the sampled layers of one model share: the config, the step counter, the slots
    (set by `wtacrs.apply`), and the units above."""

    def __init__(self, config: WTACRSConfig):
        self.config = config
        self.step = 0
        self.layer_names: list[str] = []  # qualified names of the sampled layers, by slot
        self.layer_streams: list[str] = []  # which attention mask lays out each slot's rows
        self.num_modules = 0  # modules in the model when its layers were last swapped
        self.hooks: tuple[torch.utils.hooks.RemovableHandle, ...] = ()  # set by wtacrs.apply
        self.companions: list[str] = []  # modules swapped by wtacrs.companions
        # Slots seen drawing in forward / in backward: a slot only ever drawing in backward scores
        # with the true ‖dY‖, so its norms are recorded for the padding check, not for the cache.
        self.drawn_in_forward: set[int] = set()
        self.drawn_in_backward: set[int] = set()
        # Data parallel (set by wtacrs.integrations.distributed): each rank draws its own rows,
        # and `sync` exchanges the step's cache records so every rank's cache holds all of them.
        self.rank = 0
        self.sync: Exchange | None = None
        self.rows = RowLayouts()
        self.draws = DrawRegistry()
        self.uniforms = StepUniforms()
        self.reader = NormReader()
        self.recorder = StepRecorder(config)
        self.folder = NormFolder(config)
        self._plan: StepPlan | None = None  # inside `wtacrs.batch(..., model=)`

    @property
    def num_layers(self) -> int:
        """Sampled layers (slots) so far."""
        return len(self.layer_names)

    @property
    def cache(self) -> GradNormCache | None:
        """The gradient-norm cache, with every finished step folded in (waits for the device)."""
        self.flush()
        return self.folder.cache

    @property
    def planned(self) -> bool:
        """Inside `wtacrs.batch(..., model=)` of this state's model."""
        return self._plan is not None

    # -- per forward pass ----------------------------------------------------------------------
    def begin_forward(self, masks: dict[str, Tensor | None], training: bool = True) -> None:
        """Before each top-level forward of the model, given its (B, T) masks by stream; a
        training forward with gradients (the only kind that samples) counts a step."""
        self.flush()
        self._release_forward_tables()
        context = current_batch()
        if context is not None and self not in context.states:
            context.states.append(self)
        self.rows.begin(masks, context)
        if training and torch.is_grad_enabled():
            self.step += 1

    def plan_step(self, context: BatchContext, device: torch.device) -> None:
        """`wtacrs.batch(..., model=)` enter: `begin_forward`'s host work for the coming training
        forward, and the cache's multiplier tables and the norm sinks it will read."""
        self.flush()
        self._release_forward_tables()
        context.states.append(self)
        self.step += 1
        planned = self.rows.plan(context, set(self.layer_streams) - {"decoder"}, device)  # not the decoder's mask
        for rows in planned:
            self._multipliers(rows, device)
        step_key = counter_rng.stream_key(self.config.seed, self.rank, self.step)
        cached = [self._reads_cache(slot) for slot in range(self.num_layers)]
        self._plan = StepPlan.build(self.rows, planned, self.layer_streams, cached, self.recorder, self.config,
                                    step_key, device)

    def drop_draws(self) -> None:
        """Before and after each top-level forward inside `wtacrs.batch(..., model=)` (all it does
        on the host): a compiled forward must leave no reference to its tensors in Python state,
        and a checkpoint recompute draws the same rows again from the step's key."""
        self.draws.clear()
        self.uniforms.clear()

    def layer_call(self, slot: int, stream: str, x: Tensor
                   ) -> tuple[RowSample, Callable[[Tensor], None] | None, Tensor | None]:
        """For one call of the layer in `slot` on x (..., in_features), whose rows `stream` lays out:
        its row sample (shared with the layers reading the same x), and how its backward hands
        over the per-row ‖dY_i‖ (for the cache and the padding check): a callback, or the step's
        norm sink inside `wtacrs.batch(..., model=)` (None for what is not needed)."""
        rows = self.rows.rows_for(stream, x)
        self.drawn_in_forward.add(slot)
        sample = self.draws.reuse(slot, x)
        if sample is None:
            sample = self._draw(slot, x, rows)
            self.draws.add(slot, x, sample)
        return (sample, *self._norm_outlets(slot, rows))

    def backward_draw(self, slot: int, stream: str, x: Tensor
                      ) -> tuple[BackwardDraw, Callable[[Tensor], None] | None, Tensor | None]:
        """`layer_call` for a call whose input lives until backward anyway (`inputs_kept`): what
        its draw in backward needs (k, the row mask, this step's uniforms of its slot; scores
        from the true ‖dY‖, so no cached norm), and the same norm outlets. Not shared: each
        layer draws with its own output gradient."""
        rows = self.rows.rows_for(stream, x)
        self.drawn_in_backward.add(slot)
        k, covers_live, u = self._budget_and_uniforms(slot, x, rows)
        mask = rows.mask.reshape(-1) if samples_inside_mask(self.config, rows) else None  # a view: no copy per layer
        return (BackwardDraw(k, self.config.estimator, mask, u, covers_live), *self._norm_outlets(slot, rows))

    def _norm_outlets(self, slot: int, rows: ForwardRows | None
                      ) -> tuple[Callable[[Tensor], None] | None, Tensor | None]:
        """How a call's backward hands over its per-row ‖dY_i‖: (callback, norm sink), None for
        what is not needed."""
        cached = self._reads_cache(slot)
        if rows is None or not self.recorder.wants(rows, cached):
            return None, None
        if self._plan is not None:
            return None, self._plan.norm_sinks[slot]
        return self.recorder.hook(slot, rows, cached), None

    def _reads_cache(self, slot: int) -> bool:
        """Whether `slot`'s draws may read its cached norms: it has drawn in forward, or not yet at all."""
        return slot in self.drawn_in_forward or slot not in self.drawn_in_backward

    def _draw(self, slot: int, x: Tensor, rows: ForwardRows | None) -> RowSample:
        k, covers_live, u = self._budget_and_uniforms(slot, x, rows)
        multiplier = None
        if rows is not None:
            multipliers = self._multipliers(rows, x.device)
            multiplier = multipliers if multipliers is None or isinstance(multipliers, Tensor) else multipliers[slot]
        return draw_rows(x, k, self.config.estimator, multiplier, u, covers_live)

    def _budget_and_uniforms(self, slot: int, x: Tensor, rows: ForwardRows | None) -> tuple[int, bool, Tensor]:
        """(k, whether k covers every live row, the slot's uniforms) of a draw over x's rows."""
        num_rows = x.numel() // x.shape[-1]
        if rows is not None and self._plan is not None:
            k, covers_live = self._plan.budget(rows.key)
        else:
            k, covers_live = draw_budget(self.config, rows, num_rows)
        count = uniforms_needed(self.config.estimator, k, num_rows)
        step_key = self._plan.slot_keys if self._plan is not None else counter_rng.stream_key(
            self.config.seed, self.rank, self.step)
        layout = num_rows if rows is None else rows.key
        return k, covers_live, self.uniforms.of_slot(slot, x.device, layout, count, self.num_layers, step_key)

    def _multipliers(self, rows: ForwardRows, device: torch.device) -> Tensor | tuple[Tensor, ...] | None:
        """Score multipliers for `rows` this forward (see `NormReader`): (N,) for every slot, one
        (N,) per slot, or None."""
        cache = self.folder.cache if self.config.grad_norm == "cache" else None
        return self.reader.multipliers(rows, samples_inside_mask(self.config, rows), cache, self.draws.members,
                                       self.num_layers, device)

    def _release_forward_tables(self) -> None:
        self.draws.clear()
        self.reader.clear()
        self.uniforms.clear()

    # -- end of a step -------------------------------------------------------------------------
    def commit(self) -> None:
        """End of a training step (the `wtacrs.batch` block's exit): ship the recorded norms, folded
        in at the cache's next use; under data parallelism at once, as the exchange is a collective
        of every rank and step. The forward's tables (multipliers, uniforms) are freed: the
        optimizer step that follows is where the memory peaks once activations are small."""
        if self._plan is not None:
            self._plan.collect(self.rows, self.layer_streams, self.recorder)
        self._release_forward_tables()
        self.recorder.ship()
        if self.sync is not None:
            self.folder.fold(self.recorder.take(), self.layer_names, exchange=self.sync)

    def end_step(self) -> None:
        """The `wtacrs.batch` block is left (after `commit`, or by an exception): norms not shipped
        are dropped, and the plan ends."""
        self.recorder.discard()
        self._plan = None

    def flush(self) -> None:
        """Fold every shipped step into the cache (waiting for its transfer), raising
        PaddingGradientError if a row skipped as padding got a non-zero output gradient."""
        self.recorder.ship()  # norms recorded outside `wtacrs.batch` too: the padding check needs them
        shipped = self.recorder.take()
        if shipped:
            self.folder.fold(shipped, self.layer_names)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that make a resumed run sample like an uninterrupted one: the step, which layers
        share a draw (it decides whose cached norms score it) and the cache ("cache." keys)."""
        self.flush()
        return {"step": torch.tensor(self.step), "group_leader": self.draws.leaders(self.num_layers),
                **self.folder.state_dict()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.recorder.take()
        self.step = int(state["step"])
        self.draws.load_leaders(state["group_leader"])
        self.folder.load_state_dict(state)
