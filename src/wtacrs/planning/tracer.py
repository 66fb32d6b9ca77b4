"""One training step traced on fake tensors: its allocation stream and its kernels, no weights.

`trace_step` builds the model of a `ModelSpec` under `torch._subclasses.fake_tensor.FakeTensorMode`
(shapes, dtypes and devices; no storage is allocated, so an 8B model costs no memory), prepares
it with the library's real recipe (`Recipe.prepare`: LoRA, checkpointing, `wtacrs.apply` and its
companions), allocates AdamW's state, and runs one whole step (forward, backward, AdamW) as
`wtacrs.bench`'s `Trial.step` does, through `StepRecorder`, a dispatch mode that sees every ATen
call:

- Device tensors (weights, optimizer state, the batch's ids and labels) are fake. The host
  tensors a data loader hands over (the example ids and the attention mask) are real tensors
  made outside the mode, and a call whose tensors are all real runs for real, outside it: the
  step's host work (`wtacrs.batch` planning the step from the mask; transformers skipping an
  all-ones mask) reads real values, as it does in a real step. Its outputs are counted too,
  since the CPU allocator that the trace is checked against counts them (on a GPU they are
  (batch, seq)-sized host tensors).
- Each storage a call creates is counted from the call to the moment its last reference dies
  (a weak reference's callback), in bytes as the chosen allocator rounds them; views and
  in-place results share their input's storage and are not counted again. The peak of that
  stream above what lived before the step, plus what lived before it, is the predicted
  `max_memory_allocated` (CUDA) or `AllocatorPeak`'s peak (CPU).
- Device values have no data. A value read on the host (`float(loss)` at the step's end) reads
  as 0, and a call whose output size depends on device data (`nonzero`: lean LayerNorm's
  ill-conditioned columns) as empty (no such column, as at a fresh model's γ = 1, β = 0); both
  are counted as host syncs, and `StepTrace.notes` says how many there were.

`target="cuda"` models what CUDA does differently from the CPU the trace runs on: the caching
allocator's rounding (`cuda_block_bytes`), SDPA's kernel choice (flash for half precision
without a mask, else memory-efficient: neither keeps an L × L matrix; `cuda_sdp_choice`), and
AdamW's default multi-tensor (foreach) step. Kernel temporaries that live inside one CUDA kernel
are not seen (on the CPU the allocator sees them; the CPU checks bound what that misses).
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.attention import SDPBackend
from torch.overrides import handle_torch_function, has_torch_function
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from wtacrs import device_cache
from wtacrs.bench.dispatch import SYNC_OPS
from wtacrs.bench.models import is_causal_lm, is_seq2seq, make_batch
from wtacrs.bench.training import LEARNING_RATE, BackwardFusedAdamW, Trial, _allocate_optimizer_state
from wtacrs.memory import optimizer_state_tensors, parameter_tensors
from wtacrs.planning.models import ModelSpec
from wtacrs.recipes import Recipe

TARGETS = ("cuda", "cpu")
# PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, `round_size`, kMinBlockSize):
# every block is a multiple of 512 bytes, and max_memory_allocated counts the blocks' sizes.
CUDA_BLOCK_BYTES = 512
# cuBLAS's workspace, allocated through the caching allocator once per (handle, stream) and kept
# (aten/src/ATen/cuda/CublasHandlePool.cpp, `_getDefaultWorkspaceSize`): 32 MiB on Hopper (sm90),
# 4096 KiB · 2 + 16 KiB · 8 elsewhere. Autograd runs backward on its own device thread, whose
# handle has its own workspace: two per step (an assumption, stated in docs/plan.md).
CUBLAS_WORKSPACES = 2
# ATen calls that launch no kernel: allocation only, metadata, views and profiler markers (and
# anything outside the aten namespace, e.g. prim.device).
_NO_KERNEL = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach",
                        "lift_fresh", "alias", "set_", "resize_", "_unsafe_view", "_record_function_enter_new",
                        "_record_function_exit"})


_PRIM_DEVICE = torch.ops.prim.device.default


def _tensors(values) -> list[Tensor]:
    """The tensors among an ATen call's arguments or results: ATen's schemas nest them at most
    in a list (Tensor[], Tensor?[]) or a tuple of results; deeper, `tree_flatten` (slower)."""
    found = []
    for v in values:
        if isinstance(v, Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            for w in v:
                if isinstance(w, Tensor):
                    found.append(w)
                elif isinstance(w, (list, tuple, dict)):
                    found.extend(t for t in tree_flatten(w)[0] if isinstance(t, Tensor))
        elif isinstance(v, dict):
            found.extend(t for t in tree_flatten(v)[0] if isinstance(t, Tensor))
    return found


def cuda_block_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator counts for a request of `nbytes` (0 for none)."""
    return 0 if nbytes == 0 else -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


