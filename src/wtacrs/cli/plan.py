"""Predict a GPU's peak memory and step time per recipe, without the GPU, and the fastest recipe that fits.

One training step (forward, backward, AdamW) of each recipe is traced on fake tensors with the
library's real code, its allocations rounded as CUDA's caching allocator does and SDPA run as
CUDA's fused kernels; step time is a roofline per kernel at the GPU's data-sheet peaks plus a
launch cost (see docs/plan.md). Every figure printed is a prediction, not a measurement.

    wtacrs plan --model llama-3.1-8b --seq 2048 --batch 1 --dtype bfloat16 --gpu h100-80gb \\
        --methods lora lora+checkpointing --budget 80
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wtacrs.bench.output import GB


def add_arguments(p: argparse.ArgumentParser) -> None:
    from wtacrs.planning.gpus import GPUS
    from wtacrs.planning.models import PLAN_MODELS
    from wtacrs.planning.plan import DEFAULT_METHODS, DTYPES

    p.add_argument("--model", default="bert-base",
                   help=f"a named size ({', '.join(PLAN_MODELS)}), a folder with config.json, or a hub id")
    p.add_argument("--seq", type=_positive, default=128, help="tokens per example")
    p.add_argument("--batch", type=_positive, default=8, help="examples per step")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="RECIPE",
                   help="recipe specs (see wtacrs.recipes)")
    p.add_argument("--gpu", nargs="+", default=["h100-80gb"], choices=list(GPUS),
                   help="one plan per GPU (their traces are shared)")
    p.add_argument("--budget", type=_positive_float, default=None, metavar="GB",
                   help="memory budget in GB (10^9 bytes; default: the GPU's memory)")
    p.add_argument("--multiple", type=_positive, default=8, help="largest batch searched in multiples of this")
    p.add_argument("--no-search", dest="search", action="store_false", help="skip the largest-batch search")
    p.add_argument("--out", type=Path, default=None, help="folder for plan-GPU.json and plan-GPU.png (default: none)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from wtacrs.planning.plan import plot_plan

    for gpu_name in args.gpu:
        rows = plan_or_exit("wtacrs plan", args.model, args.methods, seq=args.seq, batch=args.batch, dtype=args.dtype,
                            gpu_name=gpu_name, budget_gb=args.budget, search=args.search, multiple=args.multiple)
        print(plan_table(rows) + "\n", flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"plan-{gpu_name}.json").write_text(json.dumps([r.as_dict() for r in rows], indent=1) + "\n")
            print(f"predicted memory/time plane: {plot_plan(rows, args.out / f'plan-{gpu_name}.png')}\n")
    return 0


def plan_or_exit(prog: str, model, methods: list[str], *, seq: int, batch: int, dtype: str, gpu_name: str,
                 budget_gb: float | None, search: bool = True, multiple: int = 8) -> list:
    """`wtacrs.planning.plan.plan`'s rows, after checking the inputs: a bad model, recipe or GPU
    exits 2 with one line naming it."""
    from wtacrs.planning.gpus import gpu
    from wtacrs.planning.models import ModelSpec, model_spec
    from wtacrs.planning.plan import plan
    from wtacrs.recipes import parse_recipe

    try:
        spec = model if isinstance(model, ModelSpec) else model_spec(model)
        gpu(gpu_name)
        for method in methods:
            parse_recipe(method)
    except ValueError as e:  # RecipeError is one
        raise SystemExit(f"{prog}: error: {e}") from None
    return plan(spec, methods, seq=seq, batch=batch, dtype=dtype, gpu_name=gpu_name,
                budget_bytes=None if budget_gb is None else budget_gb * GB, search_batch=search, multiple=multiple)


def plan_table(rows) -> str:
    """The rows as a Markdown table, every figure labelled a prediction, and the fastest fit."""
    from wtacrs.planning.plan import fastest_fitting

    first = rows[0]
    lines = [f"PREDICTIONS for {first.model}, batch {first.batch}, seq {first.seq}, {first.dtype}, AdamW, on "
             f"{first.gpu} (budget {first.budget_bytes / GB:.2f} GB); traced on fake tensors, not measured.", "",
             "| recipe | predicted peak (GB) | fits | predicted step (ms) | predicted ×full | predicted ×LoRA | "
             "predicted largest batch |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.recipe} | {r.predicted_peak_bytes / GB:.3f} | {'yes' if r.fits else 'no'} | "
                     f"{r.predicted_step_s * 1e3:.1f} | {_ratio(r.time_vs_full)} | {_ratio(r.time_vs_lora)} | "
                     f"{'-' if r.largest_batch is None else r.largest_batch} |")
    best = fastest_fitting(rows)
    lines += ["", f"fastest recipe that fits (predicted): {best.recipe}" if best else
              "no recipe fits the budget at this batch (predicted)"]
    notes = sorted({n for r in rows for n in r.notes})
    lines += [f"trace note: {n}" for n in notes]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plan_finetune(settings, gpu_name: str, budget_gb: float | None) -> int:
    """`wtacrs finetune --plan`: print the predicted plan of the runs `settings` (a
    `wtacrs.finetuning.spec.Settings`) are about to start, its task's model built from the
    model's config, at batch --batch-size and length --max-length (dynamic padding makes most
    batches shorter: an upper bound). 2 if a recipe's predicted peak exceeds the budget, else 0.
    Runs with --bf16 or --fp16 are refused (2): their autocast (fp32 weights, matmuls in half
    precision, CUDA's own cast lists) is not traced, and planning them as fp32 would print a
    wrong plan. Not modelled: the Trainer's optimizer choice."""
    import transformers

    from wtacrs import packaged
    from wtacrs.planning.models import ModelSpec
    from wtacrs.tasks import get_task

    if settings.bf16 or settings.fp16:
        flag = "--bf16" if settings.bf16 else "--fp16"
        print(f"wtacrs finetune --plan: error: cannot plan a {flag} run: its autocast (fp32 weights, matmuls in "
              f"{flag[2:]} under torch.autocast) is not traced, and an fp32 plan would be wrong; plan it without "
              f"{flag}, or with `wtacrs plan --dtype {'bfloat16' if settings.bf16 else 'float16'}` "
              f"(uniform half-precision weights and states)", file=sys.stderr)
        return 2
    task = get_task(settings.task)
    try:
        config = (packaged.load_config(settings.model) if packaged.is_packaged(settings.model)
                  else transformers.AutoConfig.from_pretrained(settings.model))
    except (OSError, ValueError) as e:
        raise SystemExit(f"wtacrs finetune --plan: error: cannot read --model {settings.model}'s config: "
                         f"{str(e).splitlines()[0]}") from None
    for key, value in task.model_kwargs().items():
        setattr(config, key, value)
    spec = ModelSpec(settings.model, lambda: task.auto_class().from_config(config).train())
    rows = plan_or_exit("wtacrs finetune --plan", spec, [r.spec for r in settings.recipes], seq=settings.max_length,
                        batch=settings.batch_size, dtype="float32", gpu_name=gpu_name, budget_gb=budget_gb,
                        search=False)
    print(plan_table(rows) + "\n", flush=True)
    over = [r.recipe for r in rows if not r.fits]
    if over:
        print(f"wtacrs finetune: error: predicted not to fit {rows[0].budget_bytes / GB:.2f} GB on {gpu_name}: "
              f"{', '.join(over)} (see the plan above; lower --batch-size or --max-length)", file=sys.stderr)
        return 2
    return 0
