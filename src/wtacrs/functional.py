"""Autograd op: a linear layer whose weight gradient is estimated from sampled rows.

Forward Y = X Wᵀ + b, the input gradient dX = dY W and the bias gradient Σ_i dY_i are exact.
Only dW = dYᵀ X is replaced by Σ_m w_m dY_{i_m}ᵀ X_{i_m} over the k slots drawn by
`wtacrs.estimators.sample_slots` (Liu et al. 2023, arXiv:2305.15265, Sec. 3), so only those k
rows of X (already multiplied by their weights) are saved for backward. k depends on shapes and
the ratio alone, and drawing never reads a value on the host: a GPU never waits for it. Where X = f(S) row by row and S is kept anyway (`RowRecipe`), not
even those: backward recomputes f(S_{i_m}).

Where X stays alive until backward anyway (a layer inside a region that gradient checkpointing
recomputes) or its rows can be recomputed (`RowRecipe`), the draw waits for backward
(`linear_drawn_in_backward`): its scores are then ‖X_i‖ · ‖dY_i‖ with the true output gradient,
the scores that minimise the estimate's variance (the paper's Eq. 5 with its ‖dY_i‖ known, not
estimated), at no memory cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from wtacrs.estimators import (
    Estimator,
    fill_missing_norms,
    sample_budget,
    sample_slots,
    uniforms_needed,
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
    """How to recompute rows of an activation X = f(S¹, S², ...) from the same rows of tensors S
    that other ops keep for backward anyway, where f maps each row on its own (X_i = f(S¹_i, ...);
    e.g. f = act(dense(·)), whose output is the input of BERT's output projection). Saving the S
    and the indices instead of X's sampled rows stores no new bytes; backward pays f on M rows.

    Attributes:
        sources: each (N, in_source) S, flattened.
        fn: the same M rows of each source, (M, in_source) each → (M, in_features) those rows of
            X, without autograd.
        version: X's version counter when attached (an in-place change of X voids the recipe);
            None inside torch.compile, which cannot read it (no model we know changes it in place).
    """

    sources: tuple[Tensor, ...]
    fn: Callable[..., Tensor]
    version: int | None


_RECIPE = "_wtacrs_row_recipe"  # attribute of an activation tensor holding its RowRecipe


def attach_row_recipe(x: Tensor, sources: Tensor | tuple[Tensor, ...], fn: Callable[..., Tensor]) -> None:
    """Declare x (..., in_features) = fn(*sources) row by row, with each source (..., in_source)
    kept alive by other ops; sampled layers reading x then save no rows of it."""
    sources = (sources,) if isinstance(sources, Tensor) else tuple(sources)
    for source in sources:
        if source.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"source rows {tuple(source.shape[:-1])} do not match x's {tuple(x.shape[:-1])}")
    flat = tuple(source.detach().reshape(-1, source.shape[-1]) for source in sources)
    setattr(x, _RECIPE, RowRecipe(flat, fn, _version(x)))


def _recomputed_rows(fn: Callable[..., Tensor], sources: tuple[Tensor, ...], indices: Tensor) -> Tensor:
    """fn on rows `indices` of each source, without autograd."""
    with torch.no_grad():
        return fn(*(source.index_select(0, indices) for source in sources))


@dataclass(frozen=True)
class RowSample:
    """The rows of one activation kept for backward; several linear layers reading the same
    activation (q, k and v read one hidden-states tensor) can share it.

    Attributes:
        indices: (k,) int64 row indices into the activation flattened to (N, in_features); a row
            drawn twice fills two slots.
        weights: (k,) float32 importance weights (0 for an unused slot).
        rows: (k, in_features) the selected rows times their weights, a copy that does not keep
            X alive; or the activation's `RowRecipe`, recomputing them in backward.
        num_rows: N.
    """

    indices: Tensor
    weights: Tensor
    rows: Tensor | RowRecipe
    num_rows: int


def row_norms(x: Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> Tensor:
    """Norms along `dim`, accumulated in at least float32 (half-precision sums overflow), or in `dtype`."""
    if dtype is None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=dim, dtype=dtype)


def slot_budget(ratio: float, budget: Budget, num_rows: int, live_rows: int | None) -> int:
    """Slots k of a draw over `num_rows` rows of which `live_rows` (None: unknown, all) may be
    drawn: ceil(ratio · live) with budget "live", ceil(ratio · N) capped at the live rows with "all"."""
    live = num_rows if live_rows is None else live_rows
    return max(1, min(live, sample_budget(ratio, live if budget == "live" else num_rows)))


def draw_rows(x: Tensor, k: int, estimator: Estimator, multiplier: Tensor | None, u: Tensor | None,
              covers_live: bool = False) -> RowSample:
    """k slots of the rows of x (..., in_features), scored ‖X_i‖ · multiplier_i.

    Args:
        multiplier: (N,) float32 per-row factor of the score: the gradient-norm estimate, 0 for
            rows never to be drawn (padding); None for 1.
        u: (>= uniforms_needed(estimator, k, N),) uniforms in (0, 1]; see `wtacrs.counter_rng`.
        covers_live: k is at least the number of rows with a non-zero multiplier (known on the
            host): they are all kept with weight 1 (the exact product).
    """
    with torch.no_grad():
        flat = x.reshape(-1, x.shape[-1])  # (N, in_features)
        indices, weights = _draw_slots(flat, k, estimator, multiplier, u, covers_live)
        return RowSample(indices, weights, _weighted_rows(x, flat, indices, weights), flat.shape[0])


def _draw_slots(flat: Tensor, k: int, estimator: Estimator, multiplier: Tensor | None, u: Tensor | None,
                covers_live: bool) -> tuple[Tensor, Tensor]:
    """(indices, weights) of k slots over the rows of flat (N, in_features), scored ‖X_i‖ · multiplier_i."""
    norms = row_norms(flat).to(torch.float32)  # (N,); the cast is a no-op unless float64
    return _slots(norms, k, estimator, multiplier, u, covers_live)


def _slots(norms: Tensor, k: int, estimator: Estimator, multiplier: Tensor | None, u: Tensor | None,
           covers_live: bool) -> tuple[Tensor, Tensor]:
    """(indices, weights) of k slots over rows of norms (N,) ‖X_i‖, scored ‖X_i‖ · multiplier_i."""
    if covers_live:
        estimator = "topk"  # the k largest scores hold every live row: exact, not an approximation
    return sample_slots(norms if multiplier is None else norms * multiplier, k, estimator, u)


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
    """Draw the rows of `x` (..., in_features) for the weight gradient: k = ceil(ratio · N_live)
    with budget "live", ceil(ratio · N) capped at N_live with "all". Checks its arguments and
    counts the live rows on the host; the sampled layers draw with `draw_rows` instead.

    Args:
        row_mask: bool (...) matching x.shape[:-1]; rows outside it are never sampled. The caller
            guarantees those rows receive a zero output gradient (e.g. padding tokens), otherwise
            their contribution to dW is silently dropped.
        grad_norm: (...) estimates of ‖dY_i‖ per row for the scores ‖X_i‖·‖dY_i‖; NaN = unknown.
        generator: source of the uniforms (torch's global one when None).
        budget: what `ratio` is a fraction of: "live" the rows inside `row_mask`; "all" every row,
            padding included (the paper's code, whose batches are padded to the maximum length:
            a budget covering all live rows keeps them all, exactly).
    """
    validate_ratio(ratio)
    validate_estimator(estimator)
    validate_budget(budget)
    lead = x.shape[:-1]
    for name, t in (("row_mask", row_mask), ("grad_norm", grad_norm)):
        if t is not None and t.shape != lead:
            raise ValueError(f"{name} must have shape {tuple(lead)} (x.shape[:-1]), got {tuple(t.shape)}")
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError("sampling scores must be finite (non-finite activations?)")
    num_rows = x.numel() // x.shape[-1]
    multiplier = None if grad_norm is None else fill_missing_norms(grad_norm.reshape(-1))
    if row_mask is not None:
        mask = row_mask.reshape(-1).to(torch.float32)
        multiplier = mask if multiplier is None else multiplier * mask
    live = None if row_mask is None else int(row_mask.sum())
    k = slot_budget(ratio, budget, num_rows, live)
    u = 1.0 - torch.rand(uniforms_needed(estimator, k, num_rows), generator=generator, device=x.device)  # (0, 1]
    return draw_rows(x, k, estimator, multiplier, u, covers_live=live is not None and k >= live)


def gather_rows(x: Tensor, indices: Tensor, weights: Tensor) -> Tensor | RowRecipe:
    """(k, in_features) rows `indices` of x (..., in_features) times `weights`, in the dtype the
    op computes in; or x's `RowRecipe` if it has a valid one (no copy: backward recomputes them)."""
    return _weighted_rows(x, x.detach().reshape(-1, x.shape[-1]), indices, weights)


def row_recipe(x: Tensor) -> RowRecipe | None:
    """x's `RowRecipe`, if it has one still valid (x not changed in place since)."""
    recipe = getattr(x, _RECIPE, None)
    return recipe if recipe is not None and recipe.version == _version(x) else None


def _version(x: Tensor) -> int | None:
    """x's version counter; None inside torch.compile, which cannot read it: there an in-place
    change of an input between two readers goes unseen (no model we know does it)."""
    return None if torch.compiler.is_compiling() else x._version


def _weighted_rows(x: Tensor, flat: Tensor, indices: Tensor, weights: Tensor) -> Tensor | RowRecipe:
    """`gather_rows` given x's (N, in_features) view `flat`, detached or made without grad."""
    recipe = row_recipe(x)
    if recipe is not None:
        return recipe
    rows = flat.index_select(0, indices).mul_(weights.unsqueeze(1))
    dtype = autocast_dtype(x)
    return rows if dtype is None else rows.to(dtype)


def output_row_norms(grad_out: Tensor) -> Tensor:
    """(..., out_features) output gradient → (...) float32 ‖dY_i‖ per row (bf16/fp16 summed in
    float32; float64 in float64, which vector_norm will not narrow)."""
    wide = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(grad_out, dim=-1, dtype=wide).float()


class _LinearWithRowSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rows, indices, weights, recompute_rows, norm_sink):  # noqa: D102
        # rows: the weighted sampled rows (k, in), or with `recompute_rows` the recipe's sources
        ctx.save_for_backward(weight, indices, weights, *((rows,) if recompute_rows is None else rows))
        ctx.has_bias, ctx.recompute_rows = bias is not None, recompute_rows
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        weight, indices, weights, *kept = ctx.saved_tensors
        flat = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_x = grad_w = grad_b = grad_sink = None
        if ctx.needs_input_grad[0]:
            grad_x = flat.mm(weight).view(*grad_out.shape[:-1], weight.shape[1])  # grad_out.matmul(weight)
        if ctx.needs_input_grad[1]:
            if ctx.recompute_rows is None:
                rows = kept[0]
            else:
                rows = _recomputed_rows(ctx.recompute_rows, tuple(kept), indices).to(weight.dtype)
                rows = rows * weights.to(rows.dtype).unsqueeze(1)
            grad_w = flat.index_select(0, indices).mT.mm(rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        if ctx.needs_input_grad[7]:
            grad_sink = output_row_norms(grad_out)
        return grad_x, grad_w, grad_b, None, None, None, None, grad_sink


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast would compute in on x's device, or None when autocast is off."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def linear_with_sample(x: Tensor, weight: Tensor, bias: Tensor | None, sample: RowSample,
                       norm_sink: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) whose weight gradient uses the rows in `sample` (drawn from x).

    If `norm_sink` (a (...) = x.shape[:-1] float32 leaf requiring grad) is given, backward sets its gradient
    to the output gradient's row norms (`output_row_norms`): a way out of backward without Python
    side effects, which compiled code needs.

    Under torch.autocast the inputs are cast to the autocast dtype outside the op (so autograd
    casts the gradients back) and the op runs with autocast off, as `torch.amp.custom_fwd`
    with `cast_inputs` would, but for whichever device type `x` lives on.
    """
    if sample.num_rows != x.numel() // x.shape[-1]:
        raise ValueError(f"sample was drawn from {sample.num_rows} rows, x has {x.numel() // x.shape[-1]}")
    recipe = sample.rows if isinstance(sample.rows, RowRecipe) else None
    rows, recompute_rows = (sample.rows, None) if recipe is None else (recipe.sources, recipe.fn)
    dtype = autocast_dtype(x)
    if dtype is None:
        return _LinearWithRowSample.apply(x, weight, bias, rows, sample.indices, sample.weights, recompute_rows,
                                          norm_sink)
    cast = [None if t is None else t.to(dtype) for t in (x, weight, bias)]
    rows = rows if recipe is not None else rows.to(dtype)  # the recipe's fn computes in its own dtypes
    with torch.autocast(x.device.type, enabled=False):
        return _LinearWithRowSample.apply(*cast, rows, sample.indices, sample.weights, recompute_rows, norm_sink)


_INPUTS_KEPT = [0]  # depth of `inputs_kept_for_backward` contexts (a list: no `global` statement to trace)


@contextmanager
def inputs_kept_for_backward() -> Iterator[None]:
    """Inside, every layer input stays alive until backward anyway: the forward of a region under
    non-reentrant checkpoint, and its recompute (which hands backward the tensors it saves).
    Sampled layers there draw in backward (`linear_drawn_in_backward`)."""
    _INPUTS_KEPT[0] += 1
    try:
        yield
    finally:
        _INPUTS_KEPT[0] -= 1


# autograd nodes of ops whose output is a view of their input: x's producer may sit behind them
_VIEW_NODES = ("View", "UnsafeView", "Transpose", "Permute", "Reshape", "AsStrided", "Expand", "Select", "Slice",
               "Squeeze", "Unsqueeze", "Alias", "TBackward")


def kept_by_its_producer(x: Tensor) -> bool:
    """Whether the op that made x (through any views of its output) keeps that output for its own
    backward, as SDPA and softmax do: an unsampled layer reading x then stores no bytes of its own
    for it. Reads the saved tensors autograd exposes on the graph's nodes (eager only: False
    inside torch.compile)."""
    node = None if torch.compiler.is_compiling() else x.grad_fn
    address = x.untyped_storage().data_ptr()
    while node is not None:
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    saved = getattr(node, name)
                except RuntimeError:  # freed by a backward that already ran through this node
                    continue
                if isinstance(saved, Tensor) and saved.untyped_storage().data_ptr() == address:
                    return True
        if not type(node).__name__.startswith(_VIEW_NODES) or not node.next_functions:
            return False
        node = node.next_functions[0][0]
    return False


def inputs_kept() -> bool:
    """Whether this forward runs inside `inputs_kept_for_backward`."""
    return _INPUTS_KEPT[0] > 0


def can_draw_in_backward(x: Tensor) -> bool:
    """Whether a sampled layer reading x can draw its rows in backward at no memory cost: x lives
    until backward anyway (`inputs_kept`), or its rows can be recomputed (`row_recipe`). The one
    decision the layers (with `WTACRSConfig.backward_draws`) and the learning-rate measurement share."""
    return inputs_kept() or row_recipe(x) is not None


@dataclass(frozen=True)
class BackwardDraw:
    """What a draw made in backward needs from forward (`linear_drawn_in_backward`).

    Attributes:
        k: slots.
        estimator: a `wtacrs.estimators` name.
        mask: (N,) bool, False at rows never drawn (padding), or None.
        u: the draw's uniforms (see `draw_rows`), or None.
        covers_live: k holds every drawable row (`draw_rows`).
    """

    k: int
    estimator: Estimator
    mask: Tensor | None
    u: Tensor | None
    covers_live: bool


class _LinearDrawnInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, draw, sources, recompute_rows, norm_sink):  # noqa: D102
        # x (alive until backward anyway: `inputs_kept_for_backward`), or with `recompute_rows`
        # the recipe's sources and x's row norms (N,): backward recomputes the drawn rows
        # The draw's mask and uniforms are saved tensors, not ctx attributes: autograd frees them
        # once this node's backward has run, while the graph (and any attribute) may outlive the step.
        x_norms = None if recompute_rows is None else row_norms(x.detach().reshape(-1, x.shape[-1])).to(torch.float32)
        ctx.save_for_backward(weight, x_norms, draw.mask, draw.u, *((x,) if recompute_rows is None else sources))
        ctx.has_bias, ctx.recompute_rows = bias is not None, recompute_rows
        ctx.k, ctx.estimator, ctx.covers_live = draw.k, draw.estimator, draw.covers_live
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        weight, x_norms, mask, u, *kept = ctx.saved_tensors  # kept: x, or the recipe's sources
        flat = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        norms = output_row_norms(grad_out) if ctx.needs_input_grad[1] or ctx.needs_input_grad[6] else None
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = flat.mm(weight).view(*grad_out.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            multiplier = norms.reshape(-1) if mask is None else norms.reshape(-1) * mask
            if x_norms is None:
                inputs = kept[0].reshape(-1, kept[0].shape[-1])
                indices, weights = _draw_slots(inputs, ctx.k, ctx.estimator, multiplier, u, ctx.covers_live)
                rows = inputs.index_select(0, indices)
            else:
                indices, weights = _slots(x_norms, ctx.k, ctx.estimator, multiplier, u, ctx.covers_live)
                rows = _recomputed_rows(ctx.recompute_rows, tuple(kept), indices).to(weight.dtype)
            grad_w = flat.index_select(0, indices).mT.mm(rows * weights.to(rows.dtype).unsqueeze(1))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, norms if ctx.needs_input_grad[6] else None


def linear_drawn_in_backward(x: Tensor, weight: Tensor, bias: Tensor | None, draw: BackwardDraw,
                             norm_sink: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) whose weight gradient is estimated in backward from k rows of x
    drawn there, scored ‖X_i‖ · ‖dY_i‖ · mask_i with the true output gradient. Saves x itself,
    for an x that lives until backward anyway (`inputs_kept_for_backward`); or, for an x with a
    `RowRecipe`, its sources and x's row norms (N floats), and recomputes the drawn rows.
    `norm_sink` as in `linear_with_sample`; autocast as there."""
    recipe = row_recipe(x)
    sources, recompute_rows = ((), None) if recipe is None else (recipe.sources, recipe.fn)
    dtype = autocast_dtype(x)
    if dtype is None:
        return _LinearDrawnInBackward.apply(x, weight, bias, draw, sources, recompute_rows, norm_sink)
    cast = [None if t is None else t.to(dtype) for t in (x, weight, bias)]
    with torch.autocast(x.device.type, enabled=False):  # the recipe's fn computes in its own dtypes
        return _LinearDrawnInBackward.apply(*cast, draw, sources, recompute_rows, norm_sink)


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