def cublas_workspace_bytes(compute_capability: tuple[int, int]) -> int:
    """One cuBLAS workspace's bytes on a GPU of this compute capability (see CUBLAS_WORKSPACES)."""
    return 32 * 2**20 if compute_capability >= (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8


@dataclass(frozen=True)
class Kernel:
    """One ATen call of the step: its FLOPs (`torch.utils.flop_counter`; 0 where it counts none),
    the bytes of its tensor arguments and results, whether it runs on the host (real tensors) and
    whether the host then waits for the device (a value read from it)."""

    name: str
    flops: int
    bytes: int
    host: bool = False
    sync: bool = False


@dataclass
class StepTrace:
    """A traced step: bytes before it (weights and buffers, optimizer state, the batch), its peak
    and its ATen calls in order."""

    baseline_bytes: int
    peak_bytes: int
    kernels: list[Kernel]
    weights_bytes: int
    trainable_bytes: int
    notes: list[str] = field(default_factory=list)
    stream: Stream | None = None


@dataclass(eq=False)
class Stream:
    """A traced step's allocation stream, unrounded: the bytes of each storage alive before the
    step (`state`: weights, AdamW state, the batch), and of each storage the step allocates, in
    order (`sizes`, with the ATen call that made it, `names`), and the order of allocations and
    frees (`events`: i allocates storage i, -1 - i frees it). `peak_at_batch` replays it."""

    batch: int
    state: np.ndarray
    workspaces: int
    cuda: bool
    sizes: np.ndarray
    events: np.ndarray
    names: tuple[str, ...]

    def aligned(self, other: Stream) -> bool:
        """Whether `other` (a trace of the same model, recipe and seq at another batch) made the same
        calls' storages in the same order and freed them in the same order: only their sizes differ."""
        return (self.batch != other.batch and self.cuda == other.cuda and self.workspaces == other.workspaces
                and len(self.state) == len(other.state) and self.names == other.names
                and np.array_equal(self.events, other.events))


def peak_at_batch(a: Stream, b: Stream, batch: int) -> int:
    """The peak of the allocation stream that two aligned traces (`Stream.aligned`) at other
    batches share, replayed at `batch` with each storage's bytes on the line through its bytes in
    the two traces (rounded up to whole bytes, then as the allocator rounds them): exactly the
    traced peaks at a's and b's batch. Every storage of a step is a tensor with at most one batch
    dimension, so its bytes are affine in the batch, up to rounding where a size is a fraction of
    the batch's tokens (WTA-CRS's sampled rows); a trace at the batch checks it."""

    a, b = (a, b) if a.batch < b.batch else (b, a)

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        run = b.batch - a.batch
        n = np.maximum(-(-(x * run + (y - x) * (batch - a.batch)) // run), 0)
        return -(-n // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES if a.cuda else n

    sizes = at(a.sizes, b.sizes)
    index = np.where(a.events >= 0, a.events, -1 - a.events)
    deltas = np.where(a.events >= 0, sizes[index], -sizes[index])
    above = int(np.cumsum(deltas).max(initial=0))
    return int(at(a.state, b.state).sum()) + a.workspaces + max(above, 0)


class StepRecorder(TorchDispatchMode):
    """Counts the storages and kernels of every ATen call in its scope (see the module doc).

    `round_bytes` maps a storage's bytes to what the allocator hands out for it."""

    def __init__(self, round_bytes=lambda n: n, kernels: bool = True):
        super().__init__()
        self.round_bytes, self.record_kernels = round_bytes, kernels
        self.live: dict[int, int] = {}  # storage (its C++ address) -> bytes counted
        self.current = self.peak = 0
        self.kernels: list[Kernel] = []
        self.sizes: list[int] = []  # the allocation stream, unrounded (see Stream)
        self.names: list[str] = []
        self.events: list[int] = []
        self._index: dict[int, int] = {}  # live storage -> its index in sizes
        self._refs: dict[int, weakref.ref] = {}  # live storage -> the weak reference that frees it
        self.empty_nonzero = self.device_reads = 0
        self._flops = FlopCounterMode(display=False).flop_registry

    def known(self, tensors: list[Tensor]) -> None:
        """Mark storages alive before the step (counted in the baseline, not here)."""
        for t in tensors:
            self.live.setdefault(t.untyped_storage()._cdata, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _PRIM_DEVICE:  # `tensor.device` under a mode (half an 8B step's calls): no storage, no kernel
            if isinstance(args[0], FakeTensor):
                return args[0].fake_device  # what FakeTensorMode answers outside its kernels
            with _disable_current_modes():
                return args[0].device
        kwargs = kwargs or {}
        tensors = _tensors((*args, *kwargs.values()))
        inputs = {t.untyped_storage()._cdata for t in tensors}
        name = func.overloadpacket.__name__
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with _disable_current_modes():  # host work on real tensors: run it for real
                out = func(*args, **kwargs)
            self._record(func, name, (args, kwargs), tensors, out, inputs, host=True)
            return out
        if name == "_local_scalar_dense":  # a device value read on the host (the loss, at the step's end)
            self.device_reads += 1
            dtype = tensors[0].dtype
            out = 0.0 if dtype.is_floating_point else False if dtype == torch.bool else 0
        elif name == "nonzero":  # counted as a sync below (SYNC_OPS)
            self.empty_nonzero += 1
            out = tensors[0].new_empty((0, tensors[0].dim()), dtype=torch.int64)
        else:
            out = func(*args, **kwargs)
        self._record(func, name, (args, kwargs), tensors, out, inputs, host=False)
        return out

    def _record(self, func, name: str, call: tuple, tensors: list[Tensor], out, inputs: set[int],
                host: bool) -> None:
        outputs = _tensors((out,))
        for o in outputs:
            self._allocate(o.untyped_storage(), inputs, name)
        if not self.record_kernels or func.is_view or name in _NO_KERNEL or func.namespace != "aten":
            return
        moved = sum(t.numel() * t.element_size() for t in (*tensors, *outputs))
        count = self._flops.get(func.overloadpacket)
        flops = int(count(*call[0], **call[1], out_val=out)) if count is not None else 0
        sync = not host and (name in SYNC_OPS)
        self.kernels.append(Kernel(name, flops, moved, host, sync))

    def _allocate(self, storage, inputs: set[int], name: str) -> None:
        key = storage._cdata
        if key in inputs or key in self.live:
            return
        raw = storage.nbytes()
        self._index[key] = len(self.sizes)
        self.events.append(len(self.sizes))
        self.sizes.append(raw)
        self.names.append(name)
        nbytes = self.round_bytes(raw)
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        self.current -= self.live.pop(key, 0)
        if key in self._index:
            self.events.append(-1 - self._index.pop(key))


def cuda_sdp_choice(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> int:
    """The SDPA kernel CUDA picks on an Ampere or newer GPU (`SDPBackend` as an int), following
    PyTorch's sdp_utils priority: flash attention for fp16/bf16 without a mask and a head size
    that is a multiple of 8 up to 256; else the memory-efficient kernel (fp32, masks). Neither
    keeps an L × L matrix; the math kernel, which does, is never CUDA's choice for these calls."""
    head = query.shape[-1]
    if query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and head <= 256 and head % 8 == 0:
        return int(SDPBackend.FLASH_ATTENTION)
    return int(SDPBackend.EFFICIENT_ATTENTION)


def _cuda_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """`F.scaled_dot_product_attention` as CUDA runs it: (B, H, L, D) through the fused kernel of
    `cuda_sdp_choice` (a boolean mask first made additive in the query's dtype, as CUDA's SDPA does)."""
    if has_torch_function((query, key, value)):  # torch-function modes (companions) see it as SDPA
        return handle_torch_function(_cuda_sdpa, (query, key, value), query, key, value, attn_mask=attn_mask,
                                     dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    choice = cuda_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if choice == int(SDPBackend.FLASH_ATTENTION):  # handles grouped-query attention itself
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]
    if key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.where(attn_mask.logical_not(), float("-inf"), 0.0).to(query.dtype)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, torch.is_grad_enabled(), dropout_p, is_causal, scale=scale)[0]


def _cuda_dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """`F.dropout` as CUDA runs it: training dropout out of place is the fused `native_dropout`,
    which keeps a bool mask for backward (the CPU's keeps a mask in the input's dtype: 4 bytes an
    element in fp32)."""
    if has_torch_function((input,)):  # torch-function modes (lean dropout) see it as F.dropout
        return handle_torch_function(_cuda_dropout, (input,), input, p=p, training=training, inplace=inplace)
    if training and 0.0 < p < 1.0 and not inplace and input.is_floating_point():
        return torch.native_dropout(input, p, True)[0]
    return _CPU_DROPOUT(input, p, training, inplace)


_CPU_DROPOUT = F.dropout


@contextlib.contextmanager
def _as_cuda() -> Iterator[None]:
    """SDPA and dropout as on CUDA, and `torch._fused_sdp_choice` (which companions ask) answering
    CUDA's choice. Patched where they are looked up, not by a mode: autograd runs backward, and
    with it checkpoint recomputes, without the torch-function modes of its caller."""
    saved = F.scaled_dot_product_attention, F.dropout, torch._fused_sdp_choice
    F.scaled_dot_product_attention, F.dropout, torch._fused_sdp_choice = _cuda_sdpa, _cuda_dropout, cuda_sdp_choice
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout, torch._fused_sdp_choice = saved


@contextlib.contextmanager
def _fake_modules(dtype: torch.dtype) -> Iterator[None]:
    """Build modules of fake parameters in `dtype` (the default dtype meanwhile, so that nothing
    needs converting). `Module.to` that changes nothing returns the module untouched: torch swaps
    fake parameters even then, which fails once a weak reference to one exists (PEFT moves each
    adapter to its base layer's device). A deep copy of a fake (PEFT copies the task head it
    trains in full) is a new fake: torch's copies the storage, which crashed later traces."""
    to, default = nn.Module.to, torch.get_default_dtype()

    def to_unless_same(module: nn.Module, *args, **kwargs) -> nn.Module:
        device, to_dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if all((device is None or t.device == device) and (to_dtype is None or t.dtype == to_dtype
                                                           or not t.is_floating_point())
               for t in (*module.parameters(), *module.buffers())):
            return module
        return to(module, *args, **kwargs)

    def fresh_copy(t: Tensor, memo: dict) -> Tensor:
        copy = torch.empty_like(t)
        copy = nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy
        return memo.setdefault(id(t), copy)

    nn.Module.to, FakeTensor.__deepcopy__ = to_unless_same, fresh_copy
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        nn.Module.to = to
        del FakeTensor.__deepcopy__
        torch.set_default_dtype(default)


def trace_step(spec: ModelSpec, recipe: Recipe, batch: int, seq: int, *, dtype: torch.dtype = torch.float32,
               target: str = "cuda", compute_capability: tuple[int, int] = (9, 0), kernels: bool = True) -> StepTrace:
    """Trace one training step of `spec` under `recipe` on a (batch, seq) batch of random ids
    without padding (`wtacrs.bench.models.make_batch`), as `wtacrs bench` measures it.

    Args:
        dtype: of the weights, gradients, AdamW state and activations (built in it, as
            `wtacrs bench --dtype` converts the model).
        target: "cuda" (the CUDA caching allocator, CUDA's SDPA and dropout kernels, foreach
            AdamW) or "cpu" (exact bytes, the CPU's kernels: what `AllocatorPeak` measures here).
        compute_capability: the GPU's, for cuBLAS's workspace (`target="cuda"` only).
        kernels: also list the step's kernels and their FLOPs (only the time model reads them;
            a largest-batch search's traces skip them).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be positive, got batch {batch}, seq {seq}")
    # A trace fills the library's device cache with fake tensors: a real step of the same process
    # that found them there ran partly on fakes, unseen by AllocatorPeak (plan_cpu_check's old
    # 7-21% "over-predictions"); and an earlier real step's tensors made a trace depend on it.
    with device_cache.isolated():
        return _trace_step(spec, recipe, batch, seq, dtype, target, compute_capability, kernels)


def _trace_step(spec: ModelSpec, recipe: Recipe, batch: int, seq: int, dtype: torch.dtype, target: str,
                compute_capability: tuple[int, int], kernels: bool) -> StepTrace:
    cuda = target == "cuda"
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, _fake_modules(dtype):
        model = spec.build()
        task_type = "SEQ_2_SEQ_LM" if is_seq2seq(model) else "CAUSAL_LM" if is_causal_lm(model) else "SEQ_CLS"
        model = recipe.prepare(model, seed=0, task_type=task_type)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if recipe.fused_adamw:
            optimizer = BackwardFusedAdamW(trainable, lr=LEARNING_RATE)
            _allocate_optimizer_state(optimizer)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, foreach=cuda)
            _adamw_state_after_one_step(optimizer)
    for moments in optimizer.state.values():  # AdamW's step counters live on the host (not capturable)
        moments["step"] = torch.tensor(float(moments["step"]))
    host = make_batch(model, batch, seq)  # real: the host mask stays real, as a loader hands it over
    inputs = {k: v if k == "attention_mask" else fake.from_tensor(v) for k, v in host.items()}
    trial = Trial(recipe, model, optimizer, inputs, torch.arange(batch), host["attention_mask"])
    round_bytes = cuda_block_bytes if cuda else (lambda n: n)
    counters = [moments["step"] for moments in optimizer.state.values()]
    # On a GPU the step counters are host tensors: not in max_memory_allocated (the CPU counts them).
    on_device = [*parameter_tensors(model), *(t for t in optimizer_state_tensors(optimizer)
                                             if not (cuda and any(t is c for c in counters))), *inputs.values()]
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in on_device}
    workspaces = CUBLAS_WORKSPACES * cublas_workspace_bytes(compute_capability) if cuda else 0
    baseline = sum(round_bytes(n) for n in storages.values()) + workspaces
    recorder = StepRecorder(round_bytes, kernels=kernels)
    recorder.known([*on_device, *counters])
    if recipe.uses_wtacrs:
        gc.collect()  # `wtacrs.batch` plans every live sampled model in training mode: only this one
    with fake, recorder, _as_cuda() if cuda else contextlib.nullcontext():
        trial.step()
    model.eval()  # and later blocks must not plan this fake one
    notes = []
    if recorder.device_reads:
        notes.append(f"{recorder.device_reads} device value(s) read on the host, traced as 0")
    if recorder.empty_nonzero:
        notes.append(f"{recorder.empty_nonzero} data-sized result(s) (nonzero) traced as empty")
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in parameter_tensors(model)}.values())
    stream = Stream(batch, np.array(list(storages.values()), dtype=np.int64), workspaces, cuda,
                    np.array(recorder.sizes, dtype=np.int64), np.array(recorder.events, dtype=np.int64),
                    tuple(recorder.names))
    return StepTrace(baseline, baseline + recorder.peak, recorder.kernels, weights,
                     sum(p.numel() * p.element_size() for p in trainable), notes, stream)


def _adamw_state_after_one_step(optimizer: torch.optim.AdamW) -> None:
    """The state `wtacrs.bench.training._allocate_optimizer_state` leaves (one AdamW step on zero
    gradients), made directly as `torch.optim.AdamW._init_group` makes it: a step counter at 1 and
    both moments `zeros_like` each parameter (no amsgrad). The same tensors at a fraction of a
    traced foreach step's cost (about 1 s of CPU on an 8B LoRA model)."""
    for group in optimizer.param_groups:
        if group["amsgrad"] or group["capturable"] or group["fused"]:
            raise ValueError("the traced AdamW state is for amsgrad=False, capturable=False, fused=False")
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(1.0),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
