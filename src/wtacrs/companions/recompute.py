"""Recompute parts of a block in backward instead of saving their tensors (selective
recomputation, Korthikanti et al. 2022, arXiv 2205.05198, §4.2). Exact.

A module marked here runs its forward under non-reentrant `torch.utils.checkpoint`: forward
keeps only the module's inputs, and backward runs the module again. Checkpoint restores the
RNG state first, so dropout draws the same masks. Every input of a sampled layer inside then
lives until that layer's backward anyway, so by default (`WTACRSConfig.backward_draws`) the
layer draws its rows there, scored with its true output gradient (`functional.inputs_kept`):
the least-variance scores, with no cache and no extra memory. With `backward_draws=False`
the layers redo the forward's draw (keyed by the input tensor and regathered) and the
gradients are bitwise those without recompute. Two kinds of module are worth it:

- Activation (`recompute_activation`): modules whose children are exactly one linear layer
  (plain or LoRA-wrapped) and one elementwise activation, `act(dense(x))` (`BertIntermediate`
  and its copies in RoBERTa, ELECTRA, ...). Once the linear inputs are sampled, the activation's
  input (4 · hidden per token) is the largest tensor a step saves, and only the activation's
  backward reads it. The module's input x is the preceding LayerNorm's output, which lean
  LayerNorm keeps anyway. Cost: one more hidden → 4·hidden matmul per block. The output is
  tagged with a `RowRecipe`, so the sampled projection reading it (BERT's output dense) saves
  no rows either: backward recomputes act(dense(x_i)) for its M sampled rows (the same values
  up to rounding), a 4·hidden-wide matmul on M rows. Other MLPs (T5, GPT-2, DistilBERT) also
  contain their output projection, which would be recomputed too; they are left alone.
- Gated MLP (`recompute_activation`, `RecomputedGate`): LLaMA's SwiGLU MLP
  down(act(gate(x)) ⊙ up(x)) and its verbatim copies (`is_gated_mlp`). Only the gated part
  act(gate(x)) ⊙ up(x) runs under checkpoint: forward keeps x (the post-attention RMSNorm's
  output, which lean RMSNorm keeps anyway), not gate(x), act(gate(x)) and up(x) (three
  intermediate-size tensors, the largest a LoRA step saves). The gated output is tagged with a
  `RowRecipe` from x, so a sampled down projection (or its LoRA `lora_A`) saves no rows either.
  Cost: the gate and up matmuls once more in backward (two of the MLP's three), plus both on the
  M sampled rows for the down projection's weight gradient.
  With `keep_gate` (recipe component "keep-gate"), gate_proj runs outside the checkpoint and its
  output g is kept: only act(g) ⊙ up_proj(x) is recomputed, and the down projection's drawn rows
  come from g's rows and up_proj on x's. Half the extra matmuls for one intermediate-size tensor
  per block. gate_proj's sampled layer still draws in backward: its input x is kept by the
  checkpoint anyway. SmolLM2-135M LoRA, fp32, batch 2, seq 512: 0.50x LoRA's live peak against
  the full recompute's 0.42x, at a step no longer than its (two interleaved runs,
  benchmarks/RESULTS.md).
- Attention (`recompute_attention`): the outermost module whose class name contains
  "Attention" (`BertAttention`: q/k/v projections, attention, output projection, dropout and
  LayerNorm; `GPT2Attention`, `T5LayerSelfAttention`, ...). Without it a block keeps q, k and v
  for the attention matmuls (three hidden-size tensors) besides the sampled rows of the
  projections' inputs; with it, only the module's input, which the previous block's LayerNorm
  keeps anyway. Cost: the attention sub-block's forward once more (4 of a BERT block's 12
  hidden² matmuls per token, plus the attention itself).

A call given a key/value cache (a keyword argument named like `cache`, `past_key_values` or
`layer_past` holding an object) runs without checkpoint: the recompute would append to the cache
a second time. Decoders trained with `use_cache=True` keep their attention tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wtacrs.companions.activation import elementwise_activation_types
from wtacrs.companions.entry import Companion
from wtacrs.companions.matching import computes_like, llama_class
from wtacrs.companions.usage import acted
from wtacrs.functional import attach_row_recipe, inputs_kept_for_backward
from wtacrs.sampling.state import bind_frames


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or an adapter wrapping one (PEFT's LoRA layers keep it as `base_layer`)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def is_linear_then_activation(module: nn.Module) -> bool:
    """Whether `module`'s children are exactly one linear layer (maybe LoRA-wrapped) and one
    elementwise activation."""
    children = list(module.children())
    return (
        len(children) == 2
        and sum(_is_linear(c) for c in children) == 1
        and sum(isinstance(c, elementwise_activation_types()) for c in children) == 1
    )


def is_outermost_attention(module: nn.Module, name: str, model: nn.Module) -> bool:
    """Whether `module` (qualified name `name` in `model`) has a class name containing "Attention"
    while no enclosing module's does (`BertAttention`, not the `BertSelfAttention` inside it)."""
    path = name.split(".") if name else []
    return "Attention" in type(module).__name__ and not any(
        "Attention" in type(model.get_submodule(".".join(path[:depth]))).__name__ for depth in range(len(path))
    )


def is_gated_mlp(module: nn.Module) -> bool:
    """Whether `module` is LLaMA's gated MLP or a verbatim copy (`computes_like` LlamaMLP:
    down_proj(act_fn(gate_proj(x)) * up_proj(x))) with linear (maybe LoRA-wrapped) projections
    and an elementwise activation."""
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (
        all(p is not None and _is_linear(p) for p in projections)
        and isinstance(getattr(module, "act_fn", None), elementwise_activation_types())
        and computes_like(module, llama_class("LlamaMLP"))
    )


