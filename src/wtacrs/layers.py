"""Sampled linear layers: a linear layer whose weight gradient is estimated from sampled rows.

`wtacrs.apply` changes the class of each targeted `nn.Linear` (or GPT-2's `Conv1D`) to the sampled
subclass here, keeping its Parameter objects; the subclass's training forward asks the model's
`SamplingState` (`wtacrs.sampling`) for its row sample and runs `functional.linear_with_sample`.
Inside a recomputed sub-block (`functional.inputs_kept`), and for an input with a row recipe,
the draw waits for backward instead (`functional.linear_drawn_in_backward`). Forward outputs are
unchanged; eval mode and frozen weights take the plain path.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn

from wtacrs.functional import can_draw_in_backward, linear_drawn_in_backward, linear_with_sample, needs_sampling
from wtacrs.sampling import SamplingState


class SampledLayerMixin:
    """Forward of a layer whose weight gradient is row-sampled: the draw, and the recording of
    its output-gradient norms, come from the model's `SamplingState`."""

    wtacrs_state: SamplingState
    wtacrs_slot: int
    wtacrs_stream: str

    @classmethod
    def original_class(cls) -> type[nn.Module]:
        """The class this sampled class stands in for (the one after the mixin), for `remove`."""
        mro = cls.__mro__
        return mro[mro.index(SampledLayerMixin) + 1]

    def _sampled_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        state = self.wtacrs_state
        if not (self.training and needs_sampling(weight, state.config.ratio, state.config.estimator)):
            return F.linear(x, weight, bias)
        if state.config.backward_draws and can_draw_in_backward(x):
            draw, norm_sink = state.backward_draw(self.wtacrs_slot, self.wtacrs_stream, x)
            return linear_drawn_in_backward(x, weight, bias, draw, norm_sink)
        sample, norm_sink = state.layer_call(self.wtacrs_slot, self.wtacrs_stream, x)
        return linear_with_sample(x, weight, bias, sample, norm_sink)


class SampledLinear(SampledLayerMixin, nn.Linear):
    """nn.Linear with the same parameters whose weight gradient is row-sampled in training."""

    def forward(self, x: Tensor) -> Tensor:
        return self._sampled_forward(x, self.weight, self.bias)


@functools.cache
def sampled_conv1d_class() -> type[nn.Module]:
    """GPT-2's Conv1D (y = x W + b with W of shape (in, out)) with a row-sampled weight gradient."""
    from transformers.pytorch_utils import Conv1D

    class SampledConv1D(SampledLayerMixin, Conv1D):
        def forward(self, x: Tensor) -> Tensor:
            if not self.training:
                return super().forward(x)
            # F.linear(x, Wᵀ, b) is the same addmm as Conv1D's; grads flow back through the view.
            return self._sampled_forward(x, self.weight.t(), self.bias)

    return SampledConv1D
