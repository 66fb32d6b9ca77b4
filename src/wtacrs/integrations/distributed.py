"""Data-parallel training (torch.distributed DDP under torchrun, `accelerate launch` or the Trainer).

Why the all-reduced gradient stays unbiased. Each rank r samples rows of its own local batch
B_r with its own generator (seeded by (seed, rank, step, layer)), so conditioned on the batch its
weight-gradient estimate is unbiased: E[dŴ_r | B_r] = dW_r, the exact gradient of its local loss
(estimators.py; this holds for any positive sampling distribution, whatever the cache holds).
DDP all-reduces the mean (1/R) Σ_r dŴ_r, and expectation is linear, so
E[(1/R) Σ_r dŴ_r] = (1/R) Σ_r dW_r = the exact data-parallel gradient. The ranks draw
independently, so the variance of the mean is (1/R²) Σ_r Var(dŴ_r): R ranks cut it like an R
times larger batch. Nothing needs to be communicated for the estimate itself.

Why the gradient-norm cache needs communication. The cache is keyed by example id, and
`DistributedSampler` deals examples to different ranks in different epochs: norms recorded on
rank 1 are needed on rank 0 when the example lands there next. Stale or missing norms never bias
the estimate, but they waste the variance reduction the cache exists for.

The choice: a replicated cache. At every committed step each rank all-gathers every rank's new
records, (example ids, real-token counts, one uint8 code per real token per layer), and commits
them all in rank order, so every rank holds the same cache, byte for byte, and lookups stay
local (no communication in the forward pass). Cost per step and rank: it sends 16 B plus one
byte per local real token for each layer, and 12 B per local example once, and receives R times
that (padded to the largest rank's payload). A step with anchors (`wtacrs.batch(anchors=)`) also feeds the prior's
first-visit tables, which learn from padding rows too, so it sends its padded layout instead:
per example T bytes per layer and once 8 + 6·T bytes (ids, mask, keys), T the padded length
(see the wire format above `pack_records`). Host memory is the whole dataset's cache on every
rank. A cache sharded by example id would divide host memory by R, but every forward would wait
on an all-to-all lookup; the replicated cache costs one small collective after backward instead.
Because all ranks hold the same cache, rank 0 alone saves it with the checkpoint and a run can
resume on any number of ranks (the step counter is global; ranks are assigned at start-up).

Rank 0 alone writes checkpoints and results (`Trainer.args.should_save`, and `wtacrs finetune`
writes results.json on the main process only). Filesystem work that must happen once before
training (`wtacrs finetune`'s --overwrite of a run folder, the check for an earlier run) goes
through `on_rank_zero`: rank 0 does it while the others wait, and an error stops every rank.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wtacrs.cache import PendingRecord
from wtacrs.cache.first_visit import FirstVisitKeys
from wtacrs.cache.records import layout_of
from wtacrs.modeling import sampling_state

T = TypeVar("T")


class CacheSync:
    """All-gathers the gradient-norm cache records of one step across the ranks of `group`.

    Installed as `SamplingState.sync` by `enable_data_parallel`; counts what it moves, so the
    cost can be measured (`bytes_sent`, `bytes_received`, `steps`).
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.steps = 0
        self.bytes_sent = 0  # this rank's payloads
        self.bytes_received = 0  # what the all-gathers delivered to this rank, padding included

    def __call__(self, records: list[PendingRecord]) -> list[PendingRecord]:
        payload = pack_records(records)
        gathered = all_gather_bytes(payload, self.group)
        self.steps += 1
        self.bytes_sent += payload.numel()
        self.bytes_received += len(gathered) * max(p.numel() for p in gathered)
        return [record for buffer in gathered for record in unpack_records(buffer)]


