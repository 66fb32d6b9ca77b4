"""Dropout that saves nothing per element for backward: the mask is regenerated from a seed.

`nn.Dropout` keeps its mask for backward: on CPU a float tensor the size of the input (the scaled
noise, 4 bytes per element in fp32), on CUDA a bool mask (1 byte per element). Here the forward
draws one 63-bit seed from the global CPU generator, builds the mask with a private
`torch.Generator` on the input's device seeded with it, and backward rebuilds the identical mask
from the same seed. Nothing but the seed (a Python int) is saved.

- Distribution: each element is kept with probability 1 − p and scaled by 1/(1 − p), exactly as
  `nn.Dropout`; given the same mask the output is bitwise equal to the CPU `nn.Dropout` output
  (out = x · (mask / (1 − p))). On CUDA the native fused kernel multiplies by the scale in float,
  so outputs may differ from it by one rounding.
- `torch.utils.checkpoint` (reentrant or not) restores the CPU RNG state before recomputing, so
  the recompute draws the same seed and the same mask. Backward uses the seed of the original
  forward in either case.
- Under autocast the op runs in the dtype it receives (dropout is not an autocast op).

Coverage in models: every exact `nn.Dropout` module (hidden, embedding and attention-probability
dropout applied through a module, e.g. GPT-2's `attn_dropout`), and `F.dropout` /
`torch.dropout` calls made inside attention modules' forward (transformers' eager attention,
e.g. BERT's `eager_attention_forward`), intercepted with a `TorchFunctionMode` scoped to the
innermost modules whose class name contains "Attention". With `attn_implementation="sdpa"` the
attention dropout happens inside `F.scaled_dot_product_attention`: the CUDA flash and
memory-efficient kernels already regenerate it from a Philox seed; the CPU/math fallback stores
it, and this module does not change that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from wtacrs.companions.entry import Companion
from wtacrs.companions.usage import acted

_SEED_BOUND = 2**63 - 1


def _draw_seed() -> int:
    """A seed from the global CPU generator, which torch.utils.checkpoint saves and restores."""
    return int(torch.randint(_SEED_BOUND, ()))


def _scaled_keep_mask(shape: torch.Size, dtype: torch.dtype, device: torch.device, p: float, seed: int) -> Tensor:
    """(shape) mask / (1 − p), mask ~ Bernoulli(1 − p), a pure function of its arguments."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p, generator=generator).div_(1 - p)


class _RegeneratedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int, inplace: bool) -> Tensor:  # noqa: D102
        ctx.p, ctx.seed, ctx.dtype = p, seed, x.dtype
        noise = _scaled_keep_mask(x.shape, x.dtype, x.device, p, seed)
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(noise)
        return x * noise

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        noise = _scaled_keep_mask(grad_out.shape, ctx.dtype, grad_out.device, ctx.p, ctx.seed)
        return grad_out * noise, None, None, None


def regenerated_dropout(x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """`F.dropout` with the same mask distribution that saves no mask for backward.

    Args:
        x: (...) input of any floating dtype and device.
        p: drop probability in [0, 1].
        training: identity when False, as `F.dropout`.
        inplace: modify `x` in place, as `F.dropout`.
    Returns:
        (...) x · mask / (1 − p); backward multiplies by the same mask, rebuilt from a seed.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1], got {p!r}")
    if not _draws_a_mask(x, p, training):
        return F.dropout(x, p, training, inplace)
    return _RegeneratedDropout.apply(x, p, _draw_seed(), inplace)


def _draws_a_mask(x: Tensor, p: float, training: bool) -> bool:
    """Whether dropout of `x` is random, hence has a mask that plain dropout would store."""
    return training and p not in (0.0, 1.0) and x.numel() > 0


class RegeneratedDropout(nn.Dropout):
    """`nn.Dropout` whose backward rebuilds the mask from a seed instead of saving it.

    Made by swapping the class of an existing `nn.Dropout` (`p` and `inplace` are kept), so
    `isinstance(m, nn.Dropout)` still holds.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        if _draws_a_mask(input, self.p, self.training):
            acted(self, "lean_dropout")
        return regenerated_dropout(input, self.p, self.training, self.inplace)


def _dropout_arguments(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
    """F.dropout's signature, to read a call's arguments however they were passed."""
    return input, p, training, inplace


def _torch_dropout_arguments(input: Tensor, p: float, train: bool):
    """torch.dropout's signature (no inplace flag)."""
    return input, p, train, False


class RegeneratedDropoutMode(TorchFunctionMode):
    """Within this mode, `F.dropout` and `torch.dropout` calls run as `regenerated_dropout`.
    `owner`, if given, is the module recorded as acted on (`wtacrs.companions.usage`)."""

    def __init__(self, owner: nn.Module | None = None):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is F.dropout:
            return self._regenerated(*_dropout_arguments(*args, **kwargs))
        if func is torch.dropout:
            return self._regenerated(*_torch_dropout_arguments(*args, **kwargs))
        return func(*args, **kwargs)

    def _regenerated(self, x: Tensor, p: float, training: bool, inplace: bool) -> Tensor:
        if self.owner is not None and _draws_a_mask(x, p, training):
            acted(self.owner, "lean_dropout")
        return regenerated_dropout(x, p, training, inplace)


# exact nn.Dropout modules (functional dropout in attention: `attention.ENTRIES`)
ENTRIES = (Companion(("lean_dropout",), RegeneratedDropout, match=lambda module, *_: type(module) is nn.Dropout),)
