"""`SamplingState`: the units one model's sampled layers share, and the entry points that drive them.

Every sampled training forward runs on one path, planned: before it runs, its host work (step
counter, row layouts, the cache's score multipliers, the draws' key, k, the norm sinks) is done
into a `Frame`. The plan is made at `wtacrs.batch`'s enter from the host mask it is given (no
device wait, and nothing left for a compiled forward to do on the host), or else at the forward's
pre-hook from the forward's own mask (one copy of it to the host). A training step, in order:

1. `plan` (`wtacrs.batch` enter) and `begin_forward` (the model's forward pre-hook): the forward
   takes the block's frame, or a frame of its own for a second training forward in the block;
   a forward whose mask disagrees with the planned one is an error.
2. `layer_call` / `backward_draw`, per sampled layer call, read the current frame: its rows, its
   draw (shared per tensor: `DrawRegistry`; scored with the cache's norms: `NormReader`; keyed by
   the frame's step: `StepUniforms`), and the slot's norm sink, whose gradient backward sets to
   the call's ‖dY_i‖.
3. `commit` (the block's exit): every frame's norms shipped off the device; they are folded into
   the cache (`NormFolder`) at its next use, or at once under data parallelism.

Each forward's backward uses its own frame: checkpoint recomputes (Hugging Face gradient
checkpointing, the recompute companions) run inside `bind_frames`, which restores the frames that
were current when the checkpointed region first ran. An eval forward or a second training forward
inside one block therefore leaves the first forward's rows alone.
"""

from __future__ import annotations

import functools
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor

from wtacrs import counter_rng
from wtacrs.cache import GradNormCache
from wtacrs.config import WTACRSConfig
from wtacrs.estimators import uniforms_needed
from wtacrs.functional import BackwardDraw, RowSample, draw_rows, inputs_kept, kept_by_its_producer
from wtacrs.sampling.context import BatchContext, current_batch
from wtacrs.sampling.draws import DrawRegistry, StepUniforms, draw_budget, samples_inside_mask
from wtacrs.sampling.fold import Exchange, NormFolder
from wtacrs.sampling.norms import NormReader
from wtacrs.sampling.plan import StepPlan
from wtacrs.sampling.recorder import StepRecorder
from wtacrs.sampling.rows import ForwardRows, RowLayouts, forward_rows, live_count
from wtacrs.sampling.transport import to_device

logger = logging.getLogger(__name__)

_LIVE_STATES: "weakref.WeakSet[SamplingState]" = weakref.WeakSet()  # every applied model's state


# What a sampled layer's call keeps for its weight gradient beyond what the same layer unsampled
# would: "rows", its drawn rows (k · (in_features + 12 bytes of index and weight), shared by the
# layers reading the same input); "norms", x's row norms (4 bytes a row: a backward draw whose
# rows are recomputed); "nothing", inside a checkpointed region, which keeps its inputs, not the
# layers' (sampled or not).
StoredInput = Literal["rows", "norms", "nothing"]


class MaskMismatchError(ValueError):
    """The attention mask given to `wtacrs.batch` is not the one the model's forward got."""


@dataclass
class Frame:
    """One training forward's sampling, planned before it runs.

    Attributes:
        step: the step counter it was planned at (keys its draws).
        rows: its row layouts by stream.
        plan: budgets, the draws' keys and the norm sinks.
        draws: the draws made in it, shared per input tensor.
        uniforms: its uniforms, by layout.
        reader: the cache's multipliers for its layouts.
        used: a forward has taken it.
    """

    step: int
    rows: RowLayouts
    plan: StepPlan
    draws: DrawRegistry
    uniforms: StepUniforms = field(default_factory=StepUniforms)
    reader: NormReader = field(default_factory=NormReader)
    used: bool = False
    outputs: list[weakref.ref] = field(default_factory=list)  # the forward's outputs that need grad
    backward_started: bool = False

    def awaits_backward(self) -> bool:
        """Its forward's outputs are alive and backward has not reached them yet."""
        return not self.backward_started and any(ref() is not None for ref in self.outputs)

    def drop_draws(self) -> None:
        """A compiled forward must leave no reference to its tensors in Python state; a checkpoint
        recompute then draws the same rows again from the frame's key."""
        self.draws.clear()
        self.uniforms.clear()