def deterministic(*modules: nn.Module) -> bool:
    """No active dropout inside `modules` (e.g. in a LoRA adapter): each output row depends on
    its input row alone, so rows can be recomputed."""
    return not any(isinstance(m, nn.Dropout) and m.p > 0 for module in modules for m in module.modules())


def maps_rows_alone(module: nn.Module) -> bool:
    """Whether a linear-then-activation `module`, or the gated part of a gated MLP, computes each
    output row from its input row alone and deterministically, so rows can be recomputed."""
    if is_gated_mlp(module):
        return deterministic(module.gate_proj, module.up_proj)
    return is_linear_then_activation(module) and deterministic(module)


class Recomputed:
    """Mixin: in training, forward runs under non-reentrant checkpoint (see module docstring).
    Instances with `row_recipe` set also tag their output with a `RowRecipe`."""

    def forward(self, *args, **kwargs):  # noqa: D102
        if not (self.training and torch.is_grad_enabled()) or _passes_a_cache(kwargs):
            return super().forward(*args, **kwargs)
        acted(self, "recompute_activation", "recompute_attention")
        output = checkpoint(bind_frames(_keeping_inputs(super().forward)), *args, use_reentrant=False, **kwargs)
        rowwise = len(args) == 1 and not kwargs and output.shape[:-1] == args[0].shape[:-1]  # not a pooler
        if self.__dict__.get("row_recipe", False) and rowwise:
            attach_row_recipe(output, args[0], _without_autograd(super().forward, args[0].device.type))
        return output


def compile_checkpointed_regions_whole() -> None:
    """Let torch.compile trace a recomputed region whole. Its sampled layers keep per-forward
    tables (uniforms, which slots draw in backward, the inputs-kept depth) in Python state; dynamo
    refuses such side effects inside a checkpoint unless told that skipping them in the region's
    recompute is fine, which it is for these: the recompute finds the same values there. Without
    it every recomputed region breaks the graph (and `fullgraph=True` fails). A process-wide
    setting of dynamo's, so set only once a model has a recomputed region."""
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def _keeping_inputs(forward):
    """`forward` run inside `inputs_kept_for_backward`: under checkpoint, in the first pass and in
    the recompute alike (the recompute must save what the first pass would have)."""
    def run(*args, **kwargs):
        with inputs_kept_for_backward():
            return forward(*args, **kwargs)

    return run


def _passes_a_cache(kwargs: dict) -> bool:
    """A key/value cache object among the keyword arguments (`use_cache` flags and
    `cache_position` tensors are not caches)."""
    return any(
        ("cache" in name or "past" in name) and value is not None and not isinstance(value, (bool, torch.Tensor))
        for name, value in kwargs.items()
    )


def _without_autograd(forward, device_type: str):
    """`forward` for backward's recompute of rows, under the autocast state of this forward."""
    enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

    def rows_again(*rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return forward(*rows)

    return rows_again


class RecomputedGate:
    """Mixin for gated MLPs (`is_gated_mlp`): in training, the gated part runs under non-reentrant
    checkpoint and, with `row_recipe` set, its output carries a `RowRecipe` (see module
    docstring). With `keep_gate` set, gate_proj runs outside the checkpoint and its output g is
    kept: only act(g) ⊙ up_proj(x) is recomputed. Same output as the original forward, bitwise."""

    def forward(self, x):  # noqa: D102
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        acted(self, "recompute_activation")
        region, inputs = self._gated, (x,)
        if self.__dict__.get("keep_gate", False):
            with inputs_kept_for_backward():  # the checkpoint below keeps x for up_proj anyway
                region, inputs = self._gated_from, (self.gate_proj(x), x)
        gated = checkpoint(bind_frames(_keeping_inputs(region)), *inputs, use_reentrant=False)
        if self.__dict__.get("row_recipe", False):
            attach_row_recipe(gated, inputs, _without_autograd(region, x.device.type))
        return self.down_proj(gated)

    def _gated(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) → (..., intermediate): act(gate_proj(x)) * up_proj(x), LlamaMLP's order."""
        return self._gated_from(self.gate_proj(x), x)

    def _gated_from(self, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """gate (..., intermediate) = gate_proj(x), x (..., hidden) → act(gate) * up_proj(x)."""
        return self.act_fn(gate) * self.up_proj(x)


def _recomputed(module: nn.Module, name: str, model: nn.Module, on) -> tuple[str, ...]:
    """The option a `Recomputed` module records: an attention block's, else an `act(dense(x))`'s."""
    if on.recompute_attention and is_outermost_attention(module, name, model):
        return ("recompute_attention",)
    return ("recompute_activation",) if on.recompute_activation and is_linear_then_activation(module) else ()


def _set_up_recomputed(module: nn.Module, on) -> None:
    module.row_recipe = maps_rows_alone(module)  # activation modules; never an attention block


def _set_up_gate(module: nn.Module, on) -> None:
    module.row_recipe = maps_rows_alone(module)
    module.keep_gate = on.keep_gate and deterministic(module.gate_proj)


ENTRIES = (
    Companion(("recompute_activation",), RecomputedGate, match=lambda module, *_: is_gated_mlp(module),
              set_up=_set_up_gate, state=("row_recipe", "keep_gate"), checkpoints=True),
    # outermost, around an attention block's `AttentionCompanion` (`attention.ENTRIES`)
    Companion(("recompute_activation", "recompute_attention"), Recomputed, match=_recomputed,
              set_up=_set_up_recomputed, state=("row_recipe",), alone=False, checkpoints=True),
)
