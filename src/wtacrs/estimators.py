"""Row-sampling estimators for the weight gradient of a linear layer.

Pure tensor math: scores and a budget in, (row indices, row weights) out. Nothing here knows
about modules, autograd or training.

For Y = X Wᵀ over N rows, the weight gradient is a sum of N outer products,

    dW = dYᵀ X = Σ_i dY_iᵀ X_i .

Column-row sampling (CRS; Drineas, Kannan & Mahoney 2006; Adelman et al. 2021) draws k rows
j_1..j_k i.i.d. from a distribution p and uses

    dŴ_CRS = Σ_t dY_{j_t}ᵀ X_{j_t} / (k p_{j_t}),      p_i ∝ ‖X_i‖ ‖dY_i‖,

which is unbiased for any p that is positive wherever X_i dY_iᵀ ≠ 0; the p above minimises its
variance (Liu et al. 2023, "Winner-Take-All Column Row Sampling for Memory Efficient Adaptation
of Language Model", NeurIPS, arXiv:2305.15265, Sec. 3).

WTA-CRS (Liu et al. 2023, Sec. 3.2) keeps the set C of the |C| most probable rows exactly and
spends the remaining k − |C| draws on the rest, drawn in proportion to p:

    dŴ_WTA = Σ_{c∈C} dY_cᵀ X_c + Σ_t (1 − Σ_{c∈C} p_c) / ((k − |C|) p_{j_t}) · dY_{j_t}ᵀ X_{j_t},
             j_t ~ p restricted to the complement of C.

It is unbiased for every C; |C| is picked per call to minimise the variance bound, i.e.
argmin over i ∈ {0, …, k−1} of (1 − Σ_{j≤i} p_(j)) / (k − i) with p_(1) ≥ p_(2) ≥ … .
(i = 0 is plain CRS; i never reaches k, so there is no division by zero.)

A row drawn several times is returned once with its weights summed, so at most k rows are stored.

Priority sampling (Duffield, Lund & Thorup 2007, "Priority sampling for estimation of arbitrary
subset sums", J. ACM 54(6)) draws k distinct rows instead, without replacement: with
u_i ~ U(0, 1] and priority q_i = s_i / u_i (s_i ∝ p_i), it keeps the k rows of largest priority
and, with τ the (k+1)-th largest priority, weights row i by max(1, τ / s_i):

    dŴ_PRI = Σ_{i kept} max(1, τ / s_i) · dY_iᵀ X_i .

Given the other priorities, row i is kept iff q_i > τ_i (the k-th largest of the others, which
is then τ), with probability min(1, s_i / τ_i); so E[weight_i] = 1 and dŴ_PRI is unbiased for any
positive scores. Rows with s_i ≥ τ come with weight 1: winners chosen by the draw. Its
variance, s_i · E[max(0, τ_i − s_i)] per row (in score units), is finite for k ≥ 2 only: each
priority's tail falls like 1/t, so the k-th largest of them has a finite mean only from k = 2 on;
a budget of one row is therefore drawn as CRS. Not part of WTA-CRS; offered because it fills the
whole budget with distinct rows (Szegedy 2006: priority sampling with k + 1 rows is at least as
good as any unbiased scheme with k).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Estimator = Literal["wta-crs", "crs", "priority", "topk", "uniform", "exact"]
ESTIMATORS: tuple[str, ...] = ("wta-crs", "crs", "priority", "topk", "uniform", "exact")
UNBIASED_ESTIMATORS: tuple[str, ...] = ("wta-crs", "crs", "priority", "uniform", "exact")


def validate_ratio(ratio: float) -> float:
    """Return `ratio` as a float, or raise ValueError unless 0 < ratio <= 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if not (0.0 < float(ratio) <= 1.0):  # also rejects NaN
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


