"""Sampled linear layers and the per-model sampling state they share.

What the bare op cannot do on its own, each in one small unit:
1. `DrawRegistry`, one sample per tensor: layers reading the same activation (q, k and v read one
   hidden-states tensor) share one `RowSample`; the first layer to see the tensor draws it, the
   others reuse it and save nothing new. Keyed by the tensor object (weak references).
2. `NormReader`, example ids -> gradient-norm cache -> scores: inside `wtacrs.batch(ids)`, one
   host lookup per forward and row mask brings every layer's cached ‖dY‖ to the device in one
   asynchronous copy, already combined per shared draw and masked.
3. `StepRecorder`: backward hands each layer's per-row ‖dY‖ to it; at the end of the step they
   leave for the host in one non-blocking copy, with one flag per layer for the padding check
   below, and are folded into the cache at its next use (next forward, `state.cache`, checkpoint).
4. Reproducible draws: the uniforms of a draw are a hash of (seed, rank, step, layer slot, slot
   in the draw) (`wtacrs.counter_rng`), so a checkpoint recompute and a resumed run sample the
   same rows, on any device, with no generator state. A layer called several times per forward
   (ALBERT shares one layer across depth) reuses its slot: each call's estimate stays unbiased,
   the calls' draws are correlated and the cached norms are those of its last call.
5. The padding assumption, checked: rows outside the attention mask are never drawn, which is
   unbiased only if their output gradient is zero. The recorder tests that on the norms it has
   anyway; a step that breaks it raises `PaddingGradientError` when its records are folded.

Nothing in a training step reads a device value on the host, given the batch's attention mask on
the host (`wtacrs.batch(ids, attention_mask=...)`, as `WTACRSTrainer` passes it); without it, the
mask is copied to the host once per forward.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs import counter_rng
from wtacrs.cache import GradNormCache, PendingRecord, encode_norms
from wtacrs.config import WTACRSConfig
from wtacrs.estimators import fill_missing_norms, uniforms_needed
from wtacrs.functional import (
    RowSample,
    draw_rows,
    gather_rows,
    linear_with_sample,
    needs_sampling,
    output_row_norms,
    slot_budget,
)

logger = logging.getLogger(__name__)

_current_batch: contextvars.ContextVar["BatchContext | None"] = contextvars.ContextVar("wtacrs_batch", default=None)


class PaddingGradientError(RuntimeError):
    """A row outside the attention mask got a non-zero output gradient, so skipping it biased dW."""


@dataclass
class BatchContext:
    example_ids: Tensor  # (B,) int64, on the host
    attention_mask: Tensor | None  # (B, T) bool on the host, if the caller gave it
    states: list["SamplingState"] = dataclasses.field(default_factory=list)


@contextmanager
def batch(example_ids: Tensor | list[int], attention_mask: Tensor | None = None,
          model: nn.Module | None = None) -> Iterator[None]:
    """Tell sampled models which examples the current training step sees.

    Forward passes inside the block read the gradient-norm cache for these examples; output
    gradient norms computed by backward inside the block are committed when it exits.

    Args:
        example_ids: (B,) non-negative integer ids, one per example of the batch, stable
            across epochs (e.g. the dataset index).
        attention_mask: (B, T) the batch's attention mask while it is still on the host (before
            moving the batch to a GPU): lets the step count live rows and look up the cache
            without waiting for the GPU. Optional, except with `model`.
        model: a model with `wtacrs.apply` whose step's host work (step counter, cache lookup,
            row layout, the draws' key) is done here, at enter, and whose norms are collected at
            exit: its forward and backward inside the block then run no host code, so a training
            step can be compiled whole (`torch.compile(step, fullgraph=True)`, see README). The
            block then holds one training forward of `model`, whose rows are laid out as
            `attention_mask` (an encoder-decoder's decoder samples by activation norms only).
    """
    ids = torch.as_tensor(example_ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"example_ids must be a 1-D sequence of integers, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.device.type == "cpu" and ids.numel() and int(ids.min()) < 0:
        raise ValueError("example_ids must be non-negative")
    host_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != ids.numel():
            raise ValueError(f"attention_mask must be (batch, seq) with batch = {ids.numel()} example ids, "
                             f"got shape {tuple(attention_mask.shape)}")
        host_mask = attention_mask.cpu().to(torch.bool)
    planned = None
    if model is not None:
        if host_mask is None:
            raise ValueError("wtacrs.batch(model=...) needs the attention_mask: it lays out the rows "
                             "before the forward")
        from wtacrs.modeling import sampling_state, swap_new_targets  # modeling imports this module

        planned = sampling_state(model)
        swap_new_targets(model, planned)
    context = BatchContext(ids.to(torch.int64).cpu(), host_mask)
    token = _current_batch.set(context)
    try:
        if planned is not None:
            planned.plan_step(context, next(model.parameters()).device)
        yield
        if planned is not None:
            planned.collect_norm_sinks()
        for state in context.states:
            state.commit()
    finally:
        for state in context.states:
            state.discard_pending()
        if planned is not None:
            planned.end_plan()
        _current_batch.reset(token)


@dataclass
class _Draw:
    """A sample shared by every layer that reads one tensor during one forward pass.

    Holds the small part (indices, weights) and only weak references to the big tensors: the
    input and the sampled rows, which the autograd graph owns. When the rows are gone but the
    input lives (gradient checkpointing discards saved tensors during forward), they are
    gathered again from the same indices, so every consumer and every recompute sees the
    same draw."""

    tensor: weakref.ref
    version: int | None
    rows: weakref.ref
    sample: RowSample  # with rows=None
    leader: int  # layer slot that drew it

    def reuse_for(self, x: Tensor) -> RowSample | None:
        if self.tensor() is not x or self.version != _version(x):
            return None
        rows = self.rows()
        if rows is None:
            rows = gather_rows(x, self.sample.indices, self.sample.weights)
            self.rows = weakref.ref(rows)
        return dataclasses.replace(self.sample, rows=rows)


def _version(x: Tensor) -> int | None:
    """x's version counter; None inside torch.compile, which cannot read it: there an in-place
    change of an input between two sampled layers reading it goes unseen (no model we know does it)."""
    return None if torch.compiler.is_compiling() else x._version


class DrawRegistry:
    """The draws of the current forward pass, by tensor, and which layers shared one last time."""

    def __init__(self):
        # Searched by identity (`is`), newest first (q, k and v follow each other): compiled code
        # can compare tensors by identity but cannot take their id().
        self._draws: list[_Draw] = []
        self.groups: dict[int, set[int]] = {}  # leader slot -> slots that reused its draw
        self._members: tuple[tuple, Tensor] | None = None  # (groups as of, table)

    def clear(self) -> None:
        self._draws.clear()

    def reuse(self, slot: int, x: Tensor) -> RowSample | None:
        for draw in reversed(self._draws):
            sample = draw.reuse_for(x)
            if sample is not None:
                self.groups.setdefault(draw.leader, {draw.leader}).add(slot)
                return sample
        return None

    def add(self, slot: int, x: Tensor, sample: RowSample) -> None:
        small = dataclasses.replace(sample, rows=None)
        self._draws.append(_Draw(weakref.ref(x), _version(x), weakref.ref(sample.rows), small, slot))

    def members(self, num_slots: int) -> Tensor:
        """(S, S) float32: [leader, member] = 1 for the members of each leader's last draw (and
        itself); rebuilt only when the groups change (in practice: after the first step)."""
        key = (num_slots, tuple((leader, tuple(sorted(group))) for leader, group in sorted(self.groups.items())))
        if self._members is None or self._members[0] != key:
            table = torch.eye(num_slots)
            for leader, group in self.groups.items():
                table[leader, [s for s in group if s < num_slots]] = 1.0
            self._members = (key, table)
        return self._members[1]

    def leaders(self, num_slots: int) -> Tensor:
        """(S,) int64: the slot whose draw each slot reused (itself when it drew)."""
        leaders = torch.arange(num_slots)
        for leader, group in self.groups.items():
            leaders[[s for s in group if s < num_slots]] = leader
        return leaders

    def load_leaders(self, leaders: Tensor) -> None:
        groups: dict[int, set[int]] = {}
        for slot, leader in enumerate(leaders.tolist()):
            groups.setdefault(leader, {leader}).add(slot)
        self.groups = {leader: members for leader, members in groups.items() if len(members) > 1}


@dataclass
class ForwardRows:
    """How the rows of one stream's activations map to examples in the current forward.

    Attributes:
        key: names the layout within a forward (the stream, or the shape of an unmasked one).
        mask: (B, T) bool on the model's device (sampling and the padding check), or None.
        host_mask: (B, T) bool on the host (cache keys and live-row counts).
        example_ids: (B,) int64 on the host, or None outside `wtacrs.batch`.
        live: real rows (host_mask's count).
    """

    key: str
    mask: Tensor | None
    host_mask: Tensor
    example_ids: Tensor | None
    live: int

    def matches(self, x: Tensor) -> bool:
        return x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.host_mask.shape)


class NormReader:
    """Per forward and row mask: every slot's score multiplier, on the device, in one copy.

    multiplier[slot] = ‖dY‖ cached for the slot's draw group (Σ_members ‖dY‖²)^½ (shared draws serve
    several layers: this p minimises their summed variance), missing ones filled
    (`estimators.fill_missing_norms`), times the row mask."""

    def __init__(self):
        self._tables: dict[str, Tensor | None] = {}  # ForwardRows.key -> (S, N) float32 on the device

    def clear(self) -> None:
        self._tables.clear()

    def multipliers(self, rows: ForwardRows, use_mask: bool, cache: GradNormCache | None,
                    members: Callable[[int], Tensor], num_slots: int, device: torch.device) -> Tensor | None:
        """(S, N) or (1, N) float32 multipliers for `rows` (row mask applied if `use_mask`), or None for 1."""
        if rows.key not in self._tables:
            self._tables[rows.key] = self._build(rows, use_mask, cache, members, num_slots, device)
        return self._tables[rows.key]

    @staticmethod
    def _build(rows: ForwardRows, use_mask: bool, cache: GradNormCache | None, members: Callable[[int], Tensor],
               num_slots: int, device: torch.device) -> Tensor | None:
        mask = rows.mask.view(1, -1).to(torch.float32) if use_mask else None  # (1, N)
        if cache is None or rows.example_ids is None:
            return mask
        norms = cache.lookup_slots(list(range(cache.num_slots)), rows.example_ids, rows.host_mask)  # (S', B, T)
        known = norms.isfinite().reshape(cache.num_slots, -1).float()
        squares = norms.nan_to_num(0.0).square().reshape(cache.num_slots, -1)
        table = members(num_slots)[:, : cache.num_slots]  # layers added after the cache have no slot
        combined = torch.where(table @ known > 0, (table @ squares).sqrt(), torch.nan)  # (S, N)
        filled = fill_missing_norms(_to_device(combined, device))
        return filled if mask is None else filled * mask


@dataclass
class _StepRecords:
    """One step's norms on their way to the host: codes (R, B, T) uint8, one padding flag per record."""

    slots: list[int]
    example_ids: Tensor
    host_mask: Tensor
    codes: Tensor
    leaks: Tensor | None  # (R,) bool: a row outside the mask got gradient
    ready: torch.cuda.Event | None


