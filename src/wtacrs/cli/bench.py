"""Benchmark methods of fine-tuning: memory, speed, largest batch under a budget, gradient variance.

Models are named sizes (bert-base, bert-large, t5-base, ...) built from configs with random
weights, so runs work offline, or a local folder of a pre-trained model (any family with a
sequence-classification head). Each run writes <command>.json (with torch version, device,
dtype, shapes, seed and command line), <command>.md and PNG plots into --out.

Methods are specs such as full, checkpointing, lora, wtacrs@0.3, lora+wtacrs@0.1,
wtacrs@0.3+companions+checkpointing, crs@0.3, topk@0.3: the recipes of `wtacrs.recipes`, as in
`wtacrs finetune --method`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from wtacrs.bench.models import MODEL_SIZES, build_model, make_batch
from wtacrs.bench.output import GB, markdown_report, markdown_table, run_metadata, write_json, write_text
from wtacrs.bench.plots import plot_memory, plot_memory_time_plane, plot_throughput_vs_batch, plot_variance
from wtacrs.bench.training import COMPILE_WARMUP
from wtacrs.bench.suite import (
    DEFAULT_METHODS,
    Setup,
    add_ratio_to_full,
    run_batch,
    run_calls,
    run_memory,
    run_speed,
    speed_warmup,
)
from wtacrs.bench.variance import DEFAULT_RATIOS, UNBIASED, capture_linear_io, run_variance, summarize
from wtacrs.recipes import LoraSettings, RecipeError, parse_recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_CPU_BUDGET_GB = 12.0


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def ratio_arg(text: str) -> float:
    """argparse type: a ratio in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {text}")
    return value


def _model(text: str) -> str:
    if text not in MODEL_SIZES and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is neither a named size ({', '.join(MODEL_SIZES)}) nor a folder")
    return text


def _method(text: str) -> str:
    try:
        parse_recipe(text)
    except RecipeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _common(batch: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default="bert-base", type=_model,
                   help=f"named size with random weights ({', '.join(MODEL_SIZES)}), or a local folder of a "
                        "pre-trained model of any family with a sequence-classification head (default bert-base)")
    p.add_argument("--batch", type=positive_int, default=batch)
    p.add_argument("--seq", type=positive_int, default=128, help="tokens per example")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    return p


