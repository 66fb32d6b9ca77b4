"""Memory accounting: bytes saved for backward (saved_tensors_hooks) and the peak of live tensor
bytes (a dispatch mode), both exact and device-independent."""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self.by_shape: Counter[tuple[tuple[int, ...], torch.dtype]] = Counter()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._excluded and ptr not in self.storages:
            self.storages[ptr] = storage.nbytes()
            self.by_shape[(tuple(t.shape), t.dtype)] += storage.nbytes()
        return t

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def parameter_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: tensors that exist whether or not anything is saved for backward."""
    return [*model.parameters(), *model.buffers()]


class LiveTensorPeak(TorchDispatchMode):
    """Context manager tracking the exact peak of live tensor bytes, on any device (CPU included).

    Every storage produced by an op inside the context is counted from its creation until the
    storage is freed (a weakref finalizer on the storage, which PyTorch keeps alive exactly as
    long as the storage). Views and in-place results share a storage and are counted once.
    Tensors that exist at entry are counted only if passed as `baseline` (e.g. parameters,
    buffers, optimizer state, the batch). Allocator caching and kernel scratch memory that never
    becomes a tensor are not seen: this is the memory that `torch.cuda.max_memory_allocated`
    measures, minus workspaces.

    Example:
        with LiveTensorPeak(baseline=[*parameter_tensors(model), *optimizer_state_tensors(opt)]) as live:
            train_step()
        live.peak  # bytes
    """

    def __init__(self, baseline: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._live: dict[int, int] = {}  # id(storage) -> nbytes
        self._finalizers: list[weakref.finalize] = []
        self.current = 0
        self.peak = 0
        for t in baseline:
            self._track(t.untyped_storage())
        self.baseline = self.current

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = id(storage), storage.nbytes()
        previous = self._live.get(key)
        if previous is None:
            self._finalizers.append(weakref.finalize(storage, self._free, key))
        self._live[key] = nbytes
        self.current += nbytes - (previous or 0)
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self._track(t.untyped_storage())
        return out

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for finalizer in self._finalizers:  # stop counting; do not keep this object alive
            finalizer.detach()
        self._finalizers.clear()


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