def enable_data_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> CacheSync | None:
    """Make the sampling of a `wtacrs.apply`-ed model data-parallel aware; idempotent.

    Every rank draws its own rows, and (with `grad_norm="cache"`) every committed step
    all-gathers the new cache records so each rank's cache holds every example's norms. Call it
    on every rank after `torch.distributed.init_process_group` (WTACRSTrainer does it itself).
    Every rank must then run each training step inside `wtacrs.batch`, as the commit is a
    collective.

    Args:
        model: the model (also after FSDP2's `fully_shard`, which keeps the module), or its
            DistributedDataParallel wrapper.
        group: process group of the data-parallel ranks (default: the world).
    Returns:
        the CacheSync (with its byte counters), or None when not distributed (world size 1) or
        when the cache is off.
    """
    state = sampling_state(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return None
    sync = state.sync if isinstance(state.sync, CacheSync) else CacheSync(group)
    state.join_data_parallel(dist.get_rank(group), sync if state.config.grad_norm == "cache" else None)
    return state.sync


# -- doing things once ------------------------------------------------------------------------------
def distributed_world() -> bool:
    """True inside an initialised torch.distributed job of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank_zero() -> bool:
    """True on rank 0 of a distributed job, and always when not distributed."""
    return not distributed_world() or dist.get_rank() == 0


def join_launched_process_group() -> bool:
    """Join the process group a launcher (torchrun, `accelerate launch`) describes in the
    environment, if any; returns whether this is a multi-rank run.

    `wtacrs finetune` needs the group before the Trainer exists (which would create it), so the
    ranks can agree on the run folder first. accelerate picks the backend the Trainer would
    (NCCL on GPUs, gloo on the CPU), and the Trainer then reuses this group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return distributed_world()


def on_rank_zero(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and return its result on every rank (just `fn()` when not distributed).

    The other ranks wait until rank 0 is done (the broadcast is the barrier), so none reads a
    folder rank 0 is still deleting or creating. When `fn` raises on rank 0, every rank raises:
    SystemExit with the same code, anything else as RuntimeError naming rank 0's error, instead
    of the other ranks hanging in their next collective. The result must be picklable.
    """
    if not distributed_world():
        return fn()
    outcome: list = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", fn())
        except BaseException as e:
            error = e
            # plain values only: the exception itself might not pickle
            outcome[0] = ("exit", e.code) if isinstance(e, SystemExit) else ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if error is not None:
        raise error
    if kind == "exit":
        raise SystemExit(value)
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


# -- wire format: one uint8 buffer per rank and step ---------------------------------------------
# Two sections; the second is present only when some record has first-visit keys.
# 1. Records without keys, compact: int64 header [count, layouts, (slot, layout) × count,
#    (examples, tokens) × layouts]; per layout: int64 ids, int32 real-token counts; per record:
#    uint8 codes of its layout's real tokens in order. Padding is not sent: the store and the
#    position prior key a token by its ordinal among the example's real tokens, so a left-aligned
#    mask rebuilt from the counts reads and writes the same entries as the original (right- or
#    left-padded) one. The layers of a step share one layout: its ids and counts travel once, and
#    its records come back sharing its tensors, so a commit groups them as it would have the
#    originals (ALBERT's layer called twice a step then updates the prior once, as on one rank).
# 2. Records with keys (steps with anchors), whole: the prior's anchor and type tables learn from
#    every row with a key, padding included, so these travel in their original (B, T) layout,
#    which keeps codes, mask and keys aligned as recorded. int64 header [count, layouts,
#    (position, slot, layout) × count, (examples, width) × layouts]; per layout: int64 ids (B),
#    uint8 mask (B·T), int32 anchor columns (B·T), int8 token types (B·T); per record: uint8 codes
#    (B·T) of its layout. `position` is the record's index in the packed list (the commit order
#    decides the prior's moving averages); records sharing a layout come back sharing its tensors,
#    so a commit groups them as it would have the originals.
def pack_records(records: list[PendingRecord]) -> Tensor:
    """Host records (`on_host`: the mask sums here read host memory) → one uint8 buffer: section 1
    alone when no record has keys."""
    plain = [record for record in records if record.keys is None]
    buffer = _pack_compact(plain)
    return buffer if len(plain) == len(records) else torch.cat([buffer, _pack_keyed(records)])


def unpack_records(buffer: Tensor) -> list[PendingRecord]:
    """Inverse of `pack_records`, in the packed order (masks of records without keys come back
    left-aligned)."""
    reader = _Reader(buffer)
    plain = _unpack_compact(reader)
    keyed = _unpack_keyed(reader) if reader.position < buffer.numel() else []
    if reader.position != buffer.numel():
        raise ValueError(f"cache records buffer has {buffer.numel() - reader.position} trailing bytes")
    return _interleave(plain, keyed)


def _pack_compact(records: list[PendingRecord]) -> Tensor:
    """Section 1: records without keys, each layout's ids and counts once, each record's real
    tokens' codes."""
    firsts, layouts = _index_layouts(records)
    entries = [(record.slot, layout) for record, layout in zip(records, layouts)]
    sizes = [(first.example_ids.numel(), int(first.row_mask.sum())) for first in firsts]
    parts = [_header(entries, sizes)]
    for first in firsts:
        parts += [first.example_ids.to(torch.int64), first.row_mask.sum(1).to(torch.int32)]
    parts += [record.codes[record.row_mask] for record in records]
    return _bytes(parts)


def _pack_keyed(records: list[PendingRecord]) -> Tensor:
    """Section 2: the records with keys (their positions in `records`), each layout sent once."""
    keyed = [(position, record) for position, record in enumerate(records) if record.keys is not None]
    firsts, layouts = _index_layouts([record for _, record in keyed])
    entries = [(position, record.slot, layout) for (position, record), layout in zip(keyed, layouts)]
    parts = [_header(entries, [tuple(first.row_mask.shape) for first in firsts])]
    for first in firsts:
        parts += [first.example_ids.to(torch.int64), first.row_mask.to(torch.uint8),
                  first.keys.anchor.to(torch.int32), first.keys.token_type.to(torch.int8)]
    parts += [record.codes for _, record in keyed]
    return _bytes(parts)


def _index_layouts(records: list[PendingRecord]) -> tuple[list[PendingRecord], list[int]]:
    """The first record of each row layout (its ids, mask and keys travel for all), and each
    record's layout index."""
    index: dict[tuple, int] = {}
    firsts: list[PendingRecord] = []
    layouts = []
    for record in records:
        layout = index.setdefault(layout_of(record), len(index))
        if layout == len(firsts):
            firsts.append(record)
        layouts.append(layout)
    return firsts, layouts


def _header(entries: list[tuple[int, ...]], sizes: list[tuple[int, int]]) -> Tensor:
    """int64 [records, layouts, entries..., (two sizes) × layouts]."""
    return torch.tensor([len(entries), len(sizes), *(v for entry in entries for v in entry),
                         *(v for size in sizes for v in size)], dtype=torch.int64)


def _read_header(reader: _Reader, fields: int) -> tuple[list[list[int]], list[list[int]]]:
    """A `_header` back: the entries (`fields` values each) and two sizes per layout; every entry's
    last value must name one of the layouts."""
    count, num_layouts = reader.take(2, torch.int64).tolist()
    entries = reader.take(fields * count, torch.int64).view(count, fields).tolist()
    sizes = reader.take(2 * num_layouts, torch.int64).view(num_layouts, 2).tolist()
    for entry in entries:
        if not 0 <= entry[-1] < num_layouts:
            raise ValueError(f"cache record names layout {entry[-1]} of {num_layouts}")
    return entries, sizes


def _unpack_compact(reader: _Reader) -> list[PendingRecord]:
    """Section 1 → records with left-aligned (B, max real tokens) masks and zero padding codes;
    the records of a layout share its tensors."""
    entries, sizes = _read_header(reader, 2)
    layouts = []
    for examples, _ in sizes:
        ids = reader.take(examples, torch.int64)
        lengths = reader.take(examples, torch.int32)
        width = int(lengths.max()) if lengths.numel() else 0
        layouts.append((ids, torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)))  # (B, T) left-aligned
    records = []
    for slot, layout in entries:
        ids, mask = layouts[layout]
        codes = torch.zeros(mask.shape, dtype=torch.uint8)
        codes[mask] = reader.take(sizes[layout][1], torch.uint8)
        records.append(PendingRecord(slot, ids, mask, codes))
    return records


def _unpack_keyed(reader: _Reader) -> list[tuple[int, PendingRecord]]:
    """Section 2 → (position, record) pairs; the records of a layout share its tensors."""
    entries, shapes = _read_header(reader, 3)
    layouts = []
    for batch, width in shapes:
        ids = reader.take(batch, torch.int64)
        mask = reader.take(batch * width, torch.uint8).view(batch, width).to(torch.bool)
        anchor = reader.take(batch * width, torch.int32).view(batch, width).to(torch.int64)
        token_type = reader.take(batch * width, torch.int8).view(batch, width).to(torch.int64)
        layouts.append((ids, mask, FirstVisitKeys(anchor, token_type)))
    records = []
    for position, slot, layout in entries:
        ids, mask, keys = layouts[layout]
        codes = reader.take(mask.numel(), torch.uint8).view(mask.shape)
        records.append((position, PendingRecord(slot, ids, mask, codes, keys)))
    return records


def _interleave(plain: list[PendingRecord], keyed: list[tuple[int, PendingRecord]]) -> list[PendingRecord]:
    """The packed order: keyed records at their positions, the others in order around them."""
    total = len(plain) + len(keyed)
    positions = [position for position, _ in keyed]
    if positions != sorted(set(positions)) or any(not 0 <= p < total for p in positions):
        raise ValueError(f"cache record positions {positions} do not fit {total} records")
    at = dict(keyed)
    rest = iter(plain)
    return [at[i] if i in at else next(rest) for i in range(total)]


def _bytes(parts: list[Tensor]) -> Tensor:
    """The parts' bytes, concatenated: (Σ bytes,) uint8."""
    return torch.cat([part.contiguous().reshape(-1).view(torch.uint8) for part in parts])


class _Reader:
    """Reads a wire buffer front to back. The buffer is host memory (`all_gather_bytes` hands
    back CPU tensors; its `.cpu()` is the exchange's one wait for the device), so the header's
    `.tolist()` reads read no device."""

    def __init__(self, buffer: Tensor):
        if buffer.device.type != "cpu":
            raise ValueError(f"cache records buffer must be in host memory, got one on {buffer.device}")
        self.buffer, self.position = buffer, 0

    def take(self, count: int, dtype: torch.dtype) -> Tensor:
        size = count * torch.empty(0, dtype=dtype).element_size()
        if self.position + size > self.buffer.numel():
            raise ValueError("cache records buffer is truncated")
        chunk = self.buffer[self.position : self.position + size].clone()  # aligned copy for the view
        self.position += size
        return chunk.view(dtype)


def all_gather_bytes(payload: Tensor, group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Every rank's uint8 `payload` (sizes may differ), in rank order, on the CPU.

    Two collectives: the sizes, then the payloads padded to the largest. NCCL needs the buffers
    on this rank's GPU; gloo takes CPU tensors.
    """
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
              else torch.device("cpu"))
    world = dist.get_world_size(group)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload.to(device)
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded, group=group)
    return [b[:n].cpu() for b, n in zip(buffers, lengths)]
