"""The memory, speed and batch benchmarks: one row per method, each method in a fresh model."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from wtacrs.bench.rss import peak_rss_of_step
from wtacrs.bench.training import (
    COMPILE_WARMUP,
    Trial,
    count_compiled_kernels,
    count_step_calls,
    make_trial,
    measure_step_memory,
    measure_step_time,
    memory_breakdown,
    profile_components,
    release,
)
from wtacrs.recipes import LoraSettings

# The recipes `wtacrs bench` compares unless --methods names others (see wtacrs.recipes).
DEFAULT_METHODS: tuple[str, ...] = (
    "full",
    "checkpointing",
    "lora",
    "wtacrs@0.3",
    "wtacrs@0.1",
    "lora+wtacrs@0.3",
    "lora+wtacrs@0.1",
    "wtacrs@0.3+companions",
    "lora+wtacrs@0.3+companions",
    "wtacrs@0.3+companions+recompute",
    "lora+wtacrs@0.3+companions+recompute",
    "wtacrs@0.3+companions+recompute+recompute-attention",
    "lora+wtacrs@0.3+companions+recompute+recompute-attention",
    "wtacrs@0.3+checkpointing",
    "wtacrs@0.3+companions+checkpointing",
    "crs@0.3",
    "topk@0.3",
)


@dataclass(frozen=True)
class Setup:
    """What every benchmark run shares: model size, shape, methods, device, dtype and seed."""

    size: str
    batch: int
    seq: int
    methods: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype = torch.float32
    seed: int = 0
    lora: LoraSettings = LoraSettings()  # the adapters of LoRA recipes
    compile: str | None = None  # a torch.compile backend for every method's model

    def trial(self, method: str, batch: int | None = None) -> Trial:
        return make_trial(self.size, method, batch or self.batch, self.seq, device=self.device, dtype=self.dtype,
                          seed=self.seed, lora=self.lora, compile=self.compile)


RowsCallback = Callable[[list[dict]], None]


def _per_method(setup: Setup, desc: str, measure: Callable[[Trial], dict], on_row: RowsCallback | None) -> list[dict]:
    """One row per method: {"method", **measure(trial)} on a fresh trial, or the error it raised.

    A method this installation cannot run, or one that runs out of memory, must not end the whole
    run: its error is recorded and the next method goes on. Each trial is freed before the next
    one is built. `on_row(rows so far)` is called after each method (e.g. to save partial results).
    """
    rows = []
    for method in tqdm(setup.methods, desc=desc, unit="method", file=sys.stderr):
        row: dict = {"method": method}
        try:
            row.update(measure(setup.trial(method)))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        release()
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def _memory_of(trial: Trial) -> dict:
    if trial.device.type == "cuda":
        trial.step()  # first-step allocations (cuBLAS workspaces) are not steady state
    return {**memory_breakdown(trial), **measure_step_memory(trial)}


def run_memory(setup: Setup, rss: bool, on_row: RowsCallback | None = None) -> list[dict]:
    """Per method: weights/gradients/optimizer bytes, bytes saved for backward, peak of a full
    step (see `measure_step_memory`) and, if `rss`, peak RSS of one step in a fresh process."""
    rows = _per_method(setup, "memory", _memory_of, on_row)
    for row in tqdm(rows if rss else [], desc="peak RSS", unit="method", file=sys.stderr):
        if "error" not in row:
            row.update(peak_rss_of_step(setup.size, row["method"], setup.batch, setup.seq, setup.seed))
            if on_row is not None:
                on_row(rows)
    return rows


def run_calls(setup: Setup, on_row: RowsCallback | None = None) -> list[dict]:
    """Per method: ATen calls and sync-forcing calls of one warm step (see `count_step_calls`),
    and per sampled linear the calls beyond its plain baseline's step on the device path (`lora`
    for LoRA methods, else `full`, when measured in the same run)."""
    rows = _per_method(setup, "calls", count_step_calls, on_row)
    plain = {r["method"]: r for r in rows if r["method"] in ("full", "lora") and "error" not in r}
    for row in rows:
        base = plain.get("lora" if row["method"].startswith("lora+") else "full")
        if base is not None and row.get("sampled_linears"):
            row["baseline"] = base["method"]
            row["extra_device_calls_per_linear"] = (row["device_calls"] - base["device_calls"]) / row["sampled_linears"]
            row["extra_device_syncs"] = row["device_syncs"] - base["device_syncs"]
    return rows


def run_speed(
    setup: Setup, warmup: int, steps: int, peak: bool, profile: bool = False, on_row: RowsCallback | None = None,
    interleave: bool = False,
) -> list[dict]:
    """Per method: median step seconds after warm-up and samples/s; with `peak`, one more
    (tracked) step's peak memory, for the memory/time plane; with `profile`, one more step
    under cProfile, per library function (see `profile_components`).

    With `interleave`, every method's model is built first and the timed steps go round-robin
    (one step of each method per round), so a machine whose speed drifts during the run slows
    every method alike; costs every method's weights and optimizer state held at once.

    With `setup.compile`, at least `COMPILE_WARMUP` warm-up steps run (the compiles), and each row
    adds the kernels one compiled step runs (see `count_compiled_kernels`)."""
    warmup = speed_warmup(setup, warmup)

    def extras(trial: Trial) -> dict:
        row = {"peak_bytes": measure_step_memory(trial)["peak_bytes"]} if peak else {}
        if trial.compiled is not None:
            row.update(count_compiled_kernels(trial))
        return {**row, **(profile_components(trial) if profile else {})}

    if interleave:
        return _interleaved_speed(setup, warmup, steps, extras, on_row)
    return _per_method(setup, "speed",
                       lambda trial: {**measure_step_time(trial, warmup, steps), **extras(trial)}, on_row)


def speed_warmup(setup: Setup, warmup: int) -> int:
    """The warm-up steps `run_speed` takes: at least `COMPILE_WARMUP` for compiled models."""
    return warmup if setup.compile is None else max(warmup, COMPILE_WARMUP)


def _interleaved_speed(setup: Setup, warmup: int, steps: int, extras: Callable[[Trial], dict],
                       on_row: RowsCallback | None) -> list[dict]:
    """Round-robin timing; a method that fails (e.g. out of memory) keeps its error and leaves
    the rounds, the others go on. Rows are reported after every round."""
    rows, trials = {method: {"method": method} for method in setup.methods}, {}

    def drop(method: str, error: Exception) -> None:
        rows[method].update(error=f"{type(error).__name__}: {error}")  # times so far stay
        trials.pop(method, None)
        release()

    def attempt(method: str, action: Callable[[Trial], object]) -> object:
        try:
            return action(trials[method])
        except Exception as e:
            drop(method, e)

    for method in rows:
        try:
            trials[method] = setup.trial(method)
        except Exception as e:
            drop(method, e)
            continue
        for _ in range(warmup):
            if method in trials:
                attempt(method, lambda trial: trial.step())
    for _ in tqdm(range(steps), desc="speed rounds", unit="round", file=sys.stderr):
        for method in list(trials):
            seconds = attempt(method, lambda trial: measure_step_time(trial, 0, 1)["step_s"])
            if method in trials:
                times = rows[method].setdefault("step_times_s", [])
                times.append(seconds)
                median = statistics.median(times)
                rows[method].update(step_s=median, samples_per_s=setup.batch / median)
        if on_row is not None:
            on_row(list(rows.values()))
    for method in list(trials):
        rows[method].update(attempt(method, extras) or {})
    trials.clear()
    release()
    if on_row is not None:
        on_row(list(rows.values()))
    return list(rows.values())


def add_ratio_to_full(rows: list[dict], key: str, name: str, inverse: bool = False) -> None:
    """rows[i][name] = value / full's value (or full's / value with `inverse`), where both exist."""
    full = next((r.get(key) for r in rows if r["method"] == "full"), None)
    for row in rows:
        if full and row.get(key):
            row[name] = full / row[key] if inverse else row[key] / full


def largest_fitting_batch(
    probe: Callable[[int], float | None], budget: float, start: int = 8, multiple: int = 8, max_batch: int = 4096
) -> int:
    """Largest multiple of `multiple` (<= max_batch) whose probe fits `budget`, or 0 if none does.

    `probe(batch)` returns the measured peak bytes, or None when the step ran out of memory.
    Fits are assumed monotone in the batch. Starting at `start`, the batch doubles until a probe
    fails; after two fits, the next probe is where the line through the last two measured
    peaks meets the budget (peaks grow about linearly with the batch), kept strictly inside the
    bracket, so typically four or five probes settle it, each one a real measurement.
    """
    fits: dict[int, float] = {}
    lo, hi, batch = 0, max_batch + multiple, _round(start, multiple)
    while hi - lo > multiple:
        peak = probe(batch)
        if peak is not None and peak <= budget:
            fits[batch], lo = peak, batch
        else:
            hi = batch
        batch = _next_batch(fits, budget, lo, hi, multiple, max_batch)
    return lo


def _next_batch(fits: dict[int, float], budget: float, lo: int, hi: int, multiple: int, max_batch: int) -> int:
    (b1, p1), (b2, p2) = sorted(fits.items())[-2:] if len(fits) >= 2 else ((0, 0.0), (0, 0.0))
    if len(fits) >= 2 and p2 > p1:
        guess = _round(b2 + (budget - p2) * (b2 - b1) / (p2 - p1), multiple, down=True)
    elif hi > max_batch:
        guess = 2 * lo
    else:
        guess = _round((lo + hi) / 2, multiple, down=True)
    return min(max(guess, lo + multiple), hi - multiple, max_batch)


def _round(value: float, multiple: int, down: bool = False) -> int:
    rounded = math.floor(value / multiple) if down else round(value / multiple)
    return max(1, rounded) * multiple


def run_batch(setup: Setup, budget_bytes: float, start: int, multiple: int, max_batch: int) -> list[dict]:
    """Per method: the largest batch whose step fits the budget, the probes made, and the
    throughput at that batch (samples/s of its measured step).

    CPU: a probe fits if its exact allocator peak is within the budget. CUDA: if the step
    (after a warm-up step) raises no out-of-memory error and its max_memory_allocated is within
    the budget.
    """
    rows = []
    for method in tqdm(setup.methods, desc="batch", unit="method", file=sys.stderr):
        row: dict = {"method": method, "budget_bytes": budget_bytes, "probes": []}
        try:
            best = largest_fitting_batch(lambda b: _probe(setup, method, b, row["probes"]),
                                         budget_bytes, start, multiple, max_batch)
        except Exception as e:  # a method this installation cannot run
            row["error"] = f"{type(e).__name__}: {e}"
            release()
        else:
            at_best = next((p for p in row["probes"] if p["batch"] == best), {})
            row.update(max_batch=best, samples_per_s=at_best.get("samples_per_s"), peak_bytes=at_best.get("peak_bytes"))
        rows.append(row)
    add_ratio_to_full(rows, "max_batch", "batch_vs_full")
    return rows


def _probe(setup: Setup, method: str, batch: int, probes: list[dict]) -> float | None:
    record: dict = {"batch": batch}
    try:
        trial = setup.trial(method, batch)
        if setup.device.type == "cuda":
            trial.step()
        record.update(measure_step_memory(trial))
        record["samples_per_s"] = batch / record["tracked_step_s"]
    except torch.OutOfMemoryError:
        record["peak_bytes"] = None
    trial = None
    release()
    probes.append(record)
    return record["peak_bytes"]