class SamplingState:
    """Everything the sampled layers of one model share: the config, the step counter, the slots
    (set by `wtacrs.apply`), the current frame, and the units above."""

    def __init__(self, config: WTACRSConfig, model: torch.nn.Module | None = None):
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
        # What each slot's last training call kept for its weight gradient (`StoredInput`), and
        # the slots whose input the op making it keeps anyway (`functional.kept_by_its_producer`):
        # `stored_input`.
        self._stored: dict[int, StoredInput] = {}
        self._input_kept_anyway: dict[int, bool] = {}
        # Data parallel (set by wtacrs.integrations.distributed): each rank draws its own rows,
        # and `sync` exchanges the step's cache records so every rank's cache holds all of them.
        self.rank = 0
        self.sync: Exchange | None = None
        self.draws = DrawRegistry()  # which layers share a draw, learnt across steps
        self.recorder = StepRecorder(config)
        self.folder = NormFolder(config)
        self.frame: Frame | None = None  # the frame the layers read now
        self._frames: list[Frame] = []  # planned and not collected yet
        self._model = None if model is None else weakref.ref(model)  # whose training forwards a block plans
        self._warned_no_ids = False
        self._idle = False  # planned for a block and ran no training forward in it
        _LIVE_STATES.add(self)

    @property
    def num_layers(self) -> int:
        """Sampled layers (slots) so far."""
        return len(self.layer_names)

    # -- built by `wtacrs.apply` and the integrations ------------------------------------------
    def add_layer(self, name: str, stream: str) -> int:
        """A sampled layer named `name` whose rows `stream` lays out; returns its slot."""
        self.layer_names.append(name)
        self.layer_streams.append(stream)
        return self.num_layers - 1

    def swapped_with(self, num_modules: int) -> None:
        """The model had `num_modules` modules when its layers were last swapped."""
        self.num_modules = num_modules

    def attach(self, *hooks: torch.utils.hooks.RemovableHandle) -> None:
        """The model's forward hooks, removed by `detach`."""
        self.hooks = hooks

    def record_companions(self, names: list[str]) -> None:
        """The modules the companions swapped."""
        self.companions = names

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = ()

    def join_data_parallel(self, rank: int, sync: Exchange | None) -> None:
        """Data parallel: this rank's draws are its own, and `sync` exchanges the cache records."""
        self.rank, self.sync = rank, sync

    def draw_leaders(self) -> dict[int, int]:
        """Slot -> the slot whose draw it reused in the last forward (slots that drew alone absent)."""
        return {slot: leader for leader, group in self.draws.groups.items() for slot in group}

    @property
    def cache(self) -> GradNormCache | None:
        """The gradient-norm cache, with every finished step folded in (waits for the device)."""
        self.flush()
        return self.folder.cache

    @property
    def current_step(self) -> int:
        """The step the layers' draws are keyed by now: the current frame's."""
        return self.step if self.frame is None else self.frame.step

    # -- planning ------------------------------------------------------------------------------
    def plan(self, context: BatchContext | None, masks: dict[str, tuple[Tensor, Tensor] | None],
             device: torch.device) -> Frame:
        """A frame for the coming training forward: count the step and do its host work.

        Args:
            context: the `wtacrs.batch` block (example ids, first-visit keys), if any.
            masks: by stream, (mask on `device`, the same mask on the host), or None for a stream
                without one.
        """
        self.flush()
        step = self.step + 1  # counted when a forward takes the frame (a block's model may run none)
        rows = RowLayouts()
        planned = rows.plan(context, masks)
        step_key = counter_rng.stream_key(self.config.seed, self.rank, step)
        cached = [self._reads_cache(slot) for slot in range(self.num_layers)]
        plan = StepPlan.build(planned, self.layer_streams, cached, self.recorder, self.config, step_key, device)
        frame = Frame(step, rows, plan, DrawRegistry(shared=self.draws))
        for layout in planned:
            frame.reader.multipliers(layout, samples_inside_mask(self.config, layout), self._cache_for_reading(),
                                     self.draws.members, self.num_layers, device)
        self._frames.append(frame)
        self._warn_if_ids_needed(planned)
        return frame

    @property
    def model(self) -> torch.nn.Module | None:
        """The model `wtacrs.apply` made this state for, while it lives."""
        return None if self._model is None else self._model()

    def plan_for_block(self, context: BatchContext, device: torch.device) -> bool:
        """`wtacrs.batch` enter, given the block's host mask: plan the model's training forward
        on `device` from it (the decoder stream of an encoder-decoder is laid out at its forward).
        A model that ran no training forward in its last planned block is planned at its next
        forward instead (from the same host mask: no device wait), so idle models cost nothing.
        Returns whether it planned."""
        if self._idle:
            return False
        host = context.attention_mask
        main = (to_device(host, device), host)
        self.plan(context, {stream: main for stream in self._streams() if stream != "decoder"}, device)
        return True

    def begin_forward(self, masks: dict[str, Tensor | None], device: torch.device) -> None:
        """The model's forward pre-hook, for a training forward with gradients, given its (B, T)
        masks by stream: take the block's frame (checking that its mask is this forward's), or
        plan one of its own (a second training forward, or none planned)."""
        frame = self._pending_frame()
        if frame is not None and torch.compiler.is_compiling():  # `wtacrs.batch` did the host work
            frame.used = True
            frame.drop_draws()
            self.frame = frame
            return
        self._begin_eager_forward(masks, device)

    @torch.compiler.disable(recursive=True)
    def _begin_eager_forward(self, masks: dict[str, Tensor | None], device: torch.device) -> None:
        """`begin_forward`'s host work, never traced: a compiled forward that reaches it (no frame
        planned at a block's enter, e.g. outside `wtacrs.batch`) breaks its graph here."""
        frame = self._pending_frame()
        context = current_batch()
        if context is not None and self not in context.states:
            context.states.append(self)
        self._idle = False
        main = masks.get("main")
        if context is not None and context.example_ids is not None and main is not None and (
                context.example_ids.numel() != main.shape[0]):
            raise ValueError(f"wtacrs.batch was given {context.example_ids.numel()} example ids, but the model's "
                             f"forward got a batch of {main.shape[0]}: give one id per example of the forward")
        if frame is None and context is not None and context.attention_mask is not None:
            self.plan_for_block(context, device)  # checked against the forward's mask below
            frame = self._frames[-1]
        if frame is not None:
            self._check_planned_masks(frame, masks)
            self._add_decoder_rows(frame, masks, device)
            self.step = frame.step
        else:
            if context is None:
                self._collect_finished()
            host = {s: None if m is None else (m.to(torch.bool), m.to(torch.bool).cpu()) for s, m in masks.items()}
            planned = {s: m for s, m in host.items() if s in self._streams()}
            frame = self.plan(context, planned, device)
            self.step = frame.step
        frame.used = True
        frame.drop_draws()
        self.frame = frame

    def _pending_frame(self) -> Frame | None:
        """The newest planned frame if no forward has taken it yet."""
        return self._frames[-1] if self._frames and not self._frames[-1].used else None

    def end_forward(self, outputs: list[Tensor]) -> None:
        """The model's forward hook, given the forward's output tensors: a compiled forward's frame
        keeps no tensor of it (see `Frame.drop_draws`); an eager frame keeps its draws (weak
        references) for its recomputes and notes when backward reaches its outputs."""
        frame = self.frame
        if frame is None:
            return
        if torch.compiler.is_compiling():
            frame.drop_draws()
            return
        needing = [t for t in outputs if t.requires_grad]
        if needing:
            frame.outputs = [weakref.ref(t) for t in needing]
            torch.autograd.graph.register_multi_grad_hook(needing, functools.partial(_started, frame), mode="any")

    def awaits_backward(self) -> bool:
        """Whether a training forward's backward has yet to run (its recomputes need the model as
        it was)."""
        return any(frame.used and frame.awaits_backward() for frame in [*self._frames, self.frame] if frame)

    @contextmanager
    def in_frame(self, frame: Frame | None) -> Iterator[None]:
        """Within the block, the layers read `frame` (a checkpoint recompute: its forward's frame)."""
        saved, self.frame = self.frame, frame
        try:
            yield
        finally:
            self.frame = saved

    def _streams(self) -> set[str]:
        return set(self.layer_streams)

    def _check_planned_masks(self, frame: Frame, masks: dict[str, Tensor | None]) -> None:
        """A planned frame's layouts came from `wtacrs.batch`'s host mask: the forward's must be it."""
        for stream in self._streams() - {"decoder"}:
            rows = frame.rows.of(stream)
            if rows is not None:
                self._check_same(rows.host_mask, masks.get(stream), rows.mask)

    @staticmethod
    def _check_same(host_mask: Tensor, mask: Tensor | None, device_mask: Tensor | None = None) -> None:
        """Raise MaskMismatchError if the forward's `mask` is not `host_mask` (no device wait: on
        an accelerator the comparison is an asynchronous device assert)."""
        if mask is None:
            if live_count(host_mask) != host_mask.numel():
                raise MaskMismatchError("wtacrs.batch was given an attention_mask with padding, but the model's "
                                        "forward got none: pass the same mask to both")
            return
        if tuple(mask.shape) != tuple(host_mask.shape):
            raise MaskMismatchError(f"wtacrs.batch was given an attention_mask of shape {tuple(host_mask.shape)}, "
                                    f"but the model's forward got one of shape {tuple(mask.shape)}: pass the same "
                                    "mask to both (a forward of another batch needs its own wtacrs.batch block)")
        expected = device_mask if device_mask is not None else to_device(host_mask, mask.device)
        message = ("the attention_mask given to wtacrs.batch differs from the one the model's forward got: pass the "
                   "same mask to both")
        try:  # on an accelerator a device-side assert, raised asynchronously
            torch._assert_async((mask.to(torch.bool) == expected).all(), f"wtacrs: {message}")
        except RuntimeError:
            raise MaskMismatchError(message) from None

    def _add_decoder_rows(self, frame: Frame, masks: dict[str, Tensor | None], device: torch.device) -> None:
        """An encoder-decoder's decoder rows are laid out by the forward's decoder mask, which
        `wtacrs.batch` does not know: one copy of it to the host."""
        decoder = masks.get("decoder")
        if "decoder" not in self._streams() or decoder is None or frame.rows.of("decoder") is not None:
            return
        rows = forward_rows("decoder", decoder.to(torch.bool), decoder.to(torch.bool).cpu(), current_batch())
        frame.rows.add(rows)
        frame.reader.multipliers(rows, samples_inside_mask(self.config, rows), None, self.draws.members,
                                 self.num_layers, device)
        frame.plan.add_layout(rows, self.layer_streams, self.recorder, self.config, device)

    def _warn_if_ids_needed(self, planned: list[ForwardRows]) -> None:
        """Once: layers that draw in forward score rows by cached norms, which example ids key."""
        if self._warned_no_ids or self.config.grad_norm != "cache" or not planned:
            return
        if any(rows.example_ids is not None for rows in planned):
            return
        forward_slots = [s for s in range(self.num_layers) if self._reads_cache(s)]
        if self.step > 1 and forward_slots:
            logger.warning("wtacrs: no example ids, but %d sampled layer(s) draw their rows in forward (e.g. %s) "
                           "and score them by the gradient-norm cache, which the ids key: pass them with "
                           "wtacrs.batch(ids, mask); until then these layers score rows by activation norms",
                           len(forward_slots), self.layer_names[forward_slots[0]])
            self._warned_no_ids = True

    # -- per layer call ------------------------------------------------------------------------
    def layer_call(self, slot: int, stream: str, x: Tensor) -> tuple[RowSample, Tensor | None]:
        """For one call of the layer in `slot` on x (..., in_features), whose rows `stream` lays out:
        its row sample (shared with the layers reading the same x), and the norm sink its backward
        sets to the per-row ‖dY_i‖ (None when nothing records them)."""
        frame = self._frame()
        rows = frame.rows.rows_for(stream, x)
        self.drawn_in_forward.add(slot)
        self._record_storage(slot, x, "nothing" if inputs_kept() else "rows")
        sample = frame.draws.reuse(slot, x)
        if sample is None:
            sample = self._draw(frame, slot, x, rows)
            frame.draws.add(slot, x, sample)
        return sample, self._norm_sink(frame, slot, rows, x.device)

    def backward_draw(self, slot: int, stream: str, x: Tensor) -> tuple[BackwardDraw, Tensor | None]:
        """`layer_call` for a call whose input lives until backward anyway (`inputs_kept`): what
        its draw in backward needs (k, the row mask, the frame's uniforms of its slot; scores
        from the true ‖dY‖, so no cached norm), and the norm sink. Not shared: each layer draws
        with its own output gradient."""
        frame = self._frame()
        rows = frame.rows.rows_for(stream, x)
        self.drawn_in_backward.add(slot)
        self._record_storage(slot, x, "nothing" if inputs_kept() else "norms")
        k, covers_live, u = self._budget_and_uniforms(frame, slot, x, rows)
        mask = rows.mask.reshape(-1) if samples_inside_mask(self.config, rows) else None  # a view: no copy per layer
        return BackwardDraw(k, self.config.estimator, mask, u, covers_live), self._norm_sink(frame, slot, rows, x.device)

    def stored_input(self, slot: int) -> tuple[StoredInput | None, bool]:
        """What `slot`'s last training call kept for its weight gradient (None: no call yet), and
        whether its input's producer keeps that input anyway (read-only, for `wtacrs.summary`)."""
        return self._stored.get(slot), self._input_kept_anyway.get(slot, False)

    def _record_storage(self, slot: int, x: Tensor, stored: StoredInput) -> None:
        """For `wtacrs.summary`: what the call keeps; whether x's producer keeps x (read once: the
        graph's shape does not change between steps)."""
        self._stored[slot] = stored
        # (inside a checkpointed region the graph's saved tensors are the checkpoint's: not read)
        if stored != "nothing" and slot not in self._input_kept_anyway and not torch.compiler.is_compiling():
            self._input_kept_anyway[slot] = kept_by_its_producer(x)

    def _frame(self) -> Frame:
        if self.frame is None:
            raise RuntimeError("wtacrs: a sampled layer ran in training outside its model's forward (call the model, "
                               "not the layer, or wrap the layer's call in a model that wtacrs.apply changed)")
        return self.frame

    def _norm_sink(self, frame: Frame, slot: int, rows: ForwardRows | None, device: torch.device) -> Tensor | None:
        cached = self._reads_cache(slot)
        if rows is None or not self.recorder.wants(rows, cached):
            return None
        return frame.plan.sink(slot, rows, device, cached)

    def _reads_cache(self, slot: int) -> bool:
        """Whether `slot`'s draws may read its cached norms: it has drawn in forward, or not yet at all."""
        return slot in self.drawn_in_forward or slot not in self.drawn_in_backward

    def _draw(self, frame: Frame, slot: int, x: Tensor, rows: ForwardRows | None) -> RowSample:
        k, covers_live, u = self._budget_and_uniforms(frame, slot, x, rows)
        multiplier = None
        if rows is not None:
            multipliers = frame.reader.multipliers(rows, samples_inside_mask(self.config, rows),
                                                   self._cache_for_reading(), self.draws.members, self.num_layers,
                                                   x.device)
            multiplier = multipliers if multipliers is None or isinstance(multipliers, Tensor) else multipliers[slot]
        return draw_rows(x, k, self.config.estimator, multiplier, u, covers_live)

    def _budget_and_uniforms(self, frame: Frame, slot: int, x: Tensor, rows: ForwardRows | None
                             ) -> tuple[int, bool, Tensor]:
        """(k, whether k covers every live row, the slot's uniforms) of a draw over x's rows."""
        num_rows = x.numel() // x.shape[-1]
        budget = None if rows is None else frame.plan.budget(rows.key)
        k, covers_live = budget if budget is not None else draw_budget(self.config, rows, num_rows)
        count = uniforms_needed(self.config.estimator, k, num_rows)
        layout = num_rows if rows is None else rows.key
        return k, covers_live, frame.uniforms.of_slot(slot, x.device, layout, count, self.num_layers,
                                                      frame.plan.slot_keys)

    def _cache_for_reading(self) -> GradNormCache | None:
        return self.folder.cache if self.config.grad_norm == "cache" else None

    # -- end of a step -------------------------------------------------------------------------
    def commit(self) -> None:
        """End of a training step (the `wtacrs.batch` block's exit): ship every frame's recorded
        norms, folded in at the cache's next use; under data parallelism at once, as the exchange
        is a collective of every rank and step. The frames' tables are freed: the optimizer step
        that follows is where the memory peaks once activations are small."""
        self.step = max([self.step] + [frame.step for frame in self._frames if frame.used])  # compiled forwards
        self._idle = bool(self._frames) and not any(frame.used for frame in self._frames)
        self._collect(self._frames)
        if self.sync is not None:
            self.folder.fold(self.recorder.take(), self.layer_names, exchange=self.sync)

    def end_step(self) -> None:
        """The `wtacrs.batch` block is left (after `commit`, or by an exception): frames not
        collected are dropped; a model that took none of its block's frames is idle."""
        if self._frames:
            self._idle = not any(frame.used for frame in self._frames)
        self._frames.clear()
        self.frame = None

    def _collect_finished(self) -> None:
        """Outside `wtacrs.batch`, at the next training forward: the earlier frames whose backward
        ran are collected; the newest is kept a while if its backward has not run yet."""
        finished = [f for f in self._frames if f.plan.backward_ran()]
        waiting = [f for f in self._frames if f not in finished][-1:]
        self._collect(finished)
        self._frames = waiting

    def _collect(self, frames: list[Frame]) -> None:
        for frame in frames:
            frame.plan.collect(self.recorder)
            frame.drop_draws()
            frame.reader.clear()
        self.recorder.ship()
        self._frames = [f for f in self._frames if f not in frames]

    def flush(self) -> None:
        """Fold every shipped step into the cache (waiting for its transfer), raising
        PaddingGradientError if a row skipped as padding got a non-zero output gradient."""
        if current_batch() is None:
            self._collect([f for f in self._frames if f.plan.backward_ran()])
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
        self._frames.clear()
        self.step = int(state["step"])
        self.draws.load_leaders(state["group_leader"])
        self.folder.load_state_dict(state)


