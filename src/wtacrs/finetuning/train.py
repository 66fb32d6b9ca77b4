"""One fine-tuning run with the Transformers Trainer, from its folder claimed to its results
written (`train_one`).

What training produced is on disk before anything summarises it: the checkpoints (the best and
the last, with the Trainer's log of evaluations, the gradient-norm cache included) and
<run>/training.json (step time, peak memory). If the results then fail, `--resume` finishes
them without training again.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from wtacrs.atomic import write_json_atomic
from wtacrs.finetuning.guards import NonFiniteError, non_finite_guard
from wtacrs.finetuning.models import load_model, model_config, model_kind
from wtacrs.finetuning.results import RESULTS_FILE, failed_record, finished_record
from wtacrs.finetuning.run_folder import (
    KEEP,
    LR_SCALES_FILE,
    RESUME,
    TRAINING_FILE,
    RunFolder,
    RunFolderError,
    read_json_record,
)
from wtacrs.finetuning.spec import PER_LAYER, RunSpec
from wtacrs.integrations.distributed import is_rank_zero, on_rank_zero
from wtacrs.memory import process_peak_rss

_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


def train_one(run: RunSpec) -> dict | None:
    """Train, evaluate and write results.json for one run; returns the results, or a finished
    run's recorded ones when --resume leaves it as it is (None for a failed one). Everything
    that can be checked is checked before the run's folder is claimed."""
    from transformers import set_seed

    from wtacrs.tasks import fixed_subset, load_task

    start = time.perf_counter()
    if plan_folder(run) == KEEP:
        return kept(run)
    s, task = run.settings, run.task
    set_seed(run.seed)
    data = load_task(s.task, s.data_dir)
    tokenizer, model = load_model(s.model, task)
    model = run.recipe.prepare(model, seed=run.seed, task_type=task.peft_task_type, lora=s.lora,
                               sampling=run.sampling)
    train_raw = fixed_subset(data["train"], s.max_train_samples)
    evals_raw = {split: fixed_subset(data[split], s.max_eval_samples) for split in task.eval_splits}
    train_set, eval_sets, compute_metrics = task.datasets(train_raw, evals_raw, tokenizer, s)
    training_args = training_arguments(run, len(train_set), first_split=next(iter(eval_sets)))  # checks them too
    folder, action = claim_folder(run)
    if action == KEEP:
        return kept(run)
    with folder, _failure_recorded(run, folder):
        timer = step_timer()
        trainer = build_trainer(run, training_args, model, tokenizer, train_set, eval_sets, compute_metrics, timer)
        checkpoint = on_rank_zero(lambda: last_checkpoint(folder.path)) if action == RESUME else None
        measured_lr = sampled_lr_scales(trainer, run, checkpoint) if run.measures_lr else None
        if measured_lr is not None:
            apply_measured_lr(trainer, run, measured_lr)
        trainer.train(resume_from_checkpoint=checkpoint)
        training = training_record(folder.path, trainer, timer, start, resumed=checkpoint is not None)
        finishing = time.perf_counter()
        try:
            results = collect_results(run, trainer, training, {k: len(v) for k, v in evals_raw.items()}, measured_lr)
            if results["wall_seconds"] is not None:
                results["wall_seconds"] += time.perf_counter() - finishing
            if trainer.is_world_process_zero():  # under torchrun every rank gets here; one writes
                write_json_atomic(folder.path / RESULTS_FILE, results)
                print(f"wtacrs finetune: wrote {folder.path / RESULTS_FILE}")
        except Exception:
            print(f"wtacrs finetune: error: the training of {folder.path} is complete and saved (checkpoints and "
                  f"{TRAINING_FILE}) but writing its results failed (below); run the same command with --resume "
                  "to finish them without training again", file=sys.stderr)
            raise
    return results


# -- the run folder ----------------------------------------------------------------------------
def plan_folder(run: RunSpec) -> str:
    """START, RESUME or KEEP for this run's folder (see wtacrs.finetuning.run_folder), decided on
    rank 0; raises RunFolderError (on every rank) where this command may not use it. Writes nothing."""
    folder, s = RunFolder(run.folder), run.settings

    def decide() -> str:
        action = folder.plan(run.recorded_settings(), resume=s.resume, overwrite=s.overwrite, force=s.force)
        if action == RESUME and run.measures_lr and not s.force and last_checkpoint(folder.path) is not None:
            read_lr_scales(folder.path)  # the rates the run trained at must be known before it goes on
        return action

    return _from_rank_zero(decide)


