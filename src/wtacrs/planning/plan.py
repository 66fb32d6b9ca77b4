"""`wtacrs.plan`: per recipe, a GPU's predicted peak memory, step time and largest batch, and the
fastest recipe that fits a budget. Every figure is a prediction from one traced step
(`wtacrs.planning.tracer`); none is measured on the GPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wtacrs.bench.output import GB
from wtacrs.planning.gpus import GPU, gpu, step_seconds
from wtacrs.planning.models import ModelSpec, model_spec
from wtacrs.planning.tracer import CUBLAS_WORKSPACES, StepTrace, cublas_workspace_bytes, peak_at_batch, trace_step
from wtacrs.recipes import parse_recipe

# The recipe the project recommends for memory (LoRA with the sampled, recomputed blocks).
RECOMMENDED = "lora+wtacrs@0.3+companions+recompute+recompute-attention"
DEFAULT_METHODS = ("full", "checkpointing", "lora", "lora+checkpointing", RECOMMENDED)
HOPPER = (9, 0)
MiB = 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PlanRow:
    """One recipe's predictions on one GPU (bytes, seconds); `largest_batch` is None when not
    searched, 0 when not even the smallest multiple fits."""

    model: str
    recipe: str
    gpu: str
    batch: int
    seq: int
    dtype: str
    predicted_peak_bytes: int
    budget_bytes: float
    fits: bool
    predicted_step_s: float
    time_vs_full: float | None
    time_vs_lora: float | None
    largest_batch: int | None
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)


def plan(model_or_config, methods: list[str] | tuple[str, ...] = DEFAULT_METHODS, *, seq: int = 128,
         batch: int = 8, dtype: str = "float32", gpu_name: str = "h100-80gb", budget_bytes: float | None = None,
         search_batch: bool = True, multiple: int = 8, max_batch: int = 4096) -> list[PlanRow]:
    """Predict each recipe's step on a GPU: peak `max_memory_allocated`, step time, fit, largest batch.

    Args:
        model_or_config: a `wtacrs.planning.models.model_spec` name, folder or hub id, a
            transformers config, or a `ModelSpec`.
        methods: recipe specs (`wtacrs.recipes`).
        seq, batch: the (batch, seq) token batch, without padding.
        dtype: "float32", "bfloat16" or "float16": weights, gradients, AdamW state and activations.
        gpu_name: a `wtacrs.planning.gpus.GPUS` name.
        budget_bytes: the memory budget (default: the GPU's memory).
        search_batch: also find the largest multiple of `multiple` (<= max_batch) that fits.
    """
    spec = _spec(model_or_config)
    device = gpu(gpu_name)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    recipes = [parse_recipe(m) for m in methods]
    budget = device.memory_bytes if budget_bytes is None else budget_bytes
    measured = []
    for recipe in recipes:
        peak, seconds, notes = predict(spec, recipe.spec, batch, seq, DTYPES[dtype], device)
        largest = None
        if search_batch:
            search = BatchSearch(lambda b, recipe=recipe: _trace(spec, recipe.spec, b, seq, DTYPES[dtype], False),
                                 _workspace_difference(device), budget, multiple, max_batch)
            largest = search.run(batch)
            notes = (*notes, *search.notes)
        measured.append((recipe.spec, peak, seconds, largest, notes))
    by_spec = {spec_: seconds for spec_, _, seconds, _, _ in measured}
    return [PlanRow(spec.name, recipe, device.name, batch, seq, dtype, peak, budget, peak <= budget, seconds,
                    seconds / by_spec["full"] if "full" in by_spec else None,
                    seconds / by_spec["lora"] if "lora" in by_spec else None, largest, notes)
            for recipe, peak, seconds, largest, notes in measured]


_TRACES: dict[tuple, StepTrace] = {}  # recent traces (Hopper's workspace), shared by plans for other GPUs
_KEPT_TRACES = 64


def _trace(spec: ModelSpec, recipe: str, batch: int, seq: int, dtype: torch.dtype, kernels: bool) -> StepTrace:
    """A step's trace on CUDA with Hopper's cuBLAS workspace, from the recent ones if there (one
    traced with its kernels serves a request without)."""
    key = (spec.name, recipe, batch, seq, dtype)
    trace = _TRACES.get(key)
    if trace is None or (kernels and not trace.kernels):
        if len(_TRACES) >= _KEPT_TRACES:
            del _TRACES[next(iter(_TRACES))]
        _TRACES[key] = trace = trace_step(spec, parse_recipe(recipe), batch, seq, dtype=dtype, target="cuda",
                                          compute_capability=HOPPER, kernels=kernels)
    return trace


def _workspace_difference(device: GPU) -> int:
    """A trace depends on the GPU only through cuBLAS's workspace: its bytes on `device` less Hopper's."""
    return CUBLAS_WORKSPACES * (cublas_workspace_bytes(device.compute_capability) - cublas_workspace_bytes(HOPPER))


def predict(spec: ModelSpec, recipe: str, batch: int, seq: int, dtype: torch.dtype,
            device: GPU) -> tuple[int, float, tuple[str, ...]]:
    """(predicted peak bytes, predicted step seconds, the trace's notes) of one step on `device`.
    A trace depends on the GPU only through cuBLAS's workspace, so one is reused across GPUs."""
    trace = _trace(spec, recipe, batch, seq, dtype, True)
    return trace.peak_bytes + _workspace_difference(device), step_seconds(trace.kernels, device, dtype), tuple(trace.notes)


class BatchSearch:
    """The largest multiple of `multiple` (<= max_batch) whose traced step fits `budget`, in few
    traces. The peak is taken to grow with the batch (a fit below a fit, a misfit above a
    misfit). Each round traces one batch strictly inside the bracket of the largest traced fit
    and the smallest traced misfit, chosen by the best prediction at hand:

    - two traces at batches of 2 or more whose allocation streams align (`Stream.aligned`: the
      same calls' storages, allocated and freed in the same order) give the peak at any batch
      (`peak_at_batch`, each storage's bytes on its line): the largest batch it predicts to fit
      is traced next. Once the largest traced fit is the one they predict, and they predict the
      peaks of the other traced batches within 1 MiB (exact but for WTA-CRS's rounded row counts
      and batch 1's views) and put the next multiple over the budget by more than 1 MiB and 100
      times that miss, the next multiple is taken not to fit, untraced, and the row's notes say so;
    - with one traced batch of 2 or more, the next multiple above the largest traced fit (a
      second stream: a line through two peaks misleads where the peak moves from the optimizer
      step, which the batch does not change, to backward, which it does);
    - else the line through the two latest traced peaks, or after one trace the line through
      it and what lived before the step (weights, AdamW state), or the bracket's midpoint after
      an overshoot.

    Batch 1 is no point for a stream: a size-1 dimension makes some copies views. A search
    costs two to four traces on the 8B configs (docs/plan.md)."""

    def __init__(self, trace_at, extra_bytes: int, budget: float, multiple: int = 8, max_batch: int = 4096):
        self.trace_at, self.extra, self.budget, self.multiple, self.max_batch = (
            trace_at, extra_bytes, budget, multiple, max_batch)
        self.traced: dict[int, StepTrace] = {}
        self.notes: list[str] = []

    def peak(self, batch: int) -> int:
        if batch not in self.traced:
            self.traced[batch] = self.trace_at(batch)
        return self.traced[batch].peak_bytes + self.extra

    def run(self, start: int) -> int:
        m = self.multiple
        lo, hi = 0, self.max_batch // m * m + m  # largest multiple known to fit, smallest known not to
        batch, overshot, untraced_misfit = start, False, None
        while True:
            fits = self.peak(batch) <= self.budget
            if fits:
                lo = max(lo, batch // m * m)
            else:
                hi = min(hi, -(-batch // m) * m)
                overshot = batch != start
            if hi - lo <= m:
                break
            predicted = self._stream_guess(lo, hi)
            if predicted is not None:
                guess, pair = predicted
                if guess == lo and lo in self.traced and (check := self._checked(pair, lo + m)) is not None:
                    untraced_misfit, margin = lo + m, check  # lo traced to fit, lo + m predicted not to
                    break
                guess = guess if guess > lo else lo + m
            elif len([b for b in self.traced if b >= 2]) == 1 and max(lo + m, 2) < hi and (
                    max(lo + m, 2) not in self.traced):
                guess = max(lo + m, 2)  # a second batch of 2 or more, so that two streams can align
            else:
                guess = self._line_guess(lo, hi, overshot)
            batch = min(max(guess, lo + m), hi - m)
        if untraced_misfit is not None and untraced_misfit <= self.max_batch:
            self.notes.append(f"largest batch {lo}: traced to fit; {untraced_misfit} not traced, put "
                              f"{margin[1] / MiB:,.0f} MiB over the budget by two traced batches' allocation streams, "
                              f"which miss the other traced batches' peaks by {margin[0]:,} B at most")
        return lo

    def _checked(self, pair, misfit: int):
        """(the streams' largest miss at the other traced batches, bytes by which they put `misfit`
        over the budget) if the miss is within 1 MiB and the excess above 1 MiB and 100 times it."""
        others = [b for b in self.traced if b not in (pair[0].batch, pair[1].batch)]
        if not others:
            return None
        miss = max(abs(self._stream_peak(pair, b) + self.extra - self.peak(b)) for b in others)
        over = self._stream_peak(pair, misfit) + self.extra - self.budget
        return (miss, over) if miss <= MiB and over > max(100 * miss, MiB) else None

    def _aligned_pair(self):
        streams = sorted((b, t.stream) for b, t in self.traced.items() if b >= 2 and t.stream is not None)
        for i in range(len(streams) - 1, 0, -1):
            for j in range(i - 1, -1, -1):
                if streams[i][1].aligned(streams[j][1]):
                    return streams[j][1], streams[i][1]
        return None

    def _stream_peak(self, pair, batch: int) -> int:
        return peak_at_batch(pair[0], pair[1], batch)

    def _stream_guess(self, lo: int, hi: int):
        """(the largest multiple in [lo, hi) predicted to fit, the pair of batches predicting it)."""
        pair = self._aligned_pair()
        if pair is None:
            return None
        good, bad = lo // self.multiple, hi // self.multiple  # in multiples; good fits, bad does not
        while bad - good > 1:
            mid = (good + bad) // 2
            if self._stream_peak(pair, mid * self.multiple) + self.extra <= self.budget:
                good = mid
            else:
                bad = mid
        return good * self.multiple, pair

    def _line_guess(self, lo: int, hi: int, overshot: bool) -> int:
        m = self.multiple
        if overshot and hi <= self.max_batch:
            return (lo + hi) // 2 // m * m
        probes = sorted(self.traced.items())[-2:] if len(self.traced) >= 2 else None
        if probes is None:
            (b2, trace), = self.traced.items()
            b1, p1 = 0, trace.baseline_bytes + self.extra  # what lived before the step
            p2 = trace.peak_bytes + self.extra
        else:
            (b1, t1), (b2, t2) = probes
            p1, p2 = t1.peak_bytes + self.extra, t2.peak_bytes + self.extra
        if p2 <= p1:
            return 2 * max(b2, m) if hi > self.max_batch else (lo + hi) // 2 // m * m
        return int((b2 + (self.budget - p2) * (b2 - b1) / (p2 - p1)) // m * m)


def largest_batch(peak_at, budget: float, multiple: int = 8, max_batch: int = 4096) -> int:
    """The largest multiple of `multiple` (<= max_batch) whose `peak_at(batch)` is within `budget`,
    0 if none is: `BatchSearch` on peaks alone (no streams), starting at `multiple`."""

    class _Peak:
        def __init__(self, peak: float):
            self.peak_bytes, self.baseline_bytes, self.stream = peak, peak, None

    return BatchSearch(lambda b: _Peak(peak_at(b)), 0, budget, multiple, max_batch).run(multiple)


def fastest_fitting(rows: list[PlanRow]) -> PlanRow | None:
    """The row with the shortest predicted step among those that fit, or None."""
    fitting = [r for r in rows if r.fits]
    return min(fitting, key=lambda r: r.predicted_step_s) if fitting else None


def _spec(model_or_config) -> ModelSpec:
    if isinstance(model_or_config, ModelSpec):
        return model_or_config
    if isinstance(model_or_config, str):
        return model_spec(model_or_config)
    import transformers

    if isinstance(model_or_config, transformers.PretrainedConfig):
        config = model_or_config
        name = getattr(config, "name_or_path", "") or type(config).__name__
        if any(a.endswith("ForCausalLM") for a in config.architectures or ()) or config.is_decoder:
            return ModelSpec(name, lambda: transformers.AutoModelForCausalLM.from_config(config).train())
        return ModelSpec(name, lambda: transformers.AutoModelForSequenceClassification.from_config(config).train())
    raise TypeError(f"plan takes a model name, folder, hub id, transformers config or ModelSpec, "
                    f"got {type(model_or_config).__name__}")


def plot_plan(rows: list[PlanRow], path: Path) -> Path:
    """The predicted memory/time plane: one point per recipe, the budget as a line (PNG, Agg)."""
    from wtacrs.bench.output import new_figure, save_figure

    figure, ax = new_figure()
    for r in rows:
        ax.scatter(r.predicted_step_s * 1e3, r.predicted_peak_bytes / GB, marker="o" if r.fits else "x")
        ax.annotate(r.recipe, (r.predicted_step_s * 1e3, r.predicted_peak_bytes / GB), fontsize="x-small",
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(rows[0].budget_bytes / GB, color="grey", linestyle="--", label="budget")
    ax.set_xlabel(f"predicted step time on {rows[0].gpu} (ms)")
    ax.set_ylabel("predicted peak memory (GB)")
    ax.set_title(f"{rows[0].model}, batch {rows[0].batch}, seq {rows[0].seq}, {rows[0].dtype}: predictions")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    save_figure(figure, path)
    return path