class StepRecorder:
    """Collects each sampled layer's output-gradient row norms in backward and ships them."""

    def __init__(self):
        self._pending: list[tuple[int, ForwardRows, Tensor]] = []  # (slot, rows, (B, T) norms on device)
        self._shipped: list[_StepRecords] = []

    def hook(self, slot: int, rows: ForwardRows, track_padding: bool) -> Callable[[Tensor], None]:
        """The callback for one layer call's backward: grad (B, T, out) → its row norms, kept."""
        def on_grad(grad: Tensor) -> None:
            self.record(slot, rows, output_row_norms(grad), track_padding)
        return on_grad

    def record(self, slot: int, rows: ForwardRows, norms: Tensor, track_padding: bool) -> None:
        """Keep one layer call's (B, T) row norms until the step ends."""
        self._pending.append((slot, rows if track_padding else dataclasses.replace(rows, mask=None), norms))

    def ship(self) -> None:
        """End of a step: one non-blocking transfer per row layout (the layers of a forward share one)."""
        by_rows: dict[int, list[tuple[int, ForwardRows, Tensor]]] = {}
        for record in self._pending:
            by_rows.setdefault(id(record[1].host_mask), []).append(record)
        self._pending = []
        for records in by_rows.values():
            self._shipped.append(_ship(records))

    def discard(self) -> None:
        self._pending = []

    def take(self) -> list[_StepRecords]:
        shipped, self._shipped = self._shipped, []
        return shipped


