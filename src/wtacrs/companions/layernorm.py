"""LayerNorm whose backward reads its own output instead of its input.

y = x̂ ⊙ γ + β with x̂ = (x − mean) · rstd. The usual backward saves x (plus mean and rstd per
row). Here only y, γ, β and rstd (one float per row) are saved, and backward recovers
x̂ = (y − β) / γ, then applies the standard formulas

    dx = rstd · (g_γ − mean(g_γ) − x̂ · mean(g_γ ⊙ x̂)),   g_γ = dy ⊙ γ,
    dγ = Σ_rows dy ⊙ x̂,   dβ = Σ_rows dy

(the memory-efficient LayerNorm of Apex and of the WTA-CRS paper's implementation, Liu et al.
2023, arXiv:2305.15265). The forward is `F.layer_norm` itself, so the output is bitwise equal to
`nn.LayerNorm`'s, autocast included; gradients are equal up to rounding: recovering x̂ divides
by γ, so the error of x̂ is about ulp(|y|) / |γ| (tiny for trained γ near 1, larger where
|β| ≫ |γ|). γ must have no zero entries; `LeanLayerNorm` checks that whenever the weight changes
and falls back to the ordinary LayerNorm (with a warning) where it has zeros.

When it saves memory: y is kept alive by this op, so the saving is real only where the next op
saves y anyway. In BERT-family post-LN layers the attention-output LayerNorm's y is the input of
the intermediate dense layer: with full fine-tuning (or an unsampled, or LoRA, consumer whose
`lora_A` saves y itself) that linear saves y, and the input x (the residual sum, saved by no one
else) is no longer kept, one full (tokens × hidden) tensor per LayerNorm. When the consumer is a
WTA-CRS sampled linear it keeps only a copy of sampled rows, so this op keeps y instead of x: no
saving. The embedding LayerNorm's y goes through dropout first; with `RegeneratedDropout`
nothing else saves it either.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (as the native kernels accumulate), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


class _LayerNormFromOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):  # noqa: D102
        y = F.layer_norm(x, normalized_shape, weight, bias, eps)
        dims = tuple(range(-len(normalized_shape), 0))
        x_used = x.to(_compute_dtype(y.dtype))  # the dtype F.layer_norm computed in (autocast may cast)
        rstd = torch.var(x_used, dim=dims, correction=0, keepdim=True).add_(eps).rsqrt_()  # (..., 1…1)
        ctx.save_for_backward(y, weight, bias, rstd)
        ctx.dims, ctx.x_dtype = dims, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        y, weight, bias, rstd = ctx.saved_tensors
        dtype, dims = rstd.dtype, ctx.dims
        grad, x_hat = grad_out.to(dtype), y.to(dtype)
        if bias is not None:
            x_hat = x_hat - bias.to(dtype)
        grad_scaled = grad
        if weight is not None:
            x_hat = x_hat / weight.to(dtype)
            grad_scaled = grad * weight.to(dtype)
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
        return grad_x, None, grad_weight, grad_bias, None


def layer_norm_from_output(
    x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
) -> Tensor:
    """`F.layer_norm` whose backward is computed from the saved output instead of the input.

    Args:
        x: (..., *normalized_shape) input.
        normalized_shape: trailing dimensions to normalise over.
        weight: (*normalized_shape) γ with no zero entries (x̂ is recovered as (y − β)/γ), or None.
        bias: (*normalized_shape) β, or None.
        eps: added to the variance.
    Returns:
        (..., *normalized_shape), bitwise equal to F.layer_norm(x, normalized_shape, weight, bias, eps).
    Saves y, γ, β and rstd (…,) for backward, not x.
    """
    return _LayerNormFromOutput.apply(x, tuple(normalized_shape), weight, bias, eps)


class LeanLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` that saves its output rather than its input for backward.

    Made by swapping the class of an existing `nn.LayerNorm` (parameters kept). Whenever γ
    changes (tracked by its version counter, so optimizer steps and `load_state_dict` count;
    writes through `.data` do not) it checks γ for zeros and uses plain `F.layer_norm` where
    there are any.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        needs_backward = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, self.weight, self.bias)
        )
        if not needs_backward or self._weight_has_zeros():
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm_from_output(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def _weight_has_zeros(self) -> bool:
        if self.weight is None:
            return False
        key = (self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_zero_check", (None, False))[0] != key:
            has_zeros = bool((self.weight == 0).any())
            if has_zeros:
                warnings.warn(
                    "LeanLayerNorm: weight has zero entries, so the input cannot be recovered from the "
                    "output; using the ordinary LayerNorm (which saves its input) until it changes",
                    stacklevel=3,
                )
            self._zero_check = (key, has_zeros)
        return self._zero_check[1]
