"""Decoder fine-tuning memory and time: LoRA / full fine-tuning of a LLaMA-style causal LM
against WTA-CRS with the decoder companions, checkpointing and VeLoRA, on next-token labels.

Each method gets its own model (same random weights, `wtacrs.bench.models.build_model`), AdamW
with its state allocated, and the same random batch. Per method:
- live peak: the exact peak of CPU allocator bytes over one training step (`AllocatorPeak`),
  counting weights, AdamW state and the batch from the start (as `wtacrs bench memory`);
- step MB: that peak minus what lives before the step (weights, AdamW state, batch): the
  activations, logits and gradients the step adds at its worst moment;
- step time: the median of `--steps` steps, the methods interleaved step by step (so a slow
  phase of a shared machine hits all of them alike), after `--warmup` steps each.

Methods (LoRA: r 16, alpha 32, dropout 0, every linear layer of the blocks; PEFT):
    lora, lora+checkpointing, velora (PEFT's VeloraConfig on the same LoRA),
    lora+wtacrs@R, lora+wtacrs@R+companions[+recompute[+recompute-attention]], lora+companions,
    full, full+checkpointing, full+companions, wtacrs@R+companions[+recompute[+recompute-attention]]
Specs are `wtacrs.recipes` specs ("companions" = lean RMSNorm, lean SDPA attention and the
chunked LM loss, all exact; "recompute" = the gated MLP's recompute; "recompute-attention" = the
attention sub-block's). A method without "wtacrs@R" samples nothing: its gradients are the plain ones.
"+fused-adamw": each parameter's AdamW step runs in backward as soon as its gradient is complete
(`wtacrs.bench.training.BackwardFusedAdamW`), so the full set of gradients never exists at once.

    python benchmarks/decoder_memory.py --model smollm2-135m --dtype bf16 --batch 2 --seq 512
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from wtacrs.bench.suite import Setup, run_speed
from wtacrs.bench.training import Trial, measure_step_memory, memory_breakdown, release
from wtacrs.recipes import LoraSettings, parse_recipe

LORA = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=(
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))  # every linear of the blocks
DEFAULT_METHODS = (
    "lora", "lora+checkpointing", "velora", "lora+wtacrs@0.3",
    "lora+wtacrs@0.3+companions", "lora+wtacrs@0.3+companions+recompute",
    "lora+wtacrs@0.3+companions+recompute+recompute-attention", "lora+companions+recompute+recompute-attention",
    "full", "full+checkpointing", "full+companions",
    "wtacrs@0.3+companions", "wtacrs@0.3+companions+recompute+recompute-attention",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make(spec: str, size: str, batch: int, seq: int, dtype: torch.dtype, seed: int = 0) -> Trial:
    """The bench's `Trial` (model, AdamW with allocated state, batch) for one recipe spec, with this
    script's LoRA."""
    return setup(size, batch, seq, dtype, (spec,), seed).trial(spec)


def setup(size: str, batch: int, seq: int, dtype: torch.dtype, methods: tuple[str, ...], seed: int = 0) -> Setup:
    """The bench's `Setup` of this script's runs (CPU, this script's LoRA)."""
    return Setup(size, batch, seq, methods, torch.device("cpu"), dtype, seed, lora=LORA)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (0: memory only)")
    p.add_argument("--skip-memory", action="store_true", help="time only")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    rows = {spec: {"method": spec} for spec in args.methods}
    for spec in [] if args.skip_memory else args.methods:  # memory: one method at a time, each freed before the next
        trial = make(spec, args.model, args.batch, args.seq, dtype)
        measured, resident = measure_step_memory(trial), memory_breakdown(trial)
        before_step = resident["weights_bytes"] + resident["optimizer_bytes"] + sum(
            t.untyped_storage().nbytes() for t in trial.inputs.values())
        rows[spec] |= {"peak_mb": measured["peak_bytes"] / 2**20,
                      "step_mb": (measured["peak_bytes"] - before_step) / 2**20,
                      "saved_mb": measured["saved_bytes"] / 2**20}
        print(f"memory {spec:<60} peak {rows[spec]['peak_mb']:8.1f} MB  added by the step "
              f"{rows[spec]['step_mb']:8.1f} MB", file=sys.stderr, flush=True)
        del trial
        release()
        _write(args, rows)
    if args.steps:
        _time(args, dtype, rows)
    _table(args, rows)
    _write(args, rows)
    return 0


def _time(args: argparse.Namespace, dtype: torch.dtype, rows: dict[str, dict]) -> None:
    """Median step seconds per method, the methods interleaved step by step (`wtacrs bench speed
    --interleave`'s rounds; a method that fails keeps its error)."""
    timed = run_speed(setup(args.model, args.batch, args.seq, dtype, tuple(args.methods)), args.warmup, args.steps,
                      peak=False, interleave=True)
    for row in timed:
        rows[row["method"]] |= {k: row[k] for k in ("step_s", "step_times_s", "error") if k in row}


def _table(args: argparse.Namespace, rows: dict[str, dict]) -> None:
    """The Markdown table on stdout; ratios to "lora" for LoRA methods, to "full" for the others."""
    print(f"\n{args.model}, {args.dtype}, batch {args.batch}, seq {args.seq}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ratios to lora (LoRA methods) or full (the others)\n")
    print("| method | live peak MB | step adds MB | step s | peak × | time × |")
    print("|---|---|---|---|---|---|")
    for spec, row in rows.items():
        ref = rows.get("lora" if parse_recipe(spec).lora else "full", {})
        cells = [_cell(row, "peak_mb", "{:.0f}"), _cell(row, "step_mb", "{:.0f}"), _cell(row, "step_s", "{:.1f}")]
        for key in ("peak_mb", "step_s"):
            cells.append(f"{row[key] / ref[key]:.2f}" if key in row and key in ref else "–")
        print(f"| {spec} | " + " | ".join(cells) + " |")


def _cell(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if key in row else "–"


def _write(args: argparse.Namespace, rows: dict[str, dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": list(rows.values())}, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
