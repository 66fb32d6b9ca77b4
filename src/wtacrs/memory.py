"""Memory accounting: bytes saved for backward (saved_tensors_hooks, any device) and the peak of
the CPU allocator's bytes over a step (torch.profiler's memory events), both exact."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch._C._profiler import _ExtraFields_Allocation


class SavedTensorBytes:
    """Context manager counting the distinct storages autograd saves for backward.

    Storages are counted once however many ops save them (q, k and v may save one sample), and
    storages of `exclude` tensors (parameters, which live anyway) are not counted.

    Example:
        with SavedTensorBytes(exclude=model.parameters()) as saved:
            loss = model(**batch).loss
        saved.total  # bytes
    """

    def __init__(self, exclude=()):
        self._excluded = {_storage_address(t) for t in exclude}
        self.storages: dict[int, int] = {}
        self.by_shape: Counter[tuple[tuple[int, ...], torch.dtype]] = Counter()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = _storage_address(t)
        if ptr not in self._excluded and ptr not in self.storages:
            nbytes = _storage_bytes(t)
            self.storages[ptr] = nbytes
            self.by_shape[(tuple(t.shape), t.dtype)] += nbytes
        return t

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


# Neither reads `t.untyped_storage()`: inside a pack hook that gives the storage a Python object
# which PyTorch keeps as long as the storage lives, and a storage with two owners is not summed
# into in place by autograd (a tied weight's two gradients then take a third, weight-sized tensor).
def _storage_address(t: torch.Tensor) -> int:
    """The address of t's storage (its first byte), shared by every view of it."""
    return t.data_ptr() - t.storage_offset() * t.element_size()


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes of t's storage: the extent its base tensor (t itself, or what t is a view of) spans."""
    base = t if t._base is None else t._base
    if base.numel() == 0:
        return 0
    last = base.storage_offset() + sum((size - 1) * stride for size, stride in zip(base.shape, base.stride()))
    return (last + 1) * base.element_size()


