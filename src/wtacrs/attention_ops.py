"""Autograd op: a batched matmul whose two gradients are estimated by per-(batch, head) sampling.

For C = A B with A (..., M, K) and B (..., K, N), both gradients contract over a dimension of the
forward output C, so each is a sum of outer products (Liu et al. 2023, arXiv:2305.15265, Sec. 3):

    dA = dC Bᵀ = Σ_n dC[:, n] ⊗ B[:, n]      (a sum over the N columns of B and of dC)
    dB = Aᵀ dC = Σ_m A[m, :] ⊗ dC[m, :]      (a sum over the M rows of A and of dC)

Column-row sampling estimates each sum from k = ceil(ratio · N) (resp. ratio · M) of its terms,
so only the sampled columns of B and rows of A are stored for backward. As in the paper's
attention matmuls ("score" QKᵀ and "attout" PV), every leading index (batch, head) has its own
distribution over the contracted index. dC is unknown in forward, so the scores are ‖B[:, n]‖ and
‖A[m, :]‖ alone (`wtacrs.estimators.column_row_scores` without gradient norms).

The sampler here is the batched form of `wtacrs.estimators.sample_rows`: one call draws for all
leading indices at once. Calling `sample_rows` per (batch, head) gives the same estimators but,
for 8 × 12 heads × 128 rows with WTA-CRS, took 62 ms against 1.4 ms batched, while the whole
8 × 12 × 128 × 64 QKᵀ forward and backward takes 27 ms (one CPU thread, best of 5-15 runs):
the loop would have dominated the step.
Drawn slots are not merged: every row keeps exactly k slots, so the saved shapes do not depend on
the draw (checkpoint recomputation checks them) and a repeated row simply appears twice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wtacrs.estimators import (
    Estimator,
    column_row_scores,
    sample_budget,
    validate_estimator,
    validate_ratio,
)
from wtacrs.functional import _autocast_dtype


def _winner_counts(sorted_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """|C| per row minimising (1 − Σ_{j≤i} p_(j)) / (k − i) over i < k (Liu et al. 2023, Sec. 3.2).

    Args:
        sorted_probs: (L, N) probabilities, each row in descending order, N > k.
    Returns:
        counts (L,) int64 (first minimum, as `estimators.num_winners`) and the remaining mass
        Σ_{j≥|C|} p_(j) (L,) float64, summed from the tail to avoid 1 − Σ cancellation.
    """
    residual = sorted_probs.flip(1).cumsum(1).flip(1)[:, :k]  # (L, k)
    bound = residual / torch.arange(k, 0, -1, dtype=residual.dtype, device=residual.device)
    counts = bound.argmin(1)  # argmin returns the first minimum
    return counts, residual.gather(1, counts.unsqueeze(1)).squeeze(1)


def _column_row_batched(
    probs: Tensor, k: int, winners: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """CRS (winners=False) or WTA-CRS per row of probs (L, N); see `estimators.crs`/`wta_crs`.

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
    """`wtacrs.estimators.sample_rows` for L independent distributions at once, k slots each.

    Args:
        scores: (L, N) non-negative unnormalised scores; row l is the distribution of index l.
        k: draws per row, 1 <= k < N (k >= N means keep everything: the caller's exact path).
        estimator: "wta-crs" | "crs" | "uniform" (unbiased) or "topk" (biased, ablation).
    Returns:
        indices (L, k) int64 and weights (L, k) float64 such that
        Σ_j weights[l, j] · term[l, indices[l, j]] estimates Σ_i term[l, i] for each l.
        Indices may repeat within a row; unused slots carry weight 0.
    """
    validate_estimator(estimator)
    num_rows, n = scores.shape
    if estimator == "exact" or not 1 <= k < n:
        raise ValueError(f"sample_rows_batched needs 1 <= k < N = {n} and a sampling estimator, got k={k}, {estimator!r}")
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError("sampling scores must be finite and non-negative (non-finite activations?)")
    if estimator == "uniform":  # the first k of a uniformly random order: inclusion probability k / N
        keys = torch.rand(num_rows, n, generator=generator, device=scores.device)
        indices = keys.argsort(1)[:, :k]
        return indices, torch.full(indices.shape, n / k, dtype=torch.float64, device=scores.device)
    if estimator == "topk":
        indices = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        return indices, torch.ones(indices.shape, dtype=torch.float64, device=scores.device)
    total = scores.double().sum(1, keepdim=True)
    probs = scores.double() / torch.where(total > 0, total, 1.0)  # an all-zero row stays zero: weight 0
    return _column_row_batched(probs, k, estimator == "wta-crs", generator)


