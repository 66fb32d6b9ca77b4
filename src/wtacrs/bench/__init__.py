"""Benchmarks of memory-efficient fine-tuning: peak memory, step time, largest batch, gradient variance.

Used by `wtacrs bench`; also importable, e.g.

    from wtacrs.bench import Setup, run_memory
    rows = run_memory(Setup("bert-tiny", batch=4, seq=16, methods=("full", "lora"),
                            device=torch.device("cpu")), rss=False)
"""

from wtacrs.bench.models import MODEL_SIZES, build_model, make_batch
from wtacrs.bench.suite import DEFAULT_METHODS, Setup, largest_fitting_batch, run_batch, run_memory, run_speed
from wtacrs.bench.training import Trial, make_trial, measure_step_memory, measure_step_time
from wtacrs.bench.variance import capture_linear_io, run_variance

__all__ = [
    "DEFAULT_METHODS", "MODEL_SIZES", "Setup", "Trial", "build_model", "capture_linear_io",
    "largest_fitting_batch", "make_batch", "make_trial", "measure_step_memory", "measure_step_time",
    "run_batch", "run_memory", "run_speed", "run_variance",
]