def claim_folder(run: RunSpec) -> tuple[RunFolder, str]:
    """The run's folder, locked and prepared by rank 0 alone (the other ranks wait, and hold no
    lock), with what to do there: START (emptied by --overwrite), RESUME or KEEP."""
    folder, s = RunFolder(run.folder), run.settings
    action = _from_rank_zero(lambda: folder.claim(run.recorded_settings(), resume=s.resume, overwrite=s.overwrite,
                                                  force=s.force))
    return folder, action


def _from_rank_zero(decide):
    """decide() on rank 0; its RunFolderError is raised on every rank with the same message."""
    def outcome():
        try:
            return True, decide()
        except RunFolderError as e:
            return False, str(e)

    ok, value = on_rank_zero(outcome)
    if not ok:
        raise RunFolderError(value)
    return value


def kept(run: RunSpec) -> dict | None:
    """The recorded results of a run --resume leaves as it is (None for a failed one)."""
    record = RunFolder(run.folder).results()
    if is_rank_zero():
        print(f"wtacrs finetune: {run.folder} holds a {record.get('status', 'finished')} run: left as it is "
              "(--overwrite runs it again)")
    return finished_results(record)


def finished_results(record: dict) -> dict | None:
    """`record`, or None for the record of a failed run."""
    return None if record.get("status") == "failed" else record


def last_checkpoint(out: Path) -> str | None:
    from wtacrs.integrations.checkpoints import last_complete_checkpoint

    return last_complete_checkpoint(out)  # skips a checkpoint a killed run left half-written


@contextmanager
def _failure_recorded(run: RunSpec, folder: RunFolder) -> Iterator[None]:
    """A run that diverges is recorded as failed in its results.json; one that fails before
    writing anything worth keeping (a checkpoint, logs) leaves no folder behind."""
    try:
        yield
    except NonFiniteError as e:
        if is_rank_zero():
            write_json_atomic(folder.path / RESULTS_FILE, failed_record(run, e))
        raise
    except BaseException:
        if is_rank_zero():
            folder.discard_if_unused()
        raise


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


