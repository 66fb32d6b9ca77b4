"""`wtacrs plan`'s tracer against the CPU: the traced peak of one step (target "cpu": exact
bytes, the CPU's kernels) beside `AllocatorPeak`'s measured peak of the same step (a steady
step, after one warm-up, as `wtacrs bench memory` measures), per model size and recipe.

    python benchmarks/plan_cpu_check.py > benchmarks/results/plan/cpu_check.md
"""

from __future__ import annotations

import time

from wtacrs.bench.models import build_model
from wtacrs.bench.training import make_trial, measure_step_memory
from wtacrs.packaged import packaged_model_dir
from wtacrs.planning.models import ModelSpec, model_spec
from wtacrs.planning.tracer import trace_step
from wtacrs.recipes import parse_recipe

RECOMMENDED = "lora+wtacrs@0.3+companions+recompute+recompute-attention"
FULL_RECIPE = "wtacrs@0.3+companions+recompute+recompute-attention"
CASES = [  # (model, batch, seq, recipes)
    ("bert-tiny", 4, 16, ["full", "lora", "checkpointing", RECOMMENDED, FULL_RECIPE]),
    ("llama-tiny", 2, 32, ["full", "lora", "checkpointing", RECOMMENDED]),
    ("all-minilm-l6-v2", 32, 64, ["full", "lora", "checkpointing", RECOMMENDED, FULL_RECIPE]),
    ("bert-base", 8, 128, ["full", "lora", "checkpointing", RECOMMENDED, FULL_RECIPE]),
    ("smollm2-135m", 1, 256, ["full", "lora", "checkpointing", RECOMMENDED]),
]


def main() -> None:
    print("| model | batch × seq | recipe | traced peak (B) | measured peak (B) | traced/measured | trace (s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for model, batch, seq, recipes in CASES:
        size = str(packaged_model_dir(model)) if model == "all-minilm-l6-v2" else model
        spec = ModelSpec(model, lambda size=size: build_model(size)) if size != model else model_spec(model)
        for recipe in recipes:
            start = time.perf_counter()
            traced = trace_step(spec, parse_recipe(recipe), batch, seq, target="cpu").peak_bytes
            seconds = time.perf_counter() - start
            trial = make_trial(size, recipe, batch, seq)
            trial.step()
            measured = measure_step_memory(trial)["peak_bytes"]
            del trial
            print(f"| {model} | {batch} × {seq} | {recipe} | {traced:,} | {measured:,} | {traced / measured:.4f} | "
                  f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