def validate_estimator(estimator: str) -> str:
    """Return `estimator`, or raise ValueError naming the valid choices."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    return estimator


def sample_budget(ratio: float, num_rows: int) -> int:
    """k = ceil(ratio · N) rows (0 when there are no rows)."""
    # Round before ceil so that e.g. 0.3 · 10 = 3.0000000000000004 gives 3, not 4.
    return min(num_rows, math.ceil(round(validate_ratio(ratio) * num_rows, 9)))


def column_row_scores(x_norm: Tensor, grad_norm: Tensor | None = None, floor: float = 1e-3) -> Tensor:
    """Unnormalised sampling scores s_i = ‖X_i‖ · ‖dY_i‖ (Liu et al. 2023, Sec. 3.1).

    Args:
        x_norm: (N,) row norms of the layer input.
        grad_norm: (N,) estimates of the output-gradient row norms, or None for s_i = ‖X_i‖.
            Missing (NaN), non-finite and zero entries are replaced by the mean of the known
            ones, and every entry is floored at `floor` × that mean, so a stale or missing norm
            changes only the variance, never the mean: s_i > 0 whenever X_i ≠ 0.
    Returns:
        (N,) float64 scores.
    """
    scores = x_norm.double()
    if grad_norm is None:
        return scores
    g = grad_norm.double()
    known = torch.isfinite(g) & (g > 0)
    count = known.sum()
    mean = torch.where(known, g, 0.0).sum() / count.clamp(min=1)
    reference = torch.where(count > 0, mean, torch.ones_like(mean))
    g = torch.where(known, g, reference).clamp(min=floor * reference)
    return scores * g


def merge_duplicates(indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Collapse repeated row indices into one entry each, summing their weights.

    Returns sorted unique indices (M,) and their summed weights (M,).
    """
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    merged = torch.zeros(unique.numel(), dtype=weights.dtype, device=weights.device)
    return unique, merged.index_add_(0, inverse, weights)


def num_winners(sorted_probs: Tensor, k: int) -> int:
    """|C| minimising (1 − Σ_{j≤i} p_(j)) / (k − i) over i = 0 … k−1 (Liu et al. 2023, Sec. 3.2).

    Args:
        sorted_probs: (N,) probabilities in descending order, N >= k.
    """
    counts, _ = _winner_counts(sorted_probs.unsqueeze(0), k)
    return int(counts[0])


def crs(probs: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """k i.i.d. draws from `probs` (N,), each weighted 1 / (k p_j)."""
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)
    return merge_duplicates(draws, 1.0 / (k * probs[draws]))


