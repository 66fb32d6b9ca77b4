"""Autograd op: a linear layer whose weight gradient is estimated from sampled rows.

Forward Y = X Wᵀ + b, the input gradient dX = dY W and the bias gradient Σ_i dY_i are exact.
Only dW = dYᵀ X is replaced by Σ_m w_m dY_{i_m}ᵀ X_{i_m} over the rows drawn by
`wtacrs.estimators.sample_rows` (Liu et al. 2023, arXiv:2305.15265, Sec. 3), so only those rows
of X are saved for backward. Where X = f(S) row by row and S is kept anyway (`RowRecipe`), not
even those: backward recomputes f(S_{i_m}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from wtacrs.estimators import (
    Estimator,
    column_row_scores,
    sample_budget,
    sample_rows,
    validate_estimator,
    validate_ratio,
)

Budget = Literal["live", "all"]
BUDGETS: tuple[str, ...] = ("live", "all")


def validate_budget(budget: str) -> str:
    """Return `budget`, or raise ValueError naming the valid choices."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    return budget


@dataclass(frozen=True)
class RowRecipe:
    """How to recompute rows of an activation X = f(S) from the same rows of a tensor S that
    other ops keep for backward anyway, where f maps each row on its own (X_i = f(S_i); e.g.
    f = act(dense(·)), whose output is the input of BERT's output projection). Saving S and the
    indices instead of X's sampled rows stores no new bytes; backward pays f on M rows.

    Attributes:
        source: (N, in_source) S, flattened.
        fn: (M, in_source) rows of S → (M, in_features) the same rows of X, without autograd.
        version: X's version counter when attached (an in-place change of X voids the recipe).
    """

    source: Tensor
    fn: Callable[[Tensor], Tensor]
    version: int


_RECIPE = "_wtacrs_row_recipe"  # attribute of an activation tensor holding its RowRecipe


def attach_row_recipe(x: Tensor, source: Tensor, fn: Callable[[Tensor], Tensor]) -> None:
    """Declare x (..., in_features) = fn(source) row by row, with source (..., in_source) kept
    alive by other ops; sampled layers reading x then save no rows of it."""
    if source.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"source rows {tuple(source.shape[:-1])} do not match x's {tuple(x.shape[:-1])}")
    setattr(x, _RECIPE, RowRecipe(source.detach().reshape(-1, source.shape[-1]), fn, x._version))


@dataclass(frozen=True)
class RowSample:
    """The rows of one activation kept for backward; several linear layers reading the same
    activation (q, k and v read one hidden-states tensor) can share it.

    Attributes:
        indices: (M,) int64 row indices into the activation flattened to (N, in_features).
        weights: (M,) float32 importance weights.
        rows: (M, in_features) the selected rows, a copy that does not keep X alive; or the
            activation's `RowRecipe`, recomputing them in backward.
        num_rows: N.
    """

    indices: Tensor
    weights: Tensor
    rows: Tensor | RowRecipe
    num_rows: int


def row_norms(x: Tensor, dim: int = -1) -> Tensor:
    """Norms along `dim`, accumulated in at least float32 (half-precision sums overflow)."""
    return torch.linalg.vector_norm(x, dim=dim, dtype=torch.promote_types(x.dtype, torch.float32))


def draw_row_sample(
    x: Tensor,
    *,
    ratio: float,
    estimator: Estimator = "wta-crs",
    row_mask: Tensor | None = None,
    grad_norm: Tensor | None = None,
    generator: torch.Generator | None = None,
    budget: Budget = "live",
) -> RowSample:
    """Draw k rows of `x` (..., in_features) for the weight gradient: k = ceil(ratio · N_live)
    with budget "live", ceil(ratio · N) capped at N_live with "all".

    Args:
        row_mask: bool (...) matching x.shape[:-1]; rows outside it are never sampled. The caller
            guarantees those rows receive a zero output gradient (e.g. padding tokens), otherwise
            their contribution to dW is silently dropped.
        grad_norm: (...) estimates of ‖dY_i‖ per row for the scores ‖X_i‖·‖dY_i‖; NaN = unknown.
        budget: what `ratio` is a fraction of: "live" the rows inside `row_mask`; "all" every row,
            padding included (the paper's code, whose batches are padded to the maximum length:
            a budget covering all live rows keeps them all, exactly).
    """
    validate_ratio(ratio)
    validate_estimator(estimator)
    validate_budget(budget)
    lead = x.shape[:-1]
    flat = x.detach().reshape(-1, x.shape[-1])
    for name, t in (("row_mask", row_mask), ("grad_norm", grad_norm)):
        if t is not None and t.shape != lead:
            raise ValueError(f"{name} must have shape {tuple(lead)} (x.shape[:-1]), got {tuple(t.shape)}")
    scores = column_row_scores(row_norms(flat), None if grad_norm is None else grad_norm.reshape(-1))
    mask = None if row_mask is None else row_mask.reshape(-1).to(torch.bool)
    live = flat.shape[0] if mask is None else int(mask.sum())
    k = min(live, sample_budget(ratio, live if budget == "live" else flat.shape[0]))
    if k == 0:  # no sampleable rows: dW = 0 under the row_mask precondition
        indices, weights = torch.empty(0, dtype=torch.int64, device=x.device), torch.empty(0, device=x.device)
    elif mask is not None and k == live:  # every live row kept: the exact product
        indices = mask.nonzero().squeeze(1)
        weights = torch.ones(live, device=x.device)
    else:  # masked rows get a zero score, so they are never drawn
        indices, weights = sample_rows(scores if mask is None else scores * mask, k, estimator, generator)
    return RowSample(indices, weights.to(torch.float32), gather_rows(x, indices), flat.shape[0])


