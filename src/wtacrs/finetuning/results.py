"""The results record of a `wtacrs finetune` run: built here when a run ends, written to
<run>/results.json, and read back by `wtacrs report` through `load_result` (one format, one
reader). A run that diverged has a record too, with "status": "failed" and no score."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from wtacrs.finetuning.models import model_name
from wtacrs.finetuning.run_folder import RESULTS_FILE, TRAINING_FILE
from wtacrs.finetuning.spec import RunSpec

REQUIRED = ("task", "model", "method", "ratio", "seed", "score", "peak_memory_bytes", "saved_activation_bytes",
            "train_samples_per_second")
PERCENT_ALREADY = ("squad", "squad_v2")
HYPERPARAMETERS = ("epochs", "batch_size", "max_length", "warmup_ratio", "weight_decay", "lora_r", "lora_alpha",
                   "lora_dropout", "max_train_samples", "max_eval_samples", "bf16", "fp16", "compile")

__all__ = ["RESULTS_FILE", "TRAINING_FILE", "failed_record", "failure", "finished_record", "load_result",
           "method_label", "score_percent"]


def run_identity(run: RunSpec) -> dict:
    """The fields naming a run in its results record, finished or failed. "method" is the
    recipe's canonical spec."""
    s, recipe = run.settings, run.recipe
    return {
        "task": s.task, "model": s.model, "model_name": model_name(s.model), "method": recipe.spec,
        "ratio": recipe.ratio, "estimator": recipe.estimator, "draws_in_backward": recipe.draws_in_backward,
        "variants": run.variants, "seed": run.seed,
    }


def finished_record(run: RunSpec, *, scores: dict, training: dict, measured: dict, trainer) -> dict:
    """The record of a finished run.

    Args:
        scores: {"metrics", "score", "best_epoch", "history", "eval_examples"} of the evaluations.
        training: the run's training.json record (step time, wall time, peak memory; a resumed
            run's "not_measured" and "resumed_at_step").
        measured: {"saved_activation_bytes", "live_peak_bytes", "train_examples",
            "train_samples_per_second", "model_family", "model_kind", "companion_effects",
            "sampled_lr_scales", "sampled_lr_factor", "sampled_lr_seconds"}.
    """
    s = run.settings
    return {
        **run_identity(run), "status": "finished", **scores, "score_name": run.task.score_name, **measured,
        "peak_memory_bytes": training["peak_memory_bytes"], "peak_memory_kind": training["peak_memory_kind"],
        "step_seconds": training["step_seconds"] / training["steps_timed"] if training["steps_timed"] else None,
        "wall_seconds": training["wall_seconds"],  # None, like peak memory, where a resume could not measure it
        **{k: training[k] for k in ("not_measured", "resumed_at_step") if k in training},
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "hyperparameters": {k: getattr(s, k) for k in HYPERPARAMETERS} | {"lr": run.learning_rate}
        | ({"sampled_lr": s.sampled_lr} if run.recipe.samples else {}),
        "device": "cuda" if training["peak_memory_kind"].startswith("cuda") else "cpu", "versions": versions(),
        "world_size": trainer.args.world_size,  # data-parallel ranks; peak memory is rank 0's
    }


def failed_record(run: RunSpec, error) -> dict:
    """The record of a run that diverged (a NonFiniteError): "status": "failed", no score."""
    return {**run_identity(run), "status": "failed", "error": str(error), "failed_step": error.step,
            "settings": run.recorded_settings(), "versions": versions()}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("wtacrs", "torch", "transformers", "peft", "datasets", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def load_result(path: Path) -> dict:
    """One results record; raises ValueError naming the file for bad JSON, missing fields or a
    field of the wrong type (a failed run's record needs none: see `failure`; a score that is no
    number is `failure`'s to report)."""
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a wtacrs finetune results file (its JSON is nested too deeply)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    if isinstance(record, dict) and record.get("status") == "failed":
        return record
    missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"{path}: not a wtacrs finetune results file (missing {', '.join(missing)})")
    for name, (kind, check) in _FIELD_TYPES.items():
        if name in record and not check(record[name]):
            raise ValueError(f"{path}: field {name!r} must be {kind}, got {record[name]!r:.80}")
    return record


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional(check):
    return lambda value: value is None or check(value)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# What `wtacrs report` reads besides the score, with the type a record written here has.
_FIELD_TYPES = {
    "task": ("a string", lambda v: isinstance(v, str)),
    "model": ("a string", lambda v: isinstance(v, str)),
    "model_name": ("a string or null", _optional(lambda v: isinstance(v, str))),
    "method": ("a string", lambda v: isinstance(v, str)),
    "ratio": ("a number in (0, 1] or null", _optional(lambda v: _number(v) and 0 < v <= 1)),
    "seed": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "peak_memory_bytes": ("a number or null", _optional(_number)),
    "live_peak_bytes": ("a number or null", _optional(_number)),
    "saved_activation_bytes": ("a number", _number),
    "train_samples_per_second": ("a number or null", _optional(_number)),
    "model_kind": ("a string", lambda v: isinstance(v, str)),
    "variants": ("a list of strings", _strings),
    "companions": ("a list of strings", _strings),
    "hyperparameters": ("an object", lambda v: isinstance(v, dict)),
    "companion_effects": ("an object of strings", lambda v: isinstance(v, dict)
                          and all(isinstance(s, str) for s in v.values())),
}


def failure(record: dict) -> str | None:
    """Why a record holds no result to report (its run failed, or its score is not a finite
    number), or None."""
    if record.get("status") == "failed":
        return record.get("error", "failed")
    score = record["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return f"its score is {score!r}"
    return None


def score_percent(record: dict) -> float:
    """The score in percent (GLUE and tweet metrics are fractions; SQuAD's F1 is a percent)."""
    return record["score"] if record["task"] in PERCENT_ALREADY else 100.0 * record["score"]


def method_label(record: dict) -> str:
    """The run's recipe and variants: "wtacrs@0.3+companions+pad-max". Records written before
    recipes (method "wtacrs", a separate ratio and "companions" list) read the same way."""
    method = record["method"]
    if record.get("ratio") is not None and "@" not in method:
        method += f"@{record['ratio']:g}"
    return "+".join([method, *record.get("companions", []), *record.get("variants", [])])