def wta_crs(probs: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Winners kept with weight 1, the other k − |C| draws from the rest in proportion to p."""
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    counts, residual = _winner_counts(sorted_probs.unsqueeze(0), k)
    c, mass = torch.stack([counts[0].double(), residual[0]]).tolist()  # one host sync
    c = int(c)
    if c == 0:
        return crs(probs, k, generator)
    winners, rest, rest_probs = order[:c], order[c:], sorted_probs[c:]
    winner_weights = torch.ones(c, dtype=probs.dtype, device=probs.device)
    if mass <= 0.0:  # the winners hold all the mass: the estimate is exact
        return merge_duplicates(winners, winner_weights)
    m = k - c
    draws = torch.multinomial(rest_probs / mass, m, replacement=True, generator=generator)
    draw_weights = mass / (m * rest_probs[draws])
    return merge_duplicates(torch.cat([winners, rest[draws]]), torch.cat([winner_weights, draw_weights]))


def priority(scores: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Priority sampling: the k ≥ 2 rows of largest s_i / u_i, weighted max(1, τ / s_i), τ the
    (k+1)-th largest priority (module docstring). Fewer than k + 1 positive scores: all of them,
    exactly."""
    indices, weights = (t[0] for t in _priority_batched(scores.double().unsqueeze(0), k, generator))
    kept = weights > 0  # a zero-score row is taken only when fewer than k rows are positive
    indices, weights = indices[kept], weights[kept]
    order = indices.argsort()
    return indices[order], weights[order]


def _priority_batched(scores: Tensor, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Priority sampling per row of scores (L, N) float64, k < N: indices (L, k), weights (L, k),
    weight 0 on a zero-score row (taken only when fewer than k rows of its row are positive)."""
    u = 1.0 - torch.rand(scores.shape, generator=generator, dtype=torch.float64, device=scores.device)  # (0, 1]
    top = torch.topk(scores / u, k + 1, dim=1)
    indices, tau = top.indices[:, :k], top.values[:, k:]  # (L, k), (L, 1)
    kept = scores.gather(1, indices)
    weights = torch.where(kept > 0, torch.clamp(tau / torch.where(kept > 0, kept, 1.0), min=1.0), 0.0)
    return indices, weights


def topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Deterministic top-k rows with weight 1. Biased: an ablation baseline only."""
    idx = torch.sort(scores, descending=True, stable=True).indices[:k]
    return merge_duplicates(idx, torch.ones(k, dtype=scores.dtype, device=scores.device))


def uniform(scores: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """k of the N' rows with a positive score, without replacement, each weighted N' / k
    (inclusion probability k / N'); zero-score rows have a zero product and are skipped."""
    live = (scores > 0).nonzero().squeeze(1)
    k = min(k, live.numel())
    if k == 0:
        return live, torch.empty(0, dtype=torch.float64, device=scores.device)
    pick = torch.randperm(live.numel(), generator=generator, device=scores.device)[:k]
    return live[pick].sort().values, torch.full((k,), live.numel() / k, dtype=torch.float64, device=scores.device)


def sample_rows(
    scores: Tensor, k: int, estimator: Estimator = "wta-crs", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pick the rows whose outer products estimate dW = Σ_i dY_iᵀ X_i.

    Args:
        scores: (N,) non-negative unnormalised scores, see `column_row_scores`. A zero score must
            mean the row's product is zero (X_i = 0); such rows are never drawn.
        k: budget of draws, 1 <= k. With k >= N every row is kept with weight 1 (exact).
        estimator: one of ESTIMATORS.
        generator: source of randomness, for reproducible draws.
    Returns:
        indices (M,) int64 sorted and unique, M <= min(k, N); weights (M,) float64 such that
        Σ_m weights[m] · dY_{indices[m]}ᵀ X_{indices[m]} estimates dW (unbiased except for topk).
    """
    validate_estimator(estimator)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    n = scores.numel()
    if n == 0:
        return (torch.empty(0, dtype=torch.int64, device=scores.device),
                torch.empty(0, dtype=torch.float64, device=scores.device))
    total = scores.double().sum()
    # One host sync checks everything: a NaN or Inf score makes the total non-finite.
    total_value, minimum = torch.stack([total, scores.double().min()]).tolist()
    if not math.isfinite(total_value) or minimum < 0:
        raise ValueError("sampling scores must be finite and non-negative (non-finite activations or gradient norms?)")
    if estimator == "exact" or k >= n:
        return torch.arange(n, device=scores.device), torch.ones(n, dtype=torch.float64, device=scores.device)
    if estimator == "uniform":
        return uniform(scores, k, generator)
    if estimator == "topk":
        return topk(scores, k)
    if estimator == "priority" and k >= 2:
        return priority(scores, k, generator)
    if total_value == 0.0:  # every row product is zero: an empty sum is the exact gradient
        return (torch.empty(0, dtype=torch.int64, device=scores.device),
                torch.empty(0, dtype=torch.float64, device=scores.device))
    probs = scores.double() / total
    return (wta_crs if estimator == "wta-crs" else crs)(probs, k, generator)  # priority with k = 1: crs


# -- batched form: one distribution per leading index (the attention matmuls' (batch, head)) ----


def _winner_counts(sorted_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """|C| per row minimising (1 − Σ_{j≤i} p_(j)) / (k − i) over i < k (Liu et al. 2023, Sec. 3.2).

    Args:
        sorted_probs: (L, N) probabilities, each row in descending order, N > k.
    Returns:
        counts (L,) int64 (the first minimum: the fewest winners among equals) and the remaining mass
        Σ_{j≥|C|} p_(j) (L,) float64, summed from the tail to avoid 1 − Σ cancellation.
    """
    residual = sorted_probs.flip(1).cumsum(1).flip(1)[:, :k]  # (L, k)
    bound = residual / torch.arange(k, 0, -1, dtype=residual.dtype, device=residual.device)
    counts = bound.argmin(1)  # argmin returns the first minimum
    return counts, residual.gather(1, counts.unsqueeze(1)).squeeze(1)


def _column_row_batched(
    probs: Tensor, k: int, winners: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """CRS (winners=False) or WTA-CRS per row of probs (L, N); see `crs`/`wta_crs`.

    Slot j < |C| holds the j-th winner with weight 1; the other k − |C| slots hold i.i.d. draws from
    the non-winners in proportion to p, each weighted (Σ_{non-winners} p) / ((k − |C|) p_j).
    """
    sorted_probs, order = torch.sort(probs, dim=1, descending=True, stable=True)  # (L, N)
    num_rows, n = probs.shape
    if winners:
        counts, mass = _winner_counts(sorted_probs, k)
    else:
        counts, mass = torch.zeros(num_rows, dtype=torch.int64, device=probs.device), sorted_probs.sum(1)
    positions = torch.arange(n, device=probs.device)
    rest = torch.where(positions >= counts.unsqueeze(1), sorted_probs, 0.0)  # (L, N)
    drawable = (mass > 0).unsqueeze(1)  # False: winners hold all the mass (or every score is 0)
    draws = torch.multinomial(torch.where(drawable, rest, 1.0), k, replacement=True, generator=generator)
    slots = torch.arange(k, device=probs.device)
    is_winner = slots < counts.unsqueeze(1)  # (L, k)
    picked = torch.where(is_winner, slots, draws)  # positions in sorted order
    p = sorted_probs.gather(1, picked)
    draw_weight = mass.unsqueeze(1) / ((k - counts).unsqueeze(1) * p)
    weights = torch.where(is_winner, 1.0, torch.where(drawable, draw_weight, 0.0))
    return order.gather(1, picked), weights


def sample_rows_batched(
    scores: Tensor, k: int, estimator: Estimator = "wta-crs", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """`sample_rows` for L independent distributions at once, k slots each (no duplicate merging).

    Args:
        scores: (L, N) non-negative unnormalised scores; row l is the distribution of index l.
        k: draws per row, 1 <= k < N (k >= N means keep everything: the caller's exact path).
        estimator: "wta-crs" | "crs" | "priority" | "uniform" (unbiased) or "topk" (biased, ablation).
    Returns:
        indices (L, k) int64 and weights (L, k) float64 such that
        Σ_j weights[l, j] · term[l, indices[l, j]] estimates Σ_i term[l, i] for each l.
        Indices may repeat within a row; unused slots carry weight 0.
    """
    validate_estimator(estimator)
    num_rows, n = scores.shape
    if estimator == "exact" or not 1 <= k < n:
        raise ValueError(f"sample_rows_batched needs 1 <= k < N = {n} and a sampling estimator, "
                         f"got k={k}, {estimator!r}")
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError("sampling scores must be finite and non-negative (non-finite activations?)")
    if estimator == "uniform":  # the first k of a uniformly random order: inclusion probability k / N
        keys = torch.rand(num_rows, n, generator=generator, device=scores.device)
        indices = keys.argsort(1)[:, :k]
        return indices, torch.full(indices.shape, n / k, dtype=torch.float64, device=scores.device)
    if estimator == "topk":
        indices = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        return indices, torch.ones(indices.shape, dtype=torch.float64, device=scores.device)
    if estimator == "priority" and k >= 2:
        return _priority_batched(scores.double(), k, generator)
    total = scores.double().sum(1, keepdim=True)
    probs = scores.double() / torch.where(total > 0, total, 1.0)  # an all-zero row stays zero: weight 0
    return _column_row_batched(probs, k, estimator == "wta-crs", generator)