def _ship(records: list[tuple[int, ForwardRows, Tensor]]) -> _StepRecords:
    rows = records[0][1]
    norms = torch.stack([n for _, _, n in records])  # (R, B, T)
    masks = [r.mask for _, r, _ in records]
    leaks = None
    if any(m is not None for m in masks):
        if all(m is masks[0] for m in masks):  # the usual case: one mask for the whole forward
            inside = masks[0]  # (B, T), broadcast over the records
        else:
            inside = torch.stack([torch.ones_like(norms[0], dtype=torch.bool) if m is None else m for m in masks])
        leaks = norms.masked_fill(inside, 0.0).amax((1, 2)) > 0  # (R,): a row outside got gradient
    codes = _to_host(encode_norms(norms))
    leaks = None if leaks is None else _to_host(leaks)
    ready = None
    if norms.device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return _StepRecords([s for s, _, _ in records], rows.example_ids, rows.host_mask, codes, leaks, ready)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device`, copied so that the device never waits for the host (pinned,
    non-blocking) where that matters."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _to_host(t: Tensor) -> Tensor:
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


@dataclass
class StepPlan:
    """What `SamplingState.plan_step` prepared for the coming training forward (besides the row
    layouts and the reader's tables), so that the forward and backward run no host code.

    Attributes:
        step_key: () int64 on the model's device, this step's key of the counter-based draws.
        budgets: by row layout (`ForwardRows.key`), k as the length of an empty (k, 0) tensor marked
            dynamic, and whether k covers every live row: k depends on the batch's real tokens,
            and as a tensor's size it reaches compiled code as a symbol, so that batches with
            other numbers of real tokens run the same graph (a Python int would be a constant).
        norm_sinks: by slot, a (B, T) float32 leaf on the device that the slot's op takes as an
            input and whose gradient backward sets to the slot's ‖dY_i‖ (None: nothing to record).
            Norms leave backward as a gradient rather than through a callback: backward then has
            no Python side effects, which a compiled backward could not keep.
    """

    step_key: Tensor
    norm_sinks: list[Tensor | None]
    budgets: dict[str, tuple[Tensor, bool]]


class SamplingState:
    """Everything sampled layers of one model share: the config, the step counter, the cache, and
    the units above."""

    def __init__(self, config: WTACRSConfig):
        self.config = config
        self.step = 0
        self._cache: GradNormCache | None = None
        self.draws = DrawRegistry()
        self.reader = NormReader()
        self.recorder = StepRecorder()
        self._rows: dict[str, ForwardRows | None] = {}  # by stream, for this forward
        self._batch_ids: Tensor | None = None  # example ids of the current forward, if known
        self._uniform_tables: dict[tuple[torch.device, str | int], Tensor] = {}
        self._warned_no_ids = False
        self._warned_id_count = False
        self.hooks: tuple[torch.utils.hooks.RemovableHandle, ...] = ()  # set by wtacrs.apply
        self.layer_names: list[str] = []  # qualified names of the sampled layers, by slot
        self.layer_streams: list[str] = []  # which attention mask lays out each slot's rows
        self._plan: StepPlan | None = None  # inside `wtacrs.batch(..., model=)`
        self.num_modules = 0  # modules in the model when its layers were last swapped
        # Data parallel (set by wtacrs.integrations.distributed): each rank draws its own rows,
        # and `sync` exchanges the step's cache records so every rank's cache holds all of them.
        self.rank = 0
        self.sync: Callable[[list[PendingRecord]], list[PendingRecord]] | None = None
        self.companions: list[str] = []  # modules swapped by wtacrs.companions

    @property
    def num_layers(self) -> int:
        """Sampled layers (slots) so far."""
        return len(self.layer_names)

    @property
    def _groups(self) -> dict[int, set[int]]:
        return self.draws.groups

    @property
    def cache(self) -> GradNormCache | None:
        """The gradient-norm cache, with every finished step folded in (waits for the device)."""
        self.flush()
        return self._cache

    # -- per forward pass ----------------------------------------------------------------------
    def begin_forward(self, masks: dict[str, Tensor | None]) -> None:
        """Called before each top-level forward of the model."""
        self.flush()
        self._release_forward_tables()
        batch_context = _current_batch.get()
        if batch_context is not None and self not in batch_context.states:
            batch_context.states.append(self)
        # Read the ids now: a checkpoint recompute runs inside backward, which autograd runs on
        # a device thread for CUDA tensors, where the context variable is not set.
        self._batch_ids = None if batch_context is None else batch_context.example_ids
        self._rows = {stream: _forward_rows(stream, mask, batch_context, host_mask_given=stream != "decoder")
                      for stream, mask in masks.items()}
        if torch.is_grad_enabled():
            self.step += 1

    def plan_step(self, context: BatchContext, device: torch.device) -> None:
        """`wtacrs.batch(..., model=)` enter: `begin_forward`'s host work for the coming training
        forward, and the cache's multiplier tables and the norm sinks it will read."""
        self.flush()
        self._release_forward_tables()
        context.states.append(self)
        self.step += 1
        self._batch_ids = context.example_ids
        host_mask = context.attention_mask
        mask = _to_device(host_mask, device)
        live = _live_count(host_mask)
        streams = set(self.layer_streams) - {"decoder"}  # the batch's mask is not a decoder's
        self._rows = {stream: ForwardRows(stream, mask, host_mask, context.example_ids, live) for stream in streams}
        for rows in self._rows.values():
            self._multipliers(rows, device)
        sinks = []
        for stream in self.layer_streams:
            rows = self._rows.get(stream)
            records = rows is not None and self._records_norms(rows)
            sinks.append(torch.empty(host_mask.shape, device=device).requires_grad_() if records else None)
        budgets = {}
        for key, rows in self._rows.items():
            k, covers_live = self._host_budget(rows, host_mask.numel())
            slots = torch.empty(k, 0, device=device)  # no elements: no memory, no copy
            torch._dynamo.maybe_mark_dynamic(slots, 0)
            budgets[key] = (slots, covers_live)
        key = torch.tensor(counter_rng.stream_key(self.config.seed, self.rank, self.step))
        self._plan = StepPlan(_to_device(key, device), sinks, budgets)

    def drop_draws(self) -> None:
        """Before and after each top-level forward inside `wtacrs.batch(..., model=)` (all it does
        on the host): a compiled forward must leave no reference to its tensors in Python state,
        and a checkpoint recompute draws the same rows again from the step's key."""
        self.draws.clear()
        self._uniform_tables.clear()

    def collect_norm_sinks(self) -> None:
        """`wtacrs.batch(..., model=)` exit: the norms backward left in the sinks, recorded."""
        for slot, sink in enumerate(self._plan.norm_sinks):
            if sink is not None and sink.grad is not None:
                rows = self._rows[self.layer_streams[slot]]
                self.recorder.record(slot, rows, sink.grad, track_padding=self.config.skip_padding)

    def end_plan(self) -> None:
        self._plan = None

    @property
    def planned(self) -> bool:
        """Inside `wtacrs.batch(..., model=)` of this state's model."""
        return self._plan is not None

    def rows_for(self, stream: str, x: Tensor) -> ForwardRows | None:
        """The example/row layout of x's rows, if they are (example, token) rows of this forward."""
        rows = self._rows.get(stream)
        if rows is None and stream in self._rows:  # no mask given: every row is real
            rows = self._unmasked_rows(x)
        if rows is None or not rows.matches(x):
            if x.dim() == 3 and rows is not None and rows.example_ids is not None and not self._warned_id_count:
                logger.warning("wtacrs: %d example ids for a batch of %d; this layer samples by activation norms only",
                               rows.example_ids.numel(), x.shape[0])
                self._warned_id_count = True
            return None
        return rows

    def _unmasked_rows(self, x: Tensor) -> ForwardRows | None:
        ids = self._batch_ids
        if ids is None or x.dim() != 3 or x.shape[0] != ids.numel():
            return None
        key = f"unmasked-{x.shape[0]}x{x.shape[1]}"
        if key not in self._rows:  # one per shape and forward, so the reader's tables key on it
            everything = torch.ones(x.shape[:2], dtype=torch.bool)
            self._rows[key] = ForwardRows(key, None, everything, ids, x.shape[0] * x.shape[1])
        return self._rows[key]

    def sample_for(self, slot: int, x: Tensor, rows: ForwardRows | None) -> RowSample:
        """The shared draw for `x`, drawing it if this is the first layer to read `x`."""
        sample = self.draws.reuse(slot, x)
        if sample is None:
            sample = self._draw(slot, x, rows)
            self.draws.add(slot, x, sample)
        return sample

    def _draw(self, slot: int, x: Tensor, rows: ForwardRows | None) -> RowSample:
        num_rows = x.numel() // x.shape[-1]
        k, covers_live = self._budget(rows, num_rows)
        multiplier = None
        if rows is not None:
            table = self._multipliers(rows, x.device)
            multiplier = table if table is None or table.shape[0] == 1 else table[slot : slot + 1]
        estimator = self.config.estimator
        count = uniforms_needed(estimator, k, num_rows)
        u = self._uniform_table(x.device, num_rows if rows is None else rows.key, count)[slot : slot + 1]
        return draw_rows(x, k, estimator, multiplier, u, covers_live)

    def _budget(self, rows: ForwardRows | None, num_rows: int) -> tuple[int, bool]:
        """k of a draw over `num_rows` rows laid out as `rows`, and whether it covers every live row."""
        if rows is not None and self._plan is not None:
            slots, covers_live = self._plan.budgets[rows.key]
            return slots.shape[0], covers_live
        return self._host_budget(rows, num_rows)

    def _host_budget(self, rows: ForwardRows | None, num_rows: int) -> tuple[int, bool]:
        live = rows.live if self._samples_inside_mask(rows) else None
        k = slot_budget(self.config.ratio, self.config.budget, num_rows, live)
        return k, live is not None and k >= live

    def _samples_inside_mask(self, rows: ForwardRows | None) -> bool:
        return rows is not None and rows.mask is not None and self.config.skip_padding

    def _multipliers(self, rows: ForwardRows, device: torch.device) -> Tensor | None:
        """(S, N) or (1, N) score multipliers for `rows` this forward (see `NormReader`), or None."""
        cache = self._cache if self.config.grad_norm == "cache" else None
        return self.reader.multipliers(rows, self._samples_inside_mask(rows), cache, self.draws.members,
                                       self.num_layers, device)

    def _uniform_table(self, device: torch.device, layout: str | int, count: int) -> Tensor:
        """(S, count) uniforms of this step, one stream per slot, made once per forward and row
        layout (a `ForwardRows.key`, or the row count of a draw without one), which fixes count.
        Keyed by layout rather than count: in compiled code count may be a symbol, and a symbol
        used as a key would be made a constant."""
        key = (device, layout)
        if key not in self._uniform_tables:
            if self._plan is not None:
                step_key = self._plan.step_key
            else:
                step_key = counter_rng.stream_key(self.config.seed, self.rank, self.step)
            slots = torch.arange(self.num_layers, device=device)
            self._uniform_tables[key] = counter_rng.uniforms(counter_rng.hash32(slots ^ step_key), count)
        return self._uniform_tables[key]

    def norm_recorder(self, slot: int, rows: ForwardRows | None
                      ) -> tuple[Callable[[Tensor], None] | None, Tensor | None]:
        """How this layer call's backward hands over its per-row ‖dY_i‖ (for the cache and the
        padding check): (callback, None), or (None, the step's norm sink) inside
        `wtacrs.batch(..., model=)`; (None, None) when nothing needs them."""
        if rows is None or not self._records_norms(rows):
            return None, None
        if self._plan is not None:
            return None, self._plan.norm_sinks[slot]
        return self.recorder.hook(slot, rows, track_padding=self.config.skip_padding), None

    def _records_norms(self, rows: ForwardRows) -> bool:
        if rows.example_ids is None or self.config.grad_norm != "cache":
            if not self._warned_no_ids and self.config.grad_norm == "cache":
                logger.warning("wtacrs: no example ids (use wtacrs.batch(ids)); sampling by activation norms only")
                self._warned_no_ids = True
            return rows.mask is not None and self.config.skip_padding
        return True

    # -- end of a step -------------------------------------------------------------------------
    def _release_forward_tables(self) -> None:
        self.draws.clear()
        self.reader.clear()
        self._uniform_tables.clear()

    def commit(self) -> None:
        """End of a training step: ship the recorded norms, folded in at the cache's next use;
        under data parallelism at once, as the exchange is a collective of every rank and step.
        The forward's tables (multipliers, uniforms) are freed: the optimizer step that follows
        is where the memory peaks once activations are small."""
        self._release_forward_tables()
        self.recorder.ship()
        if self.sync is not None:
            self._fold(self.recorder.take(), exchange=True)

    def discard_pending(self) -> None:
        self.recorder.discard()

    def flush(self) -> None:
        """Fold every shipped step into the cache (waiting for its transfer), raising
        PaddingGradientError if a row skipped as padding got a non-zero output gradient (the
        estimate then lacked that row's share of dW)."""
        self.recorder.ship()  # norms recorded outside `wtacrs.batch` too: the padding check needs them
        shipped = self.recorder.take()
        if shipped:
            self._fold(shipped, exchange=False)

    def _fold(self, shipped: list[_StepRecords], exchange: bool) -> None:
        for records in shipped:
            if records.ready is not None:
                records.ready.synchronize()
            self._check_padding(records)
        if self._cache is None and (exchange or any(r.example_ids is not None for r in shipped)):
            # created at the first fold, so layers PEFT adds between `apply` and training get a slot
            self._cache = GradNormCache(self.num_layers, position_prior=self.config.position_prior)
        if self._cache is None:
            return
        for records in shipped:
            known = [i for i, slot in enumerate(records.slots) if slot < self._cache.num_slots]  # layers added
            if records.example_ids is not None and known:  # after the cache was sized have no slot
                codes = records.codes if len(known) == len(records.slots) else records.codes[known]
                self._cache.record_layers([records.slots[i] for i in known], records.example_ids,
                                          records.host_mask, codes)
        if exchange:
            self._cache.exchange_pending(self.sync)
        self._cache.commit()

    def _check_padding(self, records: _StepRecords) -> None:
        if records.leaks is None or not bool(records.leaks.any()):
            return
        names = sorted({self.layer_names[records.slots[i]] for i in records.leaks.nonzero().flatten().tolist()})
        raise PaddingGradientError(
            f"wtacrs: padding rows (outside attention_mask) got a non-zero output gradient in {len(names)} "
            f"sampled layer(s), e.g. {names[0]}: the loss reads padded positions (an extractive-QA head's "
            "softmax spans every position), so skipping them biases the weight gradient. Use "
            "WTACRSConfig(skip_padding=False), or keep padded positions out of the loss."
        )

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that make a resumed run sample like an uninterrupted one."""
        # Which layers share a draw decides whose cached norms score it.
        state = {"step": torch.tensor(self.step), "group_leader": self.draws.leaders(self.num_layers)}
        if self.cache is not None:
            state.update({f"cache.{k}": v for k, v in self.cache.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.recorder.take()
        self.step = int(state["step"])
        self.draws.load_leaders(state["group_leader"])
        cache = {k.removeprefix("cache."): v for k, v in state.items() if k.startswith("cache.")}
        if cache:
            self._cache = GradNormCache(int(cache["num_slots"]), position_prior=self.config.position_prior)
            self._cache.load_state_dict(cache)


def _forward_rows(stream: str, mask: Tensor | None, context: BatchContext | None,
                  host_mask_given: bool) -> ForwardRows | None:
    """The row layout of one stream from its (B, T) mask; the host copy comes from the batch
    context when it is this stream's (`host_mask_given`: the batch's attention_mask is not the
    decoder's) and matches (no wait), else from the mask itself (one copy per forward)."""
    ids = None if context is None else context.example_ids
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    host = context.attention_mask if context is not None and host_mask_given else None
    if host is None or host.shape != mask.shape:
        host = mask.cpu()
    if ids is not None and ids.numel() != mask.shape[0]:
        ids = None
    return ForwardRows(stream, mask, host, ids, _live_count(host))


def _live_count(host_mask: Tensor) -> int:
    """Real rows of a (B, T) bool mask on the host (a read of host memory, never a device wait)."""
    return int(host_mask.sum())


class SampledLayerMixin:
    """Forward of a layer whose weight gradient is row-sampled (see module docstring)."""

    wtacrs_state: SamplingState
    wtacrs_slot: int
    wtacrs_stream: str

    @classmethod
    def original_class(cls) -> type[nn.Module]:
        """The class this sampled class stands in for (the one after the mixin), for `remove`."""
        mro = cls.__mro__
        return mro[mro.index(SampledLayerMixin) + 1]

    def _sampled_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        state = self.wtacrs_state
        if not (self.training and needs_sampling(weight, state.config.ratio, state.config.estimator)):
            return F.linear(x, weight, bias)
        slot = self.wtacrs_slot
        rows = state.rows_for(self.wtacrs_stream, x)
        on_grad, norm_sink = state.norm_recorder(slot, rows)
        return linear_with_sample(x, weight, bias, state.sample_for(slot, x, rows), on_grad, norm_sink)


class SampledLinear(SampledLayerMixin, nn.Linear):
    """nn.Linear with the same parameters whose weight gradient is row-sampled in training."""

    def forward(self, x: Tensor) -> Tensor:
        return self._sampled_forward(x, self.weight, self.bias)


@functools.cache
def sampled_conv1d_class() -> type[nn.Module]:
    """GPT-2's Conv1D (y = x W + b with W of shape (in, out)) with a row-sampled weight gradient."""
    from transformers.pytorch_utils import Conv1D

    class SampledConv1D(SampledLayerMixin, Conv1D):
        def forward(self, x: Tensor) -> Tensor:
            if not self.training:
                return super().forward(x)
            # F.linear(x, Wᵀ, b) is the same addmm as Conv1D's; grads flow back through the view.
            return self._sampled_forward(x, self.weight.t(), self.bias)

    return SampledConv1D
