"""Memory-lean companions to WTA-CRS: the other tensors a training step saves for backward.

- Dropout (`lean_dropout=True`): no per-element mask is saved; backward regenerates it from a seed.
  Exact. See `wtacrs.companions.dropout` for which dropout calls are covered.
- LayerNorm (`lean_layernorm=True`): backward from the saved output, not the input. Exact up to
  rounding; a real saving only where the next op saves the output anyway (see
  `wtacrs.companions.layernorm`). LLaMA-style RMSNorm (`LeanRMSNorm`) likewise.
- Attention (`lean_attention=True`): SDPA saves no (batch, heads, L, L) probabilities or dropout
  mask; backward recomputes them (exact, bitwise). See `wtacrs.companions.attention`.
- Activation recompute (`recompute_activation=True`): the input of the activation in
  `act(dense(x))` modules is recomputed in backward. Exact; one more matmul per block. In
  LLaMA-style gated MLPs, the gated part act(gate(x)) ⊙ up(x) (`RecomputedGate`): two more.
  See `wtacrs.companions.recompute`.
- Attention recompute (`recompute_attention=True`): the attention sub-block (projections,
  attention, output projection) keeps only its input and runs again in backward. Exact; 4 of
  BERT's 12 per-token matmuls once more. See `wtacrs.companions.recompute`.
- Chunked LM loss (`chunked_lm_loss=True`): a causal LM's next-token loss computed in chunks of
  tokens, never holding the (tokens × vocabulary) logits. Exact; no extra matmul. See
  `wtacrs.companions.lm_loss`.
- Activation (`activation_compression="bf16"` or `"int8"`): the input of GELU-like activations is kept
  compressed. An approximation (stated bounds in `wtacrs.companions.activation`); off by default.

What each companion saves is measured in `benchmarks/`: bytes per autograd op in
SAVED_TENSORS.md, live peaks of a whole step per combination in RESULTS.md (compare the
recomputes by peaks: saved-tensor hooks do not see what a checkpoint keeps in its closure). The
LayerNorm companion saves nothing next to sampled linears (see `.layernorm`); with sdpa on CPU
the attention-probability dropout happens inside the kernel and is not covered.

A companion can find nothing to change on a model (no LayerNorm or LLaMA-style RMSNorm in T5,
no SDPA call in DeBERTa's attention, no `act(dense(x))` or gated MLP in GPT-2): each swapped module records
whether its companion acted in a training forward (`wtacrs.companions.usage`), and
`wtacrs.summary` / `wtacrs.modeling.companion_effects` report which took effect.

Modules are changed by swapping their class in place, as torchao does: the module object, its
parameters (state_dict keys, `data_ptr`s) and `isinstance` checks are unchanged, and
`remove_companions` swaps the original class back. Activation and attention modules get
classes made at run time (one per original class): state_dicts and `copy.deepcopy` work, pickling
the whole module object (`torch.save(model)`) does not; remove the companions first.

The options are `WTACRSConfig`'s, by the same names (`wtacrs.config.COMPANIONS`, one field each):
`apply_companions` takes them as keywords, and `wtacrs.apply` passes its config's
(`WTACRSConfig.companion_options`). Each companion module exports its `ENTRIES`
(`wtacrs.companions.entry.Companion`: which options turn it on, which modules it takes, the class
it adds and how a swapped module is set up); `apply_companions` asks the entries of `ENTRIES`,
and a new companion is a new module named there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import cache
from types import SimpleNamespace
from typing import Any

from torch import nn

from wtacrs.companions import activation, attention, dropout, layernorm, lm_loss, recompute
from wtacrs.companions.activation import (
    ACTIVATION_MODES,
    compressed_activation,
    validate_activation_mode,
)
from wtacrs.companions.attention import RecomputedAttentionMode
from wtacrs.companions.dropout import RegeneratedDropout, regenerated_dropout
from wtacrs.companions.entry import Companion
from wtacrs.companions.layernorm import (
    LeanLayerNorm,
    ill_conditioned_columns,
    layer_norm_from_output,
    rms_norm_from_output,
)
from wtacrs.companions.lm_loss import chunked_lm_loss
from wtacrs.companions.matching import ORIGINAL_CLASS
from wtacrs.companions.recompute import compile_checkpointed_regions_whole
from wtacrs.companions.usage import COMPANION_OPTIONS, USAGE_ATTR, companion_usage, expect
from wtacrs.config import COMPANIONS

__all__ = [
    "ACTIVATION_MODES",
    "COMPANION_OPTIONS",
    "ENTRIES",
    "LeanLayerNorm",
    "RecomputedAttentionMode",
    "RegeneratedDropout",
    "apply_companions",
    "chunked_lm_loss",
    "companion_usage",
    "compressed_activation",
    "ill_conditioned_columns",
    "layer_norm_from_output",
    "regenerated_dropout",
    "remove_companions",
    "rms_norm_from_output",
]

# Every companion, as its module exports it (`wtacrs.companions.entry`). Alone entries are asked
# first, in this order; the others combine on a module in this order, outermost first
# (`Recomputed` around `AttentionCompanion`).
ENTRIES: tuple[Companion, ...] = (
    *dropout.ENTRIES, *layernorm.ENTRIES, *activation.ENTRIES, *recompute.ENTRIES, *lm_loss.ENTRIES,
    *attention.ENTRIES,
)

ModuleFilter = Callable[[nn.Module, str], bool]
_ORIGINAL = ORIGINAL_CLASS  # class attribute of every swapped-in class: the class it replaced
# instance attributes the companions add
_MODULE_STATE = tuple(dict.fromkeys(attribute for entry in ENTRIES for attribute in entry.state)) + (USAGE_ATTR,)
for _entry in ENTRIES:
    if issubclass(_entry.mixin, nn.Module):  # swapped in as is, for the one class it subclasses
        setattr(_entry.mixin, _ORIGINAL, _entry.mixin.__base__)


@cache
def _with_mixins(mixins: tuple[type, ...], cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of `cls` whose forward is the mixins' (outermost first), named after all of
    them; one per (mixins, cls). A single mixin that subclasses `cls` is itself."""
    if len(mixins) == 1 and issubclass(mixins[0], cls):
        return mixins[0]
    name = "".join(m.__name__ for m in mixins) + cls.__name__
    namespace = {_ORIGINAL: cls, "__module__": cls.__module__}
    forward = next((m.__dict__["forward"] for m in mixins if "forward" in m.__dict__), None)
    if forward is not None:  # the mixins' forward, with the original's signature for inspect
        # (the Trainer keeps only the dataset columns that the model's forward names)
        namespace["forward"] = functools.wraps(cls.forward)(lambda self, *args, **kwargs: forward(self, *args, **kwargs))
    return type(name, (*mixins, cls), namespace)


