"""One method's training setup (model, AdamW, batch) and the measurements of one step."""

from __future__ import annotations

import contextlib
import cProfile
import gc
import pstats
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import wtacrs
from wtacrs.bench.models import build_model, is_causal_lm, is_seq2seq, make_batch
from wtacrs.memory import SavedTensorBytes, optimizer_state_tensors, parameter_tensors, profiler_noise_off, step_peak
from wtacrs.recipes import LoraSettings, Recipe, parse_recipe

LEARNING_RATE = 1e-5


@dataclass
class Trial:
    """A model prepared for one method, its AdamW optimizer (state already allocated) and a batch."""

    method: Recipe
    model: nn.Module
    optimizer: torch.optim.Optimizer
    inputs: dict[str, Tensor]
    example_ids: Tensor
    host_mask: Tensor  # the batch's attention mask on the host, as a data loader hands it over
    compiled: str | None = None  # the torch.compile backend the model's forward runs under, if any

    @property
    def device(self) -> torch.device:
        return self.inputs["input_ids"].device

    def step(self, saved: SavedTensorBytes | None = None) -> float:
        """Forward, backward and AdamW step; `saved` (if given) counts what forward saves."""
        uses_wtacrs = self.method.uses_wtacrs
        sampling = wtacrs.batch(self.example_ids, self.host_mask) if uses_wtacrs else contextlib.nullcontext()
        with sampling:
            with saved if saved is not None else torch.autograd.graph.saved_tensors_hooks(_same, _same):
                loss = self.model(**self.inputs).loss
            loss.backward()
        self.optimizer.step()  # BackwardFusedAdamW: already done inside backward, nothing left
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class BackwardFusedAdamW(torch.optim.Optimizer):
    """AdamW whose update of each parameter runs inside backward, as soon as that parameter's
    gradient is accumulated, and then frees the gradient (PyTorch's tutorial "How to save memory
    by fusing the optimizer step into the backward pass"): the full set of gradients never exists
    at once, which takes one model's worth of fp32 bytes off the peak. The update is AdamW's; what
    the loop loses is anything needing all gradients first (global-norm clipping, accumulation)."""

    def __init__(self, params: list[nn.Parameter], lr: float):
        self.per_parameter = {p: torch.optim.AdamW([p], lr=lr) for p in params}
        super().__init__(params, {"lr": lr})
        for p in params:
            p.register_post_accumulate_grad_hook(self._update)

    def _update(self, p: nn.Parameter) -> None:
        self.per_parameter[p].step()
        self.per_parameter[p].zero_grad(set_to_none=True)

    def step(self, closure=None) -> None:  # noqa: D102 - updates parameters that still hold a gradient
        for p, optimizer in self.per_parameter.items():
            if p.grad is not None:
                self._update(p)

    @property
    def state(self):  # noqa: D102 - the moments live in the per-parameter optimizers
        return {p: optimizer.state[p] for p, optimizer in self.per_parameter.items() if p in optimizer.state}

    @state.setter
    def state(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns an empty state
        pass


def _same(t: Tensor) -> Tensor:
    return t


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trial(size: str, method: str | Recipe, batch: int, seq: int, *, device="cpu", dtype=torch.float32,
               seed=0, lora: LoraSettings = LoraSettings(), compile: str | None = None) -> Trial:
    """Build `size` with random weights (seed), apply `method` (`lora`: the adapters of its LoRA
    recipes), allocate AdamW state, make a (batch, seq) batch; with `compile` (a backend name), the
    prepared model is `torch.compile(model, backend=compile)`, the usual idiom (its first
    `COMPILE_WARMUP` steps compile)."""
    method = parse_recipe(method) if isinstance(method, str) else method
    model = build_model(size, seed, device).to(dtype=dtype)
    task_type = "SEQ_2_SEQ_LM" if is_seq2seq(model) else "CAUSAL_LM" if is_causal_lm(model) else "SEQ_CLS"
    model = method.prepare(model, seed=seed, task_type=task_type, lora=lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_class = BackwardFusedAdamW if method.fused_adamw else torch.optim.AdamW
    optimizer = optimizer_class(trainable, lr=LEARNING_RATE)
    _allocate_optimizer_state(optimizer)
    inputs = make_batch(model, batch, seq, seed, device)
    if compile is not None:
        if compile == "inductor" and torch.device(device).type == "cpu":
            # Each generated C++ kernel then records a profiler event: what `count_compiled_kernels` counts.
            torch._inductor.config.cpp.enable_kernel_profile = True
        model = torch.compile(model, backend=compile)
    return Trial(method, model, optimizer, inputs, torch.arange(batch), inputs["attention_mask"].cpu(), compile)


# A compiled trial's first step learns which layers share a draw, its second compiles the graphs
# every later step reuses (docs/compile.md): warm-up steps before timing one.
COMPILE_WARMUP = 2


def count_compiled_kernels(trial: Trial) -> dict[str, int]:
    """Kernels inductor generated that one warm step of a compiled trial runs (its profiler
    events: C++ kernels on the CPU, `triton_` kernels on CUDA), and the ATen operators the step
    calls outside them (matmuls and the like that inductor leaves to ATen, the optimizer, the
    host work), as the profiler's top-level `aten::` events count them."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trial.device.type == "cuda" else [])
    with profiler_noise_off(), profile(activities=activities) as profiler:
        trial.step()
    events = profiler.events()
    generated = sum(("cpp_fused" in e.name or e.name.startswith("triton_")) and e.device_type.name != "CUDA"
                    for e in events)
    aten = sum(e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
               for e in events)
    return {"generated_kernels": generated, "aten_ops": aten}


def _allocate_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's moments now (a step on zero gradients) so every measured step is a steady one."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def release() -> None:
    """Free a finished trial's memory (drop your references first) before measuring the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_breakdown(trial: Trial) -> dict[str, int]:
    """Bytes of weights (parameters and buffers), trainable gradients and optimizer state."""
    return {
        "weights_bytes": _distinct_bytes(parameter_tensors(trial.model)),
        "gradients_bytes": sum(p.numel() * p.element_size() for p in trial.model.parameters() if p.requires_grad),
        "optimizer_bytes": _distinct_bytes(optimizer_state_tensors(trial.optimizer)),
    }


def _distinct_bytes(tensors: list[Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure_step_memory(trial: Trial) -> dict[str, int | float]:
    """One step measured: bytes saved for backward, peak memory and the step's seconds.

    Peak: on CUDA `torch.cuda.max_memory_allocated` over the step; elsewhere the exact peak of the
    CPU allocator's bytes (`AllocatorPeak`) counting weights, optimizer state and the batch from
    the start. Both include weights, gradients, AdamW state, activations and kernel temporaries.
    """
    saved = SavedTensorBytes(exclude=parameter_tensors(trial.model))
    baseline = [*parameter_tensors(trial.model), *optimizer_state_tensors(trial.optimizer), *trial.inputs.values()]
    with step_peak(trial.device, baseline) as live:
        seconds = _seconds(lambda: trial.step(saved), trial.device)
    return {"saved_bytes": saved.total, "peak_bytes": live.peak, "tracked_step_s": seconds}


def _seconds(fn, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def measure_step_time(trial: Trial, warmup: int, steps: int) -> dict[str, float | list[float]]:
    """Median seconds per step over `steps` steps after `warmup` steps, and samples per second."""
    for _ in range(warmup):
        trial.step()
    times = [_seconds(trial.step, trial.device) for _ in range(steps)]
    median = statistics.median(times)
    return {"step_s": median, "step_times_s": times, "samples_per_s": trial.example_ids.numel() / median}


def count_step_calls(trial: Trial, warmup: int = 2) -> dict[str, int]:
    """ATen calls of one warm training step (after `warmup` steps fill the cache), with the
    sync-forcing ones, on the device path and in total (`wtacrs.bench.dispatch.AtenCounter`),
    and the number of sampled linear layers."""
    from wtacrs.bench.dispatch import AtenCounter
    from wtacrs.layers import SampledLayerMixin

    for _ in range(warmup):
        trial.step()
    with AtenCounter() as counter:
        trial.step()
    sampled = sum(isinstance(m, SampledLayerMixin) for m in trial.model.modules())
    return {**counter.summary(), "sampled_linears": sampled,
            "sync_sites": dict(counter.sync_sites.most_common(8))}


def profile_components(trial: Trial, top: int = 12) -> dict:
    """One step under cProfile: seconds per library function (outside wtacrs.bench).

    cumulative_s includes the torch ops a function calls (its component's whole cost); own_s
    is Python time in the function itself. Profiling inflates Python-heavy parts; the step's
    own profiled time is given for scale. Autograd runs CPU backward on this thread, so backward
    functions are seen there; on CUDA they run on another thread and are not.
    """
    profiler = cProfile.Profile()
    profiler.runcall(trial.step)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, total calls, own, cumulative, callers)}
    rows = [
        {"function": f"{file.rsplit('/wtacrs/', 1)[1].removesuffix('.py').replace('/', '.')}.{name}",
         "calls": calls, "own_s": own, "cumulative_s": cumulative}
        for (file, _, name), (_, calls, own, cumulative, _) in stats.items()
        if "/wtacrs/" in file and "/wtacrs/bench/" not in file
    ]
    step = max((v[3] for (file, _, name), v in stats.items()
                if name == "step" and "/wtacrs/bench/" in file), default=0.0)
    return {"profiled_step_s": step, "components": sorted(rows, key=lambda r: -r["cumulative_s"])[:top]}