def _with_methods(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", type=_method, default=list(DEFAULT_METHODS), metavar="METHOD")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True,
                           metavar="{memory,speed,calls,batch,variance,merge}")
    memory = sub.add_parser("memory", parents=[_common(64)], help="saved bytes, peak of a step, peak RSS")
    _with_methods(memory)
    memory.add_argument("--no-rss", dest="rss", action="store_false", help="skip the fresh-process RSS (CPU)")
    speed = sub.add_parser("speed", parents=[_common(64)], help="median step time and samples/s")
    _with_methods(speed)
    speed.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    speed.add_argument("--steps", type=positive_int, default=3, help="timed steps (median reported)")
    speed.add_argument("--no-peak", dest="peak", action="store_false", help="skip the peak step for the plane")
    speed.add_argument("--profile", action="store_true", help="one more step under cProfile: time per component")
    speed.add_argument("--interleave", action="store_true",
                       help="build every method's model first and time the steps round-robin (drift hits all alike)")
    speed.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile every method's model (default backend inductor); at least "
                            f"{COMPILE_WARMUP} warm-up steps, and the kernels a compiled step runs are counted")
    calls = sub.add_parser("calls", parents=[_common(8)],
                           help="ATen calls and device-to-host syncs of one training step")
    _with_methods(calls)
    batch = sub.add_parser("batch", parents=[_common(8)],
                           help="largest batch under a memory budget (--batch: first probe)")
    _with_methods(batch)
    batch.add_argument("--budget-gb", type=positive_float, default=None,
                       help="GB (1e9 bytes); default 12 on CPU, the card's memory on CUDA")
    batch.add_argument("--multiple", type=positive_int, default=8, help="batch sizes searched are multiples of this")
    batch.add_argument("--max-batch", type=positive_int, default=4096)
    variance = sub.add_parser("variance", parents=[_common(4)], help="variance of dW estimates per layer")
    variance.add_argument("--ratios", type=ratio_arg, nargs="+", default=list(DEFAULT_RATIOS))
    variance.add_argument("--draws", type=int, default=16, help="estimates per layer, ratio and estimator (>= 2)")
    variance.add_argument("--layers", default=None, metavar="REGEX", help="only linear layers whose name matches")
    merge = sub.add_parser("merge", help="one table from several memory.json (or speed.json) runs of one setup")
    merge.add_argument("inputs", nargs="+", type=Path, metavar="JSON")
    merge.add_argument("--out", type=Path, required=True, help="output folder")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("wtacrs bench: error: --device cuda, but CUDA is not available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def run(args: argparse.Namespace) -> int:
    from wtacrs.finetuning.guards import check_output_dir

    if args.bench_command == "variance" and args.draws < 2:
        raise SystemExit(f"wtacrs bench variance: error: --draws must be >= 2, got {args.draws}")
    try:
        check_output_dir(args.out, "--out")  # before minutes of measuring
    except ValueError as e:
        print(f"wtacrs bench: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device = _device(getattr(args, "device", "cpu"))
    return RUNNERS[args.bench_command](args, device)


def _setup(args: argparse.Namespace, device: torch.device) -> Setup:
    return Setup(args.model, args.batch, args.seq, tuple(args.methods), device, DTYPES[args.dtype], args.seed,
                 compile=getattr(args, "compile", None))


def _meta(args: argparse.Namespace, device: torch.device, **extra) -> dict:
    return run_metadata(device, DTYPES[args.dtype], args.seed, model=args.model, batch=args.batch, seq=args.seq,
                        optimizer="AdamW", lora=dataclasses.asdict(LoraSettings()),
                        **extra)


def _write(out: Path, name: str, title: str, meta: dict, rows: list[dict], columns, notes=(), **extra) -> None:
    write_json(out / f"{name}.json", {"meta": meta, "rows": rows, **extra})
    write_text(out / f"{name}.md", markdown_report(title, meta, markdown_table(rows, columns), notes))
    print(markdown_table(rows, columns))
    print(f"wrote {out / name}.json, .md and plots")


def _gb(rows: list[dict], *keys: str) -> list[dict]:
    """Copies of rows with byte counts also given in GB (key_gb)."""
    return [{**r, **{f"{k.removesuffix('_bytes')}_gb": r[k] / GB for k in keys if r.get(k) is not None}} for r in rows]


MEMORY_COLUMNS = [("method", "method", ""), ("saved_gb", "saved for backward (GB)", ".3f"),
                  ("saved_reduction", "saved ×less", ".2f"), ("peak_gb", "peak of step (GB)", ".3f"),
                  ("peak_reduction", "peak ×less", ".2f"), ("peak_rss_gb", "peak RSS (GB)", ".2f"),
                  ("peak_rss_reduction", "RSS ×less", ".2f"), ("error", "error", "")]
SPEED_COLUMNS = [("method", "method", ""), ("step_s", "median step (s)", ".3f"), ("samples_per_s", "samples/s", ".1f"),
                 ("time_vs_full", "time ×full", ".3f"), ("peak_gb", "peak (GB)", ".3f"),
                 ("peak_reduction", "peak ×less", ".2f"), ("error", "error", "")]
COMPILED_COLUMNS = [("generated_kernels", "generated kernels / step", ""), ("aten_ops", "ATen ops / step", "")]


def _run_memory(args: argparse.Namespace, device: torch.device) -> int:
    rss = args.rss and device.type == "cpu"
    peak_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "exact peak of CPU allocator bytes"
    meta = _meta(args, device, peak=peak_kind)
    run_memory(_setup(args, device), rss, on_row=lambda rows: _report_memory(args.out, meta, _copies(rows)))
    return 0


def _copies(rows: list[dict]) -> list[dict]:
    """Shallow copies, so that a partial report does not add its ratios to the rows being measured."""
    return [dict(r) for r in rows]


def _report_memory(out: Path, meta: dict, rows: list[dict]) -> None:
    for key in ("peak_bytes", "saved_bytes", "peak_rss_bytes"):
        add_ratio_to_full(rows, key, f"{key.removesuffix('_bytes')}_reduction", inverse=True)
    rows = _gb(rows, "saved_bytes", "peak_bytes", "peak_rss_bytes", "weights_bytes", "optimizer_bytes")
    notes = [f"Peak of step: {meta['peak']} over one full training step (forward, backward, AdamW step), "
             "including weights, gradients and AdamW state.",
             "Peak RSS: VmHWM (peak resident set) of a fresh process that builds the model and runs one step "
             "(CPU only).",
             "Saved for backward: distinct storages packed by autograd in forward, parameters excluded; tensors "
             "kept by non-reentrant checkpointing's recompute closures are not packed and so not counted here."]
    title = f"Memory per method: {meta['model']}, batch {meta['batch']}, seq {meta['seq']}"
    _write(out, "memory", title, meta, rows, MEMORY_COLUMNS, notes)
    plot_memory(rows, out / "memory.png")


def _run_speed(args: argparse.Namespace, device: torch.device) -> int:
    setup = _setup(args, device)
    meta = _meta(args, device, warmup=speed_warmup(setup, args.warmup), steps=args.steps, interleave=args.interleave,
                 compile=args.compile)
    rows = run_speed(setup, args.warmup, args.steps, args.peak, args.profile,
                     on_row=lambda rows: _report_speed(args.out, meta, _copies(rows)), interleave=args.interleave)
    if args.profile:
        write_text(args.out / "speed_profile.md", _profile_report(rows))
    return 0


def _report_speed(out: Path, meta: dict, rows: list[dict]) -> None:
    add_ratio_to_full(rows, "step_s", "time_vs_full")
    add_ratio_to_full(rows, "peak_bytes", "peak_reduction", inverse=True)
    order = ("round-robin (one step of each method per round)" if meta.get("interleave")
             else "methods run one after another")
    notes = [f"Median of {meta['steps']} timed steps after {meta['warmup']} warm-up step(s), {order}, in one process. "
             "Peak: one more step, measured as in `wtacrs bench memory`."]
    columns = SPEED_COLUMNS
    if meta.get("compile"):
        notes.append(f"Every model `torch.compile(model, backend={meta['compile']!r})`, stepped inside "
                     "`wtacrs.batch`; the optimizer step runs eagerly. Kernels: one more step under the profiler, "
                     "the kernels the backend generated and the top-level ATen operators run outside them.")
        columns = [*SPEED_COLUMNS[:-1], *COMPILED_COLUMNS, SPEED_COLUMNS[-1]]
    title = f"Step time per method: {meta['model']}, batch {meta['batch']}, seq {meta['seq']}"
    _write(out, "speed", title, meta, _gb(rows, "peak_bytes"), columns, notes)
    plot_memory_time_plane(_gb(rows, "peak_bytes"), out / "memory_time_plane.png")


REPORTS = {"memory": _report_memory, "speed": _report_speed}
SAME_SETUP = ("model", "batch", "seq", "device", "dtype", "seed", "torch", "compile")


def _run_merge(args: argparse.Namespace, device: torch.device) -> int:
    """Rows of several memory (or speed) runs of one setup as one table, ratios to `full` redone."""
    records = [json.loads(Path(p).read_text()) for p in args.inputs]
    kinds = {Path(p).stem for p in args.inputs}
    if len(kinds) != 1 or not kinds <= set(REPORTS):
        raise SystemExit(f"wtacrs bench merge: error: give memory.json files or speed.json files, got {sorted(kinds)}")
    for key in SAME_SETUP:
        if len({str(r["meta"].get(key)) for r in records}) > 1:
            raise SystemExit(f"wtacrs bench merge: error: the runs differ in {key}")
    rows, seen = [], set()
    for record in records:
        rows += [_without_ratios(r) for r in record["rows"] if r["method"] not in seen]
        seen |= {r["method"] for r in record["rows"]}
    meta = {**records[0]["meta"], "command": " ".join(r["meta"]["command"] for r in records),
            "merged": [{"file": str(p), "command": r["meta"]["command"]} for p, r in zip(args.inputs, records)]}
    REPORTS[kinds.pop()](args.out, meta, rows)
    return 0


def _without_ratios(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith(("_reduction", "_vs_full", "_gb"))}


def _profile_report(rows: list[dict]) -> str:
    columns = [("function", "function", ""), ("calls", "calls", "d"), ("cumulative_s", "cumulative (s)", ".3f"),
               ("own_s", "own Python (s)", ".3f")]
    sections = [f"## {r['method']}: one step under cProfile, {r['profiled_step_s']:.2f} s\n\n"
                + markdown_table(r["components"], columns) for r in rows if r.get("components")]
    return "# Time per component (cProfile, one step)\n\n" + "\n".join(sections)


CALLS_COLUMNS = [("method", "method", ""), ("aten_calls", "ATen calls", "d"), ("sync_calls", "sync-forcing", "d"),
                 ("device_calls", "device-path calls", "d"), ("device_syncs", "device-path syncs", "d"),
                 ("host_store_calls", "host-store calls", "d"), ("sampled_linears", "sampled linears", "d"),
                 ("baseline", "against", ""),
                 ("extra_device_calls_per_linear", "extra device calls / sampled linear", ".1f"),
                 ("extra_device_syncs", "extra device syncs", "d"), ("error", "error", "")]


def _run_calls(args: argparse.Namespace, device: torch.device) -> int:
    rows = run_calls(_setup(args, device))
    notes = ["One training step (forward, backward, AdamW step) after two warm-up steps that fill the "
             "gradient-norm cache, counted by a TorchDispatchMode (`wtacrs.bench.dispatch.AtenCounter`). "
             "Sync-forcing: calls whose result needs a device value on the host (`.item()`, `nonzero`, "
             "`unique`, ...) and blocking copies to the host.",
             "Device path: every call except those of wtacrs code that works on host tensors only (the "
             "cache's store, the batch's host mask and ids: `wtacrs.bench.dispatch.HOST_SITES`); those cost "
             "host time but never make a GPU wait. On a CPU run every call is a CPU call: the counts say "
             "what a GPU would launch and wait for."]
    _write(args.out, "calls", f"ATen calls per step: {args.model}, batch {args.batch}, seq {args.seq}",
           _meta(args, device), rows, CALLS_COLUMNS, notes)
    return 0


def _run_batch(args: argparse.Namespace, device: torch.device) -> int:
    if args.budget_gb is not None:
        budget = args.budget_gb * GB
    elif device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory
    else:
        budget = DEFAULT_CPU_BUDGET_GB * GB
    rows = _gb(run_batch(_setup(args, device), budget, args.batch, args.multiple, args.max_batch), "peak_bytes")
    columns = [("method", "method", ""), ("max_batch", "largest batch", "d"), ("batch_vs_full", "×full", ".2f"),
               ("samples_per_s", "samples/s at it", ".1f"), ("peak_gb", "its peak (GB)", ".3f"), ("error", "error", "")]
    notes = [f"Budget {budget / GB:.2f} GB; batches searched in multiples of {args.multiple} from {args.batch} "
             f"(doubling, then where the line through the last two measured peaks meets the budget).",
             "CPU: a batch fits if the exact allocator peak of one full step is within the budget; the samples/s "
             "is that measured step's (run under the tracker). CUDA: no out-of-memory error and "
             "max_memory_allocated within the budget, after a warm-up step."]
    _write(args.out, "batch", f"Largest batch per method: {args.model}, seq {args.seq}",
           _meta(args, device, budget_bytes=budget, multiple=args.multiple), rows, columns, notes)
    plot_throughput_vs_batch(rows, args.out / "throughput_vs_batch.png")
    return 0


def _run_variance(args: argparse.Namespace, device: torch.device) -> int:
    model = build_model(args.model, args.seed, device).to(dtype=DTYPES[args.dtype])
    inputs = make_batch(model, args.batch, args.seq, args.seed, device)
    try:
        captured = capture_linear_io(model, inputs, args.layers)
    except ValueError as e:
        raise SystemExit(f"wtacrs bench variance: error: {e}") from None
    del model
    rows = run_variance(captured, args.ratios, args.draws, args.seed)
    summary = summarize(rows)
    names = {"wta-crs": "WTA-CRS", "crs": "CRS"}
    columns = [("ratio", "ratio", ".1f"), *((e, names.get(e, e), ".3g") for e in UNBIASED),
               ("topk", "top-k bias²", ".3g"),
               ("wta_le_crs", "layers var WTA ≤ CRS (measured)", "d"),
               ("exact_wta_le_crs", "layers var WTA ≤ CRS (closed form)", "d"),
               ("exact_wta_over_crs_max", "max var WTA / var CRS (closed form)", ".3f"),
               ("wta_cached", "WTA-CRS var, cached ‖dY‖", ".3g"), ("wta_first_visit", "WTA-CRS var, first visit", ".3g"),
               ("layers", "layers", "d")]
    notes = ["Median over layers of the relative MSE E‖dŴ − dW‖²/‖dW‖² (variance + bias²; top-k: bias² only); "
             "per-layer variance and bias² are in variance.json.",
             f"{args.draws} independent estimates per layer, ratio and estimator; scores use the true ‖dY_i‖.",
             "Closed form: the exact variances of CRS and WTA-CRS for the captured X and dY "
             "(`wtacrs.bench.variance.exact_variances`); the measured counts carry sampling noise.",
             "Cached vs first visit: the median closed-form relative variance of WTA-CRS over layers with the true "
             "‖dY_i‖ in the scores (a warm gradient-norm cache) and with ‖X_i‖ alone (an example's first visit, "
             "empty cache, no position prior): every example's first epoch pays the latter."]
    shapes = {name: [list(x.shape), list(dy.shape)] for name, (x, dy) in captured.items()}
    _write(args.out, "variance", f"Weight-gradient estimator error: {args.model}, batch {args.batch}, seq {args.seq}",
           _meta(args, device, draws=args.draws, ratios=args.ratios, layer_shapes=shapes), summary, columns, notes,
           per_layer=rows)
    plot_variance(summary, args.out / "variance.png")
    return 0


RUNNERS = {"memory": _run_memory, "speed": _run_speed, "calls": _run_calls, "batch": _run_batch,
           "variance": _run_variance, "merge": _run_merge}
