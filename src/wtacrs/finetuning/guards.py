"""Checks that keep `wtacrs finetune` runs safe: non-finite training caught at the step it
happens, signals passed on to a run's child process (which dies with its parent), an output
folder and model checked before any work starts, and a failed write told apart from a bug."""

from __future__ import annotations

import errno
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ModelError(ValueError):
    """--model cannot be loaded, or its weights hold NaN or infinities; the message names it."""


class NonFiniteError(RuntimeError):
    """Training diverged: a loss or a parameter became NaN or infinite at `step`."""

    def __init__(self, step: int, what: str):
        super().__init__(f"training diverged at step {step}: {what}")
        self.step = step


def non_finite_guard():
    """A Trainer callback raising NonFiniteError when a logged loss (training, at logging steps;
    evaluation, per epoch) is not finite, and before each checkpoint is written when a parameter
    is not. It reads only values the Trainer already computes, plus one pass over the parameters
    per checkpoint, so it stays on. (Set TrainingArguments.logging_nan_inf_filter=False, or the
    Trainer logs a NaN loss as the mean of the finite ones.)"""
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            _check_logs(state.global_step, logs or {})

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            _check_logs(state.global_step, metrics or {})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and model is not None:
                _check_parameters(state.global_step, model)

        on_epoch_end = on_step_end  # the Trainer decides an epoch's checkpoint there

    return NonFiniteGuard()


def _check_logs(step: int, logs: dict) -> None:
    for key, value in logs.items():
        if key.endswith("loss") and isinstance(value, (int, float)) and not math.isfinite(value):
            raise NonFiniteError(step, f"{key} is {value}")


def _check_parameters(step: int, model) -> None:
    name = first_non_finite_parameter(model)
    if name is not None:
        raise NonFiniteError(step, f"parameter {name} holds NaN or infinite values (no checkpoint written)")


def first_non_finite_parameter(model) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None."""
    import torch

    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        return None
    return next(n for n, p in params if not torch.isfinite(p).all())


@contextmanager
def forward_signals(pid: int) -> Iterator[list[int]]:
    """Pass SIGINT, SIGTERM and SIGHUP received by this process on to process `pid` instead of
    acting on them, for the duration of the block; yields the list of signals received."""
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def die_with_parent(parent: int) -> None:
    """End this process with SIGTERM when process `parent` (the one that started it) dies, however
    it dies: the kernel's PR_SET_PDEATHSIG on Linux, else a thread watching the parent's pid. When
    the parent is already gone, now."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
    if os.getppid() != parent:  # it died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


def check_output_dir(path: str | os.PathLike, option: str = "--output-dir") -> None:
    """Raise ValueError naming `option` unless `path` is a folder, or can become one, that this
    user may write."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise ValueError(f"{option} {path} is not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {existing} is not writable")


# What torch.save and safetensors say when a write fails (they raise no OSError): ENOSPC, or
# EFBIG under `ulimit -f`, surfaces as a short write.
_WRITE_FAILURE_MARKERS = ("PytorchStreamWriter failed", "unexpected pos", "file write failed",
                          "Error while serializing")


def write_failure(error: BaseException, folder: Path) -> str | None:
    """Why writing under `folder` failed ("the disk is full (...)"), when `error` is a failed
    write: no space, a disk quota, a file-size limit, or torch's or safetensors' report of a short
    write; else None."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({error.strerror}: {error.filename or folder})"
    if isinstance(error, OSError) and error.errno == errno.EFBIG:
        return f"a file reached the file size limit (ulimit -f) ({error.strerror}: {error.filename or folder})"
    text = str(error)
    if not isinstance(error, OSError) and any(marker in text for marker in _WRITE_FAILURE_MARKERS):
        first = text.strip().splitlines()[0] if text.strip() else ""
        return (f"writing under {folder} failed ({type(error).__name__}: {first}): the disk is full or a file "
                "reached the file size limit (ulimit -f)")
    return None
