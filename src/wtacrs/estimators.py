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
(i = 0 is plain CRS; i never reaches k, so there is no division by zero.) Only the k largest
probabilities are needed for that, never a sort of all N rows.

Every draw fills exactly k slots, winners first, so its shapes depend on k alone, never on the
data: slot t holds a row index and a weight, a row drawn twice fills two slots, and an unused
slot (the winners hold all the mass) has weight 0. The randomness comes in as uniforms u ∈ (0, 1]
(`wtacrs.counter_rng`), and a draw is the inverse of the residual distribution's cumulative sum at
u, so nothing here waits for the host.

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

from wtacrs import device_cache

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


def fill_missing_norms(grad_norm: Tensor, floor: float = 1e-3) -> Tensor:
    """Gradient-norm estimates made safe for `column_row_scores`, per distribution (last dim).

    Missing (NaN), non-finite and zero entries are replaced by the mean of the known ones, and
    every entry is floored at `floor` × that mean, so a stale or missing norm changes only the
    variance, never the mean: the score stays positive wherever X_i ≠ 0.

    Args:
        grad_norm: (..., N) estimates of ‖dY_i‖.
    Returns:
        (..., N) float32, positive and finite.
    """
    g = grad_norm.float()
    known = torch.isfinite(g) & (g > 0)
    count = known.sum(-1, keepdim=True)
    mean = torch.where(known, g, 0.0).sum(-1, keepdim=True) / count.clamp(min=1)
    reference = torch.where(count > 0, mean, 1.0)
    return torch.where(known, g, reference).clamp(min=floor * reference)


def column_row_scores(x_norm: Tensor, grad_norm: Tensor | None = None) -> Tensor:
    """Unnormalised sampling scores s_i = ‖X_i‖ · ‖dY_i‖ (Liu et al. 2023, Sec. 3.1).

    Args:
        x_norm: (..., N) row norms of the layer input.
        grad_norm: (..., N) estimates of the output-gradient row norms (see `fill_missing_norms`
            for missing ones), or None for s_i = ‖X_i‖.
    Returns:
        (..., N) float32 scores.
    """
    scores = x_norm.float()
    return scores if grad_norm is None else scores * fill_missing_norms(grad_norm)


def num_winners(sorted_probs: Tensor, k: int) -> int:
    """|C| minimising (1 − Σ_{j≤i} p_(j)) / (k − i) over i = 0 … k−1 (Liu et al. 2023, Sec. 3.2).

    Args:
        sorted_probs: (N,) probabilities in descending order, N >= k.
    """
    return int(winner_counts(sorted_probs[:k].unsqueeze(0), sorted_probs.sum().reshape(1, 1))[0])


def winner_counts(top: Tensor, total: Tensor) -> Tensor:
    """|C| per distribution: the first i < k minimising (total − Σ_{j<i} top_j) / (k − i).

    Args:
        top: (..., k) the k largest scores of each distribution, in descending order.
        total: (..., 1) each distribution's sum of scores.
    Returns:
        (..., 1) int64 (the first minimum: the fewest winners among equals). The residual here is
        a difference and may cancel; it only chooses |C|, which any value leaves unbiased. It is
        clamped at 0: when the winners hold all the mass, rounding can leave it a hair below 0,
        and the most negative bound would then take zero-score rows as winners.
    """
    residual = (total - (top.cumsum(-1) - top)).clamp_(min=0.0)  # (..., k): mass outside the first i winners
    return (residual / _countdown(top.shape[-1], top.device)).argmin(-1, keepdim=True)


def winner_mask(scores: Tensor, k: int, estimator: Estimator) -> Tensor:
    """(N,) bool: the rows a draw of k slots keeps exactly for these scores (N,): every row that
    can be drawn when k covers them all (the exact product), else WTA-CRS's winners, chosen as
    `sample_slots` chooses them, or none (CRS)."""
    drawable = scores > 0
    if k >= int(drawable.sum()):
        return drawable
    keep = torch.zeros_like(drawable)
    if estimator != "wta-crs":
        return keep
    top, order = scores.float().topk(k)
    count = int(winner_counts(top.unsqueeze(0), scores.float().sum().reshape(1, 1)))
    return keep.index_fill_(0, order[:count], True)