def training_arguments(run: RunSpec, train_examples: int, first_split: str):
    """The run's TrainingArguments (evaluating and checkpointing every epoch into its folder,
    best model by `first_split`'s score); built before the folder is claimed, so a setting they
    refuse stops the run before --overwrite deletes anything. Creates nothing."""
    import torch
    from transformers import TrainingArguments

    s = run.settings
    steps_per_epoch = math.ceil(train_examples / s.batch_size)
    return TrainingArguments(
        output_dir=str(run.folder), num_train_epochs=s.epochs, learning_rate=run.learning_rate,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=2 * s.batch_size,
        warmup_steps=s.warmup_ratio, weight_decay=s.weight_decay, lr_scheduler_type="linear",
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model=f"{first_split}_score", greater_is_better=True,
        logging_steps=max(1, steps_per_epoch // 10), report_to=["tensorboard"], seed=run.seed, data_seed=run.seed,
        bf16=s.bf16, fp16=s.fp16, disable_tqdm=s.no_progress, use_cpu=not torch.cuda.is_available(),
        torch_compile=s.compile is not None, torch_compile_backend=s.compile, dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a NaN loss must reach the log, where non_finite_guard sees it
    )


def build_trainer(run: RunSpec, training_args, model, tokenizer, train_set, eval_sets, compute_metrics, timer):
    """A Trainer (WTACRSTrainer for recipes that use wtacrs) with `training_arguments`."""
    from transformers import Trainer

    from wtacrs.integrations import WTACRSTrainer, add_example_ids

    s, task = run.settings, run.task
    trainer_class = WTACRSTrainer if run.recipe.uses_wtacrs else Trainer
    return trainer_class(
        model=model, args=training_args, train_dataset=add_example_ids(train_set), eval_dataset=eval_sets,
        processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=[timer, non_finite_guard()],
        data_collator=task.collator(tokenizer, s), preprocess_logits_for_metrics=task.logits_for_metrics,
    )


def training_record(out: Path, trainer, timer, start: float, resumed: bool = False) -> dict:
    """What only the process that trained knows, written to <run>/training.json as soon as
    training ends: step time and count, wall time, peak memory and the Trainer's log (losses,
    evaluations). A --resume of a run whose training was complete runs no step: its record is
    the one on disk, and the run's results are finished from it. A run `resumed` from a
    checkpoint without that record measured only its last part: its wall time and peak memory
    are None and "not_measured" says why (step time covers the steps it ran)."""
    path = out / TRAINING_FILE
    if timer.steps == 0 and path.is_file():
        print(f"wtacrs finetune: {out}: training was complete; finishing its results from {TRAINING_FILE}")
        return read_json_record(path, "pass --overwrite to train the run again")
    peak_bytes, peak_kind = peak_memory()
    record = {
        "step_seconds": timer.seconds, "steps_timed": timer.steps, "global_step": trainer.state.global_step,
        "wall_seconds": time.perf_counter() - start, "peak_memory_bytes": peak_bytes, "peak_memory_kind": peak_kind,
        "log_history": trainer.state.log_history,
    }
    if resumed:
        record |= {"wall_seconds": None, "peak_memory_bytes": None,
                   "not_measured": ["wall_seconds", "peak_memory_bytes"],
                   "resumed_at_step": trainer.state.global_step - timer.steps}
    if trainer.is_world_process_zero():
        write_json_atomic(path, record)
    return record


def peak_memory() -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated since the run's start, else the process's peak RSS
    since its start (VmHWM: each run is its own process unless --in-process)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    return process_peak_rss(), "cpu_peak_rss"


# -- results -----------------------------------------------------------------------------------
def collect_results(run: RunSpec, trainer, training: dict, eval_examples: dict[str, int],
                    measured_lr: dict | None = None) -> dict:
    """The results record of a finished run; `training` is its `training_record`, `measured_lr`
    its `sampled_lr_scales` (None: the run measured none)."""
    from wtacrs.modeling import companion_effects

    best_epoch, metrics, history = best_epoch_metrics(trainer, eval_examples)
    num_train = len(trainer.train_dataset)
    epochs_timed = training["steps_timed"] / math.ceil(num_train / run.settings.batch_size)
    seconds = training["step_seconds"]
    config = model_config(trainer.model)
    saved, live_peak = probe_step_memory(trainer)  # a training step: companions show whether they act
    effects = companion_effects(trainer.model) if run.recipe.uses_wtacrs else {}
    return finished_record(
        run, trainer=trainer, training=training,
        scores={"metrics": metrics, "score": metrics[next(iter(eval_examples))]["score"], "best_epoch": best_epoch,
                "history": history, "eval_examples": eval_examples},
        measured={"saved_activation_bytes": saved, "live_peak_bytes": live_peak, "train_examples": num_train,
                  "train_samples_per_second": epochs_timed * num_train / seconds if seconds else None,
                  "model_family": config.model_type, "model_kind": model_kind(config),
                  "companion_effects": {option: effect.status for option, effect in effects.items()},
                  "sampled_lr_scales": _spread(measured_lr["scales"]) if measured_lr else None,
                  "sampled_lr_factor": measured_lr["factor"] if measured_lr else None,
                  # wall seconds of the measurement before training (None where a resumed run read it back)
                  "sampled_lr_seconds": measured_lr.get("seconds") if measured_lr else None},
    )


def _spread(scales: dict[str, float]) -> dict[str, float]:
    """Median, least and largest of the measured learning-rate scales (all in <run>/lr_scales.json)."""
    values = sorted(scales.values())
    return {"median": statistics.median(values), "min": values[0], "max": values[-1], "layers": len(values)}


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


def sampled_lr_scales(trainer, run: RunSpec, checkpoint: str | None) -> dict:
    """{"first_visit_variance", "scales", "factor", "seconds"} (`wtacrs.learning_rate`: per sampled
    layer v and √(1 + v), and √(1 + median v); the measurement's wall seconds), measured on the
    probe batch before training and written
    to <run>/lr_scales.json; a run resumed from `checkpoint` reads them back, so it trains at the
    rates it started with (with --force, a missing or unreadable file is measured again)."""
    import torch

    from wtacrs.learning_rate import first_visit_variances, global_scale, lr_scales

    path = run.folder / LR_SCALES_FILE
    if checkpoint is not None:
        try:
            return read_lr_scales(run.folder)
        except RunFolderError as e:
            if not run.settings.force:
                raise
            print(f"wtacrs finetune: {e.args[0].split(';')[0]}; --force: measuring them again on {checkpoint}",
                  file=sys.stderr)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        inputs, _, _ = probe_inputs(trainer)
        with tqdm(desc="measuring the sampled layers' gradient noise", unit="pass", file=sys.stderr,
                  disable=trainer.args.disable_tqdm) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            variances = first_visit_variances(trainer.model, inputs, progress=progress)
    measured = {"first_visit_variance": variances, "scales": lr_scales(variances), "factor": global_scale(variances),
                "seconds": time.perf_counter() - start}
    if trainer.is_world_process_zero():
        write_json_atomic(path, measured)
    return measured


def read_lr_scales(folder: Path) -> dict:
    """<folder>/lr_scales.json (`sampled_lr_scales`); RunFolderError naming it when it is
    missing, unreadable or not such a record."""
    path = folder / LR_SCALES_FILE
    remedy = "pass --force to measure the rates again on the resumed model, or --overwrite to start the run again"
    record = read_json_record(path, remedy)
    if record is None:
        raise RunFolderError(f"--resume: {path} is missing, so the learning rates the run trained at are unknown; "
                             f"{remedy}")
    scales, factor = record.get("scales"), record.get("factor")
    numbers = [factor, *(scales.values() if isinstance(scales, dict) else [None])]
    if not scales or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                             for v in numbers):
        raise RunFolderError(f"{path} is not a record of measured learning-rate scales (positive numbers under "
                             f"'scales' and 'factor'); {remedy}")
    return record