def _started(frame: Frame, grad: Tensor) -> None:
    frame.backward_started = True


def live_states() -> list[SamplingState]:
    """The sampling states of every model `wtacrs.apply` changed that is still alive."""
    return list(_LIVE_STATES)


def frames_now() -> list[tuple[SamplingState, Frame | None]]:
    """Every live state with its current frame (what a checkpointed region's recompute restores)."""
    return [(state, state.frame) for state in _LIVE_STATES if state.frame is not None]


def bind_frames(function: Callable) -> Callable:
    """`function` run with the frames that were current when `bind_frames` was called: wrap a
    checkpointed region's function with it, so that its recompute in backward draws from its own
    forward's frame even after other forwards ran."""
    bound = [] if torch.compiler.is_compiling() else frames_now()  # compiled backward recomputes without Python
    if not bound:
        return function

    @functools.wraps(function)
    def in_bound_frames(*args, **kwargs):
        with _restored(bound):
            return function(*args, **kwargs)

    return in_bound_frames


@contextmanager
def _restored(bound: list[tuple[SamplingState, Frame | None]]) -> Iterator[None]:
    saved = [(state, state.frame) for state, _ in bound]
    for state, frame in bound:
        state.frame = frame
    try:
        yield
    finally:
        for state, frame in saved:
            state.frame = frame
