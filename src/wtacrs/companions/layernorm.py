"""LayerNorm and RMSNorm whose backward reads their own output instead of their input.

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

RMSNorm (LLaMA-family decoders, `LlamaRMSNorm` and its copies): y = γ ⊙ x̂ with x̂ = x · rstd,
rstd = (mean(x²) + eps)^(-1/2), computed in float32 and x̂ rounded to the input dtype before the
product with γ. Autograd saves x (as a float32 copy when x is half precision: twice its bytes),
rstd and x̂ in the input dtype. `rms_norm_from_output` saves only y, γ and rstd, and backward
recovers x̂ = y / γ (γ_j = 0 columns keep their input column, as above) and applies

    dx = rstd · (g_γ − x̂ · mean(g_γ ⊙ x̂)),   g_γ = dy ⊙ γ,   dγ = Σ_rows dy ⊙ x̂.

In a pre-norm decoder block x is the residual stream, which no other op keeps, while y is the
input of the attention or MLP projections, which full fine-tuning and LoRA's down-projection save
anyway and the attention/MLP recomputes keep as their input: the saving is x's copy and x̂
(6 bytes per element in bf16, 8 in fp32), and nothing is added where y is kept anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs.companions.entry import Companion
from wtacrs.companions.matching import computes_like, llama_class
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
        # torch.native_layer_norm is the kernel F.layer_norm calls (y bitwise equal), and it gives
        # the row means and rstd from the same pass. Under autocast F.layer_norm itself runs, so
        # that autocast's device-specific cast decides y's dtype.
        mean = rstd = None
        if torch.is_autocast_enabled(x.device.type):
            y = F.layer_norm(x, normalized_shape, weight, bias, eps)
        else:
            y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        if rstd is None or rstd.dtype != _compute_dtype(y.dtype):  # half statistics: redo in float32
            mean, rstd = _row_statistics(x.to(_compute_dtype(y.dtype)), len(normalized_shape), eps)
        kept = None
        if kept_columns.numel():  # (..., K) input columns whose x̂ is not recoverable from y
            dims = tuple(range(-len(normalized_shape), 0))
            kept = x.flatten(dims[0]).index_select(-1, kept_columns.to(x.device))
        ctx.save_for_backward(y, weight, bias, rstd, kept, mean if kept is not None else None)
        ctx.kept_columns, ctx.normalized_shape, ctx.x_dtype = kept_columns, normalized_shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        y, weight, bias, rstd, kept, mean = ctx.saved_tensors
        dtype, shape = rstd.dtype, ctx.normalized_shape
        gamma = None if weight is None else weight.to(dtype)
        beta = None if bias is None else bias.to(dtype)
        x_hat = _normalized_from_output(y.to(dtype), gamma, beta)
        if kept is not None:
            dims = tuple(range(-len(shape), 0))
            x_hat = _restore_columns(x_hat, ctx.kept_columns.to(y.device), kept, mean, rstd, dims)
        # The native backward (one fused kernel) fed x̂ with mean 0 and rstd 1 computes
        # g_γ − mean(g_γ) − x̂·mean(g_γ ⊙ x̂), dγ and dβ exactly; dx is that times the true rstd.
        needs = [ctx.needs_input_grad[0], gamma is not None and ctx.needs_input_grad[2],
                 beta is not None and ctx.needs_input_grad[3]]
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
            grad_out.to(dtype), x_hat, shape, torch.zeros_like(rstd), torch.ones_like(rstd), gamma, beta, needs
        )
        if grad_x is not None:
            grad_x = grad_x.mul_(rstd).to(ctx.x_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_x, None, grad_weight, grad_bias, None, None


def _row_statistics(x: Tensor, num_dims: int, eps: float) -> tuple[Tensor, Tensor]:
    """Row means and rstd of x (..., *S) over its last `num_dims` dimensions, (..., 1…1) each."""
    var, mean = torch.var_mean(x, dim=tuple(range(-num_dims, 0)), correction=0, keepdim=True)
    return mean, var.add_(eps).rsqrt_()


def _normalized_from_output(y: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
    """x̂ = (y − β) / γ in one fused pass: y · (1/γ) − β/γ."""
    if gamma is None:
        return y if beta is None else y - beta
    shift = torch.zeros_like(gamma) if beta is None else beta / gamma
    return torch.addcmul(-shift, y, gamma.reciprocal())


def _restore_columns(x_hat: Tensor, columns: Tensor, kept: Tensor, mean: Tensor | None, rstd: Tensor, dims) -> Tensor:
    """x_hat (..., *S) with the flat columns (K,) recomputed from the kept input (..., K); `mean`
    None for RMSNorm (no centring)."""
    first = dims[0]
    flat = x_hat.flatten(first)  # (..., D)
    centred = kept.to(flat.dtype) if mean is None else kept.to(flat.dtype) - mean.flatten(first)
    exact = centred * rstd.flatten(first)  # (..., K)
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
        return _cached_kept_columns(self, self.weight, self.bias)


def _cached_kept_columns(module: nn.Module, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """`ill_conditioned_columns(weight, bias)`, cached on `module` until γ or β changes (tracked
    by version counter and storage), so the device sync happens once per optimizer step at most."""
    key = tuple((t.data_ptr(), t._version) for t in (weight, bias) if t is not None)
    cached = module.__dict__.get("_kept_columns_cache")
    if cached is None or cached[0] != key:
        cached = module._kept_columns_cache = (key, ill_conditioned_columns(weight, bias))
    return cached[1]


class _RMSNormFromOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, kept_columns):  # noqa: D102
        # LlamaRMSNorm.forward's ops in its order, so y is bitwise its output
        x_float = x.to(torch.float32)
        rstd = torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        y = weight * (x_float * rstd).to(x.dtype)
        kept = x.index_select(-1, kept_columns.to(x.device)) if kept_columns.numel() else None
        ctx.save_for_backward(y, weight, rstd, kept)
        ctx.kept_columns, ctx.x_dtype = kept_columns, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        y, weight, rstd, kept = ctx.saved_tensors
        dtype = _compute_dtype(y.dtype)
        gamma = weight.to(dtype)
        x_hat = y.to(dtype) / gamma
        if kept is not None:
            x_hat = _restore_columns(x_hat, ctx.kept_columns.to(y.device), kept, None, rstd, (-1,))
        grad = grad_out.to(dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_scaled = grad * gamma
            grad_x = (rstd * (grad_scaled - x_hat * (grad_scaled * x_hat).mean(-1, keepdim=True))).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x_hat).sum(tuple(range(grad.dim() - 1))).to(weight.dtype)
        return grad_x, grad_weight, None, None


def rms_norm_from_output(x: Tensor, weight: Tensor, eps: float, kept_columns: Tensor | None = None) -> Tensor:
    """`LlamaRMSNorm`'s forward whose backward is computed from the saved output, not the input.

    Args:
        x: (..., D) input.
        weight: (D,) γ.
        eps: added to the mean square.
        kept_columns: (K,) int64 columns whose input is saved because γ_j = 0 there; None computes
            `ill_conditioned_columns(weight, None)` (a device sync; `LeanRMSNorm` caches it).
    Returns:
        (..., D), bitwise equal to LlamaRMSNorm's output. Saves y, γ and rstd (one float32 per
        row), plus (..., K) input columns when K > 0.
    """
    if kept_columns is None:
        kept_columns = ill_conditioned_columns(weight, None)
    return _RMSNormFromOutput.apply(x, weight, eps, kept_columns)


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Whether `module` computes exactly LlamaRMSNorm's forward (`computes_like`: transformers
    copies it into Mistral, Qwen2, ... as is; Gemma's (1 + γ) and T5's variants differ), with a
    (D,) weight and a float `variance_epsilon`."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, nn.Parameter) and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and computes_like(module, llama_class("LlamaRMSNorm"))
    )


class LeanRMSNorm:
    """Mixin for LlamaRMSNorm-like modules (`is_llama_rms_norm`): saves its output rather than
    its input for backward (`rms_norm_from_output`); the γ = 0 columns are cached as
    `LeanLayerNorm` caches its own."""

    def forward(self, hidden_states: Tensor) -> Tensor:  # noqa: D102
        if not (torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad)):
            return super().forward(hidden_states)
        acted(self, "lean_layernorm")
        kept_columns = _cached_kept_columns(self, self.weight, None)
        return rms_norm_from_output(hidden_states, self.weight, self.variance_epsilon, kept_columns)


ENTRIES = (
    Companion(("lean_layernorm",), LeanLayerNorm, match=lambda module, *_: type(module) is nn.LayerNorm,
              state=("_kept_columns_cache",)),
    Companion(("lean_layernorm",), LeanRMSNorm, match=lambda module, *_: is_llama_rms_norm(module),
              state=("_kept_columns_cache",)),
)