def column_row_variance(products: Tensor, scores: Tensor, winners: Tensor, draws: int, rest_norm2: Tensor) -> Tensor:
    """E‖dŴ − dW‖² of (WTA-)CRS: the winners exact, `draws` i.i.d. draws among the other rows
    with probabilities q_i = s_i / Σ_{j∉C} s_j (Liu et al. 2023, Sec. 3; the bound of their
    Eq. 4 is this with q_i ∝ ‖X_i‖‖dY_i‖):

        (Σ_{i∉C} ‖X_i‖² ‖dY_i‖² / q_i − ‖Σ_{i∉C} dY_iᵀ X_i‖²) / draws.

    Args:
        products: (N,) ‖X_i‖ · ‖dY_i‖.
        scores: (N,) the scores the draw used, positive wherever products are.
        winners: (N,) bool, the set C.
        draws: k − |C|, at least 1.
        rest_norm2: () ‖Σ_{i∉C} dY_iᵀ X_i‖², the squared norm of the part the draws estimate.
    Returns:
        () float64.
    """
    rest = ~winners
    s, g = scores.double()[rest], products.double()[rest]
    drawn = s > 0  # a zero score must mean a zero product (unbiasedness); it adds nothing
    second_moment = (g[drawn].square() / s[drawn]).sum() * s.sum()
    return (second_moment - rest_norm2.double()) / draws


def _countdown(k: int, device: torch.device) -> Tensor:
    """k, k − 1, …, 1: the draws left after each number of winners."""
    return _arange(k, 0, -1, device)


def _slots(k: int, device: torch.device) -> Tensor:
    return _arange(0, k, 1, device)


def _arange(start: int, end: int, step: int, device: torch.device) -> Tensor:
    """torch.arange, made once per arguments and device in eager code (`wtacrs.device_cache`)."""
    if torch.compiler.is_compiling():
        return torch.arange(start, end, step, device=device)
    key = ("arange", start, end, step, device)
    made = device_cache.get(key)
    return made if made is not None else device_cache.put(key, torch.arange(start, end, step, device=device))


def _column_row(scores: Tensor, k: int, u: Tensor, winners: bool) -> tuple[Tensor, Tensor]:
    """CRS (winners=False) or WTA-CRS per distribution of scores (..., N), k < N, u (..., k).

    Slot t < |C| holds the t-th winner with weight 1; the other k − |C| slots hold i.i.d. draws
    j from the non-winners with probability r_j / Σ r (r: the scores outside C), found as the first
    j whose cumulative sum reaches u_t · Σ r, each weighted Σ r / ((k − |C|) r_j). r_j is read back
    as the step of the cumulative sum at j, so the weight inverts the very probability the float32
    sum drew with: no cancellation can bias it.
    """
    n = scores.shape[-1]
    if winners:
        top, order = scores.topk(k)  # (..., k) descending
        count = winner_counts(top, scores.sum(-1, keepdim=True))  # (..., 1)
        is_winner = _slots(k, scores.device) < count  # (..., k)
        rest = scores.scatter(-1, order, top.masked_fill(is_winner, 0.0))  # winners' scores removed
        draws_left = k - count
    else:
        rest, draws_left = scores, k
    # A parallel scan (CUDA's) may round a prefix below the one before it; the running maximum
    # keeps the sum non-decreasing, so searchsorted sees a sorted table and no step is negative
    # (a row whose step it zeroes is never drawn; on the CPU the sum is sequential: a no-op).
    cumulative = rest.cumsum(-1).cummax(-1).values  # (..., N)
    mass = cumulative[..., -1:]  # (..., 1)
    # u ∈ (0, 1]: the target is positive and at most the mass, so the first row reaching it has a
    # positive step (the clamp only keeps a NaN target, from non-finite scores, in range).
    drawn = torch.searchsorted(cumulative, u * mass).clamp_(max=n - 1)  # (..., k)
    steps = cumulative - torch.nn.functional.pad(cumulative[..., :-1], (1, 0))  # (..., N): r_j as the sum drew it
    weights = (mass / steps.gather(-1, drawn) / draws_left).nan_to_num_(nan=0.0, posinf=0.0)  # mass 0: no draw
    if not winners:
        return drawn, weights
    return torch.where(is_winner, order, drawn), weights.masked_fill_(is_winner, 1.0)


