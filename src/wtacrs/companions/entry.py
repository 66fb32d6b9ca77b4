"""What a companion module exports for `apply_companions`: its `ENTRIES`, one `Companion` per
class it swaps in, saying which options turn it on, which modules it takes, the class it adds,
how a swapped module is set up and which options its usage records (`wtacrs.companions.usage`).

`apply_companions` asks the entries of every companion module in turn (the order
`wtacrs.companions` lists them), as PEFT's LoRA asks its dispatchers for a layer type; the
companion modules are the only place that knows what each companion takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Union

from torch import nn

# (module, qualified name, model, options) → whether the companion takes the module, or the
# options its usage records there (a companion with two options that records one of them)
Match = Callable[[nn.Module, str, nn.Module, SimpleNamespace], Union[bool, tuple[str, ...]]]


def _no_settings(module: nn.Module, on: SimpleNamespace) -> None:
    """A companion whose swapped class needs no instance settings."""


@dataclass(frozen=True)
class Companion:
    """One class a companion swaps in, as `apply_companions` applies it.

    Attributes:
        options: the `WTACRSConfig` companion options that turn it on (any one of them).
        mixin: the class it adds: a mixin whose forward wraps the module's (the swapped class is
            made at run time), or a subclass of the one class it replaces (`RegeneratedDropout`
            of `nn.Dropout`), swapped in as is.
        match: which modules it takes, asked only where one of `options` is on (`Match`).
        set_up: (module, options): the instance settings of a module just swapped.
        state: the instance attributes `set_up` or the class's forward add, which
            `remove_companions` deletes.
        alone: where it takes a module, it is that module's one companion; the others combine,
            in their order, outermost first (a recomputed attention block's `Recomputed` runs
            `AttentionCompanion`'s forward under checkpoint). Alone entries are asked first.
        checkpoints: its forward runs a checkpoint (`compile_checkpointed_regions_whole`).
    """

    options: tuple[str, ...]
    mixin: type
    match: Match
    set_up: Callable[[nn.Module, SimpleNamespace], None] = _no_settings
    state: tuple[str, ...] = ()
    alone: bool = True
    checkpoints: bool = False

    def records(self, module: nn.Module, name: str, model: nn.Module, on: SimpleNamespace) -> tuple[str, ...]:
        """The options whose usage this companion records on `module` (`usage.expect`); empty
        when it is off or does not take the module."""
        active = tuple(option for option in self.options if getattr(on, option))
        if not active:
            return ()
        taken = self.match(module, name, model, on)
        return taken if isinstance(taken, tuple) else active if taken else ()
