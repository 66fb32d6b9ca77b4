"""wtacrs: memory-efficient fine-tuning with Winner-Take-All Column-Row Sampling.

Liu et al., "Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of Language
Model", NeurIPS 2023, arXiv:2305.15265.

    import wtacrs
    model = wtacrs.apply(model, wtacrs.WTACRSConfig(ratio=0.3))
    with wtacrs.batch(example_ids):
        model(**inputs).loss.backward()
"""

import importlib.metadata as _metadata

from wtacrs.batching import batch
from wtacrs.config import WTACRSConfig, WTACRSConfigError
from wtacrs.modeling import NoMatchingModulesError, apply, remove, sampling_state, summary
from wtacrs.sampling import PaddingGradientError

try:
    __version__ = _metadata.version("wtacrs")  # pyproject.toml's, the one place it is written
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
__all__ = [
    "WTACRSConfig",
    "WTACRSConfigError",
    "NoMatchingModulesError",
    "PaddingGradientError",
    "apply",
    "remove",
    "summary",
    "batch",
    "sampling_state",
    "plan",
]


def __getattr__(name: str):
    if name == "plan":  # imported on first use: planning loads transformers and the bench
        from wtacrs.planning.plan import plan

        return plan
    raise AttributeError(f"module 'wtacrs' has no attribute {name!r}")
