"""Sampled linear layers and the per-model sampling state they share.

Four things happen here that the bare op cannot do on its own:
1. One sample per tensor: layers reading the same activation (q, k and v read one hidden-states
   tensor) share one `RowSample`; the first layer to see the tensor draws it, the others reuse
   it and save nothing new. Keyed by the tensor object (weak references), not by module names.
2. Example ids -> gradient-norm cache -> scores: inside `wtacrs.batch(ids)`, each draw looks up
   ‖dY‖ recorded for these examples at their previous visit, and each layer's output gradient
   norms are recorded in backward (committed when the batch ends).
3. Reproducible draws: the generator of each draw is seeded by (seed, step, layer slot), so a
   checkpoint recompute and a resumed run sample the same rows. A layer called several times
   per forward (ALBERT shares one layer across depth) reuses its seed and its cache slot for
   every call: each call's estimate stays unbiased, the calls' draws are correlated and the
   cached norms are those of its last call.
4. The padding assumption, checked: rows outside the attention mask are never drawn, which is
   unbiased only if their output gradient is zero. Backward tests that on the per-row ‖dY‖ it
   computes anyway; a step that breaks it raises `PaddingGradientError` (extractive QA does).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs.cache import GradNormCache, PendingRecord
from wtacrs.config import WTACRSConfig
from wtacrs.functional import RowSample, draw_row_sample, gather_rows, linear_with_sample, needs_sampling

logger = logging.getLogger(__name__)

_current_batch: contextvars.ContextVar["BatchContext | None"] = contextvars.ContextVar("wtacrs_batch", default=None)


class PaddingGradientError(RuntimeError):
    """A row outside the attention mask got a non-zero output gradient, so skipping it biased dW."""


@dataclass
class BatchContext:
    example_ids: Tensor  # (B,) int64
    states: list["SamplingState"] = field(default_factory=list)


@contextmanager
def batch(example_ids: Tensor | list[int]) -> Iterator[None]:
    """Tell sampled models which examples the current training step sees.

    Forward passes inside the block read the gradient-norm cache for these examples; output
    gradient norms computed by backward inside the block are written when it exits.

    Args:
        example_ids: (B,) non-negative integer ids, one per example of the batch, stable
            across epochs (e.g. the dataset index).
    """
    ids = torch.as_tensor(example_ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"example_ids must be a 1-D sequence of integers, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("example_ids must be non-negative")
    context = BatchContext(ids.to(torch.int64).cpu())
    token = _current_batch.set(context)
    try:
        yield
        for state in context.states:
            state.commit()
    finally:
        for state in context.states:
            state.discard_pending()
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
    version: int
    rows: weakref.ref
    sample: RowSample  # with rows=None
    leader: int  # layer slot that drew it

    def reuse_for(self, x: Tensor) -> RowSample | None:
        if self.tensor() is not x or self.version != x._version:
            return None
        rows = self.rows()
        if rows is None:
            rows = gather_rows(x, self.sample.indices)
            self.rows = weakref.ref(rows)
        return dataclasses.replace(self.sample, rows=rows)


class SamplingState:
    """Everything sampled layers of one model share: config, cache, step counter, the draws of
    the current forward pass and which layers consumed the same tensor last time."""

    def __init__(self, config: WTACRSConfig):
        self.config = config
        self.step = 0
        self.cache: GradNormCache | None = None
        self._draws: dict[int, _Draw] = {}  # id(tensor) -> draw
        self._groups: dict[int, set[int]] = {}  # leader slot -> slots that reused its draw
        self._masks: dict[str, Tensor | None] = {}
        self._batch_ids: Tensor | None = None  # example ids of the current forward, if known
        self._host_masks: dict[tuple[int, int], Tensor] = {}
        self._cached_norms: dict[tuple[int, int], Tensor] = {}  # per mask: every slot's norms, on x's device
        self._first_records: list[tuple[int, Tensor, Tensor, Tensor]] = []  # before the cache exists
        self._warned_no_ids = False
        self._warned_id_count = False
        self.hook: torch.utils.hooks.RemovableHandle | None = None  # set by wtacrs.apply
        self.layer_names: list[str] = []  # qualified names of the sampled layers, by slot
        # (slot, largest output-gradient norm of a row outside its mask), checked once per step:
        # a device scalar each, so backward never waits for the GPU.
        self._padding_grads: list[tuple[int, Tensor]] = []
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

    # -- per forward pass ----------------------------------------------------------------------
    def begin_forward(self, masks: dict[str, Tensor | None]) -> None:
        """Called before each top-level forward of the model."""
        self.check_padding_gradients()
        self._draws.clear()
        self._host_masks.clear()
        self._cached_norms.clear()
        self._masks = {k: None if m is None else m.to(torch.bool) for k, m in masks.items()}
        batch_context = _current_batch.get()
        if batch_context is not None and self not in batch_context.states:
            batch_context.states.append(self)
        # Read the ids now: a checkpoint recompute runs inside backward, which autograd runs on
        # a device thread for CUDA tensors, where the context variable is not set.
        self._batch_ids = None if batch_context is None else batch_context.example_ids
        if torch.is_grad_enabled():
            self.step += 1

    def row_mask(self, stream: str, x: Tensor) -> Tensor | None:
        if not self.config.skip_padding:
            return None
        mask = self._masks.get(stream)
        return mask if mask is not None and mask.shape == x.shape[:-1] else None

    def sample_for(self, slot: int, x: Tensor, row_mask: Tensor | None) -> RowSample:
        """The shared draw for `x`, drawing it if this is the first layer to read `x`."""
        draw = self._draws.get(id(x))
        sample = None if draw is None else draw.reuse_for(x)
        if sample is not None:
            self._groups.setdefault(draw.leader, {draw.leader}).add(slot)
            return sample
        sample = self._draw(slot, x, row_mask)
        small = dataclasses.replace(sample, rows=None)
        self._draws[id(x)] = _Draw(weakref.ref(x), x._version, weakref.ref(sample.rows), small, slot)
        return sample

    def _draw(self, slot: int, x: Tensor, row_mask: Tensor | None) -> RowSample:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(hash((self.config.seed, self.rank, self.step, slot)) & 0x7FFF_FFFF_FFFF_FFFF)
        return draw_row_sample(
            x,
            ratio=self.config.ratio,
            estimator=self.config.estimator,
            row_mask=row_mask,
            grad_norm=self._cached_grad_norm(slot, x, row_mask),
            generator=generator,
            budget=self.config.budget,
        )

    # -- gradient-norm cache -------------------------------------------------------------------
    def _batch_rows(self, x: Tensor, row_mask: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """(example ids (B,), mask (B, T)) when x's rows are (example, token) of the current batch."""
        if self.config.grad_norm != "cache":
            return None
        if self._batch_ids is None:
            if not self._warned_no_ids:
                logger.warning("wtacrs: no example ids (use wtacrs.batch(ids)); sampling by activation norms only")
                self._warned_no_ids = True
            return None
        ids = self._batch_ids
        if x.dim() != 3 or x.shape[0] != ids.numel():
            if x.dim() == 3 and not self._warned_id_count:
                logger.warning(
                    "wtacrs: %d example ids for a batch of %d; this layer samples by activation norms only",
                    ids.numel(), x.shape[0],
                )
                self._warned_id_count = True
            return None
        return ids, row_mask if row_mask is not None else self._all_rows(x.shape[0], x.shape[1])

    def _all_rows(self, batch: int, length: int) -> Tensor:
        """A host all-True (batch, length) mask, one per shape and forward (so lookups can key on it)."""
        key = (-batch, -length)  # ids of live tensors are positive: no clash with _host_mask's keys
        if key not in self._host_masks:
            self._host_masks[key] = torch.ones(batch, length, dtype=torch.bool)
        return self._host_masks[key]

    def _cached_grad_norm(self, slot: int, x: Tensor, row_mask: Tensor | None) -> Tensor | None:
        rows = self._batch_rows(x, row_mask)
        if rows is None or self.cache is None:
            return None
        members = [s for s in self._groups.get(slot, {slot}) if s < self.cache.num_slots]
        if not members:
            return None
        norms = self._all_cached_norms(*rows, x.device)[members]  # (members, B, T)
        # Shared draws serve several layers: p_i ∝ ‖X_i‖·(Σ_layers ‖dY_i‖²)^½ minimises their summed variance.
        combined = norms.nan_to_num(0.0).square().sum(0).sqrt()
        return torch.where(norms.isnan().all(0), torch.nan, combined)

    def _all_cached_norms(self, ids: Tensor, mask: Tensor, device: torch.device) -> Tensor:
        """(slots, B, T) cached norms of every slot for this forward's rows, looked up once per
        forward and row mask: one host gather and one transfer instead of one per draw (on a
        GPU each per-draw lookup cost host work and a transfer; profiled in GPU_H200.md)."""
        key = (id(mask), mask.data_ptr())
        if key not in self._cached_norms:
            norms = self.cache.lookup_slots(list(range(self.cache.num_slots)), ids, self._host_mask(mask))
            if device.type == "cuda":  # pinned + non_blocking: no wait for the GPU's queue
                norms = norms.pin_memory().to(device, non_blocking=True)
            self._cached_norms[key] = norms.to(device)
        return self._cached_norms[key]

    def _host_mask(self, mask: Tensor) -> Tensor:
        """A host copy of a (B, T) mask, made once per forward: every layer sees the same few masks."""
        if mask.device.type == "cpu":
            return mask
        key = (id(mask), mask.data_ptr())
        if key not in self._host_masks:
            self._host_masks[key] = mask.cpu()
        return self._host_masks[key]

    def watch_output(self, slot: int, x: Tensor, row_mask: Tensor | None, y: Tensor) -> None:
        """In backward: check that rows outside `row_mask` get a zero output gradient, and record
        ‖dY_i‖ of the rows inside it for the next visit of these examples."""
        rows = self._batch_rows(x, row_mask)
        if not y.requires_grad or (rows is None and row_mask is None):
            return
        y.register_hook(lambda grad: self._on_output_grad(slot, row_mask, rows, grad))

    def _on_output_grad(self, slot: int, row_mask: Tensor | None, rows: tuple[Tensor, Tensor] | None,
                        grad: Tensor) -> None:
        norms = torch.linalg.vector_norm(grad, dim=-1, dtype=torch.float32)  # (B, T), on grad's device
        if row_mask is not None:
            self._padding_grads.append((slot, norms.masked_fill(row_mask, 0.0).amax()))
        if rows is None:
            return
        if self.cache is None:
            self._first_records.append((slot, *rows, norms))
        elif slot < self.cache.num_slots:  # a layer added after the cache was sized
            self.cache.record(slot, *rows, norms)

    def check_padding_gradients(self) -> None:
        """Raise PaddingGradientError if a row skipped as padding got a non-zero output gradient
        since the last check (the estimate then lacks that row's share of dW: biased)."""
        if not self._padding_grads:
            return
        slots, largest = zip(*self._padding_grads)
        self._padding_grads = []
        device = largest[0].device  # one transfer for all layers (a no-op move unless model-parallel)
        leaking = (torch.stack([g.to(device) for g in largest]).cpu() > 0).nonzero().flatten().tolist()
        if leaking:
            names = sorted({self.layer_names[slots[i]] for i in leaking})
            raise PaddingGradientError(
                f"wtacrs: padding rows (outside attention_mask) got a non-zero output gradient in {len(names)} "
                f"sampled layer(s), e.g. {names[0]}: the loss reads padded positions (an extractive-QA head's "
                "softmax spans every position), so skipping them biases the weight gradient. Use "
                "WTACRSConfig(skip_padding=False), or keep padded positions out of the loss."
            )

    def commit(self) -> None:
        """End of a training step: write the recorded norms. The cache is created at the first
        commit, so layers PEFT adds between `apply` and training get a slot."""
        self.check_padding_gradients()
        if self.cache is None and (self._first_records or self.sync is not None):
            self.cache = GradNormCache(self.num_layers, position_prior=self.config.position_prior)
        for record in self._first_records:
            self.cache.record(*record)
        self._first_records = []
        if self.cache is not None:
            if self.sync is not None:  # a collective: every rank commits at every step
                self.cache.exchange_pending(self.sync)
            self.cache.commit()

    def discard_pending(self) -> None:
        self._first_records = []
        self._padding_grads = []
        if self.cache is not None:
            self.cache.discard_pending()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that make a resumed run sample like an uninterrupted one."""
        # Which layers share a draw decides whose cached norms score it.
        leaders = torch.arange(self.num_layers)
        for leader, members in self._groups.items():
            leaders[list(members)] = leader
        state = {"step": torch.tensor(self.step), "group_leader": leaders}
        if self.cache is not None:
            state.update({f"cache.{k}": v for k, v in self.cache.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.step = int(state["step"])
        self._groups = {}
        for slot, leader in enumerate(state["group_leader"].tolist()):
            self._groups.setdefault(leader, {leader}).add(slot)
        self._groups = {leader: members for leader, members in self._groups.items() if len(members) > 1}
        cache = {k.removeprefix("cache."): v for k, v in state.items() if k.startswith("cache.")}
        if cache:
            self.cache = GradNormCache(int(cache["num_slots"]), position_prior=self.config.position_prior)
            self.cache.load_state_dict(cache)



class SampledLayerMixin:
    """Forward of a layer whose weight gradient is row-sampled (see module docstring)."""

    wtacrs_state: SamplingState
    wtacrs_slot: int
    wtacrs_stream: str

    def _sampled_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        state = self.wtacrs_state
        if not (self.training and needs_sampling(weight, state.config.ratio, state.config.estimator)):
            return F.linear(x, weight, bias)
        slot = self.wtacrs_slot
        row_mask = state.row_mask(self.wtacrs_stream, x)
        y = linear_with_sample(x, weight, bias, state.sample_for(slot, x, row_mask))
        state.watch_output(slot, x, row_mask, y)
        return y


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