def gather_rows(x: Tensor, indices: Tensor) -> Tensor | RowRecipe:
    """(M, in_features) copy of rows `indices` of x (..., in_features), in the dtype the op
    computes in; or x's `RowRecipe` if it has a valid one (no copy: backward recomputes them)."""
    recipe = getattr(x, _RECIPE, None)
    if recipe is not None and recipe.version == x._version:
        return recipe
    return x.detach().reshape(-1, x.shape[-1]).index_select(0, indices).to(autocast_dtype(x) or x.dtype)


class _LinearWithRowSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rows, indices, weights, recompute_rows):  # noqa: D102
        # rows: the sampled rows (M, in), or with `recompute_rows` the recipe's source (N, in_source)
        ctx.save_for_backward(weight, rows, indices, weights)
        ctx.has_bias, ctx.recompute_rows = bias is not None, recompute_rows
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        weight, rows, indices, weights = ctx.saved_tensors
        flat = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight)
        if ctx.needs_input_grad[1]:
            if ctx.recompute_rows is not None:
                with torch.no_grad():
                    rows = ctx.recompute_rows(rows.index_select(0, indices)).to(weight.dtype)
            picked = flat.index_select(0, indices) * weights.to(flat.dtype).unsqueeze(1)  # (M, out)
            grad_w = picked.mT.mm(rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast would compute in on x's device, or None when autocast is off."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def linear_with_sample(x: Tensor, weight: Tensor, bias: Tensor | None, sample: RowSample) -> Tensor:
    """F.linear(x, weight, bias) whose weight gradient uses the rows in `sample` (drawn from x).

    Under torch.autocast the inputs are cast to the autocast dtype outside the op (so autograd
    casts the gradients back) and the op runs with autocast off, as `torch.amp.custom_fwd`
    with `cast_inputs` would, but for whichever device type `x` lives on.
    """
    if sample.num_rows != x.numel() // x.shape[-1]:
        raise ValueError(f"sample was drawn from {sample.num_rows} rows, x has {x.numel() // x.shape[-1]}")
    recipe = sample.rows if isinstance(sample.rows, RowRecipe) else None
    rows, recompute_rows = (sample.rows, None) if recipe is None else (recipe.source, recipe.fn)
    dtype = autocast_dtype(x)
    if dtype is None:
        return _LinearWithRowSample.apply(x, weight, bias, rows, sample.indices, sample.weights, recompute_rows)
    cast = [None if t is None else t.to(dtype) for t in (x, weight, bias)]
    rows = rows if recipe is not None else rows.to(dtype)  # the recipe's fn computes in its own dtypes
    with torch.autocast(x.device.type, enabled=False):
        return _LinearWithRowSample.apply(*cast, rows, sample.indices, sample.weights, recompute_rows)


def needs_sampling(weight: Tensor, ratio: float, estimator: str) -> bool:
    """Whether a sampled op differs from F.linear: grad of the weight wanted, and something to drop."""
    return torch.is_grad_enabled() and weight.requires_grad and estimator != "exact" and ratio < 1.0


def sampled_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    ratio: float,
    estimator: Estimator = "wta-crs",
    row_mask: Tensor | None = None,
    grad_norm: Tensor | None = None,
    generator: torch.Generator | None = None,
    budget: Budget = "live",
) -> Tensor:
    """Linear layer with an unbiased row-sampled weight gradient (WTA-CRS by default).

    Args:
        x: (..., in_features) input.
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        ratio: fraction of rows kept for the weight gradient, k = ceil(ratio · N) with N the
            number of rows (of rows inside `row_mask` when given). In (0, 1].
        estimator: "wta-crs" | "crs" | "priority" | "uniform" (unbiased), "topk" (biased, ablation),
            "exact" (no sampling).
        row_mask: bool (...) = x.shape[:-1]; only these rows are sampled. Precondition: rows
            outside it get a zero output gradient (padding), else their dW share is lost.
        grad_norm: (...) = x.shape[:-1] estimates of ‖dY_i‖ (NaN where unknown).
        generator: torch.Generator on x's device for reproducible draws; None uses the global RNG
            (which torch.utils.checkpoint restores for its recompute).
        budget: "live" (k counts the rows inside `row_mask`) or "all" (every row; see
            `draw_row_sample`).
    Returns:
        (..., out_features), identical to F.linear(x, weight, bias).

    With weight.requires_grad False (or grad disabled) nothing is sampled and no activation is
    saved for the weight; with ratio 1 or "exact" this is F.linear itself.
    """
    validate_ratio(ratio)
    validate_estimator(estimator)
    if not needs_sampling(weight, ratio, estimator):
        return F.linear(x, weight, bias)
    sample = draw_row_sample(
        x, ratio=ratio, estimator=estimator, row_mask=row_mask, grad_norm=grad_norm, generator=generator, budget=budget
    )
    return linear_with_sample(x, weight, bias, sample)
