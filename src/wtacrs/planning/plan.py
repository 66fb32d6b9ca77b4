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
from wtacrs.planning.tracer import CUBLAS_WORKSPACES, StepTrace, cublas_workspace_bytes, trace_step
from wtacrs.recipes import parse_recipe

# The recipe the project recommends for memory (LoRA with the sampled, recomputed blocks).
RECOMMENDED = "lora+wtacrs@0.3+companions+recompute+recompute-attention"
DEFAULT_METHODS = ("full", "checkpointing", "lora", "lora+checkpointing", RECOMMENDED)
HOPPER = (9, 0)
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
        traced: dict[int, tuple[int, float, tuple[str, ...]]] = {}

        def at(b: int, recipe=recipe, traced=traced) -> tuple[int, float, tuple[str, ...]]:
            if b not in traced:
                traced[b] = predict(spec, recipe.spec, b, seq, DTYPES[dtype], device)
            return traced[b]

        peak, seconds, notes = at(batch)
        largest = largest_batch(lambda b: at(b)[0], budget, multiple, max_batch) if search_batch else None
        measured.append((recipe.spec, peak, seconds, largest, notes))
    by_spec = {spec_: seconds for spec_, _, seconds, _, _ in measured}
    return [PlanRow(spec.name, recipe, device.name, batch, seq, dtype, peak, budget, peak <= budget, seconds,
                    seconds / by_spec["full"] if "full" in by_spec else None,
                    seconds / by_spec["lora"] if "lora" in by_spec else None, largest, notes)
            for recipe, peak, seconds, largest, notes in measured]


_TRACES: dict[tuple, StepTrace] = {}  # recent traces (Hopper's workspace), shared by plans for other GPUs
_KEPT_TRACES = 64


def predict(spec: ModelSpec, recipe: str, batch: int, seq: int, dtype: torch.dtype,
            device: GPU) -> tuple[int, float, tuple[str, ...]]:
    """(predicted peak bytes, predicted step seconds, the trace's notes) of one step on `device`.
    A trace depends on the GPU only through cuBLAS's workspace, so one is reused across GPUs."""
    key = (spec.name, recipe, batch, seq, dtype)
    if key not in _TRACES:
        if len(_TRACES) >= _KEPT_TRACES:
            del _TRACES[next(iter(_TRACES))]
        _TRACES[key] = trace_step(spec, parse_recipe(recipe), batch, seq, dtype=dtype, target="cuda",
                                  compute_capability=HOPPER)
    trace = _TRACES[key]
    workspaces = CUBLAS_WORKSPACES * (cublas_workspace_bytes(device.compute_capability)
                                      - cublas_workspace_bytes(HOPPER))
    return trace.peak_bytes + workspaces, step_seconds(trace.kernels, device, dtype), tuple(trace.notes)


def largest_batch(peak_at, budget: float, multiple: int = 8, max_batch: int = 4096) -> int:
    """The largest multiple of `multiple` (<= max_batch) whose `peak_at(batch)` is within `budget`,
    0 if none is. A step's peak is close to affine in the batch, so each probe is where the line
    through the last two probes meets the budget, kept strictly inside the bracket of the largest
    fit and the smallest misfit; after a probe that overshot, the bracket's midpoint instead (so
    the search ends in a few probes even where the line misleads)."""
    lo, hi = 0, max_batch + multiple  # largest batch known to fit, smallest known not to
    probes: list[tuple[int, float]] = []
    batch, overshot = multiple, False
    while hi - lo > multiple:
        peak = peak_at(batch)
        probes.append((batch, peak))
        fits = peak <= budget
        lo, hi, overshot = (batch, hi, False) if fits else (lo, batch, True)
        if len(probes) >= 2 and not overshot and probes[-1][1] > probes[-2][1]:
            (b1, p1), (b2, p2) = probes[-2:]
            guess = int((b2 + (budget - p2) * (b2 - b1) / (p2 - p1)) // multiple * multiple)
        elif overshot or hi <= max_batch:
            guess = (lo + hi) // 2 // multiple * multiple
        else:
            guess = 2 * batch
        batch = min(max(guess, lo + multiple), hi - multiple)
    return lo


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
