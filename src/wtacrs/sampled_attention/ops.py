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

The sampler, `wtacrs.estimators.sample_rows` on (L, N) scores, draws for all leading indices at
once. Calling it per (batch, head) gives the same estimators but,
for 8 × 12 heads × 128 rows with WTA-CRS, took 62 ms against 1.4 ms batched, while the whole
8 × 12 × 128 × 64 QKᵀ forward and backward takes 27 ms (one CPU thread, best of 5-15 runs):
the loop would have dominated the step.
Drawn slots are not merged: every row keeps exactly k slots, so the saved shapes do not depend on
the draw (checkpoint recomputation checks them) and a repeated row simply appears twice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wtacrs import counter_rng
from wtacrs.estimators import (
    Estimator,
    column_row_scores,
    sample_budget,
    sample_rows,
    sample_slots,
    uniforms_needed,
    validate_estimator,
    validate_ratio,
)
from wtacrs.functional import Budget, autocast_dtype, row_norms, validate_budget


def _sample_slices(
    x: Tensor,
    dim: int,
    live: Tensor | None,
    ratio: float,
    estimator: Estimator,
    generator: torch.Generator | None,
    budget: Budget = "live",
    key: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Sample slices of x (..., R, C) along `dim` (-2: rows, -1: columns), per leading index,
    with uniforms from `key` (`wtacrs.counter_rng`, one stream per leading index) if given, else
    from `generator`.

    `live` (..., count) bool marks the slices that may be drawn (None: all). The budget k is
    ceil(ratio · the largest live count) ("live") or ceil(ratio · count) capped at the largest
    live count ("all", the paper's counting), so saved shapes depend on the mask, never on the draw.
    Returns (kept, indices, weights): the sampled slices (..., k, C) or (..., R, k), indices
    (..., k) int64 and weights (..., k) float32; or (x, None, None) when k covers every slice.
    """
    count = x.shape[dim]
    live_count = count if live is None else int(live.sum(-1).max())
    k = min(live_count, sample_budget(ratio, live_count if budget == "live" else count))
    k = max(1, k)  # k = 1 with nothing live: an all-zero row, weight 0
    if k >= count:
        return x, None, None
    norms = row_norms(x.detach(), dim=-1 if dim == -2 else -2)  # (..., count)
    if live is not None:
        norms = norms * live  # a zero score is never drawn
    lead = norms.shape[:-1]
    scores = column_row_scores(norms.reshape(-1)).view(-1, count)  # (L, count)
    if key is None:
        indices, weights = sample_rows(scores, k, estimator, generator)
    else:
        lanes = torch.arange(scores.shape[0], device=scores.device)
        u = counter_rng.uniforms(counter_rng.hash32(lanes ^ key), uniforms_needed(estimator, k, count))
        indices, weights = sample_slots(scores, k, estimator, u)
    indices, weights = indices.view(*lead, k), weights.to(torch.float32).view(*lead, k)
    index = indices.unsqueeze(-1).expand(*lead, k, x.shape[-1]) if dim == -2 else _column_index(indices, x.shape[-2])
    return x.detach().gather(dim, index), indices, weights


def _saved_for_backward(
    x: Tensor, dim: int, needed: bool, keep_whole: bool, live: Tensor | None, operand: int, key: int | None,
    **sampling
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """What backward keeps of x: nothing when the other operand's gradient is not wanted, else x
    whole or its sampled slices along `dim` (see `_sample_slices`; `operand` separates the two
    operands' streams of one `key`)."""
    if not needed:
        return x.new_empty(0), None, None
    if keep_whole:
        return x, None, None
    return _sample_slices(x, dim, live, key=None if key is None else counter_rng.hash32(key ^ operand), **sampling)


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
                picked = (grad_c.gather(-1, _column_index(b_indices, grad_c.shape[-2]))
                          * b_weights.to(grad_c.dtype).unsqueeze(-2))
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
    budget: Budget = "live",
    key: int | None = None,
) -> Tensor:
    """torch.matmul(a, b) whose gradients are unbiased column-row estimates (WTA-CRS by default).

    Args:
        a: (..., M, K).
        b: (..., K, N), same leading dims as a (e.g. (batch, heads)).
        ratio: in (0, 1]. dA is estimated from k = ceil(ratio · N) columns of b and dB from
            ceil(ratio · M) rows of a, drawn separately for every leading index; only those are
            saved for backward (plus an int64 index and a float32 weight each).
        estimator: "wta-crs" | "crs" | "priority" | "uniform" (unbiased), "topk" (biased, ablation),
            "exact" (no sampling).
        generator: torch.Generator on a's device for reproducible draws; None uses the global RNG
            (which torch.utils.checkpoint restores for its recompute).
        keep_a: save a whole (dB exact) instead of sampled rows: right when another op saves a
            anyway (a softmax output), where a sample would add memory instead of saving it.
        live_columns: bool (..., N) = b.shape[:-2] + (N,), or None. Only these columns of b are
            drawn for dA, and (budget "live") k = ceil(ratio · the largest live count). Unbiased
            only if dC is zero in the other columns (keys masked out of every query have zero
            attention probability, hence zero score gradient). "uniform" draws among all columns.
        key: a 32-bit stream key (`wtacrs.counter_rng.stream_key`): the draws are a pure
            function of it (a recompute or a resumed run with the same key draws the same
            slices, on any device); None draws from `generator`.
        budget: what the columns' ratio counts: "live" the largest live count; "all" every
            column (the paper's counting, padded keys included), capped at the largest live
            count. A budget covering a row's live columns keeps them all (WTA-CRS: exactly).
    Returns:
        (..., M, N), identical to torch.matmul(a, b). With ratio 1, "exact", or no gradient
        needed, this is torch.matmul itself.
    """
    validate_ratio(ratio)
    validate_estimator(estimator)
    validate_budget(budget)
    _check_shapes(a, b)
    wants_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if not wants_grad or estimator == "exact" or ratio >= 1.0:
        return torch.matmul(a, b)
    dtype = autocast_dtype(a)
    if dtype is not None:  # cast like autocast would, outside the op, so autograd casts the grads back
        a, b = a.to(dtype), b.to(dtype)
    if live_columns is not None and live_columns.shape != (*b.shape[:-2], b.shape[-1]):
        raise ValueError(f"live_columns must have shape {(*b.shape[:-2], b.shape[-1])}, "
                         f"got {tuple(live_columns.shape)}")
    sampling = dict(ratio=ratio, estimator=estimator, generator=generator, budget=budget)
    a_part = _saved_for_backward(a, -2, b.requires_grad, keep_a, None, 1, key, **sampling)  # feeds dB
    b_part = _saved_for_backward(b, -1, a.requires_grad, False, live_columns, 2, key, **sampling)  # feeds dA
    with torch.autocast(a.device.type, enabled=False):
        return _SampledMatmul.apply(a, b, *a_part, *b_part)