def parameter_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: tensors that exist whether or not anything is saved for backward."""
    return [*model.parameters(), *model.buffers()]


class AllocatorPeak:
    """Context manager: the exact peak of bytes PyTorch's CPU allocator hands out over a block,
    plus `baseline` tensors alive at entry (e.g. parameters, optimizer state, the batch).

    Read from torch.profiler's memory events (`profile_memory=True`): every allocation the block
    makes is counted from its allocation to its free, tensors and the temporaries inside kernels
    alike (torch.logsumexp's shifted copy, an attention kernel's buffers). This is what
    `torch.cuda.max_memory_allocated` measures on CUDA. A Python dispatch mode that tracks tensor
    storages would see neither those temporaries nor autograd's true behaviour: giving every op's
    output a Python object stops autograd from accumulating a gradient in place (a tied
    embedding's two gradients are then added into a third tensor).

    Memory allocated before entry is not tracked: its frees inside the block are ignored, as its
    allocations were (the profiler may know such a block from an earlier profile). Only CPU
    allocations are counted; on CUDA use `CudaPeak`. A torch.profiler profile cannot run inside
    another, so neither can this. What the profiler's C++ side prints meanwhile is dropped (see
    `_PROFILER_NOISE`); everything else written to stderr inside the block is passed on at its end.

    Example:
        with AllocatorPeak(baseline=[*parameter_tensors(model), *optimizer_state_tensors(opt)]) as peak:
            train_step()
        peak.peak  # bytes
    """

    def __init__(self, baseline: Iterable[torch.Tensor] = ()):
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in baseline}
        self.baseline = sum(storages.values())
        self.peak = self.current = self.baseline
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> "AllocatorPeak":
        self._quiet = profiler_noise_off()
        self._quiet.__enter__()
        try:
            self._profile.__enter__()
        except BaseException:
            self._quiet.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._profile.__exit__(*exc)
        finally:
            self._quiet.__exit__(*exc)
        replayed = replay_allocations(cpu_allocations(self._profile))
        self.peak, self.current = self.baseline + replayed.peak, self.baseline + replayed.current


# What a memory profile writes to stderr from C++, straight to file descriptor 2 and at levels no
# setting changes once torch is imported: kineto's trace markers at its start and stop, and c10's
# warning when a block allocated before the profile is freed inside it (which AllocatorPeak
# expects: such frees are ignored, as their allocations were). Users read them as errors.
_PROFILER_NOISE = re.compile(
    rb"USDT:[^\n]*\] profiler_(?:start|stop)\n"
    rb"|\[W[^\n]*\] Memory block of unknown size was allocated before the profiling started[^\n]*\n"
)


def profiler_noise_off() -> AbstractContextManager[None]:
    """Around a `torch.profiler` profile: its C++ lines on stderr (`_PROFILER_NOISE`) are dropped,
    anything else written there is kept."""
    return _stderr_without(_PROFILER_NOISE)


@contextmanager
def _stderr_without(noise: re.Pattern[bytes]) -> Iterator[None]:
    """Send file descriptor 2 to a temporary file over the block, then write back what it
    received with every match of `noise` cut out (so the block's other output is delayed, not lost)."""
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to clean
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = noise.sub(b"", captured.read())
            if kept:
                with open(2, "wb", closefd=False) as stderr:
                    stderr.write(kept)


class CudaPeak:
    """`AllocatorPeak` on a CUDA device: `torch.cuda.max_memory_allocated` over the block, which
    counts every tensor on the device (weights and optimizer state included, named or not)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> "CudaPeak":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)


def step_peak(device: torch.device, baseline: Iterable[torch.Tensor]) -> AllocatorPeak | CudaPeak:
    """The peak-memory tracker for a step on `device`: `CudaPeak` on CUDA, else `AllocatorPeak`
    counting `baseline` (weights, optimizer state, the batch) from the start."""
    return CudaPeak(device) if device.type == "cuda" else AllocatorPeak(baseline)


@dataclass(frozen=True)
class Allocation:
    """One CPU allocator event of a profile: `nbytes` > 0 allocates the block at `ptr`, < 0 frees
    it; `event` is the profiler's (its parents name the op and, with stacks, the source line)."""

    ptr: int
    nbytes: int
    event: object


@dataclass(frozen=True)
class Replay:
    """Allocations replayed in order: bytes at the peak and at the end (above the start), the
    index of the allocation that reached the peak (-1: none), and the blocks alive at the end."""

    peak: int
    current: int
    peak_index: int
    alive: dict[int, Allocation]


def cpu_allocations(profile: torch.profiler.profile) -> list[Allocation]:
    """A finished profile's (`profile_memory=True`) CPU allocator events, in time order."""
    found, pending = [], list(profile.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        fields = event.extra_fields
        if isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
            found.append((event.start_time_ns, Allocation(fields.ptr, fields.alloc_size, event)))
    found.sort(key=lambda timed: timed[0])
    return [allocation for _, allocation in found]


def replay_allocations(allocations: list[Allocation], stop: int | None = None) -> Replay:
    """Replay `allocations` (up to and including index `stop`), counting only blocks allocated
    among them: a free of a block from before is ignored, as its allocation was."""
    running = highest = 0
    peak_index = -1
    alive: dict[int, Allocation] = {}
    for index, allocation in enumerate(allocations[:None if stop is None else stop + 1]):
        if allocation.nbytes > 0:
            alive[allocation.ptr] = allocation
        elif alive.pop(allocation.ptr, None) is None:
            continue
        running += allocation.nbytes
        if running > highest:
            highest, peak_index = running, index
    return Replay(highest, running, peak_index, alive)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Tensors held in an optimizer's state (e.g. AdamW's two moments and step counters)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def gradient_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The .grad of every parameter that has one."""
    return [p.grad for p in model.parameters() if p.grad is not None]


@dataclass(frozen=True)
class SavedTensor:
    """One tensor an autograd node keeps for backward.

    Attributes:
        op: the node that saved it, e.g. "GeluBackward0", "_LinearWithRowSampleBackward".
        role: which of the node's saved tensors, e.g. "self", "mat1", "saved_tensors[1]".
        shape: the tensor's shape.
        nbytes: its storage's bytes, counted at the first node that saves that storage (0 at
            later ones), so summing nbytes gives the distinct bytes held for backward.
    """

    op: str
    role: str
    shape: tuple[int, ...]
    nbytes: int


def _saved_by(node) -> list[tuple[str, torch.Tensor]]:
    found = [(a.removeprefix("_saved_"), getattr(node, a)) for a in dir(node) if a.startswith("_saved_")]
    if hasattr(node, "saved_tensors"):  # custom autograd.Function nodes
        found += [(f"saved_tensors[{i}]", t) for i, t in enumerate(node.saved_tensors)]
    return [(role, t) for role, t in found if isinstance(t, torch.Tensor)]


def saved_tensors_by_op(output: torch.Tensor, exclude=()) -> list[SavedTensor]:
    """Walk the autograd graph behind `output` and list what each node keeps for backward.

    This answers "which tensors remain, and which op keeps them": a sampled linear input only
    frees memory when no other op in this list holds the same storage. Tensors sharing storage
    with `exclude` (parameters) are left out.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    counted: set[int] = set()
    records, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        for role, t in _saved_by(node):
            ptr = t.untyped_storage().data_ptr()
            if ptr in excluded or t.numel() == 0:
                continue
            records.append(SavedTensor(node.name(), role, tuple(t.shape),
                                       0 if ptr in counted else t.untyped_storage().nbytes()))
            counted.add(ptr)
    return records


def saved_bytes_by_op(records: list[SavedTensor]) -> list[tuple[str, int, int]]:
    """(op, distinct bytes, tensors) per op, largest first."""
    totals: dict[str, list[int]] = {}
    for r in records:
        entry = totals.setdefault(r.op, [0, 0])
        entry[0] += r.nbytes
        entry[1] += 1
    return sorted(((op, b, n) for op, (b, n) in totals.items()), key=lambda row: -row[1])


def process_peak_rss() -> int:
    """Peak resident set size of this process since its exec, in bytes: Linux's VmHWM.

    Not `ru_maxrss` where /proc is available: Linux carries that across fork and exec, so a
    child of a big parent reports at least the parent's RSS at fork time. Elsewhere (macOS)
    `ru_maxrss` is the only measure (bytes there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
