"""LayerNorm whose backward reads its own output instead of its input.

y = x̂ ⊙ γ + β with x̂ = (x − mean) · rstd. The usual backward saves x (plus mean and rstd per
row). Here only y, γ, β and rstd (one float per row) are saved, and backward recovers
x̂ = (y − β) / γ, then applies the standard formulas

    dx = rstd · (g_γ − mean(g_γ) − x̂ · mean(g_γ ⊙ x̂)),   g_γ = dy ⊙ γ,
    dγ = Σ_rows dy ⊙ x̂,   dβ = Σ_rows dy

(the memory-efficient LayerNorm of Apex and of the WTA-CRS paper's implementation, Liu et al.
2023, arXiv:2305.15265). The forward is `F.layer_norm` itself, so the output is bitwise equal to
`nn.LayerNorm`'s, autocast included; gradients are equal up to rounding: recovering x̂ divides
by γ, so the error of x̂_j is about (1 + |β_j|/|γ_j|) ulps of y. Columns where that is large
(|β_j| > 16 |γ_j|) or where γ_j = 0 (x̂_j is lost) keep their input column instead, a
(tokens × K) tensor with K usually 0: for pre-trained all-MiniLM-L6-v2, K = 1 in one of its 13
LayerNorms (a γ of 4.8e-33) and 0 elsewhere.

When it saves memory: y is kept alive by this op, so the saving is real only where the next op
saves y anyway. In BERT-family post-LN layers the attention-output LayerNorm's y is the input of
the intermediate dense layer: with full fine-tuning (or an unsampled, or LoRA, consumer whose
`lora_A` saves y itself) that linear saves y, and the input x (the residual sum, saved by no one
else) is no longer kept, one full (tokens × hidden) tensor per LayerNorm. When the consumer is a
WTA-CRS sampled linear it keeps only a copy of sampled rows, so this op keeps y instead of x: no
saving. The embedding LayerNorm's y goes through dropout first; with `RegeneratedDropout`
nothing else saves it either.

Since y is saved, code that later modifies y in place gets autograd's "modified by an inplace
operation" error (the ordinary LayerNorm would not); transformers' BERT-family layers do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs.companions.usage import acted

# Recovering x̂_j = (y_j − β_j) / γ_j loses about (1 + |β_j| / |γ_j|) ulps of y; columns worse
# than this (and those with γ_j = 0, where x̂_j is lost) keep their input instead.
MAX_BIAS_TO_WEIGHT = 16.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (as the native kernels accumulate), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def ill_conditioned_columns(weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """(K,) int64 flat indices into normalized_shape of columns whose x̂ cannot be recovered
    accurately from y: γ_j = 0 or |β_j| > MAX_BIAS_TO_WEIGHT · |γ_j|. Reads γ (a device sync)."""
    if weight is None:
        return torch.empty(0, dtype=torch.int64)
    gamma = weight.detach().flatten().abs()
    beta = torch.zeros_like(gamma) if bias is None else bias.detach().flatten().abs()
    return ((gamma == 0) | (beta > MAX_BIAS_TO_WEIGHT * gamma)).nonzero().squeeze(1)


class _LayerNormFromOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, kept_columns):  # noqa: D102
        y = F.layer_norm(x, normalized_shape, weight, bias, eps)
        dims = tuple(range(-len(normalized_shape), 0))
        x_used = x.to(_compute_dtype(y.dtype))  # the dtype F.layer_norm computed in (autocast may cast)
        var, mean = torch.var_mean(x_used, dim=dims, correction=0, keepdim=True)  # (..., 1…1)
        rstd = var.add_(eps).rsqrt_()
        kept = None
        if kept_columns.numel():  # (..., K) input columns whose x̂ is not recoverable from y
            kept = x.flatten(dims[0]).index_select(-1, kept_columns.to(x.device))
        ctx.save_for_backward(y, weight, bias, rstd, kept, mean if kept is not None else None)
        ctx.kept_columns, ctx.dims, ctx.x_dtype = kept_columns, dims, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        y, weight, bias, rstd, kept, mean = ctx.saved_tensors
        dtype, dims = rstd.dtype, ctx.dims
        grad, x_hat = grad_out.to(dtype), y.to(dtype)
        if bias is not None:
            x_hat = x_hat - bias.to(dtype)
        grad_scaled = grad
        if weight is not None:
            x_hat = x_hat / weight.to(dtype)
            grad_scaled = grad * weight.to(dtype)
        if kept is not None:
            x_hat = _restore_columns(x_hat, ctx.kept_columns.to(y.device), kept, mean, rstd, dims)
        lead = tuple(range(grad.dim() - len(dims)))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            mean_g = grad_scaled.mean(dims, keepdim=True)
            mean_gx = (grad_scaled * x_hat).mean(dims, keepdim=True)
            grad_x = (rstd * (grad_scaled - mean_g - x_hat * mean_gx)).to(ctx.x_dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_weight = (grad * x_hat).sum(lead).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = grad.sum(lead).to(bias.dtype)
        return grad_x, None, grad_weight, grad_bias, None, None


def _restore_columns(x_hat: Tensor, columns: Tensor, kept: Tensor, mean: Tensor, rstd: Tensor, dims) -> Tensor:
    """x_hat (..., *S) with the flat columns (K,) recomputed from the kept input (..., K)."""
    first = dims[0]
    flat = x_hat.flatten(first)  # (..., D)
    exact = (kept.to(flat.dtype) - mean.flatten(first)) * rstd.flatten(first)  # (..., K)
    return flat.index_copy(-1, columns, exact).view_as(x_hat)


def layer_norm_from_output(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    kept_columns: Tensor | None = None,
) -> Tensor:
    """`F.layer_norm` whose backward is computed from the saved output instead of the input.

    Args:
        x: (..., *normalized_shape) input.
        normalized_shape: S, the trailing dimensions to normalise over (D = prod(S) elements).
        weight: (*S) γ, or None.
        bias: (*S) β, or None.
        eps: added to the variance.
        kept_columns: (K,) int64 flat indices into S whose input columns are saved because x̂
            cannot be recovered there; None computes `ill_conditioned_columns(weight, bias)`
            (which reads γ, a device sync; `LeanLayerNorm` caches it).
    Returns:
        (..., *S), bitwise equal to F.layer_norm(x, normalized_shape, weight, bias, eps).
    Saves y, γ, β and rstd (one per row) for backward, not x; plus (..., K) input columns and the
    row means when K > 0.
    """
    if kept_columns is None:
        kept_columns = ill_conditioned_columns(weight, bias)
    return _LayerNormFromOutput.apply(x, tuple(normalized_shape), weight, bias, eps, kept_columns)


class LeanLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` that saves its output rather than its input for backward.

    Made by swapping the class of an existing `nn.LayerNorm` (parameters kept). The columns whose
    input is kept (`ill_conditioned_columns`) are recomputed whenever γ or β changes, tracked by
    their version counters and storage (optimizer steps and `load_state_dict` count; writes
    through `.data` do not).
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        needs_backward = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, self.weight, self.bias)
        )
        if not needs_backward:
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        acted(self, "lean_layernorm")
        return layer_norm_from_output(
            input, self.normalized_shape, self.weight, self.bias, self.eps, self._kept_columns()
        )

    def _kept_columns(self) -> Tensor:
        key = tuple((t.data_ptr(), t._version) for t in (self.weight, self.bias) if t is not None)
        cached = self.__dict__.get("_kept_columns_cache")
        if cached is None or cached[0] != key:
            cached = self._kept_columns_cache = (key, ill_conditioned_columns(self.weight, self.bias))
        return cached[1]