def _priority(scores: Tensor, k: int, u: Tensor) -> tuple[Tensor, Tensor]:
    """Priority sampling per distribution of scores (..., N), 2 <= k < N, u (..., N): the k rows of
    largest s_i / u_i, weighted max(1, τ / s_i) with τ the (k+1)-th largest priority; weight 0
    on a zero-score row (taken only when fewer than k rows of its distribution are positive)."""
    top = torch.topk(scores / u, k + 1)
    indices, tau = top.indices[..., :k], top.values[..., k:]  # (..., k), (..., 1)
    kept = scores.gather(-1, indices)
    return indices, torch.where(kept > 0, (tau / kept).clamp(min=1.0), 0.0)


def _uniform(scores: Tensor, k: int, u: Tensor) -> tuple[Tensor, Tensor]:
    """k of the N' rows with a positive score, without replacement (the k smallest keys u among
    them), each weighted N' / k (inclusion probability k / N'); every live row, weight 1, when
    N' <= k. Zero-score rows have a zero product: never kept (weight 0)."""
    live = scores > 0
    indices = torch.where(live, u, 2.0).topk(k, largest=False).indices
    share = (live.sum(-1, keepdim=True) / k).clamp(min=1.0)
    return indices, torch.where(live.gather(-1, indices), share, 0.0)


def uniforms_needed(estimator: Estimator, k: int, num_rows: int) -> int:
    """Uniforms per distribution that `sample_slots` reads: k draws, or one key per row."""
    return num_rows if estimator in ("priority", "uniform") else k


def sample_slots(scores: Tensor, k: int, estimator: Estimator, u: Tensor | None) -> tuple[Tensor, Tensor]:
    """Draw k slots per distribution, with shapes that never depend on the data.

    Args:
        scores: (L, N) non-negative float32 scores (see `column_row_scores`), or (N,) for one
            distribution; a zero score must mean the row's product is zero. Not checked here (that
            would wait for the device).
        k: slots per distribution, 1 <= k <= N. With k = N every row is kept with weight 1.
        estimator: one of ESTIMATORS ("exact" keeps every row: k must be N).
        u: (L, >= uniforms_needed(estimator, k, N)) uniforms in (0, 1] ((>= …,) for scores (N,)),
            or None for "topk"/"exact".
    Returns:
        indices (L, k) int64 and weights (L, k) float32 ((k,) for scores (N,)) with
        Σ_t weights[l, t] · term[l, indices[l, t]] estimating Σ_i term[l, i] (unbiased except for
        "topk"). Indices may repeat within a distribution; unused slots weigh 0.
    """
    n = scores.shape[-1]
    if estimator == "priority" and k < 2:
        estimator = "crs"  # priority sampling's variance is infinite at k = 1 (module docstring)
    if k >= n or estimator == "exact":
        indices = torch.arange(n, device=scores.device).expand(scores.shape)
        return indices, torch.ones(scores.shape, device=scores.device)
    if estimator == "topk":
        values, indices = scores.topk(k)
        return indices, (values > 0).float()
    needed = uniforms_needed(estimator, k, n)
    u = u if u.shape[-1] == needed else u[..., :needed]
    if estimator == "uniform":
        return _uniform(scores, k, u)
    if estimator == "priority" and k >= 2:
        return _priority(scores, k, u)
    return _column_row(scores, k, u, winners=estimator == "wta-crs")


def sample_rows(
    scores: Tensor, k: int, estimator: Estimator = "wta-crs", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """`sample_slots` for one or several distributions, with checked arguments and uniforms from a
    `torch.Generator` (a convenience: the checks wait for the device, so training does not use it).

    Args:
        scores: (N,) or (L, N) non-negative finite scores; a zero score must mean the row's
            product is zero (X_i = 0); such rows are never drawn.
        k: budget of slots, 1 <= k (capped at N: every row, exactly).
        estimator: one of ESTIMATORS.
        generator: source of randomness, for reproducible draws.
    Returns:
        indices and float32 weights, (min(k, N),) or (L, min(k, N)); see `sample_slots`.
    """
    validate_estimator(estimator)
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be 1-D (or 2-D: one distribution per row), got shape {tuple(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError("sampling scores must be finite and non-negative (non-finite activations or gradient norms?)")
    table = scores.float().reshape(-1, scores.shape[-1])
    n = table.shape[1]
    k = min(k, n)
    u = 1.0 - torch.rand(table.shape[0], max(n, 1), generator=generator, device=scores.device)  # (0, 1]
    indices, weights = sample_slots(table, k, estimator, u)
    return (indices[0], weights[0]) if scores.dim() == 1 else (indices, weights)
