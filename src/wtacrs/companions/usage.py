"""Which companion took effect where: a companion that silently changes nothing is a memory
claim that silently fails, so each one records, per module, whether it has acted.

`apply_companions` marks every module it swaps with the companions applied to it (`expect`);
the companion's forward marks one as having acted (`acted`) when it changes what a training
forward saves: a dropout mask regenerated, a LayerNorm backward from its output, an SDPA call
recomputed, an activation input compressed, a module run under checkpoint. A module swapped
but never seen acting found nothing to change (DeBERTa's attention computes no SDPA; dropout
with p = 0 draws no mask).
"""

from __future__ import annotations

from torch import nn

from wtacrs.config import COMPANIONS

# The WTACRSConfig options whose effect is reported, in the order reports list them (`keep_gate`
# only changes what `recompute_activation` keeps).
COMPANION_OPTIONS: tuple[str, ...] = tuple(option.name for option in COMPANIONS if option.reported)
USAGE_ATTR = "wtacrs_companion_use"  # instance attribute: {companion option: acted since applied}


def expect(module: nn.Module, companion: str) -> None:
    """Record that `companion` is applied to `module` and has not acted yet."""
    module.__dict__.setdefault(USAGE_ATTR, {})[companion] = False


def acted(module: nn.Module, *companions: str) -> None:
    """Record that those of `companions` applied to `module` have acted (others are ignored)."""
    use = module.__dict__.get(USAGE_ATTR)
    if use is not None:
        for companion in companions:
            if companion in use:
                use[companion] = True


def companion_usage(model: nn.Module) -> dict[str, tuple[list[str], list[str]]]:
    """{companion option: (qualified names of the modules it is applied to, of those it acted on)}
    for every companion applied somewhere in `model`."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    for name, module in model.named_modules():
        for companion, has_acted in module.__dict__.get(USAGE_ATTR, {}).items():
            applied, acting = found.setdefault(companion, ([], []))
            applied.append(name)
            if has_acted:
                acting.append(name)
    return found
