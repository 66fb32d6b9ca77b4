"""Monte Carlo helpers: tolerances come from the measured spread, not from magic numbers."""

from __future__ import annotations

from torch import Tensor

# |mean − truth| <= Z · standard error. With a few hundred entries per test, a per-entry false
# alarm rate of P(|N(0,1)| > 5.5) ≈ 4e-8 keeps the whole suite's false-alarm rate negligible,
# while a real bias of a few standard errors (see the top-k tests) is still caught.
Z = 5.5


def mc_mean_and_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """samples (S, …) → mean (…) and standard error of the mean (…)."""
    s = samples.double()
    return s.mean(0), s.std(0) / s.shape[0] ** 0.5


def unbiased_violations(samples: Tensor, truth: Tensor, z: float = Z) -> Tensor:
    """Boolean mask of entries whose Monte Carlo mean misses `truth` by more than z standard errors.

    Entries with zero spread must match to rounding (1e-9 relative to the overall scale).
    """
    mean, stderr = mc_mean_and_stderr(samples)
    truth = truth.double()
    slack = 1e-9 * truth.abs().max().clamp(min=1.0)
    return (mean - truth).abs() > z * stderr + slack


def max_z(samples: Tensor, truth: Tensor) -> float:
    mean, stderr = mc_mean_and_stderr(samples)
    return float(((mean - truth.double()).abs() / stderr.clamp(min=1e-300)).max())