def apply_measured_lr(trainer, run: RunSpec, measured: dict) -> None:
    """Every parameter at the base rate times the measured factor (--sampled-lr measured), or
    each sampled layer at its own scale (measured-per-layer); before the optimizer exists."""
    if run.settings.sampled_lr == PER_LAYER:
        trainer.lr_scales = measured["scales"]
    else:
        trainer.args.learning_rate = run.learning_rate * measured["factor"]


def probe_inputs(trainer) -> tuple[dict, object, object]:
    """(inputs, example ids, host mask) of the probe batch: the first batch-size training examples
    in dataset order, collated by the evaluation loader (in order, the Trainer's collator and
    column filter), the same for every recipe and seed, so runs compare."""
    from wtacrs.integrations.trainer import EXAMPLE_ID_COLUMN, HOST_ANCHORS_KEY, HOST_MASK_KEY, HOST_TOKEN_TYPES_KEY

    data = trainer.train_dataset
    probe = data.select(range(min(trainer.args.per_device_train_batch_size, len(data))))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_test_dataloader(probe))))
    for key in (HOST_ANCHORS_KEY, HOST_TOKEN_TYPES_KEY):  # first-visit keys: no use to a probe
        inputs.pop(key, None)
    return inputs, inputs.pop(EXAMPLE_ID_COLUMN, None), inputs.pop(HOST_MASK_KEY, None)


def probe_step_memory(trainer) -> tuple[int, int]:
    """(bytes saved for backward, live peak) of one training forward and backward on the probe
    batch (`probe_inputs`).

    Saved bytes exclude parameters and buffers (`wtacrs.memory.SavedTensorBytes`). The live peak
    (`wtacrs.memory.AllocatorPeak`, the CPU allocator's bytes) counts weights, optimizer state and
    the batch from the start, then everything the step allocates: activations, recomputation,
    gradients and kernel temporaries, what an accelerator would have to hold (the process's RSS
    adds the Python runtime and allocator caches to it); on CUDA, `torch.cuda.max_memory_allocated`.
    Runs on a forked RNG and drops the gradients, so training state is unchanged."""
    import torch

    import wtacrs
    from wtacrs.memory import SavedTensorBytes, optimizer_state_tensors, parameter_tensors, step_peak

    model = trainer.model
    model.train()
    optimizer_state = optimizer_state_tensors(trainer.optimizer) if trainer.optimizer is not None else []
    with torch.random.fork_rng(devices=[]):
        inputs, ids, host_mask = probe_inputs(trainer)
        baseline = [*parameter_tensors(model), *optimizer_state,
                    *(v for v in inputs.values() if isinstance(v, torch.Tensor))]
        model.zero_grad(set_to_none=True)
        host_mask = None if host_mask is None else torch.from_numpy(host_mask)
        sampling = wtacrs.batch(ids, host_mask) if ids is not None else nullcontext()
        with step_peak(next(model.parameters()).device, baseline) as live:
            with sampling:
                with SavedTensorBytes(exclude=parameter_tensors(model)) as saved:
                    with trainer.autocast_smart_context_manager():
                        loss = trainer.compute_loss(model, inputs)
                loss.backward()
        model.zero_grad(set_to_none=True)
    return saved.total, live.peak