def _is_swapped(module: nn.Module) -> bool:
    return _ORIGINAL in type(module).__dict__


def _companions_of(module: nn.Module, name: str, model: nn.Module,
                   on: SimpleNamespace) -> list[tuple[Companion, tuple[str, ...]]]:
    """The entries that take `module` under the options `on`, outermost first, each with the
    options it records there: the first alone entry that takes it, else every other that does."""
    for entry in ENTRIES:
        if entry.alone and (records := entry.records(module, name, model, on)):
            return [(entry, records)]
    return [(entry, records) for entry in ENTRIES
            if not entry.alone and (records := entry.records(module, name, model, on))]


def _options(given: dict[str, Any]) -> SimpleNamespace:
    """Every companion option (`COMPANIONS`): those `given`, the others off; raises TypeError on
    a name that is none of them, ValueError on a bad activation mode or an unmet requirement."""
    unknown = sorted(set(given) - {option.name for option in COMPANIONS})
    if unknown:
        raise TypeError(f"apply_companions() got unknown companion option(s) {', '.join(unknown)}; "
                        f"known: {', '.join(option.name for option in COMPANIONS)}")
    values = {option.name: given.get(option.name, option.off) for option in COMPANIONS}
    if values["activation_compression"] is not None:
        validate_activation_mode(values["activation_compression"])
    for option in COMPANIONS:
        unmet = option.unmet(values)
        if unmet:
            raise ValueError(f"{unmet} too")
    return SimpleNamespace(**values)


def apply_companions(model: nn.Module, *, module_filter: ModuleFilter | None = None, **options: Any) -> list[str]:
    """Swap the classes of `model`'s dropout, LayerNorm, activation and attention modules in place.

    Args:
        model: any module tree (a transformers model, a block, ...).
        module_filter: optional (module, qualified name) → bool; modules it rejects are skipped.
        **options: `WTACRSConfig`'s companion options by name (`wtacrs.config.COMPANIONS`;
            `WTACRSConfig.companion_options()` gives a config's), each off when not given. Each
            swaps, where it is on:

            - lean_dropout: exact `nn.Dropout` modules → `RegeneratedDropout`, and functional
              dropout inside the innermost "…Attention" modules intercepted (eager attention
              probabilities).
            - lean_layernorm: exact `nn.LayerNorm` modules → `LeanLayerNorm`, LLaMA-style
              RMSNorm → `LeanRMSNorm`.
            - lean_attention: SDPA calls inside the innermost "…Attention" modules recompute
              their probabilities in backward instead of saving them (`RecomputedAttentionMode`).
            - activation_compression: None, or one of ACTIVATION_MODES for the elementwise
              activation modules listed by `elementwise_activation_types()` (in-place ones are
              skipped).
            - recompute_activation: `act(dense(x))` modules recompute the activation's input in
              backward (`Recomputed`); LLaMA-style gated MLPs their gated part (`RecomputedGate`).
            - keep_gate: with `recompute_activation`, gated MLPs keep gate(x) and recompute only
              act(gate(x)) ⊙ up(x) (when gate_proj has no active dropout).
            - recompute_attention: the outermost "…Attention" modules keep only their inputs and
              run again in backward (`Recomputed`).
            - chunked_lm_loss: causal LMs compute their next-token loss in chunks without full
              logits (`ChunkedLMLoss`).
    Returns:
        Qualified names of the modules swapped. Already swapped modules are skipped, so applying
        twice changes nothing (call `remove_companions` first to change settings).
    Raises:
        TypeError: an option that is not a companion's.
        ValueError: unknown `activation_compression` mode, or keep_gate without recompute_activation.
    """
    on = _options(options)
    swapped = []
    for name, module in model.named_modules():
        if _is_swapped(module) or (module_filter is not None and not module_filter(module, name)):
            continue
        companions = _companions_of(module, name, model, on)
        if not companions:
            continue
        module.__class__ = _with_mixins(tuple(entry.mixin for entry, _ in companions), type(module))
        if any(entry.checkpoints for entry, _ in companions):
            compile_checkpointed_regions_whole()
        for entry, records in reversed(companions):  # innermost first, as usage has listed them
            entry.set_up(module, on)
            for option in records:
                expect(module, option)
        swapped.append(name)
    return swapped


def remove_companions(model: nn.Module) -> list[str]:
    """Swap every companion class in `model` back to the class it replaced.

    Returns:
        Qualified names of the modules restored.
    """
    restored = []
    for name, module in model.named_modules():
        if not _is_swapped(module):
            continue
        module.__class__ = type(module).__dict__[_ORIGINAL]
        for attribute in _MODULE_STATE:
            module.__dict__.pop(attribute, None)
        restored.append(name)
    return restored