def _vector_norms(x: Tensor, dim: int) -> Tensor:
    """Norms along `dim`, accumulated in at least float32 (half-precision sums overflow)."""
    return torch.linalg.vector_norm(x, dim=dim, dtype=torch.promote_types(x.dtype, torch.float32))


def _sample_slices(
    x: Tensor, dim: int, live: Tensor | None, ratio: float, estimator: Estimator, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Sample slices of x (..., R, C) along `dim` (-2: rows, -1: columns), per leading index.

    `live` (..., count) bool marks the slices that may be drawn (None: all); the budget is then
    k = ceil(ratio · the largest live count), so saved shapes depend on the mask, never on the draw.
    Returns (kept, indices, weights): the sampled slices (..., k, C) or (..., R, k), indices
    (..., k) int64 and weights (..., k) float32; or (x, None, None) when k covers every slice.
    """
    count = x.shape[dim]
    live_count = count if live is None else int(live.sum(-1).max())
    k = max(1, sample_budget(ratio, live_count))  # k = 1 with nothing live: an all-zero row, weight 0
    if k >= count:
        return x, None, None
    norms = _vector_norms(x.detach(), dim=-1 if dim == -2 else -2)  # (..., count)
    if live is not None:
        norms = norms * live  # a zero score is never drawn
    lead = norms.shape[:-1]
    scores = column_row_scores(norms.reshape(-1)).view(-1, count)  # (L, count)
    indices, weights = sample_rows_batched(scores, k, estimator, generator)
    indices, weights = indices.view(*lead, k), weights.to(torch.float32).view(*lead, k)
    index = indices.unsqueeze(-1).expand(*lead, k, x.shape[-1]) if dim == -2 else _column_index(indices, x.shape[-2])
    return x.detach().gather(dim, index), indices, weights


def _saved_for_backward(
    x: Tensor, dim: int, needed: bool, keep_whole: bool, live: Tensor | None, **sampling
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """What backward keeps of x: nothing when the other operand's gradient is not wanted, else x
    whole or its sampled slices along `dim` (see `_sample_slices`)."""
    if not needed:
        return x.new_empty(0), None, None
    if keep_whole:
        return x, None, None
    return _sample_slices(x, dim, live, **sampling)


def _column_index(indices: Tensor, rows: int) -> Tensor:
    """(..., k) column indices → (..., rows, k) for gather along the last dim."""
    return indices.unsqueeze(-2).expand(*indices.shape[:-1], rows, indices.shape[-1])


class _SampledMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, a_kept, a_indices, a_weights, b_kept, b_indices, b_weights):  # noqa: D102
        ctx.a_sampled, ctx.b_sampled = a_indices is not None, b_indices is not None
        to_save = (a_kept, b_kept) + tuple(t for t in (a_indices, a_weights, b_indices, b_weights) if t is not None)
        ctx.save_for_backward(*to_save)
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, grad_c):  # noqa: D102
        a_kept, b_kept, *rest = ctx.saved_tensors
        a_indices, a_weights = (rest.pop(0), rest.pop(0)) if ctx.a_sampled else (None, None)
        b_indices, b_weights = (rest.pop(0), rest.pop(0)) if ctx.b_sampled else (None, None)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:  # dA = Σ_n dC[:, n] ⊗ B[:, n] over the kept columns n
            picked = grad_c
            if b_indices is not None:
                picked = grad_c.gather(-1, _column_index(b_indices, grad_c.shape[-2])) * b_weights.to(grad_c.dtype).unsqueeze(-2)
            grad_a = picked.matmul(b_kept.mT)
        if ctx.needs_input_grad[1]:  # dB = Σ_m A[m, :] ⊗ dC[m, :] over the kept rows m
            picked = grad_c
            if a_indices is not None:
                index = a_indices.unsqueeze(-1).expand(*a_indices.shape, grad_c.shape[-1])
                picked = grad_c.gather(-2, index) * a_weights.to(grad_c.dtype).unsqueeze(-1)
            grad_b = a_kept.mT.matmul(picked)
        return grad_a, grad_b, None, None, None, None, None, None


def _check_shapes(a: Tensor, b: Tensor) -> None:
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"a and b must have at least 2 dims, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"a (..., M, K) and b (..., K, N) must share their leading dims and K "
            f"(no broadcasting), got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )


def sampled_matmul(
    a: Tensor,
    b: Tensor,
    *,
    ratio: float,
    estimator: Estimator = "wta-crs",
    generator: torch.Generator | None = None,
    keep_a: bool = False,
    live_columns: Tensor | None = None,
) -> Tensor:
    """torch.matmul(a, b) whose gradients are unbiased column-row estimates (WTA-CRS by default).

    Args:
        a: (..., M, K).
        b: (..., K, N), same leading dims as a (e.g. (batch, heads)).
        ratio: in (0, 1]. dA is estimated from k = ceil(ratio · N) columns of b and dB from
            ceil(ratio · M) rows of a, drawn separately for every leading index; only those are
            saved for backward (plus an int64 index and a float32 weight each).
        estimator: "wta-crs" | "crs" | "uniform" (unbiased), "topk" (biased, ablation),
            "exact" (no sampling).
        generator: torch.Generator on a's device for reproducible draws; None uses the global RNG
            (which torch.utils.checkpoint restores for its recompute).
        keep_a: save a whole (dB exact) instead of sampled rows: right when another op saves a
            anyway (a softmax output), where a sample would add memory instead of saving it.
        live_columns: bool (..., N) = b.shape[:-2] + (N,), or None. Only these columns of b are
            drawn for dA, and the budget is k = ceil(ratio · the largest live count). Unbiased
            only if dC is zero in the other columns (keys masked out of every query have zero
            attention probability, hence zero score gradient). "uniform" draws among all columns.
    Returns:
        (..., M, N), identical to torch.matmul(a, b). With ratio 1, "exact", or no gradient
        needed, this is torch.matmul itself.
    """
    validate_ratio(ratio)
    validate_estimator(estimator)
    _check_shapes(a, b)
    wants_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if not wants_grad or estimator == "exact" or ratio >= 1.0:
        return torch.matmul(a, b)
    dtype = _autocast_dtype(a)
    if dtype is not None:  # cast like autocast would, outside the op, so autograd casts the grads back
        a, b = a.to(dtype), b.to(dtype)
    if live_columns is not None and live_columns.shape != (*b.shape[:-2], b.shape[-1]):
        raise ValueError(f"live_columns must have shape {(*b.shape[:-2], b.shape[-1])}, got {tuple(live_columns.shape)}")
    sampling = dict(ratio=ratio, estimator=estimator, generator=generator)
    a_part = _saved_for_backward(a, -2, b.requires_grad, keep_a, None, **sampling)  # feeds dB
    b_part = _saved_for_backward(b, -1, a.requires_grad, False, live_columns, **sampling)  # feeds dA
    with torch.autocast(a.device.type, enabled=False):
        return _SampledMatmul.apply(a, b, *a_part, *b_part)
